"""turnline mounted inside an existing app (docs/embedding.md): a real Starlette
or FastAPI app with turnline at ``/chat``, served by uvicorn on loopback.

- the host's lifespan and turnline's both run, turnline's around the host's
  (``turnline.server.embed.mount``, or ``FastAPI(lifespan=turnline_app.lifespan)``):
  the store (a SQLite file, which must be opened) is open when the host
  starts and closed after the host stopped;
- under the prefix the WebSocket (``/chat/v1/ws``), the HTTP API, the AI SDK
  route and the demo page (whose paths are relative) all work, and the host's
  own routes still answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from servers import ALL_CAPS, SECRET, free_port
from turnline.agent import Runtime, as_agent
from turnline.protocol import MessageIn
from turnline.server.app import ServerConfig, TurnlineApp, create_app, route_path
from turnline.server.auth import mint
from turnline.server.embed import mount
from turnline.store import open_store
from wsraw import RawWS, text_of


async def hello(_request: Any) -> PlainTextResponse:
    return PlainTextResponse("the host app")


def starlette_with_mount(chat: TurnlineApp, host_lifespan: Any) -> Any:
    host = Starlette(routes=[Route("/", hello)], lifespan=host_lifespan)
    mount(host, "/chat", chat)
    return host


def fastapi_with_mount(chat: TurnlineApp, host_lifespan: Any) -> Any:
    host = FastAPI(lifespan=host_lifespan)
    host.add_route("/", hello)
    mount(host, "/chat", chat)
    return host


def fastapi_with_its_lifespan(chat: TurnlineApp, host_lifespan: Any) -> Any:
    # The other documented way: the host's lifespan enters turnline's itself.
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with chat.lifespan(app), host_lifespan(app):
            yield

    host = FastAPI(lifespan=lifespan)
    host.add_route("/", hello)
    host.mount("/chat", chat)
    return host


HOSTS: dict[str, Callable[[TurnlineApp, Any], Any]] = {
    "starlette+mount()": starlette_with_mount, "fastapi+mount()": fastapi_with_mount,
    "fastapi+lifespan": fastapi_with_its_lifespan,
}


class Hosted:
    def __init__(self, build: Callable[[TurnlineApp, Any], Any], db: Path):
        self.steps: list[str] = []
        agent = as_agent(lambda turn: f"echo {turn.input.parts[0]['text']}")
        self.runtime = Runtime(open_store(f"sqlite:///{db}"), agent)
        self.chat = create_app(self.runtime, ServerConfig(secret=SECRET, dev=True))

        @contextlib.asynccontextmanager
        async def host_lifespan(_app: Any) -> AsyncIterator[None]:
            # turnline is up before the host starts: its sessions can be used here
            hub = await self.runtime.hub("warm-up")
            self.steps.append(f"host up, store open ({hub.state.last_seq} events)")
            yield
            await self.runtime.hub("warm-up")
            self.steps.append("host down, store still open")

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build(self.chat, host_lifespan), host="127.0.0.1",
                                                    port=self.port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the host app did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(params=sorted(HOSTS))
def hosted(request: Any, tmp_path: Path) -> Any:
    h = Hosted(HOSTS[request.param], tmp_path / "chat.db")
    h.start()
    yield h
    h.stop()


async def test_mounted_turnline_serves_under_its_prefix(hosted: Hosted) -> None:
    base = f"http://127.0.0.1:{hosted.port}"
    token = mint(SECRET, "alice", ALL_CAPS, 600)
    auth = {"authorization": f"Bearer {token}"}
    assert hosted.steps == ["host up, store open (0 events)"]
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        assert (await http.get("/")).text == "the host app"
        assert (await http.get("/chat/healthz")).json() == {"ok": True}

        # the WebSocket, through the mount
        ws = await RawWS.open(f"ws://127.0.0.1:{hosted.port}/chat/v1/ws", token)
        session = f"emb-{uuid.uuid4().hex[:8]}"
        await ws.subscribe(session)
        end = await ws.completes(session, "over ws")
        assert text_of(end["message"]) == "echo over ws"

        # the HTTP API and the AI SDK route
        r = await http.post(f"/chat/v1/sessions/{session}/messages", headers=auth,
                            json={"messages": [{"parts": [{"type": "text", "text": "over http"}]}]})
        assert r.status_code == 200, r.text
        (turn_id,) = r.json()["turn_ids"]
        assert text_of((await ws.turn_end(session, turn_id))["message"]) == "echo over http"
        r = await http.get(f"/chat/v1/sessions/{session}/messages", headers=auth)
        assert [text_of(m) for m in r.json()["messages"]] == ["over ws", "echo over ws", "over http", "echo over http"]
        body = {"id": f"chat-{uuid.uuid4().hex[:8]}", "trigger": "submit-message",
                "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "over ai sdk"}]}]}
        r = await http.post("/chat/api/chat", headers=auth, json=body)
        assert r.status_code == 200 and "echo over ai sdk" in r.text.replace('","delta":"', "")
        await ws.close()

        # the demo page: /chat redirects to /chat/, whose assets are relative to it
        r = await http.get("/chat", follow_redirects=True)
        assert r.status_code == 200 and str(r.url) == f"{base}/chat/"
        assert 'src="app.js"' in r.text and 'src="/' not in r.text and 'href="/' not in r.text
        r = await http.get("/chat/app.js")
        assert r.headers["content-type"].startswith("text/javascript") and 'url: "v1/ws"' in r.text
        assert (await http.post("/chat/v1/dev/token?sub=bob")).json()["sub"] == "bob"
    hosted.stop()
    assert hosted.steps == ["host up, store open (0 events)", "host down, store still open"]


async def test_the_lifespan_entered_twice_runs_once(tmp_path: Path) -> None:
    # A host that forwards lifespan events to mounted apps as well as mount()'s chaining.
    runtime = Runtime(open_store(f"sqlite:///{tmp_path / 'twice.db'}"), as_agent(lambda turn: "ok"))
    chat = create_app(runtime, ServerConfig(secret=SECRET))
    async with chat.lifespan(None):
        async with chat.lifespan(None):
            hub = await runtime.hub("s")
            outcome, durable = await hub.send("alice", [MessageIn(parts=[{"type": "text", "text": "hi"}])])
            await durable
        assert len(await runtime.read("s")) > 0  # the inner exit closed nothing


@pytest.mark.parametrize("path,root,inside", [
    ("/v1/ws", "", "/v1/ws"), ("/chat/v1/ws", "/chat", "/v1/ws"), ("/chat", "/chat", "/"),
    ("/a/b/v1/ws", "/a/b", "/v1/ws"), ("/chatter/v1/ws", "/chat", "/chatter/v1/ws"),
    ("/v1/ws", "/chat", "/v1/ws"),  # a server whose root_path is not in the path (older ASGI servers)
])
def test_route_path_strips_the_mount_prefix(path: str, root: str, inside: str) -> None:
    # Under a mount the WebSocket still takes the direct path to its endpoint (no routing per frame).
    assert route_path({"path": path, "root_path": root}) == inside
