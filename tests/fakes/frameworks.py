"""Test models for the framework adapters, built on each framework's own test
models, with a gate that lets them produce one token per permit the test
grants (so a race is ordered by the test, never by sleeping).

- :class:`ScriptedChatModel`: LangChain's ``GenericFakeChatModel`` that also
  streams tool calls (``tool_call_chunks``), natively in sync (``_stream``)
  and async (``_astream``), and records the messages each call was given;
- :func:`gated_stream_function`: a PydanticAI ``FunctionModel`` stream
  function playing a script the same way.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator, Iterator

WAIT = 10.0  # the longest a model waits for a permit before it gives up (a test bug)


class TokenGate:
    """Permits for tokens, granted from the test thread and taken by a model
    in a worker thread (``take``) or on an event loop (``atake``). Counts the
    tokens produced; ``finished`` is set when a model's stream ended (done,
    failed or closed)."""

    def __init__(self, open: bool = False) -> None:
        self._cond = threading.Condition()
        self._allowed = 1 << 30 if open else 0
        self._taken = 0
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.produced = 0
        self.finished = threading.Event()

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._allowed += n
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))

    def take(self) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._taken < self._allowed, WAIT):
                raise TimeoutError("the test granted no token")
            self._taken += 1

    async def atake(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):
            while True:
                with self._cond:
                    if self._taken < self._allowed:
                        self._taken += 1
                        return
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
                await fut

    def wait_finished(self) -> None:
        assert self.finished.wait(WAIT), "the model's stream did not end"


# ---------------------------------------------------------------- LangChain


def _scripted_chat_model_class() -> Any:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessageChunk
    from langchain_core.outputs import ChatGenerationChunk

    class ScriptedChatModel(GenericFakeChatModel):
        """Streams each scripted ``AIMessage``: its text word by word, then
        each tool call's arguments in two fragments; one gate permit per chunk."""

        gate: Any = None
        calls: list = []  # the messages each call was given

        def _chunks(self, messages: list[Any]) -> Iterator[Any]:
            self.calls.append(list(messages))
            message = next(self.messages)
            words = message.content.split(" ") if message.content else []
            for i, word in enumerate(words):
                yield AIMessageChunk(content=word + (" " if i < len(words) - 1 or message.tool_calls else ""),
                                     id=message.id)
            for i, call in enumerate(message.tool_calls):
                args = json.dumps(call["args"])
                yield AIMessageChunk(content="", id=message.id, tool_call_chunks=[
                    {"name": call["name"], "args": args[:5], "id": call["id"], "index": i}])
                yield AIMessageChunk(content="", id=message.id, tool_call_chunks=[
                    {"name": None, "args": args[5:], "id": None, "index": i}])

        def _stream(self, messages: list[Any], stop: Any = None, run_manager: Any = None,
                    **kwargs: Any) -> Iterator[Any]:
            try:
                for message in self._chunks(messages):
                    self.gate.take()
                    self.gate.produced += 1
                    chunk = ChatGenerationChunk(message=message)
                    if run_manager:
                        run_manager.on_llm_new_token(message.content, chunk=chunk)
                    yield chunk
            finally:
                self.gate.finished.set()

        async def _astream(self, messages: list[Any], stop: Any = None, run_manager: Any = None,
                           **kwargs: Any) -> AsyncIterator[Any]:
            try:
                for message in self._chunks(messages):
                    await self.gate.atake()
                    self.gate.produced += 1
                    chunk = ChatGenerationChunk(message=message)
                    if run_manager:
                        await run_manager.on_llm_new_token(message.content, chunk=chunk)
                    yield chunk
            finally:
                self.gate.finished.set()

    return ScriptedChatModel


def scripted_chat_model(script: list[Any], gate: TokenGate) -> Any:
    """``script``: ``AIMessage``s (or strings), one per model call, in order."""
    from langchain_core.messages import AIMessage

    messages = [AIMessage(m) if isinstance(m, str) else m for m in script]
    return _scripted_chat_model_class()(messages=iter(messages), gate=gate, calls=[])


# ---------------------------------------------------------------- PydanticAI


def gated_stream_function(script: list[Any], gate: TokenGate, calls: list[Any]) -> Any:
    """A ``FunctionModel`` stream function: each model request plays the next
    script entry, a string (streamed word by word) or a
    ``(text, [(tool_name, args, call_id), ...])`` pair (the tool calls' JSON
    arguments in two fragments), one gate permit per delta."""
    from pydantic_ai.models.function import DeltaToolCall

    entries = iter(script)

    async def stream(messages: list[Any], info: Any) -> AsyncIterator[Any]:
        calls.append(list(messages))
        entry = next(entries)
        text, tools = (entry, []) if isinstance(entry, str) else entry
        words = text.split(" ") if text else []
        deltas: list[Any] = [w + (" " if i < len(words) - 1 or tools else "") for i, w in enumerate(words)]
        for i, (name, args, call_id) in enumerate(tools):
            raw = json.dumps(args)
            deltas.append({i: DeltaToolCall(name=name, json_args=raw[:5], tool_call_id=call_id)})
            deltas.append({i: DeltaToolCall(json_args=raw[5:])})
        try:
            for delta in deltas:
                await gate.atake()
                gate.produced += 1
                yield delta
        finally:
            gate.finished.set()

    return stream
