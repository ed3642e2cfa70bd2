"""Fold AI SDK UI message stream chunks into ``UIMessage`` parts.

The rules follow the AI SDK's ``processUIMessageStream`` so a message folds the
same on the server, in the Python client and in the browser:

- a ``*-delta`` needs its ``*-start`` (an orphan delta is ignored, not invented);
- ``finish-step`` closes every open text and reasoning part;
- a ``data-*`` chunk with the id of an earlier part of the same type replaces it;
  ``transient`` data chunks are never persisted;
- tool parts move ``input-streaming`` → ``input-available`` → ``output-available``
  or ``output-error``;
- ``steering-message`` (AI SDK 7: a message sent into the running turn) is a part
  ``{type, id, parts}`` where the agent took it.
"""

from __future__ import annotations

import json
from typing import Any

CANCELLED_TOOL_TEXT = "cancelled"


class MessageFold:
    """Accumulates one assistant message from its chunks."""

    __slots__ = ("message_id", "_parts", "metadata", "_text", "_reasoning", "_tools", "_tool_text", "_deltas",
                 "ignored")

    def __init__(self, message_id: str | None = None):
        self.message_id = message_id
        self._parts: list[dict[str, Any]] = []
        self.metadata: dict[str, Any] = {}
        self._text: dict[str, dict[str, Any]] = {}
        self._reasoning: dict[str, dict[str, Any]] = {}
        self._tools: dict[str, dict[str, Any]] = {}
        self._tool_text: dict[str, str] = {}
        # Text and reasoning deltas not yet joined into their part (by id of
        # the part): ``+=`` on every delta copied the whole text each time.
        self._deltas: dict[int, tuple[dict[str, Any], list[str]]] = {}
        self.ignored = 0  # chunks that broke a rule (orphan deltas, unknown types)

    # -- feeding

    def add(self, chunk: dict[str, Any]) -> None:
        kind = chunk.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is not None:
            handler(self, chunk)
        elif isinstance(kind, str) and kind.startswith("data-"):
            self._data(chunk)
        else:
            self.ignored += 1

    def _start(self, c: dict[str, Any]) -> None:
        if isinstance(c.get("messageId"), str):
            self.message_id = c["messageId"]
        self._merge_metadata(c.get("messageMetadata"))

    def _merge_metadata(self, meta: Any) -> None:
        if isinstance(meta, dict):
            self.metadata.update(meta)

    def _open(self, table: dict[str, dict[str, Any]], kind: str, c: dict[str, Any]) -> None:
        part: dict[str, Any] = {"type": kind, "text": "", "state": "streaming"}
        if "providerMetadata" in c:
            part["providerMetadata"] = c["providerMetadata"]
        table[str(c.get("id"))] = part
        self._parts.append(part)

    def _delta(self, table: dict[str, dict[str, Any]], c: dict[str, Any]) -> None:
        part = table.get(str(c.get("id")))
        delta = c.get("delta")
        if part is None or not isinstance(delta, str):
            self.ignored += 1
            return
        pending = self._deltas.get(id(part))
        if pending is None:
            self._deltas[id(part)] = (part, [delta])
        else:
            pending[1].append(delta)
        self._take_provider_metadata(part, c)

    @staticmethod
    def _take_provider_metadata(part: dict[str, Any], c: dict[str, Any]) -> None:
        # As the AI SDK does: a later chunk's metadata replaces the start's
        # (Anthropic signs its thinking on reasoning-end).
        if "providerMetadata" in c:
            part["providerMetadata"] = c["providerMetadata"]

    def _close(self, table: dict[str, dict[str, Any]], c: dict[str, Any]) -> None:
        part = table.pop(str(c.get("id")), None)
        if part is None:
            self.ignored += 1
            return
        part["state"] = "done"
        self._take_provider_metadata(part, c)

    def _finish_step(self, _c: dict[str, Any]) -> None:
        # Every streaming part, not only those the tables point at: a second
        # ``*-start`` with an open id leaves the first part out of its table.
        for part in self._parts:
            if part.get("state") == "streaming":
                part["state"] = "done"
        self._text.clear()
        self._reasoning.clear()

    def _tool_part(self, c: dict[str, Any]) -> dict[str, Any] | None:
        call_id = c.get("toolCallId")
        if not isinstance(call_id, str):
            self.ignored += 1
            return None
        part = self._tools.get(call_id)
        if part is None:
            name = c.get("toolName")
            if not isinstance(name, str):
                self.ignored += 1
                return None
            part = {"type": f"tool-{name}", "toolCallId": call_id, "state": "input-streaming", "input": None}
            if c.get("dynamic"):
                part = {"type": "dynamic-tool", "toolName": name, "toolCallId": call_id,
                        "state": "input-streaming", "input": None}
            if c.get("providerExecuted"):
                part["providerExecuted"] = True
            self._tools[call_id] = part
            self._parts.append(part)
        return part

    def _tool_input_start(self, c: dict[str, Any]) -> None:
        if self._tool_part(c) is not None:
            self._tool_text[c["toolCallId"]] = ""

    def _tool_input_delta(self, c: dict[str, Any]) -> None:
        call_id = c.get("toolCallId")
        part = self._tools.get(call_id) if isinstance(call_id, str) else None
        delta = c.get("inputTextDelta")
        if part is None or call_id not in self._tool_text or not isinstance(delta, str):
            self.ignored += 1
            return
        self._tool_text[call_id] += delta
        part["input"] = parse_partial_json(self._tool_text[call_id])

    def _tool_input_available(self, c: dict[str, Any]) -> None:
        part = self._tool_part(c)
        if part is not None:
            part["state"] = "input-available"
            part["input"] = c.get("input")
            self._tool_text.pop(c["toolCallId"], None)

    def _tool_input_error(self, c: dict[str, Any]) -> None:
        part = self._tool_part(c)
        if part is not None:
            part["state"] = "output-error"
            part["input"] = c.get("input")
            part["errorText"] = str(c.get("errorText", ""))

    def _called_tool(self, c: dict[str, Any]) -> dict[str, Any] | None:
        call_id = c.get("toolCallId")
        return self._tools.get(call_id) if isinstance(call_id, str) else None  # may be unhashable

    def _tool_output(self, c: dict[str, Any]) -> None:
        part = self._called_tool(c)
        if part is None:
            self.ignored += 1
            return
        part["state"] = "output-available"
        part["output"] = c.get("output")
        if c.get("preliminary"):
            part["preliminary"] = True
        else:
            part.pop("preliminary", None)

    def _tool_output_error(self, c: dict[str, Any]) -> None:
        part = self._called_tool(c)
        if part is None:
            self.ignored += 1
            return
        part["state"] = "output-error"
        part["errorText"] = str(c.get("errorText", ""))

    def _copy_part(self, c: dict[str, Any], keys: tuple[str, ...]) -> None:
        self._parts.append({"type": c["type"], **{k: c[k] for k in keys if k in c}})

    def _data(self, c: dict[str, Any]) -> None:
        if c.get("transient"):
            return
        part: dict[str, Any] = {"type": c["type"], "data": c.get("data")}
        if "id" in c:
            part = {"type": c["type"], "id": c["id"], "data": c.get("data")}
            for i, existing in enumerate(self._parts):
                if existing.get("type") == c["type"] and existing.get("id") == c["id"]:
                    self._parts[i] = part
                    return
        self._parts.append(part)

    # -- reading

    @property
    def parts(self) -> list[dict[str, Any]]:
        """The message's parts so far (text joined up to the last delta)."""
        if self._deltas:
            for part, deltas in self._deltas.values():
                part["text"] += "".join(deltas)
            self._deltas.clear()
        return self._parts

    def close_open_parts(self, tool_error_text: str = CANCELLED_TOOL_TEXT) -> None:
        """Close what a cancel cut: text/reasoning become ``done``; a tool call
        without a result becomes ``output-error`` so the next model input is valid."""
        self._finish_step({})
        for part in self._tools.values():
            if part["state"] in ("input-streaming", "input-available"):
                part["state"] = "output-error"
                part["errorText"] = tool_error_text
        self._tool_text.clear()

    def open_tool_calls(self) -> list[str]:
        return [cid for cid, p in self._tools.items() if p["state"] in ("input-streaming", "input-available")]

    def snapshot(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return [dict(p) for p in self.parts], dict(self.metadata)


_HANDLERS = {
    "start": MessageFold._start,
    "start-step": lambda f, c: f._parts.append({"type": "step-start"}),
    "finish-step": MessageFold._finish_step,
    "text-start": lambda f, c: f._open(f._text, "text", c),
    "text-delta": lambda f, c: f._delta(f._text, c),
    "text-end": lambda f, c: f._close(f._text, c),
    "reasoning-start": lambda f, c: f._open(f._reasoning, "reasoning", c),
    "reasoning-delta": lambda f, c: f._delta(f._reasoning, c),
    "reasoning-end": lambda f, c: f._close(f._reasoning, c),
    "tool-input-start": MessageFold._tool_input_start,
    "tool-input-delta": MessageFold._tool_input_delta,
    "tool-input-available": MessageFold._tool_input_available,
    "tool-input-error": MessageFold._tool_input_error,
    "tool-output-available": MessageFold._tool_output,
    "tool-output-error": MessageFold._tool_output_error,
    "source-url": lambda f, c: f._copy_part(c, ("sourceId", "url", "title", "providerMetadata")),
    "source-document": lambda f, c: f._copy_part(
        c, ("sourceId", "mediaType", "title", "filename", "providerMetadata")),
    "file": lambda f, c: f._copy_part(c, ("url", "mediaType", "providerMetadata")),
    "steering-message": lambda f, c: f._copy_part(c, ("id", "parts")),
    "message-metadata": lambda f, c: f._merge_metadata(c.get("messageMetadata")),
    "finish": lambda f, c: f._merge_metadata(c.get("messageMetadata")),
    # Stream-level signals, not parts; the turn-end event carries their meaning.
    "error": lambda f, c: None,
    "abort": lambda f, c: None,
}


def fold(chunks: list[dict[str, Any]], message_id: str | None = None) -> MessageFold:
    f = MessageFold(message_id)
    for c in chunks:
        f.add(c)
    return f


def parse_partial_json(text: str) -> Any:
    """Best-effort parse of a JSON prefix (a streaming tool input), like the AI
    SDK's ``parsePartialJson``: close the open string, arrays and objects, and
    drop what cannot be closed (a dangling key, a cut literal, a cut escape).
    Never raises; for a prefix of a JSON document the result is ``None`` or a
    value the document's value extends."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    stack: list[str] = []  # the closers of the open containers
    cuts: list[tuple[int, str]] = []  # text[:end] + closers is valid when the prefix is
    in_string = False
    safe = 0  # in an open string: where its last whole character ends
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if in_string:
            if ch == "\\":
                step = _escape_length(text, i)
                if step == 0:  # cut inside an escape
                    break
                i += step
            else:
                in_string = ch != '"'
                i += 1
            safe = i
            continue
        if ch == '"':
            in_string = True
            safe = i + 1
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
            cuts.append((i + 1, "".join(reversed(stack))))
        elif ch in "}]":
            if stack:
                stack.pop()
            cuts.append((i + 1, "".join(reversed(stack))))
        elif ch == ",":
            cuts.append((i, "".join(reversed(stack))))
        i += 1
    closers = "".join(reversed(stack))
    if in_string:
        candidates = [text[:safe] + '"' + closers]
    else:
        body = text.rstrip()
        candidates = [body + closers, body.rstrip(",:") + closers, body.rstrip("+-.eE") + closers]
    # A prefix of a valid document always closes at its last cut; garbage may
    # not close anywhere, so only the last few cuts are tried.
    candidates += [text[:end] + closing for end, closing in reversed(cuts[-4:])]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _escape_length(text: str, i: int) -> int:
    """Length of the escape at ``text[i] == "\\"``, or 0 if the text ends inside it.
    A high surrogate is whole only with its low half: alone it cannot be stored."""
    if i + 1 >= len(text):
        return 0
    if text[i + 1] != "u":
        return 2
    digits = text[i + 2:i + 6]
    if len(digits) < 4:
        return 0
    if digits[0] in "dD" and digits[1] in "89abAB":
        low = text[i + 6:i + 8]
        if low in ("", "\\") or (low == "\\u" and len(text) < i + 12):
            return 0
        return 12 if low == "\\u" else 6
    return 6
