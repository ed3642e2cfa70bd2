"""The core Session (core/session.py): a pure fold over a session's log.

Pinned here: the log's own invariants (gapless seq, a turn ends once, nothing
for a turn after its end), cancel matching for the four filters (a turn
cancels once, pending cancels are bounded and expire), the stop-vs-end race
(revisable turns), what a turn persists with and without a ``seen`` cursor
(invariant 5) including cancels that cut a text, a reasoning part, a tool
input and two interleaved text parts, and the conversation tree.

No asyncio, no I/O: events are built by hand and applied in seq order.
"""

from __future__ import annotations

from typing import Any

import pytest

from turnline.core.fold import fold
from turnline.core.session import (
    PENDING_CANCEL_LIMIT, PENDING_CANCEL_TTL_MS, InvariantError, Session, filter_matches,
)
from turnline.protocol import (
    CancelEvent, CancelFilter, CancelResult, ChunkEvent, Message, MessageEvent, Presence, Queued, Rejected,
    TurnEnd, TurnRevised, TurnStart,
)

T0 = 1_700_000_000_000


class Log:
    """A session log written by hand, applied to a Session as it grows."""

    def __init__(self) -> None:
        self.state = Session("s")
        self.events: list[Any] = []
        self.ts = T0

    def add(self, ev: Any, ts: int | None = None) -> int:
        ev.seq = self.state.last_seq + 1
        ev.ts = self.ts if ts is None else ts
        self.state.apply(ev)
        self.events.append(ev)
        return ev.seq

    def message(self, mid: str, text: str = "hi", parent: str | None = "<default>", client: str = "alice") -> int:
        parent_id = self.state.default_parent() if parent == "<default>" else parent
        return self.add(MessageEvent(message=Message(id=mid, role="user", parts=[{"type": "text", "text": text}],
                                                     parent_id=parent_id), client_id=client))

    def start(self, turn_id: str, input_id: str, owner: str = "alice") -> int:
        return self.add(TurnStart(turn_id=turn_id, owner=owner, input_id=input_id, message_id=f"reply-{turn_id}",
                                  client_id="agent"))

    def send(self, turn_id: str, owner: str = "alice", parent: str | None = "<default>") -> int:
        self.message(f"in-{turn_id}", parent=parent, client=owner)
        return self.start(turn_id, f"in-{turn_id}", owner)

    def chunk(self, turn_id: str, chunk: dict[str, Any], final: bool = False) -> int:
        return self.add(ChunkEvent(turn_id=turn_id, chunk=chunk, final=final, client_id="agent"))

    def chunks(self, turn_id: str, chunks: list[dict[str, Any]]) -> list[int]:
        return [self.chunk(turn_id, c) for c in chunks]

    def end(self, turn_id: str, reason: str = "complete") -> Message:
        msg = self.state.persisted_message(turn_id, reason)
        self.add(TurnEnd(turn_id=turn_id, reason=reason, message=msg, client_id="agent"))  # type: ignore[arg-type]
        return msg

    def cancel(self, requester: str, flt: CancelFilter, seen: int | None = None, request_id: str = "c1",
               rolled_back: list[str] | None = None) -> CancelResult:
        """What the runtime appends for a cancel (no authorisation hook)."""
        m = self.state.match_cancel(flt, requester, seen)
        self.add(CancelEvent(request_id=request_id, filter=flt.normalized(), seen=seen, client_id=requester))
        result = CancelResult(request_id=request_id, cancelled=m.matched + m.queued + m.revisable,
                              pending=m.pending, rolled_back=rolled_back or [], client_id="agent")
        self.add(result)
        for t in m.revisable:
            self.add(TurnRevised(turn_id=t, reason="cancelled",
                                 message=self.state.persisted_message(t, "cancelled", seen), client_id="agent"))
        return result


def text(i: str, *deltas: str, end: bool = True) -> list[dict[str, Any]]:
    out = [{"type": "text-start", "id": i}] + [{"type": "text-delta", "id": i, "delta": d} for d in deltas]
    return out + ([{"type": "text-end", "id": i}] if end else [])


# ----------------------------------------------------------------- the log's invariants


def test_seq_must_be_gapless_from_one() -> None:
    s = Session()
    with pytest.raises(InvariantError):
        s.apply(MessageEvent(seq=2, message=Message(id="m", role="user", parts=[], parent_id=None)))
    with pytest.raises(InvariantError):
        s.apply(MessageEvent(seq=0, message=Message(id="m", role="user", parts=[], parent_id=None)))
    assert s.last_seq == 0 and s.messages == {}
    s.apply(MessageEvent(seq=1, message=Message(id="m", role="user", parts=[], parent_id=None)))
    # a duplicate (the same seq again) and a gap are both refused, and change nothing
    with pytest.raises(InvariantError):
        s.apply(Presence(seq=1, state="idle"))
    with pytest.raises(InvariantError):
        s.apply(Presence(seq=3, state="idle"))
    assert s.last_seq == 1 and s.presence is None
    s.apply(Presence(seq=2, state="thinking"))
    assert s.last_seq == 2 and s.presence is not None


def test_a_turn_ends_once_and_nothing_follows_its_end() -> None:
    log = Log()
    log.send("t1")
    log.chunks("t1", text("a", "x"))
    log.end("t1")
    before = log.state.last_seq
    with pytest.raises(InvariantError):
        log.add(TurnEnd(turn_id="t1", reason="cancelled", message=Message(id="reply-t1", role="assistant",
                                                                           parts=[], parent_id="in-t1")))
    with pytest.raises(InvariantError):
        log.chunk("t1", {"type": "text-delta", "id": "a", "delta": "late"})
    with pytest.raises(InvariantError):
        log.start("t1", "in-t1")  # a turn id is used once
    with pytest.raises(InvariantError):
        log.chunk("never-started", {"type": "start"})
    with pytest.raises(InvariantError):
        log.message("in-t1")  # a message id is used once
    with pytest.raises(InvariantError):
        log.add(TurnEnd(turn_id="nope", reason="complete",
                        message=Message(id="x", role="assistant", parts=[], parent_id=None)))
    assert log.state.last_seq == before
    assert log.state.turns["t1"].reason == "complete"
    assert log.state.turns["t1"].chunks[-1].chunk == {"type": "text-end", "id": "a"}


def test_turn_revised_needs_an_ended_turn() -> None:
    log = Log()
    log.send("t1")
    msg = Message(id="reply-t1", role="assistant", parts=[], parent_id="in-t1")
    with pytest.raises(InvariantError):
        log.add(TurnRevised(turn_id="t1", reason="cancelled", message=msg))
    with pytest.raises(InvariantError):
        log.add(TurnRevised(turn_id="unknown", reason="cancelled", message=msg))


def test_active_turns_and_presence_state() -> None:
    log = Log()
    assert log.state.presence_state() == "idle"
    log.send("t1", owner="alice")
    log.send("t2", owner="bob")
    assert log.state.active_turns() == {"alice": {"t1"}, "bob": {"t2"}}
    assert log.state.presence_state() == "thinking"
    log.chunk("t2", {"type": "start"})
    assert log.state.presence_state() == "streaming"
    log.end("t1")
    log.end("t2")
    assert log.state.active_turns() == {}
    assert log.state.presence_state() == "idle"


# ----------------------------------------------------------------- cancel matching


@pytest.fixture
def three_turns() -> Log:
    log = Log()
    log.send("a1", owner="alice")
    log.send("b1", owner="bob")
    log.send("a2", owner="alice")
    return log


@pytest.mark.parametrize("flt, requester, expected", [
    (CancelFilter(), "alice", ["a1", "a2"]),  # empty filter = own
    (CancelFilter(own=True), "alice", ["a1", "a2"]),
    (CancelFilter(own=True), "bob", ["b1"]),
    (CancelFilter(own=True), "carol", []),
    (CancelFilter(turn_id="b1"), "alice", ["b1"]),  # matching is not authorisation
    (CancelFilter(client_id="alice"), "bob", ["a1", "a2"]),
    (CancelFilter(client_id="nobody"), "bob", []),
    (CancelFilter(all=True), "carol", ["a1", "b1", "a2"]),
])
def test_match_cancel_filters(three_turns: Log, flt: CancelFilter, requester: str, expected: list[str]) -> None:
    m = three_turns.state.match_cancel(flt, requester)
    assert m.matched == expected
    assert m.owners == {t: t[0].replace("a", "alice").replace("b", "bob") for t in expected}
    assert m.pending == [] and m.revisable == [] and m.queued == []


def test_a_filter_names_exactly_one_scope() -> None:
    with pytest.raises(ValueError):
        CancelFilter(own=True, all=True).normalized()
    with pytest.raises(ValueError):
        CancelFilter(turn_id="t", client_id="c").normalized()
    assert CancelFilter().normalized() == CancelFilter(own=True)
    assert filter_matches(CancelFilter(own=True), "alice", "t", "alice")
    assert not filter_matches(CancelFilter(own=True), "alice", "t", "bob")


def test_a_turn_cancels_once(three_turns: Log) -> None:
    log = three_turns
    result = log.cancel("alice", CancelFilter(turn_id="a1"), request_id="c1")
    assert result.cancelled == ["a1"]
    assert log.state.turns["a1"].cancel is not None
    assert log.state.turns["a1"].cancel.request_id == "c1"
    # every later matching cancel matches nothing for a1, and a1 is not "pending"
    for flt in (CancelFilter(turn_id="a1"), CancelFilter(own=True), CancelFilter(all=True),
                CancelFilter(client_id="alice")):
        m = log.state.match_cancel(flt, "alice")
        assert "a1" not in m.matched and m.pending == []
    again = log.cancel("alice", CancelFilter(turn_id="a1"), request_id="c2")
    assert again.cancelled == [] and again.pending == []
    assert log.state.turns["a1"].cancel.request_id == "c1"  # the first cancel is kept
    # a1 is still running (the abort reaches the agent); its end is "cancelled"
    assert log.state.is_active("a1")


def test_cancel_naming_an_ended_turn_matches_nothing() -> None:
    log = Log()
    log.send("t1")
    log.end("t1")
    m = log.state.match_cancel(CancelFilter(turn_id="t1"), "alice")
    assert m.matched == [] and m.pending == [] and m.revisable == []


def test_pending_cancel_for_an_unknown_turn_is_kept_and_applied_at_start() -> None:
    log = Log()
    result = log.cancel("alice", CancelFilter(turn_id="future"), seen=0, request_id="c-early")
    assert result.cancelled == [] and result.pending == ["future"]
    pending = log.state.pending_cancels["future"]
    assert (pending.request_id, pending.requester, pending.seen, pending.ts) == ("c-early", "alice", 0, T0)
    log.send("future")
    assert log.state.pending_cancels["future"].request_id == "c-early"  # the runtime applies it at start
    # the runtime's application: a cancel-result naming the original request
    log.add(CancelResult(request_id="c-early", cancelled=["future"], client_id="agent"))
    turn = log.state.turns["future"]
    assert turn.cancel is not None and turn.cancel.seen == 0 and turn.cancel.request_id == "c-early"
    assert "future" not in log.state.pending_cancels
    log.chunks("future", text("t", "never shown"))
    msg = log.end("future", "cancelled")
    assert msg.parts == []  # the requester had seen nothing of it
    assert msg.metadata == {"interrupted": {"reason": "cancelled", "seen": 0}}


def test_pending_cancels_are_bounded() -> None:
    log = Log()
    for i in range(PENDING_CANCEL_LIMIT + 10):
        log.cancel("alice", CancelFilter(turn_id=f"t{i}"), request_id=f"c{i}")
    assert len(log.state.pending_cancels) == PENDING_CANCEL_LIMIT
    assert "t0" not in log.state.pending_cancels  # the oldest go first
    assert f"t{PENDING_CANCEL_LIMIT + 9}" in log.state.pending_cancels


def test_pending_cancels_expire_after_their_ttl() -> None:
    log = Log()
    log.cancel("alice", CancelFilter(turn_id="old"), request_id="c1")
    log.ts = T0 + PENDING_CANCEL_TTL_MS // 2
    log.cancel("alice", CancelFilter(turn_id="young"), request_id="c2")
    log.ts = T0 + PENDING_CANCEL_TTL_MS  # exactly the TTL: still kept
    log.add(Presence(state="idle"))
    assert set(log.state.pending_cancels) == {"old", "young"}
    log.ts = T0 + PENDING_CANCEL_TTL_MS + 1
    log.add(Presence(state="idle"))
    assert set(log.state.pending_cancels) == {"young"}
    log.add(Presence(state="idle"), ts=0)  # an event without a time expires nothing
    assert set(log.state.pending_cancels) == {"young"}
    # the expired cancel no longer applies when its turn starts
    log.send("old")
    assert "old" not in log.state.pending_cancels


def test_queued_inputs_are_matched_by_their_reserved_turn_id() -> None:
    log = Log()
    log.send("run")
    log.message("q-in", parent="reply-run")
    log.add(Queued(message_id="q-in", position=1, turn_id="q", client_id="alice"))
    log.message("q2-in", parent="reply-q", client="bob")
    log.add(Queued(message_id="q2-in", position=2, turn_id="q2", client_id="bob"))
    assert [q.turn_id for q in log.state.queue] == ["q", "q2"]
    m = log.state.match_cancel(CancelFilter(turn_id="q"), "alice")
    assert m.queued == ["q"] and m.pending == [] and m.matched == []
    m = log.state.match_cancel(CancelFilter(own=True), "alice")
    assert m.matched == ["run"] and m.queued == ["q"] and m.owners == {"run": "alice", "q": "alice"}
    log.cancel("alice", CancelFilter(turn_id="q"))
    assert [q.turn_id for q in log.state.queue] == ["q2"]
    log.add(Rejected(message_id="q2-in", code="busy"))
    assert log.state.queue == []


def test_a_queued_turn_leaves_the_queue_when_it_starts() -> None:
    log = Log()
    log.send("run")
    log.message("q-in", parent="reply-run")
    log.add(Queued(message_id="q-in", position=1, turn_id="q", client_id="alice"))
    log.end("run")
    log.start("q", "q-in")
    assert log.state.queue == [] and log.state.is_active("q")


# ----------------------------------------------------------------- what you saw is what is saved


def test_persisted_message_with_seen_is_the_fold_up_to_seen_plus_final_chunks() -> None:
    log = Log()
    log.send("t")
    log.chunk("t", {"type": "start", "messageMetadata": {"model": "m"}})
    log.chunk("t", {"type": "text-start", "id": "a"})
    log.chunk("t", {"type": "text-delta", "id": "a", "delta": "Hello"})
    seen = log.chunk("t", {"type": "text-delta", "id": "a", "delta": " wor"})
    result = log.cancel("alice", CancelFilter(own=True), seen=seen)
    assert result.cancelled == ["t"]
    # the tail: produced after the cancel, before the abort reached the agent
    log.chunk("t", {"type": "text-delta", "id": "a", "delta": "ld"})
    log.chunk("t", {"type": "text-end", "id": "a"})
    log.chunk("t", {"type": "data-note", "data": "from on_abort"}, final=True)
    log.chunk("t", {"type": "abort"}, final=True)
    msg = log.end("t", "cancelled")
    assert msg == Message(
        id="reply-t", role="assistant", parent_id="in-t",
        parts=[{"type": "text", "text": "Hello wor", "state": "done"},
               {"type": "data-note", "data": "from on_abort"}],
        metadata={"model": "m", "interrupted": {"reason": "cancelled", "seen": seen}})
    # the same, asked explicitly
    assert log.state.persisted_message("t", "cancelled", seen) == msg
    # the live fold is untouched by the refold
    assert log.state.turns["t"].fold.parts[0]["text"] == "Hello world"


def test_without_seen_everything_up_to_turn_end_is_kept() -> None:
    log = Log()
    log.send("t")
    log.chunks("t", text("a", "Hello", " wor", end=False))
    log.cancel("alice", CancelFilter(own=True))  # no seen
    log.chunk("t", {"type": "text-delta", "id": "a", "delta": "ld"})
    msg = log.end("t", "cancelled")
    assert msg.parts == [{"type": "text", "text": "Hello world", "state": "done"}]
    assert msg.metadata == {"interrupted": {"reason": "cancelled", "seen": None}}


def test_a_complete_turn_keeps_everything_and_is_not_marked_interrupted() -> None:
    log = Log()
    log.send("t")
    log.chunks("t", [{"type": "start"}] + text("a", "all", " of it") + [{"type": "finish"}])
    msg = log.end("t")
    assert msg.parts == [{"type": "text", "text": "all of it", "state": "done"}]
    assert msg.metadata is None
    err = Log()
    err.send("t")
    err.chunks("t", text("a", "half", end=False))
    assert err.end("t", "error").parts == [{"type": "text", "text": "half", "state": "done"}]


def cut(chunks: list[dict[str, Any]], n: int) -> tuple[Message, Message]:
    """Stream ``chunks`` into a turn, cancel with seen = the n-th chunk, stream the
    rest as the tail. Returns (persisted message, fold of the first n closed)."""
    log = Log()
    log.send("t")
    seqs = log.chunks("t", chunks[:n])
    seen = seqs[-1] if seqs else log.state.last_seq
    log.cancel("alice", CancelFilter(own=True), seen=seen)
    log.chunks("t", chunks[n:])
    msg = log.end("t", "cancelled")
    expected = fold(chunks[:n])
    expected.close_open_parts()
    assert msg.metadata == {**expected.metadata, "interrupted": {"reason": "cancelled", "seen": seen}}
    return msg, Message(id="reply-t", role="assistant", parts=expected.snapshot()[0], parent_id="in-t",
                        metadata=msg.metadata)


def test_cancel_in_the_middle_of_a_text_part() -> None:
    chunks = [{"type": "start"}, {"type": "start-step"}] + text("t", "The ", "answer ", "is ", "42.")
    msg, expected = cut(chunks, 5)
    assert msg == expected
    assert msg.parts == [{"type": "step-start"}, {"type": "text", "text": "The answer ", "state": "done"}]


def test_cancel_in_the_middle_of_a_reasoning_part() -> None:
    chunks = [{"type": "reasoning-start", "id": "r"},
              {"type": "reasoning-delta", "id": "r", "delta": "Let me "},
              {"type": "reasoning-delta", "id": "r", "delta": "think"},
              {"type": "reasoning-end", "id": "r"}] + text("t", "Answer")
    msg, expected = cut(chunks, 2)
    assert msg == expected
    assert msg.parts == [{"type": "reasoning", "text": "Let me ", "state": "done"}]


def test_cancel_in_the_middle_of_a_tool_input() -> None:
    chunks = [{"type": "tool-input-start", "toolCallId": "c1", "toolName": "weather"},
              {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"city": "Par'},
              {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": 'is", "days": 3}'},
              {"type": "tool-input-available", "toolCallId": "c1", "toolName": "weather",
               "input": {"city": "Paris", "days": 3}},
              {"type": "tool-output-available", "toolCallId": "c1", "output": "rain"}]
    msg, expected = cut(chunks, 2)
    assert msg == expected
    assert msg.parts == [{"type": "tool-weather", "toolCallId": "c1", "state": "output-error",
                          "input": {"city": "Par"}, "errorText": "cancelled"}]
    # cut after the input was complete but before the result: still a closed error part
    msg, expected = cut(chunks, 4)
    assert msg == expected
    assert msg.parts[0]["state"] == "output-error" and msg.parts[0]["input"] == {"city": "Paris", "days": 3}


def test_cancel_with_two_text_parts_streaming_at_once() -> None:
    chunks = [{"type": "text-start", "id": "a"}, {"type": "text-start", "id": "b"},
              {"type": "text-delta", "id": "a", "delta": "A1"}, {"type": "text-delta", "id": "b", "delta": "B1"},
              {"type": "text-delta", "id": "a", "delta": "A2"}, {"type": "text-delta", "id": "b", "delta": "B2"},
              {"type": "text-end", "id": "a"}, {"type": "text-end", "id": "b"}]
    msg, expected = cut(chunks, 5)
    assert msg == expected
    assert msg.parts == [{"type": "text", "text": "A1A2", "state": "done"},
                         {"type": "text", "text": "B1", "state": "done"}]


def test_every_cut_point_persists_the_closed_fold_of_the_prefix() -> None:
    chunks = ([{"type": "start", "messageMetadata": {"m": 1}}, {"type": "start-step"},
               {"type": "reasoning-start", "id": "r"}, {"type": "reasoning-delta", "id": "r", "delta": "hm"},
               {"type": "tool-input-start", "toolCallId": "c", "toolName": "x"},
               {"type": "tool-input-delta", "toolCallId": "c", "inputTextDelta": '{"a": [1, '},
               {"type": "reasoning-end", "id": "r"},
               {"type": "tool-input-delta", "toolCallId": "c", "inputTextDelta": "2]}"},
               {"type": "tool-input-available", "toolCallId": "c", "toolName": "x", "input": {"a": [1, 2]}},
               {"type": "tool-output-available", "toolCallId": "c", "output": 3},
               {"type": "finish-step"}, {"type": "start-step"}]
              + text("t", "x", "y") + [{"type": "data-d", "id": "d", "data": 1},
                                      {"type": "data-d", "id": "d", "data": 2},
                                      {"type": "finish", "messageMetadata": {"done": True}}])
    for n in range(len(chunks) + 1):
        msg, expected = cut(chunks, n)
        assert msg == expected, n
        assert all(p.get("state") not in ("streaming", "input-streaming", "input-available") for p in msg.parts)


# ----------------------------------------------------------------- the stop that raced the end


def raced(seen_offset: int = 2) -> tuple[Log, int]:
    """A turn that ended complete; the requester had seen only part of it."""
    log = Log()
    log.send("t")
    seqs = log.chunks("t", [{"type": "start"}] + text("a", "one ", "two ", "three"))
    log.chunk("t", {"type": "finish"})
    log.end("t")
    return log, seqs[seen_offset]


def test_a_stop_that_raced_the_end_revises_the_turn() -> None:
    log, seen = raced()
    m = log.state.match_cancel(CancelFilter(own=True), "alice", seen)
    assert m.matched == [] and m.revisable == ["t"] and m.owners == {"t": "alice"}
    result = log.cancel("alice", CancelFilter(own=True), seen=seen)
    assert result.cancelled == ["t"]
    revised = log.events[-1]
    assert isinstance(revised, TurnRevised) and revised.reason == "cancelled"
    assert revised.message.parts == [{"type": "text", "text": "one ", "state": "done"}]
    assert revised.message.metadata == {"interrupted": {"reason": "cancelled", "seen": seen}}
    assert log.state.messages["reply-t"] == revised.message
    assert log.state.turns["t"].revised and log.state.turns["t"].reason == "cancelled"
    # revised once
    assert log.state.match_cancel(CancelFilter(own=True), "alice", seen).revisable == []


def test_both_orders_of_stop_and_end_persist_the_same_message() -> None:
    chunks = [{"type": "start"}] + text("a", "one ", "two ", "three")
    for n in range(1, len(chunks) + 1):
        # stop first: cancel with seen while the turn streams, then the tail and the end
        first = Log()
        first.send("t")
        seqs = first.chunks("t", chunks[:n])
        first.cancel("alice", CancelFilter(own=True), seen=seqs[-1])
        first.chunks("t", chunks[n:])
        stop_first = first.end("t", "cancelled")
        # end first: the turn completes, then the same cancel arrives
        second = Log()
        second.send("t")
        second.chunks("t", chunks + [{"type": "finish"}])
        second.end("t")
        second.cancel("alice", CancelFilter(own=True), seen=seqs[-1])
        assert second.state.messages["reply-t"] == stop_first, n


def test_a_stop_before_the_turn_started_on_screen_revises_to_nothing_in_both_orders() -> None:
    # The requester had seen its own message but not the turn-start: stop
    # first persists nothing, so the turn that won the race must be revised
    # to nothing as well.
    first = Log()
    seen = first.message("in-t")
    first.start("t", "in-t")
    first.chunks("t", text("a", "fast"))
    first.cancel("alice", CancelFilter(own=True), seen=seen)
    stop_first = first.end("t", "cancelled")
    assert stop_first.parts == []
    second = Log()
    assert second.message("in-t") == seen
    second.start("t", "in-t")
    second.chunks("t", text("a", "fast"))
    second.end("t")
    result = second.cancel("alice", CancelFilter(own=True), seen=seen)
    assert result.cancelled == ["t"]
    assert second.state.messages["reply-t"] == stop_first


def test_revision_needs_a_cursor_inside_the_turn_and_chunks_past_it() -> None:
    log, seen = raced()
    end_seq = log.state.turns["t"].end_seq
    assert log.state.match_cancel(CancelFilter(own=True), "alice", None).revisable == []  # no seen
    assert log.state.match_cancel(CancelFilter(own=True), "alice", end_seq).revisable == []  # saw the end
    last_chunk = log.state.turns["t"].chunks[-1].seq
    assert log.state.match_cancel(CancelFilter(own=True), "alice", last_chunk).revisable == []  # saw it all
    input_seq = log.state.turns["t"].input_seq
    assert log.state.match_cancel(CancelFilter(own=True), "alice", input_seq - 1).revisable == []  # saw nothing
    assert log.state.match_cancel(CancelFilter(own=True), "alice", 0).revisable == []  # a fresh client
    assert log.state.match_cancel(CancelFilter(own=True), "bob", seen).revisable == []  # not bob's
    assert log.state.match_cancel(CancelFilter(all=True), "bob", seen).revisable == ["t"]
    assert log.state.match_cancel(CancelFilter(turn_id="t"), "bob", seen).revisable == ["t"]


def test_only_complete_turns_are_revised() -> None:
    for reason in ("cancelled", "error"):
        log = Log()
        log.send("t")
        seqs = log.chunks("t", text("a", "x", "y"))
        log.end("t", reason)
        assert log.state.match_cancel(CancelFilter(own=True), "alice", seqs[0]).revisable == []


def test_final_chunks_past_seen_do_not_make_a_turn_revisable() -> None:
    log = Log()
    log.send("t")
    seen = log.chunk("t", {"type": "start"})
    log.chunk("t", {"type": "data-x", "data": 1}, final=True)
    log.end("t")
    assert log.state.match_cancel(CancelFilter(own=True), "alice", seen).revisable == []


# ----------------------------------------------------------------- the conversation tree


def test_tree_default_parent_branch_and_siblings() -> None:
    log = Log()
    log.send("t1")
    assert log.state.messages["in-t1"].parent_id is None
    assert log.state.default_parent() is None  # nothing ended yet
    log.send("t2")  # sent while t1 streams: a sibling of t1's input
    assert log.state.messages["in-t2"].parent_id is None
    log.end("t1")
    assert log.state.default_parent() == "reply-t1"
    log.end("t2")
    assert log.state.default_parent() == "reply-t2"
    assert log.state.siblings("in-t1") == ["in-t1", "in-t2"]
    log.send("t3")
    assert log.state.messages["in-t3"].parent_id == "reply-t2"
    log.end("t3")
    assert [m.id for m in log.state.branch()] == ["in-t2", "reply-t2", "in-t3", "reply-t3"]
    assert [m.id for m in log.state.branch("reply-t1")] == ["in-t1", "reply-t1"]
    assert log.state.branch("unknown") == []
    assert log.state.siblings("unknown") == []
    assert log.state.turn_of_message["reply-t3"] == "t3"
    # a regenerated answer is a sibling of the first one
    log.start("t3b", "in-t3")
    log.end("t3b")
    assert log.state.siblings("reply-t3") == ["reply-t3", "reply-t3b"]
    assert log.state.default_parent() == "reply-t3b"


def test_rollback_hides_the_cancelled_exchange() -> None:
    log = Log()
    log.send("t1")
    log.end("t1")
    log.send("t2")  # parent reply-t1
    log.chunks("t2", text("a", "going the wrong way", end=False))
    # rollback send: cancel own turns and hide their input and reply
    result = log.cancel("alice", CancelFilter(own=True), rolled_back=["in-t2", "reply-t2"])
    assert result.rolled_back == ["in-t2", "reply-t2"] and result.cancelled == ["t2"]
    assert log.state.hidden == {"in-t2", "reply-t2"}
    log.send("t3", parent="reply-t1")
    log.end("t2", "cancelled")  # the old turn ends after the new one started
    assert log.state.default_parent() == "reply-t1"  # a hidden reply never becomes the head
    log.end("t3")
    assert log.state.default_parent() == "reply-t3"
    assert [m.id for m in log.state.branch()] == ["in-t1", "reply-t1", "in-t3", "reply-t3"]
    assert log.state.siblings("in-t3") == ["in-t2", "in-t3"]  # hidden, not erased


def test_rollback_of_the_head_moves_the_head_up() -> None:
    log = Log()
    log.send("t1")
    log.end("t1")
    log.send("t2")
    log.end("t2")
    log.cancel("alice", CancelFilter(own=True), rolled_back=["in-t2", "reply-t2"])
    assert log.state.head == "reply-t1"


def test_old_turns_drop_their_chunks_but_keep_their_record() -> None:
    s = Session(keep_ended_turns=2)
    log = Log()
    log.state = s
    for i in range(4):
        log.send(f"t{i}")
        log.chunks(f"t{i}", text("a", str(i)))
        log.end(f"t{i}")
    assert [len(s.turns[f"t{i}"].chunks) for i in range(4)] == [0, 0, 3, 3]
    assert s.turns["t0"].reason == "complete" and s.messages["reply-t0"].parts[0]["text"] == "0"


def test_events_are_out_of_the_cycle_collectors_reach() -> None:
    # A live turn keeps every chunk event it streamed; tracked, a full
    # collection in a busy worker walked them all (a pause of tens of ms).
    import gc

    from turnline.protocol import decode_event, encode

    made = ChunkEvent(turn_id="t1", chunk={"type": "text-delta", "id": "text-0", "delta": "hi", "n": [1]})
    read = decode_event(encode(made))
    end = TurnEnd(turn_id="t1", reason="complete",
                  message=Message(id="m", role="assistant", parts=[{"type": "text"}], parent_id=None))
    assert not any(gc.is_tracked(ev) for ev in (made, read, end, decode_event(encode(end))))
