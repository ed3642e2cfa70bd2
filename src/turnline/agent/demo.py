"""The built-in demo agent: realistic streaming without a model.

It streams word-sized text deltas (30 a second by default; ``TURNLINE_DEMO_RATE``
changes it), sometimes thinks first (a reasoning part) and sometimes calls a
tool, and it honours the abort signal at every step: the tool's sleep and the
token pacing both end the moment the turn is cancelled.
"""

from __future__ import annotations

import asyncio
import os
import re
import zlib
from typing import Any, AsyncIterator

from .turn import Agent, Turn

ANSWERS = [
    "Here is how I would approach it. First, pin down what the user actually sees, because that is "
    "what they will remember. Then make the server the single source of truth, so every device "
    "agrees. Finally, measure the latency of the stop button, not just the first token: people "
    "notice a response that keeps talking after they asked it to stop.",
    "Short answer: yes, but with a caveat. Streaming feels fast only when the stream can be stopped "
    "just as fast. A session log with sequence numbers gives you both: resume after a dropped "
    "connection without losing a word, and a stop that is exact to the token the user saw last.",
    "Let me walk through it step by step. A turn starts when your message arrives, streams its "
    "answer as small pieces, and ends exactly once, either complete, cancelled or with an error. If "
    "you press stop, the model call is closed, and the saved history keeps only what reached your "
    "screen. If you switch devices, the other one picks up from the same point.",
    "There are three common ways to handle a second message while the first answer is still "
    "streaming: run both side by side, queue the second until the first is done, or cancel the "
    "first and start again. Each is right for a different product, so the choice belongs to the "
    "session, and the server enforces it rather than trusting every client to behave.",
]

WEATHER = {"paris": "14°C, light rain", "london": "11°C, overcast", "tokyo": "19°C, clear",
           "new york": "16°C, windy"}


def _text_of(turn: Turn) -> str:
    return " ".join(p.get("text", "") for p in turn.input.parts if p.get("type") == "text")


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def demo_stream(turn: Turn, rate: float | None = None) -> AsyncIterator[Any]:
    rate = rate or float(os.environ.get("TURNLINE_DEMO_RATE", "30"))
    interval = 1.0 / rate
    prompt = _text_of(turn)
    seed = zlib.crc32(prompt.encode())

    async def stream() -> AsyncIterator[Any]:
        yield {"type": "start-step"}
        if seed % 3 == 0 or "think" in prompt.lower():
            yield {"type": "reasoning-start", "id": "r1"}
            for w in _words("The user wants a clear, practical answer. Keep it concrete."):
                await asyncio.sleep(interval)
                yield {"type": "reasoning-delta", "id": "r1", "delta": w}
            yield {"type": "reasoning-end", "id": "r1"}
        city = next((c for c in WEATHER if c in prompt.lower()), None)
        if city is not None or "weather" in prompt.lower():
            city = city or "paris"
            call_id = f"call-{seed % 100000}"
            yield {"type": "tool-input-start", "toolCallId": call_id, "toolName": "weather"}
            for piece in ('{"city": ', f'"{city.title()}"', "}"):
                await asyncio.sleep(interval)
                yield {"type": "tool-input-delta", "toolCallId": call_id, "inputTextDelta": piece}
            yield {"type": "tool-input-available", "toolCallId": call_id, "toolName": "weather",
                   "input": {"city": city.title()}}
            await asyncio.sleep(interval * 10)  # the tool "works"; a cancel cuts this short
            yield {"type": "tool-output-available", "toolCallId": call_id,
                   "output": {"city": city.title(), "forecast": WEATHER[city]}}
            yield {"type": "finish-step"}
            yield {"type": "start-step"}
            answer = f"In {city.title()} it is {WEATHER[city]} right now. " + ANSWERS[seed % len(ANSWERS)]
        else:
            answer = ANSWERS[seed % len(ANSWERS)]
        yield {"type": "text-start", "id": "t1"}
        for w in _words(answer):
            await asyncio.sleep(interval)
            yield {"type": "text-delta", "id": "t1", "delta": w}
        yield {"type": "text-end", "id": "t1"}
        yield {"type": "finish-step"}

    return stream()


async def respond(turn: Turn) -> None:
    await turn.stream_response(demo_stream(turn))


agent = Agent(respond, name="demo")
