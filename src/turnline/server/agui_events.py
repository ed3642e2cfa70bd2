"""AG-UI events from a turnline turn: the translation, with no I/O.

A turn's log events (``turn-start``, its ``chunk`` events carrying AI SDK UI
message stream chunks, ``turn-end``) become the events of one AG-UI run
(protocol 1.0, ``@ag-ui/core``): ``RUN_STARTED``, ``TEXT_MESSAGE_*``,
``REASONING_*``, ``TOOL_CALL_*``, ``STEP_*``, ``CUSTOM``, then ``RUN_FINISHED``
(outcome ``success`` or ``cancelled``) or ``RUN_ERROR``.

:class:`RunTranslator` is fed the session's log events one at a time and
returns the AG-UI events each one makes (often none, sometimes several).
:class:`Delivered` follows what a client was handed, so that a client which
reconnects gets a stream its verifier accepts: ``RUN_STARTED`` and a ``*_START``
for whatever was still open, with no content repeated.

SSE ids (the documented extension, ``docs/ag-ui.md``): the last AG-UI event
made from the log event at seq ``N`` carries id ``N``; the ones before it
``N.0``, ``N.1``, ... . :func:`parse_cursor` reads either form back.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ..protocol import SEQ_MAX
from .aisdk import ui_chunk

# The chunk types with an AG-UI counterpart, or that say nothing a run's
# events do not already say (the run's end carries the outcome and the error).
_SILENT = frozenset({"start", "finish", "abort", "error", "reset-step"})


def _text_of(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


class RunTranslator:
    """One turn as one AG-UI run. ``thread_id`` is the session, ``run_id`` the
    run's id as the client knows it (the turn id when it named none).

    AG-UI ids are made from the turn's assistant message id ``M``: the turn's
    first text part is the AG-UI assistant message ``M``, later ones ``M.1``,
    ``M.2``, ...; reasoning parts are ``M.r0``, ``M.r1``, ...; a tool call's
    result is the tool message ``M.tool.<toolCallId>``; a tool call belongs to
    the assistant message written just before it (``M`` when there is none)."""

    def __init__(self, thread_id: str, turn_id: str, run_id: str | None = None):
        self.thread_id = thread_id
        self.turn_id = turn_id
        self.run_id = run_id or turn_id
        self.message_id = turn_id
        self.started = False
        self.ended = False
        self._ts = 0
        self._texts: dict[str, str] = {}  # open text parts: chunk id -> AG-UI message id
        self._reasonings: dict[str, str] = {}
        self._tools: dict[str, bool] = {}  # tool calls seen -> whether TOOL_CALL_ARGS was sent
        self._open_tools: set[str] = set()
        self._text_count = 0
        self._reasoning_count = 0
        self._parent: str | None = None  # the assistant message tool calls attach to
        self._step = 0
        self._step_open = False
        # A cancel of this turn with a ``seen`` cursor persists the chunks up to
        # it; the stream drops the later ones too, so it shows what is saved.
        self._cancel_seen: dict[str, int] = {}
        self.cut: int | None = None
        # A turn that ended complete and was then revised to cancelled (a stop
        # with ``seen`` that lost the race to its end): a stream made after
        # that ends the run as it is saved.
        self.revised_reason: str | None = None

    # ------------------------------------------------------------ feeding

    def feed(self, event: dict[str, Any], seq: int) -> list[dict[str, Any]]:
        """The AG-UI events the log event at ``seq`` makes for this run."""
        kind = event.get("type")
        if kind == "cancel":
            if isinstance(event.get("seen"), int):
                self._cancel_seen[str(event.get("request_id"))] = event["seen"]
            return []
        if kind == "cancel-result":
            seen = self._cancel_seen.pop(str(event.get("request_id")), None)
            if self.turn_id not in (event.get("cancelled") or ()) or self.ended:
                return []
            if seen is not None:
                self.cut = seen
            if self.started:
                return []
            # A queued run cancelled before its turn started: it never will.
            self.started = self.ended = True
            self._ts = event.get("ts") or 0
            return [self._ev("RUN_STARTED", threadId=self.thread_id, runId=self.run_id),
                    self._ev("RUN_FINISHED", threadId=self.thread_id, runId=self.run_id,
                             outcome={"type": "cancelled"})]
        if event.get("turn_id") != self.turn_id or self.ended:
            return []
        self._ts = event.get("ts") or 0
        if kind == "turn-start":
            if self.started:
                return []
            self.started = True
            self.message_id = event.get("message_id") or self.turn_id
            self._parent = None
            return [self._ev("RUN_STARTED", threadId=self.thread_id, runId=self.run_id)]
        if kind == "chunk" and self.started:
            if self.cut is not None and seq > self.cut and not event.get("final"):
                return []
            chunk = event.get("chunk")
            if not isinstance(chunk, dict):
                return []
            public = ui_chunk(chunk, self.message_id)
            return self._chunk(public) if public is not None else []
        if kind == "turn-end":
            out = self.close_all() if self.started else []
            if not self.started:  # a turn that failed before it began still ends its run
                out.append(self._ev("RUN_STARTED", threadId=self.thread_id, runId=self.run_id))
                self.started = True
            self.ended = True
            reason = self.revised_reason or event.get("reason")
            if reason == "error":
                error = event.get("error") or {}
                fields: dict[str, Any] = {"message": str(error.get("message") or "the turn failed")}
                if error.get("code"):
                    fields["code"] = str(error["code"])
                out.append(self._ev("RUN_ERROR", **fields))
            else:
                outcome = "cancelled" if reason == "cancelled" else "success"
                out.append(self._ev("RUN_FINISHED", threadId=self.thread_id, runId=self.run_id,
                                    outcome={"type": outcome}))
            return out
        return []

    def close_all(self) -> list[dict[str, Any]]:
        """END events for everything still open (AG-UI's verifier refuses a
        ``RUN_FINISHED`` with an open message, tool call, reasoning or step)."""
        out: list[dict[str, Any]] = []
        out += self._close_texts()
        for call_id in list(self._open_tools):
            out.append(self._ev("TOOL_CALL_END", toolCallId=call_id))
        self._open_tools.clear()
        if self._step_open:
            self._step_open = False
            out.append(self._ev("STEP_FINISHED", stepName=self._step_name()))
        return out

    # ------------------------------------------------------------ chunks

    def _chunk(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        kind = c["type"]
        handler = _CHUNKS.get(kind)
        if handler is not None:
            return handler(self, c)
        if kind in _SILENT:
            return []
        # Sources, files, data parts, metadata, approvals, steering: no AG-UI
        # counterpart; CUSTOM is the protocol's extension point.
        return [self._ev("CUSTOM", name=kind, value=c)]

    def _text_start(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        part = str(c.get("id"))
        out = self._close_text(part)
        mid = self.message_id if self._text_count == 0 else f"{self.message_id}.{self._text_count}"
        self._text_count += 1
        self._texts[part] = self._parent = mid
        return out + [self._ev("TEXT_MESSAGE_START", messageId=mid, role="assistant")]

    def _text_delta(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        mid = self._texts.get(str(c.get("id")))
        delta = c.get("delta")
        if mid is None or not isinstance(delta, str) or not delta:
            return []
        return [self._ev("TEXT_MESSAGE_CONTENT", messageId=mid, delta=delta)]

    def _text_end(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        return self._close_text(str(c.get("id")))

    def _close_text(self, part: str) -> list[dict[str, Any]]:
        mid = self._texts.pop(part, None)
        return [] if mid is None else [self._ev("TEXT_MESSAGE_END", messageId=mid)]

    def _reasoning_start(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        part = str(c.get("id"))
        out = self._close_reasoning(part)
        mid = f"{self.message_id}.r{self._reasoning_count}"
        self._reasoning_count += 1
        self._reasonings[part] = mid
        return out + [self._ev("REASONING_START", messageId=mid),
                      self._ev("REASONING_MESSAGE_START", messageId=mid, role="reasoning")]

    def _reasoning_delta(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        mid = self._reasonings.get(str(c.get("id")))
        delta = c.get("delta")
        if mid is None or not isinstance(delta, str) or not delta:
            return []
        return [self._ev("REASONING_MESSAGE_CONTENT", messageId=mid, delta=delta)]

    def _reasoning_end(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        return self._close_reasoning(str(c.get("id")))

    def _close_reasoning(self, part: str) -> list[dict[str, Any]]:
        mid = self._reasonings.pop(part, None)
        if mid is None:
            return []
        return [self._ev("REASONING_MESSAGE_END", messageId=mid), self._ev("REASONING_END", messageId=mid)]

    def _close_texts(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for part in list(self._texts):
            out += self._close_text(part)
        for part in list(self._reasonings):
            out += self._close_reasoning(part)
        return out

    def _step_name(self) -> str:
        return f"step-{self._step}"

    def _start_step(self, _c: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._finish_step(_c) if self._step_open else []
        self._step += 1
        self._step_open = True
        return out + [self._ev("STEP_STARTED", stepName=self._step_name())]

    def _finish_step(self, _c: dict[str, Any]) -> list[dict[str, Any]]:
        # As the fold does: the end of a step closes its text and reasoning.
        out = self._close_texts()
        if self._step_open:
            self._step_open = False
            out.append(self._ev("STEP_FINISHED", stepName=self._step_name()))
        return out

    def _tool_open(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        call_id, name = c.get("toolCallId"), c.get("toolName")
        if not isinstance(call_id, str) or call_id in self._tools or not isinstance(name, str):
            return []
        self._tools[call_id] = False
        self._open_tools.add(call_id)
        return [self._ev("TOOL_CALL_START", toolCallId=call_id, toolCallName=name,
                         parentMessageId=self._parent or self.message_id)]

    def _tool_delta(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        call_id, delta = c.get("toolCallId"), c.get("inputTextDelta")
        if call_id not in self._open_tools or not isinstance(delta, str) or not delta:
            return []
        self._tools[call_id] = True
        return [self._ev("TOOL_CALL_ARGS", toolCallId=call_id, delta=delta)]

    def _tool_input(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        """``tool-input-available`` (or ``-error``): the arguments are complete."""
        out = self._tool_open(c)
        call_id = c.get("toolCallId")
        if call_id not in self._open_tools:
            return out
        if not self._tools[call_id] and "input" in c:
            out.append(self._ev("TOOL_CALL_ARGS", toolCallId=call_id, delta=_text_of(c["input"])))
            self._tools[call_id] = True
        self._open_tools.discard(call_id)
        out.append(self._ev("TOOL_CALL_END", toolCallId=call_id))
        if c["type"] == "tool-input-error":
            out += self._tool_result(call_id, str(c.get("errorText") or "invalid tool input"))
        return out

    def _tool_output(self, c: dict[str, Any]) -> list[dict[str, Any]]:
        call_id = c.get("toolCallId")
        if call_id not in self._tools or c.get("preliminary"):
            return []  # a preliminary output is replaced by the final one
        out: list[dict[str, Any]] = []
        if call_id in self._open_tools:
            self._open_tools.discard(call_id)
            out.append(self._ev("TOOL_CALL_END", toolCallId=call_id))
        if c["type"] == "tool-output-available":
            return out + self._tool_result(call_id, _text_of(c.get("output")))
        return out + self._tool_result(call_id, str(c.get("errorText") or "the tool failed"))

    def _tool_result(self, call_id: str, content: str) -> list[dict[str, Any]]:
        return [self._ev("TOOL_CALL_RESULT", messageId=f"{self.message_id}.tool.{call_id}",
                         toolCallId=call_id, content=content, role="tool")]

    def _ev(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev: dict[str, Any] = {"type": kind, **fields}
        if self._ts:
            ev["timestamp"] = self._ts
        return ev


_CHUNKS = {
    "text-start": RunTranslator._text_start,
    "text-delta": RunTranslator._text_delta,
    "text-end": RunTranslator._text_end,
    "reasoning-start": RunTranslator._reasoning_start,
    "reasoning-delta": RunTranslator._reasoning_delta,
    "reasoning-end": RunTranslator._reasoning_end,
    "start-step": RunTranslator._start_step,
    "finish-step": RunTranslator._finish_step,
    "tool-input-start": RunTranslator._tool_open,
    "tool-input-delta": RunTranslator._tool_delta,
    "tool-input-available": RunTranslator._tool_input,
    "tool-input-error": RunTranslator._tool_input,
    "tool-output-available": RunTranslator._tool_output,
    "tool-output-error": RunTranslator._tool_output,
}


# ---------------------------------------------------------------- resuming


_OPENERS = {"TEXT_MESSAGE_START": "TEXT_MESSAGE_END", "REASONING_START": "REASONING_END",
            "REASONING_MESSAGE_START": "REASONING_MESSAGE_END", "TOOL_CALL_START": "TOOL_CALL_END",
            "STEP_STARTED": "STEP_FINISHED"}
_CLOSERS = {v: k for k, v in _OPENERS.items()}


def _key(ev: dict[str, Any], opener: str) -> tuple[str, str]:
    name = ev.get("toolCallId") or ev.get("messageId") or ev.get("stepName")
    return opener, str(name)


class Delivered:
    """What a client was handed of a run, enough to open a resumed stream: the
    run's start and every message, reasoning span, tool call and step still
    open, in the order they opened. Their content is not repeated; AG-UI's
    reducer takes a ``*_START`` for an id it holds as the same message going on."""

    def __init__(self) -> None:
        self.run_started: dict[str, Any] | None = None
        self.run_ended = False
        self._open: dict[tuple[str, str], dict[str, Any]] = {}

    def see(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            kind = ev["type"]
            if kind == "RUN_STARTED":
                self.run_started, self.run_ended = ev, False
                self._open.clear()
            elif kind in ("RUN_FINISHED", "RUN_ERROR"):
                self.run_ended = True
                self._open.clear()
            elif kind in _OPENERS:
                self._open[_key(ev, kind)] = ev
            elif kind in _CLOSERS:
                self._open.pop(_key(ev, _CLOSERS[kind]), None)

    def reopen(self) -> list[dict[str, Any]]:
        """The events a resumed stream starts with (none when the run had not
        started for this client, or had ended)."""
        if self.run_started is None or self.run_ended:
            return []
        return [copy.deepcopy(self.run_started), *(copy.deepcopy(ev) for ev in self._open.values())]


# ---------------------------------------------------------------- ids


def event_ids(seq: int, count: int) -> list[str]:
    """The SSE ids of the ``count`` AG-UI events made from the log event at ``seq``."""
    return [f"{seq}.{j}" for j in range(count - 1)] + ([str(seq)] if count else [])


def parse_cursor(value: str) -> tuple[int, int | None]:
    """``N`` (everything made from seq ``N`` was delivered) or ``N.j`` (its
    events up to the ``j``-th, counted from 0). Raises ``ValueError``."""
    seq_text, dot, index_text = value.strip().partition(".")
    if not seq_text.isdigit() or (dot and not index_text.isdigit()):
        raise ValueError(value)
    seq = int(seq_text)
    if seq > SEQ_MAX:
        raise ValueError(value)
    return seq, (int(index_text) if dot else None)
