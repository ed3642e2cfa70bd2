"""Auth isolation (issue 5, reliability suite), extending ``test_auth.py``.

- A token whose capabilities name one session (an exact pattern, or a
  wildcard prefix like ``team-a:*``), even with every action on it, can read,
  send to, cancel, regenerate, steer nothing in any other session: over the
  WebSocket, the HTTP routes and the AI SDK routes. Every refusal is
  ``forbidden``, and the other session's log is byte for byte what it was,
  its running turn still running. The same action inside the token's pattern
  is *not* refused, so each entry of the table really exercises its route.
- The table is checked against the app's own route list and the protocol's op
  list: a new session route or op that is not in it fails a test, so it cannot
  ship without an auth check being tested.
- Within one session, a token without ``cancel-any`` stops none of another
  client's turns: not running, queued or not yet started ones, by any filter,
  by an ``interrupt``/``rollback`` send, or by the AI SDK stop or the AG-UI cancel.
- Forged, tampered, ``alg`` swapped, expired, not yet valid, sub-less and
  malformed tokens are ``unauthorized`` on every route.
- Identity is not payload: ``client_id``/``sub``/``owner`` in a frame, body,
  query or header never becomes the actor.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import httpx
import jwt
import pytest

from servers import SECRET, RunningServer, start_server
from hostile import run
from turnline.protocol import CLIENT_OPS
from turnline.server.auth import mint
from turnline.voice import VoiceConfig, install_voice
from wsraw import Gate, RawWS, held_agent, settled_log

EVERYTHING = ["subscribe", "publish", "cancel", "cancel-any", "admin"]
OWNER_CAPS = {"*": EVERYTHING}
# Token shape -> (its caps, a session inside them, sessions outside them).
SCOPES = {
    "exact": ({"team-a:1": EVERYTHING}, "team-a:1", ["team-b:1", "team-a:10", "team-a:1x", "team-a"]),
    "wildcard": ({"team-a:*": EVERYTHING}, "team-a:2", ["team-b:1", "team-ab:1", "team-a", "xteam-a:1", "TEAM-A:1"]),
}
ALL_SESSIONS = sorted({s for _, inside, outside in SCOPES.values() for s in [inside, *outside]})
TIMEOUT = 10.0


def say(text: str, **extra: Any) -> dict[str, Any]:
    return {"parts": [{"type": "text", "text": text}], **extra}


@dataclass
class Victim:
    """A session with a finished turn and one held running, owned by ``owner``."""

    session: str
    user_id: str
    reply_id: str
    held_turn: str
    held_reply: str


@dataclass
class World:
    srv: RunningServer
    loop: asyncio.AbstractEventLoop
    gate: Gate
    victims: dict[str, Victim]
    http: httpx.AsyncClient | None = None  # one client: making one costs ~0.1 s (its SSL context)

    def run(self, coro: Awaitable[Any]) -> Any:
        return run(self.loop, coro)


async def make_victim(srv: RunningServer, session: str) -> Victim:
    ws = await RawWS.open(srv.ws, srv.token("owner", OWNER_CAPS))
    await ws.subscribe(session)
    done = await ws.completes(session, "first")
    user_id = done["message"]["parent_id"]
    held = await ws.ok({"op": "send", "session": session, "messages": [say("hold on")]})
    (turn_id,) = held["turn_ids"]
    start = await ws.wait_event(session, "turn-start", turn_id=turn_id)
    await ws.wait_event(session, "chunk", turn_id=turn_id)
    await ws.close()
    return Victim(session, user_id, done["message"]["id"], turn_id, start["message_id"])


@pytest.fixture(scope="module")
def world() -> Any:
    gate = Gate()
    srv = start_server(agent=held_agent(gate))
    srv.call(_install_voice(srv))  # so the voice ops meet their own auth checks
    loop = asyncio.new_event_loop()
    w = World(srv, loop, gate, {})
    w.http = w.run(_client())
    for s in ALL_SESSIONS:
        w.victims[s] = w.run(make_victim(srv, s))
    yield w
    w.run(w.http.aclose())
    gate.open(srv)
    srv.stop()
    loop.close()


async def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=TIMEOUT)


async def _install_voice(srv: RunningServer) -> None:
    install_voice(srv.server.config.app, VoiceConfig())


# ---------------------------------------------------------------- the action table

# An action returns "ok" or the error code it got.
Act = Callable[[World, Victim, str], Awaitable[str]]


async def ws_frame(w: World, token: str, frame: dict[str, Any]) -> str:
    ws = await RawWS.open(w.srv.ws, token)
    try:
        r = await ws.request(frame)
        return "ok" if r["op"] == "ack" else r["code"]
    finally:
        await ws.close()


async def http_call(w: World, token: str, method: str, path: str, body: Any = None,
                    params: dict[str, str] | None = None) -> str:
    assert w.http is not None
    async with w.http.stream(method, w.srv.http + path, json=body, params=params,
                             headers={"authorization": f"Bearer {token}"}) as r:
        if r.status_code < 300:
            return "ok"  # an event stream is closed right away
        return json.loads(await r.aread())["error"]["code"]


def ws_action(build: Callable[[Victim], dict[str, Any]]) -> Act:
    return lambda w, v, token: ws_frame(w, token, build(v))


def http_action(method: str, path: str, body: Callable[[Victim], Any] = lambda v: None,
                params: dict[str, str] | None = None) -> Act:
    return lambda w, v, token: http_call(w, token, method, path.format(s=v.session), body(v), params)


WS_ACTIONS: dict[str, tuple[str, Act]] = {
    # name: (op, action)
    "ws-subscribe": ("subscribe", ws_action(lambda v: {"op": "subscribe", "session": v.session, "after": 0})),
    "ws-send": ("send", ws_action(lambda v: {"op": "send", "session": v.session, "messages": [say("hi")]})),
    "ws-steer": ("send", ws_action(lambda v: {"op": "send", "session": v.session, "steer": v.held_turn,
                                              "messages": [say("steer")]})),
    "ws-edit": ("send", ws_action(lambda v: {"op": "send", "session": v.session, "parent_id": v.user_id,
                                             "messages": [say("edit")]})),
    "ws-regenerate": ("regenerate", ws_action(lambda v: {"op": "regenerate", "session": v.session,
                                                         "message_id": v.reply_id})),
    "ws-cancel-own": ("cancel", ws_action(lambda v: {"op": "cancel", "session": v.session})),
    "ws-cancel-all": ("cancel", ws_action(lambda v: {"op": "cancel", "session": v.session,
                                                     "filter": {"all": True}})),
    "ws-cancel-turn": ("cancel", ws_action(lambda v: {"op": "cancel", "session": v.session,
                                                      "filter": {"turn_id": v.held_turn}, "seen": 1})),
    "ws-cancel-client": ("cancel", ws_action(lambda v: {"op": "cancel", "session": v.session,
                                                        "filter": {"client_id": "owner"}})),
    "ws-played": ("played", ws_action(lambda v: {"op": "played", "session": v.session, "turn_id": v.held_turn,
                                                 "ms": 10})),
    "ws-voice-start": ("voice-start", ws_action(lambda v: {"op": "voice-start", "session": v.session})),
    "ws-interrupt": ("interrupt", ws_action(lambda v: {"op": "interrupt", "session": v.session,
                                                       "mode": "response"})),
    "ws-voice-stop": ("voice-stop", ws_action(lambda v: {"op": "voice-stop", "session": v.session})),
    "ws-transcript": ("transcript", ws_action(lambda v: {"op": "transcript", "session": v.session,
                                                         "text": "stop"})),
}
# voice-stop and transcript act only on a voice the same connection started
# (which needed publish): on any other session they are a conflict.
REFUSAL = {"ws-voice-stop": "conflict", "ws-transcript": "conflict"}
HTTP_ACTIONS: dict[str, tuple[tuple[str, str], Act]] = {
    # name: ((method, route path), action)
    "post-messages": (("POST", "/v1/sessions/{session}/messages"), http_action(
        "POST", "/v1/sessions/{s}/messages", lambda v: {"messages": [say("hi")]})),
    "post-messages-steer": (("POST", "/v1/sessions/{session}/messages"), http_action(
        "POST", "/v1/sessions/{s}/messages", lambda v: {"messages": [say("steer")], "steer": v.held_turn})),
    "post-cancel-own": (("POST", "/v1/sessions/{session}/cancel"), http_action(
        "POST", "/v1/sessions/{s}/cancel", lambda v: {})),
    "post-cancel-all": (("POST", "/v1/sessions/{session}/cancel"), http_action(
        "POST", "/v1/sessions/{s}/cancel", lambda v: {"filter": {"all": True}})),
    "post-cancel-turn": (("POST", "/v1/sessions/{session}/cancel"), http_action(
        "POST", "/v1/sessions/{s}/cancel", lambda v: {"filter": {"turn_id": v.held_turn}})),
    "get-events": (("GET", "/v1/sessions/{session}/events"), http_action(
        "GET", "/v1/sessions/{s}/events", params={"after": "0"})),
    "get-messages": (("GET", "/v1/sessions/{session}/messages"), http_action("GET", "/v1/sessions/{s}/messages")),
    "get-messages-leaf": (("GET", "/v1/sessions/{session}/messages"), http_action(
        "GET", "/v1/sessions/{s}/messages", params={"leaf": "no-such-message"})),
    "get-tree": (("GET", "/v1/sessions/{session}/tree"), http_action("GET", "/v1/sessions/{s}/tree")),
    "aisdk-chat": (("POST", "/api/chat"), http_action(
        "POST", "/api/chat", lambda v: {"id": v.session, "messages": [say("hi", id="ai-1", role="user")]})),
    "aisdk-regenerate": (("POST", "/api/chat"), http_action(
        "POST", "/api/chat", lambda v: {"id": v.session, "trigger": "regenerate-message", "messageId": v.reply_id,
                                        "messages": [say("first", id=v.user_id, role="user")]})),
    "aisdk-stream": (("GET", "/api/chat/{session}/stream"), http_action("GET", "/api/chat/{s}/stream")),
    "aisdk-stop": (("POST", "/api/chat/{session}/stop"), http_action(
        "POST", "/api/chat/{s}/stop", lambda v: {"messageId": v.held_reply, "parts": []})),
    "aisdk-stop-unknown-message": (("POST", "/api/chat/{session}/stop"), http_action(
        "POST", "/api/chat/{s}/stop", lambda v: {"messageId": "no-such-message"})),
    "aisdk-stop-own": (("POST", "/api/chat/{session}/stop"), http_action("POST", "/api/chat/{s}/stop",
                                                                        lambda v: {})),
    "agui-run": (("POST", "/ag-ui"), http_action("POST", "/ag-ui", lambda v: {
        "threadId": v.session, "runId": "agui-run", "messages": [{"id": "agui-1", "role": "user", "content": "hi"}]})),
    "agui-stream": (("GET", "/ag-ui/{session}/stream"), http_action("GET", "/ag-ui/{s}/stream")),
    "agui-stream-after": (("GET", "/ag-ui/{session}/stream"), http_action("GET", "/ag-ui/{s}/stream",
                                                                          params={"after": "1"})),
    "agui-cancel-run": (("POST", "/ag-ui/{session}/cancel"), http_action(
        "POST", "/ag-ui/{s}/cancel", lambda v: {"runId": v.held_turn, "seen": 1})),
    "agui-cancel-unknown-run": (("POST", "/ag-ui/{session}/cancel"), http_action(
        "POST", "/ag-ui/{s}/cancel", lambda v: {"runId": "no-such-run"})),
    "agui-cancel-own": (("POST", "/ag-ui/{session}/cancel"), http_action("POST", "/ag-ui/{s}/cancel",
                                                                         lambda v: {})),
}
ACTIONS: dict[str, Act] = {**{k: a for k, (_, a) in WS_ACTIONS.items()}, **{k: a for k, (_, a) in HTTP_ACTIONS.items()}}
# Ops that need no capability: liveness, and leaving one's own subscription.
UNGUARDED_OPS = {"ping", "unsubscribe"}


def session_routes(srv: RunningServer) -> set[tuple[str, str]]:
    """Every (method, path) of the app that acts on a session: a ``{session}``
    path parameter, or the session id in the body (``/api/chat``, ``/ag-ui``)."""
    app = srv.server.config.app
    out = set()
    for route in app.starlette.routes:
        path = getattr(route, "path", "")
        if "{session}" in path or path in ("/api/chat", "/ag-ui") or "{id}" in path:
            out |= {(m, path) for m in (getattr(route, "methods", None) or ()) if m != "HEAD"}
    return out


def test_the_table_covers_every_session_route_and_every_op(world: World) -> None:
    tested_routes = {route for route, _ in HTTP_ACTIONS.values()}
    missing = session_routes(world.srv) - tested_routes
    assert not missing, f"session routes with no auth isolation test: {sorted(missing)}; add them to HTTP_ACTIONS"
    tested_ops = {op for op, _ in WS_ACTIONS.values()}
    missing_ops = set(CLIENT_OPS) - tested_ops - UNGUARDED_OPS
    assert not missing_ops, f"ops with no auth isolation test: {sorted(missing_ops)}; add them to WS_ACTIONS"


@pytest.mark.parametrize("scope", sorted(SCOPES))
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_a_token_for_one_session_touches_nothing_in_another(world: World, action: str, scope: str) -> None:
    caps, inside, outside = SCOPES[scope]
    token = world.srv.token("intruder", caps)
    act = ACTIONS[action]
    for session in outside:
        v = world.victims[session]
        before = world.run(settled_log(world.srv, session))
        assert world.run(act(world, v, token)) == REFUSAL.get(action, "forbidden"), (action, scope, session)
        after = world.run(settled_log(world.srv, session))
        assert after == before, (action, scope, session)
        assert v.held_turn in world.srv.call(_active(world.srv, session))
    # The same action inside the token's pattern is not refused: the route is real.
    got = world.run(act(world, world.victims[inside], token))
    assert got not in ("forbidden", "unauthorized") or action in REFUSAL, (action, scope, got)


async def _active(srv: RunningServer, session: str) -> list[str]:
    return list((await srv.runtime.hub(session)).state.active)


# ---------------------------------------------------------------- cancel scopes inside one session


async def test_without_cancel_any_no_filter_stops_another_clients_turns(serve: Any, gate: Gate) -> None:
    srv = serve(agent=held_agent(gate))
    s = "shared-1"
    bob = await RawWS.open(srv.ws, srv.token("bob"))
    await bob.subscribe(s)
    running = (await bob.ok({"op": "send", "session": s, "messages": [say("hold bob")]}))["turn_ids"][0]
    await bob.wait_event(s, "chunk", turn_id=running)
    queued = (await bob.ok({"op": "send", "session": s, "messages": [say("hold queued")], "policy": "queue"}))
    (queued_turn,) = queued["queued"]
    alice_token = srv.token("alice", {"*": ["subscribe", "publish", "cancel"]})
    alice = await RawWS.open(srv.ws, alice_token)
    await alice.subscribe(s)
    future = "turn-not-started-yet"

    for flt in ({"own": True}, {"turn_id": running}, {"turn_id": queued_turn}, {"turn_id": future}):
        ack = await alice.ok({"op": "cancel", "session": s, "filter": flt, "seen": 1})
        assert ack["cancelled"] == [], (flt, ack)
    for flt in ({"all": True}, {"client_id": "bob"}):
        await alice.fails({"op": "cancel", "session": s, "filter": flt}, "forbidden")
    # An interrupt or rollback send cancels only the sender's own turns.
    for policy in ("interrupt", "rollback"):
        ack = await alice.ok({"op": "send", "session": s, "messages": [say(f"{policy} hi")], "policy": policy})
        assert not ack.get("cancelled"), ack
        await alice.turn_end(s, ack["turn_ids"][0])
    async with httpx.AsyncClient(timeout=TIMEOUT, headers={"authorization": f"Bearer {alice_token}"}) as c:
        for body in ({}, {"filter": {"turn_id": running}}, {"filter": {"turn_id": queued_turn}}):
            r = await c.post(f"{srv.http}/v1/sessions/{s}/cancel", json=body)
            assert r.status_code == 200 and r.json()["cancelled"] == [], r.text
        for body in ({"filter": {"all": True}}, {"filter": {"client_id": "bob"}}):
            r = await c.post(f"{srv.http}/v1/sessions/{s}/cancel", json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        reply = (await bob.wait_event(s, "turn-start", turn_id=running))["message_id"]
        r = await c.post(f"{srv.http}/api/chat/{s}/stop", json={"messageId": reply, "parts": []})
        assert r.status_code == 200 and r.json()["cancelled"] == [], r.text
        for body in ({}, {"runId": running, "seen": 1}, {"runId": queued_turn}):
            r = await c.post(f"{srv.http}/ag-ui/{s}/cancel", json=body)
            assert r.status_code == 200 and r.json()["cancelled"] == [], r.text

    # Nothing of bob's was stopped: his turn completes, then his queued turn runs.
    assert not [e for e in bob.events[s] if e["type"] == "turn-end" and e["reason"] == "cancelled"]
    gate.open(srv)
    assert (await bob.turn_end(s, running))["reason"] == "complete"
    assert (await bob.turn_end(s, queued_turn))["reason"] == "complete"
    # A future turn named by alice's pending cancel, started by bob, is not cancelled either.
    log = await settled_log(srv, s)
    assert all(e["reason"] == "complete" for e in log if e["type"] == "turn-end")
    await alice.close()
    await bob.close()


# ---------------------------------------------------------------- refused tokens


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _signed(header: dict[str, Any], claims: dict[str, Any], key: bytes, digest: Any = hashlib.sha256) -> str:
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return head + "." + _b64(hmac.new(key, head.encode(), digest).digest())


def refused_tokens() -> list[Any]:
    now = int(time.time())
    caps = {"*": EVERYTHING}
    good = {"sub": "alice", "exp": now + 600, "cap": caps}
    real = mint(SECRET, "alice", {"team-a:*": ["subscribe"]})
    head, payload, sig = real.split(".")
    escalated = _b64(json.dumps({**json.loads(base64.urlsafe_b64decode(payload + "==")), "cap": caps}).encode())
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    return [
        pytest.param(head + "." + escalated + "." + sig, id="tampered-payload-caps"),
        pytest.param(head + "." + _b64(json.dumps({**good, "sub": "admin"}).encode()) + "." + sig,
                     id="tampered-payload-sub"),
        pytest.param(_signed({"alg": "RS256", "typ": "JWT"}, good, SECRET.encode()), id="alg-swapped-to-rs256"),
        pytest.param(_signed({"alg": "HS256", "typ": "JWT"}, good, pem.encode()), id="hs-signed-with-a-public-key"),
        pytest.param(_signed({"alg": "HS384", "typ": "JWT"}, good, SECRET.encode(), hashlib.sha384),
                     id="alg-hs384"),
        pytest.param(_b64(b'{"alg":"None"}') + "." + _b64(json.dumps(good).encode()) + ".", id="alg-None"),
        pytest.param(_b64(b'{"alg":"NONE"}') + "." + _b64(json.dumps(good).encode()) + "." + sig, id="alg-NONE"),
        pytest.param(_b64(b'{"typ":"JWT"}') + "." + _b64(json.dumps(good).encode()) + "." + sig, id="no-alg"),
        pytest.param(jwt.encode({**good, "nbf": now + 3600}, SECRET, algorithm="HS256"), id="not-yet-valid-nbf"),
        pytest.param(jwt.encode({**good, "iat": now + 3600}, SECRET, algorithm="HS256"), id="issued-in-the-future"),
        pytest.param(jwt.encode({**good, "exp": now - 1}, SECRET, algorithm="HS256"), id="expired"),
        pytest.param(jwt.encode({"exp": now + 600, "cap": caps}, SECRET, algorithm="HS256"), id="missing-sub"),
        pytest.param(jwt.encode({**good, "sub": 7}, SECRET, algorithm="HS256"), id="sub-not-a-string"),
        pytest.param(jwt.encode({**good, "sub": "a b"}, SECRET, algorithm="HS256"), id="sub-not-an-id"),
        pytest.param(jwt.encode({**good, "sub": "alice\n"}, SECRET, algorithm="HS256"), id="sub-trailing-newline"),
        pytest.param(jwt.encode({**good, "exp": "tomorrow"}, SECRET, algorithm="HS256"), id="exp-not-a-number"),
        pytest.param(jwt.encode(good, SECRET, algorithm="HS256", headers={"crit": ["exp"]}), id="crit-header"),
        pytest.param(real + "x", id="trailing-garbage"),
        pytest.param(real + "." + sig, id="four-segments"),
        pytest.param("a.b.c", id="malformed-segments"),
        pytest.param("Bearer", id="bearer-word"),
    ]


@pytest.mark.parametrize("token", refused_tokens())
def test_refused_tokens_are_unauthorized_on_every_route(world: World, token: str) -> None:
    async def ws_connect(header: bool) -> None:
        ws = await RawWS.open(world.srv.ws, token, header_token=header)
        err = await ws.next_error(0)
        assert err["code"] == "unauthorized", err
        await ws.wait_until(lambda: ws.closed is not None and ws._reader.done(), what="the close")
        assert ws.closed.rcvd is not None and ws.closed.rcvd.code == 4401

    world.run(ws_connect(True))
    world.run(ws_connect(False))
    victim = world.victims["team-b:1"]
    before = world.run(settled_log(world.srv, victim.session))
    for name, (_route, act) in HTTP_ACTIONS.items():
        assert world.run(act(world, victim, token)) == "unauthorized", name
    assert world.run(settled_log(world.srv, victim.session)) == before


# ---------------------------------------------------------------- identity is not payload


SPOOF = {"client_id": "mallory", "sub": "mallory", "owner": "mallory", "requester": "mallory"}


async def test_identity_is_never_taken_from_frames_bodies_queries_or_headers(serve: Any, gate: Gate) -> None:
    srv = serve(agent=held_agent(gate))
    s = "ident-1"
    token = srv.token("alice")
    ws = await RawWS.open(srv.ws, token, query="client_id=mallory&sub=mallory")
    await ws.ok({"op": "subscribe", "session": s, "after": 0, **SPOOF})
    end = await ws.turn_end(s, (await ws.ok({"op": "send", "session": s, **SPOOF,
                                               "messages": [say("one", **SPOOF)]}))["turn_ids"][0])
    regen = await ws.ok({"op": "regenerate", "session": s, "message_id": end["message"]["id"], **SPOOF})
    await ws.turn_end(s, regen["turn_ids"][0])
    await ws.ok({"op": "cancel", "session": s, **SPOOF})
    headers = {"authorization": f"Bearer {token}", "x-client-id": "mallory", "x-forwarded-user": "mallory"}
    async with httpx.AsyncClient(timeout=TIMEOUT, headers=headers) as c:
        r = await c.post(f"{srv.http}/v1/sessions/{s}/messages", params={"client_id": "mallory"},
                         json={"messages": [say("two", **SPOOF)], **SPOOF})
        assert r.status_code == 200, r.text
        await ws.turn_end(s, r.json()["turn_ids"][0])
        r = await c.post(f"{srv.http}/v1/sessions/{s}/cancel", params={"client_id": "mallory"}, json=SPOOF)
        assert r.status_code == 200, r.text
        async with c.stream("POST", f"{srv.http}/api/chat",
                            json={"id": s, **SPOOF, "messages": [say("three", id="ai-3", role="user", **SPOOF)]}) as r:
            assert r.status_code == 200
            await r.aread()
        run_input = {"threadId": s, "runId": "agui-ident", **SPOOF, "forwardedProps": SPOOF,
                     "messages": [{"id": "agui-4", "role": "user", "content": "four", **SPOOF}]}
        async with c.stream("POST", f"{srv.http}/ag-ui", params={"client_id": "mallory"}, json=run_input) as r:
            assert r.status_code == 200
            await r.aread()
        r = await c.post(f"{srv.http}/ag-ui/{s}/cancel", params={"client_id": "mallory"}, json=SPOOF)
        assert r.status_code == 200, r.text
    log = await settled_log(srv, s)
    actors = {e["client_id"] for e in log if e["type"] in ("message", "cancel")}
    owners = {e["owner"] for e in log if e["type"] == "turn-start"}
    assert actors == {"alice"} and owners == {"alice"}, (actors, owners)
    assert "mallory" not in json.dumps([e for e in log if e["type"] != "message"])
    await ws.close()
