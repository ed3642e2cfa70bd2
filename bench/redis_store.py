"""redis_store: resume catch-up of a 10,000-event backlog, and append throughput —
the Redis Streams store side by side with the SQLite store, in one run.

1. Catch-up over the wire: a session holding 10,000 events (20 turns of 500:
   user message, turn-start, 497 chunks, turn-end with the folded message) is
   written to the store, then `turnline serve --store …` runs on it. A WebSocket
   client sends `subscribe` with `after: 0` and the clock runs until it has
   received (and JSON-decoded) the event with seq 10,000. "cold": the first
   subscribe to a session on that server (the server also folds the log into
   the session's state); "warm": later subscribes. The client offers
   permessage-deflate, as browsers do; the server declines it by default, and
   one row runs it with ``--ws-deflate`` (the 1.5 MB of JSON is then
   compressed). Target: ≤ 100 ms.
2. Catch-up in the store: `read(session, 0)` of the 10,000 events, and
   `follow(session, after=0)` until seq 10,000, in-process.
3. Append throughput (events/s): one writer awaiting each 1-event append
   (latency-bound), 200 sessions appending 1 event at a time concurrently (what
   many session hubs do; group commit), and 100-event batches.

Redis is the local one (127.0.0.1:6379) or a throwaway server
(tests/redis_server.py); the benchmark's keys use a random prefix and are
deleted afterwards. "redis cluster" is a throwaway Redis Cluster of three
primaries on this machine (the same script), for what a cluster costs. SQLite runs with synchronous=NORMAL in a temp dir.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from typing import Any, Callable

import msgspec
import websockets

from bench._common import REPO, pct, print_table, save, token, turnline_server

sys.path.insert(0, str(REPO / "tests"))
from redis_server import redis_cluster_for_tests, redis_for_tests, scratch_prefix  # noqa: E402

from turnline.agent.turn import message_from_input  # noqa: E402
from turnline.core.session import Session  # noqa: E402
from turnline.protocol import AnyEvent, ChunkEvent, MessageEvent, TurnEnd, TurnStart, user_message  # noqa: E402
from turnline.store.base import EventLog  # noqa: E402
from turnline.store.redis import RedisEventLog  # noqa: E402
from turnline.store.sqlite import SQLiteEventLog  # noqa: E402

BACKLOG = 10_000
TURN_EVENTS = 500
TARGET_MS = 100.0


def backlog_events() -> list[AnyEvent]:
    """10,000 events of a plausible session: 20 turns of 500 events each."""
    state = Session()
    events: list[AnyEvent] = []

    def add(ev: AnyEvent) -> None:
        ev.seq = state.last_seq + 1
        ev.ts = int(time.time() * 1000)
        state.apply(ev)
        events.append(ev)

    parent = None
    for t in range(BACKLOG // TURN_EVENTS):
        msg = user_message(f"question number {t}, about something long enough to be a real prompt")
        input_id, reply_id, turn_id = f"in-{t}", f"reply-{t}", f"turn-{t}"
        add(MessageEvent(client_id="alice", message=message_from_input(msg, input_id, parent)))
        add(TurnStart(turn_id=turn_id, owner="alice", input_id=input_id, message_id=reply_id, client_id="agent"))
        add(ChunkEvent(turn_id=turn_id, chunk={"type": "text-start", "id": "t0"}, client_id="agent"))
        for i in range(TURN_EVENTS - 5):
            add(ChunkEvent(turn_id=turn_id, chunk={"type": "text-delta", "id": "t0", "delta": f"word{i} "},
                           client_id="agent"))
        add(ChunkEvent(turn_id=turn_id, chunk={"type": "text-end", "id": "t0"}, client_id="agent"))
        add(TurnEnd(turn_id=turn_id, reason="complete", message=state.persisted_message(turn_id, "complete"),
                    client_id="agent"))
        parent = reply_id
    assert len(events) == BACKLOG
    return events


def fresh(events: list[AnyEvent]) -> list[AnyEvent]:
    """Copies without seq (the store numbers them)."""
    out = []
    for ev in events:
        c = msgspec.structs.replace(ev)
        c.seq = 0
        out.append(c)
    return out


async def populate(log: EventLog, session: str, events: list[AnyEvent]) -> None:
    for i in range(0, len(events), 500):
        await log.append(session, fresh(events[i:i + 500]))


# ----------------------------------------------------------------- over the wire


_frame = msgspec.json.Decoder()


async def ws_catch_up(port: int, session: str, compression: str | None = "deflate") -> float:
    """ms from sending subscribe(after=0) to holding the event with seq BACKLOG.
    ``compression``: "deflate" (permessage-deflate, what browsers offer) or None."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", max_size=None, compression=compression,
                                  additional_headers={"Authorization": f"Bearer {token()}"}) as ws:
        t0 = time.perf_counter()
        await ws.send(msgspec.json.encode({"op": "subscribe", "session": session, "after": 0, "id": 1}).decode())
        last = 0
        count = 0
        while last < BACKLOG:
            frame = _frame.decode(await ws.recv())
            op = frame.get("op")
            if op == "events":
                count += len(frame["events"])
                last = frame["events"][-1]["seq"]
            elif op == "event":
                count += 1
                last = frame["event"]["seq"]
            elif op == "error":
                raise RuntimeError(f"server error: {frame}")
        elapsed = (time.perf_counter() - t0) * 1000
        if count != BACKLOG:
            raise RuntimeError(f"received {count} events, expected {BACKLOG}")
        return elapsed


async def wire_runs(port: int, sessions: list[str], warm_runs: int) -> dict[str, list[float]]:
    cold = [await ws_catch_up(port, s) for s in sessions]
    warm = [await ws_catch_up(port, sessions[i % len(sessions)]) for i in range(warm_runs)]
    return {"cold": cold, "warm": warm}


async def deflate_runs(port: int, sessions: list[str], warm_runs: int) -> list[float]:
    for s in sessions:  # loaded once: the warm path only
        await ws_catch_up(port, s)
    return [await ws_catch_up(port, sessions[i % len(sessions)]) for i in range(warm_runs)]


# ----------------------------------------------------------------- in the store


async def store_runs(log: EventLog, session: str, runs: int) -> dict[str, list[float]]:
    reads, follows = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        got = await log.read(session, 0)
        reads.append((time.perf_counter() - t0) * 1000)
        assert len(got) == BACKLOG and got[-1].seq == BACKLOG
        t0 = time.perf_counter()
        n = 0
        follower = log.follow(session, after=0)
        async for batch in follower:
            n += len(batch)
            if batch[-1].seq >= BACKLOG:
                break
        await follower.aclose()
        follows.append((time.perf_counter() - t0) * 1000)
        assert n == BACKLOG
    return {"read": reads, "follow": follows}


async def throughput(make: Callable[[], Any], quick: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    log = await make()
    try:
        n = 500 if quick else 2000
        t0 = time.perf_counter()
        for i in range(n):
            await log.append("one", [ChunkEvent(turn_id="t", chunk={"type": "text-delta", "id": "x", "delta": "w "})])
        out["1 writer, 1 event per append"] = n / (time.perf_counter() - t0)

        sessions, per = (50, 20) if quick else (200, 50)

        async def hub(s: str) -> None:
            for _ in range(per):
                await log.append(s, [ChunkEvent(turn_id="t", chunk={"type": "text-delta", "id": "x", "delta": "w "})])

        t0 = time.perf_counter()
        await asyncio.gather(*(hub(f"hub{i}") for i in range(sessions)))
        out[f"{sessions} sessions at once, 1 event per append"] = sessions * per / (time.perf_counter() - t0)

        batches = 20 if quick else 100
        t0 = time.perf_counter()
        for _ in range(batches):
            await log.append("batch", [ChunkEvent(turn_id="t", chunk={"type": "text-delta", "id": "x", "delta": "w "})
                                       for _ in range(100)])
        out["1 writer, 100 events per append"] = batches * 100 / (time.perf_counter() - t0)
    finally:
        await log.close()
    return out


# ----------------------------------------------------------------- the run

STORES = ("sqlite", "redis", "redis cluster")


async def run(quick: bool) -> dict[str, Any]:
    events = backlog_events()
    cold_sessions = 3 if quick else 10
    warm_runs = 5 if quick else 30
    store_n = 5 if quick else 20
    sessions = [f"backlog-{i}" for i in range(cold_sessions)]
    results: dict[str, Any] = {"backlog": BACKLOG, "target_ms": TARGET_MS}

    with redis_for_tests() as redis_url, scratch_prefix(redis_url) as prefix, \
            redis_cluster_for_tests() as cluster_url, tempfile.TemporaryDirectory() as tmp:
        sqlite_path = f"{tmp}/bench.db"

        async def redis_log(**kw: Any) -> RedisEventLog:
            log = RedisEventLog(redis_url, prefix=prefix, retention_s=None, **kw)
            await log.open()
            return log

        async def cluster_log(**kw: Any) -> RedisEventLog:
            log = RedisEventLog(cluster_url, prefix=prefix, retention_s=None, **kw)
            await log.open()
            return log

        async def sqlite_log() -> SQLiteEventLog:
            log = SQLiteEventLog(sqlite_path)
            await log.open()
            return log

        stores: dict[str, tuple[Callable[[], Any], str]] = {
            "sqlite": (sqlite_log, f"sqlite:///{sqlite_path}"),
            "redis": (redis_log, f"{redis_url}?prefix={prefix}&retention_s=none"),
            "redis cluster": (cluster_log, f"{cluster_url}?prefix={prefix}&retention_s=none"),
        }
        for name, (make, url) in stores.items():
            log = await make()
            try:
                for s in sessions:
                    await populate(log, s, events)
                results[f"{name} store"] = await store_runs(log, sessions[0], store_n)
            finally:
                await log.close()
        for name, (make, url) in stores.items():
            with turnline_server("bench.agents:async_streamer", store=url) as port:
                results[f"{name} wire"] = await wire_runs(port, sessions, warm_runs)
            with turnline_server("bench.agents:async_streamer", store=url, extra=["--ws-deflate"]) as port:
                results[f"{name} wire"]["warm, --ws-deflate"] = await deflate_runs(port, sessions, warm_runs)
        for name, (make, url) in stores.items():
            results[f"{name} append"] = await throughput(make, quick)
    return results


def table(results: dict[str, Any]) -> None:
    rows = []
    for name in STORES:
        wire, store = results[f"{name} wire"], results[f"{name} store"]
        for label, values in (("WebSocket, cold (first subscribe: loads the session)", wire["cold"]),
                              ("WebSocket, warm", wire["warm"]),
                              ("WebSocket, warm, server with --ws-deflate", wire["warm, --ws-deflate"]),
                              ("store read(after=0)", store["read"]),
                              ("store follow(after=0)", store["follow"])):
            rows.append([name, label, len(values), pct(values, 50), pct(values, 99), max(values)])
    print_table(f"Resume catch-up of a {results['backlog']:,}-event backlog, ms (target ≤ {TARGET_MS:.0f} ms)",
                ["store", "path", "runs", "p50", "p99", "max"], rows)
    rows = []
    for label in results["redis append"]:
        rows.append([label, *(round(results[f"{name} append"][label]) for name in STORES)])
    print_table("Append throughput, events/s", ["workload", "sqlite (NORMAL)", "redis", "redis cluster (3 primaries)"],
                rows)


def bench(quick: bool) -> None:
    results = asyncio.run(run(quick))
    table(results)
    print(f"written {save('redis_store', results)}")


if __name__ == "__main__":
    bench("--quick" in sys.argv)
