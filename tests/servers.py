"""A real turnline server on a loopback port, for tests and fixtures.

The server runs in its own thread and event loop (uvicorn), so tests speak to
it only through real sockets, exactly as a client would. (A module, not part of
conftest.py: tests/e2e has a conftest of its own, and ``import conftest`` would
find whichever was loaded first.)
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from turnline.agent import Runtime, RuntimeConfig, as_agent
from turnline.server.app import ServerConfig, create_app
from turnline.server.auth import mint
from turnline.store import open_store

SECRET = "test-secret-not-for-production-" + "0123456789abcdef" * 3
ALL_CAPS = {"*": ["subscribe", "publish", "cancel"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    port: int
    runtime: Runtime
    server: uvicorn.Server
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def token(self, sub: str = "alice", caps: dict[str, list[str]] | None = None, ttl: int = 600) -> str:
        return mint(SECRET, sub, caps or ALL_CAPS, ttl)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop (to inspect its state safely)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_server(agent: Any = None, store: str = "memory://", config: RuntimeConfig | None = None,
                 server_config: dict[str, Any] | None = None) -> RunningServer:
    port = free_port()
    runtime = Runtime(open_store(store), as_agent(agent) if agent is not None else None, config or RuntimeConfig())
    app = create_app(runtime, ServerConfig(secret=SECRET, **(server_config or {})))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    handle = RunningServer(port, runtime, server, threading.Thread(target=lambda: None))

    def run() -> None:
        loop = asyncio.new_event_loop()
        handle.loop = loop
        loop.run_until_complete(server.serve())

    handle.thread = threading.Thread(target=run, daemon=True)
    handle.thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not handle.thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    return handle
