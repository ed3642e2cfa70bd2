"""Agents for bench/interrupt.py (importable by the `turnline serve` subprocess)."""

from __future__ import annotations

from turnline import Agent, Turn


async def _five_tokens(turn: Turn):
    """A fixed short answer: 5 tokens, no sleep."""
    for i in range(5):
        yield f"t{i} "


short_answer = Agent(_five_tokens, name="bench-short")
