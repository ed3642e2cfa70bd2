"""The AG-UI translation of a turn (server/agui_events.py), without I/O.

The mapping is pinned case by case, then two properties with hypothesis over
any sequence of chunks, cancels and ends: the translator never raises and
always makes a stream AG-UI's verifier rules accept (``well_formed`` below
restates the rules of ``@ag-ui/client``'s ``verifyEvents`` that a turn can
touch), and a stream resumed after ANY event id (the reopening prelude, then
the rest) is accepted too and carries every content delta exactly once.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnline.server.agui_events import Delivered, RunTranslator, event_ids, parse_cursor

T, M = "turn-1", "reply-1"


def turn_events(*chunks: dict[str, Any], reason: str | None = "complete",
                error: dict[str, str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """A turn's log: turn-start at seq 1, one chunk per seq, then turn-end."""
    log: list[dict[str, Any]] = [{"type": "turn-start", "turn_id": T, "message_id": M, "ts": 5}]
    log += [{"type": "chunk", "turn_id": T, "chunk": c, "ts": 5} for c in chunks]
    if reason is not None:
        end: dict[str, Any] = {"type": "turn-end", "turn_id": T, "reason": reason, "ts": 5}
        if error is not None:
            end["error"] = error
        log.append(end)
    return list(enumerate(log, start=1))


def translate(log: list[tuple[int, dict[str, Any]]], run_id: str | None = None) -> list[dict[str, Any]]:
    tr = RunTranslator("thread-1", T, run_id)
    return [ev for seq, event in log for ev in tr.feed(event, seq)]


def brief(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    out = []
    for ev in events:
        key = ev.get("messageId") or ev.get("toolCallId") or ev.get("stepName") or ev.get("name")
        extra = ev.get("delta", ev.get("content", ev.get("outcome", ev.get("code"))))
        out.append(tuple(x for x in (ev["type"], key, extra) if x is not None))
    return out


def text(i: str, *deltas: str) -> list[dict[str, Any]]:
    return ([{"type": "text-start", "id": i}] + [{"type": "text-delta", "id": i, "delta": d} for d in deltas]
            + [{"type": "text-end", "id": i}])


# ---------------------------------------------------------------- the mapping


def test_text_run_success() -> None:
    events = translate(turn_events({"type": "start", "messageId": M}, *text("0", "Hel", "lo")))
    assert brief(events) == [
        ("RUN_STARTED",), ("TEXT_MESSAGE_START", M), ("TEXT_MESSAGE_CONTENT", M, "Hel"),
        ("TEXT_MESSAGE_CONTENT", M, "lo"), ("TEXT_MESSAGE_END", M), ("RUN_FINISHED", {"type": "success"})]
    assert events[0] == {"type": "RUN_STARTED", "threadId": "thread-1", "runId": T, "timestamp": 5}
    assert events[1]["role"] == "assistant"


def test_run_id_is_the_clients_when_given() -> None:
    events = translate(turn_events(), run_id="client-run")
    assert [(e["type"], e["runId"]) for e in events] == [("RUN_STARTED", "client-run"), ("RUN_FINISHED", "client-run")]


def test_reasoning_is_a_span_holding_one_message() -> None:
    chunks = [{"type": "reasoning-start", "id": "r"}, {"type": "reasoning-delta", "id": "r", "delta": "hm"},
              {"type": "reasoning-end", "id": "r"}]
    assert brief(translate(turn_events(*chunks)))[1:-1] == [
        ("REASONING_START", f"{M}.r0"), ("REASONING_MESSAGE_START", f"{M}.r0"),
        ("REASONING_MESSAGE_CONTENT", f"{M}.r0", "hm"), ("REASONING_MESSAGE_END", f"{M}.r0"),
        ("REASONING_END", f"{M}.r0")]


def test_streamed_tool_call_with_result_then_more_text() -> None:
    chunks = [*text("0", "Let me look."),
              {"type": "tool-input-start", "toolCallId": "c1", "toolName": "weather"},
              {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"city":'},
              {"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '"Paris"}'},
              {"type": "tool-input-available", "toolCallId": "c1", "toolName": "weather", "input": {"city": "Paris"}},
              {"type": "tool-output-available", "toolCallId": "c1", "output": {"temp": 21}},
              *text("1", "21 degrees.")]
    events = translate(turn_events(*chunks))
    assert brief(events)[4:-1] == [
        ("TOOL_CALL_START", "c1"), ("TOOL_CALL_ARGS", "c1", '{"city":'), ("TOOL_CALL_ARGS", "c1", '"Paris"}'),
        ("TOOL_CALL_END", "c1"), ("TOOL_CALL_RESULT", f"{M}.tool.c1", '{"temp":21}'),
        ("TEXT_MESSAGE_START", f"{M}.1"), ("TEXT_MESSAGE_CONTENT", f"{M}.1", "21 degrees."),
        ("TEXT_MESSAGE_END", f"{M}.1")]
    start = events[4]
    assert start["toolCallName"] == "weather" and start["parentMessageId"] == M  # the text before it
    assert events[8]["toolCallId"] == "c1" and events[8]["role"] == "tool"


def test_tool_input_given_whole_is_one_args_event_and_errors_are_results() -> None:
    chunks = [{"type": "tool-input-available", "toolCallId": "c1", "toolName": "calc", "input": {"x": 1}},
              {"type": "tool-output-error", "toolCallId": "c1", "errorText": "division by zero"},
              {"type": "tool-input-error", "toolCallId": "c2", "toolName": "calc", "input": "{bad",
               "errorText": "bad input"},
              {"type": "tool-output-available", "toolCallId": "c1", "output": "late", "preliminary": True},
              {"type": "tool-output-available", "toolCallId": "unknown", "output": 1}]
    assert brief(translate(turn_events(*chunks)))[1:-1] == [
        ("TOOL_CALL_START", "c1"), ("TOOL_CALL_ARGS", "c1", '{"x":1}'), ("TOOL_CALL_END", "c1"),
        ("TOOL_CALL_RESULT", f"{M}.tool.c1", "division by zero"),
        ("TOOL_CALL_START", "c2"), ("TOOL_CALL_ARGS", "c2", "{bad"), ("TOOL_CALL_END", "c2"),
        ("TOOL_CALL_RESULT", f"{M}.tool.c2", "bad input")]


def test_steps_and_a_finish_step_closes_open_text() -> None:
    chunks = [{"type": "start-step"}, {"type": "text-start", "id": "0"},
              {"type": "text-delta", "id": "0", "delta": "a"}, {"type": "finish-step"},
              {"type": "text-delta", "id": "0", "delta": "orphan"}, {"type": "start-step"}]
    assert brief(translate(turn_events(*chunks)))[1:] == [
        ("STEP_STARTED", "step-1"), ("TEXT_MESSAGE_START", M), ("TEXT_MESSAGE_CONTENT", M, "a"),
        ("TEXT_MESSAGE_END", M), ("STEP_FINISHED", "step-1"), ("STEP_STARTED", "step-2"),
        ("STEP_FINISHED", "step-2"), ("RUN_FINISHED", {"type": "success"})]


def test_cancelled_turn_closes_what_is_open_and_finishes_cancelled() -> None:
    chunks = [{"type": "text-start", "id": "0"}, {"type": "text-delta", "id": "0", "delta": "half"},
              {"type": "tool-input-start", "toolCallId": "c1", "toolName": "t"},
              {"type": "reasoning-start", "id": "r"}, {"type": "abort"}]
    events = translate(turn_events(*chunks, reason="cancelled"))
    assert brief(events)[-5:] == [
        ("TEXT_MESSAGE_END", M), ("REASONING_MESSAGE_END", f"{M}.r0"), ("REASONING_END", f"{M}.r0"),
        ("TOOL_CALL_END", "c1"), ("RUN_FINISHED", {"type": "cancelled"})]
    assert well_formed(events)


def test_a_revised_turn_ends_as_it_is_saved() -> None:
    tr = RunTranslator("thread-1", T)
    tr.revised_reason = "cancelled"
    out = [ev for seq, event in turn_events(*text("0", "a")) for ev in tr.feed(event, seq)]
    assert out[-1]["outcome"] == {"type": "cancelled"}


def test_error_turn_is_run_error_with_its_code() -> None:
    events = translate(turn_events(*text("0", "x")[:2], {"type": "error", "errorText": "boom"}, reason="error",
                                   error={"code": "agent_error", "message": "boom"}))
    assert events[-2]["type"] == "TEXT_MESSAGE_END"
    assert events[-1] == {"type": "RUN_ERROR", "message": "boom", "code": "agent_error", "timestamp": 5}


def test_a_turn_that_ends_before_its_start_is_seen_still_opens_its_run() -> None:
    tr = RunTranslator("thread-1", T)
    assert tr.feed({"type": "turn-end", "turn_id": T, "reason": "error"}, 9) == [
        {"type": "RUN_STARTED", "threadId": "thread-1", "runId": T},
        {"type": "RUN_ERROR", "message": "the turn failed"}]


def test_a_queued_run_cancelled_before_it_started_finishes_cancelled() -> None:
    tr = RunTranslator("thread-1", T, "run-q")
    assert tr.feed({"type": "queued", "message_id": "u2", "position": 1, "turn_id": T}, 3) == []
    assert tr.feed({"type": "cancel-result", "request_id": "q", "cancelled": ["turn-0"]}, 4) == []
    assert brief(tr.feed({"type": "cancel-result", "request_id": "q", "cancelled": [T]}, 5)) == [
        ("RUN_STARTED",), ("RUN_FINISHED", {"type": "cancelled"})]
    assert tr.ended and tr.feed({"type": "turn-start", "turn_id": T, "message_id": M}, 6) == []


def test_other_turns_private_chunks_and_anything_after_the_end_are_left_out() -> None:
    tr = RunTranslator("thread-1", T)
    log = turn_events({"type": "agent-private", "x": 1}, {"type": "text-delta", "id": "nope", "delta": "x"},
                      {"type": "text-start", "id": "0"}, {"type": "text-delta", "id": "0", "delta": ""})
    out = [ev for seq, event in log for ev in tr.feed(event, seq)]
    assert brief(out) == [("RUN_STARTED",), ("TEXT_MESSAGE_START", M), ("TEXT_MESSAGE_END", M),
                          ("RUN_FINISHED", {"type": "success"})]
    assert tr.feed({"type": "chunk", "turn_id": "turn-2", "chunk": {"type": "text-start", "id": "0"}}, 20) == []
    assert tr.feed({"type": "chunk", "turn_id": T, "chunk": {"type": "text-start", "id": "9"}}, 21) == []
    assert tr.feed({"type": "turn-end", "turn_id": T, "reason": "complete"}, 22) == []


def test_parts_without_an_ag_ui_counterpart_are_custom_events() -> None:
    data = {"type": "data-weather", "id": "w", "data": {"temp": 21}}
    source = {"type": "source-url", "sourceId": "s", "url": "https://example.org"}
    events = translate(turn_events(data, source))
    assert events[1:3] == [{"type": "CUSTOM", "name": "data-weather", "value": data, "timestamp": 5},
                           {"type": "CUSTOM", "name": "source-url", "value": source, "timestamp": 5}]


def test_a_cancel_with_seen_hides_the_later_chunks_but_not_final_ones() -> None:
    tr = RunTranslator("thread-1", T)
    log = turn_events(*text("0", "a", "b", "c")[:4])  # seq 1 start, 2 text-start, 3 a, 4 b, 5 c
    out = [ev for seq, event in log[:-1] for ev in tr.feed(event, seq)]
    assert tr.feed({"type": "cancel", "request_id": "q", "filter": {"own": True}, "seen": 3}, 6) == []
    assert tr.feed({"type": "cancel-result", "request_id": "q", "cancelled": [T]}, 7) == []
    tail = {"type": "chunk", "turn_id": T, "chunk": {"type": "text-delta", "id": "0", "delta": "tail"}}
    assert tr.feed(tail, 8) == []
    final = {**tail, "chunk": {"type": "text-delta", "id": "0", "delta": "!"}, "final": True}
    assert brief(tr.feed(final, 9)) == [("TEXT_MESSAGE_CONTENT", M, "!")]
    # a cancel of some other turn sets nothing
    tr2 = RunTranslator("thread-1", T)
    tr2.feed({"type": "cancel", "request_id": "q", "filter": {"all": True}, "seen": 0}, 1)
    tr2.feed({"type": "cancel-result", "request_id": "q", "cancelled": ["turn-2"]}, 2)
    assert tr2.cut is None
    assert "".join(e.get("delta", "") for e in out) == "abc"


# ---------------------------------------------------------------- ids and resuming


def test_event_ids_and_cursors() -> None:
    assert event_ids(7, 0) == [] and event_ids(7, 1) == ["7"] and event_ids(7, 3) == ["7.0", "7.1", "7"]
    assert parse_cursor("7") == (7, None) and parse_cursor(" 7.1 ") == (7, 1)
    for bad in ("", "x", "7.", ".1", "-1", "7.1.2", "1e3", str(2**63)):
        with pytest.raises(ValueError):
            parse_cursor(bad)


def test_delivered_reopens_what_is_open_in_order() -> None:
    d = Delivered()
    assert d.reopen() == []
    run = {"type": "RUN_STARTED", "threadId": "t", "runId": "r"}
    d.see([run, {"type": "TEXT_MESSAGE_START", "messageId": "m"}, {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m",
                                                                   "delta": "x"},
           {"type": "TOOL_CALL_START", "toolCallId": "m"}, {"type": "TEXT_MESSAGE_END", "messageId": "m"}])
    assert d.reopen() == [run, {"type": "TOOL_CALL_START", "toolCallId": "m"}]  # a tool call may share an id
    d.see([{"type": "TOOL_CALL_END", "toolCallId": "m"}, {"type": "RUN_FINISHED"}])
    assert d.reopen() == []


# ---------------------------------------------------------------- properties


_OPEN = {"TEXT_MESSAGE_START": "text", "REASONING_START": "span", "REASONING_MESSAGE_START": "reasoning",
         "TOOL_CALL_START": "tool", "STEP_STARTED": "step"}
_GO_ON = {"TEXT_MESSAGE_CONTENT": "text", "TEXT_MESSAGE_END": "text", "REASONING_MESSAGE_CONTENT": "reasoning",
          "REASONING_MESSAGE_END": "reasoning", "REASONING_END": "span", "TOOL_CALL_ARGS": "tool",
          "TOOL_CALL_END": "tool", "STEP_FINISHED": "step"}
_CLOSE = {"TEXT_MESSAGE_END", "REASONING_MESSAGE_END", "REASONING_END", "TOOL_CALL_END", "STEP_FINISHED"}


def well_formed(events: list[dict[str, Any]]) -> bool:
    """``verifyEvents``' rules, for one run: RUN_STARTED first; a continuation
    or end names an open START of its kind; nothing reopened while open;
    RUN_FINISHED with nothing open; nothing after the run's end."""
    open_: set[tuple[str, str]] = set()
    for i, ev in enumerate(events):
        kind = ev["type"]
        key = str(ev.get("messageId") or ev.get("toolCallId") or ev.get("stepName"))
        if (i == 0) != (kind == "RUN_STARTED"):
            return False
        if i > 0 and events[i - 1]["type"] in ("RUN_FINISHED", "RUN_ERROR"):
            return False
        if kind in _OPEN:
            if (_OPEN[kind], key) in open_:
                return False
            open_.add((_OPEN[kind], key))
        elif kind in _GO_ON:
            if (_GO_ON[kind], key) not in open_:
                return False
            if kind in _CLOSE:
                open_.discard((_GO_ON[kind], key))
        elif kind == "RUN_FINISHED" and open_:
            return False
        if kind in ("TEXT_MESSAGE_CONTENT", "REASONING_MESSAGE_CONTENT", "TOOL_CALL_ARGS") and not ev["delta"]:
            return False
    return True


_ids = st.sampled_from(["0", "1"])
_calls = st.sampled_from(["c1", "c2"])
_chunk = st.one_of(
    st.builds(lambda k, i: {"type": k, "id": i}, st.sampled_from(["text-start", "text-end", "reasoning-start",
                                                                  "reasoning-end"]), _ids),
    st.builds(lambda k, i, d: {"type": k, "id": i, "delta": d}, st.sampled_from(["text-delta", "reasoning-delta"]),
              _ids, st.text(max_size=3)),
    st.builds(lambda k: {"type": k}, st.sampled_from(["start-step", "finish-step", "start", "finish", "abort"])),
    st.builds(lambda c: {"type": "tool-input-start", "toolCallId": c, "toolName": "t"}, _calls),
    st.builds(lambda c, d: {"type": "tool-input-delta", "toolCallId": c, "inputTextDelta": d}, _calls,
              st.text(max_size=3)),
    st.builds(lambda c: {"type": "tool-input-available", "toolCallId": c, "toolName": "t", "input": {}}, _calls),
    st.builds(lambda c: {"type": "tool-output-available", "toolCallId": c, "output": 1}, _calls),
    st.builds(lambda c: {"type": "tool-output-error", "toolCallId": c, "errorText": "e"}, _calls),
    st.fixed_dictionaries({"type": st.text(max_size=12)}),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_chunk, max_size=14), st.sampled_from(["complete", "cancelled", "error", None]))
def test_any_turn_makes_a_stream_the_verifier_accepts(chunks: list[dict[str, Any]], reason: str | None) -> None:
    events = translate(turn_events(*chunks, reason=reason))
    assert well_formed(events)
    if reason is not None:
        assert events[-1]["type"] == ("RUN_ERROR" if reason == "error" else "RUN_FINISHED")


@settings(max_examples=150, deadline=None)
@given(st.lists(_chunk, max_size=12), st.sampled_from(["complete", "cancelled", None]), st.data())
def test_resuming_after_any_id_is_accepted_and_repeats_no_content(chunks: list[dict[str, Any]], reason: str | None,
                                                                  data: st.DataObject) -> None:
    log = turn_events(*chunks, reason=reason)
    tr = RunTranslator("thread-1", T)
    stream: list[tuple[str, dict[str, Any]]] = []
    for s, event in log:
        out = tr.feed(event, s)
        stream += zip(event_ids(s, len(out)), out)
    if not stream:
        return
    k = data.draw(st.integers(0, len(stream) - 1))
    seq, index = parse_cursor(stream[k][0])
    # what the server does on a resume: replay up to the cursor, reopen, go on
    tr, delivered, rest = RunTranslator("thread-1", T), Delivered(), []
    for s, event in log:
        out = tr.feed(event, s)
        if s < seq or (s == seq and index is None):
            delivered.see(out)
        elif s == seq:
            delivered.see(out[:index + 1])
            rest += out[index + 1:]
        else:
            rest += out
    assert rest == [ev for _, ev in stream[k + 1:]]  # nothing lost, nothing repeated
    resumed = delivered.reopen() + rest
    if resumed:
        assert well_formed(resumed)
        assert not any("delta" in ev for ev in delivered.reopen())
