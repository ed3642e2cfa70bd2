"""AG-UI (``/ag-ui``) against a real server.

Two kinds of client:

- the REAL ``@ag-ui/client`` (its ``HttpAgent``: request, SSE parser,
  verifier, reducer), driven from Node (tests/node/agui_driver.mjs); the
  driver adds only turnline's documented extension, a ``connect()`` that
  re-attaches with ``Last-Event-ID``;
- raw httpx, to pin the bytes: ids on every event, resume after every id.

Order is controlled with gates the agents wait at and with conditions read
from the server (every wait bounded); no sleep decides an outcome.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodedriver import NODE_DIR, TIMEOUT, NodeDriver
from test_aisdk import RICH, WORDS, Script, auth, ended, history, hub_state, live_text, text, until
from wsraw import Gate


@pytest.fixture(scope="module")
def driver() -> Any:
    node = NodeDriver("agui_driver.mjs", package="@ag-ui/client")
    yield node
    node.close()


@pytest.fixture
def agui(driver: NodeDriver) -> Any:
    """``agui(srv)``: the driver, its new agents talking to ``srv`` as ``alice``."""

    def factory(srv: Any, token: str | None = None) -> NodeDriver:
        driver.call("connect", base=srv.http, token=token or srv.token())
        return driver

    return factory


def assistant_text(view: dict[str, Any]) -> str:
    return "".join(m.get("content") or "" for m in view["messages"] if m["role"] == "assistant")


def types(view: dict[str, Any]) -> list[str]:
    return [e["type"] for e in view["events"]]


def run_input(session: str, text_: str, msg_id: str = "u1", run_id: str = "run-1", **extra: Any) -> dict[str, Any]:
    return {"threadId": session, "runId": run_id, "state": {}, "tools": [], "context": [], "forwardedProps": {},
            "messages": [{"id": msg_id, "role": "user", "content": text_}], **extra}


def sse(raw: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(id, event) of each SSE event of a body (comments left out)."""
    out = []
    for block in raw.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        event_id = next((line[4:] for line in lines if line.startswith("id: ")), None)
        (data,) = [line[6:] for line in lines if line.startswith("data: ")]
        out.append((event_id, json.loads(data)))
    return out


def saved_reply(srv: Any, session: str) -> dict[str, Any]:
    return history(srv, session)[-1]


def dropped_streams(srv: Any, count: int) -> str:
    """Once ``count`` dropped streams were handled: the server's /metrics text."""
    agui = srv.server.config.app.agui
    until(srv, lambda _rt: agui.disconnects >= count, f"{count} dropped stream(s) to be handled")
    return httpx.get(f"{srv.http}/metrics").text


# ---------------------------------------------------------------- with the real @ag-ui/client


def test_driver_runs_the_pinned_client(agui: Any, serve: Any) -> None:
    node = agui(serve())
    pinned = json.loads((NODE_DIR / "package.json").read_text())
    assert node.call("version")["version"] == pinned["dependencies"]["@ag-ui/client"]


def test_run_streams_reasoning_text_and_a_tool_call(serve: Any, agui: Any) -> None:
    srv = serve(agent=Script(*RICH))
    node = agui(srv)
    node.call("new", name="a", threadId="ag-rich")
    done = node.settled(node.start("run", name="a", text="weather in Paris?", runId="run-rich"))
    kinds = types(done)
    assert kinds[0] == "RUN_STARTED" and kinds[-1] == "RUN_FINISHED"
    assert done["events"][-1]["outcome"] == {"type": "success"}
    assert {e["runId"] for e in done["events"] if "runId" in e} == {"run-rich"}  # the client's run id
    for kind in ("REASONING_START", "REASONING_MESSAGE_CONTENT", "REASONING_END", "TEXT_MESSAGE_CONTENT",
                 "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT"):
        assert kind in kinds, kind
    user, reasoning, first, tool, second = done["messages"]
    saved = saved_reply(srv, "ag-rich")
    assert user["role"] == "user" and user["id"] == history(srv, "ag-rich")[0]["id"]
    assert reasoning == {"id": f"{saved['id']}.r0", "role": "reasoning", "content": "thinking"}
    assert first["id"] == saved["id"] and first["content"] == "Let me look. "
    (call,) = first["toolCalls"]
    assert call["id"] == "call-1" and call["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert tool == {"id": f"{saved['id']}.tool.call-1", "role": "tool", "toolCallId": "call-1",
                    "content": '{"temp":21}'}
    assert second["content"] == "It is 21 degrees."
    assert assistant_text(done) == text(saved)  # what the client shows is what is saved


def test_cancel_route_ends_the_run_cancelled_and_saves_what_was_shown(serve: Any, agui: Any) -> None:
    never = Gate()
    agent = Script(*WORDS[:5], never)
    srv = serve(agent=agent)
    node = agui(srv)
    node.call("new", name="a", threadId="ag-cancel")
    run = node.start("run", name="a", text="count", runId="run-cancel")
    node.call("wait-text", name="a", text="w4 ")
    cancel = node.call("cancel", name="a", runId="run-cancel")
    assert cancel["status"] == 200 and cancel["body"]["cancelled"] == ["run-cancel"], cancel
    done = node.settled(run)
    assert done["events"][-1]["type"] == "RUN_FINISHED"
    assert done["events"][-1]["outcome"] == {"type": "cancelled"}
    turn = ended(srv, "ag-cancel")
    assert turn.reason == "cancelled" and agent.aborted == ["run-cancel"]  # the abort reached the agent
    assert assistant_text(done) == "".join(WORDS[:5]) == text(saved_reply(srv, "ag-cancel"))


def test_abort_then_cancel_with_seen_saves_exactly_what_the_client_showed(serve: Any, agui: Any) -> None:
    """The client aborts its fetch after w4 and the agent goes on to w9 before
    the cancel (with the client's last event id) reaches the server. The saved
    reply is the client's; re-attaching shows the run cancelled, nothing more."""
    more, never = Gate(), Gate()
    srv = serve(agent=Script(*WORDS[:5], more, *WORDS[5:], never))
    node = agui(srv)
    node.call("new", name="a", threadId="ag-seen")
    run = node.start("run", name="a", text="count", runId="run-seen")
    node.call("wait-text", name="a", text="w4 ")
    node.call("abort", name="a")
    shown = node.settled(run)
    assert assistant_text(shown) == "".join(WORDS[:5])
    more.open(srv)
    live_text(srv, "ag-seen", "w9 ")  # the server now holds more than the client showed
    cancel = node.call("cancel", name="a", runId="run-seen", seen=True)
    assert cancel["status"] == 200 and cancel["body"]["seen"] == int(shown["lastEventId"]), cancel
    assert ended(srv, "ag-seen").reason == "cancelled"
    assert text(saved_reply(srv, "ag-seen")) == "".join(WORDS[:5])
    again = node.settled(node.start("resume", name="a"))
    assert again["events"][-1]["outcome"] == {"type": "cancelled"}
    assert assistant_text(again) == "".join(WORDS[:5])  # the chunks past `seen` are not shown either
    assert [m["id"] for m in again["messages"]] == [m["id"] for m in shown["messages"]]


def test_a_cancel_with_seen_that_loses_the_race_to_the_end_still_saves_the_clients_view(serve: Any,
                                                                                         agui: Any) -> None:
    more = Gate()
    srv = serve(agent=Script(*WORDS[:5], more, *WORDS[5:]))
    node = agui(srv)
    node.call("new", name="a", threadId="ag-race")
    run = node.start("run", name="a", text="count", runId="run-race")
    node.call("wait-text", name="a", text="w4 ")
    node.call("abort", name="a")
    shown = node.settled(run)
    more.open(srv)
    assert ended(srv, "ag-race").reason == "complete"  # the end reached the server first
    cancel = node.call("cancel", name="a", runId="run-race", seen=True)
    assert cancel["body"]["cancelled"] == ["run-race"], cancel  # revised
    assert text(saved_reply(srv, "ag-race")) == assistant_text(shown) == "".join(WORDS[:5])
    again = node.settled(node.start("resume", name="a"))
    assert again["events"][-1]["outcome"] == {"type": "cancelled"}  # the run as it is saved
    assert assistant_text(again) == "".join(WORDS[:5])


def test_dropped_stream_resumes_with_last_event_id_no_gap_no_duplicate(serve: Any, agui: Any) -> None:
    more, rest = Gate(), Gate()
    srv = serve(agent=Script(*WORDS[:5], more, *WORDS[5:8], rest, *WORDS[8:]))
    node = agui(srv)
    node.call("new", name="a", threadId="ag-resume")
    run = node.start("run", name="a", text="count")
    node.call("wait-text", name="a", text="w4 ")
    node.call("abort", name="a")  # the fetch drops: by default that cancels nothing
    dropped = node.settled(run)
    assert 'turnline_agui_dropped_streams_total{cancelled="false"} 1.0' in dropped_streams(srv, 1)
    more.open(srv)
    live_text(srv, "ag-resume", "w7 ")  # written while no client was attached
    assert hub_state(srv.runtime, "ag-resume").active  # the turn goes on
    resume = node.start("resume", name="a")
    node.call("wait-text", name="a", text="w7 ")  # the missed part replayed after the cursor
    rest.open(srv)  # then followed live
    done = node.settled(resume)
    assert ended(srv, "ag-resume").reason == "complete"
    assert done["events"][-1]["outcome"] == {"type": "success"}
    assert assistant_text(done) == "".join(WORDS) == text(saved_reply(srv, "ag-resume"))
    assert [m["id"] for m in done["messages"]] == [m["id"] for m in dropped["messages"]]  # no message twice
    resumed = done["events"][len(dropped["events"]):]
    assert [e["type"] for e in resumed[:2]] == ["RUN_STARTED", "TEXT_MESSAGE_START"]  # the stream reopened
    assert "".join(e.get("delta", "") for e in resumed) == "".join(WORDS[5:])


def test_a_drop_cancels_when_the_client_opted_in(serve: Any, agui: Any) -> None:
    more = Gate()
    agent = Script(*WORDS[:5], more, *WORDS[5:])
    srv = serve(agent=agent)
    node = agui(srv)
    node.call("new", name="a", threadId="ag-drop", query="?cancel_on_disconnect=1")
    run = node.start("run", name="a", text="count")
    node.call("wait-text", name="a", text="w4 ")
    node.call("abort", name="a")
    shown = node.settled(run)
    assert 'turnline_agui_dropped_streams_total{cancelled="true"} 1.0' in dropped_streams(srv, 1)
    turn = ended(srv, "ag-drop")
    assert turn.reason == "cancelled" and agent.aborted == [turn.turn_id]
    assert text(saved_reply(srv, "ag-drop")) == assistant_text(shown) == "".join(WORDS[:5])


def test_agent_error_is_run_error(serve: Any, agui: Any) -> None:
    srv = serve(agent=Script("partial ", RuntimeError("boom")))
    node = agui(srv)
    node.call("new", name="a", threadId="ag-error")
    done = node.settled(node.start("run", name="a", text="fail"))
    last = done["events"][-1]
    assert last["type"] == "RUN_ERROR" and last["code"] == "agent_error", last
    assert "RUN_FINISHED" not in types(done)
    assert assistant_text(done) == "partial "
    assert ended(srv, "ag-error").reason == "error"


def test_second_run_on_the_thread_sends_only_the_new_message(serve: Any, agui: Any) -> None:
    srv = serve(agent=Script("hello"))
    node = agui(srv)
    node.call("new", name="a", threadId="ag-two")
    node.settled(node.start("run", name="a", text="one"))
    done = node.settled(node.start("run", name="a", text="two"))
    saved = history(srv, "ag-two")
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert [m["id"] for m in done["messages"]] == [m["id"] for m in saved]


def test_a_queued_run_streams_once_its_turn_starts(serve: Any, agui: Any) -> None:
    gate = Gate()

    async def agent(turn: Any) -> Any:
        prompt = turn.input.parts[0]["text"]
        if prompt == "first":
            yield "one "
            await gate.wait()
        yield f"answer to {prompt}"

    srv = serve(agent=agent)
    node = agui(srv)
    node.call("new", name="a", threadId="ag-queue")
    node.call("new", name="b", threadId="ag-queue")
    first = node.start("run", name="a", text="first", runId="run-first")
    node.call("wait-text", name="a", text="one ")
    second = node.start("run", name="b", text="second", runId="run-second", forwardedProps={"policy": "queue"})
    until(srv, lambda rt: hub_state(rt, "ag-queue").queue, "the second message to be queued")
    # the default policy is concurrent; this run asks for the queue
    assert node.call("state", name="b")["events"] == []  # queued: its stream is quiet
    gate.open(srv)
    a, b = node.settled(first), node.settled(second)
    assert assistant_text(a) == "one answer to first"
    assert assistant_text(b) == "answer to second"
    assert b["events"][0]["runId"] == "run-second" and b["events"][-1]["outcome"] == {"type": "success"}
    assert [m["role"] for m in history(srv, "ag-queue")] == ["user", "assistant", "user", "assistant"]


def test_a_queued_run_cancelled_before_it_starts_finishes_cancelled(serve: Any, agui: Any) -> None:
    never = Gate()
    srv = serve(agent=Script("busy ", never))
    node = agui(srv)
    node.call("new", name="a", threadId="ag-qcancel")
    node.call("new", name="b", threadId="ag-qcancel")
    node.start("run", name="a", text="first", runId="run-busy")
    node.call("wait-text", name="a", text="busy ")
    second = node.start("run", name="b", text="second", runId="run-waiting", forwardedProps={"policy": "queue"})
    until(srv, lambda rt: hub_state(rt, "ag-qcancel").queue, "the second message to be queued")
    cancel = node.call("cancel", name="b", runId="run-waiting")
    assert cancel["body"]["cancelled"] == ["run-waiting"], cancel
    done = node.settled(second)
    assert types(done) == ["RUN_STARTED", "RUN_FINISHED"]
    assert done["events"][-1]["outcome"] == {"type": "cancelled"}
    assert hub_state(srv.runtime, "ag-qcancel").active  # the first run goes on


# ---------------------------------------------------------------- raw HTTP


def test_every_event_has_an_id_and_resume_after_any_id_is_exact(serve: Any) -> None:
    srv = serve(agent=Script(*RICH))
    headers = {**auth(srv), "accept": "text/event-stream"}
    with httpx.Client(base_url=srv.http, headers=headers, timeout=TIMEOUT) as client:
        r = client.post("/ag-ui", json=run_input("ag-ids", "weather?"))
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        full = sse(r.text)
        ids = [event_id for event_id, _ in full]
        assert None not in ids and len(set(ids)) == len(ids)
        assert any("." in i for i in ids)  # some log events make several AG-UI events
        events = [ev for _, ev in full]
        for i, event_id in enumerate(ids[:-1]):
            resumed = sse(client.get("/ag-ui/ag-ids/stream", headers={"last-event-id": event_id}).text)
            prelude = [ev for rid, ev in resumed if rid is None]
            rest = [(rid, ev) for rid, ev in resumed if rid is not None]
            assert rest == full[i + 1:], event_id  # nothing lost, nothing repeated
            assert prelude[0]["type"] == "RUN_STARTED" and all(ev["type"].endswith(("_START", "_STARTED"))
                                                               for ev in prelude)
            assert not any("delta" in ev or "content" in ev for ev in prelude)  # no content twice
        # after the last id the run is over: nothing to send
        assert client.get("/ag-ui/ag-ids/stream", headers={"last-event-id": ids[-1]}).status_code == 204
        assert events[-1]["type"] == "RUN_FINISHED"


def test_stream_without_a_cursor_replays_the_running_turn_then_204(serve: Any) -> None:
    gate = Gate()
    srv = serve(agent=Script("a ", gate, "b"))
    with httpx.Client(base_url=srv.http, headers=auth(srv), timeout=TIMEOUT) as client:
        assert client.get("/ag-ui/ag-none/stream").status_code == 204  # no such session
        with client.stream("POST", "/ag-ui", json=run_input("ag-none", "go")) as first:
            assert first.status_code == 200
            live_text(srv, "ag-none", "a ")
            with client.stream("GET", "/ag-ui/ag-none/stream") as second:
                gate.open(srv)
                replay = sse(second.read().decode())
            first.read()
        assert [ev["type"] for _, ev in replay][0] == "RUN_STARTED"
        assert "".join(ev.get("delta", "") for _, ev in replay) == "a b"
        assert client.get("/ag-ui/ag-none/stream").status_code == 204  # nothing running now


def test_auth_and_bad_input(serve: Any) -> None:
    srv = serve(agent=Script("x"))
    body = run_input("ag-auth", "hi")
    reader = auth(srv, "bob", {"ag-auth": ["subscribe"]})
    with httpx.Client(base_url=srv.http, timeout=TIMEOUT) as client:
        r = client.post("/ag-ui", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = client.post("/ag-ui", json=body, headers=reader)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = client.post("/ag-ui/ag-auth/cancel", json={}, headers=reader)
        assert r.status_code == 403
        assert client.get("/ag-ui/ag-auth/stream", headers=reader).status_code == 204  # may read
        bad = {"threadId": "no spaces", "runId": "r", "messages": [{"id": "u", "role": "user", "content": "x"}]}
        r = client.post("/ag-ui", json=bad, headers=auth(srv))
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_id"
        r = client.post("/ag-ui", content=b"{not json", headers=auth(srv))
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"
        tool_last = {**body, "messages": [{"id": "t", "role": "tool", "toolCallId": "c", "content": "42"}]}
        r = client.post("/ag-ui", json=tool_last, headers=auth(srv))
        assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
        r = client.get("/ag-ui/ag-auth/stream", headers={**auth(srv), "last-event-id": "x1"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_frame"
        r = client.post("/ag-ui/ag-auth/cancel", json={"seen": "1.x"}, headers=auth(srv))
        assert r.status_code == 400
        # the server keeps serving, and the session is intact
        r = client.post("/ag-ui", json=body, headers=auth(srv))
        assert r.status_code == 200 and sse(r.text)[-1][1]["type"] == "RUN_FINISHED"
        r = client.post("/ag-ui", json=body, headers=auth(srv))  # the same message again, answered already
        assert r.status_code == 409


# ---------------------------------------------------------------- the example


def test_example_client_runs(serve: Any, driver: NodeDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/ag_ui_client.mjs, with @ag-ui/client resolved to the pinned one."""
    from turnline.agent.demo import agent as demo

    monkeypatch.setenv("TURNLINE_DEMO_RATE", "100")
    srv = serve(agent=demo)
    example = Path(__file__).resolve().parents[2] / "examples" / "ag_ui_client.mjs"
    shutil.copy(example, tmp_path / example.name)
    (tmp_path / "node_modules" / "@ag-ui").mkdir(parents=True)
    (tmp_path / "node_modules" / "@ag-ui" / "client").symlink_to(NODE_DIR / "node_modules" / "@ag-ui" / "client")
    env = {"PATH": "/usr/bin:/bin", "TURNLINE_URL": srv.http, "TURNLINE_TOKEN": srv.token()}
    done = subprocess.run([shutil.which("node") or "node", example.name], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    for expected in ("resumed, run success", "no word lost or repeated: yes", "run cancelled",
                     "history == screen: yes"):
        assert expected in done.stdout, done.stdout


def test_reattach_picks_the_requesters_run_or_the_one_named(serve: Any) -> None:
    gate = Gate()

    async def agent(turn: Any) -> Any:
        yield f"{turn.owner} "
        await gate.wait()

    srv = serve(agent=agent)
    alice, bob = auth(srv, "alice"), auth(srv, "bob")
    with httpx.Client(base_url=srv.http, timeout=TIMEOUT) as client:
        # bob's run starts first: the newest is alice's, and bob still gets his own
        with client.stream("POST", "/ag-ui", json=run_input("ag-two-runs", "b", "ub", "run-b"), headers=bob), \
                client.stream("POST", "/ag-ui", json=run_input("ag-two-runs", "a", "ua", "run-a"), headers=alice):
            live_text(srv, "ag-two-runs", "alice ")
            live_text(srv, "ag-two-runs", "bob ")
            with client.stream("GET", "/ag-ui/ag-two-runs/stream", headers=bob) as own, \
                    client.stream("GET", "/ag-ui/ag-two-runs/stream?runId=run-a", headers=bob) as named:
                gate.open(srv)
                mine, theirs = sse(own.read().decode()), sse(named.read().decode())
    assert mine[0][1]["runId"] == "run-b" and "".join(ev.get("delta", "") for _, ev in mine) == "bob "
    assert theirs[0][1]["runId"] == "run-a" and "".join(ev.get("delta", "") for _, ev in theirs) == "alice "
