"""``turnline serve`` and ``turnline worker`` tune Python's cycle collector
for a streaming server (cli._tune_gc): startup objects frozen, a young
generation of 50,000 allocations instead of 700. Each command runs as a real
process; at exit it prints the collector's settings it ran with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from servers import SECRET, free_port
from turnline.cli import GC_YOUNG_THRESHOLD

REPORT = ("import atexit, gc, sys\n"
          "atexit.register(lambda: print('GC', gc.get_threshold()[0], gc.get_freeze_count() > 0, flush=True))\n"
          "sys.argv = ['turnline', *sys.argv[1:]]\n"
          "from turnline.cli import main\n"
          "main()\n")


def run_until_ready(args: list[str], ready: str) -> str:
    """Start the command, wait for its ``ready`` line, stop it with SIGINT; its whole output."""
    proc = subprocess.Popen([sys.executable, "-c", REPORT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "TURNLINE_SECRET": SECRET})
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if ready in line:
                break
        proc.send_signal(signal.SIGINT)  # (uvicorn re-raises a SIGTERM after its shutdown: no atexit)
        rest, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(lines) + rest


def test_serve_runs_with_the_tuned_collector(tmp_path: Path) -> None:
    out = run_until_ready(["serve", "--port", str(free_port()), "--store", f"sqlite:///{tmp_path / 't.db'}"],
                          "Application startup complete")
    assert f"GC {GC_YOUNG_THRESHOLD} True" in out, out


def test_worker_runs_with_the_tuned_collector(redis_url: str, redis_prefix: str) -> None:
    out = run_until_ready(["worker", "--agent", "turnline.agent.demo:agent",
                           "--store", f"{redis_url}?prefix={redis_prefix}"], "turnline worker ")
    assert f"GC {GC_YOUNG_THRESHOLD} True" in out, out
