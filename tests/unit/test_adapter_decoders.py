"""The framework adapters' decoders (sans-I/O), fed the frameworks' own
message and event objects, folded with turnline's fold; and turnline without
the frameworks installed-or-imported."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from turnline.core.fold import MessageFold


def fold(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    f = MessageFold("m")
    for c in chunks:
        f.add(c)
    assert f.ignored == 0, chunks
    return f.parts


def test_turnline_does_not_import_the_frameworks() -> None:
    code = ("import sys, turnline, turnline.agent, turnline.cli\n"
            "from turnline.agent import as_agent\n"
            "as_agent(lambda turn: None)\n"
            "loaded = [m for m in ('langgraph', 'langchain_core', 'pydantic_ai') if m in sys.modules]\n"
            "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- LangGraph


def test_langgraph_reasoning_text_whole_messages_and_tool_errors() -> None:
    pytest.importorskip("langgraph")
    from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage

    from turnline.agent.adapters.langgraph import LangGraphDecoder

    d = LangGraphDecoder()
    out: list[dict[str, Any]] = []
    out += d.feed(AIMessageChunk(content=[{"type": "reasoning", "reasoning": "Think."}], id="a"))
    out += d.feed(AIMessageChunk(content="Hi", id="a", usage_metadata={
        "input_tokens": 3, "output_tokens": 1, "total_tokens": 4}))
    out += d.feed(AIMessageChunk(content="", id="a", chunk_position="last",
                                 response_metadata={"finish_reason": "stop", "model_name": "m1"}))
    out += d.feed(AIMessageChunk(content="late", id="a"))  # a finished message again: not written
    out += d.feed(HumanMessage("not an answer"))  # a node's human message: not written
    # a node that returns a whole message with a tool call, not streamed
    out += d.feed(AIMessage("", id="b", tool_calls=[{"name": "f", "args": {"x": 1}, "id": "c1"}]))
    out += d.feed(ToolMessage("boom", tool_call_id="c1", status="error"))
    out += d.close()
    assert [c["type"] for c in out] == [
        "start-step", "reasoning-start", "reasoning-delta", "reasoning-end", "text-start", "text-delta", "text-end",
        "finish-step", "message-metadata",
        "start-step", "tool-input-start", "tool-input-delta", "tool-input-available", "tool-output-error",
        "finish-step", "message-metadata"]
    assert out[8]["messageMetadata"] == {"finishReason": "stop", "model": "m1",
                                         "usage": {"inputTokens": 3, "outputTokens": 1, "totalTokens": 4}}
    assert out[-1]["messageMetadata"] == {"finishReason": "tool-calls"}
    parts = fold([{"type": "start"}, *out])
    assert [p["type"] for p in parts] == ["step-start", "reasoning", "text", "step-start", "tool-f"]
    assert parts[4]["state"] == "output-error" and parts[4]["errorText"] == "boom"


def test_langgraph_parallel_model_calls_share_a_step() -> None:
    pytest.importorskip("langgraph")
    from langchain_core.messages import AIMessageChunk

    from turnline.agent.adapters.langgraph import LangGraphDecoder

    d = LangGraphDecoder()
    out: list[dict[str, Any]] = []
    for i in range(2):  # two nodes' model calls interleaved
        out += d.feed(AIMessageChunk(content=f"a{i} ", id="a"))
        out += d.feed(AIMessageChunk(content=f"b{i} ", id="b"))
    out += d.feed(AIMessageChunk(content="", id="a", chunk_position="last"))
    out += d.feed(AIMessageChunk(content="", id="b", chunk_position="last"))
    out += d.feed(AIMessageChunk(content="c", id="c", chunk_position="last"))  # the next call: a new step
    out += d.close()
    assert sum(c["type"] == "start-step" for c in out) == 2
    parts = fold([{"type": "start"}, *out])
    assert [(p["type"], p.get("text")) for p in parts] == [
        ("step-start", None), ("text", "a0 a1 "), ("text", "b0 b1 "), ("step-start", None), ("text", "c")]


def test_to_langchain_reads_turnline_messages() -> None:
    pytest.importorskip("langgraph")
    from turnline.agent.adapters.langgraph import to_langchain

    history = [
        {"id": "s", "role": "system", "parts": [{"type": "text", "text": "Be brief."}]},
        {"id": "u1", "role": "user", "parts": [
            {"type": "text", "text": "Look"},
            {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAA"}]},
        {"id": "a1", "role": "assistant", "parts": [
            {"type": "step-start"}, {"type": "reasoning", "text": "hidden"}, {"type": "text", "text": "Calling."},
            {"type": "tool-f", "toolCallId": "c1", "state": "output-available", "input": {"x": 1}, "output": {"y": 2}},
            {"type": "tool-g", "toolCallId": "c2", "state": "input-available", "input": {}},  # no result: left out
            {"type": "step-start"}, {"type": "text", "text": "Done."}]},
    ]
    out = to_langchain(history)
    assert [(m.type, m.id) for m in out] == [("system", "s"), ("human", "u1"), ("ai", "a1-0"), ("tool", "c1-result"),
                                             ("ai", "a1-1")]
    assert out[1].content == [{"type": "text", "text": "Look"},
                              {"type": "image", "base64": "AAA", "mime_type": "image/png"}]
    assert out[2].content == "Calling." and [c["id"] for c in out[2].tool_calls] == ["c1"]
    assert out[3].content == '{"y": 2}' and out[3].status == "success"


# ---------------------------------------------------------------- PydanticAI


def test_pydantic_ai_thinking_and_failed_tools() -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai.messages import (
        FunctionToolResultEvent, PartDeltaEvent, PartEndEvent, PartStartEvent, TextPart, ThinkingPart,
        ThinkingPartDelta, ToolCallPart, ToolReturnPart,
    )

    from turnline.agent.adapters.pydantic_ai import PydanticAIDecoder

    d = PydanticAIDecoder()
    out: list[dict[str, Any]] = []
    out += d.feed(PartStartEvent(index=0, part=ThinkingPart(content="Hm")))
    out += d.feed(PartDeltaEvent(index=0, delta=ThinkingPartDelta(content_delta="m.")))
    out += d.feed(PartEndEvent(index=0, part=ThinkingPart(content="Hmm.")))
    call = ToolCallPart(tool_name="f", args={"x": 1}, tool_call_id="c1")  # whole arguments, as some models send
    out += d.feed(PartStartEvent(index=1, part=call))
    out += d.feed(PartEndEvent(index=1, part=call))
    out += d.feed(FunctionToolResultEvent(part=ToolReturnPart(tool_name="f", content="bad x", tool_call_id="c1",
                                                              outcome="failed")))
    out += d.feed(PartStartEvent(index=0, part=TextPart(content="Sorry.")))
    out += d.feed(PartEndEvent(index=0, part=TextPart(content="Sorry.")))
    out += d.close()
    assert [c["type"] for c in out] == [
        "start-step", "reasoning-start", "reasoning-delta", "reasoning-delta", "reasoning-end",
        "tool-input-start", "tool-input-delta", "tool-input-available", "tool-output-error",
        "finish-step", "message-metadata", "start-step", "text-start", "text-delta", "text-end",
        "finish-step", "message-metadata"]
    assert out[7]["input"] == {"x": 1}
    assert "bad x" in out[8]["errorText"]
    parts = fold([{"type": "start"}, *out])
    assert [p["type"] for p in parts] == ["step-start", "reasoning", "tool-f", "step-start", "text"]


def test_to_pydantic_ai_leaves_out_what_it_cannot_send() -> None:
    pytest.importorskip("pydantic_ai")
    from turnline.agent.adapters.pydantic_ai import to_pydantic_ai

    history = [
        {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Hi"}]},
        {"id": "a1", "role": "assistant", "parts": [
            {"type": "step-start"}, {"type": "text", "text": "Calling."},
            {"type": "future-part-type", "text": "?"},  # a part type PydanticAI's models do not know
            {"type": "tool-f", "toolCallId": "c1", "state": "input-available", "input": {}},  # no result
            {"type": "tool-g", "toolCallId": "c2", "state": "output-error", "input": {}, "errorText": "cancelled"}]},
        {"id": "u2", "role": "user", "parts": [{"type": "text", "text": "Again"}]},
    ]
    out = to_pydantic_ai(history)
    kinds = [(p.part_kind, getattr(p, "tool_call_id", None)) for m in out for p in m.parts]
    assert kinds == [("user-prompt", None), ("text", None), ("tool-call", "c2"), ("tool-return", "c2"),
                     ("user-prompt", None)]
