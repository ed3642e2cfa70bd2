"""The demo chat page served by turnline mounted at ``/chat`` inside a FastAPI
app (docs/embedding.md), in a real browser: its assets, dev token and
WebSocket are all found relative to ``/chat/``, and a message gets its answer."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Iterator

import pytest
import uvicorn
from fastapi import FastAPI

from browserkit import ChatPage, new_session
from servers import SECRET, free_port
from turnline.agent import Runtime, as_agent
from turnline.server.app import ServerConfig, create_app
from turnline.server.embed import mount
from turnline.store import open_store

pytestmark = pytest.mark.browser


@pytest.fixture
def mounted() -> Iterator[str]:
    runtime = Runtime(open_store("memory://"), as_agent(lambda turn: f"echo {turn.input.parts[0]['text']}"))
    host = FastAPI()
    mount(host, "/chat", create_app(runtime, ServerConfig(secret=SECRET, dev=True)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(host, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the host app did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}/chat/"
    server.should_exit = True
    thread.join(10)


def test_the_chat_page_works_under_a_mount(mounted: str, pages: Any) -> None:
    chat: ChatPage = pages().open(f"{mounted}#{new_session()}")  # connected: the banner is gone
    chat.send("hello there")
    chat.wait_text(chat.assistant(), "echo hello there")
    assert not [line for line in chat.console if "error" in line.lower()], chat.console
