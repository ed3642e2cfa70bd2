"""The per-client limits of a server: sends, cancels and connections.

The settings are :class:`turnline.core.limits.LimitsConfig` (the runtime's
``config.limits``); the arithmetic is :mod:`turnline.core.limits`. Here it
is counted: in this process on one node (:class:`LocalLimiter`), or in Redis
when the server is a gateway of a Redis store (:class:`RedisLimiter`), so
that a client's sends through every gateway draw from one bucket and its
connections to every gateway are counted together. A refusal is a
``CommandError`` ``rate_limited`` naming its ``limit`` and ``retry_after_ms``
(the app answers it as an error frame, or HTTP 429 with ``Retry-After``).

The other limits live where their resource is: turns per session in the
session's hub (``SessionHub.send``: the one writer decides, atomically with
the append), subscriptions per connection on the connection, audio bytes per
second on the voice peer (``turnline.voice.gateway``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import Any, Callable, Coroutine, TypeVar

from ..agent.runtime import CommandError, rate_limited
from ..core.limits import (
    CANCELS, CONNECTIONS, COUNT_RETRY_AFTER_MS, SENDS, SUBSCRIPTIONS, KeyedBuckets, LimitsConfig, Rate,
    retry_after_ms,
)

log = logging.getLogger("turnline.limits")

T = TypeVar("T")

_WHAT = {SENDS: "sends (and regenerates)", CANCELS: "cancels"}


def _over(limit: str, rate: Rate, wait_ms: int) -> CommandError:
    return rate_limited(limit, wait_ms, f"too many {_WHAT[limit]}: {rate.per_s:g}/s with a burst of "
                                        f"{rate.burst:g} per client; retry after {wait_ms} ms")


def check_subscriptions(following: int, limit: int) -> None:
    """A connection following ``following`` sessions may follow one more?"""
    if 0 < limit <= following:
        raise rate_limited(SUBSCRIPTIONS, COUNT_RETRY_AFTER_MS,
                           f"this connection follows {following} sessions, the limit; unsubscribe from one first")


def _too_many_connections(limit: int) -> CommandError:
    return rate_limited(CONNECTIONS, COUNT_RETRY_AFTER_MS,
                        f"this client has {limit} open connections, the limit; close one first")


class Limiter:
    """What the app asks before it runs a client's request. ``take`` raises
    the refusal; ``connect`` returns a slot to give back to ``disconnect``."""

    def __init__(self, config: LimitsConfig):
        self.config = config
        self._rates = {SENDS: config.sends, CANCELS: config.cancels}

    def rate(self, limit: str) -> Rate:
        return self._rates[limit]

    async def take(self, limit: str, client_id: str) -> None:
        raise NotImplementedError

    async def take_then(self, limit: str, client_id: str, work: Coroutine[Any, Any, T]) -> T:
        """``take``, then ``work``'s result (``work`` does not run when refused)."""
        try:
            await self.take(limit, client_id)
        except BaseException:
            work.close()
            raise
        return await work

    async def connect(self, client_id: str) -> Any:
        raise NotImplementedError

    async def disconnect(self, slot: Any) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class LocalLimiter(Limiter):
    """Counted in this process. ``clock`` (seconds, monotonic) may be replaced,
    so that a test moves time instead of waiting for it."""

    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic):
        super().__init__(config)
        self.clock = clock
        self._buckets = {name: KeyedBuckets(rate) for name, rate in self._rates.items() if rate.enabled}
        self._connections: dict[str, int] = {}

    async def take(self, limit: str, client_id: str) -> None:
        buckets = self._buckets.get(limit)
        if buckets is None:
            return
        wait = buckets.take(client_id, self.clock())
        if wait:
            raise _over(limit, buckets.rate, retry_after_ms(wait))

    async def connect(self, client_id: str) -> Any:
        limit = self.config.max_connections_per_client
        count = self._connections.get(client_id, 0)
        if 0 < limit <= count:
            raise _too_many_connections(limit)
        self._connections[client_id] = count + 1
        return client_id

    def connections(self, client_id: str) -> int:
        """The client's open connections, as counted here."""
        return self._connections.get(client_id, 0)

    async def disconnect(self, slot: Any) -> None:
        left = self._connections.get(slot, 0) - 1
        if left > 0:
            self._connections[slot] = left
        else:
            self._connections.pop(slot, None)


# KEYS[1]: a client's bucket (a hash: tokens, stamp); ARGV: rate per second,
# burst, cost. The arithmetic of turnline.core.limits.take, on Redis's clock
# (TIME), so gateways' clocks never matter. Returns 0 when the tokens were
# taken, else the milliseconds to wait (rounded up). A refusal writes nothing;
# a bucket's key expires once it would be full again (a missing bucket is full).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, stamp = burst, now
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
if b[1] then
  tokens, stamp = tonumber(b[1]), tonumber(b[2])
  if now > stamp then
    tokens = math.min(burst, tokens + (now - stamp) * rate)
    stamp = now
  end
end
if tokens + 1e-9 >= cost then
  tokens = math.max(0, tokens - cost)
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', stamp))
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
  return 0
end
return math.max(1, math.ceil((cost - tokens) / rate * 1000))
"""

# KEYS[1]: a client's open connections (a sorted set: connection id → expiry,
# unix ms on Redis's clock); ARGV: connection id, limit (0: no check, a
# refresh), TTL ms. Expired entries (a gateway killed with -9 stops
# refreshing its own) are dropped first. Returns 1 when the connection holds
# a slot now, 0 when the client is at its limit.
_CONNECT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if limit > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


class RedisLimiter(Limiter):
    """Counted in Redis, for every gateway of one store: one script call per
    request (the bucket), one per connection opened and closed, and a refresh
    of this gateway's connections every ``connection_ttl_s / 3``."""

    def __init__(self, config: LimitsConfig, bus: Any):
        super().__init__(config)
        self.bus = bus
        self.prefix: str = bus.prefix
        self._slots: dict[str, str] = {}  # connection id → its client's key
        self._refresher: asyncio.Task[None] | None = None

    def key(self, kind: str, client_id: str) -> str:
        # (one key per call: on a Redis Cluster each call goes to one node)
        return f"{self.prefix}:limit:{kind}:{client_id}"

    @functools.cached_property
    def _take_script(self) -> Any:
        return self.bus.redis.register_script(_TAKE)

    @functools.cached_property
    def _connect_script(self) -> Any:
        return self.bus.redis.register_script(_CONNECT)

    async def take_then(self, limit: str, client_id: str, work: Coroutine[Any, Any, T]) -> T:
        """``take`` and ``work`` at once: the bucket's round trip to Redis
        overlaps the one ``work`` makes (loading the session's replica), so a
        send waits for one, not both. ``work`` must change nothing: it runs
        even when the take is refused (its result is then dropped)."""
        if not self._rates[limit].enabled:
            return await work
        task = asyncio.ensure_future(work)
        try:
            await self.take(limit, client_id)
        except BaseException:
            task.add_done_callback(_retrieve)
            raise
        return await task

    async def take(self, limit: str, client_id: str) -> None:
        rate = self._rates[limit]
        if not rate.enabled:
            return
        wait_ms = int(await self._take_script(keys=[self.key(limit, client_id)],
                                              args=[rate.per_s, rate.burst, 1]))
        if wait_ms:
            raise _over(limit, rate, wait_ms)

    def _ttl_ms(self) -> int:
        return max(1000, int(self.config.connection_ttl_s * 1000))

    async def connect(self, client_id: str) -> Any:
        limit = self.config.max_connections_per_client
        if limit <= 0:
            return None
        slot = uuid.uuid4().hex
        key = self.key(CONNECTIONS, client_id)
        if not await self._connect_script(keys=[key], args=[slot, limit, self._ttl_ms()]):
            raise _too_many_connections(limit)
        self._slots[slot] = key
        return slot

    async def disconnect(self, slot: Any) -> None:
        key = self._slots.pop(slot, None) if slot is not None else None
        if key is not None:
            try:
                await self.bus.redis.zrem(key, slot)
            except Exception:  # it expires with the TTL anyway
                log.warning("freeing a connection slot failed", exc_info=True)

    async def start(self) -> None:
        if self.config.max_connections_per_client > 0 and self._refresher is None:
            self._refresher = asyncio.ensure_future(self._refresh_loop())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms() / 3000)
            try:
                await self.refresh()
            except Exception:  # Redis away for now: the next round may still be within the TTL
                log.warning("refreshing connection slots failed", exc_info=True)

    async def refresh(self) -> None:
        """Push this gateway's connections' expiry on (limit 0: no check)."""
        ttl = self._ttl_ms()
        for slot, key in list(self._slots.items()):
            await self._connect_script(keys=[key], args=[slot, 0, ttl])


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("work beside a refused request failed: %r", task.exception())


def limiter_for(runtime: Any) -> Limiter:
    """In Redis when the runtime is a gateway's (it has a ``bus``), else here."""
    config: LimitsConfig = runtime.config.limits
    bus = getattr(runtime, "bus", None)
    if bus is not None:
        return RedisLimiter(config, bus)
    return LocalLimiter(config)
