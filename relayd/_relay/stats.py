"""Counters and latency histograms the relay keeps for metrics: plain numbers, no I/O.

The core and the hub count events here on the hot path (an integer increment, a bisect); the
metrics endpoint (``relayd/_metrics.py``) reads them when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

# Seconds. Relayed messages take from well under a millisecond (an idle relay, acknowledge
# false) to the ack timeout and beyond (redeliveries).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Histogram:
    """A cumulative histogram with fixed bucket bounds, Prometheus-style."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(upper bound, observations at or below it)`` pairs, ending with ``+Inf``."""
        total = 0
        out = []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


# Where a slow consumer can be caught: the hub's writer (a write past websocket.write_timeout),
# the core (not even a control frame fits in the socket's outbound buffer), or relayd's
# hypercorn TCPServer (a socket write on the REST port past write_timeout).
SLOW_CONSUMER_DETECTORS = ("write_timeout", "outbound_buffer", "rest_port_write")


class RelayStats:
    """What the relay counts. ``events`` keys are documented in docs/operations.md."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        # Sockets dropped as slow consumers, by where that was found (SLOW_CONSUMER_DETECTORS).
        self.slow_consumer_drops: Counter[str] = Counter()
        self.frames_in = 0
        self.frames_out = 0
        self.delivery_latency = Histogram()  # acceptance to the first write to the recipient
        self.ack_latency = Histogram()  # the write to the recipient to its ack
        self.commit_latency = Histogram()  # one group commit of the store
