"""AI SDK 7 against a real server: ``WebSocketChatTransport`` at ``/api/chat/ws``,
``finishReason`` in ``onFinish``, ``steering-message`` parts, ``experimental_queue``.

The client is the REAL ``ai`` package (tests/node, ``AbstractChat`` driven by
chat_driver.mjs; the same drivers as test_aisdk.py). Order is controlled with
gates the agents wait at and conditions read from the server; no sleep decides
an outcome.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from test_aisdk import (  # noqa: F401  (drivers and node are fixtures)
    MAJORS, NODE_DIR, TIMEOUT, WORDS, Script, assistants, drivers, ended, history, hub_state, live_text, node, text,
    until, visible,
)
from wsraw import Gate

WS = {"transport": "ws"}


def steer(srv: Any, session: str, turn_id: str, words: str, msg_id: str = "steer-1") -> None:
    r = httpx.post(f"{srv.http}/v1/sessions/{session}/messages", timeout=TIMEOUT,
                   headers={"authorization": f"Bearer {srv.token()}"},
                   json={"messages": [{"id": msg_id, "role": "user", "parts": [{"type": "text", "text": words}]}],
                         "steer": turn_id})
    assert r.status_code == 200, r.text


def running_turn(srv: Any, session: str) -> str:
    return until(srv, lambda rt: hub_state(rt, session) and next(iter(hub_state(rt, session).active), None),
                 f"a running turn in {session}")


# ---------------------------------------------------------------- WebSocketChatTransport


@pytest.mark.parametrize("auth", ["query", "protocol"])
def test_ws_send_streams_the_reply_and_finishes_with_stop(serve: Any, node: Any, auth: str) -> None:
    srv = serve(agent=Script("Let me ", "look. ", {"type": "data-weather", "id": "d1", "data": {"t": 21}}, "Done."))
    chats = node("ai7", srv)
    chats.call("new", name="a", chatId="ws-send", transport="ws", auth=auth)
    done = chats.settled(chats.start("send", name="a", text="weather?"))
    assert done["status"] == "ready" and done["error"] is None and done["errors"] == []
    user, reply = done["messages"]
    saved = history(srv, "ws-send")
    assert [m["id"] for m in saved] == [user["id"], reply["id"]]  # chat id = session id; the server's reply id
    assert visible(reply["parts"]) == visible(saved[1]["parts"])
    assert text(reply) == "Let me look. Done."
    assert done["finishes"] == [{"finishReason": "stop", "isAbort": False, "isError": False,
                                 "isDisconnect": False, "messageId": reply["id"]}]


def test_ws_abort_mid_stream_cancels_and_saves_what_was_shown(serve: Any, node: Any) -> None:
    never = Gate()
    agent = Script(*WORDS[:5], never, *WORDS[5:])
    srv = serve(agent=agent)
    chats = node("ai7", srv)
    chats.call("new", name="a", chatId="ws-abort", **WS)
    send = chats.start("send", name="a", text="count")
    chats.call("wait-text", name="a", text="w4 ")
    shown = chats.call("stop", name="a")  # the transport sends {type: "abort", requestId}
    assert chats.result(send)["settled"] == "ok"
    turn = ended(srv, "ws-abort")
    assert turn.reason == "cancelled" and agent.aborted == [turn.turn_id]  # the abort reached the agent
    (reply,) = assistants(shown)
    saved = history(srv, "ws-abort")[-1]
    assert saved["id"] == reply["id"] and text(reply) == "".join(WORDS[:5])
    assert visible(saved["parts"]) == visible(reply["parts"])
    assert saved["metadata"]["interrupted"]["reason"] == "cancelled"
    assert shown["finishes"][-1]["isAbort"] is True


@pytest.mark.parametrize("exact", [True, False])
def test_ws_abort_with_chunks_on_the_wire(serve: Any, node: Any, exact: bool) -> None:
    """The server has sent w5..w9, still on the wire when the user presses
    stop (the client shows up to w4). With turnline's aisdk-websocket.js the
    abort says so and the saved answer is the screen's; the plain transport's
    abort names no position, so what the server had sent is saved."""
    more, never = Gate(), Gate()
    agent = Script(*WORDS[:5], more, *WORDS[5:], never)
    srv = serve(agent=agent)
    chats = node("ai7", srv)
    session = f"ws-wire-{exact}"
    chats.call("new", name="a", chatId=session, exact=exact, **WS)
    send = chats.start("send", name="a", text="count")
    chats.call("wait-text", name="a", text="w4 ")
    chats.call("hold", name="a")
    more.open(srv)
    chats.call("wait-held", name="a", count=5)  # w5..w9 reached the client's socket, not the transport
    shown = chats.call("stop", name="a")
    chats.call("release", name="a")  # they arrive after the abort: the transport drops them
    chats.result(send)
    turn = ended(srv, session)
    assert turn.reason == "cancelled" and agent.aborted == [turn.turn_id]
    (reply,) = assistants(chats.call("state", name="a"))
    assert reply == assistants(shown)[0] and text(reply) == "".join(WORDS[:5])
    saved = history(srv, session)[-1]
    if exact:
        assert visible(saved["parts"]) == visible(reply["parts"])
    else:
        assert text(saved) == "".join(WORDS)


def test_ws_dropped_socket_resumes_mid_turn_with_no_duplicate(serve: Any, node: Any) -> None:
    """The socket drops after w4; the agent writes w5..w7 meanwhile; the
    resumed chat shows every word once, and the turn was never cancelled."""
    after_drop, last = Gate(), Gate()
    agent = Script(*WORDS[:5], after_drop, *WORDS[5:8], last, *WORDS[8:])
    srv = serve(agent=agent)
    chats = node("ai7", srv)
    chats.call("new", name="a", chatId="ws-drop", **WS)
    send = chats.start("send", name="a", text="count")
    chats.call("wait-text", name="a", text="w4 ")
    dropped = chats.call("drop", name="a")
    assert "closed" in (dropped["error"] or ""), dropped
    chats.result(send)
    after_drop.open(srv)
    live_text(srv, "ws-drop", "w7 ")  # written while no socket was there
    resume = chats.start("resume", name="a")
    chats.call("wait-text", name="a", text="w7 ")
    last.open(srv)
    done = chats.settled(resume)
    assert ended(srv, "ws-drop").reason == "complete" and agent.aborted == []
    (reply,) = assistants(done)
    assert text(reply) == "".join(WORDS)  # no gap, no duplicate
    assert visible(reply["parts"]) == visible(history(srv, "ws-drop")[-1]["parts"])
    assert done["finishes"][-1]["finishReason"] == "stop"


def test_ws_abort_right_after_send_stops_the_turn_it_starts(serve: Any, node: Any) -> None:
    never = Gate()
    agent = Script("w0 ", never)
    srv = serve(agent=agent)
    chats = node("ai7", srv)
    send = {"type": "send", "requestId": "s1", "id": "ws-quick", "trigger": "submit-message", "body": {},
            "headers": {}, "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
    probe = {"type": "resume", "requestId": "p", "id": "elsewhere", "headers": {}, "body": {}}
    # frames are handled in order: once the probe is answered the abort was
    frames = chats.call("raw-ws", frames=[send, {"type": "abort", "requestId": "s1"}, probe])["frames"]
    assert frames[-1] == {"type": "no-active", "requestId": "p"}
    turn = ended(srv, "ws-quick")
    assert turn.reason == "cancelled"
    assert history(srv, "ws-quick")[-1]["metadata"]["interrupted"]["reason"] == "cancelled"


def test_ws_dropped_socket_cancels_when_set(serve: Any, node: Any) -> None:
    more = Gate()
    agent = Script(*WORDS[:5], more, *WORDS[5:])
    srv = serve(agent=agent, server_config={"aisdk_cancel_on_disconnect": True})
    chats = node("ai7", srv)
    chats.call("new", name="a", chatId="ws-drop-cancel", **WS)
    send = chats.start("send", name="a", text="count")
    chats.call("wait-text", name="a", text="w4 ")
    chats.call("drop", name="a")
    chats.result(send)
    until(srv, lambda _rt: srv.server.config.app.aisdk.disconnects >= 1, "the drop to be handled")
    more.open(srv)
    turn = ended(srv, "ws-drop-cancel")
    assert turn.reason == "cancelled" and agent.aborted == [turn.turn_id]
    assert text(history(srv, "ws-drop-cancel")[-1]) == "".join(WORDS[:5])  # as of the last chunk sent


def test_turnline_serves_its_websocket_helper(serve: Any) -> None:
    r = httpx.get(f"{serve(agent=Script('ok')).http}/aisdk-websocket.js", timeout=TIMEOUT)
    assert r.status_code == 200 and "export function turnlineWebSocket" in r.text


def test_ws_resume_with_nothing_active_is_no_active(serve: Any, node: Any) -> None:
    srv = serve(agent=Script("hi"))
    chats = node("ai7", srv)
    chats.call("new", name="a", chatId="ws-idle", **WS)
    done = chats.settled(chats.start("resume", name="a"))
    assert done["status"] == "ready" and done["messages"] == [] and done["error"] is None
    raw = chats.call("raw-ws", frames=[{"type": "resume", "requestId": "r1", "id": "ws-idle", "headers": {},
                                        "body": {}}])
    assert raw["frames"] == [{"type": "no-active", "requestId": "r1"}]


def test_ws_resume_after_last_sequence_sends_only_what_follows(serve: Any, node: Any) -> None:
    """A client that tracks ``sequence`` resumes with ``lastSequence``: the
    chunks after it, numbered as on the first connection."""
    more = Gate()
    srv = serve(agent=Script(*WORDS[:5], more, *WORDS[5:]))
    chats = node("ai7", srv)
    send = {"type": "send", "requestId": "s1", "id": "ws-seq", "trigger": "submit-message",
            "messageId": None, "headers": {}, "body": {}, "metadata": None,
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "count"}]}]}
    first = chats.start("raw-ws", frames=[send])  # its end comes once the gate opens
    live_text(srv, "ws-seq", "w4 ")
    # start, text-start and w0..w4 are in the log: sequences 0 to 6
    resume = {"type": "resume", "requestId": "r1", "id": "ws-seq", "headers": {}, "body": {}, "metadata": None}
    whole = [f for f in chats.call("raw-ws", frames=[resume], chunks=7)["frames"] if f.get("type") == "chunk"]
    tail = [f for f in chats.call("raw-ws", frames=[{**resume, "requestId": "r2", "lastSequence": 3}],
                                  chunks=3)["frames"] if f.get("type") == "chunk"]
    more.open(srv)
    sent = [f for f in chats.result(first)["frames"] if f.get("type") == "chunk"]
    assert [f["sequence"] for f in sent] == list(range(len(sent)))
    assert whole == [{**f, "requestId": "r1"} for f in sent[:7]]  # numbered as on the first socket
    assert tail == [{**f, "requestId": "r2"} for f in sent[4:7]]
    assert sent[0]["chunk"]["type"] == "start" and sent[6]["chunk"] == {"type": "text-delta", "id": "text-0",
                                                                        "delta": "w4 "}
    assert sent[-1]["chunk"] == {"type": "finish", "finishReason": "stop"}


BAD_FRAMES = [
    ({"type": "send", "requestId": "x", "id": "c", "trigger": "submit-message", "messages": [], "body": {}},
     "bad_frame"),
    ({"type": "send", "requestId": "x", "id": "bad id!", "messages": [], "body": {}}, "bad_id"),
    ({"type": "resume", "requestId": "x", "body": {}}, "bad_frame"),
    ({"type": "resume", "requestId": "x", "id": "c", "lastSequence": -1}, "bad_frame"),
    ({"type": "telepathy", "requestId": "x"}, "bad_frame"),
    ({"type": "send", "requestId": "x", "id": "c", "body": {"policy": "shout"},
      "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}, "bad_frame"),
    ({"type": "send", "requestId": "x", "id": "c", "body": {},
      "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "a" * (4 << 20)}]}]},
     "too_large"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
def test_ws_bad_frames_get_an_error_with_a_stable_code(serve: Any, node: Any, frame: dict[str, Any],
                                                      code: str) -> None:
    srv = serve(agent=Script("ok"))
    chats = node("ai7", srv)
    hello = {"type": "resume", "requestId": "after", "id": "c", "body": {}}
    frames = chats.call("raw-ws", frames=[frame])["frames"]
    assert frames[0]["type"] == "error" and frames[0]["requestId"] == "x", frames
    assert frames[0]["errorText"].startswith(f"{code}: "), frames
    assert len(chats.call("raw-ws", frames=[hello])["frames"]) == 1  # the server keeps serving


def test_ws_streams_at_most_32_requests_on_a_socket(serve: Any, node: Any) -> None:
    never = Gate()
    srv = serve(agent=Script("w0 ", never))
    chats = node("ai7", srv)
    chats.call("new", name="a", chatId="ws-many", **WS)
    chats.start("send", name="a", text="hold")
    chats.call("wait-text", name="a", text="w0 ")
    resumes = [{"type": "resume", "requestId": f"r{i}", "id": "ws-many", "body": {}} for i in range(33)]
    # each of the 32 gets the turn so far (start, text-start, w0): 96 chunks
    frames = chats.call("raw-ws", frames=resumes, chunks=96)["frames"]
    assert sorted(f["requestId"] for f in frames if f["type"] == "start") == sorted(f"r{i}" for i in range(32))
    (refused,) = [f for f in frames if f["type"] == "error"]
    assert refused["requestId"] == "r32" and refused["errorText"].startswith("rate_limited: "), refused


def test_ws_refuses_a_bad_token_and_an_uncorrelated_frame(serve: Any, node: Any) -> None:
    srv = serve(agent=Script("ok"))
    chats = node("ai7", srv)
    assert chats.call("raw-ws", token="nope", frames=[])["frames"] == [{"closed": 4401, "reason": "unauthorized"}]
    assert chats.call("raw-ws", frames=["{not json"])["frames"] == [{"closed": 4400, "reason": "bad_json"}]
    reader = srv.token("reader", {"*": ["subscribe"]})
    send = {"type": "send", "requestId": "s", "id": "c", "trigger": "submit-message", "body": {},
            "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
    (refused,) = chats.call("raw-ws", token=reader, frames=[send])["frames"]
    assert refused["type"] == "error" and refused["errorText"].startswith("forbidden: ")


# ---------------------------------------------------------------- finishReason, every major


@pytest.mark.parametrize("major", MAJORS)
def test_on_finish_gets_finish_reason(serve: Any, node: Any, major: str) -> None:
    srv = serve(agent=Script("hello"))
    chats = node(major, srv)
    chats.call("new", name="a", chatId=f"finish-{major}")
    done = chats.settled(chats.start("send", name="a", text="hi"))
    assert [f["finishReason"] for f in done["finishes"]] == ["stop"]


def test_finish_reason_is_the_last_steps(serve: Any, node: Any) -> None:
    """A provider adapter records each step's finish reason; the turn's
    ``finish`` carries the last one (here a step cut by the length limit)."""
    srv = serve(agent=Script("cut sh", {"type": "finish-step"},
                             {"type": "message-metadata", "messageMetadata": {"finishReason": "length"}}))
    chats = node("ai7", srv)
    chats.call("new", name="a", chatId="finish-length", **WS)
    done = chats.settled(chats.start("send", name="a", text="hi"))
    assert [f["finishReason"] for f in done["finishes"]] == ["length"]


# ---------------------------------------------------------------- steering


def steering_agent(taken: Gate) -> Any:
    async def agent(turn: Any) -> Any:
        yield "Writing about cats. "
        await taken.wait()
        notes = turn.take_inputs()
        yield f"Now about {notes[0].parts[0]['text']}."

    return agent


@pytest.mark.parametrize(("major", "transport"), [("ai7", "ws"), ("ai7", "http"), ("ai6", "http"),
                                                  ("ai5", "http")])
def test_a_steer_shows_as_a_steering_part_in_the_turns_message(serve: Any, node: Any, major: str,
                                                               transport: str) -> None:
    taken = Gate()
    srv = serve(agent=steering_agent(taken))
    chats = node(major, srv)
    session = f"steer-{major}-{transport}"
    options = {"transport": transport, "sdkMajor": major[2:] if major != "ai7" else None}
    chats.call("new", name="a", chatId=session, **options)
    send = chats.start("send", name="a", text="cats")
    chats.call("wait-text", name="a", text="cats. ")
    steer(srv, session, running_turn(srv, session), "dogs")
    taken.open(srv)
    done = chats.settled(send)
    assert done["error"] is None, done
    (reply,) = assistants(done)
    steering = {"type": "text", "text": "dogs"}
    if major == "ai7":  # the AI SDK 7 part
        expected = {"type": "steering-message", "id": "steer-1", "parts": [steering]}
    else:  # ai 5 and 6 know no steering-message chunk: a data part of the same content
        expected = {"type": "data-steering-message", "id": "steer-1", "data": {"parts": [steering]}}
    assert [p["type"] for p in reply["parts"]] == ["text", expected["type"], "text"]
    assert reply["parts"][1] == expected
    assert text(reply) == "Writing about cats. Now about dogs."
    saved = history(srv, session)[-1]
    assert saved["parts"][1] == {"type": "steering-message", "id": "steer-1", "parts": [steering]}


# ---------------------------------------------------------------- experimental_queue


@pytest.mark.parametrize("transport", ["http", "ws"])
@pytest.mark.parametrize("policy", ["queue", "concurrent", "interrupt"])
def test_experimental_queue_sends_the_next_message_after_the_turn(serve: Any, node: Any, policy: str,
                                                                 transport: str) -> None:
    """With ``experimental_queue`` the client holds a message typed while its
    turn streams and sends it when the turn ends: one turn at a time on the
    server, under any policy."""
    first = Gate()

    async def agent(turn: Any) -> Any:
        said = turn.input.parts[0]["text"]
        if said == "first":
            await first.wait()
        yield f"re: {said}"

    srv = serve(agent=agent)
    chats = node("ai7", srv)
    session = f"queue-{policy}-{transport}"
    chats.call("new", name="a", chatId=session, queue=True, transport=transport, body={"policy": policy})
    one = chats.start("send", name="a", text="first")
    running_turn(srv, session)
    two = chats.start("send", name="a", text="second")
    chats.call("wait-queued", name="a", count=1)
    assert len(hub_state(srv.runtime, session).turns) == 1  # held by the client, not sent
    first.open(srv)
    chats.settled(one)
    chats.settled(two)
    done = chats.call("wait-finish", name="a", count=2)
    assert [f["finishReason"] for f in done["finishes"]] == ["stop", "stop"]
    saved = history(srv, session)
    assert [text(m) for m in saved] == ["first", "re: first", "second", "re: second"]
    assert [visible(m["parts"]) for m in done["messages"]] == [visible(m["parts"]) for m in saved]


@pytest.mark.parametrize(("transport", "policy"), [("http", "interrupt"), ("ws", "interrupt"), ("ws", "queue")])
def test_experimental_send_queued_now_replaces_the_running_turn(serve: Any, node: Any, transport: str,
                                                               policy: str) -> None:
    """``experimental_sendQueuedMessageNow`` stops the running request and
    sends. Over the WebSocket the stop is an ``abort`` (the turn is cancelled);
    over HTTP it only drops the fetch, so the ``interrupt`` policy is what
    cancels the running turn. Either way the server runs the new message now."""
    never = Gate()
    agent = Script("w0 ", "w1 ", never)
    srv = serve(agent=agent)
    chats = node("ai7", srv)
    session = f"now-{transport}-{policy}"
    chats.call("new", name="a", chatId=session, queue=True, transport=transport, body={"policy": policy})
    chats.start("send", name="a", text="long one")
    chats.call("wait-text", name="a", text="w1 ")
    chats.start("send", name="a", text="shorter")
    chats.call("wait-queued", name="a", count=1)
    agent.steps = ("fine.",)  # the next turn answers at once
    now = chats.start("send-queued-now", name="a")
    chats.settled(now)
    done = chats.call("wait-finish", name="a", count=2)
    first = ended(srv, session)
    assert first.reason == "cancelled" and agent.aborted == [first.turn_id]
    saved = history(srv, session)
    assert [text(m) for m in saved] == ["long one", "w0 w1 ", "shorter", "fine."]
    assert [visible(m["parts"]) for m in done["messages"]] == [visible(m["parts"]) for m in saved]
    assert json.dumps(done["finishes"][-1]["finishReason"]) == '"stop"'


# ---------------------------------------------------------------- the example


def test_ws_example_client_runs(serve: Any, node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/ai_sdk_ws_client.mjs with ``ai`` resolved to the pinned ai 7."""
    from turnline.agent.demo import agent as demo

    monkeypatch.setenv("TURNLINE_DEMO_RATE", "100")
    srv = serve(agent=demo)
    chats = node("ai7", srv)  # fails clearly when node or the package is missing
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "examples").mkdir()
    shutil.copy(root / "examples" / "ai_sdk_ws_client.mjs", tmp_path / "examples")
    (tmp_path / "src").symlink_to(root / "src")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "ai").symlink_to(NODE_DIR / "node_modules" / "ai7")
    env = {"PATH": "/usr/bin:/bin", "TURNLINE_URL": srv.http, "TURNLINE_TOKEN": srv.token()}
    done = subprocess.run([shutil.which("node") or "node", *chats.node_flags, "examples/ai_sdk_ws_client.mjs"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "answer: In Paris it is" in done.stdout, done.stdout
    assert "finishReason: stop" in done.stdout, done.stdout
    assert "resumed == history: yes" in done.stdout, done.stdout
    assert "history == screen: yes" in done.stdout, done.stdout
