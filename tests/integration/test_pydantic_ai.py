"""A PydanticAI agent served by turnline (turnline.agent.adapters), with
PydanticAI's own ``FunctionModel`` (a stream function behind a token gate,
tests/fakes/frameworks.py) and ``TestModel``, in a real server, over a raw
WebSocket:

- streamed text, a tool call with incremental arguments and its result fold
  to the message; the next run's ``message_history`` is that message;
- a cancel mid-stream stops the run: the model produces at most one more
  delta however many it is then allowed;
- a cancel while a tool runs (async: cancelled; sync: its late result is not
  written) ends the turn cancelled with the tool part closed, and the next run
  sees the cut call as a failed one.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest

pytest.importorskip("pydantic_ai")

from pydantic_ai import Agent as PydanticAgent  # noqa: E402
from pydantic_ai.models.function import FunctionModel  # noqa: E402
from pydantic_ai.models.test import TestModel  # noqa: E402

from fakes.frameworks import TokenGate, gated_stream_function  # noqa: E402
from turnline.agent import RuntimeConfig  # noqa: E402
from turnline.agent.adapters import pydantic_ai_agent  # noqa: E402
from wsraw import Gate, RawWS, settled_log, text_of  # noqa: E402

WEATHER = ("weather", {"city": "Paris"}, "call-1")


def make_agent(script: list[Any], gate: TokenGate, calls: list[Any], *, sync_tool: bool = False,
               tool_gate: Any = None) -> Any:
    agent = PydanticAgent(FunctionModel(stream_function=gated_stream_function(script, gate, calls)))
    if sync_tool:
        @agent.tool_plain
        def weather(city: str) -> dict[str, str]:
            """The weather in a city."""
            if tool_gate is not None:
                tool_gate.started.set()
                assert tool_gate.thread_release.wait(10)
                tool_gate.returned.set()
            return {"city": city, "forecast": "sunny"}
    else:
        @agent.tool_plain
        async def weather(city: str) -> dict[str, str]:  # type: ignore[misc]
            """The weather in a city."""
            if tool_gate is not None:
                tool_gate.started.set()
                try:
                    await tool_gate.loop_release.wait()
                except asyncio.CancelledError:
                    tool_gate.cancelled.set()
                    raise
                tool_gate.returned.set()
            return {"city": city, "forecast": "sunny"}
    return agent


class ToolGate:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.returned = threading.Event()
        self.cancelled = threading.Event()
        self.thread_release = threading.Event()
        self.loop_release = Gate()

    def release(self, srv: Any) -> None:
        self.thread_release.set()
        self.loop_release.open(srv)


async def client(srv: Any) -> tuple[RawWS, str]:
    ws = await RawWS.open(srv.ws, srv.token())
    session = f"pai-{uuid.uuid4().hex[:8]}"
    await ws.subscribe(session)
    return ws, session


async def start_turn(ws: RawWS, session: str, text: str) -> str:
    ack = await ws.say(session, text)
    assert ack["op"] == "ack", ack
    (turn_id,) = ack["turn_ids"]
    return turn_id


def chunks(ws: RawWS, session: str, turn_id: str) -> list[dict[str, Any]]:
    return [e["chunk"] for e in ws.find(session, "chunk", turn_id=turn_id)]


def deltas(ws: RawWS, session: str, turn_id: str) -> int:
    return sum(c["type"] == "text-delta" for c in chunks(ws, session, turn_id))


def parts_of(messages: list[Any]) -> list[tuple[str, Any]]:
    """PydanticAI messages as (part kind, content or args) pairs."""
    out = []
    for m in messages:
        for p in m.parts:
            if p.part_kind in ("user-prompt", "text"):
                out.append((p.part_kind, p.content))
            elif p.part_kind == "tool-call":
                out.append((p.part_kind, p.args_as_dict()))
            elif p.part_kind == "tool-return":
                out.append((p.part_kind, (p.content, p.outcome)))
    return out


# ---------------------------------------------------------------- streaming


async def test_text_tool_call_and_result_stream(serve: Any) -> None:
    gate, calls = TokenGate(open=True), []
    agent = make_agent([("Let me check.", [WEATHER]), "It is sunny in Paris.", "You are welcome."], gate, calls)
    srv = serve(agent=agent)  # the PydanticAI agent as it is: as_agent wraps it
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, "weather in paris?")
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "complete", end
    streamed = chunks(ws, session, turn_id)
    assert [c["type"] for c in streamed] == [
        "start", "start-step", "text-start", "text-delta", "text-delta", "text-delta", "text-end",
        "tool-input-start", "tool-input-delta", "tool-input-delta", "tool-input-available",
        "tool-output-available", "finish-step", "message-metadata",
        "start-step", "text-start", *["text-delta"] * 5, "text-end", "finish-step", "message-metadata",
        "message-metadata", "finish"]
    by_type = {c["type"]: c for c in streamed}
    assert by_type["tool-input-start"] == {"type": "tool-input-start", "toolCallId": "call-1", "toolName": "weather"}
    assert by_type["tool-input-available"]["input"] == {"city": "Paris"}
    assert by_type["tool-output-available"] == {"type": "tool-output-available", "toolCallId": "call-1",
                                                "output": {"city": "Paris", "forecast": "sunny"}}
    parts = end["message"]["parts"]
    assert [p["type"] for p in parts] == ["step-start", "text", "tool-weather", "step-start", "text"]
    assert parts[2]["state"] == "output-available"
    assert text_of(end["message"]) == "Let me check. It is sunny in Paris."
    assert end["message"]["metadata"]["usage"]["outputTokens"] > 0

    # The next run's message_history is the conversation, by PydanticAI's own loader.
    await ws.completes(session, "thanks")
    assert parts_of(calls[-1]) == [
        ("user-prompt", "weather in paris?"), ("text", "Let me check. "), ("tool-call", {"city": "Paris"}),
        ("tool-return", ({"city": "Paris", "forecast": "sunny"}, "success")), ("text", "It is sunny in Paris."),
        ("user-prompt", "thanks")]
    await ws.close()


async def test_test_model_agent_runs(serve: Any) -> None:
    srv = serve(agent=PydanticAgent(TestModel(custom_output_text="Hello from PydanticAI.")))
    ws, session = await client(srv)
    end = await ws.completes(session, "hi")
    assert text_of(end["message"]) == "Hello from PydanticAI."
    await ws.close()


# ---------------------------------------------------------------- cancel


async def test_cancel_mid_stream_stops_the_run(serve: Any) -> None:
    gate, calls = TokenGate(), []
    agent = make_agent([" ".join(f"tok{i}" for i in range(8)), "Fine."], gate, calls)
    srv = serve(agent=pydantic_ai_agent(agent), config=RuntimeConfig(abort_grace_s=60))
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, "count")
    gate.allow(5)
    await ws.wait_until(lambda: deltas(ws, session, turn_id) == 5, what="five text deltas")
    # The user's screen showed three of them when they pressed stop.
    seen = [e for e in ws.find(session, "chunk", turn_id=turn_id) if e["chunk"]["type"] == "text-delta"][2]["seq"]
    await ws.ok({"op": "cancel", "session": session, "seen": seen})
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "cancelled", end
    assert text_of(end["message"]) == "tok0 tok1 tok2 "
    gate.allow(8)
    gate.wait_finished()  # the model's stream was closed ...
    assert gate.produced - 5 <= 1, gate.produced  # ... at once, not drained
    await ws.completes(session, "go on")
    assert parts_of(calls[-1]) == [("user-prompt", "count"), ("text", "tok0 tok1 tok2 "), ("user-prompt", "go on")]
    await ws.close()


@pytest.mark.parametrize("sync", [False, True], ids=["async-tool", "sync-tool"])
async def test_cancel_mid_tool(serve: Any, sync: bool) -> None:
    gate, calls, tool_gate = TokenGate(open=True), [], ToolGate()
    agent = make_agent([("Checking.", [WEATHER]), "Never said.", "Okay."], gate, calls, sync_tool=sync,
                       tool_gate=tool_gate)
    srv = serve(agent=pydantic_ai_agent(agent), config=RuntimeConfig(abort_grace_s=60))
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, "weather in paris?")
    await ws.wait_event(session, "chunk", turn_id=turn_id, chunk={
        "type": "tool-input-available", "toolCallId": "call-1", "toolName": "weather", "input": {"city": "Paris"}})
    assert await asyncio.to_thread(tool_gate.started.wait, 10)
    await ws.ok({"op": "cancel", "session": session})
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "cancelled", end
    tool_part = end["message"]["parts"][2]
    assert (tool_part["type"], tool_part["state"], tool_part["errorText"]) == (
        "tool-weather", "output-error", "cancelled")
    if sync:  # a sync tool's thread cannot be interrupted: it returns, and its result is dropped
        tool_gate.release(srv)
        assert await asyncio.to_thread(tool_gate.returned.wait, 10)
    else:  # an async tool is cancelled where it waits
        assert await asyncio.to_thread(tool_gate.cancelled.wait, 10)
        tool_gate.release(srv)
    await ws.completes(session, "never mind")
    assert len(calls) == 2  # the model was not asked again in the cancelled turn
    assert parts_of(calls[-1])[-3:] == [("tool-call", {"city": "Paris"}), ("tool-return", ("cancelled", "failed")),
                                        ("user-prompt", "never mind")]
    log = await settled_log(srv, session)
    assert [e for e in log if e["type"] == "chunk" and e["chunk"]["type"].startswith("tool-output")] == []
    await ws.close()
