"""The Redis Streams event log: the store for many nodes.

Keys (``prefix`` defaults to ``tl``; every key of a session carries the session
as its hash tag, so they share one Redis Cluster slot and one Lua call may
touch them all). :meth:`RedisEventLog.key` builds them, so other modules (the
cluster runtime) use the same names:

- ``{prefix}:{<session>}:log``   the stream. Entry ids are ``<seq>-0``: the
  stream id *is* the seq. One field, ``d``: the event's JSON with its seq
  (:attr:`Record.data`).
- ``{prefix}:{<session>}:seq``   the last seq, a decimal string.
- ``{prefix}:{<session>}:lease`` owned by the cluster runtime: the fence token
  of the worker that owns the session, with a PX expiry. ``append(fence=…)``
  writes only while it holds exactly that token.
- ``{prefix}:{<session>}:ended`` a sorted set of the session's ended turns,
  ``<end seq>:<turn id>`` scored by the turn-end's ts: what compaction visits.
- ``{prefix}:sessions``          a set of every session id, for :meth:`sessions`.
  It is the one key outside the session slots, so it is written by its own
  ``SADD``, sent just before the script in a process's first write round for
  the session (it may name a session whose first append then failed; it never
  misses one that exists).

Appending. ``append`` queues the batch and one writer task per instance sends
whatever is queued as one Lua call (group commit: one round trip and one script
run per round, however many sessions and appends it holds). For each session in
the round, independently and atomically, the script checks the fence (``GET
lease == fence``, else :class:`Fenced`), then compare-and-sets the seq (the last
seq must be ``first - 1``, else :class:`StoreConflict`), then ``XADD``s all that
session's queued events with ids ``seq-0`` and sets ``:seq``. Events that
already carry a seq (the session hub numbers its events before appending) are
written with exactly those seqs or not at all. Events without one are numbered
here, in call order, from a cached next seq; when another process wrote in
between, the CAS fails, the cache is reloaded and the batch is renumbered and
retried. Nothing is acknowledged before Redis applied it
(and, with ``wait_replicas``, before that many replicas confirmed it). A task
cancelled while it waits in ``append`` does not withdraw its events.

Reading. ``read`` is ``XRANGE (after-0 + COUNT n``. Where the log has a hole
(compaction removed events), ``read`` puts one :class:`~turnline.protocol.Compacted`
record covering it, so the seqs a reader sees stay contiguous.

Following. ``follow`` is the base class's (catch-up from ``read``, then the live
feed, gapless at the seam). The live feed is fed by ONE reader per instance. A
write announces itself: the append script ``PUBLISH``es its news on the
session's channel ``{prefix}:{<session>}:news``: its records (up to
``NEWS_RECORDS_MAX`` bytes), or else its last seq. The reader subscribes (on
its own connection, parsed in bulk) to the channels of the sessions that have
a local follower. Records in the news that continue the session's cursor go
to the feed at once, with no read; for news of a last seq only, of a session
not started yet, or past a gap (news lost with a connection), the reader
reads with a non-blocking ``XREAD COUNT STREAMS …`` only the streams
concerned, so its cost follows the traffic, not the number of sessions
followed. A new session is started at its last seq only once Redis
confirmed the SUBSCRIBE (a write in between would otherwise be announced to
nobody), and its followers then re-read the log once (:meth:`_Listener.resync`),
which closes the window between their catch-up read and that start. Pub/sub is
only a fast path: when the news connection drops, the reader reads every followed
stream once it is back, and it also does so every ``sweep_ms`` regardless.
Appends made by this instance are also published to local followers directly
when they continue what the feed delivered (less latency; the reader then
skips them by seq). Records are passed on as the bytes Redis returned; nothing
is decoded.

Redis Cluster. ``open`` asks the server (``INFO cluster``); on a cluster the
store reads the slot map (``CLUSTER SLOTS``) and keeps, per primary, a writer
and a reader connection and a news connection. A writer round sends one script
call per slot (a call may only name keys of one slot), pipelined per node, the
nodes in parallel; the reader sends one ``XREAD`` per stream, likewise; news
is sharded pub/sub (the script ``SPUBLISH``es, the reader ``SSUBSCRIBE``s on the
node that owns the stream's slot), so a write is announced on its own node only.
A ``MOVED`` reply (the slot moved) refreshes the slot map and the call is sent
again; an ``ASK`` (the slot is moving) sends it to the importing node after
``ASKING``; ``TRYAGAIN`` and ``CLUSTERDOWN`` are retried after a short pause. A
script call that was redirected did not run, so a retry never writes twice.
When a slot moves, Redis unsubscribes its shard channels; the reader then
subscribes on the new owner and, once that is confirmed, reads the stream
(nothing written in between is missed). ``read``, ``last_seq`` and compaction
go through redis-py's ``RedisCluster``.

Retention. ``compact`` deletes (``XDEL``) the ``chunk`` events of turns that
ended more than ``retention_s`` ago; their ``turn-end`` holds the folded
message, so history, tree and session state are unchanged, and a resume from a
cursor inside the retention window is exact. With ``retention_s`` set, every
instance runs compaction every ``compact_every_s`` (at most one instance per
interval does the work, by a ``SET NX PX`` lock).

Durability: see docs/deploy.md, "Redis durability" (AOF fsync policy, replicas
and ``wait_replicas``). Needs Redis ≥ 6.2 (exclusive stream ranges); a cluster, ≥ 7.0 (sharded pub/sub).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import deque
from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from ..protocol import AnyEvent, Compacted, TurnEnd, encode
from .base import AppendDone, EventLog, LiveFeed, Record, StoreError, _Listener, stamp

try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import RedisCluster
    from redis.crc import key_slot
    from redis.exceptions import AskError, AuthenticationError, ClusterDownError, MasterDownError, MovedError
    from redis.exceptions import NoScriptError, RedisError, ResponseError, TryAgainError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise StoreError("the Redis store needs the redis package: pip install 'turnline[redis]'") from exc

log = logging.getLogger("turnline.store.redis")

READ_CHUNK = 1000  # entries per XRANGE
XREAD_COUNT = 1000  # entries per stream per XREAD
CONFLICT_RETRIES = 100  # also bounds how often one append is redirected (cluster)
REDIRECT_PAUSE_S = 0.05  # before retrying a call a cluster answered TRYAGAIN or CLUSTERDOWN
REGISTERED_MAX = 100_000  # sessions remembered as being in the sessions set
# A write's news carries its records when they take at most this many bytes
# (else only its last seq: the readers read the stream, and a big turn-end
# does not sit in every gateway's pub/sub buffer).
NEWS_RECORDS_MAX = 64 * 1024
_CARRY, _NO_CARRY = b"$1\r\n1\r\n", b"$1\r\n0\r\n"  # the script's carry flag, in RESP
_tuple_new = tuple.__new__

# One call appends for any number of sessions, each atomically and on its own.
# KEYS: per session: log, seq, lease, ended.
# ARGV: per session: fence ("" = none), first seq, n, m, carry ("1": the news
# carries the records), then n event JSONs and m (score, member) pairs for :ended.
# Returns per session: status (0 written, 1 seq conflict, 2 fenced), last seq.
# A write is announced on the session's news channel ({prefix}:{<session>}:news,
# made from the log key's name: key() and the script change together):
# "<first seq>\n<JSON>\n<JSON>…" (the records: event JSON holds no raw
# newline), or "<last seq>" alone; that is how readers learn what to deliver.
_APPEND_LUA = """
local out = {}
local a = 1
for k = 1, #KEYS, 4 do
  local fence, first = ARGV[a], tonumber(ARGV[a + 1])
  local n, m = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local carry = ARGV[a + 4] == '1'
  local base = a + 5
  a = base + n + 2 * m
  local last = tonumber(redis.call('GET', KEYS[k + 1]) or '0')
  if fence ~= '' and redis.call('GET', KEYS[k + 2]) ~= fence then
    out[#out + 1] = 2
  elseif first ~= last + 1 then
    out[#out + 1] = 1
  else
    for i = 0, n - 1 do
      redis.call('XADD', KEYS[k], string.format('%d-0', first + i), 'd', ARGV[base + i])
    end
    last = first + n - 1
    redis.call('SET', KEYS[k + 1], string.format('%d', last))
    for j = base + n, a - 1, 2 do
      redis.call('ZADD', KEYS[k + 3], ARGV[j], ARGV[j + 1])
    end
    local channel = string.sub(KEYS[k], 1, -4) .. 'news'
    if carry then
      local records = table.concat(ARGV, '\\n', base, base + n - 1)
      redis.call('PUBLISH', channel, string.format('%d', first) .. '\\n' .. records)
    else
      redis.call('PUBLISH', channel, last)
    end
    out[#out + 1] = 0
  end
  out[#out + 1] = last
end
return out
"""
# On a cluster the news is sharded: announced on the node that owns the stream.
_APPEND_LUA_SHARDED = _APPEND_LUA.replace("'PUBLISH'", "'SPUBLISH'")

# Our own query parameters in a redis:// URL (the rest go to redis-py).
_URL_OPTIONS = {"prefix": str, "retention_s": float, "wait_replicas": int, "wait_timeout_ms": int,
                "compact_every_s": float, "open_wait_s": float}


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _pack(args: Sequence[bytes | str | int]) -> bytes:
    """One command in RESP. redis-py's own packer costs ~25 µs a command;
    the writer and the reader (thousands of stream keys) pack their own."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if type(a) is str:
            a = a.encode()
        elif type(a) is int:
            a = b"%d" % a
        out.append(_bulk(a))
    return b"".join(out)


async def _exchange(client: Any, commands: list[bytes]) -> list[Any]:
    """Send packed commands in one write and read every reply (an error reply
    is returned as its exception, in its place)."""
    await client.initialize()
    conn = client.connection
    await conn.send_packed_command(b"".join(commands), check_health=False)
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


class StoreConflict(StoreError):
    """The session's last seq was not the one this append continues: another writer appended."""


class Fenced(StoreError):
    """The append named a fence token that is not (or no longer) the session's lease."""


class _Head(msgspec.Struct):
    type: str
    turn_id: str = ""


_head_decoder = msgspec.json.Decoder(_Head)


class _Append:
    __slots__ = ("order", "session", "events", "fence", "numbered", "future", "done", "records", "retries", "ask")

    def __init__(self, order: int, session: str, events: list[AnyEvent], fence: str | None,
                 future: asyncio.Future[list[Record]] | None, done: AppendDone | None = None):
        self.order = order  # call order: acknowledgements follow it
        self.session = session
        self.events = events
        self.fence = fence
        self.numbered = events[0].seq != 0  # the caller gave the seqs
        self.future = future  # the caller's: append_soon
        self.done = done  # or its callback: append_then
        self.records: list[Record] = []
        self.retries = 0
        self.ask: str | None = None  # (cluster) the node an ASK redirected this append to

    def settle(self, error: BaseException | None = None) -> None:
        """Hand the caller its records (or ``error``), once."""
        done = self.done
        if done is not None:
            self.done = None
            try:
                if error is None:
                    done(self.records, None)
                else:
                    done(None, error)
            except Exception:
                log.exception("an append's callback failed")
        elif self.future is not None and not self.future.done():
            if error is None:
                self.future.set_result(self.records)
            else:
                self.future.set_exception(error)
                self.future.exception()  # a cancelled caller never retrieves it


class _Group:
    """One session's appends in one writer round (written all or nothing)."""

    __slots__ = ("session", "items", "fence", "numbered", "records", "ask")

    def __init__(self, item: _Append):
        self.session = item.session
        self.items = [item]
        self.fence = item.fence
        self.numbered = item.numbered
        self.records: list[Record] = []
        self.ask = item.ask

    def accepts(self, item: _Append) -> bool:
        if item.fence != self.fence or item.numbered != self.numbered or item.ask != self.ask:
            return False
        if self.numbered:
            last = self.items[-1].events
            return item.events[0].seq == last[-1].seq + 1
        return True


class _Call:
    """One script call of a writer round: groups whose keys share a slot (on a
    single Redis, every group of the round)."""

    __slots__ = ("groups", "asking")

    def __init__(self, asking: bool):
        self.groups: list[_Group] = []
        self.asking = asking  # sent after ASKING: the slot is being imported by this node


class _Node:
    """One Redis primary (the single Redis, or one of a cluster's): the
    writer's and the reader's connections, each used by one task only."""

    __slots__ = ("addr", "writer", "reader")

    def __init__(self, addr: str, writer: Any, reader: Any):
        self.addr = addr
        self.writer = writer
        self.reader = reader

    async def close(self) -> None:
        await self.reader.aclose()
        await self.writer.aclose()


class _NewsLink:
    """One pub/sub connection: to the single Redis, or to one cluster primary
    (sharded: a stream's news is announced on the node that owns its slot).
    Each message is a write's news (its records, or its last seq);
    confirmations of (S)SUBSCRIBE release the reader, which waits for them
    before it reads a stream it starts to follow."""

    def __init__(self, store: RedisEventLog, addr: str, client: Any, sharded: bool):
        self.store = store
        self.addr = addr
        self.client = client
        self.sharded = sharded
        self.channels: set[bytes] = set()
        self.up = False  # SUBSCRIBEs go to the connection (else its reconnect sends them)
        self.unacked: dict[bytes, int] = {}  # channel -> SUBSCRIBEs sent and not yet confirmed
        self.acked: dict[bytes, asyncio.Future[None]] = {}
        self.task = asyncio.ensure_future(self._run())

    def _commands(self, verb: str, channels: list[bytes]) -> bytes:
        if self.sharded:  # one SSUBSCRIBE may only name channels of one slot
            return b"".join(_pack(("S" + verb, c)) for c in channels)
        return _pack((verb, *channels))

    async def subscribe(self, channels: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        for c in channels:
            self.channels.add(c)
            self.unacked[c] = self.unacked.get(c, 0) + 1
            if c not in self.acked:
                self.acked[c] = loop.create_future()
        if self.up:
            await self.client.connection.send_packed_command(self._commands("SUBSCRIBE", channels),
                                                             check_health=False)

    async def unsubscribe(self, channels: list[bytes]) -> None:
        self.channels.difference_update(channels)
        if self.up:
            await self.client.connection.send_packed_command(self._commands("UNSUBSCRIBE", channels),
                                                             check_health=False)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.aclose()

    async def _run(self) -> None:
        import hiredis

        store = self.store
        backoff = 0.05
        while not store._closing:
            try:
                await self.client.initialize()
                conn = self.client.connection
                await conn.connect()  # (again, after a drop)
                # From here SUBSCRIBEs go to this connection; the channels named
                # before are subscribed to here (pending confirmations then wait for this one).
                self.up = True
                channels = list(self.channels)
                self.unacked = dict.fromkeys(channels, 1)
                if channels:
                    await conn.send_packed_command(self._commands("SUBSCRIBE", channels), check_health=False)
                # Whatever was written while we were not listening is read now.
                store._news.update(s for c in channels if (s := store._key_sessions.get(c)) in store._cursor)
                store._stirred.set()
                parser = hiredis.Reader()
                stream = conn._reader  # redis-py's asyncio.StreamReader: replies are parsed here in bulk
                backoff = 0.05
                while True:
                    data = await stream.read(1 << 16)
                    if not data:
                        raise ConnectionError("the news connection was closed")
                    parser.feed(data)
                    self._on_news(parser)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if store._closing:
                    return
                self.up = False
                log.warning("stream news (%s): %r; reconnecting", self.addr or store.url, exc)
                with contextlib.suppress(Exception):
                    await self.client.connection.disconnect()
                if store.cluster:
                    store._topology_stale = True  # the node may be gone: the reader looks again
                    store._stirred.set()
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)

    def _on_news(self, parser: Any) -> None:
        store = self.store
        sessions = store._key_sessions
        cursor = store._cursor
        news = store._news
        while (msg := parser.gets()) is not False:
            if isinstance(msg, Exception):  # an SSUBSCRIBE refused (MOVED): our slot map is stale
                self._refused(msg)
                continue
            kind = msg[0]
            if kind == b"message" or kind == b"smessage":
                session = sessions.get(msg[1])
                if session is not None:
                    self._news_of(session, msg[2], cursor, news)
            elif kind == b"subscribe" or kind == b"ssubscribe":
                channel = msg[1]
                left = self.unacked.get(channel, 0) - 1
                if left <= 0:
                    self.unacked.pop(channel, None)
                    fut = self.acked.pop(channel, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                else:
                    self.unacked[channel] = left
            elif kind == b"sunsubscribe" and msg[1] in self.channels:
                # Not ours: the slot moved to another node. (A late reply to
                # our own SUNSUBSCRIBE of a channel followed again meanwhile
                # lands here too; moving it to where it already is is harmless.)
                self.channels.discard(msg[1])
                session = sessions.get(msg[1])
                if session is not None:
                    store._rehome.add(session)
                    store._topology_stale = True
                    store._followers_changed = True
        if news or store._followers_changed:
            store._stirred.set()

    def _news_of(self, session: str, payload: bytes, cursor: dict[str, int], news: set[str]) -> None:
        """Deliver the records a write's news carries when they continue what
        the feed delivered; else (news of the last seq only, a session not
        started yet, or a gap: news lost with a connection) the reader reads
        the stream."""
        last = cursor.get(session)
        head = payload.find(b"\n")
        try:
            first = int(payload[:head] if head >= 0 else payload)
        except ValueError:  # not ours (someone else published on the channel)
            news.add(session)
            return
        if last is None or head < 0 or first > last + 1:
            # Not started yet, news of a last seq only (new, or read already?), or a gap.
            if last is None or first > last:
                news.add(session)
            return
        data = payload[head + 1:].split(b"\n")
        self.store._hand_on(session, last, [_tuple_new(Record, (first + i, d)) for i, d in enumerate(data)])

    def _refused(self, error: Exception) -> None:
        """The reply does not say which channel was refused: every one not yet
        confirmed is dropped, and the reader subscribes to them again once it
        has read the slot map anew."""
        log.info("news subscription refused by %s: %s", self.addr, error)
        store = self.store
        for channel in list(self.unacked):
            self.channels.discard(channel)
            if (session := store._key_sessions.get(channel)) is not None:
                store._rehome.add(session)
            fut = self.acked.pop(channel, None)
            if fut is not None and not fut.done():
                fut.set_exception(StoreError(f"news subscription refused: {error}"))
                fut.exception()  # (retrieved: its waiter may be gone)
        self.unacked.clear()
        store._topology_stale = True
        store._followers_changed = True


class _RedisFeed(LiveFeed):
    """The live feed, telling the reader when a session gains its first follower or loses its last."""

    def __init__(self, on_change: Any) -> None:
        super().__init__()
        self._on_change = on_change

    def subscribe(self, session: str) -> _Listener:
        first = session not in self._listeners
        listener = super().subscribe(session)
        if first:
            self._on_change()
        return listener

    def unsubscribe(self, session: str, listener: _Listener) -> None:
        super().unsubscribe(session, listener)
        if session not in self._listeners:
            self._on_change()

    def followed(self) -> dict[str, set[_Listener]]:
        return self._listeners


def _node_addr(host: str, port: int | bytes) -> str:
    """``host:port`` as a URL's netloc (an IPv6 host in brackets): how nodes are named here."""
    port = port.decode() if isinstance(port, bytes) else port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_url(url: str) -> tuple[str, dict[str, Any]]:
    parts = urlsplit(url)
    ours: dict[str, Any] = {}
    rest = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in _URL_OPTIONS:
            ours[k] = None if v in ("", "none", "None") else _URL_OPTIONS[k](v)
        else:
            rest.append((k, v))
    return urlunsplit(parts._replace(query=urlencode(rest))), ours


class RedisEventLog(EventLog):
    """An event log on Redis Streams (see the module docstring for the layout).

    ``retention_s``: compact chunks of turns ended longer ago than this (None:
    keep everything). ``wait_replicas``: after each write round, ``WAIT`` for
    that many replicas (``wait_timeout_ms``) before acknowledging; fewer
    confirmations fail the appends with :class:`StoreError` (the events are on
    the primary; they were not acknowledged). ``open_wait_s``: how long
    ``open`` keeps trying to reach Redis (processes started together, as from a
    Procfile, may start before Redis listens). ``sweep_ms``: how often the
    reader also reads every followed stream, news or not (a safety net; news
    lost with a dropped connection is made good at once, by reading them all).
    ``max_connections``
    bounds the command pool (the reader has its own connection). Other keyword options
    go to ``redis.asyncio.Redis.from_url``. Options may also be given in the
    URL's query: ``redis://host:6379/0?prefix=tl&retention_s=3600``.
    """

    def __init__(self, url: str, *, prefix: str = "tl", retention_s: float | None = 3600,
                 wait_replicas: int = 0, wait_timeout_ms: int = 1000, compact_every_s: float | None = None,
                 batch_max: int = 2048, sweep_ms: int = 5000, max_connections: int = 64,
                 open_wait_s: float = 10.0, **options: Any) -> None:
        super().__init__()
        self.feed = _RedisFeed(self._on_followers_changed)
        url, from_url = _split_url(url)
        prefix = from_url.pop("prefix", prefix)
        retention_s = from_url.pop("retention_s", retention_s)
        wait_replicas = from_url.pop("wait_replicas", wait_replicas)
        wait_timeout_ms = from_url.pop("wait_timeout_ms", wait_timeout_ms)
        compact_every_s = from_url.pop("compact_every_s", compact_every_s)
        self.open_wait_s = from_url.pop("open_wait_s", open_wait_s)
        if not prefix or "{" in prefix or "}" in prefix:
            raise StoreError(f"bad key prefix {prefix!r}")
        if retention_s is not None and retention_s < 0:
            raise StoreError("retention_s must be ≥ 0 (or None to keep everything)")
        if batch_max < 1:
            raise StoreError("batch_max must be at least 1")
        self.url = url
        self.prefix = prefix
        self.retention_s = retention_s
        self.wait_replicas = int(wait_replicas or 0)
        self.wait_timeout_ms = int(wait_timeout_ms)
        self.compact_every_s = compact_every_s if compact_every_s is not None else (
            None if retention_s is None else min(300.0, max(1.0, retention_s / 10)))
        self.batch_max = batch_max
        self.sweep_s = sweep_ms / 1000
        self.max_connections = max_connections
        self.options = options
        self.instance = uuid.uuid4().hex
        self.sessions_key = f"{prefix}:sessions"
        self.reader_name = f"turnline-reader-{self.instance}"
        self.news_name = f"turnline-news-{self.instance}"

        self.cluster = False  # set by open(): the Redis at the URL is a cluster node
        self._redis: Any = None  # redis-py's client: Redis, or RedisCluster on a cluster
        self._script = _APPEND_LUA
        self._sha = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        # nodes: one ("") on a single Redis, one per primary ("host:port") on a cluster
        self._nodes: dict[str, _Node] = {}
        self._links: dict[str, _NewsLink] = {}
        self._slot_addr: list[str] = []  # (cluster) slot -> the primary that owns it
        self._topology_stale = False  # (cluster) a node redirected us or failed: read the slot map again
        self._topology_lock = asyncio.Lock()
        self._read_slots: asyncio.Semaphore | None = None  # (cluster) bounds concurrent catch-up reads
        self._held: set[str] = set()  # (cluster) sessions whose appends wait to be retried (TRYAGAIN)
        # writer
        self._queue: deque[_Append] = deque()
        self._calls = 0
        self._queued = asyncio.Event()
        self._next: dict[str, int] = {}  # next seq to give unnumbered events, per session
        self._registered: set[str] = set()  # sessions this instance added to the sessions set
        self._writer: asyncio.Task[None] | None = None
        # reader
        self._cursor: dict[str, int] = {}  # per followed session: the last seq handed to the feed
        self._log_keys: dict[str, bytes] = {}  # followed (or being subscribed) session -> its stream key
        self._channels: dict[str, bytes] = {}  # followed (or being subscribed) session -> its news channel
        self._key_sessions: dict[bytes, str] = {}  # stream keys and news channels -> their session
        self._key_resp: dict[str, bytes] = {}  # followed session -> its stream key in RESP
        self._write_keys: dict[str, bytes] = {}  # session -> its four keys in RESP, as the script takes them
        self._session_link: dict[str, _NewsLink] = {}  # followed session -> the link its news comes on
        self._rehome: set[str] = set()  # (cluster) followed sessions whose slot moved: subscribe anew
        self._news: set[str] = set()  # followed sessions whose streams may hold unread entries
        self._stirred = asyncio.Event()  # news, a new follower, or closing
        self._followers_changed = False  # a session gained its first follower or lost its last
        self._reader: asyncio.Task[None] | None = None
        self._synced: dict[str, list[asyncio.Future[None]]] = {}
        self._compactor: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ names

    def key(self, session: str, kind: str) -> str:
        """The Redis key of one of a session's structures: ``log``, ``seq``, ``lease``, ``ended``."""
        return f"{self.prefix}:{{{session}}}:{kind}"

    # ------------------------------------------------------------ lifecycle

    def _client(self, url: str | None = None, *, cluster: bool = False, **extra: Any) -> Any:
        options = {**self.options, **extra}
        url = url or self.url
        if cluster:
            client = RedisCluster.from_url(url, **options)
        elif options.get("single_connection_client"):
            client = aioredis.Redis.from_url(url, **options)
        else:
            # Bounded, and callers wait for a free connection: thousands of
            # followers catching up at once queue here instead of opening
            # thousands of connections (or failing).
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=self.max_connections, timeout=None, **options)
            client = aioredis.Redis(connection_pool=pool)
        # Raw replies: stream entries stay [id, [field, value]] lists of bytes.
        for cmd in ("XRANGE", "XREVRANGE", "XREAD"):
            client.set_response_callback(cmd, lambda r, **_: r)
        return client

    def _node_url(self, addr: str) -> str:
        """The store's URL (its credentials and options) pointed at node ``addr`` ("" = the URL's own)."""
        if not addr:
            return self.url
        parts = urlsplit(self.url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{addr}" if at else addr))

    def _node(self, addr: str) -> _Node:
        node = self._nodes.get(addr)
        if node is None:
            url = self._node_url(addr)
            node = self._nodes[addr] = _Node(addr, self._client(url, single_connection_client=True),
                                             self._client(url, single_connection_client=True,
                                                          client_name=self.reader_name))
        return node

    def _link(self, addr: str) -> _NewsLink:
        link = self._links.get(addr)
        if link is None:
            # RESP2: pub/sub messages are plain arrays, parsed in bulk.
            client = self._client(self._node_url(addr), single_connection_client=True, socket_timeout=None,
                                  client_name=self.news_name, protocol=2)
            link = self._links[addr] = _NewsLink(self, addr, client, sharded=self.cluster)
        return link

    def _addr_of(self, key: bytes) -> str:
        """The node that owns ``key``'s slot ("" on a single Redis)."""
        return self._slot_addr[key_slot(key)] if self.cluster else ""

    async def open(self) -> None:
        if self._loop is not None:
            raise StoreError("RedisEventLog.open() was already called (a closed log is not reopened: make a new one)")
        probe = self._client()
        deadline = time.monotonic() + self.open_wait_s
        delay = 0.05
        while True:
            try:
                info = await probe.info("cluster")
                break
            except RedisError as exc:
                unreachable = isinstance(exc, (RedisConnectionError, RedisTimeoutError)) and not isinstance(
                    exc, AuthenticationError)
                if not unreachable or time.monotonic() + delay > deadline:
                    await probe.aclose()
                    raise StoreError(f"cannot reach Redis at {self.url}: {exc}") from exc
                log.warning("Redis at %s does not answer yet (%s); trying again", self.url, exc)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        self.cluster = bool(info.get("cluster_enabled"))
        self._loop = asyncio.get_running_loop()
        if self.cluster:
            await probe.aclose()
            self._redis = self._client(cluster=True)
            self._read_slots = asyncio.Semaphore(self.max_connections)
            self._script = _APPEND_LUA_SHARDED
            try:
                # Before any command: a RedisCluster not yet initialized sends
                # concurrent first commands all to one node.
                await self._redis.initialize()
                await self._refresh_topology()
            except (RedisError, StoreError) as exc:
                await self._redis.aclose()
                raise StoreError(f"cannot read the slot map of the Redis Cluster at {self.url}: {exc}") from exc
        else:
            self._redis = probe
            self._link("")
        # Loaded on a node when it first answers NOSCRIPT (each node of a cluster has its own cache).
        self._sha = hashlib.sha1(self._script.encode()).hexdigest()
        self._evalsha_resp = _bulk(b"EVALSHA") + _bulk(self._sha.encode())
        self._writer = asyncio.ensure_future(self._run_writer())
        self._reader = asyncio.ensure_future(self._run_reader())
        if self.retention_s is not None and self.compact_every_s:
            self._compactor = asyncio.ensure_future(self._run_compactor())

    async def _refresh_topology(self) -> None:
        """(cluster) Read which primary owns each slot (``CLUSTER SLOTS``, from
        the first node that answers); followed sessions whose slot moved get
        their news subscribed anew on the new owner."""
        async with self._topology_lock:
            self._topology_stale = False
            own = urlsplit(self.url).netloc.rpartition("@")[2]
            reply: Any = None
            failure: Exception | None = None
            for addr in dict.fromkeys([*filter(None, self._slot_addr), own]):
                client = self._client(self._node_url(addr), single_connection_client=True)
                try:
                    (reply,) = await _exchange(client, [_pack(("CLUSTER", "SLOTS"))])
                    if isinstance(reply, Exception):
                        raise reply
                    asked = addr.rpartition(":")[0]
                    break
                except (RedisError, OSError) as exc:
                    failure = exc
                finally:
                    await client.aclose()
            else:
                raise StoreError(f"no Redis Cluster node answers CLUSTER SLOTS: {failure}")
            owners = [""] * 16384  # (a slot no node serves: its calls go to the URL's node and are retried)
            for first, last, primary, *_ in reply:
                host = primary[0].decode() if primary[0] not in (b"", b"?") else asked
                owners[first:last + 1] = [_node_addr(host, primary[1])] * (last - first + 1)
            self._slot_addr = owners
            moved = {s for s, link in self._session_link.items() if link.addr != self._addr_of(self._log_keys[s])}
            if moved:
                self._rehome |= moved
                self._followers_changed = True
                self._stirred.set()

    async def close(self) -> None:
        """Write every append already made, stop the tasks and disconnect."""
        if self._loop is None or self._closing:
            return
        self._closing = True
        self._queued.set()
        self._stirred.set()
        if self._writer is not None:
            await asyncio.shield(self._writer)
        tasks = [t for t in (self._reader, self._compactor) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self._links.values():
            await link.close()
        for node in self._nodes.values():
            await node.close()
        await self._redis.aclose()

    def _check_open(self) -> None:
        if self._loop is None:
            raise StoreError("RedisEventLog is not open")
        if self._closing:
            raise StoreError("RedisEventLog is closed")

    # ------------------------------------------------------------ writes

    async def append(self, session: str, events: Sequence[AnyEvent], *, fence: str | None = None) -> list[Record]:
        # Shielded: a caller cancelled while waiting does not withdraw the append.
        return await asyncio.shield(self.append_soon(session, events, fence=fence))

    def append_soon(self, session: str, events: Sequence[AnyEvent], *,
                    fence: str | None = None) -> asyncio.Future[list[Record]]:
        future: asyncio.Future[list[Record]] = self._loop.create_future()  # type: ignore[union-attr]
        self._enqueue(session, events, fence, future, None)
        return future

    def append_then(self, session: str, events: Sequence[AnyEvent], done: AppendDone, *,
                    fence: str | None = None) -> None:
        self._enqueue(session, events, fence, None, done)

    def _enqueue(self, session: str, events: Sequence[AnyEvent], fence: str | None,
                 future: asyncio.Future[list[Record]] | None, done: AppendDone | None) -> None:
        self._check_open()
        if not events:  # nothing to write: stored
            if done is not None:
                done([], None)
            else:
                future.set_result([])  # type: ignore[union-attr]
            return
        events = list(events)
        if len(events) > 1 and events[0].seq != 0 and any(ev.seq != events[0].seq + i for i, ev in enumerate(events)):
            raise StoreError("events given with seqs must carry consecutive seqs")
        self._calls += 1
        self._queue.append(_Append(self._calls, session, events, fence, future, done))
        self._queued.set()

    async def _run_writer(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                groups = self._take_round()
                if not groups:  # what is queued belongs to held sessions: their release stirs us
                    break
                try:
                    await self._write_round(groups)
                except Exception as exc:  # never leave an append waiting
                    log.exception("redis append round failed")
                    self._fail(groups, StoreError(f"append failed: {exc!r}"))
                if self._topology_stale:
                    try:
                        await self._refresh_topology()
                    except StoreError as exc:
                        log.warning("%s; the next round tries again", exc)
                        self._topology_stale = True
                        await asyncio.sleep(REDIRECT_PAUSE_S)
            if self._closing and not self._queue and not self._held:
                return

    def _take_round(self) -> list[_Group]:
        """Take queued appends for one pipeline: per session, the longest run
        (in call order) that one Lua call can write; later ones wait their turn."""
        groups: dict[str, _Group] = {}
        waiting: set[str] = set()
        rest: deque[_Append] = deque()
        size = 0
        queue = self._queue
        while queue:
            if size >= self.batch_max:  # the rest waits for the next round, in order
                rest.extend(queue)
                queue.clear()
                break
            item = queue.popleft()
            s = item.session
            if s in waiting or s in self._held:
                rest.append(item)
                continue
            group = groups.get(s)
            if group is None:
                groups[s] = _Group(item)
            elif group.accepts(item):
                group.items.append(item)
            else:
                waiting.add(s)
                rest.append(item)
                continue
            size += len(item.events)
        self._queue = rest
        return list(groups.values())

    def _route(self, groups: list[_Group]) -> dict[str, list[_Call]]:
        """The round's script calls, per node: one call on a single Redis, one per slot on a cluster."""
        if not self.cluster:
            call = _Call(asking=False)
            call.groups = groups
            return {"": [call]}
        calls: dict[tuple[str, int], _Call] = {}
        for g in groups:
            slot = key_slot(self.key(g.session, "log").encode())
            addr = g.ask or self._slot_addr[slot]
            call = calls.get((addr, slot))
            if call is None:
                call = calls[addr, slot] = _Call(asking=g.ask is not None)
            call.groups.append(g)
        by_node: dict[str, list[_Call]] = {}
        for (addr, _slot), call in calls.items():
            by_node.setdefault(addr, []).append(call)
        return by_node

    async def _get_all(self, keys: list[str]) -> list[Any]:
        if self.cluster:  # keys of many slots
            return await self._redis.mget_nonatomic(keys)
        return await self._redis.mget(keys)

    async def _write_round(self, groups: list[_Group]) -> None:
        unknown = [g.session for g in groups if not g.numbered and g.session not in self._next]
        if unknown:
            values = await self._get_all([self.key(s, "seq") for s in unknown])
            for s, v in zip(unknown, values):
                self._next.setdefault(s, int(v or 0) + 1)
        for g in groups:
            first = g.items[0].events[0].seq if g.numbered else self._next[g.session]
            g.records = []
            for item in g.items:
                item.records = stamp(item.events, first)
                first += len(item.records)
                g.records.extend(item.records)
        new = [g.session for g in groups if g.session not in self._registered]
        head: list[bytes] = []
        if new and self.cluster:
            # The set has a slot of its own: it is written before the scripts
            # (so it never misses a session that exists).
            try:
                await self._redis.sadd(self.sessions_key, *new)
            except RedisError as exc:
                self._fail(groups, StoreError(f"redis append failed (registering the session): {exc}"))
                return
            self._register(new)
        elif new:
            head = [_pack(("SADD", self.sessions_key, *new))]
        by_node = self._route(groups)
        results = await asyncio.gather(*(self._send(addr, calls, head) for addr, calls in by_node.items()),
                                       return_exceptions=True)
        retry: list[_Append] = []
        written: list[_Append] = []
        unloaded: set[str] = set()  # nodes that answered NOSCRIPT
        for (addr, calls), result in zip(by_node.items(), results):
            if isinstance(result, BaseException):
                if not isinstance(result, (RedisError, OSError)):
                    raise result
                lost = [g for call in calls for g in call.groups]
                for g in lost:
                    self._next.pop(g.session, None)
                self._fail(lost, StoreError(f"redis append failed (the events may or may not be stored): {result}"))
                self._topology_stale = self.cluster  # the node may have failed over
                continue
            head_replies, outcomes, replicated = result
            if head_replies and not isinstance(head_replies[0], Exception):
                self._register(new)
            for call, outcome in zip(calls, outcomes):
                if isinstance(outcome, NoScriptError):  # a node's first write, or it lost its cache (restart, SCRIPT FLUSH)
                    unloaded.add(addr)
                    retry += [item for g in call.groups for item in g.items]
                elif isinstance(outcome, (MovedError, AskError, TryAgainError, ClusterDownError, MasterDownError)):
                    retry += self._redirected(call, outcome)
                elif isinstance(outcome, Exception):
                    for g in call.groups:
                        self._next.pop(g.session, None)
                    self._fail(call.groups, StoreError(f"redis append failed: {outcome}"))
                else:
                    self._settle(call.groups, outcome, replicated, written, retry)
        written.sort(key=lambda item: item.order)
        for item in written:
            item.settle()
        # Once per node, and after the written appends are acknowledged: a
        # load that fails leaves its calls to fail or succeed on their retry.
        for addr in unloaded:
            try:
                await _exchange(self._node(addr).writer, [_pack(("SCRIPT", "LOAD", self._script))])
            except (RedisError, OSError) as exc:
                log.warning("loading the append script on %s: %s", addr or self.url, exc)
        self._requeue(retry)

    def _requeue(self, items: list[_Append]) -> None:
        """Queue appends to be written again, ahead of what was queued after them."""
        if not items:
            return
        items.sort(key=lambda item: item.order)
        for item in items:
            if not item.numbered:
                for ev in item.events:
                    ev.seq = 0
        self._queue.extendleft(reversed(items))
        self._queued.set()

    def _unhold(self, items: list[_Append]) -> None:
        self._held.difference_update(item.session for item in items)
        self._requeue(items)

    def _register(self, sessions: list[str]) -> None:
        if len(self._registered) > REGISTERED_MAX:  # bounded memory; SADD again is harmless
            self._registered.clear()
        self._registered.update(sessions)

    async def _send(self, addr: str, calls: list[_Call], head: list[bytes]) -> tuple[list[Any], list[Any], bool]:
        """Send one node's script calls (after ``head``) in one write. Returns
        the replies to ``head``, one outcome per call, and whether the
        replicas confirmed (``wait_replicas``)."""
        commands = list(head)
        for call in calls:
            if call.asking:
                commands.append(_pack(("ASKING",)))
            commands.append(self._append_command(call.groups))
        if self.wait_replicas:
            commands.append(_pack(("WAIT", self.wait_replicas, self.wait_timeout_ms)))
        replies = await _exchange(self._node(addr).writer, commands)
        replicated = True
        if self.wait_replicas:
            acked = replies.pop()
            replicated = isinstance(acked, int) and acked >= self.wait_replicas
        outcomes = []
        i = len(head)
        for call in calls:
            i += call.asking
            outcomes.append(replies[i])
            i += 1
        return replies[:len(head)], outcomes, replicated

    def _redirected(self, call: _Call, error: Exception) -> list[_Append]:
        """A cluster did not run the call (its slot moved, is moving, or the
        cluster is down): the appends go again, within the retry bound."""
        ask = None
        if isinstance(error, MovedError):
            self._topology_stale = True
        elif isinstance(error, AskError):
            ask = _node_addr(error.host, error.port)
        again: list[_Append] = []
        for g in call.groups:
            items = g.items
            for item in items:
                item.retries += 1
                item.ask = ask
            if any(item.retries > CONFLICT_RETRIES for item in items):
                self._next.pop(g.session, None)
                self._fail([g], StoreError(f"session {g.session!r}: the cluster kept redirecting the append: {error}"))
            else:
                again += items
        if again and not isinstance(error, (MovedError, AskError)):
            # TRYAGAIN (a slot's keys are between two nodes) or a cluster that
            # is down: these sessions wait a moment; their later appends
            # wait with them (order), the other sessions' do not.
            self._held.update(item.session for item in again)
            self._loop.call_later(REDIRECT_PAUSE_S, self._unhold, again)  # type: ignore[union-attr]
            return []
        return again

    def _settle(self, groups: list[_Group], outcome: list[int], replicated: bool,
                written: list[_Append], retry: list[_Append]) -> None:
        """Apply one script call's per-session statuses."""
        for i, g in enumerate(groups[:len(outcome) // 2]):
            status, last = outcome[2 * i], outcome[2 * i + 1]
            if status == 0:
                if not g.numbered or g.session in self._next:  # kept only for sessions written unnumbered
                    self._next[g.session] = last + 1
                if not replicated:
                    self._fail([g], StoreError(
                        f"append not confirmed by {self.wait_replicas} replica(s) within {self.wait_timeout_ms} ms"))
                    continue
                self._publish_own(g.session, g.records)
                written.extend(g.items)
            elif status == 2:
                self._fail([g], Fenced(f"session {g.session!r}: the lease is not held by this fence token"))
            else:
                if not g.numbered or g.session in self._next:
                    self._next[g.session] = last + 1
                if g.numbered:
                    self._fail([g], StoreConflict(
                        f"session {g.session!r}: append at seq {g.records[0].seq}, but the last seq is {last}"))
                    continue
                for item in g.items:
                    item.retries += 1
                    if item.retries > CONFLICT_RETRIES:
                        self._fail([g], StoreConflict(f"session {g.session!r}: too many concurrent writers"))
                        break
                else:
                    retry.extend(g.items)

    def _append_command(self, groups: list[_Group]) -> bytes:
        """The script call for ``groups``, packed as RESP (the writer's hot
        path: built directly, the four keys of a session packed once)."""
        body: list[bytes] = []
        count = 3
        for g in groups:
            keys = self._write_keys.get(g.session)
            if keys is None:
                if len(self._write_keys) > REGISTERED_MAX:
                    self._write_keys.clear()
                keys = self._write_keys[g.session] = b"".join(
                    _bulk(self.key(g.session, kind).encode()) for kind in ("log", "seq", "lease", "ended"))
            body.append(keys)
        for g in groups:
            records = g.records
            ended = [(ev.ts, f"{ev.seq}:{ev.turn_id}") for item in g.items for ev in item.events
                     if type(ev) is TurnEnd]
            data = [r.data for r in records]
            carry = sum(map(len, data)) <= NEWS_RECORDS_MAX and not any(b"\n" in d for d in data)
            body += (_bulk(g.fence.encode() if g.fence else b""), _bulk(b"%d" % records[0].seq),
                     _bulk(b"%d" % len(records)), _bulk(b"%d" % len(ended)), _CARRY if carry else _NO_CARRY)
            body += [_bulk(d) for d in data]
            for score, member in ended:
                body += (_bulk(b"%d" % score), _bulk(member.encode()))
            count += 4 + 5 + len(records) + 2 * len(ended)
        return b"*%d\r\n%b%b%b" % (count, self._evalsha_resp, _bulk(b"%d" % (4 * len(groups))), b"".join(body))

    @staticmethod
    def _fail(groups: list[_Group], error: StoreError) -> None:
        for g in groups:
            for item in g.items:
                item.settle(error)

    def _publish_own(self, session: str, records: list[Record]) -> None:
        # Our own commit continues what the feed delivered: hand it to local
        # followers now instead of after the reader's round trip.
        cursor = self._cursor.get(session)
        if cursor is not None and records and records[0].seq == cursor + 1:
            self._cursor[session] = records[-1].seq
            self.feed.publish(session, records)

    # ------------------------------------------------------------ reads

    async def read(self, session: str, after: int = 0, limit: int | None = None) -> list[Record]:
        self._check_open()
        key = self.key(session, "log")
        cursor = max(0, after)
        out: list[Record] = []
        while limit is None or len(out) < limit:
            n = READ_CHUNK if limit is None else min(READ_CHUNK, limit - len(out))
            try:
                async with self._read_slots or contextlib.nullcontext():
                    entries = await self._redis.execute_command(
                        "XRANGE", key, f"({cursor}-0" if cursor else "-", "+", "COUNT", n)
            except RedisError as exc:
                raise StoreError(f"reading {session!r} failed: {exc}") from exc
            for eid, fields in entries:
                seq = int(eid[:-2])
                if seq != cursor + 1:
                    out.append(Record(seq - 1, encode(Compacted(seq=seq - 1, first=cursor + 1))))
                    if limit is not None and len(out) >= limit:
                        return out
                out.append(_tuple_new(Record, (seq, fields[1])))
                cursor = seq
                if limit is not None and len(out) >= limit:
                    return out
            if len(entries) < n:
                break
        return out

    async def last_seq(self, session: str) -> int:
        self._check_open()
        try:
            value = await self._redis.get(self.key(session, "seq"))
        except RedisError as exc:
            raise StoreError(f"reading the last seq of {session!r} failed: {exc}") from exc
        return int(value or 0)

    async def sessions(self) -> list[str]:
        self._check_open()
        return [s.decode() for s in await self._redis.smembers(self.sessions_key)]

    # ------------------------------------------------------------ the live feed

    async def feed_synced(self, session: str) -> None:
        """Wait until the reader follows ``session`` (it must have a follower). For tests and benchmarks."""
        if session in self._cursor:
            return
        fut = asyncio.get_running_loop().create_future()
        self._synced.setdefault(session, []).append(fut)
        await fut

    def _on_followers_changed(self) -> None:
        self._followers_changed = True
        self._stirred.set()

    async def _run_reader(self) -> None:
        backoff = 0.05
        next_sweep = time.monotonic() + self.sweep_s
        while not self._closing:  # (redis-py may turn a cancellation into a ConnectionError)
            try:
                if self._topology_stale:
                    await self._refresh_topology()
                await self._sync_followed()
                if self._closing:
                    return
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_s
                    self._news.update(self._cursor)
                if not self._news:
                    self._stirred.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stirred.wait(), self.sweep_s if self._cursor else None)
                    continue
                news = [s for s in self._news if s in self._cursor]
                self._news.clear()
                if news:
                    await self._read_news(news)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                log.warning("stream reader: %r; retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                self._followers_changed = True  # a sync cut short is done again
                self._news.update(self._cursor)
                self._topology_stale = self.cluster

    async def _read_news(self, news: list[str]) -> None:
        """Read the streams ``news`` names from their cursors and hand the entries to the feed."""
        if not self.cluster:
            (reply,) = await _exchange(self._node("").reader, [self._xread_command(news)])
            if isinstance(reply, Exception):
                raise reply
            if reply:
                self._deliver(reply)
            return
        by_node: dict[str, list[str]] = {}
        for s in news:  # one XREAD per stream: one may only name keys of one slot
            by_node.setdefault(self._addr_of(self._log_keys[s]), []).append(s)
        nodes = list(by_node.items())
        results = await asyncio.gather(
            *(_exchange(self._node(addr).reader, [self._xread_command([s]) for s in sessions])
              for addr, sessions in nodes), return_exceptions=True)
        failure: BaseException | None = None
        for (_addr, sessions), replies in zip(nodes, results):
            if isinstance(replies, BaseException):
                failure = failure or replies
                self._news.update(sessions)
                continue
            for s, reply in zip(sessions, replies):
                if isinstance(reply, Exception):
                    failure = failure or reply
                    self._news.add(s)
                elif reply:
                    self._deliver(reply)
        if failure is not None:
            raise failure

    def _xread_command(self, sessions: list[str]) -> bytes:
        """``XREAD COUNT n STREAMS <keys…> <ids…>``, packed from the keys' cached RESP."""
        cursor = self._cursor
        head = _pack(("XREAD", "COUNT", XREAD_COUNT, "STREAMS"))
        parts = [b"*%d\r\n" % (4 + 2 * len(sessions)), head[head.index(b"\r\n") + 2:]]
        parts += [self._key_resp[s] for s in sessions]
        for s in sessions:
            sid = b"%d-0" % cursor[s]
            parts.append(b"$%d\r\n%b\r\n" % (len(sid), sid))
        return b"".join(parts)

    def _deliver(self, reply: Any) -> None:
        cursor = self._cursor
        sessions = self._key_sessions
        # RESP3 answers a map, RESP2 a list of [key, entries] pairs.
        for key, entries in (reply.items() if isinstance(reply, dict) else reply):
            session = sessions.get(key)
            last = cursor.get(session) if session is not None else None
            if last is None:  # no follower any more
                continue
            if len(entries) >= XREAD_COUNT:
                self._news.add(session)  # there may be more
            self._hand_on(session, last, [_tuple_new(Record, (int(eid[:-2]), fields[1])) for eid, fields in entries])

    def _hand_on(self, session: str, last: int, records: list[Record]) -> None:
        """Give the feed ``records`` (consecutive, continuing or overlapping the
        cursor ``last``) past the cursor: those up to it were handed on already
        (by our own append, or by the other of the news and a read)."""
        if records[0].seq <= last:
            records = [r for r in records if r.seq > last]
            if not records:
                return
        self._cursor[session] = records[-1].seq
        self.feed.publish(session, records)

    async def _sync_followed(self) -> None:
        """Make the set the reader follows equal to the sessions with local
        followers: subscribe to a new session's news, and once Redis confirmed
        it, start at its current last seq (so nothing between the two is
        missed). A followed session whose slot moved is subscribed to on its
        new node, and read once that is confirmed."""
        if not self._followers_changed:
            return
        self._followers_changed = False
        followed = self.feed.followed()
        gone = [s for s in self._log_keys if s not in followed]
        if gone:
            unsubscribe: dict[_NewsLink, list[bytes]] = {}
            for s in gone:
                self._cursor.pop(s, None)
                self._key_resp.pop(s, None)
                self._news.discard(s)
                self._rehome.discard(s)
                del self._key_sessions[self._log_keys.pop(s)]
                channel = self._channels.pop(s)
                del self._key_sessions[channel]
                unsubscribe.setdefault(self._session_link.pop(s), []).append(channel)
            for link, channels in unsubscribe.items():
                await link.unsubscribe(channels)
        while True:
            new = [s for s in followed if s not in self._cursor]
            moved = [s for s in self._rehome if s in self._log_keys]
            self._rehome.clear()
            if not new and not moved:
                break
            await self._subscribe(new + moved)
            # (a SUBSCRIBE lost with a news connection is sent again by its reconnect)
            waits = [fut for s in new + moved
                     if (fut := self._session_link[s].acked.get(self._channels[s])) is not None]
            if waits:
                done, pending = await asyncio.wait(waits, timeout=self.sweep_s)
                if pending or any(fut.exception() for fut in done):
                    raise StoreError(f"news subscriptions not confirmed ({len(pending)} within {self.sweep_s} s)"
                                     " or refused")
            self._news.update(s for s in moved if s in self._cursor)
            if not new:
                continue
            values = await self._get_all([self.key(s, "seq") for s in new])
            for s, v in zip(new, values):
                listeners = followed.get(s)
                if listeners is None:
                    continue
                start = int(v or 0)
                self._cursor[s] = start
                key = self._log_keys[s]
                self._key_resp[s] = _bulk(key)
                if start:
                    # A follower that subscribed before this start may have
                    # read the log before it: it re-reads once.
                    for listener in listeners:
                        listener.resync()
                for fut in self._synced.pop(s, ()):
                    if not fut.done():
                        fut.set_result(None)
        if self.cluster:  # a node that owns no slot any more: its news connection goes
            owners = set(self._slot_addr)
            for addr, link in list(self._links.items()):
                if addr not in owners and not link.channels:
                    del self._links[addr]
                    await link.close()

    async def _subscribe(self, sessions: list[str]) -> None:
        """Subscribe to each session's news on the link of the node that owns
        its slot, unless it is (or is being) subscribed there already;
        unsubscribe it where it was, if elsewhere."""
        subscribe: dict[_NewsLink, list[bytes]] = {}
        unsubscribe: dict[_NewsLink, list[bytes]] = {}
        for s in sessions:
            key = self._log_keys.get(s)
            if key is None:
                key = self._log_keys[s] = self.key(s, "log").encode()
                self._key_sessions[key] = s
                channel = self._channels[s] = self.key(s, "news").encode()
                self._key_sessions[channel] = s
            channel = self._channels[s]
            link = self._link(self._addr_of(key))
            old = self._session_link.get(s)
            if old is link and channel in link.channels:
                continue
            if old is not None and old is not link and channel in old.channels:
                unsubscribe.setdefault(old, []).append(channel)
            self._session_link[s] = link
            subscribe.setdefault(link, []).append(channel)
        for link, channels in unsubscribe.items():
            await link.unsubscribe(channels)
        for link, channels in subscribe.items():
            await link.subscribe(channels)

    # ------------------------------------------------------------ retention

    async def compact(self, session: str | None = None, now_ms: int | None = None) -> int:
        """Delete the chunks of turns that ended more than ``retention_s`` ago
        (of one session, or of all). Returns how many events were deleted."""
        self._check_open()
        if self.retention_s is None:
            return 0
        cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - int(self.retention_s * 1000)
        if session is not None:
            return await self._compact_session(session, cutoff)
        removed = 0
        batch: list[str] = []
        async for member in self._redis.sscan_iter(self.sessions_key, count=1000):
            batch.append(member.decode())
            if len(batch) >= 500:
                removed += await self._compact_sessions(batch, cutoff)
                batch = []
        return removed + await self._compact_sessions(batch, cutoff)

    async def _compact_sessions(self, sessions: list[str], cutoff: int) -> int:
        # One round trip finds which of these sessions have turns to compact.
        pipe = self._redis.pipeline(transaction=False)
        for s in sessions:
            pipe.zrangebyscore(self.key(s, "ended"), "-inf", cutoff, start=0, num=1)
        due = [s for s, members in zip(sessions, await pipe.execute()) if members]
        return sum([await self._compact_session(s, cutoff) for s in due])

    async def _compact_session(self, session: str, cutoff: int) -> int:
        ended_key = self.key(session, "ended")
        removed = 0
        while True:
            members = await self._redis.zrangebyscore(ended_key, "-inf", cutoff, start=0, num=256)
            for member in members:
                end_seq, _, turn_id = member.decode().partition(":")
                removed += await self._compact_turn(session, int(end_seq), turn_id)
                await self._redis.zrem(ended_key, member)
            if len(members) < 256:
                return removed

    async def _compact_turn(self, session: str, end_seq: int, turn_id: str) -> int:
        key = self.key(session, "log")
        doomed: list[bytes] = []
        hi = end_seq - 1
        done = False
        while hi > 0 and not done:
            entries = await self._redis.execute_command("XREVRANGE", key, f"{hi}-0", "-", "COUNT", READ_CHUNK)
            for eid, fields in entries:
                head = _head_decoder.decode(fields[1])
                if head.turn_id == turn_id:
                    if head.type == "chunk":
                        doomed.append(eid)
                    elif head.type == "turn-start":
                        done = True
                        break
            if len(entries) < READ_CHUNK:
                break
            hi = int(entries[-1][0][:-2]) - 1
        for i in range(0, len(doomed), READ_CHUNK):
            await self._redis.execute_command("XDEL", key, *doomed[i:i + READ_CHUNK])
        return len(doomed)

    async def _run_compactor(self) -> None:
        assert self.compact_every_s is not None
        lock = f"{self.prefix}:compactor"
        while not self._closing:
            await asyncio.sleep(self.compact_every_s)
            try:
                if await self._redis.set(lock, self.instance, nx=True, px=int(self.compact_every_s * 1000)):
                    n = await self.compact()
                    if n:
                        log.info("compacted %d chunk events", n)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("compaction failed")
