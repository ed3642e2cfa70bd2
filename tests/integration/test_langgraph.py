"""A compiled LangGraph graph served by turnline (turnline.agent.adapters),
with LangChain's own fake chat model (tests/fakes/frameworks.py) inside real
LangGraph graphs, in a real server, over a raw WebSocket:

- tokens, a tool call and its result stream as chunks and fold to the
  message; the next turn's graph input is that message as LangChain messages;
- a cancel stops the run within a token, in an async node and in a sync node
  (LangGraph runs those in a worker thread): the model produces at most one
  token after the cancel however many it is then allowed;
- a cancel while a tool runs (async: the tool is cancelled; sync: its late
  result is not written) ends the turn cancelled with the tool part closed;
- the persisted history is what the user saw, and the graph's thread (its
  checkpointer) is reset to it on the next turn.

Races are ordered with the model's token gate and the tool's gate.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest

pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.graph import START, MessagesState, StateGraph  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402

from fakes.frameworks import TokenGate, scripted_chat_model  # noqa: E402
from turnline.agent import RuntimeConfig  # noqa: E402
from turnline.agent.adapters import langgraph_agent  # noqa: E402
from wsraw import Gate, RawWS, settled_log, text_of  # noqa: E402

WEATHER_CALL = {"name": "weather", "args": {"city": "Paris"}, "id": "call-1"}


class ToolGate:
    """A tool held until the test releases it (a sync tool in its worker
    thread, an async one on the server's loop); says when it started,
    returned or was cancelled."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.returned = threading.Event()
        self.cancelled = threading.Event()
        self._thread_gate = threading.Event()
        self._loop_gate = Gate()

    def wait(self) -> None:
        assert self._thread_gate.wait(10)

    async def await_release(self) -> None:
        await self._loop_gate.wait()

    def release(self, srv: Any) -> None:
        self._thread_gate.set()
        self._loop_gate.open(srv)


def build_graph(model: Any, *, sync: bool, tool_gate: ToolGate | None = None, checkpointer: Any = None) -> Any:
    """An agent node calling ``model`` (sync or async) and a ToolNode with a
    ``weather`` tool (sync or async), looping until the model calls no tool."""

    if sync:
        def agent(state: MessagesState) -> dict[str, Any]:
            return {"messages": [model.invoke(state["messages"])]}

        @tool
        def weather(city: str) -> dict[str, str]:
            """The weather in a city."""
            if tool_gate is not None:
                tool_gate.started.set()
                tool_gate.wait()
                tool_gate.returned.set()
            return {"city": city, "forecast": "sunny"}
    else:
        async def agent(state: MessagesState) -> dict[str, Any]:  # type: ignore[misc]
            return {"messages": [await model.ainvoke(state["messages"])]}

        @tool
        async def weather(city: str) -> dict[str, str]:  # type: ignore[misc]
            """The weather in a city."""
            if tool_gate is not None:
                tool_gate.started.set()
                try:
                    await tool_gate.await_release()
                except asyncio.CancelledError:
                    tool_gate.cancelled.set()
                    raise
                tool_gate.returned.set()
            return {"city": city, "forecast": "sunny"}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode([weather]))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", tools_condition)
    g.add_edge("tools", "agent")
    return g.compile(checkpointer=checkpointer)


async def client(srv: Any) -> tuple[RawWS, str]:
    ws = await RawWS.open(srv.ws, srv.token())
    session = f"lg-{uuid.uuid4().hex[:8]}"
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


def kinds(messages: list[Any]) -> list[tuple[str, Any]]:
    """LangChain messages as (type, content) pairs, ignoring ids."""
    return [(m.type, m.content) for m in messages]


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_tokens_tool_call_and_result_stream(serve: Any, sync: bool) -> None:
    gate = TokenGate(open=True)
    model = scripted_chat_model([AIMessage("Let me check.", tool_calls=[WEATHER_CALL]), "It is sunny in Paris.",
                                 "You are welcome."], gate)
    srv = serve(agent=langgraph_agent(build_graph(model, sync=sync)))
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, "weather in paris?")
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "complete", end
    streamed = chunks(ws, session, turn_id)
    assert [c["type"] for c in streamed] == [
        "start", "start-step", "text-start", "text-delta", "text-delta", "text-delta", "text-end",
        "tool-input-start", "tool-input-delta", "tool-input-delta", "tool-input-available",
        "tool-output-available", "finish-step", "message-metadata",
        "start-step", "text-start", *["text-delta"] * 5, "text-end", "finish-step", "message-metadata", "finish"]
    by_type = {c["type"]: c for c in streamed}
    assert by_type["tool-input-start"]["toolName"] == "weather"
    assert by_type["tool-input-available"]["input"] == {"city": "Paris"}
    assert by_type["tool-output-available"] == {"type": "tool-output-available", "toolCallId": "call-1",
                                                "output": '{"city": "Paris", "forecast": "sunny"}'}
    assert [c["messageMetadata"]["finishReason"] for c in streamed if c["type"] == "message-metadata"] == [
        "tool-calls", "stop"]
    parts = end["message"]["parts"]
    assert [p["type"] for p in parts] == ["step-start", "text", "tool-weather", "step-start", "text"]
    assert parts[1]["text"] == "Let me check. "
    assert parts[2]["state"] == "output-available" and parts[2]["input"] == {"city": "Paris"}
    assert parts[4]["text"] == "It is sunny in Paris."

    # The next turn's graph input is the conversation as LangChain messages.
    await ws.completes(session, "thanks")
    first, second, third = model.calls
    assert kinds(first) == [("human", "weather in paris?")]
    assert kinds(third) == [("human", "weather in paris?"), ("ai", "Let me check. "),
                            ("tool", '{"city": "Paris", "forecast": "sunny"}'), ("ai", "It is sunny in Paris."),
                            ("human", "thanks")]
    assert third[1].tool_calls == [{**WEATHER_CALL, "type": "tool_call"}]
    assert isinstance(third[2], ToolMessage) and third[2].tool_call_id == "call-1"
    await ws.close()


async def test_a_subgraph_streams_its_tokens(serve: Any) -> None:
    # A node that is itself a compiled graph (as a prebuilt agent is).
    model = scripted_chat_model(["Hello from the inner graph."], TokenGate(open=True))
    inner = build_graph(model, sync=False)
    outer = StateGraph(MessagesState)
    outer.add_node("inner", inner)
    outer.add_edge(START, "inner")
    srv = serve(agent=outer.compile())
    ws, session = await client(srv)
    end = await ws.completes(session, "hi")
    assert text_of(end["message"]) == "Hello from the inner graph."  # once: the node's output is not repeated
    assert deltas(ws, session, end["turn_id"]) == 5  # token by token, not the final message at once
    await ws.close()


# ---------------------------------------------------------------- cancel mid-stream


@pytest.mark.parametrize("sync", [False, True], ids=["async-node", "sync-node"])
async def test_cancel_stops_the_node_within_a_token(serve: Any, sync: bool) -> None:
    gate = TokenGate()
    model = scripted_chat_model([" ".join(f"tok{i}" for i in range(8)), "Fine."], gate)
    saver = InMemorySaver()
    graph = build_graph(model, sync=sync, checkpointer=saver)
    # A long grace: only the adapter itself may stop the node in time.
    srv = serve(agent=langgraph_agent(graph), config=RuntimeConfig(abort_grace_s=60))
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
    # However many tokens the model may produce now, the node stopped at its
    # next one: a sync node's thread raises in the token callback.
    gate.allow(8)
    gate.wait_finished()
    assert gate.produced - 5 <= 1, gate.produced
    # What was seen is what is persisted, and what the graph is given next.
    await ws.completes(session, "go on")
    assert kinds(model.calls[-1]) == [("human", "count"), ("ai", "tok0 tok1 tok2 "), ("human", "go on")]
    # The session is the graph's thread: the checkpointer holds it, reset to turnline's history.
    state = await graph.aget_state({"configurable": {"thread_id": session}})
    assert kinds(state.values["messages"]) == [("human", "count"), ("ai", "tok0 tok1 tok2 "), ("human", "go on"),
                                               ("ai", "Fine.")]
    log = await settled_log(srv, session)
    written = [e["chunk"]["delta"] for e in log if e.get("turn_id") == turn_id and e["type"] == "chunk"
               and e["chunk"]["type"] == "text-delta"]
    assert written == [f"tok{i} " for i in range(5)]  # the log: what streamed before the cancel, nothing after
    await ws.close()


# ---------------------------------------------------------------- cancel mid-tool


@pytest.mark.parametrize("sync", [False, True], ids=["async-tool", "sync-tool"])
async def test_cancel_mid_tool(serve: Any, sync: bool) -> None:
    gate = TokenGate(open=True)
    tool_gate = ToolGate()
    model = scripted_chat_model([AIMessage("Checking.", tool_calls=[WEATHER_CALL]), "Never said.", "Okay."], gate)
    # With a checkpointer: the cancelled run checkpointed the model's tool call
    # before the tool ran; the next turn must not see it twice.
    graph = build_graph(model, sync=sync, tool_gate=tool_gate, checkpointer=InMemorySaver())
    srv = serve(agent=langgraph_agent(graph), config=RuntimeConfig(abort_grace_s=60))
    ws, session = await client(srv)
    turn_id = await start_turn(ws, session, "weather in paris?")
    await ws.wait_event(session, "chunk", turn_id=turn_id, chunk={
        "type": "tool-input-available", "toolCallId": "call-1", "toolName": "weather", "input": {"city": "Paris"}})
    assert await asyncio.to_thread(tool_gate.started.wait, 10)
    await ws.ok({"op": "cancel", "session": session})
    end = await ws.turn_end(session, turn_id)
    assert end["reason"] == "cancelled", end
    tool_part = end["message"]["parts"][2]
    assert tool_part["type"] == "tool-weather"
    assert (tool_part["state"], tool_part["errorText"]) == ("output-error", "cancelled")
    if sync:  # a sync tool cannot be interrupted: it returns, and its result is dropped
        tool_gate.release(srv)
        assert await asyncio.to_thread(tool_gate.returned.wait, 10)
    else:  # an async tool is cancelled where it waits
        assert await asyncio.to_thread(tool_gate.cancelled.wait, 10)
        tool_gate.release(srv)
    # the session goes on; the cut tool call is in the history as a failed call
    await ws.completes(session, "never mind")
    assert kinds(model.calls[-1]) == [("human", "weather in paris?"), ("ai", "Checking. "), ("tool", "cancelled"),
                                      ("human", "never mind")]
    assert model.calls[-1][-2].status == "error"
    log = await settled_log(srv, session)
    outputs = [e for e in log if e["type"] == "chunk" and e["chunk"]["type"].startswith("tool-output")]
    assert outputs == []  # the tool's late result was never written
    assert len(model.calls) == 2  # the model was not called again in the cancelled turn
    assert not tool_gate.returned.is_set() or sync
    await ws.close()
