"""Browser tests: Playwright (Python) driving Debian's chromium against a real
turnline server on a loopback port.

- ``browser``: one chromium for the whole run (``/usr/bin/chromium``, never a
  downloaded build; ``scripts/ensure-system-deps`` installs it);
- ``chat_server``: a dev-mode server (the page gets its token from
  ``/v1/dev/token``) whose agent is a :class:`Pacer`: the test decides, word by
  word, how far each answer has streamed;
- ``pages``: opens pages in one browser context (one user, several tabs). When
  a test fails, each page's screenshot and console log are saved under
  ``test-results/<test>/``.

Every wait is on a condition in the page or on the server, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))  # for proxy.py
from browserkit import ChatPage, ChatServer, FlakyNetwork, Pacer  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ---------------------------------------------------------------- failure artifacts


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item.stash.setdefault(_FAILED, True)  # type: ignore[arg-type]


_FAILED = pytest.StashKey[bool]()


def _save_artifacts(item: pytest.Item, pages: list[ChatPage]) -> None:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-150:]
    out = Path(item.config.rootpath) / "test-results" / name
    out.mkdir(parents=True, exist_ok=True)
    for i, chat in enumerate(pages):
        try:
            chat.page.screenshot(path=str(out / f"page{i}.png"), full_page=True)
        except Exception as exc:  # a crashed page still gets its log saved
            chat.console.append(f"[screenshot failed: {exc}]")
        (out / f"page{i}.console.log").write_text("\n".join(chat.console) + "\n")


# ---------------------------------------------------------------- the browser


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-system-deps (it installs Debian's chromium); "
                    "the browser tests never download a browser")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    yield ctx
    ctx.close()


@pytest.fixture
def pages(context: BrowserContext, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``pages()`` opens a new tab of the same user (one browser context)."""
    opened: list[ChatPage] = []

    def new_page() -> ChatPage:
        chat = ChatPage(context.new_page())
        opened.append(chat)
        return chat

    yield new_page
    if request.node.stash.get(_FAILED, False):
        _save_artifacts(request.node, opened)


# ---------------------------------------------------------------- the server


@pytest.fixture
def chat_server(serve: Any) -> ChatServer:
    pacer = Pacer()
    srv = serve(agent=pacer.agent(), server_config={"dev": True})
    pacer.loop = srv.loop
    return ChatServer(srv, pacer)


# ---------------------------------------------------------------- a network that fails


@pytest.fixture
def flaky_network(chat_server: ChatServer) -> Iterator[Any]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    proxy = FlakyNetwork(chat_server.srv.port)
    asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(5)

    class Handle:
        url = f"http://127.0.0.1:{proxy.port}"

        @staticmethod
        def go_down() -> None:
            """Refuse new connections and drop the live ones (both directions at once)."""

            async def down() -> None:
                proxy.refusing = True
                proxy.cut()
            asyncio.run_coroutine_threadsafe(down(), loop).result(5)

        @staticmethod
        def come_back() -> None:
            async def up() -> None:
                proxy.refusing = False
                proxy.mute_downstream = False
            asyncio.run_coroutine_threadsafe(up(), loop).result(5)

        @staticmethod
        def mute() -> None:
            """Lose every server→client byte from now on (answers lost in flight)."""

            async def mute() -> None:
                proxy.mute_downstream = True
            asyncio.run_coroutine_threadsafe(mute(), loop).result(5)

    yield Handle
    asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
