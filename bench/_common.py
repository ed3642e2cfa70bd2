"""Helpers shared by turnline's benchmarks: a real `turnline serve` subprocess,
percentiles, and the table every benchmark prints."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any, Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SECRET = "bench-secret-0123456789abcdef0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


# Every client limit off (docs/limits.md): the benchmarks load one client id far
# past what a person does; they measure other things. bench/send_ack.py measures
# the limiter's own cost, with the limits on and off.
NO_LIMITS = ["--max-turns-per-session", "0", "--send-rate", "0", "--cancel-rate", "0", "--max-subscriptions", "0",
             "--max-connections-per-client", "0", "--audio-bytes-per-s", "0"]


@contextlib.contextmanager
def turnline_server(agent: str, *, env: dict[str, str] | None = None, store: str | None = None,
                    extra: list[str] | None = None, limits: list[str] | None = None) -> Iterator[int]:
    """Run `turnline serve` (SQLite store in a temp dir unless told) and yield its port.
    ``limits``: limit options (default: every limit off)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "turnline.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--store", store or f"sqlite:///{tmp}/bench.db", "--agent", agent, "--secret", SECRET,
               "--no-dev", "--log-level", "warning", *(NO_LIMITS if limits is None else limits), *(extra or [])]
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"turnline serve exited: {proc.stderr.read().decode()[-2000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("turnline serve did not start")
                time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def token(sub: str = "bench", caps: dict[str, list[str]] | None = None) -> str:
    from turnline.server.auth import mint

    return mint(SECRET, sub, caps or {"*": ["subscribe", "publish", "cancel", "cancel-any"]}, 3600)


def frame_events(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a server frame carries (``event`` or batched ``events``)."""
    if frame.get("op") == "event":
        return [frame["event"]]
    if frame.get("op") == "events":
        return frame["events"]
    return []


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(c)), *(len(_fmt(r[i])) for r in rows)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(v).ljust(w) for v, w in zip(r, widths)) + " |")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v == v else "—"
    return str(v)


def save(name: str, data: Any) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


async def alternate(systems: dict[str, tuple[int, Callable[[], Awaitable[dict[str, Any]]]]], warmup: int = 1
                    ) -> dict[str, list[dict[str, Any]]]:
    """Run every system's trials in one sequence, taking turns: each next trial
    goes to the system furthest behind its own count, so trials of systems with
    different counts are spread evenly over the run and load from elsewhere on
    the machine falls on all of them alike. ``systems``: name → (trials, trial).
    First, ``warmup`` trials of each system are run and dropped (a server's
    first run pays for lazy imports and first-use setup)."""
    for _ in range(warmup):
        for _, trial in systems.values():
            await trial()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    while True:
        behind = [(len(rows[name]) / n, i, name) for i, (name, (n, _)) in enumerate(systems.items())
                  if len(rows[name]) < n]
        if not behind:
            return rows
        name = min(behind)[2]
        rows[name].append(await systems[name][1]())
