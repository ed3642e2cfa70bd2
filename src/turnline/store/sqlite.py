"""The SQLite event log: the embedded default store.

One file, stdlib ``sqlite3``, WAL journal. Appends are written by a single
writer thread that does *group commit*: whatever was queued while the previous
transaction committed (from any session) goes into the next transaction, so a
burst of appends costs one commit, not one per append. An ``append_then``
(how a session hub writes) made while nothing is queued or waiting to be
handed back is committed on the event loop's thread instead, at once, on a
connection of its own: a commit that does not sync (synchronous NORMAL or OFF)
costs less than waking the writer and being woken by it. Only while appends
come apart (``INLINE_MEAN_GAP_S`` on average): a busy server's appends go to
the writer and are group-committed. Those commits never
checkpoint the WAL (the writer does, every ``CHECKPOINT_RECORDS`` records) and
never wait for a lock another process holds (the append goes to the writer).

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
import time
from collections import deque
from typing import Callable, Sequence

from ..protocol import AnyEvent
from .base import AppendDone, EventLog, Record, StoreError, stamp

SCHEMA_VERSION = 1
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_S = 5.0
READ_CHUNK = 256
# Inline commits (see SQLiteEventLog.inline_commits) never checkpoint the WAL
# on the loop thread; the writer does (on its own connection, without holding
# up the inline writes), once this many records were committed inline since.
CHECKPOINT_RECORDS = 2000
# Inline commits only while appends come this far apart on average (an
# exponential mean over about the last 16): a busy server's appends go to the
# writer, which commits what queued meanwhile in one transaction, where an
# inline commit per append would cost a transaction each.
INLINE_MEAN_GAP_S = 0.001
_GAP_WEIGHT = 1 / 16
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
    """One queued append and who hears of it: ``done(records, None)`` or
    ``done(None, error)``, once, on the event loop."""

    __slots__ = ("session", "records", "done")

    def __init__(self, session: str, records: list[Record], done: AppendDone):
        self.session = session
        self.records = records
        self.done = done


def _settle(future: asyncio.Future[list[Record]]) -> AppendDone:
    def done(records: list[Record] | None, error: BaseException | None) -> None:
        if not future.done():
            if error is None:
                future.set_result(records)  # type: ignore[arg-type]
            else:
                future.set_exception(error)
    return done


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

    def __init__(self, path: str, *, synchronous: str = "NORMAL", batch_max: int = 512,
                 inline_commits: bool = True) -> None:
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
        # An append made while nothing is queued or waiting to be handed back
        # is committed on the loop thread, at once: a commit that does not
        # sync (WAL, synchronous NORMAL or OFF) costs less than waking the
        # writer and being woken by it. Under load, appends queue up behind
        # the writer's commit and are group-committed as before.
        self.inline_commits = inline_commits and mode in ("OFF", "NORMAL")
        self._undelivered = 0  # appends taken and not yet handed back (loop thread only)
        self._iconn: sqlite3.Connection | None = None  # inline commits' own connection (loop thread only)
        self._inline_records = 0  # committed inline since the writer's last checkpoint
        self.clock: Callable[[], float] = time.monotonic  # for the gaps between appends; tests set their own
        self._last_append = 0.0
        self._mean_gap = 1.0  # seconds between appends, an exponential mean (a new log: idle)
        self.inline_commit_count = 0

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

    def _connect_inline(self) -> sqlite3.Connection:
        # No busy wait (a lock held by another process sends the append to
        # the writer instead of stalling the loop), and no checkpoint in a
        # commit (that syncs files: the writer does it).
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

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
            if self.inline_commits:
                self._iconn = self._connect_inline()
        except sqlite3.Error as exc:
            self._wconn.close()
            if self._rconn is not None:
                self._rconn.close()
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
        for conn in (self._rconn, self._iconn):
            if conn is not None:
                conn.close()
        self._rconn = self._iconn = None

    # ------------------------------------------------------------ writes

    async def append(self, session: str, events: Sequence[AnyEvent], *, fence: str | None = None) -> list[Record]:
        # ``fence`` is ignored: one process owns this log, so there is no lease to lose.
        return await self.append_soon(session, events)

    def append_soon(self, session: str, events: Sequence[AnyEvent], *,
                    fence: str | None = None) -> asyncio.Future[list[Record]]:
        # Always through the writer: a future settled before it is awaited
        # would not yield, and a loop of awaited appends would starve the loop.
        future: asyncio.Future[list[Record]] = asyncio.get_running_loop().create_future()
        self._take(session, events, _settle(future), inline=False)
        return future

    def append_then(self, session: str, events: Sequence[AnyEvent], done: AppendDone, *,
                    fence: str | None = None) -> None:
        """Taken now (no task, no loop turn first): committed at once on this
        thread when nothing else is in flight (see ``inline_commits``), else by
        the writer; ``done`` is called straight from the delivery."""
        self._take(session, events, done, inline=self.inline_commits)

    def _take(self, session: str, events: Sequence[AnyEvent], done: AppendDone, *, inline: bool) -> None:
        self._check_loop()
        if not events:
            done([], None)
            return
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
            append = _Append(session, records, done)
            self._undelivered += 1
            now = self.clock()
            self._mean_gap += (min(now - self._last_append, 1.0) - self._mean_gap) * _GAP_WEIGHT
            self._last_append = now
            inline = inline and self._undelivered == 1 and self._mean_gap >= INLINE_MEAN_GAP_S
            if not inline:
                self._queue.append(append)
                self._cond.notify()
        if inline:
            self._commit_inline(append)

    def _commit_inline(self, append: _Append) -> None:
        # Nothing is queued or in the writer's hands (else this append would
        # have been queued behind it), so handing this one back at once keeps
        # the order.
        assert self._iconn is not None
        try:
            self._commit(self._iconn, [append])
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):  # another process holds the lock: let the writer wait
                with self._cond:
                    self._queue.append(append)
                    self._cond.notify()
                return
            self._deliver_failure(self._discard_after_failure([append]), f"commit failed: {exc}", exc)
        except Exception as exc:
            self._deliver_failure(self._discard_after_failure([append]), f"commit failed: {exc}", exc)
        else:
            self.inline_commit_count += 1
            due = self._inline_records < CHECKPOINT_RECORDS
            self._inline_records += len(append.records)
            if due and self._inline_records >= CHECKPOINT_RECORDS:
                with self._cond:
                    self._cond.notify()  # the writer checkpoints
            self._deliver([append])

    def _check_loop(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or loop is not self._loop:
            raise StoreError(
                "SQLiteEventLog is not open" if self._loop is None else "SQLiteEventLog used from another event loop"
            )

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
                    while not queue and not self._closing and self._inline_records < CHECKPOINT_RECORDS:
                        cond.wait()
                    if not queue and self._closing:
                        break
                    if queue:
                        first = queue.popleft()
                        batch = [first]
                        size = len(first.records)
                        while queue and size + len(queue[0].records) <= batch_max:
                            item = queue.popleft()
                            size += len(item.records)
                            batch.append(item)
                if not batch:  # woken to checkpoint; outside the lock, so appends go on meanwhile
                    self._checkpoint(conn)
                    continue
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

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """On the writer thread: move what inline commits left in the WAL
        into the database (they never checkpoint on the loop thread)."""
        self._inline_records = 0
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            pass  # the next one tries again; the WAL only grows meanwhile

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
        self._undelivered -= len(batch)
        publish = self.feed.publish
        for a in batch:
            try:
                publish(a.session, a.records)
            except Exception as exc:  # never leave the appends behind it waiting
                assert self._loop is not None
                self._loop.call_exception_handler(
                    {"message": "SQLiteEventLog: publishing to the live feed failed", "exception": exc}
                )
            self._hand_back(a, a.records, None)

    def _hand_back(self, append: _Append, records: list[Record] | None, error: BaseException | None) -> None:
        try:
            append.done(records, error)
        except Exception as exc:  # a done that raises must not keep the rest of the batch waiting
            assert self._loop is not None
            self._loop.call_exception_handler({"message": "SQLiteEventLog: an append's callback failed",
                                               "exception": exc})

    def _deliver_failure(self, failed: list[_Append], message: str, cause: BaseException) -> None:
        self._undelivered -= len(failed)
        for a in failed:
            err = StoreError(message)
            err.__cause__ = cause
            self._hand_back(a, None, err)

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
