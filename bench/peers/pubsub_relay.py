"""Baseline of bench/fanout.py: a Redis pub/sub → WebSocket relay with no log
(the "resumable-stream" approach).

Two parts:

- the relay (``app``, run by uvicorn like ``turnline serve``): a WebSocket at
  ``/v1/ws`` that answers ``{"op":"subscribe","session":S}`` with an ack,
  SUBSCRIBEs one pub/sub connection to the session's channel, and forwards
  every message published there, byte for byte, to the session's sockets
  (the pub/sub replies are parsed by hiredis, as turnline's store reads). Each
  socket has an outgoing queue and a writer task, as in turnline's gateway, so
  the two differ by the log and nothing else. Nothing is stored: a subscriber
  that drops loses what was published meanwhile, and Redis drops a pub/sub
  reader that falls too far behind (``client-output-buffer-limit pubsub``).
- the publisher (``python -m bench.peers.pubsub_relay publish …``): one task
  per session streaming tokens with the same pacing as turnline's bench agent
  (``bench.fanout_agents.paced``), each PUBLISHed as the event frame turnline
  would send (a ``chunk`` event with its ``seq``, the delta being the write
  time), written to Redis in pipelines: whatever accumulated while the last
  pipeline was in flight goes in the next one (as turnline's store writes).

Settings come from the environment: ``RELAY_REDIS_URL`` and ``RELAY_PREFIX``
(the channel of session S is PREFIX + S).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MAX_PENDING_FRAMES = 20_000  # as turnline's ServerConfig.max_pending_frames


class _Subscribe(msgspec.Struct):
    op: str
    session: str = ""
    id: str | int | None = None


_decode_frame = msgspec.json.Decoder(_Subscribe).decode
_encode = msgspec.json.Encoder().encode


class _Socket:
    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    def push(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.out.qsize() >= MAX_PENDING_FRAMES:
            self.closed = True
            self.out.put_nowait(None)
            return
        self.out.put_nowait(frame)

    async def writer(self) -> None:
        while True:
            frame = await self.out.get()
            if frame is None:
                with contextlib.suppress(Exception):
                    await self.ws.close(code=1013)
                return
            await self.ws.send_text(frame.decode())


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


class _PubSubReader(asyncio.Protocol):
    """The relay's pub/sub connection, parsed by hiredis straight from
    ``data_received``: every message in a read is forwarded at once.
    (redis-py's PubSub, one awaited message at a time, fell behind at 30,000
    messages a second here, its output buffer in Redis growing by MBs a second.)"""

    def __init__(self, relay: Relay):
        import hiredis

        self.relay = relay
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        forward = self.relay.forward
        while (reply := self.reader.gets()) is not False:
            if reply[0] == b"message":
                forward(reply[1], reply[2])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Relay:
    def __init__(self, url: str, prefix: str):
        where = urlsplit(url)
        self.host, self.port = where.hostname or "127.0.0.1", where.port or 6379
        self.prefix = prefix.encode()
        self.sockets: dict[bytes, set[_Socket]] = {}
        self._pubsub: _PubSubReader | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._pubsub = await loop.create_connection(lambda: _PubSubReader(self), self.host, self.port)

    async def stop(self) -> None:
        if self._pubsub is not None and self._pubsub.transport is not None:
            self._pubsub.transport.close()

    def forward(self, channel: bytes, data: bytes) -> None:
        for sock in self.sockets.get(channel, ()):
            sock.push(data)

    def _send(self, *args: bytes) -> None:
        assert self._pubsub is not None and self._pubsub.transport is not None
        self._pubsub.transport.write(_command(*args))

    def subscribe(self, session: str, sock: _Socket) -> None:
        channel = self.prefix + session.encode()
        group = self.sockets.get(channel)
        if group is None:
            group = self.sockets[channel] = set()
            self._send(b"SUBSCRIBE", channel)
        group.add(sock)

    def unsubscribe_all(self, sock: _Socket) -> None:
        for channel, group in list(self.sockets.items()):
            group.discard(sock)
            if not group:
                del self.sockets[channel]
                self._send(b"UNSUBSCRIBE", channel)


def create_app(url: str, prefix: str) -> Starlette:
    relay = Relay(url, prefix)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await relay.start()
        try:
            yield
        finally:
            await relay.stop()

    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()
        sock = _Socket(ws)
        writer = asyncio.ensure_future(sock.writer())
        try:
            while not writer.done():
                text = await ws.receive_text()
                try:
                    frame = _decode_frame(text)
                except msgspec.DecodeError as exc:
                    sock.push(_encode({"op": "error", "code": "bad_frame", "message": str(exc)}))
                    continue
                if frame.op == "subscribe" and frame.session:
                    relay.subscribe(frame.session, sock)
                    sock.push(_encode({"op": "ack", "id": frame.id, "session": frame.session}))
                else:
                    sock.push(_encode({"op": "error", "id": frame.id, "code": "unknown_op",
                                       "message": "this relay only subscribes"}))
        except WebSocketDisconnect:
            pass
        finally:
            sock.closed = True
            writer.cancel()
            relay.unsubscribe_all(sock)

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[WebSocketRoute("/v1/ws", ws_endpoint), Route("/healthz", healthz)],
                     lifespan=lifespan)


app = create_app(os.environ.get("RELAY_REDIS_URL", "redis://127.0.0.1:6379"),
                 os.environ.get("RELAY_PREFIX", "relay:"))


# --------------------------------------------------------------------------- publisher


async def publish(url: str, prefix: str, sessions: list[str], tokens: int, rate: float) -> None:
    from bench.fanout_agents import paced
    from turnline.protocol import ChunkEvent, encode, event_frame

    client = aioredis.from_url(url, single_connection_client=True)
    await client.initialize()
    conn = client.connection
    pending: list[bytes] = []
    ready = asyncio.Event()

    async def flusher() -> None:
        # One write of hand-packed PUBLISH commands per round, then their
        # replies: redis-py's Pipeline costs ~25 µs a command to pack, which
        # would make the publisher, not the relay, the bottleneck.
        while True:
            await ready.wait()
            ready.clear()
            batch = pending[:]
            pending.clear()
            await conn.send_packed_command(b"".join(batch), check_health=False)
            for _ in batch:
                await conn.read_response()

    async def stream(session: str) -> None:
        channel = (prefix + session).encode()
        turn_id = f"turn-{session}"
        async for i in paced(rate, tokens):
            ev = ChunkEvent(seq=i + 1, turn_id=turn_id, client_id="agent", ts=time.time_ns() // 1_000_000,
                            chunk={"type": "text-delta", "id": "text-0", "delta": f"{time.monotonic_ns()} "})
            data = event_frame(session, encode(ev))
            pending.append(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
                           % (len(channel), channel, len(data), data))
            ready.set()

    flush_task = asyncio.ensure_future(flusher())
    try:
        await asyncio.gather(*(stream(s) for s in sessions))
        while pending:
            await asyncio.sleep(0.01)
    finally:
        flush_task.cancel()
        await client.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.pubsub_relay")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("publish", help="stream tokens to the sessions' channels")
    p.add_argument("--redis", required=True)
    p.add_argument("--prefix", default="relay:")
    p.add_argument("--sessions", required=True, help="FIRST:COUNT, sessions fan-FIRST … fan-(FIRST+COUNT-1)")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--rate", type=float, default=30.0)
    a = ap.parse_args()
    first, count = (int(x) for x in a.sessions.split(":"))
    asyncio.run(publish(a.redis, a.prefix, [f"fan-{i}" for i in range(first, first + count)], a.tokens, a.rate))


if __name__ == "__main__":
    main()
