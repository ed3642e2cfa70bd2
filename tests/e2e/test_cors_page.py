"""Cross-origin apps (``--cors-origin``): Chromium on an app's own origin (a
tiny static page on another port) calls turnline's ``/api/chat`` with a bearer
token and opens its WebSocket. Listed origins get in; others fail the CORS
preflight, and their WebSocket is refused with 403 before the upgrade. Without
any listed origin, only same-origin pages (the demo page) may open a WebSocket
(tests/integration/test_origin.py checks the 403 on the wire)."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, AsyncIterator, Iterator

import pytest
from playwright.sync_api import Page

pytestmark = pytest.mark.browser

ANSWER = "hello from turnline"


async def answer(_turn: Any) -> AsyncIterator[str]:
    yield ANSWER


@pytest.fixture
def app_origin() -> Iterator[str]:
    """Another origin: a blank page on its own loopback port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = b"<!doctype html><title>an app on another origin</title><p>app</p>"
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


FETCH_CHAT = """async ([base, token, session]) => {
    try {
        const r = await fetch(`${base}/api/chat`, {
            method: 'POST',
            headers: {'authorization': `Bearer ${token}`, 'content-type': 'application/json'},
            body: JSON.stringify({id: session, trigger: 'submit-message',
                                  messages: [{id: 'u1', role: 'user', parts: [{type: 'text', text: 'hi'}]}]}),
        });
        return {fetched: true, status: r.status, stream: r.headers.get('x-vercel-ai-ui-message-stream'),
                body: await r.text()};
    } catch (e) {
        return {fetched: false, error: String(e)};
    }
}"""

OPEN_WS = """(url) => new Promise((resolve) => {
    const ws = new WebSocket(url);
    let opened = false;
    ws.onopen = () => { opened = true; ws.send(JSON.stringify({op: 'ping', id: 1})); };
    ws.onmessage = (m) => { resolve({opened, reply: JSON.parse(m.data)}); ws.close(); };
    ws.onclose = (e) => resolve({opened, code: e.code});
})"""


def app_page(pages: Any, origin: str) -> Page:
    page = pages().page
    page.goto(origin + "/")
    assert page.evaluate("() => location.origin") == origin
    return page


def test_listed_origin_calls_the_chat_route_and_opens_the_websocket(serve: Any, pages: Any, app_origin: str) -> None:
    srv = serve(agent=answer, server_config={"cors_origins": [app_origin]})
    page = app_page(pages, app_origin)
    session = f"cors-{uuid.uuid4().hex[:8]}"
    got = page.evaluate(FETCH_CHAT, [srv.http, srv.token("alice"), session])
    assert got["fetched"] and got["status"] == 200, got
    assert got["stream"] == "v1"  # an exposed header: the page can read it
    chunks = [line[6:] for line in got["body"].split("\n\n") if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    assert ANSWER in "".join(json.loads(c).get("delta", "") for c in chunks[:-1])
    # A refused token is readable too (the 401 carries the CORS headers).
    got = page.evaluate(FETCH_CHAT, [srv.http, "not-a-token", session])
    assert got["fetched"] and got["status"] == 401 and json.loads(got["body"])["error"]["code"] == "unauthorized"

    ws = page.evaluate(OPEN_WS, f"{srv.ws}?token={srv.token('alice')}")
    assert ws["opened"] and ws["reply"]["op"] == "pong", ws


def test_unlisted_origin_is_refused_before_anything_runs(serve: Any, pages: Any, app_origin: str) -> None:
    srv = serve(agent=answer, server_config={"cors_origins": ["https://someone-else.example"]})
    bare = serve(agent=answer)  # no --cors-origin at all
    page = app_page(pages, app_origin)
    for server in (srv, bare):
        session = f"cors-{uuid.uuid4().hex[:8]}"
        got = page.evaluate(FETCH_CHAT, [server.http, server.token("alice"), session])
        assert not got["fetched"] and "Failed to fetch" in got["error"], got
        assert not server.call(server.runtime.store.exists(session))  # the preflight failed: no turn ran
        ws = page.evaluate(OPEN_WS, f"{server.ws}?token={server.token('alice')}")
        assert not ws["opened"] and ws["code"] == 1006, ws  # the upgrade was refused


def test_the_demo_page_says_why_it_has_no_dev_token(serve: Any, browser: Any) -> None:
    """Not in dev mode, or in dev mode but reached through a proxy: the page's
    connection banner says so and how to open it instead."""
    from playwright.sync_api import expect

    for server_config, headers, says in (
            ({}, {}, "not in dev mode"),
            ({"dev": True}, {"X-Forwarded-For": "203.0.113.9"}, "not served through a proxy")):
        srv = serve(agent=answer, server_config=server_config)
        context = browser.new_context(extra_http_headers=headers)
        try:
            page = context.new_page()
            page.goto(srv.http + "/")
            banner = page.get_by_test_id("connection")
            expect(banner).to_contain_text(says)
            expect(banner).to_contain_text("?token=")
        finally:
            context.close()
