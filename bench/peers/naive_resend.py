"""Naive "interrupt" peer: close the SSE request, then POST the new message.

The server is bench/peers/sse_disconnect.py's app, asked to sleep ``interval``
before each token (the same shape as bench.agents' async_streamer: the first
token comes one interval after the request). The stop is Starlette's disconnect
handling (``listen_for_disconnect`` cancels the iterator; ``is_disconnected()``
is checked before each yield as well).

The client's "interrupt" of stream A with message B: close A's HTTP request,
then POST B on a new request. Measured per trial, from t0 = the moment A is
closed: t0 → first token of B received, and t0 → A's generator stopped
(server-recorded).

Run:  python -m bench.peers.naive_resend --trials 50
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx

from bench.peers._harness import (
    SSEReader,
    fetch_record,
    peer_server,
    percentile,
    read_stream,
    tokens_after,
    wait_warm,
)

async def _trial(client: httpx.AsyncClient, base: str, interval_s: float, warm: int,
                 timeout_s: float) -> dict[str, Any]:
    sid_a, sid_b = uuid.uuid4().hex, uuid.uuid4().hex
    resp_a = await client.send(client.build_request(
        "POST", f"{base}/chat", json={"id": sid_a, "interval": interval_s, "sleep_first": True}), stream=True)
    reader_a = SSEReader(resp_a)
    recv_a: list[int] = []
    warm_ev = asyncio.Event()
    task = asyncio.create_task(read_stream(reader_a, recv_a, warm_ev, warm))
    try:
        resp_a.raise_for_status()
        await wait_warm(task, warm_ev, timeout_s)
        # ---- "interrupt": close A, then POST B on a new request ------------
        t0 = time.monotonic_ns()
        task.cancel()
        await asyncio.wait({task})
        await resp_a.aclose()
        resp_b = await client.send(client.build_request(
            "POST", f"{base}/chat", json={"id": sid_b, "interval": interval_s, "sleep_first": True}), stream=True)
        reader_b = SSEReader(resp_b)
        try:
            resp_b.raise_for_status()
            first = await asyncio.wait_for(reader_b.next_event(), timeout_s)
            t_first = time.monotonic_ns()
            if first is None:
                raise RuntimeError("B ended before its first token")
        finally:
            await reader_b.aclose()
            await resp_b.aclose()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        await reader_a.aclose()
        await resp_a.aclose()
    rec = await fetch_record(client, base, sid_a, until_ns=t0 + int(timeout_s * 1e9))
    stop_ns = None
    if rec:
        stop_ns = rec["abort_ns"] if rec["abort_ns"] is not None else rec["finished_ns"]
    return {
        "first_ms": (t_first - t0) / 1e6,
        "a_stopped_ms": (stop_ns - t0) / 1e6 if stop_ns is not None else None,
        "a_gen_after_t0": tokens_after(rec["yield_ns"], t0) if rec else 0,
        "a_client_after_t0": tokens_after(recv_a, t0),
        "via": rec["via"] if rec else None,
    }


async def measure(trials: int, interval_s: float, warm: int = 3, *, timeout_s: float = 5.0) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    async with peer_server("bench.peers.sse_disconnect:app") as base:
        limits = httpx.Limits(max_keepalive_connections=4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=limits) as client:
            for _ in range(trials):
                rows.append(await _trial(client, base, interval_s, warm, timeout_s))
    first = [r["first_ms"] for r in rows]
    stopped = [r["a_stopped_ms"] for r in rows if r["a_stopped_ms"] is not None]
    via: dict[str, int] = {}
    for r in rows:
        via[r["via"] or "never"] = via.get(r["via"] or "never", 0) + 1
    return {
        "peer": "naive_resend", "trials": trials, "interval_s": interval_s,
        "first_p50_ms": percentile(first, 50), "first_p99_ms": percentile(first, 99),
        "first_minus_interval_p50_ms": percentile([f - interval_s * 1e3 for f in first], 50),
        "first_minus_interval_p99_ms": percentile([f - interval_s * 1e3 for f in first], 99),
        "a_stopped_p50_ms": percentile(stopped, 50), "a_stopped_p99_ms": percentile(stopped, 99),
        "a_never_stopped": len(rows) - len(stopped),
        "a_gen_tokens_after_t0_total": sum(r["a_gen_after_t0"] for r in rows),
        "a_client_tokens_after_t0_total": sum(r["a_client_after_t0"] for r in rows),
        "noticed_via": via,
    }


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m bench.peers.naive_resend")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.01)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(measure(a.trials, a.interval)), indent=2))
