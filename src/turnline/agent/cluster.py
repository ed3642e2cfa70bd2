"""Many nodes on Redis: the worker side, and the wire both sides share.

A session still has exactly one writer, a :class:`SessionHub`, living in the
one worker process that holds the session's *lease*: the key
``{prefix}:{<session>}:lease`` holding that worker's fence token
``"<worker id>|<n>"``, set with NX and a TTL (``lease_ms``) and renewed every
``lease_ms / 3`` while the worker lives. Every append passes the token as its
fence, so a worker that lost its lease (stalled past the TTL) cannot write.

Gateways never write a session. They send commands (send, cancel, regenerate…)
to the owner's inbox stream ``{prefix}:inbox:<worker>``, or, when nobody owns
the session, to the stream ``{prefix}:dispatch``, read by the consumer group
``workers``: the one worker that reads an entry takes the lease (or forwards
the command to whoever holds it), runs the command, replies on the gateway's
stream ``{prefix}:reply:<gateway>`` once the result is durable, and only then
acknowledges the entry. Entries a dead worker read but never acknowledged are
claimed by the others after ``lease_ms``.

Liveness: every owned session is in the sorted set ``{prefix}:owned``, scored
by its lease deadline. Each worker's reaper looks for deadlines in the past
every ``reaper_interval_s``, takes such a session's lease (SET NX decides
between reapers) and loads it: recovery ends the turns that lost their runner
with ``error``/``worker_lost`` and starts the queued inputs (they are in the
log). So a worker's death is noticed within ``lease_ms + reaper_interval_s``.

Commands are idempotent: the gateway names the message and turn ids of a send,
the turn of a regenerate and the request id of a cancel before it routes it, so a retried command that
already ran is answered from the log with its outcome instead of running twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ClusterDownError, ResponseError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.session import Session
from ..protocol import (
    AnyEvent, CancelFilter, ErrorCode, ErrorInfo, MessageIn, SpeechInterrupted, TurnRevised, now_ms,
)
from ..store.base import READ_PAGE
from .runtime import CommandError, Runtime, RuntimeConfig, SendOutcome, SessionHub

log = logging.getLogger("turnline.cluster")

GROUP = "workers"
BLOCK_MS = 2000
STREAM_MAXLEN = 100_000
REPLY_TTL_MS = 300_000
MAX_HOPS = 2
RECENT_REPLIES = 4096
BUS_CONNECTIONS = 128  # commands a Bus (a gateway's, a worker's) has in flight at once; more wait
# What the reading loops wait out and retry (the last three: a cluster mid-failover).
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError, SlotNotCoveredError)


@dataclass
class ClusterConfig:
    lease_ms: int = 3000
    # How often each worker looks for sessions whose owner stopped renewing.
    reaper_interval_s: float = 0.5
    # Sessions with work (running turns or a queue) a worker takes from the
    # dispatch stream at once; beyond it, it leaves new sessions to others.
    concurrency: int = 256
    # An owned session with nothing running or queued for this long is
    # released (lease and hub), so ownership moves freely.
    idle_release_s: float = 30.0
    # Gateway: a command with no reply after this is routed again (commands
    # are idempotent), until command_timeout_s, when it fails with ``internal``.
    attempt_timeout_s: float = 1.0
    command_timeout_s: float = 30.0

    @property
    def worker_lost_bound_s(self) -> float:
        """The longest a dead worker's turn stays open (plus loading the session)."""
        return self.lease_ms / 1000 + self.reaper_interval_s


class Command(msgspec.Struct, omit_defaults=True):
    rid: str  # request id: retries and forwards of one command share it
    gw: str  # the gateway to reply to
    session: str
    op: str
    args: dict[str, Any] = {}
    exp: int = 0  # unix ms after which the gateway no longer waits: drop it
    hops: int = 0


class Reply(msgspec.Struct, omit_defaults=True):
    rid: str
    result: Any = None
    error: ErrorInfo | None = None
    redo: bool = False  # this worker does not own the session: route again
    details: dict[str, Any] = {}  # the error's (CommandError.details: a refusal's limit and retry_after_ms)


_command_decoder = msgspec.json.Decoder(Command)
_reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


def _reraise_cancel() -> None:
    """redis-py sometimes absorbs the cancellation of a pending command (it
    returns, or raises a connection error, instead of CancelledError): a loop
    checks on every round, or its task would never end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def decode_command(data: bytes) -> Command:
    return _command_decoder.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _reply_decoder.decode(data)


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_holds_permit: contextvars.ContextVar[bool] = contextvars.ContextVar("turnline_bus_permit", default=False)


class _WaitingCluster(RedisCluster):
    """A cluster client whose bursts wait instead of failing. RedisCluster has
    no blocking pool: a node's pool at its ``max_connections`` raises
    MaxConnectionsError. Here every command and every pipeline first takes one
    of ``permits``, and while it holds it uses at most one connection per node
    at a time, so no node's pool runs out."""

    def __init__(self, *args: Any, permits: int, **kwargs: Any) -> None:
        # (the margin: the client's own topology refreshes run outside any permit)
        super().__init__(*args, max_connections=permits + 8, **kwargs)
        self._permits = asyncio.Semaphore(permits)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if _holds_permit.get():  # a command a pipeline resends after a redirect: the pipeline holds the permit
            return await super().execute_command(*args, **kwargs)
        if self._initialize:
            # Commands made before the client knows the slots are routed by
            # redis-py to one node, not by key: the MOVED replies that follow
            # make it reset its connections, failing the other commands in flight.
            await self.initialize()
        async with self._permits:
            held = _holds_permit.set(True)
            try:
                return await super().execute_command(*args, **kwargs)
            finally:
                _holds_permit.reset(held)

    def pipeline(self, transaction: Any = None) -> ClusterPipeline:  # type: ignore[override]
        return _WaitingPipeline(self, transaction)


class _WaitingPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self.cluster_client._permits:  # type: ignore[attr-defined]
            held = _holds_permit.set(True)
            try:
                return await super().execute(raise_on_error, allow_redirections)
            finally:
                _holds_permit.reset(held)


class Bus:
    """The Redis keys and calls gateways and workers share. ``store`` is the
    :class:`~turnline.store.redis.RedisEventLog` whose lease keys fence appends.
    Every key a call names is one key (or one session's hash-tagged keys), so
    each call goes to one node of a Redis Cluster."""

    def __init__(self, store: Any, url: str | None = None):
        self.store = store
        self.prefix: str = store.prefix
        self.url: str = url or store.url
        self.dispatch = f"{self.prefix}:dispatch"
        self.owned = f"{self.prefix}:owned"

    @functools.cached_property
    def redis(self) -> Any:
        """The client (``aioredis.Redis``, or a ``RedisCluster`` when the store
        found a cluster), made at first use: a gateway makes its Bus before its
        store is opened, so before ``store.cluster`` is known."""
        if self.store.cluster:
            return _WaitingCluster.from_url(self.url, permits=BUS_CONNECTIONS)
        # A burst of commands waits for a connection rather than failing with
        # MaxConnectionsError (redis-py's default pool raises at its limit).
        pool = aioredis.BlockingConnectionPool.from_url(self.url, max_connections=BUS_CONNECTIONS, timeout=None)
        return aioredis.Redis.from_pool(pool)  # closes the pool with it

    # Compare-and-PEXPIRE, compare-and-DEL of a key holding a token (a lease, a
    # voice claim): only while it still holds this holder's token.

    @functools.cached_property
    def renew_if_held(self) -> Any:
        return self.redis.register_script(_RENEW)

    @functools.cached_property
    def release_if_held(self) -> Any:
        return self.redis.register_script(_RELEASE)

    async def renew_in(self, pipe: Any, key: str, token: str, ttl_ms: int) -> None:
        """Queue ``renew_if_held`` of ``key`` on ``pipe``. A cluster pipeline
        refuses EVALSHA (nor would it load the script on a node that lacks
        it, as a fresh or failed-over one does): there the script's text goes
        along (EVAL)."""
        if self.store.cluster:
            pipe.eval(_RENEW, 1, key, token, ttl_ms)
        else:
            await self.renew_if_held(keys=[key], args=[token, ttl_ms], client=pipe)

    def lease_key(self, session: str) -> str:
        return self.store.key(session, "lease")

    def inbox(self, worker: str) -> str:
        return f"{self.prefix}:inbox:{worker}"

    def replies(self, gateway: str) -> str:
        return f"{self.prefix}:reply:{gateway}"

    async def close(self) -> None:
        if "redis" in self.__dict__:  # (made at first use)
            await self.redis.aclose()

    async def owner(self, session: str) -> str | None:
        """The id of the worker holding the session's lease, if any."""
        token = await self.redis.get(self.lease_key(session))
        return None if token is None else token.split(b"|", 1)[0].decode()

    async def post(self, worker: str | None, command: bytes) -> None:
        """To ``worker``'s inbox, or to the dispatch stream when it is None."""
        if worker is None:
            await self.redis.xadd(self.dispatch, {"m": command}, maxlen=STREAM_MAXLEN, approximate=True)
            return
        key = self.inbox(worker)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"m": command}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.pexpire(key, REPLY_TTL_MS)  # a dead worker's inbox goes away
            await pipe.execute()

    async def reply(self, gateway: str, reply: Reply) -> None:
        key = self.replies(gateway)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"m": encode(reply)}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.pexpire(key, REPLY_TTL_MS)
            await pipe.execute()

    async def read_stream(self, key: str, handle: Callable[[bytes], None], last: str = "0-0") -> None:
        """Hand every entry of stream ``key`` after ``last`` to ``handle``, forever."""
        while True:
            _reraise_cancel()
            try:
                got = await self.redis.xread({key: last}, count=512, block=BLOCK_MS)
            except TRANSIENT as exc:
                _reraise_cancel()
                log.warning("reading %s: %s; retrying", key, exc)
                await asyncio.sleep(0.1)
                continue
            for _key, entries in got or ():
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    try:
                        handle(fields[b"m"])
                    except Exception:
                        log.exception("bad entry %s in %s", last, key)


# ---------------------------------------------------------------- commands

OpHandler = Callable[[SessionHub, dict[str, Any]], Awaitable[tuple[Any, "asyncio.Future[None]"]]]
OPS: dict[str, OpHandler] = {}


def register_op(name: str, handler: OpHandler) -> None:
    """Make ``name`` a command gateways may forward to a session's owner.
    ``handler(hub, args)`` returns ``(JSON-able result, durable future)``."""
    OPS[name] = handler


def replayed_send(state: Session, ids: list[str], turn_id: str | None, steer: str | None) -> SendOutcome | None:
    """The outcome of a send that already ran (a retry), read from the log."""
    if steer is not None:
        msgs = [state.messages.get(i) for i in ids]
        if all(m is not None and (m.metadata or {}).get("steer") == steer for m in msgs):
            return SendOutcome(ids)
        return None
    if turn_id is None:
        return None
    if turn_id in state.turns:
        return SendOutcome(ids, started=[turn_id])
    if any(q.turn_id == turn_id for q in state.queue):
        return SendOutcome(ids, queued=[turn_id])
    return None


def _durable_now(hub: SessionHub) -> asyncio.Future[None]:
    return hub.emit([])  # resolves once everything decided so far is stored


async def _op_send(hub: SessionHub, a: dict[str, Any]) -> tuple[Any, asyncio.Future[None]]:
    messages = msgspec.convert(a["messages"], list[MessageIn])
    ids = [m.id for m in messages if m.id is not None]
    done = replayed_send(hub.state, ids, a.get("turn_id"), a.get("steer")) if len(ids) == len(messages) else None
    if done is not None:
        return asdict(done), _durable_now(hub)
    outcome, durable = await hub.send(a["requester"], messages, policy=a.get("policy"),
                                      parent_id=a.get("parent_id"), steer=a.get("steer"), seen=a.get("seen"),
                                      turn_id=a.get("turn_id"), traceparent=a.get("traceparent"),
                                      max_turns=a.get("max_turns"))
    return asdict(outcome), durable


async def _op_cancel(hub: SessionHub, a: dict[str, Any]) -> tuple[Any, asyncio.Future[None]]:
    request_id = a.get("request_id")
    answered = hub.state.cancel_answers.get(request_id) if request_id is not None else None
    if answered is not None:
        return msgspec.to_builtins(answered), _durable_now(hub)
    flt = msgspec.convert(a["filter"], CancelFilter) if a.get("filter") else None
    result, durable = await hub.cancel(a["requester"], flt, a.get("seen"), request_id=request_id,
                                       may_cancel_others=bool(a.get("may_cancel_others")))
    return msgspec.to_builtins(result), durable


async def _op_regenerate(hub: SessionHub, a: dict[str, Any]) -> tuple[Any, asyncio.Future[None]]:
    turn_id = a.get("turn_id")
    if turn_id is not None and turn_id in hub.state.turns:
        return asdict(SendOutcome([], started=[turn_id])), _durable_now(hub)
    outcome, durable = await hub.regenerate(a["requester"], a["message_id"], turn_id=turn_id,
                                            max_turns=a.get("max_turns"))
    return asdict(outcome), durable


def _recordable(hub: SessionHub, raw: list[Any]) -> list[SpeechInterrupted | TurnRevised]:
    """The events of a ``record`` command, checked: only these two kinds, of
    turns the session has, a revision only of an ended turn and its own message."""
    try:
        events = msgspec.convert(raw, list[AnyEvent])
    except msgspec.ValidationError as exc:
        raise CommandError(ErrorCode.BAD_FRAME, f"record: {exc}") from None
    state = hub.state
    for ev in events:
        if not isinstance(ev, (SpeechInterrupted, TurnRevised)):
            raise CommandError(ErrorCode.FORBIDDEN, f"record appends speech-interrupted and turn-revised only, "
                                                    f"not {type(ev).__name__}")
        turn = state.turns.get(ev.turn_id)
        if turn is None:
            raise CommandError(ErrorCode.NOT_FOUND, f"no turn {ev.turn_id}")
        if isinstance(ev, TurnRevised) and (turn.active or ev.message.id != turn.message_id):
            raise CommandError(ErrorCode.CONFLICT, f"turn-revised of {ev.turn_id}: the turn has not ended, "
                                                   f"or the message is not its reply")
        ev.seq = 0  # numbered by the hub
    return events  # type: ignore[return-value]


async def _recorded_since(hub: SessionHub, after: int, wanted: list[SpeechInterrupted]) -> set[int]:
    """Which of ``wanted`` the log already holds after seq ``after``."""
    bare = [msgspec.structs.replace(w, seq=0, ts=0) for w in wanted]
    found: set[int] = set()
    while len(found) < len(bare):
        page = await hub.store.read(hub.session_id, after, READ_PAGE)
        for rec in page:
            if b'"speech-interrupted"' not in rec.data:
                continue  # most of the log is chunks: not decoded
            ev = rec.event()
            if isinstance(ev, SpeechInterrupted):
                same = msgspec.structs.replace(ev, seq=0, ts=0)
                found.update(i for i, w in enumerate(bare) if w == same)
        if len(page) < READ_PAGE:
            break
        after = page[-1].seq
    return found


async def _op_record(hub: SessionHub, a: dict[str, Any]) -> tuple[Any, asyncio.Future[None]]:
    """Append the voice events a gateway decided (gateways never write a log):
    ``speech-interrupted``, and ``turn-revised`` of an ended turn. A retry
    appends nothing twice: a revision the state already holds (revised, same
    reason, same message) is skipped, and so is a ``speech-interrupted`` equal
    to one the log holds after ``after``, the gateway's last seq when it asked
    (a voice session records one per turn and mode)."""
    events = _recordable(hub, a.get("events") or [])
    skip: set[int] = set()
    interruptions = [i for i, ev in enumerate(events) if isinstance(ev, SpeechInterrupted)]
    if interruptions:
        found = await _recorded_since(hub, int(a.get("after") or 0), [events[i] for i in interruptions])
        skip.update(interruptions[j] for j in found)
    state = hub.state
    for i, ev in enumerate(events):
        if isinstance(ev, TurnRevised):
            turn = state.turns[ev.turn_id]
            if turn.revised and turn.reason == ev.reason and state.messages.get(ev.message.id) == ev.message:
                skip.add(i)
    fresh = [ev for i, ev in enumerate(events) if i not in skip]
    if not fresh:
        return {"appended": 0}, _durable_now(hub)
    return {"appended": len(fresh)}, hub.emit(fresh)


register_op("send", _op_send)
register_op("cancel", _op_cancel)
register_op("regenerate", _op_regenerate)
register_op("record", _op_record)


# ---------------------------------------------------------------- the worker


@dataclass
class _Owned:
    token: str
    hub: SessionHub | None = None  # None while loading
    commands: int = 0  # commands running on it now
    idle_since: float | None = None


class NotOwner(Exception):
    pass


def worker_id() -> str:
    return f"w{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ClusterWorker:
    """Runs the sessions whose lease it holds; see the module docstring."""

    def __init__(self, runtime: Runtime, store: Any, config: ClusterConfig | None = None, *,
                 url: str | None = None, worker: str | None = None):
        self.runtime = runtime
        self.config = config or ClusterConfig()
        self.bus = Bus(store, url)
        self.id = worker or worker_id()
        self.owned: dict[str, _Owned] = {}
        self._acquiring: dict[str, asyncio.Future[SessionHub | None]] = {}
        self._tokens = itertools.count(1)
        self._inflight: dict[str, asyncio.Future[Reply | None]] = {}
        self._recent: OrderedDict[str, Reply] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self._work: set[asyncio.Task[None]] = set()
        self._closing = False
        if runtime.config.lost_message == RuntimeConfig.lost_message:  # the single node's wording
            runtime.config.lost_message = "the worker running this turn was lost"

    # ------------------------------------------------------------ life

    async def start(self) -> None:
        try:
            await self.bus.redis.xgroup_create(self.bus.dispatch, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        loops = [self.bus.read_stream(self.bus.inbox(self.id), self._on_inbox), self._dispatch_loop(),
                 self._lease_loop(), self._reaper_loop()]
        self._tasks = [asyncio.ensure_future(c) for c in loops]
        log.info("worker %s started (lease %d ms)", self.id, self.config.lease_ms)

    async def close(self) -> None:
        """Stop taking work, end this worker's turns (cancelled, as on a
        single node's shutdown), and hand its sessions over."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._work:
            await asyncio.wait(self._work, timeout=self.runtime.config.abort_grace_s)
        await self.runtime.close()
        for session, owned in list(self.owned.items()):
            hub = owned.hub
            # Queued inputs wait for the next owner: scored 0, the session is
            # taken over by another worker's reaper at its next look.
            await self._release(session, owned, handoff=hub is not None and bool(hub.state.queue))
        await self.bus.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    # ------------------------------------------------------------ reading commands

    def _on_inbox(self, data: bytes) -> None:
        self._spawn(self._serve(decode_command(data), None))

    async def _dispatch_loop(self) -> None:
        redis = self.bus.redis
        while True:
            _reraise_cancel()
            free = self.config.concurrency - self.busy()
            if free <= 0:
                await asyncio.sleep(0.05)
                continue
            try:
                got = await redis.xreadgroup(GROUP, self.id, {self.bus.dispatch: ">"}, count=min(free, 64),
                                             block=BLOCK_MS)
            except TRANSIENT as exc:
                _reraise_cancel()
                log.warning("reading the dispatch stream: %s; retrying", exc)
                await asyncio.sleep(0.1)
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await redis.xgroup_create(self.bus.dispatch, GROUP, id="0", mkstream=True)
                continue
            for _key, entries in got or ():
                self._take(entries)

    def _take(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        for entry_id, fields in entries:
            if not fields:  # deleted meanwhile
                self._spawn(self._ack(entry_id))
                continue
            self._spawn(self._serve(decode_command(fields[b"m"]), entry_id))

    async def _ack(self, entry_id: bytes) -> None:
        await self.bus.redis.xack(self.bus.dispatch, GROUP, entry_id)

    def busy(self) -> int:
        return sum(1 for o in self.owned.values() if o.hub is None or not o.hub.idle)

    async def _serve(self, cmd: Command, entry_id: bytes | None) -> None:
        try:
            reply = await self.handle(cmd)
            if reply is not None:
                await self.bus.reply(cmd.gw, reply)
            if entry_id is not None:
                await self._ack(entry_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("command %s on %s failed", cmd.op, cmd.session)

    # ------------------------------------------------------------ running commands

    async def handle(self, cmd: Command) -> Reply | None:
        """Run ``cmd`` on the session's hub (taking its lease if nobody holds
        it). Returns the reply, or None when another worker will answer."""
        if cmd.exp and now_ms() > cmd.exp:
            return None  # its gateway stopped waiting: running it now would surprise everyone
        done = self._recent.get(cmd.rid)
        if done is not None:
            return done
        running = self._inflight.get(cmd.rid)
        if running is not None:
            return await asyncio.shield(running)
        fut: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
        self._inflight[cmd.rid] = fut
        reply: Reply | None = None
        try:
            reply = await self._execute(cmd)
        except CommandError as exc:
            reply = Reply(cmd.rid, error=ErrorInfo(exc.code, exc.message), details=exc.details)
        except Exception as exc:
            log.exception("command %s on %s failed", cmd.op, cmd.session)
            reply = Reply(cmd.rid, error=ErrorInfo(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}"))
        finally:
            del self._inflight[cmd.rid]
            if not fut.done():
                fut.set_result(reply)
        if reply is not None and not reply.redo:
            self._recent[cmd.rid] = reply
            if len(self._recent) > RECENT_REPLIES:
                self._recent.popitem(last=False)
        return reply

    async def _execute(self, cmd: Command) -> Reply | None:
        op = OPS.get(cmd.op)
        if op is None:
            raise CommandError(ErrorCode.UNKNOWN_OP, f"no cluster command {cmd.op!r}")
        for _ in range(3):
            hub = await self._own(cmd.session)
            if hub is not None:
                break
            owner = await self.bus.owner(cmd.session)
            if owner is not None:
                if owner != self.id and cmd.hops < MAX_HOPS:
                    cmd.hops += 1
                    await self.bus.post(owner, encode(cmd))  # the owner answers the gateway
                    return None
                return Reply(cmd.rid, redo=True)
        else:
            return Reply(cmd.rid, redo=True)
        owned = self.owned.get(cmd.session)
        if owned is not None:
            owned.commands += 1
            owned.idle_since = None
        try:
            result, durable = await op(hub, cmd.args)
            await durable
        except CommandError:
            if hub.broken is not None:  # lost the lease (or the store) meanwhile: not decided here
                return Reply(cmd.rid, redo=True)
            raise
        finally:
            if owned is not None:
                owned.commands -= 1
        return Reply(cmd.rid, result=result)

    # ------------------------------------------------------------ leases

    async def _own(self, session: str) -> SessionHub | None:
        """This worker's hub of ``session``, taking the lease if it is free;
        None when another worker holds it."""
        owned = self.owned.get(session)
        if owned is not None and owned.hub is not None and owned.hub.broken is None:
            return owned.hub
        acquiring = self._acquiring.get(session)
        if acquiring is not None:
            return await asyncio.shield(acquiring)
        if self._closing:
            return None
        fut: asyncio.Future[SessionHub | None] = asyncio.get_running_loop().create_future()
        self._acquiring[session] = fut
        try:
            hub = await self._acquire(session)
            fut.set_result(hub)
            return hub
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: the callers that wait on it re-raise it
            raise
        finally:
            del self._acquiring[session]

    async def _acquire(self, session: str) -> SessionHub | None:
        stale = self.owned.get(session)
        if stale is not None:  # its hub failed: let go (if the lease is still ours) and start afresh
            await self._release(session, stale, handoff=True)
        token = f"{self.id}|{next(self._tokens)}"
        redis = self.bus.redis
        if not await redis.set(self.bus.lease_key(session), token, nx=True, px=self.config.lease_ms):
            return None
        owned = self.owned[session] = _Owned(token)  # renewed from now on, even while loading
        try:
            await redis.zadd(self.bus.owned, {session: now_ms() + self.config.lease_ms})
            old = self.runtime.loaded(session)
            if old is not None:  # a hub from a lease this worker lost without noticing yet
                old.retire(NotOwner(f"lease of {session} lost"))
            # Loading replays the log; recovery ends the turns that lost their
            # runner (worker_lost) and starts queued inputs, under this token.
            owned.hub = await self.runtime.hub(session, fence=token)
        except BaseException:
            if self.owned.get(session) is owned:
                await asyncio.shield(self._release(session, owned, handoff=True))
            raise
        log.debug("worker %s owns %s (%s)", self.id, session, token)
        return owned.hub

    def _drop(self, session: str, owned: _Owned, why: str) -> None:
        """Forget the session here at once (no command can reach its hub after this)."""
        if self.owned.get(session) is owned:
            del self.owned[session]
        if owned.hub is not None:
            owned.hub.retire(NotOwner(f"{session}: {why}"))

    async def _release(self, session: str, owned: _Owned, *, handoff: bool) -> None:
        self._drop(session, owned, "released")
        await self._unlease(session, owned.token, handoff=handoff)

    async def _unlease(self, session: str, token: str, *, handoff: bool) -> None:
        redis = self.bus.redis
        try:
            # The set first, then the lease: whoever takes the lease next adds
            # the session again after this removal, never before it.
            if handoff:
                await redis.zadd(self.bus.owned, {session: 0})
            else:
                await redis.zrem(self.bus.owned, session)
            await self.bus.release_if_held(keys=[self.bus.lease_key(session)], args=[token])
        except Exception as exc:  # the lease expires by itself
            log.warning("releasing %s: %s", session, exc)

    def _lost(self, session: str, owned: _Owned) -> None:
        if owned.hub is not None:
            log.warning("worker %s lost the lease of %s; its turns stop here", self.id, session)
        self._drop(session, owned, "lease lost")

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_ms / 3000)
            _reraise_cancel()
            try:
                await self.renew()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                _reraise_cancel()
                log.warning("renewing leases: %s", exc)
            except Exception:
                _reraise_cancel()
                log.exception("renewing leases failed")

    async def renew(self) -> None:
        """Renew every lease (one pipeline), drop the lost ones, release the idle ones."""
        items = list(self.owned.items())
        if not items:
            return
        deadline = now_ms() + self.config.lease_ms
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for session, owned in items:
                await self.bus.renew_in(pipe, self.bus.lease_key(session), owned.token, self.config.lease_ms)
            results = await pipe.execute()
        kept: dict[str, int] = {}
        now = time.monotonic()
        for (session, owned), ok in zip(items, results):
            if self.owned.get(session) is not owned:
                continue
            if not ok:
                self._lost(session, owned)
                continue
            kept[session] = deadline
            hub = owned.hub
            if hub is None or not hub.idle or owned.commands:
                owned.idle_since = None
            elif owned.idle_since is None:
                owned.idle_since = now
            elif now - owned.idle_since >= self.config.idle_release_s:
                del kept[session]
                self._drop(session, owned, "idle")
                self._spawn(self._unlease(session, owned.token, handoff=False))
        if kept:
            await self.bus.redis.zadd(self.bus.owned, kept)

    # ------------------------------------------------------------ the reaper

    async def _reaper_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reaper_interval_s)
            _reraise_cancel()
            try:
                await self.reap()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                _reraise_cancel()
                log.warning("reaper: %s", exc)
            except Exception:
                _reraise_cancel()
                log.exception("reaper failed")

    async def reap(self) -> None:
        """Take over sessions whose owner stopped renewing, and dispatch
        entries a dead worker read but never acknowledged."""
        redis = self.bus.redis
        due = await redis.zrangebyscore(self.bus.owned, "-inf", now_ms(), start=0, num=64)
        for raw in due:
            session = raw.decode()
            if session not in self.owned and session not in self._acquiring:
                self._spawn(self._takeover(session))
        if self.busy() < self.config.concurrency:
            claimed = await redis.xautoclaim(self.bus.dispatch, GROUP, self.id, self.config.lease_ms,
                                             start_id="0-0", count=16)
            self._take(claimed[1])

    async def _takeover(self, session: str) -> None:
        try:
            hub = await self._own(session)
        except Exception:
            log.exception("taking over %s failed", session)
            return
        if hub is not None:
            log.info("worker %s took over %s", self.id, session)
