"""interrupt: double-texting, measured — `interrupt` against close-and-resend, and `queue`.

1. interrupt (turnline, one WebSocket): send A (policy concurrent), wait for 3
   text-delta chunks of A's turn, t0, send B with `"policy":"interrupt"`. Per
   trial: t0 → first text-delta of B's turn (B's turn id from its ack's
   `turn_ids[0]`), t0 → A's `turn-end` (reason must be `cancelled`), and tail
   attribution: chunks of A's turn (and A's turn-end) that arrive after B's first
   chunk. The agent (bench.agents:async_streamer) sleeps one interval before its
   first token, so "first token − interval" is reported as well.
2. the real peer, LangGraph's dev server (bench/peers/langgraph_dev.py), in
   the same sequence as 1, trials alternating: run A (async node, a token
   every interval after an interval's sleep, as turnline's agent) streams on a
   thread; after 3 tokens (t0) run B is posted on the thread with
   `multitask_strategy: "interrupt"`. t0 → B's first token, t0 → A's stream
   closed ("turn-end"), t0 → A's node saw CancelledError ("abort"), A's tokens
   after B's first; A's run must end `interrupted`.
3. naive peer (bench/peers/naive_resend.py): close A's SSE request, POST B on a
   new request; t0 (closing A) → first token of B, t0 → A's generator stopped.
4. queue: one session, 1 message then 100 with `"policy":"queue"` as fast as
   acks come back, agent bench.interrupt_agents:short_answer (5 tokens, no
   sleep). Checks the 101 turns started in send order; total time, per-message
   overhead = (total − 101 × one unqueued turn alone) / 100, and the
   turn-end → next turn-start gaps (client receive times). Awaiting each ack,
   a 5-token turn usually ends before the next send lands, so nothing is
   queued; a second run writes all 101 frames first, then reads the acks,
   which does exercise the queue.
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
LANGGRAPH = "peer: LangGraph dev server, multitask_strategy=interrupt"


def _text(text: str) -> list[dict[str, Any]]:
    return [{"parts": [{"type": "text", "text": text}]}]


def _is_delta(ev: dict[str, Any]) -> bool:
    return ev["type"] == "chunk" and ev["chunk"]["type"] == "text-delta"


class _Conn:
    """One WebSocket; every event is timestamped on receipt and kept in order."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.log: list[tuple[int, dict[str, Any]]] = []  # (recv_ns, event)
        self.acks: dict[int, dict[str, Any]] = {}

    async def pump(self) -> None:
        frame = json.loads(await self.ws.recv())
        now = time.monotonic_ns()
        if frame.get("op") == "ack":
            self.acks[frame["id"]] = frame
        elif frame.get("op") == "error":
            raise RuntimeError(f"server error: {frame}")
        for ev in frame_events(frame):
            self.log.append((now, ev))

    async def ack(self, frame_id: int) -> dict[str, Any]:
        while frame_id not in self.acks:
            await self.pump()
        return self.acks.pop(frame_id)

    async def until(self, pred, start: int = 0) -> tuple[int, int, dict[str, Any]]:
        """First logged event from index `start` matching pred: (index, recv_ns, event)."""
        i = start
        while True:
            while i < len(self.log):
                ns, ev = self.log[i]
                if pred(ev):
                    return i, ns, ev
                i += 1
            await self.pump()


# --------------------------------------------------------------------------- #
# 1. interrupt
# --------------------------------------------------------------------------- #


async def _interrupt_trial(c: _Conn, session: str, fid: int, warm: int) -> dict[str, Any]:
    start = len(c.log)
    await c.ws.send(json.dumps({"op": "send", "session": session, "id": fid, "policy": "concurrent",
                                "messages": _text("A")}))
    a = (await c.ack(fid))["turn_ids"][0]
    i = start
    for _ in range(warm):
        i, _, _ = await c.until(lambda e: e.get("turn_id") == a and _is_delta(e), i)
        i += 1
    mark = len(c.log)
    t0 = time.monotonic_ns()
    await c.ws.send(json.dumps({"op": "send", "session": session, "id": fid + 1, "policy": "interrupt",
                                "messages": _text("B")}))
    ack_b = await c.ack(fid + 1)  # events before the ack stay in c.log
    b = ack_b["turn_ids"][0]
    i_end, ns_end, end_a = await c.until(lambda e: e["type"] == "turn-end" and e["turn_id"] == a, mark)
    i_first, ns_first, _ = await c.until(lambda e: e.get("turn_id") == b and _is_delta(e), mark)
    # tail attribution: anything of A's turn after B's first chunk (any chunk type)
    i_b_any, _, _ = await c.until(lambda e: e["type"] == "chunk" and e["turn_id"] == b, mark)
    a_after = [e for _, e in c.log[i_b_any + 1:] if e["type"] == "chunk" and e["turn_id"] == a]
    a_delta_after_mark = sum(1 for _, e in c.log[mark:] if e.get("turn_id") == a and _is_delta(e))
    # finish B so the next trial starts clean
    await c.ws.send(json.dumps({"op": "cancel", "session": session, "id": fid + 2,
                                "filter": {"turn_id": b}}))
    await c.ack(fid + 2)
    await c.until(lambda e: e["type"] == "turn-end" and e["turn_id"] == b, mark)
    abort_ns = next((e["chunk"]["data"].get("abort_ns") for _, e in c.log[mark:] if e["type"] == "chunk"
                     and e["turn_id"] == a and e["chunk"]["type"] == "data-bench"), None)
    return {
        "abort_ms": (abort_ns - t0) / 1e6 if abort_ns else None,
        "first_ms": (ns_first - t0) / 1e6,
        "a_end_ms": (ns_end - t0) / 1e6,
        "reason": end_a["reason"],
        "ack_cancelled_a": a in (ack_b.get("cancelled") or []),
        "a_chunks_after_b_first": len(a_after),
        "a_end_after_b_first": i_end > i_b_any,
        "a_deltas_after_t0": a_delta_after_mark,
    }


@contextlib.asynccontextmanager
async def turnline_interrupt_trials(interval: float, warm: int = 3) -> AsyncIterator[Trial]:
    """`turnline serve` (async agent) and one WebSocket; yields one interrupt trial (50 per session)."""
    with turnline_server("bench.agents:async_streamer", env={"BENCH_INTERVAL": str(interval)}) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", max_size=None,
                                      additional_headers={"Authorization": f"Bearer {token()}"}) as ws:
            c = _Conn(ws)
            done = 0

            async def trial() -> dict[str, Any]:
                nonlocal done
                session = f"int-{done // 50}"
                if done % 50 == 0:
                    await ws.send(json.dumps({"op": "subscribe", "session": session, "id": 1}))
                    await c.ack(1)
                row = await _interrupt_trial(c, session, 10 * done + 10, warm)
                c.log.clear()
                done += 1
                return row

            yield trial


def summarize_interrupt(rows: list[dict[str, Any]], interval: float) -> dict[str, Any]:
    first = [r["first_ms"] for r in rows]
    sub = [f - interval * 1e3 for f in first]
    end = [r["a_end_ms"] for r in rows]
    abort = [r["abort_ms"] for r in rows if r["abort_ms"] is not None]
    return {
        "a_abort_p50": pct(abort, 50), "a_abort_p99": pct(abort, 99), "a_abort_missing": len(rows) - len(abort),
        "trials": len(rows),
        "first_p50": pct(first, 50), "first_p99": pct(first, 99),
        "first_minus_interval_p50": pct(sub, 50), "first_minus_interval_p99": pct(sub, 99),
        "a_end_p50": pct(end, 50), "a_end_p99": pct(end, 99),
        "not_cancelled": sum(r["reason"] != "cancelled" for r in rows),
        "reasons": sorted({r["reason"] for r in rows}),
        "ack_missing_cancelled": (None if any(r["ack_cancelled_a"] is None for r in rows)
                                  else sum(not r["ack_cancelled_a"] for r in rows)),
        "a_chunks_after_b_first_total": sum(r["a_chunks_after_b_first"] for r in rows),
        "trials_with_a_chunks_after_b_first": sum(r["a_chunks_after_b_first"] > 0 for r in rows),
        "trials_a_end_after_b_first": sum(r["a_end_after_b_first"] for r in rows),
        "a_deltas_after_t0_total": sum(r["a_deltas_after_t0"] for r in rows),
    }


async def measure_interrupt(trials: int, interval: float, warm: int = 3) -> dict[str, Any]:
    async with turnline_interrupt_trials(interval, warm) as trial:
        return summarize_interrupt([await trial() for _ in range(trials)], interval)


# --------------------------------------------------------------------------- #
# 2. the real peer: LangGraph's dev server, multitask_strategy="interrupt"
# --------------------------------------------------------------------------- #


async def _langgraph_interrupt_trial(http: httpx.AsyncClient, base: str, trial_id: str, warm: int,
                                     closed_log: str, tokens: int, interval: float) -> dict[str, Any]:
    """Run A streams on a thread; after ``warm`` tokens (t0) run B is posted on
    the same thread with ``multitask_strategy: "interrupt"``. Measured: t0 → B's
    first token, t0 → A's stream closed, t0 → A's node saw CancelledError."""
    from bench.peers import langgraph_dev as lg

    thread = await lg.new_thread(http, base)
    a_log: list[tuple[int, str]] = []
    b_log: list[tuple[int, str]] = []
    a_warm, b_first = asyncio.Event(), asyncio.Event()
    async with lg.run_stream(http, base, thread, lg.run_body("async_tokens", f"{trial_id}-a")) as (a_id, a_events):
        a_reader = asyncio.ensure_future(lg.read_timed(a_events, a_log, warm, a_warm))
        try:
            await asyncio.wait_for(a_warm.wait(), 30)
            t0 = time.monotonic_ns()
            body = lg.run_body("async_tokens", f"{trial_id}-b", multitask_strategy="interrupt")
            async with lg.run_stream(http, base, thread, body) as (b_id, b_events):
                b_reader = asyncio.ensure_future(lg.read_timed(b_events, b_log, 1, b_first))
                try:
                    await asyncio.wait_for(b_first.wait(), 30)
                    ns_a_end = await asyncio.wait_for(a_reader, 30)
                    await lg.cancel(http, base, thread, b_id)  # B is done with: the next trial starts clean
                    await asyncio.wait_for(b_reader, 30)
                finally:
                    b_reader.cancel()
        finally:
            a_reader.cancel()
    ns_first = next(ns for ns, name in b_log if name == "custom")
    status = (await http.get(f"{base}/threads/{thread}/runs/{a_id}")).json()["status"]
    a_node = await lg.node_log(closed_log, f"{trial_id}-a", lg.node_timeout(tokens, interval))
    await lg.node_log(closed_log, f"{trial_id}-b", lg.node_timeout(tokens, interval))
    a_stopped, a_how, _ = a_node if a_node else (None, "never logged", [])
    return {
        "abort_ms": (a_stopped - t0) / 1e6 if a_how == "cancelled" else None,
        "first_ms": (ns_first - t0) / 1e6,
        "a_end_ms": (ns_a_end - t0) / 1e6,
        "reason": "cancelled" if status == "interrupted" else status,
        "ack_cancelled_a": None,  # LangGraph's answer to B does not name the run it interrupted
        "a_chunks_after_b_first": sum(1 for ns, name in a_log if name == "custom" and ns > ns_first),
        "a_end_after_b_first": ns_a_end > ns_first,
        "a_deltas_after_t0": sum(1 for ns, name in a_log if name == "custom" and ns > t0),
    }


@contextlib.asynccontextmanager
async def langgraph_interrupt_trials(interval: float, tokens: int = 53, warm: int = 3) -> AsyncIterator[Trial]:
    from bench.peers import langgraph_dev as lg

    closed_log = tempfile.mktemp(prefix="turnline-bench-langgraph-closed-")
    open(closed_log, "w").close()
    env = {"BENCH_INTERVAL": str(interval), "BENCH_TOKENS": str(tokens), "BENCH_CLOSED_LOG": closed_log}
    async with lg.langgraph_dev(env) as base, httpx.AsyncClient(timeout=30) as http:
        counter = iter(range(10**9))
        yield lambda: _langgraph_interrupt_trial(http, base, f"int-{next(counter)}", warm, closed_log,
                                                 tokens, interval)


# --------------------------------------------------------------------------- #
# 4. queue
# --------------------------------------------------------------------------- #


async def measure_queue(n_queued: int = 100, solo_runs: int = 30, pipelined: bool = False) -> dict[str, Any]:
    with turnline_server("bench.interrupt_agents:short_answer", extra=["--queue-limit", str(n_queued + 50)]) as port:
        async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", max_size=None,
                                      additional_headers={"Authorization": f"Bearer {token()}"}) as ws:
            c = _Conn(ws)
            # one unqueued turn alone: send → its turn-end (own session)
            await ws.send(json.dumps({"op": "subscribe", "session": "solo", "id": 1}))
            await c.ack(1)
            solo = []
            for k in range(solo_runs):
                fid = 100 + k
                t = time.monotonic_ns()
                await ws.send(json.dumps({"op": "send", "session": "solo", "id": fid, "messages": _text("x")}))
                tid = (await c.ack(fid))["turn_ids"][0]
                _, ns, _ = await c.until(lambda e: e["type"] == "turn-end" and e["turn_id"] == tid)
                solo.append((ns - t) / 1e6)
                c.log.clear()
            one = pct(solo, 50)

            await ws.send(json.dumps({"op": "subscribe", "session": "q", "id": 2}))
            await c.ack(2)
            c.log.clear()
            sent_ids: list[str] = []
            started_now = queued = rejected = 0
            t_start = time.monotonic_ns()
            frames = []
            for k in range(n_queued + 1):
                frame = {"op": "send", "session": "q", "id": 1000 + k, "messages": _text(f"m{k}")}
                if k:
                    frame["policy"] = "queue"
                frames.append(frame)
            acks = []
            if pipelined:  # write every frame at once, then collect the acks
                for frame in frames:
                    await ws.send(json.dumps(frame))
                for frame in frames:
                    acks.append(await c.ack(frame["id"]))
            else:  # each send waits for its ack
                for frame in frames:
                    await ws.send(json.dumps(frame))
                    acks.append(await c.ack(frame["id"]))
            for ack in acks:
                sent_ids.append(ack["message_ids"][0])
                started_now += bool(ack.get("turn_ids"))
                queued += bool(ack.get("queued"))
                rejected += bool(ack.get("rejected"))
            t_sent = time.monotonic_ns()
            # (every turn-end may have arrived while the acks were read)
            ends = sum(1 for _, e in c.log if e["type"] == "turn-end")
            deadline = time.monotonic() + 60
            while ends < n_queued + 1 - rejected and time.monotonic() < deadline:
                await asyncio.wait_for(c.pump(), 30)
                ends = sum(1 for _, e in c.log if e["type"] == "turn-end")
            t_end = c.log[-1][0] if c.log else time.monotonic_ns()
    starts = [(ns, e) for ns, e in c.log if e["type"] == "turn-start"]
    end_evs = [(ns, e) for ns, e in c.log if e["type"] == "turn-end"]
    order = [e["input_id"] for _, e in starts]
    in_order = order == sent_ids
    # gaps: turn k's turn-end → turn k+1's turn-start, in client receive time
    end_ns = {e["turn_id"]: ns for ns, e in end_evs}
    gaps = []
    for (_, prev), (ns, nxt) in zip(starts, starts[1:]):
        if prev["turn_id"] in end_ns:
            gaps.append((ns - end_ns[prev["turn_id"]]) / 1e6)
    overlapping = sum(1 for g in gaps if g < 0)
    total = (t_end - t_start) / 1e6
    n = n_queued + 1
    return {
        "messages": n,
        "one_turn_alone_ms_p50": one, "one_turn_alone_ms_p99": pct(solo, 99),
        "send_loop_ms": (t_sent - t_start) / 1e6,
        "total_ms": total,
        "overhead_per_message_ms": (total - n * one) / n_queued,
        "started_immediately": started_now, "queued": queued, "rejected": rejected,
        "turns_started": len(starts), "turns_ended": len(end_evs),
        "in_send_order": in_order,
        "out_of_order_positions": sum(1 for a, b in zip(order, sent_ids) if a != b) + abs(len(order) - len(sent_ids)),
        "reasons": sorted({e["reason"] for _, e in end_evs}),
        "gap_p50_ms": pct(gaps, 50), "gap_p99_ms": pct(gaps, 99), "gaps": len(gaps),
        "overlapping_turns": overlapping,
        "queued_events": sum(1 for _, e in c.log if e["type"] == "queued"),
    }


# --------------------------------------------------------------------------- #


async def run(trials: int, peer_trials: int, interval: float, n_queued: int = 100) -> dict[str, Any]:
    from bench.peers import naive_resend

    from bench.peers.langgraph_dev import versions

    results: dict[str, Any] = {"interval_s": interval, "langgraph": versions()}
    async with turnline_interrupt_trials(interval) as tl, langgraph_interrupt_trials(interval) as lg:
        rows = await alternate({"turnline: send policy=interrupt": (trials, tl), LANGGRAPH: (peer_trials, lg)})
    results.update({name: summarize_interrupt(r, interval) for name, r in rows.items()})
    results["peer: close SSE + POST again"] = await naive_resend.measure(peer_trials, interval)
    results["queue"] = await measure_queue(n_queued)
    results["queue (pipelined)"] = await measure_queue(n_queued, pipelined=True)
    return results


def table(results: dict[str, Any]) -> None:
    ms = results["interval_s"] * 1000
    t = results["turnline: send policy=interrupt"]
    p = results["peer: close SSE + POST again"]
    g = results[LANGGRAPH]
    cols = ["system", "trials", "t0→B first token p50 ms", "p99 ms", f"first − {ms:.0f} ms p50", "p99",
            "t0→A abort/stopped (server) p50 ms", "p99 ms", "t0→A turn-end / stream closed p50 ms", "p99 ms", "A not cancelled", "A chunks after B's first (trials)"]
    rows = [
        ["turnline: send policy=interrupt", t["trials"], t["first_p50"], t["first_p99"],
         t["first_minus_interval_p50"], t["first_minus_interval_p99"], t["a_abort_p50"], t["a_abort_p99"], t["a_end_p50"], t["a_end_p99"],
         t["not_cancelled"], f"{t['a_chunks_after_b_first_total']} ({t['trials_with_a_chunks_after_b_first']})"],
        [LANGGRAPH, g["trials"], g["first_p50"], g["first_p99"], g["first_minus_interval_p50"],
         g["first_minus_interval_p99"], g["a_abort_p50"], g["a_abort_p99"], g["a_end_p50"], g["a_end_p99"],
         g["not_cancelled"], f"{g['a_chunks_after_b_first_total']} ({g['trials_with_a_chunks_after_b_first']})"],
        ["peer: close SSE + POST again", p["trials"], p["first_p50_ms"], p["first_p99_ms"],
         p["first_minus_interval_p50_ms"], p["first_minus_interval_p99_ms"], p["a_stopped_p50_ms"],
         p["a_stopped_p99_ms"], "n/a", "n/a", f"never stopped: {p['a_never_stopped']}", "n/a (closed)"],
    ]
    print_table(f"interrupt (agent sleeps {ms:.0f} ms before each token, incl. the first: "
                f"subtract {ms:.0f} ms; loopback)",
                cols, rows)
    cols = ["sends", "messages", "in send order", "reasons", "one turn alone p50 ms", "total ms",
            "total / message ms", "overhead / message ms", "end→next start p50 ms", "p99 ms", "started at once / queued / rejected"]
    rows = []
    for key, how in (("queue", "each awaits its ack"), ("queue (pipelined)", "all written, then acks read")):
        q = results[key]
        rows.append([how, q["messages"], q["in_send_order"], ",".join(q["reasons"]), q["one_turn_alone_ms_p50"],
                     q["total_ms"], q["total_ms"] / q["messages"], q["overhead_per_message_ms"], q["gap_p50_ms"], q["gap_p99_ms"],
                     f"{q['started_immediately']} / {q['queued']} / {q['rejected']}"])
    print_table("queue (1 send + 100 sends with policy=queue, one session; agent: 5 tokens, no sleep; "
                "gaps in client receive time, 0 when both events came in one frame)", cols, rows)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--quick", action="store_true", help="50 trials")
    args = ap.parse_args()
    trials = 50 if args.quick else args.trials
    results = asyncio.run(run(trials, trials, args.interval))
    table(results)
    print(f"\nwritten {save('interrupt', results)}")


if __name__ == "__main__":
    main()
