"""The HTTP face of the wire contract (PROTOCOL.md, "HTTP") against a real server.

- ``POST /v1/sessions/{id}/messages`` is ``send``: message ids and the turn ids
  started or queued, answered once durable;
- ``POST …/cancel`` is ``cancel``: the ``cancel-result``; with ``seen`` the
  persisted message is the fold of the chunks with ``seq <= seen`` (invariant 5);
- ``GET …/events`` is SSE whose ``id:`` is the seq; ``after=`` and
  ``Last-Event-ID`` resume with no gap and no duplicate (invariant 1);
- ``GET …/messages`` pages one branch, newest page first; ``GET …/tree``;
- ``/healthz``, ``/metrics`` (with the late-chunk counter of invariant 2);
- every error is ``{"error": {"code", "message"}}`` with the status of its code.

Ordering is driven by a gate the agent waits at and by events observed on a
raw WebSocket; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest

from wsraw import Gate, RawWS, assert_gapless, settled_log, text_of

S = "chat-1"
WORDS = ["alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta "]
TIMEOUT = 5.0


class Late:
    """What the ``late`` agent mode reports: its write after the turn ended."""

    def __init__(self) -> None:
        self.written = threading.Event()
        self.tasks: set[asyncio.Task[None]] = set()


def make_agent(gate: Gate, late: Late) -> Any:
    async def agent(turn: Any):
        prompt = " ".join(p.get("text", "") for p in turn.input.parts)
        if prompt.startswith("hold"):
            for w in WORDS:
                yield w
            await gate.wait()
            yield "released"
        elif prompt.startswith("late"):
            async def after_end() -> None:
                await turn.ended.wait()
                await turn.write("too late")  # dropped and counted: the turn has ended
                late.written.set()

            task = asyncio.ensure_future(after_end())
            late.tasks.add(task)
            yield "on time"
        else:
            yield "re: "
            yield prompt

    return agent


@pytest.fixture
def late() -> Late:
    return Late()


@pytest.fixture
def srv(serve: Any, gate: Gate, late: Late) -> Any:
    return serve(agent=make_agent(gate, late))


def auth(srv: Any, sub: str = "alice", caps: dict[str, list[str]] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.token(sub, caps)}"}


def user(text: str, id: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"parts": [{"type": "text", "text": text}]}
    if id is not None:
        m["id"] = id
    return m


async def observer(srv: Any, session: str = S) -> RawWS:
    ws = await RawWS.open(srv.ws, srv.token("watcher", {"*": ["subscribe"]}))
    await ws.subscribe(session)
    return ws


async def post(client: httpx.AsyncClient, srv: Any, session: str, messages: list[dict[str, Any]],
               **fields: Any) -> dict[str, Any]:
    r = await client.post(f"{srv.http}/v1/sessions/{session}/messages", json={"messages": messages, **fields},
                          headers=auth(srv))
    assert r.status_code == 200, r.text
    return r.json()


async def sse(client: httpx.AsyncClient, url: str, headers: dict[str, str], until: Any,
              timeout: float = TIMEOUT, opened: asyncio.Event | None = None) -> list[tuple[int, str, dict[str, Any]]]:
    """Read SSE events (``id``, ``event``, parsed ``data``) until ``until(events)``
    is true, then close the stream (a client going away). ``opened`` is set
    when the server's opening comment arrives (the cursor is fixed by then)."""
    out: list[tuple[int, str, dict[str, Any]]] = []
    async with asyncio.timeout(timeout):
        async with client.stream("GET", url, headers=headers) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            fields: dict[str, str] = {}
            async for line in r.aiter_lines():
                if line.startswith(":"):
                    if opened is not None:
                        opened.set()
                    continue
                if line == "":
                    if "data" in fields:
                        out.append((int(fields["id"]), fields.get("event", "message"), json.loads(fields["data"])))
                        fields = {}
                        if until(out):
                            break
                    continue
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
    return out


# ---------------------------------------------------------------- POST messages


async def test_post_messages_returns_ids_once_durable(srv: Any, gate: Gate) -> None:
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        body = await post(client, srv, S, [user("one", "m-1"), user("two", "m-2")])
        assert body["message_ids"] == ["m-1", "m-2"] and len(body["turn_ids"]) == 1, body
        (turn_id,) = body["turn_ids"]
        # Answered once durable: the messages and the turn start are in the log already.
        log = [json.loads(r.data) for r in srv.call(srv.runtime.store.read(S, 0))]
        assert [e["message"]["id"] for e in log if e["type"] == "message"] == ["m-1", "m-2"]
        start = next(e for e in log if e["type"] == "turn-start")
        assert start["turn_id"] == turn_id and start["owner"] == "alice" and start["input_id"] == "m-2"
        assert next(e for e in log if e["message"]["id"] == "m-2" and e["type"] == "message")["message"][
            "parent_id"] == "m-1"
        end = await ws.turn_end(S, turn_id)
        assert end["reason"] == "complete" and text_of(end["message"]) == "re: two"
        # Server-generated ids when the client gives none.
        body = await post(client, srv, S, [user("three")])
        assert len(body["message_ids"]) == 1 and body["message_ids"][0] not in ("m-1", "m-2")
        await ws.turn_end(S, body["turn_ids"][0])
    await ws.close()


async def test_history_shows_a_question_whose_answer_is_still_streaming(srv: Any, gate: Gate) -> None:
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        gate.close(srv)
        turn_id = (await post(client, srv, S, [user("hold", "m-first")]))["turn_ids"][0]
        h = await client.get(f"{srv.http}/v1/sessions/{S}/messages", headers=auth(srv))
        assert [m["id"] for m in h.json()["messages"]] == ["m-first"]  # a reload mid-turn keeps the question
        gate.open(srv)
        end = await ws.turn_end(S, turn_id)
        h = await client.get(f"{srv.http}/v1/sessions/{S}/messages", headers=auth(srv))
        assert [m["id"] for m in h.json()["messages"]] == ["m-first", end["message"]["id"]]
    await ws.close()


async def test_post_messages_queue_policy_returns_the_queued_turn(srv: Any, gate: Gate) -> None:
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        held = (await post(client, srv, S, [user("hold")]))["turn_ids"][0]
        body = await post(client, srv, S, [user("next", "m-q")], policy="queue")
        assert body["message_ids"] == ["m-q"] and body["turn_ids"] == [] and len(body["queued"]) == 1, body
        (queued,) = body["queued"]
        q = await ws.wait_event(S, "queued", message_id="m-q")
        assert q["position"] == 1 and q["turn_id"] == queued
        assert not ws.find(S, "turn-start", turn_id=queued)
        gate.open(srv)
        assert (await ws.turn_end(S, held))["reason"] == "complete"
        end = await ws.turn_end(S, queued)
        assert end["reason"] == "complete" and text_of(end["message"]) == "re: next"
        # reject policy over HTTP: a 200 with the refusal, not an error.
        gate.close(srv)
        held2 = (await post(client, srv, S, [user("hold 2")]))["turn_ids"][0]
        body = await post(client, srv, S, [user("nope", "m-r")], policy="reject")
        assert body == {"message_ids": ["m-r"], "turn_ids": [], "rejected": "busy"}, body
        assert (await ws.wait_event(S, "rejected", message_id="m-r"))["code"] == "busy"
        gate.open(srv)
        assert (await ws.turn_end(S, held2))["reason"] == "complete"
    await ws.close()


# ---------------------------------------------------------------- POST cancel


async def test_post_cancel_returns_result_and_truncates_to_seen(srv: Any, gate: Gate) -> None:
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        turn_id = (await post(client, srv, S, [user("hold")]))["turn_ids"][0]
        deltas = await ws.wait_until(
            lambda: (d := [e for e in ws.find(S, "chunk", turn_id=turn_id) if e["chunk"]["type"] == "text-delta"])
            and len(d) == len(WORDS) and d, what="all deltas")
        seen = deltas[2]["seq"]  # the user's screen showed three words
        r = await client.post(f"{srv.http}/v1/sessions/{S}/cancel", json={"seen": seen}, headers=auth(srv))
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["type"] == "cancel-result" and result["cancelled"] == [turn_id], result
        assert result["rejected"] == [] and result["pending"] == [] and result["request_id"]
        assert isinstance(result["seq"], int) and result["seq"] > seen
        end = await ws.turn_end(S, turn_id)
        assert end["reason"] == "cancelled"
        msg = end["message"]
        assert msg["parts"] == [{"type": "text", "text": "".join(WORDS[:3]), "state": "done"}], msg
        assert msg["metadata"]["interrupted"] == {"reason": "cancelled", "seen": seen}
        # The same message is what history serves.
        h = await client.get(f"{srv.http}/v1/sessions/{S}/messages", headers=auth(srv))
        assert h.json()["messages"][-1] == msg
        # The cancel request and its result are in the log, attributed.
        cancel = ws.find(S, "cancel", request_id=result["request_id"])[0]
        assert cancel["seen"] == seen and cancel["client_id"] == "alice" and cancel["filter"] == {"own": True}
        logged = ws.find(S, "cancel-result", request_id=result["request_id"])[0]
        assert {"rejected": [], "pending": [], **logged} == result

        # Without seen, everything the turn produced is kept.
        turn2 = (await post(client, srv, S, [user("hold again")]))["turn_ids"][0]
        await ws.wait_until(lambda: len([e for e in ws.find(S, "chunk", turn_id=turn2)
                                         if e["chunk"]["type"] == "text-delta"]) == len(WORDS), what="deltas")
        r = await client.post(f"{srv.http}/v1/sessions/{S}/cancel", json={"filter": {"turn_id": turn2}},
                              headers=auth(srv))
        assert r.json()["cancelled"] == [turn2]
        end = await ws.turn_end(S, turn2)
        assert text_of(end["message"]) == "".join(WORDS)
        # A second cancel is a no-op, reported as such.
        r = await client.post(f"{srv.http}/v1/sessions/{S}/cancel", json={}, headers=auth(srv))
        assert r.status_code == 200 and r.json()["cancelled"] == [] and r.json()["rejected"] == []
    await ws.close()


# ---------------------------------------------------------------- SSE


async def test_sse_after_and_last_event_id_resume(srv: Any, gate: Gate) -> None:
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        first = await post(client, srv, S, [user("warm up")])
        await ws.turn_end(S, first["turn_ids"][0])
        turn_id = (await post(client, srv, S, [user("hold")]))["turn_ids"][0]
        url = f"{srv.http}/v1/sessions/{S}/events?after=0"
        # First connection: from the start until the third word of the held turn.
        part1 = await sse(client, url, auth(srv), lambda evs: any(
            e["type"] == "chunk" and e["turn_id"] == turn_id and e["chunk"].get("delta") == WORDS[2]
            for _, _, e in evs))
        last_id = part1[-1][0]
        # While this client is away, the turn finishes.
        gate.open(srv)
        await ws.turn_end(S, turn_id)
        log = await settled_log(srv, S)
        # A browser's EventSource reconnects to the same URL (?after=0) with
        # Last-Event-ID: the header wins.
        headers = {**auth(srv), "Last-Event-ID": str(last_id)}
        part2 = await sse(client, url, headers, lambda evs: evs[-1][0] >= log[-1]["seq"])
        events = [e for _, _, e in part1 + part2]
        assert [i for i, _, _ in part1 + part2] == [e["seq"] for e in events]  # id: is the seq
        assert {name for _, name, _ in part1 + part2} == {"turnline"}
        assert_gapless(events)
        assert events == log
        assert part2[0][0] == last_id + 1
        # after= alone resumes the same way.
        part3 = await sse(client, f"{srv.http}/v1/sessions/{S}/events?after={last_id}", auth(srv),
                          lambda evs: evs[-1][0] >= log[-1]["seq"])
        assert [e for _, _, e in part3] == log[last_id:]
        # Query-string token (EventSource cannot set headers).
        tok = srv.token("alice")
        part4 = await sse(client, f"{srv.http}/v1/sessions/{S}/events?after={log[-2]['seq']}&token={tok}", {},
                          lambda evs: True)
        assert part4[0][2] == log[-1]
    await ws.close()


async def test_sse_without_cursor_is_live_only(srv: Any) -> None:
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        await ws.turn_end(S, (await post(client, srv, S, [user("old")]))["turn_ids"][0])
        last = len(await settled_log(srv, S))
        opened = asyncio.Event()
        reader = asyncio.ensure_future(sse(client, f"{srv.http}/v1/sessions/{S}/events", auth(srv),
                                           lambda evs: any(e["type"] == "turn-end" for _, _, e in evs),
                                           opened=opened))
        async with asyncio.timeout(TIMEOUT):
            await opened.wait()
        await post(client, srv, S, [user("new")])
        events = [e for _, _, e in await reader]
        assert events[0]["seq"] == last + 1
        assert_gapless(events, last + 1)
    await ws.close()


# ---------------------------------------------------------------- history


async def test_get_messages_pages_newest_first_and_tree(srv: Any) -> None:
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        ends = []
        for i in (1, 2, 3):
            body = await post(client, srv, S, [user(f"q{i}", f"u{i}")])
            ends.append(await ws.turn_end(S, body["turn_ids"][0]))
        replies = [e["message"] for e in ends]
        chain = ["u1", replies[0]["id"], "u2", replies[1]["id"], "u3", replies[2]["id"]]
        base = f"{srv.http}/v1/sessions/{S}/messages"

        async def page(**params: Any) -> dict[str, Any]:
            r = await client.get(base, params=params, headers=auth(srv))
            assert r.status_code == 200, r.text
            return r.json()

        full = await page()
        assert [m["id"] for m in full["messages"]] == chain and full["has_more"] is False
        assert full["messages"][1] == replies[0]  # the persisted, folded assistant message
        assert full["messages"][2]["parent_id"] == replies[0]["id"]
        p1 = await page(limit=2)
        assert [m["id"] for m in p1["messages"]] == chain[4:] and p1["has_more"] is True and p1["before"] == "u3"
        p2 = await page(limit=2, before=p1["before"])
        assert [m["id"] for m in p2["messages"]] == chain[2:4] and p2["has_more"] is True
        p3 = await page(limit=2, before=p2["before"])
        assert [m["id"] for m in p3["messages"]] == chain[:2] and p3["has_more"] is False and "before" not in p3
        # A branch: regenerate the last answer; history follows the newest, leaf= the old one.
        writer = await RawWS.open(srv.ws, srv.token("alice"))
        ack = await writer.ok({"op": "regenerate", "session": S, "message_id": replies[2]["id"]})
        alt = (await ws.turn_end(S, ack["turn_ids"][0]))["message"]
        assert alt["parent_id"] == "u3" and alt["id"] != replies[2]["id"]
        assert [m["id"] for m in (await page())["messages"]] == chain[:5] + [alt["id"]]
        assert [m["id"] for m in (await page(leaf=replies[2]["id"]))["messages"]] == chain
        assert [m["id"] for m in (await page(leaf="u2"))["messages"]] == chain[:3]

        r = await client.get(f"{srv.http}/v1/sessions/{S}/tree", headers=auth(srv))
        assert r.status_code == 200
        tree = r.json()
        nodes = {n["id"]: n for n in tree["nodes"]}
        assert set(nodes) == set(chain) | {alt["id"]}
        assert tree["head"] == alt["id"] and tree["active"] == []
        assert nodes["u1"]["parent_id"] is None and nodes["u1"]["role"] == "user"
        assert nodes[alt["id"]]["parent_id"] == "u3" and nodes[replies[2]["id"]]["parent_id"] == "u3"
        assert nodes[alt["id"]]["role"] == "assistant" and nodes[alt["id"]]["turn_id"] == ack["turn_ids"][0]
        assert nodes[alt["id"]]["reason"] == "complete"
        await writer.close()
    await ws.close()


# ---------------------------------------------------------------- health and metrics


async def test_healthz_and_metrics_with_late_chunks(srv: Any, late: Late) -> None:
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.get(f"{srv.http}/healthz")
        assert r.status_code == 200 and r.json() == {"ok": True}
        r = await client.get(f"{srv.http}/metrics")
        assert r.status_code == 200 and "turnline_late_chunks_dropped_total 0.0" in r.text
        turn_id = (await post(client, srv, S, [user("late")]))["turn_ids"][0]
        end = await ws.turn_end(S, turn_id)
        assert end["reason"] == "complete" and text_of(end["message"]) == "on time"
        assert await asyncio.to_thread(late.written.wait, TIMEOUT)
        r = await client.get(f"{srv.http}/metrics")
        text = r.text
        assert r.headers["content-type"].startswith("text/plain")
        for name in ("turnline_turns_started_total 1.0", 'turnline_turns_ended_total{reason="complete"} 1.0',
                     "turnline_late_chunks_dropped_total 1.0", "turnline_events_appended_total",
                     "turnline_ws_connections 1.0", "turnline_active_turns 0.0"):
            assert name in text, name
        # The late chunk is nowhere in the log.
        assert "too late" not in json.dumps(await settled_log(srv, S))
    await ws.close()


# ---------------------------------------------------------------- errors


def _err_cases() -> list[Any]:
    P = f"/v1/sessions/{S}"
    ok = {"messages": [user("hi")]}
    none: dict[str, list[str]] = {"*": []}
    ro = {"*": ["subscribe"]}
    sub_none = {"*": ["publish"]}
    return [
        # 400
        pytest.param("POST", f"{P}/messages", b'{"messages": [', None, None, 400, "bad_json", id="bad_json"),
        pytest.param("POST", f"{P}/messages", b"[1, 2]", None, None, 400, "bad_frame", id="array-body"),
        pytest.param("POST", f"{P}/messages", {"messages": []}, None, None, 400, "bad_frame", id="no-messages"),
        pytest.param("POST", f"{P}/messages", {"messages": "hi"}, None, None, 400, "bad_frame", id="wrong-type"),
        pytest.param("POST", f"{P}/messages", {"messages": [user("x")] * 65}, None, None, 400, "bad_frame",
                     id="too-many-messages"),
        pytest.param("POST", f"{P}/messages", {**ok, "policy": "yolo"}, None, None, 400, "bad_frame",
                     id="bad-policy"),
        pytest.param("POST", f"{P}/cancel", {"filter": {"own": True, "all": True}}, None, None, 400, "bad_frame",
                     id="two-scopes"),
        pytest.param("POST", f"{P}/cancel", {"seen": -1}, None, None, 400, "bad_frame", id="negative-seen"),
        pytest.param("GET", f"{P}/events?after=-1", None, None, None, 400, "bad_frame", id="bad-after"),
        pytest.param("GET", f"{P}/events?after=x", None, None, None, 400, "bad_frame", id="after-not-int"),
        pytest.param("GET", f"{P}/messages?limit=many", None, None, None, 400, "bad_frame", id="bad-limit"),
        pytest.param("POST", "/v1/sessions/bad%20id/messages", ok, None, None, 400, "bad_id", id="session-space"),
        pytest.param("POST", f"/v1/sessions/{'s' * 200}/messages", ok, None, None, 400, "bad_id",
                     id="session-200"),
        pytest.param("POST", f"{P}/messages", {"messages": [user("x", "a b")]}, None, None, 400, "bad_id",
                     id="message-id"),
        pytest.param("POST", f"{P}/messages", {**ok, "parent_id": "a b"}, None, None, 400, "bad_id",
                     id="parent-id"),
        pytest.param("GET", f"{P}/messages?leaf=a%20b", None, None, None, 400, "bad_id", id="leaf-id"),
        # 401
        pytest.param("POST", f"{P}/messages", ok, "none", None, 401, "unauthorized", id="no-token"),
        pytest.param("POST", f"{P}/messages", ok, "garbage", None, 401, "unauthorized", id="bad-token"),
        pytest.param("GET", f"{P}/events", None, "none", None, 401, "unauthorized", id="sse-no-token"),
        pytest.param("GET", f"{P}/messages", None, "garbage", None, 401, "unauthorized", id="history-bad-token"),
        # 403
        pytest.param("POST", f"{P}/messages", ok, None, ro, 403, "forbidden", id="no-publish"),
        pytest.param("POST", f"{P}/cancel", {}, None, ro, 403, "forbidden", id="no-cancel"),
        pytest.param("POST", f"{P}/cancel", {"filter": {"all": True}}, None, None, 403, "forbidden",
                     id="all-without-cancel-any"),
        pytest.param("POST", f"{P}/cancel", {"filter": {"client_id": "bob"}}, None, None, 403, "forbidden",
                     id="other-client-without-cancel-any"),
        pytest.param("GET", f"{P}/events", None, None, sub_none, 403, "forbidden", id="sse-no-subscribe"),
        pytest.param("GET", f"{P}/messages", None, None, none, 403, "forbidden", id="history-no-subscribe"),
        pytest.param("GET", f"{P}/tree", None, None, none, 403, "forbidden", id="tree-no-subscribe"),
        # 404
        pytest.param("POST", "/v1/sessions/ghost/cancel", {}, None, None, 404, "not_found", id="cancel-unknown"),
        pytest.param("GET", "/v1/sessions/ghost/messages", None, None, None, 404, "not_found",
                     id="history-unknown"),
        pytest.param("GET", "/v1/sessions/ghost/tree", None, None, None, 404, "not_found", id="tree-unknown"),
        pytest.param("GET", f"{P}/messages?leaf=nope", None, None, None, 404, "not_found", id="leaf-unknown"),
        pytest.param("GET", f"{P}/messages?before=nope", None, None, None, 404, "not_found",
                     id="before-unknown"),
        pytest.param("POST", f"{P}/messages", {**ok, "parent_id": "nope"}, None, None, 404, "not_found",
                     id="parent-unknown"),
        pytest.param("GET", "/v1/nothing/here", None, None, None, 404, "not_found", id="no-route"),
        # 409
        pytest.param("POST", f"{P}/messages", {"messages": [user("x", "m-seed")]}, None, None, 409, "conflict",
                     id="duplicate-id"),
        # 413
        pytest.param("POST", f"{P}/messages", {"messages": [user("x" * 5000)]}, None, None, 413, "too_large",
                     id="too-large"),
    ]


@pytest.mark.parametrize("method, path, body, token, caps, status, code", _err_cases())
async def test_error_responses(serve: Any, gate: Gate, late: Late, method: str, path: str, body: Any,
                               token: str | None, caps: Any, status: int, code: str) -> None:
    srv = serve(agent=make_agent(gate, late), server_config={"max_frame_bytes": 4096})
    ws = await observer(srv)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        seeded = await post(client, srv, S, [user("seed", "m-seed")])
        await ws.turn_end(S, seeded["turn_ids"][0])
        before = await settled_log(srv, S)
        headers = {} if token == "none" else {"Authorization": "Bearer not.a.jwt"} if token == "garbage" \
            else auth(srv, "alice", caps)
        content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        if content is not None:
            headers["content-type"] = "application/json"
        r = await client.request(method, srv.http + path, content=content, headers=headers)
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        payload = r.json()
        assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}, payload
        assert payload["error"]["code"] == code and payload["error"]["message"], payload
        # Nothing was stored, and the server still serves.
        assert await settled_log(srv, S) == before
        again = await post(client, srv, S, [user("still fine")])
        assert (await ws.turn_end(S, again["turn_ids"][0]))["reason"] == "complete"
    await ws.close()
