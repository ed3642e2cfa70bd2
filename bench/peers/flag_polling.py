"""Peer (b): the flag-polling stop pattern (Vercel AI SDK "canceledAt" example).

``POST /chat`` streams SSE tokens. ``POST /chat/{id}/stop`` sets ``canceled_at``
on the chat's row in a SQLite table. The generator's per-chunk callback
(``onChunk`` in the AI SDK) is wrapped in ``throttle(check, 1000)``: the database
is read at most once per second, and when ``canceled_at`` is set the generation
is aborted (``abortController.abort()``), which ends the stream.

The SQLite file lives wherever ``FLAG_POLLING_DB`` points; ``measure()`` puts it
in a fresh temp dir. Records (``time.monotonic_ns()``) are served on
``GET /stats/{id}``; the "abort" moment is when the check read ``canceled_at``
and called abort.

Run the benchmark:  python -m bench.peers.flag_polling --trials 5
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
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

DB_ENV = "FLAG_POLLING_DB"
THROTTLE_WAIT_S = 1.0  # throttle(..., 1000)
RECORDS: dict[str, StreamRecord] = {}


# --------------------------------------------------------------------------- #
# SQLite (run in a worker thread, like an async DB driver would)
# --------------------------------------------------------------------------- #


def _db_path() -> str:
    path = os.environ.get(DB_ENV)
    if not path:
        raise RuntimeError(f"{DB_ENV} is not set")
    return path


def _connect() -> sqlite3.Connection:
    return sqlite3.connect(_db_path(), timeout=5.0, isolation_level=None)


def _init_db() -> None:
    with contextlib.closing(_connect()) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS chats ("
            " id TEXT PRIMARY KEY,"
            " created_at INTEGER NOT NULL,"
            " canceled_at INTEGER)"
        )


def _insert_chat(sid: str) -> None:
    with contextlib.closing(_connect()) as db:
        db.execute(
            "INSERT OR REPLACE INTO chats (id, created_at, canceled_at) VALUES (?, ?, NULL)",
            (sid, time.time_ns()),
        )


def _set_canceled(sid: str) -> int:
    with contextlib.closing(_connect()) as db:
        cur = db.execute(
            "UPDATE chats SET canceled_at = ? WHERE id = ? AND canceled_at IS NULL",
            (time.time_ns(), sid),
        )
        return cur.rowcount


def _get_canceled_at(sid: str) -> int | None:
    with contextlib.closing(_connect()) as db:
        row = db.execute("SELECT canceled_at FROM chats WHERE id = ?", (sid,)).fetchone()
        return row[0] if row else None


# --------------------------------------------------------------------------- #
# throttle(fn, 1000): lodash semantics (leading + trailing edge)
# --------------------------------------------------------------------------- #


class Throttle:
    """``throttle(fn, wait)`` as in lodash with default ``{leading, trailing}``.

    The first call invokes ``fn`` immediately; calls during the following
    ``wait`` seconds are collapsed into one trailing invocation fired by a timer
    at the end of the window. So ``fn`` runs at most once per ``wait`` seconds,
    and about every ``wait`` seconds while calls keep coming. ``fn`` is async
    and, like a promise-returning function under lodash, is not awaited.
    """

    def __init__(self, fn: Callable[[], Awaitable[None]], wait_s: float) -> None:
        self._fn = fn
        self._wait = wait_s
        self._loop = asyncio.get_running_loop()
        self._last: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pending = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> None:
        self._pending = True
        if self._timer is None:
            now = self._loop.time()
            if self._last is None or now - self._last >= self._wait:
                self._invoke()
            else:  # pragma: no cover - timer always exists inside a window
                self._timer = self._loop.call_at(self._last + self._wait, self._expired)

    def _invoke(self) -> None:
        self._pending = False
        self._last = self._loop.time()
        task = self._loop.create_task(self._fn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._timer = self._loop.call_at(self._last + self._wait, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self._pending:
            self._invoke()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = False
        for t in list(self._tasks):
            t.cancel()


# --------------------------------------------------------------------------- #
# server
# --------------------------------------------------------------------------- #


async def chat(request: Request) -> StreamingResponse:
    body = await request.json()
    sid: str = body.get("id") or uuid.uuid4().hex
    interval: float = float(body.get("interval", 0.05))
    max_tokens: int = int(body.get("max_tokens", 1000))
    await asyncio.to_thread(_insert_chat, sid)
    rec = RECORDS[sid] = StreamRecord()

    async def event_generator():
        abort = asyncio.Event()  # the AbortController

        async def check_canceled() -> None:  # the throttled onChunk body
            canceled_at = await asyncio.to_thread(_get_canceled_at, sid)
            if canceled_at is not None and not abort.is_set():
                rec.noticed("flag")
                abort.set()  # abortController.abort()

        on_chunk = Throttle(check_canceled, THROTTLE_WAIT_S)
        try:
            for i in range(max_tokens):
                # "the model produces the next token" (interrupted by abort)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await abort.wait()
                if abort.is_set():
                    break
                on_chunk()
                rec.yield_ns.append(time.monotonic_ns())
                yield f"data: tok{i}\n\n"
        except asyncio.CancelledError:
            rec.noticed("cancelled")  # client went away; not the path measured here
            raise
        finally:
            on_chunk.cancel()
            rec.finished_ns = time.monotonic_ns()

    return StreamingResponse(
        event_generator(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Stream-Id": sid},
    )


async def stop(request: Request) -> Response:
    n = await asyncio.to_thread(_set_canceled, request.path_params["sid"])
    return JSONResponse({"updated": n})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
    await asyncio.to_thread(_init_db)
    yield


app = Starlette(
    routes=[
        Route("/chat", chat, methods=["POST"]),
        Route("/chat/{sid}/stop", stop, methods=["POST"]),
        *record_routes(RECORDS),
    ],
    lifespan=lifespan,
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
    t_closed: int | None = None
    try:
        resp.raise_for_status()
        read_task = asyncio.create_task(read_stream(reader, recv_ns, warm, warm_tokens))
        await wait_warm(read_task, warm, timeout_s + warm_tokens * interval_s * 4)
        if jitter_s > 0:  # randomise the stop's phase vs. the 1 s throttle window
            await asyncio.sleep(jitter_s)  # (the reader task keeps consuming tokens)
        # ---- stop: POST /chat/{id}/stop (sets canceled_at) ----------------
        t_stop = time.monotonic_ns()
        r = await client.post(f"{base}/chat/{sid}/stop")
        r.raise_for_status()
        remaining = timeout_s - (time.monotonic_ns() - t_stop) / 1e9
        with contextlib.suppress(TimeoutError):
            t_closed = await asyncio.wait_for(asyncio.shield(read_task), max(remaining, 0.0))
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
        "stop_to_closed_ms": (t_closed - t_stop) / 1e6 if t_closed is not None else None,
        "client_tokens_after_stop": tokens_after(recv_ns, t_stop),
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
    """Run the flag-polling peer in a uvicorn subprocess and measure stop latency.

    A fresh SQLite file in a temp dir backs the ``chats`` table.
    Per trial: POST /chat (SSE), read ``warm_tokens`` tokens, optionally wait
    ``uniform(0, stop_jitter_s)`` s, take ``t_stop = time.monotonic_ns()`` and
    POST /chat/{id}/stop. A trial counts as ``never`` when the generator has not
    noticed the stop within ``timeout_s``. ``seed`` seeds the jitter RNG. The server subprocess is
    stopped on return and on any exception/cancellation. Keys of the returned
    dict: see ``bench.peers._harness.summarize``; ``return_trials=True`` adds the
    per-trial rows under "per_trial".

    NB: with stop_jitter_s=0 the stop lands a few tokens after the throttle's
    leading-edge check, i.e. at the worst phase (~1 s - warm_tokens*interval);
    stop_jitter_s=1.0 samples the phase uniformly (the "random user" case).
    """
    rng = random.Random(seed)
    per_trial: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flag_polling_") as tmp:
        env = {DB_ENV: os.path.join(tmp, "chats.sqlite3")}
        async with peer_server("bench.peers.flag_polling:app", env=env) as base:
            limits = httpx.Limits(max_keepalive_connections=4)
            async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=limits) as client:
                for _ in range(trials):
                    jitter = rng.uniform(0.0, stop_jitter_s)
                    per_trial.append(
                        await _one_trial(client, base, interval_s, warm_tokens, timeout_s, jitter)
                    )
    out = summarize(
        peer="flag_polling",
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
    build_main("flag_polling", measure)
