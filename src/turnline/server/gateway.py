"""A gateway: the app's runtime when sessions are written by workers elsewhere.

:class:`RemoteRuntime` has the interface :class:`~turnline.server.app.TurnlineApp`
uses of a :class:`~turnline.agent.Runtime`; its hubs are :class:`RemoteHub`\\ s.
A remote hub's ``state`` is a read replica of the session (a
:class:`~turnline.core.session.Session` brought up to date from the log each
time the hub is asked for and after each of its commands), and its commands
go to the worker that holds the session's lease, or to the dispatch stream
when none does (see :mod:`turnline.agent.cluster`). A command returns once
its result is durable, in the same ``(outcome, durable future)`` shape as a
local hub's. ``emit`` (what the voice pipeline writes: ``speech-interrupted``,
``turn-revised``) goes the same way, as the ``record`` command; no turn runs
here, so ``turns`` is always empty.

A gateway keeps nothing that another gateway would need: a client may resume
through any of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Sequence

import msgspec

from ..agent.cluster import Bus, ClusterConfig, ClusterWorker, Command, Reply, decode_reply, encode
from ..agent.metrics import Metrics
from ..agent.runtime import CommandError, RuntimeConfig, SendOutcome, new_id
from ..core.session import Session
from ..protocol import AnyEvent, CancelFilter, CancelResult, ErrorCode, MessageIn, now_ms
from ..store.base import EventLog, Record

log = logging.getLogger("turnline.gateway")

READ_PAGE = 5000
MAX_REPLICAS = 4096


def _durable() -> asyncio.Future[None]:
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(None)  # a worker replies once the result is stored
    return fut


class RemoteHub:
    """A session as seen from a gateway."""

    def __init__(self, runtime: RemoteRuntime, session_id: str):
        self.runtime = runtime
        self.session_id = session_id
        self.state = Session(session_id, tool_cancel_text=runtime.config.tool_cancel_text)
        self.turns: dict[str, Any] = {}  # a local hub's running turns: they run on workers, never here
        self._recording: asyncio.Task[None] | None = None  # the latest emit, until its reply

    async def refresh(self) -> None:
        """Apply what the log holds beyond the replica (read-your-writes: an
        acknowledged command is in the state afterwards)."""
        store = self.runtime.store
        while True:
            page = await store.read(self.session_id, self.state.last_seq, READ_PAGE)
            for rec in page:
                # A concurrent refresh may have applied some of these already.
                if rec.seq > self.state.last_seq:
                    self.state.apply(rec.event())
            if len(page) < READ_PAGE:
                return

    async def call(self, op: str, **args: Any) -> Any:
        """Run command ``op`` on the session's owner (see ``cluster.register_op``).
        Afterwards the replica holds what it did, as a local hub's state would.
        It is routed after what this hub emitted before it, as a local hub's
        emit is decided before any later command."""
        recording = self._recording
        if recording is not None and not recording.done():
            await asyncio.wait([recording])  # (not cancelled with this caller)
        return await self._run(op, args)

    async def _run(self, op: str, args: dict[str, Any]) -> Any:
        result = await self.runtime.call(self.session_id, op, args)
        await self.refresh()
        return result

    def emit(self, events: Sequence[AnyEvent]) -> asyncio.Future[None]:
        """Have the session's owner append ``events`` (the ``record`` command:
        ``speech-interrupted`` and ``turn-revised`` only). Unlike a local hub's
        emit, the state takes them only once they are stored: the future
        resolves then (the replica holds them), or fails with the worker's
        ``CommandError``. Emits reach the log in the order they were made."""
        loop = asyncio.get_running_loop()
        args = {"events": [msgspec.to_builtins(ev) for ev in events],
                # A retry is recognised by what the log holds after this.
                "after": self.state.last_seq}
        previous = self._recording
        durable: asyncio.Future[None] = loop.create_future()

        async def record() -> None:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            try:
                await self._run("record", args)
            except Exception as exc:
                if not isinstance(exc, CommandError):  # (the refresh's store read)
                    exc = CommandError(ErrorCode.INTERNAL, f"recording failed: {type(exc).__name__}: {exc}")
                if not durable.done():
                    durable.set_exception(exc)
                    durable.exception()  # retrieved: nobody may be waiting (an automatic barge-in)
                log.warning("voice events on %s were not stored: %s", self.session_id, exc)
            else:
                if not durable.done():
                    durable.set_result(None)

        # The caller holds only ``durable``: cancelling a wait on it does not withdraw the events.
        self._recording = asyncio.ensure_future(record())
        return durable

    async def send(self, requester: str, messages: Sequence[MessageIn], *, policy: str | None = None,
                   parent_id: str | None = None, steer: str | None = None,
                   seen: int | None = None, traceparent: str | None = None,
                   ) -> tuple[SendOutcome, asyncio.Future[None]]:
        # Ids are named here, so that a retry of this send is recognised.
        named = [m if m.id is not None else msgspec.structs.replace(m, id=new_id("msg")) for m in messages]
        args: dict[str, Any] = {"requester": requester, "messages": msgspec.to_builtins(named)}
        for key, value in (("policy", policy), ("parent_id", parent_id), ("steer", steer), ("seen", seen),
                           ("traceparent", traceparent)):  # the trace travels with the command to the worker
            if value is not None:
                args[key] = value
        if steer is None:
            args["turn_id"] = new_id("turn")
            # The worker decides the turn limit (it alone writes the session),
            # with this gateway's setting: `turnline serve` configures it.
            args["max_turns"] = self.runtime.config.limits.max_turns_per_session
        result = await self.call("send", **args)
        return SendOutcome(**result), _durable()

    async def cancel(self, requester: str, flt: CancelFilter | None, seen: int | None = None, *,
                     may_cancel_others: bool = False) -> tuple[CancelResult, asyncio.Future[None]]:
        args: dict[str, Any] = {"requester": requester, "may_cancel_others": may_cancel_others,
                                "request_id": new_id("cancel")}
        if flt is not None:
            args["filter"] = msgspec.to_builtins(flt)
        if seen is not None:
            args["seen"] = seen
        result = await self.call("cancel", **args)
        return msgspec.convert(result, CancelResult), _durable()

    async def regenerate(self, requester: str, message_id: str) -> tuple[SendOutcome, asyncio.Future[None]]:
        result = await self.call("regenerate", requester=requester, message_id=message_id,
                                 turn_id=new_id("turn"), max_turns=self.runtime.config.limits.max_turns_per_session)
        return SendOutcome(**result), _durable()


class RemoteRuntime:
    """The gateway's runtime over a shared Redis store; ``worker`` is an
    in-process worker (``turnline serve --store redis://… --agent …``)."""

    agent = None
    agent_id = "agent"  # the client id of what the server writes on the agent's behalf (a worker Runtime's)

    def __init__(self, store: EventLog, cluster: ClusterConfig | None = None, *, url: str | None = None,
                 config: RuntimeConfig | None = None, metrics: Metrics | None = None,
                 worker: ClusterWorker | None = None):
        self.store = store
        self.cluster = cluster or ClusterConfig()
        self.config = config or RuntimeConfig()
        self.metrics = metrics or Metrics()
        self.worker = worker
        self.id = new_id("gw")
        self.bus = Bus(store, url)
        self._replicas: OrderedDict[str, RemoteHub] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._reader = asyncio.ensure_future(self.bus.read_stream(self.bus.replies(self.id), self._on_reply))
        if self.worker is not None:
            await self.worker.start()

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.bus.close()

    # ------------------------------------------------------------ sessions

    async def hub(self, session_id: str) -> RemoteHub:
        hub = self._replicas.get(session_id)
        if hub is None:
            hub = self._replicas[session_id] = RemoteHub(self, session_id)
            if len(self._replicas) > MAX_REPLICAS:
                self._replicas.popitem(last=False)
        else:
            self._replicas.move_to_end(session_id)
        await hub.refresh()
        return hub

    def loaded(self, session_id: str) -> RemoteHub | None:
        return self._replicas.get(session_id)

    async def exists(self, session_id: str) -> bool:
        hub = self._replicas.get(session_id)
        if hub is not None and hub.state.last_seq > 0:
            return True
        return await self.store.exists(session_id)

    async def read(self, session_id: str, after: int = 0, limit: int | None = None) -> list[Record]:
        return await self.store.read(session_id, after, limit)

    # ------------------------------------------------------------ commands

    def _on_reply(self, data: bytes) -> None:
        reply = decode_reply(data)
        fut = self._pending.get(reply.rid)
        if fut is not None and not fut.done():
            fut.set_result(reply)

    async def call(self, session: str, op: str, args: dict[str, Any]) -> Any:
        """Route a command to the session's owner until a worker answers it.
        Retries are safe: a command that already ran answers from the log."""
        loop = asyncio.get_running_loop()
        cfg = self.cluster
        deadline = loop.time() + cfg.command_timeout_s
        cmd = Command(rid=new_id("req"), gw=self.id, session=session, op=op, args=args,
                      exp=now_ms() + int(cfg.command_timeout_s * 1000))
        payload = encode(cmd)
        backoff = 0.0
        fut: asyncio.Future[Reply] = loop.create_future()
        self._pending[cmd.rid] = fut
        try:
            while True:
                if not fut.done():
                    owner = await self.bus.owner(session)
                    worker = self.worker
                    if worker is not None and (owner == worker.id or (
                            owner is None and worker.busy() < worker.config.concurrency)):
                        # The in-process worker: no round trip through Redis.
                        local = await worker.handle(cmd)
                        if local is not None and not fut.done():
                            fut.set_result(local)
                    else:
                        await self.bus.post(owner, payload)
                    remaining = deadline - loop.time()
                    try:
                        await asyncio.wait_for(asyncio.shield(fut), max(0.0, min(cfg.attempt_timeout_s, remaining)))
                    except asyncio.TimeoutError:
                        if loop.time() >= deadline:
                            raise CommandError(ErrorCode.INTERNAL, f"no worker answered within "
                                               f"{cfg.command_timeout_s:g} s; is any worker running?") from None
                        log.info("no answer to %s on %s (owner %s) yet; routing it again", op, session, owner)
                        continue
                reply = fut.result()
                if reply.redo:  # ownership moved under us: look again
                    if loop.time() >= deadline:
                        raise CommandError(ErrorCode.INTERNAL, f"no worker took session {session}")
                    fut = self._pending[cmd.rid] = loop.create_future()
                    await asyncio.sleep(backoff)
                    backoff = min(0.1, backoff * 2 or 0.001)
                    continue
                if reply.error is not None:
                    raise CommandError(reply.error.code, reply.error.message, **reply.details)
                return reply.result
        finally:
            self._pending.pop(cmd.rid, None)
