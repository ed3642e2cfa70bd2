"""Peer: the AI SDK route-handler pattern, where a stop aborts only the client's fetch.

A typical AI SDK chat route is

    export async function POST(req) {
      const result = streamText({ model, messages });   // no abortSignal: req.signal
      result.consumeStream();                           // finish (and persist) even if the client leaves
      return result.toUIMessageStreamResponse();
    }

``streamText`` runs the model call on its own and the response is a view of it.
When the user presses stop, ``useChat`` aborts its fetch: the response to the
browser closes, but the model call was never given the request's abort signal,
so the upstream HTTP stream stays open and the provider keeps generating (and
billing) to the end.

This module is that shape in Python, against the fake providers: ``POST /chat``
starts the model call as a task of its own (the provider stream is parsed with
turnline's adapters, which stand in for the AI SDK's provider packages),
and streams its UI message chunks to the client as SSE with the AI SDK's
headers. With ``"wire_abort": true`` the route does what the AI SDK docs
advise, ``abortSignal: req.signal``: the model call is cancelled when the
client goes away. The request names the provider, its base URL (``upstream``)
and the fake's script (``model``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from bench.peers._harness import record_routes
from bench.providers import provider_call

UI_HEADERS = {"cache-control": "no-cache", "x-vercel-ai-ui-message-stream": "v1", "x-accel-buffering": "no"}
_background: set[asyncio.Task[None]] = set()


async def chat(request: Request) -> StreamingResponse:
    body = await request.json()
    stream = provider_call(body["provider"], body["model"], body["upstream"], body["tag"],
                           [{"role": "user", "parts": [{"type": "text", "text": body.get("prompt", "hi")}]}])
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def model_call() -> None:  # streamText + consumeStream: runs whether or not anyone reads
        try:
            async for chunk in stream:
                queue.put_nowait(chunk)
        finally:
            queue.put_nowait(None)

    task = asyncio.ensure_future(model_call())
    _background.add(task)
    task.add_done_callback(_background.discard)

    async def ui_stream() -> AsyncIterator[str]:
        try:
            yield f"data: {json.dumps({'type': 'start'})}\n\n"
            while (chunk := await queue.get()) is not None:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if body.get("wire_abort"):  # abortSignal: req.signal
                task.cancel()

    return StreamingResponse(ui_stream(), media_type="text/event-stream", headers=UI_HEADERS)


app = Starlette(routes=[Route("/chat", chat, methods=["POST"]), *record_routes({})])
