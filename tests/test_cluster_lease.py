"""A cluster node's lease, in virtual time: when renewals go out and when the node fences.

The node is a real :class:`RedisCluster` on a real Redis server (its subscription, its probe,
and every renewal that answers reach the server); only how each lease renewal goes is
scripted: it answers after a while, is refused after a while, or hangs until the call's
timeout. Virtual time (``autojump_clock``) jumps only once nothing has happened for a second
of real time: the real server's answers come well before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from itertools import accumulate
from typing import Any

import trio
import trio.testing
from attrs import frozen

from relayd._auth import Revocation
from relayd._cluster import RedisCluster
from relayd._errors import ClusterUnavailable
from relayd._relay.effects import BroadcastNote, PresenceNote, TypingNote
from relayd._relay.records import KeyNotice

LEASE = 10.0
TIMEOUT = 2.0
DEADLINE = 60.0  # virtual seconds: far beyond what any of these scenarios takes


@frozen
class Renewal:
    """How one lease renewal goes: after ``after`` seconds it answers (``answers``), or is
    refused; ``after=None``: it hangs until the call times out."""

    answers: bool
    after: float | None


ANSWERS_AFTER_1_9 = Renewal(True, 1.9)
ANSWERS_AFTER_0_1 = Renewal(True, 0.1)
REFUSED_AT_ONCE = Renewal(False, 0.1)
HANGS = Renewal(False, None)


class ScriptedCluster(RedisCluster):
    """A node whose lease renewals go as :attr:`script` says (in order; once it runs out,
    each answers after 0.1 s), recording when each was sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script: list[Renewal] = []
        self.sent: list[float] = []

    async def _call(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        if what != "lease":
            return await super()._call(what, fn)
        self.sent.append(trio.current_time())
        renewal = self.script.pop(0) if self.script else ANSWERS_AFTER_0_1
        if renewal.after is None:
            await trio.sleep(self.timeout)
            raise ClusterUnavailable(f"redis: lease did not answer within {self.timeout} s")
        await trio.sleep(renewal.after)
        if not renewal.answers:
            raise ClusterUnavailable("redis: lease refused")
        return await super()._call(what, fn)


class Recorder:
    """A listener that records when the node fenced itself and when it resynced."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self.fenced_seen = trio.Event()
        self.resync_seen = trio.Event()

    def fenced(self) -> None:
        self.events.append(("fenced", trio.current_time()))
        self.fenced_seen.set()

    def resync(self) -> None:
        self.events.append(("resync", trio.current_time()))
        self.resync_seen.set()

    def wake(self, client: str, seq: int) -> None:
        raise AssertionError("no client here")

    def receipts_owed(self, client: str, seq: int) -> None:
        raise AssertionError("no client here")

    def kicked(self, client: str, epoch: int) -> None:
        raise AssertionError("no client here")

    def key_changed(self, notice: KeyNotice) -> None:
        raise AssertionError("no client here")

    def revoked_elsewhere(self, revocation: Revocation) -> None:
        raise AssertionError("no other node")

    def presence_heard(self, note: PresenceNote) -> None:
        raise AssertionError("no other node")

    def typing_heard(self, note: TypingNote) -> None:
        raise AssertionError("no other node")

    def broadcast_heard(self, note: BroadcastNote) -> None:
        raise AssertionError("no other node")

    def member_heard(self, topic: str, client: str, joined: bool, presence: bool) -> None:
        raise AssertionError("no other node")

    def topic_heard(self, topic: str, presence: bool | None) -> None:
        raise AssertionError("no other node")

    def roles_changed(self, client: str, roles: tuple[str, ...] | None) -> None:
        raise AssertionError("no other node")


def sends(count: int) -> list[float]:
    """When the first ``count`` renewals go out: a third of a lease apart from 0."""
    return list(accumulate([LEASE / 3] * (count - 1), initial=0.0))


async def start_node(
    nursery: trio.Nursery, redis_url: str, script: list[Renewal], *, call_timeout: float = TIMEOUT
) -> tuple[ScriptedCluster, Recorder]:
    """A node on ``redis_url`` whose first renewal (sent as it starts) goes as ``script[0]``."""
    recorder = Recorder()
    nodes: list[ScriptedCluster] = []

    async def run(task_status: trio.TaskStatus[None]) -> None:
        async with ScriptedCluster.open(
            redis_url, prefix="lease:", lease=LEASE, call_timeout=call_timeout, seq_key="lease:seq"
        ) as node:
            assert isinstance(node, ScriptedCluster)
            node.script = list(script)
            nodes.append(node)
            await node.run(recorder, task_status=task_status)

    await nursery.start(run)
    return nodes[0], recorder


async def test_a_node_fences_two_thirds_of_a_lease_after_its_last_renewal_was_sent(
    redis_url: str, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    autojump_clock.autojump_threshold = 1.0
    assert trio.current_time() == 0.0
    with trio.fail_after(DEADLINE):
        # R0 (sent at 0) answers at 1.9, R1 is refused at once, R2 hangs to its timeout.
        node, recorder = await start_node(
            nursery, redis_url, [ANSWERS_AFTER_1_9, REFUSED_AT_ONCE, HANGS]
        )
        await recorder.fenced_seen.wait()
        # Renewals go out a third of a lease after the previous one was sent, and the node
        # fences two thirds of a lease after R0 was sent, with R2 just sent.
        assert node.sent == sends(3)
        assert recorder.events == [("fenced", LEASE * 2 / 3)]
        assert node.fenced
        # R3 goes out a third of a lease after R2 was sent and answers after 0.1 s; the node
        # hears its own probe on the bus and takes sessions again.
        await recorder.resync_seen.wait()
    assert node.sent == sends(4)
    assert recorder.events == [("fenced", LEASE * 2 / 3), ("resync", sends(4)[3] + 0.1)]
    assert not node.fenced


async def test_a_renewal_still_unanswered_at_the_fence_point_is_abandoned_for_the_next(
    redis_url: str, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    autojump_clock.autojump_threshold = 1.0
    assert trio.current_time() == 0.0
    # A call timeout longer than a third of the lease: R1 would hang past the fence point.
    with trio.fail_after(DEADLINE):
        node, recorder = await start_node(
            nursery, redis_url, [ANSWERS_AFTER_0_1, HANGS], call_timeout=LEASE / 2
        )
        await recorder.resync_seen.wait()
    fence_point = LEASE * 2 / 3
    # R2 goes out at the fence point, not when R1 would have timed out (a third + 5 s).
    assert node.sent == sends(3)
    assert node.sent[2] == fence_point
    assert recorder.events == [("fenced", fence_point), ("resync", fence_point + 0.1)]


async def test_renewals_that_answer_late_keep_a_third_of_a_lease_apart_and_never_fence(
    redis_url: str, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    autojump_clock.autojump_threshold = 1.0
    assert trio.current_time() == 0.0
    with trio.fail_after(DEADLINE):
        node, recorder = await start_node(nursery, redis_url, [ANSWERS_AFTER_1_9] * 4)
        await trio.sleep_until(LEASE + 2.0)  # four renewals out, the last answered
    assert node.sent == sends(4)
    assert recorder.events == []
