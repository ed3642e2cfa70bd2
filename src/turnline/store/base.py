"""The event log interface every store implements, and the live feed they share.

Contract (pinned by ``tests/unit/test_store_contract.py`` for every store):

- ``append(session, events)`` assigns gapless ``seq`` 1, 2, 3… per session, in
  the order of the calls (the seq is assigned before ``append`` first yields),
  sets ``ts`` when it is 0, and returns once the events are durable according to
  the store's durability setting. Only durable events are ever read or followed.
  ``fence`` (a lease token) makes a shared store refuse the append unless the
  caller still holds the session's lease; single-process stores ignore it.
- ``read(session, after, limit)`` returns records with ``seq > after`` in order.
- ``follow(session, after)`` yields batches: first the catch-up from the log,
  then live batches, with no gap and no duplicate at the seam. ``after=None``
  means live only.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from typing import AsyncIterator, Callable, NamedTuple, Sequence

from ..protocol import AnyEvent, decode_event, encode, now_ms

READ_PAGE = 1000
LISTENER_BACKLOG = 10_000


class Record(NamedTuple):
    """One stored event: its seq and its JSON (seq included)."""

    seq: int
    data: bytes

    def event(self) -> AnyEvent:
        return decode_event(self.data)


class StoreError(Exception):
    pass


AppendDone = Callable[[list[Record] | None, BaseException | None], None]


def stamp(events: Sequence[AnyEvent], first_seq: int) -> list[Record]:
    """Give events their seq (and ts) and encode each once."""
    ts = now_ms()
    records = []
    for i, ev in enumerate(events):
        ev.seq = first_seq + i
        if not ev.ts:
            ev.ts = ts
        records.append(Record(ev.seq, encode(ev)))
    return records


class _Listener:
    __slots__ = ("pending", "waiter", "overflowed", "sink", "cursor")

    def __init__(self) -> None:
        self.pending: deque[Record] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.overflowed = False
        # Armed by a caught-up ``follow_into``: live records that continue
        # ``cursor`` go straight to ``sink`` from the publisher, with no task
        # switch per record (the fan-out hot path).
        self.sink: Callable[[Sequence[Record]], None] | None = None
        self.cursor = 0

    def push(self, records: Sequence[Record]) -> None:
        sink = self.sink
        if sink is not None and records[0].seq == self.cursor + 1 and not self.pending:
            self.cursor = records[-1].seq
            sink(records)
            return
        if len(self.pending) + len(records) > LISTENER_BACKLOG:
            # A reader that fell this far behind re-reads from the log instead
            # of holding an unbounded buffer in memory.
            self.pending.clear()
            self.overflowed = True
        else:
            self.pending.extend(records)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def resync(self) -> None:
        """Make the follower re-read the log from its cursor (its live source
        may have missed something, e.g. it started after the follower)."""
        self.overflowed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        while not self.pending and not self.overflowed:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


class LiveFeed:
    """In-process fan-out of committed records to followers of a session."""

    def __init__(self) -> None:
        self._listeners: dict[str, set[_Listener]] = {}

    def publish(self, session: str, records: Sequence[Record]) -> None:
        for listener in self._listeners.get(session, ()):
            listener.push(records)

    def subscribe(self, session: str) -> _Listener:
        listener = _Listener()
        self._listeners.setdefault(session, set()).add(listener)
        return listener

    def unsubscribe(self, session: str, listener: _Listener) -> None:
        group = self._listeners.get(session)
        if group is not None:
            group.discard(listener)
            if not group:
                del self._listeners[session]

    def follower_count(self, session: str) -> int:
        return len(self._listeners.get(session, ()))


class EventLog(ABC):
    """An append-only, per-session ordered log."""

    def __init__(self) -> None:
        self.feed = LiveFeed()

    @abstractmethod
    async def append(self, session: str, events: Sequence[AnyEvent], *, fence: str | None = None) -> list[Record]:
        """Append ``events`` (see the module docstring). ``fence``: append only
        while the session's lease holds this token (shared stores only)."""

    def append_soon(self, session: str, events: Sequence[AnyEvent], *,
                    fence: str | None = None) -> asyncio.Future[list[Record]]:
        """``append``, started now; the future of its records. A store whose
        own writer batches appends hands out that writer's future, which saves
        a writer of many small appends (a streaming turn) a task for each."""
        return asyncio.ensure_future(self.append(session, events, fence=fence))

    def append_then(self, session: str, events: Sequence[AnyEvent], done: AppendDone, *,
                    fence: str | None = None) -> None:
        """``append_soon``, its outcome handed to ``done(records, None)`` or
        ``done(None, error)``, once, instead of a future (a store whose writer
        batches calls it from there, without a future and a loop callback per
        append). ``done`` must not raise. What ``append_soon`` raises at once
        is raised here."""
        def settle(fut: asyncio.Future[list[Record]]) -> None:
            if fut.cancelled():
                done(None, asyncio.CancelledError())
            elif (error := fut.exception()) is not None:
                done(None, error)
            else:
                done(fut.result(), None)

        self.append_soon(session, events, fence=fence).add_done_callback(settle)

    @abstractmethod
    async def read(self, session: str, after: int = 0, limit: int | None = None) -> list[Record]: ...

    @abstractmethod
    async def last_seq(self, session: str) -> int:
        """The highest durable seq of the session (0 for a session with no events)."""

    @abstractmethod
    async def sessions(self) -> list[str]: ...

    async def open(self) -> None:
        """Prepare the store for use (connect, create tables, start threads)."""

    async def close(self) -> None:
        """Flush what was acknowledged and release resources."""

    async def exists(self, session: str) -> bool:
        return await self.last_seq(session) > 0

    def follow(self, session: str, after: int | None = 0) -> AsyncIterator[list[Record]]:
        return self._follow(session, after, None)

    async def follow_into(self, session: str, after: int | None, sink: Callable[[Sequence[Record]], None]) -> None:
        """``follow``, handing each batch to ``sink`` (which must not block or
        raise); runs until cancelled. Once caught up, live batches reach
        ``sink`` straight from the publisher."""
        async for batch in self._follow(session, after, sink):
            sink(batch)

    async def _follow(self, session: str, after: int | None,
                      sink: Callable[[Sequence[Record]], None] | None) -> AsyncIterator[list[Record]]:
        # Subscribe before reading so nothing committed during the catch-up is
        # missed; what the log and the live buffer both hold is dropped by seq.
        listener = self.feed.subscribe(session)
        try:
            cursor = await self.last_seq(session) if after is None else after
            catching_up = after is not None
            while True:
                pending = listener.pending
                if listener.overflowed or (pending and pending[0].seq > cursor + 1):
                    listener.overflowed = False
                    catching_up = True
                if catching_up:
                    page = await self.read(session, cursor, READ_PAGE)
                    if page:
                        cursor = page[-1].seq
                        yield page
                        continue
                    catching_up = False
                while pending and pending[0].seq <= cursor:
                    pending.popleft()
                if pending:
                    if pending[0].seq != cursor + 1:
                        catching_up = True
                        continue
                    batch = list(pending)
                    pending.clear()
                    cursor = batch[-1].seq
                    yield batch
                else:
                    listener.cursor = cursor
                    listener.sink = sink
                    try:
                        await listener.wait()
                    finally:
                        listener.sink = None
                    cursor = listener.cursor
        finally:
            self.feed.unsubscribe(session, listener)


def parse_store_url(url: str) -> tuple[str, str]:
    """``memory://``, ``sqlite:///path/to.db`` (or a bare ``*.db`` path), ``redis://…``."""
    if url in ("memory", "memory://"):
        return "memory", ""
    if url.startswith("sqlite:///"):
        return "sqlite", url[len("sqlite:///"):] or "turnline.db"
    if url.startswith("sqlite://"):
        return "sqlite", url[len("sqlite://"):] or "turnline.db"
    if url.startswith(("redis://", "rediss://", "unix://")):
        return "redis", url
    if url.endswith((".db", ".sqlite", ".sqlite3")):
        return "sqlite", url
    raise StoreError(f"unknown store URL {url!r}: use memory://, sqlite:///PATH or redis://HOST:PORT")
