"""Limits: the settings, and the pure decisions behind every ``rate_limited``.

A token bucket is plain data (:class:`Bucket`) and one function
(:func:`take`) with the time passed in, so the property tests drive the very
code the server runs, at any clock they like. The Redis limiter
(``turnline.server.limits``) runs the same arithmetic in a Lua script, on
Redis's clock, so that every gateway draws from one bucket per client.
No asyncio, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Limits that count things rather than time (turns, subscriptions,
# connections) have no exact moment when a slot frees: their refusals carry
# this as a hint. A client that wants the exact moment watches the session
# (a turn-end frees a turn slot) or its own subscriptions and connections.
COUNT_RETRY_AFTER_MS = 1000

# The ``limit`` of each refusal: stable names, as clients and metrics see them.
TURNS = "turns"
SENDS = "sends"
CANCELS = "cancels"
SUBSCRIPTIONS = "subscriptions"
CONNECTIONS = "connections"
AUDIO = "audio"
LIMIT_NAMES = (TURNS, SENDS, CANCELS, SUBSCRIPTIONS, CONNECTIONS, AUDIO)


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_s`` tokens a second refill a bucket holding at most ``burst``.
    A rate or burst of 0 turns the limit off."""

    per_s: float
    burst: float

    @property
    def enabled(self) -> bool:
        return self.per_s > 0 and self.burst > 0


@dataclass(slots=True)
class Bucket:
    tokens: float
    stamp: float  # seconds on the caller's clock when ``tokens`` was last computed


# A take of ``cost`` succeeds when the bucket holds ``cost`` less this: the
# float sum of a refill may fall short of a whole token by a rounding error,
# and a client that waited the ``retry_after`` it was told must get its token.
EPSILON = 1e-9


def level(bucket: Bucket | None, rate: Rate, now: float) -> float:
    """The tokens ``bucket`` holds at ``now`` (a missing bucket is full; a
    clock that went back refills nothing)."""
    if bucket is None:
        return rate.burst
    return min(rate.burst, bucket.tokens + max(0.0, now - bucket.stamp) * rate.per_s)


def take(bucket: Bucket | None, rate: Rate, now: float, cost: float = 1.0) -> tuple[Bucket, float]:
    """Take ``cost`` tokens at ``now``. Returns the bucket afterwards and how
    long to wait, in seconds: 0.0 when the tokens were taken, else the time
    after which this same take succeeds if nothing else takes meanwhile (a
    refused take takes nothing). A cost above the burst never fits: ``inf``."""
    tokens = level(bucket, rate, now)
    stamp = now if bucket is None else max(now, bucket.stamp)
    if tokens + EPSILON >= cost:
        return Bucket(max(0.0, tokens - cost), stamp), 0.0
    if cost > rate.burst:
        return Bucket(tokens, stamp), math.inf
    return Bucket(tokens, stamp), (cost - tokens) / rate.per_s


def retry_after_ms(wait_s: float) -> int:
    """A wait as whole milliseconds, rounded up (waiting that long is enough)."""
    return max(1, math.ceil(wait_s * 1000))


def retry_after_header(wait_ms: int) -> str:
    """HTTP ``Retry-After``: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait_ms / 1000)))


class KeyedBuckets:
    """One bucket per key (a client id) in this process, in bounded memory:
    past ``max_keys`` the buckets that have refilled are dropped (a missing
    bucket is a full one, so nothing changes), then the least recently used
    (whose client gets a full bucket back: the price of the bound)."""

    def __init__(self, rate: Rate, max_keys: int = 100_000):
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: dict[str, Bucket] = {}

    def take(self, key: str, now: float, cost: float = 1.0) -> float:
        """Seconds to wait (0.0: taken); see :func:`take`."""
        buckets = self._buckets
        bucket, wait = take(buckets.pop(key, None), self.rate, now, cost)
        buckets[key] = bucket  # (re)inserted last: the dict's order is least recently used first
        if len(buckets) > self.max_keys:
            self._prune(now)
        return wait

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if level(b, self.rate, now) >= self.rate.burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


def turn_slots_left(running: int, stopping: int, limit: int) -> bool:
    """May a send start one more turn on a session running ``running`` turns,
    ``stopping`` of which this same send cancels (``interrupt``/``rollback``)?
    ``limit`` 0: no limit."""
    return limit <= 0 or running - stopping < limit


@dataclass
class LimitsConfig:
    """Every limit a client meets, one place for the CLI, the app and the
    runtime (``RuntimeConfig.limits``). 0 turns a limit off. The defaults are
    meant for a small deployment: a person typing and stopping, a few tabs."""

    max_turns_per_session: int = 8
    send_rate: float = 5.0  # sends (and regenerates) per second per client, refilled continuously
    send_burst: int = 20
    cancel_rate: float = 5.0  # cancels (and voice interrupts) per second per client
    cancel_burst: int = 20
    max_subscriptions: int = 64  # sessions one WebSocket follows at once
    max_connections_per_client: int = 16  # open WebSockets of one client id (across gateways on Redis)
    audio_bytes_per_s: int = 64_000  # voice audio-in per voice peer: 16 kHz PCM16 is 32,000 B/s
    audio_burst_bytes: int = 64_000
    # On Redis: how long a gateway's connection count outlives the gateway
    # (killed with -9), and so how often a live gateway refreshes it (a third of this).
    connection_ttl_s: float = 30.0

    @classmethod
    def off(cls) -> LimitsConfig:
        """Every limit off (benchmarks and tests about something else)."""
        return cls(max_turns_per_session=0, send_rate=0, send_burst=0, cancel_rate=0, cancel_burst=0,
                   max_subscriptions=0, max_connections_per_client=0, audio_bytes_per_s=0, audio_burst_bytes=0)

    @property
    def sends(self) -> Rate:
        return Rate(self.send_rate, self.send_burst)

    @property
    def cancels(self) -> Rate:
        return Rate(self.cancel_rate, self.cancel_burst)

    @property
    def audio(self) -> Rate:
        return Rate(self.audio_bytes_per_s, self.audio_burst_bytes)
