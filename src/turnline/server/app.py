"""The ASGI app: WebSocket and HTTP faces of the runtime, with auth and metrics.

This layer translates frames and requests into runtime commands and answers
each with an ``ack`` or an ``error`` carrying a stable code. It decides nothing
about sessions itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Sequence

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..agent.runtime import CommandError, Runtime
from ..agent.tracing import TRACEPARENT_MAX
from ..core.limits import CANCELS, SENDS, retry_after_header
from ..protocol import (
    SEQ_MAX, Cancel, CancelFilter, ErrorCode, FrameError, Id, MessageIn, Ping, Played, Policy, Seq,
    Regenerate, Send, Subscribe, Unsubscribe, ack_frame, decode_frame, pong_frame, encode, error_frame,
    event_frame, events_frame, is_valid_id, MAX_NESTING, nesting_exceeds, VOICE_FRAMES,
)
from ..store.base import Record
from .auth import AuthError, KeysUnavailable, KeyVerifier, Principal, Verifier, mint
from .guards import cors_middleware, dev_token_refusal, guard_websocket_origin, normalize_origin
from .limits import check_subscriptions, limiter_for
from .sse import KEEPALIVE, paced

log = logging.getLogger("turnline.server")

FRAME_EVENTS = 256  # events per batched frame during a catch-up
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
# Module scripts need a JavaScript type whatever the OS mime table says;
# no-cache revalidates by ETag, so an upgraded page is never half stale.
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".html": "text/html; charset=utf-8"}
_STATIC_HEADERS = {"cache-control": "no-cache"}

HTTP_STATUS = {
    ErrorCode.BAD_JSON: 400, ErrorCode.BAD_FRAME: 400, ErrorCode.BAD_ID: 400, ErrorCode.UNKNOWN_OP: 400,
    ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409, ErrorCode.BUSY: 409, ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429, ErrorCode.INTERNAL: 500,
}


@dataclass
class ServerConfig:
    secret: str | None = None  # HS256; with no verifier, the one tokens are checked against
    dev: bool = False  # serve /v1/dev/token (to direct loopback clients only; needs secret)
    verifier: Verifier | None = None  # how tokens are checked (turnline.server.auth, .jwks)
    cors_origins: Sequence[str] = ()  # cross-origin pages allowed on HTTP routes and WebSockets
    max_frame_bytes: int = 256 * 1024
    # A connection whose unsent frames pile up past this is closed; the client
    # reconnects and resumes from its cursor instead of the server buffering.
    max_pending_frames: int = 20_000
    dev_token_ttl_s: int = 900
    sse_keepalive_s: float = 15.0
    # AI SDK routes (/api/chat): a dropped fetch cancels its turn only when
    # set; the transport sends the whole chat each time, hence a larger body.
    aisdk_cancel_on_disconnect: bool = False
    aisdk_max_body_bytes: int = 4 * 1024 * 1024
    extra: dict[str, Any] = field(default_factory=dict)


class _Binary(bytes):
    """A frame the writer sends as a binary WebSocket message (voice audio)."""


class HttpBody(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    # The same shape and limits as the WebSocket ``send`` frame.
    messages: Annotated[list[MessageIn], msgspec.Meta(max_length=64)]
    policy: Policy | None = None
    parent_id: Id | None = None
    steer: Id | None = None
    seen: Seq | None = None


class CancelBody(msgspec.Struct, omit_defaults=True):
    filter: CancelFilter | None = None
    seen: Seq | None = None


def traceparent_header(request: Request) -> str | None:
    """The request's W3C ``traceparent`` header (an over-long one is dropped unread)."""
    value = request.headers.get("traceparent")
    return value if value and len(value) <= TRACEPARENT_MAX else None


async def _principal(verifier: Verifier, auth_header: str | None, query_token: str | None) -> Principal:
    token = None
    if auth_header and auth_header.lower().startswith("bearer "):
        token = auth_header[7:].strip()
    token = token or query_token
    if not token:
        raise CommandError(ErrorCode.UNAUTHORIZED, "no token: send 'Authorization: Bearer TOKEN' or ?token=")
    try:
        return await verifier.verify(token)
    except AuthError as exc:
        raise CommandError(ErrorCode.UNAUTHORIZED, str(exc)) from None
    except KeysUnavailable as exc:  # the provider's fault, not the token's: the client retries
        raise CommandError(ErrorCode.INTERNAL, str(exc)) from None


def _require(principal: Principal, session: str, action: str) -> None:
    if not principal.can(session, action):
        raise CommandError(ErrorCode.FORBIDDEN, f"token of {principal.client_id!r} may not {action} on {session!r}")


def _cancel_rights(principal: Principal, session: str, flt: CancelFilter) -> bool:
    """Checks the capability for the filter's scope; returns whether the
    requester may cancel turns owned by others."""
    _require(principal, session, "cancel")
    others = principal.can(session, "cancel-any")
    broad = flt.all or (flt.client_id is not None and flt.client_id != principal.client_id)
    if broad and not others:
        raise CommandError(ErrorCode.FORBIDDEN, "cancelling other clients' turns needs the cancel-any capability")
    return others


def _normalized_filter(flt: CancelFilter | None) -> CancelFilter:
    try:
        return (flt or CancelFilter(own=True)).normalized()
    except ValueError as exc:
        raise CommandError(ErrorCode.BAD_FRAME, str(exc)) from None


class Connection:
    """One WebSocket: a reader dispatching frames and one writer draining frames."""

    def __init__(self, app: TurnlineApp, ws: WebSocket, principal: Principal, cancel_on_disconnect: bool):
        self.app = app
        self.ws = ws
        self.principal = principal
        self.cancel_on_disconnect = cancel_on_disconnect
        self.out: deque[bytes] = deque()
        self._wake_writer: asyncio.Future[None] | None = None
        self.subs: dict[str, asyncio.Task[None]] = {}
        self.touched: set[str] = set()
        self.closed = False
        self.overrun = False

    def push_binary(self, frame: bytes) -> None:
        self.push(_Binary(frame))

    def push(self, frame: bytes) -> None:
        if self.closed:
            return
        if len(self.out) >= self.app.config.max_pending_frames:
            self.closed = self.overrun = True
        else:
            self.out.append(frame)
        wake = self._wake_writer
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def writer(self) -> None:
        # The raw ASGI send: Starlette's wrapper re-checks the state on every frame.
        send = self.ws._send
        out = self.out
        loop = asyncio.get_running_loop()
        while True:
            while out:
                frame = out.popleft()
                if type(frame) is _Binary:
                    await send({"type": "websocket.send", "bytes": frame})
                else:
                    await send({"type": "websocket.send", "text": frame.decode()})
            if self.overrun:
                with contextlib.suppress(Exception):
                    await self.ws.close(code=1013, reason="too far behind; resume from your last seq")
                return
            if self.closed:
                return
            self._wake_writer = loop.create_future()
            await self._wake_writer
            self._wake_writer = None

    async def follow(self, session: str, after: int) -> None:
        push = self.push

        def sink(batch: Sequence[Record]) -> None:
            if len(batch) == 1:
                push(event_frame(session, batch[0].data))
            else:
                for i in range(0, len(batch), FRAME_EVENTS):
                    push(events_frame(session, [r.data for r in batch[i:i + FRAME_EVENTS]]))

        try:
            await self.app.runtime.store.follow_into(session, after, sink)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("follow of %s failed", session)
            self.push(error_frame(None, ErrorCode.INTERNAL, f"subscription to {session} failed; resubscribe",
                                  session=session))
            self.subs.pop(session, None)

    async def handle(self, raw: str | bytes) -> None:
        """Decide on one frame. Frames are decided in arrival order; only the
        wait until the decision is durable (then the ack) runs in the background."""
        frame_id = None
        # The size limit is on bytes, as the client counts them: a text frame
        # of 2,000 three-byte characters is 6,000 bytes, not 2,000.
        data = raw.encode() if isinstance(raw, str) else raw
        try:
            frame = decode_frame(data, self.app.config.max_frame_bytes)
            frame_id = frame.id
            durable, reply = await self.dispatch(frame)
        except FrameError as exc:
            if exc.code == ErrorCode.TOO_LARGE and exc.frame_id is None:
                # Still answer the frame by its id, or a client awaiting that
                # reply waits forever. Skipping to ``id`` costs one fast scan.
                exc.frame_id = _frame_id_of(data)
            self.error(exc.frame_id, exc.code, exc.message)
            return
        except CommandError as exc:
            self.error(frame_id, exc.code, exc.message, **exc.details)
            return
        except Exception as exc:  # a bug must not take the connection down
            log.exception("frame failed")
            self.error(frame_id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")
            return
        if durable is None:
            self.push(reply)
        else:
            asyncio.ensure_future(self._ack_when_durable(durable, frame_id, reply))

    async def _ack_when_durable(self, durable: asyncio.Future[None], frame_id: Any, reply: bytes) -> None:
        try:
            await durable
        except CommandError as exc:
            self.error(frame_id, exc.code, exc.message)
            return
        self.push(reply)

    def error(self, frame_id: Any, code: str, message: str, **fields: Any) -> None:
        self.app.count_error(code, fields)
        self.push(error_frame(frame_id, code, message, **fields))

    async def handle_binary(self, data: bytes) -> None:
        """A binary frame (voice audio) goes to the voice pipeline, if one is installed."""
        voice = self.app.voice
        if voice is None:
            self.error(None, ErrorCode.BAD_FRAME, "binary frames carry voice audio, which this server "
                       "does not run; send JSON text frames")
            return
        if len(data) > self.app.config.max_frame_bytes:
            self.error(None, ErrorCode.TOO_LARGE, f"frame is {len(data)} bytes; the limit is "
                       f"{self.app.config.max_frame_bytes}")
            return
        try:
            await voice.audio(self, data)
        except (FrameError, CommandError) as exc:
            session = getattr(exc, "session", None)
            self.error(None, exc.code, exc.message, **getattr(exc, "details", {}),
                       **({"session": session} if session else {}))
        except Exception as exc:  # a bug must not take the connection down
            log.exception("binary frame failed")
            self.error(None, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")

    async def dispatch(self, frame: Any) -> tuple[asyncio.Future[None] | None, bytes]:
        app = self.app
        runtime = app.runtime
        who = self.principal
        if isinstance(frame, Ping):
            return None, pong_frame(frame.id)
        if isinstance(frame, Subscribe):
            _require(who, frame.session, "subscribe")
            if frame.session not in self.subs:
                check_subscriptions(len(self.subs), app.limiter.config.max_subscriptions)
            old = self.subs.pop(frame.session, None)
            if old is not None:
                old.cancel()
            hub = await runtime.hub(frame.session)  # loads the session, recovering orphaned turns
            after = frame.after if frame.after is not None else hub.state.last_seq
            self.subs[frame.session] = asyncio.ensure_future(self.follow(frame.session, after))
            # A client that opted in to cancel-on-disconnect and follows a
            # session (e.g. after reconnecting to watch its running turn) has
            # its own turns there cancelled when this socket closes.
            self.touched.add(frame.session)
            return None, ack_frame(frame.id, session=frame.session, after=after, last_seq=hub.state.last_seq)
        if isinstance(frame, Unsubscribe):
            task = self.subs.pop(frame.session, None)
            if task is None:
                raise CommandError(ErrorCode.NOT_FOUND, f"not subscribed to {frame.session}")
            task.cancel()
            return None, ack_frame(frame.id, session=frame.session)
        if isinstance(frame, Send):
            _require(who, frame.session, "publish")
            hub = await app.limiter.take_then(SENDS, who.client_id, runtime.hub(frame.session))
            outcome, durable = await hub.send(who.client_id, frame.messages, policy=frame.policy,
                                              parent_id=frame.parent_id, steer=frame.steer, seen=frame.seen,
                                              traceparent=frame.traceparent)
            self.touched.add(frame.session)
            return durable, ack_frame(frame.id, session=frame.session, **outcome.as_dict())
        if isinstance(frame, Cancel):
            flt = _normalized_filter(frame.filter)
            others = _cancel_rights(who, frame.session, flt)
            await app.limiter.take(CANCELS, who.client_id)
            hub = await app.existing_hub(frame.session)
            result, durable = await hub.cancel(who.client_id, flt, frame.seen, may_cancel_others=others)
            return durable, ack_frame(frame.id, session=frame.session, request_id=result.request_id,
                                      cancelled=result.cancelled, rejected=result.rejected, pending=result.pending)
        if isinstance(frame, Regenerate):
            _require(who, frame.session, "publish")
            await app.limiter.take(SENDS, who.client_id)
            hub = await app.existing_hub(frame.session)
            outcome, durable = await hub.regenerate(who.client_id, frame.message_id)
            self.touched.add(frame.session)
            return durable, ack_frame(frame.id, session=frame.session, **outcome.as_dict())
        if isinstance(frame, VOICE_FRAMES):
            if app.voice is not None:  # installed by turnline.voice (a layer above this one)
                return await app.voice.frame(self, frame)
            if isinstance(frame, Played):
                _require(who, frame.session, "publish")
                hub = await app.existing_hub(frame.session)
                if frame.turn_id not in hub.state.turns:
                    raise CommandError(ErrorCode.NOT_FOUND, f"no turn {frame.turn_id}")
            raise CommandError(ErrorCode.CONFLICT, "this server has no voice pipeline (turnline serve --voice)")
        raise CommandError(ErrorCode.UNKNOWN_OP, "unknown op")

    async def on_close(self) -> None:
        for task in self.subs.values():
            task.cancel()
        self.subs.clear()
        if self.app.voice is not None:
            try:
                await self.app.voice.closed(self)
            except Exception:
                log.exception("closing voice on a dropped connection failed")
        if self.cancel_on_disconnect:
            for session in self.touched:
                hub = self.app.runtime.loaded(session)
                if hub is not None and self.principal.can(session, "cancel"):
                    try:
                        _result, durable = await hub.cancel(self.principal.client_id, CancelFilter(own=True))
                    except Exception:
                        log.exception("cancel-on-disconnect in %s failed", session)
                        continue
                    # Nobody awaits it; retrieve a store failure so it is not reported as lost.
                    durable.add_done_callback(_consume)


def route_path(scope: Any) -> str:
    """The path inside this app: mounted under a prefix (Starlette's ``Mount``,
    ``--root-path``) the ASGI path still starts with the ``root_path``."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):] or "/"
    return path


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("cancel-on-disconnect was not stored: %s", fut.exception())


class _FrameId(msgspec.Struct):
    id: str | int | None = None


_frame_id_decoder = msgspec.json.Decoder(_FrameId)


def _frame_id_of(data: bytes) -> str | int | None:
    try:
        return _frame_id_decoder.decode(data).id
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None


class TurnlineApp:
    def __init__(self, runtime: Runtime, config: ServerConfig):
        self.runtime = runtime
        self.config = config
        # The voice pipeline's hook (binary frames, voice ops, closes), set by
        # turnline.voice.install_voice; voice sits above this layer.
        self.voice: Any = None
        if config.verifier is None and not config.secret:
            raise ValueError("ServerConfig needs a secret or a verifier")
        if config.dev and not config.secret:
            raise ValueError("dev mode mints tokens, so it needs the secret")
        self.verifier: Verifier = config.verifier or KeyVerifier.from_secret(config.secret or "")
        self.allowed_origins = frozenset(map(normalize_origin, config.cors_origins))
        self._lifespan_entered = False
        # Sends, cancels and connections per client (turnline.server.limits; docs/limits.md).
        self.limiter = limiter_for(runtime)
        routes = [
            WebSocketRoute("/v1/ws", self.ws_endpoint),  # under a root_path (__call__ takes the plain path)
            Route("/v1/sessions/{session}/messages", self.post_messages, methods=["POST"]),
            Route("/v1/sessions/{session}/messages", self.get_messages, methods=["GET"]),
            Route("/v1/sessions/{session}/cancel", self.post_cancel, methods=["POST"]),
            Route("/v1/sessions/{session}/events", self.get_events, methods=["GET"]),
            Route("/v1/sessions/{session}/tree", self.get_tree, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        from .aisdk import AiSdk  # imported here: it builds on this module's helpers

        self.aisdk = AiSdk(self)
        routes += self.aisdk.routes()
        from .aisdk_ws import PATH as AISDK_WS_PATH, chat_socket_endpoint

        async def aisdk_ws(ws: WebSocket) -> None:
            await chat_socket_endpoint(self.aisdk, ws)

        routes.append(WebSocketRoute(AISDK_WS_PATH, aisdk_ws))

        from .agui import AgUi

        self.agui = AgUi(self)
        routes += self.agui.routes()
        if config.dev:
            routes.append(Route("/v1/dev/token", self.dev_token, methods=["POST", "GET"]))
        if (WEB_DIR / "index.html").exists():
            routes.append(Route("/", self.index, methods=["GET"]))
            routes.append(Route("/{name:path}", self.static, methods=["GET"]))
        self.starlette = Starlette(routes=routes, lifespan=self.lifespan,
                                   middleware=cors_middleware(self.allowed_origins),
                                   exception_handlers={HTTPException: self._http_error})

    @staticmethod
    async def _http_error(_request: Request, exc: Exception) -> Response:
        # Unknown routes and methods answer in the same shape as every other error.
        status = getattr(exc, "status_code", 500)
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.BAD_FRAME, 413: ErrorCode.TOO_LARGE,
                401: ErrorCode.UNAUTHORIZED, 403: ErrorCode.FORBIDDEN}.get(
            status, ErrorCode.INTERNAL if status >= 500 else ErrorCode.BAD_FRAME)
        detail = getattr(exc, "detail", None) or "error"
        return JSONResponse({"error": {"code": code, "message": str(detail)}}, status_code=status,
                            headers=getattr(exc, "headers", None))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and route_path(scope) == "/v1/ws":
            # Straight to the endpoint: routing and Starlette's exception
            # wrapper would sit on every frame sent.
            await self.ws_endpoint(WebSocket(scope, receive, send))
            return
        await self.starlette(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        """Opens the store and starts the runtime; closes both on the way out.
        Mounted in another app, enter it from that app's lifespan (see
        turnline.server.embed.mount); entered again while running, it does nothing."""
        if self._lifespan_entered:
            yield
            return
        self._lifespan_entered = True
        try:
            async with self._lifespan():
                yield
        finally:
            self._lifespan_entered = False

    @contextlib.asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        await self.runtime.store.open()
        try:
            await self.runtime.start()
            await self.limiter.start()
            yield
        finally:
            if self.voice is not None:
                await self.voice.close()
            await self.limiter.close()
            await self.runtime.close()
            await self.runtime.store.close()

    async def existing_hub(self, session: str):  # type: ignore[no-untyped-def]
        if not await self.runtime.exists(session):
            raise CommandError(ErrorCode.NOT_FOUND, f"no session {session}")
        return await self.runtime.hub(session)

    # ------------------------------------------------------------ WebSocket

    async def ws_endpoint(self, ws: WebSocket) -> None:
        if not await guard_websocket_origin(ws, self.allowed_origins):
            return
        await ws.accept()
        try:
            principal = await _principal(self.verifier, ws.headers.get("authorization"),
                                         ws.query_params.get("token"))
        except CommandError as exc:
            self.runtime.metrics.frame_errors.labels(exc.code).inc()
            await ws.send_text(error_frame(None, exc.code, exc.message).decode())
            await ws.close(code=4401 if exc.code == ErrorCode.UNAUTHORIZED else 1011, reason=exc.code)
            return
        try:
            slot = await self.limiter.connect(principal.client_id)
        except CommandError as exc:
            self.count_error(exc.code, exc.details)
            await ws.send_text(error_frame(None, exc.code, exc.message, **exc.details).decode())
            await ws.close(code=4429, reason=exc.code)
            return
        conn = Connection(self, ws, principal, ws.query_params.get("cancel_on_disconnect") in ("1", "true"))
        metrics = self.runtime.metrics
        metrics.connections.inc()
        writer = asyncio.ensure_future(conn.writer())
        try:
            while not writer.done():
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                data = msg.get("text")
                if data is None:
                    await conn.handle_binary(msg.get("bytes") or b"")
                    continue
                await conn.handle(data)
        except WebSocketDisconnect:
            pass
        finally:
            metrics.connections.dec()
            conn.closed = True
            if writer.done():
                if not writer.cancelled() and writer.exception() is not None:
                    # the peer went away mid-send; retrieved so it is not logged as lost
                    log.debug("writer ended: %r", writer.exception())
            else:
                writer.cancel()
            await self.limiter.disconnect(slot)
            await conn.on_close()

    # ------------------------------------------------------------ HTTP

    async def principal(self, auth_header: str | None, query_token: str | None) -> Principal:
        """The verified principal of a bearer token (``Authorization`` or ``?token=``)."""
        return await _principal(self.verifier, auth_header, query_token)

    async def http_principal(self, request: Request) -> Principal:
        """The caller of an HTTP route, from its bearer token or ``?token=``."""
        return await self.principal(request.headers.get("authorization"), request.query_params.get("token"))

    async def _read_limited(self, request: Request, limit: int | None = None) -> bytes:
        # Refuse an oversized body as it arrives instead of buffering all of it first.
        limit = limit or self.config.max_frame_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise CommandError(ErrorCode.TOO_LARGE, f"body is {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise CommandError(ErrorCode.TOO_LARGE, f"body is over {limit} bytes, the limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(self, request: Request, kind: type, limit: int | None = None) -> Any:
        raw = await self._read_limited(request, limit)
        try:
            msgspec.json.decode(raw or b"{}")
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
            raise CommandError(ErrorCode.BAD_JSON, f"malformed JSON: {exc}") from None
        try:
            body = msgspec.json.decode(raw or b"{}", type=kind)
        except RecursionError as exc:
            raise CommandError(ErrorCode.BAD_JSON, f"malformed JSON: {exc}") from None
        except msgspec.ValidationError as exc:
            code = ErrorCode.BAD_ID if "matching regex" in str(exc) else ErrorCode.BAD_FRAME
            raise CommandError(code, str(exc)) from None
        if nesting_exceeds(raw):
            raise CommandError(ErrorCode.BAD_FRAME, f"JSON nested deeper than {MAX_NESTING} levels")
        return body

    @staticmethod
    def _session(request: Request) -> str:
        session = request.path_params["session"]
        if not is_valid_id(session):
            raise CommandError(ErrorCode.BAD_ID, f"invalid session id {session!r}")
        return session

    def count_error(self, code: str, details: dict[str, Any]) -> None:
        """Count an error answered to a client (a refusal by its limit too)."""
        metrics = self.runtime.metrics
        metrics.frame_errors.labels(code).inc()
        if code == ErrorCode.RATE_LIMITED and "limit" in details:
            metrics.limit_refusals.labels(details["limit"]).inc()

    async def _guard(self, request: Request, handler: Any) -> Response:
        try:
            return await handler()
        except CommandError as exc:
            self.count_error(exc.code, exc.details)
            wait_ms = exc.details.get("retry_after_ms")
            return JSONResponse({"error": {"code": exc.code, "message": exc.message, **exc.details}},
                                status_code=HTTP_STATUS.get(exc.code, 400),
                                headers={"retry-after": retry_after_header(wait_ms)} if wait_ms else None)

    async def post_messages(self, request: Request) -> Response:
        async def run() -> Response:
            who = await self.http_principal(request)
            session = self._session(request)
            _require(who, session, "publish")
            body = await self._body(request, HttpBody)
            for m in body.messages:
                if m.id is not None and not is_valid_id(m.id):
                    raise CommandError(ErrorCode.BAD_ID, f"invalid message id {m.id!r}")
            if not body.messages:
                raise CommandError(ErrorCode.BAD_FRAME, "messages must not be empty")
            hub = await self.limiter.take_then(SENDS, who.client_id, self.runtime.hub(session))
            outcome, durable = await hub.send(who.client_id, body.messages, policy=body.policy,
                                              parent_id=body.parent_id, steer=body.steer, seen=body.seen,
                                              traceparent=traceparent_header(request))
            await durable
            return JSONResponse(outcome.as_dict())
        return await self._guard(request, run)

    async def post_cancel(self, request: Request) -> Response:
        async def run() -> Response:
            who = await self.http_principal(request)
            session = self._session(request)
            body = await self._body(request, CancelBody)
            flt = _normalized_filter(body.filter)
            others = _cancel_rights(who, session, flt)
            await self.limiter.take(CANCELS, who.client_id)
            hub = await self.existing_hub(session)
            result, durable = await hub.cancel(who.client_id, flt, body.seen, may_cancel_others=others)
            await durable
            return Response(encode(result), media_type="application/json")
        return await self._guard(request, run)

    async def get_events(self, request: Request) -> Response:
        async def run() -> Response:
            who = await self.http_principal(request)
            session = self._session(request)
            _require(who, session, "subscribe")
            cursor = request.headers.get("last-event-id") or request.query_params.get("after")
            hub = await self.runtime.hub(session)
            if cursor is None:
                after = hub.state.last_seq
            else:
                try:
                    after = int(cursor)
                    if not 0 <= after <= SEQ_MAX:
                        raise ValueError
                except ValueError:
                    raise CommandError(ErrorCode.BAD_FRAME, f"after must be a seq (an integer ≥ 0), got {cursor!r}") from None
            return StreamingResponse(self._sse(session, after), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        return await self._guard(request, run)

    async def _sse(self, session: str, after: int) -> AsyncIterator[bytes]:
        async def pump(queue: asyncio.Queue[Any]) -> None:
            try:
                async for batch in self.runtime.store.follow(session, after):
                    await queue.put(batch)
            except Exception:
                log.exception("SSE follow of %s failed", session)
                # End the stream: the client reconnects with Last-Event-ID and resumes.
                await queue.put(None)

        yield b": turnline events\n\n"
        async for batch in paced(pump, self.config.sse_keepalive_s):
            if batch is KEEPALIVE:
                yield batch
            else:
                yield b"".join(b"id: %d\nevent: %s\ndata: %s\n\n" % (r.seq, b"turnline", r.data) for r in batch)

    async def get_messages(self, request: Request) -> Response:
        async def run() -> Response:
            who = await self.http_principal(request)
            session = self._session(request)
            _require(who, session, "subscribe")
            hub = await self.existing_hub(session)
            q = request.query_params
            leaf, before = q.get("leaf"), q.get("before")
            for name, value in (("leaf", leaf), ("before", before)):
                if value is not None and not is_valid_id(value):
                    raise CommandError(ErrorCode.BAD_ID, f"invalid {name} id {value!r}")
            try:
                limit = min(max(int(q.get("limit", "50")), 1), 500)
            except ValueError:
                raise CommandError(ErrorCode.BAD_FRAME, "limit must be an integer") from None
            state = hub.state
            if leaf is not None and leaf not in state.messages:
                raise CommandError(ErrorCode.NOT_FOUND, f"no message {leaf}")
            branch = state.branch(leaf if leaf is not None else state.latest)
            if q.get("include_hidden") not in ("1", "true"):
                branch = [m for m in branch if m.id not in state.hidden]
            end = len(branch)
            if before is not None:
                ids = [m.id for m in branch]
                if before not in ids:
                    raise CommandError(ErrorCode.NOT_FOUND, f"message {before} is not on this branch")
                end = ids.index(before)
            page = branch[max(0, end - limit):end]
            payload: dict[str, Any] = {"messages": page, "has_more": end - len(page) > 0}
            if payload["has_more"]:
                payload["before"] = page[0].id
            return Response(encode(payload), media_type="application/json")
        return await self._guard(request, run)

    async def get_tree(self, request: Request) -> Response:
        async def run() -> Response:
            who = await self.http_principal(request)
            session = self._session(request)
            _require(who, session, "subscribe")
            hub = await self.existing_hub(session)
            state = hub.state
            nodes = []
            for m in state.messages.values():
                node: dict[str, Any] = {"id": m.id, "parent_id": m.parent_id, "role": m.role}
                turn_id = state.turn_of_message.get(m.id)
                if turn_id is not None:
                    node["turn_id"] = turn_id
                    node["reason"] = state.turns[turn_id].reason
                if m.id in state.hidden:
                    node["hidden"] = True
                nodes.append(node)
            active = [{"turn_id": t.turn_id, "owner": t.owner, "input_id": t.input_id, "message_id": t.message_id}
                      for t in state.active.values()]
            return Response(encode({"head": state.head, "nodes": nodes, "active": active}),
                            media_type="application/json")
        return await self._guard(request, run)

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def metrics(self, _request: Request) -> Response:
        return Response(generate_latest(self.runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def dev_token(self, request: Request) -> Response:
        # Dev mode only: a short-lived token for the demo page, to this machine's browser only.
        refusal = dev_token_refusal(request.scope, request.headers)
        if refusal is not None:
            return JSONResponse({"error": {"code": ErrorCode.FORBIDDEN, "message": refusal}}, status_code=403)
        name = request.query_params.get("sub") or "demo-user"
        if not is_valid_id(name):
            return JSONResponse({"error": {"code": ErrorCode.BAD_ID, "message": "invalid sub"}}, status_code=400)
        token = mint(self.config.secret or "", name, {"*": ["subscribe", "publish", "cancel"]},
                     self.config.dev_token_ttl_s)
        return JSONResponse({"token": token, "sub": name, "ttl_s": self.config.dev_token_ttl_s})

    async def index(self, _request: Request) -> Response:
        return FileResponse(WEB_DIR / "index.html", headers=_STATIC_HEADERS)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        path = (WEB_DIR / name).resolve()
        if WEB_DIR not in path.parents or not path.is_file():
            return JSONResponse({"error": {"code": ErrorCode.NOT_FOUND, "message": "not found"}}, status_code=404)
        return FileResponse(path, media_type=_STATIC_TYPES.get(path.suffix), headers=_STATIC_HEADERS)

    # Public names of the request helpers, for route modules built on this app
    # (turnline.server.agui); the underscored names stay for their old callers.
    read_body = _body
    guarded = _guard
    session_param = _session


def create_app(runtime: Runtime, config: ServerConfig) -> TurnlineApp:
    return TurnlineApp(runtime, config)


# Public names of the capability checks, for route modules (as above).
require = _require
cancel_rights = _cancel_rights

