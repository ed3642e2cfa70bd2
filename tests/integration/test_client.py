"""The Python client against a real server on a loopback port.

The test agent (``Pacer``) writes ``w0 w1 w2 …``, one word per permit. Permits
come from the test (``agent.release(n)``, thread-safe: the agent runs on the
server's loop) or, with ``pace``, from a timer. So the test decides exactly
how far a turn has streamed; it waits on the client's view (``wait_for``),
never on the clock.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Callable

import httpx
import msgspec
import pytest

from turnline.client import ClientTransport, TurnlineError, View, message_text
from turnline.protocol import CancelEvent, ChunkEvent, Message, MessageEvent, TurnStart

from proxy import TcpProxy  # tests/integration is on sys.path (rootdir-relative import mode)

ANY_CANCEL = {"*": ["subscribe", "publish", "cancel", "cancel-any"]}
WAIT = 10.0


class Pacer:
    """A deterministic streaming agent.

    Each turn writes ``w0 ``, ``w1 ``, … (``words`` of them; ``None``: until
    aborted), one per permit (``release``) or one per ``pace`` seconds, and
    stops at the abort. It reports each word it wrote (``wrote``) and each turn
    it started (``next_start``) to the test's loop.
    """

    def __init__(self, words: int | None = 50, pace: float | None = None):
        self.words = words
        self.pace = pace
        self.gate = asyncio.Semaphore(0)  # used on the server's loop only
        self.server_loop: asyncio.AbstractEventLoop | None = None
        self.test_loop: asyncio.AbstractEventLoop | None = None
        self.started: asyncio.Queue[str] = asyncio.Queue()  # used on the test's loop only
        self.written: asyncio.Queue[str] = asyncio.Queue()  # idem

    def release(self, n: int = 1) -> None:
        assert self.server_loop is not None

        def go() -> None:
            for _ in range(n):
                self.gate.release()
        self.server_loop.call_soon_threadsafe(go)

    async def next_start(self) -> str:
        """The id of the next turn the agent started running."""
        return await asyncio.wait_for(self.started.get(), WAIT)

    async def wrote(self, word: str) -> None:
        """Wait until the agent has written ``word`` (the server appended it)."""
        while await asyncio.wait_for(self.written.get(), WAIT) != word:
            pass

    async def _permit(self, turn: Any) -> bool:
        if self.pace is not None:
            await asyncio.sleep(self.pace)
            return not turn.aborted
        acquire = asyncio.ensure_future(self.gate.acquire())
        aborted = asyncio.ensure_future(_aborted(turn))
        done, _ = await asyncio.wait({acquire, aborted}, return_when=asyncio.FIRST_COMPLETED)
        if acquire in done:
            aborted.cancel()
            return not turn.aborted
        acquire.cancel()
        return False

    async def respond(self, turn: Any) -> None:
        assert self.test_loop is not None
        self.test_loop.call_soon_threadsafe(self.started.put_nowait, turn.turn_id)
        i = 0
        while self.words is None or i < self.words:
            if not await self._permit(turn):
                break
            await turn.write(f"w{i} ")
            self.test_loop.call_soon_threadsafe(self.written.put_nowait, f"w{i}")
            i += 1


async def _aborted(turn: Any) -> None:
    await turn.abort_signal


def words(n: int, start: int = 0) -> str:
    return "".join(f"w{i} " for i in range(start, start + n))


def new_session() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def boot(serve: Callable[..., Any], **agent_kw: Any) -> tuple[Any, Pacer]:
    agent = Pacer(**agent_kw)
    agent.test_loop = asyncio.get_running_loop()
    srv = serve(agent=agent.respond)
    agent.server_loop = srv.loop
    return srv, agent


@pytest.fixture
async def clients() -> Any:
    """``make(srv, session, sub=…, caps=…, url=…, **kw)``: a transport whose
    view keeps every event; all are closed after the test (before the server)."""
    made: list[ClientTransport] = []

    def make(srv: Any, session: str, sub: str = "alice", caps: dict[str, list[str]] | None = None,
             url: str | None = None, **kw: Any) -> ClientTransport:
        t = ClientTransport(url or srv.ws, srv.token(sub, caps), session, view=View(session, keep_events=True),
                            **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        await t.close()


def text_of(view: View, turn_id: str) -> str:
    turn = view.core.turns.get(turn_id)
    return message_text(view.message(turn.message_id)) if turn is not None else ""


def store_events(srv: Any, session: str) -> list[Any]:
    return [r.event() for r in srv.call(srv.runtime.store.read(session))]


async def http_messages(srv: Any, session: str, token: str) -> list[Message]:
    async with httpx.AsyncClient(base_url=srv.http) as http:
        r = await http.get(f"/v1/sessions/{session}/messages", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return msgspec.convert(r.json()["messages"], list[Message])


async def caught_up(t: ClientTransport, srv: Any, session: str) -> list[Any]:
    """Wait until the view holds every event in the store; return the store's events."""
    events = store_events(srv, session)
    await t.wait_for(lambda v: v.last_seq >= events[-1].seq, WAIT)
    return events


# ---------------------------------------------------------------- streaming


async def test_send_streams_a_turn_that_ends_complete_with_the_folded_message(serve, clients) -> None:
    srv, agent = boot(serve, words=5)
    sid = new_session()
    t = clients(srv, sid)
    await t.connect()
    assert t.connected and t.client_id == "alice"

    sending = asyncio.ensure_future(t.send("hello"))
    await asyncio.sleep(0)  # one loop turn: the send has started, no answer can be back yet
    (mid,) = t.view.optimistic
    assert [m.id for m in t.view.messages()] == [mid]  # shown at once
    ack = await sending
    assert ack["message_ids"] == [mid]
    (turn_id,) = ack["turn_ids"]

    agent.release(2)
    await t.wait_for(lambda v: text_of(v, turn_id) == "w0 w1 ", WAIT)
    reply = t.view.core.turns[turn_id].message_id
    assert t.view.is_streaming(reply)
    assert [m.id for m in t.view.messages()] == [mid, reply]  # the live message on the branch

    agent.release(3)
    end = await t.wait_turn_end(turn_id, WAIT)
    assert end.reason == "complete"
    assert message_text(end.message) == words(5)
    assert all(p.get("state", "done") == "done" for p in end.message.parts)
    assert t.view.message(reply) == end.message
    assert t.view.optimistic == []
    shown = t.view.messages()
    assert [m.id for m in shown] == [mid, reply]
    assert shown[0] == t.view.core.messages[mid]  # the server's copy, once
    assert t.active_turns == {}
    assert await http_messages(srv, sid, srv.token("alice")) == shown


async def test_two_transports_on_one_session_see_the_same_events_in_the_same_order(serve, clients) -> None:
    srv, agent = boot(serve, words=20)
    sid = new_session()
    alice = clients(srv, sid, "alice")
    bob = clients(srv, sid, "bob")
    await alice.connect()
    (turn_id,) = (await alice.send("hi"))["turn_ids"]
    agent.release(5)
    await alice.wait_for(lambda v: text_of(v, turn_id) == words(5), WAIT)

    await bob.connect()  # joins mid-turn: catch-up from 0, then live
    assert text_of(bob.view, turn_id) == words(5)
    agent.release(15)
    await alice.wait_turn_end(turn_id, WAIT)
    await bob.wait_turn_end(turn_id, WAIT)

    events = await caught_up(alice, srv, sid)
    await caught_up(bob, srv, sid)
    assert alice.view.events == events
    assert bob.view.events == events
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert alice.view.messages() == bob.view.messages()


# ---------------------------------------------------------------- cancel


async def test_cancel_own_turn_persists_exactly_what_the_view_displayed(serve, clients) -> None:
    srv, agent = boot(serve, words=100)
    sid = new_session()
    async with TcpProxy(srv.port) as proxy:
        t = clients(srv, sid, url=proxy.ws_url())
        await t.connect()
        (turn_id,) = (await t.send("tell me a story"))["turn_ids"]
        agent.release(4)
        await t.wait_for(lambda v: text_of(v, turn_id) == words(4), WAIT)
        reply = t.view.core.turns[turn_id].message_id

        # the server runs ahead of the screen: three more words are in the log, not yet shown
        proxy.hold_downstream = True
        agent.release(3)
        await agent.wrote("w6")
        before = t.view.message(reply)
        seen = t.view.last_seq
        screens: list[Message | None] = []
        t.view.on_event(lambda ev: screens.append(t.view.message(reply)))

        cancelling = asyncio.ensure_future(t.cancel())
        await asyncio.sleep(0)  # the cancel has been sent, carrying what the screen shows
        assert t.view.frozen_at(turn_id) == seen
        displayed = t.view.message(reply)
        proxy.release_downstream()  # the tail arrives after the stop
        ack = await cancelling
        end = await t.wait_turn_end(turn_id, WAIT)

    assert ack["cancelled"] == [turn_id]
    tail = [c.chunk["delta"] for c in t.view.core.turns[turn_id].chunks
            if c.seq > seen and c.chunk["type"] == "text-delta"]
    assert tail == ["w4 ", "w5 ", "w6 "]  # in the log data, after seen…
    assert len(screens) >= 6 and all(s == displayed for s in screens)  # …never on the screen
    assert end.reason == "cancelled"
    assert message_text(before) == message_text(displayed) == message_text(end.message) == words(4)
    assert end.message == displayed  # character for character, parts and metadata
    assert end.message.metadata["interrupted"] == {"reason": "cancelled", "seen": seen}
    assert t.view.message(reply) == displayed
    persisted = {m.id: m for m in await http_messages(srv, sid, srv.token("alice"))}
    assert persisted[reply] == displayed


async def test_cancel_by_turn_id_of_another_clients_turn_needs_cancel_any(serve, clients) -> None:
    srv, _ = boot(serve, words=None, pace=0.005)
    sid = new_session()
    alice = clients(srv, sid, "alice")
    bob = clients(srv, sid, "bob")
    carol = clients(srv, sid, "carol", ANY_CANCEL)
    for c in (alice, bob, carol):
        await c.connect()
    (turn_id,) = (await alice.send("go"))["turn_ids"]
    await bob.wait_for(lambda v: len(text_of(v, turn_id)) > 0, WAIT)

    ack = await bob.cancel(turn_id=turn_id)
    assert ack["rejected"] == [turn_id] and ack["cancelled"] == []
    assert bob.view.frozen_at(turn_id) is None  # rejected: bob's screen streams on
    shown = len(text_of(bob.view, turn_id))
    await bob.wait_for(lambda v: len(text_of(v, turn_id)) > shown, WAIT)
    assert turn_id in bob.view.core.active

    ack = await carol.cancel(turn_id=turn_id)
    assert ack["cancelled"] == [turn_id]
    displayed = carol.view.message(carol.view.core.turns[turn_id].message_id)
    end = await alice.wait_turn_end(turn_id, WAIT)
    assert end.reason == "cancelled"
    assert end.message == displayed  # what carol saw is what is saved


async def test_cancel_by_client_id_or_all_without_cancel_any_is_forbidden(serve, clients) -> None:
    srv, _ = boot(serve, words=None, pace=0.005)
    sid = new_session()
    alice = clients(srv, sid, "alice")
    bob = clients(srv, sid, "bob")
    await alice.connect()
    await bob.connect()
    (turn_id,) = (await alice.send("go"))["turn_ids"]
    await bob.wait_for(lambda v: len(text_of(v, turn_id)) > 0, WAIT)

    for kwargs in ({"client_id": "alice"}, {"all": True}):
        with pytest.raises(TurnlineError) as info:
            await bob.cancel(**kwargs)
        assert info.value.code == "forbidden"
        assert bob.view.frozen_at(turn_id) is None  # refused: nothing frozen
        assert bob.view.is_streaming(bob.view.core.turns[turn_id].message_id)
    assert turn_id in alice.view.core.active
    # the connection stays usable after the refusals
    shown = len(text_of(bob.view, turn_id))
    await bob.wait_for(lambda v: len(text_of(v, turn_id)) > shown, WAIT)
    assert (await bob.cancel())["cancelled"] == []  # bob has no turns of his own


async def test_cancel_any_stops_one_clients_turns_then_all(serve, clients) -> None:
    srv, _ = boot(serve, words=None, pace=0.005)
    sid = new_session()
    alice = clients(srv, sid, "alice")
    bob = clients(srv, sid, "bob")
    carol = clients(srv, sid, "carol", ANY_CANCEL)
    for c in (alice, bob, carol):
        await c.connect()
    (ta,) = (await alice.send("a"))["turn_ids"]
    (tb,) = (await bob.send("b"))["turn_ids"]
    await carol.wait_for(lambda v: text_of(v, ta) and text_of(v, tb), WAIT)
    assert carol.active_turns == {"alice": {ta}, "bob": {tb}}

    ack = await carol.cancel(client_id="bob")
    assert ack["cancelled"] == [tb]
    assert (await bob.wait_turn_end(tb, WAIT)).reason == "cancelled"
    assert ta in carol.view.core.active

    ack = await carol.cancel(all=True)
    assert ack["cancelled"] == [ta]
    assert (await alice.wait_turn_end(ta, WAIT)).reason == "cancelled"
    await carol.wait_for(lambda v: not v.active_turns, WAIT)


async def test_close_with_cancel_own_cancels_the_own_turn(serve, clients) -> None:
    srv, agent = boot(serve, words=50)
    sid = new_session()
    alice = clients(srv, sid, "alice")
    observer = clients(srv, sid, "bob")
    await alice.connect()
    await observer.connect()
    (turn_id,) = (await alice.send("go"))["turn_ids"]
    agent.release(3)
    await alice.wait_for(lambda v: text_of(v, turn_id) == words(3), WAIT)
    seen = alice.view.last_seq

    await alice.close(cancel_own=True)
    assert alice.state == "closed"
    end = await observer.wait_turn_end(turn_id, WAIT)
    assert end.reason == "cancelled"
    assert end.message.metadata["interrupted"]["seen"] == seen
    assert message_text(end.message) == words(3)


async def test_close_without_cancel_own_leaves_the_turn_running(serve, clients) -> None:
    srv, agent = boot(serve, words=5)
    sid = new_session()
    alice = clients(srv, sid, "alice")
    observer = clients(srv, sid, "bob")
    await alice.connect()
    await observer.connect()
    (turn_id,) = (await alice.send("go"))["turn_ids"]
    agent.release(1)
    await observer.wait_for(lambda v: text_of(v, turn_id) == words(1), WAIT)
    await alice.close()
    with pytest.raises(TurnlineError):
        await alice.send("too late")
    agent.release(4)
    end = await observer.wait_turn_end(turn_id, WAIT)
    assert end.reason == "complete" and message_text(end.message) == words(5)


# ---------------------------------------------------------------- network drops


async def test_repeated_drops_mid_stream_lose_nothing_and_cancel_nothing(serve, clients) -> None:
    srv, agent = boot(serve, words=210)
    sid = new_session()
    async with TcpProxy(srv.port) as proxy:
        t = clients(srv, sid, url=proxy.ws_url())
        states: list[str] = []
        t.on_state(states.append)
        await t.connect()
        (turn_id,) = (await t.send("a long answer please"))["turn_ids"]

        released = 0
        for cut in range(1, 5):
            agent.release(25)
            released += 25
            # cut while frames are in flight: as soon as the first new word shows
            await t.wait_for(lambda v, n=released: len(text_of(v, turn_id).split()) > n - 25, WAIT)
            assert proxy.cut() == 1
            agent.release(25)  # the turn streams on while the client is away
            released += 25
            await t.wait_for(lambda v, k=cut: t.reconnects >= k and t.connected, WAIT)
            assert turn_id in t.view.core.active  # still mid-turn
        assert released == 200
        agent.release(10)

        end = await t.wait_turn_end(turn_id, WAIT)
        assert end.reason == "complete"  # a drop cancels nothing
        assert message_text(end.message) == words(210)
        events = await caught_up(t, srv, sid)

    assert t.view.events == events  # exactly the log: seqs 1..N, no gap, no duplicate
    assert [e.seq for e in t.view.events] == list(range(1, len(events) + 1))
    assert t.view.duplicates == 0 and t.view.gaps == 0
    assert not any(isinstance(e, CancelEvent) for e in events)
    assert t.reconnects == 4 and proxy.accepted == 5
    assert states == ["connecting", "connected"] + ["reconnecting", "connected"] * 4


async def test_a_free_running_stream_survives_drops_at_arbitrary_points(serve, clients) -> None:
    srv, _ = boot(serve, words=300, pace=0.001)
    sid = new_session()
    async with TcpProxy(srv.port) as proxy:
        t = clients(srv, sid, url=proxy.ws_url(), initial_backoff=0.01)
        await t.connect()
        (turn_id,) = (await t.send("go"))["turn_ids"]
        for cut in range(1, 4):
            await t.wait_for(lambda v, k=cut: turn_id in v.core.turns and len(v.core.turns[turn_id].chunks) >= 60 * k,
                             WAIT)
            proxy.cut()
            await t.wait_for(lambda v, k=cut: t.reconnects >= k and t.connected, WAIT)
        end = await t.wait_turn_end(turn_id, WAIT)
        events = await caught_up(t, srv, sid)
    assert end.reason == "complete" and message_text(end.message) == words(300)
    assert t.view.events == events
    assert t.view.duplicates == 0 and t.view.gaps == 0


async def test_cancel_on_disconnect_is_opt_in(serve, clients) -> None:
    srv, agent = boot(serve, words=50)
    sid = new_session()
    async with TcpProxy(srv.port) as proxy:
        t = clients(srv, sid, url=proxy.ws_url(), cancel_on_disconnect=True)
        observer = clients(srv, sid, "bob")
        await t.connect()
        await observer.connect()
        (turn_id,) = (await t.send("go"))["turn_ids"]
        agent.release(2)
        await observer.wait_for(lambda v: text_of(v, turn_id) == words(2), WAIT)
        proxy.cut()
        end = await observer.wait_turn_end(turn_id, WAIT)
        assert end.reason == "cancelled"
        assert (await t.wait_turn_end(turn_id, WAIT)).reason == "cancelled"  # seen after the reconnect


async def test_a_send_whose_ack_was_lost_is_resent_and_counts_once(serve, clients) -> None:
    srv, agent = boot(serve, words=3)
    sid = new_session()
    async with TcpProxy(srv.port) as proxy:
        t = clients(srv, sid, url=proxy.ws_url())
        await t.connect()
        proxy.mute_downstream = True  # the ack (and the events) will be lost
        sending = asyncio.ensure_future(t.send("exactly once"))
        turn_id = await agent.next_start()  # the server applied the send
        proxy.cut()
        proxy.mute_downstream = False
        ack = await asyncio.wait_for(sending, WAIT)
        assert ack["resent"] is True and ack["turn_ids"] == [turn_id]
        (mid,) = ack["message_ids"]
        agent.release(3)
        await t.wait_turn_end(turn_id, WAIT)
        events = await caught_up(t, srv, sid)

    assert [e.message.id for e in events if isinstance(e, MessageEvent)] == [mid]  # applied once
    assert [e.turn_id for e in events if isinstance(e, TurnStart)] == [turn_id]
    assert t.view.events == events
    assert [m.id for m in t.view.messages()][0] == mid and t.view.optimistic == []


async def test_a_regenerate_whose_ack_was_lost_is_not_applied_twice(serve, clients) -> None:
    srv, agent = boot(serve, words=1)
    sid = new_session()
    async with TcpProxy(srv.port) as proxy:
        t = clients(srv, sid, url=proxy.ws_url())
        await t.connect()
        (first,) = (await t.send("hi"))["turn_ids"]
        assert await agent.next_start() == first
        agent.release(1)
        end = await t.wait_turn_end(first, WAIT)

        proxy.mute_downstream = True
        regenerating = asyncio.ensure_future(t.regenerate(end.message.id))
        second = await agent.next_start()
        proxy.cut()
        proxy.mute_downstream = False
        ack = await asyncio.wait_for(regenerating, WAIT)
        assert ack["turn_ids"] == [second] and ack["resent"] is True
        agent.release(1)
        await t.wait_turn_end(second, WAIT)
        events = await caught_up(t, srv, sid)

    assert [e.turn_id for e in events if isinstance(e, TurnStart)] == [first, second]
    reply = t.view.core.turns[second].message_id
    assert t.view.siblings(reply) == [end.message.id, reply]


async def test_requests_made_while_disconnected_are_sent_after_the_reconnect(serve, clients) -> None:
    srv, agent = boot(serve, words=1)
    sid = new_session()
    tokens: list[str] = []

    async def fresh_token() -> str:  # a token source is asked once per connection
        tokens.append(srv.token("alice"))
        return tokens[-1]

    async with TcpProxy(srv.port) as proxy:
        t = ClientTransport(proxy.ws_url(), fresh_token, sid, initial_backoff=0.2)
        try:
            await t.connect()
            assert t.client_id == "alice"
            proxy.cut()
            await t.wait_for(lambda v: t.state == "reconnecting", WAIT)
            ack = await asyncio.wait_for(t.send("queued locally"), WAIT)
            assert "resent" not in ack  # written once, on the new connection
            (turn_id,) = ack["turn_ids"]
            agent.release(1)
            assert (await t.wait_turn_end(turn_id, WAIT)).reason == "complete"
            assert len(tokens) == 2 and t.reconnects == 1
            assert await t.ping() >= 0
        finally:
            await t.close()


async def test_a_live_only_subscription_starts_at_the_log_end(serve, clients) -> None:
    srv, agent = boot(serve, words=1)
    sid = new_session()
    alice = clients(srv, sid, "alice")
    await alice.connect()
    (t1,) = (await alice.send("before"))["turn_ids"]
    agent.release(1)
    await alice.wait_turn_end(t1, WAIT)
    history = store_events(srv, sid)

    late = clients(srv, sid, "bob", after=None)
    await late.connect()
    assert late.view.last_seq == history[-1].seq  # nothing replayed
    assert late.view.events == [] and late.view.messages() == []
    (t2,) = (await alice.send("after"))["turn_ids"]
    agent.release(1)
    end = await late.wait_turn_end(t2, WAIT)
    assert late.view.events[0].seq == history[-1].seq + 1
    assert late.view.message(end.message.id) == end.message


async def test_a_bad_token_is_refused_at_connect(serve, clients) -> None:
    srv, _ = boot(serve)
    t = ClientTransport(srv.ws, "not-a-token", new_session())
    with pytest.raises(TurnlineError) as info:
        await t.connect()
    assert info.value.code == "unauthorized"
    assert t.state == "idle"


async def test_chunks_and_events_stream_through_the_async_iterators(serve, clients) -> None:
    srv, agent = boot(serve, words=2)
    sid = new_session()
    t = clients(srv, sid)
    await t.connect()
    ends: list[Any] = []

    async def collect() -> None:
        async for ev in t.turn_ends():
            ends.append(ev)
            if len(ends) == 2:
                return

    collector = asyncio.ensure_future(collect())
    await asyncio.sleep(0)  # the collector is registered
    (t1,) = (await t.send("one"))["turn_ids"]
    agent.release(2)
    await t.wait_turn_end(t1, WAIT)
    (t2,) = (await t.send("two"))["turn_ids"]
    await t.cancel()
    await asyncio.wait_for(collector, WAIT)
    assert [(e.turn_id, e.reason) for e in ends] == [(t1, "complete"), (t2, "cancelled")]
    chunks = [e for e in t.view.events if isinstance(e, ChunkEvent) and e.turn_id == t1]
    assert "".join(c.chunk.get("delta", "") for c in chunks) == words(2)


async def test_a_gap_on_the_wire_is_healed_by_resubscribing(serve, clients) -> None:
    srv, agent = boot(serve, words=6)
    sid = new_session()
    t = clients(srv, sid)
    await t.connect()
    (turn_id,) = (await t.send("hi"))["turn_ids"]
    agent.release(3)
    await t.wait_for(lambda v: text_of(v, turn_id) == words(3), WAIT)

    lost: list[Any] = []
    receive = t._on_events

    def lossy(raws: Any) -> None:  # the next event is lost in transit, once
        raws = list(raws)
        if not lost and raws:
            lost.append(raws.pop(0))
        receive(raws)

    t._on_events = lossy  # type: ignore[method-assign]
    agent.release(3)
    end = await t.wait_turn_end(turn_id, WAIT)  # stalls forever unless the gap is healed
    events = await caught_up(t, srv, sid)
    assert lost and t.view.gaps >= 1 and t.gap_recoveries >= 1
    assert message_text(end.message) == words(6) == text_of(t.view, turn_id)
    assert t.view.events == events
