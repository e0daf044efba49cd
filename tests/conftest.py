from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .browser_support import require_chromium
from .redis_support import redis_server, redis_url
from .store_support import engine_target, persistent_target, target
from .support import RunningRelayd, make_config, start_relayd


@pytest.fixture
async def relayd(nursery: trio.Nursery, tmp_path: Path) -> RunningRelayd:
    """relayd on a free loopback port with a volatile store, stopped after the test."""
    return await start_relayd(nursery, make_config(tmp_path))


# Fixtures for every test module.
__all__ = [
    "engine_target",
    "persistent_target",
    "redis_server",
    "redis_url",
    "target",
]


@pytest.fixture
def chromium() -> str:
    """The Chromium the browser tests drive; without one they are skipped (in CI: failed)."""
    return require_chromium()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the screenshots the browser tests saved (``record_property("screenshot", path)``)."""
    shots = {
        (report.nodeid, str(value))
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport)
        for name, value in report.user_properties
        if name == "screenshot"
    }
    if shots:
        terminalreporter.section("screenshots")
        for nodeid, path in sorted(shots):
            terminalreporter.write_line(f"{nodeid}: {path}")
