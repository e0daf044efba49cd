"""The seed system's topic example (``tests/fixtures/seed/example_topics.py``, byte for byte
swifty-server's) runs unchanged against relayd, on both engines, and every call it makes
succeeds: registration, topic creation, the topic list and info (which it asks for without a
token), subscriptions, WebSocket connections, and four messages published to the room, each
answered ``topic_sent`` and delivered once to each other subscriber."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections import Counter
from pathlib import Path

import trio

from .support import RunningRelayd

SEED = Path(__file__).parent / "fixtures" / "seed"
EXAMPLE = SEED / "example_topics.py"
# The git blob id of example_topics.py at swifty-server 4d4f8038ab6c892c0dc86b12406c386035de3a07.
UPSTREAM_BLOB = "1cba094b4884291a0fd5175c6f5e01cf61b17521"
# The example sleeps about 13 s in all; registration and connections take little.
DEADLINE = 60.0


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id


def test_the_example_is_the_seed_systems_own() -> None:
    assert git_blob_id(EXAMPLE.read_bytes()) == UPSTREAM_BLOB


async def test_the_seed_topic_example_runs_unchanged_and_every_call_succeeds(
    relayd: RunningRelayd,
) -> None:
    _, port = relayd.addresses.http
    with trio.fail_after(DEADLINE):
        done = await trio.run_process(
            [sys.executable, str(SEED / "run_unchanged.py"), str(EXAMPLE), str(port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    assert "✗" not in out, out  # the example's mark of a failed call
    assert "Error running demo" not in out, out
    lines = out.splitlines()

    def count(pattern: str) -> int:
        return sum(1 for line in lines if re.search(pattern, line))

    for name in ("Alice", "Bob", "Charlie"):
        assert count(rf"^\[{name}\] ✓ Registration successful!$") == 1, out
        assert count(rf"^\[{name}\] ✓ Subscribed to: demo-room$") == 1, out
        assert count(rf"^\[{name}\] ✓ Connected to WebSocket!$") == 1, out
    assert count(r"^\[Alice\] ✓ Topic created: demo-room$") == 1, out
    # The list (before anyone subscribed) and the info, both asked without a token.
    assert count(r"^  - demo-room \(subscribers: 0\)$") == 1, out
    assert count(r"^  Subscribers: 3$") == 1, out
    assert count(r"^  Metadata: \{'description': 'Demo room for testing'\}$") == 1, out
    # Each of the four messages: topic_sent to its publisher, and one delivery to each of
    # the two other subscribers (never back to the publisher).
    sent = Counter(
        m.group(1) for line in lines if (m := re.match(r"^\[(\w+)\] ✓ Topic message sent to", line))
    )
    assert sent == {"Alice": 2, "Bob": 1, "Charlie": 1}, out
    assert count(r"Message sent to 2 subscribers$") == 4, out
    received = Counter(
        (m.group(1), m.group(2))
        for line in lines
        if (m := re.match(r"^\[(\w+)\] 📨 Topic message from [0-9a-f-]{36}: (.*)$", line))
    )
    alice = ["Hello everyone! This is Alice speaking.", "Great to have everyone here!"]
    bob, charlie = "Hi Alice! Bob here.", "Hey team! Charlie checking in."
    assert received == Counter(
        {
            **{("Bob", text): 1 for text in alice},
            **{("Charlie", text): 1 for text in alice},
            ("Alice", bob): 1,
            ("Charlie", bob): 1,
            ("Alice", charlie): 1,
            ("Bob", charlie): 1,
        }
    ), out
    # Nothing else was taken for a topic message (a topic_update, say).
    assert count("📨") == 8, out
