"""OpenAI Chat Completions (``POST {base_url}/chat/completions``, ``stream: true``).

Also the wire of vLLM, Ollama (``/v1``), llama.cpp server, LiteLLM and most
OpenAI-compatible servers: point ``base_url`` at them. Reasoning deltas are
read from ``delta.reasoning_content`` (vLLM, DeepSeek) or ``delta.reasoning``
(Ollama, OpenRouter, newer vLLM).
"""

from __future__ import annotations

from typing import Any, Iterable

import httpx

from ..signal import AbortSignal
from ._base import (
    Chunk, ProviderError, ProviderErrorCode, ProviderStream, StepDecoder, endpoint, finish_chunks,
    parse_json_event, request_headers, tool_input_done, usage_of,
)
from ._history import arguments_text, conversation, output_text, steps, text_of, tool_result, user_content

PROVIDER = "openai.chat"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool-calls", "function_call": "tool-calls",
           "content_filter": "content-filter"}


def openai_chat(*, model: str, messages: list[dict[str, Any]] | None = None, history: Iterable[Any] | None = None,
                system: str | None = None, base_url: str | None = None, api_key: str | None = None,
                headers: dict[str, str] | None = None, client: httpx.AsyncClient | None = None,
                signal: AbortSignal | None = None, timeout: httpx.Timeout | float | None = None,
                **params: Any) -> ProviderStream:
    """Stream one chat completion as turnline chunks.

    Give ``messages`` (Chat Completions format) or ``history`` (turnline
    messages, e.g. ``turn.history``, converted with :func:`to_openai_chat`).
    ``params`` go into the request body as they are (``tools``,
    ``temperature``, ``max_tokens``, …). ``base_url`` and ``api_key`` default
    to ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``; without a key no
    ``Authorization`` header is sent (local servers).
    """
    if messages is None:
        messages = to_openai_chat(history or [], system=system)
    elif system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    base, key = endpoint("OPENAI", base_url, api_key, DEFAULT_BASE_URL)
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}, **params}
    head = request_headers({"authorization": f"Bearer {key}"} if key else {}, headers)
    return ProviderStream(provider=PROVIDER, url=f"{base}/chat/completions", headers=head, body=body,
                          decoder=ChatDecoder(), client=client, signal=signal, timeout=timeout)


class ChatDecoder(StepDecoder):
    """``chat.completion.chunk`` events → chunks. The first choice is read."""

    def __init__(self) -> None:
        super().__init__()
        self._tools: dict[int, dict[str, str]] = {}  # index -> id, name, args
        self._closed = False

    def feed(self, event: str, data: str) -> list[Chunk]:
        out: list[Chunk] = []
        if data.strip() == "[DONE]":
            self._start(out)
            self._close_parts(out)
            out += finish_chunks(self.result)
            return out
        obj = parse_json_event(PROVIDER, data)
        if obj.get("error"):
            err = obj["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            code = (err.get("code") or err.get("type")) if isinstance(err, dict) else None
            raise ProviderError(ProviderErrorCode.ERROR, PROVIDER, f"error event in the stream: {message}",
                                provider_code=str(code) if code else None)
        self._start(out)
        self.result.response_id = self.result.response_id or obj.get("id")
        self.result.model = self.result.model or obj.get("model")
        if isinstance(obj.get("usage"), dict):
            self.result.usage = _usage(obj["usage"])
        choices = obj.get("choices") or []
        choice = next((c for c in choices if c.get("index", 0) == 0), None)
        if choice is None:
            return out
        delta = choice.get("delta") or {}
        base_id = self.result.response_id or "chat"
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            self._parts.delta("reasoning", f"{base_id}-reasoning", reasoning, out)
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._parts.end_all(out, "reasoning")
            self._parts.delta("text", f"{base_id}-text", content, out)
        for call in delta.get("tool_calls") or []:
            self._tool_delta(call, out)
        if choice.get("finish_reason"):
            self.result.finish_reason = _FINISH.get(choice["finish_reason"], "other")
            self._close_parts(out)
        return out

    def _tool_delta(self, call: dict[str, Any], out: list[Chunk]) -> None:
        self._parts.end_all(out)
        index = call.get("index")
        if not isinstance(index, int):  # some servers send whole calls without an index
            index = len(self._tools) if call.get("id") else max(self._tools, default=0)
        fn = call.get("function") or {}
        tool = self._tools.get(index)
        if tool is None:
            tool = self._tools[index] = {"id": call.get("id") or f"call-{index}", "name": fn.get("name") or "",
                                         "args": ""}
            out.append({"type": "tool-input-start", "toolCallId": tool["id"], "toolName": tool["name"]})
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            tool["args"] += args
            out.append({"type": "tool-input-delta", "toolCallId": tool["id"], "inputTextDelta": args})

    def _close_parts(self, out: list[Chunk]) -> None:
        if self._closed:
            return
        self._closed = True
        self._parts.end_all(out)
        for tool in self._tools.values():
            out.append(tool_input_done(tool["id"], tool["name"], tool["args"], self.result))
        message: dict[str, Any] = {"role": "assistant", "content": self.result.text or None}
        if self._tools:
            message["tool_calls"] = [{"id": t["id"], "type": "function",
                                      "function": {"name": t["name"], "arguments": t["args"]}}
                                     for t in self._tools.values()]
        self.result.message = message

    def close(self) -> list[Chunk]:
        """The body ended. Without ``[DONE]`` the step still counts as whole
        if the model said why it finished (some servers omit ``[DONE]``)."""
        if self.result.complete:
            return []
        if self.result.finish_reason is None:
            raise ProviderError(ProviderErrorCode.STREAM_BROKEN, PROVIDER,
                                "the stream ended before its finish_reason and [DONE]")
        return finish_chunks(self.result)


def _usage(u: dict[str, Any]) -> dict[str, int]:
    return usage_of(inputTokens=u.get("prompt_tokens"), outputTokens=u.get("completion_tokens"),
                    totalTokens=u.get("total_tokens"),
                    reasoningTokens=(u.get("completion_tokens_details") or {}).get("reasoning_tokens"),
                    cachedInputTokens=(u.get("prompt_tokens_details") or {}).get("cached_tokens"))


# ---------------------------------------------------------------- history


def to_openai_chat(history: Iterable[Any], *, system: str | None = None) -> list[dict[str, Any]]:
    """turnline messages → Chat Completions ``messages``.

    Each step of an assistant message becomes an assistant message (its text
    and ``tool_calls``) followed by one ``tool`` message per result. Reasoning
    is not sent back; tool calls without a result are left out.
    """
    out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for role, parts in conversation(history):
        if role == "system":
            out.append({"role": "system", "content": text_of(parts)})
        elif role == "user":
            out.append({"role": "user", "content": _user_content(parts)})
        else:
            for step in steps(parts):
                results = [r for r in map(tool_result, step) if r is not None]
                text = text_of(step)
                if not text and not results:
                    continue
                msg: dict[str, Any] = {"role": "assistant", "content": text or None}
                if results:
                    msg["tool_calls"] = [{"id": r.call_id, "type": "function",
                                          "function": {"name": r.name, "arguments": arguments_text(r.input)}}
                                         for r in results]
                out.append(msg)
                out += [openai_chat_tool_result(r.call_id, r.output) for r in results]
    return out


def _user_content(parts: list[dict[str, Any]]) -> Any:
    return user_content(parts, lambda t: {"type": "text", "text": t}, lambda url: {"type": "image_url", "image_url": {"url": url}})


def openai_chat_tool_result(call_id: str, output: Any) -> dict[str, Any]:
    """The ``tool`` message answering one tool call (for a tool loop)."""
    return {"role": "tool", "tool_call_id": call_id, "content": output_text(output)}


__all__ = ["ChatDecoder", "openai_chat", "openai_chat_tool_result", "to_openai_chat"]
