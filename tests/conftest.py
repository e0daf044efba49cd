from __future__ import annotations

from pathlib import Path

import pytest
import trio

from .browser_support import require_chromium
from .redis_support import redis_server, redis_url
from .store_support import engine_target, persistent_target, target
from .support import ENGINE_NAMES, SQLITE, Engine, RunningRelayd, make_config, start_relayd

SQLITE_ONLY = "sqlite_only"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{SQLITE_ONLY}(reason): the test runs relayd on the SQLite engine alone, for the"
        " reason given (what it tests is SQLite's own, or does not depend on the engine and"
        " is too slow to run twice); its `engine` is sqlite",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that asks for ``engine`` (itself or through a fixture, such as ``relayd``)
    runs once per engine, unless it is marked ``sqlite_only``."""
    if "engine" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker(SQLITE_ONLY)
    if marker is not None and not (marker.args and marker.args[0]):
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: {SQLITE_ONLY} needs a reason")
    metafunc.parametrize("engine", ["sqlite"] if marker else ENGINE_NAMES, indirect=True)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> Engine:
    """The engine this test's relayd runs on (parametrized by :func:`pytest_generate_tests`):
    ``sqlite``, or ``redis`` on a database of its own (:func:`redis_url`)."""
    if request.param == "redis":
        return Engine("redis", request.getfixturevalue("redis_url"))
    return SQLITE


@pytest.fixture
async def relayd(nursery: trio.Nursery, tmp_path: Path, engine: Engine) -> RunningRelayd:
    """relayd on a free loopback port on ``engine`` (on SQLite, a volatile store), stopped
    after the test."""
    return await start_relayd(nursery, make_config(tmp_path, engine=engine))


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
