"""The Redis Streams event log (store/redis.py) against a real Redis.

The generic EventLog contract runs over Redis in tests/unit/test_store_contract.py.
Pinned here, what only a shared store has: compare-and-set appends between
writers (two instances = two processes), fencing by the lease token, one
multiplexed stream reader per instance, told by pub/sub which streams were
written (a new follower is read at once; news lost with a dropped connection is
made good),
retention (compaction keeps history and in-window resume exact, and a session
still loads), and a real server on Redis (send, stream, cancel, resume, reload
after compaction).

Orders are controlled with gates (a reconnect or a read held until the test
releases it); every wait is bounded; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from typing import Any, AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from turnline.agent import Runtime, SessionHub, as_agent
from turnline.client import View
from turnline.client.view import GapError
from turnline.core.session import InvariantError, Session
from turnline.protocol import ChunkEvent, Compacted, Presence, TurnEnd, TurnStart, user_message
from turnline.store.base import Record, stamp
from turnline.store.redis import NEWS_RECORDS_MAX, Fenced, RedisEventLog, StoreConflict
from turnline.store import StoreError

from redis_server import _free_port, start_server
from test_client import Pacer, caught_up, clients, http_messages, new_session, text_of, words  # noqa: F401

WAIT = 10.0
HOUR_MS = 3_600_000


def ev(tag: str, turn: str = "t1") -> ChunkEvent:
    return ChunkEvent(turn_id=turn, chunk={"type": "text-delta", "id": "x", "delta": tag})


def seqs(records: list[Record]) -> list[int]:
    return [r.seq for r in records]


def tags(records: list[Record]) -> list[tuple[int, str]]:
    return [(r.seq, r.event().chunk["delta"]) for r in records]


@pytest.fixture
async def logs(redis_url: str, redis_prefix: str) -> AsyncIterator[Callable[..., RedisEventLog]]:
    """``logs(**options)``: an open RedisEventLog on this test's prefix; each
    call is another instance (as another process would have)."""
    made: list[RedisEventLog] = []

    async def make(**options: Any) -> RedisEventLog:
        log = RedisEventLog(redis_url, prefix=redis_prefix, **options)
        await log.open()
        made.append(log)
        return log

    yield make  # type: ignore[misc]
    for log in made:
        await log.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def until(predicate: Callable[[], Any], what: str = "condition") -> None:
    """Re-check ``predicate`` (sync or async) until it holds, bounded by WAIT."""
    try:
        async with asyncio.timeout(WAIT):
            while True:
                got = predicate()
                if asyncio.iscoroutine(got):
                    got = await got
                if got:
                    return
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise AssertionError(f"{what} never became true") from None


async def collect(agen: AsyncIterator[list[Record]], until_seq: int) -> list[Record]:
    out: list[Record] = []
    async with asyncio.timeout(WAIT):
        while not out or out[-1].seq < until_seq:
            out.extend(await anext(agen))
    return out


@contextlib.asynccontextmanager
async def following(log: RedisEventLog, sessions: list[str]) -> AsyncIterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Follow each session from its start, its first batch awaited in a task
    (``firsts``); on leaving, the tasks are cancelled and the followers closed."""
    followers = {s: log.follow(s, after=0) for s in sessions}
    firsts = {s: asyncio.ensure_future(anext(f)) for s, f in followers.items()}
    try:
        yield followers, firsts
    finally:
        for t in firsts.values():
            t.cancel()
        await asyncio.gather(*firsts.values(), return_exceptions=True)
        for f in followers.values():
            await f.aclose()


# ----------------------------------------------------------------- layout


async def test_keys_share_the_session_hash_tag_and_the_stream_id_is_the_seq(logs, raw) -> None:
    log = await logs()
    await log.append("s:1", [ev("a"), ev("b")])
    keys = {k: log.key("s:1", k) for k in ("log", "seq", "lease", "ended")}
    assert keys["log"] == f"{log.prefix}:{{s:1}}:log"
    slots = {key_slot(k.encode()) for k in keys.values()}  # Redis Cluster's CRC16 slot
    assert len(slots) == 1  # one Cluster slot: one Lua call may touch them all
    entries = await raw.xrange(keys["log"])
    assert [(eid, list(fields)) for eid, fields in entries] == [
        (b"1-0", [b"d"]), (b"2-0", [b"d"])]
    assert [fields[b"d"] for _, fields in entries] == [r.data for r in await log.read("s:1")]
    assert await raw.get(keys["seq"]) == b"2"
    assert await raw.smembers(log.sessions_key) == {b"s:1"}


# ----------------------------------------------------------------- appends between writers


async def test_numbered_appends_are_compare_and_set(logs) -> None:
    a, b = await logs(), await logs()
    await a.append("s", [ev("1"), ev("2"), ev("3")])
    taken = [ev("b4")]
    taken[0].seq = 4
    assert seqs(await b.append("s", taken)) == [4]
    # The hub of instance a numbers its next event 4 too: refused, nothing written.
    late = [ev("a4"), ev("a5")]
    late[0].seq, late[1].seq = 4, 5
    with pytest.raises(StoreConflict):
        await a.append("s", late)
    gap = [ev("a9")]
    gap[0].seq = 9
    with pytest.raises(StoreConflict):
        await a.append("s", gap)
    assert tags(await a.read("s")) == [
        (1, "1"), (2, "2"), (3, "3"), (4, "b4")]
    # Unnumbered events are renumbered after the conflict and retried.
    assert seqs(await a.append("s", [ev("a5")])) == [5]
    assert await b.last_seq("s") == 5


async def test_two_writers_appending_at_once_stay_gapless_and_each_in_its_call_order(logs) -> None:
    a, b = await logs(), await logs()
    calls = [(log, f"{name}{i}") for i in range(150) for log, name in ((a, "a"), (b, "b"))]
    results = await asyncio.gather(*(log.append("s", [ev(tag)]) for log, tag in calls))
    assert sorted(r[0].seq for r in results) == list(range(1, 301))
    stored = [r.event().chunk["delta"] for r in await a.read("s")]
    assert len(stored) == 300
    for name in "ab":  # each writer's events keep their call order
        assert [t for t in stored if t[0] == name] == [f"{name}{i}" for i in range(150)]


async def test_a_fenced_append_needs_the_current_lease_token(logs, raw) -> None:
    log = await logs()
    lease = log.key("s", "lease")
    await raw.set(lease, "worker-1:7", px=60_000)
    assert seqs(await log.append("s", [ev("1")], fence="worker-1:7")) == [1]

    with pytest.raises(Fenced):  # someone else's token
        await log.append("s", [ev("x")], fence="worker-2:8")
    await raw.set(lease, "worker-2:8", px=60_000)  # the lease moved to another worker
    numbered = [ev("old owner")]
    numbered[0].seq = 2
    with pytest.raises(Fenced):
        await log.append("s", numbered, fence="worker-1:7")
    await raw.set(lease, "worker-2:8", pxat=1)  # expired: the key is gone
    assert await raw.exists(lease) == 0
    with pytest.raises(Fenced):
        await log.append("s", [ev("y")], fence="worker-2:8")

    assert [r.event().chunk["delta"] for r in await log.read("s")] == ["1"]  # nothing else was written
    assert await log.last_seq("s") == 1
    assert seqs(await log.append("s", [ev("unfenced")])) == [2]  # no fence: no lease check


async def test_wait_replicas_refuses_to_acknowledge_what_no_replica_confirmed(logs) -> None:
    log = await logs(wait_replicas=1, wait_timeout_ms=1)  # the test Redis has no replica
    with pytest.raises(StoreError, match="replica"):
        await log.append("s", [ev("1")])


async def test_the_script_is_reloaded_after_the_script_cache_is_flushed() -> None:
    # A private throwaway server: SCRIPT FLUSH would disturb others on the shared one.
    with tempfile.TemporaryDirectory() as tmp:
        port, proc = start_server(tmp)
        assert proc is not None
        try:
            log = RedisEventLog(f"redis://127.0.0.1:{port}", prefix="p")
            await log.open()
            try:
                await log.append("s", [ev("1")])
                await log._redis.script_flush()
                assert seqs(await log.append("s", [ev("2"), ev("3")])) == [2, 3]
                assert seqs(await log.read("s")) == [1, 2, 3]
            finally:
                await log.close()
        finally:
            proc.terminate()
            proc.wait(10)


# ----------------------------------------------------------------- the multiplexed reader


async def test_one_reader_connection_feeds_followers_of_many_sessions(logs, raw) -> None:
    gateway, worker = await logs(), await logs()  # events reach the gateway only through Redis
    sessions = [f"s{i}" for i in range(300)]
    async with following(gateway, sessions) as (followers, firsts):
        await until(lambda: all(gateway.feed.follower_count(s) == 1 for s in sessions), "subscribed")
        for i, s in enumerate(sessions):
            await worker.append(s, [ev(f"{s}.1"), ev(f"{s}.2")])
        for s in sessions:
            await worker.append(s, [ev(f"{s}.3")])
        for s in sessions:
            async with asyncio.timeout(WAIT):
                got = await firsts[s]
            got += await collect(followers[s], 3) if got[-1].seq < 3 else []
            assert tags(got) == [(n, f"{s}.{n}") for n in (1, 2, 3)]
        names = [c.get("name") for c in await raw.client_list()]
        assert names.count(gateway.reader_name) == names.count(gateway.news_name) == 1
        assert set(gateway._cursor) == set(sessions)
    # With no followers left the reader drops the sessions at its next round.
    await gateway.append("s0", [ev("s0.4")])
    await until(lambda: not gateway._cursor, "reader forgot the sessions")


async def test_news_of_a_write_reaches_the_reader_at_once(logs) -> None:
    # No sweep for 10 minutes: only the write's news can make the reader read.
    gateway, worker = await logs(sweep_ms=600_000), await logs()
    fa = gateway.follow("a", after=0)
    first_a = asyncio.ensure_future(anext(fa))
    fb = gateway.follow("b", after=0)
    try:
        async with asyncio.timeout(WAIT):
            await gateway.feed_synced("a")
        first_b = asyncio.ensure_future(anext(fb))  # a second session, while the reader waits for news
        try:
            async with asyncio.timeout(WAIT):
                await gateway.feed_synced("b")
            await worker.append("b", [ev("b1"), ev("b2")])
            async with asyncio.timeout(WAIT):
                got = await first_b
            assert [r.event().chunk["delta"] for r in got] == ["b1", "b2"]
            await worker.append("a", [ev("a1")])
            async with asyncio.timeout(WAIT):
                assert seqs(await first_a) == [1]
        finally:
            first_b.cancel()
    finally:
        first_a.cancel()
        await fa.aclose()
        await fb.aclose()


@contextlib.asynccontextmanager
async def synced_follower(log: RedisEventLog, session: str) -> AsyncIterator[tuple[Any, asyncio.Future[Any]]]:
    """Follow ``session`` from its start, its first batch awaited in a task;
    yields once the reader follows it (so only news can bring what comes next)."""
    follower = log.follow(session, after=0)
    first = asyncio.ensure_future(anext(follower))
    try:
        async with asyncio.timeout(WAIT):
            await log.feed_synced(session)
        yield follower, first
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await follower.aclose()


@contextlib.asynccontextmanager
async def news_heard(raw: Any, log: RedisEventLog, session: str) -> AsyncIterator[list[bytes]]:
    """The payloads published on ``session``'s news channel meanwhile."""
    pubsub = raw.pubsub()
    await pubsub.subscribe(log.key(session, "news"))

    async def until_a(kind: str) -> None:
        async with asyncio.timeout(WAIT):
            while True:
                msg = await pubsub.get_message(timeout=WAIT)
                if msg is None:
                    continue
                if msg["type"] == kind:
                    return
                if msg["type"] == "message":
                    heard.append(msg["data"])

    heard: list[bytes] = []
    try:
        await until_a("subscribe")
        yield heard
        # The PONG comes after every message published before the PING.
        await pubsub.ping()
        await until_a("pong")
    finally:
        await pubsub.aclose()


def reads_of_the_stream(log: RedisEventLog) -> list[list[str]]:
    """Record the sessions of each stream read the reader makes from now on."""
    calls: list[list[str]] = []
    read_news = log._read_news

    async def counted(news: list[str]) -> None:
        calls.append(list(news))
        await read_news(news)

    log._read_news = counted  # type: ignore[method-assign]
    return calls


async def test_a_writes_news_carries_its_records_and_they_reach_the_follower_without_a_read(logs, raw) -> None:
    gateway, worker = await logs(sweep_ms=600_000), await logs()
    async with synced_follower(gateway, "s") as (follower, first):
        reads = reads_of_the_stream(gateway)
        async with news_heard(raw, worker, "s") as heard:
            records = await worker.append("s", [ev("1"), ev("2")])
            async with asyncio.timeout(WAIT):
                got = await first
            got += await collect(follower, 2) if got[-1].seq < 2 else []
    assert tags(got) == [(1, "1"), (2, "2")]
    assert got == records  # the bytes written, as written
    assert heard == [b"1\n" + records[0].data + b"\n" + records[1].data]
    assert reads == []


async def test_news_of_a_write_too_big_to_carry_names_its_last_seq_and_the_reader_reads_it(logs, raw) -> None:
    gateway, worker = await logs(sweep_ms=600_000), await logs()
    big = "x" * (NEWS_RECORDS_MAX + 1)
    async with synced_follower(gateway, "s") as (follower, first):
        reads = reads_of_the_stream(gateway)
        async with news_heard(raw, worker, "s") as heard:
            await worker.append("s", [ev("1"), ev(big)])
            async with asyncio.timeout(WAIT):
                got = await first
            got += await collect(follower, 2) if got[-1].seq < 2 else []
    assert tags(got) == [(1, "1"), (2, big)]
    assert heard == [b"2"]
    assert reads == [["s"]]


async def test_records_news_carries_past_a_gap_are_not_delivered_the_stream_is_read(
        logs, raw, caplog: pytest.LogCaptureFixture) -> None:
    """Seq 2 was written but its news never arrived (a dropped news
    connection): the news of seq 3 must not be delivered after seq 1."""
    gateway, worker = await logs(sweep_ms=600_000), await logs()
    async with synced_follower(gateway, "s") as (follower, first):
        await worker.append("s", [ev("1")])
        async with asyncio.timeout(WAIT):
            assert tags(await first) == [(1, "1")]
        # Seqs 2 and 3 as the script writes them, but only 3 announced.
        missed, announced = stamp([ev("2"), ev("3")], 2)
        for r in (missed, announced):
            await raw.xadd(worker.key("s", "log"), {"d": r.data}, id=f"{r.seq}-0")
        await raw.set(worker.key("s", "seq"), 3)
        reads = reads_of_the_stream(gateway)
        await raw.publish(worker.key("s", "news"), b"3\n" + announced.data)
        assert tags(await collect(follower, 3)) == [(2, "2"), (3, "3")]
        # The reader read the stream past the gap (the follower did not have
        # to repair a batch that skipped seq 2).
        assert reads == [["s"]]
        # News the reader cannot parse is a hint to read too, not a crash of its news connection.
        await worker.append("s", [ev("4")])
        await raw.publish(worker.key("s", "news"), b"not ours")
        await worker.append("s", [ev("5")])
        assert tags(await collect(follower, 5)) == [(4, "4"), (5, "5")]
        assert not [r for r in caplog.records if "reconnecting" in r.getMessage()]


async def test_a_session_is_read_from_its_last_seq_only_once_its_news_is_subscribed(logs) -> None:
    """Else a write between the look at the last seq and the SUBSCRIBE would be
    announced to nobody: the follower would miss it until the next sweep."""
    gateway = await logs(sweep_ms=600_000)
    key = gateway.key("s", "news").encode()
    unconfirmed_at_mget: list[bool] = []
    mget = gateway._redis.mget

    async def watched_mget(keys: Any) -> Any:
        news = gateway._links[""]
        unconfirmed_at_mget.append(key in news.acked or key in news.unacked)
        return await mget(keys)

    gateway._redis.mget = watched_mget
    follower = gateway.follow("s", after=0)
    nxt = asyncio.ensure_future(anext(follower))
    try:
        async with asyncio.timeout(WAIT):
            await gateway.feed_synced("s")
        assert unconfirmed_at_mget == [False]
    finally:
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        await follower.aclose()


async def test_a_write_whose_news_was_lost_with_the_connection_still_reaches_the_follower(logs, raw) -> None:
    gateway, worker = await logs(sweep_ms=600_000), await logs()
    follower = gateway.follow("s", after=0)
    nxt = asyncio.ensure_future(anext(follower))
    reconnecting, release = asyncio.Event(), asyncio.Event()
    news_client = gateway._links[""].client
    initialize = news_client.initialize

    async def held_initialize() -> None:  # the news connection's reconnect waits for the test
        reconnecting.set()
        await release.wait()
        await initialize()

    try:
        async with asyncio.timeout(WAIT):
            await gateway.feed_synced("s")
        news_client.initialize = held_initialize
        (news,) = [c for c in await raw.client_list() if c.get("name") == gateway.news_name]
        await raw.client_kill_filter(_id=news["id"])
        async with asyncio.timeout(WAIT):
            await reconnecting.wait()
        await worker.append("s", [ev("1")])  # its news goes to nobody
        assert not nxt.done()
        release.set()
        async with asyncio.timeout(WAIT):
            assert seqs(await nxt) == [1]
        await worker.append("s", [ev("2")])  # and news flows again
        assert seqs(await collect(follower, 2)) == [2]
    finally:
        release.set()
        nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        await follower.aclose()


async def test_an_event_written_before_the_reader_starts_a_session_still_reaches_its_follower(logs) -> None:
    """The window between a follower's catch-up read and the reader's first
    look at the session: an event committed there is in neither, unless the
    follower re-reads once the reader has started (resync)."""
    gateway, worker = await logs(), await logs()
    await worker.append("s", [ev("1"), ev("2")])
    hold = asyncio.Event()
    held = asyncio.Event()
    mget = gateway._redis.mget

    async def held_mget(keys: Any) -> Any:  # the reader's look at its new sessions waits for the test
        held.set()
        await hold.wait()
        return await mget(keys)

    gateway._redis.mget = held_mget
    follower = gateway.follow("s", after=0)
    try:
        assert seqs(await collect(follower, 2)) == [1, 2]  # caught up from the log
        async with asyncio.timeout(WAIT):
            await held.wait()
        nxt = asyncio.ensure_future(anext(follower))
        await worker.append("s", [ev("3")])  # after the catch-up, before the reader starts at the last seq
        hold.set()
        async with asyncio.timeout(WAIT):
            assert seqs(await nxt) == [3]
    finally:
        hold.set()
        await follower.aclose()


@pytest.mark.parametrize("start_at", [0, 40, 150])
async def test_follow_seam_when_another_instance_writes(logs, start_at: int) -> None:
    """A follower on one instance, the writer on another: the live side comes
    only from XREAD, and the catch-up and the live feed still join exactly."""
    gateway, worker = await logs(), await logs()
    total = 200
    started = asyncio.Event()

    async def appender() -> None:
        for n in range(1, total + 1):
            if n - 1 == start_at:
                started.set()
            await worker.append("s", [ev(str(n))])
        started.set()

    writing = asyncio.ensure_future(appender())
    follower = gateway.follow("s", after=0)
    try:
        async with asyncio.timeout(WAIT):
            await started.wait()
        got = await collect(follower, total)
        await writing
    finally:
        writing.cancel()
        await follower.aclose()
    assert seqs(got) == list(range(1, total + 1))
    assert [r.event().chunk["delta"] for r in got] == [str(n) for n in range(1, total + 1)]


# ----------------------------------------------------------------- retention


class Scripted:
    """An agent whose turns write exactly what the test feeds them (None ends the turn)."""

    def __init__(self) -> None:
        self.feeds: dict[str, asyncio.Queue[str | None]] = {}

    def feed(self, turn_id: str, *words: str | None) -> None:
        q = self.feeds.setdefault(turn_id, asyncio.Queue())
        for w in words:
            q.put_nowait(w)

    async def respond(self, turn: Any) -> AsyncIterator[str]:
        q = self.feeds.setdefault(turn.turn_id, asyncio.Queue())
        while (word := await q.get()) is not None:
            yield word


def deltas(hub: SessionHub, turn_id: str) -> int:
    return sum(c.chunk["type"] == "text-delta" for c in hub.state.turns[turn_id].chunks)


async def start_turn(hub: SessionHub, text: str) -> str:
    outcome, durable = await hub.send("alice", [user_message(text)], policy="concurrent")
    await durable
    return outcome.started[0]


async def settled(hub: SessionHub, turn_id: str | None = None) -> int:
    await until(lambda: (turn_id is None or not hub.state.is_active(turn_id))
                and not hub._outbox and not hub._flushing, "turn end")
    return hub.state.last_seq


def runs(numbers: set[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive numbers, as (first, last)."""
    out: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def fold(records: list[Record]) -> Session:
    s = Session()
    s.apply_all(r.event() for r in records)
    return s


def history(state: Session) -> Any:
    return state.messages, state.branch(), {t: (x.reason, x.message_id) for t, x in state.turns.items()}


def test_a_compacted_event_continues_the_log_only_where_it_covers_the_cursor() -> None:
    # Pure core (no Redis): the rule Session and View share (core.session.continues).
    state = Session()
    state.apply(Presence(seq=1, state="idle"))
    state.apply(Compacted(seq=5, first=2))  # 2..5 removed
    assert state.last_seq == 5
    with pytest.raises(InvariantError):
        state.apply(Compacted(seq=9, first=7))  # 6 is missing: a real gap
    state.apply(Compacted(seq=9, first=3))  # overlaps what was seen, covers 6..9
    assert state.last_seq == 9
    state.apply(Presence(seq=10, state="idle"))
    view = View()
    view.apply(Presence(seq=1, state="idle"))
    with pytest.raises(GapError):
        view.apply(Compacted(seq=9, first=4))
    assert view.last_seq == 1 and view.gaps == 1
    assert view.apply(Compacted(seq=9, first=2)) and view.last_seq == 9


async def test_compaction_keeps_history_and_resume_inside_the_window_exact(logs) -> None:
    log = await logs(retention_s=3600)
    agent = Scripted()
    runtime = Runtime(log, as_agent(agent.respond))
    try:
        hub = await runtime.hub("s")
        old = await start_turn(hub, "first question")
        agent.feed(old, *[f"o{i} " for i in range(30)], None)
        await settled(hub, old)
        kept = await start_turn(hub, "second question")  # still streaming when compaction runs
        agent.feed(kept, *[f"k{i} " for i in range(10)])
        await until(lambda: deltas(hub, kept) == 10, "ten words")
        await settled(hub)
        before = await log.read("s")
        (old_end,) = [e for e in (r.event() for r in before) if isinstance(e, TurnEnd)]

        removed = await log.compact(now_ms=old_end.ts + HOUR_MS + 1)
        assert await log.compact(now_ms=old_end.ts + HOUR_MS + 1) == 0  # done once
        agent.feed(kept, *[f"k{i} " for i in range(10, 20)], None)
        last = await settled(hub, kept)
        after = await log.read("s")
    finally:
        await runtime.close()

    old_chunks = {r.seq for r in before if isinstance(r.event(), ChunkEvent) and r.event().turn_id == old}
    assert removed == len(old_chunks) > 30  # 30 words, and the start/end chunks around them
    first, end = min(old_chunks), max(old_chunks)
    # The stored log lost exactly the old turn's chunks (other events, such as
    # presence, sit between them); read() names each hole once.
    holes = [r.event() for r in after if isinstance(r.event(), Compacted)]
    assert [(h.first, h.seq) for h in holes] == runs(old_chunks)
    assert [r for r in after if not isinstance(r.event(), Compacted)] == \
        [r for r in before if r.seq not in old_chunks] + [r for r in after if r.seq > before[-1].seq]
    assert seqs(after) == [s for s in range(1, last + 1) if s not in old_chunks or s + 1 not in old_chunks]
    # The fold (what a hub loads, what a client shows) is unchanged.
    full = fold(before + [r for r in after if r.seq > before[-1].seq])
    assert history(fold(after)) == history(full)
    assert fold(after).last_seq == last
    # Resume from inside the window is exact: the kept turn's chunks are all there.
    inside = next(r.seq for r in before if isinstance(r.event(), ChunkEvent) and r.event().turn_id == kept)
    assert await log.read("s", inside) == [r for r in before if r.seq > inside] + \
        [r for r in after if r.seq > before[-1].seq]
    # A client resuming from inside the compacted range ends equal to the history.
    for cursor in (0, first - 1, first + 5, end):
        view = View("s")
        view.apply_all(r.event() for r in before if r.seq <= cursor)
        view.apply_all(r.event() for r in await log.read("s", cursor))
        assert view.gaps == 0 and view.last_seq == last
        assert view.core.messages == full.messages
        assert view.messages() == full.branch()


async def test_a_session_loads_after_compaction_and_goes_on(logs) -> None:
    log = await logs(retention_s=60)
    agent = Scripted()
    runtime = Runtime(log, as_agent(agent.respond))
    try:
        hub = await runtime.hub("s")
        t1 = await start_turn(hub, "one")
        agent.feed(t1, "a ", "b ", "c ", None)
        await settled(hub, t1)
        expected = history(hub.state)
        chunks = len(hub.state.turns[t1].chunks)
    finally:
        await runtime.close()
    assert await log.compact(now_ms=2**62) == chunks

    agent2 = Scripted()
    runtime2 = Runtime(log, as_agent(agent2.respond))  # a fresh process: folds the compacted log
    try:
        hub2 = await runtime2.hub("s")
        assert history(hub2.state) == expected
        t2 = await start_turn(hub2, "two")
        agent2.feed(t2, "d ", None)
        last = await settled(hub2, t2)
        assert hub2.state.turns[t2].reason == "complete"
        assert await log.last_seq("s") == last
    finally:
        await runtime2.close()


async def test_the_background_compactor_runs_when_retention_is_set(logs) -> None:
    log = await logs(retention_s=0, compact_every_s=0.01)
    t = "t-bg"
    await log.append("s", [TurnStart(turn_id=t, owner="alice", input_id="m0", message_id="r0")])
    await log.append("s", [ev("x", t), ev("y", t)])
    await log.append("s", [Presence(state="idle")])
    end = TurnEnd(turn_id=t, reason="complete", message=fold(await log.read("s")).persisted_message(t, "complete"))
    await log.append("s", [end])
    await until(lambda: _no_chunks(log), "compacted in the background")
    assert [type(r.event()).__name__ for r in await log.read("s")] == [
        "TurnStart", "Compacted", "Presence", "TurnEnd"]


async def _no_chunks(log: RedisEventLog) -> bool:
    return not any(isinstance(r.event(), ChunkEvent) for r in await log.read("s"))


# ----------------------------------------------------------------- a real server on Redis


def boot(serve: Callable[..., Any], store: str, **agent_kw: Any) -> tuple[Any, Pacer]:
    agent = Pacer(**agent_kw)
    agent.test_loop = asyncio.get_running_loop()
    srv = serve(agent=agent.respond, store=store)
    agent.server_loop = srv.loop
    return srv, agent


async def test_a_server_on_redis_streams_cancels_and_resumes(serve, clients, redis_url, redis_prefix) -> None:
    store = f"{redis_url}?prefix={redis_prefix}"
    srv, agent = boot(serve, store, words=100)
    sid = new_session()
    alice = clients(srv, sid, "alice")
    await alice.connect()
    (turn_id,) = (await alice.send("tell me a story"))["turn_ids"]
    agent.release(5)
    await alice.wait_for(lambda v: text_of(v, turn_id) == words(5), WAIT)

    bob = clients(srv, sid, "bob")  # joins mid-turn: catch-up from the stream, then live
    await bob.connect()
    assert text_of(bob.view, turn_id) == words(5)
    agent.release(3)
    await bob.wait_for(lambda v: text_of(v, turn_id) == words(8), WAIT)
    await alice.wait_for(lambda v: text_of(v, turn_id) == words(8), WAIT)

    ack = await alice.cancel()
    assert ack["cancelled"] == [turn_id]
    end = await alice.wait_turn_end(turn_id, WAIT)
    assert end.reason == "cancelled"
    assert end.message == alice.view.message(end.message.id)
    events = await caught_up(alice, srv, sid)
    await caught_up(bob, srv, sid)
    assert alice.view.events == bob.view.events == events
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert await http_messages(srv, sid, srv.token("alice")) == alice.view.messages()


async def test_a_new_server_resumes_a_compacted_session(serve, clients, redis_url, redis_prefix) -> None:
    store = f"{redis_url}?prefix={redis_prefix}&retention_s=60"
    srv, agent = boot(serve, store, words=6)
    sid = new_session()
    t = clients(srv, sid, "alice")
    await t.connect()
    (first,) = (await t.send("one"))["turn_ids"]
    agent.release(6)
    await t.wait_turn_end(first, WAIT)
    shown = t.view.messages()
    chunks = len(t.view.core.turns[first].chunks)
    old_view_events = list(t.view.events)
    await t.close()
    srv.stop()

    log = RedisEventLog(redis_url, prefix=redis_prefix, retention_s=60)
    await log.open()
    try:
        assert await log.compact(sid, now_ms=2**62) == chunks
    finally:
        await log.close()

    srv2, agent2 = boot(serve, store, words=2)  # another node: loads the compacted log
    late = clients(srv2, sid, "alice")
    await late.connect()  # from 0, across the compacted range
    await caught_up(late, srv2, sid)
    assert late.view.messages() == shown
    assert late.view.gaps == 0
    assert any(isinstance(e, Compacted) for e in late.view.events)
    # A client that had seen part of the old turn's chunks resumes from there.
    cursor = next(e.seq for e in old_view_events if isinstance(e, ChunkEvent)) + 2
    resumed = clients(srv2, sid, "alice", after=cursor)
    resumed.view.apply_all(e for e in old_view_events if e.seq <= cursor)
    await resumed.connect()
    await caught_up(resumed, srv2, sid)
    assert resumed.view.messages() == shown and resumed.view.gaps == 0
    (second,) = (await late.send("two"))["turn_ids"]
    agent2.release(2)
    end = await late.wait_turn_end(second, WAIT)
    assert end.reason == "complete" and end.message.parts[0]["text"] == words(2)
    await resumed.wait_turn_end(second, WAIT)
    assert resumed.view.messages() == late.view.messages()
    assert await http_messages(srv2, sid, srv2.token("alice")) == late.view.messages()


async def test_open_waits_for_a_redis_that_starts_after_it(caplog: pytest.LogCaptureFixture) -> None:
    # Processes started together (a Procfile) may start before Redis listens.
    port = _free_port()
    store = RedisEventLog(f"redis://127.0.0.1:{port}", open_wait_s=60)
    caplog.set_level(logging.WARNING, "turnline.store.redis")
    opening = asyncio.ensure_future(store.open())
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        try:
            async with asyncio.timeout(30):
                while not any("does not answer yet" in r.getMessage() for r in caplog.records):
                    assert not opening.done(), opening.exception()  # it gave up instead of waiting
                    await asyncio.sleep(0.01)
                _, proc = await asyncio.to_thread(start_server, tmp, port=port)
                await opening
                (record,) = await store.append("late", [ev("a")])
                assert record.seq == 1
                await store.close()
        finally:
            opening.cancel()
            if proc is not None:
                proc.terminate()
                proc.wait(10)


async def test_open_gives_up_after_open_wait_s() -> None:
    store = RedisEventLog(f"redis://127.0.0.1:{_free_port()}?open_wait_s=0.2")
    async with asyncio.timeout(10):
        with pytest.raises(StoreError, match="cannot reach Redis"):
            await store.open()

