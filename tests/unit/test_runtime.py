"""The agent runtime (agent/runtime.py, agent/turn.py, agent/signal.py) over a
MemoryEventLog, without sockets.

Pinned: one abort per turn; the abort reaches the upstream (an async generator
is closed at once and the turn ends in the cancel's own write, a sync generator is stopped at its
next ``yield`` and the turn ends without waiting for it); late chunks are
dropped and counted; errors end the turn with ``error``; the ``on_cancel`` and
``on_abort`` hooks; ``async with turn``; pending cancels; the stop-vs-end race
in both orders; the double-texting policies; steering; the abort grace.

Every interleaving is driven by gates (asyncio.Event / Queue, threading.Event)
and by yielding loop iterations; nothing depends on a timed sleep, and every
wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, AsyncIterator, Callable

import pytest

from turnline.agent import Aborted, AbortSignal, Agent, CancelRequest, Runtime, RuntimeConfig, SessionHub, Turn
from turnline.agent import runtime as runtime_module
from turnline.protocol import (
    AnyEvent, CancelFilter, CancelResult, ChunkEvent, Message, Presence, Queued, Rejected, TurnEnd, TurnRevised,
    TurnStart,
    user_message,
)
from turnline.store import MemoryEventLog

WAIT = 10.0  # bound for anything that should take milliseconds
OWN = CancelFilter(own=True)


# ----------------------------------------------------------------- harness


@pytest.fixture
async def make_runtime() -> AsyncIterator[Callable[..., Runtime]]:
    made: list[Runtime] = []

    def make(agent: Any = None, **config: Any) -> Runtime:
        if agent is not None and not isinstance(agent, Agent):
            agent = Agent(agent)
        rt = Runtime(MemoryEventLog(), agent, RuntimeConfig(**config))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        await rt.close()


async def until(predicate: Callable[[], bool], what: str = "condition") -> None:
    """Yield loop iterations until ``predicate`` holds (bounded in time)."""
    try:
        async with asyncio.timeout(WAIT):
            while not predicate():
                await asyncio.sleep(0)
    except TimeoutError:
        raise AssertionError(f"{what} never became true") from None


async def settled(hub: SessionHub) -> list[AnyEvent]:
    """The session's stored log once everything emitted is durable; checks it
    is gapless from 1 and equals what the hub applied to its state."""
    await until(lambda: not hub._outbox and not hub._flushing, "flush")
    events = [r.event() for r in await hub.store.read(hub.session_id)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len(events) == hub.state.last_seq
    return events


def ended(hub: SessionHub, turn_id: str) -> bool:
    return turn_id in hub.state.turns and not hub.state.is_active(turn_id)


async def wait_end(hub: SessionHub, turn_id: str) -> TurnEnd:
    await until(lambda: ended(hub, turn_id), f"end of {turn_id}")
    events = await settled(hub)
    ends = [e for e in events if isinstance(e, TurnEnd) and e.turn_id == turn_id]
    assert len(ends) == 1
    return ends[0]


def of_turn(events: list[AnyEvent], turn_id: str, kind: type = ChunkEvent) -> list[Any]:
    return [e for e in events if isinstance(e, kind) and getattr(e, "turn_id", None) == turn_id]


def texts(message: Message) -> list[str]:
    return [p["text"] for p in message.parts if p["type"] == "text"]


def late_chunks(rt: Runtime) -> float:
    return rt.metrics.registry.get_sample_value("turnline_late_chunks_dropped_total") or 0.0


async def send(hub: SessionHub, text: str = "hi", requester: str = "alice", **kw: Any) -> str:
    outcome, fut = await hub.send(requester, [user_message(text)], **kw)
    await fut
    assert outcome.started, outcome
    return outcome.started[0]


class Upstream:
    """An LLM stream the test drives: each item is released with ``feed``.
    Records what it yielded and how it was closed."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.yielded: list[Any] = []
        self.exit: str | None = None
        self.closed_while_active: bool | None = None
        self.closed_at_seq: int | None = None

    def feed(self, *items: Any) -> None:
        for item in items:
            self.items.put_nowait(item)

    async def stream(self, turn: Turn) -> AsyncIterator[Any]:
        try:
            while True:
                item = await self.items.get()
                if item is None:
                    return
                self.yielded.append(item)
                yield item
        except BaseException as exc:
            self.exit = type(exc).__name__
            raise
        finally:
            # the model's HTTP response would be closed here
            hub = turn.hub
            self.closed_while_active = hub.state.is_active(turn.turn_id)
            self.closed_at_seq = hub.state.last_seq


# ----------------------------------------------------------------- the abort signal


async def test_abort_fires_once_and_keeps_its_first_reason() -> None:
    signal = AbortSignal()
    heard: list[str] = []
    remove = signal.add_listener(heard.append)
    removed: list[str] = []
    signal.add_listener(removed.append)()  # removed before it fires
    assert not signal.aborted and signal.reason is None and signal.fired_ns is None
    assert signal.wait(0) is False
    signal.raise_if_aborted()  # not yet: no-op
    waiter = asyncio.ensure_future(_await(signal))
    await asyncio.sleep(0)  # the waiter is waiting
    assert signal.abort("cancelled") is True
    fired = signal.fired_ns
    assert signal.abort("shutdown") is False  # a no-op
    assert signal.reason == "cancelled" and signal.fired_ns == fired
    assert heard == ["cancelled"] and removed == []
    remove()  # removing after it fired is harmless
    assert await asyncio.wait_for(waiter, WAIT) == "cancelled"
    late: list[str] = []
    signal.add_listener(late.append)  # a listener added after the abort runs at once
    assert late == ["cancelled"]
    assert signal.wait(0) is True
    with pytest.raises(Aborted):
        signal.raise_if_aborted()
    assert await _await(signal) == "cancelled"


async def _await(signal: AbortSignal) -> str:
    return await signal


async def test_hub_abort_twice_is_a_no_op(make_runtime) -> None:
    gate = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await gate.wait()

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    tid = await send(hub)
    turn = hub.turns[tid]
    hub._abort(tid, "interrupted")
    hub._abort(tid, "cancelled")
    assert turn.abort_signal.reason == "interrupted"
    # a cancel through the log marks it cancelled; the abort it fires is a no-op
    result, fut = await hub.cancel("alice", OWN)
    await fut
    assert result.cancelled == [tid]
    assert turn.abort_signal.reason == "interrupted"
    gate.set()
    end = await wait_end(hub, tid)
    assert end.reason == "cancelled"


# ----------------------------------------------------------------- the abort reaches the model


async def test_a_cancel_ends_the_turn_in_its_own_write_and_the_upstream_is_closed(make_runtime) -> None:
    # With no on_abort hook, nothing the handler writes after its abort is
    # kept, so the turn-end goes into the same write as the cancel-result: it
    # does not wait for the handler to notice. The upstream is still closed.
    up = Upstream()

    async def respond(turn: Turn) -> None:
        await turn.stream_response(up.stream(turn))

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    tid = await send(hub)
    up.feed("Hello ", "world")
    await until(lambda: up.yielded == ["Hello ", "world"] and "world" in str(hub.state.turns[tid].chunks))
    turn_obj = hub.turns[tid]
    result, fut = await hub.cancel("alice", OWN)
    assert not hub.state.is_active(tid)  # ended by the cancel itself, before any loop turn
    await fut
    assert result.cancelled == [tid]
    events = await settled(hub)
    [cancel_result] = [e for e in events if isinstance(e, CancelResult)]
    [end] = of_turn(events, tid, TurnEnd)
    assert end.seq == cancel_result.seq + 2  # cancel-result, the abort marker, turn-end
    n_at_cancel = len(up.yielded)
    up.feed("after", "the", "cancel")  # the model keeps producing: nobody reads it
    await until(lambda: up.exit is not None, "the upstream to be closed")
    assert up.exit in ("CancelledError", "GeneratorExit")
    assert len(up.yielded) - n_at_cancel <= 1 and turn_obj.upstream_after_abort <= 1
    assert end.reason == "cancelled"
    assert texts(end.message) == ["Hello world"]
    assert hub.turns.get(tid) is None
    await until(lambda: tid not in hub._tasks, "the handler's task to finish")
    assert not [e for e in await settled(hub) if e.seq > end.seq and getattr(e, "turn_id", None) == tid]


async def test_async_upstream_suspended_at_a_yield_is_closed_with_aclose(make_runtime) -> None:
    # The upstream is suspended at ``yield`` (its item is being written) when
    # the abort comes: it is closed with aclose() (GeneratorExit at the yield).
    events: list[str] = []
    hub_box: list[SessionHub] = []

    async def gen(turn: Turn) -> AsyncIterator[str]:
        try:
            yield "one"
            # the abort arrives while this item is in flight
            hub_box[0]._abort(turn.turn_id, "cancelled")
            yield "two"
            events.append("produced after abort")
            yield "three"
        except GeneratorExit:
            events.append("GeneratorExit")
            raise
        finally:
            events.append(f"finally active={hub_box[0].state.is_active(turn.turn_id)}")

    turns: list[Turn] = []

    async def respond(turn: Turn) -> None:
        turns.append(turn)
        await turn.stream_response(gen(turn))

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    hub_box.append(hub)
    tid = await send(hub)
    end = await wait_end(hub, tid)
    [turn] = turns
    assert end.reason == "cancelled"
    assert "produced after abort" not in events
    assert events == ["GeneratorExit", "finally active=True"]  # aclose() at the yield, before turn-end
    assert hub_box[0].state.turns[tid].chunks[-1].chunk == {"type": "abort"}
    assert turn.upstream_after_abort == 1  # "two": produced, never written
    assert texts(end.message) == ["one"]
    assert hub.turns.get(tid) is None


async def test_sync_generator_is_stopped_at_its_next_yield_and_does_not_hold_the_turn(make_runtime) -> None:
    blocked = threading.Event()
    gate = threading.Event()
    finished = threading.Event()
    produced_after_cancel: list[str] = []
    cancelled = threading.Event()

    def respond(turn: Turn):
        try:
            yield "one "
            yield "two"
            blocked.set()
            gate.wait(WAIT)  # a slow, blocking model call
            for word in ("three", "four", "five"):
                if cancelled.is_set():
                    produced_after_cancel.append(word)
                yield word
        finally:
            finished.set()

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    tid = await send(hub)
    await asyncio.to_thread(blocked.wait, WAIT)
    await until(lambda: "two" in str(hub.state.turns[tid].chunks), "both items written")
    turn = hub.turns[tid]
    cancelled.set()
    result, fut = await hub.cancel("alice", OWN)
    await fut
    assert result.cancelled == [tid]
    # the turn ends while the generator is still blocked in its worker thread
    end = await wait_end(hub, tid)
    assert not gate.is_set() and not finished.is_set()
    assert end.reason == "cancelled"
    assert texts(end.message) == ["one two"]
    gate.set()
    assert await asyncio.to_thread(finished.wait, WAIT)
    assert produced_after_cancel == ["three"]  # stopped at the next yield: one item at most
    assert turn.upstream_after_abort == 1
    events = await settled(hub)
    assert not [c for c in of_turn(events, tid) if "three" in str(c.chunk)]


async def test_sync_generator_that_raises_ends_the_turn_with_error(make_runtime) -> None:
    def respond(turn: Turn):
        yield "partial"
        raise ValueError("model exploded")

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    tid = await send(hub)
    end = await wait_end(hub, tid)
    assert end.reason == "error"
    assert end.error is not None and end.error.code == "agent_error"
    assert "model exploded" in end.error.message
    assert texts(end.message) == ["partial"]


# ----------------------------------------------------------------- a turn ends once


async def test_late_chunks_after_turn_end_are_dropped_and_counted(make_runtime) -> None:
    wrote_late = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await turn.write("before the end")
        await turn.end()
        await turn.end("error", "ignored: a turn ends once")
        await turn.write("late text")
        await turn.write({"type": "data-x", "data": 1})
        wrote_late.set()

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    tid = await send(hub)
    end = await wait_end(hub, tid)
    await wrote_late.wait()
    events = await settled(hub)
    assert end.reason == "complete"
    assert late_chunks(rt) == 2
    assert all(e.seq < end.seq for e in of_turn(events, tid))
    assert texts(end.message) == ["before the end"]


async def test_an_exception_ends_the_turn_with_error_and_the_session_goes_on(make_runtime) -> None:
    calls = 0

    async def respond(turn: Turn) -> None:
        nonlocal calls
        calls += 1
        await turn.write("working")
        if calls == 1:
            raise RuntimeError("tool crashed")

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    t1 = await send(hub, "first")
    end1 = await wait_end(hub, t1)
    assert end1.reason == "error"
    assert end1.error is not None
    assert (end1.error.code, end1.error.message) == ("agent_error", "RuntimeError: tool crashed")
    assert end1.message.metadata is None or "interrupted" not in end1.message.metadata
    assert texts(end1.message) == ["working"]
    t2 = await send(hub, "second")
    end2 = await wait_end(hub, t2)
    assert end2.reason == "complete" and end2.error is None
    assert texts(end2.message) == ["working"]


async def test_async_with_turn_always_ends_it(make_runtime) -> None:
    gates: dict[str, asyncio.Event] = {}
    entered: dict[str, asyncio.Event] = {}

    after_block: dict[str, str | None] = {}

    async def respond(turn: Turn) -> None:
        mode = turn.input.parts[0]["text"]
        try:
            async with turn:
                await turn.write(f"{mode}:")
                entered[mode].set()
                if mode == "complete":
                    return
                if mode == "error":
                    raise KeyError("inside the block")
                if mode == "aborted-raise":
                    await turn.abort_signal
                    turn.abort_signal.raise_if_aborted()
                if mode == "cancelled":
                    await turn.abort_signal
                if mode == "stopped":
                    await gates[mode].wait()  # the task is cancelled while it waits
        finally:
            after_block[mode] = turn.reason  # the block itself ended the turn

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    reasons = {}
    for mode in ("complete", "error", "cancelled", "aborted-raise", "stopped"):
        gates[mode] = asyncio.Event()
        entered[mode] = asyncio.Event()
        tid = await send(hub, mode)
        await entered[mode].wait()
        if mode in ("cancelled", "aborted-raise"):
            (result, fut) = await hub.cancel("alice", CancelFilter(turn_id=tid))
            await fut
        if mode == "stopped":
            hub._tasks[tid].cancel()  # the server stops the task without an abort
        end = await wait_end(hub, tid)
        reasons[mode] = end.reason
        await until(lambda: mode in after_block, "the handler to return")
    assert reasons == {"complete": "complete", "error": "error", "cancelled": "cancelled",
                       "aborted-raise": "cancelled", "stopped": "error"}
    assert after_block == reasons


async def test_raise_if_aborted_in_a_plain_handler_ends_cancelled_not_error(make_runtime) -> None:
    async def respond(turn: Turn) -> None:
        await turn.write("working")
        await turn.abort_signal
        turn.abort_signal.raise_if_aborted()

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    tid = await send(hub)
    await until(lambda: bool(hub.state.turns[tid].chunks))
    await (await hub.cancel("alice", OWN))[1]
    end = await wait_end(hub, tid)
    assert end.reason == "cancelled" and end.error is None


async def test_a_chunk_that_cannot_be_stored_fails_the_turn_not_the_session(make_runtime) -> None:
    raised: list[str] = []

    async def respond(turn: Turn) -> None:
        await turn.write("kept")
        if turn.input.parts[0]["text"] == "bad":
            try:
                await turn.write({"type": "data-x", "data": object()})
            except TypeError as exc:
                raised.append(str(exc))
                raise

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    t1 = await send(hub, "bad")
    end = await wait_end(hub, t1)
    assert raised and "JSON" in raised[0]
    assert end.reason == "error" and texts(end.message) == ["kept"]
    assert hub.broken is None and rt.loaded("s") is hub
    t2 = await send(hub, "good")
    assert (await wait_end(hub, t2)).reason == "complete"


async def test_regenerate_starts_a_sibling_answer_for_the_same_input(make_runtime) -> None:
    n = 0

    async def respond(turn: Turn) -> None:
        nonlocal n
        n += 1
        await turn.write(f"answer {n}")

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    t1 = await send(hub, "question")
    end1 = await wait_end(hub, t1)
    outcome, fut = await hub.regenerate("bob", end1.message.id)
    await fut
    [t2] = outcome.started
    end2 = await wait_end(hub, t2)
    s = hub.state
    assert s.turns[t2].input_id == s.turns[t1].input_id and s.turns[t2].owner == "bob"
    assert texts(end2.message) == ["answer 2"]
    assert s.siblings(end1.message.id) == [end1.message.id, end2.message.id]
    outcome, fut = await hub.regenerate("alice", s.turns[t1].input_id)  # from the user message itself
    await fut
    assert s.turns[outcome.started[0]].input_id == s.turns[t1].input_id
    await wait_end(hub, outcome.started[0])
    with pytest.raises(runtime_module.CommandError) as err:
        await hub.regenerate("alice", "no-such-message")
    assert err.value.code == "not_found"


# ----------------------------------------------------------------- cancel authorisation


@pytest.mark.parametrize("hook_kind", ["sync", "async"])
async def test_on_cancel_can_reject_and_the_requester_is_told(make_runtime, hook_kind: str) -> None:
    requests: list[CancelRequest] = []
    verdict = {"allow": False}
    gate = asyncio.Event()

    def decide(req: CancelRequest) -> bool:
        requests.append(req)
        return verdict["allow"]

    async def decide_async(req: CancelRequest) -> bool:
        await asyncio.sleep(0)
        return decide(req)

    async def respond(turn: Turn) -> None:
        await turn.write("running")
        await gate.wait()
        await turn.write(" still")

    rt = make_runtime(Agent(respond, on_cancel=decide if hook_kind == "sync" else decide_async))
    hub = await rt.hub("s")
    tid = await send(hub, requester="alice")
    await until(lambda: bool(hub.state.turns[tid].chunks))
    result, fut = await hub.cancel("alice", OWN, seen=3)
    await fut
    assert result.cancelled == [] and result.rejected == [tid] and result.pending == []
    [req] = requests
    assert req.requester == "alice" and req.filter == OWN and req.seen == 3
    assert req.matched_turn_ids == [tid] and dict(req.turn_owners) == {tid: "alice"}
    assert req.session_id == "s"
    assert not hub.turns[tid].aborted and hub.state.is_active(tid)
    events = await settled(hub)
    assert [e for e in events if isinstance(e, CancelResult)][-1].rejected == [tid]
    # the turn keeps running and ends complete
    gate.set()
    end = await wait_end(hub, tid)
    assert end.reason == "complete" and texts(end.message) == ["running still"]


async def test_on_cancel_sees_the_turns_of_every_filter_and_others_turns_need_the_right(make_runtime) -> None:
    requests: list[CancelRequest] = []
    gate = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await gate.wait()

    rt = make_runtime(Agent(respond, on_cancel=lambda r: requests.append(r) or True))
    hub = await rt.hub("s")
    a = await send(hub, requester="alice")
    b = await send(hub, requester="bob")
    result, fut = await hub.cancel("alice", CancelFilter(all=True))
    await fut
    assert result.cancelled == [a] and result.rejected == [b]  # alice may not stop bob's turn
    assert requests[-1].matched_turn_ids == [a] and requests[-1].filter == CancelFilter(all=True)
    result, fut = await hub.cancel("carol", CancelFilter(client_id="bob"), may_cancel_others=True)
    await fut
    assert result.cancelled == [b] and result.rejected == []
    assert requests[-1].requester == "carol" and dict(requests[-1].turn_owners) == {b: "bob"}
    gate.set()
    assert (await wait_end(hub, a)).reason == "cancelled"
    assert (await wait_end(hub, b)).reason == "cancelled"


# ----------------------------------------------------------------- on_abort


async def test_on_abort_writes_are_kept_even_past_seen(make_runtime) -> None:
    up = Upstream()

    async def on_abort(write) -> None:
        await write("[stopped]")
        await write({"type": "data-stop", "data": {"by": "user"}})

    async def respond(turn: Turn) -> None:
        await turn.stream_response(up.stream(turn))

    rt = make_runtime(Agent(respond, on_abort=on_abort))
    hub = await rt.hub("s")
    tid = await send(hub)
    up.feed("Hello", " world", " and more")
    await until(lambda: len(up.yielded) == 3 and "more" in str(hub.state.turns[tid].chunks))
    chunks = hub.state.turns[tid].chunks
    seen = next(c.seq for c in chunks if c.chunk.get("delta") == "Hello")
    result, fut = await hub.cancel("alice", OWN, seen=seen)
    await fut
    end = await wait_end(hub, tid)
    assert end.reason == "cancelled"
    assert end.message.parts == [
        {"type": "text", "text": "Hello", "state": "done"},
        {"type": "text", "text": "[stopped]", "state": "done"},
        {"type": "data-stop", "data": {"by": "user"}},
    ]
    assert end.message.metadata == {"interrupted": {"reason": "cancelled", "seen": seen}}


async def test_on_abort_text_survives_a_seen_before_the_text_started(make_runtime) -> None:
    # The client saw only the ``start`` chunk. The text part (auto-opened by a
    # plain string) started after ``seen``; what on_abort writes must not be
    # appended to that unseen part, or it is folded away.
    up = Upstream()

    async def on_abort(write) -> None:
        await write("[stopped]")

    async def respond(turn: Turn) -> None:
        await turn.stream_response(up.stream(turn))

    rt = make_runtime(Agent(respond, on_abort=on_abort))
    hub = await rt.hub("s")
    tid = await send(hub)
    up.feed("Hello")
    await until(lambda: "Hello" in str(hub.state.turns[tid].chunks))
    seen = hub.state.turns[tid].chunks[0].seq  # the start chunk
    await (await hub.cancel("alice", OWN, seen=seen))[1]
    end = await wait_end(hub, tid)
    assert end.message.parts == [{"type": "text", "text": "[stopped]", "state": "done"}]


async def test_on_abort_may_take_the_turn(make_runtime) -> None:
    got: list[tuple[str, str | None]] = []

    async def on_abort(write, turn: Turn) -> None:
        got.append((turn.turn_id, turn.abort_signal.reason))
        await write({"type": "message-metadata", "messageMetadata": {"stopped_by": "user"}})

    async def respond(turn: Turn) -> None:
        await turn.write("x")
        await turn.abort_signal

    rt = make_runtime(Agent(respond, on_abort=on_abort))
    hub = await rt.hub("s")
    tid = await send(hub)
    await until(lambda: bool(hub.state.turns[tid].chunks))
    await (await hub.cancel("alice", OWN, seen=1))[1]  # seen before the turn: only final chunks count
    end = await wait_end(hub, tid)
    assert got == [(tid, "cancelled")]
    assert end.message.parts == []
    assert end.message.metadata == {"stopped_by": "user", "interrupted": {"reason": "cancelled", "seen": 1}}


async def test_on_abort_runs_once_and_is_bounded_by_the_grace(make_runtime) -> None:
    runs = 0
    never = asyncio.Event()

    async def on_abort(write) -> None:
        nonlocal runs
        runs += 1
        await write("bye")
        await never.wait()  # a hook that hangs

    async def respond(turn: Turn) -> None:
        await turn.abort_signal

    rt = make_runtime(Agent(respond, on_abort=on_abort), abort_grace_s=0.05)
    hub = await rt.hub("s")
    tid = await send(hub)
    await (await hub.cancel("alice", OWN))[1]
    end = await wait_end(hub, tid)
    await until(lambda: tid not in hub._tasks and not hub._background, "the turn's tasks to finish")
    assert end.reason == "cancelled"
    assert texts(end.message) == ["bye"]
    assert runs == 1


# ----------------------------------------------------------------- pending cancels


async def test_pending_cancel_is_applied_the_moment_the_turn_starts(make_runtime, monkeypatch) -> None:
    ran: list[str] = []

    async def respond(turn: Turn) -> None:
        ran.append(turn.turn_id)
        await turn.write("should not run")

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    # the cancel names a turn the log has not seen yet
    result, fut = await hub.cancel("alice", CancelFilter(turn_id="turn-future"), seen=0)
    await fut
    assert result.pending == ["turn-future"] and result.cancelled == []
    real_new_id = runtime_module.new_id
    monkeypatch.setattr(runtime_module, "new_id",
                        lambda prefix: "turn-future" if prefix == "turn" else real_new_id(prefix))
    tid = await send(hub, requester="alice")
    assert tid == "turn-future"
    end = await wait_end(hub, tid)
    assert ran == []  # aborted before the agent ran
    assert end.reason == "cancelled" and end.message.parts == []
    events = await settled(hub)
    start = of_turn(events, tid, TurnStart)[0]
    applied = [e for e in events if isinstance(e, CancelResult) and e.cancelled == [tid]]
    assert len(applied) == 1 and applied[0].request_id == result.request_id
    assert start.seq < applied[0].seq < end.seq
    assert "turn-future" not in hub.state.pending_cancels


async def test_a_pending_cancel_from_someone_else_does_not_apply_without_the_right(make_runtime, monkeypatch) -> None:
    gate = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await gate.wait()

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    await (await hub.cancel("mallory", CancelFilter(turn_id="turn-x")))[1]
    real_new_id = runtime_module.new_id
    monkeypatch.setattr(runtime_module, "new_id", lambda p: "turn-x" if p == "turn" else real_new_id(p))
    tid = await send(hub, requester="alice")
    assert not hub.turns[tid].aborted
    gate.set()
    assert (await wait_end(hub, tid)).reason == "complete"


async def test_cancel_naming_a_queued_turn_removes_it_from_the_queue(make_runtime) -> None:
    gate = asyncio.Event()
    ran: list[str] = []

    async def respond(turn: Turn) -> None:
        ran.append(turn.input.parts[0]["text"])
        await gate.wait()

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    first = await send(hub, "first")
    outcome, fut = await hub.send("alice", [user_message("second")], policy="queue")
    await fut
    [queued] = outcome.queued
    events = await settled(hub)
    assert [e.turn_id for e in events if isinstance(e, Queued)] == [queued]  # the reserved turn id
    result, fut = await hub.cancel("alice", CancelFilter(turn_id=queued))
    await fut
    assert result.cancelled == [queued] and result.pending == []
    gate.set()
    await wait_end(hub, first)
    events = await settled(hub)
    assert [e.code for e in events if isinstance(e, Rejected)] == ["cancelled"]
    assert queued not in hub.state.turns and ran == ["first"]


# ----------------------------------------------------------------- the stop-vs-end race


async def run_race(make_runtime, stop_first: bool, hook: Any = None) -> tuple[TurnEnd, Message, list[AnyEvent]]:
    """Stream five words; the client saw two; the stop arrives before or after the end."""
    up = Upstream()

    async def respond(turn: Turn) -> None:
        await turn.stream_response(up.stream(turn))

    rt = make_runtime(Agent(respond, on_cancel=hook))
    hub = await rt.hub("s")
    tid = await send(hub)
    words = ["The ", "answer ", "is ", "forty ", "two."]
    up.feed(*words[:3])
    await until(lambda: len(up.yielded) == 3 and "is " in str(hub.state.turns[tid].chunks))
    seen = next(c.seq for c in hub.state.turns[tid].chunks if c.chunk.get("delta") == "answer ")
    if stop_first:
        result, fut = await hub.cancel("alice", OWN, seen=seen)
        up.feed(*words[3:], None)
    else:
        up.feed(*words[3:], None)
        await wait_end(hub, tid)
        result, fut = await hub.cancel("alice", OWN, seen=seen)
    await fut
    assert result.cancelled == [tid]
    end = await wait_end(hub, tid)
    events = await settled(hub)
    return end, hub.state.messages[end.message.id], events


async def test_stop_vs_end_of_stream_persist_the_same_message_in_both_orders(make_runtime) -> None:
    end_a, saved_a, events_a = await run_race(make_runtime, stop_first=True)
    end_b, saved_b, events_b = await run_race(make_runtime, stop_first=False)
    assert end_a.reason == "cancelled" and saved_a == end_a.message
    assert end_b.reason == "complete" and texts(end_b.message) == ["The answer is forty two."]
    [revised] = [e for e in events_b if isinstance(e, TurnRevised)]
    assert revised.reason == "cancelled" and revised.message == saved_b
    assert not [e for e in events_a if isinstance(e, TurnRevised)]
    assert (saved_a.parts, saved_a.metadata) == (saved_b.parts, saved_b.metadata)
    assert saved_a.parts == [{"type": "text", "text": "The answer ", "state": "done"}]


@pytest.mark.parametrize("stop_first", [True, False])
async def test_the_race_is_the_same_with_an_async_authorisation_hook(make_runtime, stop_first: bool) -> None:
    # The hook awaits; meanwhile the turn may end. The outcome must not
    # depend on it: the stop is still applied as of the requester's seen.
    async def hook(req: CancelRequest) -> bool:
        await asyncio.sleep(0)
        return True

    end, saved, _ = await run_race(make_runtime, stop_first, hook)
    assert saved.parts == [{"type": "text", "text": "The answer ", "state": "done"}]


async def test_a_turn_that_ends_while_the_hook_decides_is_revised(make_runtime) -> None:
    up = Upstream()
    deciding = asyncio.Event()
    decide = asyncio.Event()

    async def hook(req: CancelRequest) -> bool:
        deciding.set()
        await decide.wait()
        return True

    async def respond(turn: Turn) -> None:
        await turn.stream_response(up.stream(turn))

    rt = make_runtime(Agent(respond, on_cancel=hook))
    hub = await rt.hub("s")
    tid = await send(hub)
    up.feed("seen ", "unseen")
    await until(lambda: "unseen" in str(hub.state.turns[tid].chunks))
    seen = next(c.seq for c in hub.state.turns[tid].chunks if c.chunk.get("delta") == "seen ")
    cancel = asyncio.ensure_future(hub.cancel("alice", OWN, seen=seen))
    await deciding.wait()
    up.feed(None)  # the stream ends while the hook decides
    await wait_end(hub, tid)
    decide.set()
    result, fut = await cancel
    await fut
    assert result.cancelled == [tid]
    assert texts(hub.state.messages[f"reply-{tid.removeprefix('turn-')}"]) == ["seen "]


async def test_a_rejecting_hook_also_guards_the_revision(make_runtime) -> None:
    # The same stop, rejected by the hook, must not truncate a turn that won
    # the race: the outcome of a cancel does not depend on who came first.
    up = Upstream()

    async def respond(turn: Turn) -> None:
        await turn.stream_response(up.stream(turn))

    rt = make_runtime(Agent(respond, on_cancel=lambda req: False))
    hub = await rt.hub("s")
    tid = await send(hub)
    up.feed("seen ", "unseen", None)
    end = await wait_end(hub, tid)
    seen = next(c.seq for c in hub.state.turns[tid].chunks if c.chunk.get("delta") == "seen ")
    result, fut = await hub.cancel("alice", OWN, seen=seen)
    await fut
    assert result.cancelled == [] and result.rejected == [tid]
    events = await settled(hub)
    assert not [e for e in events if isinstance(e, TurnRevised)]
    assert hub.state.messages[end.message.id] == end.message


# ----------------------------------------------------------------- double texting


async def test_queue_policy_runs_turns_in_order(make_runtime) -> None:
    gates = [asyncio.Event() for _ in range(3)]
    order: list[str] = []

    async def respond(turn: Turn) -> None:
        i = int(turn.input.parts[0]["text"])
        order.append(f"start {i}")
        await turn.write(f"reply {i}")
        await gates[i].wait()
        order.append(f"end {i}")

    rt = make_runtime(respond, default_policy="queue")
    hub = await rt.hub("s")
    t0 = await send(hub, "0")
    queued = []
    for i in (1, 2):
        outcome, fut = await hub.send("alice", [user_message(str(i))])
        await fut
        queued += outcome.queued
    assert [q.turn_id for q in hub.state.queue] == queued
    for i in (2, 1, 0):  # released in reverse: the queue still runs in order
        gates[i].set()
    for tid in [t0] + queued:
        await wait_end(hub, tid)
    assert order == ["start 0", "end 0", "start 1", "end 1", "start 2", "end 2"]
    events = await settled(hub)
    starts = [e.turn_id for e in events if isinstance(e, TurnStart)]
    assert starts == [t0] + queued
    assert [e.position for e in events if isinstance(e, Queued)] == [1, 2]
    # a sequential conversation: each queued message follows the reply it waited for
    assert [m.id for m in hub.state.branch()][-1] == f"reply-{queued[1].removeprefix('turn-')}"
    assert [m.role for m in hub.state.branch()] == ["user", "assistant"] * 3


async def test_a_resent_queued_message_is_a_conflict_even_after_it_was_cancelled(make_runtime) -> None:
    gate = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await turn.write("ok")
        await gate.wait()

    rt = make_runtime(respond, default_policy="queue")
    hub = await rt.hub("s")
    await send(hub, "first")
    msg = user_message("again", id="m-q")
    outcome, fut = await hub.send("alice", [msg])
    await fut
    with pytest.raises(runtime_module.CommandError) as err:  # a client re-sending after a drop
        await hub.send("alice", [msg])
    assert err.value.code == "conflict"
    assert [q.message_id for q in hub.state.queue] == ["m-q"]
    result, fut = await hub.cancel("alice", CancelFilter(turn_id=outcome.queued[0]))
    await fut
    assert result.cancelled == outcome.queued and not hub.state.queue
    with pytest.raises(runtime_module.CommandError) as err:  # cancelled, yet still taken
        await hub.send("alice", [msg])
    assert err.value.code == "conflict"
    gate.set()
    assert not hub.state.queue and outcome.queued[0] not in hub.state.turns


async def test_interrupt_cancels_own_turns_and_tail_chunks_stay_on_the_old_turn(make_runtime) -> None:
    aborted = asyncio.Event()
    release_tail = asyncio.Event()
    started: list[str] = []

    async def on_abort(write) -> None:
        await write(" [interrupted]")  # the tail the runtime keeps: final chunks of the old turn

    async def respond(turn: Turn) -> None:
        text = turn.input.parts[0]["text"]
        started.append(text)
        await turn.write(f"{text} reply")
        if text == "old":
            await turn.abort_signal
            aborted.set()
            await release_tail.wait()
            await turn.write(" TAIL")  # produced after the abort: dropped and counted

    rt = make_runtime(Agent(respond, on_abort=on_abort), default_policy="interrupt")
    hub = await rt.hub("s")
    old = await send(hub, "old")
    other = await send(hub, "bob's", requester="bob")  # not alice's: left alone
    await until(lambda: bool(hub.state.turns[old].chunks))
    outcome, fut = await hub.send("alice", [user_message("new")])
    await fut
    [new] = outcome.started
    assert outcome.cancelled == [old]
    await aborted.wait()
    assert started == ["old", "bob's"]  # the new turn waits for the old one's end
    release_tail.set()
    end_old = await wait_end(hub, old)
    end_new = await wait_end(hub, new)
    assert end_old.reason == "cancelled" and texts(end_old.message) == ["old reply", " [interrupted]"]
    assert end_new.reason == "complete" and texts(end_new.message) == ["new reply"]
    assert late_chunks(rt) == 1
    events = await settled(hub)
    assert "TAIL" not in str(events)
    new_start = of_turn(events, new, TurnStart)[0]
    tail = [e for e in of_turn(events, old) if e.seq > new_start.seq]
    assert tail and all(e.final for e in tail)  # after the new turn started: still the old turn's
    assert "interrupted" not in str(of_turn(events, new))
    assert (await wait_end(hub, other)).reason == "complete"
    # the new message follows the interrupted reply
    assert hub.state.messages[hub.state.turns[new].input_id].parent_id == end_old.message.id


async def test_interrupt_starts_the_new_turn_without_waiting_for_the_old_handler(make_runtime) -> None:
    # With no on_abort hook, the interrupted turn ends in the interrupting
    # send's own write, before the new input: the new turn's history holds
    # the old reply although the old handler has not noticed its abort yet.
    never = asyncio.Event()
    histories: dict[str, list[str]] = {}

    async def respond(turn: Turn) -> None:
        text = turn.input.parts[0]["text"]
        histories[text] = [m.role for m in turn.history]
        await turn.write(f"{text} reply")
        if text == "old":
            await never.wait()  # ignores its abort until the grace runs out

    rt = make_runtime(respond, default_policy="interrupt", abort_grace_s=WAIT)
    hub = await rt.hub("s")
    old = await send(hub, "old")
    await until(lambda: bool(hub.state.turns[old].chunks))
    outcome, fut = await hub.send("alice", [user_message("new")])
    await fut
    [new] = outcome.started
    end_new = await wait_end(hub, new)
    assert old in hub._tasks  # the old handler is still running
    events = await settled(hub)
    [end_old] = of_turn(events, old, TurnEnd)
    [new_start] = of_turn(events, new, TurnStart)
    assert end_old.reason == "cancelled" and end_old.seq < new_start.seq
    assert texts(end_old.message) == ["old reply"] and texts(end_new.message) == ["new reply"]
    assert histories["new"] == ["user", "assistant", "user"]
    assert hub.state.messages[new_start.input_id].parent_id == end_old.message.id
    never.set()
    await until(lambda: old not in hub._tasks, "the old handler to finish")
    assert len(of_turn(await settled(hub), old, TurnEnd)) == 1


async def test_rollback_hides_the_interrupted_exchange(make_runtime) -> None:
    async def respond(turn: Turn) -> None:
        await turn.write(turn.input.parts[0]["text"].upper())
        if turn.input.parts[0]["text"] == "wrong":
            await turn.abort_signal

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    t1 = await send(hub, "first")
    await wait_end(hub, t1)
    t2 = await send(hub, "wrong")
    await until(lambda: bool(hub.state.turns[t2].chunks))
    outcome, fut = await hub.send("alice", [user_message("right")], policy="rollback")
    await fut
    [t3] = outcome.started
    assert outcome.cancelled == [t2]
    await wait_end(hub, t2)
    await wait_end(hub, t3)
    s = hub.state
    wrong_in, wrong_reply = s.turns[t2].input_id, s.turns[t2].message_id
    assert {wrong_in, wrong_reply} <= s.hidden
    events = await settled(hub)
    assert [e for e in events if isinstance(e, CancelResult)][0].rolled_back == [wrong_in, wrong_reply]
    assert [texts(m) or [m.parts[0]["text"]] for m in s.branch()] == [["first"], ["FIRST"], ["right"], ["RIGHT"]]
    assert s.head == s.turns[t3].message_id
    assert wrong_in in s.siblings(s.turns[t3].input_id)


async def test_reject_policy_refuses_while_busy(make_runtime) -> None:
    gate = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await gate.wait()

    rt = make_runtime(respond, default_policy="reject")
    hub = await rt.hub("s")
    t1 = await send(hub)
    outcome, fut = await hub.send("bob", [user_message("me too")])
    await fut
    assert outcome.rejected == "busy" and outcome.started == [] and outcome.queued == []
    events = await settled(hub)
    [rej] = [e for e in events if isinstance(e, Rejected)]
    assert rej.code == "busy" and rej.client_id == "bob" and rej.message_id == outcome.message_ids[0]
    assert outcome.message_ids[0] not in hub.state.messages
    gate.set()
    await wait_end(hub, t1)
    assert (await hub.send("bob", [user_message("now")]))[0].started  # idle again: accepted


async def test_steering_delivers_into_the_running_turn(make_runtime) -> None:
    got: list[str] = []
    checked = asyncio.Event()
    flags: list[bool] = []

    async def respond(turn: Turn) -> None:
        flags.append(turn.has_input())
        checked.set()
        msg = await turn.next_input()
        got.append(msg.parts[0]["text"])
        flags.append(turn.has_input())
        got.extend(m.parts[0]["text"] for m in turn.take_inputs())
        await turn.write("steered")

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    tid = await send(hub, "go")
    await checked.wait()
    outcome, fut = await hub.send("alice", [user_message("left"), user_message("then right")], steer=tid)
    await fut
    assert outcome.started == [] and len(outcome.message_ids) == 2
    end = await wait_end(hub, tid)
    assert got == ["left", "then right"] and flags == [False, True]
    assert end.reason == "complete"
    steer_msgs = [hub.state.messages[i] for i in outcome.message_ids]
    assert all(m.metadata == {"steer": tid} for m in steer_msgs)
    assert len([t for t in hub.state.turns]) == 1  # no new turn
    with pytest.raises(runtime_module.CommandError) as err:
        await hub.send("alice", [user_message("too late")], steer=tid)
    assert err.value.code == "not_found"


# ----------------------------------------------------------------- the abort grace


async def test_a_handler_that_ignores_the_abort_is_stopped_after_the_grace(make_runtime) -> None:
    never = asyncio.Event()
    stuck = asyncio.Event()
    stopped = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await turn.write("working")
        stuck.set()
        try:
            await never.wait()  # ignores the abort signal
        except asyncio.CancelledError:
            stopped.set()
            raise

    rt = make_runtime(respond, abort_grace_s=0.05)
    hub = await rt.hub("s")
    tid = await send(hub)
    await stuck.wait()
    await (await hub.cancel("alice", OWN))[1]
    assert not hub.state.is_active(tid)  # the turn ended with the cancel…
    assert not stopped.is_set() and tid in hub._tasks  # …while its handler still runs
    end = await wait_end(hub, tid)
    assert end.reason == "cancelled" and texts(end.message) == ["working"]
    await stopped.wait()  # the grace ran out: its task was cancelled
    await until(lambda: tid not in hub._tasks, "the handler's task to finish")


async def test_with_an_on_abort_hook_the_turn_ends_once_the_hook_wrote_not_when_the_handler_stops(
        make_runtime) -> None:
    never = asyncio.Event()
    stuck = asyncio.Event()
    hook_may_write = asyncio.Event()
    stopped = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await turn.write("working")
        stuck.set()
        try:
            await never.wait()  # ignores the abort signal
        except asyncio.CancelledError:
            stopped.set()
            raise

    async def on_abort(write: Any) -> None:
        await hook_may_write.wait()
        await write(" [stopped]")

    rt = make_runtime(Agent(respond, on_abort=on_abort), abort_grace_s=WAIT / 2)
    hub = await rt.hub("s")
    tid = await send(hub)
    await stuck.wait()
    await (await hub.cancel("alice", OWN))[1]
    assert hub.state.is_active(tid)  # the hook has not written yet: the turn waits for it
    hook_may_write.set()
    end = await wait_end(hub, tid)
    assert end.reason == "cancelled" and texts(end.message) == ["working", " [stopped]"]
    assert not stopped.is_set() and tid in hub._tasks  # ended while the handler still ran
    await stopped.wait()  # then the grace ran out: its task was cancelled
    assert len(of_turn(await settled(hub), tid, TurnEnd)) == 1


async def test_a_handler_that_swallows_the_force_end_is_still_ended(make_runtime) -> None:
    never = asyncio.Event()
    kept_going = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await turn.write("working")
        try:
            await never.wait()
        except asyncio.CancelledError:
            pass  # a badly behaved handler
        await turn.write(" late")
        kept_going.set()
        await never.wait()

    rt = make_runtime(respond, abort_grace_s=0.05)
    hub = await rt.hub("s")
    tid = await send(hub)
    await until(lambda: bool(hub.state.turns[tid].chunks))
    await (await hub.cancel("alice", OWN))[1]
    end = await wait_end(hub, tid)
    assert end.reason == "cancelled" and texts(end.message) == ["working"]
    await kept_going.wait()
    assert late_chunks(rt) == 1  # " late": written after the abort
    never.set()  # let the handler finish
    await until(lambda: tid not in hub._tasks, "the handler's task to finish")


async def test_a_refused_event_never_leaves_state_ahead_of_the_log(make_runtime) -> None:
    from turnline.core.session import InvariantError
    from turnline.protocol import ChunkEvent, Message, MessageEvent

    rt = make_runtime()
    hub = await rt.hub("s")
    ok = MessageEvent(message=Message(id="m1", role="user", parts=[], parent_id=None))
    bad = ChunkEvent(turn_id="turn-unknown", chunk={"type": "text-delta", "id": "x", "delta": "!"})
    with pytest.raises(InvariantError):
        hub.emit([ok, bad])
    await until(lambda: not hub._flushing and not hub._outbox, "flush")
    assert await rt.store.last_seq("s") == hub.state.last_seq == 1
    outcome, durable = await hub.send("alice", [user_message("still works")])
    await durable
    await until(lambda: not hub._flushing and not hub._outbox and not hub.state.active, "turn over")
    assert await rt.store.last_seq("s") == hub.state.last_seq > 2


async def test_interrupt_with_seen_saves_the_old_turn_as_the_sender_saw_it(make_runtime) -> None:
    words = asyncio.Queue()

    async def respond(turn: Turn):
        if turn.input.parts[0]["text"] == "old":
            while True:
                yield await words.get()
        else:
            yield "new reply"

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    old = await send(hub, "old")
    for w in ("one ", "two "):
        words.put_nowait(w)
    await until(lambda: texts_of_live(hub, old) == "one two ")
    seen = hub.state.last_seq  # the sender's screen shows "one two "
    words.put_nowait("three ")  # reaches the log, not the sender's screen
    await until(lambda: texts_of_live(hub, old) == "one two three ")
    outcome, fut = await hub.send("alice", [user_message("new")], policy="interrupt", seen=seen)
    await fut
    assert outcome.cancelled == [old]
    end_old = await wait_end(hub, old)
    assert end_old.reason == "cancelled"
    assert texts(end_old.message) == ["one two "]
    assert end_old.message.metadata["interrupted"] == {"reason": "cancelled", "seen": seen}
    # the new turn's model input holds what the user saw of the old reply
    end_new = await wait_end(hub, outcome.started[0])
    assert [m.id for m in hub.state.branch(end_new.message.id)][-3] == end_old.message.id


def texts_of_live(hub: SessionHub, turn_id: str) -> str:
    fold = hub.state.turns[turn_id].fold
    return "".join(p.get("text", "") for p in fold.parts) if fold else ""


async def test_cancelling_a_queued_input_leaves_the_next_one_a_whole_history(make_runtime) -> None:
    gate = asyncio.Event()
    histories: dict[str, list[str]] = {}

    async def respond(turn: Turn) -> None:
        text = turn.input.parts[0]["text"]
        histories[text] = [m.parts[0]["text"] if m.role == "user" else "reply" for m in turn.history]
        await turn.write(f"re {text}")
        if text == "A":
            await gate.wait()

    rt = make_runtime(respond)
    hub = await rt.hub("s")
    first = await send(hub, "A")
    (b, fut_b) = await hub.send("bob", [user_message("B")], policy="queue")
    (c, fut_c) = await hub.send("alice", [user_message("C")], policy="queue")
    await fut_b
    await fut_c
    result, fut = await hub.cancel("bob", CancelFilter(turn_id=b.queued[0]))
    await fut
    assert result.cancelled == b.queued
    gate.set()
    await wait_end(hub, first)
    await wait_end(hub, c.queued[0])
    assert histories["C"] == ["A", "reply", "C"]  # follows A's reply: not orphaned by B
    assert b.message_ids[0] not in hub.state.messages  # a cancelled queued input never joined the tree
    assert [m.parts[0].get("text") for m in hub.state.branch()] == ["A", "re A", "C", "re C"]


async def test_a_pending_cancel_is_put_to_on_cancel_when_its_turn_starts(make_runtime, monkeypatch) -> None:
    asked: list[CancelRequest] = []
    gate = asyncio.Event()

    async def decide(request: CancelRequest) -> bool:
        asked.append(request)
        return False

    async def respond(turn: Turn) -> None:
        await turn.write("runs")
        await gate.wait()

    rt = make_runtime(Agent(respond, on_cancel=decide))
    hub = await rt.hub("s")
    result, fut = await hub.cancel("alice", CancelFilter(turn_id="turn-later"), seen=0)
    await fut
    assert result.pending == ["turn-later"] and asked == []  # nothing to decide on yet
    real_new_id = runtime_module.new_id
    monkeypatch.setattr(runtime_module, "new_id", lambda p: "turn-later" if p == "turn" else real_new_id(p))
    tid = await send(hub, requester="alice")
    await until(lambda: bool(hub.state.turns[tid].chunks))
    assert [(r.requester, r.matched_turn_ids, dict(r.turn_owners)) for r in asked] == \
        [("alice", [tid], {tid: "alice"})]
    assert not hub.turns[tid].aborted and "turn-later" not in hub.state.pending_cancels
    events = await settled(hub)
    verdicts = [e for e in events if isinstance(e, CancelResult) and e.request_id == result.request_id]
    assert verdicts[-1].rejected == [tid] and verdicts[-1].cancelled == []  # the requester is told
    gate.set()
    assert (await wait_end(hub, tid)).reason == "complete"


async def test_presence_says_offline_when_no_agent_runs_the_session(make_runtime) -> None:
    rt = make_runtime(None)
    hub = await rt.hub("s")
    tid = await send(hub)
    await wait_end(hub, tid)
    events = await settled(hub)
    assert [e.state for e in events if isinstance(e, Presence)][:1] == ["offline"]


# ----------------------------------------------------------------- idle eviction


async def test_idle_hubs_are_evicted_and_reload_from_the_log(make_runtime) -> None:
    gate = asyncio.Event()

    async def respond(turn: Turn) -> None:
        await turn.write("ok")
        if turn.input.parts[0]["text"] == "hold":
            await gate.wait()

    rt = make_runtime(respond, idle_evict_s=60.0)
    idle_hub = await rt.hub("idle")
    await wait_end(idle_hub, await send(idle_hub, "done"))
    busy_hub = await rt.hub("busy")
    held = await send(busy_hub, "hold")
    await until(lambda: idle_hub.idle, "idle")
    later = time.monotonic() + 61
    assert rt.evict_idle(now=later) == 1  # the one with a running turn stays
    assert rt.loaded("idle") is None and rt.loaded("busy") is busy_hub
    reloaded = await rt.hub("idle")
    assert reloaded is not idle_hub and reloaded.state.last_seq == idle_hub.state.last_seq
    assert [m.id for m in reloaded.state.branch()] == [m.id for m in idle_hub.state.branch()]
    gate.set()
    await wait_end(busy_hub, held)


async def test_an_evicted_hub_still_in_use_is_readmitted_unless_the_session_was_reloaded(make_runtime) -> None:
    rt = make_runtime(lambda turn: turn.write("ok"), idle_evict_s=60.0)
    hub = await rt.hub("s")
    await wait_end(hub, await send(hub, "one"))
    await until(lambda: hub.idle, "idle")
    assert rt.evict_idle(now=time.monotonic() + 61) == 1
    # A command that began before the eviction writes through the same hub,
    # which becomes the session's hub again: never two writers.
    await wait_end(hub, await send(hub, "two"))
    assert rt.loaded("s") is hub
    await until(lambda: hub.idle, "idle")
    assert rt.evict_idle(now=time.monotonic() + 61) == 1
    fresh = await rt.hub("s")
    assert fresh is not hub
    with pytest.raises(runtime_module.CommandError) as err:
        await hub.send("alice", [user_message("stale")])
    assert err.value.code == "conflict"
    await wait_end(fresh, await send(fresh, "three"))
    assert [e.seq for e in await settled(fresh)] == list(range(1, fresh.state.last_seq + 1))
