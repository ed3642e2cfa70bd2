"""Load (issue 5, reliability suite): many sessions and subscribers at once on
one server, every subscriber's view equal to the log.

Each session is followed from ``after=0`` by two subscribers on two different
WebSocket connections (a connection multiplexes many sessions), and one turn
per session streams while all the others do. At the end, for every session:
the log is gapless, every turn started ends exactly once, and each
subscriber's event list is the log itself (no gap, no duplicate, same order,
byte-equal JSON). Correctness only: speed and memory are measured in
``bench/load.py``, never asserted here.

The short version runs in the suite on the memory and SQLite stores; the
``soak`` version (``make soak``) runs more sessions for several rounds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from wsraw import RawWS, assert_gapless, settled_log

WAIT = 60.0  # bounds on waits only (under pytest-timeout's 120 s); nothing here is timed


async def words(turn: Any):
    """Streams as many words as the prompt's number, yielding to the loop between them."""
    n = int("".join(p.get("text", "") for p in turn.input.parts))
    for i in range(n):
        await asyncio.sleep(0)
        yield f"w{i} "


async def run_load(srv: Any, sessions: int, subscribers: int, connections: int, tokens: int,
                   rounds: int = 1) -> int:
    """Run the load; returns how many events the subscribers received in all."""
    conns = [await RawWS.open(srv.ws, srv.token(f"client-{i}")) for i in range(connections)]
    names = [f"load-{k}" for k in range(sessions)]
    stride = max(1, connections // subscribers)
    followers = {s: [conns[(k + j * stride) % connections] for j in range(subscribers)]
                 for k, s in enumerate(names)}
    assert all(len(set(map(id, fs))) == subscribers for fs in followers.values())
    await asyncio.gather(*(c.ok({"op": "subscribe", "session": s, "after": 0}, WAIT)
                           for s, fs in followers.items() for c in fs))
    turns: dict[str, list[str]] = {s: [] for s in names}
    for _ in range(rounds):
        acks = await asyncio.gather(*(
            followers[s][0].ok({"op": "send", "session": s,
                                "messages": [{"parts": [{"type": "text", "text": str(tokens)}]}]}, WAIT)
            for s in names))
        for s, ack in zip(names, acks):
            turns[s] += ack["turn_ids"]
        # Every turn of the round ends, as every subscriber sees it.
        await asyncio.gather(*(c.turn_end(s, turns[s][-1], WAIT) for s, fs in followers.items() for c in fs))
    delivered = 0
    for s, fs in followers.items():
        log = await settled_log(srv, s, WAIT)
        assert_gapless(log)
        starts = [e["turn_id"] for e in log if e["type"] == "turn-start"]
        ends = [e["turn_id"] for e in log if e["type"] == "turn-end"]
        assert starts == turns[s] and sorted(ends) == sorted(starts), s
        assert all(e["reason"] == "complete" for e in log if e["type"] == "turn-end"), s
        assert sum(1 for e in log if e["type"] == "chunk" and e["chunk"]["type"] == "text-delta") \
            == tokens * rounds, s
        for c in fs:
            await c.wait_until(lambda c=c: len(c.events[s]) >= len(log), WAIT, f"all of {s}")
            assert c.events[s] == log, s
            delivered += len(c.events[s])
    for c in conns:
        assert not c.errors, c.errors[:3]
        await c.close()
    return delivered


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_200_sessions_x_2_subscribers_stream_concurrently(serve: Any, tmp_path: Any, store: str) -> None:
    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path / 'load.db'}"
    srv = serve(agent=words, store=url)
    delivered = await run_load(srv, sessions=200, subscribers=2, connections=20, tokens=20)
    assert delivered > 200 * 2 * 20


@pytest.mark.soak
async def test_soak_1000_sessions_x_2_subscribers_several_rounds(serve: Any, tmp_path: Any) -> None:
    srv = serve(agent=words, store=f"sqlite:///{tmp_path / 'soak.db'}")
    delivered = await run_load(srv, sessions=1000, subscribers=2, connections=50, tokens=60, rounds=3)
    assert delivered > 1000 * 2 * 60 * 3
