"""The client View, pure (no I/O): events are built by hand, in seq order.

A small ``Log`` builds the events a server would append and keeps its own
core ``Session`` (the server's fold), so every ``turn-end`` and
``turn-revised`` message here is computed exactly as the server computes it.
"""

from __future__ import annotations

from typing import Any

import pytest

from turnline.client import GapError, View, message_text
from turnline.core.session import Session
from turnline.protocol import (
    AnyEvent, CancelEvent, CancelFilter, CancelResult, ChunkEvent, Message, MessageEvent, Rejected, TurnEnd,
    TurnRevised, TurnStart,
)


def user_msg(mid: str, text: str, parent: str | None = None, **meta: Any) -> Message:
    return Message(id=mid, role="user", parts=[{"type": "text", "text": text}], parent_id=parent,
                   metadata=meta or None)


class Log:
    """Builds a session log the way the server would, one event at a time."""

    def __init__(self) -> None:
        self.server = Session("s")
        self.events: list[AnyEvent] = []

    def _add(self, ev: AnyEvent) -> AnyEvent:
        ev.seq = self.server.last_seq + 1
        ev.ts = 1_000 + ev.seq
        self.server.apply(ev)
        self.events.append(ev)
        return ev

    @property
    def seq(self) -> int:
        return self.server.last_seq

    def user(self, mid: str, text: str, parent: str | None = None, client: str = "alice", **meta: Any) -> AnyEvent:
        return self._add(MessageEvent(message=user_msg(mid, text, parent, **meta), client_id=client))

    def start(self, turn: str, input_id: str, owner: str = "alice") -> AnyEvent:
        return self._add(TurnStart(turn_id=turn, owner=owner, input_id=input_id, message_id=f"reply-{turn}",
                                   client_id="agent"))

    def chunk(self, turn: str, chunk: dict[str, Any], final: bool = False) -> AnyEvent:
        return self._add(ChunkEvent(turn_id=turn, chunk=chunk, final=final, client_id="agent"))

    def text(self, turn: str, *deltas: str) -> list[AnyEvent]:
        out = []
        if not self.server.turns[turn].chunks:
            out.append(self.chunk(turn, {"type": "start"}))
            out.append(self.chunk(turn, {"type": "text-start", "id": "t0"}))
        for d in deltas:
            out.append(self.chunk(turn, {"type": "text-delta", "id": "t0", "delta": d}))
        return out

    def cancel(self, turn: str, requester: str, seen: int | None, request_id: str = "c1") -> list[AnyEvent]:
        return [self._add(CancelEvent(request_id=request_id, filter=CancelFilter(turn_id=turn), seen=seen,
                                      client_id=requester)),
                self._add(CancelResult(request_id=request_id, cancelled=[turn], client_id="agent"))]

    def end(self, turn: str, reason: str = "complete") -> AnyEvent:
        if reason == "complete":
            self.chunk(turn, {"type": "text-end", "id": "t0"})
            self.chunk(turn, {"type": "finish"})
        elif reason == "cancelled":
            self.chunk(turn, {"type": "abort"}, final=True)
        msg = self.server.persisted_message(turn, reason)
        return self._add(TurnEnd(turn_id=turn, reason=reason, message=msg, client_id="agent"))

    def revise(self, turn: str, seen: int) -> AnyEvent:
        msg = self.server.persisted_message(turn, "cancelled", seen)
        return self._add(TurnRevised(turn_id=turn, reason="cancelled", message=msg, client_id="agent"))

    def feed(self, view: View, start: int = 0) -> None:
        """Apply every event after ``start`` (by position) to ``view``."""
        for ev in self.events[start:]:
            view.apply(ev)


def new_view(**kw: Any) -> View:
    return View("s", client_id="alice", **kw)


def ids(messages: list[Message]) -> list[str]:
    return [m.id for m in messages]


# ---------------------------------------------------------------- optimistic


def test_optimistic_message_shows_at_once_and_the_servers_copy_replaces_it() -> None:
    log, view = Log(), new_view()
    log.user("u0", "earlier")
    log.start("t0", "u0")
    log.text("t0", "ok")
    log.end("t0")
    log.feed(view)

    view.add_optimistic(user_msg("u1", "hello", parent=view.guess_parent()))
    assert ids(view.messages()) == ["u0", "reply-t0", "u1"]  # shown at once, after the head
    assert view.optimistic == ["u1"]

    # another client's message arrives first; then the server's copy of ours
    n = len(log.events)
    log.user("b1", "from bob", parent="reply-t0", client="bob")
    log.user("u1", "hello", parent="reply-t0", server_copy=True)
    log.feed(view, n)

    shown = [m for m in view._nodes().values() if m.id == "u1"]
    assert len(shown) == 1, "the optimistic copy and the server's copy must not both show"
    assert view.message("u1").metadata == {"server_copy": True}  # the server's version won
    assert view.optimistic == []
    assert view.siblings("u1") == ["u1", "b1"]  # it keeps the place it was shown at


def test_a_rejected_send_withdraws_its_optimistic_message() -> None:
    log, view = Log(), new_view()
    view.add_optimistic(user_msg("u1", "too fast"))
    assert view.message("u1") is not None
    log._add(Rejected(message_id="u1", code="busy", client_id="alice"))
    log.feed(view)
    assert view.message("u1") is None
    assert view.messages() == []


def test_add_optimistic_after_the_server_copy_is_a_no_op() -> None:
    log, view = Log(), new_view()
    log.user("u1", "hi", server_copy=True)
    log.feed(view)
    view.add_optimistic(user_msg("u1", "hi"))
    assert view.optimistic == []
    assert view.message("u1").metadata == {"server_copy": True}


# ---------------------------------------------------------------- order


def test_duplicate_events_are_ignored() -> None:
    log, view = Log(), new_view(keep_events=True)
    log.user("u1", "hi")
    log.start("t1", "u1")
    log.text("t1", "Hel", "lo")
    log.feed(view)
    before = view.last_seq

    for ev in log.events[2:]:  # replay: seq <= last_seq
        assert view.apply(ev) is False
    assert view.duplicates == len(log.events) - 2
    assert view.last_seq == before
    assert message_text(view.message("reply-t1")) == "Hello"  # not "HelloHello"
    assert [e.seq for e in view.events] == list(range(1, before + 1))


def test_a_gap_is_refused_and_leaves_the_view_unchanged() -> None:
    log, view = Log(), new_view()
    log.user("u1", "hi")
    log.start("t1", "u1")
    e3, e4, e5 = log.text("t1", "a")  # start, text-start, delta
    view.apply(log.events[0])
    view.apply(log.events[1])

    with pytest.raises(GapError) as info:
        view.apply(e4)
    assert (info.value.last_seq, info.value.seq) == (2, 4)
    assert view.gaps == 1
    assert view.last_seq == 2
    assert view.core.turns["t1"].chunks == []

    for ev in (e3, e4, e5):  # the missing event arrives: resume where it stopped
        view.apply(ev)
    assert message_text(view.message("reply-t1")) == "a"


def test_an_unknown_event_type_still_takes_its_place_in_the_order() -> None:
    view = new_view()
    assert view.skip(1) is True
    assert view.last_seq == 1 and view.skipped == 1
    assert view.skip(1) is False  # duplicate
    with pytest.raises(GapError):
        view.skip(3)


def test_start_at_begins_mid_log_and_tolerates_what_it_cannot_place() -> None:
    log, view = Log(), new_view()
    log.user("u1", "hi")
    log.start("t1", "u1")
    log.text("t1", "a")
    view.start_at(3)
    log.feed(view, 3)  # chunks of a turn whose start this view never saw
    assert view.last_seq == len(log.events)
    assert view.anomalies  # recorded, not fatal
    with pytest.raises(ValueError):
        view.start_at(1)


# ---------------------------------------------------------------- live fold


def test_the_live_message_of_running_turns_is_shown_while_it_streams() -> None:
    log, view = Log(), new_view()
    log.user("u1", "hi")
    log.start("t1", "u1")
    log.text("t1", "Hel", "lo wor")
    log.user("u2", "and you?", client="bob")  # concurrent: a sibling of u1 (no head yet)
    log.start("t2", "u2", owner="bob")
    log.text("t2", "Me")
    log.feed(view)

    assert view.active_turns == {"alice": {"t1"}, "bob": {"t2"}}
    live = view.message("reply-t1")
    assert live.role == "assistant" and live.parent_id == "u1"
    assert live.parts == [{"type": "text", "text": "Hello wor", "state": "streaming"}]
    assert view.is_streaming("reply-t1")
    assert ids(view.messages()) == ["u2", "reply-t2"]  # the newest branch
    assert ids(view.messages(leaf="reply-t1")) == ["u1", "reply-t1"]

    n = len(log.events)
    log.text("t1", "ld")
    log.feed(view, n)
    assert message_text(view.message("reply-t1")) == "Hello world"

    n = len(log.events)
    end = log.end("t1")
    log.feed(view, n)
    assert view.active_turns == {"bob": {"t2"}}
    assert not view.is_streaming("reply-t1")
    assert view.message("reply-t1") == end.message
    assert view.message("reply-t1").parts[0]["state"] == "done"


def test_turn_end_listeners_get_each_turn_end_with_its_reason() -> None:
    log, view = Log(), new_view()
    got: list[tuple[str, str]] = []
    remove = view.on_turn_end(lambda ev: got.append((ev.turn_id, ev.reason)))
    log.user("u1", "hi")
    log.start("t1", "u1")
    log.text("t1", "x")
    log.end("t1", "complete")
    log.start("t2", "u1")
    log.cancel("t2", "alice", seen=None)
    log.end("t2", "cancelled")
    log.feed(view)
    assert got == [("t1", "complete"), ("t2", "cancelled")]
    assert view.turn_end("t2").reason == "cancelled"
    assert view.turn_end("nope") is None

    remove()
    n = len(log.events)
    log.start("t3", "u1")
    log.end("t3", "error")
    log.feed(view, n)
    assert len(got) == 2


# ---------------------------------------------------------------- what you saw is what is saved


def _streaming(view: View) -> Log:
    log = Log()
    log.user("u1", "hi")
    log.start("t1", "u1")
    log.text("t1", "one ", "two ", "three ")
    log.feed(view)
    return log


def test_after_a_cancel_the_turn_is_displayed_frozen_at_seen_until_its_turn_end() -> None:
    view = new_view()
    log = _streaming(view)
    seen = view.last_seq
    view.freeze(["t1"], seen, request="r1")
    frozen = view.message("reply-t1")
    assert message_text(frozen) == "one two three "

    # tail chunks the agent produced before the abort reached it
    n = len(log.events)
    log.text("t1", "four ", "five ")
    log.cancel("t1", "alice", seen)
    log.feed(view, n)
    assert [c.chunk["delta"] for c in view.core.turns["t1"].chunks if c.seq > seen] == ["four ", "five "]  # kept…
    assert view.message("reply-t1") == frozen  # …but not displayed
    assert not view.is_streaming("reply-t1")
    assert view.messages()[-1] == frozen

    view.cancel_acked("r1", cancelled=["t1"])
    assert view.message("reply-t1") == frozen

    n = len(log.events)
    end = log.end("t1", "cancelled")
    log.feed(view, n)
    assert view.frozen_at("t1") is None
    assert view.message("reply-t1") == end.message  # what the server persisted…
    assert end.message == frozen  # …is exactly what was displayed, parts and metadata
    assert end.message.metadata == {"interrupted": {"reason": "cancelled", "seen": seen}}


def test_a_rejected_or_failed_cancel_releases_the_freeze() -> None:
    view = new_view()
    log = _streaming(view)
    view.freeze(["t1"], view.last_seq, request="r1")
    n = len(log.events)
    log.text("t1", "four ")
    log.feed(view, n)
    assert message_text(view.message("reply-t1")) == "one two three "

    view.cancel_acked("r1", rejected=["t1"])
    assert message_text(view.message("reply-t1")) == "one two three four "
    assert view.is_streaming("reply-t1")

    view.freeze(["t1"], view.last_seq, request="r2")
    n = len(log.events)
    log.text("t1", "five ")
    log.feed(view, n)
    assert message_text(view.message("reply-t1")) == "one two three four "
    view.cancel_failed("r2")
    assert message_text(view.message("reply-t1")) == "one two three four five "


def test_a_stop_that_raced_the_end_holds_the_display_until_the_revision() -> None:
    view = new_view()
    log = _streaming(view)
    seen = view.last_seq
    view.freeze(["t1"], seen, request="r1")
    frozen = view.message("reply-t1")

    # the turn ended complete on the server before the cancel arrived
    n = len(log.events)
    log.text("t1", "four ")
    log.end("t1", "complete")
    log.feed(view, n)
    assert message_text(view.core.messages["reply-t1"]) == "one two three four "
    assert view.message("reply-t1") == frozen  # held: the answer to our stop is pending

    n = len(log.events)
    log._add(CancelEvent(request_id="c1", filter=CancelFilter(), seen=seen, client_id="alice"))
    log._add(CancelResult(request_id="c1", cancelled=["t1"], client_id="agent"))
    revised = log.revise("t1", seen)
    view.cancel_acked("r1", cancelled=["t1"])  # the ack may come before the events
    assert view.message("reply-t1") == frozen
    log.feed(view, n)
    assert view.frozen_at("t1") is None
    assert view.message("reply-t1") == revised.message == frozen
    assert view.messages()[-1] == frozen


def test_a_stop_the_server_did_not_apply_shows_the_turn_end_once_acked() -> None:
    view = new_view()
    log = _streaming(view)
    view.freeze(["t1"], view.last_seq, request="r1")
    n = len(log.events)
    end = log.end("t1", "complete")  # only closing chunks after seen: nothing more to show…
    log.feed(view, n)
    view.cancel_acked("r1", cancelled=[])  # …and the server says it stopped nothing
    assert view.message("reply-t1") == end.message


def test_turn_revised_replaces_the_message() -> None:
    log, view = Log(), new_view()
    log.user("u1", "hi")
    log.start("t1", "u1")
    log.text("t1", "a ")
    seen = log.seq
    log.text("t1", "b ")
    log.end("t1")
    log.cancel("t1", "bob", seen)  # bob's stop raced the end
    revised = log.revise("t1", seen)
    log.feed(view)
    assert view.message("reply-t1") == revised.message
    assert message_text(view.messages()[-1]) == "a "


# ---------------------------------------------------------------- branches


def test_siblings_and_branch_selection() -> None:
    log, view = Log(), new_view()
    log.user("u1", "hi")
    log.start("t1", "u1")
    log.text("t1", "first answer")
    log.end("t1")
    log.start("t2", "u1")  # regenerate: a sibling reply
    log.text("t2", "second answer")
    log.end("t2")
    log.user("u2", "follow-up on the first", parent="reply-t1")
    log.feed(view)

    assert view.siblings("reply-t1") == ["reply-t1", "reply-t2"]
    assert view.siblings("reply-t2") == ["reply-t1", "reply-t2"]
    assert view.siblings("u1") == ["u1"]
    assert view.siblings("nope") == []
    assert ids(view.messages()) == ["u1", "reply-t1", "u2"]  # the newest message

    view.select("reply-t2")
    assert ids(view.messages()) == ["u1", "reply-t2"]
    view.select("reply-t1")
    assert ids(view.messages()) == ["u1", "reply-t1", "u2"]  # down to its newest descendant

    # a live turn under the selection is shown as it streams
    n = len(log.events)
    log.start("t3", "u2")
    log.text("t3", "stre")
    log.feed(view, n)
    assert ids(view.messages()) == ["u1", "reply-t1", "u2", "reply-t3"]
    assert message_text(view.messages()[-1]) == "stre"

    assert ids(view.messages(leaf="reply-t2")) == ["u1", "reply-t2"]
    with pytest.raises(KeyError):
        view.select("nope")
    view.select(None)
    assert view.selected is None
    assert ids(view.messages())[-1] == "reply-t3"
