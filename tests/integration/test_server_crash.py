"""Invariant 10 end to end: nothing acknowledged is lost when the server
process is killed (SQLite store), and recovery ends the orphaned turns once.

The real CLI (``turnline serve --store sqlite:///…``) runs as a subprocess with
the slow agent of ``tests/agents.py``. A raw WebSocket client sends, follows
the session and records every event and every ack it received. The server is
killed with SIGKILL while two turns stream, restarted on the same database, and
the client resubscribes with ``after=0``:

- every event the client received before the kill is in the log with the
  identical JSON (an event sent to a subscriber was durable first);
- every acknowledged send is in the log (an ack means durable);
- seqs are gapless;
- each turn that was running is ended by recovery exactly once, with reason
  ``error`` and code ``worker_lost``, and its persisted message keeps what was
  streamed; a second crash and restart ends nothing again;
- the session keeps working: a new send completes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import free_port
from turnline.server.auth import mint
from wsraw import RawWS, assert_gapless, text_of

ROOT = Path(__file__).resolve().parents[2]
TURNLINE = str(Path(sys.executable).with_name("turnline"))
SECRET = "crash-test-secret-0123456789abcdef"
S = "crash-1"
CHUNKS_BEFORE_KILL = 40
START_TIMEOUT = 20.0
TIMEOUT = 10.0


class Server:
    def __init__(self, tmp: Path, db: str):
        self.tmp = tmp
        self.db = db
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.runs = 0

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    async def start(self) -> None:
        self.port = free_port()
        self.runs += 1
        # This checkout's code and its tests package (for tests.agents).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
        env.pop("TURNLINE_SECRET", None)
        self.log = open(self.tmp / f"server-{self.runs}.log", "wb")
        self.proc = await asyncio.create_subprocess_exec(
            TURNLINE, "serve", "--store", f"sqlite:///{self.db}", "--port", str(self.port), "--secret", SECRET,
            "--no-dev", "--agent", "tests.agents:slow", "--log-level", "warning",
            cwd=ROOT, env=env, stdout=self.log, stderr=asyncio.subprocess.STDOUT)
        async with httpx.AsyncClient(timeout=1.0) as client:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    if self.proc.returncode is not None:
                        pytest.fail(f"server exited ({self.proc.returncode}): {self.output()}")
                    try:
                        r = await client.get(f"http://127.0.0.1:{self.port}/healthz")
                        if r.status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.proc is not None and self.proc.returncode is None, self.output()
        self.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(TIMEOUT):
            await self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return (self.tmp / f"server-{self.runs}.log").read_text(errors="replace")[-4000:]

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if not self.log.closed:
            self.log.close()


def text(session: str, prompt: str, **fields: Any) -> dict[str, Any]:
    return {"op": "send", "session": session, "messages": [{"parts": [{"type": "text", "text": prompt}]}], **fields}


async def test_acknowledged_events_survive_kill_and_recovery_ends_turns_once(tmp_path: Path) -> None:
    server = Server(tmp_path, str(tmp_path / "t.db"))
    token = mint(SECRET, "alice", {"*": ["subscribe", "publish", "cancel"]}, 600)
    try:
        async with asyncio.timeout(60):
            await server.start()
            ws = await RawWS.open(server.ws, token)
            await ws.subscribe(S, after=0)
            acks: list[dict[str, Any]] = []
            # A quick turn that completes, then two slow turns streaming side by side.
            acks.append(await ws.ok(text(S, "hello")))
            await ws.turn_end(S, acks[-1]["turn_ids"][0], TIMEOUT)
            acks.append(await ws.ok(text(S, "slow one")))
            acks.append(await ws.ok(text(S, "slow two")))
            running = [acks[1]["turn_ids"][0], acks[2]["turn_ids"][0]]
            await ws.wait_until(lambda: all(len(ws.find(S, "chunk", turn_id=t)) >= CHUNKS_BEFORE_KILL // 2
                                            for t in running), TIMEOUT, "both turns streaming")
            # Acks keep arriving while they stream: a quick turn alongside, and
            # a cancel that matches nothing (both stored once acknowledged).
            acks.append(await ws.ok(text(S, "meanwhile")))
            acks.append(await ws.ok({"op": "cancel", "session": S, "filter": {"turn_id": acks[0]["turn_ids"][0]}}))
            assert acks[-1]["cancelled"] == [] and acks[-1]["pending"] == []
            await server.kill()
            await ws.wait_until(lambda: ws.closed is not None, TIMEOUT, "the drop")
            received = list(ws.events[S])
            assert_gapless(received)
            assert not any(e["type"] == "turn-end" and e["turn_id"] in running for e in received)
            streamed = {t: "".join(e["chunk"].get("delta", "") for e in received
                                   if e["type"] == "chunk" and e["turn_id"] == t) for t in running}

            await server.start()
            ws = await RawWS.open(server.ws, token)
            ack = await ws.subscribe(S, after=0)
            ends = {t: await ws.turn_end(S, t, TIMEOUT) for t in running}
            for t, end in ends.items():
                assert end["reason"] == "error", end
                assert end["error"]["code"] == "worker_lost", end
                # What was streamed (and seen) is kept in the persisted message.
                assert text_of(end["message"]).startswith(streamed[t]) and streamed[t]
            log = ws.events[S]
            assert ack["last_seq"] >= len(received)
            # Everything the client received before the kill, byte-identical JSON.
            for ev in received:
                assert json.dumps(log[ev["seq"] - 1]) == json.dumps(ev), ev["seq"]
            # Every acknowledged command is durable.
            ids = {e["message"]["id"] for e in log if e["type"] == "message"}
            starts = {e["turn_id"] for e in log if e["type"] == "turn-start"}
            for a in acks[:4]:
                assert set(a["message_ids"]) <= ids and set(a["turn_ids"]) <= starts
            assert any(e["type"] == "cancel-result" and e["request_id"] == acks[4]["request_id"] for e in log)
            # The session keeps working.
            fresh = await ws.ok(text(S, "after the crash"))
            end = await ws.turn_end(S, fresh["turn_ids"][0], TIMEOUT)
            assert end["reason"] == "complete" and text_of(end["message"]) == "quick answer"
            await ws.wait_until(lambda: ws.find(S, "presence", state="idle") and
                                ws.events[S][-1]["type"] == "presence", TIMEOUT, "idle")
            assert_gapless(ws.events[S])

            # A second crash and restart: nothing is ended twice, nothing lost.
            before = list(ws.events[S])
            await server.kill()
            await server.start()
            ws = await RawWS.open(server.ws, token)
            ack = await ws.subscribe(S, after=0)
            await ws.wait_until(lambda: len(ws.events[S]) >= ack["last_seq"], TIMEOUT, "replay")
            log = ws.events[S]
            assert log[:len(before)] == before
            assert_gapless(log)
            for t in running + [fresh["turn_ids"][0], acks[0]["turn_ids"][0]]:
                assert len([e for e in log if e["type"] == "turn-end" and e["turn_id"] == t]) == 1, t
            starts = [e["turn_id"] for e in log if e["type"] == "turn-start"]
            assert sorted(starts) == sorted(e["turn_id"] for e in log if e["type"] == "turn-end")
            await ws.close()
    finally:
        await server.stop()
