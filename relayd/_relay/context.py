"""What every part of the relay core shares: the settings, the metrics, the actions decided so
far and the timers.

It holds no state of sessions or messages: each part of the core owns its own (see
``core.py``). A part appends its actions to :attr:`Context.actions` in the order it decides
them, and arms a timer with :meth:`Context.at`; the core hands both to the driver.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Iterator
from typing import Any

from relayd._config import RelayConfig, TopicsConfig, WebsocketConfig

from .effects import Action
from .stats import RelayStats


class TimerKind(enum.Enum):
    AUTH = 1
    HEARTBEAT = 2
    TOKEN = 3
    ACK = 5
    BACKOFF = 6
    SWEEP = 7
    IDLE = 8  # a REST session's idle end
    TOPIC_COUNTS = 9  # ask for the counts of published messages (see topics.py)
    PRESENCE = 10  # send the presence events waiting (see presence.py)


class Context:
    """The settings (replaced on a reload), the metrics, the actions and the timers."""

    def __init__(
        self,
        relay: RelayConfig,
        websocket: WebsocketConfig,
        retention: float = 0.0,
        topics: TopicsConfig | None = None,
    ) -> None:
        self.relay = relay
        self.ws = websocket
        self.topics = topics or TopicsConfig()
        self.retention = retention  # history.retention: content kept after the final status
        self.metrics = RelayStats()
        self.actions: list[Action] = []
        # (deadline, tie-breaker, kind, target, generation): a timer whose target has moved on
        # since (another generation) is ignored when it fires.
        self._timers: list[tuple[float, int, TimerKind, Any, int]] = []
        self._timer_seq = itertools.count()

    def take_actions(self) -> list[Action]:
        actions, self.actions = self.actions, []
        return actions

    def at(self, deadline: float, kind: TimerKind, target: Any, gen: int) -> None:
        heapq.heappush(self._timers, (deadline, next(self._timer_seq), kind, target, gen))

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def due(self, now: float) -> Iterator[tuple[TimerKind, Any, int]]:
        """The timers due at ``now``, earliest first, each taken off as it is handed out (one
        armed while they are handled is handed out too if it is due)."""
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, target, gen = heapq.heappop(self._timers)
            yield kind, target, gen
