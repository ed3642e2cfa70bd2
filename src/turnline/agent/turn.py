"""The Turn object an agent works with, and the Agent that wraps user code."""

from __future__ import annotations

import asyncio
import inspect
import threading
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING, Any, AsyncIterable, Awaitable, Callable, Iterable, Mapping, Protocol, Union,
)

from ..protocol import CancelFilter, Message, MessageIn
from .signal import AbortSignal
from .tracing import NO_TURN_TRACE, TurnTrace

if TYPE_CHECKING:
    from .runtime import SessionHub

Chunk = dict[str, Any]
ChunkLike = Union[str, Chunk]
Writer = Callable[[ChunkLike], Awaitable[None]]


@dataclass(frozen=True)
class CancelRequest:
    """What ``on_cancel`` decides on."""

    session_id: str
    requester: str
    filter: CancelFilter
    matched_turn_ids: list[str]
    turn_owners: Mapping[str, str]
    seen: int | None = None


OnCancel = Callable[[CancelRequest], Union[bool, Awaitable[bool]]]
OnAbort = Callable[..., Awaitable[None]]  # (write) or (write, turn)


# The ``finishReason`` values every supported ``ai`` major (5 to 7) accepts on ``finish``.
FINISH_REASONS = frozenset({"stop", "length", "content-filter", "tool-calls", "error", "other"})


def finish_reason(fold: Any) -> str:
    """The ``finishReason`` of a turn that completed: its last model step's, as
    the provider adapters record it in the message metadata, else ``stop``."""
    reason = (fold.metadata if fold is not None else {}).get("finishReason")
    return reason if reason in FINISH_REASONS else "stop"


class Handler(Protocol):
    def __call__(self, turn: Turn) -> Any: ...


class Turn:
    """One unit of agent work. It streams chunks into the session log and ends
    exactly once, with ``complete``, ``cancelled`` or ``error``.

    Use it as ``async with turn:`` to be sure it ends: on leaving the block it
    ends ``cancelled`` if aborted (whatever the block raised on its way out,
    e.g. :class:`Aborted`), ``error`` on an exception or if its task was
    stopped without an abort, else ``complete``.
    """

    def __init__(self, hub: SessionHub, *, turn_id: str, owner: str, input: Message,
                 message_id: str, history: list[Message]):
        self.hub = hub
        self.session_id = hub.session_id
        self.turn_id = turn_id
        self.owner = owner
        self.input = input
        self.message_id = message_id
        self.history = history
        self.abort_signal = AbortSignal()
        self.reason: str | None = None
        self.ended = asyncio.Event()
        self._text_id: str | None = None
        self._text_seq = 0
        self._started = False
        self._finished_chunk = False
        self._abort_hook_ran = False
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.upstream_after_abort = 0  # items the upstream produced after the abort
        self.trace: TurnTrace = NO_TURN_TRACE  # set by the runtime when tracing is on

    # ------------------------------------------------------------ writing

    @property
    def aborted(self) -> bool:
        return self.abort_signal.aborted

    async def write(self, chunk: ChunkLike) -> None:
        """Append one chunk (a UI message stream chunk, or plain text)."""
        self._write(chunk, final=False)
        await self.hub.backpressure()

    def _write(self, chunk: ChunkLike, *, final: bool) -> None:
        # After the abort fired only on_abort writes (final) are kept: the
        # agent's own flow has been told to stop, so what it still produces is
        # late. After turn-end nothing is kept.
        if self.reason is not None or (self.abort_signal.aborted and not final):
            self.hub.count_late_chunk()
            return
        if not self._started:
            self._started = True
            if isinstance(chunk, dict) and chunk.get("type") == "start":
                chunk = {**chunk, "messageId": self.message_id}
                self.hub.append_chunk(self, chunk, final)
                return
            self.hub.append_chunk(self, {"type": "start", "messageId": self.message_id}, final)
        if isinstance(chunk, str):
            if not chunk:
                return
            if self._text_id is None:
                self._text_id = f"text-{self._text_seq}"
                self._text_seq += 1
                self.hub.append_chunk(self, {"type": "text-start", "id": self._text_id}, final)
            self.hub.append_chunk(self, {"type": "text-delta", "id": self._text_id, "delta": chunk}, final,
                                  serialisable=True)
            return
        if not isinstance(chunk, dict) or not isinstance(chunk.get("type"), str):
            raise TypeError(f"a chunk is a str or a dict with a 'type'; got {chunk!r}")
        self._close_auto_text(final)
        if chunk["type"] == "finish":
            self._finished_chunk = True
            if "finishReason" not in chunk:  # the AI SDK's onFinish reports it
                chunk = {**chunk, "finishReason": finish_reason(self.hub.state.active[self.turn_id].fold)}
        self.hub.append_chunk(self, chunk, final)

    def _close_auto_text(self, final: bool) -> None:
        if self._text_id is not None:
            self.hub.append_chunk(self, {"type": "text-end", "id": self._text_id}, final)
            self._text_id = None

    async def stream_response(self, source: AsyncIterable[ChunkLike] | Iterable[ChunkLike]) -> str:
        """Write every item of ``source`` until it is exhausted or the turn is
        aborted. Returns ``"complete"`` or ``"cancelled"``.

        On abort an async source is closed with ``aclose()`` at once (its
        pending ``await`` is cancelled, so an HTTP stream inside it is closed);
        a sync generator runs in a worker thread and is stopped at its next
        ``yield``. Exceptions from the source propagate."""
        if self.aborted:
            await _close_source(source)
            return "cancelled"
        if hasattr(source, "__aiter__"):
            return await self._pump_async(source)  # type: ignore[arg-type]
        if isinstance(source, (str, bytes)) or not hasattr(source, "__iter__"):
            raise TypeError("stream_response takes an async iterable or an iterable of chunks")
        return await self._pump_sync(source)  # type: ignore[arg-type]

    async def _pump_async(self, source: AsyncIterable[ChunkLike]) -> str:
        iterator = source.__aiter__()

        async def pump() -> None:
            async for item in iterator:
                if self.aborted:
                    self.upstream_after_abort += 1
                    break
                self._write(item, final=False)
                await self.hub.backpressure()

        task = asyncio.ensure_future(pump())
        remove = self.abort_signal.add_listener(lambda _r: task.cancel())
        try:
            await _wait_task(task)
        finally:
            remove()
            await _close_source(iterator)
        if self.aborted:
            return "cancelled"
        self._close_auto_text(False)
        return "complete"

    async def _pump_sync(self, source: Iterable[ChunkLike]) -> str:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        signal = self.abort_signal

        def run() -> None:
            iterator = iter(source)
            try:
                for item in iterator:
                    if signal.aborted:
                        self.upstream_after_abort += 1
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
            except BaseException as exc:  # handed to the turn, which ends with error
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()

        threading.Thread(target=run, name=f"turn-{self.turn_id}", daemon=True).start()
        abort_wait = asyncio.ensure_future(_signal_wait(signal))
        try:
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, abort_wait}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return "cancelled"
                kind, value = get.result()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
                self._write(value, final=False)
                await self.hub.backpressure()
        finally:
            abort_wait.cancel()
        if self.aborted:
            return "cancelled"
        self._close_auto_text(False)
        return "complete"

    # ------------------------------------------------------------ steering

    def has_input(self) -> bool:
        """True when a steering message is waiting in this turn's inbox."""
        return not self._inbox.empty()

    async def next_input(self) -> Message:
        """Wait for the next steering message sent into this running turn."""
        return self._took(await self._inbox.get())

    def take_inputs(self) -> list[Message]:
        out = []
        while not self._inbox.empty():
            out.append(self._took(self._inbox.get_nowait()))
        return out

    def _took(self, message: Message) -> Message:
        # Where the agent takes a steering message is where its answer turns:
        # a ``steering-message`` part there (the AI SDK 7 chunk), so every
        # client and the saved message show the correction in place.
        parts = [p for p in message.parts if p.get("type") in ("text", "file")]
        self._write({"type": "steering-message", "id": message.id, "parts": parts}, final=False)
        return message

    def _deliver(self, message: Message) -> None:
        self._inbox.put_nowait(message)

    # ------------------------------------------------------------ ending

    async def end(self, reason: str = "complete", error: BaseException | str | None = None) -> None:
        """End the turn once; later calls are no-ops."""
        await self.hub.end_turn(self, reason, error)

    async def __aenter__(self) -> Turn:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self.aborted:  # whatever the block raised on its way out (Aborted, a closed stream)
            await self.end("cancelled")
        elif isinstance(exc, asyncio.CancelledError):  # stopped without an abort: not complete
            await self.end("error", "the turn was stopped by the server")
        elif exc is not None:
            await self.end("error", exc)
        else:
            await self.end("complete")
        return False


async def _wait_task(task: asyncio.Future[None]) -> None:
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        # the pump was cancelled by the abort; the caller reports "cancelled"
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


async def _signal_wait(signal: AbortSignal) -> None:
    await signal


async def _close_source(source: Any) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            pass
        return
    close = getattr(source, "close", None)
    if close is not None and not inspect.iscoroutinefunction(close):
        try:
            close()
        except Exception:
            pass


@dataclass
class Agent:
    """Your agent: a handler plus optional hooks.

    ``respond`` may be any of:

    - ``async def respond(turn)``: full control; call ``turn.stream_response``
      or ``turn.write``; returning ends the turn (``async with`` semantics);
    - ``async def respond(turn)`` that is an async generator: each ``yield``d
      str or chunk is streamed;
    - ``def respond(turn)`` that is a generator: runs in a worker thread and is
      stopped at its next ``yield`` after a cancel.

    ``on_cancel(request) -> bool`` authorises cancels (sync or async; ``False``
    rejects, and the requester is told). ``on_abort(write)`` (or
    ``on_abort(write, turn)``) runs after the abort fired and before
    ``turn-end``; what it writes is kept in the persisted message. Anything
    else the agent writes after the abort fired is dropped and counted.
    """

    respond: Handler
    on_cancel: OnCancel | None = None
    on_abort: OnAbort | None = None
    name: str = "agent"
    metadata: dict[str, Any] = field(default_factory=dict)

    async def run(self, turn: Turn) -> None:
        fn = self.respond
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            await turn.stream_response(fn(turn))
            return
        result = fn(turn)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return
        if isinstance(result, str):
            await turn.stream_response([result])
        else:
            await turn.stream_response(result)


def message_from_input(m: MessageIn, message_id: str, parent_id: str | None) -> Message:
    return Message(id=message_id, role=m.role, parts=m.parts, parent_id=parent_id, metadata=m.metadata)
