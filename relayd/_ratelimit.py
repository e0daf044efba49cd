"""Token-bucket rate limiting, keyed (by source IP, by client), with no I/O and no clock of its own.

Each key has a bucket of ``burst`` tokens that refills at ``rate`` tokens per second; a request
takes one token or is told how long to wait. The number of keys is bounded: past ``max_keys``
the least recently seen key is forgotten, which can only make the limit more lenient for that
key, never stricter for another.
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    def __init__(self, *, rate: float, burst: int, max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate, burst and max_keys must be positive")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        # key -> (tokens left, time of last update); most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str, now: float) -> float:
        """Take one token for ``key``. Returns 0.0 if allowed, else the seconds to wait."""
        tokens, updated = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * self.rate)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def reconfigure(self, *, rate: float, burst: int) -> None:
        """Change the rate and burst for all keys (on config reload)."""
        if rate <= 0 or burst < 1:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
