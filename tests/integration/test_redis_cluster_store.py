"""The Redis Streams event log on a real Redis Cluster (three primaries).

The EventLog contract runs on the cluster in tests/unit/test_store_contract.py.
Pinned here, what only a cluster has: one writer round spans every node (one
script call per slot), the reader follows streams on every node (an ``XREAD``
per stream, sharded news on the owning node), a slot that moves while a
session is written and followed (``ASK`` during the move, ``MOVED`` after it,
the news re-subscribed on the new owner), a node that lost its script
cache, and a failover to a replica. The sweep is set to ten minutes, so only the news can make a follower's
reader read: a follower that gets an event got it through the path under test.
Every step of a move is done by the test, in order; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from turnline.protocol import Message, TurnEnd
from turnline.store.redis import RedisEventLog

from redis_server import redis_cluster_for_tests
from test_redis_store import collect, ev, following, tags, until

WAIT = 10.0
NO_SWEEP_MS = 600_000


@pytest.fixture
async def logs(redis_cluster_url: str) -> AsyncIterator[Callable[..., Any]]:
    """``logs(**options)``: open RedisEventLogs on the cluster sharing this test's prefix (as processes would)."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    made: list[RedisEventLog] = []

    async def make(**options: Any) -> RedisEventLog:
        log = RedisEventLog(redis_cluster_url, prefix=prefix, **options)
        await log.open()
        assert log.cluster
        made.append(log)
        return log

    yield make
    for log in made:
        await log.close()


class Nodes:
    """Admin connections to each primary, by ``host:port``; slot owners read from ``CLUSTER NODES``."""

    def __init__(self, clients: dict[str, aioredis.Redis]):
        self.clients = clients

    @staticmethod
    async def table(client: aioredis.Redis) -> list[list[str]]:
        raw = await client.execute_command("CLUSTER NODES")
        return [line.split() for line in raw.decode().splitlines()]

    @classmethod
    async def of(cls, url: str) -> Nodes:
        seed = aioredis.Redis.from_url(url)
        seed.set_response_callback("CLUSTER NODES", lambda r, **_: r)
        try:
            rows = await cls.table(seed)
        finally:
            await seed.aclose()
        clients = {}
        for row in rows:
            addr = row[1].split("@")[0]
            host, port = addr.rsplit(":", 1)
            clients[addr] = aioredis.Redis(host=host, port=int(port))
            clients[addr].set_response_callback("CLUSTER NODES", lambda r, **_: r)
        return cls(clients)

    async def owner(self, slot: int) -> str:
        """The node that owns ``slot``, as the first node sees it."""
        for row in await self.table(next(iter(self.clients.values()))):
            for part in row[8:]:
                if part.startswith("["):  # a slot being moved
                    continue
                first, _, last = part.partition("-")
                if int(first) <= slot <= int(last or first):
                    return row[1].split("@")[0]
        raise AssertionError(f"no node owns slot {slot}")

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aclose()


@pytest.fixture
async def nodes(redis_cluster_url: str) -> AsyncIterator[Nodes]:
    n = await Nodes.of(redis_cluster_url)
    yield n
    await n.close()


def session_slot(log: RedisEventLog, session: str) -> int:
    return key_slot(log.key(session, "log").encode())


async def test_a_write_round_and_the_reader_span_every_node(logs) -> None:
    gateway, worker = await logs(sweep_ms=NO_SWEEP_MS), await logs()
    sessions = [f"s{i}" for i in range(60)]
    assert len({worker._slot_addr[session_slot(worker, s)] for s in sessions}) == 3
    async with following(gateway, sessions) as (followers, firsts):
        async with asyncio.timeout(WAIT):
            for s in sessions:
                await gateway.feed_synced(s)
        # Queued together: one writer round, one script call per slot, the three nodes in parallel.
        await asyncio.gather(*(worker.append(s, [ev(f"{s}.1"), ev(f"{s}.2")]) for s in sessions))
        await asyncio.gather(*(worker.append(s, [ev(f"{s}.3")]) for s in sessions))
        for s in sessions:
            async with asyncio.timeout(WAIT):
                got = await firsts[s]
            if got[-1].seq < 3:
                got += await collect(followers[s], 3)
            assert tags(got) == [(n, f"{s}.{n}") for n in (1, 2, 3)]
        # A news connection per primary, each subscribed to the streams its node owns.
        assert set(gateway._links) == set(gateway._slot_addr)
        for addr, link in gateway._links.items():
            assert link.channels == {gateway.key(s, "news").encode() for s in sessions
                                     if gateway._slot_addr[session_slot(gateway, s)] == addr}


class Move:
    """The steps of moving one slot between two nodes, as ``redis-cli --cluster reshard`` does them."""

    def __init__(self, nodes: Nodes, slot: int, source: str, target: str):
        self.nodes, self.slot, self.source, self.target = nodes, slot, source, target
        self.src, self.dst = nodes.clients[source], nodes.clients[target]

    async def begin(self) -> None:
        src_id = (await self.src.execute_command("CLUSTER", "MYID")).decode()
        self.dst_id = (await self.dst.execute_command("CLUSTER", "MYID")).decode()
        await self.dst.execute_command("CLUSTER", "SETSLOT", self.slot, "IMPORTING", src_id)
        await self.src.execute_command("CLUSTER", "SETSLOT", self.slot, "MIGRATING", self.dst_id)

    async def move_keys(self) -> list[bytes]:
        keys = await self.src.execute_command("CLUSTER", "GETKEYSINSLOT", self.slot, 100)
        host, port = self.target.rsplit(":", 1)
        await self.src.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
        return keys

    async def end(self) -> None:
        for client in self.nodes.clients.values():
            await client.execute_command("CLUSTER", "SETSLOT", self.slot, "NODE", self.dst_id)


async def start_move(nodes: Nodes, log: RedisEventLog, session: str) -> Move:
    slot = session_slot(log, session)
    source = await nodes.owner(slot)
    move = Move(nodes, slot, source, next(a for a in nodes.clients if a != source))
    await move.begin()
    return move


async def test_a_session_whose_slot_moves_is_written_and_followed_throughout(logs, nodes: Nodes) -> None:
    """Every key of the session exists (a lease fences the appends, a turn
    ended): each step of the move serves the append at once."""
    gateway, worker = await logs(sweep_ms=NO_SWEEP_MS), await logs()
    session = "moving"
    await worker._redis.set(worker.key(session, "lease"), "token")
    follower = gateway.follow(session, after=0)
    try:
        end = TurnEnd(turn_id="t0", reason="complete", message=Message(id="m0", role="assistant", parts=[], parent_id=None))
        await worker.append(session, [ev("1"), end], fence="token")
        assert [r.seq for r in await collect(follower, 2)] == [1, 2]

        move = await start_move(nodes, worker, session)  # the keys are still on the source, which serves them
        assert tags(await worker.append(session, [ev("3")], fence="token")) == [(3, "3")]
        assert tags(await collect(follower, 3)) == [(3, "3")]

        keys = await move.move_keys()  # the source answers ASK: the call goes to the target after ASKING
        assert {k.decode() for k in keys} == {worker.key(session, k) for k in ("log", "seq", "lease", "ended")}
        assert tags(await worker.append(session, [ev("4")], fence="token")) == [(4, "4")]
        assert [r.seq for r in await worker.read(session)] == [1, 2, 3, 4]  # (redis-py follows the ASK)

        # Redis unsubscribes the slot's shard channels on the source; the
        # reader subscribes on the target, then reads: seq 4, announced on
        # the target before that, arrives now (no sweep runs; if the reader
        # read the stream meanwhile, it followed the redirect and got it then).
        await move.end()
        assert tags(await collect(follower, 4)) == [(4, "4")]
        await until(lambda: gateway._session_link[session].addr == move.target, "news subscribed on the target")

        # The writer still maps the slot to the source: MOVED, a new slot map, the call again.
        assert worker._slot_addr[move.slot] == move.source
        assert tags(await worker.append(session, [ev("5"), ev("6")], fence="token")) == [(5, "5"), (6, "6")]
        assert worker._slot_addr[move.slot] == move.target
        assert tags(await collect(follower, 6)) == [(5, "5"), (6, "6")]
        assert [r.seq for r in await worker.read(session)] == [1, 2, 3, 4, 5, 6]
    finally:
        await follower.aclose()


async def test_appends_to_a_session_whose_keys_are_between_two_nodes_wait_for_the_move(
        logs, nodes: Nodes) -> None:
    """Without a lease, the script names keys that do not exist: while the slot
    moves, Redis answers TRYAGAIN. That session's appends wait (in order),
    another session's go on, and all land once the move is done."""
    gateway, worker = await logs(sweep_ms=NO_SWEEP_MS), await logs()
    session = "moving"
    other = next(f"o{i}" for i in range(1000) if session_slot(worker, f"o{i}") != session_slot(worker, session))
    follower = gateway.follow(session, after=0)
    try:
        await worker.append(session, [ev("1")])
        assert tags(await collect(follower, 1)) == [(1, "1")]
        move = await start_move(nodes, worker, session)
        second = asyncio.ensure_future(worker.append(session, [ev("2")]))
        await until(lambda: session in worker._held, "the append was held")
        third = asyncio.ensure_future(worker.append(session, [ev("3")]))
        assert tags(await worker.append(other, [ev("x")])) == [(1, "x")]  # not held up
        await move.move_keys()
        assert not second.done() and not third.done()
        await move.end()
        async with asyncio.timeout(WAIT):
            assert tags(await second) == [(2, "2")]
            assert tags(await third) == [(3, "3")]
        assert tags(await collect(follower, 3)) == [(2, "2"), (3, "3")]
    finally:
        await follower.aclose()


async def test_a_node_that_lost_its_script_cache_loads_the_script_again(logs, nodes: Nodes) -> None:
    log = await logs()
    sessions = [f"s{i}" for i in range(12)]
    await asyncio.gather(*(log.append(s, [ev("1")]) for s in sessions))
    for client in nodes.clients.values():
        await client.script_flush()
    results = await asyncio.gather(*(log.append(s, [ev("2"), ev("3")]) for s in sessions))
    assert [[r.seq for r in got] for got in results] == [[2, 3]] * len(sessions)
    for s in sessions:
        assert tags(await log.read(s)) == [(1, "1"), (2, "2"), (3, "3")]


@pytest.fixture(scope="module")
def cluster_with_a_replica() -> Iterator[str]:
    """A cluster of its own (a failover changes it): three primaries, the first with a replica."""
    with redis_cluster_for_tests(primaries=3, replicas=1) as url:
        yield url


async def test_after_a_failover_writes_and_news_move_to_the_promoted_replica(cluster_with_a_replica: str) -> None:
    nodes = await Nodes.of(cluster_with_a_replica)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    gateway = RedisEventLog(cluster_with_a_replica, prefix=prefix, sweep_ms=NO_SWEEP_MS)
    worker = RedisEventLog(cluster_with_a_replica, prefix=prefix)
    await gateway.open()
    await worker.open()
    try:
        rows = await Nodes.table(next(iter(nodes.clients.values())))
        replica = next(r for r in rows if "slave" in r[2])
        primary = next(r[1].split("@")[0] for r in rows if r[0] == replica[3])
        promoted = replica[1].split("@")[0]
        session = next(s for s in (f"f{i}" for i in range(10_000))
                       if worker._slot_addr[session_slot(worker, s)] == primary)
        follower = gateway.follow(session, after=0)
        try:
            await worker.append(session, [ev("1")])
            assert tags(await collect(follower, 1)) == [(1, "1")]

            await nodes.clients[promoted].execute_command("CLUSTER", "FAILOVER")  # a manual failover: nothing lost
            await until(lambda: role(nodes.clients[promoted], "master"), "the replica promoted")
            await until(lambda: role(nodes.clients[primary], "slave"), "the old primary demoted")

            # The old primary answers MOVED: a new slot map, the call again on the promoted replica.
            assert tags(await worker.append(session, [ev("2")])) == [(2, "2")]
            assert worker._slot_addr[session_slot(worker, session)] == promoted
            # The news reaches the gateway (no sweep runs), and keeps coming.
            assert tags(await collect(follower, 2)) == [(2, "2")]
            assert tags(await worker.append(session, [ev("3")])) == [(3, "3")]
            assert tags(await collect(follower, 3)) == [(3, "3")]
            assert tags(await gateway.read(session)) == [(1, "1"), (2, "2"), (3, "3")]
        finally:
            await follower.aclose()
    finally:
        await gateway.close()
        await worker.close()
        await nodes.close()


async def role(client: aioredis.Redis, wanted: str) -> bool:
    return (await client.info("replication"))["role"] == wanted
