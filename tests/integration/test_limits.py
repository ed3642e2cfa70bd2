"""Limits with stable answers (docs/limits.md), on one node, against a real server.

Time is the test's: the server's limiter and voice gateway read a clock the
test replaces (``limiter.clock``, ``voice.clock``), so a bucket refills
exactly when the test moves that clock, never while it waits. Turns are held
open at a gate, so the number running is the test's too.

- a flood of 200 sends on one session: at most the turn limit starts, the
  bucket grants exactly its burst, every other send is answered
  ``rate_limited`` with its ``limit`` and ``retry_after_ms``, nothing refused
  reaches the log, and the session and connection keep working: after the
  ``retry_after_ms`` it was told, a send starts a turn;
- HTTP: 429 with ``Retry-After`` and the usual error body on
  ``POST /v1/sessions/{id}/messages`` and ``/api/chat`` (sends and turns);
- cancels per client, subscriptions per connection, connections per client,
  audio bytes per second per voice peer: one test each;
- every refusal is counted in ``turnline_limit_refusals_total{limit=…}`` on /metrics.

Across gateways on Redis: test_limits_cluster.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed

from turnline.agent import RuntimeConfig
from turnline.core.limits import LimitsConfig
from wsraw import RawWS, held_agent, settled_log

S = "limits"


class Clock:
    """A clock the server's limiter reads; it moves only when the test says."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms / 1000


def limited(serve: Any, agent: Any, **limits: Any) -> tuple[Any, Clock]:
    """A server with ``limits`` (the rest default) whose limiter reads a test clock."""
    srv = serve(agent=agent, config=RuntimeConfig(limits=LimitsConfig(**limits)))
    clock = Clock()
    srv.server.config.app.limiter.clock = clock
    return srv, clock


def say(session: str, text: str) -> dict[str, Any]:
    return {"op": "send", "session": session, "messages": [{"parts": [{"type": "text", "text": text}]}]}


def refusals(srv: Any) -> dict[str, float]:
    """``turnline_limit_refusals_total`` by limit, as /metrics shows it."""
    text = httpx.get(f"{srv.http}/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("turnline_limit_refusals_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('limit="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def assert_refusal(frame: dict[str, Any], limit: str) -> None:
    assert frame["op"] == "error" and frame["code"] == "rate_limited", frame
    assert frame["limit"] == limit, frame
    assert isinstance(frame["retry_after_ms"], int) and frame["retry_after_ms"] >= 1, frame
    assert frame["message"], frame


async def test_a_flood_on_one_session_starts_at_most_the_limit_and_the_rest_is_refused(serve, gate) -> None:
    srv, clock = limited(serve, held_agent(gate), max_turns_per_session=8, send_rate=1, send_burst=30)
    async with await RawWS.open(srv.ws, srv.token()) as ws:
        await ws.subscribe(S)
        ids = [await ws.send(say(S, f"hold {i}")) for i in range(200)]  # back to back, no waiting
        replies = [await ws.reply(i) for i in ids]
        acks = [r for r in replies if r["op"] == "ack"]
        refused = [r for r in replies if r["op"] == "error"]
        # The clock stood still: the bucket granted its burst (30) and no more;
        # of those, 8 started turns (held open) and 22 met the turn limit.
        assert len(acks) == 8 and all(len(a["turn_ids"]) == 1 for a in acks)
        for r in refused:
            assert_refusal(r, r.get("limit"))
        by_limit = {name: [r for r in refused if r["limit"] == name] for name in ("turns", "sends")}
        assert len(by_limit["turns"]) == 22 and len(by_limit["sends"]) == 170
        assert len(refused) == 192
        # In order: the first 30 drew tokens, the rest found the bucket empty.
        assert all(r["limit"] == "sends" for r in replies[30:])
        # A refused send appended nothing: the log holds 8 messages and 8 turn-starts.
        log = await settled_log(srv, S)
        assert len([e for e in log if e["type"] == "message"]) == 8
        assert len([e for e in log if e["type"] == "turn-start"]) == 8
        assert len([e for e in log if e["type"] == "rejected"]) == 0
        assert refusals(srv) == {"turns": 22.0, "sends": 170.0}

        # The session works on: the held turns finish...
        gate.open(srv)
        for a in acks:
            end = await ws.turn_end(S, a["turn_ids"][0])
            assert end["reason"] == "complete"
        # ...the bucket is still empty (no time passed)...
        wait = await ws.request(say(S, "after"))
        assert_refusal(wait, "sends")
        # ...and once the time it named has passed, the same send starts a turn.
        clock.advance(wait["retry_after_ms"])
        ack = await ws.ok(say(S, "after"))
        assert (await ws.turn_end(S, ack["turn_ids"][0]))["reason"] == "complete"
        await ws.ping()


async def test_interrupt_frees_the_slot_it_takes_and_queue_is_not_a_running_turn(serve, gate) -> None:
    srv, _ = limited(serve, held_agent(gate), max_turns_per_session=2, send_rate=0)
    async with await RawWS.open(srv.ws, srv.token()) as ws:
        await ws.subscribe(S)
        running = [(await ws.ok(say(S, f"hold {i}")))["turn_ids"][0] for i in (1, 2)]
        assert_refusal(await ws.request(say(S, "hold 3")), "turns")
        # interrupt cancels this client's running turns first: the new turn fits.
        interrupted = await ws.ok({**say(S, "hold 4"), "policy": "interrupt"})
        assert sorted(interrupted["cancelled"]) == sorted(running)
        assert len(interrupted["turn_ids"]) == 1
        # queue waits for the running turns instead: no turn is started, nothing refused.
        queued = await ws.ok({**say(S, "hold 5"), "policy": "queue"})
        assert queued["turn_ids"] == [] and len(queued["queued"]) == 1
        gate.open(srv)
        await ws.turn_end(S, queued["queued"][0], 10)


def test_http_sends_over_a_limit_get_429_with_retry_after(serve, gate) -> None:
    srv, clock = limited(serve, held_agent(gate), max_turns_per_session=1, send_rate=0.5, send_burst=2)
    headers = {"authorization": f"Bearer {srv.token()}"}
    body = {"messages": [{"parts": [{"type": "text", "text": "hold"}]}]}
    with httpx.Client(base_url=srv.http, headers=headers) as client:
        assert client.post(f"/v1/sessions/{S}/messages", json=body).status_code == 200
        # The session runs its one turn: the next send is over the turn limit.
        r = client.post(f"/v1/sessions/{S}/messages", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["code"] == "rate_limited" and error["limit"] == "turns" and error["retry_after_ms"] == 1000
        # The bucket (burst 2) is empty now: the sends limit, at 0.5/s a 2 s wait.
        r = client.post(f"/v1/sessions/{S}/messages", json=body)
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error == {"code": "rate_limited", "message": error["message"], "limit": "sends",
                         "retry_after_ms": 2000}
        assert r.headers["retry-after"] == "2"
        # The AI SDK route answers the same.
        chat = {"id": "chat-limits", "trigger": "submit-message",
                "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
        r = client.post("/api/chat", json=chat)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["limit"] == "sends"
        clock.advance(2000)
        r = client.post("/api/chat", json=chat)  # a token again, and a session with no turn running
        assert r.status_code == 200 and "[DONE]" in r.text
    assert refusals(srv) == {"turns": 1.0, "sends": 2.0}


async def test_cancels_per_client_are_limited(serve, gate) -> None:
    srv, clock = limited(serve, held_agent(gate), cancel_rate=1, cancel_burst=2)
    cancel = {"op": "cancel", "session": S}  # own turns: none yet, so each is a no-op (still a cancel)
    async with await RawWS.open(srv.ws, srv.token()) as ws, await RawWS.open(srv.ws, srv.token("bob")) as bob:
        await ws.subscribe(S)
        await ws.completes(S, "hello")  # the session exists, nothing runs
        await ws.ok(cancel)
        await ws.ok(cancel)
        refused = await ws.request(cancel)
        assert_refusal(refused, "cancels")
        assert refused["retry_after_ms"] == 1000
        # Another client has its own bucket.
        await bob.ok(cancel)
        r = httpx.post(f"{srv.http}/v1/sessions/{S}/cancel", json={},
                       headers={"authorization": f"Bearer {srv.token()}"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["limit"] == "cancels"
        # After the wait it named, a cancel goes through (and stops a turn).
        clock.advance(1000)
        turn = (await ws.ok(say(S, "hold")))["turn_ids"][0]
        assert (await ws.ok({**cancel, "filter": {"turn_id": turn}}))["cancelled"] == [turn]
        assert (await ws.turn_end(S, turn))["reason"] == "cancelled"
    assert refusals(srv) == {"cancels": 2.0}


async def test_subscriptions_per_connection_are_limited(serve) -> None:
    srv, _ = limited(serve, lambda turn: "hi", max_subscriptions=2)
    async with await RawWS.open(srv.ws, srv.token()) as ws, await RawWS.open(srv.ws, srv.token()) as other:
        await ws.subscribe("s1")
        await ws.subscribe("s2")
        assert_refusal(await ws.request({"op": "subscribe", "session": "s3"}), "subscriptions")
        await ws.subscribe("s1")  # following one again is no new subscription
        await other.subscribe("s3")  # the limit is per connection
        await ws.ok({"op": "unsubscribe", "session": "s2"})
        await ws.subscribe("s3")
        await ws.ping()
    assert refusals(srv) == {"subscriptions": 1.0}


async def test_connections_per_client_are_limited(serve) -> None:
    srv, _ = limited(serve, lambda turn: "hi", max_connections_per_client=2)
    limiter = srv.server.config.app.limiter
    first, second = await RawWS.open(srv.ws, srv.token()), await RawWS.open(srv.ws, srv.token())
    await first.ping()
    await second.ping()
    third = await RawWS.open(srv.ws, srv.token())
    await third.wait_until(lambda: third.closed is not None, what="the close")
    (error,) = third.errors
    assert_refusal(error, "connections")
    assert isinstance(third.closed, ConnectionClosed) and third.closed.rcvd.code == 4429
    # Another client is counted apart.
    async with await RawWS.open(srv.ws, srv.token("bob")) as bob:
        await bob.ping()
    # A closed connection gives its slot back.
    await first.close()

    async def count() -> int:
        return limiter.connections("alice")

    async with asyncio.timeout(5):
        while srv.call(count()) != 1:
            await asyncio.sleep(0.01)
    async with await RawWS.open(srv.ws, srv.token()) as again:
        await again.ping()
    await second.close()
    assert refusals(srv) == {"connections": 1.0}


async def test_audio_bytes_per_second_per_voice_peer_are_limited(serve, gate) -> None:
    from turnline.protocol_audio import audio_in
    from turnline.voice import install_voice
    from voicews import VoicePeer

    frame = bytes(640)  # 20 ms of 16 kHz PCM16
    srv, _ = limited(serve, held_agent(gate), audio_bytes_per_s=32_000, audio_burst_bytes=640 * 10)

    async def install() -> Any:
        return install_voice(srv.server.config.app)

    voice = srv.call(install())
    clock = Clock()
    voice.clock = clock
    async with await VoicePeer.open(srv.ws, srv.token()) as ws:
        await ws.subscribe(S)
        await ws.ok({"op": "voice-start", "session": S})
        for i in range(15):
            await ws.send_raw(audio_in(S, frame, i, i * 20))
        await ws.barrier()
        # The burst took ten frames; the next five were dropped, each answered.
        assert len(ws.errors) == 5
        for e in ws.errors:
            assert_refusal(e, "audio")
            assert e["session"] == S
        assert ws.errors[0]["retry_after_ms"] == 20  # one frame's worth at 32,000 B/s
        clock.advance(20)
        await ws.send_raw(audio_in(S, frame, 15, 300))
        await ws.barrier()
        assert len(ws.errors) == 5  # accepted
        await ws.ok({"op": "voice-stop", "session": S})
    assert refusals(srv) == {"audio": 5.0}


async def test_with_every_limit_off_nothing_is_refused(serve, gate) -> None:
    srv = serve(agent=held_agent(gate), config=RuntimeConfig(limits=LimitsConfig.off()))
    async with await RawWS.open(srv.ws, srv.token()) as ws:
        await ws.subscribe(S)
        ids = [await ws.send(say(S, f"hold {i}")) for i in range(60)]
        replies = [await ws.reply(i) for i in ids]
        assert all(r["op"] == "ack" for r in replies), [r for r in replies if r["op"] != "ack"][:1]
        gate.open(srv)
    assert refusals(srv) == {}


async def test_voice_transcripts_and_interrupts_count_as_sends_and_cancels(serve, gate) -> None:
    from turnline.voice import VoiceConfig, install_voice
    from voicews import VoicePeer

    srv, clock = limited(serve, held_agent(gate), max_turns_per_session=1, send_rate=1, send_burst=1,
                         cancel_rate=1, cancel_burst=1)

    async def install() -> Any:
        return install_voice(srv.server.config.app, VoiceConfig(send_policy="concurrent"))

    srv.call(install())
    async with await VoicePeer.open(srv.ws, srv.token()) as ws, await RawWS.open(srv.ws, srv.token("bob")) as bob:
        await ws.subscribe(S)
        await ws.ok({"op": "voice-start", "session": S})
        interrupt = {"op": "interrupt", "session": S, "mode": "speech"}
        await ws.ok(interrupt)  # (nothing plays: a no-op, still a cancel)
        assert_refusal(await ws.request(interrupt), "cancels")
        await ws.ok({"op": "transcript", "session": S, "text": "not final", "final": False})  # not a send
        await ws.ok({"op": "transcript", "session": S, "text": "hello"})
        await ws.wait_event(S, "turn-end")
        assert_refusal(await ws.request({"op": "transcript", "session": S, "text": "again"}), "sends")
        clock.advance(1000)
        # Bob's turn runs (he holds the one slot; alice may not cancel it): alice's next
        # utterance is refused when the voice pipeline sends it, and her peer is told
        # (an error without id, naming the session).
        await bob.subscribe(S)
        await bob.ok(say(S, "hold"))
        await ws.ok({"op": "transcript", "session": S, "text": "hold three"})
        error = await ws.wait_until(lambda: next((e for e in ws.errors if e.get("id") is None), None))
        assert_refusal(error, "turns")
        assert error["session"] == S
        gate.open(srv)
    assert refusals(srv) == {"sends": 1.0, "turns": 1.0, "cancels": 1.0}
    log = await settled_log(srv, S)
    assert [e["message"]["parts"][0]["text"] for e in log if e["type"] == "message" and
            e["message"]["role"] == "user"] == ["hello", "hold"]


async def test_ag_ui_runs_and_cancels_count_as_sends_and_cancels(serve, gate) -> None:
    srv, clock = limited(serve, held_agent(gate), send_rate=0.5, send_burst=1, cancel_rate=0.5, cancel_burst=1)
    headers = {"authorization": f"Bearer {srv.token()}"}

    def run_input(message_id: str) -> dict[str, Any]:
        return {"threadId": S, "runId": f"run-{message_id}", "state": None, "tools": [], "context": [],
                "forwardedProps": {}, "messages": [{"id": message_id, "role": "user", "content": "hold"}]}

    async with httpx.AsyncClient(base_url=srv.http, headers=headers, timeout=10) as client:
        async with client.stream("POST", "/ag-ui", json=run_input("m1")) as first:
            assert first.status_code == 200
            r = await client.post("/ag-ui", json=run_input("m2"))
            assert r.status_code == 429 and r.headers["retry-after"] == "2"
            assert r.json()["error"]["limit"] == "sends"
            assert (await client.post(f"/ag-ui/{S}/cancel", json={"runId": "run-m1"})).status_code == 200
            r = await client.post(f"/ag-ui/{S}/cancel", json={"runId": "run-m1"})
            assert r.status_code == 429 and r.json()["error"]["limit"] == "cancels"
    assert refusals(srv) == {"sends": 1.0, "cancels": 1.0}
    assert [e["type"] for e in await settled_log(srv, S)].count("turn-start") == 1
