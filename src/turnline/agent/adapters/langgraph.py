"""Serve a compiled LangGraph graph as a turnline agent.

Each turn runs the graph once with ``astream(stream_mode="messages")``:

- its input is turnline's history of the turn's branch (what was persisted,
  which after a cancel is what the user saw) as LangChain messages under
  ``input_key``. A graph with a checkpointer gets that history behind a
  ``RemoveMessage(REMOVE_ALL_MESSAGES)``, so the thread's messages are reset
  to turnline's and never keep what a cancelled run produced past the cut;
- its ``thread_id`` is the session id (``config["configurable"]["thread_id"]``);
- the model tokens, tool calls and tool results it streams, subgraphs'
  included, become chunks (:class:`LangGraphDecoder`): one step per model call.

A cancel stops the run: the task reading the stream is cancelled, which
cancels the graph's running async nodes; a sync node (LangGraph runs it in a
worker thread, which nothing can interrupt) is stopped by a callback handler
that raises at its model's next token, and no node or tool starts after the
abort. Nothing the graph produces after the abort is written.

LangGraph and LangChain are imported only when a graph is served
(``pip install 'turnline[langgraph]'``).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from ..providers.parts import (
    Parts, StepResult, data_url, finish_chunks, is_image, role_and_parts, steps, text_of, tool_input_done,
    tool_result, usage_of,
)
from ..signal import AbortSignal, Aborted
from ..turn import Agent, Turn

Chunk = dict[str, Any]
InputOf = Callable[[Turn, list[Any]], Any]

# LangChain's finish reasons (OpenAI's and Anthropic's words) → the AI SDK's
_FINISH = {"stop": "stop", "end_turn": "stop", "stop_sequence": "stop", "length": "length",
           "max_tokens": "length", "tool_calls": "tool-calls", "tool_use": "tool-calls",
           "function_call": "tool-calls", "content_filter": "content-filter"}


def is_langgraph(obj: Any) -> bool:
    """A compiled LangGraph graph (``CompiledStateGraph`` or any ``Pregel``).
    Asked without importing LangGraph: an instance exists only if it was."""
    import sys

    pregel = sys.modules.get("langgraph.pregel")
    cls = getattr(pregel, "Pregel", None) if pregel is not None else None
    return cls is not None and isinstance(obj, cls)


def langgraph_agent(graph: Any, *, input_key: str = "messages", config: dict[str, Any] | None = None,
                    input_of: InputOf | None = None, name: str | None = None) -> Agent:
    """A turnline :class:`Agent` that runs ``graph`` for each turn.

    ``input_key`` is the state key of the messages (``MessagesState``'s
    ``messages``). ``config`` is merged into each run's config (e.g.
    ``recursion_limit``, tags, your own callbacks); turnline sets
    ``configurable.thread_id`` (the session id) and adds
    ``metadata.turnline_session`` / ``turnline_turn``. ``input_of(turn,
    messages)`` builds the graph input yourself (other state keys, a
    different reducer); ``messages`` is the converted history.
    """
    _require_langgraph()
    reset = _resets_thread(graph, input_key)

    async def respond(turn: Turn) -> None:
        messages = to_langchain(turn.history)
        if input_of is not None:
            graph_input = input_of(turn, messages)
        else:
            graph_input = {input_key: ([_remove_all()] if reset else []) + messages}
        await turn.stream_response(stream_graph(graph, graph_input, run_config(turn, config)))

    return Agent(respond, name=name or getattr(graph, "name", None) or "langgraph")


def run_config(turn: Turn, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's config: ``base``, the session as the thread, turnline's ids
    as metadata, and the callback handler that stops sync nodes on abort."""
    base = dict(base or {})
    configurable = {**base.get("configurable", {}), "thread_id": turn.session_id}
    metadata = {**base.get("metadata", {}), "turnline_session": turn.session_id, "turnline_turn": turn.turn_id}
    callbacks = base.get("callbacks")
    stop = stop_on_abort(turn.abort_signal)
    if callbacks is None:
        callbacks = [stop]
    elif isinstance(callbacks, (list, tuple)):
        callbacks = [*callbacks, stop]
    else:  # a callback manager
        callbacks = callbacks.copy()
        callbacks.add_handler(stop, inherit=True)
    return {**base, "configurable": configurable, "metadata": metadata, "callbacks": callbacks}


async def stream_graph(graph: Any, graph_input: Any, config: dict[str, Any]) -> Any:
    """The graph's messages stream as turnline chunks (an async generator;
    closing it, or cancelling its reader, cancels the run)."""
    decoder = LangGraphDecoder()
    # subgraphs=True: a node that is itself a graph (a prebuilt agent, a
    # supervisor's workers) streams its tokens too, not only its final message.
    stream = graph.astream(graph_input, config, stream_mode="messages", subgraphs=True)
    try:
        async for _namespace, (message, metadata) in stream:
            for chunk in decoder.feed(message, metadata):
                yield chunk
        for chunk in decoder.close():
            yield chunk
    finally:
        await stream.aclose()


# ---------------------------------------------------------------- stopping sync nodes

_handler_class: Any = None


def stop_on_abort(signal: AbortSignal) -> Any:
    """A LangChain callback handler that raises :class:`Aborted` once
    ``signal`` fired: at a model's next token (so a sync node's model call,
    running in a worker thread, stops there), and at the start of any model
    call, tool or node after the abort."""
    global _handler_class
    if _handler_class is None:
        from langchain_core.callbacks import BaseCallbackHandler

        class StopOnAbort(BaseCallbackHandler):
            raise_error = True  # the callback manager re-raises, so the model call fails
            run_inline = True

            def __init__(self, signal: AbortSignal) -> None:
                self.signal = signal

            def _check(self) -> None:
                if self.signal.aborted:
                    raise Aborted(self.signal.reason or "cancelled")

            def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
                self._check()

            def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
                self._check()

            def on_llm_start(self, serialized: Any, prompts: Any, **kwargs: Any) -> None:
                self._check()

            def on_tool_start(self, serialized: Any, input_str: str, **kwargs: Any) -> None:
                self._check()

            def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
                self._check()

        _handler_class = StopOnAbort
    return _handler_class(signal)


# ---------------------------------------------------------------- the decoder


class _Message:
    """One AI message being streamed: its tool calls by index, whether it ended."""

    __slots__ = ("id", "tools", "ended")

    def __init__(self, message_id: str):
        self.id = message_id
        self.tools: dict[Any, dict[str, str]] = {}  # index (or id) -> id, name, args
        self.ended = False


class LangGraphDecoder:
    """``(message, metadata)`` items of ``stream_mode="messages"`` → chunks
    (sans-I/O: fed one item at a time).

    Each AI message (one model call; its chunks share an id) is a step:
    ``start-step``, its reasoning and text parts, its tool calls
    (``tool-input-start``, ``tool-input-delta`` per argument fragment,
    ``tool-input-available`` when the message ends), and the ``ToolMessage``
    results as ``tool-output-available`` (``tool-output-error`` for
    ``status="error"``); the step finishes when the next model call starts or
    the run ends. Model calls that stream side by side (parallel nodes) share
    a step. A whole ``AIMessage`` a node returns without streaming is written
    at once. Other messages (a node's ``HumanMessage``) are not written.
    """

    def __init__(self) -> None:
        self._messages: dict[str, _Message] = {}  # the open step's
        self._done: set[str] = set()  # ids of the messages of finished steps
        self._step: StepResult | None = None  # the open step
        self._parts = Parts(StepResult())
        self._calls = 0

    def feed(self, message: Any, metadata: Any = None) -> list[Chunk]:
        out: list[Chunk] = []
        kind = getattr(message, "type", None)
        if kind in ("AIMessageChunk", "ai"):
            self._ai(message, out)
        elif kind == "tool":
            self._tool_result(message, out)
        return out

    def close(self) -> list[Chunk]:
        """The run ended: close what is open and finish the step."""
        out: list[Chunk] = []
        self._finish_step(out)
        return out

    # -- AI messages

    def _ai(self, message: Any, out: list[Chunk]) -> None:
        whole = getattr(message, "type", None) == "ai"
        message_id = message.id or f"lc-{self._calls}"
        state = self._messages.get(message_id)
        if message_id in self._done:
            return
        if state is None:
            state = self._begin(message_id, out)
        elif state.ended:
            return  # a finished message again (a node returning what it streamed)
        step = self._step
        assert step is not None
        for block in _blocks(message):
            if block.get("type") == "reasoning" and isinstance(block.get("reasoning"), str):
                self._parts.delta("reasoning", f"{message_id}-reasoning", block["reasoning"], out)
            elif block.get("type") == "text" and isinstance(block.get("text"), str):
                self._parts.end(f"{message_id}-reasoning", out)
                self._parts.delta("text", f"{message_id}-text", block["text"], out)
        if whole:
            for i, call in enumerate(getattr(message, "tool_calls", None) or []):
                self._tool_delta(state, {"index": i, "id": call.get("id"), "name": call.get("name"),
                                         "args": json.dumps(call.get("args") or {})}, out)
        for call in getattr(message, "tool_call_chunks", None) or []:
            self._tool_delta(state, call, out)
        self._usage(message, step)
        if whole or getattr(message, "chunk_position", None) == "last":
            self._end(state, out)

    def _begin(self, message_id: str, out: list[Chunk]) -> _Message:
        # A new model call is a new step, unless another one is still
        # streaming beside it (parallel nodes).
        if self._step is not None and all(m.ended for m in self._messages.values()):
            self._finish_step(out)
        if self._step is None:
            self._step = StepResult()
            self._parts = Parts(self._step)
            self._done.update(self._messages)
            self._messages = {}
            out.append({"type": "start-step"})
        self._calls += 1
        state = self._messages[message_id] = _Message(message_id)
        return state

    def _tool_delta(self, state: _Message, call: Any, out: list[Chunk]) -> None:
        index = call.get("index")
        key = index if index is not None else call.get("id")
        tool = state.tools.get(key)
        if tool is None:
            self._parts.end(f"{state.id}-reasoning", out)
            self._parts.end(f"{state.id}-text", out)
            tool = state.tools[key] = {"id": call.get("id") or f"{state.id}-call-{len(state.tools)}",
                                       "name": call.get("name") or "", "args": ""}
            out.append({"type": "tool-input-start", "toolCallId": tool["id"], "toolName": tool["name"]})
        args = call.get("args")
        if isinstance(args, str) and args:
            tool["args"] += args
            out.append({"type": "tool-input-delta", "toolCallId": tool["id"], "inputTextDelta": args})

    def _usage(self, message: Any, step: StepResult) -> None:
        usage = getattr(message, "usage_metadata", None)
        if usage:
            counts = usage_of(inputTokens=usage.get("input_tokens"), outputTokens=usage.get("output_tokens"),
                              totalTokens=usage.get("total_tokens"))
            for k, v in counts.items():
                step.usage[k] = step.usage.get(k, 0) + v
        meta = getattr(message, "response_metadata", None) or {}
        reason = meta.get("finish_reason") or meta.get("stop_reason")
        if isinstance(reason, str):
            step.finish_reason = _FINISH.get(reason, "other")
        model = meta.get("model_name") or meta.get("model")
        if isinstance(model, str) and model:
            step.model = model

    def _end(self, state: _Message, out: list[Chunk]) -> None:
        if state.ended:
            return
        state.ended = True
        self._parts.end(f"{state.id}-reasoning", out)
        self._parts.end(f"{state.id}-text", out)
        assert self._step is not None
        for tool in state.tools.values():
            out.append(tool_input_done(tool["id"], tool["name"], tool["args"], self._step))

    def _finish_step(self, out: list[Chunk]) -> None:
        step = self._step
        if step is None:
            return
        for state in self._messages.values():
            self._end(state, out)
        if step.finish_reason is None or (step.tool_calls and step.finish_reason == "stop"):
            step.finish_reason = "tool-calls" if step.tool_calls else "stop"
        out += finish_chunks(step)
        self._step = None

    # -- tool results

    def _tool_result(self, message: Any, out: list[Chunk]) -> None:
        call_id = getattr(message, "tool_call_id", None)
        if not isinstance(call_id, str):
            return
        for state in self._messages.values():  # the call's message is complete by now
            if any(t["id"] == call_id for t in state.tools.values()):
                self._end(state, out)
        content = message.content
        if getattr(message, "status", "success") == "error":
            out.append({"type": "tool-output-error", "toolCallId": call_id, "errorText": _plain(content)})
        else:
            out.append({"type": "tool-output-available", "toolCallId": call_id, "output": _jsonable(content)})


def _blocks(message: Any) -> list[dict[str, Any]]:
    """The message's standard content blocks (LangChain 1.x: text, reasoning, …)."""
    try:
        blocks = message.content_blocks
    except Exception:  # a provider format the translators do not know: its plain text
        text = message.content if isinstance(message.content, str) else ""
        blocks = [{"type": "text", "text": text}] if text else []
    return [b for b in blocks if isinstance(b, dict)]


def _plain(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") if isinstance(b, dict) else str(b) for b in content)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


# ---------------------------------------------------------------- history


def to_langchain(history: Iterable[Any]) -> list[Any]:
    """turnline messages → LangChain messages.

    A user message becomes a ``HumanMessage`` (text, or text and image
    blocks), a system message a ``SystemMessage``. Each step of an assistant
    message becomes an ``AIMessage`` (its text and ``tool_calls``) followed by
    one ``ToolMessage`` per result (``status="error"`` for an error, a
    cancelled call included). Reasoning is not sent back; tool calls without a
    result are left out. Ids are turnline's message ids (``-<step>`` for
    assistant steps), so ``add_messages`` sees the same message as the same.
    """
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

    out: list[Any] = []
    for message in history:
        role, parts = role_and_parts(message)
        message_id = message["id"] if isinstance(message, dict) else message.id
        if role == "system":
            out.append(SystemMessage(text_of(parts), id=message_id))
        elif role == "user":
            out.append(HumanMessage(_user_content(parts), id=message_id))
        else:
            for i, step in enumerate(steps(parts)):
                results = [r for r in map(tool_result, step) if r is not None]
                text = text_of(step)
                if not text and not results:
                    continue
                calls = [{"id": r.call_id, "name": r.name, "args": r.input if isinstance(r.input, dict) else {},
                          "type": "tool_call"} for r in results]
                out.append(AIMessage(text, tool_calls=calls, id=f"{message_id}-{i}"))
                out += [ToolMessage(r.output, tool_call_id=r.call_id, name=r.name, id=f"{r.call_id}-result",
                                    status="error" if r.is_error else "success") for r in results]
    return out


def _user_content(parts: list[dict[str, Any]]) -> Any:
    if not any(is_image(p) for p in parts):
        return text_of(parts)
    content: list[Any] = []
    for p in parts:
        if p.get("type") == "text" and p.get("text"):
            content.append({"type": "text", "text": p["text"]})
        elif is_image(p):
            inline = data_url(p["url"])
            if inline is not None:
                content.append({"type": "image", "base64": inline[1], "mime_type": inline[0]})
            else:
                content.append({"type": "image", "url": p["url"]})
    return content


# ---------------------------------------------------------------- the thread


def _resets_thread(graph: Any, input_key: str) -> bool:
    """Whether the input must clear the thread's messages first: the graph
    keeps a thread (a checkpointer) and merges ``input_key`` with
    ``add_messages`` (which honours ``REMOVE_ALL_MESSAGES``)."""
    from langgraph.graph.message import add_messages

    if getattr(graph, "checkpointer", None) in (None, False):
        return False
    channel = (getattr(graph, "channels", None) or {}).get(input_key)
    operator = getattr(channel, "operator", None)
    return operator is add_messages or getattr(operator, "__name__", "") in ("add_messages", "_add_messages")


def _remove_all() -> Any:
    from langchain_core.messages import RemoveMessage
    from langgraph.graph.message import REMOVE_ALL_MESSAGES

    return RemoveMessage(id=REMOVE_ALL_MESSAGES)


def _require_langgraph() -> None:
    try:
        import langchain_core  # noqa: F401
        import langgraph  # noqa: F401
    except ImportError as exc:
        raise ImportError("serving a LangGraph graph needs LangGraph: pip install 'turnline[langgraph]'") from exc


__all__ = ["LangGraphDecoder", "is_langgraph", "langgraph_agent", "run_config", "stop_on_abort", "stream_graph",
           "to_langchain"]
