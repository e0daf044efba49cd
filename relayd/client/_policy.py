"""When to reconnect: a pure state machine from close codes to decisions.

Rules (``docs/protocol.md``, Close codes; the table is :data:`CLOSE_RULES`):

1. **Never reconnect** after 4003 (the session's token was revoked: the client, its login or
   the token), 4009 (a newer connection of this client replaced this one: reconnecting would
   replace it in turn, and the two would take turns forever), or 1002, 1007, 1009 (relayd
   refused a frame this client sent: sending it again would be refused again).
2. **4001** (authentication failed, or the token expired): get a new access token (refresh,
   else log in with the secret), then reconnect at once. A second 4001 in a row waits like any
   failure; :attr:`ReconnectPolicy.max_auth_failures` in a row stop the client.
3. **Wait, then reconnect** after 1001 (relayd is shutting down: a restart takes a moment) and
   4029 (connection limits, or too many refused frames): at least :attr:`shutdown_floor` and
   :attr:`throttle_floor` seconds, each stretched by a random part up to ``jitter`` of it.
4. **Anything else** (1000, 1006 a dropped connection, 1011, 4002, 4008, a failed connect):
   exponential backoff, ``initial * multiplier ** failures`` capped at ``maximum``, with
   "equal jitter": a random ``jitter`` part of each delay is taken off, so that clients dropped
   together (by a restart) come back spread out, and never all at once.
5. Failures count up until a session has stayed up for :attr:`stable_after` seconds: a session
   that dies right after its welcome does not reset the backoff.

No I/O and no clock: callers pass ``now`` (any monotonic clock) and the random source.
"""

from __future__ import annotations

import enum
import random as _random
from collections.abc import Callable

from attrs import define, field, frozen


class Action(enum.Enum):
    RECONNECT = "reconnect"
    REAUTHENTICATE = "reauthenticate"  # new access token first, then reconnect
    STOP = "stop"


@frozen
class Decision:
    action: Action
    delay: float
    reason: str


class _Rule(enum.Enum):
    STOP = "stop"
    REAUTH = "reauth"
    SHUTDOWN = "shutdown"
    THROTTLE = "throttle"
    BACKOFF = "backoff"


CLOSE_RULES: dict[int, tuple[_Rule, str]] = {
    1001: (_Rule.SHUTDOWN, "relayd is shutting down"),
    1002: (_Rule.STOP, "relayd refused a frame this client sent (protocol error)"),
    1007: (_Rule.STOP, "relayd refused a frame this client sent (not UTF-8)"),
    1009: (_Rule.STOP, "a frame was larger than relayd's websocket.max_frame_bytes"),
    4001: (_Rule.REAUTH, "authentication failed or the token expired"),
    4003: (_Rule.STOP, "the session's token was revoked"),
    4009: (_Rule.STOP, "replaced by a newer connection of this client"),
    4029: (_Rule.THROTTLE, "connection limits, or too many refused frames"),
}


@define
class ReconnectPolicy:
    """Decides, after each session or failed attempt, whether and when to connect again.

    >>> policy = ReconnectPolicy(random=lambda: 0.0)
    >>> policy.closed(1006, now=0.0)
    Decision(action=<Action.RECONNECT: 'reconnect'>, delay=0.5, reason='connection lost (1006)')
    >>> policy.closed(1006, now=1.0).delay
    1.0
    >>> policy.closed(4009, now=2.0).action
    <Action.STOP: 'stop'>
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.5
    shutdown_floor: float = 1.0
    throttle_floor: float = 5.0
    stable_after: float = 30.0
    max_auth_failures: int = 3
    random: Callable[[], float] = field(default=_random.random, repr=False)
    failures: int = field(default=0, init=False)
    auth_failures: int = field(default=0, init=False)
    _connected_at: float | None = field(default=None, init=False)

    def connected(self, now: float) -> None:
        """A session came up (its welcome arrived)."""
        self._connected_at = now
        self.auth_failures = 0

    def closed(self, code: int | None, now: float) -> Decision:
        """The session (or the attempt) ended with close ``code``; None: no session came up
        (connect or handshake failed)."""
        self._settle(now)
        if code is None:
            return self._backoff("could not connect")
        rule, text = CLOSE_RULES.get(code, (_Rule.BACKOFF, "connection lost"))
        reason = f"{text} ({code})"
        if rule is _Rule.STOP:
            return Decision(Action.STOP, 0.0, reason)
        if rule is _Rule.REAUTH:
            self.auth_failures += 1
            if self.auth_failures >= self.max_auth_failures:
                return Decision(Action.STOP, 0.0, f"{reason}, {self.auth_failures} times in a row")
            if self.auth_failures == 1:
                return Decision(Action.REAUTHENTICATE, 0.0, reason)
            return self._backoff(reason, action=Action.REAUTHENTICATE)
        if rule is _Rule.SHUTDOWN:
            return self._backoff(reason, floor=self.shutdown_floor)
        if rule is _Rule.THROTTLE:
            return self._backoff(reason, floor=self.throttle_floor)
        return self._backoff(reason)

    def _settle(self, now: float) -> None:
        """Forget past failures if the session that just ended had been up long enough."""
        if self._connected_at is not None and now - self._connected_at >= self.stable_after:
            self.failures = 0
        self._connected_at = None

    def _backoff(
        self, reason: str, *, floor: float = 0.0, action: Action = Action.RECONNECT
    ) -> Decision:
        base = min(self.maximum, self.initial * self.multiplier**self.failures)
        self.failures += 1
        delay = base * (1.0 - self.jitter * self.random())
        if delay < floor:
            delay = floor * (1.0 + self.jitter * self.random())
        return Decision(action, delay, reason)
