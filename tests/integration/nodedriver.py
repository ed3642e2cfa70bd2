"""A Node script in tests/node driven over stdin/stdout JSON lines: every
command ``{"id", "cmd", ...}`` gets one reply ``{"re": id, ...}``, answered
in any order (long operations reply when they settle)."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
TIMEOUT = 20.0


class NodeDriver:
    def __init__(self, script: str, *args: str, package: str):
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is not installed: run `scripts/ensure-system-deps test` (it installs nodejs and npm, "
                        "then the packages of tests/node)")
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            pytest.fail(f"{package} is not installed in tests/node: run `scripts/ensure-system-deps test` "
                        "(npm ci in tests/node)")
        self.proc = subprocess.Popen([node, script, *args], cwd=NODE_DIR, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._ids = itertools.count(1)
        self._replies: dict[int, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        stderr = self.proc.stderr
        threading.Thread(target=lambda: self._stderr.extend(stderr or ()), daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._changed:
                self._replies[msg["re"]] = msg
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def start(self, cmd: str, **fields: Any) -> int:
        """Send a command; its reply is collected with :meth:`result`."""
        cid = next(self._ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": cid, "cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        return cid

    def result(self, cid: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while cid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no reply to node command {cid} (exit {self.proc.poll()}); "
                                         f"stderr:\n{''.join(self._stderr)}")
                self._changed.wait(min(left, 0.5))
            reply = self._replies.pop(cid)
        assert "failed" not in reply, reply["failed"]
        return reply

    def call(self, cmd: str, **fields: Any) -> dict[str, Any]:
        return self.result(self.start(cmd, **fields))

    def settled(self, cid: int) -> dict[str, Any]:
        """The reply of a background operation, once it settled without throwing."""
        reply = self.result(cid)
        assert reply["settled"] == "ok", reply
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
