"""Pure parts of the provider adapters: history conversion to each provider's
format, the SSE line decoder, and the event decoders (events in, chunks out)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from turnline.agent.providers import (
    ProviderError, to_anthropic, to_openai_chat, to_openai_responses,
)
from turnline.agent.providers._base import SSELines, http_error
from turnline.agent.providers.anthropic import MessagesDecoder
from turnline.agent.providers.openai_chat import ChatDecoder
from turnline.agent.providers.openai_responses import ResponsesDecoder
from turnline.core.fold import fold
from turnline.protocol import Message

PNG = "data:image/png;base64,iVBORw0KGgo="


def history() -> list[Any]:
    """A system prompt, a question with two images, an answer in two steps
    (a tool that ran, one that failed, one cut before it ran; then the text),
    and a follow-up question. A Message struct and plain dicts are both read."""
    return [
        {"role": "system", "parts": [{"type": "text", "text": "Be brief."}]},
        Message(id="u1", role="user", parent_id=None, parts=[
            {"type": "text", "text": "What is in these?"},
            {"type": "file", "mediaType": "image/png", "url": PNG},
            {"type": "file", "mediaType": "image/jpeg", "url": "https://example.com/cat.jpg"},
        ]),
        {"role": "assistant", "parts": [
            {"type": "step-start"},
            {"type": "reasoning", "text": "Look closer.", "state": "done",
             "providerMetadata": {"anthropic": {"signature": "sig-1"}}},
            {"type": "text", "text": "Let me zoom.", "state": "done"},
            {"type": "tool-zoom", "toolCallId": "c1", "state": "output-available", "input": {"level": 2},
             "output": {"ok": True}},
            {"type": "dynamic-tool", "toolName": "crop", "toolCallId": "c2", "state": "output-error",
             "input": {"x": 1}, "errorText": "cancelled"},
            {"type": "tool-zoom", "toolCallId": "c3", "state": "input-available", "input": {"level": 3}},
            {"type": "step-start"},
            {"type": "reasoning", "text": "unsigned thoughts", "state": "done"},
            {"type": "text", "text": "A cat.", "state": "done"},
        ]},
        {"role": "user", "parts": [{"type": "text", "text": "Sure?"}]},
    ]


def test_to_openai_chat() -> None:
    assert to_openai_chat(history(), system="Top.") == [
        {"role": "system", "content": "Top."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "image_url", "image_url": {"url": PNG}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]},
        {"role": "assistant", "content": "Let me zoom.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": '{"level": 2}'}},
            {"id": "c2", "type": "function", "function": {"name": "crop", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"ok": true}'},
        {"role": "tool", "tool_call_id": "c2", "content": "cancelled"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]


def test_to_openai_responses() -> None:
    assert to_openai_responses(history()) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "input_text", "text": "What is in these?"},
            {"type": "input_image", "image_url": PNG},
            {"type": "input_image", "image_url": "https://example.com/cat.jpg"}]},
        {"role": "assistant", "content": "Let me zoom."},
        {"type": "function_call", "call_id": "c1", "name": "zoom", "arguments": '{"level": 2}'},
        {"type": "function_call", "call_id": "c2", "name": "crop", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": '{"ok": true}'},
        {"type": "function_call_output", "call_id": "c2", "output": "cancelled"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]


def test_to_anthropic() -> None:
    system, messages = to_anthropic(history())
    assert system == "Be brief."
    assert messages == [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Look closer.", "signature": "sig-1"},
            {"type": "text", "text": "Let me zoom."},
            {"type": "tool_use", "id": "c1", "name": "zoom", "input": {"level": 2}},
            {"type": "tool_use", "id": "c2", "name": "crop", "input": {"x": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": '{"ok": true}'},
            {"type": "tool_result", "tool_use_id": "c2", "content": "cancelled", "is_error": True}]},
        # the unsigned reasoning is left out; the next step and the question merge by role
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ]


def test_an_empty_interrupted_answer_sends_nothing() -> None:
    hist = [{"role": "user", "parts": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "parts": [{"type": "step-start"}, {"type": "text", "text": "", "state": "done"}]},
            {"role": "user", "parts": [{"type": "text", "text": "Hello?"}]}]
    assert to_openai_chat(hist) == [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]
    assert to_openai_responses(hist) == to_openai_chat(hist)
    assert to_anthropic(hist)[1] == [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                  {"type": "text", "text": "Hello?"}]}]


def test_a_steering_part_is_a_user_message_where_the_agent_took_it() -> None:
    hist = [{"role": "user", "parts": [{"type": "text", "text": "cats"}]},
            {"role": "assistant", "parts": [
                {"type": "text", "text": "About cats.", "state": "done"},
                {"type": "steering-message", "id": "s1", "parts": [{"type": "text", "text": "dogs"}]},
                {"type": "text", "text": "About dogs.", "state": "done"}]}]
    expected = [{"role": "user", "content": "cats"}, {"role": "assistant", "content": "About cats."},
                {"role": "user", "content": "dogs"}, {"role": "assistant", "content": "About dogs."}]
    assert to_openai_chat(hist) == expected
    assert to_openai_responses(hist) == expected
    assert to_anthropic(hist)[1] == [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                                     for m in expected]


# ---------------------------------------------------------------- SSE lines


def sse_events(text: str) -> list[tuple[str, str]]:
    lines = SSELines()
    return [e for e in map(lines.feed, text.split("\n")) if e is not None]


def test_sse_lines() -> None:
    text = ": keep-alive\n\nevent: a\ndata: 1\ndata:2\n\nid: 7\n\nretry: 5\nevent: b\n\ndata: {\"x\": 1}\n\n"
    assert sse_events(text) == [("a", "1\n2"), ("message", '{"x": 1}')]


# ---------------------------------------------------------------- decoders


def decode(decoder: Any, events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, data in events:
        out += decoder.feed(name, data if isinstance(data, str) else json.dumps(data))
    return out + decoder.close()


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_chat_parallel_tool_calls_and_reasoning_field() -> None:
    d = ChatDecoder()
    chunks = decode(d, [
        ("message", chat_chunk({"role": "assistant", "reasoning": "Hmm."})),
        ("message", chat_chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"q"'}}]})),
        ("message", chat_chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]})),
        ("message", chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': 1}'}}]})),
        ("message", chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{oops"}}]})),
        ("message", chat_chunk({}, "tool_calls")),
        ("message", {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
        ("message", "[DONE]"),
    ])
    message = fold(chunks)
    _step, reasoning, tool_a, tool_b = message.parts
    assert reasoning == {"type": "reasoning", "text": "Hmm.", "state": "done"}
    assert tool_a == {"type": "tool-f", "toolCallId": "a", "state": "input-available", "input": {"q": 1}}
    assert (tool_b["state"], tool_b["input"]) == ("output-error", "{oops")  # arguments that are not JSON
    assert message.metadata == {"finishReason": "tool-calls", "model": "m",
                                "usage": {"inputTokens": 3, "outputTokens": 4, "totalTokens": 7}}
    assert [(c.id, c.name, c.input) for c in d.result.tool_calls] == [("a", "f", {"q": 1}), ("b", "g", "{oops")]
    assert d.result.message["tool_calls"][0] == {"id": "a", "type": "function",
                                                 "function": {"name": "f", "arguments": '{"q": 1}'}}


def test_chat_without_done_is_whole_only_with_a_finish_reason() -> None:
    whole = decode(ChatDecoder(), [("message", chat_chunk({"content": "Hi"}, "stop"))])
    assert [c["type"] for c in whole][-2:] == ["finish-step", "message-metadata"]
    with pytest.raises(ProviderError) as cut:
        decode(ChatDecoder(), [("message", chat_chunk({"content": "Hi"}))])
    assert cut.value.code == "provider_stream_broken"
    with pytest.raises(ProviderError) as failed:
        decode(ChatDecoder(), [("message", {"error": {"message": "boom", "type": "server_error"}})])
    assert failed.value.code == "provider_error" and "boom" in failed.value.message


def test_responses_incomplete_and_failed() -> None:
    d = ResponsesDecoder()
    chunks = decode(d, [
        ("response.created", {"type": "response.created", "response": {"id": "r1", "model": "m"}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "i1",
                                        "content_index": 0, "delta": "Cut"}),
        ("response.incomplete", {"type": "response.incomplete", "response": {
            "incomplete_details": {"reason": "max_output_tokens"}, "usage": {"input_tokens": 1, "output_tokens": 1}}}),
    ])
    assert fold(chunks).parts == [{"type": "step-start"}, {"type": "text", "text": "Cut", "state": "done"}]
    assert d.result.finish_reason == "length"
    with pytest.raises(ProviderError) as failed:
        decode(ResponsesDecoder(), [("response.failed", {"type": "response.failed", "response": {
            "error": {"code": "server_error", "message": "no luck"}}})])
    assert failed.value.code == "provider_error" and "no luck (server_error)" in failed.value.message


def test_anthropic_signature_and_error_events() -> None:
    d = MessagesDecoder()
    chunks = decode(d, [
        ("message_start", {"type": "message_start", "message": {"id": "m1", "model": "c", "usage": {"input_tokens": 5}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "thinking", "thinking": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "thinking_delta", "thinking": "Plan."}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "signature_delta", "signature": "s1"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
                           "usage": {"output_tokens": 9}}),
        ("message_stop", {"type": "message_stop"}),
    ])
    assert {"type": "reasoning-end", "id": "m1-0", "providerMetadata": {"anthropic": {"signature": "s1"}}} in chunks
    assert d.result.usage == {"inputTokens": 5, "outputTokens": 9, "totalTokens": 14}
    assert d.result.finish_reason == "length"
    assert d.result.message == {"role": "assistant",
                                "content": [{"type": "thinking", "thinking": "Plan.", "signature": "s1"}]}
    with pytest.raises(ProviderError) as limited:
        decode(MessagesDecoder(), [("error", {"type": "error", "error": {"type": "rate_limit_error",
                                                                        "message": "slow down"}})])
    assert limited.value.code == "provider_rate_limited"


@pytest.mark.parametrize("decoder", [ChatDecoder, ResponsesDecoder, MessagesDecoder])
def test_malformed_data_is_a_broken_stream(decoder: Any) -> None:
    with pytest.raises(ProviderError) as broken:
        decoder().feed("message", '{"choices": [')
    assert broken.value.code == "provider_stream_broken" and "malformed SSE data" in broken.value.message


# ---------------------------------------------------------------- HTTP errors


@pytest.mark.parametrize("status, headers, code, retry", [
    (401, {}, "provider_auth", None),
    (403, {}, "provider_auth", None),
    (404, {}, "provider_bad_request", None),
    (429, {"retry-after": "12"}, "provider_rate_limited", 12.0),
    (429, {"retry-after-ms": "1500", "retry-after": "9"}, "provider_rate_limited", 1.5),
    (429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, "provider_rate_limited", 0.0),  # a date in the past
    (529, {}, "provider_error", None),
])
def test_http_errors(status: int, headers: dict[str, str], code: str, retry: float | None) -> None:
    request = httpx.Request("POST", "https://user:hunter2@api.example.com/v1/messages?key=secret")
    response = httpx.Response(status, headers=headers, request=request)
    err = http_error("anthropic", response, b'{"type": "error", "error": {"type": "x_error", "message": "nope"}}')
    assert (err.code, err.status, err.retry_after, err.provider_code) == (code, status, retry, "x_error")
    assert err.message.startswith(f"anthropic: HTTP {status} ")
    assert "nope" in err.message and "secret" not in err.message and "hunter2" not in err.message
