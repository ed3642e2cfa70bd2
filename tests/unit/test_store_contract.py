"""The EventLog contract (store/base.py), pinned for every store.

Invariant 1 (order: every follower sees seq order, no gap, no duplicate, across
any ``after=`` cursor) and invariant 10 (nothing acknowledged is lost, SQLite
part; the kill -9 half is tests/integration/test_sqlite_crash.py).

The generic tests run over memory, SQLite and Redis (a real server: the
``redis_url`` fixture; Redis-only behaviour is in
tests/integration/test_redis_store.py).

Ordering between tasks is controlled with events and queues; the only yields
are ``asyncio.sleep(0)`` (one loop iteration), never timed sleeps. Every wait
is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from typing import AsyncIterator, Callable

import pytest

from turnline.protocol import ChunkEvent, TurnStart
from turnline.store import MemoryEventLog, StoreError, open_store
from turnline.store import base
from turnline.store.base import EventLog, Record
from turnline.store.redis import RedisEventLog
from turnline.store.sqlite import SQLiteEventLog

WAIT = 10.0  # seconds: generous bound for anything that should take milliseconds


def ev(tag: str, turn: str = "t1") -> ChunkEvent:
    return ChunkEvent(turn_id=turn, chunk={"type": "text-delta", "id": "x", "delta": tag})


def tag_of(record: Record) -> str:
    return record.event().chunk["delta"]


def seqs(records: list[Record]) -> list[int]:
    return [r.seq for r in records]


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
async def store(request, tmp_path) -> AsyncIterator[EventLog]:
    log: EventLog
    if request.param == "memory":
        log = MemoryEventLog()
    elif request.param == "sqlite":
        log = SQLiteEventLog(str(tmp_path / "log.db"))
    elif request.param == "redis":
        log = RedisEventLog(request.getfixturevalue("redis_url"), prefix=request.getfixturevalue("redis_prefix"))
    else:  # a throwaway cluster of three primaries, used by this run only: no prefix to clean
        log = RedisEventLog(request.getfixturevalue("redis_cluster_url"), prefix=f"t{uuid.uuid4().hex[:12]}")
    await log.open()
    if request.param == "redis-cluster":
        assert log.cluster
    try:
        yield log
    finally:
        await log.close()


@pytest.fixture
def sqlite_path(tmp_path) -> str:
    return str(tmp_path / "events.db")


async def collect(agen: AsyncIterator[list[Record]], until_seq: int) -> list[Record]:
    """Batches from a follower until it has delivered ``until_seq`` (bounded in time)."""
    out: list[Record] = []
    async with asyncio.timeout(WAIT):
        while not out or out[-1].seq < until_seq:
            out.extend(await anext(agen))
    return out


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Give other tasks loop iterations until ``predicate`` holds (bounded)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


# ----------------------------------------------------------------- append


async def test_seq_is_gapless_from_one_per_session_and_independent(store: EventLog) -> None:
    a1 = await store.append("a", [ev("a1")])
    b1 = await store.append("b", [ev("b1"), ev("b2")])
    a2 = await store.append("a", [ev("a2"), ev("a3"), ev("a4")])
    b2 = await store.append("b", [ev("b3")])
    assert seqs(a1) == [1]
    assert seqs(a2) == [2, 3, 4]
    assert seqs(b1) == [1, 2]
    assert seqs(b2) == [3]
    assert [tag_of(r) for r in await store.read("a")] == ["a1", "a2", "a3", "a4"]
    assert [tag_of(r) for r in await store.read("b")] == ["b1", "b2", "b3"]
    assert await store.last_seq("a") == 4
    assert await store.last_seq("b") == 3
    assert await store.last_seq("nobody") == 0
    assert sorted(await store.sessions()) == ["a", "b"]
    assert await store.exists("a")
    assert not await store.exists("nobody")


async def test_record_matches_event_and_seq_is_set_on_the_event(store: EventLog) -> None:
    e = TurnStart(turn_id="t9", owner="alice", input_id="i1", message_id="m1")
    [rec] = await store.append("s", [e])
    assert e.seq == rec.seq == 1
    decoded = rec.event()
    assert decoded == e
    assert isinstance(decoded, TurnStart)


async def test_empty_append_is_a_no_op(store: EventLog) -> None:
    assert await store.append("s", []) == []
    assert seqs(await store.append("s", [ev("x")])) == [1]


async def test_concurrent_appends_get_seqs_in_call_order(store: EventLog) -> None:
    # 300 appends started in one go, sizes 1..3, across two sessions: each
    # gets a contiguous block, blocks follow call order, per session.
    calls = []
    for i in range(300):
        session = "even" if i % 2 == 0 else "odd"
        calls.append((session, [ev(f"{i}.{k}") for k in range(1 + i % 3)]))
    results = await asyncio.gather(*(store.append(s, events) for s, events in calls))
    expected = {"even": 1, "odd": 1}
    for (session, events), records in zip(calls, results):
        n = expected[session]
        assert seqs(records) == list(range(n, n + len(events)))
        assert [r.event() for r in records] == events
        expected[session] = n + len(events)
    for session in ("even", "odd"):
        log = await store.read(session)
        assert seqs(log) == list(range(1, expected[session]))
        assert [tag_of(r) for r in log] == [e.chunk["delta"] for s, events in calls if s == session for e in events]


async def test_concurrent_appends_complete_and_publish_in_call_order(store: EventLog) -> None:
    # Not needed for correctness of follow() (it repairs any disorder from the
    # log), but followers stay on the cheap live path only if the feed gets
    # commits in seq order, and callers see acknowledgements in call order.
    listener = store.feed.subscribe("s")
    if isinstance(store, RedisEventLog):
        await store.feed_synced("s")  # the live feed reads "s" from Redis from here on
    try:
        done: list[int] = []
        tasks = []
        for i in range(200):
            t = asyncio.create_task(store.append("s" if i % 3 else "t", [ev(str(i)) for _ in range(1 + i % 2)]))
            t.add_done_callback(lambda _, i=i: done.append(i))
            tasks.append(t)
        await asyncio.gather(*tasks)
        await asyncio.sleep(0)  # let the last done-callbacks run
        assert done == list(range(200))
        assert not listener.overflowed
        assert seqs(list(listener.pending)) == list(range(1, len(listener.pending) + 1))
        assert listener.pending[-1].seq == await store.last_seq("s")
    finally:
        store.feed.unsubscribe("s", listener)


async def test_append_then_hands_each_outcome_once_and_writes_in_call_order(store: EventLog) -> None:
    """What a streaming hub uses: the records, or the error, by callback."""
    outcomes: list[tuple[str, list[int] | None, str | None]] = []
    finished = asyncio.Event()

    def done(name: str, records: list[Record] | None, error: BaseException | None) -> None:
        outcomes.append((name, None if records is None else seqs(records), type(error).__name__ if error else None))
        if len(outcomes) == 4:
            finished.set()

    store.append_then("s", [ev("1"), ev("2")], lambda r, e: done("a", r, e))
    store.append_then("s", [], lambda r, e: done("empty", r, e))
    store.append_then("s", [ev("3")], lambda r, e: done("b", r, e))
    # Numbered at a seq the log is past: a shared store refuses it (a local one
    # has a single writer, and numbers what it is given).
    stale = ev("x")
    stale.seq = 1
    store.append_then("s", [stale], lambda r, e: done("stale", r, e))
    async with asyncio.timeout(WAIT):
        await finished.wait()
    assert ("empty", [], None) in outcomes
    writes = [o for o in outcomes if o[0] != "empty"]
    assert writes[:2] == [("a", [1, 2], None), ("b", [3], None)]
    if isinstance(store, RedisEventLog):
        assert writes[2] == ("stale", None, "StoreConflict")
        assert seqs(await store.read("s")) == [1, 2, 3]
    else:
        assert writes[2] == ("stale", [4], None)
    await store.append("s", [ev("after")])  # a later round: no outcome is handed twice
    assert len(outcomes) == 4


async def test_ts_is_set_when_zero_and_kept_otherwise(store: EventLog) -> None:
    fresh, given = ev("fresh"), ev("given")
    given.ts = 1234
    r1, r2 = await store.append("s", [fresh, given])
    assert r1.event().ts > 1_600_000_000_000  # milliseconds since the epoch
    assert r2.event().ts == 1234
    [stored1, stored2] = await store.read("s")
    assert stored1.event().ts == r1.event().ts
    assert stored2.event().ts == 1234


async def test_an_append_cancelled_while_waiting_still_takes_its_seq(store: EventLog) -> None:
    task = asyncio.create_task(store.append("s", [ev("cancelled")]))
    await asyncio.sleep(0)  # let it assign its seq and start waiting
    task.cancel()
    later = await store.append("s", [ev("later")])
    assert seqs(later) == [2]
    log = await store.read("s")
    assert seqs(log) == [1, 2]
    assert [tag_of(r) for r in log] == ["cancelled", "later"]


# ----------------------------------------------------------------- read


async def test_read_after_and_limit(store: EventLog) -> None:
    await store.append("s", [ev(str(i)) for i in range(1, 11)])
    assert seqs(await store.read("s")) == list(range(1, 11))
    assert seqs(await store.read("s", 0)) == list(range(1, 11))
    assert seqs(await store.read("s", 3)) == list(range(4, 11))
    assert seqs(await store.read("s", 3, 4)) == [4, 5, 6, 7]
    assert seqs(await store.read("s", 8, 100)) == [9, 10]
    assert await store.read("s", 10) == []
    assert await store.read("s", 50, 5) == []
    assert await store.read("s", 0, 0) == []
    assert await store.read("nobody") == []
    assert [tag_of(r) for r in await store.read("s", 5, 2)] == ["6", "7"]


async def test_read_pages_through_a_long_log(store: EventLog, monkeypatch) -> None:
    if isinstance(store, SQLiteEventLog):
        # Make the SQLite store's internal chunking kick in on a small log.
        monkeypatch.setattr("turnline.store.sqlite.READ_CHUNK", 7)
    if isinstance(store, RedisEventLog):
        monkeypatch.setattr("turnline.store.redis.READ_CHUNK", 7)
    for i in range(0, 100, 10):
        await store.append("s", [ev(str(n)) for n in range(i + 1, i + 11)])
    assert seqs(await store.read("s")) == list(range(1, 101))
    assert seqs(await store.read("s", 13, 30)) == list(range(14, 44))
    assert seqs(await store.read("s", 90, 14)) == list(range(91, 101))
    assert [tag_of(r) for r in await store.read("s", 41, 3)] == ["42", "43", "44"]


# ----------------------------------------------------------------- follow


async def test_follow_from_the_start_then_live(store: EventLog) -> None:
    await store.append("s", [ev("1"), ev("2")])
    await store.append("s", [ev("3")])
    follower = store.follow("s", after=0)
    try:
        assert seqs(await collect(follower, 3)) == [1, 2, 3]
        await store.append("s", [ev("4"), ev("5")])
        got = await collect(follower, 5)
        assert seqs(got) == [4, 5]
        assert [tag_of(r) for r in got] == ["4", "5"]
    finally:
        await follower.aclose()
    assert store.feed.follower_count("s") == 0


async def test_follow_of_an_empty_session_waits_for_the_first_event(store: EventLog) -> None:
    follower = store.follow("s", after=0)
    try:
        first = asyncio.create_task(anext(follower))
        await wait_for(lambda: store.feed.follower_count("s") == 1)
        await store.append("s", [ev("1")])
        async with asyncio.timeout(WAIT):
            assert seqs(await first) == [1]
    finally:
        await follower.aclose()


async def test_follow_after_a_cursor(store: EventLog) -> None:
    await store.append("s", [ev(str(i)) for i in range(1, 8)])
    follower = store.follow("s", after=4)
    try:
        assert seqs(await collect(follower, 7)) == [5, 6, 7]
        await store.append("s", [ev("8")])
        assert seqs(await collect(follower, 8)) == [8]
    finally:
        await follower.aclose()
    # A cursor at the end is live from there.
    follower = store.follow("s", after=8)
    try:
        nxt = asyncio.create_task(anext(follower))
        await wait_for(lambda: store.feed.follower_count("s") == 1)
        await store.append("s", [ev("9")])
        async with asyncio.timeout(WAIT):
            assert seqs(await nxt) == [9]
    finally:
        await follower.aclose()


async def test_follow_live_only(store: EventLog) -> None:
    await store.append("s", [ev("old1"), ev("old2"), ev("old3")])
    follower = store.follow("s", after=None)
    first_batch = asyncio.create_task(anext(follower))
    got: list[Record] = []
    try:
        await wait_for(lambda: store.feed.follower_count("s") == 1)
        # Append until the follower delivers; whatever it starts with, it is
        # never the history and never has a hole.
        n = 3
        async with asyncio.timeout(WAIT):
            while not first_batch.done():
                n += 1
                await store.append("s", [ev(f"new{n}")])
                await asyncio.sleep(0)
            got.extend(first_batch.result())
            if got[-1].seq < n:
                got.extend(await collect(follower, n))
    finally:
        first_batch.cancel()
        await follower.aclose()
    assert got[0].seq >= 4
    assert seqs(got) == list(range(got[0].seq, n + 1))
    assert all(tag_of(r).startswith("new") for r in got)


@pytest.mark.parametrize("start_at", [0, 1, 37, 149])
@pytest.mark.parametrize("page", [1000, 5])
async def test_follow_seam_while_appending(store: EventLog, monkeypatch, start_at: int, page: int) -> None:
    """A follower starting (after=0) while another task appends without pause
    sees exactly 1..N: the catch-up from the log and the live feed join with
    no gap and no duplicate. Appends overlap (several in flight at once), so
    for SQLite some are committed-but-not-yet-published at the seam."""
    monkeypatch.setattr(base, "READ_PAGE", page)
    total = 150
    started = asyncio.Event()
    in_flight: asyncio.Queue[asyncio.Task] = asyncio.Queue(maxsize=4)

    async def appender() -> None:
        n = 0
        while n < total:
            if n == start_at:
                started.set()
            size = min(1 + n % 3, total - n)
            batch = [ev(str(n + k + 1)) for k in range(size)]
            n += size
            await in_flight.put(asyncio.create_task(store.append("s", batch)))
            await asyncio.sleep(0)
        started.set()

    async def reaper() -> None:
        done = 0
        while done < total:
            done += len(await (await in_flight.get()))

    async with asyncio.timeout(WAIT):
        writers = asyncio.gather(appender(), reaper())
        await started.wait()
        follower = store.follow("s", after=0)
        try:
            got = await collect(follower, total)
        finally:
            await follower.aclose()
        await writers
    assert seqs(got) == list(range(1, total + 1))
    assert [tag_of(r) for r in got] == [str(i) for i in range(1, total + 1)]


async def test_two_followers_see_the_same_log(store: EventLog) -> None:
    await store.append("s", [ev(str(i)) for i in range(1, 6)])
    f1 = store.follow("s", after=0)
    f2 = store.follow("s", after=3)
    try:
        assert seqs(await collect(f1, 5)) == [1, 2, 3, 4, 5]
        assert seqs(await collect(f2, 5)) == [4, 5]
        for i in range(6, 31):
            await store.append("s", [ev(str(i))])
        got1 = await collect(f1, 30)
        got2 = await collect(f2, 30)
        assert seqs(got1) == seqs(got2) == list(range(6, 31))
        assert [r.data for r in got1] == [r.data for r in got2]
    finally:
        await f1.aclose()
        await f2.aclose()


async def test_follower_of_one_session_sees_nothing_of_another(store: EventLog) -> None:
    follower = store.follow("a", after=0)
    try:
        nxt = asyncio.create_task(anext(follower))
        await wait_for(lambda: store.feed.follower_count("a") == 1)
        await store.append("b", [ev("b1"), ev("b2")])
        await store.append("a", [ev("a1")])
        async with asyncio.timeout(WAIT):
            batch = await nxt
        assert [(r.seq, tag_of(r)) for r in batch] == [(1, "a1")]
    finally:
        await follower.aclose()


async def test_a_follower_that_falls_behind_the_backlog_still_gets_everything(
    store: EventLog, monkeypatch
) -> None:
    monkeypatch.setattr(base, "LISTENER_BACKLOG", 5)
    monkeypatch.setattr(base, "READ_PAGE", 4)
    await store.append("s", [ev("1")])
    follower = store.follow("s", after=0)
    try:
        assert seqs(await collect(follower, 1)) == [1]
        # The follower is parked (not reading) while 60 events arrive in 30
        # appends: its live buffer overflows repeatedly.
        for i in range(2, 62, 2):
            await store.append("s", [ev(str(i)), ev(str(i + 1))])
        got = await collect(follower, 61)
    finally:
        await follower.aclose()
    assert seqs(got) == list(range(2, 62))
    assert [tag_of(r) for r in got] == [str(i) for i in range(2, 62)]


async def test_a_slow_follower_while_appends_continue(store: EventLog, monkeypatch) -> None:
    """Overflow happening while the follower is mid-catch-up and appends keep coming."""
    monkeypatch.setattr(base, "LISTENER_BACKLOG", 3)
    monkeypatch.setattr(base, "READ_PAGE", 2)
    total = 120
    follower = store.follow("s", after=0)
    got: list[Record] = []
    try:
        async with asyncio.timeout(WAIT):
            for i in range(1, total + 1):
                await store.append("s", [ev(str(i))])
                if i % 7 == 0:  # read one batch now and then: always behind
                    got.extend(await anext(follower))
            while not got or got[-1].seq < total:
                got.extend(await anext(follower))
    finally:
        await follower.aclose()
    assert seqs(got) == list(range(1, total + 1))


# ----------------------------------------------------------------- SQLite only


async def test_sqlite_survives_close_and_reopen(sqlite_path: str) -> None:
    log = SQLiteEventLog(sqlite_path)
    await log.open()
    written = await log.append("a", [ev("a1"), ev("a2")])
    written += await log.append("a", [ev("a3")])
    await log.append("b", [ev("b1")])
    await log.close()

    log = SQLiteEventLog(sqlite_path)
    await log.open()
    try:
        stored = await log.read("a")
        assert stored == written
        assert [r.event() for r in stored] == [r.event() for r in written]
        assert await log.last_seq("a") == 3
        assert await log.last_seq("b") == 1
        assert sorted(await log.sessions()) == ["a", "b"]
        # Numbering continues where it stopped, per session.
        assert seqs(await log.append("a", [ev("a4"), ev("a5")])) == [4, 5]
        assert seqs(await log.append("b", [ev("b2")])) == [2]
        assert seqs(await log.append("c", [ev("c1")])) == [1]
    finally:
        await log.close()


async def test_sqlite_close_flushes_pending_appends(sqlite_path: str) -> None:
    log = SQLiteEventLog(sqlite_path)
    await log.open()
    tasks = [asyncio.create_task(log.append("s", [ev(str(i))])) for i in range(1, 201)]
    await asyncio.sleep(0)  # every append has taken its seq and is queued
    await log.close()
    # close() returned only after every queued append was committed and answered.
    assert all(t.done() for t in tasks)
    assert [seqs(t.result()) for t in tasks] == [[i] for i in range(1, 201)]
    with pytest.raises(StoreError):
        await log.append("s", [ev("too late")])

    conn = sqlite3.connect(sqlite_path)
    try:
        rows = conn.execute("SELECT seq FROM events WHERE session = 's' ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert [r[0] for r in rows] == list(range(1, 201))


async def test_sqlite_only_committed_records_are_acknowledged_or_followed(sqlite_path: str) -> None:
    """When append returns, and when a follower receives a record, another
    connection already sees it in the file."""
    log = SQLiteEventLog(sqlite_path, synchronous="FULL")
    await log.open()
    other = sqlite3.connect(sqlite_path, isolation_level=None)

    def stored(seq: int) -> bytes | None:
        row = other.execute("SELECT data FROM events WHERE session = 's' AND seq = ?", (seq,)).fetchone()
        return None if row is None else bytes(row[0])

    follower = log.follow("s", after=None)
    first = asyncio.create_task(anext(follower))
    try:
        await wait_for(lambda: log.feed.follower_count("s") == 1)
        for i in range(1, 21):
            [rec] = await log.append("s", [ev(str(i))])
            assert stored(rec.seq) == rec.data
        # Many appends in flight at once: every batch a follower gets is in the file.
        pending = [asyncio.create_task(log.append("s", [ev(str(i))])) for i in range(21, 121)]
        got = []
        async with asyncio.timeout(WAIT):
            batch = await first
            while True:
                for r in batch:
                    assert stored(r.seq) == r.data
                got.extend(batch)
                if got[-1].seq == 120:
                    break
                batch = await anext(follower)
        assert seqs(got) == list(range(1, 121))
        await asyncio.gather(*pending)
    finally:
        first.cancel()
        await follower.aclose()
        other.close()
        await log.close()


async def test_sqlite_group_commit_respects_batch_max(sqlite_path: str) -> None:
    log = SQLiteEventLog(sqlite_path, batch_max=3)
    await log.open()
    try:
        big = await log.append("s", [ev(str(i)) for i in range(1, 11)])  # larger than batch_max: one transaction
        results = await asyncio.gather(*(log.append(f"s{i % 4}", [ev(str(i))]) for i in range(40)))
        assert seqs(big) == list(range(1, 11))
        for k in range(4):
            assert seqs(await log.read(f"s{k}")) == list(range(1, 11))
        assert sum(len(r) for r in results) == 40
    finally:
        await log.close()


# A real commit failure, no mocks: a trigger aborts any insert of an event
# whose text contains "boom".
FAIL_TRIGGER = (
    "CREATE TRIGGER IF NOT EXISTS boom BEFORE INSERT ON events"
    " WHEN instr(CAST(NEW.data AS TEXT), 'boom') > 0"
    " BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
)


@pytest.mark.parametrize("batch_max", [1, 512])
async def test_sqlite_failed_commit_fails_the_appends_and_leaves_no_gap(sqlite_path: str, batch_max: int) -> None:
    # batch_max=1: the failing append commits alone and the others are still
    # queued behind it; 512: they all share the failing transaction.
    log = SQLiteEventLog(sqlite_path, batch_max=batch_max)
    await log.open()
    other = sqlite3.connect(sqlite_path, isolation_level=None)
    try:
        assert seqs(await log.append("s", [ev("1"), ev("2")])) == [1, 2]
        assert seqs(await log.append("o", [ev("o1")])) == [1]
        # Another connection holds the write lock (and installs the trigger)
        # while the appends below are made: the store's writer waits for the
        # lock, so all of them are queued before the failing one commits.
        other.execute("BEGIN IMMEDIATE")
        other.execute(FAIL_TRIGGER)
        tasks = [
            asyncio.create_task(log.append("s", [ev("boom")])),  # seq 3: fails
            asyncio.create_task(log.append("o", [ev("o2")])),
            asyncio.create_task(log.append("s", [ev("4"), ev("5")])),
            asyncio.create_task(log.append("s", [ev("6")])),
        ]
        await asyncio.sleep(0)  # each has taken its seqs and is queued
        other.execute("COMMIT")
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        # The failing append gets a StoreError, and so does every later
        # append of "s": committing seqs 4..6 would leave a hole at 3.
        for r in (results[0], results[2], results[3]):
            assert isinstance(r, StoreError), results
        # The next-seq of "s" was reloaded from the database: the failed
        # seqs are reused, the log stays gapless.
        assert seqs(await log.append("s", [ev("3")])) == [3]
        assert [(r.seq, tag_of(r)) for r in await log.read("s")] == [(1, "1"), (2, "2"), (3, "3")]
        # "o" either shared the failed transaction (and failed too) or not;
        # either way its log stays gapless and numbering goes on.
        o2 = results[1]
        assert isinstance(o2, StoreError) or seqs(o2) == [2]
        nxt = await log.append("o", [ev("o3")])
        assert seqs(await log.read("o")) == list(range(1, nxt[0].seq + 1))
    finally:
        other.close()
        await log.close()


async def test_sqlite_failed_commit_never_reaches_followers(sqlite_path: str) -> None:
    log = SQLiteEventLog(sqlite_path)
    await log.open()
    conn = sqlite3.connect(sqlite_path, isolation_level=None)
    conn.execute(FAIL_TRIGGER)
    conn.close()
    follower = log.follow("s", after=0)
    try:
        await log.append("s", [ev("1")])
        assert seqs(await collect(follower, 1)) == [1]
        with pytest.raises(StoreError):
            await log.append("s", [ev("boom")])
        assert seqs(await log.append("s", [ev("2")])) == [2]
        got = await collect(follower, 2)
        assert [(r.seq, tag_of(r)) for r in got] == [(2, "2")]
        assert await log.last_seq("s") == 2
    finally:
        await follower.aclose()
        await log.close()


async def test_sqlite_schema_and_meta(sqlite_path: str) -> None:
    log = SQLiteEventLog(sqlite_path)
    await log.open()
    await log.close()
    conn = sqlite3.connect(sqlite_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[0]
        assert "WITHOUT ROWID" in sql and "PRIMARY KEY (session, seq)" in sql
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(StoreError, match="schema version"):
        await SQLiteEventLog(sqlite_path).open()


def test_sqlite_rejects_bad_options(tmp_path) -> None:
    with pytest.raises(StoreError):
        SQLiteEventLog(":memory:")
    with pytest.raises(StoreError):
        SQLiteEventLog(str(tmp_path / "x.db"), synchronous="SOMETIMES")
    with pytest.raises(StoreError):
        SQLiteEventLog(str(tmp_path / "x.db"), batch_max=0)
    assert SQLiteEventLog(str(tmp_path / "x.db"), synchronous="full").synchronous == "FULL"


async def test_open_store_builds_sqlite_from_a_url(tmp_path) -> None:
    log = open_store(f"sqlite:///{tmp_path / 'url.db'}", synchronous="FULL")
    assert isinstance(log, SQLiteEventLog)
    await log.open()
    try:
        assert seqs(await log.append("s", [ev("1")])) == [1]
    finally:
        await log.close()
