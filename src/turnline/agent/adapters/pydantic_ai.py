"""Serve a PydanticAI agent as a turnline agent.

Each turn is one ``agent.run_stream_events(...)``:

- its ``message_history`` is turnline's history of the turn's branch, new
  user message included (what was persisted, which after a cancel is what the
  user saw), converted by PydanticAI's own AI SDK loader
  (``VercelAIAdapter.load_messages``); its ``conversation_id`` is the session id;
- its events become chunks (:class:`PydanticAIDecoder`): one step per model
  response, text and thinking parts, tool calls with incremental arguments,
  and tool results.

A cancel stops the run: the task reading the events is cancelled, and
PydanticAI's run teardown closes the model stream and cancels running async
tools. (A sync tool runs in a worker thread; it finishes, but its result is
not written.) Nothing the run produces after the abort is written.

PydanticAI is imported only when an agent is served
(``pip install 'turnline[pydantic-ai]'``).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from ..providers.parts import Parts, StepResult, finish_chunks, tool_input_done, usage_of
from ..turn import Agent, Turn

Chunk = dict[str, Any]


def is_pydantic_ai(obj: Any) -> bool:
    """A PydanticAI agent (``pydantic_ai.Agent`` or a wrapper of one), asked
    without importing PydanticAI: an instance exists only if it was."""
    module = sys.modules.get("pydantic_ai.agent")
    cls = getattr(module, "AbstractAgent", None) if module is not None else None
    return cls is not None and isinstance(obj, cls)


def pydantic_ai_agent(agent: Any, *, deps: Callable[[Turn], Any] | None = None, name: str | None = None,
                      **run_kwargs: Any) -> Agent:
    """A turnline :class:`Agent` that runs the PydanticAI ``agent`` for each turn.

    ``deps(turn)`` makes the run's dependencies; ``run_kwargs`` go to
    ``run_stream_events`` as they are (``model``, ``model_settings``,
    ``usage_limits``, ``instructions``, …).
    """
    try:
        from pydantic_ai.ui.vercel_ai import VercelAIAdapter  # noqa: F401
    except ImportError as exc:
        raise ImportError("serving a PydanticAI agent needs it: pip install 'turnline[pydantic-ai]'") from exc

    async def respond(turn: Turn) -> None:
        kwargs = dict(run_kwargs)
        if deps is not None:
            kwargs["deps"] = deps(turn)
        await turn.stream_response(stream_agent(agent, to_pydantic_ai(turn.history), turn.session_id, **kwargs))

    return Agent(respond, name=name or getattr(agent, "name", None) or "pydantic-ai")


async def stream_agent(agent: Any, history: list[Any], conversation_id: str | None = None, **kwargs: Any) -> Any:
    """The run's events as turnline chunks (an async generator; cancelling
    its reader, or closing it, cancels the run)."""
    decoder = PydanticAIDecoder()
    async with agent.run_stream_events(message_history=history, conversation_id=conversation_id,
                                       **kwargs) as events:
        async for event in events:
            for chunk in decoder.feed(event):
                yield chunk
    for chunk in decoder.close():
        yield chunk


_OPEN_TOOL_STATES = ("input-streaming", "input-available")


def to_pydantic_ai(history: list[Any]) -> list[Any]:
    """turnline messages (AI SDK ``UIMessage``s) → PydanticAI ``ModelMessage``s,
    by PydanticAI's own loader. A cancelled tool call (``output-error``,
    ``cancelled``) becomes a failed tool return, so the history stays valid;
    a tool call without a result is left out (as the provider converters do),
    and so is a part type PydanticAI's AI SDK models do not know (a newer
    AI SDK part), rather than failing every later turn of the session."""
    from pydantic import TypeAdapter, ValidationError
    from pydantic_ai.ui.vercel_ai import VercelAIAdapter
    from pydantic_ai.ui.vercel_ai.request_types import UIMessage

    one = TypeAdapter(UIMessage)
    messages = []
    for m in history:
        msg = m if isinstance(m, dict) else {"id": m.id, "role": m.role, "parts": list(m.parts),
                                             "metadata": m.metadata}
        parts = [p for p in msg.get("parts") or [] if p.get("state") not in _OPEN_TOOL_STATES
                 or not str(p.get("type", "")).startswith(("tool-", "dynamic-tool"))]
        try:
            messages.append(one.validate_python({**msg, "parts": parts}))
        except ValidationError:  # keep the parts it knows
            known = []
            for part in parts:
                try:
                    one.validate_python({**msg, "parts": [part]})
                    known.append(part)
                except ValidationError:
                    pass
            messages.append(one.validate_python({**msg, "parts": known}))
    return VercelAIAdapter.load_messages(messages)


class PydanticAIDecoder:
    """PydanticAI agent stream events → chunks (sans-I/O).

    A model response is a step (``start-step`` … ``finish-step`` with its
    finish reason); ``TextPart`` → text, ``ThinkingPart`` → reasoning,
    ``ToolCallPart`` → ``tool-input-start``, ``tool-input-delta`` per argument
    fragment, ``tool-input-available`` at its ``PartEndEvent``; a tool result
    → ``tool-output-available`` (a failed, denied or retried call:
    ``tool-output-error``). The run's usage is written as message metadata at
    the end.
    """

    def __init__(self) -> None:
        self._step: StepResult | None = None
        self._parts = Parts(StepResult())
        self._steps = 0
        self._after_tools = False  # a tool result came since the step opened
        self._tools: dict[int, dict[str, str]] = {}  # part index -> id, name, args (this step)
        self._usage: dict[str, int] = {}

    def feed(self, event: Any) -> list[Chunk]:
        out: list[Chunk] = []
        kind = type(event).__name__
        if kind == "PartStartEvent":
            self._part_start(event.index, event.part, out)
        elif kind == "PartDeltaEvent":
            self._part_delta(event.index, event.delta, out)
        elif kind == "PartEndEvent":
            self._part_end(event.index, event.part, out)
        elif hasattr(event, "part") and type(event.part).__name__ == "ToolReturnPart" and kind.endswith(
                "ToolResultEvent"):
            self._tool_result(event.part, out)
        elif kind == "AgentRunResultEvent":
            usage = getattr(event.result, "usage", None)  # RunUsage (a property since PydanticAI 2)
            if usage is not None:
                self._usage = usage_of(inputTokens=getattr(usage, "input_tokens", None),
                                       outputTokens=getattr(usage, "output_tokens", None))
        return out

    def close(self) -> list[Chunk]:
        out: list[Chunk] = []
        self._finish_step(out)
        if self._usage:
            out.append({"type": "message-metadata", "messageMetadata": {"usage": self._usage}})
        return out

    # -- parts

    def _open_step(self, out: list[Chunk]) -> StepResult:
        if self._step is not None and self._after_tools:
            self._finish_step(out)
        if self._step is None:
            self._step = StepResult()
            self._parts = Parts(self._step)
            self._tools = {}
            self._steps += 1
            self._after_tools = False
            out.append({"type": "start-step"})
        return self._step

    def _part_id(self, index: int) -> str:
        return f"s{self._steps}-p{index}"

    def _part_start(self, index: int, part: Any, out: list[Chunk]) -> None:
        self._open_step(out)
        kind = getattr(part, "part_kind", "")
        if kind == "text":
            self._parts.delta("text", self._part_id(index), part.content or "", out)
        elif kind == "thinking":
            self._parts.delta("reasoning", self._part_id(index), part.content or "", out)
        elif kind == "tool-call":
            tool = self._tools[index] = {"id": part.tool_call_id, "name": part.tool_name, "args": ""}
            out.append({"type": "tool-input-start", "toolCallId": tool["id"], "toolName": tool["name"]})
            self._tool_args(tool, part.args, out)

    def _part_delta(self, index: int, delta: Any, out: list[Chunk]) -> None:
        if self._step is None:
            return
        kind = getattr(delta, "part_delta_kind", "")
        if kind == "text":
            self._parts.delta("text", self._part_id(index), delta.content_delta or "", out)
        elif kind == "thinking":
            self._parts.delta("reasoning", self._part_id(index), delta.content_delta or "", out)
        elif kind == "tool_call" and index in self._tools:
            self._tool_args(self._tools[index], delta.args_delta, out)

    def _tool_args(self, tool: dict[str, str], args: Any, out: list[Chunk]) -> None:
        if isinstance(args, dict):  # a model that sends whole arguments
            import json

            args = json.dumps(args)
        if isinstance(args, str) and args:
            tool["args"] += args
            out.append({"type": "tool-input-delta", "toolCallId": tool["id"], "inputTextDelta": args})

    def _part_end(self, index: int, part: Any, out: list[Chunk]) -> None:
        if self._step is None:
            return
        self._parts.end(self._part_id(index), out)
        tool = self._tools.pop(index, None)
        if tool is not None:
            args = part.args if isinstance(part.args, str) else None
            if args is None:
                import json

                args = json.dumps(part.args_as_dict())
            out.append(tool_input_done(tool["id"], tool["name"], args, self._step))

    def _tool_result(self, part: Any, out: list[Chunk]) -> None:
        self._after_tools = True
        outcome = getattr(part, "outcome", "success")
        if outcome == "success":
            from pydantic_core import to_jsonable_python

            out.append({"type": "tool-output-available", "toolCallId": part.tool_call_id,
                        "output": to_jsonable_python(part.content, fallback=str)})
        else:
            out.append({"type": "tool-output-error", "toolCallId": part.tool_call_id,
                        "errorText": part.model_response_str()})

    def _finish_step(self, out: list[Chunk]) -> None:
        step = self._step
        if step is None:
            return
        self._parts.end_all(out)
        step.finish_reason = "tool-calls" if step.tool_calls else "stop"
        out += finish_chunks(step)
        self._step = None


__all__ = ["PydanticAIDecoder", "is_pydantic_ai", "pydantic_ai_agent", "stream_agent", "to_pydantic_ai"]
