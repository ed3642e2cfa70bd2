"""The SQLite event log: the embedded default store.

One file, stdlib ``sqlite3``, WAL journal. Appends are written by a single
writer thread that does *group commit*: whatever was queued while the previous
transaction committed (from any session) goes into the next transaction, so a
burst of appends costs one commit, not one per append.

Ordering. ``append`` assigns the seqs synchronously, before its first ``await``,
from an in-memory next-seq per session (initialised from ``max(seq)`` the first
time the session is touched). Appends made from the event loop are therefore
numbered in call order, and they are queued — and committed — in that order.
After each commit the writer hands the batch back to the event loop
(``call_soon_threadsafe``), which, in the same order, publishes each append's
records to the live feed and resolves its future. Followers only ever see
committed records, and see them in seq order.

Failure. If a transaction fails, it is rolled back and every append in it gets
a :class:`StoreError`. So do the appends still queued for the sessions it
touched (their seqs follow the lost ones; writing them would leave a gap). The
next-seq of those sessions is then reloaded from the database, so the log stays
gapless and the failed seqs are reused by the next append.

Cancellation. Cancelling a task while it awaits ``append`` does not withdraw
the append: its seqs are taken, so it is still written and published.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections import deque
from typing import Callable, Sequence

from ..protocol import AnyEvent
from .base import EventLog, Record, StoreError, stamp

SCHEMA_VERSION = 1
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_S = 5.0
READ_CHUNK = 256
_tuple_new = tuple.__new__  # builds a Record from a (seq, data) row without re-checking it

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta ("
    " key TEXT PRIMARY KEY,"
    " value TEXT NOT NULL"
    ") WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS events ("
    " session TEXT NOT NULL,"
    " seq INTEGER NOT NULL,"
    " data BLOB NOT NULL,"
    " PRIMARY KEY (session, seq)"
    ") WITHOUT ROWID",
)
_INSERT = "INSERT INTO events (session, seq, data) VALUES (?, ?, ?)"
_MAX_SEQ = "SELECT max(seq) FROM events WHERE session = ?"
_READ = "SELECT seq, data FROM events WHERE session = ? AND seq > ? ORDER BY seq LIMIT ?"
# A skip-scan over the primary key: one index seek per distinct session
# instead of a scan over every event.
_SESSIONS = (
    "WITH RECURSIVE s(name) AS ("
    " SELECT min(session) FROM events"
    " UNION ALL"
    " SELECT (SELECT min(session) FROM events WHERE session > s.name) FROM s"
    " WHERE s.name IS NOT NULL"
    ") SELECT name FROM s WHERE name IS NOT NULL"
)


class _Append:
    __slots__ = ("session", "records", "future")

    def __init__(self, session: str, records: list[Record], future: asyncio.Future[list[Record]]):
        self.session = session
        self.records = records
        self.future = future


class SQLiteEventLog(EventLog):
    """An event log in one SQLite file (WAL mode), written by one group-commit thread.

    ``synchronous`` is SQLite's ``PRAGMA synchronous`` for the writer, and sets
    what "durable" means when ``append`` returns:

    - ``"NORMAL"`` (default): a commit is written to the WAL file but not
      fsynced. An acknowledged append survives the process being killed
      (even ``kill -9``: the WAL pages are in the OS page cache), but the last
      commits may be lost if the machine loses power or the OS crashes. The
      database is never corrupted either way.
    - ``"FULL"``: the WAL is fsynced on every commit (once per group, not per
      append). An acknowledged append also survives power loss and OS crashes.
      Costs one fsync per commit.
    - ``"EXTRA"`` is FULL plus a directory sync; ``"OFF"`` skips fsync entirely
      (survives a process kill, not an OS crash, and can corrupt on power loss).

    ``batch_max`` caps the number of events in one transaction (an append
    larger than that is committed alone, whole). Reads use a separate
    connection on the loop thread and never wait for the writer (a WAL reader
    sees the last committed state); a long read yields to the loop every
    ``READ_CHUNK`` rows.

    The store belongs to the event loop that ran :meth:`open`; call it from
    that loop only. One process writes a given file (the in-memory next-seq
    assumes no other writer).
    """

    def __init__(self, path: str, *, synchronous: str = "NORMAL", batch_max: int = 512) -> None:
        super().__init__()
        path = os.fspath(path)
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise StoreError("SQLiteEventLog needs a file path; use MemoryEventLog (memory://) for an in-memory log")
        mode = str(synchronous).upper()
        if mode not in SYNCHRONOUS_MODES:
            raise StoreError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
        if batch_max < 1:
            raise StoreError("batch_max must be at least 1")
        self.path = path
        self.synchronous = mode
        self.batch_max = batch_max

        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond: the queue of uncommitted appends, the next seq to
        # assign per session, and the lifecycle flags.
        self._queue: deque[_Append] = deque()
        self._next: dict[str, int] = {}
        self._closing = False
        self._broken: BaseException | None = None

        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._stopped: asyncio.Future[None] | None = None
        # The read connection, used on the loop thread only.
        self._rconn: sqlite3.Connection | None = None

    # ------------------------------------------------------------ lifecycle

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit; transactions are explicit.
        return sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )

    def _connect_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _setup(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not enable WAL journal mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
                if not row:
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
                elif row[0][0] != str(SCHEMA_VERSION):
                    raise StoreError(
                        f"{self.path}: schema version {row[0][0]}, this turnline reads version {SCHEMA_VERSION}"
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"{self.path}: cannot open the event log: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        if self._loop is not None:
            raise StoreError("SQLiteEventLog.open() was already called (a closed log is not reopened: make a new one)")
        loop = asyncio.get_running_loop()
        self._wconn = await asyncio.to_thread(self._setup)
        try:
            self._rconn = self._connect_reader()
        except sqlite3.Error as exc:
            self._wconn.close()
            raise StoreError(f"{self.path}: cannot open a read connection: {exc}") from exc
        self._loop = loop
        self._stopped = loop.create_future()
        self._writer = threading.Thread(target=self._run_writer, name="turnline-sqlite-writer", daemon=True)
        self._writer.start()

    async def close(self) -> None:
        """Commit every append already made, stop the writer and close the connections."""
        if self._writer is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        assert self._stopped is not None
        # Resolved by the writer after its last batch was handed back, so the
        # final results are delivered before close returns.
        await asyncio.shield(self._stopped)
        writer, self._writer = self._writer, None
        await asyncio.to_thread(writer.join)
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    # ------------------------------------------------------------ writes

    async def append(self, session: str, events: Sequence[AnyEvent], *, fence: str | None = None) -> list[Record]:
        # ``fence`` is ignored: one process owns this log, so there is no lease to lose.
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise StoreError(
                "SQLiteEventLog is not open" if self._loop is None else "SQLiteEventLog used from another event loop"
            )
        if not events:
            return []
        future: asyncio.Future[list[Record]] = loop.create_future()
        with self._cond:
            if self._closing:
                raise StoreError("SQLiteEventLog is closed")
            if self._broken is not None:
                raise StoreError(f"SQLiteEventLog writer stopped: {self._broken!r}") from self._broken
            first = self._next.get(session)
            if first is None:
                # First touch (or first after a failed commit): no write for
                # this session is queued or in flight, so the database is exact.
                first = self._max_seq(self._rconn, session) + 1
            records = stamp(events, first)
            self._next[session] = first + len(records)
            self._queue.append(_Append(session, records, future))
            self._cond.notify()
        return await future

    def _run_writer(self) -> None:
        conn = self._wconn
        assert conn is not None
        queue = self._queue
        cond = self._cond
        batch_max = self.batch_max
        batch: list[_Append] = []  # taken from the queue, not yet handed back
        try:
            while True:
                with cond:
                    while not queue and not self._closing:
                        cond.wait()
                    if not queue:
                        break
                    first = queue.popleft()
                    batch = [first]
                    size = len(first.records)
                    while queue and size + len(queue[0].records) <= batch_max:
                        item = queue.popleft()
                        size += len(item.records)
                        batch.append(item)
                try:
                    self._commit(conn, batch)
                except Exception as exc:
                    failed = self._discard_after_failure(batch)
                    self._post(self._deliver_failure, failed, f"commit failed: {exc}", exc)
                else:
                    self._post(self._deliver, batch)
                batch = []
        except BaseException as exc:  # a bug, or the interpreter going down
            with cond:
                self._broken = exc
                failed = batch + list(queue)
                queue.clear()
            self._post(self._deliver_failure, failed, f"writer stopped: {exc!r}", exc)
        finally:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            self._post(self._writer_stopped)

    @staticmethod
    def _commit(conn: sqlite3.Connection, batch: list[_Append]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, [(a.session, r.seq, r.data) for a in batch for r in a.records])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def _discard_after_failure(self, batch: list[_Append]) -> list[_Append]:
        """Fail the sessions a lost transaction touched, so none is left with a gap."""
        affected = {a.session for a in batch}
        failed = list(batch)
        with self._cond:
            for session in affected:
                # Reloaded from the database by the next append.
                self._next.pop(session, None)
            kept: deque[_Append] = deque()
            for a in self._queue:
                (failed if a.session in affected else kept).append(a)
            self._queue.clear()
            self._queue.extend(kept)
        return failed

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    # The three callbacks below run on the event loop thread.

    def _deliver(self, batch: list[_Append]) -> None:
        publish = self.feed.publish
        for a in batch:
            try:
                publish(a.session, a.records)
            except Exception as exc:  # never leave the appends behind it waiting
                assert self._loop is not None
                self._loop.call_exception_handler(
                    {"message": "SQLiteEventLog: publishing to the live feed failed", "exception": exc}
                )
            if not a.future.done():
                a.future.set_result(a.records)

    @staticmethod
    def _deliver_failure(failed: list[_Append], message: str, cause: BaseException) -> None:
        for a in failed:
            if not a.future.done():
                err = StoreError(message)
                err.__cause__ = cause
                a.future.set_exception(err)

    def _writer_stopped(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    # ------------------------------------------------------------ reads

    @staticmethod
    def _max_seq(conn: sqlite3.Connection | None, session: str) -> int:
        if conn is None:
            raise StoreError("SQLiteEventLog is not open")
        try:
            return conn.execute(_MAX_SEQ, (session,)).fetchall()[0][0] or 0
        except sqlite3.Error as exc:
            raise StoreError(f"reading the last seq of {session!r} failed: {exc}") from exc

    async def read(self, session: str, after: int = 0, limit: int | None = None) -> list[Record]:
        # Synchronous on the loop thread, in chunks of READ_CHUNK rows with a
        # yield between them: a big catch-up stalls the loop for at most one
        # chunk. (Measured: a thread pool costs ~0.2 ms per read and thrashes
        # the GIL under concurrent readers; this costs nothing extra.) Chunks
        # may come from successive snapshots; the log is append-only and
        # gapless, so they still join into one gapless range.
        conn = self._rconn
        if conn is None:
            raise StoreError("SQLiteEventLog is not open")
        out: list[Record] = []
        remaining = limit
        while remaining is None or remaining > 0:
            n = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
            try:
                rows = conn.execute(_READ, (session, after, n)).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"reading {session!r} failed: {exc}") from exc
            out.extend([_tuple_new(Record, row) for row in rows])
            if len(rows) < n:
                break
            if remaining is not None:
                remaining -= n
            after = rows[-1][0]
            await asyncio.sleep(0)
        return out

    async def last_seq(self, session: str) -> int:
        # One index seek: cheap enough to run on the loop thread.
        return self._max_seq(self._rconn, session)

    async def sessions(self) -> list[str]:
        conn = self._rconn
        if conn is None:
            raise StoreError("SQLiteEventLog is not open")
        return [row[0] for row in conn.execute(_SESSIONS).fetchall()]
