"""A TCP proxy on a loopback port, to simulate network drops between a client
and the server.

``cut()`` drops every live connection in both directions at once (the sockets
are aborted, not closed gracefully: nothing buffered is flushed), so each side
sees its peer vanish mid-stream. ``mute_downstream`` silently discards
server→client bytes (an answer lost in flight; cut afterwards, the stream is
broken). ``hold_downstream`` buffers server→client bytes until
``release_downstream()`` (a slow network: the server is ahead of the screen). The proxy keeps accepting, so
clients can reconnect through it. It runs on the loop of the test that starts it.
"""

from __future__ import annotations

import asyncio
import contextlib


class _Pair:
    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter):
        self.client = client
        self.server = server
        self.held: list[bytes] = []
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for w in (self.client, self.server):
            w.transport.abort()
        for t in self.tasks:
            t.cancel()


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.cuts = 0
        self.mute_downstream = False
        self.muted_bytes = 0
        self.hold_downstream = False
        self._pairs: set[_Pair] = set()
        self._server: asyncio.base_events.Server | None = None

    def ws_url(self, path: str = "/v1/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def live(self) -> int:
        return len(self._pairs)

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def cut(self) -> int:
        """Drop every live connection, both directions. Returns how many."""
        pairs = list(self._pairs)
        self._pairs.clear()
        for p in pairs:
            p.abort()
        self.cuts += 1
        return len(pairs)

    def release_downstream(self) -> int:
        """Deliver what ``hold_downstream`` kept, in order, and stop holding."""
        self.hold_downstream = False
        total = 0
        for p in self._pairs:
            data, p.held = b"".join(p.held), []
            total += len(data)
            if data:
                p.client.write(data)
        return total

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        pair = _Pair(client_w, server_w)
        self._pairs.add(pair)
        self.accepted += 1
        pair.tasks = [
            asyncio.ensure_future(self._pump(client_r, server_w, pair, downstream=False)),
            asyncio.ensure_future(self._pump(server_r, client_w, pair, downstream=True)),
        ]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair,
                    downstream: bool) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if downstream and self.mute_downstream:
                    self.muted_bytes += len(data)
                    continue
                if downstream and self.hold_downstream:
                    pair.held.append(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError, OSError):
            pass
        finally:
            # one side ended: end the other (a graceful end stays graceful)
            if pair in self._pairs:
                self._pairs.discard(pair)
                with contextlib.suppress(Exception):
                    pair.client.close()
                with contextlib.suppress(Exception):
                    pair.server.close()
