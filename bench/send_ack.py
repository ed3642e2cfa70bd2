"""send_ack: send → ack latency over a loopback WebSocket, limits on vs off.

What the limiter costs a send on the hot path (docs/limits.md): the per-client
send bucket, the session's turn limit, the connection slot. Two `turnline serve`
processes run side by side with one store kind: one with every limit off, one
with every limit on but set so high that nothing is refused (the same code
runs; only the answer is always yes). Trials alternate between them in rounds
(which goes first alternates too), so drift on a shared machine hits both
alike. A trial: send one message, time until its ack (the turn's start is
durable), then wait, untimed, for the quick answer's turn-end, so every send
meets one idle session.

On one node (SQLite; the bucket in-process) and on Redis (a gateway with its
in-process worker; the bucket in Redis, one script call per send, made while
the gateway reads the session's replica, so its round trip overlaps that one).
A second table times the limiter's own work alone, in this process: the
in-process bucket, the Redis script, and a plain Redis GET for comparison.

``python -m bench send_ack [--quick]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from typing import Any, Iterator

from websockets.asyncio.client import connect

from bench._common import REPO, pct, print_table, save, token, turnline_server

sys.path.insert(0, str(REPO / "tests"))
from redis_server import redis_for_tests, scratch_prefix  # noqa: E402

AGENT = "bench.send_ack:agent"
HIGH = "1000000000"
LIMITS_ON = ["--max-turns-per-session", HIGH, "--send-rate", HIGH, "--send-burst", HIGH, "--cancel-rate", HIGH,
             "--cancel-burst", HIGH, "--max-subscriptions", HIGH, "--max-connections-per-client", HIGH]


async def agent(turn: Any):
    yield "ok"


class Peer:
    def __init__(self, ws: Any, session: str):
        self.ws = ws
        self.session = session
        self.ids = itertools.count(1)

    @classmethod
    async def open(cls, port: int, session: str) -> Peer:
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws", additional_headers={"Authorization": f"Bearer {token()}"},
                           max_size=None, ping_interval=None)
        peer = cls(ws, session)
        await ws.send(json.dumps({"op": "subscribe", "session": session, "id": 0}))
        while json.loads(await ws.recv()).get("id") != 0:
            pass
        return peer

    async def trial(self) -> float:
        fid = next(self.ids)
        frame = json.dumps({"op": "send", "session": self.session, "id": fid,
                            "messages": [{"parts": [{"type": "text", "text": "hi"}]}]})
        started = time.perf_counter()
        await self.ws.send(frame)
        turn_id = None
        latency = 0.0
        ended: set[str] = set()
        while turn_id is None or turn_id not in ended:
            msg = json.loads(await self.ws.recv())
            if msg.get("op") in ("ack", "error") and msg.get("id") == fid:
                latency = time.perf_counter() - started
                if msg["op"] == "error":
                    raise RuntimeError(f"send refused: {msg}")
                turn_id = msg["turn_ids"][0]
            events = [msg["event"]] if msg.get("op") == "event" else msg.get("events", [])
            ended.update(e["turn_id"] for e in events if e.get("type") == "turn-end")
        return latency


@contextlib.contextmanager
def _servers(off_store: str | None, on_store: str | None) -> Iterator[dict[str, int]]:
    with turnline_server(AGENT, store=off_store) as off, \
            turnline_server(AGENT, store=on_store, limits=LIMITS_ON) as on:
        yield {"limits off": off, "limits on": on}


async def _run(ports: dict[str, int], rounds: int, per_round: int, warm: int) -> dict[str, list[float]]:
    peers = {name: await Peer.open(port, f"send-ack-{name.split()[-1]}") for name, port in ports.items()}
    for peer in peers.values():
        for _ in range(warm):
            await peer.trial()
    out: dict[str, list[float]] = {name: [] for name in peers}
    names = list(peers)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for _ in range(per_round):
                out[name].append(await peers[name].trial())
    for peer in peers.values():
        await peer.ws.close()
    return out


async def _limiter_alone(url: str, prefix: str, n: int) -> dict[str, list[float]]:
    """The limiter's own work per send, without the rest of a send: the
    in-process bucket, the Redis script (one round trip), and a plain Redis
    GET beside it (the round trip the script's cost should be compared with)."""
    from turnline.agent.cluster import Bus
    from turnline.core.limits import SENDS, LimitsConfig
    from turnline.server.limits import LocalLimiter, RedisLimiter
    from turnline.store import open_store

    high = LimitsConfig(send_rate=1e9, send_burst=10**9)
    local = LocalLimiter(high)
    store = open_store(f"{url}?prefix={prefix}")
    await store.open()
    bus = Bus(store)
    remote = RedisLimiter(high, bus)
    out: dict[str, list[float]] = {"in-process bucket": [], "Redis bucket (script)": [], "Redis GET": []}
    try:
        for _ in range(100):  # warm: the script is loaded, connections open
            await remote.take(SENDS, "bench")
            await bus.redis.get("send-ack-warm")
        for _ in range(n):
            t = time.perf_counter()
            await local.take(SENDS, "bench")
            out["in-process bucket"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await remote.take(SENDS, "bench")
            out["Redis bucket (script)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await bus.redis.get("send-ack-warm")
            out["Redis GET"].append(time.perf_counter() - t)
    finally:
        await bus.close()
        await store.close()
    return out


def run(quick: bool) -> dict[str, Any]:
    rounds, per_round, warm = (10, 50, 50) if quick else (40, 100, 200)
    results: dict[str, Any] = {"rounds": rounds, "per_round": per_round}
    with _servers(None, None) as ports:
        results["sqlite"] = asyncio.run(_run(ports, rounds, per_round, warm))
    with redis_for_tests() as url, scratch_prefix(url) as off, scratch_prefix(url) as on:
        with _servers(f"{url}?prefix={off}", f"{url}?prefix={on}") as ports:
            results["redis"] = asyncio.run(_run(ports, rounds, per_round, warm))
        results["limiter alone"] = asyncio.run(_limiter_alone(url, on, 1000 if quick else 5000))
    return results


def table(results: dict[str, Any]) -> None:
    rows = []
    for store in ("sqlite", "redis"):
        runs = results[store]
        base = pct(runs["limits off"], 50)
        for name in ("limits off", "limits on"):
            values = [v * 1000 for v in runs[name]]
            p50 = pct(values, 50)
            rows.append([store, name, len(values), p50, pct(values, 99), max(values),
                         f"{(p50 - base * 1000) * 1000:+.0f}" if name == "limits on" else "—"])
    print_table(f"send_ack: send → ack over a loopback WebSocket, ms ({results['rounds']} alternating rounds of "
                f"{results['per_round']})", ["store", "server", "n", "p50", "p99", "max", "Δp50 µs"], rows)
    alone = [[name, len(values), pct(values, 50) * 1e6, pct(values, 99) * 1e6]
             for name, values in results["limiter alone"].items()]
    print_table("send_ack: the limiter's own work per send, µs (in one process, no server)",
                ["what", "n", "p50", "p99"], alone)


def bench(quick: bool) -> None:
    results = run(quick)
    table(results)
    print(f"written {save('send_ack', results)}")


if __name__ == "__main__":
    bench("--quick" in sys.argv)
