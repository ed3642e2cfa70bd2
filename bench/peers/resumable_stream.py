"""Peers for bench/resume_drop.py: a token stream kept in memory, resumed after a drop.

The server runs each generation as a background task (a dropped connection does
not stop it) and keeps what it produced in memory, as the libraries do. A client
reads it as Server-Sent Events, one token per event (``data: t17``), and after a
drop reconnects in one of four ways:

- ``offset-events`` / ``offset-received``: vercel/resumable-stream
  (``resumableStream(id, makeStream, skipCharacters)``; src/runtime.ts). The
  stream is a string; a resume names how many characters the client already
  has, and the producer, in one synchronous step, adds the listener and sends
  ``chunks.join("").slice(skipCharacters)``, then every later chunk. The client
  counts those characters: at event boundaries (``offset-events``), or as they
  arrive, the head of an event cut by the drop included (``offset-received``;
  the new response's SSE parser starts empty, as a new fetch's does).
- ``join``: LangGraph API server, in-memory runtime (langgraph-api
  ``join_run_stream`` + langgraph-runtime-inmem 0.36.7 ``Runs.Stream.join`` and
  ``StreamManager``). Every event gets the id ``f"{ms}-0"`` (wall-clock
  milliseconds, sequence always 0) and is stored; a join first subscribes a live
  queue, then replays the stored events whose id is ``>`` ``Last-Event-ID`` (a
  string compare), iterating the live list, then drains the queue.
- ``live``: no resume: reconnect to the live stream (a pub/sub relay).

Run:  python -m bench.resume_drop   (this module only serves the peers and reads them)
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bench.peers._harness import record_routes

MODES = ("offset-events", "offset-received", "join", "live")

# --------------------------------------------------------------------------- #
# server
# --------------------------------------------------------------------------- #


def _sse(data: str, event_id: str | None = None) -> str:
    return (f"id: {event_id}\n" if event_id else "") + f"data: {data}\n\n"


class _Generation:
    def __init__(self) -> None:
        self.chunks: list[str] = []  # resumable-stream: the stream's text so far
        self.messages: list[tuple[str, str]] = []  # LangGraph: (id, data) of every event
        self.listeners: list[asyncio.Queue[tuple[str, str] | None]] = []
        self.done = False

    def publish(self, data: str) -> None:
        event_id = f"{int(time.time() * 1000)}-0"  # langgraph_runtime_inmem._generate_ms_seq_id
        self.chunks.append(_sse(data))
        self.messages.append((event_id, data))
        for q in self.listeners:
            q.put_nowait((event_id, data))

    def finish(self) -> None:
        self.done = True
        for q in self.listeners:
            q.put_nowait(None)

    def listen(self) -> asyncio.Queue[tuple[str, str] | None]:
        q: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        if self.done:
            q.put_nowait(None)
        self.listeners.append(q)
        return q

    async def run(self, tokens: int, interval: float) -> None:
        for i in range(tokens):
            await asyncio.sleep(interval)
            self.publish(f"t{i}")
        self.finish()


GENERATIONS: dict[str, _Generation] = {}
_TASKS: set[asyncio.Task[None]] = set()


async def _resumable(gen: _Generation, skip: int) -> AsyncIterator[str]:
    q = gen.listen()  # listener added and text sliced in one step: nothing falls between
    head = "".join(gen.chunks)[skip:]
    if head:
        yield head
    while (item := await q.get()) is not None:
        yield _sse(item[1])


async def _join(gen: _Generation, last_event_id: str | None) -> AsyncIterator[str]:
    q = gen.listen()  # Runs.Stream.subscribe, before the replay
    if last_event_id is not None:
        for event_id, data in gen.messages:  # restore_messages, over the live list
            if event_id > last_event_id:
                yield _sse(data, event_id)
    while (item := await q.get()) is not None:
        yield _sse(item[1], item[0])


async def _live(gen: _Generation) -> AsyncIterator[str]:
    q = gen.listen()
    while (item := await q.get()) is not None:
        yield _sse(item[1])


def _stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat(request: Request) -> Response:
    body = await request.json()
    gen = GENERATIONS[body["id"]] = _Generation()
    task = asyncio.ensure_future(gen.run(int(body["tokens"]), float(body["interval"])))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return _stream(_join(gen, None) if body["mode"] == "join" else _resumable(gen, 0))


async def resume(request: Request) -> Response:
    gen = GENERATIONS.get(request.path_params["sid"])
    if gen is None:
        return Response("unknown stream", status_code=404)
    how = request.path_params["how"]
    if how == "offset":
        return _stream(_resumable(gen, int(request.query_params["resumeAt"])))
    if how == "join":
        return _stream(_join(gen, request.headers.get("last-event-id")))
    return _stream(_live(gen))


app = Starlette(routes=[
    Route("/chat", chat, methods=["POST"]),
    Route("/chat/{sid}/{how}", resume, methods=["GET"]),
    *record_routes({}),
])


# --------------------------------------------------------------------------- #
# client
# --------------------------------------------------------------------------- #


async def read_generation(http: httpx.AsyncClient, base: str, mode: str, tokens: int, interval: float,
                          on_token: Callable[[int], None]) -> int:
    """Start a generation through ``base`` (the proxy), read it to its end and
    resume after every drop as ``mode`` says; ``on_token(i)`` for each token
    shown. Returns the number of reconnects."""
    sid = uuid.uuid4().hex
    received = 0  # characters received, a cut event's head included
    complete = 0  # characters of the complete events received
    last_id: str | None = None
    reconnects = 0
    request = http.build_request("POST", f"{base}/chat",
                                 json={"id": sid, "tokens": tokens, "interval": interval, "mode": mode})
    while True:
        try:
            resp = await http.send(request, stream=True)
            try:
                resp.raise_for_status()
                buf = ""  # a new response's parser starts empty
                async for text in resp.aiter_text():
                    received += len(text)
                    buf += text
                    while (end := buf.find("\n\n")) >= 0:
                        raw, buf = buf[:end], buf[end + 2:]
                        complete += end + 2
                        fields = _fields(raw)
                        last_id = fields.get("id", last_id)
                        if "data" in fields:
                            on_token(int(fields["data"][1:]))
            finally:
                await resp.aclose()
            return reconnects  # the response ended: the generation is done
        except httpx.TransportError:
            reconnects += 1
        how, params, headers = {
            "offset-events": ("offset", {"resumeAt": complete}, {}),
            "offset-received": ("offset", {"resumeAt": received}, {}),
            "join": ("join", {}, {"Last-Event-ID": last_id} if last_id else {}),
            "live": ("live", {}, {}),
        }[mode]
        request = http.build_request("GET", f"{base}/chat/{sid}/{how}", params=params, headers=headers)


def _fields(raw: str) -> dict[str, Any]:
    """An SSE event's fields; lines of unknown fields (a cut line's tail) are ignored, as the spec says."""
    out: dict[str, Any] = {}
    for line in raw.split("\n"):
        name, _, value = line.partition(":")
        if name in ("id", "data"):
            out[name] = value[1:] if value.startswith(" ") else value
    return out
