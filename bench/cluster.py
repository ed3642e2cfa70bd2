"""cluster: a cancel across nodes, and how soon a dead worker's turn ends.

Topology (every part a real process on this machine): a throwaway
``redis-server`` (no persistence); gateways (``turnline serve --store redis://…``,
no agent); workers (``turnline worker --agent bench.agents:async_streamer``: a
token every 10 ms; its on_abort hook reports when the abort fired).

- cancel: a client on a gateway starts a turn, which runs in a worker process,
  waits for 3 tokens and cancels (the trial of ``bench/cancel_latency.py``):
  cancel sent → the agent's abort fired (``time.monotonic_ns()`` is
  system-wide on Linux, so the two processes' clocks agree), and cancel sent →
  ``turn-end`` received by the client. Side by side: one process on Redis
  (``serve --store redis://… --agent …``: gateway and worker in one).
- worker_lost: ``kill -9`` of the worker running a turn → the client receives
  its ``turn-end`` (``error``/``worker_lost``); default lease 3000 ms and reaper
  500 ms (bound 3.5 s), and a short lease. The worker's pid is read from the
  session's lease (``w<pid>-…|n``); a new worker replaces the dead one.

``python -m bench cluster [--quick]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import redis.asyncio as aioredis
import websockets

from bench._common import NO_LIMITS, SECRET, frame_events, free_port, pct, print_table, save, token
from bench.cancel_latency import _trial, summarize
from bench.fanout import STARTUP_S, Cluster, Proc, cluster

AGENT = "bench.agents:async_streamer"
INTERVAL = 0.01


def _gateway(c: Cluster, url: str, name: str, extra: tuple[str, ...] = ()) -> tuple[Proc, str]:
    port = free_port()
    proc = c.spawn(name, [sys.executable, "-m", "turnline.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                          "--store", url, "--secret", SECRET, "--no-dev", "--log-level", "warning", *NO_LIMITS,
                          *extra],
                   env=_agent_env(c))
    c.wait_http(proc, port)
    return proc, f"ws://127.0.0.1:{port}/v1/ws"


def _worker(c: Cluster, url: str, name: str, lease_ms: int = 3000, reaper_ms: int = 500) -> Proc:
    proc = c.spawn(name, [sys.executable, "-m", "turnline.cli", "worker", "--store", url, "--agent", AGENT,
                          "--lease-ms", str(lease_ms), "--reaper-ms", str(reaper_ms), "--log-level", "warning"],
                   env=_agent_env(c))
    deadline = time.monotonic() + STARTUP_S
    while "turnline worker " not in proc.tail():
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start: {proc.tail()}")
        time.sleep(0.05)
    return proc


def _agent_env(c: Cluster) -> dict[str, str]:
    return {"BENCH_INTERVAL": str(INTERVAL), "BENCH_CLOSED_LOG": str(c.tmp / "closed.log")}


async def _cancels(ws_url: str, trials: int, closed_log: str) -> dict[str, Any]:
    async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {token()}"},
                                  max_size=None) as ws:
        rows = []
        for i in range(trials):
            session = f"cancel-{i // 100}"
            if i % 100 == 0:
                await ws.send(json.dumps({"op": "subscribe", "session": session}))
            rows.append(await _trial(ws, session, 10 * i + 10, 3, closed_log))
    return summarize(rows)


def measure_cancel(trials: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with cluster() as c:
        open(c.tmp / "closed.log", "w").close()
        _, url = c.redis()
        _, gateway_a = _gateway(c, url, "gateway-a")
        _gateway(c, url, "gateway-b")
        for i in range(2):
            _worker(c, url, f"worker-{i}")
        results["2 gateways + 2 workers (cancel via Redis to the worker's inbox)"] = asyncio.run(
            _cancels(gateway_a, trials, str(c.tmp / "closed.log")))
    with cluster() as c:
        open(c.tmp / "closed.log", "w").close()
        _, url = c.redis()
        _, single = _gateway(c, url, "single", ("--agent", AGENT))
        results["one process on Redis (gateway + in-process worker)"] = asyncio.run(
            _cancels(single, trials, str(c.tmp / "closed.log")))
    return results


async def _lost_trial(ws: Any, r: aioredis.Redis, session: str, frame_id: int) -> tuple[float, int, dict[str, Any]]:
    await ws.send(json.dumps({"op": "subscribe", "session": session, "id": frame_id}))
    await ws.send(json.dumps({"op": "send", "session": session, "id": frame_id + 1,
                              "messages": [{"parts": [{"type": "text", "text": "go"}]}]}))
    turn_id = None
    tokens = 0
    while tokens < 3:
        frame = json.loads(await ws.recv())
        if frame.get("op") == "ack" and frame.get("id") == frame_id + 1:
            turn_id = frame["turn_ids"][0]
        tokens += sum(1 for ev in frame_events(frame) if ev["type"] == "chunk" and ev["turn_id"] == turn_id
                      and ev["chunk"]["type"] == "text-delta")
    owner = await r.get(f"tl:{{{session}}}:lease")
    pid = int(owner.split(b"-", 1)[0][1:])
    t_kill = time.monotonic_ns()
    os.kill(pid, signal.SIGKILL)
    while True:
        frame = json.loads(await ws.recv())
        for ev in frame_events(frame):
            if ev["type"] == "turn-end" and ev["turn_id"] == turn_id:
                return (time.monotonic_ns() - t_kill) / 1e6, pid, ev


def measure_lost(trials: int, lease_ms: int, reaper_ms: int) -> dict[str, Any]:
    times: list[float] = []
    reasons: list[str] = []
    with cluster() as c:
        _, url = c.redis()
        _, gateway = _gateway(c, url, "gateway")
        workers = {w.pid: w for w in (_worker(c, url, f"worker-{i}", lease_ms, reaper_ms) for i in range(2))}

        async def run() -> None:
            r = aioredis.Redis.from_url(url)
            async with websockets.connect(gateway, additional_headers={"Authorization": f"Bearer {token()}"},
                                          max_size=None) as ws:
                for i in range(trials):
                    ms, pid, end = await asyncio.wait_for(_lost_trial(ws, r, f"lost-{i}", 10 * i + 10), 60)
                    times.append(ms)
                    reasons.append(f"{end['reason']}/{(end.get('error') or {}).get('code')}")
                    workers.pop(pid).popen.wait()
                    new = _worker(c, url, f"worker-{len(c.procs)}", lease_ms, reaper_ms)
                    workers[new.pid] = new
            await r.aclose()

        asyncio.run(run())
    return {"trials": trials, "lease_ms": lease_ms, "reaper_ms": reaper_ms,
            "bound_ms": lease_ms + reaper_ms, "p50_ms": pct(times, 50), "max_ms": max(times),
            "min_ms": min(times), "all_worker_lost": all(r == "error/worker_lost" for r in reasons),
            "times_ms": times}


def bench(quick: bool) -> None:
    trials = 100 if quick else 1000
    cancel = measure_cancel(trials)
    lost = [measure_lost(2 if quick else 5, 3000, 500)]
    if not quick:
        lost.append(measure_lost(5, 1000, 200))
    results = {"interval_s": INTERVAL, "cancel": cancel, "worker_lost": lost}
    print_table(f"cluster: cancel across nodes (token every {INTERVAL * 1000:.0f} ms, loopback Redis)",
                ["topology", "trials", "cancel→abort p50 ms", "p99 ms", "cancel→turn-end p50 ms", "p99 ms",
                 "chunks after ack (max)", "not cancelled"],
                [[name, r["trials"], r["abort_p50"], r["abort_p99"], r["end_p50"], r["end_p99"],
                  r["chunks_after_ack_max"], r["not_cancelled"]] for name, r in cancel.items()])
    print_table("cluster: kill -9 of the worker running a turn → the client gets turn-end worker_lost",
                ["lease ms", "reaper ms", "bound ms", "trials", "min ms", "p50 ms", "max ms", "all worker_lost"],
                [[r["lease_ms"], r["reaper_ms"], r["bound_ms"], r["trials"], r["min_ms"], r["p50_ms"], r["max_ms"],
                  r["all_worker_lost"]] for r in lost])
    print(f"written {save('cluster', results)}")


if __name__ == "__main__":
    bench("--quick" in sys.argv)
