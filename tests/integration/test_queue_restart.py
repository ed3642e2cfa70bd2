"""The queue policy's queue is durable: inputs queued when the server stops
start, in order, after it starts again on the same SQLite file."""

from __future__ import annotations

import asyncio

from turnline.agent import Agent, Runtime, RuntimeConfig
from turnline.protocol import MessageEvent, TurnEnd, TurnStart, user_message
from turnline.store.sqlite import SQLiteEventLog


async def _settled(hub, predicate) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(10):
        while not (predicate() and not hub._flushing and not hub._outbox):
            await asyncio.sleep(0.001)


async def test_queued_inputs_survive_a_restart_and_run_in_order(tmp_path) -> None:
    path = str(tmp_path / "q.db")
    hold = asyncio.Event()

    async def respond(turn):  # type: ignore[no-untyped-def]
        yield "working "
        await hold.wait()  # the first server never lets a turn finish
        yield "done"

    store = SQLiteEventLog(path)
    await store.open()
    rt = Runtime(store, Agent(respond), RuntimeConfig(abort_grace_s=0.2))
    hub = await rt.hub("s")
    (first, _) = await hub.send("alice", [user_message("one")])
    await _settled(hub, lambda: bool(hub.state.active[first.started[0]].chunks))
    queued = []
    for text in ("two", "three"):
        outcome, durable = await hub.send("alice", [user_message(text)], policy="queue")
        await durable
        queued.append(outcome.queued[0])
    assert [q.turn_id for q in hub.state.queue] == queued
    await rt.close()  # a graceful stop: the running turn ends, the queue must not start
    assert [q.turn_id for q in hub.state.queue] == queued
    await store.close()

    hold.set()
    store = SQLiteEventLog(path)
    await store.open()
    rt = Runtime(store, Agent(respond))
    hub = await rt.hub("s")
    await _settled(hub, lambda: not hub.state.queue and not hub.state.active)
    events = [r.event() for r in await store.read("s")]
    inputs = {e.message.id: e.message.parts[0]["text"] for e in events if isinstance(e, MessageEvent)}
    started = [e.turn_id for e in events if isinstance(e, TurnStart)]
    assert started[1:] == queued
    ends = {e.turn_id: e for e in events if isinstance(e, TurnEnd)}
    assert ends[started[0]].reason == "cancelled"
    assert [ends[t].reason for t in queued] == ["complete", "complete"]
    order = [inputs[e.input_id] for e in events if isinstance(e, TurnStart)]
    assert order == ["one", "two", "three"]
    # each queued input follows the reply it waited for: the conversation is sequential
    history = [m.parts[0]["text"] if m.role == "user" else "reply" for m in hub.state.branch()]
    assert history == ["one", "reply", "two", "reply", "three", "reply"]
    await rt.close()
    await store.close()
