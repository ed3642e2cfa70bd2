"""The client-side state of one session: what a screen shows.

A :class:`View` is a thin layer over :class:`turnline.core.session.Session` (the
same pure fold the server runs), so the client derives turns, the conversation
tree and persisted messages exactly as the server does. On top of the core it
adds what only a client needs:

- **strict ordering**: events are applied in ``seq`` order; an event at or
  below ``last_seq`` is a duplicate and is ignored; an event past
  ``last_seq + 1`` raises :class:`GapError` (the transport then resubscribes
  from ``last_seq``);
- **live messages**: the assistant message of a running turn is shown from the
  core's live fold while it streams;
- **optimistic user messages**: shown at once under their client-generated id
  and replaced, in place, by the server's copy when its ``message`` event
  arrives;
- **what you saw is what is saved**: after this client cancels with
  ``seen=S``, a cancelled turn's message is displayed frozen at its chunks with
  ``seq <= S`` (later tail chunks stay in the core's log data but are not
  shown) until the server's ``turn-end`` (or ``turn-revised``) replaces it
  with the persisted message, which by design is the same;
- **branch navigation**: :meth:`siblings` and :meth:`select`.

No I/O: the transport feeds it, tests feed it by hand.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import msgspec

from ..core.session import InvariantError, Session, TurnState, continues
from ..protocol import AnyEvent, Event, Message, MessageEvent, Rejected, TurnEnd, TurnRevised, TurnStart

log = logging.getLogger("turnline.client")

__all__ = ["Freeze", "GapError", "View", "message_text"]


class GapError(InvariantError):
    """An event arrived past ``last_seq + 1``: something between the log and
    this view lost events. The view is unchanged; resubscribe from ``last_seq``."""

    def __init__(self, last_seq: int, seq: int):
        super().__init__(f"gap: got seq {seq} after {last_seq}")
        self.last_seq = last_seq
        self.seq = seq


@dataclass(slots=True)
class Freeze:
    """A turn this client asked to stop, displayed as of ``seen``."""

    seen: int
    request: Any = None
    acked: bool = False  # the server answered the cancel request
    confirmed: bool = False  # ... and listed this turn as cancelled (or pending)


def message_text(message: Message | None) -> str:
    """The concatenated ``text`` parts of a message (``""`` for ``None``)."""
    if message is None:
        return ""
    return "".join(p.get("text", "") for p in message.parts if p.get("type") == "text")


class View:
    """Client-side state of one session, built on the core :class:`Session`."""

    def __init__(self, session_id: str = "", *, client_id: str | None = None, keep_events: bool = False,
                 keep_turn_ends: int = 1024):
        self.session_id = session_id
        self.client_id = client_id
        self.core = Session(session_id)
        #: every applied event, in order (only with ``keep_events=True``)
        self.events: list[AnyEvent] | None = [] if keep_events else None
        self.duplicates = 0  # events ignored because seq <= last_seq
        self.gaps = 0  # events refused because seq > last_seq + 1
        self.skipped = 0  # events of unknown types, only counted
        #: events the core refused (only when the view started mid-log, or a broken log)
        self.anomalies: list[str] = []
        self._optimistic: dict[str, Message] = {}
        self._order: dict[str, int] = {}
        self._counter = itertools.count()
        self._selected: str | None = None
        self._freezes: dict[str, Freeze] = {}
        self._frozen_cache: dict[str, tuple[tuple[int, int], Message]] = {}
        self._turn_ends: OrderedDict[str, TurnEnd] = OrderedDict()
        self._keep_turn_ends = keep_turn_ends
        self._event_listeners: list[Callable[[AnyEvent], None]] = []
        self._turn_end_listeners: list[Callable[[TurnEnd], None]] = []

    # ------------------------------------------------------------ applying

    @property
    def last_seq(self) -> int:
        """The highest ``seq`` applied (what this view has rendered)."""
        return self.core.last_seq

    def start_at(self, seq: int) -> None:
        """Begin the view at ``seq`` instead of 0 (a live-only or resumed
        subscription). Only before anything was applied. Events about turns
        and messages from before ``seq`` are then tolerated and recorded in
        :attr:`anomalies`."""
        if self.core.last_seq != 0 or self.core.messages or self.core.turns:
            raise ValueError("start_at only applies to an empty view")
        self.core.last_seq = seq

    def apply(self, ev: AnyEvent) -> bool:
        """Apply one event. Returns ``False`` for a duplicate (ignored);
        raises :class:`GapError` (view unchanged) when events are missing."""
        last = self.core.last_seq
        if ev.seq <= last:
            self.duplicates += 1
            return False
        if not continues(ev, last):  # a ``compacted`` event fills the hole it stands for
            self.gaps += 1
            raise GapError(last, ev.seq)
        try:
            self.core.apply(ev)
        except InvariantError as exc:
            # The log is the truth; a view that cannot place an event (it
            # started mid-log) records it and moves on rather than stalling.
            self.anomalies.append(f"seq {ev.seq}: {exc}")
            self.core.last_seq = ev.seq
        if self.events is not None:
            self.events.append(ev)
        self._after(ev)
        return True

    def apply_all(self, events: Iterable[AnyEvent]) -> int:
        """Apply events in order; returns how many were new."""
        return sum(1 for ev in events if self.apply(ev))

    def skip(self, seq: int) -> bool:
        """Account for an event of a type this client does not know (the
        protocol lets old clients ignore new event types): it still takes its
        place in the order."""
        placeholder = Event(seq=seq)
        new = self.apply(placeholder)  # the core ignores event types it has no handler for
        if new:
            self.skipped += 1
        return new

    def _after(self, ev: AnyEvent) -> None:
        if isinstance(ev, MessageEvent):
            mid = ev.message.id
            self._optimistic.pop(mid, None)  # the server's copy replaces ours, in place
            self._seen_id(mid)
        elif isinstance(ev, TurnStart):
            self._seen_id(ev.message_id)
        elif isinstance(ev, Rejected):
            self._optimistic.pop(ev.message_id, None)
        elif isinstance(ev, TurnEnd):
            self._seen_id(ev.message.id)
            self._turn_ends[ev.turn_id] = ev
            while len(self._turn_ends) > self._keep_turn_ends:
                self._turn_ends.popitem(last=False)
            fr = self._freezes.get(ev.turn_id)
            if fr is not None and (ev.reason == "cancelled" or (fr.acked and not fr.confirmed)):
                self._release(ev.turn_id)
            # else: a stop of ours raced the end of the turn; hold the frozen
            # display until the server's answer (a ``turn-revised`` follows)
        elif isinstance(ev, TurnRevised):
            self._release(ev.turn_id)
        for cb in list(self._event_listeners):
            _call(cb, ev)
        if isinstance(ev, TurnEnd):
            for cb in list(self._turn_end_listeners):
                _call(cb, ev)

    def _seen_id(self, message_id: str) -> None:
        if message_id not in self._order:
            self._order[message_id] = next(self._counter)

    # ------------------------------------------------------------ listeners

    def on_event(self, callback: Callable[[AnyEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` after each applied event; returns a remover."""
        self._event_listeners.append(callback)
        return lambda: _discard(self._event_listeners, callback)

    def on_turn_end(self, callback: Callable[[TurnEnd], None]) -> Callable[[], None]:
        """Call ``callback(turn_end)`` for each ``turn-end`` (its ``reason``
        says how the turn ended); returns a remover."""
        self._turn_end_listeners.append(callback)
        return lambda: _discard(self._turn_end_listeners, callback)

    def turn_end(self, turn_id: str) -> TurnEnd | None:
        """The ``turn-end`` event of a turn this view saw end, else ``None``."""
        return self._turn_ends.get(turn_id)

    @property
    def active_turns(self) -> dict[str, set[str]]:
        """Running turns as owner → set of turn ids (from the core)."""
        return self.core.active_turns()

    # ------------------------------------------------------------ optimistic messages

    def add_optimistic(self, message: Message | dict[str, Any]) -> None:
        """Show a user message at once, under its own (client-generated) id,
        until the server's ``message`` event with that id replaces it."""
        if not isinstance(message, Message):
            message = msgspec.convert({"parent_id": None, **message}, Message)
        if message.id in self.core.messages:
            return  # already reconciled
        self._optimistic[message.id] = message
        self._seen_id(message.id)

    def drop_optimistic(self, message_ids: Iterable[str]) -> None:
        """Withdraw optimistic messages the server did not take (error, reject)."""
        for mid in message_ids:
            self._optimistic.pop(mid, None)

    @property
    def optimistic(self) -> list[str]:
        """Ids of messages shown but not yet confirmed by the server."""
        return list(self._optimistic)

    def guess_parent(self, policy: str | None = None, owner: str | None = None) -> str | None:
        """Where the server will most likely put a new message sent without a
        ``parent_id`` (used to place an optimistic message; the server's copy
        corrects it if the guess was wrong)."""
        owner = owner if owner is not None else self.client_id
        if policy == "interrupt" and owner is not None:
            own = [t for t in self.core.active.values() if t.owner == owner and t.cancel is None]
            if own:
                return own[-1].message_id
        return self.core.default_parent()

    # ------------------------------------------------------------ what you saw is what is saved

    def freeze(self, turn_ids: Iterable[str], seen: int, request: Any = None) -> None:
        """This client asked to stop ``turn_ids`` having rendered up to
        ``seen``: display them as of ``seen`` from now on. A turn already
        frozen keeps its first cursor (a turn cancels once)."""
        for tid in turn_ids:
            if tid not in self._freezes:
                self._freezes[tid] = Freeze(seen, request)

    def cancel_acked(self, request: Any, cancelled: Iterable[str] = (), rejected: Iterable[str] = (),
                     pending: Iterable[str] = (), seen: int | None = None) -> None:
        """The server answered cancel ``request``. Rejected turns stream on
        (released); turns it cancelled (or will, once they start) stay frozen
        until their ``turn-end``/``turn-revised``."""
        cancelled, rejected = set(cancelled), set(rejected)
        confirmed = cancelled | set(pending)
        for tid, fr in list(self._freezes.items()):
            if fr.request != request:
                continue
            seen = fr.seen if seen is None else seen
            fr.acked = True
            if tid in rejected:
                self._release(tid)
            elif tid in confirmed:
                fr.confirmed = True
                turn = self.core.turns.get(tid)
                if turn is not None and (turn.revised or (not turn.active and turn.reason == "cancelled")):
                    self._release(tid)
            else:
                # Not ours to stop after all (another cancel won, or the turn
                # was over): show what the server says once the turn has ended.
                turn = self.core.turns.get(tid)
                if turn is not None and not turn.active:
                    self._release(tid)
        if seen is not None:
            # Turns the server matched that this view had not seen start yet:
            # their persisted message is the fold up to ``seen`` as well.
            for tid in confirmed:
                if tid not in self._freezes:
                    turn = self.core.turns.get(tid)
                    if turn is None or turn.active or (turn.reason == "complete" and not turn.revised):
                        # (an ended one is being revised: hold until the ``turn-revised``)
                        self._freezes[tid] = Freeze(seen, request, acked=True, confirmed=True)

    def cancel_failed(self, request: Any) -> None:
        """Cancel ``request`` failed (error frame): its turns stream on."""
        for tid, fr in list(self._freezes.items()):
            if fr.request == request:
                self._release(tid)

    def frozen_at(self, turn_id: str) -> int | None:
        """The ``seen`` cursor a turn is displayed at, or ``None``."""
        fr = self._freezes.get(turn_id)
        return fr.seen if fr is not None else None

    def _release(self, turn_id: str) -> None:
        self._freezes.pop(turn_id, None)
        self._frozen_cache.pop(turn_id, None)

    # ------------------------------------------------------------ display

    def _frozen(self, turn: TurnState, seen: int) -> Message:
        key = (seen, len(turn.chunks))
        cached = self._frozen_cache.get(turn.turn_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        # The same function the server persists with: fold of the chunks with
        # seq <= seen (plus on_abort's), open parts closed, marked interrupted.
        msg = self.core.persisted_message(turn.turn_id, "cancelled", seen)
        self._frozen_cache[turn.turn_id] = (key, msg)
        return msg

    @staticmethod
    def _live(turn: TurnState) -> Message:
        parts, metadata = turn.fold.snapshot() if turn.fold is not None else ([], {})
        return Message(id=turn.message_id, role="assistant", parts=parts, parent_id=turn.input_id,
                       metadata=metadata or None)

    def message(self, message_id: str) -> Message | None:
        """The message as displayed: optimistic, live, frozen or persisted."""
        opt = self._optimistic.get(message_id)
        if opt is not None:
            return opt
        tid = self.core.turn_of_message.get(message_id)
        turn = self.core.turns.get(tid) if tid is not None else None
        if turn is not None:
            fr = self._freezes.get(turn.turn_id)
            if fr is not None and (turn.active or turn.chunks):
                return self._frozen(turn, fr.seen)
            if turn.active:
                return self._live(turn)
        return self.core.messages.get(message_id)

    def is_streaming(self, message_id: str) -> bool:
        """True for the message of a running turn (not frozen by a stop)."""
        tid = self.core.turn_of_message.get(message_id)
        return tid is not None and tid in self.core.active and tid not in self._freezes

    def _nodes(self) -> dict[str, Message]:
        nodes: dict[str, Message] = {}
        for mid in self.core.messages:
            msg = self.message(mid)
            if msg is not None:
                nodes[mid] = msg
        for turn in self.core.active.values():
            msg = self.message(turn.message_id)
            if msg is not None:
                nodes[turn.message_id] = msg
        for mid, msg in self._optimistic.items():
            nodes.setdefault(mid, msg)
        return nodes

    def _rank(self, mid: str) -> int:
        if mid not in self._order:
            self._seen_id(mid)
        return self._order[mid]

    def _children(self, nodes: dict[str, Message]) -> dict[str | None, list[str]]:
        children: dict[str | None, list[str]] = {}
        for mid in sorted(nodes, key=self._rank):
            children.setdefault(nodes[mid].parent_id, []).append(mid)
        return children

    @staticmethod
    def _path(nodes: dict[str, Message], leaf: str | None) -> list[Message]:
        path: list[Message] = []
        node = leaf
        while node is not None and node in nodes and len(path) <= len(nodes):
            msg = nodes[node]
            path.append(msg)
            node = msg.parent_id
        path.reverse()
        return path

    def _leaf(self, nodes: dict[str, Message]) -> str | None:
        hidden = self.core.hidden
        if self._selected is not None and self._selected in nodes:
            children = self._children(nodes)
            node = self._selected
            while True:
                kids = [c for c in children.get(node, []) if c not in hidden]
                if not kids:
                    return node
                node = kids[-1]  # the newest child
        visible = [m for m in nodes if m not in hidden]
        return max(visible, key=self._rank) if visible else None

    def messages(self, leaf: str | None = None) -> list[Message]:
        """The displayed branch, root first, as folded messages, including the
        live assistant messages of running turns and optimistic user messages.

        With ``leaf``: the path from the root to that message. Without: the
        selected branch (see :meth:`select`), or else the path to the newest
        message (rolled-back messages are not shown)."""
        nodes = self._nodes()
        if leaf is None:
            leaf = self._leaf(nodes)
        return self._path(nodes, leaf)

    def siblings(self, message_id: str) -> list[str]:
        """Ids of the message and its alternatives (same parent), oldest first."""
        nodes = self._nodes()
        msg = nodes.get(message_id)
        if msg is None:
            return []
        hidden = self.core.hidden
        return [m for m in self._children(nodes).get(msg.parent_id, []) if m not in hidden or m == message_id]

    def select(self, message_id: str | None) -> None:
        """Show the branch through ``message_id`` (down to its newest
        descendant); ``None`` follows the newest message again."""
        if message_id is not None and message_id not in self._nodes():
            raise KeyError(f"no message {message_id} in this view")
        self._selected = message_id

    @property
    def selected(self) -> str | None:
        return self._selected


def _call(cb: Callable[[Any], None], arg: Any) -> None:
    try:
        cb(arg)
    except Exception:
        log.exception("view listener failed")


def _discard(items: list[Any], item: Any) -> None:
    try:
        items.remove(item)
    except ValueError:
        pass
