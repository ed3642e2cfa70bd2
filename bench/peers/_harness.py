"""Shared plumbing for the peer benchmarks (server subprocess, SSE reading, stats).

Everything time-related uses ``time.monotonic_ns()``: on Linux that is
CLOCK_MONOTONIC, which is system-wide, so timestamps taken in the server
subprocess and in the measuring process are directly comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- #
# server side: per-stream records, exposed via GET /stats/{id}
# --------------------------------------------------------------------------- #


class StreamRecord:
    """What one server-side generator did (lives in the server process)."""

    __slots__ = ("yield_ns", "abort_ns", "via", "finished_ns", "started_ns")

    def __init__(self) -> None:
        self.started_ns = time.monotonic_ns()
        self.yield_ns: list[int] = []  # taken just before each token is yielded
        self.abort_ns: int | None = None  # the moment the generator noticed the stop
        self.via: str | None = None  # how it noticed
        self.finished_ns: int | None = None  # generator exited (any reason)

    def noticed(self, via: str) -> None:
        if self.abort_ns is None:
            self.abort_ns = time.monotonic_ns()
            self.via = via

    def to_json(self) -> dict[str, Any]:
        return {
            "started_ns": self.started_ns,
            "yield_ns": self.yield_ns,
            "abort_ns": self.abort_ns,
            "via": self.via,
            "finished_ns": self.finished_ns,
        }


def record_routes(records: dict[str, StreamRecord]) -> list[Any]:
    """``GET /stats/{sid}`` (a stream's record) and ``GET /healthz``, which every peer serves."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def stats(request: Request) -> JSONResponse:
        rec = records.get(request.path_params["sid"])
        if rec is None:
            return JSONResponse({"error": "unknown stream"}, status_code=404)
        return JSONResponse(rec.to_json())

    async def healthz(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return [Route("/stats/{sid}", stats, methods=["GET"]), Route("/healthz", healthz, methods=["GET"])]


# --------------------------------------------------------------------------- #
# client side
# --------------------------------------------------------------------------- #


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the server if the measuring process dies (even on SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


@contextlib.asynccontextmanager
async def peer_server(
    app_path: str,
    *,
    env: dict[str, str] | None = None,
    startup_timeout_s: float = 15.0,
) -> AsyncIterator[str]:
    """Run ``uvicorn <app_path>`` on a free 127.0.0.1 port; yield its base URL.

    The subprocess is always stopped on exit (SIGTERM, then SIGKILL after 5 s),
    including when the body raises or the task is cancelled.
    """
    port = free_port()
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    if env:
        child_env.update(env)
    cmd = [
        sys.executable, "-m", "uvicorn", app_path,
        "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=str(REPO_ROOT),
        env=child_env,
        stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        async with httpx.AsyncClient(timeout=1.0) as probe:
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"peer server {app_path} exited with {proc.returncode}")
                try:
                    r = await probe.get(base + "/healthz")
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"peer server {app_path} did not answer on {base}")
                await asyncio.sleep(0.05)
        yield base
    finally:
        await _stop_process(proc)


async def _stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    try:
        proc.terminate()
    except ProcessLookupError:
        return
    try:
        # shield: must finish even if we are being cancelled
        await asyncio.shield(asyncio.wait_for(proc.wait(), 5.0))
    except (TimeoutError, asyncio.TimeoutError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
    except asyncio.CancelledError:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        raise


class SSEReader:
    """Minimal incremental SSE event reader over an httpx streaming response.

    ``next_event()`` returns the data payload of the next event, or None at EOF.
    """

    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self._it = resp.aiter_raw()
        self._buf = b""
        self.eof = False

    async def next_event(self) -> str | None:
        while True:
            sep = self._buf.find(b"\n\n")
            if sep >= 0:
                raw, self._buf = self._buf[:sep], self._buf[sep + 2 :]
                data = [ln[5:].lstrip() for ln in raw.split(b"\n") if ln.startswith(b"data:")]
                if not data:
                    continue  # comment / keep-alive
                return b"\n".join(data).decode()
            if self.eof:
                return None
            try:
                chunk = await self._it.__anext__()
            except StopAsyncIteration:
                self.eof = True
                continue
            self._buf += chunk

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._it.aclose()


async def read_stream(
    reader: SSEReader, recv_ns: list[int], warm: asyncio.Event, warm_n: int
) -> int:
    """Read to EOF, timestamping each token; set ``warm`` after ``warm_n``; return EOF time."""
    while await reader.next_event() is not None:
        recv_ns.append(time.monotonic_ns())
        if len(recv_ns) >= warm_n:
            warm.set()
    return time.monotonic_ns()


async def wait_warm(read_task: asyncio.Task[int], warm: asyncio.Event, timeout_s: float) -> None:
    """Wait until the reader has seen the warm-up tokens (raise if it can't)."""
    warm_wait = asyncio.create_task(warm.wait())
    try:
        done, _ = await asyncio.wait(
            {read_task, warm_wait}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        warm_wait.cancel()
    if not warm.is_set():
        if read_task in done:
            read_task.result()  # re-raise a reader error, if any
            raise RuntimeError("stream ended during warm-up")
        raise TimeoutError("warm-up tokens did not arrive")


async def fetch_record(
    client: httpx.AsyncClient,
    base: str,
    sid: str,
    *,
    until_ns: int,
    settle_s: float = 0.1,
    poll_s: float = 0.05,
) -> dict[str, Any] | None:
    """Poll GET /stats/{sid} until the generator noticed the stop or exited, or until_ns.

    The first poll waits ``settle_s``: the record carries its own timestamps, so
    reading it later costs nothing, whereas client activity right after the stop
    (a new TCP connection + request) was measured to delay the server's noticing
    of a disconnect by ~2-3 ms on a 2-vCPU box.
    """
    rec: dict[str, Any] | None = None
    await asyncio.sleep(settle_s)
    while True:
        r = await client.get(f"{base}/stats/{sid}")
        if r.status_code == 200:
            rec = r.json()
            if rec["abort_ns"] is not None or rec["finished_ns"] is not None:
                return rec
        if time.monotonic_ns() > until_ns:
            return rec
        await asyncio.sleep(poll_s)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(
    *,
    peer: str,
    trials: int,
    interval_s: float,
    warm_tokens: int,
    timeout_s: float,
    stop_jitter_s: float,
    per_trial: list[dict[str, Any]],
) -> dict[str, Any]:
    abort_ms = [t["stop_to_abort_ms"] for t in per_trial if t["stop_to_abort_ms"] is not None]
    closed_ms = [t["stop_to_closed_ms"] for t in per_trial if t["stop_to_closed_ms"] is not None]
    client_after = [t["client_tokens_after_stop"] for t in per_trial]
    gen_after = [t["gen_tokens_after_stop"] for t in per_trial]
    via: dict[str, int] = {}
    for t in per_trial:
        key = t["via"] or "never"
        via[key] = via.get(key, 0) + 1

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 3)

    n = len(per_trial)
    return {
        "peer": peer,
        "trials": trials,
        "interval_s": interval_s,
        "warm_tokens": warm_tokens,
        "timeout_s": timeout_s,
        "stop_jitter_s": stop_jitter_s,
        # (1) stop -> server-side generator noticed (only trials where it noticed in time)
        "stop_to_abort_p50_ms": r(percentile(abort_ms, 50)),
        "stop_to_abort_p99_ms": r(percentile(abort_ms, 99)),
        "stop_to_abort_max_ms": r(max(abort_ms) if abort_ms else None),
        # (2) stop -> client sees its stream closed
        "stop_to_client_closed_p50_ms": r(percentile(closed_ms, 50)),
        "stop_to_client_closed_p99_ms": r(percentile(closed_ms, 99)),
        # (3) tokens the client received after the stop action
        "client_tokens_after_stop_total": sum(client_after),
        "client_tokens_after_stop_mean": r(sum(client_after) / n if n else None),
        # (4) tokens the generator produced (yielded) after the stop action
        "gen_tokens_after_stop_total": sum(gen_after),
        "gen_tokens_after_stop_mean": r(sum(gen_after) / n if n else None),
        # trials where the generator did not notice within timeout_s
        "never": sum(1 for t in per_trial if t["stop_to_abort_ms"] is None),
        # how the generator noticed: {"cancelled": k, "is_disconnected": m, "flag": ...}
        "noticed_via": via,
    }


def tokens_after(ns_list: list[int], t_stop_ns: int) -> int:
    return sum(1 for t in ns_list if t > t_stop_ns)


def build_main(peer: str, measure) -> None:  # type: ignore[no-untyped-def]
    import argparse
    import json

    ap = argparse.ArgumentParser(prog=f"python -m bench.peers.{peer}")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between tokens")
    ap.add_argument("--warm-tokens", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=5.0, help="'never' threshold, seconds")
    ap.add_argument(
        "--stop-jitter",
        type=float,
        default=0.0,
        help="extra uniform random delay in [0, X] s between warm-up and stop",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-trial", action="store_true", help="include per-trial rows")
    a = ap.parse_args()
    res = asyncio.run(
        measure(
            a.trials,
            a.interval,
            a.warm_tokens,
            timeout_s=a.timeout,
            stop_jitter_s=a.stop_jitter,
            seed=a.seed,
            return_trials=a.per_trial,
        )
    )
    print(json.dumps(res, indent=2))
