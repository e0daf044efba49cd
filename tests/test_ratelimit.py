"""RateLimiter: token buckets under an explicit clock (``now`` is passed in)."""

from __future__ import annotations

import pytest

from relayd._ratelimit import RateLimiter


def test_burst_then_exact_retry_after() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.acquire("ip", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("ip", 0.0) == 0.5
    # Denied requests take nothing: asking again later shortens the wait accordingly.
    assert limiter.acquire("ip", 0.25) == 0.25
    assert limiter.acquire("ip", 0.5) == 0.0
    assert limiter.acquire("ip", 0.5) == 0.5


def test_retry_after_is_exactly_enough() -> None:
    limiter = RateLimiter(rate=4.0, burst=1)
    assert limiter.acquire("k", 10.0) == 0.0
    wait = limiter.acquire("k", 10.0)
    assert wait == 0.25
    assert limiter.acquire("k", 10.0 + wait - 0.125) == 0.125
    assert limiter.acquire("k", 10.0 + wait) == 0.0


def test_refill_over_time_is_capped_at_burst() -> None:
    limiter = RateLimiter(rate=1.0, burst=3)
    for _ in range(3):
        assert limiter.acquire("k", 0.0) == 0.0
    assert limiter.acquire("k", 0.0) == 1.0
    # Two seconds refill two tokens.
    assert limiter.acquire("k", 2.0) == 0.0
    assert limiter.acquire("k", 2.0) == 0.0
    assert limiter.acquire("k", 2.0) == 1.0
    # A long idle period refills to burst, not beyond.
    assert [limiter.acquire("k", 1000.0) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


def test_partial_refill() -> None:
    limiter = RateLimiter(rate=0.5, burst=1)
    assert limiter.acquire("k", 0.0) == 0.0
    assert limiter.acquire("k", 0.0) == 2.0
    assert limiter.acquire("k", 1.5) == 0.5
    assert limiter.acquire("k", 2.0) == 0.0


def test_keys_are_separate() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.acquire("a", 0.0) == 0.0
    assert limiter.acquire("a", 0.0) == 0.0
    assert limiter.acquire("a", 0.0) == 1.0
    assert limiter.acquire("b", 0.0) == 0.0
    assert limiter.acquire("b", 0.0) == 0.0
    assert limiter.acquire("b", 0.0) == 1.0
    assert len(limiter) == 2


def test_max_keys_bounds_the_number_of_buckets() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=3)
    for i in range(50):
        limiter.acquire(f"key-{i}", float(i))
        assert len(limiter) == min(i + 1, 3)
    assert len(limiter) == 3


def test_least_recently_seen_key_is_forgotten() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        assert limiter.acquire(key, 0.0) == 0.0
    # Seeing "a" again (even denied) makes "b" the least recently seen.
    assert limiter.acquire("a", 0.0) == 1.0
    assert limiter.acquire("d", 0.0) == 0.0
    assert len(limiter) == 3
    # "a" and "c" are still limited; "b" was forgotten, so it starts with a full bucket.
    assert limiter.acquire("a", 0.0) == 1.0
    assert limiter.acquire("c", 0.0) == 1.0
    assert limiter.acquire("b", 0.0) == 0.0
    assert len(limiter) == 3


def test_reconfigure_lower_burst_applies_to_existing_keys() -> None:
    limiter = RateLimiter(rate=1.0, burst=5)
    assert limiter.acquire("k", 0.0) == 0.0  # 4 tokens left
    limiter.reconfigure(rate=1.0, burst=2)
    assert (limiter.rate, limiter.burst) == (1.0, 2)
    assert [limiter.acquire("k", 0.0) for _ in range(3)] == [0.0, 0.0, 1.0]
    assert [limiter.acquire("new", 0.0) for _ in range(3)] == [0.0, 0.0, 1.0]


def test_reconfigure_rate_changes_retry_after_and_refill() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.acquire("k", 0.0) == 0.0
    assert limiter.acquire("k", 0.0) == 1.0
    limiter.reconfigure(rate=4.0, burst=1)
    assert limiter.acquire("k", 0.0) == 0.25
    assert limiter.acquire("k", 0.25) == 0.0


def test_reconfigure_higher_burst() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.acquire("k", 0.0) == 0.0
    limiter.reconfigure(rate=1.0, burst=3)
    # The bucket refills to the new burst over time.
    assert [limiter.acquire("k", 10.0) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys"),
    [(0.0, 1, 1), (-1.0, 1, 1), (1.0, 0, 1), (1.0, -1, 1), (1.0, 1, 0)],
)
def test_invalid_construction(rate: float, burst: int, max_keys: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(rate=rate, burst=burst, max_keys=max_keys)


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-0.5, 1), (1.0, 0)])
def test_invalid_reconfigure_changes_nothing(rate: float, burst: int) -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    with pytest.raises(ValueError, match="positive"):
        limiter.reconfigure(rate=rate, burst=burst)
    assert (limiter.rate, limiter.burst) == (2.0, 3)
