"""The token streamer of bench/fanout.py, and the pacing it shares with the
pub/sub baseline's publisher (bench/peers/pubsub_relay.py).

``streamer`` answers a message whose text is a number N with N text deltas at
``FANOUT_RATE`` tokens a second (default 30). Each delta is the write time,
``time.monotonic_ns()`` (CLOCK_MONOTONIC is system-wide on Linux, so the load
generator compares it with its own receive time), followed by a space.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from typing import AsyncIterator

from turnline import Agent, Turn

RATE = float(os.environ.get("FANOUT_RATE", "30"))


class _Ticker:
    """One loop timer per millisecond of deadlines, shared by every paced
    stream: a stream waits on a future, not on a timer of its own. A timer
    per token (``asyncio.sleep``) cost 10.7 µs of CPU per token here, this
    6.9 µs: the stand-in for the agents' LLM streams should not be what loads
    the box (a real agent wakes once per chunk it reads from its socket)."""

    TICK_S = 0.001

    def __init__(self) -> None:
        self._due: dict[int, list[asyncio.Future[None]]] = {}

    def until(self, deadline: float) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        tick = math.ceil(deadline / self.TICK_S)
        waiting = self._due.get(tick)
        if waiting is None:
            waiting = self._due[tick] = []
            loop.call_at(tick * self.TICK_S, self._fire, tick)
        waiting.append(fut)
        return fut

    def _fire(self, tick: int) -> None:
        for fut in self._due.pop(tick):
            if not fut.done():
                fut.set_result(None)


_ticker = _Ticker()


async def paced(rate: float, count: int) -> AsyncIterator[int]:
    """Yield 0..count-1 at ``rate`` a second, each on its own deadline
    (``start + i/rate``, rounded up to the millisecond), so the rate holds
    even when one wake-up is late; the start has a random phase so that many
    streams do not tick in lockstep."""
    loop = asyncio.get_running_loop()
    period = 1.0 / rate
    start = loop.time() + random.random() * period
    for i in range(count):
        deadline = start + i * period
        if deadline > loop.time():
            await _ticker.until(deadline)
        yield i


def _token_count(turn: Turn) -> int:
    text = "".join(p.get("text", "") for p in turn.input.parts if p.get("type") == "text")
    try:
        return max(0, int(text.strip()))
    except ValueError:
        return 0


async def _stream(turn: Turn) -> AsyncIterator[str]:
    async for _ in paced(RATE, _token_count(turn)):
        yield f"{time.monotonic_ns()} "


streamer = Agent(_stream, name="bench-fanout")


# --------------------------------------------------------------------------- a producer without the agent runtime


async def produce(url: str, sessions: list[str], tokens: int, rate: float) -> None:
    """Stream tokens into the sessions' logs with ``RedisEventLog.append``
    alone (no worker, hub or agent around it): the same events a streaming
    turn appends, for less CPU, so that a gateway's fan-out can be measured
    on a machine too small to also run the workers at full rate."""
    from turnline.protocol import ChunkEvent
    from turnline.store.redis import RedisEventLog

    log = RedisEventLog(url)
    await log.open()

    async def stream(session: str) -> None:
        turn_id = f"turn-{session}"
        async for _ in paced(rate, tokens):
            await log.append(session, [ChunkEvent(turn_id=turn_id, client_id="agent", chunk={
                "type": "text-delta", "id": "text-0", "delta": f"{time.monotonic_ns()} "})])

    try:
        await asyncio.gather(*(stream(s) for s in sessions))
    finally:
        await log.close()


def main() -> None:
    import argparse

    import uvloop

    ap = argparse.ArgumentParser(prog="python -m bench.fanout_agents")
    ap.add_argument("--redis", required=True)
    ap.add_argument("--sessions", required=True, help="FIRST:COUNT, sessions fan-FIRST … fan-(FIRST+COUNT-1)")
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--rate", type=float, default=RATE)
    a = ap.parse_args()
    first, count = (int(x) for x in a.sessions.split(":"))
    uvloop.run(produce(a.redis, [f"fan-{i}" for i in range(first, first + count)], a.tokens, a.rate))


if __name__ == "__main__":
    main()
