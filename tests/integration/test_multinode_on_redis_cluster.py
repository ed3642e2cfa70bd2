"""Many nodes on a Redis Cluster (three primaries), with real processes.

test_cluster.py's processes (gateways, workers running ``tests.cluster_agents:gated``)
given a cluster node's URL. Each test checks that the keys it uses are spread
over the nodes (the keys' hash slots against ``CLUSTER SLOTS``), so commands,
leases and reads really cross nodes:

- a new turn runs on exactly one worker and streams to the client, also when
  two gateways send to one new session at once;
- a cancel sent through another gateway reaches the worker running the turn,
  whose lease was renewed meanwhile;
- kill -9 of the worker running a turn: the turn ends ``error``/``worker_lost``
  and the queued message then runs on the other worker.

In-process: a Bus's first commands, a burst beyond its connection bound, and
its lease/claim scripts (direct and pipelined) on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Iterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from test_cluster import LOST_TIMEOUT, TIMEOUT, Cluster, Node, deltas, say
from wsraw import RawWS, assert_gapless, text_of


async def node_of(r: RedisCluster, key: str) -> tuple[str, int]:
    """The primary serving ``key``, as CLUSTER SLOTS tells it."""
    slot = key_slot(key.encode())
    slots = await r.cluster_slots()
    return next(node["primary"] for (first, last), node in slots.items() if first <= slot <= last)


class OnRedisCluster(Cluster):
    """test_cluster's Cluster, its processes and its own client on a Redis Cluster."""

    def __init__(self, tmp: Path, redis_url: str, prefix: str, **kwargs: Any):
        super().__init__(tmp, redis_url, prefix, **kwargs)
        self.env["TURNLINE_TEST_REDIS_CLUSTER"] = "1"

    def redis(self) -> RedisCluster:  # type: ignore[override]
        return RedisCluster.from_url(self.redis_url)

    def session_key(self, session: str) -> str:
        return f"{self.prefix}:{{{session}}}:log"  # (RedisEventLog.key: every key of a session has its slot)

    async def hold_lease(self, r: RedisCluster, session: str, periods: int) -> None:
        """Watch the session's lease for ``periods`` lease periods: the same worker holds it all along."""
        key = f"{self.prefix}:{{{session}}}:lease"
        holder = await r.get(key)
        assert holder is not None
        loop = asyncio.get_running_loop()
        until = loop.time() + periods * self.lease_ms / 1000
        while loop.time() < until:
            assert await r.get(key) == holder, "the lease was not renewed"
            await asyncio.sleep(0.05)

    async def off_the_queue_node(self, r: RedisCluster, name: str) -> str:
        """A session named ``name-<i>`` whose keys live on another node than the dispatch stream's."""
        queue = await node_of(r, f"{self.prefix}:dispatch")
        for i in range(64):
            if await node_of(r, self.session_key(f"{name}-{i}")) != queue:
                return f"{name}-{i}"
        raise AssertionError("every candidate session is on the dispatch stream's node")


@contextlib.contextmanager
def scratch_prefix(url: str) -> Iterator[str]:
    """A random key prefix on the cluster; its keys (on every node) are deleted afterwards."""
    import uuid

    from redis.cluster import RedisCluster as SyncRedisCluster

    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        client = SyncRedisCluster.from_url(url)
        try:
            for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
                client.delete(key)
        finally:
            client.close()


@pytest.fixture
def cluster(tmp_path: Path, redis_cluster_url: str) -> Iterator[OnRedisCluster]:
    with scratch_prefix(redis_cluster_url) as prefix:
        c = OnRedisCluster(tmp_path, redis_cluster_url, prefix)
        try:
            yield c
        finally:
            c.stop()


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory: pytest.TempPathFactory,
               redis_cluster_url: str) -> Iterator[tuple[OnRedisCluster, list[Node], list[Node]]]:
    """2 gateways and 2 workers on the cluster, shared by the tests that kill nothing."""
    with scratch_prefix(redis_cluster_url) as prefix:
        c = OnRedisCluster(tmp_path_factory.mktemp("redis-cluster"), redis_cluster_url, prefix)
        try:
            gateways, workers = c.start(gateways=2, workers=2)
            yield c, gateways, workers
        finally:
            c.stop()


async def test_a_new_turn_runs_on_exactly_one_worker(
        two_by_two: tuple[OnRedisCluster, list[Node], list[Node]]) -> None:
    cluster, (ga, gb), workers = two_by_two
    r = cluster.redis()
    token = cluster.token()
    async with asyncio.timeout(60):
        sessions = [f"one-{i}" for i in range(12)]
        assert len({await node_of(r, cluster.session_key(s)) for s in sessions}) >= 2
        a, b = await RawWS.open(ga.ws, token), await RawWS.open(gb.ws, token)
        # One send to each of 12 new sessions, through either gateway: each streams its answer.
        turns: dict[str, str] = {}
        for i, session in enumerate(sessions):
            ws = (a, b)[i % 2]
            await ws.subscribe(session)
            turns[session] = (await ws.ok(say(session, f"quick {i}")))["turn_ids"][0]
            end = await ws.turn_end(session, turns[session], TIMEOUT)
            assert end["reason"] == "complete" and text_of(end["message"]) == "quick answer"
            assert [d["chunk"]["delta"] for d in deltas(ws, session, turns[session])] == ["quick answer"]
        runners = {t: await cluster.ran(r, t) for t in turns.values()}
        assert all(len(pids) == 1 for pids in runners.values()), runners
        assert {p for (p,) in runners.values()} <= {w.pid for w in workers}

        # Ten sends at once, through both gateways, to one new session: one
        # worker takes its lease, the other forwards to it; each turn runs once.
        session = await cluster.off_the_queue_node(r, "together")
        await a.subscribe(session)
        acks = await asyncio.gather(*(ws.ok(say(session, f"quick together {i}"))
                                      for i in range(5) for ws in (a, b)))
        started = [ack["turn_ids"][0] for ack in acks]
        assert len(set(started)) == 10
        for t in started:
            assert (await a.turn_end(session, t, TIMEOUT))["reason"] == "complete"
        runners = {t: await cluster.ran(r, t) for t in started}
        assert all(len(pids) == 1 for pids in runners.values()), runners
        assert len({p for (p,) in runners.values()}) == 1, "one session, one writer"
        assert_gapless(a.events[session])
        assert len(a.find(session, "turn-start")) == 10
        await a.close()
        await b.close()
    await r.aclose()


async def test_cancel_through_another_gateway_reaches_the_worker(
        two_by_two: tuple[OnRedisCluster, list[Node], list[Node]]) -> None:
    cluster, (ga, gb), workers = two_by_two
    r = cluster.redis()
    token = cluster.token()
    async with asyncio.timeout(60):
        session = await cluster.off_the_queue_node(r, "cancel-across")
        # The user streams on gateway A and stops from another device, on gateway B.
        a, b = await RawWS.open(ga.ws, token), await RawWS.open(gb.ws, token)
        await a.subscribe(session)
        await b.subscribe(session)
        turn = (await a.ok(say(session, "slow story")))["turn_ids"][0]
        await cluster.release(r, turn, 3)
        await b.wait_until(lambda: len(deltas(b, session, turn)) == 3, TIMEOUT, "3 tokens on B")
        seen = b.events[session][-1]["seq"]
        # Two more tokens reach the log (and A) but not B's screen: B's cancel says what it saw.
        await cluster.release(r, turn, 2)
        await a.wait_until(lambda: len(deltas(a, session, turn)) == 5, TIMEOUT, "5 tokens on A")
        # The turn runs on through three lease periods: its worker keeps
        # renewing the lease (on the session's node, not the dispatch stream's).
        await cluster.hold_lease(r, session, 3)
        ack = await b.ok({"op": "cancel", "session": session, "filter": {"turn_id": turn}, "seen": seen})
        assert ack["cancelled"] == [turn]
        end = await a.turn_end(session, turn, TIMEOUT)
        assert end["reason"] == "cancelled", end
        assert text_of(end["message"]) == "w0 w1 w2 "
        # The agent's abort fired, in the worker process that ran the turn.
        (runner,) = await cluster.ran(r, turn)
        assert runner in {w.pid for w in workers}
        assert await cluster.aborted(r, turn) == [f"{runner} cancelled"]
        await b.turn_end(session, turn, TIMEOUT)
        assert b.find(session, "turn-end") == a.find(session, "turn-end")
        await a.close()
        await b.close()
    await r.aclose()


async def test_killed_worker_turn_ends_worker_lost_and_queue_moves_on(cluster: OnRedisCluster) -> None:
    (gw,), workers = cluster.start(gateways=1, workers=2)
    r = cluster.redis()
    async with asyncio.timeout(90):
        session = await cluster.off_the_queue_node(r, "lost-worker")
        ws = await RawWS.open(gw.ws, cluster.token())
        await ws.subscribe(session)
        turn = (await ws.ok(say(session, "slow story")))["turn_ids"][0]
        await cluster.release(r, turn, 2)
        await ws.wait_until(lambda: len(deltas(ws, session, turn)) == 2, TIMEOUT, "2 tokens")
        queued = await ws.ok(say(session, "quick, after the story", policy="queue"))
        (queued_turn,) = queued["queued"]
        (victim_pid,) = await cluster.ran(r, turn)
        victim = next(w for w in workers if w.pid == victim_pid)
        survivor = next(w for w in workers if w is not victim)
        victim.kill()

        end = await ws.turn_end(session, turn, LOST_TIMEOUT)
        assert end["reason"] == "error", end
        assert end["error"]["code"] == "worker_lost", end
        assert text_of(end["message"]) == "w0 w1 "  # what was streamed is kept
        # The queued message was in the log: the other worker runs it.
        after = await ws.turn_end(session, queued_turn, TIMEOUT)
        assert after["reason"] == "complete" and text_of(after["message"]) == "quick answer"
        assert await cluster.ran(r, queued_turn) == [survivor.pid]
        assert_gapless(ws.events[session])
        assert [e["turn_id"] for e in ws.find(session, "turn-end")] == [turn, queued_turn]
        await ws.close()
    await r.aclose()


async def test_a_fresh_bus_takes_a_burst_and_its_scripts_run_on_every_node(redis_cluster_url: str) -> None:
    """In-process: a Bus on a new cluster client. A burst of blocking reads
    (four times the Bus's connection bound, on keys of every node) fails
    nothing, neither as the client's first commands (before it knows the
    slots) nor afterwards (it waits for connections); the compare-and-renew/delete
    scripts of leases and voice claims run on every node, directly and in the
    renewing pipeline."""
    from turnline.agent.cluster import BUS_CONNECTIONS, Bus
    from turnline.store.redis import RedisEventLog

    with scratch_prefix(redis_cluster_url) as prefix:
        store = RedisEventLog(redis_cluster_url, prefix=prefix)
        await store.open()
        bus = Bus(store)
        try:
            async with asyncio.timeout(30):
                assert store.cluster
                inboxes = [bus.inbox(f"w{i}") for i in range(4 * BUS_CONNECTIONS)]
                for _first_then_warm in range(2):
                    got = await asyncio.gather(*(bus.redis.xread({key: "0-0"}, block=200) for key in inboxes),
                                               return_exceptions=True)
                    assert [g for g in got if isinstance(g, BaseException)] == []

                sessions = [f"s{i}" for i in range(12)]
                r = bus.redis
                nodes = {node["primary"] for node in (await r.cluster_slots()).values()}
                assert {await node_of(r, bus.lease_key(s)) for s in sessions} == nodes, "leases on every node"
                for s in sessions:
                    assert await r.set(bus.lease_key(s), "me|1", nx=True, px=1000)
                async with r.pipeline(transaction=False) as pipe:
                    for s in sessions:
                        await bus.renew_in(pipe, bus.lease_key(s), "me|1", 60_000)
                    await bus.renew_in(pipe, bus.lease_key("nobody's"), "me|1", 60_000)
                    assert await pipe.execute() == [1] * len(sessions) + [0]
                assert min([await r.pttl(bus.lease_key(s)) for s in sessions]) > 50_000
                assert [await bus.renew_if_held(keys=[bus.lease_key(s)], args=["other|1", 1000]) for s in sessions] \
                    == [0] * len(sessions)
                assert [await bus.release_if_held(keys=[bus.lease_key(s)], args=["me|1"]) for s in sessions] \
                    == [1] * len(sessions)
                assert [await r.exists(bus.lease_key(s)) for s in sessions] == [0] * len(sessions)
        finally:
            await bus.close()
            await store.close()
