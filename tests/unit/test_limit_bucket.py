"""The pure limit decisions (turnline.core.limits), driven by hypothesis at
clocks the test chooses: the token bucket the server runs, not a copy.

- over any window, a bucket grants at most ``burst + rate × window`` tokens;
- a refused take takes nothing, and retrying after the ``retry_after`` it was
  told succeeds (rounded up to whole milliseconds, as clients see it);
- a clock that goes back refills nothing; a cost above the burst never fits;
- per-client buckets stay within their memory bound without handing a busy
  client fresh tokens while idle ones can be dropped;
- the turn limit counts the turns a send cancels as freed.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from turnline.core.limits import (
    Bucket, KeyedBuckets, LimitsConfig, Rate, level, retry_after_header, retry_after_ms, take, turn_slots_left,
)

rates = st.builds(Rate, per_s=st.floats(0.01, 1000), burst=st.integers(1, 100).map(float))
# Time steps (seconds, forward) and the cost of each take.
steps = st.lists(st.tuples(st.floats(0, 5), st.integers(1, 3).map(float)), min_size=1, max_size=200)


@given(rates, steps)
@settings(max_examples=300)
def test_a_bucket_never_grants_more_than_burst_plus_refill(rate: Rate, seq: list[tuple[float, float]]) -> None:
    bucket = None
    now = 0.0
    granted = 0.0
    for dt, cost in seq:
        now += dt
        bucket, wait = take(bucket, rate, now, cost)
        assert wait >= 0 and bucket.tokens >= 0
        assert bucket.tokens <= rate.burst + 1e-9
        if wait == 0:
            granted += cost
        # Since time 0 (the bucket started full), nothing beyond this bound was ever granted.
        assert granted <= rate.burst + rate.per_s * now + 1e-6


@given(rates, steps)
@settings(max_examples=300)
def test_a_refusal_takes_nothing_and_its_retry_after_is_enough(rate: Rate, seq: list[tuple[float, float]]) -> None:
    bucket = None
    now = 0.0
    for dt, cost in seq:
        now += dt
        before = level(bucket, rate, now)
        after, wait = take(bucket, rate, now, cost)
        if wait == 0:
            assert math.isclose(after.tokens, max(0.0, before - cost), abs_tol=1e-9)
        elif cost > rate.burst:
            assert wait == math.inf
        else:
            assert after.tokens == before  # nothing taken
            # The client waits what it was told (whole ms, rounded up): the same take succeeds then...
            later = now + retry_after_ms(wait) / 1000
            assert take(after, rate, later, cost)[1] == 0.0
            # ...and not much earlier: the wait is no longer than needed.
            assert (cost - before) / rate.per_s == wait
        bucket = after


@given(rates, st.floats(0, 100), st.floats(0.001, 100))
def test_a_clock_going_back_refills_nothing(rate: Rate, t: float, back: float) -> None:
    bucket, _ = take(None, rate, t, rate.burst)  # emptied at t
    again, wait = take(bucket, rate, t - back, 1.0)
    assert wait > 0 and again.tokens == 0.0
    assert again.stamp == t  # the stamp does not move back either


def test_a_cost_over_the_burst_never_fits() -> None:
    rate = Rate(10, 5)
    assert take(None, rate, 0.0, 6)[1] == math.inf
    assert take(None, rate, 0.0, 5)[1] == 0.0


def test_retry_after_rounds_up() -> None:
    assert retry_after_ms(0.0001) == 1
    assert retry_after_ms(0.2) == 200
    assert retry_after_ms(0.2001) == 201
    assert retry_after_header(1) == "1"
    assert retry_after_header(1000) == "1"
    assert retry_after_header(1001) == "2"


@given(st.lists(st.tuples(st.integers(0, 30), st.floats(0, 2)), min_size=1, max_size=300))
@settings(max_examples=200)
def test_keyed_buckets_stay_bounded_and_each_key_keeps_its_bound(seq: list[tuple[int, float]]) -> None:
    rate = Rate(1.0, 3.0)
    keyed = KeyedBuckets(rate, max_keys=8)
    now = 0.0
    for key, dt in seq:
        now += dt
        keyed.take(f"c{key}", now)
        assert len(keyed) <= 8
    # One client alone (no pruning pressure) gets exactly what one bucket grants.
    alone = KeyedBuckets(rate, max_keys=8)
    times = [i * 0.1 for i in range(50)]
    allowed = [t for t in times if alone.take("solo", t) == 0]
    assert len(allowed) <= rate.burst + rate.per_s * times[-1] + 1e-6


def test_pruning_drops_refilled_buckets_first() -> None:
    keyed = KeyedBuckets(Rate(1.0, 2.0), max_keys=2)
    keyed.take("old", 0.0)  # refilled by t=1
    keyed.take("busy", 10.0, 2.0)  # empty at t=10
    keyed.take("new", 10.0)  # a third key: "old" (full again) goes, "busy" stays empty
    assert len(keyed) == 2
    assert keyed.take("busy", 10.0) > 0


@given(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20))
def test_turn_slots(running: int, stopping: int, limit: int) -> None:
    stopping = min(stopping, running)
    assert turn_slots_left(running, stopping, limit) == (limit == 0 or running - stopping < limit)


def test_off_turns_every_limit_off() -> None:
    off = LimitsConfig.off()
    assert not off.sends.enabled and not off.cancels.enabled and not off.audio.enabled
    assert off.max_turns_per_session == off.max_subscriptions == off.max_connections_per_client == 0
    on = LimitsConfig()
    assert on.sends == Rate(5.0, 20) and on.max_turns_per_session == 8
    assert Bucket(1.0, 0.0).tokens == 1.0
