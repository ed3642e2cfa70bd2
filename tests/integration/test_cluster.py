"""Many nodes on Redis, with real processes.

Gateways are `turnline serve --store redis://…` subprocesses with no agent;
workers are `turnline worker` subprocesses running ``tests.cluster_agents:gated``,
whose every token waits for the test to push to a Redis list, so the order of
events across processes is set by the test, not by timing. Every wait is
bounded (the bounds are generous: how fast a dead worker is noticed is
measured in ``bench/cluster.py``, not asserted here).

The process tests run twice: on a single Redis (``[redis]``) and on a Redis
Cluster of three primaries (``[redis-cluster]``), where a test's session is
named so that its keys live on another node than the dispatch stream's, so
commands, leases and reads really cross nodes.

- a new turn runs on exactly one worker and streams to the client, also when
  two gateways send to one new session at once;
- a cancel sent through another gateway reaches the worker running the turn,
  whose lease was renewed meanwhile, and the persisted message is what the
  canceller had seen;
- kill -9 of the worker running a turn: the turn ends ``error``/``worker_lost``,
  the client sees it, and the queued message then runs on the other worker;
- kill -9 of the client's gateway mid-stream: the client resumes through
  another gateway with no gap and no duplicate, and nothing acknowledged is lost;
- the Procfile of examples/multinode runs, and its demo stops a turn across gateways.

In-process (two workers on one store, their loops not started, so the test
decides who acts when): a command for a session another worker owns is handed
to that worker; an idle session is let go and taken by another worker; a worker
whose lease was taken cannot write (``Fenced``), and a retried send answers with
its first outcome instead of running twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from servers import free_port
from turnline.server.auth import mint
from wsraw import RawWS, assert_gapless, text_of

ROOT = Path(__file__).resolve().parents[2]
TURNLINE = str(Path(sys.executable).with_name("turnline"))
SECRET = "cluster-test-secret-0123456789abcdef"
START_TIMEOUT = 30.0
TIMEOUT = 10.0
LOST_TIMEOUT = 30.0  # lease 1 s + reaper 0.2 s in these tests, on a busy machine


class Node:
    """One process: a gateway (``port``: it answers /healthz there), a worker, or redis."""

    def __init__(self, tmp: Path, name: str, cmd: list[str], env: dict[str, str], port: int = 0,
                 cwd: Path = ROOT):
        self.name = name
        self.port = port
        self.logfile = tmp / f"{name}.log"
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def output(self) -> str:
        return self.logfile.read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.proc.returncode}): {self.output()}")
            if self.port:
                try:
                    if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            elif "turnline worker " in self.output():
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} did not start: {self.output()}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc.poll() is None, self.output()
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(TIMEOUT) == -signal.SIGKILL

    def stop(self) -> bool:
        """SIGTERM, and SIGKILL if that did not stop it in time; False then."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return False
        return True


class Cluster:
    def __init__(self, tmp: Path, redis_url: str, prefix: str, *, lease_ms: int = 1000):
        self.tmp = tmp
        self.redis_url = redis_url
        self.prefix = prefix
        self.store = f"{redis_url}?prefix={prefix}"
        self.lease_ms = lease_ms
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
                    "PYTHONUNBUFFERED": "1", "TURNLINE_TEST_REDIS": redis_url, "TURNLINE_TEST_PREFIX": prefix}
        self.env.pop("TURNLINE_SECRET", None)
        self.nodes: list[Node] = []

    def start(self, gateways: int, workers: int) -> tuple[list[Node], list[Node]]:
        # One client sends tens of messages at once here, to one session: about routing, not limits
        # (those have their own tests: test_limits_cluster.py).
        raised = ["--max-turns-per-session", "64", "--send-burst", "200"]
        gws = [self._node(f"gateway{len(self.nodes) + i}", ["serve", "--store", self.store, "--secret", SECRET,
                                                             "--no-dev", "--log-level", "warning", *raised],
                          gateway=True)
               for i in range(gateways)]
        wks = [self._node(f"worker{len(self.nodes) + i}", [
            "worker", "--store", self.store, "--agent", "tests.cluster_agents:gated", "--lease-ms",
            str(self.lease_ms), "--reaper-ms", "200", "--log-level", "warning"]) for i in range(workers)]
        for node in gws + wks:
            node.wait_ready()
        return gws, wks

    def _node(self, name: str, args: list[str], gateway: bool = False) -> Node:
        port = free_port() if gateway else 0
        node = Node(self.tmp, name, [TURNLINE, *args, *(["--port", str(port)] if gateway else [])], self.env, port)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        hung = [node.name for node in self.nodes if not node.stop()]
        assert not hung, f"did not stop on SIGTERM: {hung}"

    def token(self, sub: str = "alice") -> str:
        return mint(SECRET, sub, {"*": ["subscribe", "publish", "cancel"]}, 600)

    # The test agent's controls (see tests/cluster_agents.py).

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.redis_url)

    async def release(self, r: aioredis.Redis, turn_id: str, tokens: int = 1, end: bool = False) -> None:
        values = ["go"] * tokens + (["end"] if end else [])
        await r.rpush(f"{self.prefix}:gate:{turn_id}", *values)

    async def ran(self, r: aioredis.Redis, turn_id: str) -> list[int]:
        return [int(p) for p in await r.lrange(f"{self.prefix}:ran:{turn_id}", 0, -1)]

    async def aborted(self, r: aioredis.Redis, turn_id: str) -> list[str]:
        return [a.decode() for a in await r.lrange(f"{self.prefix}:aborted:{turn_id}", 0, -1)]

    # What differs on a Redis Cluster (see OnRedisCluster).

    async def session(self, r: aioredis.Redis, name: str) -> str:
        """The session a test named ``name`` uses: on one Redis, that name."""
        return name

    async def hold_lease(self, r: aioredis.Redis, session: str, periods: int) -> None:
        """Watch the session's lease for ``periods`` lease periods: the same worker holds it all along."""
        key = f"{self.prefix}:{{{session}}}:lease"  # (RedisEventLog.key)
        holder = await r.get(key)
        assert holder is not None
        loop = asyncio.get_running_loop()
        until = loop.time() + periods * self.lease_ms / 1000
        while loop.time() < until:
            assert await r.get(key) == holder, "the lease was not renewed"
            await asyncio.sleep(0.05)


async def node_of(r: RedisCluster, key: str) -> tuple[str, int]:
    """The primary serving ``key``, as CLUSTER SLOTS tells it."""
    slot = key_slot(key.encode())
    slots = await r.cluster_slots()
    return next(node["primary"] for (first, last), node in slots.items() if first <= slot <= last)


class OnRedisCluster(Cluster):
    """The same processes, and the test's own client, on a Redis Cluster."""

    def __init__(self, tmp: Path, redis_url: str, prefix: str, **kwargs: Any):
        super().__init__(tmp, redis_url, prefix, **kwargs)
        self.env["TURNLINE_TEST_REDIS_CLUSTER"] = "1"

    def redis(self) -> RedisCluster:  # type: ignore[override]
        return RedisCluster.from_url(self.redis_url)

    def session_key(self, session: str) -> str:
        return f"{self.prefix}:{{{session}}}:log"  # (RedisEventLog.key: every key of a session has its slot)

    async def session(self, r: RedisCluster, name: str) -> str:  # type: ignore[override]
        """A session named ``name-<i>`` whose keys live on another node than the dispatch stream's."""
        queue = await node_of(r, f"{self.prefix}:dispatch")
        for i in range(64):
            if await node_of(r, self.session_key(f"{name}-{i}")) != queue:
                return f"{name}-{i}"
        raise AssertionError("every candidate session is on the dispatch stream's node")


STORES = ["redis", "redis-cluster"]


@contextlib.contextmanager
def new_cluster(request: pytest.FixtureRequest, tmp: Path) -> Iterator[Cluster]:
    """A Cluster on a fresh key prefix of a single Redis or of a Redis Cluster, as ``request.param`` says;
    its processes are stopped and its keys deleted afterwards."""
    from redis_server import scratch_prefix

    if request.param == "redis-cluster":
        url, kind = request.getfixturevalue("redis_cluster_url"), OnRedisCluster
    else:
        url, kind = request.getfixturevalue("redis_url"), Cluster
    with scratch_prefix(url) as prefix:
        c = kind(tmp, url, prefix)
        try:
            yield c
        finally:
            c.stop()


@pytest.fixture(params=STORES)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    with new_cluster(request, tmp_path) as c:
        yield c


@pytest.fixture(scope="module", params=STORES)
def two_by_two(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[Node], list[Node]]]:
    """2 gateways and 2 workers, shared by the tests that kill nothing."""
    with new_cluster(request, tmp_path_factory.mktemp(request.param)) as c:
        gateways, workers = c.start(gateways=2, workers=2)
        yield c, gateways, workers


def say(session: str, text: str, **fields: Any) -> dict[str, Any]:
    return {"op": "send", "session": session, "messages": [{"parts": [{"type": "text", "text": text}]}], **fields}


def deltas(ws: RawWS, session: str, turn_id: str) -> list[dict[str, Any]]:
    return [e for e in ws.find(session, "chunk", turn_id=turn_id) if e["chunk"]["type"] == "text-delta"]


async def test_a_new_turn_runs_on_exactly_one_worker(two_by_two: tuple[Cluster, list[Node], list[Node]]) -> None:
    cluster, (ga, gb), workers = two_by_two
    r = cluster.redis()
    token = cluster.token()
    async with asyncio.timeout(60):
        sessions = [f"one-{i}" for i in range(12)]
        if isinstance(cluster, OnRedisCluster):
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
        session = await cluster.session(r, "together")
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
        two_by_two: tuple[Cluster, list[Node], list[Node]]) -> None:
    cluster, (ga, gb), workers = two_by_two
    r = cluster.redis()
    token = cluster.token()
    async with asyncio.timeout(60):
        session = await cluster.session(r, "cancel-across")
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
        # renewing the lease (on a cluster, on the session's node, not the dispatch stream's).
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


async def test_killed_worker_turn_ends_worker_lost_and_queue_moves_on(cluster: Cluster) -> None:
    (gw,), workers = cluster.start(gateways=1, workers=2)
    r = cluster.redis()
    async with asyncio.timeout(90):
        session = await cluster.session(r, "lost-worker")
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
        assert "worker" in end["error"]["message"]
        assert text_of(end["message"]) == "w0 w1 "  # what was streamed is kept
        # The queued message was in the log: the other worker runs it.
        after = await ws.turn_end(session, queued_turn, TIMEOUT)
        assert after["reason"] == "complete" and text_of(after["message"]) == "quick answer"
        assert await cluster.ran(r, queued_turn) == [survivor.pid]
        assert_gapless(ws.events[session])
        assert [e["turn_id"] for e in ws.find(session, "turn-end")] == [turn, queued_turn]
        await ws.close()
    await r.aclose()


async def test_killed_gateway_client_resumes_through_another(cluster: Cluster) -> None:
    (ga, gb), _ = cluster.start(gateways=2, workers=1)
    r = cluster.redis()
    token = cluster.token()
    session = "lost-gateway"
    async with asyncio.timeout(60):
        a = await RawWS.open(ga.ws, token)
        await a.subscribe(session)
        turn = (await a.ok(say(session, "slow story")))["turn_ids"][0]
        await cluster.release(r, turn, 3)
        await a.wait_until(lambda: len(deltas(a, session, turn)) == 3, TIMEOUT, "3 tokens")
        queued = await a.ok(say(session, "quick, after the story", policy="queue"))
        (queued_turn,) = queued["queued"]
        await a.wait_until(lambda: a.find(session, "queued"), TIMEOUT, "the queued event")
        ga.kill()
        await a.wait_until(lambda: a.closed is not None, TIMEOUT, "the drop")
        before = list(a.events[session])

        b = await RawWS.open(gb.ws, token)
        await b.subscribe(session, after=before[-1]["seq"])
        await cluster.release(r, turn, 2, end=True)
        end = await b.turn_end(session, turn, TIMEOUT)
        assert end["reason"] == "complete" and text_of(end["message"]) == "w0 w1 w2 w3 w4 "
        await b.turn_end(session, queued_turn, TIMEOUT)
        resumed = before + b.events[session]
        assert_gapless(resumed)  # no gap, no duplicate across the two gateways

        c = await RawWS.open(gb.ws, token)
        await c.subscribe(session, after=0)
        await c.wait_until(lambda: len(c.events[session]) >= len(resumed), TIMEOUT, "the replay")
        # Everything the client got, from either gateway, is the log, byte for byte.
        assert [json.dumps(e) for e in c.events[session][:len(resumed)]] == [json.dumps(e) for e in resumed]
        # Both acknowledged sends are in it.
        assert {e["turn_id"] for e in c.find(session, "turn-start")} == {turn, queued_turn}
        for ws in (b, c):
            await ws.close()
    await r.aclose()


@contextlib.asynccontextmanager
async def two_workers(redis_url: str, prefix: str, agent: Any,
                      **config: Any) -> AsyncIterator[tuple[Any, Any, Any]]:
    """In-process: a store and two workers on it, their loops not started, so
    the test decides when a lease is lost and when each worker acts."""
    from turnline.agent import Runtime, as_agent
    from turnline.agent.cluster import ClusterConfig, ClusterWorker
    from turnline.store.redis import RedisEventLog

    store = RedisEventLog(redis_url, prefix=prefix)
    await store.open()
    wa = ClusterWorker(Runtime(store, as_agent(agent)), store, ClusterConfig(lease_ms=60_000, **config))
    wb = ClusterWorker(Runtime(store, as_agent(agent)), store, ClusterConfig(lease_ms=60_000, **config))
    try:
        yield store, wa, wb
    finally:
        await wa.close()
        await wb.close()
        await store.close()


def send_command(rid: str, session: str, message_id: str, turn_id: str) -> Any:
    from turnline.agent.cluster import Command

    return Command(rid=rid, gw="gw-test", session=session, op="send",
                   args={"requester": "alice", "turn_id": turn_id,
                         "messages": [{"id": message_id, "parts": [{"type": "text", "text": "hi"}]}]})


async def test_a_command_for_another_workers_session_goes_to_that_worker(redis_url: str, redis_prefix: str) -> None:
    from turnline.agent.cluster import decode_command

    async def agent(turn: Any) -> Any:
        yield "hello"

    session = "forwarded"
    async with two_workers(redis_url, redis_prefix, agent) as (store, wa, wb), asyncio.timeout(30):
        first = await wa.handle(send_command("req-1", session, "m1", "turn-1"))
        assert first is not None and first.result["started"] == ["turn-1"], first
        # B reads the next command from the dispatch stream; A holds the lease,
        # so B neither loads the session nor runs it: it hands it to A.
        assert await wb.handle(send_command("req-2", session, "m2", "turn-2")) is None
        assert session not in wb.owned and wb.runtime.loaded(session) is None
        ((_, fields),) = await wa.bus.redis.xrange(wa.bus.inbox(wa.id))
        forwarded = decode_command(fields[b"m"])
        assert (forwarded.rid, forwarded.hops) == ("req-2", 1)
        second = await wa.handle(forwarded)
        assert second is not None and second.result["started"] == ["turn-2"], second
        log = [json.loads(r.data) for r in await store.read(session)]
        assert [e["turn_id"] for e in log if e["type"] == "turn-start"] == ["turn-1", "turn-2"]


async def test_an_idle_session_is_let_go_and_moves_to_another_worker(redis_url: str, redis_prefix: str) -> None:
    async def agent(turn: Any) -> Any:
        yield "hello"

    session = "idle"
    async with two_workers(redis_url, redis_prefix, agent, idle_release_s=0) as (store, wa, wb), \
            asyncio.timeout(30):
        first = await wa.handle(send_command("req-1", session, "m1", "turn-1"))
        assert first is not None and first.result["started"] == ["turn-1"], first
        hub = wa.runtime.loaded(session)
        assert hub is not None
        await asyncio.gather(*hub._tasks.values())  # the turn ran to its end
        await hub.emit([])  # and all of it is stored
        await wa.renew()  # idle now: noted
        assert session in wa.owned
        await wa.renew()  # idle for idle_release_s (0): let go
        assert session not in wa.owned and wa.runtime.loaded(session) is None
        await asyncio.gather(*wa._work)
        assert await wa.bus.redis.get(store.key(session, "lease")) is None
        assert await wa.bus.redis.zscore(wa.bus.owned, session) is None
        # The next command is B's to take.
        second = await wb.handle(send_command("req-2", session, "m2", "turn-2"))
        assert second is not None and second.result["started"] == ["turn-2"], second
        assert (await wb.bus.owner(session)) == wb.id


async def test_a_worker_that_lost_its_lease_cannot_write(redis_url: str, redis_prefix: str) -> None:
    from turnline.store.redis import Fenced

    gate = asyncio.Event()
    streaming = asyncio.Event()

    async def agent(turn: Any) -> Any:
        yield "before "
        streaming.set()
        await gate.wait()
        yield "after"
        await asyncio.Event().wait()  # still running when its write is refused

    session = "fenced"
    send = send_command("req-1", session, "m1", "turn-1")
    async with two_workers(redis_url, redis_prefix, agent) as (store, wa, wb), asyncio.timeout(30):
        try:
            first = await wa.handle(send)
            assert first is not None and first.result["started"] == ["turn-1"], first
            await streaming.wait()
            async for batch in store.follow(session, 0):  # A's first token is stored
                if any(b'"text-delta"' in r.data for r in batch):
                    break
            hub_a = wa.runtime.loaded(session)
            assert hub_a is not None
            turn_a = hub_a.turns["turn-1"]

            # A stalls past its lease: the lease expires and B takes the session.
            await wa.bus.redis.delete(store.key(session, "lease"))
            assert await wb._own(session) is not None
            async for batch in store.follow(session, 0):  # recovery, written by B
                if any(json.loads(r.data)["type"] == "turn-end" for r in batch):
                    break

            # A wakes up and writes its next token: refused by the fence.
            gate.set()
            assert await turn_a.abort_signal == "store_failed"
            assert isinstance(hub_a.broken, Fenced)
            await wa.renew()
            assert session not in wa.owned

            log = [json.loads(r.data) for r in await store.read(session)]
            ends = [e for e in log if e["type"] == "turn-end"]
            assert len(ends) == 1 and ends[0]["error"]["code"] == "worker_lost", ends
            assert text_of(ends[0]["message"]) == "before "
            assert not any(e["type"] == "chunk" and e["seq"] > ends[0]["seq"] for e in log)

            # The gateway, unsure the send ran, retries it: now B answers it,
            # with the first outcome, and no second turn starts.
            again = await wb.handle(send)
            assert again is not None and again.result == first.result
            log = [json.loads(r.data) for r in await store.read(session)]
            assert [e["turn_id"] for e in log if e["type"] == "turn-start"] == ["turn-1"]
        finally:
            gate.set()


async def test_a_retried_cancel_is_answered_from_the_log_and_stops_nothing_new(
        redis_url: str, redis_prefix: str) -> None:
    from turnline.agent.cluster import Command

    async def agent(turn: Any) -> Any:
        yield "working"
        await asyncio.Event().wait()  # runs until cancelled

    session = "cancel-retry"
    cancel = Command(rid="req-c", gw="gw-test", session=session, op="cancel",
                     args={"requester": "alice", "request_id": "cancel-1"})
    async with two_workers(redis_url, redis_prefix, agent) as (store, wa, wb), asyncio.timeout(30):
        assert (await wa.handle(send_command("req-1", session, "m1", "turn-1"))).result["started"] == ["turn-1"]
        first = await wa.handle(cancel)
        assert first is not None and first.result["cancelled"] == ["turn-1"], first

        # A dies before its answer reaches the gateway; B takes the session
        # and alice sends again, on another device.
        await wa.bus.redis.delete(store.key(session, "lease"))
        second = await wb.handle(send_command("req-2", session, "m2", "turn-2"))
        assert second is not None and second.result["started"] == ["turn-2"], second

        # The gateway, unsure the cancel ran, retries it: B answers with the
        # first outcome, and the new turn runs on.
        again = await wb.handle(cancel)
        assert again is not None and again.result["cancelled"] == ["turn-1"], again
        assert again.result["request_id"] == "cancel-1"
        hub_b = wb.runtime.loaded(session)
        assert hub_b is not None and "turn-2" in hub_b.state.active
        assert hub_b.state.active["turn-2"].cancel is None
        log = [json.loads(r.data) for r in await store.read(session)]
        assert [e["request_id"] for e in log if e["type"] == "cancel"] == ["cancel-1"]


def test_the_multinode_example_runs(tmp_path: Path) -> None:
    """examples/multinode: every Procfile line started as honcho would (with
    .env, on free ports), then its demo: stopped on the other gateway, the
    saved answer equals that screen."""
    example = ROOT / "examples" / "multinode"
    env = dict(os.environ)
    for line in (example / ".env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    env.update(REDIS_PORT=str(free_port()), GATEWAY1_PORT=str(free_port()), GATEWAY2_PORT=str(free_port()),
               REDIS_DIR=str(tmp_path), PATH=os.pathsep.join([str(Path(TURNLINE).parent), env["PATH"]]),
               PYTHONPATH=str(ROOT / "src"))
    procs: list[Node] = []
    try:
        for line in (example / "Procfile").read_text().splitlines():
            if line and not line.startswith("#"):
                name, _, command = line.partition(":")
                port = int(env[f"{name.upper()}_PORT"]) if name.startswith("gateway") else 0
                procs.append(Node(tmp_path, name, ["sh", "-c", f"exec {command.strip()}"], env, port, example))
        for node in procs:
            if node.name != "redis":
                node.wait_ready()
        done = subprocess.run([sys.executable, "demo.py"], cwd=example, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "turn ended: cancelled" in done.stdout, done.stdout
        assert "history == laptop screen: yes" in done.stdout, done.stdout
    finally:
        for node in procs:
            node.stop()
