"""turnline.js folds chunks exactly as turnline.core.fold does.

The browser client displays a message from its own fold while it streams and
freezes it at ``seen`` after a stop; the server persists its fold. If the two
drifted, the screen and the saved history would differ. So the JavaScript fold
runs in the browser on:

- every chunk sequence the unit tests of ``tests/unit/test_fold.py`` fold
  (harvested by running those tests with a recording fold), and every partial
  JSON example they list;
- random chunk sequences and JSON prefixes from hypothesis;

and must give what the Python fold gives: parts, metadata, message id, the
count of ignored chunks, open tool calls, and the parts after closing.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from playwright.sync_api import Page

from turnline.core.fold import MessageFold, fold, parse_partial_json

pytestmark = pytest.mark.browser

WEB_DIR = Path(__file__).resolve().parents[2] / "src" / "turnline" / "web"
UNIT_TESTS = Path(__file__).resolve().parents[1] / "unit" / "test_fold.py"
ORIGIN = "http://turnline.test"

RUN_FOLDS = """([cases, closeText]) => cases.map(([chunks, messageId]) => {
    const f = window.tl.fold(chunks, messageId);
    const [parts, metadata] = f.snapshot();
    const open = f.openToolCalls();
    f.closeOpenParts(closeText ?? undefined);
    return {messageId: f.messageId, parts, metadata, ignored: f.ignored, open, closed: f.snapshot()[0]};
})"""


@pytest.fixture(scope="module")
def page(browser: Any) -> Iterator[Page]:
    """A page that imported /turnline.js (served from the source tree, no server needed)."""
    context = browser.new_context()
    context.route(f"{ORIGIN}/**", lambda route: route.fulfill(
        path=str(WEB_DIR / "turnline.js"), content_type="text/javascript")
        if route.request.url.endswith("/turnline.js")
        else route.fulfill(body="<!doctype html><title>fold</title>", content_type="text/html"))
    page = context.new_page()
    page.goto(f"{ORIGIN}/")
    page.evaluate("async () => { window.tl = await import('/turnline.js'); }")
    yield page
    context.close()


def python_fold(chunks: list[Any], message_id: str | None, close_text: str | None = None) -> dict[str, Any]:
    f = fold(copy.deepcopy(chunks), message_id)
    parts, metadata = f.snapshot()
    opened = f.open_tool_calls()
    if close_text is None:
        f.close_open_parts()
    else:
        f.close_open_parts(close_text)
    return {"messageId": f.message_id, "parts": parts, "metadata": metadata, "ignored": f.ignored,
            "open": opened, "closed": f.snapshot()[0]}


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values: key order does not matter, 1 == 1.0, but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        # as doubles: Playwright hands over a JS number with an integral value as an int
        return float(a) == float(b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def check_folds(page: Page, cases: list[tuple[list[Any], str | None]], close_text: str | None = None) -> None:
    got = page.evaluate(RUN_FOLDS, [cases, close_text])
    for (chunks, message_id), js in zip(cases, got):
        py = python_fold(chunks, message_id, close_text)
        assert same(js, py), f"JS and Python folds differ on {json.dumps(chunks)}:\nJS {js}\nPY {py}"


# ---------------------------------------------------------------- the unit tests' own cases


def _load_unit_tests() -> Any:
    spec = importlib.util.spec_from_file_location("turnline_unit_test_fold", UNIT_TESTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def harvest_unit_cases() -> tuple[list[tuple[list[Any], str | None, str | None]], list[str]]:
    """Run the plain (non-hypothesis) tests of test_fold.py with a fold that
    records what it is fed; returns ``(chunks, message_id, close_text)`` cases
    and the partial JSON examples."""
    module = _load_unit_tests()
    recorded: list[Any] = []

    class RecordingFold(MessageFold):
        def __init__(self, message_id: str | None = None):
            super().__init__(message_id)
            self.initial_id = message_id
            self.fed: list[Any] = []
            self.close_text: str | None = None
            recorded.append(self)

        def add(self, chunk: Any) -> None:
            self.fed.append(copy.deepcopy(chunk))
            super().add(chunk)

        def close_open_parts(self, tool_error_text: str = "cancelled") -> None:
            self.close_text = tool_error_text
            super().close_open_parts(tool_error_text)

    def recording_fold(chunks: list[Any], message_id: str | None = None) -> MessageFold:
        f = RecordingFold(message_id)
        for c in chunks:
            f.add(c)
        return f

    module.MessageFold = RecordingFold
    module.fold = recording_fold
    partial_examples: list[str] = []
    for name, fn in inspect.getmembers(module, inspect.isfunction):
        if not name.startswith("test_") or getattr(fn, "is_hypothesis_test", False):
            continue
        params = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        if not params:
            fn()
            continue
        (mark,) = params
        argnames = [a.strip() for a in mark.args[0].split(",")] if isinstance(mark.args[0], str) else mark.args[0]
        for values in mark.args[1]:
            values = values if len(argnames) > 1 else (values,)
            kwargs = dict(zip(argnames, values))
            if "prefix" in kwargs:
                partial_examples.append(kwargs["prefix"])
            fn(**kwargs)
    cases = [(f.fed, f.initial_id, f.close_text) for f in recorded if f.fed]
    return cases, partial_examples


def test_the_js_fold_matches_the_python_fold_on_every_unit_test_case(page: Page) -> None:
    cases, partial_examples = harvest_unit_cases()
    assert len(cases) >= 20, "the harvest of test_fold.py's cases found too few: has that file changed shape?"
    assert len(partial_examples) >= 20
    for close_text in {c[2] for c in cases}:
        check_folds(page, [(chunks, mid) for chunks, mid, text in cases if text == close_text], close_text)
    got = page.evaluate("(xs) => xs.map((x) => window.tl.parsePartialJson(x))", partial_examples)
    for text, js in zip(partial_examples, got):
        assert same(js, parse_partial_json(text)), (text, js)


# ---------------------------------------------------------------- random cases

# Strings from a fixed alphabet: printable ASCII, a few non-ASCII letters, and
# the characters Python's repr escapes (a non-string errorText is str()-ed).
_text = st.text(alphabet="abc-1 '\"\\\n\t\x00\x7f\u00a0\u200b\u00e9\u4e2d\U0001F600", max_size=4)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), _text)
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)), max_leaves=6)
_CHUNK_TYPES = [
    "start", "start-step", "finish-step", "text-start", "text-delta", "text-end", "reasoning-start",
    "reasoning-delta", "reasoning-end", "tool-input-start", "tool-input-delta", "tool-input-available",
    "tool-input-error", "tool-output-available", "tool-output-error", "source-url", "source-document",
    "file", "steering-message", "data-x", "data-y", "message-metadata", "finish", "error", "abort", "mystery",
]
_FIELDS = ["id", "delta", "toolCallId", "toolName", "inputTextDelta", "input", "output", "errorText",
           "messageId", "messageMetadata", "data", "transient", "dynamic", "preliminary", "providerExecuted",
           "providerMetadata", "url", "sourceId", "mediaType", "parts", "title", "filename"]
_values = st.one_of(_json, st.sampled_from(["c1", "t1", "n", '{"a": [1, "x', "{", '"'] + [""]))
_chunk = st.builds(lambda kind, fields: {"type": kind, **fields}, st.sampled_from(_CHUNK_TYPES),
                   st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=5))
# Sequences that exercise the rules (ids and call ids that match) more than random fields would.
_structured = st.lists(st.one_of(
    st.builds(lambda k, i: {"type": f"{k}-start", "id": i}, st.sampled_from(["text", "reasoning"]),
              st.sampled_from(["a", "b"])),
    st.builds(lambda k, i, d: {"type": f"{k}-delta", "id": i, "delta": d}, st.sampled_from(["text", "reasoning"]),
              st.sampled_from(["a", "b"]), _text),
    st.builds(lambda k, i: {"type": f"{k}-end", "id": i}, st.sampled_from(["text", "reasoning"]),
              st.sampled_from(["a", "b"])),
    st.builds(lambda c: {"type": "tool-input-start", "toolCallId": c, "toolName": "t"}, st.sampled_from(["x", "y"])),
    st.builds(lambda c, d: {"type": "tool-input-delta", "toolCallId": c, "inputTextDelta": d},
              st.sampled_from(["x", "y"]), st.sampled_from(['{"q": ', '"pa', 'ris"', "}", "[1, ", "tr", "\\u00"])),
    st.builds(lambda c: {"type": "tool-input-available", "toolCallId": c, "toolName": "t", "input": {"q": 1}},
              st.sampled_from(["x", "y"])),
    st.builds(lambda c, o: {"type": "tool-output-available", "toolCallId": c, "output": o},
              st.sampled_from(["x", "y"]), _json),
    st.builds(lambda c: {"type": "tool-output-error", "toolCallId": c, "errorText": "boom"}, st.sampled_from(["x", "y"])),
    st.builds(lambda i, d: {"type": "data-w", "id": i, "data": d}, st.sampled_from([None, 1, True, "w"]), _json),
    st.just({"type": "finish-step"}), st.just({"type": "start-step"}),
), max_size=30)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.lists(_chunk, max_size=25), _structured), min_size=10, max_size=10),
       st.sampled_from([None, "m-initial"]))
def test_the_js_fold_matches_the_python_fold_on_random_chunks(page: Page, batch: list[list[Any]],
                                                             message_id: str | None) -> None:
    check_folds(page, [(chunks, message_id) for chunks in batch])


_doc = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
              st.floats(allow_nan=False, allow_infinity=False, width=64), _text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=4)),
    max_leaves=10)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_doc, st.booleans())
def test_parse_partial_json_agrees_on_every_prefix(page: Page, value: Any, ascii_only: bool) -> None:
    doc = json.dumps(value, ensure_ascii=ascii_only)
    prefixes = [doc[:end] for end in range(len(doc) + 1)]
    got = page.evaluate("(xs) => xs.map((x) => window.tl.parsePartialJson(x))", prefixes)
    for prefix, js in zip(prefixes, got):
        assert same(js, parse_partial_json(prefix)), (prefix, js, parse_partial_json(prefix))
