"""What every Server-Sent Events face of the server shares (the /v1 events
route, the AI SDK's /api/chat and AG-UI's /ag-ui): a follow of the log run in
its own task behind a bounded queue, keep-alive comments while it is quiet,
and a streamed ASGI response that notices a client going away even while
nothing is sent (a server hears of a dropped connection only on ``receive``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable

KEEPALIVE = b": keep-alive\n\n"
QUEUE_ITEMS = 64  # a slow reader holds the follow back (it catches up from the log) instead of piling up here

Pump = Callable[["asyncio.Queue[Any]"], Awaitable[None]]


async def paced(pump: Pump, keepalive_s: float) -> AsyncIterator[Any]:
    """Run ``pump(queue)`` in its own task and yield what it puts on the
    queue, and ``KEEPALIVE`` after each ``keepalive_s`` with nothing; ends at
    a ``None`` on the queue. The pump is cancelled when the caller stops."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUE_ITEMS)
    task = asyncio.ensure_future(pump(queue))
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield KEEPALIVE
                continue
            if item is None:
                return
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def stream_until_gone(receive: Any, send: Any, headers: list[tuple[bytes, bytes]],
                            body: AsyncIterator[bytes]) -> tuple[BaseException | None, bool]:
    """Send a 200 with ``headers`` and ``body`` as a streamed response while
    watching for the client to go away. Returns how sending the body failed
    (None if it did not) and whether the client went away before it ended."""
    await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def relay() -> None:
        async for data in body:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sending = asyncio.ensure_future(relay())
    gone = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        sending.cancel()
        gone.cancel()
        results = await asyncio.gather(sending, gone, return_exceptions=True)
    failure = results[0] if isinstance(results[0], Exception) else None
    return failure, gone.done() and not gone.cancelled()


async def _until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
