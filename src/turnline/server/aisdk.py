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
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..agent.runtime import CommandError
from ..core.fold import MessageFold
from ..core.limits import CANCELS, SENDS
from ..core.session import Session, TurnState
from ..protocol import CancelFilter, ErrorCode, Id, MessageIn, Policy, Seq, encode
from .app import TurnlineApp, _cancel_rights, _require
from .auth import Principal

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
KEEPALIVE = b": keep-alive\n\n"

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


def ui_chunk(chunk: dict[str, Any], message_id: str) -> dict[str, Any] | None:
    """The chunk as the UI message stream carries it, or None when it is not
    part of that protocol. ``start`` always names the turn's assistant message."""
    kind = chunk.get("type")
    if not isinstance(kind, str) or not (kind in UI_CHUNK_TYPES or kind.startswith("data-")):
        return None
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


# ---------------------------------------------------------------- snapshot → seen


_TOOL_RANK = {"input-streaming": 0, "input-available": 1, "output-available": 2, "output-error": 2}


def _json_prefix(a: Any, b: Any) -> bool:
    """Whether ``b`` extends ``a`` as a streamed JSON value grows: strings by
    suffix, objects by keys, arrays by items (the partial tool input)."""
    if a is None:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return b.startswith(a)
    if isinstance(a, dict) and isinstance(b, dict):
        return all(k in b and _json_prefix(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) <= len(b) and all(_json_prefix(x, y) for x, y in zip(a, b))
    return a == b


def _is_tool(part: dict[str, Any]) -> bool:
    kind = part.get("type", "")
    return kind == "dynamic-tool" or kind.startswith("tool-")


def _part_relation(folded: dict[str, Any], shown: dict[str, Any]) -> str:
    """``equal``, ``prefix`` (the client saw more of this part) or ``no``."""
    kind = folded.get("type")
    if not isinstance(shown, dict) or shown.get("type") != kind:
        return "no"
    if kind in ("text", "reasoning"):
        a, b = folded.get("text", ""), shown.get("text")
        if not isinstance(b, str) or not b.startswith(a):
            return "no"
        return "equal" if a == b else "prefix"
    if _is_tool(folded):
        if folded.get("toolCallId") != shown.get("toolCallId"):
            return "no"
        mine, theirs = _TOOL_RANK.get(folded.get("state", "")), _TOOL_RANK.get(shown.get("state", ""))
        if mine is None or theirs is None or mine > theirs:
            return "no"
        if mine < theirs:
            return "prefix"
        if folded["state"] == "input-streaming":
            if folded.get("input") == shown.get("input"):
                return "equal"
            return "prefix" if _json_prefix(folded.get("input"), shown.get("input")) else "no"
        if folded["state"] != shown.get("state"):
            return "no"
        field = {"input-available": "input", "output-available": "output", "output-error": "errorText"}[folded["state"]]
        return "equal" if folded.get(field) == shown.get(field) else "no"
    if kind == "step-start":
        return "equal"
    # data-*, sources, files: what the fold keeps must be what the client shows
    same = all(shown.get(k) == v for k, v in folded.items() if k != "state")
    return "equal" if same else "no"


def _parts_relation(folded: list[dict[str, Any]], shown: list[dict[str, Any]]) -> str:
    if len(folded) > len(shown):
        return "no"
    result = "equal" if len(folded) == len(shown) else "prefix"
    for f, s in zip(folded, shown):
        rel = _part_relation(f, s)
        if rel == "no":
            return "no"
        if rel == "prefix":
            result = "prefix"
    return result


def snapshot_cursor(turn: TurnState, shown: list[dict[str, Any]]) -> tuple[int, bool]:
    """Map what a client showed of a turn (its message's ``parts``) to a ``seen``
    cursor: the last seq at which the fold of the turn's chunks is a prefix of
    ``shown``. Returns it and whether the fold there equals ``shown``.

    The fold at that seq is what ``seen`` persists, so the saved message is the
    client's, whichever of the stop and the end of the turn reached the server
    first. Parts the fold does not know (a newer SDK's) end the match there."""
    fold = MessageFold(turn.message_id)
    best = turn.start_seq
    exact = _parts_relation(fold.parts, shown) == "equal"
    for ev in turn.chunks:
        fold.add(ev.chunk)
        rel = _parts_relation(fold.parts, shown)
        if rel != "no":
            # Not stopping at the first mismatch: a data part replaced by id
            # matches again once the fold reaches the version the client shows.
            best, exact = ev.seq, rel == "equal"
    return best, exact


# ---------------------------------------------------------------- the stream


class TurnStream:
    """The ASGI response streaming one turn as a UI message stream.

    It listens for the client going away even while the turn is quiet (the
    server only notices a dropped connection on ``receive``, never on a send),
    and reports that to ``on_disconnect`` unless the turn had ended."""

    def __init__(self, aisdk: AiSdk, session: str, turn_id: str, message_id: str | None, after: int,
                 on_disconnect: Callable[[TurnStream], Awaitable[None]] | None):
        self.aisdk = aisdk
        self.session = session
        self.turn_id = turn_id
        self.message_id = message_id
        self.after = after
        self.sent_seq = after  # the seq of the last chunk handed to the connection
        self.ended = False
        self._started = False
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _RAW_HEADERS})
        relay = asyncio.ensure_future(self._relay(send))
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            relay.cancel()
            gone.cancel()
            results = await asyncio.gather(relay, gone, return_exceptions=True)
        if isinstance(results[0], Exception):
            log.error("UI message stream of %s failed", self.session, exc_info=results[0])
        if gone.done() and not gone.cancelled() and not self.ended:
            if self.on_disconnect is not None:
                await self.on_disconnect(self)
            self.aisdk.disconnects += 1

    async def _relay(self, send: Any) -> None:
        async for data in self._events():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _events(self) -> AsyncIterator[bytes]:
        # The follow runs in its own task so keep-alive comments go out while
        # the turn is quiet; the bounded queue holds it back for a slow reader.
        queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(maxsize=64)

        async def pump() -> None:
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

        task = asyncio.ensure_future(pump())
        keepalive = self.aisdk.app.config.sse_keepalive_s
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), keepalive)
                except asyncio.TimeoutError:
                    yield KEEPALIVE
                    continue
                if item is None:
                    return
                seq, data = item
                if data is DONE:
                    self.ended = True
                else:
                    self.sent_seq = seq
                yield data
                if data is DONE:
                    return
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _encode(self, batch: list[Any]) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        for rec in batch:
            ev = _event_decoder.decode(rec.data)
            if ev.turn_id != self.turn_id:
                continue
            if ev.type == "turn-start":
                self.message_id = ev.message_id
            elif ev.type == "chunk" and ev.chunk is not None:
                message_id = self.message_id or ""
                chunk = ui_chunk(ev.chunk, message_id)
                if chunk is None:
                    continue
                if not self._started and chunk["type"] != "start":
                    # A turn that failed before writing anything has no start of
                    # its own; the client needs one to name the message.
                    out.append((rec.seq, _sse({"type": "start", "messageId": message_id})))
                self._started = True
                out.append((rec.seq, _sse(chunk)))
            elif ev.type == "turn-end":
                out.append((rec.seq, DONE))
                break
        return out


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + encode(chunk) + b"\n\n"


async def _until_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


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
            who = app._http_principal(request)
            body: ChatRequest = await app._body(request, ChatRequest, limit=app.config.aisdk_max_body_bytes)
            session = body.id
            _require(who, session, "publish")
            messages = body.messages or ([body.message] if body.message is not None else [])
            if not messages:
                raise CommandError(ErrorCode.BAD_FRAME, "the request carries no messages")
            await app.limiter.take(SENDS, who.client_id)
            hub = await self.runtime.hub(session)
            after = hub.state.last_seq
            if body.trigger == "regenerate-message":
                target = body.messageId or messages[-1].id
                outcome, durable = await hub.regenerate(who.client_id, target)
                await durable
                turn_id = outcome.started[0]
            else:
                turn_id, after = await self._submit(hub, who.client_id, messages, body.policy, after)
            turn = hub.state.turns.get(turn_id)
            return self._stream(who, session, turn_id, turn.message_id if turn else None, after)

        return await self.app._guard(request, run)

    async def _submit(self, hub: Any, requester: str, messages: list[UIMessageIn], policy: str | None,
                      after: int) -> tuple[str, int]:
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
        outcome, durable = await hub.send(requester, send, policy=policy, parent_id=parent_id)
        await durable
        if outcome.rejected:
            raise CommandError(outcome.rejected if outcome.rejected == ErrorCode.BUSY else ErrorCode.CONFLICT,
                               f"the session refused the message: {outcome.rejected}")
        return (outcome.started or outcome.queued)[0], after

    def _stream(self, who: Principal, session: str, turn_id: str, message_id: str | None,
                after: int) -> TurnStream:
        async def on_disconnect(stream: TurnStream) -> None:
            if self.app.config.aisdk_cancel_on_disconnect and who.can(session, "cancel"):
                await self._cancel_dropped(who, stream)

        return TurnStream(self, session, turn_id, message_id, after, on_disconnect)

    async def _cancel_dropped(self, who: Principal, stream: TurnStream) -> None:
        """A client went away mid-turn and the server makes that a cancel:
        persisted as of the last chunk handed to its connection."""
        try:
            hub = await self.runtime.hub(stream.session)
            _result, durable = await hub.cancel(who.client_id, CancelFilter(turn_id=stream.turn_id),
                                                stream.sent_seq,
                                                may_cancel_others=who.can(stream.session, "cancel-any"))
            await durable
        except Exception:
            log.exception("cancel on disconnect in %s failed", stream.session)

    # ------------------------------------------------------------ GET /api/chat/{id}/stream

    async def get_stream(self, request: Request) -> Response:
        async def run() -> Any:
            who = self.app._http_principal(request)
            session = self.app._session(request)
            _require(who, session, "subscribe")
            if not await self.runtime.exists(session):
                return Response(status_code=204)
            hub = await self.runtime.hub(session)
            active = list(hub.state.active.values())
            if not active:
                return Response(status_code=204)
            own = [t for t in active if t.owner == who.client_id]
            turn = (own or active)[-1]
            return self._stream(who, session, turn.turn_id, turn.message_id, turn.start_seq)

        return await self.app._guard(request, run)

    # ------------------------------------------------------------ POST /api/chat/{id}/stop

    async def post_stop(self, request: Request) -> Response:
        async def run() -> Response:
            app = self.app
            who = app._http_principal(request)
            session = app._session(request)
            # Before any lookup: a token without rights here learns nothing of
            # the session (not even whether it or a message exists).
            _require(who, session, "cancel")
            body: StopRequest = await app._body(request, StopRequest, limit=app.config.aisdk_max_body_bytes)
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
            others = _cancel_rights(who, session, flt)
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

        return await self.app._guard(request, run)
