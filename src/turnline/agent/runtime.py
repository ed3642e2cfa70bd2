"""The server-side runtime: one hub per session decides, appends and runs turns.

A hub owns its session's state (a :class:`turnline.core.Session`) and is the
only writer of its log. Every decision (which turns a cancel matches, where a
message goes, which policy applies) is made and applied to the state in one
synchronous step, so no interleaving of coroutines can split it; the events
are then flushed to the store in order, and subscribers receive them from the
store's feed once they are durable.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgspec

from ..core.limits import COUNT_RETRY_AFTER_MS, TURNS, LimitsConfig, turn_slots_left
from ..core.session import InvariantError, Session
from ..protocol import (
    AnyEvent, CancelEvent, CancelFilter, CancelResult, ChunkEvent, ErrorCode, ErrorInfo, Message,
    MessageEvent, MessageIn, Presence, Queued, Rejected, TurnEnd, TurnRevised, TurnStart, encode,
)
from ..store.base import EventLog, Record, StoreError
from .metrics import Metrics
from .tracing import NO_TRACING, Tracing
from .turn import Agent, CancelRequest, Turn, finish_reason, message_from_input

log = logging.getLogger("turnline.runtime")


class CommandError(Exception):
    """A command the runtime refuses; ``code`` is an :class:`ErrorCode`.
    ``details`` go along in the error frame (``rate_limited``: ``limit`` and ``retry_after_ms``)."""

    def __init__(self, code: str, message: str, **details: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


def rate_limited(limit: str, retry_after_ms: int, message: str) -> CommandError:
    """The refusal of a request over ``limit`` (a name in ``turnline.core.limits.LIMIT_NAMES``)."""
    return CommandError(ErrorCode.RATE_LIMITED, message, limit=limit, retry_after_ms=retry_after_ms)


@dataclass
class RuntimeConfig:
    default_policy: str = "concurrent"
    allow_policy_override: bool = True
    queue_limit: int = 16
    # How long an aborted turn's handler may take to wind down before the turn
    # is ended for it (its later writes are dropped and counted).
    abort_grace_s: float = 2.0
    tool_cancel_text: str = "cancelled"
    max_outbox: int = 2048
    # The error message of a turn found running with no runner (recover()).
    lost_message: str = "the server restarted while this turn ran"
    # A session with nothing running is dropped from memory after this long
    # unused (None: never); its next use reloads it from the log.
    idle_evict_s: float | None = 300.0
    # Spans per turn and provider call (turnline.agent.tracing.OtelTracing); off by default.
    tracing: Tracing = NO_TRACING
    # What clients may consume; the runtime enforces max_turns_per_session,
    # the server the rest (turnline.server.limits).
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class SendOutcome:
    message_ids: list[str]
    started: list[str] = field(default_factory=list)
    queued: list[str] = field(default_factory=list)
    rejected: str | None = None
    cancelled: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message_ids": self.message_ids, "turn_ids": self.started}
        if self.queued:
            out["queued"] = self.queued
        if self.rejected:
            out["rejected"] = self.rejected
        if self.cancelled:
            out["cancelled"] = self.cancelled
        return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class SessionHub:
    def __init__(self, runtime: Runtime, session_id: str, state: Session, fence: str | None = None):
        self.runtime = runtime
        self.session_id = session_id
        self.state = state
        # On many nodes: the lease token this hub writes under; a store that
        # sees another token refuses the append (the hub is then retired).
        self.fence = fence
        self.turns: dict[str, Turn] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._outbox: list[AnyEvent] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._flushing = False
        self._drained: asyncio.Future[None] | None = None
        self._presence = state.presence.state if state.presence else "idle"
        self._privileged_pending: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self.broken: BaseException | None = None
        self.closing = False  # shutting down: queued inputs wait for the next start
        self.last_used = time.monotonic()
        self.evicted = False

    @property
    def store(self) -> EventLog:
        return self.runtime.store

    @property
    def idle(self) -> bool:
        """Nothing running, queued or waiting to be stored."""
        return not (self.state.active or self.state.queue or self.turns or self._tasks or self._outbox
                    or self._flushing)

    @property
    def metrics(self) -> Metrics:
        return self.runtime.metrics

    # ------------------------------------------------------------ appending

    def emit(self, events: Sequence[AnyEvent]) -> asyncio.Future[None]:
        """Apply ``events`` to the state now and queue them for the store.
        The future resolves when they are durable."""
        self._emit(events)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((self.state.last_seq, fut))
        if not self._outbox and not self._flushing:
            fut.set_result(None)  # nothing new: already durable
        return fut

    def _emit(self, events: Sequence[AnyEvent]) -> None:
        """``emit`` for events nobody waits on (a streamed chunk): no future."""
        if self.broken is not None:
            raise CommandError(ErrorCode.INTERNAL, f"session store failed: {self.broken}")
        if self.evicted:
            self.runtime._readmit(self)
        ts = time.time_ns() // 1_000_000
        applied = 0
        try:
            for ev in events:
                ev.seq = self.state.last_seq + 1
                if not ev.ts:
                    ev.ts = ts
                self.state.apply(ev)
                applied += 1
        finally:
            # What the state took, the log must take too, even when a later
            # event of the batch was refused: state and log never diverge.
            self._outbox.extend(events[:applied])
            if applied and not self._flushing:
                self._flushing = True
                # On the next loop turn, so that what else this turn emits goes in the same append.
                self.runtime._flush_soon(self)

    def _flush(self) -> None:
        """Hand the outbox to the store; what is emitted meanwhile goes once it is stored."""
        if self.broken is not None or not self._outbox:
            self._flushing = False
            return
        batch, self._outbox = self._outbox, []
        try:
            self.store.append_then(self.session_id, batch, functools.partial(self._stored, batch[0].seq),
                                   fence=self.fence)
        except BaseException as exc:
            self._store_failed(exc)

    def _stored(self, first: int, records: list[Record] | None, error: BaseException | None) -> None:
        if records is not None and records[0].seq != first:
            error = InvariantError(f"store assigned seq {records[0].seq}, expected {first}: another writer?")
        if error is not None:
            self._store_failed(error)
            return
        self.metrics.events_appended.inc(len(records))
        if self._waiters:
            last = records[-1].seq
            ready = [f for s, f in self._waiters if s <= last]
            self._waiters = [(s, f) for s, f in self._waiters if s > last]
            for f in ready:
                if not f.done():
                    f.set_result(None)
        if self._drained is not None and len(self._outbox) < self.runtime.config.max_outbox:
            self._drained.set_result(None)
            self._drained = None
        if self._outbox:
            # On the next loop turn, as a first flush: a store may call this from
            # inside its write round, and what the hub emits meanwhile joins it.
            self.runtime._flush_soon(self)
        else:
            self._flushing = False

    def _store_failed(self, exc: BaseException) -> None:
        """The state is now ahead of the log: retire this hub."""
        self._flushing = False
        self.metrics.store_errors.inc()
        if isinstance(exc, StoreError):  # refused (e.g. fenced: another node owns the session now)
            log.warning("append refused for session %s: %s", self.session_id, exc)
        else:
            log.error("append failed for session %s", self.session_id, exc_info=exc)
        self.retire(exc)

    def retire(self, exc: BaseException) -> None:
        """Stop writing: the log can no longer take this hub's events (the
        store failed, or another node now owns the session). Waiters fail,
        running turns are aborted here, and nothing more is appended."""
        if self.broken is not None:
            return
        self.broken = exc
        self._outbox.clear()
        if self._drained is not None:
            self._drained.set_result(None)
            self._drained = None
        for _, f in self._waiters:
            if not f.done():
                f.set_exception(CommandError(ErrorCode.INTERNAL, f"store append failed: {exc}"))
                f.exception()  # logged above; most of these (a chunk's) have nobody waiting
        self._waiters.clear()
        self.runtime._retire(self)
        for turn in list(self.turns.values()):
            turn.abort_signal.abort("store_failed")

    async def backpressure(self) -> None:
        if len(self._outbox) >= self.runtime.config.max_outbox:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    def append_chunk(self, turn: Turn, chunk: dict[str, Any], final: bool, *, serialisable: bool = False) -> None:
        """``serialisable``: the caller built ``chunk`` from strings (a text
        delta), so the check for agent-written chunks is skipped."""
        if not self.state.is_active(turn.turn_id):
            self.count_late_chunk()
            return
        if not serialisable:
            try:
                encode(chunk)
            except Exception as exc:
                # Refused here, to the agent code that wrote it: once emitted it
                # would fail the store append and retire the whole session.
                raise TypeError(f"a chunk must be JSON-serialisable: {exc}") from None
        first = not self.state.active[turn.turn_id].chunks
        self._emit([ChunkEvent(turn_id=turn.turn_id, chunk=chunk, final=final, client_id=self.runtime.agent_id)])
        if first:
            self._publish_presence()
            turn.trace.first_chunk()

    def count_late_chunk(self) -> None:
        self.metrics.late_chunks.inc()

    def _publish_presence(self) -> None:
        state = self.state.presence_state() if self.runtime.agent is not None else "offline"
        if state != self._presence:
            self._presence = state
            self.emit([Presence(state=state, turns=list(self.state.active), client_id=self.runtime.agent_id)])

    # ------------------------------------------------------------ commands

    async def send(self, requester: str, messages: Sequence[MessageIn], *, policy: str | None = None,
                   parent_id: str | None = None, steer: str | None = None, seen: int | None = None,
                   turn_id: str | None = None, traceparent: str | None = None,
                   max_turns: int | None = None) -> tuple[SendOutcome, asyncio.Future[None]]:
        """``turn_id`` names the turn this send starts or queues (default: a
        new id); a caller that may retry passes one, to recognise its retry.
        ``traceparent``: the sender's W3C trace context, the parent of the turn's span.
        ``max_turns``: the session's turn limit (default: this runtime's; a
        gateway passes its own). Checked and applied in this one synchronous
        step, so no other send on the session comes between."""
        state = self.state
        cfg = self.runtime.config
        if policy is not None and not cfg.allow_policy_override:
            raise CommandError(ErrorCode.FORBIDDEN, "this server does not allow choosing a policy per send")
        policy = policy or cfg.default_policy
        if parent_id is not None and parent_id not in state.messages:
            raise CommandError(ErrorCode.NOT_FOUND, f"no message {parent_id} in session {self.session_id}")
        ids = [m.id or new_id("msg") for m in messages]
        if len(set(ids)) != len(ids) or any(i in state.messages or i in state.queued_message_ids for i in ids):
            raise CommandError(ErrorCode.CONFLICT, "a message with this id already exists")
        agent_id = self.runtime.agent_id

        if steer is not None:
            turn = self.turns.get(steer)
            if turn is None or not state.is_active(steer):
                raise CommandError(ErrorCode.NOT_FOUND, f"no running turn {steer} to steer")
            events, built = self._chain(requester, messages, ids, turn.input.id, {"steer": steer})
            fut = self.emit(events)
            for m in built:
                turn._deliver(m)
            return SendOutcome(ids), fut

        busy = bool(state.active) or bool(state.queue)
        if policy == "reject" and busy:
            fut = self.emit([Rejected(message_id=ids[-1], code=ErrorCode.BUSY, client_id=requester)])
            return SendOutcome(ids, rejected=ErrorCode.BUSY), fut

        if policy == "queue" and busy:
            if len(state.queue) >= cfg.queue_limit:
                fut = self.emit([Rejected(message_id=ids[-1], code=ErrorCode.QUEUE_FULL, client_id=requester)])
                return SendOutcome(ids, rejected=ErrorCode.QUEUE_FULL), fut
            # The messages join the tree when their turn starts, after the reply
            # they waited for; a queued input cancelled meanwhile leaves no trace
            # in the tree for later ones to hang from.
            _, built = self._chain(requester, messages, ids, parent_id, None)
            turn_id = turn_id or new_id("turn")
            if traceparent:
                cfg.tracing.queued(turn_id, traceparent)
            fut = self.emit([Queued(message_id=ids[-1], position=len(state.queue) + 1, turn_id=turn_id,
                                    messages=built, client_id=requester)])
            return SendOutcome(ids, queued=[turn_id]), fut

        cancelled: list[str] = []
        wait_for: list[asyncio.Event] = []
        parent = parent_id if parent_id is not None else state.default_parent()
        pre: list[AnyEvent] = []
        own = [t for t in state.active.values() if t.owner == requester and t.cancel is None] \
            if policy in ("interrupt", "rollback") else []
        self._check_turn_slots(len(own), max_turns)
        if policy in ("interrupt", "rollback"):
            if own:
                latest = own[-1]
                request_id = new_id("cancel")
                rolled: list[str] = []
                if policy == "rollback":
                    for t in own:
                        rolled += [t.input_id, t.message_id]
                    if parent_id is None:
                        parent = state.messages[own[0].input_id].parent_id
                elif parent_id is None:
                    parent = latest.message_id
                cancelled = [t.turn_id for t in own]
                pre = [CancelEvent(request_id=request_id, filter=CancelFilter(own=True), seen=seen,
                                   client_id=requester),
                       CancelResult(request_id=request_id, cancelled=cancelled, rolled_back=rolled,
                                    client_id=agent_id)]
                for t in cancelled:
                    if t in self.turns:
                        self.turns[t].trace.cancel_received(requester, seen)
                    self._abort(t, "interrupted")
                    if t in self.turns:
                        wait_for.append(self.turns[t].ended)
        if pre:
            # The interrupted turns end (when no on_abort hook writes into
            # them) before the new input joins the log, so the new turn's
            # history holds what they persisted without waiting for them.
            self._emit_stopping(pre, cancelled, start_queued=False)
        events, built = self._chain(requester, messages, ids, parent, None)
        turn_id = turn_id or new_id("turn")
        events.append(self._turn_start(turn_id, requester, ids[-1]))
        fut = self.emit(events)
        self._launch(turn_id, wait_for, policy, traceparent)
        return SendOutcome(ids, started=[turn_id], cancelled=cancelled), fut

    def _chain(self, requester: str, messages: Sequence[MessageIn], ids: list[str], parent: str | None,
               extra_meta: dict[str, Any] | None) -> tuple[list[AnyEvent], list[Message]]:
        events: list[AnyEvent] = []
        built: list[Message] = []
        for m, mid in zip(messages, ids):
            msg = message_from_input(m, mid, parent)
            if extra_meta:
                msg.metadata = {**(msg.metadata or {}), **extra_meta}
            events.append(MessageEvent(message=msg, client_id=requester))
            built.append(msg)
            parent = mid
        return events, built

    def _turn_start(self, turn_id: str, owner: str, input_id: str) -> TurnStart:
        return TurnStart(turn_id=turn_id, owner=owner, input_id=input_id, message_id=_reply_for(turn_id),
                         client_id=self.runtime.agent_id)

    def _check_turn_slots(self, stopping: int, max_turns: int | None) -> None:
        """Refuse (``rate_limited``, limit ``turns``) a turn past the session's limit;
        ``stopping``: running turns this same command cancels."""
        limit = self.runtime.config.limits.max_turns_per_session if max_turns is None else max_turns
        if not turn_slots_left(len(self.state.active), stopping, limit):
            raise rate_limited(TURNS, COUNT_RETRY_AFTER_MS,
                               f"session {self.session_id} already runs {len(self.state.active)} turns, "
                               f"the limit; send again once one ends (or use policy queue)")

    async def regenerate(self, requester: str, message_id: str, turn_id: str | None = None,
                         max_turns: int | None = None) -> tuple[SendOutcome, asyncio.Future[None]]:
        msg = self.state.messages.get(message_id)
        if msg is None:
            raise CommandError(ErrorCode.NOT_FOUND, f"no message {message_id} in session {self.session_id}")
        input_id = msg.parent_id if msg.role == "assistant" else msg.id
        if input_id is None:
            raise CommandError(ErrorCode.CONFLICT, "this message has no input to regenerate from")
        self._check_turn_slots(0, max_turns)
        turn_id = turn_id or new_id("turn")
        fut = self.emit([self._turn_start(turn_id, requester, input_id)])
        self._launch(turn_id, [])
        return SendOutcome([], started=[turn_id]), fut

    async def cancel(self, requester: str, flt: CancelFilter | None, seen: int | None = None, *,
                     may_cancel_others: bool = False,
                     request_id: str | None = None) -> tuple[CancelResult, asyncio.Future[None]]:
        received = time.perf_counter()
        flt = (flt or CancelFilter(own=True)).normalized()
        match = self.state.match_cancel(flt, requester, seen)
        for t in match.matched:
            if t in self.turns:
                self.turns[t].trace.cancel_received(requester, seen)

        def owned(t: str) -> bool:
            return may_cancel_others or match.owners[t] == requester

        # Everything this cancel would stop goes through the hook: running
        # turns, turns that won the race against it (revised) and queued ones,
        # so a rejected stop changes nothing whichever came first.
        asked = [t for t in match.matched + match.revisable + match.queued if owned(t)]
        approved = True
        if asked:
            seq_before = self.state.last_seq
            approved = await self._ask_on_cancel(requester, flt, {t: match.owners[t] for t in asked}, seen)
            if self.state.last_seq != seq_before:
                # The log moved on while the hook decided: a turn may have
                # ended (the stop now races its end: a revision), been
                # cancelled by someone else, or left the queue. Match again,
                # keeping only the turns the hook was asked about.
                match = self.state.match_cancel(flt, requester, seen)
                match.matched = [t for t in match.matched if t in asked or not owned(t)]
                match.revisable = [t for t in match.revisable if t in asked]
                match.queued = [t for t in match.queued if t in asked]
        allowed = [t for t in match.matched if owned(t)] if approved else []
        revisable = [t for t in match.revisable if owned(t)] if approved else []
        queued = [t for t in match.queued if owned(t)] if approved else []
        rejected = [t for t in match.matched + match.revisable + match.queued
                    if t not in allowed and t not in revisable and t not in queued]
        pending = match.pending if approved else []
        for t in allowed:
            self._abort(t, "cancelled")
        if allowed:
            self.metrics.abort_latency.observe(time.perf_counter() - received)
        request_id = request_id or new_id("cancel")
        result = CancelResult(request_id=request_id, cancelled=allowed + queued + revisable,
                              rejected=rejected, pending=pending, client_id=self.runtime.agent_id)
        events: list[AnyEvent] = [CancelEvent(request_id=request_id, filter=flt, seen=seen, client_id=requester),
                                  result]
        for t in revisable:
            events.append(TurnRevised(turn_id=t, reason="cancelled",
                                      message=self.state.persisted_message(t, "cancelled", seen),
                                      client_id=self.runtime.agent_id))
        for t in queued:
            msg_id = next((q.message_id for q in self.state.queue if q.turn_id == t), None)
            if msg_id is not None:
                events.append(Rejected(message_id=msg_id, code="cancelled", client_id=self.runtime.agent_id))
        if pending and may_cancel_others:
            self._privileged_pending.update(pending)
        outcome = "cancelled" if result.cancelled else "rejected" if rejected else "pending" if pending else "noop"
        self.metrics.cancels.labels(outcome).inc()
        fut, ended = self._emit_stopping(events, allowed)
        if queued and not ended:
            self._start_next_queued()
        return result, fut

    async def _ask_on_cancel(self, requester: str, flt: CancelFilter, owners: dict[str, str],
                             seen: int | None) -> bool:
        """The agent's ``on_cancel`` verdict on stopping the turns of ``owners``
        (True when it has no such hook)."""
        hook = self.runtime.agent.on_cancel if self.runtime.agent else None
        if hook is None:
            return True
        verdict = hook(CancelRequest(self.session_id, requester, flt, list(owners), owners, seen))
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    # ------------------------------------------------------------ turns

    def _abort(self, turn_id: str, reason: str) -> None:
        turn = self.turns.get(turn_id)
        if turn is None or turn.aborted:
            return
        agent = self.runtime.agent
        if agent is not None and agent.on_abort is not None:
            # The turn ends once its hook has written, not once its handler
            # noticed the abort. Made before the abort fires, so this runs
            # before the handler unwinds and before the flush of the cancel
            # being emitted: a hook that writes without waiting puts its words
            # and the turn-end into the cancel's own write.
            task = asyncio.ensure_future(self.end_turn(turn, "cancelled"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        turn.abort_signal.abort(reason)
        turn.trace.abort_fired(reason)
        loop = asyncio.get_running_loop()
        loop.call_later(self.runtime.config.abort_grace_s, self._schedule_force_end, turn)

    def _emit_stopping(self, events: Sequence[AnyEvent], turn_ids: Sequence[str], *,
                       start_queued: bool = True) -> tuple[asyncio.Future[None], bool]:
        """Emit ``events`` (a cancel that aborted ``turn_ids``) and end those
        turns without waiting for their handlers to notice the abort: nothing
        a handler produces after it is kept (see Turn._write), so the log is
        the same either way. With no ``on_abort`` hook a turn ends here, in
        the same write as the cancel; with one, its end was set going by
        ``_abort``. A handler's task runs on until it stops (bounded by the
        abort grace). Returns the events' durable future and whether a turn
        was ended here."""
        fut = self.emit(events)
        agent = self.runtime.agent
        if agent is not None and agent.on_abort is not None:
            return fut, False
        live = [self.turns[t] for t in turn_ids
                if t in self.turns and self.turns[t].reason is None and self.state.is_active(t)]
        for turn in live:
            self._close_turn(turn, "cancelled", None, start_queued=start_queued)
        return fut, bool(live)

    def _schedule_force_end(self, turn: Turn) -> None:
        if turn.reason is None:
            task = asyncio.ensure_future(self._force_end(turn))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        # Ended at the cancel, but its handler ignored the abort: stop it.
        running = self._tasks.get(turn.turn_id)
        if running is not None and not running.done():
            running.cancel()

    async def _force_end(self, turn: Turn) -> None:
        """The grace ran out: stop the handler's task (its unwinding ends the
        turn), and end the turn here if the handler swallowed that too."""
        task = self._tasks.get(turn.turn_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=self.runtime.config.abort_grace_s)
        await self.end_turn(turn, "cancelled")

    def _launch(self, turn_id: str, wait_for: list[asyncio.Event], policy: str | None = None,
                traceparent: str | None = None) -> None:
        ts = self.state.turns[turn_id]
        self.metrics.turns_started.inc()
        self.metrics.active_turns.inc()
        self._publish_presence()
        input_msg = self.state.messages[ts.input_id]
        turn = Turn(self, turn_id=turn_id, owner=ts.owner, input=input_msg, message_id=ts.message_id,
                    history=[])
        agent = self.runtime.agent
        turn.trace = self.runtime.config.tracing.turn_started(
            self.session_id, turn_id, ts.owner, policy=policy, traceparent=traceparent,
            agent_name=agent.name if agent is not None else "none")
        self.turns[turn_id] = turn
        self._tasks[turn_id] = asyncio.ensure_future(self._run(turn, wait_for))

    async def _apply_pending_cancel(self, turn: Turn) -> None:
        """A cancel that named this turn before it started is decided now, by
        the same rules as any cancel: the owner or ``cancel-any``, then ``on_cancel``."""
        pending = self.state.pending_cancels.get(turn.turn_id)
        if pending is None:
            return
        turn.trace.cancel_received(pending.requester, pending.seen)
        allowed = pending.requester == turn.owner or turn.turn_id in self._privileged_pending
        self._privileged_pending.discard(turn.turn_id)
        if allowed:
            allowed = await self._ask_on_cancel(pending.requester, CancelFilter(turn_id=turn.turn_id),
                                                {turn.turn_id: turn.owner}, pending.seen)
        if turn.reason is not None or not self.state.is_active(turn.turn_id):
            return
        if allowed:
            self._abort(turn.turn_id, "cancelled")
        self.emit([CancelResult(request_id=pending.request_id, cancelled=[turn.turn_id] if allowed else [],
                                rejected=[] if allowed else [turn.turn_id], client_id=self.runtime.agent_id)])

    async def _run(self, turn: Turn, wait_for: list[asyncio.Event]) -> None:
        agent = self.runtime.agent
        turn.trace.activate()
        try:
            await self._apply_pending_cancel(turn)
            if wait_for:
                # cancel-then-send: the new turn's model input includes what
                # the interrupted turn persisted, so it waits for that turn-end.
                await asyncio.wait([asyncio.ensure_future(e.wait()) for e in wait_for],
                                   timeout=self.runtime.config.abort_grace_s)
            turn.history = self.state.branch(turn.input.id)
            if agent is None:
                await self.end_turn(turn, "error", CommandError("no_agent", "no agent is configured"))
                return
            if not turn.aborted:
                await agent.run(turn)
            await self.end_turn(turn, "cancelled" if turn.aborted else "complete")
        except asyncio.CancelledError:
            await self.end_turn(turn, "cancelled" if turn.aborted else "error",
                                None if turn.aborted else "the turn was stopped by the server")
        except Exception as exc:
            if self.broken is not None:  # retired meanwhile (logged then): this turn's end is not ours to write
                log.debug("turn %s of retired session %s stopped on %r", turn.turn_id, self.session_id, exc)
            elif turn.aborted:  # e.g. raise_if_aborted(), or the upstream failing as it is closed
                log.debug("turn %s of session %s stopped on %r after its abort", turn.turn_id, self.session_id, exc)
                await self.end_turn(turn, "cancelled")
            else:
                log.warning("turn %s of session %s failed: %r", turn.turn_id, self.session_id, exc)
                await self.end_turn(turn, "error", exc)
        finally:
            self._tasks.pop(turn.turn_id, None)

    async def end_turn(self, turn: Turn, reason: str, error: BaseException | str | None = None) -> None:
        if turn.reason is not None or not self.state.is_active(turn.turn_id) or self.broken is not None:
            return  # (a retired hub writes nothing more: its session has a new writer, or none)
        if turn.aborted and reason == "complete":
            reason = "cancelled"  # the abort won the race; the handler finished anyway
        agent = self.runtime.agent
        if reason == "cancelled" and agent is not None and agent.on_abort is not None and turn._abort_hook_ran:
            # Another caller runs the hook (the cancel's, see _end_aborted):
            # the turn ends once it has written, bounded by the grace.
            await turn.ended.wait()
            return
        if (reason == "cancelled" and agent is not None and agent.on_abort is not None
                and not turn._abort_hook_ran):
            turn._abort_hook_ran = True  # once, whoever ends the turn
            hook = agent.on_abort
            # What on_abort writes is its own: a string starts a new text part
            # rather than continuing one the requester may not have seen.
            turn._close_auto_text(True)

            async def write(chunk: Any) -> None:
                turn._write(chunk, final=True)

            takes_turn = _takes_turn(hook)
            try:
                # In this task (wait_for would make one): a hook that writes
                # without waiting is done in this step, its words and the
                # turn-end in the same write as the cancel (see _abort).
                async with asyncio.timeout(self.runtime.config.abort_grace_s):
                    await (hook(write, turn) if takes_turn else hook(write))
            except asyncio.CancelledError:
                # the turn's task is being stopped (its grace ran out): end the
                # turn with what the hook wrote, then let the cancellation go on
                if turn.reason is None and self.state.is_active(turn.turn_id):
                    self._close_turn(turn, reason, error)
                raise
            except Exception:
                log.exception("on_abort of turn %s failed", turn.turn_id)
            if turn.reason is not None or not self.state.is_active(turn.turn_id):
                return
            turn._close_auto_text(True)
        await self._close_turn(turn, reason, error)

    def _close_turn(self, turn: Turn, reason: str, error: BaseException | str | None, *,
                    start_queued: bool = True) -> asyncio.Future[None]:
        """Append the turn's last chunks and its turn-end (synchronously); the
        future resolves when they are durable."""
        turn.reason = reason
        self.last_used = time.monotonic()  # idle from here: a long turn does not age the hub
        events: list[AnyEvent] = []
        info = None
        agent_id = self.runtime.agent_id
        if reason == "complete":
            if turn._text_id is not None:
                events.append(ChunkEvent(turn_id=turn.turn_id, chunk={"type": "text-end", "id": turn._text_id},
                                         client_id=agent_id))
            if not turn._finished_chunk:
                finish = {"type": "finish", "finishReason": finish_reason(self.state.active[turn.turn_id].fold)}
                events.append(ChunkEvent(turn_id=turn.turn_id, chunk=finish, client_id=agent_id))
        elif reason == "cancelled":
            events.append(ChunkEvent(turn_id=turn.turn_id, chunk={"type": "abort"}, final=True, client_id=agent_id))
        else:
            info = _error_info(error)
            events.append(ChunkEvent(turn_id=turn.turn_id, chunk={"type": "error", "errorText": info.message},
                                     final=True, client_id=agent_id))
        self.emit(events)
        message = self.state.persisted_message(turn.turn_id, reason)
        fut = self.emit([TurnEnd(turn_id=turn.turn_id, reason=reason, message=message, error=info,  # type: ignore[arg-type]
                                 client_id=agent_id)])
        turn.trace.ended(self.state.turns[turn.turn_id], reason, info)
        self.metrics.turns_ended.labels(reason).inc()
        self.metrics.active_turns.dec()
        self.turns.pop(turn.turn_id, None)
        turn.ended.set()
        self._publish_presence()
        if start_queued:
            self._start_next_queued()
        return fut

    def _start_next_queued(self) -> None:
        state = self.state
        if state.active or not state.queue or self.closing:
            return
        nxt = state.queue[0]
        events: list[AnyEvent] = []
        if nxt.messages:
            first = nxt.messages[0]
            if first.parent_id is None:
                first = msgspec.structs.replace(first, parent_id=state.default_parent())
            events = [MessageEvent(message=m, client_id=nxt.owner) for m in [first, *nxt.messages[1:]]]
        events.append(TurnStart(turn_id=nxt.turn_id, owner=nxt.owner, input_id=nxt.message_id,
                                message_id=_reply_for(nxt.turn_id), client_id=self.runtime.agent_id))
        self.emit(events)
        self._launch(nxt.turn_id, [], "queue")

    def recover(self) -> None:
        """After a restart: turns the log shows running have lost their runner."""
        for turn_id in list(self.state.active):
            ts = self.state.active[turn_id]
            turn = Turn(self, turn_id=turn_id, owner=ts.owner, input=self.state.messages[ts.input_id],
                        message_id=ts.message_id, history=[])
            self.turns[turn_id] = turn
            self.metrics.active_turns.inc()
            asyncio.ensure_future(self.end_turn(
                turn, "error", CommandError(ErrorCode.WORKER_LOST, self.runtime.config.lost_message)))
        self._start_next_queued()

    async def shutdown(self) -> None:
        self.closing = True
        for turn_id in list(self.turns):
            self._abort(turn_id, "shutdown")
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.runtime.config.abort_grace_s)
        while self._flushing or self._outbox:
            await asyncio.sleep(0.001)


@functools.lru_cache(maxsize=64)
def _takes_turn(hook: Any) -> bool:
    """``on_abort(write, turn)`` rather than ``on_abort(write)`` (read once per hook)."""
    return len(inspect.signature(hook).parameters) >= 2


def _reply_for(turn_id: str) -> str:
    # The reply shares its turn's hex, so logs pair them at a glance.
    return "reply-" + turn_id.removeprefix("turn-")


def _error_info(error: BaseException | str | None) -> ErrorInfo:
    if isinstance(error, CommandError):
        return ErrorInfo(code=error.code, message=error.message)
    if isinstance(error, BaseException):
        return ErrorInfo(code=ErrorCode.AGENT_ERROR, message=f"{type(error).__name__}: {error}")
    return ErrorInfo(code=ErrorCode.AGENT_ERROR, message=error or "the agent failed")


class Runtime:
    """Hubs for every session a process serves, over one store."""

    def __init__(self, store: EventLog, agent: Agent | None = None, config: RuntimeConfig | None = None,
                 metrics: Metrics | None = None, agent_id: str = "agent"):
        self.store = store
        self.agent = agent
        self.config = config or RuntimeConfig()
        self.metrics = metrics or Metrics()
        self.agent_id = agent_id
        self._hubs: dict[str, SessionHub] = {}
        self._loading: dict[str, asyncio.Future[SessionHub]] = {}
        self._sweeper: asyncio.Future[None] | None = None
        self._to_flush: list[SessionHub] = []

    def _flush_soon(self, hub: SessionHub) -> None:
        """``hub._flush()`` on the next loop turn: one callback for every hub
        that emitted in this one (a streaming worker's hubs each emit a chunk
        per turn of its loop; a callback each cost more than their flushes)."""
        if not self._to_flush:
            asyncio.get_running_loop().call_soon(self._flush_all)
        self._to_flush.append(hub)

    def _flush_all(self) -> None:
        hubs, self._to_flush = self._to_flush, []
        for hub in hubs:
            hub._flush()

    async def hub(self, session_id: str, *, fence: str | None = None) -> SessionHub:
        """The session's hub, loaded on first use (replaying the log and
        recovering turns that lost their runner). ``fence``: see SessionHub."""
        hub = self._hubs.get(session_id)
        if hub is not None:
            hub.last_used = time.monotonic()
            return hub
        loading = self._loading.get(session_id)
        if loading is not None:
            return await asyncio.shield(loading)
        fut: asyncio.Future[SessionHub] = asyncio.get_running_loop().create_future()
        self._loading[session_id] = fut
        try:
            state = Session(session_id, tool_cancel_text=self.config.tool_cancel_text)
            after = 0
            while True:
                page = await self.store.read(session_id, after, 5000)
                if not page:
                    break
                for rec in page:
                    state.apply(rec.event())
                after = page[-1].seq
            hub = SessionHub(self, session_id, state, fence)
            self._hubs[session_id] = hub
            hub.recover()
            fut.set_result(hub)
            return hub
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        finally:
            self._loading.pop(session_id, None)

    def loaded(self, session_id: str) -> SessionHub | None:
        return self._hubs.get(session_id)

    async def start(self) -> None:
        """Start background work (the app calls it once the store is open)."""
        ttl = self.config.idle_evict_s
        if ttl is not None and self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep(min(ttl / 2, 60.0)))

    async def _sweep(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.evict_idle()

    def evict_idle(self, now: float | None = None) -> int:
        """Drop idle hubs unused for ``idle_evict_s`` (their state is all in the
        log). Hubs holding in-memory decisions (pending cancels) stay."""
        ttl = self.config.idle_evict_s
        if ttl is None:
            return 0
        now = time.monotonic() if now is None else now
        stale = [h for h in self._hubs.values()
                 if h.idle and not h.state.pending_cancels and not h._privileged_pending
                 and now - h.last_used >= ttl]
        for hub in stale:
            del self._hubs[hub.session_id]
            hub.evicted = True
        return len(stale)

    def _readmit(self, hub: SessionHub) -> None:
        """An evicted hub asked to write (a command that began before its
        eviction): its state is still exact unless the session was reloaded."""
        if self._hubs.get(hub.session_id) is None and hub.session_id not in self._loading:
            self._hubs[hub.session_id] = hub
            hub.evicted = False
            return
        raise CommandError(ErrorCode.CONFLICT, "the session was reloaded meanwhile; send the request again")

    async def exists(self, session_id: str) -> bool:
        hub = self._hubs.get(session_id)
        if hub is not None:
            return hub.state.last_seq > 0
        return await self.store.exists(session_id)

    def _retire(self, hub: SessionHub) -> None:
        if self._hubs.get(hub.session_id) is hub:
            del self._hubs[hub.session_id]

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*(h.shutdown() for h in list(self._hubs.values())), return_exceptions=True)

    async def read(self, session_id: str, after: int = 0, limit: int | None = None) -> list[Record]:
        return await self.store.read(session_id, after, limit)
