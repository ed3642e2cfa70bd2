"""resume_drop: a connection dropped mid-stream, then resumed — tokens duplicated or lost.

Per try: a client reads a stream of numbered tokens (60 tokens, one every
10 ms; each token's text carries its index) through a TCP proxy on loopback.
After a random number of tokens (5 … 45) plus a random fraction of an
interval, the proxy cuts the connection in both directions. In half of the
tries the cut is mid-frame: the proxy holds the server's next write, lets a
random head of it through, then cuts. The client resumes on a new connection
and reads to the stream's end. Counted per try: tokens shown twice, tokens
never shown, and the resume gap (cut → first token not shown before). Every
system gets the same drop points (same seed), and the systems take turns try
by try.

turnline (`turnline serve`, SQLite), agent `bench.resume_drop:numbered`:
- the Python client `ClientTransport` (what users run; it reconnects by
  itself with its default backoff, 25–50 ms for the first retry, and
  resubscribes with `after = view.last_seq`); tokens counted as the view
  applies them;
- a raw WebSocket client: reconnect at once, `subscribe` with `after` = the
  last seq received; tokens counted as they come off the wire (no dedup);
- SSE: `GET /v1/sessions/{id}/events`, reconnect with `Last-Event-ID`.

Peers, same run (bench/peers/resumable_stream.py): the stream kept in memory
and resumed from a character offset counted by the client (vercel's
resumable-stream), counted at event boundaries or as received; LangGraph's
in-memory join (`Last-Event-ID`, millisecond ids, subscribe then replay); and
a naive reconnect to the live stream. And the real peer, LangGraph's dev
server (bench/peers/langgraph_dev.py): a run started with
`stream_resumable: true`, read through the proxy, rejoined after the drop with
`GET /threads/{tid}/runs/{rid}/stream` and `Last-Event-ID`.

Run:  python -m bench.resume_drop [--quick] [--tries N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed

from bench._common import frame_events, pct, print_table, save, token, turnline_server
from tests.integration.proxy import TcpProxy
from turnline import Agent, Turn
from turnline.client import ClientTransport
from turnline.protocol import ChunkEvent

TOKENS = int(os.environ.get("BENCH_TOKENS", "60"))
INTERVAL = float(os.environ.get("BENCH_INTERVAL", "0.01"))

OnToken = Callable[[int], None]


async def _numbered(turn: Turn):
    for i in range(TOKENS):
        await asyncio.sleep(INTERVAL)
        yield f"t{i} "


numbered = Agent(_numbered, name="bench-numbered")


def _index(delta: str) -> int:
    return int(delta.strip()[1:])


class _DropProxy(TcpProxy):
    async def drop(self, head: float | None) -> tuple[int, bool]:
        """Cut every connection. With ``head`` (0 … 1): hold the server's next
        write, let that fraction of it through (at least 1 byte, never all),
        then cut. Returns when (monotonic ns), and whether a head went through."""
        cut_in_frame = False
        if head is not None:
            self.hold_downstream = True
            deadline = time.monotonic() + 1
            while not any(p.held for p in self._pairs) and time.monotonic() < deadline:
                await asyncio.sleep(0.0005)
            for p in self._pairs:
                data, p.held = b"".join(p.held), []
                if len(data) > 1:
                    p.client.write(data[:min(len(data) - 1, max(1, int(len(data) * head)))])
                    cut_in_frame = True
        self.hold_downstream = False
        t_drop = time.monotonic_ns()
        self.cut()
        return t_drop, cut_in_frame


# --------------------------------------------------------------------------- #
# clients: each reads one stream to its end, resuming after drops; on_token(i)
# for every token it shows. They return extra figures for the JSON.
# --------------------------------------------------------------------------- #


async def _read_transport(url: str, session: str, on_token: OnToken) -> dict[str, Any]:
    t = ClientTransport(url, token(), session)

    def shown(ev: Any) -> None:
        if isinstance(ev, ChunkEvent) and ev.chunk.get("type") == "text-delta":
            on_token(_index(ev.chunk["delta"]))

    t.view.on_event(shown)
    async with t:
        ack = await t.send("go")
        await t.wait_turn_end(ack["turn_ids"][0], timeout=30)
    return {"reconnects": t.reconnects, "wire_duplicates_ignored": t.view.duplicates,
            "gap_recoveries": t.gap_recoveries}


async def _read_ws(url: str, session: str, on_token: OnToken) -> dict[str, Any]:
    after, sent, reconnects = 0, False, 0
    while True:
        try:
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token()}"},
                                          max_size=None) as ws:
                await ws.send(json.dumps({"op": "subscribe", "session": session, "after": after}))
                if not sent:
                    await ws.send(json.dumps({"op": "send", "session": session,
                                              "messages": [{"parts": [{"type": "text", "text": "go"}]}]}))
                    sent = True
                async for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("op") == "error":
                        raise RuntimeError(f"server error: {frame}")
                    for ev in frame_events(frame):
                        after = ev["seq"]
                        if ev["type"] == "chunk" and ev["chunk"]["type"] == "text-delta":
                            on_token(_index(ev["chunk"]["delta"]))
                        elif ev["type"] == "turn-end":
                            return {"reconnects": reconnects}
        except (ConnectionClosed, OSError):
            pass
        reconnects += 1


async def _read_sse(http: httpx.AsyncClient, proxied: str, direct: str, session: str,
                    on_token: OnToken) -> dict[str, Any]:
    from bench.peers._harness import SSEReader

    auth = {"Authorization": f"Bearer {token()}"}
    last: int | None = None
    posted, reconnects = False, 0
    while True:
        headers = auth if last is None else {**auth, "Last-Event-ID": str(last)}
        try:
            # on a reconnect, Last-Event-ID wins over ?after=0
            async with http.stream("GET", f"{proxied}/v1/sessions/{session}/events", params={"after": 0},
                                   headers=headers) as resp:
                resp.raise_for_status()
                if not posted:
                    r = await http.post(f"{direct}/v1/sessions/{session}/messages", headers=auth,
                                        json={"messages": [{"parts": [{"type": "text", "text": "go"}]}]})
                    r.raise_for_status()
                    posted = True
                reader = SSEReader(resp)
                try:
                    while (data := await reader.next_event()) is not None:
                        ev = json.loads(data)
                        last = ev["seq"]
                        if ev["type"] == "chunk" and ev["chunk"]["type"] == "text-delta":
                            on_token(_index(ev["chunk"]["delta"]))
                        elif ev["type"] == "turn-end":
                            return {"reconnects": reconnects}
                finally:
                    await reader.aclose()
        except httpx.TransportError:
            pass
        reconnects += 1


async def _read_langgraph(http: httpx.AsyncClient, proxied: str, direct: str, trial: str,
                          on_token: OnToken) -> dict[str, Any]:
    """LangGraph's dev server: a resumable run (``stream_resumable``) streamed
    through the proxy; after a drop, join it again with ``GET
    /threads/{tid}/runs/{rid}/stream`` and ``Last-Event-ID`` = the last id
    received, at once. The run's end is its stream's end; a stream that ends
    while the run is still running was cut."""
    from bench.peers import langgraph_dev as lg

    thread = await lg.new_thread(http, direct)
    body = lg.run_body("async_tokens", trial, stream_resumable=True)
    run_id: str | None = None
    last_id: str | None = None
    reconnects = 0
    while True:
        if run_id is None:
            request = http.stream("POST", f"{proxied}/threads/{thread}/runs/stream", json=body)
        else:
            request = http.stream("GET", f"{proxied}/threads/{thread}/runs/{run_id}/stream",
                                  headers={"Last-Event-ID": last_id} if last_id else {})
        try:
            async with request as resp:
                resp.raise_for_status()
                events = lg.Events(resp)
                try:
                    while (ev := await events.next()) is not None:
                        name, data, event_id = ev
                        last_id = event_id or last_id
                        if name == "metadata":
                            run_id = json.loads(data)["run_id"]
                        elif name == "custom":
                            on_token(json.loads(data)["i"])
                finally:
                    await events.aclose()
        except httpx.TransportError:
            pass
        if run_id is None:
            raise RuntimeError("langgraph dev: the stream was cut before its metadata event")
        status = (await http.get(f"{direct}/threads/{thread}/runs/{run_id}")).json()["status"]
        if status not in ("pending", "running"):
            return {"reconnects": reconnects}
        reconnects += 1


# --------------------------------------------------------------------------- #
# tries
# --------------------------------------------------------------------------- #


async def _try(proxy: _DropProxy, read: Callable[[OnToken], Awaitable[dict[str, Any]]],
               rng: random.Random) -> dict[str, Any]:
    drop_after = rng.randint(5, TOKENS - 15)
    head = rng.random() if rng.random() < 0.5 else None  # half of the cuts are mid-frame
    jitter = rng.uniform(0, INTERVAL)
    got: list[tuple[int, int]] = []  # (received ns, token index)
    reached = asyncio.Event()

    def on_token(i: int) -> None:
        got.append((time.monotonic_ns(), i))
        if len(got) >= drop_after:
            reached.set()

    task = asyncio.ensure_future(read(on_token))
    waiter = asyncio.ensure_future(reached.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not reached.is_set():
            if task.done():
                task.result()
            raise RuntimeError(f"only {len(got)} tokens arrived before the drop point")
        await asyncio.sleep(jitter)
        t_drop, mid_frame = await proxy.drop(head)
        extra = await asyncio.wait_for(task, 30)
    finally:
        waiter.cancel()
        task.cancel()
    shown = [i for _, i in got]
    before = {i for ns, i in got if ns <= t_drop}
    first_new = next((ns for ns, i in got if ns > t_drop and i not in before), None)
    return {
        "mid_frame": mid_frame,
        "duplicated": len(shown) - len(set(shown)),
        "lost": len(set(range(TOKENS)) - set(shown)),
        "gap_ms": (first_new - t_drop) / 1e6 if first_new is not None else None,
        **extra,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    gaps = [r["gap_ms"] for r in rows if r["gap_ms"] is not None]
    out = {
        "tries": len(rows),
        "mid_frame_tries": sum(r["mid_frame"] for r in rows),
        "tries_with_duplicates": sum(r["duplicated"] > 0 for r in rows),
        "tries_with_losses": sum(r["lost"] > 0 for r in rows),
        "duplicated": sum(r["duplicated"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "gap_p50_ms": pct(gaps, 50), "gap_p99_ms": pct(gaps, 99),
        "no_new_token": len(rows) - len(gaps),
    }
    for key in ("reconnects", "wire_duplicates_ignored", "gap_recoveries"):
        if key in rows[0]:
            out[key] = sum(r[key] for r in rows)
    return out


PEERS = {
    "offset-events": "peer: in-memory stream, resume at a character offset counted at event boundaries "
                     "(resumable-stream)",
    "offset-received": "peer: the same, offset = characters received (a cut event's head included)",
    "join": "peer: LangGraph-style in-memory join, re-implemented (Last-Event-ID, ms ids, subscribe then replay)",
    "live": "peer: reconnect to the live stream, no cursor",
}
LANGGRAPH = "peer: LangGraph dev server, rejoin with Last-Event-ID"

Read = Callable[[int, OnToken], Awaitable[dict[str, Any]]]  # (try number, on_token) -> extra figures


async def run(tries: int, seed: int = 1) -> dict[str, Any]:
    from bench.peers._harness import peer_server
    from bench.peers.langgraph_dev import langgraph_dev, versions
    from bench.peers.resumable_stream import read_generation

    async def peer(reading: Awaitable[int]) -> dict[str, Any]:
        return {"reconnects": await reading}

    env = {"BENCH_TOKENS": str(TOKENS), "BENCH_INTERVAL": str(INTERVAL)}
    with turnline_server("bench.resume_drop:numbered", env=env) as port:
        async with (peer_server("bench.peers.resumable_stream:app") as peer_base, langgraph_dev(env) as lg_base,
                    _DropProxy(port) as tl, _DropProxy(int(peer_base.rsplit(":", 1)[1])) as pp,
                    _DropProxy(int(lg_base.rsplit(":", 1)[1])) as lgp,
                    httpx.AsyncClient(timeout=10) as http):
            tl_http, pp_http = f"http://127.0.0.1:{tl.port}", f"http://127.0.0.1:{pp.port}"
            systems: dict[str, tuple[_DropProxy, Read]] = {
                "turnline: ClientTransport (WebSocket, auto-resume)":
                    (tl, lambda n, on: _read_transport(tl.ws_url(), f"ct-{n}", on)),
                "turnline: raw WebSocket, subscribe after=last seq":
                    (tl, lambda n, on: _read_ws(tl.ws_url(), f"ws-{n}", on)),
                "turnline: SSE, Last-Event-ID":
                    (tl, lambda n, on: _read_sse(http, tl_http, f"http://127.0.0.1:{port}", f"sse-{n}", on)),
            }
            for mode, name in PEERS.items():
                systems[name] = (pp, lambda n, on, mode=mode: peer(
                    read_generation(http, pp_http, mode, TOKENS, INTERVAL, on)))
            systems[LANGGRAPH] = (lgp, lambda n, on: _read_langgraph(
                http, f"http://127.0.0.1:{lgp.port}", lg_base, f"drop-{n}", on))
            # Same drop points for every system (one RNG each, same seed); tries
            # interleaved, so load from elsewhere on the machine falls on all alike.
            rngs = {name: random.Random(seed) for name in systems}
            rows: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
            for n in range(tries):
                for name, (proxy, read) in systems.items():
                    rows[name].append(await _try(proxy, lambda on, read=read: read(n, on), rngs[name]))
    return {"tokens": TOKENS, "interval_s": INTERVAL, "seed": seed, "langgraph": versions(),
            **{name: summarize(r) for name, r in rows.items()}}


def table(results: dict[str, Any]) -> None:
    cols = ["system", "tries", "tries with duplicates", "tries with losses", "duplicated", "lost",
            "resume gap p50 ms", "p99 ms"]
    rows = [[name, r["tries"], r["tries_with_duplicates"], r["tries_with_losses"], r["duplicated"], r["lost"],
             r["gap_p50_ms"], r["gap_p99_ms"]] for name, r in results.items() if isinstance(r, dict) and "tries" in r]
    first = next(r for r in results.values() if isinstance(r, dict) and "tries" in r)
    print_table(f"resume_drop ({results['tokens']} tokens, one every {results['interval_s'] * 1000:.0f} ms; "
                f"connection cut by a TCP proxy at a random point, mid-frame in {first['mid_frame_tries']} "
                f"of {first['tries']} tries; loopback)", cols, rows)


def bench(quick: bool, tries: int | None = None) -> None:
    results = asyncio.run(run(tries or (30 if quick else 200)))
    table(results)
    print(f"written {save('resume_drop-quick' if quick else 'resume_drop', results)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tries", type=int, help="default 200")
    ap.add_argument("--quick", action="store_true", help="30 tries")
    args = ap.parse_args()
    bench(args.quick, args.tries)


if __name__ == "__main__":
    main()
