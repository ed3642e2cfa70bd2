"""Fuzzing (issue 5, reliability suite): hostile WebSocket frames and HTTP
requests against one real server on loopback with a SQLite store.

Invariant 8, checked by :mod:`hostile` for every example: each frame gets one
answer with a stable code (never ``internal``), or its ack when it happens to
be valid; a ping after it gets its pong; every HTTP answer is below 500 and
every error has the JSON error body. Around the fuzzing, a control session
(which the fuzzer's session ids never name) must keep its log byte for byte
and still run a full send → stream → cancel; at the end the SQLite file is
opened by a fresh server and every session in it must fold.

The hypothesis budget is fixed and derandomized (no example database), so the
module runs the same examples, in about the same time, on every machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servers import SECRET, RunningServer, start_server
from hostile import (
    BODIES, GOOD_BODIES, ID_FIELDS, SEQ_MAX, TRICKY_IDS, Call, Hostile, Target, with_field, answer, assert_no_internal_error,
    base_frames, check_answer, check_response, hostile_calls, hostile_frames, request, run, valid_ids,
)
from turnline.agent import RuntimeConfig
from turnline.core.limits import LimitsConfig
from turnline.server.auth import mint
from wsraw import RawWS, assert_gapless, settled_log

LIMIT = 16 * 1024
CONTROL = "control-session-7f3a"
HOLD = "hold-the-control-turn"
FUZZ_CAPS = {"*": ["subscribe", "publish", "cancel", "cancel-any"]}
PLAIN_CAPS = {"*": ["subscribe", "publish", "cancel"]}

BUDGET = settings(max_examples=250, deadline=None, derandomize=True, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])

# A few fixed sessions (so frames meet sessions with history) and fresh ones.
SESSIONS = st.one_of(st.sampled_from(["fz-a", "fz-b", "fz-c"]), valid_ids("fz-")).filter(lambda s: s != CONTROL)


async def agent(turn: Any):
    prompt = " ".join(p.get("text", "") for p in turn.input.parts if isinstance(p, dict))
    yield "ok "
    if prompt == HOLD:
        await asyncio.Event().wait()  # streams until cancelled
    yield "done"


@dataclass
class Env:
    srv: RunningServer
    db: Path
    loop: asyncio.AbstractEventLoop
    target: Target
    control: list[dict[str, Any]] = field(default_factory=list)

    def run(self, coro: Any) -> Any:
        return run(self.loop, coro)

    def assert_control_intact(self) -> None:
        assert self.run(settled_log(self.srv, CONTROL)) == self.control


def serve_fuzz(db: Path) -> RunningServer:
    # The sequences send and cancel far faster than a person: the send and cancel
    # buckets are off here (they have their own tests: test_limits.py).
    return start_server(agent=agent, store=f"sqlite:///{db}",
                        config=RuntimeConfig(limits=LimitsConfig(send_rate=0, cancel_rate=0)),
                        server_config={"max_frame_bytes": LIMIT, "dev": True})


@pytest.fixture(scope="module")
def env(tmp_path_factory: Any) -> Any:
    db = tmp_path_factory.mktemp("fuzz") / "fuzz.db"
    srv = serve_fuzz(db)
    loop = asyncio.new_event_loop()
    e = Env(srv, db, loop, Target(srv.http, srv.token, LIMIT, dev=True))
    e.control = e.run(exercise_control(srv, []))
    yield e
    srv.stop()
    loop.close()


async def exercise_control(srv: RunningServer, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replay the control session (it must equal ``before``), run a turn to
    completion and one that is cancelled mid-stream; return the new log."""
    ws = await RawWS.open(srv.ws, srv.token("controller", PLAIN_CAPS))
    ack = await ws.subscribe(CONTROL, after=0)
    assert ack["last_seq"] == len(before)
    await ws.wait_until(lambda: len(ws.events[CONTROL]) >= len(before), what="replay")
    assert ws.events[CONTROL] == before
    await ws.completes(CONTROL, "plain question")
    held = await ws.ok({"op": "send", "session": CONTROL, "messages": [{"parts": [{"type": "text", "text": HOLD}]}]})
    (turn_id,) = held["turn_ids"]
    await ws.wait_event(CONTROL, "chunk", turn_id=turn_id)
    cancel = await ws.ok({"op": "cancel", "session": CONTROL})
    assert cancel["cancelled"] == [turn_id], cancel
    assert (await ws.turn_end(CONTROL, turn_id))["reason"] == "cancelled"
    log = await settled_log(srv, CONTROL)
    await ws.wait_until(lambda: len(ws.events[CONTROL]) >= len(log), what="all control events")
    assert ws.events[CONTROL] == log and log[:len(before)] == before
    assert_gapless(log)
    await ws.close()
    return log


def forget(ws: RawWS) -> None:
    """Drop what the fuzz connection has collected (ids may repeat across examples)."""
    assert_no_internal_error(ws)
    ws.frames.clear()
    ws.replies.clear()
    ws.errors.clear()
    ws.events.clear()


# ---------------------------------------------------------------- WebSocket


def test_hostile_frames_are_answered_and_the_connection_survives(env: Env) -> None:
    token = env.srv.token("fuzzer", FUZZ_CAPS)
    conn = [env.run(RawWS.open(env.target.ws, token))]

    @BUDGET
    @given(hostile_frames(SESSIONS, LIMIT))
    def one(h: Any) -> None:
        if conn[0].closed is not None:
            # A frame broke the connection (that example failed); judge each
            # further example on its own connection while hypothesis shrinks.
            conn[0] = env.run(RawWS.open(env.target.ws, token))
        ws = conn[0]
        reply = env.run(answer(ws, h.payload, h.quoted))
        check_answer(reply, h)
        forget(ws)

    one()
    env.run(conn[0].ping())
    env.run(conn[0].close())
    env.assert_control_intact()


def test_every_tricky_id_in_every_id_field_is_bad_id(env: Env) -> None:
    """Exhaustive, not sampled: each look-alike id (trailing newline, zero-width
    space, homoglyphs…) in each id field of each op, and in each id place over HTTP."""

    async def probe() -> None:
        ws = await RawWS.open(env.target.ws, env.srv.token("fuzzer", FUZZ_CAPS))
        for (op, path), bad in itertools.product(ID_FIELDS, TRICKY_IDS):
            fid = f"tricky-{op}-{'.'.join(map(str, path))}-{TRICKY_IDS.index(bad)}"
            frame = with_field({**base_frames("fz-a")[op], "id": fid}, path, bad)
            h = Hostile(json.dumps(frame), fid, frozenset({"bad_id"}), "tricky")
            check_answer(await answer(ws, h.payload, h.quoted), h)
            forget(ws)
        await ws.close()

    env.run(probe())
    auth = {"authorization": f"Bearer {env.srv.token('fuzzer', FUZZ_CAPS)}"}
    with httpx.Client(timeout=10, headers=auth) as client:
        for bad in TRICKY_IDS:
            if "/" in bad:
                continue  # another route, not an id
            calls = [("POST", f"/v1/sessions/{quote(bad, safe='') or '%20'}/messages", {}, GOOD_BODIES[0]),
                     ("GET", "/v1/sessions/fz-a/messages", {"leaf": bad}, None),
                     ("GET", "/v1/sessions/fz-a/messages", {"before": bad}, None),
                     ("POST", "/v1/sessions/fz-a/messages", {},
                      json.dumps({"messages": [{"id": bad, "parts": []}]}).encode()),
                     ("POST", "/v1/sessions/fz-a/cancel", {}, json.dumps({"filter": {"turn_id": bad}}).encode())]
            for method, path, params, body in calls:
                r = client.request(method, env.target.http + path, params=params, content=body)
                assert r.status_code == 400 and r.json()["error"]["code"] == "bad_id", (bad, path, params, r.text)
    env.assert_control_intact()


def test_every_hostile_body_on_every_body_route(env: Env) -> None:
    """Exhaustive over the curated bodies (invalid UTF-8 inside a string,
    nesting past the decoder's limit, duplicate keys, numbers out of range),
    sent with a valid token so they reach the body decoder."""
    auth = {"authorization": f"Bearer {env.srv.token('fuzzer', FUZZ_CAPS)}"}
    with httpx.Client(timeout=10, headers=auth) as client:
        for body, route in itertools.product(BODIES, ["messages", "cancel"]):
            call = Call("POST", f"/v1/sessions/fz-a/{route}", {}, {"content-type": "application/json"}, body)
            check_response(*request(client, env.target, call), call)
    env.assert_control_intact()


def test_ping_flood_gets_every_pong_in_order(env: Env) -> None:
    async def flood() -> None:
        ws = await RawWS.open(env.target.ws, env.srv.token("flooder", FUZZ_CAPS))
        n = 3000
        for i in range(n):  # sent without waiting for any answer
            await ws.send_raw(json.dumps({"op": "ping", "id": i}))
        await ws.wait_until(lambda: ws.pongs >= n, 30, "every pong")
        assert [f["id"] for f in ws.frames] == list(range(n))
        await ws.subscribe("fz-flood")
        await ws.completes("fz-flood")  # and the connection still works
        await ws.close()

    env.run(flood())
    env.assert_control_intact()


def test_invalid_utf8_text_frame_closes_only_that_connection(env: Env) -> None:
    async def probe() -> None:
        bystander = await RawWS.open(env.target.ws, env.srv.token("bystander", FUZZ_CAPS))
        await bystander.subscribe("fz-utf8")
        ws = await RawWS.open(env.target.ws, env.srv.token("fuzzer", FUZZ_CAPS))
        await ws.ping()
        # RFC 6455 makes the server fail a connection whose text is not UTF-8.
        await ws.conn.send(b'{"op":"ping","id":"\xff\xfe"}', text=True)
        await ws.wait_until(lambda: ws.closed is not None and ws._reader.done(), what="the close")
        assert ws.closed.rcvd is not None and ws.closed.rcvd.code == 1007, ws.closed
        await bystander.completes("fz-utf8")
        await bystander.close()

    env.run(probe())
    env.assert_control_intact()


# ---------------------------------------------------------------- valid but adversarial sequences


STEPS = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(["concurrent", "queue", "interrupt", "reject", "rollback", None])),
    st.tuples(st.just("send-parent"), st.sampled_from(["known", "unknown"])),
    st.tuples(st.just("send-dup"), st.just(None)),
    st.tuples(st.just("steer"), st.sampled_from(["ended", "unknown"])),
    st.tuples(st.just("regenerate"), st.sampled_from(["user", "reply", "unknown"])),
    st.tuples(st.just("cancel"), st.sampled_from(["own", "all", "self", "other", "ended", "unknown"])),
    st.tuples(st.just("cancel-seen"), st.sampled_from([0, 1, -1, SEQ_MAX, SEQ_MAX + 1, 10**30])),
    st.tuples(st.just("subscribe"), st.sampled_from([None, 0, 1, 10**6, SEQ_MAX, -1, -(2**63), SEQ_MAX + 1,
                                                     2**64, 10**30])),
    st.tuples(st.just("unsubscribe"), st.just(None)),
)


@dataclass
class Model:
    session: str
    users: list[str] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)
    subscribed: bool = False
    after: int = 0

    @property
    def exists(self) -> bool:
        return bool(self.users)


def _msg(mid: str | None = None) -> list[dict[str, Any]]:
    return [{"parts": [{"type": "text", "text": "q"}], **({"id": mid} if mid else {})}]


async def step(ws: RawWS, watch: RawWS, m: Model, n: int, kind: str, arg: Any) -> None:
    s = m.session

    async def started(ack: dict[str, Any]) -> None:
        (turn_id,) = ack["turn_ids"]
        end = await watch.turn_end(s, turn_id)
        assert end["reason"] == "complete", end
        m.turns.append(turn_id)
        m.replies.append(end["message"]["id"])

    if kind in ("send", "send-parent", "send-dup"):
        frame: dict[str, Any] = {"op": "send", "session": s, "messages": _msg(f"u{n}")}
        if kind == "send" and arg:
            frame["policy"] = arg
        if kind == "send-parent":
            frame["parent_id"] = m.replies[-1] if arg == "known" and m.replies else "no-such-parent"
            if frame["parent_id"] == "no-such-parent":
                await ws.fails(frame, "not_found")
                return
        if kind == "send-dup" and m.users:
            frame["messages"] = _msg(m.users[0])
            await ws.fails(frame, "conflict")
            return
        ack = await ws.ok(frame)
        assert ack["message_ids"] == [f"u{n}"] and "rejected" not in ack and not ack.get("cancelled"), ack
        m.users.append(f"u{n}")
        await started(ack)
    elif kind == "steer":
        target = m.turns[-1] if arg == "ended" and m.turns else "turn-unknown"
        await ws.fails({"op": "send", "session": s, "steer": target, "messages": _msg()}, "not_found")
    elif kind == "regenerate":
        pool = {"user": m.users, "reply": m.replies}.get(arg) or []
        if not m.exists or not pool:
            await ws.fails({"op": "regenerate", "session": s, "message_id": pool[-1] if pool else "nope"},
                           "not_found")
            return
        ack = await ws.ok({"op": "regenerate", "session": s, "message_id": pool[-1]})
        await started(ack)
    elif kind == "cancel":
        flt = {"own": {"own": True}, "all": {"all": True}, "self": {"client_id": "seq-user"},
               "other": {"client_id": "someone-else"}, "unknown": {"turn_id": "turn-unknown"},
               "ended": {"turn_id": m.turns[-1] if m.turns else "turn-x"}}[arg]
        frame = {"op": "cancel", "session": s, "filter": flt}
        if arg in ("all", "other"):
            await ws.fails(frame, "forbidden")  # the token has no cancel-any
        elif not m.exists:
            await ws.fails(frame, "not_found")  # cancel before any send
        else:
            ack = await ws.ok(frame)
            assert ack["cancelled"] == [] and ack["rejected"] == [], ack
            named = flt.get("turn_id")
            assert ack["pending"] == ([named] if named and named not in m.turns else []), ack
    elif kind == "cancel-seen":
        frame = {"op": "cancel", "session": s, "seen": arg}
        if not 0 <= arg <= SEQ_MAX:
            await ws.fails(frame, "bad_frame")
        elif not m.exists:
            await ws.fails(frame, "not_found")
        else:
            # A stale cursor may revise a completed turn it names (the stop
            # "raced" its end); anything else is a no-op.
            ack = await ws.ok(frame)
            assert set(ack["cancelled"]) <= set(m.turns) and ack["pending"] == [] and ack["rejected"] == [], ack
            for t in ack["cancelled"]:
                await watch.wait_event(s, "turn-revised", turn_id=t)
    elif kind == "subscribe":
        frame = {"op": "subscribe", "session": s, **({} if arg is None else {"after": arg})}
        if arg is not None and not 0 <= arg <= SEQ_MAX:
            await ws.fails(frame, "bad_frame")
            return
        ack = await ws.ok(frame)
        last = watch.events[s][-1]["seq"] if watch.events[s] else 0  # the watcher holds the whole log
        assert ack["last_seq"] == last and ack["after"] == (last if arg is None else arg), ack
        ws.events.pop(s, None)
        m.subscribed = True
        m.after = ack["after"]
    elif kind == "unsubscribe":
        if m.subscribed:
            await ws.ok({"op": "unsubscribe", "session": s})
            m.subscribed = False
        else:
            await ws.fails({"op": "unsubscribe", "session": s}, "not_found")


def test_valid_but_adversarial_sequences_get_their_documented_codes(env: Env) -> None:
    ws = env.run(RawWS.open(env.target.ws, env.srv.token("seq-user", PLAIN_CAPS)))
    watch = env.run(RawWS.open(env.target.ws, env.srv.token("seq-watch", PLAIN_CAPS)))
    counter = iter(range(10**9))

    @settings(BUDGET, max_examples=40)
    @given(st.lists(STEPS, min_size=1, max_size=8))
    def one(steps: list[tuple[str, Any]]) -> None:
        m = Model(f"seq-{next(counter)}")

        async def go() -> None:
            await watch.subscribe(m.session, after=0)
            for n, (kind, arg) in enumerate(steps):
                await step(ws, watch, m, n, kind, arg)
                # Quiet now: whatever the watcher holds is the whole log.
                log = await settled_log(env.srv, m.session)
                await watch.wait_until(lambda: len(watch.events[m.session]) >= len(log), what="the log")
                assert watch.events[m.session] == log
            await ws.ping()
            log = await settled_log(env.srv, m.session)
            assert_gapless(log)
            starts = [e["turn_id"] for e in log if e["type"] == "turn-start"]
            ends = [e["turn_id"] for e in log if e["type"] == "turn-end"]
            assert sorted(starts) == sorted(ends) == sorted(m.turns)
            if m.subscribed:
                # A subscription past the end of the log waits; one inside it replays from its cursor.
                after = m.after
                await ws.wait_until(lambda: len(ws.events.get(m.session, [])) >= max(0, len(log) - after),
                                    what="the subscription's events")
                assert ws.events.get(m.session, []) == [e for e in log if e["seq"] > after]
                await ws.ok({"op": "unsubscribe", "session": m.session})
            await watch.ok({"op": "unsubscribe", "session": m.session})
            ws.events.pop(m.session, None)
            forget(ws)
            forget(watch)

        env.run(go())

    one()
    env.run(ws.close())
    env.run(watch.close())
    env.assert_control_intact()


# ---------------------------------------------------------------- HTTP


def test_hostile_http_requests_get_json_errors(env: Env) -> None:
    now = int(time.time())
    import jwt

    good = env.srv.token("http-fuzzer", FUZZ_CAPS)
    tokens = st.one_of(st.just(good), st.just(good), st.sampled_from([
        env.srv.token("no-caps", {"*": []}),
        mint(SECRET, "expired", FUZZ_CAPS, ttl_s=-10),
        jwt.encode({"sub": "alice", "exp": now + 600, "cap": "everything"}, SECRET, algorithm="HS256"),
        "not.a.jwt", "", None,
    ]))
    with httpx.Client(timeout=10) as client:

        @settings(BUDGET, max_examples=150)
        @given(hostile_calls(SESSIONS, tokens, LIMIT))
        def one(call: Any) -> None:
            status, ctype, body = request(client, env.target, call)
            check_response(status, ctype, body, call)

        one()
        assert client.get(f"{env.target.http}/healthz").json() == {"ok": True}
    env.assert_control_intact()


# ---------------------------------------------------------------- after all the fuzzing


def test_zz_control_session_still_works_and_the_file_folds_in_a_fresh_server(env: Env) -> None:
    """Runs last (file order): the control session replays unchanged and runs
    a full send → stream → cancel; then the SQLite file, with everything the
    fuzzers stored, is opened by a new server and every session loads."""
    env.assert_control_intact()
    env.control = env.run(exercise_control(env.srv, env.control))
    env.srv.stop()

    fresh = serve_fuzz(env.db)
    try:
        sessions = fresh.call(fresh.runtime.store.sessions())
        assert CONTROL in sessions and len(sessions) > 10, sessions
        for s in sessions:
            hub = fresh.call(fresh.runtime.hub(s))  # folds the whole log (and recovers orphaned turns)
            log = env.run(settled_log(fresh, s))
            assert_gapless(log)
            assert hub.state.last_seq == len(log)
            starts = [e["turn_id"] for e in log if e["type"] == "turn-start"]
            ends = [e["turn_id"] for e in log if e["type"] == "turn-end"]
            assert len(ends) == len(set(ends)) and set(ends) <= set(starts), s
        assert env.run(settled_log(fresh, CONTROL)) == env.control
        env.srv = fresh
        env.control = env.run(exercise_control(fresh, env.control))
    finally:
        fresh.stop()
