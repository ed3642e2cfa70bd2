"""cancel_latency: how fast a stop reaches the agent, and what leaks past it.

A client on a loopback WebSocket starts a streaming turn, waits for a few
tokens, and cancels; repeated N times. Measured per trial:

- cancel → abort: cancel frame sent → the agent's abort signal fired;
- cancel → turn-end: cancel frame sent → `turn-end` received by the client;
- chunks after ack: content chunks of that turn the client receives after its
  cancel ack (the final `abort` marker and the hook's report are not content);
- upstream after cancel: tokens the agent's generator produced after the
  cancel frame was sent.

Side by side, in the same run: the two peers of bench/peers (SSE stopped by
closing the connection; a stop flag in SQLite polled once a second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from typing import Any

import websockets

from bench._common import frame_events, pct, print_table, save, token, turnline_server


async def _generator_log(path: str, turn_id: str) -> tuple[int | None, list[int]]:
    """When the agent's generator really stopped, and when it produced its last
    items (it logs both on closing, which for a sync generator may be after turn-end)."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        with open(path) as f:
            for line in f:
                tid, closed, produced = line.split()
                if tid == turn_id:
                    return int(closed), [] if produced == "-" else [int(t) for t in produced.split(",")]
        await asyncio.sleep(0.002)
    return None, []


async def _trial(ws: Any, session: str, frame_id: int, warm: int, closed_log: str) -> dict[str, Any]:
    await ws.send(json.dumps({"op": "send", "session": session, "id": frame_id,
                              "messages": [{"parts": [{"type": "text", "text": "go"}]}]}))
    turn_id = None
    deltas = 0
    last_seq = 0
    pending: list[dict[str, Any]] = []
    while turn_id is None or deltas < warm:
        frame = json.loads(await ws.recv())
        if frame.get("op") == "ack" and frame.get("id") == frame_id:
            turn_id = frame["turn_ids"][0]
            for ev in pending:
                deltas += ev["type"] == "chunk" and ev["turn_id"] == turn_id and ev["chunk"]["type"] == "text-delta"
            continue
        for ev in frame_events(frame):
            last_seq = max(last_seq, ev["seq"])
            if turn_id is None:
                pending.append(ev)
            elif ev["type"] == "chunk" and ev["turn_id"] == turn_id and ev["chunk"]["type"] == "text-delta":
                deltas += 1
    cancel_id = frame_id + 1
    t_cancel = time.monotonic_ns()
    await ws.send(json.dumps({"op": "cancel", "session": session, "id": cancel_id, "seen": last_seq}))
    acked = False
    after_ack = 0
    report: dict[str, Any] = {}
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("op") == "ack" and frame.get("id") == cancel_id:
            acked = True
            continue
        for ev in frame_events(frame):
            if ev.get("turn_id") != turn_id:
                continue
            if ev["type"] == "chunk":
                if ev["chunk"]["type"] == "data-bench":
                    report = ev["chunk"]["data"]
                elif acked and not ev.get("final"):
                    after_ack += 1
            elif ev["type"] == "turn-end":
                t_end = time.monotonic_ns()
                closed_ns, produced = await _generator_log(closed_log, turn_id)
                produced_after = sum(1 for t in produced if t > t_cancel)
                abort_ns = report.get("abort_ns")
                return {
                    "abort_ms": (abort_ns - t_cancel) / 1e6 if abort_ns else None,
                    "stopped_ms": (closed_ns - t_cancel) / 1e6 if closed_ns else None,
                    "end_ms": (t_end - t_cancel) / 1e6,
                    "chunks_after_ack": after_ack,
                    "upstream_after_cancel": produced_after,
                    "reason": ev["reason"],
                }


async def measure_turnline(agent: str, trials: int, interval: float, warm: int = 3) -> dict[str, Any]:
    closed_log = tempfile.mktemp(prefix="turnline-bench-closed-")
    open(closed_log, "w").close()
    with turnline_server(agent, env={"BENCH_INTERVAL": str(interval), "BENCH_CLOSED_LOG": closed_log}) as port:
        url = f"ws://127.0.0.1:{port}/v1/ws"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token()}"},
                                      max_size=None) as ws:
            rows = []
            for i in range(trials):
                session = f"bench-{i // 100}"
                if i % 100 == 0:
                    await ws.send(json.dumps({"op": "subscribe", "session": session}))
                rows.append(await _trial(ws, session, 10 * i + 10, warm, closed_log))
    return summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    abort = [r["abort_ms"] for r in rows if r["abort_ms"] is not None]
    stopped = [r["stopped_ms"] for r in rows if r["stopped_ms"] is not None]
    end = [r["end_ms"] for r in rows]
    return {
        "trials": len(rows),
        "abort_p50": pct(abort, 50), "abort_p99": pct(abort, 99),
        "stopped_p50": pct(stopped, 50), "stopped_p99": pct(stopped, 99),
        "end_p50": pct(end, 50), "end_p99": pct(end, 99),
        "chunks_after_ack_max": max(r["chunks_after_ack"] for r in rows),
        "chunks_after_ack_total": sum(r["chunks_after_ack"] for r in rows),
        "upstream_after_max": max(r["upstream_after_cancel"] for r in rows),
        "upstream_after_total": sum(r["upstream_after_cancel"] for r in rows),
        "never": len(rows) - len(abort),
        "not_cancelled": sum(r["reason"] != "cancelled" for r in rows),
    }


async def run(trials: int, peer_trials: int, polling_trials: int, interval: float) -> dict[str, Any]:
    from bench.peers import flag_polling, sse_disconnect

    results: dict[str, Any] = {"interval_s": interval}
    results["turnline (async generator)"] = await measure_turnline("bench.agents:async_streamer", trials, interval)
    results["turnline (sync generator)"] = await measure_turnline("bench.agents:sync_streamer", trials, interval)
    results["peer: SSE + is_disconnected()"] = _peer(await sse_disconnect.measure(peer_trials, interval))
    # The stop lands at a random moment of the 1 s polling window, as a user's would.
    results["peer: SQLite stop flag, 1 s poll"] = _peer(
        await flag_polling.measure(polling_trials, interval, stop_jitter_s=1.0))
    return results


def _peer(m: dict[str, Any]) -> dict[str, Any]:
    """Map a peer's measure() dict onto this benchmark's columns."""
    return {
        "trials": m["trials"],
        "abort_p50": m["stop_to_abort_p50_ms"], "abort_p99": m["stop_to_abort_p99_ms"],
        "end_p50": m["stop_to_client_closed_p50_ms"], "end_p99": m["stop_to_client_closed_p99_ms"],
        "chunks_after_ack_max": f"mean {m['client_tokens_after_stop_mean']:.1f}",
        "chunks_after_ack_total": m["client_tokens_after_stop_total"],
        "upstream_after_max": f"mean {m['gen_tokens_after_stop_mean']:.1f}",
        "upstream_after_total": m["gen_tokens_after_stop_total"],
        "never": m["never"],
    }


def table(results: dict[str, Any]) -> None:
    cols = ["system", "trials", "cancel→abort p50 ms", "p99 ms", "cancel→turn-end/closed p50 ms", "p99 ms",
            "chunks after ack (max)", "upstream after cancel (max / total)", "never stopped"]
    rows = []
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        rows.append([name, r["trials"], r["abort_p50"], r["abort_p99"], r["end_p50"], r["end_p99"],
                     r["chunks_after_ack_max"], f"{r['upstream_after_max']} / {r['upstream_after_total']}",
                     r["never"]])
    print_table(f"cancel_latency (token every {results['interval_s'] * 1000:.0f} ms, loopback)", cols, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--peer-trials", type=int, default=200)
    ap.add_argument("--polling-trials", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.01)
    args = ap.parse_args()
    results = asyncio.run(run(args.trials, args.peer_trials, args.polling_trials, args.interval))
    table(results)
    print(f"\nwritten {save('cancel_latency', results)}")


if __name__ == "__main__":
    main()
