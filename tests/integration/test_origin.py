"""The WebSocket ``Origin`` check on the wire (the browser's view is in
tests/e2e/test_cors_page.py): a foreign origin gets HTTP 403 with the error in
the body, before the upgrade; this server's own pages, listed origins and
non-browser clients (no ``Origin``) connect. CORS preflights for listed origins
allow the AI SDK's request and nothing is allowed for others."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import websockets


async def refused_status(url: str, origin: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, origin=origin):  # type: ignore[arg-type]
            pass
    response = refused.value.response
    return response.status_code, json.loads(response.body)


async def pongs(url: str, origin: str | None) -> None:
    async with websockets.connect(url, origin=origin) as ws:  # type: ignore[arg-type]
        await ws.send(json.dumps({"op": "ping", "id": 1}))
        assert json.loads(await ws.recv())["op"] == "pong"


async def test_websocket_from_a_foreign_origin_is_refused_before_the_upgrade(serve: Any) -> None:
    srv = serve()
    url = f"{srv.ws}?token={srv.token('alice')}"
    for origin in ("http://localhost:3000", f"http://127.0.0.1:{srv.port + 1}", "https://evil.example", "null"):
        status, body = await refused_status(url, origin)
        assert status == 403 and body["error"]["code"] == "forbidden" and origin in body["error"]["message"], body
    for origin in (f"http://127.0.0.1:{srv.port}", None):  # this server's own page; not a browser
        await pongs(url, origin)


async def test_listed_origins_connect_and_pass_the_preflight(serve: Any) -> None:
    srv = serve(server_config={"cors_origins": ["https://App.Example.com/", "http://localhost:3000"]})
    url = f"{srv.ws}?token={srv.token('alice')}"
    for origin in ("https://app.example.com", "http://localhost:3000", f"http://127.0.0.1:{srv.port}"):
        await pongs(url, origin)
    status, _ = await refused_status(url, "https://other.example.com")
    assert status == 403
    async with httpx.AsyncClient() as client:
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        r = await client.options(f"{srv.http}/api/chat", headers={"Origin": "https://app.example.com", **preflight})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                     r.headers["access-control-allow-headers"].split(",")}
        assert "access-control-allow-credentials" not in r.headers
        r = await client.options(f"{srv.http}/api/chat", headers={"Origin": "https://other.example.com", **preflight})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = await client.get(f"{srv.http}/healthz", headers={"Origin": "https://app.example.com"})
        assert r.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "x-vercel-ai-ui-message-stream" in r.headers["access-control-expose-headers"]


async def test_the_ai_sdk_websocket_route_checks_the_origin_too(serve: Any) -> None:
    srv = serve(server_config={"cors_origins": ["https://app.example.com"]})
    url = f"ws://127.0.0.1:{srv.port}/api/chat/ws?token={srv.token('alice')}"
    status, body = await refused_status(url, "https://evil.example")
    assert status == 403 and body["error"]["code"] == "forbidden", body
    for origin in ("https://app.example.com", f"http://127.0.0.1:{srv.port}", None):
        async with websockets.connect(url, origin=origin) as ws:  # type: ignore[arg-type]
            await ws.send(json.dumps({"type": "resume", "requestId": "r1", "chatId": "no-such-chat"}))
            assert json.loads(await ws.recv())["type"] in ("no-active", "error")
