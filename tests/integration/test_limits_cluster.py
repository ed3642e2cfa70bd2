"""Limits across gateways on Redis (docs/limits.md), with real processes.

Two `turnline serve --store redis://…` gateways with limits set on their
command line, and one `turnline worker` (``tests.cluster_agents:gated``: a
turn runs until the test releases it through Redis, so the number of running
turns is the test's). Redis's clock refills the send bucket, so the test
bounds what it may grant by the time the flood took instead of freezing it.
Each test runs on a single Redis (``[redis]``) and on a Redis Cluster of
three primaries (``[redis-cluster]``, the flood's session on another node
than the dispatch stream), as test_cluster.py's do.

- a flood of 200 sends on one session, half through each gateway: the
  client's one bucket grants at most ``burst + rate × elapsed`` in all (two
  per-process buckets would grant twice the burst), exactly the turn limit
  starts (the worker decides it with the gateways' setting, not its own
  default), every other send is ``rate_limited``, nothing refused is in the
  log; once the turns end and the named ``retry_after_ms`` has passed, a send
  starts a turn again;
- connections per client are counted across both gateways, and a closed one
  gives its slot back.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from servers import free_port
from test_cluster import SECRET, STORES, TURNLINE, Cluster, Node, new_cluster, say
from turnline.server.auth import mint
from turnline.store import open_store
from wsraw import RawWS

BURST = 10
RATE = 0.2  # a token every 5 s
TURNS = 4
CONNECTIONS = 3
LIMITS = ["--max-turns-per-session", str(TURNS), "--send-rate", str(RATE), "--send-burst", str(BURST),
          "--max-connections-per-client", str(CONNECTIONS)]


@pytest.fixture(scope="module", params=STORES)
def limited_cluster(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[Node]]]:
    """Two gateways with LIMITS and one worker, on a single Redis or a Redis Cluster."""
    with new_cluster(request, tmp_path_factory.mktemp(f"limits-{request.param}")) as cluster:
        gateways = []
        for i in range(2):
            port = free_port()
            gateways.append(Node(cluster.tmp, f"gateway{i}", [
                TURNLINE, "serve", "--store", cluster.store, "--secret", SECRET, "--no-dev", "--log-level",
                "warning", "--port", str(port), *LIMITS], cluster.env, port))
        worker = Node(cluster.tmp, "worker", [
            TURNLINE, "worker", "--store", cluster.store, "--agent", "tests.cluster_agents:gated",
            "--lease-ms", "1000", "--reaper-ms", "200", "--log-level", "warning"], cluster.env)
        cluster.nodes += [*gateways, worker]
        for node in cluster.nodes:
            node.wait_ready()
        yield cluster, gateways


def refusals(node: Node) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{node.port}/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("turnline_limit_refusals_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('limit="', 1)[1].split('"', 1)[0]] = float(value)
    return out


async def stored_log(cluster: Cluster, session: str) -> list[dict[str, Any]]:
    store = open_store(cluster.store)
    await store.open()
    try:
        return [json.loads(r.data) for r in await store.read(session, 0)]
    finally:
        await store.close()


async def test_a_flood_through_two_gateways_shares_one_bucket_and_one_turn_limit(
        limited_cluster: tuple[Cluster, list[Node]]) -> None:
    cluster, (ga, gb) = limited_cluster
    r = cluster.redis()
    token = mint(SECRET, "alice", {"*": ["subscribe", "publish", "cancel"]}, 600)
    session = await cluster.session(r, "flood")
    async with asyncio.timeout(90):
        a, b = await RawWS.open(ga.ws, token), await RawWS.open(gb.ws, token)
        await a.subscribe(session)
        started = time.monotonic()
        sent = []
        for i in range(100):  # back to back, through both gateways
            sent.append((a, await a.send(say(session, f"hold a{i}"))))
            sent.append((b, await b.send(say(session, f"hold b{i}"))))
        replies = [await ws.reply(fid, 60) for ws, fid in sent]
        elapsed = time.monotonic() - started

        acks = [x for x in replies if x["op"] == "ack"]
        refused = [x for x in replies if x["op"] == "error"]
        for x in refused:
            assert x["code"] == "rate_limited" and x["retry_after_ms"] >= 1, x
        by_sends = [x for x in refused if x["limit"] == "sends"]
        by_turns = [x for x in refused if x["limit"] == "turns"]
        assert len(by_sends) + len(by_turns) == len(refused)
        granted = len(replies) - len(by_sends)
        # One bucket for the client, whichever gateway it came through: never
        # more than the burst plus what Redis's clock refilled meanwhile
        # (per-gateway buckets would have granted 2 × BURST at least).
        assert BURST <= granted <= BURST + RATE * elapsed + 1, (granted, elapsed)
        # The worker decided the turn limit, with the gateways' setting (its own default is 8).
        assert len(acks) == TURNS and len(by_turns) == granted - TURNS
        log = await stored_log(cluster, session)
        assert len([e for e in log if e["type"] == "message"]) == TURNS
        assert len([e for e in log if e["type"] == "turn-start"]) == TURNS
        counted = [refusals(ga), refusals(gb)]
        assert sum(c.get("sends", 0) for c in counted) == len(by_sends)
        assert sum(c.get("turns", 0) for c in counted) == len(by_turns)

        # The turns end; once the wait a refusal named has passed, a send runs again.
        for ack in acks:
            await cluster.release(r, ack["turn_ids"][0], end=True)
        for ack in acks:
            assert (await a.turn_end(session, ack["turn_ids"][0], 20))["reason"] == "complete"
        again = await b.request(say(session, "quick again"))
        if again["op"] == "error":
            assert again["limit"] == "sends", again
            await asyncio.sleep(again["retry_after_ms"] / 1000)  # the time the server named, not a guess
            again = await b.request(say(session, "quick again"))
        assert again["op"] == "ack", again
        assert (await a.turn_end(session, again["turn_ids"][0], 20))["reason"] == "complete"
        await a.close()
        await b.close()
    await r.aclose()


async def test_connections_per_client_are_counted_across_gateways(
        limited_cluster: tuple[Cluster, list[Node]]) -> None:
    cluster, (ga, gb) = limited_cluster
    r = cluster.redis()
    token = mint(SECRET, "carol", {"*": ["subscribe"]}, 600)
    key = f"{cluster.prefix}:limit:connections:carol"
    async with asyncio.timeout(30):
        held = [await RawWS.open(ga.ws, token), await RawWS.open(ga.ws, token), await RawWS.open(gb.ws, token)]
        for ws in held:
            await ws.ping()
        refused = await RawWS.open(gb.ws, token)
        await refused.wait_until(lambda: refused.closed is not None, what="the close")
        (error,) = refused.errors
        assert error["code"] == "rate_limited" and error["limit"] == "connections", error
        assert refused.closed is not None and refused.closed.rcvd is not None
        assert refused.closed.rcvd.code == 4429
        # A connection closed on gateway A frees a slot that gateway B may use.
        await held.pop(0).close()
        while await r.zcard(key) != CONNECTIONS - 1:
            await asyncio.sleep(0.02)
        again = await RawWS.open(gb.ws, token)
        await again.ping()
        for ws in [*held, again]:
            await ws.close()
    await r.aclose()


def test_the_option_defaults_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "limits.md").read_text()
    for flag in ("--max-turns-per-session", "--send-rate", "--send-burst", "--cancel-rate", "--cancel-burst",
                 "--max-subscriptions", "--max-connections-per-client", "--audio-bytes-per-s",
                 "--audio-burst-bytes", "turnline_limit_refusals_total"):
        assert flag in doc, flag


async def test_a_dead_gateways_connections_stop_counting_after_their_ttl(redis_url: str, redis_prefix: str) -> None:
    """In process, two limiters on one Redis as two gateways would be: one takes
    the client's only slot and dies without a word (no disconnect, no refresh);
    the other is refused until that slot's expiry passes on Redis's clock, then
    admitted. A live gateway's refresh keeps its slot past the TTL."""
    from turnline.agent.cluster import Bus
    from turnline.agent.runtime import CommandError
    from turnline.core.limits import LimitsConfig
    from turnline.server.limits import RedisLimiter

    store = open_store(f"{redis_url}?prefix={redis_prefix}")
    await store.open()
    bus = Bus(store)
    config = LimitsConfig(max_connections_per_client=1, connection_ttl_s=1.0)
    dead, live = RedisLimiter(config, bus), RedisLimiter(config, bus)
    key = dead.key("connections", "dana")
    try:
        async with asyncio.timeout(20):
            await dead.connect("dana")  # ...and the gateway is killed: it never refreshes nor frees it
            with pytest.raises(CommandError) as refused:
                await live.connect("dana")
            assert refused.value.code == "rate_limited" and refused.value.details["limit"] == "connections"
            (_, expiry), = await bus.redis.zrange(key, 0, -1, withscores=True)
            while True:  # until Redis's clock passes the dead slot's expiry (a condition, read from Redis)
                seconds, micros = await bus.redis.time()
                if seconds * 1000 + micros // 1000 > expiry:
                    break
                await asyncio.sleep(0.05)
            slot = await live.connect("dana")
            # The live gateway refreshes its slot: it outlasts a TTL, and a third gateway is refused.
            (_, first_expiry), = await bus.redis.zrange(key, 0, -1, withscores=True)
            await live.refresh()
            (_, refreshed), = await bus.redis.zrange(key, 0, -1, withscores=True)
            assert refreshed >= first_expiry
            with pytest.raises(CommandError):
                await RedisLimiter(config, bus).connect("dana")
            await live.disconnect(slot)
            assert await bus.redis.zcard(key) == 0
    finally:
        await bus.close()
        await store.close()
