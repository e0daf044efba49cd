"""``GET /metrics``: Prometheus text exposition of what relayd counts.

The relay and the HTTP app count with plain integers on their hot paths (``RelayStats``,
``HttpStats``); this module turns them into metric families when scraped, in a registry of the
daemon's own (never the process-global one: tests run several daemons in one process). Every
metric is listed, with what it means, in docs/operations.md.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._relay.core import RelayCore
from ._relay.stats import SLOW_CONSUMER_DETECTORS, Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STORE_COUNT_INTERVAL = 5.0

MESSAGE_EVENTS = (
    "accepted",
    "delivered",
    "acknowledged",
    "redelivered",
    "failed",
    "expired",
    "duplicate",
)


class HttpStats:
    """What the HTTP app counts: requests by route, method and status; refused credentials."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.auth_failures: Counter[str] = Counter()


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=histogram.cumulative(), sum_value=histogram.sum)


class _Collector(Collector):
    def __init__(
        self,
        core: RelayCore,
        http: HttpStats,
        stored: Callable[[], int],
        store_ops: Callable[[], int],
        authenticated: Mapping[str, int],
    ) -> None:
        self.core = core
        self.http = http
        self.stored = stored
        self.store_ops = store_ops
        self.authenticated = authenticated

    def collect(self) -> Iterator[Metric]:
        core = self.core
        gauges = core.stats()
        metrics = core.metrics
        events = metrics.events

        sessions = GaugeMetricFamily(
            "relayd_sessions", "WebSocket sessions by state.", labels=["state"]
        )
        sessions.add_metric(["pending_auth"], gauges["sessions_pending"])
        sessions.add_metric(["active"], gauges["sessions_active"])
        sessions.add_metric(
            ["closing"],
            gauges["sessions"] - gauges["sessions_pending"] - gauges["sessions_active"],
        )
        yield sessions
        yield GaugeMetricFamily(
            "relayd_connections", "Open WebSocket connections.", value=gauges["sessions"]
        )
        frames = CounterMetricFamily(
            "relayd_frames", "WebSocket frames received and sent.", labels=["direction"]
        )
        frames.add_metric(["in"], metrics.frames_in)
        frames.add_metric(["out"], metrics.frames_out)
        yield frames

        messages = CounterMetricFamily(
            "relayd_messages", "Messages by what happened to them.", labels=["event"]
        )
        for event in MESSAGE_EVENTS:
            messages.add_metric([event], events[event])
        yield messages

        queued = GaugeMetricFamily(
            "relayd_queued_messages", "Messages waiting, by where they wait.", labels=["where"]
        )
        queued.add_metric(["mailbox"], gauges["mailbox"])
        queued.add_metric(["unacked"], gauges["unacked"])
        queued.add_metric(["staged"], gauges["staged"])
        queued.add_metric(["store"], self.stored())
        yield queued
        yield GaugeMetricFamily(
            "relayd_pending_commit",
            "Messages accepted and not yet committed to the store.",
            value=gauges["pending_commit"],
        )
        yield GaugeMetricFamily(
            "relayd_store_queue",
            "Store operations waiting for the next group commit.",
            value=self.store_ops(),
        )
        held = GaugeMetricFamily(
            "relayd_message_memory_bytes",
            "Bytes of messages held in memory: for online recipients (bounded per recipient by"
            " relay.mailbox_bytes), and from senders until their first receipt (bounded per"
            " sender by websocket.read_ahead_bytes).",
            labels=["for"],
        )
        held.add_metric(["recipients"], gauges["held_bytes"])
        held.add_metric(["senders"], gauges["awaiting_bytes"])
        yield held
        yield GaugeMetricFamily(
            "relayd_dedupe_entries",
            "Message ids remembered for deduplication.",
            value=gauges["dedupe_entries"],
        )

        yield _histogram(
            "relayd_delivery_latency_seconds",
            "From a message's acceptance to its first write to the recipient.",
            metrics.delivery_latency,
        )
        yield _histogram(
            "relayd_ack_latency_seconds",
            "From a delivery's write to the recipient's ack.",
            metrics.ack_latency,
        )
        yield _histogram(
            "relayd_store_commit_seconds",
            "Time one group commit of the store takes.",
            metrics.commit_latency,
        )

        auth = CounterMetricFamily(
            "relayd_auth_failures",
            "Refused credentials, by where and why.",
            labels=["via", "reason"],
        )
        for reason, count in sorted(self.http.auth_failures.items()):
            auth.add_metric(["http", reason], count)
        prefix = "auth_failed:"
        for key, count in sorted(events.items()):
            if key.startswith(prefix):
                auth.add_metric(["ws", key.removeprefix(prefix)], count)
        yield auth

        accepted = CounterMetricFamily(
            "relayd_authentications",
            "Access tokens accepted (REST and WebSocket), by each role their client holds now.",
            labels=["role"],
        )
        for role, count in sorted(self.authenticated.items()):
            accepted.add_metric([role], count)
        yield accepted

        drops = CounterMetricFamily(
            "relayd_slow_consumer_drops",
            "WebSocket connections dropped as slow consumers, by where that was found.",
            labels=["where"],
        )
        for where in SLOW_CONSUMER_DETECTORS:
            drops.add_metric([where], metrics.slow_consumer_drops[where])
        yield drops

        errors = CounterMetricFamily(
            "relayd_error_frames", "Error frames sent to clients, by code.", labels=["code"]
        )
        for key, count in sorted(events.items()):
            if key.startswith("error:"):
                errors.add_metric([key.removeprefix("error:")], count)
        yield errors

        requests = CounterMetricFamily(
            "relayd_http_requests",
            "HTTP requests answered, by route, method and status.",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in sorted(self.http.requests.items()):
            requests.add_metric([route, method, str(status)], count)
        yield requests


class Metrics:
    """The daemon's registry. :meth:`render` is what ``GET /metrics`` answers."""

    def __init__(
        self,
        core: RelayCore,
        http: HttpStats,
        *,
        stored: Callable[[], Any],
        store_ops: Callable[[], int],
        authenticated: Mapping[str, int] | None = None,
    ) -> None:
        self._stored_count = 0
        self._counted_at = -math.inf
        self._count_stored = stored
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            _Collector(
                core,
                http,
                lambda: self._stored_count,
                store_ops,
                {} if authenticated is None else authenticated,
            )
        )

    async def render(self) -> bytes:
        """The exposition. Counting the stored messages takes the store's one connection, so
        it is done at most every ``STORE_COUNT_INTERVAL`` seconds, however often it is scraped."""
        now = time.monotonic()
        if now - self._counted_at >= STORE_COUNT_INTERVAL:
            self._counted_at = now
            self._stored_count = await self._count_stored()
        return generate_latest(self.registry)
