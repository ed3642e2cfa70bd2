"""OpenAI Responses API (``POST {base_url}/responses``, ``stream: true``).

Typed events: ``response.created`` … ``response.output_text.delta``,
``response.reasoning_summary_text.delta``, ``response.function_call_arguments.delta``
… ``response.completed``. Also served by vLLM, Ollama and LiteLLM.
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

PROVIDER = "openai.responses"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content-filter"}


def openai_responses(*, model: str, input: list[dict[str, Any]] | str | None = None,
                     history: Iterable[Any] | None = None, system: str | None = None,
                     base_url: str | None = None, api_key: str | None = None, headers: dict[str, str] | None = None,
                     client: httpx.AsyncClient | None = None, signal: AbortSignal | None = None,
                     timeout: httpx.Timeout | float | None = None, **params: Any) -> ProviderStream:
    """Stream one Responses API call as turnline chunks.

    Give ``input`` (Responses input items, or a string) or ``history``
    (turnline messages, converted with :func:`to_openai_responses`).
    ``system`` is sent as ``instructions``. ``params`` go into the body as they
    are (``tools``, ``reasoning``, ``max_output_tokens``, ``store``, …).
    """
    if input is None:
        input = to_openai_responses(history or [])
    base, key = endpoint("OPENAI", base_url, api_key, DEFAULT_BASE_URL)
    body: dict[str, Any] = {"model": model, "input": input, "stream": True, **params}
    if system is not None:
        body["instructions"] = system
    head = request_headers({"authorization": f"Bearer {key}"} if key else {}, headers)
    return ProviderStream(provider=PROVIDER, url=f"{base}/responses", headers=head, body=body,
                          decoder=ResponsesDecoder(), client=client, signal=signal, timeout=timeout)


class ResponsesDecoder(StepDecoder):
    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[str, dict[str, str]] = {}  # item id -> call id, name, args
        self._items: list[dict[str, Any]] = []  # output items, as done

    def feed(self, event: str, data: str) -> list[Chunk]:
        obj = parse_json_event(PROVIDER, data)
        kind = obj.get("type") or event
        out: list[Chunk] = []
        if kind == "error":
            code = obj.get("code")
            raise ProviderError(ProviderErrorCode.RATE_LIMITED if code == "rate_limit_exceeded"
                                else ProviderErrorCode.ERROR, PROVIDER,
                                f"error event in the stream: {obj.get('message') or data[:200]}"
                                + (f" ({code})" if code else ""), provider_code=code)
        if kind == "response.failed":
            err = (obj.get("response") or {}).get("error") or {}
            raise ProviderError(ProviderErrorCode.ERROR, PROVIDER,
                                f"the response failed: {err.get('message') or 'no reason given'}"
                                + (f" ({err['code']})" if err.get("code") else ""), provider_code=err.get("code"))
        self._start(out)
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, obj, out)
        return out

    def _created(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        response = obj.get("response") or {}
        self.result.response_id = response.get("id")
        self.result.model = response.get("model")

    def _item_added(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        item = obj.get("item") or {}
        if item.get("type") != "function_call":
            return
        self._parts.end_all(out)
        call = self._calls[item.get("id") or item.get("call_id")] = {
            "id": item.get("call_id") or item.get("id"), "name": item.get("name") or "", "args": ""}
        out.append({"type": "tool-input-start", "toolCallId": call["id"], "toolName": call["name"]})
        if item.get("arguments"):
            self._args(call, item["arguments"], out)

    def _args(self, call: dict[str, str], delta: str, out: list[Chunk]) -> None:
        call["args"] += delta
        out.append({"type": "tool-input-delta", "toolCallId": call["id"], "inputTextDelta": delta})

    def _args_delta(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        call = self._calls.get(obj.get("item_id", ""))
        if call is not None and obj.get("delta"):
            self._args(call, obj["delta"], out)

    def _text(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        self._parts.end_all(out, "reasoning")
        self._parts.delta("text", f"{obj.get('item_id')}-{obj.get('content_index', 0)}", obj.get("delta") or "", out)

    def _text_done(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        self._parts.end(f"{obj.get('item_id')}-{obj.get('content_index', 0)}", out)

    def _summary(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        self._parts.delta("reasoning", f"{obj.get('item_id')}-s{obj.get('summary_index', 0)}",
                          obj.get("delta") or "", out)

    def _summary_done(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        self._parts.end(f"{obj.get('item_id')}-s{obj.get('summary_index', 0)}", out)

    def _reasoning(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        self._parts.delta("reasoning", f"{obj.get('item_id')}-r{obj.get('content_index', 0)}",
                          obj.get("delta") or "", out)

    def _reasoning_done(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        self._parts.end(f"{obj.get('item_id')}-r{obj.get('content_index', 0)}", out)

    def _item_done(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        item = obj.get("item") or {}
        self._items.append(item)
        item_id = item.get("id") or ""
        for part_id in [p for p in self._parts.open if p.startswith(f"{item_id}-")]:
            self._parts.end(part_id, out)
        if item.get("type") == "function_call":
            call = self._calls.pop(item_id, None) or {"id": item.get("call_id") or item_id,
                                                      "name": item.get("name") or "", "args": ""}
            out.append(tool_input_done(call["id"], item.get("name") or call["name"],
                                       item.get("arguments") or call["args"], self.result))

    def _completed(self, obj: dict[str, Any], out: list[Chunk]) -> None:
        response = obj.get("response") or {}
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.result.usage = usage_of(
                inputTokens=usage.get("input_tokens"), outputTokens=usage.get("output_tokens"),
                totalTokens=usage.get("total_tokens"),
                reasoningTokens=(usage.get("output_tokens_details") or {}).get("reasoning_tokens"),
                cachedInputTokens=(usage.get("input_tokens_details") or {}).get("cached_tokens"))
        self.result.model = response.get("model") or self.result.model
        self._parts.end_all(out)
        for call in self._calls.values():
            out.append(tool_input_done(call["id"], call["name"], call["args"], self.result))
        self._calls.clear()
        if obj.get("type") == "response.incomplete":
            reason = (response.get("incomplete_details") or {}).get("reason")
            self.result.finish_reason = _INCOMPLETE.get(reason, "other")
        else:
            self.result.finish_reason = "tool-calls" if self.result.tool_calls else "stop"
        self.result.message = self._items or list(response.get("output") or [])
        out += finish_chunks(self.result)

    def close(self) -> list[Chunk]:
        if not self.result.complete:
            raise ProviderError(ProviderErrorCode.STREAM_BROKEN, PROVIDER,
                                "the stream ended before response.completed")
        return []


_HANDLERS = {
    "response.created": ResponsesDecoder._created,
    "response.output_item.added": ResponsesDecoder._item_added,
    "response.output_item.done": ResponsesDecoder._item_done,
    "response.output_text.delta": ResponsesDecoder._text,
    "response.output_text.done": ResponsesDecoder._text_done,
    "response.refusal.delta": ResponsesDecoder._text,
    "response.refusal.done": ResponsesDecoder._text_done,
    "response.reasoning_summary_text.delta": ResponsesDecoder._summary,
    "response.reasoning_summary_text.done": ResponsesDecoder._summary_done,
    "response.reasoning_text.delta": ResponsesDecoder._reasoning,
    "response.reasoning_text.done": ResponsesDecoder._reasoning_done,
    "response.function_call_arguments.delta": ResponsesDecoder._args_delta,
    "response.completed": ResponsesDecoder._completed,
    "response.incomplete": ResponsesDecoder._completed,
}


# ---------------------------------------------------------------- history


def to_openai_responses(history: Iterable[Any]) -> list[dict[str, Any]]:
    """turnline messages → Responses ``input`` items: messages, and for each
    tool result a ``function_call`` item and its ``function_call_output``.
    Reasoning is not sent back; tool calls without a result are left out."""
    out: list[dict[str, Any]] = []
    for role, parts in conversation(history):
        if role == "system":
            out.append({"role": "system", "content": text_of(parts)})
        elif role == "user":
            out.append({"role": "user", "content": _user_content(parts)})
        else:
            for step in steps(parts):
                outputs: list[dict[str, Any]] = []
                text = ""
                for part in step:
                    if part.get("type") == "text":
                        text += part.get("text", "")
                        continue
                    result = tool_result(part)
                    if result is None:
                        continue
                    if text:
                        out.append({"role": "assistant", "content": text})
                        text = ""
                    out.append({"type": "function_call", "call_id": result.call_id, "name": result.name,
                                "arguments": arguments_text(result.input)})
                    outputs.append(openai_responses_tool_result(result.call_id, result.output))
                if text:
                    out.append({"role": "assistant", "content": text})
                out += outputs
    return out


def _user_content(parts: list[dict[str, Any]]) -> Any:
    return user_content(parts, lambda t: {"type": "input_text", "text": t}, lambda url: {"type": "input_image", "image_url": url})


def openai_responses_tool_result(call_id: str, output: Any) -> dict[str, Any]:
    """The ``function_call_output`` item answering one call (for a tool loop)."""
    return {"type": "function_call_output", "call_id": call_id, "output": output_text(output)}


__all__ = ["ResponsesDecoder", "openai_responses", "openai_responses_tool_result", "to_openai_responses"]
