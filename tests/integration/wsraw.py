"""A small raw WebSocket client for the wire-contract tests.

It speaks PROTOCOL.md directly (JSON text frames through
``websockets.asyncio.client``), deliberately without the turnline client, so
the tests pin the wire and nothing above it. A background reader sorts what
arrives: events per session (``events`` batches expanded), acks and errors by
the ``id`` they quote, errors without an id, pongs, and the close.
Every wait is bounded; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import defaultdict
from typing import Any, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

DEFAULT_TIMEOUT = 5.0


class RawWS:
    def __init__(self, conn: ClientConnection):
        self.conn = conn
        self.frames: list[dict[str, Any]] = []  # every frame, in arrival order
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.replies: dict[Any, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []  # every error frame, with or without id
        self.pongs = 0
        self.closed: ConnectionClosed | None = None
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    # ------------------------------------------------------------ opening

    @classmethod
    async def open(cls, url: str, token: str | None = None, *, query: str = "",
                   header_token: bool = True, headers: dict[str, str] | None = None) -> RawWS:
        if token and header_token:
            headers = {**(headers or {}), "Authorization": f"Bearer {token}"}
        if token and not header_token:
            query = f"token={token}" + (f"&{query}" if query else "")
        conn = await asyncio.wait_for(
            connect(url + (f"?{query}" if query else ""), additional_headers=headers, max_size=None),
            DEFAULT_TIMEOUT)
        return cls(conn)

    async def close(self) -> None:
        await self.conn.close()
        self._reader.cancel()

    async def abort(self) -> None:
        """Drop the TCP connection without a closing handshake (a network drop)."""
        self.conn.transport.abort()
        await asyncio.wait_for(self.conn.wait_closed(), DEFAULT_TIMEOUT)
        self._reader.cancel()

    async def __aenter__(self) -> RawWS:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------ reading

    async def _read(self) -> None:
        try:
            async for raw in self.conn:
                self._receive(raw)
                self._poke()
        except ConnectionClosed as exc:
            self.closed = exc
        finally:
            if self.closed is None:
                self.closed = ConnectionClosed(None, None)
            self._poke()

    def _receive(self, raw: str | bytes) -> None:
        """Sort one frame (a subclass may take the frames it knows first)."""
        frame = json.loads(raw)
        self.frames.append(frame)
        op = frame.get("op")
        if op == "event":
            self.events[frame["session"]].append(frame["event"])
        elif op == "events":
            self.events[frame["session"]].extend(frame["events"])
        elif op == "pong":
            self.pongs += 1
        elif op in ("ack", "error"):
            if op == "error":
                self.errors.append(frame)
            if frame.get("id") is not None:
                assert frame["id"] not in self.replies, f"two replies for frame id {frame['id']!r}"
                self.replies[frame["id"]] = frame

    def _poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT,
                         what: str = "condition") -> Any:
        async with asyncio.timeout(timeout):
            while True:
                value = predicate()
                if value:
                    return value
                if self.closed is not None and self._reader.done():
                    value = predicate()
                    if value:
                        return value
                    raise AssertionError(f"connection closed ({self.closed}) while waiting for {what}")
                await self._changed.wait()

    # ------------------------------------------------------------ writing

    async def send_raw(self, data: str | bytes) -> None:
        await self.conn.send(data)

    async def send(self, frame: dict[str, Any]) -> Any:
        """Send a frame with a fresh ``id`` (unless it has one); returns the id."""
        if "id" not in frame:
            frame = {**frame, "id": f"f{next(self._ids)}"}
        await self.conn.send(json.dumps(frame))
        return frame["id"]

    async def reply(self, frame_id: Any, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        return await self.wait_until(lambda: self.replies.get(frame_id), timeout, f"reply to {frame_id!r}")

    async def request(self, frame: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        return await self.reply(await self.send(frame), timeout)

    async def ok(self, frame: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        r = await self.request(frame, timeout)
        assert r["op"] == "ack", r
        return r

    async def fails(self, frame: dict[str, Any], code: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        r = await self.request(frame, timeout)
        assert r["op"] == "error", r
        assert r["code"] == code, r
        assert isinstance(r["message"], str) and r["message"], r
        return r

    async def next_error(self, seen: int, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The first error frame after the ``seen`` first ones."""
        await self.wait_until(lambda: len(self.errors) > seen, timeout, "an error frame")
        return self.errors[seen]

    # ------------------------------------------------------------ conveniences

    async def ping(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        before = self.pongs
        await self.conn.send(json.dumps({"op": "ping"}))
        await self.wait_until(lambda: self.pongs > before, timeout, "pong")

    async def subscribe(self, session: str, after: int | None = 0) -> dict[str, Any]:
        frame: dict[str, Any] = {"op": "subscribe", "session": session}
        if after is not None:
            frame["after"] = after
        return await self.ok(frame)

    async def say(self, session: str, text: str, **fields: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"parts": [{"type": "text", "text": text}]}
        if "message_id" in fields:
            msg["id"] = fields.pop("message_id")
        return await self.request({"op": "send", "session": session, "messages": [msg], **fields})

    def find(self, session: str, type_: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events[session]
                if e["type"] == type_ and all(e.get(k) == v for k, v in match.items())]

    async def wait_event(self, session: str, type_: str, timeout: float = DEFAULT_TIMEOUT,
                         **match: Any) -> dict[str, Any]:
        found = await self.wait_until(lambda: self.find(session, type_, **match), timeout,
                                      f"{type_} {match} on {session}")
        return found[0]

    async def turn_end(self, session: str, turn_id: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        return await self.wait_event(session, "turn-end", timeout, turn_id=turn_id)

    async def completes(self, session: str, text: str = "hello", timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Send on ``session`` (which this connection follows); the turn must end complete."""
        ack = await self.say(session, text)
        assert ack["op"] == "ack", ack
        (turn_id,) = ack["turn_ids"]
        end = await self.turn_end(session, turn_id, timeout)
        assert end["reason"] == "complete", end
        return end


async def settled_log(srv: Any, session: str, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """The session's stored log once everything the server has decided is
    durable (the store caught up with the hub's state). Bounded wait."""

    async def positions() -> tuple[int, int]:
        hub = await srv.runtime.hub(session)
        return hub.state.last_seq, await srv.runtime.store.last_seq(session)

    async with asyncio.timeout(timeout):
        while True:
            decided, durable = await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(positions(), srv.loop))
            if decided == durable:
                break
            await asyncio.sleep(0.002)
    records = await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(srv.runtime.store.read(session, 0), srv.loop))
    return [json.loads(r.data) for r in records]


def assert_gapless(events: list[dict[str, Any]], start: int = 1) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(start, start + len(seqs))), f"not gapless from {start}: {seqs}"


def text_of(message: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in message["parts"] if p.get("type") == "text")


class Gate:
    """A gate an agent on the server loop waits at, opened from the test thread."""

    def __init__(self) -> None:
        self.event = asyncio.Event()  # bound to the server's loop on first wait
        self.loop: asyncio.AbstractEventLoop | None = None

    async def wait(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.event.wait()

    def open(self, srv: Any) -> None:
        srv.loop.call_soon_threadsafe(self.event.set)

    def close(self, srv: Any) -> None:
        """Re-arm the gate (returns once the server loop has done it)."""

        async def clear() -> None:
            self.event.clear()

        srv.call(clear())


def held_agent(gate: Gate) -> Any:
    """An agent answering "ok done"; a prompt starting with ``hold`` waits at
    ``gate`` between the two words (a turn kept running until the test says)."""

    async def agent(turn: Any):
        prompt = " ".join(p.get("text", "") for p in turn.input.parts)
        yield "ok "
        if prompt.startswith("hold"):
            await gate.wait()
        yield "done"

    return agent
