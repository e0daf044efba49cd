"""The client's reconnect policy (``relayd.client._policy``): a pure table from close codes to
decisions, with exact delays for a scripted random source."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from relayd.client import Action, ReconnectPolicy


def scripted(values: Iterable[float]) -> Callable[[], float]:
    """A random source that returns ``values`` in turn (and fails the test past their end)."""
    iterator = iter(values)
    return lambda: next(iterator)


def policy(*values: float) -> ReconnectPolicy:
    return ReconnectPolicy(random=scripted(values))


@pytest.mark.parametrize("code", [4003, 4009, 1002, 1007, 1009])
def test_never_reconnects_after_a_code_that_says_so(code: int) -> None:
    decision = policy().closed(code, now=0.0)
    assert (decision.action, decision.delay) == (Action.STOP, 0.0)
    assert f"({code})" in decision.reason


def test_stops_for_good_even_after_a_long_stable_session() -> None:
    p = policy()
    p.connected(now=0.0)
    assert p.closed(4009, now=3600.0).action is Action.STOP


@pytest.mark.parametrize(
    ("code", "random", "delay"),
    [
        # 1001: at least shutdown_floor (1 s), stretched by up to jitter (half) of it.
        (1001, (0.0, 0.0), 1.0),
        (1001, (1.0, 1.0), 1.5),
        # 4029: at least throttle_floor (5 s).
        (4029, (0.0, 0.0), 5.0),
        (4029, (0.5, 0.5), 6.25),
        # Anything else: exponential backoff from initial (0.5 s), "equal jitter".
        (1006, (0.0,), 0.5),
        (1006, (1.0,), 0.25),
        (1000, (0.0,), 0.5),
        (1011, (0.0,), 0.5),
        (4002, (0.0,), 0.5),
        (4008, (0.0,), 0.5),
        (4999, (0.0,), 0.5),
        (None, (0.0,), 0.5),
    ],
)
def test_the_first_wait_after_each_code(
    code: int | None, random: tuple[float, ...], delay: float
) -> None:
    decision = policy(*random).closed(code, now=0.0)
    assert (decision.action, decision.delay) == (Action.RECONNECT, delay)


def test_backoff_doubles_up_to_the_maximum() -> None:
    p = policy(*[0.0] * 9)
    delays = [p.closed(1006, now=float(i)).delay for i in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_jitter_takes_off_up_to_half_of_each_delay() -> None:
    p = policy(1.0, 0.5, 0.0)
    assert [p.closed(None, now=0.0).delay for _ in range(3)] == [0.25, 0.75, 2.0]


def test_a_floor_applies_to_the_delay_after_jitter_too() -> None:
    # After 4 failures the backoff (8 s, jittered to 6 s) is past 4029's floor: it stands.
    p = policy(0.0, 0.0, 0.0, 0.0, 0.5)
    for now in range(4):
        p.closed(1006, now=float(now))
    assert p.closed(4029, now=5.0).delay == 6.0


def test_failures_are_forgotten_after_a_session_that_stayed_up() -> None:
    p = policy(*[0.0] * 4)
    assert p.closed(1006, now=0.0).delay == 0.5
    assert p.closed(1006, now=1.0).delay == 1.0
    p.connected(now=10.0)
    assert p.closed(1006, now=40.0).delay == 0.5  # up 30 s: stable_after
    p.connected(now=41.0)
    assert p.closed(1006, now=70.9).delay == 1.0  # up 29.9 s: not stable, counted


def test_4001_gets_a_new_token_at_once_then_backs_off_then_stops() -> None:
    p = policy(0.0)
    first = p.closed(4001, now=0.0)
    assert (first.action, first.delay) == (Action.REAUTHENTICATE, 0.0)
    second = p.closed(4001, now=1.0)
    assert (second.action, second.delay) == (Action.REAUTHENTICATE, 0.5)
    third = p.closed(4001, now=2.0)
    assert (third.action, third.delay) == (Action.STOP, 0.0)
    assert "3 times in a row" in third.reason


def test_a_session_that_came_up_resets_the_count_of_4001() -> None:
    p = policy(0.0)
    assert p.closed(4001, now=0.0).action is Action.REAUTHENTICATE
    assert p.closed(4001, now=1.0).action is Action.REAUTHENTICATE
    p.connected(now=2.0)
    decision = p.closed(4001, now=3.0)
    assert (decision.action, decision.delay) == (Action.REAUTHENTICATE, 0.0)
