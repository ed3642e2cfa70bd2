"""AI SDK ``useChat`` compatibility: the UI message stream protocol v1 over HTTP.

An unmodified ``Chat``/``useChat`` with ``DefaultChatTransport`` (package ``ai``,
majors 5 to 7) pointed at ``/api/chat`` talks to a turnline session:

- ``POST /api/chat``: the chat id is the session id. ``submit-message`` sends the
  request's last user message on the session, ``regenerate-message`` makes a
  regeneration; the response streams that turn's chunks as ``data: {json}``
  events and ends with ``data: [DONE]``.
- ``GET /api/chat/{id}/stream``: 204 when the session has no active turn, else
  the active turn replayed from its ``start`` and followed live.
- ``POST /api/chat/{id}/stop``: cancels, persisting exactly what the client
  showed: its snapshot ``{messageId, parts}`` is mapped to a ``seen`` cursor.

Everything goes through the runtime's session interface (``runtime.hub``,
``hub.send/regenerate/cancel``, ``hub.state``, ``runtime.store.follow``), the
same one the WebSocket uses. See ``docs/ai-sdk.md``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..agent.runtime import CommandError
from ..core.limits import CANCELS, SENDS
from ..core.session import Session, TurnState
from ..protocol import CancelFilter, ErrorCode, Id, MessageIn, Policy, Seq, encode
from .aisdk_snapshot import snapshot_cursor
from .app import TurnlineApp, cancel_rights, require, traceparent_header
from .auth import Principal
from .sse import KEEPALIVE, paced, stream_until_gone

log = logging.getLogger("turnline.server.aisdk")

# The AI SDK's UI_MESSAGE_STREAM_HEADERS, exactly (majors 5 to 7 agree).
UI_MESSAGE_STREAM_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache",
    "connection": "keep-alive",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}
_RAW_HEADERS = [(k.encode(), v.encode()) for k, v in UI_MESSAGE_STREAM_HEADERS.items()]
DONE = b"data: [DONE]\n\n"

# Chunk types of the UI message stream (the union of the ``ai`` majors 5 to 7,
# plus every ``data-*``). Anything else in the log (an agent's private chunk)
# would make the client's schema check fail the whole stream, so it is left out.
UI_CHUNK_TYPES = frozenset({
    "start", "finish", "abort", "error", "message-metadata", "start-step", "finish-step", "reset-step",
    "text-start", "text-delta", "text-end", "reasoning-start", "reasoning-delta", "reasoning-end",
    "tool-input-start", "tool-input-delta", "tool-input-available", "tool-input-error",
    "tool-output-available", "tool-output-error", "tool-output-denied",
    "tool-approval-request", "tool-approval-response",
    "source-url", "source-document", "file", "reasoning-file", "custom", "steering-message",
})
# Fields whose schema is ``unknown``, where null is a value; every other
# optional field must be omitted rather than null, or the client rejects it.
_NULLABLE = frozenset({"input", "output", "data", "messageMetadata", "approvalDescriptor", "inputSchemaInput"})


# The ``ai`` major a client runs, when it says (the header ``x-ai-sdk-major``;
# default: the newest). ai 5 and 6 reject a chunk type they do not know.
NEWEST_MAJOR = 7
SDK_MAJOR_HEADER = "x-ai-sdk-major"


def sdk_major(value: str | None) -> int:
    """The ``ai`` major named by a ``x-ai-sdk-major`` value (5 to 7), else the newest."""
    return int(value) if value in ("5", "6", "7") else NEWEST_MAJOR


def ui_chunk(chunk: dict[str, Any], message_id: str, major: int = NEWEST_MAJOR) -> dict[str, Any] | None:
    """The chunk as the UI message stream carries it, or None when it is not
    part of that protocol. ``start`` always names the turn's assistant message.
    For ai 5 and 6, a ``steering-message`` (ai 7) goes as ``data-steering-message``."""
    kind = chunk.get("type")
    if not isinstance(kind, str) or not (kind in UI_CHUNK_TYPES or kind.startswith("data-")):
        return None
    if kind == "steering-message" and major < 7:
        return {"type": "data-steering-message", "id": str(chunk.get("id")), "data": {"parts": chunk.get("parts")}}
    if any(v is None and k not in _NULLABLE for k, v in chunk.items()):
        chunk = {k: v for k, v in chunk.items() if v is not None or k in _NULLABLE}
    if kind == "start" and chunk.get("messageId") != message_id:
        chunk = {**chunk, "messageId": message_id}
    return chunk


# ---------------------------------------------------------------- request bodies


class UIMessageIn(msgspec.Struct, forbid_unknown_fields=False):
    """A ``UIMessage`` as ``DefaultChatTransport`` sends it."""

    id: Id
    role: Literal["user", "assistant", "system"]
    parts: list[dict[str, Any]]
    metadata: dict[str, Any] | None = None


class ChatRequest(msgspec.Struct, forbid_unknown_fields=False):
    id: Id
    # The whole chat (the transport's default), or only the last message
    # (``prepareSendMessagesRequest`` returning ``{id, message}``).
    messages: list[UIMessageIn] = []
    message: UIMessageIn | None = None
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: Id | None = None
    # Extension, through the transport's ``body`` option: the double-texting policy.
    policy: Policy | None = None


class StopRequest(msgspec.Struct, forbid_unknown_fields=False):
    messageId: Id | None = None
    parts: list[dict[str, Any]] | None = None
    seen: Seq | None = None


class _Event(msgspec.Struct):
    """The fields of a stored event that a UI message stream needs."""

    type: str
    turn_id: str | None = None
    chunk: dict[str, Any] | None = None
    message_id: str | None = None


_event_decoder = msgspec.json.Decoder(_Event)


# ---------------------------------------------------------------- the stream


class TurnChunks:
    """One turn's UI message stream chunks, from the session log's records:
    feed it the records in log order (from before the turn's start), it hands
    back ``(seq, chunk)`` for each chunk to send and ``(seq, None)`` at the
    turn's end. ``/api/chat`` (SSE) and ``/api/chat/ws`` both send these."""

    def __init__(self, turn_id: str, message_id: str | None, major: int = NEWEST_MAJOR):
        self.turn_id = turn_id
        self.message_id = message_id
        self.major = major
        self.ended = False
        self._started = False

    def feed(self, batch: list[Any]) -> list[tuple[int, dict[str, Any] | None]]:
        out: list[tuple[int, dict[str, Any] | None]] = []
        for rec in batch:
            if self.ended:
                break
            ev = _event_decoder.decode(rec.data)
            if ev.turn_id != self.turn_id:
                continue
            if ev.type == "turn-start":
                self.message_id = ev.message_id
            elif ev.type == "chunk" and ev.chunk is not None:
                message_id = self.message_id or ""
                chunk = ui_chunk(ev.chunk, message_id, self.major)
                if chunk is None:
                    continue
                if not self._started and chunk["type"] != "start":
                    # A turn that failed before writing anything has no start of
                    # its own; the client needs one to name the message.
                    out.append((rec.seq, {"type": "start", "messageId": message_id}))
                self._started = True
                out.append((rec.seq, chunk))
            elif ev.type == "turn-end":
                self.ended = True
                out.append((rec.seq, None))
        return out


class TurnStream:
    """The ASGI response streaming one turn as a UI message stream.

    It listens for the client going away even while the turn is quiet (the
    server only notices a dropped connection on ``receive``, never on a send),
    and reports that to ``on_disconnect`` unless the turn had ended."""

    def __init__(self, aisdk: AiSdk, session: str, turn_id: str, message_id: str | None, after: int,
                 on_disconnect: Callable[[TurnStream], Awaitable[None]] | None, major: int = NEWEST_MAJOR):
        self.aisdk = aisdk
        self.session = session
        self.turn_id = turn_id
        self.after = after
        self.sent_seq = after  # the seq of the last chunk handed to the connection
        self.ended = False
        self.chunks = TurnChunks(turn_id, message_id, major)
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        failure, gone = await stream_until_gone(receive, send, _RAW_HEADERS, self._events())
        if failure is not None:
            log.error("UI message stream of %s failed", self.session, exc_info=failure)
        if gone and not self.ended:
            if self.on_disconnect is not None:
                await self.on_disconnect(self)
            self.aisdk.disconnects += 1

    async def _events(self) -> AsyncIterator[bytes]:
        async def pump(queue: asyncio.Queue[Any]) -> None:
            try:
                async for batch in self.aisdk.runtime.store.follow(self.session, self.after):
                    for seq, data in self._encode(batch):
                        await queue.put((seq, data))
                        if data is DONE:
                            return
                await queue.put(None)  # the log ended the follow (a store shutting down)
            except Exception:
                log.exception("follow of %s for a UI message stream failed", self.session)
                text = "the stream was interrupted; resume it (GET /api/chat/{id}/stream)"
                await queue.put((self.sent_seq, _sse({"type": "error", "errorText": text})))
                await queue.put((self.sent_seq, DONE))

        async for item in paced(pump, self.aisdk.app.config.sse_keepalive_s):
            if item is KEEPALIVE:
                yield item
                continue
            seq, data = item
            if data is DONE:
                self.ended = True
            else:
                self.sent_seq = seq
            yield data
            if data is DONE:
                return

    def _encode(self, batch: list[Any]) -> list[tuple[int, bytes]]:
        return [(seq, DONE if chunk is None else _sse(chunk)) for seq, chunk in self.chunks.feed(batch)]


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + encode(chunk) + b"\n\n"


# ---------------------------------------------------------------- routes


class AiSdk:
    """The ``/api/chat`` routes of a :class:`TurnlineApp`."""

    def __init__(self, app: TurnlineApp):
        self.app = app
        self.runtime = app.runtime
        self.disconnects = 0  # streams whose client went away mid-turn (handled)

    def routes(self) -> list[Route]:
        return [
            Route("/api/chat", self.post_chat, methods=["POST"]),
            Route("/api/chat/{session}/stream", self.get_stream, methods=["GET"]),
            Route("/api/chat/{session}/stop", self.post_stop, methods=["POST"]),
        ]

    # ------------------------------------------------------------ POST /api/chat

    async def post_chat(self, request: Request) -> Response:
        async def run() -> Any:
            app = self.app
            who = await app.http_principal(request)
            body: ChatRequest = await app.read_body(request, ChatRequest, limit=app.config.aisdk_max_body_bytes)
            turn_id, message_id, after = await self.start_turn(who, body, traceparent_header(request))
            return self._stream(who, body.id, turn_id, message_id, after, sdk_major(request.headers.get(SDK_MAJOR_HEADER)))

        return await self.app.guarded(request, run)

    async def start_turn(self, who: Principal, body: ChatRequest,
                         traceparent: str | None = None) -> tuple[str, str | None, int]:
        """Do what a chat request asks (a submit or a regeneration) on session
        ``body.id``; returns the turn to stream, its message id (None while it
        is queued) and the log position to follow it from."""
        session = body.id
        require(who, session, "publish")
        messages = body.messages or ([body.message] if body.message is not None else [])
        if not messages:
            raise CommandError(ErrorCode.BAD_FRAME, "the request carries no messages")
        await self.app.limiter.take(SENDS, who.client_id)
        hub = await self.runtime.hub(session)
        after = hub.state.last_seq
        if body.trigger == "regenerate-message":
            target = body.messageId or messages[-1].id
            outcome, durable = await hub.regenerate(who.client_id, target)
            await durable
            turn_id = outcome.started[0]
        else:
            turn_id, after = await self._submit(hub, who.client_id, messages, body.policy, after, traceparent)
        turn = hub.state.turns.get(turn_id)
        return turn_id, turn.message_id if turn else None, after

    async def resumable_turn(self, who: Principal, session: str) -> TurnState | None:
        """The running turn a resume follows: the caller's newest, else the
        session's newest; None when nothing runs (or there is no session)."""
        require(who, session, "subscribe")
        if not await self.runtime.exists(session):
            return None
        hub = await self.runtime.hub(session)
        active = list(hub.state.active.values())
        if not active:
            return None
        own = [t for t in active if t.owner == who.client_id]
        return (own or active)[-1]

    async def _submit(self, hub: Any, requester: str, messages: list[UIMessageIn], policy: str | None,
                      after: int, traceparent: str | None = None) -> tuple[str, int]:
        """Send the last user message; returns the turn to stream and the cursor
        to follow it from."""
        state: Session = hub.state
        last, earlier = messages[-1], messages[:-1]
        if last.role != "user":
            raise CommandError(ErrorCode.CONFLICT, "the last message must be a user message (turnline runs "
                               "tools on the server; continuing an assistant message is not supported)")
        known = state.messages.get(last.id)
        if known is not None and known.parts == last.parts:
            # The same message again (a retry): follow its running turn, or
            # answer it anew.
            running = [t for t in state.active.values() if t.input_id == last.id]
            if running:
                return running[-1].turn_id, running[-1].start_seq
            outcome, durable = await hub.regenerate(requester, last.id)
            await durable
            return outcome.started[0], after
        send: list[MessageIn] = []
        parent_id: str | None = None
        if known is not None:
            # An edit (``sendMessage({text, messageId})``): a new sibling of the
            # edited message. Its id is the server's; the client's is taken.
            if known.parent_id is None:
                raise CommandError(ErrorCode.CONFLICT, "the first message of a session cannot be edited "
                                   "(it would need a second root); start the chat with a system message")
            parent_id = known.parent_id
            send.append(MessageIn(parts=last.parts, role="user", metadata=last.metadata))
        else:
            if state.last_seq == 0 and earlier:
                # A new session and a client with history: user and system
                # messages seed it; an assistant's words are never taken from a client.
                if any(m.role == "assistant" for m in earlier):
                    raise CommandError(ErrorCode.CONFLICT, (
                        f"session {hub.session_id} is empty but the request carries an assistant message; "
                        "turnline keeps the history and does not take the agent's words from a client. "
                        "Start the chat empty, or send only the last message (prepareSendMessagesRequest)"))
                send += [MessageIn(parts=m.parts, id=m.id, role=m.role, metadata=m.metadata)  # type: ignore[arg-type]
                         for m in earlier]
            elif earlier and earlier[-1].id in state.messages:
                parent_id = earlier[-1].id  # the client's branch
            send.append(MessageIn(parts=last.parts, id=last.id, role="user", metadata=last.metadata))
        outcome, durable = await hub.send(requester, send, policy=policy, parent_id=parent_id,
                                          traceparent=traceparent)
        await durable
        if outcome.rejected:
            raise CommandError(outcome.rejected if outcome.rejected == ErrorCode.BUSY else ErrorCode.CONFLICT,
                               f"the session refused the message: {outcome.rejected}")
        return (outcome.started or outcome.queued)[0], after

    def _stream(self, who: Principal, session: str, turn_id: str, message_id: str | None,
                after: int, major: int) -> TurnStream:
        async def on_disconnect(stream: TurnStream) -> None:
            if self.app.config.aisdk_cancel_on_disconnect and who.can(session, "cancel"):
                await self.cancel_turn(who, stream.session, stream.turn_id, stream.sent_seq)

        return TurnStream(self, session, turn_id, message_id, after, on_disconnect, major)

    async def cancel_turn(self, who: Principal, session: str, turn_id: str, seen: int | None) -> None:
        """Cancel one turn for a client that stopped following it (a dropped
        fetch, a WebSocket ``abort``), persisted as of ``seen``: the last chunk
        handed to its connection. Failures are logged, not raised."""
        try:
            hub = await self.runtime.hub(session)
            _result, durable = await hub.cancel(who.client_id, CancelFilter(turn_id=turn_id), seen,
                                                may_cancel_others=who.can(session, "cancel-any"))
            await durable
        except Exception:
            log.exception("cancel of %s in %s failed", turn_id, session)

    # ------------------------------------------------------------ GET /api/chat/{id}/stream

    async def get_stream(self, request: Request) -> Response:
        async def run() -> Any:
            who = await self.app.http_principal(request)
            session = self.app.session_param(request)
            turn = await self.resumable_turn(who, session)
            if turn is None:
                return Response(status_code=204)
            return self._stream(who, session, turn.turn_id, turn.message_id, turn.start_seq,
                                sdk_major(request.headers.get(SDK_MAJOR_HEADER)))

        return await self.app.guarded(request, run)

    # ------------------------------------------------------------ POST /api/chat/{id}/stop

    async def post_stop(self, request: Request) -> Response:
        async def run() -> Response:
            app = self.app
            who = await app.http_principal(request)
            session = app.session_param(request)
            # Before any lookup: a token without rights here learns nothing of
            # the session (not even whether it or a message exists).
            require(who, session, "cancel")
            body: StopRequest = await app.read_body(request, StopRequest, limit=app.config.aisdk_max_body_bytes)
            if body.parts is not None and body.messageId is None:
                raise CommandError(ErrorCode.BAD_FRAME, "a snapshot names its message: {messageId, parts}")
            if body.parts is not None and body.seen is not None:
                raise CommandError(ErrorCode.BAD_FRAME, "send the snapshot (parts) or a seen cursor, not both")
            hub = await app.existing_hub(session)
            state: Session = hub.state
            turn_id = None
            if body.messageId is not None:
                turn_id = state.turn_of_message.get(body.messageId)
                if turn_id is None:
                    raise CommandError(ErrorCode.NOT_FOUND, f"no assistant message {body.messageId} in {session}")
            seen, exact = body.seen, None
            if body.parts is not None and turn_id is not None:
                seen, exact = snapshot_cursor(state.turns[turn_id], body.parts)
            flt = CancelFilter(turn_id=turn_id) if turn_id is not None else CancelFilter(own=True)
            others = cancel_rights(who, session, flt)
            await app.limiter.take(CANCELS, who.client_id)
            result, durable = await hub.cancel(who.client_id, flt, seen, may_cancel_others=others)
            await durable
            payload: dict[str, Any] = {"request_id": result.request_id, "cancelled": result.cancelled,
                                       "rejected": result.rejected, "pending": result.pending}
            if seen is not None:
                payload["seen"] = seen
            if exact is not None:
                payload["exact"] = exact
            return JSONResponse(payload)

        return await self.app.guarded(request, run)
