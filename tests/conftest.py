from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .support import RunningRelayd, make_config, start_relayd


@pytest.fixture
async def relayd(nursery: trio.Nursery, tmp_path: Path) -> RunningRelayd:
    """relayd on a free loopback port with a volatile store, stopped after the test."""
    return await start_relayd(nursery, make_config(tmp_path))
