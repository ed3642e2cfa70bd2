"""Reading turnline messages (AI SDK ``UIMessage``s) for the history converters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

Part = dict[str, Any]


def role_and_parts(message: Any) -> tuple[str, list[Part]]:
    """A :class:`turnline.protocol.Message` or a UIMessage dict."""
    if isinstance(message, dict):
        return message["role"], list(message.get("parts") or [])
    return message.role, list(message.parts)


def conversation(history: Iterable[Any]) -> Iterator[tuple[str, list[Part]]]:
    """``(role, parts)`` of each message, in order; an assistant message that
    holds ``steering-message`` parts (messages sent into its turn, where the
    agent took them) is split there, each steer becoming a user message, as
    the AI SDK's ``convertToModelMessages`` does."""
    for message in history:
        role, parts = role_and_parts(message)
        if role != "assistant" or not any(p.get("type") == "steering-message" for p in parts):
            yield role, parts
            continue
        current: list[Part] = []
        for part in parts:
            if part.get("type") == "steering-message":
                if current:
                    yield "assistant", current
                current = []
                yield "user", [p for p in part.get("parts") or [] if isinstance(p, dict)]
            else:
                current.append(part)
        if current:
            yield "assistant", current


@dataclass
class ToolResult:
    call_id: str
    name: str
    input: Any
    output: str
    is_error: bool


def tool_result(part: Part) -> ToolResult | None:
    """A tool part that has its result (``output-available`` or ``output-error``).
    A call without a result (never run, or cut before it ran and not closed)
    is left out: every provider refuses a tool call with no answer."""
    kind = part.get("type", "")
    if kind == "dynamic-tool":
        name = part.get("toolName")
    elif kind.startswith("tool-"):
        name = kind[5:]
    else:
        return None
    call_id = part.get("toolCallId")
    if not isinstance(call_id, str) or not isinstance(name, str):
        return None
    state = part.get("state")
    if state == "output-available":
        return ToolResult(call_id, name, part.get("input"), output_text(part.get("output")), False)
    if state == "output-error":
        return ToolResult(call_id, name, part.get("input"), str(part.get("errorText") or "error"), True)
    return None


def output_text(output: Any) -> str:
    return output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)


def arguments_text(value: Any) -> str:
    """Tool input as the JSON text OpenAI's APIs carry (the raw text if it never parsed)."""
    return value if isinstance(value, str) else json.dumps({} if value is None else value, ensure_ascii=False)


def steps(parts: Iterable[Part]) -> Iterator[list[Part]]:
    """An assistant message's parts, one list per model call (``step-start``
    separates them), each in the order produced."""
    current: list[Part] = []
    for part in parts:
        if part.get("type") == "step-start":
            if current:
                yield current
            current = []
        else:
            current.append(part)
    if current:
        yield current


def text_of(parts: Iterable[Part]) -> str:
    return "".join(p.get("text", "") for p in parts if p.get("type") == "text")


def is_image(part: Part) -> bool:
    return part.get("type") == "file" and str(part.get("mediaType", "")).startswith("image/")


def user_content(parts: list[Part], text_part: Callable[[str], Part], image_part: Callable[[str], Part]) -> Any:
    """An OpenAI user message's content: the plain text, or, when it holds
    images, its text and image parts in the API's shapes (built by
    ``text_part(text)`` and ``image_part(url)``)."""
    if not any(is_image(p) for p in parts):
        return text_of(parts)
    content: list[Part] = []
    for p in parts:
        if p.get("type") == "text" and p.get("text"):
            content.append(text_part(p["text"]))
        elif is_image(p):
            content.append(image_part(p["url"]))
    return content


def data_url(url: str) -> tuple[str, str] | None:
    """``data:<media>;base64,<data>`` → (media type, data)."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head, data = url[5:].split(";base64,", 1)
    return head, data
