"""``kill -9`` of a cluster node under load loses nothing accepted (issue 12).

Two rounds of the cluster crash benchmark (``contrib/bench/cluster_crash.py``): one Redis with
``appendfsync always``, two ``relayd serve`` nodes, four sender/recipient pairs spread over
them; in each round one node is killed with SIGKILL mid-traffic, its clients reconnect to the
other, and the round waits until every message is final. ``store.lease`` is 2 s, so that a
message whose wake the dead node never published is found by the resync that its lease's end
brings, within the round's deadline.
"""

from __future__ import annotations

from pathlib import Path

import trio

from contrib.bench.cluster_crash import CrashParams, run

from .redis_support import require_redis

PAIRS = 4
ON_THE_KILLED_NODE = 4  # with two nodes: two senders and two recipients


async def test_kill_9_of_a_node_under_load_loses_nothing_accepted(tmp_path: Path) -> None:
    binary = require_redis()
    params = CrashParams(
        rounds=2, nodes=2, pairs=PAIRS, window=4, before=60, after=60, settle=10.0, lease=2.0
    )
    with trio.fail_after(60):
        row = await run(params, tmp_path, binary)
    for facts in row["rounds"]:
        assert facts["victim_in_flight"] > 0, facts  # killed mid-traffic
        assert facts["reconnects"] == ON_THE_KILLED_NODE, facts
        assert facts["accepted"] >= params.before + params.after, facts
        # Every message accepted reached its recipient; a second copy is marked redelivered.
        assert (facts["lost"], facts["unmarked_duplicates"], facts["misrouted"]) == (0, 0, 0), facts
        assert facts["not_final"] == 0, facts
        assert facts["delivered"] == facts["accepted"] == facts["sent"], facts
    assert row["ok"]
