"""Anthropic Messages (``POST {base_url}/v1/messages``, ``stream: true``).

Events: ``message_start``, ``content_block_start`` / ``content_block_delta``
(``text_delta``, ``thinking_delta``, ``signature_delta``, ``input_json_delta``)
/ ``content_block_stop``, ``message_delta`` (stop reason, usage),
``message_stop``; ``ping``; ``error``.
"""

from __future__ import annotations

from typing import Any, Iterable

import httpx

from ..signal import AbortSignal
from ._base import (
    Chunk, ProviderError, ProviderErrorCode, ProviderStream, StepDecoder, endpoint, finish_chunks,
    parse_json_event, parse_tool_input, request_headers, tool_input_done, usage_of,
)
from ._history import conversation, data_url, output_text, steps, text_of, tool_result

PROVIDER = "anthropic"
DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool-calls",
           "refusal": "content-filter"}
_ERROR_CODES = {"authentication_error": ProviderErrorCode.AUTH, "permission_error": ProviderErrorCode.AUTH,
                "rate_limit_error": ProviderErrorCode.RATE_LIMITED,
                "invalid_request_error": ProviderErrorCode.BAD_REQUEST,
                "not_found_error": ProviderErrorCode.BAD_REQUEST, "request_too_large": ProviderErrorCode.BAD_REQUEST}


def anthropic_messages(*, model: str, messages: list[dict[str, Any]] | None = None,
                       history: Iterable[Any] | None = None, system: str | None = None, max_tokens: int = 4096,
                       base_url: str | None = None, api_key: str | None = None,
                       headers: dict[str, str] | None = None, client: httpx.AsyncClient | None = None,
                       signal: AbortSignal | None = None, timeout: httpx.Timeout | float | None = None,
                       **params: Any) -> ProviderStream:
    """Stream one Messages call as turnline chunks.

    Give ``messages`` (Anthropic format) or ``history`` (turnline messages,
    converted with :func:`to_anthropic`; their system messages join
    ``system``). ``params`` go into the body as they are (``tools``,
    ``thinking``, ``temperature``, …). ``base_url`` and ``api_key`` default to
    ``ANTHROPIC_BASE_URL`` and ``ANTHROPIC_API_KEY``.
    """
    if messages is None:
        history_system, messages = to_anthropic(history or [])
        system = "\n\n".join(s for s in (system, history_system) if s) or None
    base, key = endpoint("ANTHROPIC", base_url, api_key, DEFAULT_BASE_URL)
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, **params}
    if system:
        body["system"] = system
    head = request_headers({"anthropic-version": API_VERSION, **({"x-api-key": key} if key else {})}, headers)
    return ProviderStream(provider=PROVIDER, url=f"{base}/v1/messages", headers=head, body=body,
                          decoder=MessagesDecoder(), client=client, signal=signal, timeout=timeout)


class MessagesDecoder(StepDecoder):
    def __init__(self) -> None:
        super().__init__()
        self._blocks: dict[int, dict[str, Any]] = {}  # open content blocks by index
        self._content: list[dict[str, Any]] = []  # finished blocks, for result.message
        self._input_usage: dict[str, Any] = {}

    def feed(self, event: str, data: str) -> list[Chunk]:
        obj = parse_json_event(PROVIDER, data)
        kind = obj.get("type") or event
        if kind == "error":
            err = obj.get("error") or {}
            kind_of_error = err.get("type")
            raise ProviderError(_ERROR_CODES.get(kind_of_error, ProviderErrorCode.ERROR), PROVIDER,
                                f"error event in the stream: {err.get('message') or data[:200]}"
                                + (f" ({kind_of_error})" if kind_of_error else ""), provider_code=kind_of_error)
        out: list[Chunk] = []
        if kind == "ping":
            return out
        self._start(out)
        if kind == "message_start":
            message = obj.get("message") or {}
            self.result.response_id = message.get("id")
            self.result.model = message.get("model")
            self._input_usage = message.get("usage") or {}
            self._usage(self._input_usage)
        elif kind == "content_block_start":
            self._block_start(obj.get("index", 0), obj.get("content_block") or {}, out)
        elif kind == "content_block_delta":
            self._block_delta(self._blocks.get(obj.get("index", 0)), obj.get("delta") or {}, out)
        elif kind == "content_block_stop":
            self._block_stop(obj.get("index", 0), out)
        elif kind == "message_delta":
            reason = (obj.get("delta") or {}).get("stop_reason")
            if reason:
                self.result.finish_reason = _FINISH.get(reason, "other")
            self._usage({**self._input_usage, **(obj.get("usage") or {})})
        elif kind == "message_stop":
            for index in list(self._blocks):
                self._block_stop(index, out)
            self.result.message = {"role": "assistant", "content": self._content}
            out += finish_chunks(self.result)
        return out

    def _usage(self, u: dict[str, Any]) -> None:
        self.result.usage = usage_of(inputTokens=u.get("input_tokens"), outputTokens=u.get("output_tokens"),
                                     cachedInputTokens=u.get("cache_read_input_tokens"))

    def _block_start(self, index: int, block: dict[str, Any], out: list[Chunk]) -> None:
        kind = block.get("type")
        part_id = f"{self.result.response_id or 'msg'}-{index}"
        if kind == "text":
            self._blocks[index] = {"type": "text", "id": part_id, "text": ""}
            self._block_delta(self._blocks[index], {"type": "text_delta", "text": block.get("text", "")}, out)
        elif kind == "thinking":
            self._blocks[index] = {"type": "thinking", "id": part_id, "thinking": "", "signature": ""}
            self._block_delta(self._blocks[index], {"type": "thinking_delta", "thinking": block.get("thinking", "")},
                              out)
        elif kind == "redacted_thinking":
            self._blocks[index] = {"type": "redacted_thinking", "data": block.get("data", "")}
        elif kind == "tool_use":
            self._parts.end_all(out)
            self._blocks[index] = {"type": "tool_use", "id": block.get("id") or part_id,
                                   "name": block.get("name") or "", "args": ""}
            out.append({"type": "tool-input-start", "toolCallId": self._blocks[index]["id"],
                        "toolName": self._blocks[index]["name"]})

    def _block_delta(self, block: dict[str, Any] | None, delta: dict[str, Any], out: list[Chunk]) -> None:
        if block is None:
            return
        kind = delta.get("type")
        if kind == "text_delta" and block["type"] == "text":
            block["text"] += delta.get("text", "")
            self._parts.delta("text", block["id"], delta.get("text", ""), out)
        elif kind == "thinking_delta" and block["type"] == "thinking":
            block["thinking"] += delta.get("thinking", "")
            self._parts.delta("reasoning", block["id"], delta.get("thinking", ""), out)
        elif kind == "signature_delta" and block["type"] == "thinking":
            block["signature"] += delta.get("signature", "")
        elif kind == "input_json_delta" and block["type"] == "tool_use" and delta.get("partial_json"):
            block["args"] += delta["partial_json"]
            out.append({"type": "tool-input-delta", "toolCallId": block["id"], "inputTextDelta": delta["partial_json"]})

    def _block_stop(self, index: int, out: list[Chunk]) -> None:
        block = self._blocks.pop(index, None)
        if block is None:
            return
        kind = block["type"]
        if kind == "text":
            self._parts.end(block["id"], out)
            self._content.append({"type": "text", "text": block["text"]})
        elif kind == "thinking":
            extra = {"providerMetadata": {"anthropic": {"signature": block["signature"]}}} if block["signature"] else {}
            self._parts.end(block["id"], out, **extra)
            self._content.append({"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]})
        elif kind == "redacted_thinking":
            self._content.append({"type": "redacted_thinking", "data": block["data"]})
        elif kind == "tool_use":
            out.append(tool_input_done(block["id"], block["name"], block["args"], self.result))
            value, ok = parse_tool_input(block["args"])
            self._content.append({"type": "tool_use", "id": block["id"], "name": block["name"],
                                  "input": value if ok and isinstance(value, dict) else {}})

    def close(self) -> list[Chunk]:
        if not self.result.complete:
            raise ProviderError(ProviderErrorCode.STREAM_BROKEN, PROVIDER, "the stream ended before message_stop")
        return []


# ---------------------------------------------------------------- history


def to_anthropic(history: Iterable[Any]) -> tuple[str | None, list[dict[str, Any]]]:
    """turnline messages → ``(system, messages)`` for the Messages API.

    System messages join the top-level ``system``. Each step of an assistant
    message becomes an assistant message (thinking with its signature, text,
    ``tool_use``) followed by a user message with its ``tool_result`` blocks;
    consecutive messages of one role are merged. Reasoning without an
    Anthropic signature and tool calls without a result are left out.
    """
    system: list[str] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"] += blocks
        else:
            out.append({"role": role, "content": blocks})

    for role, parts in conversation(history):
        if role == "system":
            system.append(text_of(parts))
        elif role == "user":
            add("user", [b for b in map(_user_block, parts) if b is not None])
        else:
            for step in steps(parts):
                blocks: list[dict[str, Any]] = []
                results: list[dict[str, Any]] = []
                for part in step:
                    kind = part.get("type")
                    if kind == "text" and part.get("text"):
                        blocks.append({"type": "text", "text": part["text"]})
                    elif kind == "reasoning":
                        signature = ((part.get("providerMetadata") or {}).get("anthropic") or {}).get("signature")
                        if signature:
                            blocks.append({"type": "thinking", "thinking": part.get("text", ""),
                                           "signature": signature})
                    elif (r := tool_result(part)) is not None:
                        blocks.append({"type": "tool_use", "id": r.call_id, "name": r.name,
                                       "input": r.input if isinstance(r.input, dict) else {}})
                        results.append(anthropic_tool_result(r.call_id, r.output, is_error=r.is_error))
                add("assistant", blocks)
                add("user", results)
    return ("\n\n".join(s for s in system if s) or None), out


def _user_block(part: dict[str, Any]) -> dict[str, Any] | None:
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part["text"]} if part.get("text") else None
    if kind != "file":
        return None
    media, url = str(part.get("mediaType", "")), str(part.get("url", ""))
    block_type = "image" if media.startswith("image/") else "document" if media == "application/pdf" else None
    if block_type is None:
        return None
    inline = data_url(url)
    source = ({"type": "base64", "media_type": inline[0], "data": inline[1]} if inline
              else {"type": "url", "url": url})
    return {"type": block_type, "source": source}


def anthropic_tool_result(call_id: str, output: Any, *, is_error: bool = False) -> dict[str, Any]:
    """One ``tool_result`` block; a tool loop sends them in a user message:
    ``{"role": "user", "content": [anthropic_tool_result(...), ...]}``."""
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id, "content": output_text(output)}
    if is_error:
        block["is_error"] = True
    return block


__all__ = ["MessagesDecoder", "anthropic_messages", "anthropic_tool_result", "to_anthropic"]
