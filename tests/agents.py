"""Agents for tests that run the real ``turnline serve`` CLI in a subprocess
(``--agent tests.agents:NAME``, with the repository root as the working
directory). In-process tests define their agents in their own modules."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator


def _prompt(turn: Any) -> str:
    return " ".join(p.get("text", "") for p in turn.input.parts if p.get("type") == "text")


async def slow(turn: Any) -> AsyncIterator[str]:
    """``slow …`` streams a word every 10 ms for about two minutes (long enough
    to be killed mid-stream); anything else gets a short, quick answer."""
    if _prompt(turn).startswith("slow"):
        for i in range(12_000):
            await asyncio.sleep(0.01)
            yield f"w{i} "
    else:
        yield "quick "
        yield "answer"
