"""Fold AI SDK UI message stream chunks into ``UIMessage`` parts.

The rules follow the AI SDK's ``processUIMessageStream`` so a message folds the
same on the server, in the Python client and in the browser:

- a ``*-delta`` needs its ``*-start`` (an orphan delta is ignored, not invented);
- ``finish-step`` closes every open text and reasoning part;
- a ``data-*`` chunk with the id of an earlier part of the same type replaces it;
  ``transient`` data chunks are never persisted;
- tool parts move ``input-streaming`` → ``input-available`` → ``output-available``
  or ``output-error``.
"""

from __future__ import annotations

import json
from typing import Any

CANCELLED_TOOL_TEXT = "cancelled"


class MessageFold:
    """Accumulates one assistant message from its chunks."""

    __slots__ = ("message_id", "parts", "metadata", "_text", "_reasoning", "_tools", "_tool_text", "ignored")

    def __init__(self, message_id: str | None = None):
        self.message_id = message_id
        self.parts: list[dict[str, Any]] = []
        self.metadata: dict[str, Any] = {}
        self._text: dict[str, dict[str, Any]] = {}
        self._reasoning: dict[str, dict[str, Any]] = {}
        self._tools: dict[str, dict[str, Any]] = {}
        self._tool_text: dict[str, str] = {}
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
        self.parts.append(part)

    def _delta(self, table: dict[str, dict[str, Any]], c: dict[str, Any]) -> None:
        part = table.get(str(c.get("id")))
        delta = c.get("delta")
        if part is None or not isinstance(delta, str):
            self.ignored += 1
            return
        part["text"] += delta

    def _close(self, table: dict[str, dict[str, Any]], c: dict[str, Any]) -> None:
        part = table.pop(str(c.get("id")), None)
        if part is None:
            self.ignored += 1
            return
        part["state"] = "done"

    def _finish_step(self, _c: dict[str, Any]) -> None:
        for table in (self._text, self._reasoning):
            for part in table.values():
                part["state"] = "done"
            table.clear()

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
            self.parts.append(part)
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

    def _tool_output(self, c: dict[str, Any]) -> None:
        part = self._tools.get(c.get("toolCallId"))  # type: ignore[arg-type]
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
        part = self._tools.get(c.get("toolCallId"))  # type: ignore[arg-type]
        if part is None:
            self.ignored += 1
            return
        part["state"] = "output-error"
        part["errorText"] = str(c.get("errorText", ""))

    def _copy_part(self, c: dict[str, Any], keys: tuple[str, ...]) -> None:
        self.parts.append({"type": c["type"], **{k: c[k] for k in keys if k in c}})

    def _data(self, c: dict[str, Any]) -> None:
        if c.get("transient"):
            return
        part: dict[str, Any] = {"type": c["type"], "data": c.get("data")}
        if "id" in c:
            part = {"type": c["type"], "id": c["id"], "data": c.get("data")}
            for i, existing in enumerate(self.parts):
                if existing.get("type") == c["type"] and existing.get("id") == c["id"]:
                    self.parts[i] = part
                    return
        self.parts.append(part)

    # -- reading

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
    "start-step": lambda f, c: f.parts.append({"type": "step-start"}),
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
    SDK's ``parsePartialJson``: close open strings, arrays and objects."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    stack: list[str] = []
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    repaired = text + ('"' if in_string else "")
    for candidate in (repaired, repaired.rstrip().rstrip(",:")):
        try:
            return json.loads(candidate + "".join(reversed(stack)))
        except ValueError:
            continue
    # A dangling key with no value: drop it.
    trimmed = repaired.rstrip()
    cut = max(trimmed.rfind(","), trimmed.rfind("{"))
    if cut >= 0:
        head = trimmed[: cut + 1] if trimmed[cut] == "{" else trimmed[:cut]
        try:
            return json.loads(head + "".join(reversed(stack)))
        except ValueError:
            pass
    return None
