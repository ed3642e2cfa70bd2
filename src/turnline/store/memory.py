"""An in-memory event log: for tests, examples and ephemeral sessions."""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

from ..protocol import AnyEvent
from .base import EventLog, Record, stamp


class MemoryEventLog(EventLog):
    def __init__(self) -> None:
        super().__init__()
        self._logs: dict[str, list[Record]] = {}

    async def append(self, session: str, events: Sequence[AnyEvent], *, fence: str | None = None) -> list[Record]:
        # ``fence`` is ignored: one process owns this log, so there is no lease to lose.
        if not events:
            return []
        log = self._logs.setdefault(session, [])
        records = stamp(events, len(log) + 1)
        log.extend(records)
        self.feed.publish(session, records)
        return records

    async def read(self, session: str, after: int = 0, limit: int | None = None) -> list[Record]:
        log = self._logs.get(session, [])
        # seq n lives at index n-1, so slicing is exact; bisect guards against
        # a negative cursor.
        start = bisect_right(log, after, key=lambda r: r.seq) if after > 0 else 0
        return log[start:] if limit is None else log[start:start + limit]

    async def last_seq(self, session: str) -> int:
        return len(self._logs.get(session, ()))

    async def sessions(self) -> list[str]:
        return list(self._logs)
