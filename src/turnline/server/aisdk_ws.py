"""The AI SDK's ``WebSocketChatTransport`` (package ``ai`` 7): ``/api/chat/ws``.

One socket carries any number of requests, each named by the client's
``requestId``. Client frames:

- ``send`` ``{requestId, id, trigger, messageId, messages, body}``: what
  ``POST /api/chat`` does (the chat id is the session id; ``body.policy`` picks
  the double-texting policy), then that turn's chunks;
- ``resume`` ``{requestId, id, lastSequence?}``: the session's running turn,
  its chunks after ``lastSequence`` (all of them without one), or ``no-active``;
- ``abort`` ``{requestId, lastSequence?}``: the request's turn is cancelled,
  saved as of chunk ``lastSequence`` (an extension: the last one the client
  showed, which turnline's ``web/aisdk-websocket.js`` adds), else as of the last
  chunk sent for that request (see docs/ai-sdk.md).

Server frames: ``start``, ``chunk`` ``{sequence, chunk}``, ``end``, ``error``
``{errorText}``, ``no-active``, each with its ``requestId``. ``sequence`` is
the chunk's index in its turn's UI message stream (from 0), the same on every
connection, so a client that resumes after a dropped socket continues with no
gap and no duplicate. Chunks are the ones ``/api/chat`` streams
(:class:`~turnline.server.aisdk.TurnChunks`).

Auth is the handshake's, as on ``/v1/ws``: ``?token=``, ``Authorization``, or
the subprotocol ``turnline.bearer.TOKEN`` (offered next to ``turnline``, which
the server selects). A dropped socket cancels nothing (unless
``aisdk_cancel_on_disconnect``): resume works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Literal, Optional

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..agent.runtime import CommandError
from ..protocol import ErrorCode, Id, Policy, encode
from .aisdk import AiSdk, ChatRequest, TurnChunks, UIMessageIn
from .auth import Principal
from .guards import guard_websocket_origin

log = logging.getLogger("turnline.server.aisdk_ws")

PATH = "/api/chat/ws"
SUBPROTOCOL = "turnline"
TOKEN_SUBPROTOCOL_PREFIX = "turnline.bearer."
MAX_REQUESTS = 32  # requests streaming at once on one socket
MAX_REQUEST_ID = 256


class WsRequest(msgspec.Struct, forbid_unknown_fields=False):
    """A ``WebSocketChatTransportRequest`` frame (``headers`` and ``metadata``
    are the client's own and not used: auth is the handshake's)."""

    type: Literal["send", "resume", "abort"]
    requestId: str
    id: Id | None = None
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: Id | None = None
    messages: list[UIMessageIn] = []
    body: dict[str, Any] = {}
    lastSequence: int | None = None


class _RequestIdOnly(msgspec.Struct, forbid_unknown_fields=False):
    requestId: Any = None


_request_decoder = msgspec.json.Decoder(WsRequest)
_request_id_decoder = msgspec.json.Decoder(_RequestIdOnly)


@dataclass
class _Streaming:
    """A request whose turn this socket streams."""

    session: str
    task: asyncio.Task[None] | None = None
    turn_id: str | None = None
    sent_seq: int | None = None  # log seq of the last chunk sent for it (None: not streaming yet)
    start_seq: int | None = None  # the log position the stream follows from
    chunk_seqs: list[int] | None = None  # log seq of each chunk sequence, sent or skipped
    starting: asyncio.Future[tuple[str, str | None, int]] | None = None  # a send being accepted

    def seen_at(self, last_sequence: int | None) -> int | None:
        """The ``seen`` cursor of a stop: as of chunk ``last_sequence`` when the
        client says which it showed last (-1: none), else as of what was sent."""
        if last_sequence is None or self.chunk_seqs is None:
            return self.sent_seq if self.sent_seq is not None else self.start_seq
        if last_sequence < 0:
            return self.start_seq
        return self.chunk_seqs[min(last_sequence, len(self.chunk_seqs) - 1)] if self.chunk_seqs else self.start_seq


def _token_of(ws: WebSocket) -> tuple[str | None, str | None]:
    """The bearer token offered as a subprotocol, and the subprotocol to select."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    token = next((p[len(TOKEN_SUBPROTOCOL_PREFIX):] for p in offered if p.startswith(TOKEN_SUBPROTOCOL_PREFIX)), None)
    return token, SUBPROTOCOL if SUBPROTOCOL in offered else None


class ChatSocket:
    """One ``/api/chat/ws`` connection."""

    def __init__(self, aisdk: AiSdk, ws: WebSocket, who: Principal):
        self.aisdk = aisdk
        self.ws = ws
        self.who = who
        self.requests: dict[str, _Streaming] = {}
        self._send_lock = asyncio.Lock()
        self.closed = False

    async def send(self, frame: dict[str, Any]) -> None:
        if self.closed:
            return
        async with self._send_lock:  # one frame at a time, whichever request it is for
            try:
                await self.ws.send_text(encode(frame).decode())
            except Exception:  # the peer went away mid-send: the receive loop ends the connection
                self.closed = True
                raise WebSocketDisconnect() from None

    async def error(self, request_id: str, code: str, message: str) -> None:
        self.aisdk.runtime.metrics.frame_errors.labels(code).inc()
        await self.send({"type": "error", "requestId": request_id, "errorText": f"{code}: {message}"})

    async def handle(self, text: str) -> None:
        limit = self.aisdk.app.config.aisdk_max_body_bytes
        raw = text.encode()
        try:
            if len(raw) > limit:
                raise CommandError(ErrorCode.TOO_LARGE, f"frame is over {limit} bytes, the limit")
            try:
                frame = _request_decoder.decode(raw)
            except msgspec.ValidationError as exc:
                code = ErrorCode.BAD_ID if "matching regex" in str(exc) else ErrorCode.BAD_FRAME
                raise CommandError(code, str(exc)) from None
            except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
                raise CommandError(ErrorCode.BAD_JSON, f"malformed JSON: {exc}") from None
            if len(frame.requestId) > MAX_REQUEST_ID:
                raise CommandError(ErrorCode.BAD_FRAME, f"requestId is over {MAX_REQUEST_ID} characters")
        except CommandError as exc:
            await self._refuse(raw, exc)
            return
        if frame.type == "abort":
            await self.abort(frame.requestId, frame.lastSequence)
            return
        try:
            if frame.id is None:
                raise CommandError(ErrorCode.BAD_FRAME, f"a {frame.type} frame names its chat: id")
            if frame.requestId in self.requests:
                raise CommandError(ErrorCode.CONFLICT, f"request {frame.requestId} is already streaming")
            if len(self.requests) >= MAX_REQUESTS:
                raise CommandError(ErrorCode.RATE_LIMITED,
                                   f"{MAX_REQUESTS} requests are streaming on this socket; abort one first")
            if frame.lastSequence is not None and frame.lastSequence < 0:  # (an abort's may be -1: nothing shown)
                raise CommandError(ErrorCode.BAD_FRAME, "lastSequence is a chunk sequence, 0 or more")
            try:
                policy = msgspec.convert(frame.body.get("policy"), Optional[Policy])  # the transport's body option
            except msgspec.ValidationError as exc:
                raise CommandError(ErrorCode.BAD_FRAME, f"body.policy: {exc}") from None
        except CommandError as exc:
            await self.error(frame.requestId, exc.code, exc.message)
            return
        request = self.requests[frame.requestId] = _Streaming(frame.id)
        if frame.type == "send":
            # Started here, in frame order: an abort that follows finds it.
            body = ChatRequest(id=frame.id, messages=frame.messages, trigger=frame.trigger,
                               messageId=frame.messageId, policy=policy)
            request.starting = asyncio.ensure_future(self.aisdk.start_turn(self.who, body))
        request.task = asyncio.ensure_future(self._run(frame, request))

    async def _refuse(self, raw: bytes, exc: CommandError) -> None:
        # Without a requestId there is no request to fail; the transport would
        # reject an uncorrelated error frame, so the socket is closed instead.
        try:
            request_id = _request_id_decoder.decode(raw).requestId
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
            request_id = None
        if isinstance(request_id, str) and len(request_id) <= MAX_REQUEST_ID:
            await self.error(request_id, exc.code, exc.message)
            return
        self.aisdk.runtime.metrics.frame_errors.labels(exc.code).inc()
        self.closed = True
        await self.ws.close(code=4400, reason=exc.code)

    async def _run(self, frame: WsRequest, request: _Streaming) -> None:
        try:
            if request.starting is not None:  # a send
                turn_id, message_id, after = await asyncio.shield(request.starting)  # decided even if dropped
                skip = -1
            else:
                turn = await self.aisdk.resumable_turn(self.who, request.session)
                if turn is None:
                    await self.send({"type": "no-active", "requestId": frame.requestId})
                    return
                turn_id, message_id, after = turn.turn_id, turn.message_id, turn.start_seq
                skip = -1 if frame.lastSequence is None else frame.lastSequence
            request.turn_id = turn_id
            await self._stream(frame.requestId, request, TurnChunks(turn_id, message_id), after, skip)
        except CommandError as exc:
            await self.error(frame.requestId, exc.code, exc.message)
        except (asyncio.CancelledError, WebSocketDisconnect):
            raise
        except Exception:
            log.exception("%s request of %s failed", frame.type, request.session)
            await self.error(frame.requestId, ErrorCode.INTERNAL, "the stream was interrupted; resume it")
        finally:
            if self.requests.get(frame.requestId) is request:
                del self.requests[frame.requestId]

    async def _stream(self, request_id: str, request: _Streaming, chunks: TurnChunks, after: int,
                      skip_through: int) -> None:
        await self.send({"type": "start", "requestId": request_id})
        request.sent_seq = request.start_seq = after  # nothing of the turn sent yet
        request.chunk_seqs = seqs = []
        async for batch in self.aisdk.runtime.store.follow(request.session, after):
            for seq, chunk in chunks.feed(batch):
                if chunk is None:
                    await self.send({"type": "end", "requestId": request_id})
                    return
                sequence = len(seqs)
                seqs.append(seq)
                if sequence > skip_through:
                    await self.send({"type": "chunk", "requestId": request_id, "sequence": sequence,
                                     "chunk": chunk})
                request.sent_seq = seq
        await self.error(request_id, ErrorCode.INTERNAL, "the log ended the stream (the server is stopping); resume it")

    async def abort(self, request_id: str, last_sequence: int | None = None) -> None:
        """The client's ``abort``: stop streaming the request and cancel its
        turn (when the token may), saved as of the last chunk it was sent, or
        as of chunk ``last_sequence`` when the client says which it showed
        (an extension: turnline's ``aisdk-websocket.js`` adds it)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return  # ended already, or never known: nothing to stop
        starting = request.starting
        if starting is not None:
            # A stop right after the send: let the send be decided (cancelling
            # it midway could start a turn nobody stops), then stop its turn.
            await asyncio.wait([starting])
            if request.turn_id is None and not starting.cancelled() and starting.exception() is None:
                request.turn_id, _message_id, request.start_seq = starting.result()
        if request.task is not None:
            request.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await request.task
        if request.turn_id is not None and self.who.can(request.session, "cancel"):
            await self.aisdk.cancel_turn(self.who, request.session, request.turn_id, request.seen_at(last_sequence))

    async def on_close(self) -> None:
        self.closed = True
        dropped = list(self.requests.values())
        self.requests.clear()
        for request in dropped:
            if request.starting is not None:  # a send still being decided goes on; its failure is no one's now
                request.starting.add_done_callback(lambda f: f.cancelled() or f.exception())
            if request.task is not None:
                request.task.cancel()
        for request in dropped:
            if request.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await request.task
            if (self.aisdk.app.config.aisdk_cancel_on_disconnect and request.turn_id is not None
                    and self.who.can(request.session, "cancel")):
                await self.aisdk.cancel_turn(self.who, request.session, request.turn_id, request.sent_seq)
            self.aisdk.disconnects += 1


async def chat_socket_endpoint(aisdk: AiSdk, ws: WebSocket) -> None:
    if not await guard_websocket_origin(ws, aisdk.app.allowed_origins):
        return
    token, subprotocol = _token_of(ws)
    await ws.accept(subprotocol=subprotocol)
    try:
        who = await aisdk.app.principal(ws.headers.get("authorization") or (f"Bearer {token}" if token else None),
                                  ws.query_params.get("token"))
    except CommandError as exc:
        aisdk.runtime.metrics.frame_errors.labels(exc.code).inc()
        await ws.close(code=4401, reason=exc.code)
        return
    conn = ChatSocket(aisdk, ws, who)
    metrics = aisdk.runtime.metrics
    metrics.connections.inc()
    try:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            text = msg.get("text")
            if text is None:  # frames are JSON text; a binary one has no request to fail
                metrics.frame_errors.labels(ErrorCode.BAD_FRAME).inc()
                await ws.close(code=4400, reason=ErrorCode.BAD_FRAME)
                break
            await conn.handle(text)
    except WebSocketDisconnect:
        pass
    finally:
        metrics.connections.dec()
        await conn.on_close()
