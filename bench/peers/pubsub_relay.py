"""Baseline of bench/fanout.py: a Redis pub/sub → WebSocket relay with no log
(the "resumable-stream" approach).

Two parts:

- the relay (``app``, run by uvicorn like ``turnline serve``): a WebSocket at
  ``/v1/ws`` that answers ``{"op":"subscribe","session":S}`` with an ack,
  SUBSCRIBEs one pub/sub connection to the session's channel, and forwards
  every message published there, byte for byte, to the session's sockets. Each
  socket has an outgoing queue and a writer task, as in turnline's gateway, so
  the two differ by the log and nothing else. Nothing is stored: a subscriber
  that drops loses what was published meanwhile, and Redis drops a pub/sub
  reader that falls too far behind (``client-output-buffer-limit pubsub``).
- the publisher (``python -m bench.peers.pubsub_relay publish …``): one task
  per session streaming tokens with the same pacing as turnline's bench agent
  (``bench.fanout_agents.paced``), each PUBLISHed as the event frame turnline
  would send (a ``chunk`` event with its ``seq``, the delta being the write
  time), written to Redis in pipelines: whatever accumulated while the last
  pipeline was in flight goes in the next one.

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

import msgspec
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MAX_PENDING_FRAMES = 20_000  # as turnline's ServerConfig.max_pending_frames
CONTROL = b"relay-control"


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


class Relay:
    def __init__(self, url: str, prefix: str):
        self.redis = aioredis.from_url(url)
        self.prefix = prefix.encode()
        self.pubsub = self.redis.pubsub()
        self.sockets: dict[bytes, set[_Socket]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A pub/sub connection with no subscription has nothing to listen to.
        await self.pubsub.subscribe(CONTROL)
        self._reader = asyncio.ensure_future(self._forward())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.pubsub.aclose()
        await self.redis.aclose()

    async def _forward(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] != "message":
                continue
            for sock in self.sockets.get(message["channel"], ()):
                sock.push(message["data"])

    async def subscribe(self, session: str, sock: _Socket) -> None:
        channel = self.prefix + session.encode()
        group = self.sockets.get(channel)
        if group is None:
            group = self.sockets[channel] = set()
            await self.pubsub.subscribe(channel)
        group.add(sock)

    async def unsubscribe_all(self, sock: _Socket) -> None:
        for channel, group in list(self.sockets.items()):
            group.discard(sock)
            if not group:
                del self.sockets[channel]
                await self.pubsub.unsubscribe(channel)


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
                    await relay.subscribe(frame.session, sock)
                    sock.push(_encode({"op": "ack", "id": frame.id, "session": frame.session}))
                else:
                    sock.push(_encode({"op": "error", "id": frame.id, "code": "unknown_op",
                                       "message": "this relay only subscribes"}))
        except WebSocketDisconnect:
            pass
        finally:
            sock.closed = True
            writer.cancel()
            await relay.unsubscribe_all(sock)

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

    client = aioredis.from_url(url)
    pending: list[tuple[bytes, bytes]] = []
    ready = asyncio.Event()

    async def flusher() -> None:
        while True:
            await ready.wait()
            ready.clear()
            batch = pending[:]
            pending.clear()
            pipe = client.pipeline(transaction=False)
            for channel, data in batch:
                pipe.publish(channel, data)
            await pipe.execute()

    async def stream(session: str) -> None:
        channel = (prefix + session).encode()
        turn_id = f"turn-{session}"
        async for i in paced(rate, tokens):
            ev = ChunkEvent(seq=i + 1, turn_id=turn_id, client_id="agent", ts=time.time_ns() // 1_000_000,
                            chunk={"type": "text-delta", "id": "text-0", "delta": f"{time.monotonic_ns()} "})
            pending.append((channel, event_frame(session, encode(ev))))
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
