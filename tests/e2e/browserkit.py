"""Helpers of the browser tests: a tab of the demo chat (:class:`ChatPage`),
the paced test agent (:class:`Pacer`), the server handle, and a network that fails."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections import defaultdict
from typing import Any

import httpx
from playwright.sync_api import Page, expect

from proxy import TcpProxy  # tests/integration (put on sys.path by conftest.py)
from turnline.agent import Agent

WAIT_MS = 10_000
expect.set_options(timeout=WAIT_MS)


class ChatPage:
    """One tab of the demo chat, with helpers that read what it shows."""

    def __init__(self, page: Page):
        self.page = page
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def open(self, url: str) -> ChatPage:
        self.page.goto(url)
        expect(self.page.get_by_test_id("connection")).to_be_hidden()
        return self

    # ------------------------------------------------------------ locators

    @property
    def send_button(self) -> Any:
        return self.page.get_by_test_id("send")

    @property
    def banner(self) -> Any:
        return self.page.get_by_test_id("connection")

    def message(self, message_id: str) -> Any:
        return self.page.locator(f'[data-testid=message][data-id="{message_id}"]')

    def assistant(self, index: int = -1) -> Any:
        rows = self.page.locator("[data-testid=message][data-role=assistant]")
        return rows.last if index == -1 else rows.nth(index)

    def user(self, text: str) -> Any:
        return self.page.locator("[data-testid=message][data-role=user]", has_text=text)

    # ------------------------------------------------------------ actions

    def send(self, text: str, policy: str | None = None) -> None:
        if policy is not None:
            self.page.get_by_test_id("policy").select_option(policy)
        self.page.get_by_test_id("input").fill(text)
        self.page.get_by_test_id("input").press("Enter")

    def stop_now(self) -> dict[str, Any]:
        """In one task of the page: read what the newest assistant message
        shows, then press the stop button. Returns ``{id, text, mode}``."""
        return self.page.evaluate("""() => {
            const rows = document.querySelectorAll('[data-testid=message][data-role=assistant]');
            const row = rows[rows.length - 1];
            const text = [...row.querySelectorAll('[data-testid=text]')].map((e) => e.textContent).join('');
            const button = document.querySelector('[data-testid=send]');
            const mode = button.dataset.mode;
            button.click();
            return {id: row.dataset.id, text, mode};
        }""")

    def send_now(self, text: str, policy: str) -> dict[str, Any]:
        """Like :meth:`stop_now`, but sends ``text`` with ``policy``."""
        return self.page.evaluate("""([text, policy]) => {
            const rows = document.querySelectorAll('[data-testid=message][data-role=assistant]');
            const row = rows[rows.length - 1];
            const shown = [...row.querySelectorAll('[data-testid=text]')].map((e) => e.textContent).join('');
            document.querySelector('[data-testid=policy]').value = policy;
            document.querySelector('[data-testid=input]').value = text;
            document.querySelector('#composer').requestSubmit();
            return {id: row.dataset.id, text: shown};
        }""", [text, policy])

    # ------------------------------------------------------------ reading

    def text_of(self, row: Any) -> str:
        return "".join(row.locator("[data-testid=text]").all_text_contents())

    def wait_text(self, row: Any, expected: str) -> None:
        """Wait until ``row`` (re-found on every try) shows exactly ``expected``, whitespace included."""
        expect(row.locator("[data-testid=text]")).to_have_text(re.compile(f"^{re.escape(expected)}$"))

    def wait_rendered(self, seq: int) -> None:
        """Wait until the page has applied and drawn every event up to ``seq``."""
        self.page.wait_for_function(
            "(seq) => { const c = window.turnlineDemo.chat; return c.view.lastSeq >= seq && c.rendered >= seq; }",
            arg=seq, timeout=WAIT_MS)

    def session_id(self) -> str:
        return self.page.evaluate("() => window.turnlineDemo.chat.id")


# ---------------------------------------------------------------- the agent and the server


END = object()


class Pacer:
    """A test agent whose pace the test controls.

    A turn's tag is the first word of its prompt; it writes ``{tag}0 ``,
    ``{tag}1 ``, … one word per permit that the test gives with
    ``release(tag, n)``, and ends ``complete`` on ``finish(tag)`` or
    ``cancelled`` at the abort. The k-th turn of a tag (a regeneration, say)
    writes ``{tag}0v{k} …`` so two answers to one question differ.

    ``hold_cancels()`` makes the server wait, in the agent's ``on_cancel``
    hook, before deciding on a stop (``cancel_waiting`` is set once one
    waits) until ``let_cancels_through()``: the answer streams on meanwhile,
    as it would while a stop is on its way.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}  # server loop only
        self._turns: defaultdict[str, int] = defaultdict(int)
        self._done: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self._written: defaultdict[str, int] = defaultdict(int)
        self._progress = threading.Condition()
        self._holding = False
        self._cancel_gate: asyncio.Event | None = None  # server loop only
        self.cancel_waiting = threading.Event()

    def agent(self) -> Agent:
        return Agent(self.respond, on_cancel=self.on_cancel)

    def _queue(self, tag: str) -> asyncio.Queue[Any]:
        return self._queues.setdefault(tag, asyncio.Queue())

    def release(self, tag: str, n: int = 1) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(lambda: [self._queue(tag).put_nowait(True) for _ in range(n)])

    def finish(self, tag: str) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(lambda: self._queue(tag).put_nowait(END))

    def wait_written(self, tag: str, n: int) -> None:
        """Wait until the agent has written ``n`` words for ``tag`` (in all its turns)."""
        with self._progress:
            assert self._progress.wait_for(lambda: self._written[tag] >= n, WAIT_MS / 1000), \
                f"the agent wrote {self._written[tag]} of {n} {tag!r} words"

    def hold_cancels(self) -> None:
        self.cancel_waiting.clear()
        self._holding = True

    def let_cancels_through(self) -> None:
        assert self.loop is not None
        self._holding = False
        self.loop.call_soon_threadsafe(lambda: self._gate().set())

    def _gate(self) -> asyncio.Event:
        if self._cancel_gate is None:
            self._cancel_gate = asyncio.Event()
        return self._cancel_gate

    async def on_cancel(self, _request: Any) -> bool:
        if self._holding:
            self.cancel_waiting.set()
            await self._gate().wait()
        return True

    def wait_done(self, tag: str) -> None:
        """Wait until the last turn of ``tag`` has stopped writing."""
        assert self._done[tag].wait(WAIT_MS / 1000), f"the agent's {tag!r} turn did not end"

    async def respond(self, turn: Any) -> None:
        prompt = " ".join(p.get("text", "") for p in turn.input.parts if p.get("type") == "text")
        tag = prompt.split()[0] if prompt.split() else "w"
        version = self._turns[tag]
        self._turns[tag] += 1
        suffix = f"v{version + 1}" if version else ""
        self._done[tag].clear()
        queue = self._queue(tag)
        aborted = asyncio.ensure_future(_aborted(turn))
        try:
            i = 0
            while True:
                permit = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({permit, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if permit not in done:
                    permit.cancel()
                    return
                if permit.result() is END or turn.aborted:
                    return
                await turn.write(f"{tag}{i}{suffix} ")
                i += 1
                with self._progress:
                    self._written[tag] += 1
                    self._progress.notify_all()
        finally:
            aborted.cancel()
            self._done[tag].set()


async def _aborted(turn: Any) -> None:
    await turn.abort_signal


def words(tag: str, n: int, version: int = 1) -> str:
    suffix = f"v{version}" if version > 1 else ""
    return "".join(f"{tag}{i}{suffix} " for i in range(n))


class ChatServer:
    def __init__(self, srv: Any, pacer: Pacer):
        self.srv = srv
        self.pacer = pacer

    @property
    def http(self) -> str:
        return self.srv.http

    def url(self, session: str | None = None) -> str:
        return f"{self.srv.http}/#{session or new_session()}"

    def last_seq(self, session: str) -> int:
        async def read() -> int:
            return (await self.srv.runtime.hub(session)).state.last_seq
        return self.srv.call(read())

    def history(self, session: str, **params: str) -> list[dict[str, Any]]:
        """The persisted messages (``GET /v1/sessions/{id}/messages``), system message left out."""
        r = httpx.get(f"{self.srv.http}/v1/sessions/{session}/messages", params=params,
                      headers={"authorization": f"Bearer {self.srv.token('inspector')}"})
        assert r.status_code == 200, r.text
        return [m for m in r.json()["messages"] if m["role"] != "system"]


def new_session() -> str:
    return f"chat-{uuid.uuid4().hex[:12]}"


def text_of(message: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in message["parts"] if p.get("type") == "text")


# ---------------------------------------------------------------- a network that fails


class FlakyNetwork(TcpProxy):
    """A TCP proxy in front of the server that can drop every connection
    (``cut``) and refuse new ones (``refusing``), in its own thread."""

    refusing = False

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.refusing:
            client_w.transport.abort()
            return
        await super()._accept(client_r, client_w)
