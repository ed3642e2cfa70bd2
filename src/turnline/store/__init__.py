"""Event logs: memory, SQLite (embedded default) and Redis Streams."""

from __future__ import annotations

from .base import EventLog, Record, StoreError, parse_store_url
from .memory import MemoryEventLog


def open_store(url: str, **options) -> EventLog:
    """Build the event log a store URL names (not yet opened: call ``await log.open()``)."""
    kind, where = parse_store_url(url)
    if kind == "memory":
        return MemoryEventLog()
    if kind == "sqlite":
        from .sqlite import SQLiteEventLog

        return SQLiteEventLog(where, **options)
    from .redis import RedisEventLog  # type: ignore[import-not-found]

    return RedisEventLog(where, **options)


__all__ = ["EventLog", "Record", "StoreError", "MemoryEventLog", "open_store", "parse_store_url"]
