"""Invariant 10 for SQLite: nothing acknowledged is lost when the process is killed.

A child process appends in a loop (several concurrent writers, so group commit
is busy) and prints every record it got back from ``append`` — an
acknowledgement — to stdout. The test waits for a number of acknowledgements,
sends SIGKILL while the child is still writing, reopens the file and checks
that every acknowledged record is there, byte for byte, in a gapless log —
then does it again on the same file, a few rounds.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys

import pytest

from turnline.protocol import ChunkEvent, decode_event
from turnline.store.sqlite import SQLiteEventLog

ACKS_PER_ROUND = 200
ROUNDS = 4
DEADLINE = 30.0  # seconds for the child to produce its acknowledgements

WRITER = r"""
import asyncio, sys
from turnline.protocol import ChunkEvent
from turnline.store.sqlite import SQLiteEventLog

async def main(path, synchronous):
    log = SQLiteEventLog(path, synchronous=synchronous)
    await log.open()
    out = sys.stdout

    async def writer(session, w):
        i = 0
        while True:
            i += 1
            events = [
                ChunkEvent(turn_id=f"t{w}", chunk={"type": "text-delta", "id": f"w{w}", "delta": f"{w}:{i}:{k}"})
                for k in range(1 + i % 3)
            ]
            if api == "append":
                records = await log.append(session, events)
            else:  # as the hub writes: append_then (inline commits when nothing else is in flight)
                handed: asyncio.Future = asyncio.get_running_loop().create_future()
                log.append_then(session, events, lambda r, e: handed.set_result(r) if e is None
                                else handed.set_exception(e))
                records = await handed
                await asyncio.sleep(0)  # handed back within the call when inline: let the other writers run
            # Only now is the append acknowledged.
            out.write("".join(f"ack {session} {r.seq} {r.data.decode()}\n" for r in records))
            out.flush()

    await asyncio.gather(writer("a", 0), writer("a", 1), writer("b", 2), writer("c", 3))

api = sys.argv[3]
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def run_and_kill(path: str, synchronous: str, acks: dict[tuple[str, int], bytes],
                       api: str = "append") -> None:
    """Start a writer on ``path``, SIGKILL it after ACKS_PER_ROUND new acknowledgements."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, path, synchronous, api,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    before = len(acks)

    def take(line: bytes) -> None:
        if not line.endswith(b"\n"):
            return  # cut by the kill mid-line: not an acknowledgement we can read
        tag, session, seq, data = line.rstrip(b"\n").split(b" ", 3)
        assert tag == b"ack", line
        key = (session.decode(), int(seq))
        # Also across rounds: a seq acknowledged before a crash is never reused.
        assert key not in acks, f"seq acknowledged twice: {key}"
        acks[key] = data

    try:
        async with asyncio.timeout(DEADLINE):
            while len(acks) - before < ACKS_PER_ROUND:
                line = await proc.stdout.readline()
                if not line:
                    err = await proc.stderr.read()
                    pytest.fail(f"writer exited early ({await proc.wait()}): {err.decode(errors='replace')}")
                take(line)
        assert proc.returncode is None, "the writer must still be running when it is killed"
        proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(DEADLINE):
            # Everything the child printed before dying was acknowledged too.
            rest = await proc.stdout.read()
            assert await proc.wait() == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    for line in rest.splitlines(keepends=True):
        take(line)


async def check(path: str, acks: dict[tuple[str, int], bytes]) -> None:
    """Every acknowledged record is stored, byte for byte, in a gapless log."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()

    log = SQLiteEventLog(path)
    await log.open()
    try:
        assert sorted(await log.sessions()) == ["a", "b", "c"]
        for session in ("a", "b", "c"):
            stored = await log.read(session)
            seqs = [r.seq for r in stored]
            # Gapless from 1 (it may hold more than was acknowledged: commits
            # whose acknowledgement the kill cut off).
            assert seqs == list(range(1, len(seqs) + 1))
            by_seq = {r.seq: r for r in stored}
            acked = sorted(seq for s, seq in acks if s == session)
            assert acked, f"no acknowledgement for {session}"
            for seq in acked:
                assert seq in by_seq, f"acknowledged {session}:{seq} is lost"
                data = acks[(session, seq)]
                assert by_seq[seq].data == data
                event = by_seq[seq].event()
                assert event == decode_event(data)
                assert isinstance(event, ChunkEvent) and event.seq == seq
            assert await log.last_seq(session) == seqs[-1]
    finally:
        await log.close()


@pytest.mark.parametrize("api", ["append", "append_then"])
@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_acknowledged_appends_survive_sigkill(tmp_path, synchronous: str, api: str) -> None:
    path = str(tmp_path / "crash.db")
    acks: dict[tuple[str, int], bytes] = {}
    # Several rounds on the same file: kill, recover, continue, kill again.
    for _ in range(ROUNDS):
        await run_and_kill(path, synchronous, acks, api)
        await check(path, acks)
    assert len(acks) >= ROUNDS * ACKS_PER_ROUND

    # After recovery the log continues where it stopped.
    log = SQLiteEventLog(path)
    await log.open()
    try:
        last = await log.last_seq("a")
        [rec] = await log.append("a", [ChunkEvent(turn_id="t9", chunk={"type": "text-delta", "id": "z", "delta": "!"})])
        assert rec.seq == last + 1
    finally:
        await log.close()
