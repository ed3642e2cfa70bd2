"""The SQLite store's inline commits (SQLiteEventLog.inline_commits), on real files.

An ``append_then`` made while nothing is queued or waiting to be handed back is
committed on the loop thread at once; one made while the writer holds others is
queued behind them. Pinned: what ``done`` is handed is committed (another
connection reads it), outcomes and the live feed keep call order across the
two paths, an append while another process holds the write lock neither stalls
the loop nor fails (the writer waits for the lock), and the WAL that inline
commits leave is checkpointed by the writer (off the loop thread). The kill -9 half
is tests/integration/test_sqlite_crash.py (both APIs).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest

from turnline.protocol import ChunkEvent
from turnline.store import sqlite as sqlite_store
from turnline.store.base import Record
from turnline.store.sqlite import SQLiteEventLog

WAIT = 10.0


def ev(tag: str) -> ChunkEvent:
    return ChunkEvent(turn_id="t1", chunk={"type": "text-delta", "id": "x", "delta": tag})


class Clock:
    """The store's clock for the gaps between appends; it moves when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.now += 2 * sqlite_store.INLINE_MEAN_GAP_S  # appends this far apart leave the mean above the bound


async def opened(path: str, **options) -> tuple[SQLiteEventLog, Clock]:
    store = SQLiteEventLog(path, **options)
    store.clock = clock = Clock()
    await store.open()
    return store, clock


@pytest.fixture
async def log(tmp_path):
    store, _ = await opened(str(tmp_path / "events.db"))
    try:
        yield store
    finally:
        await store.close()


def committed(path: str, session: str) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT seq FROM events WHERE session = ? ORDER BY seq", (session,))]
    finally:
        conn.close()


async def test_an_append_then_while_idle_is_committed_before_done_returns(log: SQLiteEventLog) -> None:
    seen: list[tuple[list[int], list[int]]] = []

    def done(records: list[Record] | None, error: BaseException | None) -> None:
        assert error is None and records is not None
        seen.append(([r.seq for r in records], committed(log.path, "s")))

    log.append_then("s", [ev("1"), ev("2")], done)
    # Handed back within the call, and already readable by another connection.
    assert seen == [([1, 2], [1, 2])]
    assert log.inline_commit_count == 1


async def test_appends_in_quick_succession_go_to_the_writer_to_be_group_committed(tmp_path) -> None:
    store, clock = await opened(str(tmp_path / "events.db"))
    try:
        got: list[int] = []
        n = 400
        for _ in range(n):  # a busy server: an append every 10 µs
            clock.now += 0.00001
            store.append_then("s", [ev("x")], lambda r, e: got.extend(x.seq for x in r or []))
            await asyncio.sleep(0)
        async with asyncio.timeout(WAIT):
            while len(got) < n:
                await asyncio.sleep(0.001)
        assert got == list(range(1, n + 1))
        busy = store.inline_commit_count
        # Inline while the mean (starting at "idle") stays above INLINE_MEAN_GAP_S,
        # about the first hundred; none of the last two hundred.
        assert 50 < busy < n - 200
        clock.now += 5.0  # quiet again
        store.append_then("s", [ev("y")], lambda r, e: got.extend(x.seq for x in r or []))
        assert got[-1] == n + 1 and store.inline_commit_count == busy + 1
    finally:
        await store.close()


async def test_inline_and_queued_appends_keep_call_order(log: SQLiteEventLog) -> None:
    outcomes: list[list[int]] = []
    published: list[int] = []
    follower = log.follow("s", 0)
    first = asyncio.ensure_future(log.append("s", [ev("a")]))  # through the writer (awaited appends always are)
    await asyncio.sleep(0)
    # The writer holds "a": these queue behind it instead of committing inline.
    log.append_then("s", [ev("b")], lambda r, e: outcomes.append([x.seq for x in r or []]))
    log.append_then("s", [ev("c"), ev("d")], lambda r, e: outcomes.append([x.seq for x in r or []]))
    async with asyncio.timeout(WAIT):
        assert [r.seq for r in await first] == [1]
        while len(outcomes) < 2:
            await asyncio.sleep(0)
    assert outcomes == [[2], [3, 4]]
    assert log.inline_commit_count == 0
    # Idle again: the next one is inline, and the feed stays in order.
    log.clock.step()  # type: ignore[attr-defined]
    log.append_then("s", [ev("e")], lambda r, e: outcomes.append([x.seq for x in r or []]))
    assert outcomes[-1] == [5] and log.inline_commit_count == 1
    async with asyncio.timeout(WAIT):
        while len(published) < 5:
            published.extend(r.seq for r in await anext(follower))
    assert published == [1, 2, 3, 4, 5]
    await follower.aclose()


async def test_a_lock_held_elsewhere_sends_the_append_to_the_writer(log: SQLiteEventLog) -> None:
    other = sqlite3.connect(log.path, isolation_level=None)
    got: list[list[int]] = []
    try:
        other.execute("BEGIN IMMEDIATE")  # another process writing: the file's write lock is taken
        log.append_then("s", [ev("1")], lambda r, e: got.append([x.seq for x in r or []]))
        assert got == []  # not committed, and the loop was not held waiting for the lock
        other.execute("COMMIT")
        async with asyncio.timeout(WAIT):
            while not got:
                await asyncio.sleep(0.001)
        assert got == [[1]] and committed(log.path, "s") == [1]
        assert log.inline_commit_count == 0
    finally:
        other.close()


async def test_the_wal_inline_commits_leave_is_checkpointed_by_the_writer(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_RECORDS", 50)
    path = str(tmp_path / "events.db")
    store, clock = await opened(path)
    try:
        size_before = os.path.getsize(path)
        for i in range(49):
            clock.step()
            store.append_then("s", [ev("x" * 2000 + str(i))], lambda r, e: None)
        assert store.inline_commit_count == 49
        assert os.path.getsize(path) == size_before  # the records are in the WAL only
        clock.step()
        store.append_then("s", [ev("the fiftieth")], lambda r, e: None)  # the threshold: the writer is woken
        async with asyncio.timeout(WAIT):
            while os.path.getsize(path) == size_before:  # it checkpoints them into the database file
                await asyncio.sleep(0.005)
        assert committed(path, "s") == list(range(1, 51))
    finally:
        await store.close()


async def test_full_synchronous_never_commits_inline(tmp_path) -> None:
    store, _ = await opened(str(tmp_path / "events.db"), synchronous="FULL")
    try:
        got: list[int] = []
        store.append_then("s", [ev("1")], lambda r, e: got.extend(x.seq for x in r or []))
        assert got == [] and not store.inline_commits  # a synced commit stays off the loop thread
        async with asyncio.timeout(WAIT):
            while not got:
                await asyncio.sleep(0.001)
        assert store.inline_commit_count == 0
    finally:
        await store.close()
