"""load: memory per WebSocket connection, per subscribed session, per idle
loaded session and per active turn of one `turnline serve` (SQLite store), and
the sessions × subscribers it sustains with every view checked.

Memory is the server process's RSS (/proc/PID/status, VmRSS) before and after
opening N of a thing, divided by N; each kind is measured on a fresh server so
one measurement's freed memory does not hide the next one's. RSS includes
allocator slack, so the figures are upper bounds of what each thing holds.

``python -m bench load [--quick]``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from bench._common import print_table, save, token, turnline_server

AGENT = "bench.load:agent"


async def agent(turn: Any):
    """``hold``: one word, then streams nothing until cancelled; ``N``: N words at full speed."""
    text = "".join(p.get("text", "") for p in turn.input.parts if p.get("type") == "text")
    if text == "hold":
        yield "held "
        await asyncio.Event().wait()
        return
    for i in range(int(text)):
        await asyncio.sleep(0)
        yield f"w{i} "


def server_pid(port: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in cmd and str(port).encode() in cmd:
                return int(entry.name)
    raise RuntimeError(f"no turnline serve on port {port}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Client:
    """One WebSocket: requests by id, events counted and checked per session."""

    def __init__(self, ws: Any):
        self.ws = ws
        self.ids = itertools.count(1)
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.last: dict[str, int] = {}
        self.ended: dict[str, set[str]] = {}
        self.bad = 0  # a gap or a duplicate
        self.received = 0
        self.changed = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port: int, sub: str) -> Client:
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws", additional_headers={"Authorization": f"Bearer {token(sub)}"},
                           max_size=None, ping_interval=None)
        return cls(ws)

    async def _read(self) -> None:
        async for raw in self.ws:
            f = json.loads(raw)
            if f["op"] in ("event", "events"):
                for e in [f["event"]] if f["op"] == "event" else f["events"]:
                    s = f["session"]
                    if e["seq"] != self.last.get(s, 0) + 1:
                        self.bad += 1
                    self.last[s] = e["seq"]
                    self.received += 1
                    if e["type"] == "turn-end":
                        self.ended.setdefault(s, set()).add(e["turn_id"])
                self.changed.set()
            elif f.get("id") in self.replies:
                self.replies.pop(f["id"]).set_result(f)

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        fid = f"r{next(self.ids)}"
        fut = asyncio.get_running_loop().create_future()
        self.replies[fid] = fut
        await self.ws.send(json.dumps({**frame, "id": fid}))
        reply = await asyncio.wait_for(fut, 120)
        if reply["op"] != "ack":
            raise RuntimeError(reply)
        return reply

    async def wait_ended(self, session: str, turn_id: str) -> None:
        async with asyncio.timeout(300):
            while turn_id not in self.ended.get(session, ()):
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        await self.ws.close()
        self.reader.cancel()


def send(session: str, text: str) -> dict[str, Any]:
    return {"op": "send", "session": session, "messages": [{"parts": [{"type": "text", "text": text}]}]}


async def settle(pid: int) -> int:
    await asyncio.sleep(0.5)  # let the server finish what it was doing (nothing is timed here)
    return rss_kib(pid)


async def per_connection_and_subscription(port: int, pid: int, n: int) -> tuple[float, float]:
    warm = await Client.open(port, "warm")
    await warm.request({"op": "subscribe", "session": "warm", "after": 0})
    turn = (await warm.request(send("warm", "5")))["turn_ids"][0]
    await warm.wait_ended("warm", turn)
    base = await settle(pid)
    clients = [await Client.open(port, f"c{i}") for i in range(n)]
    await asyncio.gather(*(c.ws.ping() for c in clients))
    connected = await settle(pid)
    await asyncio.gather(*(c.request({"op": "subscribe", "session": f"s{i}", "after": 0})
                           for i, c in enumerate(clients)))
    subscribed = await settle(pid)
    for c in clients + [warm]:
        await c.close()
    return (connected - base) * 1024 / n, (subscribed - connected) * 1024 / n


async def per_idle_session(port: int, pid: int, n: int, tokens: int = 20) -> float:
    clients = [await Client.open(port, f"w{i}") for i in range(10)]
    first = [f"warm-{i}" for i in range(10)]
    await _complete(clients, first, tokens)
    base = await settle(pid)
    await _complete(clients, [f"idle-{i}" for i in range(n)], tokens)
    for c in clients:
        await c.close()
    return (await settle(pid) - base) * 1024 / n


async def _complete(clients: list[Client], sessions: list[str], tokens: int) -> None:
    for batch in range(0, len(sessions), 200):
        part = sessions[batch:batch + 200]
        pairs = [(clients[i % len(clients)], s) for i, s in enumerate(part)]
        await asyncio.gather(*(c.request({"op": "subscribe", "session": s, "after": 0}) for c, s in pairs))
        acks = await asyncio.gather(*(c.request(send(s, str(tokens))) for c, s in pairs))
        await asyncio.gather(*(c.wait_ended(s, a["turn_ids"][0]) for (c, s), a in zip(pairs, acks)))
        await asyncio.gather(*(c.request({"op": "unsubscribe", "session": s}) for c, s in pairs))


async def per_active_turn(port: int, pid: int, n: int) -> float:
    c = await Client.open(port, "holder")
    await c.request({"op": "subscribe", "session": "active-0", "after": 0})
    await c.request(send("active-0", "hold"))
    base = await settle(pid)
    await asyncio.gather(*(c.request(send("active-0", "hold")) for _ in range(n)))
    held = await settle(pid)
    await c.request({"op": "cancel", "session": "active-0", "filter": {"own": True}})
    await c.close()
    return (held - base) * 1024 / n


async def sustained(port: int, sessions: int, subs: int, tokens: int) -> dict[str, Any]:
    clients = [await Client.open(port, f"l{i}") for i in range(max(2 * subs, sessions // 10))]
    stride = len(clients) // subs
    follow = {f"load-{k}": [clients[(k + j * stride) % len(clients)] for j in range(subs)] for k in range(sessions)}
    await asyncio.gather(*(c.request({"op": "subscribe", "session": s, "after": 0})
                           for s, cs in follow.items() for c in cs))
    start = time.perf_counter()
    acks = await asyncio.gather(*(cs[0].request(send(s, str(tokens))) for s, cs in follow.items()))
    await asyncio.gather(*(c.wait_ended(s, a["turn_ids"][0]) for (s, cs), a in zip(follow.items(), acks) for c in cs))
    wall = time.perf_counter() - start
    received = sum(c.received for c in clients)
    bad = sum(c.bad for c in clients)
    for c in clients:
        await c.close()
    return {"sessions": sessions, "subscribers": subs, "tokens": tokens, "connections": len(clients),
            "events_delivered": received, "wall_s": wall, "events_per_s": received / wall, "gaps_or_dups": bad}


async def run(quick: bool) -> dict[str, Any]:
    n_conn, n_idle, n_turns = (200, 500, 100) if quick else (1000, 3000, 500)
    out: dict[str, Any] = {"connections": n_conn, "idle_sessions": n_idle, "active_turns": n_turns}
    with turnline_server(AGENT) as port:
        pid = server_pid(port)
        out["per_connection_b"], out["per_subscribed_session_b"] = \
            await per_connection_and_subscription(port, pid, n_conn)
    with turnline_server(AGENT) as port:
        out["per_idle_session_b"] = await per_idle_session(port, server_pid(port), n_idle)
    with turnline_server(AGENT) as port:
        out["per_active_turn_b"] = await per_active_turn(port, server_pid(port), n_turns)
    scales = [(200, 2)] if quick else [(200, 2), (1000, 2), (2000, 2)]
    out["sustained"] = []
    for sessions, subs in scales:
        with turnline_server(AGENT) as port:
            out["sustained"].append(await sustained(port, sessions, subs, 20))
    return out


def table(r: dict[str, Any]) -> None:
    print_table("load: memory of one `turnline serve` (SQLite store), RSS delta / count", ["what", "count", "KiB each"], [
        ["WebSocket connection (authenticated, idle)", r["connections"], r["per_connection_b"] / 1024],
        ["subscribed session (empty, + its hub)", r["connections"], r["per_subscribed_session_b"] / 1024],
        ["idle loaded session (1 turn of 20 tokens; hub kept)", r["idle_sessions"], r["per_idle_session_b"] / 1024],
        ["active turn (held, one chunk)", r["active_turns"], r["per_active_turn_b"] / 1024],
    ])
    print_table("load: sessions × subscribers, one 20-token turn per session, all at once",
                ["sessions × subs", "connections", "events delivered", "wall s", "events/s", "gaps or dups"],
                [[f"{s['sessions']} × {s['subscribers']}", s["connections"], s["events_delivered"], s["wall_s"],
                  s["events_per_s"], s["gaps_or_dups"]] for s in r["sustained"]])


def bench(quick: bool) -> None:
    results = asyncio.run(run(quick))
    table(results)
    print(f"written {save('load-quick' if quick else 'load', results)}")


if __name__ == "__main__":
    bench("--quick" in sys.argv)
