"""Peer (a): the common Starlette/FastAPI "SSE + is_disconnected()" pattern.

``POST /chat`` returns an SSE ``StreamingResponse``; its async generator yields
one token every ``interval`` seconds and checks ``await request.is_disconnected()``
before each yield. "Stop" = the client closes the HTTP connection.

The generator is written exactly as people write it; the only additions are
timestamps (``time.monotonic_ns()``) kept in ``RECORDS`` and served on
``GET /stats/{id}``.

Note on how the stop is actually noticed in this stack: uvicorn's HTTP protocols
advertise ASGI spec_version "2.3", for which Starlette's ``StreamingResponse``
runs a ``listen_for_disconnect`` task next to the body iterator and cancels the
iterator as soon as ``http.disconnect`` arrives. So the generator usually learns
about the stop through a ``CancelledError`` raised at its ``await asyncio.sleep``,
not through its own ``is_disconnected()`` check. Both paths are recorded
(``via`` = "cancelled" / "is_disconnected"); nothing here makes either faster.
If a server advertised spec_version >= 2.4 (Starlette then skips the listener),
only the ``is_disconnected()`` check would remain and the stop would be noticed
up to one ``interval`` later (checked ad hoc: p50 5.6 ms / p99 10.9 ms at 10 ms).

Run the benchmark:  python -m bench.peers.sse_disconnect --trials 50
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench.peers._harness import (
    record_routes,
    SSEReader,
    StreamRecord,
    build_main,
    fetch_record,
    peer_server,
    read_stream,
    summarize,
    tokens_after,
    wait_warm,
)

RECORDS: dict[str, StreamRecord] = {}


# --------------------------------------------------------------------------- #
# server
# --------------------------------------------------------------------------- #


async def chat(request: Request) -> StreamingResponse:
    body = await request.json()
    sid: str = body.get("id") or uuid.uuid4().hex
    interval: float = float(body.get("interval", 0.05))
    max_tokens: int = int(body.get("max_tokens", 1000))
    # The model's time for a token: after each token, or (to match turnline's
    # benchmark agent, for bench.interrupt) before each one, the first included.
    sleep_first: bool = bool(body.get("sleep_first", False))
    rec = RECORDS[sid] = StreamRecord()

    async def event_generator():
        try:
            for i in range(max_tokens):
                if sleep_first:
                    await asyncio.sleep(interval)
                # --- the pattern: check before each yield -------------------
                if await request.is_disconnected():
                    rec.noticed("is_disconnected")
                    break
                rec.yield_ns.append(time.monotonic_ns())
                yield f"data: tok{i}\n\n"
                if not sleep_first:
                    await asyncio.sleep(interval)  # "the model produces the next token"
        except asyncio.CancelledError:
            rec.noticed("cancelled")  # Starlette's listen_for_disconnect cancelled us
            raise
        except GeneratorExit:
            rec.noticed("closed")
            raise
        finally:
            rec.finished_ns = time.monotonic_ns()

    return StreamingResponse(
        event_generator(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Stream-Id": sid},
    )


app = Starlette(
    routes=[
        Route("/chat", chat, methods=["POST"]),
        *record_routes(RECORDS),
    ]
)


# --------------------------------------------------------------------------- #
# measurement
# --------------------------------------------------------------------------- #


async def _one_trial(
    client: httpx.AsyncClient,
    base: str,
    interval_s: float,
    warm_tokens: int,
    timeout_s: float,
    jitter_s: float,
) -> dict[str, Any]:
    sid = uuid.uuid4().hex
    max_tokens = warm_tokens + math.ceil((timeout_s + 2.0) / interval_s) + 10
    req = client.build_request(
        "POST", f"{base}/chat",
        json={"id": sid, "interval": interval_s, "max_tokens": max_tokens},
    )  # fmt: skip
    resp = await client.send(req, stream=True)
    reader = SSEReader(resp)
    recv_ns: list[int] = []
    warm = asyncio.Event()
    read_task: asyncio.Task[int] | None = None
    try:
        resp.raise_for_status()
        # Keep consuming the stream in the background, like a browser's EventSource
        # does (if the client stopped reading, unread bytes in its socket buffer
        # would turn the close into a RST instead of a FIN).
        read_task = asyncio.create_task(read_stream(reader, recv_ns, warm, warm_tokens))
        await wait_warm(read_task, warm, timeout_s + warm_tokens * interval_s * 4)
        if jitter_s > 0:  # randomise the stop moment; tokens keep being read
            await asyncio.sleep(jitter_s)
        # ---- stop: close the HTTP connection ------------------------------
        t_stop = time.monotonic_ns()
        read_task.cancel()  # stop reading ...
        await asyncio.wait({read_task})
        await resp.aclose()  # ... and close: incomplete body -> httpcore closes the socket
        t_closed = time.monotonic_ns()
    finally:
        if read_task is not None and not read_task.done():
            read_task.cancel()
            await asyncio.wait({read_task})  # (doesn't swallow our own cancellation)
        await reader.aclose()
        await resp.aclose()

    rec = await fetch_record(client, base, sid, until_ns=t_stop + int(timeout_s * 1e9))
    abort_ns = rec["abort_ns"] if rec else None
    noticed = abort_ns is not None and abort_ns - t_stop <= timeout_s * 1e9
    return {
        "stop_to_abort_ms": (abort_ns - t_stop) / 1e6 if noticed else None,
        "stop_to_closed_ms": (t_closed - t_stop) / 1e6,
        "client_tokens_after_stop": tokens_after(recv_ns, t_stop),  # 0: it closed
        "gen_tokens_after_stop": tokens_after(rec["yield_ns"], t_stop) if rec else 0,
        "via": rec["via"] if noticed and rec else None,
    }


async def measure(
    trials: int,
    interval_s: float,
    warm_tokens: int = 3,
    *,
    timeout_s: float = 5.0,
    stop_jitter_s: float = 0.0,
    seed: int | None = 0,
    return_trials: bool = False,
) -> dict[str, Any]:
    """Run the SSE-disconnect peer in a uvicorn subprocess and measure stop latency.

    Per trial: POST /chat (SSE), read ``warm_tokens`` tokens, optionally wait
    ``uniform(0, stop_jitter_s)`` s, take ``t_stop = time.monotonic_ns()`` and
    stop by closing the HTTP connection. A trial counts as ``never`` when the
    generator has not noticed the stop within ``timeout_s``. ``seed`` seeds the jitter RNG. The server subprocess is
    stopped on return and on any exception/cancellation. Keys of the returned
    dict: see ``bench.peers._harness.summarize``; ``return_trials=True`` adds the
    per-trial rows under "per_trial".
    """
    rng = random.Random(seed)
    per_trial: list[dict[str, Any]] = []
    async with peer_server("bench.peers.sse_disconnect:app") as base:
        limits = httpx.Limits(max_keepalive_connections=4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=limits) as client:
            for _ in range(trials):
                jitter = rng.uniform(0.0, stop_jitter_s)
                per_trial.append(
                    await _one_trial(client, base, interval_s, warm_tokens, timeout_s, jitter)
                )
    out = summarize(
        peer="sse_disconnect",
        trials=trials,
        interval_s=interval_s,
        warm_tokens=warm_tokens,
        timeout_s=timeout_s,
        stop_jitter_s=stop_jitter_s,
        per_trial=per_trial,
    )
    if return_trials:
        out["per_trial"] = per_trial
    return out


if __name__ == "__main__":
    build_main("sse_disconnect", measure)
