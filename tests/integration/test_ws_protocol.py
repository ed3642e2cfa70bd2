"""The WebSocket wire contract (PROTOCOL.md, ``GET /v1/ws``) against a real server.

Invariant 8 (bad input is answered, not absorbed): every error code a client
can provoke is provoked here, the ``error`` frame is checked (``code``, and the
frame's ``id`` quoted when the frame had one), and then the *same* connection
must still work: ping → pong, and a send on the session starts a turn that
completes. The stored log must stay exactly what the good frames produced.

Error codes a client cannot trigger today, so they are not provoked here:

- ``rate_limited``: the server has no rate limiter yet (nothing in
  ``turnline.server`` emits it; it is reserved in the stable list).
- ``internal``: only a server bug or a failing store produces it (a frame
  handler raising an unexpected exception, a store append failing, a
  subscription's feed failing). No well-formed or malformed client input
  reaches those paths; they are covered by store fault-injection tests, not
  by wire input.

Also pinned: ``subscribe`` cursors (``after=0`` replays from seq 1, no
``after`` is live only), seq order without gap across concurrent turns
(invariant 1), identity from the token only (invariant 7), and a dropped
socket cancels nothing unless the client opted in with
``?cancel_on_disconnect=1`` (invariant 6).

Ordering is controlled with a :class:`Gate` the agent waits at and with the
server's acks and events; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from wsraw import Gate, RawWS, assert_gapless, settled_log, text_of

S = "chat-1"


def make_agent(gate: Gate) -> Any:
    """``hold …`` streams one word then waits at the gate; ``words N`` streams N
    words; anything else streams two words."""

    async def agent(turn: Any):  # an async generator: each yield is streamed
        prompt = " ".join(p.get("text", "") for p in turn.input.parts)
        if prompt.startswith("hold"):
            yield "held "
            await gate.wait()
            yield "released"
        elif prompt.startswith("words"):
            for i in range(int(prompt.split()[1])):
                await asyncio.sleep(0.0005)
                yield f"w{i} "
        else:
            yield "hi "
            yield "there"

    return agent


@pytest.fixture
def srv(serve: Any, gate: Gate) -> Any:
    return serve(agent=make_agent(gate))


def stored(srv: Any, session: str) -> list[dict[str, Any]]:
    return [json.loads(r.data) for r in srv.call(srv.runtime.store.read(session, 0))]


async def connected(srv: Any, sub: str = "alice", caps: dict[str, list[str]] | None = None,
                    query: str = "") -> RawWS:
    return await RawWS.open(srv.ws, srv.token(sub, caps), query=query)


async def assert_usable(ws: RawWS, srv: Any, session: str = S) -> None:
    """The connection answers a ping, a send starts a turn that completes, and
    what this connection received of ``session`` is exactly the stored log."""
    await ws.ping()
    await ws.completes(session)
    log = await settled_log(srv, session)
    assert_gapless(log)
    await ws.wait_until(lambda: len(ws.events[session]) >= len(log), what="all stored events")
    assert ws.events[session] == log


# ---------------------------------------------------------------- bad_json


async def test_bad_json_is_answered_and_connection_survives(srv: Any) -> None:
    ws = await connected(srv)
    await ws.subscribe(S)
    for n, garbage in enumerate(['{"op": "ping", "id": "j1"', "not json at all", '{"op":"send",}', "\u00e9"]):
        await ws.send_raw(garbage)
        err = await ws.next_error(n)
        assert err["op"] == "error" and err["code"] == "bad_json", err
        assert err["id"] is None  # nothing could be parsed, so there is no id to quote
        assert err["message"]
    await assert_usable(ws, srv)
    await ws.close()


# ---------------------------------------------------------------- bad_frame


BAD_FRAMES = [
    pytest.param({"op": "subscribe", "id": "bf1", "session": 5}, "bf1", id="wrong-type-session"),
    pytest.param({"op": "subscribe", "id": 41, "session": S, "after": "zero"}, 41, id="wrong-type-after"),
    pytest.param({"op": "subscribe", "id": "bf2", "session": S, "after": -1}, "bf2", id="negative-after"),
    pytest.param({"op": "send", "id": "bf3", "session": S}, "bf3", id="missing-messages"),
    pytest.param({"op": "send", "id": "bf4", "messages": [{"parts": []}]}, "bf4", id="missing-session"),
    pytest.param({"op": "send", "id": "bf5", "session": S, "messages": []}, "bf5", id="empty-messages"),
    pytest.param({"op": "send", "id": "bf6", "session": S, "messages": [{"parts": "hi"}]}, "bf6",
                 id="parts-not-a-list"),
    pytest.param({"op": "send", "id": "bf7", "session": S, "messages": [{"parts": []}], "policy": "yolo"},
                 "bf7", id="unknown-policy"),
    pytest.param({"op": "cancel", "id": "bf8", "session": S, "filter": {"own": True, "all": True}}, "bf8",
                 id="filter-two-scopes"),
    pytest.param({"op": "cancel", "id": "bf9", "session": S, "filter": {"turn_id": "t1", "client_id": "bob"}},
                 "bf9", id="filter-turn-and-client"),
    pytest.param({"op": "cancel", "id": "bf10", "session": S, "filter": {"everyone": True}}, "bf10",
                 id="filter-unknown-scope"),
    pytest.param([{"op": "ping", "id": "bf11"}], None, id="json-array"),
    pytest.param("ping", None, id="json-string"),
    pytest.param(17, None, id="json-number"),
    pytest.param({"op": "ping", "id": ["x"]}, None, id="id-not-scalar"),
]


@pytest.mark.parametrize("frame, quoted", BAD_FRAMES)
async def test_bad_frame(srv: Any, frame: Any, quoted: Any) -> None:
    ws = await connected(srv)
    await ws.subscribe(S)
    await ws.send_raw(json.dumps(frame))
    err = await ws.next_error(0)
    assert err["code"] == "bad_frame", err
    assert err["id"] == quoted, err
    assert err["message"]
    await assert_usable(ws, srv)
    await ws.close()


async def test_binary_frame_is_bad_frame(srv: Any) -> None:
    ws = await connected(srv)
    await ws.subscribe(S)
    await ws.send_raw(b"\x00\x01 not audio this server understands")
    err = await ws.next_error(0)
    assert err["code"] == "bad_frame" and err["id"] is None, err
    await assert_usable(ws, srv)
    await ws.close()


# ---------------------------------------------------------------- unknown_op


@pytest.mark.parametrize("frame, quoted", [
    ({"op": "launch", "id": "u1", "session": S}, "u1"),
    ({"op": "PING", "id": 99}, 99),
    ({"id": "u2", "session": S}, "u2"),  # no op at all
    ({"op": None, "id": "u3"}, "u3"),
])
async def test_unknown_op(srv: Any, frame: dict[str, Any], quoted: Any) -> None:
    ws = await connected(srv)
    await ws.subscribe(S)
    await ws.send_raw(json.dumps(frame))
    err = await ws.next_error(0)
    assert err["code"] == "unknown_op" and err["id"] == quoted, err
    await assert_usable(ws, srv)
    await ws.close()


# ---------------------------------------------------------------- too_large


async def test_too_large(serve: Any, gate: Gate) -> None:
    srv = serve(agent=make_agent(gate), server_config={"max_frame_bytes": 4096})
    ws = await connected(srv)
    await ws.subscribe(S)
    # Over the limit in characters.
    big = {"op": "send", "id": "big1", "session": S,
           "messages": [{"id": "m-big", "parts": [{"type": "text", "text": "x" * 5000}]}]}
    err = await ws.fails(big, "too_large")
    assert err["id"] == "big1"
    # Under the limit in characters but over it in bytes: the limit is on bytes.
    wide = {"op": "send", "id": "big2", "session": S,
            "messages": [{"id": "m-wide", "parts": [{"type": "text", "text": "\u20ac" * 2000}]}]}
    assert len(json.dumps(wide, ensure_ascii=False)) < 4096 < len(json.dumps(wide, ensure_ascii=False).encode())
    await ws.send_raw(json.dumps(wide, ensure_ascii=False))
    err = await ws.reply("big2")
    assert err["op"] == "error" and err["code"] == "too_large", err
    # A frame of exactly the limit is accepted.
    exact = {"op": "send", "id": "big3", "session": S,
             "messages": [{"id": "m-exact", "parts": [{"type": "text", "text": ""}]}]}
    pad = 4096 - len(json.dumps(exact).encode())
    exact["messages"][0]["parts"][0]["text"] = "y" * pad
    assert len(json.dumps(exact).encode()) == 4096
    ack = await ws.ok(exact)
    await ws.turn_end(S, ack["turn_ids"][0])
    await assert_usable(ws, srv)
    ids = [e["message"]["id"] for e in stored(srv, S) if e["type"] == "message"]
    assert "m-big" not in ids and "m-wide" not in ids
    await ws.close()


# ---------------------------------------------------------------- bad_id


@pytest.mark.parametrize("frame", [
    {"op": "subscribe", "session": "chat 1"},
    {"op": "subscribe", "session": "c" * 200},
    {"op": "subscribe", "session": ""},
    {"op": "send", "session": "a/b", "messages": [{"parts": [{"type": "text", "text": "hi"}]}]},
    {"op": "send", "session": S, "messages": [{"id": "has space", "parts": [{"type": "text", "text": "hi"}]}]},
    {"op": "send", "session": S, "parent_id": "p" * 129, "messages": [{"parts": [{"type": "text", "text": "x"}]}]},
    {"op": "cancel", "session": S, "filter": {"turn_id": "t\n1"}},
    {"op": "regenerate", "session": S, "message_id": "m?1"},
], ids=["space", "200-chars", "empty", "slash", "message-id", "parent-id", "turn-id", "regenerate-id"])
async def test_bad_id(srv: Any, frame: dict[str, Any]) -> None:
    ws = await connected(srv)
    await ws.subscribe(S)
    err = await ws.fails({**frame, "id": "bid"}, "bad_id")
    assert err["id"] == "bid"
    await assert_usable(ws, srv)
    assert all(e["type"] != "message" or e["message"]["id"] != "has space" for e in stored(srv, S))
    await ws.close()


# ---------------------------------------------------------------- unauthorized


@pytest.mark.parametrize("how", ["no-token", "garbage-token", "bearer-empty"])
async def test_unauthorized_at_connect(srv: Any, how: str) -> None:
    if how == "no-token":
        ws = await RawWS.open(srv.ws)
    elif how == "garbage-token":
        ws = await RawWS.open(srv.ws, "not.a.jwt")
    else:
        ws = await RawWS.open(srv.ws, headers={"Authorization": "Bearer "})
    err = await ws.next_error(0)
    assert err["code"] == "unauthorized" and err["id"] is None, err
    await ws.wait_until(lambda: ws.closed is not None and ws._reader.done(), what="close")
    assert ws.closed.rcvd is not None and ws.closed.rcvd.code == 4401, ws.closed
    assert ws.events == {} and ws.pongs == 0
    # The server is fine: a connection with a good token works.
    good = await connected(srv)
    await good.subscribe(S)
    await assert_usable(good, srv)
    await good.close()


async def test_frames_before_auth_close_are_not_executed(srv: Any) -> None:
    """A client without a valid token cannot get a frame executed by racing the close."""
    ws = await RawWS.open(srv.ws, "bad")
    send = {"op": "send", "id": "x", "session": S, "messages": [{"parts": [{"type": "text", "text": "hi"}]}]}
    try:
        for _ in range(3):
            await ws.send_raw(json.dumps(send))
    except Exception:
        pass  # the server may already have closed
    await ws.wait_until(lambda: ws.closed is not None and ws._reader.done(), what="close")
    assert "x" not in ws.replies
    assert stored(srv, S) == []


# ---------------------------------------------------------------- forbidden


LIMITED = {"ok-*": ["subscribe", "publish", "cancel"], "ro-*": ["subscribe"]}


async def test_forbidden_publish_and_cancel(srv: Any, gate: Gate) -> None:
    ws = await connected(srv, "carol", LIMITED)
    await ws.subscribe("ok-1")
    # Subscribe-only session: reading works, writing is refused explicitly.
    await ws.subscribe("ro-1")
    err = await ws.fails({"op": "send", "id": "fs1", "session": "ro-1",
                          "messages": [{"parts": [{"type": "text", "text": "hi"}]}]}, "forbidden")
    assert err["id"] == "fs1"
    err = await ws.fails({"op": "cancel", "id": "fs2", "session": "ro-1"}, "forbidden")
    assert err["id"] == "fs2"
    err = await ws.fails({"op": "regenerate", "id": "fs3", "session": "ro-1", "message_id": "m1"}, "forbidden")
    assert err["id"] == "fs3"
    # No rights at all on an unlisted session.
    await ws.fails({"op": "subscribe", "id": "fs4", "session": "zz-1"}, "forbidden")
    assert stored(srv, "ro-1") == [] and stored(srv, "zz-1") == []
    await assert_usable(ws, srv, "ok-1")
    await ws.close()


async def test_forbidden_cancel_all_without_cancel_any(srv: Any, gate: Gate) -> None:
    bob = await connected(srv, "bob")
    await bob.subscribe("ok-2")
    carol = await connected(srv, "carol", LIMITED)
    await carol.subscribe("ok-2")
    bob_ack = await bob.say("ok-2", "hold b")
    (bob_turn,) = bob_ack["turn_ids"]
    carol_ack = await carol.say("ok-2", "hold c")
    (carol_turn,) = carol_ack["turn_ids"]
    await carol.wait_event("ok-2", "chunk", turn_id=bob_turn)

    err = await carol.fails({"op": "cancel", "id": "ca1", "session": "ok-2", "filter": {"all": True}}, "forbidden")
    assert err["id"] == "ca1"
    err = await carol.fails({"op": "cancel", "id": "ca2", "session": "ok-2", "filter": {"client_id": "bob"}},
                            "forbidden")
    assert err["id"] == "ca2"
    # Naming bob's turn is allowed to be asked, and the refusal is reported (never silent).
    ack = await carol.ok({"op": "cancel", "session": "ok-2", "filter": {"turn_id": bob_turn}})
    assert ack["rejected"] == [bob_turn] and ack["cancelled"] == [], ack
    # Nothing was cancelled: both turns still run; carol's own cancel works.
    assert not carol.find("ok-2", "turn-end")
    ack = await carol.ok({"op": "cancel", "session": "ok-2"})
    assert ack["cancelled"] == [carol_turn], ack
    assert (await carol.turn_end("ok-2", carol_turn))["reason"] == "cancelled"
    gate.open(srv)
    assert (await carol.turn_end("ok-2", bob_turn))["reason"] == "complete"
    await assert_usable(carol, srv, "ok-2")
    await carol.close()
    await bob.close()


# ---------------------------------------------------------------- not_found


async def test_not_found(srv: Any) -> None:
    ws = await connected(srv)
    await ws.subscribe(S)
    await ws.completes(S)
    checks = [
        ({"op": "cancel", "id": "nf1", "session": "ghost-1"}, "nf1"),
        ({"op": "cancel", "id": "nf2", "session": "ghost-1", "filter": {"turn_id": "turn-x"}}, "nf2"),
        ({"op": "regenerate", "id": "nf3", "session": S, "message_id": "no-such-message"}, "nf3"),
        ({"op": "regenerate", "id": "nf4", "session": "ghost-2", "message_id": "m1"}, "nf4"),
        ({"op": "unsubscribe", "id": "nf5", "session": "never-subscribed"}, "nf5"),
        ({"op": "send", "id": "nf6", "session": S, "parent_id": "no-such-parent",
          "messages": [{"parts": [{"type": "text", "text": "hi"}]}]}, "nf6"),
        ({"op": "send", "id": "nf7", "session": S, "steer": "turn-not-running",
          "messages": [{"parts": [{"type": "text", "text": "hi"}]}]}, "nf7"),
    ]
    before = await settled_log(srv, S)
    for frame, quoted in checks:
        err = await ws.fails(frame, "not_found")
        assert err["id"] == quoted
    assert await settled_log(srv, S) == before  # refused frames stored nothing
    # Probing unknown sessions does not create them.
    assert not srv.call(srv.runtime.store.exists("ghost-1"))
    assert not srv.call(srv.runtime.store.exists("ghost-2"))
    # Unsubscribe twice: the second is not_found.
    await ws.subscribe("other-1")
    await ws.ok({"op": "unsubscribe", "session": "other-1"})
    await ws.fails({"op": "unsubscribe", "session": "other-1"}, "not_found")
    await assert_usable(ws, srv)
    await ws.close()


# ---------------------------------------------------------------- conflict


async def test_conflict_on_existing_message_id(srv: Any) -> None:
    ws = await connected(srv)
    await ws.subscribe(S)
    ack = await ws.say(S, "first", message_id="m-1")
    assert ack["op"] == "ack" and ack["message_ids"] == ["m-1"]
    await ws.turn_end(S, ack["turn_ids"][0])
    err = await ws.fails({"op": "send", "id": "cf1", "session": S,
                          "messages": [{"id": "m-1", "parts": [{"type": "text", "text": "again"}]}]}, "conflict")
    assert err["id"] == "cf1"
    # Two messages with the same id in one frame.
    err = await ws.fails({"op": "send", "id": "cf2", "session": S,
                          "messages": [{"id": "m-2", "parts": []}, {"id": "m-2", "parts": []}]}, "conflict")
    assert err["id"] == "cf2"
    # The id of an assistant message is taken too.
    reply_id = ws.find(S, "turn-end")[0]["message"]["id"]
    await ws.fails({"op": "send", "session": S,
                    "messages": [{"id": reply_id, "parts": [{"type": "text", "text": "x"}]}]}, "conflict")
    await assert_usable(ws, srv)
    msgs = [e["message"] for e in stored(srv, S) if e["type"] == "message"]
    assert [m["id"] for m in msgs].count("m-1") == 1 and "m-2" not in [m["id"] for m in msgs]
    assert text_of(msgs[0]) == "first"
    await ws.close()


# ---------------------------------------------------------------- busy


async def test_busy_with_reject_policy(srv: Any, gate: Gate) -> None:
    ws = await connected(srv)
    await ws.subscribe(S)
    hold = await ws.say(S, "hold")
    (held,) = hold["turn_ids"]
    await ws.wait_event(S, "chunk", turn_id=held)
    ack = await ws.say(S, "second", message_id="m-rej", policy="reject")
    assert ack["op"] == "ack", ack
    assert ack["rejected"] == "busy" and ack["turn_ids"] == [] and ack["message_ids"] == ["m-rej"], ack
    rejected = await ws.wait_event(S, "rejected", message_id="m-rej")
    assert rejected["code"] == "busy" and rejected["client_id"] == "alice"
    assert all(e["type"] != "message" or e["message"]["id"] != "m-rej" for e in stored(srv, S))
    assert len(ws.find(S, "turn-start")) == 1
    # Once idle, the same policy accepts.
    gate.open(srv)
    assert (await ws.turn_end(S, held))["reason"] == "complete"
    ack = await ws.say(S, "third", policy="reject")
    assert ack["op"] == "ack" and "rejected" not in ack and len(ack["turn_ids"]) == 1, ack
    await ws.turn_end(S, ack["turn_ids"][0])
    await assert_usable(ws, srv)
    await ws.close()


# ---------------------------------------------------------------- cursors and order


async def test_subscribe_after_zero_replays_from_seq_1(srv: Any) -> None:
    writer = await connected(srv)
    await writer.subscribe(S)
    await writer.completes(S, "one")
    await writer.completes(S, "two")
    log = await settled_log(srv, S)
    reader = await connected(srv, "bob")
    ack = await reader.subscribe(S, after=0)
    assert ack["after"] == 0 and ack["last_seq"] == len(log) and ack["session"] == S
    await reader.wait_until(lambda: len(reader.events[S]) >= len(log), what="replay")
    assert reader.events[S] == log and log[0]["seq"] == 1
    # A cursor in the middle resumes right after it.
    mid = await connected(srv, "carol")
    await mid.subscribe(S, after=5)
    await mid.wait_until(lambda: len(mid.events[S]) >= len(log) - 5, what="resume")
    assert mid.events[S] == log[5:]
    # And the replay continues live, gapless.
    await reader.completes(S, "three")
    log = await settled_log(srv, S)
    for c in (reader, mid):
        await c.wait_until(lambda c=c: len(c.events[S]) >= len(log) - (5 if c is mid else 0), what="live")
    assert_gapless(reader.events[S])
    assert reader.events[S] == log
    assert mid.events[S] == log[5:]
    for c in (writer, reader, mid):
        await c.close()


async def test_a_subscriber_too_far_behind_gets_what_was_queued_then_1013(serve: Any, gate: Gate) -> None:
    srv = serve(agent=make_agent(gate), server_config={"max_pending_frames": 2})
    writer = await connected(srv)  # not subscribed: it would be too far behind itself
    await writer.say(S, "words 600")
    async with asyncio.timeout(10):
        log = await settled_log(srv, S)
        while not any(e["type"] == "turn-end" for e in log):
            await asyncio.sleep(0.01)
            log = await settled_log(srv, S)
    assert len(log) > 2 * 256  # one catch-up page of more than two frames, queued at once
    reader = await connected(srv, "bob")
    await reader.send({"op": "subscribe", "session": S, "after": 0})
    await reader.wait_until(lambda: reader.closed is not None, what="the close")
    assert reader.closed.rcvd is not None and reader.closed.rcvd.code == 1013
    # What was queued before the overrun (with or without the ack still queued), then nothing.
    got = reader.events[S]
    assert len(got) in (256, 2 * 256) and got == log[:len(got)]
    await writer.ping()  # the server serves on
    await writer.close()


async def test_subscribe_without_after_is_live_only(srv: Any) -> None:
    writer = await connected(srv)
    await writer.subscribe(S)
    await writer.completes(S, "old")
    last = len(await settled_log(srv, S))
    live = await connected(srv, "bob")
    ack = await live.subscribe(S, after=None)
    assert ack["after"] == last, ack
    end = await live.completes(S, "new")
    assert live.events[S][0]["seq"] == last + 1
    assert_gapless(live.events[S], last + 1)
    assert end in live.events[S]
    assert not any(e["seq"] <= last for e in live.events[S])
    await writer.close()
    await live.close()


async def test_events_arrive_in_seq_order_without_gap(srv: Any) -> None:
    """Three concurrent turns interleave in the log; every subscriber sees seq
    1, 2, 3… with no gap and no duplicate, whether it follows live or replays."""
    a = await connected(srv)
    await a.subscribe(S)
    b = await connected(srv, "bob")
    await b.subscribe(S)
    turns = []
    for n in (40, 60, 80):
        ack = await a.say(S, f"words {n}")
        turns.append(ack["turn_ids"][0])
    for t in turns:
        assert (await a.turn_end(S, t))["reason"] == "complete"
    log = await settled_log(srv, S)
    for c in (a, b):
        await c.wait_until(lambda c=c: len(c.events[S]) >= len(log), what="all events")
        assert_gapless(c.events[S])
        assert c.events[S] == log
    # The turns really interleaved (so the order was not trivially sequential).
    owners = [e["turn_id"] for e in log if e["type"] == "chunk"]
    assert any(owners[i] != owners[i + 1] and owners[i] in owners[i + 2:] for i in range(len(owners) - 2))
    replay = await connected(srv, "carol")
    await replay.subscribe(S, after=0)
    await replay.wait_until(lambda: len(replay.events[S]) >= len(log), what="replay")
    assert replay.events[S] == log
    for c in (a, b, replay):
        await c.close()


# ---------------------------------------------------------------- identity


async def test_identity_claims_in_frames_are_ignored(srv: Any) -> None:
    ws = await connected(srv, "alice")
    await ws.subscribe(S)
    frame = {"op": "send", "id": "id1", "session": S, "client_id": "mallory", "owner": "mallory",
             "messages": [{"id": "m-id", "client_id": "mallory", "role": "user",
                           "parts": [{"type": "text", "text": "who am I"}]}]}
    ack = await ws.ok(frame)
    (turn_id,) = ack["turn_ids"]
    await ws.turn_end(S, turn_id)
    cancel = await ws.ok({"op": "cancel", "session": S, "client_id": "mallory", "filter": {"own": True}})
    log = await settled_log(srv, S)
    msg = next(e for e in log if e["type"] == "message")
    assert msg["client_id"] == "alice" and msg["message"]["id"] == "m-id"
    start = next(e for e in log if e["type"] == "turn-start")
    assert start["owner"] == "alice"
    cancel_ev = next(e for e in log if e["type"] == "cancel" and e["request_id"] == cancel["request_id"])
    assert cancel_ev["client_id"] == "alice"
    assert "mallory" not in json.dumps(log)
    await ws.close()


# ---------------------------------------------------------------- disconnect


def connections(srv: Any) -> float:
    return srv.runtime.metrics.registry.get_sample_value("turnline_ws_connections") or 0.0


async def wait_connections(srv: Any, n: int, timeout: float = 5.0) -> None:
    """Until the server has processed the closes (its gauge counts live sockets)."""
    deadline = time.monotonic() + timeout
    while connections(srv) != n:
        assert time.monotonic() < deadline, f"server still counts {connections(srv)} connections, expected {n}"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("how", ["drop", "close"])
async def test_plain_disconnect_cancels_nothing(srv: Any, gate: Gate, how: str) -> None:
    observer = await connected(srv, "bob")
    await observer.subscribe(S)
    ws = await connected(srv, "alice")
    ack = await ws.say(S, "hold")
    (turn_id,) = ack["turn_ids"]
    await observer.wait_event(S, "chunk", turn_id=turn_id)
    await (ws.abort() if how == "drop" else ws.close())
    await wait_connections(srv, 1)
    assert srv.call(_is_active(srv, S, turn_id))
    gate.open(srv)
    end = await observer.turn_end(S, turn_id)
    assert end["reason"] == "complete" and text_of(end["message"]) == "held released"
    assert not observer.find(S, "cancel")
    # alice comes back and resumes from her cursor: nothing lost.
    back = await connected(srv, "alice")
    await back.subscribe(S, after=0)
    log = await settled_log(srv, S)
    await back.wait_until(lambda: len(back.events[S]) >= len(log), what="resume")
    assert back.events[S] == log
    await observer.close()
    await back.close()


@pytest.mark.parametrize("how", ["drop", "close"])
async def test_cancel_on_disconnect_opt_in(srv: Any, gate: Gate, how: str) -> None:
    observer = await connected(srv, "bob")
    await observer.subscribe(S)
    bob_turn = (await observer.say(S, "hold bob"))["turn_ids"][0]
    ws = await connected(srv, "alice", query="cancel_on_disconnect=1")
    (turn_id,) = (await ws.say(S, "hold"))["turn_ids"]
    await observer.wait_event(S, "chunk", turn_id=turn_id)
    await (ws.abort() if how == "drop" else ws.close())
    end = await observer.turn_end(S, turn_id)
    assert end["reason"] == "cancelled", end
    cancel = observer.find(S, "cancel")
    assert len(cancel) == 1 and cancel[0]["client_id"] == "alice" and cancel[0]["filter"] == {"own": True}
    # Only alice's own turns: bob's keeps running and completes.
    assert srv.call(_is_active(srv, S, bob_turn))
    gate.open(srv)
    assert (await observer.turn_end(S, bob_turn))["reason"] == "complete"
    await assert_usable(observer, srv)
    await observer.close()


async def test_cancel_on_disconnect_covers_a_followed_session(srv: Any, gate: Gate) -> None:
    """A client that reconnects with the opt-in only to watch its running turn
    (it sent on an earlier socket) still has that turn cancelled when it leaves."""
    observer = await connected(srv, "bob")
    await observer.subscribe(S)
    first = await connected(srv, "alice")
    (turn_id,) = (await first.say(S, "hold"))["turn_ids"]
    await observer.wait_event(S, "chunk", turn_id=turn_id)
    await first.abort()
    await wait_connections(srv, 1)
    assert srv.call(_is_active(srv, S, turn_id))  # the plain drop cancelled nothing
    again = await connected(srv, "alice", query="cancel_on_disconnect=1")
    await again.subscribe(S, after=0)
    await again.wait_event(S, "chunk", turn_id=turn_id)
    await again.abort()
    end = await observer.turn_end(S, turn_id)
    assert end["reason"] == "cancelled", end
    gate.open(srv)
    await assert_usable(observer, srv)
    await observer.close()


async def _is_active(srv: Any, session: str, turn_id: str) -> bool:
    hub = await srv.runtime.hub(session)
    return hub.state.is_active(turn_id)


# ---------------------------------------------------------------- pending cancel


async def test_cancel_naming_a_turn_not_started_yet_is_pending(srv: Any) -> None:
    """Invariant 4 over the wire: a cancel naming a turn the log has not seen is
    acknowledged as ``pending``, and the session stays consistent after it
    (this once broke the hub: core's cancel-result handler raised mid-emit)."""
    ws = await connected(srv)
    await ws.subscribe(S)
    await ws.completes(S)
    ack = await ws.request({"op": "cancel", "id": "pc1", "session": S, "filter": {"turn_id": "turn-future"}})
    assert ack["op"] == "ack" and ack["id"] == "pc1", ack
    assert ack["pending"] == ["turn-future"] and ack["cancelled"] == [] and ack["rejected"] == [], ack
    await assert_usable(ws, srv)
    await ws.close()


async def test_pong_quotes_the_ping_id(srv: Any) -> None:
    ws = await connected(srv)
    await ws.send({"op": "ping", "id": "p-7"})
    pong = await ws.wait_until(lambda: next((f for f in ws.frames if f.get("op") == "pong"), None), what="pong")
    assert pong == {"op": "pong", "id": "p-7"}
    await ws.close()


async def test_lists_of_cancel_result_and_presence_are_always_present(srv: Any, gate: Gate) -> None:
    # PROTOCOL.md lists these fields without a '?': a client in any language may
    # read them without checking they exist.
    ws = await connected(srv)
    await ws.subscribe(S)
    await ws.completes(S)
    r = await ws.ok({"op": "cancel", "session": S})
    assert r["cancelled"] == [] and r["rejected"] == [] and r["pending"] == []
    result = await ws.wait_event(S, "cancel-result")
    assert {"cancelled", "rejected", "pending"} <= result.keys()
    presence = ws.find(S, "presence")
    assert presence and all("turns" in p for p in presence)
    await ws.close()
