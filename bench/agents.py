"""Instrumented agents for the benchmarks. Each streams one token every
``BENCH_INTERVAL`` seconds (default 0.01) and reports, from its on_abort hook,
when its abort fired and when each of its last tokens was produced, as a
``data-bench`` chunk. Times are ``time.monotonic_ns()`` (system-wide on Linux,
so comparable with the measuring process)."""

from __future__ import annotations

import asyncio
import os
import time

from turnline import Agent, Turn

INTERVAL = float(os.environ.get("BENCH_INTERVAL", "0.01"))
# A sync generator is stopped at its next yield, which may come after turn-end;
# when it really stopped is appended here ("turn_id closed_ns" lines).
CLOSED_LOG = os.environ.get("BENCH_CLOSED_LOG", "")
_produced: dict[str, list[int]] = {}


def _closed(turn_id: str) -> None:
    closed = time.monotonic_ns()
    produced = ",".join(map(str, _produced.pop(turn_id, [])[-8:])) or "-"
    if CLOSED_LOG:
        with open(CLOSED_LOG, "a") as f:
            f.write(f"{turn_id} {closed} {produced}\n")


async def _async_tokens(turn: Turn):
    produced = _produced.setdefault(turn.turn_id, [])
    try:
        for i in range(100_000):
            await asyncio.sleep(INTERVAL)
            produced.append(time.monotonic_ns())
            yield f"tok{i} "
    finally:
        _closed(turn.turn_id)


def _sync_tokens(turn: Turn):
    produced = _produced.setdefault(turn.turn_id, [])
    try:
        for i in range(100_000):
            time.sleep(INTERVAL)  # blocking work, as in a sync LLM client
            produced.append(time.monotonic_ns())
            yield f"tok{i} "
    finally:
        _closed(turn.turn_id)


async def _report(write, turn: Turn) -> None:
    await write({"type": "data-bench", "data": {"abort_ns": turn.abort_signal.fired_ns}})


async_streamer = Agent(_async_tokens, on_abort=_report, name="bench-async")
sync_streamer = Agent(_sync_tokens, on_abort=_report, name="bench-sync")
