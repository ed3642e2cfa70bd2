"""Authentication and capabilities on the wire (invariant 7: identity is not
payload; a missing capability is an explicit error, never silence).

- the client id is the token's ``sub`` and nothing a frame or body says;
- a token's session patterns bound every action (``a-*`` cannot touch ``b-1``);
- forged, expired, sub-less, alg-``none`` tokens are ``unauthorized``, on the
  WebSocket (error frame, then close 4401) and over HTTP (401);
- ``?token=`` works for browsers (WebSocket and SSE cannot set headers);
- ``turnline token`` mints tokens the server accepts, with the caps asked for,
  and a bad ``--cap`` is a clear usage error.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from servers import SECRET
from turnline.server.auth import mint
from wsraw import Gate, RawWS, held_agent, settled_log

ROOT = Path(__file__).resolve().parents[2]
TURNLINE = str(Path(sys.executable).with_name("turnline"))
TIMEOUT = 5.0


@pytest.fixture
def srv(serve: Any, gate: Gate) -> Any:
    return serve(agent=held_agent(gate))


def hello(session: str, **extra: Any) -> dict[str, Any]:
    return {"op": "send", "session": session, "messages": [{"parts": [{"type": "text", "text": "hi"}]}], **extra}


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def bad_tokens() -> list[Any]:
    now = int(time.time())
    caps = {"*": ["subscribe", "publish", "cancel"]}
    return [
        pytest.param(mint("some-other-secret-entirely-32bytes", "alice", caps), id="forged-signature"),
        pytest.param(mint(SECRET, "alice", caps)[:-3] + "AAA", id="tampered-signature"),
        pytest.param(mint(SECRET, "alice", caps, ttl_s=-60), id="expired"),
        pytest.param(jwt.encode({"exp": now + 600, "cap": caps}, SECRET, algorithm="HS256"), id="no-sub"),
        pytest.param(jwt.encode({"sub": "", "exp": now + 600, "cap": caps}, SECRET, algorithm="HS256"),
                     id="empty-sub"),
        pytest.param(jwt.encode({"sub": "alice", "cap": caps}, SECRET, algorithm="HS256"), id="no-exp"),
        pytest.param(jwt.encode({"sub": "alice", "exp": now + 600, "cap": ["*"]}, SECRET, algorithm="HS256"),
                     id="cap-not-a-map"),
        pytest.param(jwt.encode({"sub": "alice", "exp": now + 600, "cap": caps}, SECRET, algorithm="HS512"),
                     id="other-algorithm"),
        pytest.param(_b64({"alg": "none", "typ": "JWT"}) + "." + _b64({"sub": "alice", "exp": now + 600,
                                                                       "cap": caps}) + ".", id="alg-none"),
        pytest.param("not-a-token", id="garbage"),
    ]


# ---------------------------------------------------------------- identity


async def test_client_id_comes_from_the_token_only(srv: Any, gate: Gate) -> None:
    alice = await RawWS.open(srv.ws, srv.token("alice"))
    await alice.subscribe("chat-1")
    ack = await alice.ok(hello("chat-1", client_id="bob", sub="bob", owner="bob"))
    (t1,) = ack["turn_ids"]
    await alice.turn_end("chat-1", t1)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.post(f"{srv.http}/v1/sessions/chat-1/messages",
                              json={"client_id": "bob", "messages": [{"parts": [{"type": "text", "text": "x"}]}]},
                              headers={"Authorization": f"Bearer {srv.token('alice')}", "X-Client-Id": "bob"})
        assert r.status_code == 200, r.text
        await alice.turn_end("chat-1", r.json()["turn_ids"][0])
    log = await settled_log(srv, "chat-1")
    by_user = [e for e in log if e["type"] in ("message", "turn-start")]
    assert {e["client_id"] if e["type"] == "message" else e["owner"] for e in by_user} == {"alice"}
    assert "bob" not in json.dumps(log)

    # "own" is the token's identity too: bob cannot stop alice's turn by claiming to be her.
    bob = await RawWS.open(srv.ws, srv.token("bob"))
    await bob.subscribe("chat-1")
    (held,) = (await alice.ok(hello("chat-1") | {"messages": [{"parts": [{"type": "text", "text": "hold"}]}]}))[
        "turn_ids"]
    await bob.wait_event("chat-1", "chunk", turn_id=held)
    ack = await bob.ok({"op": "cancel", "session": "chat-1", "client_id": "alice", "filter": {"own": True}})
    assert ack["cancelled"] == [] and ack["rejected"] == []
    await bob.fails({"op": "cancel", "session": "chat-1", "filter": {"client_id": "alice"}}, "forbidden")
    ack = await bob.ok({"op": "cancel", "session": "chat-1", "filter": {"turn_id": held}})
    assert ack["rejected"] == [held] and ack["cancelled"] == []
    gate.open(srv)
    assert (await bob.turn_end("chat-1", held))["reason"] == "complete"
    await alice.close()
    await bob.close()


# ---------------------------------------------------------------- session patterns


async def test_session_pattern_bounds_every_action(srv: Any, gate: Gate) -> None:
    owner = await RawWS.open(srv.ws, srv.token("bob", {"*": ["subscribe", "publish", "cancel", "cancel-any"]}))
    await owner.subscribe("b-1")
    (held,) = (await owner.ok({**hello("b-1"), "messages": [{"parts": [{"type": "text", "text": "hold"}]}]}))[
        "turn_ids"]
    await owner.wait_event("b-1", "chunk", turn_id=held)

    caps = {"a-*": ["subscribe", "publish", "cancel", "cancel-any"]}
    ws = await RawWS.open(srv.ws, srv.token("alice", caps))
    for frame in ({"op": "subscribe", "session": "b-1", "after": 0},
                  hello("b-1"),
                  {"op": "cancel", "session": "b-1"},
                  {"op": "cancel", "session": "b-1", "filter": {"all": True}},
                  {"op": "cancel", "session": "b-1", "filter": {"turn_id": held}},
                  {"op": "regenerate", "session": "b-1", "message_id": "x"},
                  # Near misses of the pattern.
                  {"op": "subscribe", "session": "a"},
                  {"op": "subscribe", "session": "xa-1"},
                  {"op": "subscribe", "session": "A-1"}):
        await ws.fails(frame, "forbidden")
    assert ws.events == {}
    # Inside the pattern everything works.
    await ws.subscribe("a-1")
    (t,) = (await ws.ok(hello("a-1")))["turn_ids"]
    assert (await ws.turn_end("a-1", t))["reason"] == "complete"
    await ws.ok({"op": "cancel", "session": "a-1", "filter": {"all": True}})
    # Bob's turn was never touched.
    assert not owner.find("b-1", "cancel")
    gate.open(srv)
    assert (await owner.turn_end("b-1", held))["reason"] == "complete"

    token = srv.token("alice", caps)
    async with httpx.AsyncClient(timeout=TIMEOUT, headers={"Authorization": f"Bearer {token}"}) as client:
        for method, path, body in (("POST", "/v1/sessions/b-1/messages", {"messages": [{"parts": []}]}),
                                   ("POST", "/v1/sessions/b-1/cancel", {}),
                                   ("GET", "/v1/sessions/b-1/events?after=0", None),
                                   ("GET", "/v1/sessions/b-1/messages", None),
                                   ("GET", "/v1/sessions/b-1/tree", None)):
            r = await client.request(method, srv.http + path, json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (path, r.text)
        r = await client.get(f"{srv.http}/v1/sessions/a-1/messages")
        assert r.status_code == 200
    await ws.close()
    await owner.close()


async def test_pattern_wildcard_is_only_star(srv: Any) -> None:
    """``*`` is the only wildcard in a capability pattern: ``?`` and ``[…]``
    match themselves, so a pattern never grants more than it says."""
    ws = await RawWS.open(srv.ws, srv.token("alice", {"room-?*": ["subscribe"], "[a-z]*": ["subscribe"],
                                                       "exact": ["subscribe"]}))
    await ws.fails({"op": "subscribe", "session": "room-1"}, "forbidden")
    await ws.fails({"op": "subscribe", "session": "chat-1"}, "forbidden")
    await ws.fails({"op": "subscribe", "session": "exact2"}, "forbidden")
    await ws.subscribe("exact")
    await ws.close()


# ---------------------------------------------------------------- bad tokens


@pytest.mark.parametrize("token", bad_tokens())
async def test_bad_token_is_unauthorized(srv: Any, token: str) -> None:
    for header_token in (True, False):
        ws = await RawWS.open(srv.ws, token, header_token=header_token)
        err = await ws.next_error(0)
        assert err["op"] == "error" and err["code"] == "unauthorized" and err["message"], err
        await ws.wait_until(lambda: ws.closed is not None and ws._reader.done(), what="close")
        assert ws.closed.rcvd is not None and ws.closed.rcvd.code == 4401
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for headers, query in (({"Authorization": f"Bearer {token}"}, ""), ({}, f"?token={token}")):
            r = await client.post(f"{srv.http}/v1/sessions/chat-1/messages{query}", headers=headers,
                                  json={"messages": [{"parts": [{"type": "text", "text": "x"}]}]})
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "unauthorized"
            r = await client.get(f"{srv.http}/v1/sessions/chat-1/events{query}", headers=headers)
            assert r.status_code == 401
    assert not srv.call(srv.runtime.store.exists("chat-1"))


# ---------------------------------------------------------------- query-string token


async def test_query_string_token(srv: Any) -> None:
    ws = await RawWS.open(srv.ws, srv.token("browser"), header_token=False)
    await ws.subscribe("chat-1")
    (t,) = (await ws.ok(hello("chat-1")))["turn_ids"]
    end = await ws.turn_end("chat-1", t)
    assert end["reason"] == "complete"
    assert ws.find("chat-1", "turn-start")[0]["owner"] == "browser"
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.get(f"{srv.http}/v1/sessions/chat-1/messages", params={"token": srv.token("browser")})
        assert r.status_code == 200 and r.json()["messages"][-1] == end["message"]
    await ws.close()


# ---------------------------------------------------------------- the CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TURNLINE, *args], capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)})


async def test_cli_token_is_accepted_with_its_caps(srv: Any) -> None:
    out = cli("token", "--sub", "alice", "--cap", "chat-*:subscribe,publish,cancel", "--secret", SECRET)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["cap"] == {"chat-*": ["subscribe", "publish", "cancel"]}
    assert 3500 < claims["exp"] - time.time() <= 3600

    ws = await RawWS.open(srv.ws, token)
    await ws.subscribe("chat-1")
    (t,) = (await ws.ok(hello("chat-1")))["turn_ids"]
    assert (await ws.turn_end("chat-1", t))["reason"] == "complete"
    await ws.ok({"op": "cancel", "session": "chat-1"})
    await ws.fails({"op": "cancel", "session": "chat-1", "filter": {"all": True}}, "forbidden")  # no cancel-any
    await ws.fails({"op": "subscribe", "session": "other-1"}, "forbidden")
    await ws.fails(hello("other-1"), "forbidden")
    await ws.close()

    # Minted with another secret: refused.
    other = cli("token", "--sub", "alice", "--secret", "a-different-secret").stdout.strip()
    ws = await RawWS.open(srv.ws, other)
    assert (await ws.next_error(0))["code"] == "unauthorized"
    await ws.close()

    # Repeated --cap and --ttl.
    out = cli("token", "--sub", "bob", "--cap", "a-*:subscribe", "--cap", "a-*:publish", "--cap", "b-1:admin",
              "--ttl", "60", "--secret", SECRET)
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["cap"] == {"a-*": ["subscribe", "publish"], "b-1": ["admin"]}
    assert claims["exp"] - time.time() <= 60


@pytest.mark.parametrize("cap, says", [
    ("chat-*:fly", "fly"),
    ("nocolon", "nocolon"),
    (":publish", ":publish"),
    ("chat-*:", "chat-*:"),
    ("chat-*:publish,,nope", "nope"),
])
def test_cli_bad_cap_is_a_clear_error(cap: str, says: str) -> None:
    out = cli("token", "--sub", "alice", "--cap", cap, "--secret", "X")
    assert out.returncode == 2, out
    assert out.stdout == ""  # no token printed
    assert "--cap" in out.stderr and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
