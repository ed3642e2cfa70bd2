"""cancel_latency: how fast a stop reaches the agent, and what leaks past it.

A client on a loopback WebSocket starts a streaming turn, waits for a few
tokens, and cancels; repeated N times. Measured per trial:

- cancel → abort: cancel frame sent → the agent's abort signal fired;
- cancel → turn-end: cancel frame sent → `turn-end` received by the client;
- chunks after ack: content chunks of that turn the client receives after its
  cancel ack (the final `abort` marker and the hook's report are not content);
- upstream after cancel: tokens the agent's generator produced after the
  cancel frame was sent.

Side by side, in the same run, trials alternating with turnline's: the real
peer, LangGraph's dev server (`langgraph dev`, bench/peers/langgraph_dev.py),
with an async node and a sync node streaming a token every interval through
`get_stream_writer()` (bench/peers/langgraph_graphs.py); the run is stopped
with `POST /threads/{tid}/runs/{rid}/cancel?action=interrupt`. For it,
cancel → abort is cancel sent → the node saw CancelledError (never, for a sync
node), cancel → closed is cancel sent → the client's run stream closed, chunks
after ack are tokens received after the cancel's 202, upstream after cancel
are tokens the node produced after the cancel was sent (it logs them when it
stops). Then the two home-made peers of bench/peers (SSE stopped by closing
the connection; a stop flag in SQLite polled once a second).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import websockets

from bench._common import alternate, frame_events, pct, print_table, save, token, turnline_server

Trial = Callable[[], Awaitable[dict[str, Any]]]


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


@contextlib.asynccontextmanager
async def turnline_trials(agent: str, interval: float, warm: int = 3) -> AsyncIterator[Trial]:
    """A `turnline serve` running ``agent`` and one WebSocket to it; yields a
    callable that runs one cancel trial (100 per session)."""
    closed_log = tempfile.mktemp(prefix="turnline-bench-closed-")
    open(closed_log, "w").close()
    with turnline_server(agent, env={"BENCH_INTERVAL": str(interval), "BENCH_CLOSED_LOG": closed_log}) as port:
        url = f"ws://127.0.0.1:{port}/v1/ws"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token()}"},
                                      max_size=None) as ws:
            done = 0

            async def trial() -> dict[str, Any]:
                nonlocal done
                session = f"bench-{done // 100}"
                if done % 100 == 0:
                    await ws.send(json.dumps({"op": "subscribe", "session": session}))
                row = await _trial(ws, session, 10 * done + 10, warm, closed_log)
                done += 1
                return row

            yield trial


async def measure_turnline(agent: str, trials: int, interval: float, warm: int = 3) -> dict[str, Any]:
    async with turnline_trials(agent, interval, warm) as trial:
        return summarize([await trial() for _ in range(trials)])


# --------------------------------------------------------------------------- #
# the real peer: LangGraph's dev server (bench/peers/langgraph_dev.py)
# --------------------------------------------------------------------------- #


async def _langgraph_trial(http: httpx.AsyncClient, base: str, graph: str, trial_id: str, warm: int,
                           closed_log: str, tokens: int, interval: float) -> dict[str, Any]:
    """One run on its own thread: wait for ``warm`` tokens, cancel it
    (``action=interrupt``), read its stream to the end, then wait for the node's
    own log of when it stopped producing (a node never stopped runs all its tokens)."""
    from bench.peers import langgraph_dev as lg

    thread = await lg.new_thread(http, base)
    got: list[tuple[int, str]] = []  # (received ns, event name), timestamped on arrival
    warmed = asyncio.Event()
    async with lg.run_stream(http, base, thread, lg.run_body(graph, trial_id)) as (run_id, events):
        reader = asyncio.ensure_future(lg.read_timed(events, got, warm, warmed))
        waiter = asyncio.ensure_future(warmed.wait())
        try:
            await asyncio.wait({reader, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if not warmed.is_set():
                raise RuntimeError(f"langgraph dev: {graph} sent {len(got)} events, not {warm} tokens")
            t_cancel = time.monotonic_ns()
            await lg.cancel(http, base, thread, run_id)
            t_ack = time.monotonic_ns()
            t_end = await asyncio.wait_for(reader, 30)
        finally:
            waiter.cancel()
            reader.cancel()
    status = (await http.get(f"{base}/threads/{thread}/runs/{run_id}")).json()["status"]
    logged = await lg.node_log(closed_log, trial_id, lg.node_timeout(tokens, interval))
    stopped_ns, how, produced = logged if logged else (None, "never logged", [])
    return {
        "abort_ms": (stopped_ns - t_cancel) / 1e6 if how == "cancelled" else None,
        "stopped_ms": (stopped_ns - t_cancel) / 1e6 if stopped_ns else None,
        "end_ms": (t_end - t_cancel) / 1e6,
        "chunks_after_ack": sum(1 for ns, name in got if name == "custom" and ns > t_ack),
        "upstream_after_cancel": sum(1 for t in produced if t > t_cancel),
        "reason": "cancelled" if status == "interrupted" else status,
        "node": how,
        "events_after_cancel": sorted({name for ns, name in got if ns > t_cancel}),
    }


@contextlib.asynccontextmanager
async def langgraph_trials(interval: float, tokens: int, warm: int = 3
                           ) -> AsyncIterator[dict[str, Trial]]:
    """`langgraph dev` serving both graphs; yields graph id → one cancel trial."""
    from bench.peers import langgraph_dev as lg

    closed_log = tempfile.mktemp(prefix="turnline-bench-langgraph-closed-")
    open(closed_log, "w").close()
    env = {"BENCH_INTERVAL": str(interval), "BENCH_TOKENS": str(tokens), "BENCH_CLOSED_LOG": closed_log}
    async with lg.langgraph_dev(env) as base, httpx.AsyncClient(timeout=30) as http:
        counter = iter(range(10**9))

        def trial_of(graph: str) -> Trial:
            return lambda: _langgraph_trial(http, base, graph, f"{graph}-{next(counter)}", warm, closed_log,
                                            tokens, interval)

        yield {graph: trial_of(graph) for graph in ("async_tokens", "sync_tokens")}


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
        **({"node_outcomes": {how: sum(r["node"] == how for r in rows) for how in sorted({r["node"] for r in rows})},
            "events_after_cancel": sorted({e for r in rows for e in r["events_after_cancel"]})}
           if rows and "node" in rows[0] else {}),
    }


LANGGRAPH_ASYNC = "peer: LangGraph dev server, async node"
LANGGRAPH_SYNC = "peer: LangGraph dev server, sync node"


async def run(trials: int, peer_trials: int, polling_trials: int, interval: float,
              langgraph_trials_n: int | None = None, langgraph_tokens: int = 53) -> dict[str, Any]:
    """turnline (async and sync generator) and LangGraph's dev server (async and
    sync node) in one sequence of alternating trials; then the home-made peers."""
    from bench.peers import flag_polling, sse_disconnect
    from bench.peers.langgraph_dev import versions

    lg_n = peer_trials if langgraph_trials_n is None else langgraph_trials_n
    results: dict[str, Any] = {"interval_s": interval, "langgraph": {**versions(), "tokens": langgraph_tokens}}
    async with (turnline_trials("bench.agents:async_streamer", interval) as tl_async,
                turnline_trials("bench.agents:sync_streamer", interval) as tl_sync,
                langgraph_trials(interval, langgraph_tokens) as lg):
        rows = await alternate({
            "turnline (async generator)": (trials, tl_async),
            "turnline (sync generator)": (trials, tl_sync),
            LANGGRAPH_ASYNC: (lg_n, lg["async_tokens"]),
            LANGGRAPH_SYNC: (lg_n, lg["sync_tokens"]),
        })
    results.update({name: summarize(r) for name, r in rows.items()})
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
        if not isinstance(r, dict) or "trials" not in r:
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
    ap.add_argument("--langgraph-trials", type=int, help="per LangGraph node kind; default: --peer-trials")
    ap.add_argument("--interval", type=float, default=0.01)
    args = ap.parse_args()
    results = asyncio.run(run(args.trials, args.peer_trials, args.polling_trials, args.interval,
                              langgraph_trials_n=args.langgraph_trials))
    table(results)
    print(f"\nwritten {save('cancel_latency', results)}")


if __name__ == "__main__":
    main()
