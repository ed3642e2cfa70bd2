"""The Python client transport: one session over the turnline WebSocket.

``ClientTransport`` keeps a :class:`~turnline.client.view.View` in step with a
session's log and carries this client's commands to the server:

- it subscribes with ``after`` and, after a dropped connection, reconnects by
  itself (exponential backoff with jitter, capped) and resubscribes from the
  view's ``last_seq``: no event is lost, none is applied twice;
- every request frame carries an ``id``; the server's ``ack`` resolves it, an
  ``error`` frame raises :class:`TurnlineError` with the stable code;
- requests in flight when the connection drops are sent again once the view
  has caught up on the new connection. Message ids are generated here, so a
  ``send`` the server had already applied answers ``conflict``, which counts
  as success; a ``regenerate`` whose turn the log already shows is not sent
  again;
- ``cancel`` always carries ``seen = view.last_seq`` and freezes the view's
  display of the turns it stops (what you saw is what is saved).

A dropped connection cancels nothing unless ``cancel_on_disconnect=True``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import itertools
import json
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Union
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from ..protocol import (
    AnyEvent, CancelFilter, ErrorCode, Message, MessageIn, TurnEnd, decode_event, encode, is_valid_id,
    text_part,
)
from .view import GapError, View

log = logging.getLogger("turnline.client")

__all__ = ["ClientTransport", "TurnlineError"]

TokenSource = Union[str, Callable[[], Union[str, Awaitable[str]]]]
MessageLike = Union[str, MessageIn, Message, dict]

#: connection states reported to ``on_state`` callbacks
IDLE, CONNECTING, CONNECTED, RECONNECTING, CLOSED = "idle", "connecting", "connected", "reconnecting", "closed"


class TurnlineError(Exception):
    """An ``error`` frame from the server (``code`` is a stable
    :class:`~turnline.protocol.ErrorCode`), or a local failure with codes
    ``closed`` / ``disconnected``."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class _Frame(msgspec.Struct):
    """What the client reads of every server frame (unknown fields ignored)."""

    op: str
    id: Union[int, str, None] = None
    session: Union[str, None] = None
    event: msgspec.Raw = msgspec.Raw()
    events: list[msgspec.Raw] = []
    code: Union[str, None] = None
    message: Any = None


class _Seq(msgspec.Struct):
    seq: int


@dataclass
class _Request:
    id: int
    kind: str
    frame: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]
    since: int  # view.last_seq when the request was made
    meta: dict[str, Any] = field(default_factory=dict)
    sent_gen: int | None = None  # the connection it was last written to
    resent: bool = False


class _ConnectionLost(Exception):
    pass


_CLOSED = object()


class ClientTransport:
    """One session over one WebSocket, with automatic resume.

    ``after``: where the first subscription starts (``0``: the whole log,
    ``None``: live only, ``N``: after seq ``N``); every reconnect resumes from
    ``view.last_seq``. ``token`` may be a string or a (sync or async) callable
    returning a fresh token for each connection attempt.
    """

    def __init__(self, url: str, token: TokenSource, session: str, *, after: int | None = 0,
                 reconnect: bool = True, max_backoff: float = 5.0, cancel_on_disconnect: bool = False,
                 view: View | None = None, client_id: str | None = None, initial_backoff: float = 0.05,
                 open_timeout: float = 10.0, catchup_timeout: float = 10.0, max_size: int | None = 16 * 2**20,
                 compression: str | None = "deflate"):
        if not is_valid_id(session):
            raise ValueError(f"invalid session id {session!r}")
        self.url = _with_query(url, {"cancel_on_disconnect": "1"} if cancel_on_disconnect else {})
        self.session = session
        self.reconnect = reconnect
        self.max_backoff = max_backoff
        self.initial_backoff = initial_backoff
        self.cancel_on_disconnect = cancel_on_disconnect
        self.open_timeout = open_timeout
        self.catchup_timeout = catchup_timeout
        self._token_source = token
        self._after = after
        self._max_size = max_size
        self._compression = compression
        self.client_id = client_id or (_jwt_sub(token) if isinstance(token, str) else None)
        self.view = view if view is not None else View(session, client_id=self.client_id)
        if self.view.client_id is None:
            self.view.client_id = self.client_id
        #: completed reconnects (not counting the first connection)
        self.reconnects = 0
        #: gaps seen on the wire and healed by resubscribing
        self.gap_recoveries = 0
        #: the error that closed the transport for good, if any
        self.error: TurnlineError | None = None
        self._state = IDLE
        self._state_callbacks: list[Callable[[str], None]] = []
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._gen = 0
        self._ready = False
        self._closing = False
        self._auth_error: TurnlineError | None = None
        self._ids = itertools.count(1)
        self._requests: dict[int, _Request] = {}
        self._internal: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._resubscribing = False
        self._waiters: list[tuple[Callable[[View], Any], asyncio.Future[Any]]] = []
        self._queues: set[tuple[str, asyncio.Queue[Any]]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.view.on_turn_end(self._on_turn_end)
        self.view.on_event(self._on_event)

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> ClientTransport:
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection, subscribe and catch up. Raises on failure
        (``TurnlineError('unauthorized')`` for a refused token, ``OSError``
        when the server cannot be reached); reconnects are automatic after."""
        if self._state not in (IDLE,):
            raise RuntimeError(f"connect() on a transport that is {self._state}")
        self._set_state(CONNECTING)
        try:
            await self._open(first=True)
        except BaseException:
            self._set_state(IDLE)
            raise
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def close(self, cancel_own: bool = False, *, timeout: float = 5.0) -> None:
        """Close for good. With ``cancel_own=True``, first cancel this client's
        running turns (with ``seen``) and wait for the server's answer."""
        if self._state == CLOSED:
            return
        if self._state == IDLE:
            self._shutdown(TurnlineError("closed", "the transport was closed"))
            return
        if cancel_own and not self._closing:
            try:
                await asyncio.wait_for(self.cancel(), timeout)
            except (TurnlineError, asyncio.TimeoutError) as exc:
                log.warning("cancel on close failed: %s", exc)
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), timeout)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if self._supervisor is not None:
            with contextlib.suppress(BaseException):
                await self._supervisor
        self._shutdown(TurnlineError("closed", "the transport was closed"))

    @property
    def state(self) -> str:
        """``idle``, ``connecting``, ``connected``, ``reconnecting`` or ``closed``."""
        return self._state

    @property
    def connected(self) -> bool:
        return self._state == CONNECTED

    def on_state(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(state)`` on every state change; returns a remover."""
        self._state_callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._state_callbacks.remove(callback)
        return remove

    def _set_state(self, state: str) -> None:
        if state == self._state:
            return
        self._state = state
        for cb in list(self._state_callbacks):
            try:
                cb(state)
            except Exception:
                log.exception("state callback failed")
        self._check_waiters()

    async def _token(self) -> str:
        source = self._token_source
        if isinstance(source, str):
            return source
        token = source()
        if inspect.isawaitable(token):
            token = await token
        return token  # type: ignore[return-value]

    async def _open(self, first: bool) -> None:
        token = await self._token()
        if self.client_id is None:
            self.client_id = _jwt_sub(token)
            self.view.client_id = self.view.client_id or self.client_id
        ws = await ws_connect(
            self.url, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None,
            open_timeout=self.open_timeout, max_size=self._max_size, compression=self._compression,
            max_queue=256, close_timeout=2)
        self._gen += 1
        gen = self._gen
        self._ws = ws
        self._auth_error = None
        self._resubscribing = False
        reader = asyncio.ensure_future(self._read(ws, gen))
        self._reader = reader
        try:
            view = self.view
            if first and view.last_seq == 0:
                after = self._after
            else:
                after = view.last_seq
            ack = await self._internal_request(ws, {"op": "subscribe", "session": self.session, "after": after},
                                               reader)
            server_after = int(ack.get("after") or 0)
            if view.last_seq == 0 and server_after > 0 and not view.core.messages and not view.core.turns:
                view.start_at(server_after)  # live only, or resuming a cursor kept elsewhere
            target = int(ack.get("last_seq") or 0)
            await self._until(lambda v: v.last_seq >= target, self.catchup_timeout, reader)
            await self._flush_requests(ws, gen, reader)
        except BaseException as exc:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(ws.close(), 2)
            with contextlib.suppress(BaseException):
                await reader
            if self._auth_error is not None and not isinstance(exc, asyncio.CancelledError):
                raise self._auth_error from None
            raise
        if not first:
            self.reconnects += 1
        self._ready = True
        self._set_state(CONNECTED)

    async def _supervise(self) -> None:
        while True:
            reader = self._reader
            if reader is not None:
                await asyncio.wait({reader})
            if self._closing:
                return
            if self._auth_error is not None and isinstance(self._token_source, str):
                self._shutdown(self._auth_error)
                return
            if not self.reconnect:
                self._shutdown(TurnlineError("disconnected", "the connection was lost"))
                return
            self._set_state(RECONNECTING)
            attempt = 0
            while True:
                await asyncio.sleep(self._backoff(attempt))
                if self._closing:
                    return
                try:
                    await self._open(first=False)
                    break
                except asyncio.CancelledError:
                    raise
                except TurnlineError as exc:
                    if exc.code == ErrorCode.UNAUTHORIZED and isinstance(self._token_source, str):
                        self._shutdown(exc)
                        return
                    log.info("reconnect attempt %d failed: %s", attempt + 1, exc)
                except Exception as exc:
                    log.info("reconnect attempt %d failed: %r", attempt + 1, exc)
                attempt += 1

    def _backoff(self, attempt: int) -> float:
        if attempt == 0:
            # A drop of a healthy connection is retried at once (a little
            # jitter spreads a herd); repeated failures back off exponentially.
            return random.uniform(0, self.initial_backoff / 10)
        ceiling = min(self.max_backoff, self.initial_backoff * (2 ** min(attempt - 1, 30)))
        return ceiling * random.uniform(0.5, 1.0)

    def _shutdown(self, error: TurnlineError) -> None:
        self._ready = False
        if error.code != "closed":
            self.error = error
        for req in list(self._requests.values()):
            if not req.future.done():
                req.future.set_exception(error)
        self._requests.clear()
        for fut in self._internal.values():
            if not fut.done():
                fut.set_exception(error)
        self._internal.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()
        for _, q in self._queues:
            q.put_nowait(_CLOSED)
        self._set_state(CLOSED)

    # ------------------------------------------------------------ reading

    async def _read(self, ws: ClientConnection, gen: int) -> None:
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    continue  # voice audio: not handled by this client
                self._on_frame(raw)
        except ConnectionClosed:
            pass
        finally:
            if self._gen == gen:
                self._ready = False
                lost = _ConnectionLost("connection lost")
                for fut in self._internal.values():
                    if not fut.done():
                        fut.set_exception(lost)
                self._internal.clear()

    def _on_frame(self, raw: str) -> None:
        try:
            frame = msgspec.json.decode(raw, type=_Frame)
        except msgspec.DecodeError:
            log.warning("unreadable frame from server: %.200s", raw)
            return
        try:
            op = frame.op
            if op == "event":
                if frame.session == self.session:
                    self._on_events([frame.event])
            elif op == "events":
                if frame.session == self.session:
                    self._on_events(frame.events)
            elif op == "ack":
                self._answer(frame.id, msgspec.json.decode(raw), None)
            elif op == "pong":
                self._on_pong(frame.id)
            elif op == "error":
                err = TurnlineError(frame.code or ErrorCode.INTERNAL, str(frame.message or ""))
                if frame.id is None:
                    self._on_unsolicited_error(frame, err)
                else:
                    self._answer(frame.id, None, err)
        except Exception:
            log.exception("client failed on a frame")
        self._check_waiters()

    def _on_events(self, raws: Iterable[msgspec.Raw]) -> None:
        view = self.view
        for raw in raws:
            try:
                try:
                    ev = decode_event(raw)
                except msgspec.ValidationError:
                    # an event type (or field) this client does not know: keep the order
                    view.skip(msgspec.json.decode(raw, type=_Seq).seq)
                    continue
                view.apply(ev)
            except GapError as exc:
                log.warning("%s; resubscribing from %d", exc, view.last_seq)
                self._on_gap()
                return  # the rest of this batch is past the gap as well

    def _on_gap(self) -> None:
        if self._resubscribing or not self._ready or self._ws is None:
            return
        self._resubscribing = True
        self.gap_recoveries += 1
        self._spawn(self._resubscribe(self._ws, self._reader))

    async def _resubscribe(self, ws: ClientConnection, reader: asyncio.Task[None] | None) -> None:
        try:
            await self._internal_request(
                ws, {"op": "subscribe", "session": self.session, "after": self.view.last_seq}, reader)
        except Exception as exc:
            log.info("resubscribe failed: %r", exc)
        finally:
            self._resubscribing = False

    def _on_pong(self, rid: Any) -> None:
        # A pong quotes its ping's id; one without an id answers the oldest ping.
        pings = sorted((r for r in self._requests.values() if r.kind == "ping" and not r.future.done()),
                       key=lambda r: r.id)
        match = [r for r in pings if r.id == rid] or pings[:1]
        for r in match:
            r.future.set_result({})

    def _on_unsolicited_error(self, frame: _Frame, err: TurnlineError) -> None:
        if err.code == ErrorCode.UNAUTHORIZED:
            self._auth_error = err
        elif frame.session == self.session and self._ready:
            # the server's subscription failed: resubscribe from our cursor
            log.warning("subscription error (%s); resubscribing", err)
            self._on_gap()
        else:
            log.warning("error frame from server: %s", err)

    def _on_event(self, ev: AnyEvent) -> None:
        for kind, q in self._queues:
            if kind == "event":
                q.put_nowait(ev)

    def _on_turn_end(self, ev: TurnEnd) -> None:
        for kind, q in self._queues:
            if kind == "turn-end":
                q.put_nowait(ev)

    # ------------------------------------------------------------ requests

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _internal_request(self, ws: ClientConnection, frame: dict[str, Any],
                                reader: asyncio.Task[None] | None) -> dict[str, Any]:
        """A request bound to one connection (subscribe): never re-sent."""
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._internal[rid] = fut
        try:
            await ws.send(encode({**frame, "id": rid}).decode())
            waits: set[asyncio.Future[Any]] = {fut}
            if reader is not None:
                waits.add(reader)
            done, _ = await asyncio.wait(waits, timeout=self.open_timeout, return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                return fut.result()
            if reader is not None and reader in done:
                raise _ConnectionLost("connection lost")
            raise asyncio.TimeoutError(f"no answer to {frame['op']}")
        finally:
            self._internal.pop(rid, None)

    async def _request(self, kind: str, frame: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        if self._state in (CLOSED, IDLE) or self._closing:
            raise TurnlineError("closed", f"cannot {kind}: the transport is {self._state}")
        rid = next(self._ids)
        frame = {**frame, "id": rid}
        req = _Request(rid, kind, frame, asyncio.get_running_loop().create_future(), self.view.last_seq, meta or {})
        self._requests[rid] = req
        try:
            ws = self._ws
            if self._ready and ws is not None:
                req.sent_gen = self._gen
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(encode(frame).decode())
            # else: sent once the connection is back and the view has caught up
            return await req.future
        finally:
            self._requests.pop(rid, None)

    async def _flush_requests(self, ws: ClientConnection, gen: int, reader: asyncio.Task[None]) -> None:
        """(Re)send every request not yet written to this connection, in order."""
        while True:
            todo = sorted((r for r in self._requests.values() if r.sent_gen != gen and not r.future.done()),
                          key=lambda r: r.id)
            if not todo:
                return
            for req in todo:
                if req.id not in self._requests or req.future.done():
                    continue
                if req.sent_gen is not None:
                    req.resent = True
                    if req.kind == "regenerate":
                        recovered = self._recover_regenerate(req)
                        if recovered is not None:
                            req.future.set_result(recovered)
                            continue
                req.sent_gen = gen
                if reader.done():
                    raise _ConnectionLost("connection lost")
                await ws.send(encode(req.frame).decode())

    def _answer(self, rid: Any, ack: dict[str, Any] | None, error: TurnlineError | None) -> None:
        fut = self._internal.get(rid) if isinstance(rid, int) else None
        if fut is not None:
            if not fut.done():
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(ack or {})
            return
        req = self._requests.get(rid) if isinstance(rid, int) else None
        if req is None or req.future.done():
            return
        if error is not None:
            if req.kind == "send" and req.resent and error.code == ErrorCode.CONFLICT:
                # the first copy was applied before the connection dropped
                self._spawn(self._recover_send(req, error))
                return
            req.future.set_exception(error)
            return
        out = {k: v for k, v in (ack or {}).items() if k not in ("op", "id")}
        if req.resent:
            out["resent"] = True
        req.future.set_result(out)

    async def _recover_send(self, req: _Request, error: TurnlineError) -> None:
        ids: list[str] = req.meta["ids"]
        try:
            await self.wait_for(lambda v: all(i in v.core.messages for i in ids), self.catchup_timeout)
        except (asyncio.TimeoutError, TurnlineError):
            if not req.future.done():
                req.future.set_exception(error)  # a genuine conflict after all
            return
        core = self.view.core
        last = ids[-1]
        out: dict[str, Any] = {
            "session": self.session, "message_ids": ids,
            "turn_ids": [t.turn_id for t in core.turns.values()
                         if t.input_id == last and t.start_seq > req.since
                         and (self.client_id is None or t.owner == self.client_id)],
            "resent": True,
        }
        queued = [q.turn_id for q in core.queue if q.message_id == last]
        if queued:
            out["queued"] = queued
        if not req.future.done():
            req.future.set_result(out)

    def _recover_regenerate(self, req: _Request) -> dict[str, Any] | None:
        input_id = req.meta.get("input_id")
        if input_id is None:
            return None
        claimed = self._claimed_turns()
        for t in self.view.core.turns.values():
            if (t.input_id == input_id and t.start_seq > req.since and t.turn_id not in claimed
                    and (self.client_id is None or t.owner == self.client_id)):
                return {"session": self.session, "message_ids": [], "turn_ids": [t.turn_id], "resent": True}
        return None

    def _claimed_turns(self) -> set[str]:
        return {t for r in self._requests.values() if r.future.done() and not r.future.cancelled()
                and r.future.exception() is None for t in r.future.result().get("turn_ids", [])}

    # ------------------------------------------------------------ commands

    async def send(self, content: MessageLike | list[MessageLike], *, policy: str | None = None,
                   parent_id: str | None = None, steer: str | None = None,
                   traceparent: str | None = None) -> dict[str, Any]:
        """Add user message(s); returns the ack's fields (``message_ids``,
        ``turn_ids``, and ``queued``/``rejected``/``cancelled`` when they
        apply). The messages show in the view at once (optimistic) under
        their client-generated ids. Sending without ``parent_id`` makes the
        view follow the newest message again. ``traceparent`` (W3C): with
        tracing on, the server's span of the turn joins that trace."""
        messages = _to_messages(content)
        ids = [m.id for m in messages]
        view = self.view
        if steer is not None:
            running = view.core.turns.get(steer)
            parent = running.input_id if running is not None else None
        else:
            parent = parent_id if parent_id is not None else view.guess_parent(policy, self.client_id)
        for m in messages:
            view.add_optimistic(Message(id=m.id, role=m.role, parts=m.parts, parent_id=parent,  # type: ignore[arg-type]
                                        metadata=m.metadata))
            parent = m.id
        if parent_id is None and steer is None:
            view.select(None)
        frame: dict[str, Any] = {"op": "send", "session": self.session,
                                 "messages": [msgspec.to_builtins(m) for m in messages]}
        for key, value in (("policy", policy), ("parent_id", parent_id), ("steer", steer),
                           ("traceparent", traceparent)):
            if value is not None:
                frame[key] = value
        interrupting = policy in ("interrupt", "rollback") and steer is None
        if interrupting:
            # The turns this send cancels are saved as this view shows them.
            frame["seen"] = seen = view.last_seq
            view.freeze(view.active_turns.get(self.client_id, ()), seen, request=ids[-1])
        try:
            ack = await self._request("send", frame, {"ids": ids})
        except TurnlineError:
            view.drop_optimistic(i for i in ids if i not in view.core.messages)
            if interrupting:
                view.cancel_failed(ids[-1])
            raise
        if interrupting:
            view.cancel_acked(ids[-1], cancelled=ack.get("cancelled", ()), seen=frame["seen"])
        if ack.get("rejected"):
            view.drop_optimistic(ids)  # a rejected send is not appended
        return ack

    async def cancel(self, *, turn_id: str | None = None, client_id: str | None = None,
                     all: bool = False) -> dict[str, Any]:
        """Cancel turns: this client's own (default), one turn, one client's,
        or all. Always sends ``seen = view.last_seq``, and the view shows the
        turns it stops as of that cursor — exactly what will be persisted.
        Returns the ack (``request_id``, ``cancelled``, ``rejected``,
        ``pending``); raises ``TurnlineError('forbidden')`` without the
        capability for a broad filter."""
        try:
            flt = CancelFilter(turn_id=turn_id, client_id=client_id, all=all).normalized()
        except ValueError as exc:
            raise TurnlineError(ErrorCode.BAD_FRAME, str(exc)) from None
        view = self.view
        seen = view.last_seq
        matched: list[str] = []
        if not (flt.own and self.client_id is None):
            matched = view.core.match_cancel(flt, self.client_id or "", seen).matched
        frame = {"op": "cancel", "session": self.session, "filter": msgspec.to_builtins(flt), "seen": seen}
        token = object()  # identifies this request's freezes in the view
        view.freeze(matched, seen, request=token)
        try:
            ack = await self._request("cancel", frame, {"matched": matched})
        except TurnlineError:
            # refused (forbidden, closed before an answer…): the turns stream on.
            # A caller that gave up waiting (CancelledError) keeps the freeze:
            # the cancel may still apply, and then the display is already right.
            view.cancel_failed(token)
            raise
        if ack.get("resent"):
            # the first copy may have done the work: report the turns it stopped
            done = [t for t in matched if t not in ack.get("cancelled", [])
                    and (turn := view.core.turns.get(t)) is not None and turn.cancel is not None]
            ack["cancelled"] = list(ack.get("cancelled", [])) + done
        view.cancel_acked(token, ack.get("cancelled", []), ack.get("rejected", []), ack.get("pending", []), seen)
        return ack

    async def regenerate(self, message_id: str) -> dict[str, Any]:
        """A new assistant reply for the input of ``message_id`` (a sibling of
        that reply); returns the ack (``turn_ids``)."""
        msg = self.view.core.messages.get(message_id)
        input_id = None
        if msg is not None:
            input_id = msg.parent_id if msg.role == "assistant" else msg.id
        return await self._request("regenerate", {"op": "regenerate", "session": self.session,
                                                  "message_id": message_id}, {"input_id": input_id})

    async def ping(self) -> float:
        """Round trip to the server (waits for a connection); returns seconds."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._request("ping", {"op": "ping"})
        return loop.time() - start

    # ------------------------------------------------------------ reading state

    @property
    def active_turns(self) -> dict[str, set[str]]:
        """Running turns as owner → set of turn ids."""
        return self.view.active_turns

    @property
    def last_seq(self) -> int:
        return self.view.last_seq

    def _check_waiters(self) -> None:
        if not self._waiters:
            return
        keep = []
        for pred, fut in self._waiters:
            if fut.done():
                continue
            try:
                value = pred(self.view)
            except Exception as exc:
                fut.set_exception(exc)
                continue
            if value:
                fut.set_result(value)
            else:
                keep.append((pred, fut))
        self._waiters = keep

    async def wait_for(self, predicate: Callable[[View], Any], timeout: float | None = 10.0) -> Any:
        """Wait until ``predicate(view)`` is truthy (re-checked after every
        frame and state change); returns its value. Raises
        ``asyncio.TimeoutError`` after ``timeout`` seconds, ``TurnlineError``
        if the transport closes first."""
        value = predicate(self.view)
        if value:
            return value
        if self._state == CLOSED:
            raise TurnlineError("closed", "the transport is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def _until(self, predicate: Callable[[View], Any], timeout: float, reader: asyncio.Task[None]) -> None:
        if predicate(self.view):
            return
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            done, _ = await asyncio.wait({fut, reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                fut.result()
                return
            if reader in done:
                raise _ConnectionLost("connection lost")
            raise asyncio.TimeoutError("the view did not catch up")
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def wait_turn_end(self, turn_id: str, timeout: float | None = 30.0) -> TurnEnd:
        """The ``turn-end`` of ``turn_id`` (at once if the view already saw it)."""
        return await self.wait_for(lambda v: v.turn_end(turn_id), timeout)

    async def turn_ends(self) -> AsyncIterator[TurnEnd]:
        """Every ``turn-end`` applied from now on, in log order, until close."""
        async for ev in self._stream("turn-end"):
            yield ev

    async def events(self) -> AsyncIterator[AnyEvent]:
        """Every event applied from now on, in log order, until close."""
        async for ev in self._stream("event"):
            yield ev

    async def _stream(self, kind: str) -> AsyncIterator[Any]:
        if self._state == CLOSED:
            return
        q: asyncio.Queue[Any] = asyncio.Queue()
        entry = (kind, q)
        self._queues.add(entry)
        try:
            while True:
                item = await q.get()
                if item is _CLOSED:
                    return
                yield item
        finally:
            self._queues.discard(entry)


# ---------------------------------------------------------------- helpers


def new_message_id() -> str:
    return f"msg-{uuid.uuid4().hex}"


def _to_message(item: MessageLike) -> MessageIn:
    if isinstance(item, str):
        return MessageIn(parts=[text_part(item)], id=new_message_id())
    if isinstance(item, Message):
        if item.role == "assistant":
            raise ValueError("a client sends user or system messages")
        return MessageIn(parts=item.parts, id=item.id, role=item.role, metadata=item.metadata)
    if isinstance(item, MessageIn):
        msg = item
    elif isinstance(item, dict):
        msg = msgspec.convert(item, MessageIn)
    else:
        raise TypeError(f"not a message: {item!r}")
    if msg.id is None:
        msg = MessageIn(parts=msg.parts, id=new_message_id(), role=msg.role, metadata=msg.metadata)
    return msg


def _to_messages(content: MessageLike | list[MessageLike]) -> list[MessageIn]:
    items = content if isinstance(content, list) else [content]
    if not items:
        raise ValueError("send needs at least one message")
    return [_to_message(i) for i in items]


def _jwt_sub(token: str) -> str | None:
    """The ``sub`` claim of a JWT, read without verifying it (the server
    verifies; the client only needs to know which turns are its own)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        sub = claims.get("sub")
        return sub if isinstance(sub, str) else None
    except (IndexError, ValueError, AttributeError):
        return None


def _with_query(url: str, extra: dict[str, str]) -> str:
    if not extra:
        return url
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(extra)
    return urlunsplit(parts._replace(query=urlencode(query)))
