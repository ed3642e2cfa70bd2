"""AG-UI over HTTP: a turnline session as an AG-UI agent (``@ag-ui/client``'s
``HttpAgent``, CopilotKit).

- ``POST /ag-ui``: a ``RunAgentInput``. The thread id is the session id; the
  input's last message, a user message, is sent on the session under its
  policy, and the response streams that turn as one AG-UI run over SSE.
- ``GET /ag-ui/{threadId}/stream``: re-attach. With ``Last-Event-ID`` (or
  ``?after=``) the run resumes after that event, nothing lost or repeated;
  without one, the client's running turn from its start; 204 when there is none.
- ``POST /ag-ui/{threadId}/cancel``: cancels the run (``{runId, seen}``).

Every event carries its SSE ``id`` (turnline's seq; see agui_events). A
dropped stream cancels nothing unless the request opted in with
``?cancel_on_disconnect=1``. The translation lives in :mod:`.agui_events`;
this module is the thin loop around it. See ``docs/ag-ui.md``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, AsyncIterator

import msgspec
from prometheus_client import Counter, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..agent.runtime import CommandError
from ..core.limits import CANCELS, SENDS
from ..core.session import Session, TurnState
from ..protocol import POLICIES, CancelFilter, ErrorCode, MessageIn, encode, is_valid_id
from .agui_events import Delivered, RunTranslator, event_ids, parse_cursor
from .app import TurnlineApp, cancel_rights, require
from .auth import Principal
from .sse import KEEPALIVE, paced, stream_until_gone

log = logging.getLogger("turnline.server.agui")

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"connection", b"keep-alive"), (b"x-accel-buffering", b"no")]
_TRUE = ("1", "true")


# ---------------------------------------------------------------- request bodies


class RunAgentInput(msgspec.Struct, forbid_unknown_fields=False):
    """The fields of AG-UI's ``RunAgentInput`` the server reads. ``state``,
    ``tools`` and ``context`` are accepted and not used: the agent and its
    tools run on the server."""

    threadId: str
    runId: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    messages: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=10_000)]
    forwardedProps: Any = None


class CancelInput(msgspec.Struct, forbid_unknown_fields=False):
    runId: str | None = None
    # the last event id the client rendered (its SSE id, or a seq)
    seen: int | str | None = None


_log_event = msgspec.json.Decoder()


def user_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An AG-UI user message's content as UI message parts: text parts, and
    media given by URL or inline data as ``file`` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise CommandError(ErrorCode.BAD_FRAME, "a user message's content is a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            continue
        source = part.get("source") if isinstance(part, dict) else None
        if kind in ("image", "audio", "video", "document") and isinstance(source, dict):
            mime = source.get("mimeType") or {"image": "image/*", "audio": "audio/*", "video": "video/*"}.get(
                kind, "application/octet-stream")
            value = source.get("value")
            if source.get("type") == "url" and isinstance(value, str):
                parts.append({"type": "file", "mediaType": mime, "url": value})
                continue
            if source.get("type") == "data" and isinstance(value, str):
                parts.append({"type": "file", "mediaType": mime, "url": f"data:{mime};base64,{value}"})
                continue
        raise CommandError(ErrorCode.BAD_FRAME, f"unsupported content part {kind!r} (text, and media by url "
                           "or data, are supported; a provider file handle is not)")
    return parts


# ---------------------------------------------------------------- the stream


class RunStream:
    """The ASGI response streaming one turn as an AG-UI run.

    It follows the session's log from ``after`` and feeds each event to a
    :class:`RunTranslator`. Resuming (``cursor``), the events up to the cursor
    only rebuild what the client holds; the stream then opens with what
    :class:`Delivered` says is open and goes on from the cursor."""

    def __init__(self, agui: AgUi, who: Principal, session: str, translator: RunTranslator, after: int,
                 cursor: tuple[int, int | None] | None, cancel_on_disconnect: bool):
        self.agui = agui
        self.who = who
        self.session = session
        self.translator = translator
        self.after = after
        self.cursor = cursor
        self.cancel_on_disconnect = cancel_on_disconnect
        self.sent_seq = after if cursor is None else cursor[0]
        self.ended = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.agui.open_streams.inc()
        try:
            failure, gone = await stream_until_gone(receive, send, SSE_HEADERS, self._frames())
        finally:
            self.agui.open_streams.dec()
        if failure is not None:
            log.error("AG-UI stream of %s failed", self.session, exc_info=failure)
        if gone and not self.ended:
            cancel = self.cancel_on_disconnect and self.who.can(self.session, "cancel")
            if cancel:
                await self.agui.cancel_dropped(self)
            self.agui.dropped.labels("true" if cancel else "false").inc()
            self.agui.disconnects += 1

    async def _frames(self) -> AsyncIterator[bytes]:
        delivered = Delivered() if self.cursor is not None else None

        async def pump(queue: asyncio.Queue[Any]) -> None:
            nonlocal delivered
            try:
                async for batch in self.agui.runtime.store.follow(self.session, self.after):
                    for rec in batch:
                        events = self.translator.feed(_log_event.decode(rec.data), rec.seq)
                        ids = event_ids(rec.seq, len(events))
                        if delivered is not None:
                            # Resuming: until the cursor, only note what the client holds.
                            seq, index = self.cursor  # type: ignore[misc]
                            if rec.seq < seq or (rec.seq == seq and index is None):
                                delivered.see(events)
                                events = []
                            elif rec.seq == seq:
                                delivered.see(events[:index + 1])
                                events, ids = events[index + 1:], ids[index + 1:]
                            if rec.seq >= seq:
                                prelude = delivered.reopen()
                                if delivered.run_ended and not events:
                                    await queue.put(None)
                                    return
                                delivered = None
                                if prelude:
                                    await queue.put((rec.seq, b"".join(_frame(None, ev) for ev in prelude)))
                        if events:
                            await queue.put((rec.seq, b"".join(_frame(i, ev) for i, ev in zip(ids, events))))
                        if self.translator.ended and delivered is None:
                            await queue.put(None)
                            return
                await queue.put(None)  # the log ended the follow (a store shutting down)
            except Exception:
                log.exception("follow of %s for an AG-UI stream failed", self.session)
                error = {"type": "RUN_ERROR", "code": "stream_interrupted",
                         "message": "the stream was interrupted; resume it (GET /ag-ui/{threadId}/stream "
                                    "with Last-Event-ID)"}
                await queue.put((self.sent_seq, _frame(None, error)))
                await queue.put(None)

        async for item in paced(pump, self.agui.app.config.sse_keepalive_s):
            if item is KEEPALIVE:
                yield item
                continue
            seq, data = item
            yield data
            self.sent_seq = seq
        self.ended = self.translator.ended or self.ended


def _frame(event_id: str | None, event: dict[str, Any]) -> bytes:
    head = b"id: " + event_id.encode() + b"\n" if event_id is not None else b""
    return head + b"data: " + encode(event) + b"\n\n"


# ---------------------------------------------------------------- routes


class AgUi:
    """The ``/ag-ui`` routes of a :class:`TurnlineApp`."""

    def __init__(self, app: TurnlineApp):
        self.app = app
        self.runtime = app.runtime
        self.disconnects = 0  # streams whose client went away mid-run (handled)
        registry = app.runtime.metrics.registry
        self.open_streams = Gauge("turnline_agui_streams", "Open AG-UI run streams", registry=registry)
        self.dropped = Counter("turnline_agui_dropped_streams", "AG-UI streams whose client went away mid-run, "
                               "by whether that cancelled the run", ["cancelled"], registry=registry)

    def routes(self) -> list[Route]:
        return [
            Route("/ag-ui", self.post_run, methods=["POST"]),
            Route("/ag-ui/{session}/stream", self.get_stream, methods=["GET"]),
            Route("/ag-ui/{session}/cancel", self.post_cancel, methods=["POST"]),
        ]

    # ------------------------------------------------------------ POST /ag-ui

    async def post_run(self, request: Request) -> Response:
        async def run() -> Any:
            app = self.app
            who = await app.http_principal(request)
            body: RunAgentInput = await app.read_body(request, RunAgentInput, limit=app.config.aisdk_max_body_bytes)
            session = body.threadId
            if not is_valid_id(session):
                raise CommandError(ErrorCode.BAD_ID, f"invalid threadId {session!r} (it is the session id)")
            require(who, session, "publish")
            if not body.messages or body.messages[-1].get("role") != "user":
                raise CommandError(ErrorCode.CONFLICT, "the last message must be a user message (turnline runs "
                                   "the agent and its tools on the server, and keeps the history)")
            last = body.messages[-1]
            message_id = last.get("id")
            if not is_valid_id(message_id):
                raise CommandError(ErrorCode.BAD_ID, f"invalid message id {message_id!r}")
            policy = None
            props = body.forwardedProps
            if isinstance(props, dict) and props.get("policy") is not None:
                policy = props["policy"]
                if policy not in POLICIES:
                    raise CommandError(ErrorCode.BAD_FRAME, f"policy must be one of {', '.join(POLICIES)}")
            await app.limiter.take(SENDS, who.client_id)
            hub = await self.runtime.hub(session)
            state: Session = hub.state
            after = state.last_seq
            if message_id in state.messages or message_id in state.queued_message_ids:
                # The same message again (a retry): follow its turn if it runs.
                running = [t for t in state.active.values() if t.input_id == message_id]
                if not running:
                    raise CommandError(ErrorCode.CONFLICT, f"message {message_id} was already answered; "
                                       "send a new message (a new id)")
                turn_id, after = running[-1].turn_id, running[-1].start_seq - 1
            else:
                turn_id = body.runId if is_valid_id(body.runId) else None
                if turn_id is not None and turn_id in state.turns:
                    raise CommandError(ErrorCode.CONFLICT, f"run {turn_id} already exists in {session}")
                msg = MessageIn(parts=user_parts(last), id=message_id, role="user")
                outcome, durable = await hub.send(who.client_id, [msg], policy=policy, turn_id=turn_id)
                await durable
                if outcome.rejected:
                    code = outcome.rejected if outcome.rejected == ErrorCode.BUSY else ErrorCode.CONFLICT
                    raise CommandError(code, f"the session refused the message: {outcome.rejected}")
                turn_id = (outcome.started or outcome.queued)[0]
            translator = RunTranslator(session, turn_id, body.runId)
            return RunStream(self, who, session, translator, after, None, _opted_in(request))

        return await self.app.guarded(request, run)

    # ------------------------------------------------------------ GET /ag-ui/{threadId}/stream

    async def get_stream(self, request: Request) -> Response:
        async def run() -> Any:
            app = self.app
            who = await app.http_principal(request)
            session = app.session_param(request)
            require(who, session, "subscribe")
            raw = request.headers.get("last-event-id") or request.query_params.get("after")
            cursor = None
            if raw is not None:
                try:
                    cursor = parse_cursor(raw)
                except ValueError:
                    raise CommandError(ErrorCode.BAD_FRAME, f"Last-Event-ID must be an event id of this "
                                       f"stream (N or N.k), got {raw!r}") from None
            if not await self.runtime.exists(session):
                return Response(status_code=204)
            hub = await self.runtime.hub(session)
            state: Session = hub.state
            if cursor is not None and cursor[0] > state.last_seq:
                raise CommandError(ErrorCode.BAD_FRAME, f"Last-Event-ID {raw} is past the end of {session}")
            turn = self._turn_to_follow(state, who, cursor, request.query_params.get("runId"))
            if turn is None:
                return Response(status_code=204)
            translator = RunTranslator(session, turn.turn_id)
            if turn.cancel is not None and turn.cancel.seen is not None:
                translator.cut = turn.cancel.seen  # the chunks past it are not what is saved
            if turn.revised and turn.reason is not None:
                translator.revised_reason = turn.reason
            return RunStream(self, who, session, translator, turn.start_seq - 1, cursor, _opted_in(request))

        return await self.app.guarded(request, run)

    @staticmethod
    def _turn_to_follow(state: Session, who: Principal, cursor: tuple[int, int | None] | None,
                        run_id: str | None) -> TurnState | None:
        """The run a re-attaching client follows: the one it names, else one
        the cursor falls in (not one it saw end), the requester's own first."""
        if run_id is not None:
            return state.turns.get(run_id)
        if cursor is None:
            turns = list(state.active.values())
        else:
            seq, index = cursor
            turns = [t for t in state.turns.values() if t.start_seq <= seq and (
                t.end_seq is None or seq < t.end_seq or (seq == t.end_seq and index is not None))]
        own = [t for t in turns if t.owner == who.client_id]
        return (own or turns)[-1] if turns else None

    # ------------------------------------------------------------ POST /ag-ui/{threadId}/cancel

    async def post_cancel(self, request: Request) -> Response:
        async def run() -> Response:
            app = self.app
            who = await app.http_principal(request)
            session = app.session_param(request)
            require(who, session, "cancel")  # before any lookup: no rights, nothing learned
            body: CancelInput = await app.read_body(request, CancelInput)
            seen = None
            if body.seen is not None:
                try:
                    seq, index = parse_cursor(str(body.seen))
                except ValueError:
                    raise CommandError(ErrorCode.BAD_FRAME, f"seen must be an event id (N or N.k), "
                                       f"got {body.seen!r}") from None
                # N.k: only part of what seq N made was rendered; N itself was not whole.
                seen = seq if index is None else seq - 1
            await app.limiter.take(CANCELS, who.client_id)
            hub = await app.existing_hub(session)
            if body.runId is not None:
                state = hub.state
                if body.runId not in state.turns and all(q.turn_id != body.runId for q in state.queue):
                    raise CommandError(ErrorCode.NOT_FOUND, f"no run {body.runId} in {session}")
                flt = CancelFilter(turn_id=body.runId)
            else:
                flt = CancelFilter(own=True)
            others = cancel_rights(who, session, flt)
            result, durable = await hub.cancel(who.client_id, flt, seen, may_cancel_others=others)
            await durable
            payload: dict[str, Any] = {"request_id": result.request_id, "cancelled": result.cancelled,
                                       "rejected": result.rejected, "pending": result.pending}
            if seen is not None:
                payload["seen"] = seen
            return JSONResponse(payload)

        return await self.app.guarded(request, run)

    async def cancel_dropped(self, stream: RunStream) -> None:
        """A client that opted in went away mid-run: a cancel, persisted as of
        the last event handed to its connection."""
        try:
            hub = await self.runtime.hub(stream.session)
            flt = CancelFilter(turn_id=stream.translator.turn_id)
            _result, durable = await hub.cancel(stream.who.client_id, flt, stream.sent_seq,
                                                may_cancel_others=stream.who.can(stream.session, "cancel-any"))
            await durable
        except Exception:
            log.exception("cancel on disconnect in %s failed", stream.session)


def _opted_in(request: Request) -> bool:
    return request.query_params.get("cancel_on_disconnect") in _TRUE
