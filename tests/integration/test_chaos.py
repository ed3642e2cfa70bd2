"""Chaos: many nodes, clients that drop and resume at random, and the log as the judge.

Real processes on the test Redis: three gateways (``turnline serve --store
redis://…``) and two workers (``turnline worker --agent test_chaos:agent``).
Clients (raw WebSockets, see wsraw.py) follow a few sessions. Each client, in a
loop of cycles:

- connects to a random gateway (directly, or through a relay that cuts the
  connection in the middle of a WebSocket frame once a random number of bytes
  went by) and subscribes with ``after=`` the last seq it received;
- sometimes sends a message (with its own message id, a random policy among
  concurrent, queue and interrupt, and a random answer length) and sometimes a
  cancel (own turns, or a running turn by id);
- receives for a while, then is cut: the socket aborted without a closing
  handshake, a polite close, or the relay's mid-frame cut; a send whose ack was
  lost is sent again (same message id) on the next connection.

At the end every turn must have ended, and each client's event list, its
folded view and every acknowledged message must agree with the log read
directly from Redis: no gap, no duplicate, every turn ended exactly once.

The random seed is printed and can be set with ``CHAOS_SEED``; the short
version runs ``CHAOS_SECONDS`` (default 10) of cycles, the soak version
(``make soak``) ``CHAOS_CYCLES`` cycles (default 3000) and kills a worker with
SIGKILL and restarts it every few seconds. The seed fixes every choice the
clients make; the interleaving with the servers is still the machine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import msgspec
import pytest

from servers import free_port
from websockets.exceptions import ConnectionClosed
from turnline.client.view import View
from turnline.protocol import decode_event
from turnline.server.auth import mint
from wsraw import RawWS

TOKEN_INTERVAL_S = 0.004


async def agent(turn: Any) -> AsyncIterator[str]:
    """What the workers run: ``chaos N`` streams N numbered tokens."""
    text = "".join(p.get("text", "") for p in turn.input.parts if p.get("type") == "text")
    words = text.split()
    count = int(words[1]) if len(words) == 2 and words[0] == "chaos" and words[1].isdigit() else 2
    for i in range(count):
        await asyncio.sleep(TOKEN_INTERVAL_S)
        yield f"{i} "


ROOT = Path(__file__).resolve().parents[2]
TURNLINE = str(Path(sys.executable).with_name("turnline"))
SECRET = "chaos-test-secret-0123456789abcdef0123"
START_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 30.0  # a reply that takes longer is a failure, not a slow machine
SETTLE_TIMEOUT_S = 60.0  # every turn ends: worker_lost after a kill takes lease + reaper
POLICIES = ("concurrent", "queue", "interrupt")


# ------------------------------------------------------------------ processes


class Node:
    """One ``turnline`` process, its output in a file."""

    def __init__(self, name: str, args: list[str], tmp: Path):
        self.name = name
        self.args = args
        self.tmp = tmp
        self.proc: asyncio.subprocess.Process | None = None
        self.runs = 0
        self.port = 0

    @property
    def log_path(self) -> Path:
        return self.tmp / f"{self.name}-{self.runs}.log"

    async def start(self) -> None:
        self.runs += 1
        # This checkout's code, and this directory for ``--agent test_chaos:agent``.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "integration"),
                                                           str(ROOT / "tests")]), "PYTHONUNBUFFERED": "1"}
        env.pop("TURNLINE_SECRET", None)
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                TURNLINE, *self.args, cwd=ROOT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill9(self) -> None:
        assert self.proc is not None and self.alive(), self.output()
        self.proc.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                print(f"{self.name} did not stop within 10 s of SIGTERM: killed")
                self.proc.kill()
                await self.proc.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


class Cluster:
    def __init__(self, store_url: str, tmp: Path):
        self.store_url = store_url
        self.tmp = tmp
        self.gateways: list[Node] = []
        self.workers: list[Node] = []

    async def start(self, gateways: int, workers: int) -> None:
        common = ["--log-level", "warning"]
        for i in range(gateways):
            node = Node(f"gateway-{i}", [], self.tmp)
            node.port = free_port()
            # Clients here send and cancel as fast as chaos picks; limits have their own tests (test_limits*.py).
            node.args = ["serve", "--store", self.store_url, "--port", str(node.port), "--secret", SECRET,
                         "--no-dev", "--max-turns-per-session", "1000", "--send-burst", "1000",
                         "--cancel-burst", "1000", *common]
            self.gateways.append(node)
        for i in range(workers):
            self.workers.append(Node(f"worker-{i}", ["worker", "--store", self.store_url, "--agent",
                                                     "test_chaos:agent", "--policy", "concurrent", *common],
                                     self.tmp))
        await asyncio.gather(*(n.start() for n in self.gateways + self.workers))
        await asyncio.gather(*(self._healthy(n) for n in self.gateways), *(self._ready(n) for n in self.workers))

    async def start_worker(self, node: Node) -> None:
        await node.start()
        await self._ready(node)

    @staticmethod
    async def _ready(node: Node) -> None:
        """A worker says so once it reads commands."""
        async with asyncio.timeout(START_TIMEOUT_S):
            while "turnline worker " not in node.output():
                if not node.alive():
                    pytest.fail(f"{node.name} exited: {node.output()}")
                await asyncio.sleep(0.05)

    async def _healthy(self, node: Node) -> None:
        async with httpx.AsyncClient(timeout=1.0) as client:
            async with asyncio.timeout(START_TIMEOUT_S):
                while True:
                    if not node.alive():
                        pytest.fail(f"{node.name} exited: {node.output()}")
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get(f"http://127.0.0.1:{node.port}/healthz")).status_code == 200:
                            return
                    await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.gateways + self.workers))

    def outputs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.output()}" for n in self.gateways + self.workers)


class MidFrameCutter:
    """A relay for one WebSocket connection to a gateway that cuts it in the
    middle of a frame: it forwards the server's bytes until ``budget`` of them
    went by, writes only the part of the next read that fits, and aborts both
    sides (no FIN flush, no closing handshake)."""

    def __init__(self, target_port: int, budget: int):
        self.target_port = target_port
        self.budget = budget
        self.cut = False
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> MidFrameCutter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        assert self._server is not None
        self._server.close()  # one connection only
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers = [client_w, server_w]
        self._tasks = [asyncio.ensure_future(self._pump(client_r, server_w, budget=False)),
                       asyncio.ensure_future(self._pump(server_r, client_w, budget=True))]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: bool) -> None:
        try:
            while not self.cut:
                data = await reader.read(65536)
                if not data:
                    break
                if budget:
                    if len(data) >= self.budget:
                        writer.write(data[:self.budget])
                        self.abort()
                        return
                    self.budget -= len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        if not self.cut:
            self.cut = True
            for w in self._writers:
                w.transport.abort()

    async def close(self) -> None:
        self.abort()
        if self._server is not None:
            self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ------------------------------------------------------------------ clients


@dataclass
class Stats:
    cycles: int = 0
    cuts: Counter[str] = field(default_factory=Counter)
    sends: int = 0
    resends: int = 0
    cancels: int = 0
    events: int = 0
    worker_kills: int = 0
    turn_ends: Counter[str] = field(default_factory=Counter)  # reason, or error code
    chaos_s: float = 0.0
    settle_s: float = 0.0


@dataclass
class Client:
    name: str
    session: str
    rng: random.Random
    token: str
    events: list[dict[str, Any]] = field(default_factory=list)  # every event received, in order
    connections: int = 0
    sends: dict[str, dict[str, Any]] = field(default_factory=dict)  # message id → its send frame
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)  # message id → ack or error reply
    unanswered: list[str] = field(default_factory=list)  # sends whose reply was lost in a cut
    counter: int = 0

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"] if self.events else 0

    def take(self, got: list[dict[str, Any]], after: int) -> None:
        """Events of one connection, subscribed with ``after``: they must
        continue the list exactly (checked as they come, so a failure names
        the connection)."""
        seqs = [e["seq"] for e in got]
        expected = list(range(after + 1, after + 1 + len(got)))
        assert seqs == expected, (f"{self.name} (connection {self.connections}, after={after}): "
                                  f"got seqs {seqs[:10]}…, expected {expected[:10]}…")
        self.events.extend(got)

    def running_turns(self) -> list[str]:
        started, ended = [], set()
        for e in self.events:
            if e["type"] == "turn-start":
                started.append(e["turn_id"])
            elif e["type"] == "turn-end":
                ended.add(e["turn_id"])
        return [t for t in started if t not in ended]

    def new_send(self) -> dict[str, Any]:
        self.counter += 1
        mid = f"m-{self.name}-{self.counter}"
        frame = {"op": "send", "session": self.session, "id": f"send:{mid}",
                 "policy": self.rng.choice(POLICIES),
                 "messages": [{"id": mid, "parts": [{"type": "text",
                                                     "text": f"chaos {self.rng.randint(1, 40)}"}]}]}
        self.sends[mid] = frame
        return frame


async def cycle(client: Client, cluster: Cluster, stats: Stats, previous: list[int]) -> None:
    rng = client.rng
    choices = [i for i in range(len(cluster.gateways)) if i not in previous[-1:]] or [0]
    gw = cluster.gateways[rng.choice(choices)]
    previous.append(cluster.gateways.index(gw))
    how = rng.choice(["abort", "abort", "midframe", "close"])
    cutter = None
    port = gw.port
    if how == "midframe":
        cutter = await MidFrameCutter(gw.port, rng.randint(100, 6000)).start()
        port = cutter.port
    after = client.last_seq
    client.connections += 1
    try:
        ws = await RawWS.open(f"ws://127.0.0.1:{port}/v1/ws", client.token)
    except Exception:
        if cutter is None or not cutter.cut:
            raise
        await cutter.close()  # it cut the opening handshake: nothing was received
        stats.cuts["handshake"] += 1
        stats.cycles += 1
        return
    sub_id = f"sub-{client.connections}"
    # A send whose reply was lost goes again, under the same message id;
    # a frame counts as pending before it is written (a cut may fail the write).
    pending = {client.sends[mid]["id"]: mid for mid in client.unanswered}
    client.unanswered = []
    try:
        try:
            await ws.send({"op": "subscribe", "id": sub_id, "session": client.session, "after": after})
            for fid in list(pending):
                await ws.send(client.sends[pending[fid]])
                stats.resends += 1
            if rng.random() < 0.5:
                frame = client.new_send()
                pending[frame["id"]] = frame["messages"][0]["id"]
                await ws.send(frame)
                stats.sends += 1
            if rng.random() < 0.2:
                running = client.running_turns()
                flt = {"turn_id": rng.choice(running)} if running and rng.random() < 0.5 else {"own": True}
                await ws.send({"op": "cancel", "session": client.session, "filter": flt, "seen": client.last_seq})
                stats.cancels += 1
        except ConnectionClosed:
            # The cutter may strike right after the handshake (its budget
            # ended exactly there), before the first frame is written.
            if cutter is None or not cutter.cut:
                raise
        # Receive a random number of events (or for a short random while: a quiet session).
        want = rng.randint(0, 60)
        awaited = [sub_id, *pending] if rng.random() < 0.7 else [sub_id]
        with contextlib.suppress(TimeoutError, AssertionError):  # AssertionError: the cutter struck first
            await ws.wait_until(lambda: len(ws.events[client.session]) >= want
                                and all(f in ws.replies for f in awaited), rng.uniform(0.05, 0.6), "events")
        if how == "close":
            await ws.close()
        elif cutter is not None:
            await cutter.close()
            with contextlib.suppress(Exception):
                await ws.abort()
        else:
            await ws.abort()
        stats.cuts[how] += 1
    finally:
        if cutter is not None:
            await cutter.close()
        if ws.closed is None:
            with contextlib.suppress(Exception):
                await ws.abort()
    for fid, mid in pending.items():
        reply = ws.replies.get(fid)
        if reply is None:
            client.unanswered.append(mid)
        else:
            assert reply["op"] == "ack" or reply["code"] == "conflict", f"{client.name}: {reply}"
            client.acked.setdefault(mid, reply)
    sub = ws.replies.get(sub_id)
    got = ws.events[client.session]
    if sub is None:
        assert not got, f"{client.name}: events before the subscribe ack"
    else:
        assert sub["op"] == "ack", sub
        client.take(got, after)
        stats.events += len(got)
    stats.cycles += 1


async def catch_up(client: Client, cluster: Cluster, target: int) -> None:
    """A last, quiet connection through a random gateway, until the log's end;
    the sends still unanswered go again."""
    gw = client.rng.choice(cluster.gateways)
    after = client.last_seq
    async with await RawWS.open(f"ws://127.0.0.1:{gw.port}/v1/ws", client.token) as ws:
        await ws.ok({"op": "subscribe", "session": client.session, "after": after}, REPLY_TIMEOUT_S)
        for mid in client.unanswered:
            reply = await ws.request(client.sends[mid], REPLY_TIMEOUT_S)
            assert reply["op"] == "ack" or reply["code"] == "conflict", f"{client.name}: {reply}"
            client.acked.setdefault(mid, reply)
        client.unanswered = []
        if target > after:
            await ws.wait_until(lambda: ws.events[client.session] and ws.events[client.session][-1]["seq"] >= target,
                                REPLY_TIMEOUT_S, f"{client.name} to reach seq {target}")
        client.take(ws.events[client.session], after)


# ------------------------------------------------------------------ the judge


@contextlib.asynccontextmanager
async def log_reader(store_url: str) -> AsyncIterator[Any]:
    """The event log, read straight from Redis (not through a gateway)."""
    from turnline.store.redis import RedisEventLog

    log = RedisEventLog(store_url)
    await log.open()
    try:
        yield log
    finally:
        await log.close()


async def settled_log(store: Any, session: str) -> list[dict[str, Any]]:
    """The session's log once every turn in it has ended and nothing is queued
    (then nothing more is appended). Bounded wait."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        events = [json.loads(r.data) for r in await store.read(session, 0)]
        judge_additions(session, events)
        core = fold(events).core
        if not core.active and not core.queue:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"{session}: not settled after {SETTLE_TIMEOUT_S:g} s: turns "
                                 f"{list(core.active)} still running, {len(core.queue)} queued")
        await asyncio.sleep(0.1)


def fold(events: list[dict[str, Any]]) -> View:
    view = View("chaos")
    view.apply_all(decode_event(json.dumps(e)) for e in events)
    return view


def folded(view: View) -> dict[str, Any]:
    """Everything a screen derives from the events: every message as
    displayed, the displayed branch, and each turn's end."""
    return {
        "messages": {mid: msgspec.to_builtins(view.message(mid)) for mid in view.core.messages},
        "branch": [m.id for m in view.messages()],
        "turns": {t: view.core.turns[t].reason for t in view.core.turns},
    }


def judge_additions(session: str, log: list[dict[str, Any]]) -> None:
    """What holds at any time, settled or not: gapless, each message added (or queued) once."""
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1)), f"{session}: the log has a gap"
    messages = Counter(e["message"]["id"] for e in log if e["type"] == "message")
    assert all(n == 1 for n in messages.values()), f"{session}: a message added twice: {messages.most_common(3)}"
    queued = Counter(e["message_id"] for e in log if e["type"] == "queued")
    assert all(n == 1 for n in queued.values()), f"{session}: a message queued twice: {queued.most_common(3)}"


def judge_log(session: str, log: list[dict[str, Any]]) -> None:
    judge_additions(session, log)
    starts = Counter(e["turn_id"] for e in log if e["type"] == "turn-start")
    ends = Counter(e["turn_id"] for e in log if e["type"] == "turn-end")
    assert all(n == 1 for n in starts.values()), f"{session}: a turn started twice: {starts.most_common(3)}"
    assert ends == starts, f"{session}: turns not ended exactly once: {(ends - starts) or (starts - ends)}"
    ended: set[str] = set()
    for e in log:
        if e["type"] == "turn-end":
            ended.add(e["turn_id"])
        elif e["type"] == "chunk":
            assert e["turn_id"] not in ended, f"{session}: seq {e['seq']}: a chunk after its turn ended"


def judge_client(client: Client, log: list[dict[str, Any]], log_view: dict[str, Any]) -> None:
    assert client.events == log, (f"{client.name}: its events differ from the log "
                                  f"({len(client.events)} vs {len(log)} events)")
    assert folded(fold(client.events)) == log_view, f"{client.name}: its folded view differs from the log's"
    # An ack, or a conflict answering a re-send, says the message was taken: the log shows it.
    placed = {e["message"]["id"] for e in log if e["type"] == "message"}
    placed |= {e["message_id"] for e in log if e["type"] in ("queued", "rejected")}
    for mid, reply in client.acked.items():
        assert mid in placed, f"{client.name}: message {mid} was answered {reply} but is not in the log"


# ------------------------------------------------------------------ the run


@contextlib.asynccontextmanager
async def running_cluster(store_url: str, tmp: Path, gateways: int = 3, workers: int = 2) -> AsyncIterator[Cluster]:
    cluster = Cluster(store_url, tmp)
    try:
        await cluster.start(gateways, workers)
        yield cluster
    finally:
        await cluster.stop()


async def chaos(cluster: Cluster, store_url: str, seed: int, *, sessions: int, clients_per_session: int,
                seconds: float | None = None, cycles: int | None = None, kill_workers: bool = False) -> Stats:
    master = random.Random(seed)
    stats = Stats()
    clients = []
    for s in range(sessions):
        for c in range(clients_per_session):
            name = f"c{s}x{c}"
            clients.append(Client(name, f"chaos-{seed}-{s}", random.Random(master.random()),
                                  mint(SECRET, name, {"*": ["subscribe", "publish", "cancel"]}, 3600)))
    deadline = time.monotonic() + seconds if seconds is not None else None

    def more() -> bool:
        if cycles is not None and stats.cycles >= cycles:
            return False
        return deadline is None or time.monotonic() < deadline

    async def run_client(client: Client) -> None:
        previous: list[int] = []
        while more():
            await cycle(client, cluster, stats, previous)

    async def killer() -> None:
        krng = random.Random(master.random())
        while more():
            await asyncio.sleep(krng.uniform(2.0, 5.0))
            if not more():
                return
            node = krng.choice(cluster.workers)
            await node.kill9()
            stats.worker_kills += 1
            await cluster.start_worker(node)

    started = time.monotonic()
    tasks = [asyncio.ensure_future(run_client(c)) for c in clients]
    if kill_workers:
        tasks.append(asyncio.ensure_future(killer()))
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    stats.chaos_s = round(time.monotonic() - started, 1)
    async with log_reader(store_url) as store:
        for s in sorted({c.session for c in clients}):
            mine = [c for c in clients if c.session == s]
            # The catch-up re-sends what is still unanswered, which may start
            # more turns: once the log settled again, a second catch-up.
            for _ in range(2):
                log = await settled_log(store, s)
                end = log[-1]["seq"] if log else 0
                await asyncio.gather(*(catch_up(c, cluster, end) for c in mine if c.unanswered or c.last_seq < end))
            judge_log(s, log)
            stats.turn_ends.update((e.get("error") or {}).get("code", e["reason"]) for e in log
                                   if e["type"] == "turn-end")
            log_view = folded(fold(log))
            for c in mine:
                judge_client(c, log, log_view)
    stats.settle_s = round(time.monotonic() - started - stats.chaos_s, 1)
    return stats


def _seed() -> int:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"chaos seed: {seed} (CHAOS_SEED={seed} repeats the clients' choices)")
    return seed


async def test_chaos_short(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    seed = _seed()
    store_url = f"{redis_url}/0?prefix={redis_prefix}"
    async with running_cluster(store_url, tmp_path) as cluster:
        try:
            stats = await chaos(cluster, store_url, seed, sessions=3, clients_per_session=3,
                                seconds=float(os.environ.get("CHAOS_SECONDS", "10")))
        except BaseException:
            print(cluster.outputs())
            raise
    print(f"seed {seed}: {stats}")
    assert stats.cycles > 0 and stats.events > 0, stats


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_chaos_soak(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    seed = _seed()
    store_url = f"{redis_url}/0?prefix={redis_prefix}"
    async with running_cluster(store_url, tmp_path) as cluster:
        try:
            stats = await chaos(cluster, store_url, seed, sessions=6, clients_per_session=3,
                                cycles=int(os.environ.get("CHAOS_CYCLES", "3000")), kill_workers=True)
        except BaseException:
            print(cluster.outputs())
            raise
    print(f"seed {seed}: {stats}")
    assert stats.worker_kills > 0, stats
