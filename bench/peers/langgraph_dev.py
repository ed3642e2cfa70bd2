"""The real peer: LangGraph's dev server (`langgraph dev`, langgraph-cli[inmem],
which runs langgraph-api on its in-memory runtime), driven over its HTTP API.

Installed by the ``bench`` extra (``pip install -e '.[bench]'``; `make bench`
does it). The server runs as users start it, headless and offline:

    langgraph dev --no-browser --no-reload --host 127.0.0.1 --port P --config langgraph.json

with ``LANGGRAPH_CLI_NO_ANALYTICS=1`` (the CLI's usage report),
``LANGGRAPH_NO_VERSION_CHECK=true`` (its PyPI version check) and
``LANGSMITH_TRACING=false``; without a license key it sends no metadata. The
config (written to a temp dir, which is also the server's working directory)
serves the graphs of bench/peers/langgraph_graphs.py with
``disable_persistence``. Its defaults stay: one background job at a time
(``N_JOBS_PER_WORKER=1``), blockbuster on, an idle queue polled every 0.5 s.

HTTP API used (per graph, ``assistant_id`` = the graph's id):

- ``POST /threads`` → ``thread_id``;
- ``POST /threads/{tid}/runs/stream`` with ``stream_mode: ["custom"]``: an SSE
  stream, a ``metadata`` event carrying ``run_id``, then one ``custom`` event
  per token; it closes when the run ends. ``multitask_strategy: "interrupt"``
  for double texting, ``stream_resumable: true`` to give events ids;
- ``POST /threads/{tid}/runs/{rid}/cancel?action=interrupt`` → 202;
- ``GET /threads/{tid}/runs/{rid}/stream`` with ``Last-Event-ID``: join a
  resumable run's stream after a drop (stored events after that id, then live).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from bench.peers._harness import free_port

GRAPHS = Path(__file__).with_name("langgraph_graphs.py")
REPO = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {
    "LANGGRAPH_CLI_NO_ANALYTICS": "1",
    "LANGGRAPH_NO_VERSION_CHECK": "true",
    "LANGSMITH_TRACING": "false",
    "LANGCHAIN_TRACING_V2": "false",
}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("langgraph-cli", "langgraph-api", "langgraph-runtime-inmem", "langgraph")}


def _require() -> None:
    import importlib.util

    if importlib.util.find_spec("langgraph_api") is None or importlib.util.find_spec("langgraph_cli") is None:
        raise RuntimeError("LangGraph's dev server is not installed: pip install -e '.[bench]' (make bench does)")


@contextlib.asynccontextmanager
async def langgraph_dev(env: dict[str, str] | None = None, startup_timeout_s: float = 60.0) -> AsyncIterator[str]:
    """Run `langgraph dev` on a free loopback port serving ``async_tokens`` and
    ``sync_tokens``; yield its base URL. ``env`` reaches the graphs (BENCH_*)."""
    _require()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="turnline-bench-langgraph-") as tmp:
        config = {
            "dependencies": [str(REPO)],
            "graphs": {name: f"{GRAPHS}:{name}" for name in ("async_tokens", "sync_tokens")},
            "disable_persistence": True,
        }
        Path(tmp, "langgraph.json").write_text(json.dumps(config))
        log = open(Path(tmp, "server.log"), "w+b")
        cmd = [sys.executable, "-m", "langgraph_cli", "dev", "--no-browser", "--no-reload",
               "--host", "127.0.0.1", "--port", str(port), "--config", "langgraph.json"]
        proc = subprocess.Popen(cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO), **(env or {})},
                                start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_timeout_s
            async with httpx.AsyncClient(timeout=1.0) as probe:
                while True:
                    if proc.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"langgraph dev exited: {log.read().decode(errors='replace')[-3000:]}")
                    with contextlib.suppress(httpx.TransportError):
                        if (await probe.get(f"{base}/ok")).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"langgraph dev did not answer on {base}")
                    await asyncio.sleep(0.1)
            yield base
        finally:
            # its own process group: the CLI's uvicorn and anything it spawned
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


# --------------------------------------------------------------------------- #
# SSE with event names and ids
# --------------------------------------------------------------------------- #


class Events:
    """Reads ``(event, data, id)`` from an SSE response; None at EOF. A partial
    event cut off by EOF is dropped, as EventSource does."""


    def __init__(self, resp: httpx.Response) -> None:
        self._it = resp.aiter_raw()
        self._buf = b""

    async def next(self) -> tuple[str, str, str | None] | None:
        while True:
            sep = self._buf.find(b"\n\n")
            if sep >= 0:
                raw, self._buf = self._buf[:sep], self._buf[sep + 2:]
                event, data, event_id = "message", [], None
                for line in raw.decode().split("\n"):
                    field, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if field == "event":
                        event = value
                    elif field == "data":
                        data.append(value)
                    elif field == "id":
                        event_id = value
                if data:
                    return event, "\n".join(data), event_id
                continue
            try:
                # sse-starlette ends lines with CRLF
                self._buf = (self._buf + await self._it.__anext__()).replace(b"\r\n", b"\n")
            except StopAsyncIteration:
                return None

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._it.aclose()


async def read_timed(events: Events, log: list[tuple[int, str]], warm: int, warmed: asyncio.Event) -> int:
    """Read a run's stream to its end, appending (received ns, event name) for
    each event on arrival; set ``warmed`` at the ``warm``-th token. Returns the
    time the stream ended."""
    tokens = 0
    while (ev := await events.next()) is not None:
        log.append((time.monotonic_ns(), ev[0]))
        tokens += ev[0] == "custom"
        if tokens >= warm:
            warmed.set()
    return time.monotonic_ns()


async def new_thread(http: httpx.AsyncClient, base: str) -> str:
    r = await http.post(f"{base}/threads", json={})
    r.raise_for_status()
    return r.json()["thread_id"]


def run_body(graph: str, trial: str, **extra: Any) -> dict[str, Any]:
    return {"assistant_id": graph, "input": {"trial": trial}, "stream_mode": ["custom"], **extra}


@contextlib.asynccontextmanager
async def run_stream(http: httpx.AsyncClient, base: str, thread: str, body: dict[str, Any]
                     ) -> AsyncIterator[tuple[str, Events]]:
    """Start a run with its stream; yield (run_id, events), the metadata event read."""
    async with http.stream("POST", f"{base}/threads/{thread}/runs/stream", json=body) as resp:
        resp.raise_for_status()
        events = Events(resp)
        try:
            first = await events.next()
            if first is None or first[0] != "metadata":
                raise RuntimeError(f"langgraph dev: expected a metadata event, got {first}")
            yield json.loads(first[1])["run_id"], events
        finally:
            await events.aclose()


async def cancel(http: httpx.AsyncClient, base: str, thread: str, run_id: str) -> None:
    r = await http.post(f"{base}/threads/{thread}/runs/{run_id}/cancel", params={"action": "interrupt"})
    r.raise_for_status()


# --------------------------------------------------------------------------- #
# the node's own log (bench/peers/langgraph_graphs.py)
# --------------------------------------------------------------------------- #


async def node_log(path: str, trial: str, timeout_s: float) -> tuple[int, str, list[int]] | None:
    """(stopped_ns, how, produced_ns) the node logged for ``trial``, waiting up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(path) as f:
            for line in f:
                tid, stopped, how, produced = line.split()
                if tid == trial:
                    return int(stopped), how, [] if produced == "-" else [int(t) for t in produced.split(",")]
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.005)


def node_timeout(tokens: int, interval: float) -> float:
    """Long enough for a node that is never stopped to run all its tokens."""
    return tokens * interval * 2 + 5
