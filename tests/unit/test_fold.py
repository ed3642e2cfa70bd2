"""Folding AI SDK UI message stream chunks into ``UIMessage`` parts (core/fold.py).

The fold is what makes "what you saw is what is saved" checkable: the server,
the Python client and the browser all fold the same chunks the same way, and a
persisted message is a fold of a prefix of the turn's chunks. These tests pin
the folding rules one by one, then two properties with hypothesis: the fold
never raises on any chunk (a bad chunk from agent code must not corrupt the
session state), and ``parse_partial_json`` on every prefix of a JSON document
returns a value consistent with the document.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnline.core.fold import CANCELLED_TOOL_TEXT, MessageFold, fold, parse_partial_json


def parts_of(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return fold(chunks).snapshot()[0]


# ----------------------------------------------------------------- text and reasoning


def test_text_start_delta_end() -> None:
    f = MessageFold("m1")
    f.add({"type": "text-start", "id": "t"})
    assert f.parts == [{"type": "text", "text": "", "state": "streaming"}]
    f.add({"type": "text-delta", "id": "t", "delta": "Hel"})
    f.add({"type": "text-delta", "id": "t", "delta": "lo"})
    assert f.parts == [{"type": "text", "text": "Hello", "state": "streaming"}]
    f.add({"type": "text-end", "id": "t"})
    assert f.parts == [{"type": "text", "text": "Hello", "state": "done"}]
    assert f.ignored == 0
    assert f.message_id == "m1"


def test_reasoning_start_delta_end_and_provider_metadata() -> None:
    parts = parts_of([
        {"type": "reasoning-start", "id": "r", "providerMetadata": {"x": {"sig": "abc"}}},
        {"type": "reasoning-delta", "id": "r", "delta": "think"},
        {"type": "reasoning-delta", "id": "r", "delta": "ing"},
        {"type": "reasoning-end", "id": "r"},
    ])
    assert parts == [{"type": "reasoning", "text": "thinking", "state": "done",
                      "providerMetadata": {"x": {"sig": "abc"}}}]


@pytest.mark.parametrize("kind", ["text", "reasoning"])
def test_provider_metadata_of_a_later_delta_or_end_replaces_the_start_s(kind: str) -> None:
    parts = parts_of([
        {"type": f"{kind}-start", "id": "r", "providerMetadata": {"a": {"v": 1}}},
        {"type": f"{kind}-delta", "id": "r", "delta": "x", "providerMetadata": {"a": {"v": 2}}},
        {"type": f"{kind}-end", "id": "r", "providerMetadata": {"anthropic": {"signature": "sig"}}},
    ])
    assert parts[0]["providerMetadata"] == {"anthropic": {"signature": "sig"}}


@pytest.mark.parametrize("kind", ["text", "reasoning"])
def test_a_delta_without_its_start_is_ignored_never_invented(kind: str) -> None:
    f = fold([
        {"type": f"{kind}-delta", "id": "nope", "delta": "ghost"},
        {"type": f"{kind}-start", "id": "a"},
        {"type": f"{kind}-delta", "id": "b", "delta": "wrong id"},
        {"type": f"{kind}-delta", "id": "a", "delta": "real"},
        {"type": f"{kind}-end", "id": "b"},  # an end without a start is ignored too
        {"type": f"{kind}-delta", "id": "a"},  # no delta field
        {"type": f"{kind}-end", "id": "a"},
        {"type": f"{kind}-delta", "id": "a", "delta": "after end"},
    ])
    assert f.parts == [{"type": kind, "text": "real", "state": "done"}]
    assert f.ignored == 5


def test_text_and_reasoning_ids_are_separate_namespaces() -> None:
    parts = parts_of([
        {"type": "reasoning-start", "id": "1"},
        {"type": "text-start", "id": "1"},
        {"type": "reasoning-delta", "id": "1", "delta": "r"},
        {"type": "text-delta", "id": "1", "delta": "t"},
        {"type": "text-end", "id": "1"},
    ])
    assert parts == [{"type": "reasoning", "text": "r", "state": "streaming"},
                     {"type": "text", "text": "t", "state": "done"}]


def test_finish_step_closes_open_text_and_reasoning_parts() -> None:
    f = fold([
        {"type": "start-step"},
        {"type": "reasoning-start", "id": "r"},
        {"type": "reasoning-delta", "id": "r", "delta": "hmm"},
        {"type": "text-start", "id": "t"},
        {"type": "text-delta", "id": "t", "delta": "partial"},
        {"type": "finish-step"},
        # the ids are no longer open: deltas for them are orphans now
        {"type": "text-delta", "id": "t", "delta": "late"},
        {"type": "reasoning-delta", "id": "r", "delta": "late"},
        {"type": "start-step"},
    ])
    assert f.parts == [
        {"type": "step-start"},
        {"type": "reasoning", "text": "hmm", "state": "done"},
        {"type": "text", "text": "partial", "state": "done"},
        {"type": "step-start"},
    ]
    assert f.ignored == 2


def test_two_text_parts_streaming_interleaved() -> None:
    parts = parts_of([
        {"type": "text-start", "id": "a"},
        {"type": "text-start", "id": "b"},
        {"type": "text-delta", "id": "a", "delta": "A1 "},
        {"type": "text-delta", "id": "b", "delta": "B1 "},
        {"type": "text-delta", "id": "a", "delta": "A2"},
        {"type": "text-end", "id": "b"},
        {"type": "text-delta", "id": "b", "delta": "ignored"},
        {"type": "text-delta", "id": "a", "delta": " A3"},
    ])
    assert parts == [{"type": "text", "text": "A1 A2 A3", "state": "streaming"},
                     {"type": "text", "text": "B1 ", "state": "done"}]


def test_parts_read_between_deltas_hold_the_text_so_far() -> None:
    # Deltas are joined when the parts are read, not on each delta: a read in
    # the middle of a stream (a voice turn, a reconnecting client) sees every
    # delta so far, and the ones after it are added to the same part.
    f = MessageFold("m")
    f.add({"type": "text-start", "id": "t"})
    f.add({"type": "reasoning-start", "id": "r"})
    f.add({"type": "text-delta", "id": "t", "delta": "one "})
    f.add({"type": "reasoning-delta", "id": "r", "delta": "hmm"})
    first = f.parts[0]
    assert (first["text"], f.parts[1]["text"]) == ("one ", "hmm")
    f.add({"type": "text-delta", "id": "t", "delta": "two "})
    f.add({"type": "text-delta", "id": "t", "delta": "three"})
    assert f.snapshot()[0][0]["text"] == "one two three"
    assert f.parts[0] is first and first["text"] == "one two three"
    f.add({"type": "text-end", "id": "t"})
    f.add({"type": "text-delta", "id": "t", "delta": "late"})
    assert f.parts[0] == {"type": "text", "text": "one two three", "state": "done"}


def test_a_text_id_can_be_reused_after_its_end() -> None:
    parts = parts_of([
        {"type": "text-start", "id": "t"}, {"type": "text-delta", "id": "t", "delta": "one"},
        {"type": "text-end", "id": "t"},
        {"type": "text-start", "id": "t"}, {"type": "text-delta", "id": "t", "delta": "two"},
        {"type": "text-end", "id": "t"},
    ])
    assert [p["text"] for p in parts] == ["one", "two"]


# ----------------------------------------------------------------- data parts


def test_data_part_with_the_same_id_replaces_the_earlier_one_in_place() -> None:
    parts = parts_of([
        {"type": "data-weather", "id": "w", "data": {"status": "loading"}},
        {"type": "text-start", "id": "t"},
        {"type": "data-weather", "id": "w", "data": {"status": "done", "temp": 14}},
        {"type": "data-other", "id": "w", "data": 1},  # same id, other type: a new part
    ])
    assert parts == [
        {"type": "data-weather", "id": "w", "data": {"status": "done", "temp": 14}},
        {"type": "text", "text": "", "state": "streaming"},
        {"type": "data-other", "id": "w", "data": 1},
    ]


def test_data_part_without_id_appends() -> None:
    parts = parts_of([{"type": "data-log", "data": 1}, {"type": "data-log", "data": 2}])
    assert parts == [{"type": "data-log", "data": 1}, {"type": "data-log", "data": 2}]


def test_transient_data_is_not_persisted() -> None:
    f = fold([
        {"type": "data-progress", "id": "p", "data": 0.5, "transient": True},
        {"type": "data-note", "data": "kept"},
        {"type": "data-note", "id": "n", "data": "x", "transient": True},
    ])
    assert f.parts == [{"type": "data-note", "data": "kept"}]
    assert f.ignored == 0


def test_transient_data_does_not_replace_a_persisted_part() -> None:
    parts = parts_of([
        {"type": "data-w", "id": "w", "data": "saved"},
        {"type": "data-w", "id": "w", "data": "flash", "transient": True},
    ])
    assert parts == [{"type": "data-w", "id": "w", "data": "saved"}]


# ----------------------------------------------------------------- tools


def test_tool_part_lifecycle_input_streaming_to_output_available() -> None:
    f = MessageFold()
    f.add({"type": "tool-input-start", "toolCallId": "c1", "toolName": "weather"})
    assert f.parts == [{"type": "tool-weather", "toolCallId": "c1", "state": "input-streaming", "input": None}]
    assert f.open_tool_calls() == ["c1"]
    f.add({"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": '{"city": "Pa'})
    assert f.parts[0]["input"] == {"city": "Pa"}
    assert f.parts[0]["state"] == "input-streaming"
    f.add({"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": 'ris"}'})
    assert f.parts[0]["input"] == {"city": "Paris"}
    f.add({"type": "tool-input-available", "toolCallId": "c1", "toolName": "weather", "input": {"city": "Paris"}})
    assert f.parts[0]["state"] == "input-available"
    assert f.open_tool_calls() == ["c1"]
    # a delta after the input is complete is an orphan
    f.add({"type": "tool-input-delta", "toolCallId": "c1", "inputTextDelta": "junk"})
    assert f.parts[0]["input"] == {"city": "Paris"}
    f.add({"type": "tool-output-available", "toolCallId": "c1", "output": {"t": 14}, "preliminary": True})
    assert f.parts[0]["preliminary"] is True
    f.add({"type": "tool-output-available", "toolCallId": "c1", "output": {"t": 15}})
    assert f.parts == [{"type": "tool-weather", "toolCallId": "c1", "state": "output-available",
                        "input": {"city": "Paris"}, "output": {"t": 15}}]
    assert f.open_tool_calls() == []
    assert f.ignored == 1


def test_tool_output_error_and_input_available_without_streaming() -> None:
    parts = parts_of([
        {"type": "tool-input-available", "toolCallId": "c2", "toolName": "search", "input": {"q": "x"},
         "providerExecuted": True},
        {"type": "tool-output-error", "toolCallId": "c2", "errorText": "rate limited"},
        {"type": "tool-input-available", "toolCallId": "c3", "toolName": "calc", "input": {}, "dynamic": True},
        {"type": "tool-input-error", "toolCallId": "c4", "toolName": "bad", "input": "{oops",
         "errorText": "invalid input"},
    ])
    assert parts == [
        {"type": "tool-search", "toolCallId": "c2", "state": "output-error", "input": {"q": "x"},
         "providerExecuted": True, "errorText": "rate limited"},
        {"type": "dynamic-tool", "toolName": "calc", "toolCallId": "c3", "state": "input-available", "input": {}},
        {"type": "tool-bad", "toolCallId": "c4", "state": "output-error", "input": "{oops",
         "errorText": "invalid input"},
    ]


def test_tool_chunks_for_unknown_calls_are_ignored() -> None:
    f = fold([
        {"type": "tool-input-delta", "toolCallId": "x", "inputTextDelta": "{"},
        {"type": "tool-output-available", "toolCallId": "x", "output": 1},
        {"type": "tool-output-error", "toolCallId": "x", "errorText": "e"},
        {"type": "tool-input-start", "toolCallId": "x"},  # no toolName: cannot make a part
        {"type": "tool-input-start", "toolName": "n"},  # no toolCallId
    ])
    assert f.parts == []
    assert f.ignored == 5


def test_close_open_parts_turns_open_tool_calls_into_cancelled_errors() -> None:
    f = fold([
        {"type": "text-start", "id": "t"}, {"type": "text-delta", "id": "t", "delta": "Let me check"},
        {"type": "reasoning-start", "id": "r"},
        {"type": "tool-input-start", "toolCallId": "streaming", "toolName": "a"},
        {"type": "tool-input-delta", "toolCallId": "streaming", "inputTextDelta": '{"q": "hal'},
        {"type": "tool-input-available", "toolCallId": "waiting", "toolName": "b", "input": {"n": 1}},
        {"type": "tool-input-available", "toolCallId": "done", "toolName": "c", "input": {}},
        {"type": "tool-output-available", "toolCallId": "done", "output": "ok"},
        {"type": "tool-input-available", "toolCallId": "failed", "toolName": "d", "input": {}},
        {"type": "tool-output-error", "toolCallId": "failed", "errorText": "boom"},
    ])
    f.close_open_parts()
    parts = f.snapshot()[0]
    assert parts[0] == {"type": "text", "text": "Let me check", "state": "done"}
    assert parts[1] == {"type": "reasoning", "text": "", "state": "done"}
    assert parts[2] == {"type": "tool-a", "toolCallId": "streaming", "state": "output-error",
                        "input": {"q": "hal"}, "errorText": CANCELLED_TOOL_TEXT}
    assert parts[3] == {"type": "tool-b", "toolCallId": "waiting", "state": "output-error",
                        "input": {"n": 1}, "errorText": "cancelled"}
    assert parts[4]["state"] == "output-available" and "errorText" not in parts[4]
    assert parts[5] == {"type": "tool-d", "toolCallId": "failed", "state": "output-error", "input": {},
                        "errorText": "boom"}
    assert f.open_tool_calls() == []
    # the open text ids are closed: a later delta for them is an orphan
    f.add({"type": "text-delta", "id": "t", "delta": "more"})
    assert f.parts[0]["text"] == "Let me check"


def test_close_open_parts_custom_tool_text() -> None:
    f = fold([{"type": "tool-input-start", "toolCallId": "c", "toolName": "a"}])
    f.close_open_parts("stopped by the user")
    assert f.parts[0]["errorText"] == "stopped by the user"


# ----------------------------------------------------------------- sources, files, metadata


def test_source_url_source_document_and_file_parts() -> None:
    parts = parts_of([
        {"type": "source-url", "sourceId": "s1", "url": "https://example.com", "title": "Ex",
         "providerMetadata": {"p": 1}, "extra": "dropped"},
        {"type": "source-document", "sourceId": "s2", "mediaType": "application/pdf", "title": "Doc",
         "filename": "a.pdf"},
        {"type": "file", "url": "data:image/png;base64,AAAA", "mediaType": "image/png"},
    ])
    assert parts == [
        {"type": "source-url", "sourceId": "s1", "url": "https://example.com", "title": "Ex",
         "providerMetadata": {"p": 1}},
        {"type": "source-document", "sourceId": "s2", "mediaType": "application/pdf", "title": "Doc",
         "filename": "a.pdf"},
        {"type": "file", "url": "data:image/png;base64,AAAA", "mediaType": "image/png"},
    ]


def test_metadata_merges_from_start_message_metadata_and_finish() -> None:
    f = fold([
        {"type": "start", "messageId": "server-id", "messageMetadata": {"model": "m1", "a": 1}},
        {"type": "message-metadata", "messageMetadata": {"a": 2, "b": 3}},
        {"type": "message-metadata", "messageMetadata": "not a dict"},
        {"type": "finish", "messageMetadata": {"usage": {"tokens": 7}}},
    ], message_id="initial")
    parts, metadata = f.snapshot()
    assert parts == []
    assert metadata == {"model": "m1", "a": 2, "b": 3, "usage": {"tokens": 7}}
    assert f.message_id == "server-id"


def test_stream_signals_and_unknown_chunks() -> None:
    f = fold([{"type": "error", "errorText": "x"}, {"type": "abort"}, {"type": "mystery"}, {"no": "type"},
              {"type": 7}])
    assert f.parts == []
    assert f.ignored == 3  # error and abort are stream signals, not rule breaks


def test_snapshot_is_a_copy() -> None:
    f = fold([{"type": "text-start", "id": "t"}, {"type": "text-delta", "id": "t", "delta": "a"}])
    parts, meta = f.snapshot()
    f.add({"type": "text-delta", "id": "t", "delta": "b"})
    parts[0]["text"] = "mutated"
    meta["x"] = 1
    assert f.parts[0]["text"] == "ab"
    assert f.metadata == {}


# ----------------------------------------------------------------- robustness


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4))
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)), max_leaves=6)
_CHUNK_TYPES = [
    "start", "start-step", "finish-step", "text-start", "text-delta", "text-end", "reasoning-start",
    "reasoning-delta", "reasoning-end", "tool-input-start", "tool-input-delta", "tool-input-available",
    "tool-input-error", "tool-output-available", "tool-output-error", "source-url", "source-document",
    "file", "steering-message", "data-x", "message-metadata", "finish", "error", "abort",
]
_FIELDS = ["id", "delta", "toolCallId", "toolName", "inputTextDelta", "input", "output", "errorText",
           "messageId", "messageMetadata", "data", "transient", "dynamic", "preliminary", "providerExecuted",
           "providerMetadata", "url", "sourceId", "mediaType", "parts"]
_chunk = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(_CHUNK_TYPES),
    st.dictionaries(st.sampled_from(_FIELDS), st.one_of(_json, st.sampled_from(["c1", "t1", "n"])), max_size=5),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_chunk, max_size=25))
def test_the_fold_never_raises_and_its_parts_are_json(chunks: list[dict[str, Any]]) -> None:
    # A chunk is a dict from agent code. If folding it raised, the session
    # state would be half-applied (the chunk recorded, its seq not), so the
    # fold must accept anything and count what it cannot use.
    f = fold(chunks)
    f.close_open_parts()
    parts, metadata = f.snapshot()
    msgspec.json.encode([parts, metadata])
    assert f.open_tool_calls() == []
    assert all(p.get("state") != "streaming" for p in parts)


def test_unhashable_tool_call_ids_are_ignored() -> None:
    f = fold([
        {"type": "tool-input-start", "toolCallId": "c", "toolName": "a"},
        {"type": "tool-output-available", "toolCallId": ["c"], "output": 1},
        {"type": "tool-output-error", "toolCallId": {"c": 1}, "errorText": "e"},
    ])
    assert f.parts[0]["state"] == "input-streaming"
    assert f.ignored == 2


# ----------------------------------------------------------------- partial JSON


@pytest.mark.parametrize("prefix, expected", [
    ('', None),
    ('{', {}),
    ('{"', {}),
    ('{"ci', {}),
    ('{"city"', {}),
    ('{"city":', {}),
    ('{"city": "Pa', {"city": "Pa"}),
    ('{"city": "Paris", ', {"city": "Paris"}),
    ('{"city": "Paris", "days": [1, 2', {"city": "Paris", "days": [1, 2]}),
    ('{"city": "Paris", "days": [t', {"city": "Paris", "days": []}),
    ('{"a": [tr', {"a": []}),
    ('{"a": 1, "b": {"c": nul', {"a": 1, "b": {}}),
    ('{"a": 1.', {"a": 1}),
    ('{"a": -', {}),
    ('{"a": 12e', {"a": 12}),
    ('{"k": "a,b\\', {"k": "a,b"}),
    ('{"k": "x\\u00', {"k": "x"}),
    ('{"k": "x\\u00e9', {"k": "x\u00e9"}),
    ('{"k": "\\ud83d', {"k": ""}),
    ('{"k": "\\ud83d\\ude0', {"k": ""}),
    ('{"k": "\\ud83d\\ude00', {"k": "\U0001F600"}),
    ('{"k": "quote \\" in', {"k": 'quote " in'}),
    ('{"k": "a}b]c,', {"k": "a}b]c,"}),
    ('[1, 2, tr', [1, 2]),
    ('[tr', []),
    ('[{"a": 1}, {"b": [', [{"a": 1}, {"b": []}]),
    ('"abc', "abc"),
    ('12', 12),
    ('tr', None),
])
def test_parse_partial_json_examples(prefix: str, expected: Any) -> None:
    assert parse_partial_json(prefix) == expected


def consistent(partial: Any, full: Any) -> bool:
    """``partial`` could be what a prefix of ``full``'s JSON shows."""
    if isinstance(full, dict):
        return (isinstance(partial, dict) and list(partial) == list(full)[:len(partial)]
                and all(consistent(v, full[k]) for k, v in partial.items()))
    if isinstance(full, list):
        return (isinstance(partial, list) and len(partial) <= len(full)
                and all(consistent(p, f) for p, f in zip(partial, full)))
    if isinstance(full, str):
        return isinstance(partial, str) and full.startswith(partial)
    if full is None or isinstance(full, bool):
        return partial is full
    return isinstance(partial, (int, float)) and not isinstance(partial, bool)  # a number cut short


_doc_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text()),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(value=_doc_values, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_parse_partial_json_on_every_prefix_is_consistent(value: Any, ascii_only: bool, indent: int | None) -> None:
    doc = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    for end in range(len(doc) + 1):
        prefix = doc[:end]
        result = parse_partial_json(prefix)  # never raises
        msgspec.json.encode(result)  # never a lone surrogate: the result is storable
        if prefix.lstrip()[:1] in ("{", "["):
            assert result is not None, prefix
        if result is not None:
            assert consistent(result, value), (prefix, result)
    assert parse_partial_json(doc) == value


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='{}[]",:\\ue0-1tnr.aE ', max_size=30))
def test_parse_partial_json_never_raises_on_garbage(text: str) -> None:
    parse_partial_json(text)
