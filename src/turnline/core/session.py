"""The session state machine: a pure fold over a session's event log.

Feed it events in ``seq`` order with :meth:`Session.apply`; read its state.
It also answers the questions the runtime must decide on (which turns a cancel
matches, what a turn's persisted message is), always as a function of the log,
so every node and every client derives the same answers. No asyncio, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ..protocol import (
    AnyEvent, CancelEvent, CancelFilter, CancelResult, ChunkEvent, Compacted, Message, MessageEvent,
    Presence, Queued, Rejected, TurnEnd, TurnRevised, TurnStart,
)
from .fold import CANCELLED_TOOL_TEXT, MessageFold

PENDING_CANCEL_LIMIT = 256
PENDING_CANCEL_TTL_MS = 60_000


def continues(ev: AnyEvent, last_seq: int) -> bool:
    """Is ``ev`` the next event after ``last_seq``? A ``compacted`` event stands
    for the run ``first..seq`` that retention removed (chunks of turns long
    ended, whose ``turn-end`` holds the message), so it continues the log when
    that run covers ``last_seq + 1``."""
    if type(ev) is Compacted:
        return ev.first <= last_seq + 1 <= ev.seq
    return ev.seq == last_seq + 1


class InvariantError(Exception):
    """The log breaks an invariant: a gap, a duplicate, a second turn-end, a
    chunk after its turn ended. The runtime never appends such an event."""


@dataclass(slots=True)
class CancelMark:
    request_id: str
    seen: int | None
    seq: int


@dataclass(slots=True)
class TurnState:
    turn_id: str
    owner: str
    input_id: str
    message_id: str
    start_seq: int
    input_seq: int = 0  # seq of the input message (a stop racing the end needs the client to have seen it)
    chunks: list[ChunkEvent] = field(default_factory=list)
    fold: MessageFold | None = None
    cancel: CancelMark | None = None
    end_seq: int | None = None
    reason: str | None = None
    revised: bool = False

    @property
    def active(self) -> bool:
        return self.end_seq is None

    def live_fold(self) -> MessageFold:
        if self.fold is None:
            self.fold = MessageFold(self.message_id)
        return self.fold


@dataclass(slots=True)
class PendingCancel:
    request_id: str
    requester: str
    seen: int | None
    ts: int


@dataclass(slots=True)
class QueuedInput:
    message_id: str
    turn_id: str
    owner: str
    messages: list[Message] = field(default_factory=list)


@dataclass(slots=True)
class CancelMatch:
    """What a cancel request would do, before authorisation."""

    matched: list[str]
    owners: dict[str, str]
    pending: list[str]
    revisable: list[str]  # ended after the requester's ``seen``: the stop raced the end
    queued: list[str]  # queued inputs (by their reserved turn id) the filter removes


def filter_matches(flt: CancelFilter, requester: str, turn_id: str, owner: str) -> bool:
    if flt.all:
        return True
    if flt.turn_id is not None:
        return flt.turn_id == turn_id
    if flt.client_id is not None:
        return flt.client_id == owner
    return owner == requester  # own


class Session:
    """State derived from one session's log."""

    def __init__(self, session_id: str = "", *, tool_cancel_text: str = CANCELLED_TOOL_TEXT,
                 keep_ended_turns: int = 64):
        self.session_id = session_id
        self.last_seq = 0
        self.messages: dict[str, Message] = {}
        self.message_seq: dict[str, int] = {}
        self.children: dict[str | None, list[str]] = {}
        self.turns: dict[str, TurnState] = {}
        self.active: dict[str, TurnState] = {}
        self.turn_of_message: dict[str, str] = {}
        self.head: str | None = None
        # The newest visible message: the head, or a user message sent after
        # it whose answer has not ended yet (what a reloading page shows last).
        self.latest: str | None = None
        self.queued_message_ids: set[str] = set()
        self.pending_cancels: dict[str, PendingCancel] = {}
        self.queue: list[QueuedInput] = []
        self.hidden: set[str] = set()
        self.presence: Presence | None = None
        self._cancel_requests: dict[str, CancelEvent] = {}
        # The first answer to each recent cancel request, so that a retried
        # request (a gateway unsure whether a dead worker ran it) is answered
        # with it instead of cancelling whatever runs now.
        self.cancel_answers: dict[str, CancelResult] = {}
        self._ended_order: list[str] = []
        self._keep_ended = keep_ended_turns
        self.tool_cancel_text = tool_cancel_text
        self.late_chunks = 0

    # ------------------------------------------------------------ applying

    def apply(self, ev: AnyEvent) -> None:
        if not continues(ev, self.last_seq):
            raise InvariantError(f"seq {ev.seq} after {self.last_seq}: the log must be gapless")
        handler = _APPLY.get(type(ev))
        if handler is not None:
            handler(self, ev)
        self.last_seq = ev.seq
        self._expire_pending(ev.ts)

    def apply_all(self, events: Iterable[AnyEvent]) -> None:
        for ev in events:
            self.apply(ev)

    def _add_message(self, msg: Message) -> None:
        if msg.id not in self.messages:
            self.children.setdefault(msg.parent_id, []).append(msg.id)
        self.messages[msg.id] = msg

    def _on_message(self, ev: MessageEvent) -> None:
        if ev.message.id in self.messages:
            raise InvariantError(f"message {ev.message.id} appended twice")
        self._add_message(ev.message)
        self.message_seq[ev.message.id] = ev.seq
        self.latest = ev.message.id

    def _on_turn_start(self, ev: TurnStart) -> None:
        if ev.turn_id in self.turns:
            raise InvariantError(f"turn {ev.turn_id} started twice")
        turn = TurnState(ev.turn_id, ev.owner, ev.input_id, ev.message_id, ev.seq,
                         self.message_seq.get(ev.input_id, ev.seq))
        self.turns[ev.turn_id] = turn
        self.active[ev.turn_id] = turn
        self.turn_of_message[ev.message_id] = ev.turn_id
        self.queue = [q for q in self.queue if q.turn_id != ev.turn_id]

    def _on_chunk(self, ev: ChunkEvent) -> None:
        turn = self.active.get(ev.turn_id)
        if turn is None:
            raise InvariantError(f"chunk for turn {ev.turn_id}, which is not active")
        turn.chunks.append(ev)
        turn.live_fold().add(ev.chunk)

    def _on_turn_end(self, ev: TurnEnd) -> None:
        turn = self.active.pop(ev.turn_id, None)
        if turn is None:
            raise InvariantError(f"turn-end for turn {ev.turn_id}, which is not active")
        turn.end_seq = ev.seq
        turn.reason = ev.reason
        self._add_message(ev.message)
        if ev.message.parent_id not in self.hidden:
            self.head = self.latest = ev.message.id
        else:
            self.hidden.add(ev.message.id)
        self._ended_order.append(ev.turn_id)
        if len(self._ended_order) > self._keep_ended:
            old = self.turns.get(self._ended_order.pop(0))
            if old is not None:  # keep the record, drop the chunk list
                old.chunks = []
                old.fold = None

    def _on_turn_revised(self, ev: TurnRevised) -> None:
        turn = self.turns.get(ev.turn_id)
        if turn is None or turn.active:
            raise InvariantError(f"turn-revised for turn {ev.turn_id}, which has not ended")
        turn.reason = ev.reason
        turn.revised = True
        self._add_message(ev.message)

    def _on_cancel(self, ev: CancelEvent) -> None:
        self._cancel_requests[ev.request_id] = ev
        if len(self._cancel_requests) > PENDING_CANCEL_LIMIT:
            self._cancel_requests.pop(next(iter(self._cancel_requests)))

    def _on_cancel_result(self, ev: CancelResult) -> None:
        request = self._cancel_requests.pop(ev.request_id, None)
        if ev.request_id not in self.cancel_answers:
            self.cancel_answers[ev.request_id] = ev
            if len(self.cancel_answers) > PENDING_CANCEL_LIMIT:
                self.cancel_answers.pop(next(iter(self.cancel_answers)))
        for turn_id in ev.cancelled:
            pending = self.pending_cancels.pop(turn_id, None)
            seen = request.seen if request is not None else pending.seen if pending is not None else None
            turn = self.turns.get(turn_id)
            if turn is not None and turn.cancel is None:
                turn.cancel = CancelMark(ev.request_id, seen, ev.seq)
            self.queue = [q for q in self.queue if q.turn_id != turn_id]
        for turn_id in ev.rejected:
            self.pending_cancels.pop(turn_id, None)  # decided: it will not apply
        if ev.rolled_back:
            self.hidden.update(ev.rolled_back)
            while self.head in self.hidden:
                self.head = self.messages[self.head].parent_id if self.head in self.messages else None
            if self.latest in self.hidden:
                self.latest = self.head
        for turn_id in ev.pending:
            if turn_id not in self.turns and request is not None:
                self.pending_cancels[turn_id] = PendingCancel(ev.request_id, request.client_id, request.seen, ev.ts)
                while len(self.pending_cancels) > PENDING_CANCEL_LIMIT:
                    self.pending_cancels.pop(next(iter(self.pending_cancels)))

    def _on_queued(self, ev: Queued) -> None:
        if ev.turn_id is not None:
            self.queue.append(QueuedInput(ev.message_id, ev.turn_id, ev.client_id, list(ev.messages)))
            # Taken for good, even once the input is cancelled: a client
            # re-sending it after a drop must hear `conflict`, not queue it again.
            self.queued_message_ids.update(m.id for m in ev.messages)

    def _on_rejected(self, ev: Rejected) -> None:
        self.queue = [q for q in self.queue if q.message_id != ev.message_id]

    def _on_presence(self, ev: Presence) -> None:
        self.presence = ev

    def _expire_pending(self, ts: int) -> None:
        if self.pending_cancels and ts:
            expired = [t for t, p in self.pending_cancels.items() if ts - p.ts > PENDING_CANCEL_TTL_MS]
            for t in expired:
                del self.pending_cancels[t]

    # ------------------------------------------------------------ reading

    def is_active(self, turn_id: str) -> bool:
        return turn_id in self.active

    def active_turns(self) -> dict[str, set[str]]:
        """Active turns as owner → set of turn ids (what a stop button needs)."""
        out: dict[str, set[str]] = {}
        for t in self.active.values():
            out.setdefault(t.owner, set()).add(t.turn_id)
        return out

    def presence_state(self) -> str:
        if not self.active:
            return "idle"
        if any(t.chunks for t in self.active.values()):
            return "streaming"
        return "thinking"

    def default_parent(self) -> str | None:
        """Where a new user message goes when the sender names no parent: after
        the newest ended turn. Messages sent while turns stream thus become
        siblings of the streaming turn's input, and the tree stays a tree."""
        return self.head

    def branch(self, leaf: str | None = None) -> list[Message]:
        """Messages from the root down to ``leaf`` (default: the head)."""
        node = self.head if leaf is None else leaf
        path: list[Message] = []
        guard = 0
        while node is not None and guard <= len(self.messages):
            msg = self.messages.get(node)
            if msg is None:
                break
            path.append(msg)
            node = msg.parent_id
            guard += 1
        path.reverse()
        return path

    def siblings(self, message_id: str) -> list[str]:
        msg = self.messages.get(message_id)
        if msg is None:
            return []
        return list(self.children.get(msg.parent_id, []))

    # ------------------------------------------------------------ deciding

    def match_cancel(self, flt: CancelFilter, requester: str, seen: int | None = None) -> CancelMatch:
        """The turns a cancel request names. A turn cancels once: turns already
        cancelled are not matched again. A ``turn_id`` the log has never seen
        is *pending*: it is cancelled the moment it starts."""
        flt = flt.normalized()
        matched: list[str] = []
        owners: dict[str, str] = {}
        for t in self.active.values():
            if t.cancel is None and filter_matches(flt, requester, t.turn_id, t.owner):
                matched.append(t.turn_id)
                owners[t.turn_id] = t.owner
        queued = [q.turn_id for q in self.queue
                  if q.turn_id not in owners and filter_matches(flt, requester, q.turn_id, q.owner)]
        for q in self.queue:
            if q.turn_id in queued:
                owners[q.turn_id] = q.owner
        pending: list[str] = []
        if flt.turn_id is not None and flt.turn_id not in self.turns and flt.turn_id not in queued:
            pending.append(flt.turn_id)
        revisable: list[str] = []
        if seen is not None:
            # The stop raced the end: the requester had seen the turn's input
            # but not its end. Had the stop arrived first, the turn would have
            # been cancelled with this ``seen`` (even one whose start it had
            # not seen yet: nothing would be saved), so it is revised to that.
            for t in self.turns.values():
                if (t.end_seq is not None and t.reason == "complete" and not t.revised
                        and t.input_seq <= seen < t.end_seq
                        and filter_matches(flt, requester, t.turn_id, t.owner)
                        and any(c.seq > seen and not c.final for c in t.chunks)):
                    revisable.append(t.turn_id)
                    owners[t.turn_id] = t.owner
        return CancelMatch(matched, owners, pending, revisable, queued)

    def persisted_message(self, turn_id: str, reason: str, seen: int | None = None) -> Message:
        """The assistant message as it is saved when the turn ends.

        With a ``seen`` cursor (from the cancel that stopped the turn, or given
        here), the message is the fold of the turn's chunks with ``seq <= seen``
        plus those its ``on_abort`` hook wrote; parts still open are closed and
        the message says it was interrupted. The answer depends only on the log,
        so it is the same whichever of cancel and end of stream came first."""
        turn = self.turns[turn_id]
        if seen is None and turn.cancel is not None and reason == "cancelled":
            seen = turn.cancel.seen
        # Refolding leaves the live fold untouched for readers still using it.
        f = MessageFold(turn.message_id)
        for c in turn.chunks:
            if seen is None or c.seq <= seen or c.final:
                f.add(c.chunk)
        f.close_open_parts(self.tool_cancel_text)
        parts, metadata = f.snapshot()
        if reason == "cancelled":
            metadata["interrupted"] = {"reason": "cancelled", "seen": seen}
        return Message(id=turn.message_id, role="assistant", parts=parts, parent_id=turn.input_id,
                       metadata=metadata or None)


_APPLY: dict[type, Any] = {
    MessageEvent: Session._on_message,
    TurnStart: Session._on_turn_start,
    ChunkEvent: Session._on_chunk,
    TurnEnd: Session._on_turn_end,
    TurnRevised: Session._on_turn_revised,
    CancelEvent: Session._on_cancel,
    CancelResult: Session._on_cancel_result,
    Queued: Session._on_queued,
    Rejected: Session._on_rejected,
    Presence: Session._on_presence,
}
