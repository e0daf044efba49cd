"""Headless Chromium for the browser client's tests: Debian's ``/usr/bin/chromium``, driven by
Playwright's Python package (its driver comes with the wheel; no browser is ever downloaded).

Playwright's sync API blocks, so a test runs its browser part in a worker thread while relayd
runs on the Trio loop, and the thread calls back into Trio (``trio.from_thread.run``) where the
test needs relayd to do something. Every wait in the browser has Playwright's deadline
(``PAGE_TIMEOUT_MS``), and the whole browser part has ``BROWSER_DEADLINE``.

Where Chromium is not installed the tests are skipped, with the reason; with
``REQUIRE_BROWSER_TESTS=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

T = TypeVar("T")

# Flags that work on a machine with no network but the loopback: without the background
# networking ones, Chromium keeps trying to reach Google's hosts.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Any one wait in a page (an element to appear, a status to change).
PAGE_TIMEOUT_MS = 10_000
# The whole browser part of one test, launch included.
BROWSER_DEADLINE = 28.0

expect.set_options(timeout=PAGE_TIMEOUT_MS)


def chromium_path() -> str | None:
    """The Chromium to drive: ``$CHROMIUM_BIN``, else ``chromium`` on the PATH."""
    path = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium")
    return path if path and os.access(path, os.X_OK) else None


def require_chromium() -> str:
    path = chromium_path()
    if path is not None:
        return path
    reason = "headless Chromium is not installed (apt-get install chromium); .ci/run installs it"
    if os.environ.get("REQUIRE_BROWSER_TESTS") == "1":
        pytest.fail(f"REQUIRE_BROWSER_TESTS=1, but {reason}")
    pytest.skip(reason)


async def in_browser(
    executable: str, part: Callable[[Browser], T], *, deadline: float = BROWSER_DEADLINE
) -> T:
    """Run ``part`` with a fresh headless Chromium (a new, empty profile) in a worker thread.

    Past ``deadline`` the test fails; the thread is abandoned and ends at its page's next
    timeout.
    """

    def run() -> T:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=executable,
                args=CHROMIUM_FLAGS,
                headless=True,
                timeout=PAGE_TIMEOUT_MS,
            )
            try:
                return part(browser)
            finally:
                browser.close()

    with trio.fail_after(deadline):
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


class PageProblems:
    """What went wrong in a page: uncaught errors, console errors (CSP violations included)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def watch(self, page: Page, label: str) -> None:
        def console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.seen.append(f"{label}: console: {message.text}")

        page.on("console", console)
        page.on("pageerror", lambda error: self.seen.append(f"{label}: {error}"))


def open_page(browser: Browser, url: str, problems: PageProblems, label: str) -> Page:
    """A page in a context of its own (its own storage: another user), loaded from ``url``."""
    context = browser.new_context(viewport={"width": 760, "height": 520})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    problems.watch(page, label)
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    return page


def side_by_side(browser: Browser, shots: dict[str, bytes], path: Path) -> Path:
    """One PNG at ``path`` showing each screenshot under its label."""
    figures = "".join(
        f'<figure><figcaption>{label}</figcaption><img src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"></figure>'
        for label, png in shots.items()
    )
    page = browser.new_page(viewport={"width": 1560, "height": 600})
    page.set_content(
        "<style>body{margin:0;display:flex;gap:16px;padding:8px;background:#475467;"
        "font:14px sans-serif;color:#fff}figure{margin:0}</style>" + figures
    )
    page.screenshot(path=str(path), full_page=True)
    page.close()
    return path


def evaluate(page: Page, source: str, name: str, **arg: Any) -> Any:
    """Run scenario ``name`` of the JavaScript ``source`` (one function) in ``page``."""
    return page.evaluate(source, {"name": name, **arg})
