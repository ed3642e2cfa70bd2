"""`turnline serve` declines permessage-deflate unless started with
`--ws-deflate` (the real CLI, a real client offering it as browsers do), and
events flow either way."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import websockets

from test_server_crash import SECRET, Server
from turnline.server.auth import mint


@pytest.mark.parametrize("flag, negotiated", [((), False), (("--ws-deflate",), True)])
async def test_permessage_deflate_only_with_the_flag(tmp_path: Path, flag: tuple[str, ...], negotiated: bool) -> None:
    server = Server(tmp_path, str(tmp_path / "t.db"), *flag)
    token = mint(SECRET, "alice", {"*": ["subscribe", "publish"]}, 600)
    try:
        async with asyncio.timeout(60):
            await server.start()
            async with websockets.connect(server.ws, compression="deflate",
                                          additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
                assert ("permessage-deflate" in extensions) is negotiated
                await ws.send(json.dumps({"op": "subscribe", "session": "d", "after": 0, "id": 1}))
                await ws.send(json.dumps({"op": "send", "session": "d", "id": 2,
                                          "messages": [{"parts": [{"type": "text", "text": "hi"}]}]}))
                types: list[str] = []
                while "turn-start" not in types:
                    frame = json.loads(await ws.recv())
                    assert frame["op"] != "error", frame
                    types += [e["type"] for e in frame.get("events", [frame.get("event") or {}]) if e]
    finally:
        await server.stop()
