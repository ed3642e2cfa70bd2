"""The cluster Bus on a Redis Cluster (three primaries), in-process.

A Bus's first commands, a burst beyond its connection bound, and its
lease/claim scripts (direct and pipelined) on every node. The gateways and
workers on a Redis Cluster, as processes, are tested in test_cluster.py
(its ``[redis-cluster]`` tests).
"""

from __future__ import annotations

import asyncio

from redis_server import scratch_prefix
from test_cluster import node_of


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
