"""Runs a real turnline server in-process on a free loopback port, so each
example is one `python examples/NAME.py` with nothing else started. To run an
example against your own server instead, set TURNLINE_URL and TURNLINE_TOKEN."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any, AsyncIterator, Callable

import uvicorn

from turnline.agent import Runtime, RuntimeConfig, as_agent
from turnline.server.app import ServerConfig, create_app
from turnline.server.auth import mint
from turnline.store import open_store

SECRET = "examples-secret-" + "x" * 32


@contextlib.asynccontextmanager
async def local_server(agent: Any, *, policy: str = "concurrent", store: str = "memory://",
                       config: RuntimeConfig | None = None) -> AsyncIterator[tuple[str, Callable[[str], str]]]:
    """Yields the WebSocket URL and a function minting a token for a client id."""
    if os.environ.get("TURNLINE_URL"):
        yield os.environ["TURNLINE_URL"], lambda _sub: os.environ["TURNLINE_TOKEN"]
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime = Runtime(open_store(store), as_agent(agent), config or RuntimeConfig(default_policy=policy))
    app = create_app(runtime, ServerConfig(secret=SECRET))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield (f"ws://127.0.0.1:{port}/v1/ws",
               lambda sub: mint(SECRET, sub, {"*": ["subscribe", "publish", "cancel"]}, 600))
    finally:
        server.should_exit = True
        await task


async def words(text: str, interval: float = 0.03) -> AsyncIterator[str]:
    """Text as word-sized deltas at a reading pace, like an LLM stream."""
    for w in text.split(" "):
        await asyncio.sleep(interval)
        yield w + " "
