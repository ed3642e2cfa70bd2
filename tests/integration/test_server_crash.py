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

from servers import free_port
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
    def __init__(self, tmp: Path, db: str, *extra: str):
        self.tmp = tmp
        self.db = db
        self.extra = extra  # more `turnline serve` options
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
            "--no-dev", "--agent", "tests.agents:slow", "--log-level", "warning", *self.extra,
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


async def test_many_clients_resume_from_their_cursors_after_kill_and_lose_no_ack(tmp_path: Path) -> None:
    """Three WebSocket clients and one SSE reader on two sessions. While two
    slow turns stream, the writers pipeline sends (acks racing the kill) and
    one posts over HTTP; the server is SIGKILLed mid-stream and restarted.
    Each reader resumes from *its own* cursor (``after=last seq``, or
    ``Last-Event-ID``): what it had plus what it gets is the log exactly (no
    gap, no duplicate, byte-identical), and every ack any client got before the
    kill names something in the log."""
    # 60 pipelined sends on two sessions: about crashes, not limits (tests/integration/test_limits.py).
    server = Server(tmp_path, str(tmp_path / "many.db"), "--send-burst", "200", "--max-turns-per-session", "100")
    sessions = ["crash-a", "crash-b"]
    tokens = {n: mint(SECRET, n, {"*": ["subscribe", "publish", "cancel"]}, 600) for n in ("ann", "ben", "cy")}
    try:
        async with asyncio.timeout(90):
            await server.start()
            http = f"http://127.0.0.1:{server.port}"
            clients = {n: await RawWS.open(server.ws, t) for n, t in tokens.items()}
            for ws in clients.values():
                for s in sessions:
                    await ws.subscribe(s, after=0)
            slow = [(await clients["ann"].ok(text(s, "slow " + s)))["turn_ids"][0] for s in sessions]
            sse_events: list[tuple[int, dict[str, Any]]] = []
            sse_ready = asyncio.Event()

            async def sse_reader() -> None:
                async with httpx.AsyncClient(timeout=None) as c:
                    async with c.stream("GET", f"{http}/v1/sessions/{sessions[0]}/events?after=0",
                                        headers={"authorization": f"Bearer {tokens['cy']}"}) as r:
                        buf = b""
                        async for chunk in r.aiter_raw():
                            sse_ready.set()
                            buf += chunk
                            while b"\n\n" in buf:
                                block, buf = buf.split(b"\n\n", 1)
                                fields = dict(line.split(": ", 1) for line in block.decode().splitlines()
                                              if not line.startswith(":"))
                                if "data" in fields:
                                    sse_events.append((int(fields["id"]), json.loads(fields["data"])))

            sse_task = asyncio.ensure_future(sse_reader())
            await asyncio.wait_for(sse_ready.wait(), TIMEOUT)
            await clients["ben"].wait_until(lambda: all(
                len(clients["ben"].find(s, "chunk", turn_id=t)) >= 20 for s, t in zip(sessions, slow)),
                TIMEOUT, "both slow turns streaming")
            # Pipelined sends: acks keep arriving while the kill lands.
            sent: list[tuple[str, Any]] = []
            for i in range(30):
                for n in ("ben", "cy"):
                    sent.append((n, await clients[n].send(text(sessions[i % 2], f"quick {n} {i}"))))
            async with httpx.AsyncClient(timeout=TIMEOUT) as c:
                r = await c.post(f"{http}/v1/sessions/{sessions[1]}/messages",
                                 json={"messages": [{"parts": [{"type": "text", "text": "over http"}]}]},
                                 headers={"authorization": f"Bearer {tokens['ann']}"})
                assert r.status_code == 200, r.text
                http_ack = r.json()
            await clients["ben"].wait_until(lambda: len(clients["ben"].replies) >= 5, TIMEOUT, "some acks")
            await server.kill()
            for ws in clients.values():
                await ws.wait_until(lambda ws=ws: ws.closed is not None, TIMEOUT, "the drop")
            sse_task.cancel()
            acks = [clients[n].replies[fid] for n, fid in sent if fid in clients[n].replies] + [http_ack]
            assert all(a.get("op", "ack") == "ack" for a in acks), acks
            before = {n: {s: list(ws.events[s]) for s in sessions} for n, ws in clients.items()}
            for n, per in before.items():
                for s in sessions:
                    assert_gapless(per[s])
            assert [seq for seq, _ in sse_events] == list(range(1, len(sse_events) + 1))

            await server.start()
            http = f"http://127.0.0.1:{server.port}"
            resumed = {n: await RawWS.open(server.ws, t) for n, t in tokens.items()}
            for n, ws in resumed.items():
                for s in sessions:
                    had = before[n][s]
                    await ws.subscribe(s, after=had[-1]["seq"] if had else 0)
            for s, t in zip(sessions, slow):  # recovery ends the orphaned turns, once
                await resumed["ann"].turn_end(s, t, TIMEOUT)
            logs = {}
            for s in sessions:
                # Once every turn has ended the log is quiet: read it whole from a fresh subscriber.
                reader = await RawWS.open(server.ws, tokens["ann"])
                await resumed["ann"].wait_until(lambda s=s: _all_ended(before["ann"][s] + resumed["ann"].events[s]),
                                                TIMEOUT, f"every turn of {s} ended")
                ack = await reader.subscribe(s, after=0)
                await reader.wait_until(lambda s=s: len(reader.events[s]) >= ack["last_seq"], TIMEOUT, "replay")
                logs[s] = list(reader.events[s])
                await reader.close()
                assert_gapless(logs[s])
            for n, ws in resumed.items():
                for s in sessions:
                    await ws.wait_until(lambda ws=ws, n=n, s=s: len(before[n][s]) + len(ws.events[s]) >= len(logs[s]),
                                        TIMEOUT, f"{n} resumed {s}")
                    joined = before[n][s] + ws.events[s]
                    assert [json.dumps(e) for e in joined] == [json.dumps(e) for e in logs[s]], (n, s)
            # The SSE reader resumes with Last-Event-ID the same way.
            last_id = sse_events[-1][0] if sse_events else 0
            async with httpx.AsyncClient(timeout=TIMEOUT) as c:
                got: list[dict[str, Any]] = []
                async with c.stream("GET", f"{http}/v1/sessions/{sessions[0]}/events?after=0",
                                    headers={"authorization": f"Bearer {tokens['cy']}",
                                             "last-event-id": str(last_id)}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            got.append(json.loads(line[6:]))
                            if got[-1]["seq"] == logs[sessions[0]][-1]["seq"]:
                                break
            assert [e for _, e in sse_events] + got == logs[sessions[0]]
            # Every acknowledged send is in the log.
            everything = logs[sessions[0]] + logs[sessions[1]]
            ids = {e["message"]["id"] for e in everything if e["type"] == "message"}
            starts = {e["turn_id"] for e in everything if e["type"] == "turn-start"}
            for a in acks:
                assert set(a["message_ids"]) <= ids and set(a["turn_ids"]) <= starts, a
            for s in sessions:
                ends = [e["turn_id"] for e in logs[s] if e["type"] == "turn-end"]
                assert len(ends) == len(set(ends)) and set(ends) == {e["turn_id"] for e in logs[s]
                                                                     if e["type"] == "turn-start"}
            for ws in resumed.values():
                await ws.close()
    finally:
        await server.stop()


def _all_ended(events: list[dict[str, Any]]) -> bool:
    started = {e["turn_id"] for e in events if e["type"] == "turn-start"}
    ended = {e["turn_id"] for e in events if e["type"] == "turn-end"}
    return bool(started) and started <= ended
