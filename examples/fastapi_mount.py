"""turnline inside an existing FastAPI app, at /chat (docs/embedding.md).

`mount()` mounts turnline and runs its lifespan (it opens the store and starts
the runtime) with the app's own: Starlette does not run a mounted app's
lifespan by itself. Everything turnline serves is then under the prefix: the
WebSocket at /chat/v1/ws, the HTTP API at /chat/v1/..., the AI SDK route at
/chat/api/chat and the demo page at /chat/.

    python examples/fastapi_mount.py          # serves, talks to itself, exits
    TURNLINE_SECRET=... uvicorn fastapi_mount:app --port 8000   # (from examples/) serve it
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import AsyncIterator

import httpx
import uvicorn
from _local import words
from fastapi import FastAPI

from turnline import Agent, Turn
from turnline.agent import Runtime
from turnline.client import ClientTransport, message_text
from turnline.server.app import ServerConfig, create_app
from turnline.server.auth import mint
from turnline.server.embed import mount
from turnline.store import open_store

SECRET = os.environ.get("TURNLINE_SECRET") or "example-secret-" + "x" * 32


async def respond(turn: Turn):
    async for w in words("Hello from turnline, mounted at /chat.", interval=0.01):
        yield w


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # turnline is already up here (mount() starts it first and stops it last)
    print("app startup: turnline started first")
    yield
    print("app shutdown")


app = FastAPI(lifespan=lifespan)
chat = create_app(Runtime(open_store("memory://"), Agent(respond)), ServerConfig(secret=SECRET))
mount(app, "/chat", chat)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"app": "ok"}


async def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        token = mint(SECRET, "alice", {"*": ["subscribe", "publish", "cancel"]}, 600)
        async with ClientTransport(f"ws://127.0.0.1:{port}/chat/v1/ws", token, "mounted-chat") as client:
            ack = await client.send("Are you there?")
            end = await client.wait_turn_end(ack["turn_ids"][0])
            print("answer over /chat/v1/ws:", repr(message_text(end.message)))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            print("the app's own route:", (await http.get("/health")).json())
            history = (await http.get("/chat/v1/sessions/mounted-chat/messages",
                                      headers={"authorization": f"Bearer {token}"})).json()["messages"]
            print("history over /chat/v1/...:", len(history), "messages")
        print("mounted at /chat: yes")
    finally:
        server.should_exit = True
        await task


if __name__ == "__main__":
    asyncio.run(main())
