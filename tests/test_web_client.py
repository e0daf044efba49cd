"""The browser client in headless Chromium against a real relayd: two pages that register and
chat, and the JavaScript module's logic (relayd/web/relayd.js), run in the page under its own
Content-Security-Policy. See tests/browser_support.py for how Chromium is driven."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import Browser, Page, expect

from relayd import Daemon

from .browser_support import (
    PageProblems,
    evaluate,
    in_browser,
    open_page,
    side_by_side,
)
from .support import IO_DEADLINE, TEST_ENV, RunningRelayd, make_config, start_relayd

# What runs here is the page's code; relayd on Redis is tested by the end-to-end modules.
pytestmark = pytest.mark.sqlite_only(
    "the page's code is under test, not the engine; Chromium is slow"
)

SCENARIOS = (Path(__file__).parent / "js" / "module_scenarios.js").read_text(encoding="utf-8")


def app_url(relayd: RunningRelayd) -> str:
    host, port = relayd.addresses.http
    return f"http://{host}:{port}/app/"


# --- two people chatting ------------------------------------------------------------------------


def register(page: Page, name: str) -> tuple[str, str]:
    """Register ``name`` on the page; once its socket is open, return its uuid and the
    secret the page showed once."""
    page.fill("#register-form input[name=name]", name)
    page.click("#register-form button[type=submit]")
    expect(page.locator("#state")).to_have_attribute("data-state", "open")
    expect(page.locator("#credentials-secret")).not_to_be_empty()
    secret = page.locator("#credentials-secret").text_content()
    page.click("#credentials-done")
    uuid = page.locator("#me").get_attribute("data-uuid")
    assert uuid is not None
    assert secret
    return uuid, secret


def choose(page: Page, peer: str, *, online: bool = True) -> None:
    page.click("#reload-directory")
    button = page.locator(f"#directory button[data-uuid='{peer}']")
    expect(button).to_have_attribute("data-online", "true" if online else "false")
    button.click()
    expect(page.locator("#peer")).to_have_attribute("data-uuid", peer)


def say(page: Page, text: str) -> str:
    """Send ``text`` to the chosen peer; return its receipts' trail once it is acknowledged."""
    page.fill("#send-form input[name=text]", text)
    page.click("#send-form button[type=submit]")
    sent = page.locator("#messages li.out").last
    expect(sent.locator(".text")).to_have_text(text)
    expect(sent).to_have_attribute("data-status", "acknowledged")
    trail = sent.get_attribute("data-trail")
    assert trail is not None
    return trail


def chat(browser: Browser, url: str, screenshot: Path) -> dict[str, Any]:
    problems = PageProblems()
    alice = open_page(browser, url, problems, "alice")
    bob = open_page(browser, url, problems, "bob")
    urls: list[str] = []
    for page in (alice, bob):
        page.on("request", lambda request: urls.append(request.url))
        page.on("websocket", lambda socket: urls.append(socket.url))
    alice_id, _ = register(alice, "alice")
    bob_id, _ = register(bob, "bob")

    choose(alice, bob_id)
    trails = [say(alice, "hello bob")]
    # Bob was not looking at Alice: her message waits under her name, then shows.
    expect(bob.locator(f"#directory button[data-uuid='{alice_id}'] .unread")).to_have_text("1")
    choose(bob, alice_id)
    expect(bob.locator("#messages li.in .text")).to_have_text(["hello bob"])
    trails.append(say(bob, "hi alice"))
    expect(alice.locator("#messages li.in .text")).to_have_text(["hi alice"])

    shots = {"alice": alice.screenshot(), "bob": bob.screenshot()}
    side_by_side(browser, shots, screenshot)
    return {"trails": trails, "urls": urls, "problems": problems.seen}


async def test_two_browser_pages_register_and_chat(
    chromium: str,
    relayd: RunningRelayd,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    screenshot = tmp_path / "web-chat.png"
    record_property("screenshot", str(screenshot))
    url = app_url(relayd)
    seen = await in_browser(chromium, lambda browser: chat(browser, url, screenshot))
    # Each message: written, pending the peer's ack, acknowledged once the peer's page showed it.
    assert seen["trails"] == ["sent pending_ack acknowledged"] * 2
    assert seen["problems"] == []
    host, port = relayd.addresses.http
    assert f"ws://{host}:{port}/ws" in seen["urls"]
    # The token travels in the subprotocol and the Authorization header, never in a URL.
    assert [u for u in seen["urls"] if "token" in u or "?" in u] == []
    assert screenshot.stat().st_size > 10_000


def away_and_back(browser: Browser, url: str) -> dict[str, Any]:
    problems = PageProblems()
    alice = open_page(browser, url, problems, "alice")
    bob = open_page(browser, url, problems, "bob")
    alice_id, alice_secret = register(alice, "alice")
    bob_id, _ = register(bob, "bob")

    alice.click("#logout")
    expect(alice.locator("#login")).to_be_visible()
    expect(alice.locator("#chat")).to_be_hidden()
    choose(bob, alice_id, online=False)
    bob.fill("#send-form input[name=text]", "are you there?")
    bob.click("#send-form button[type=submit]")
    waiting = bob.locator("#messages li.out").last
    expect(waiting).to_have_attribute("data-status", "queued_offline")

    alice.fill("#login-form input[name=uuid]", alice_id)
    alice.fill("#login-form input[name=secret]", alice_secret)
    alice.click("#login-form button[type=submit]")
    expect(alice.locator("#state")).to_have_attribute("data-state", "open")
    expect(alice.locator("#me")).to_have_attribute("data-uuid", alice_id)
    expect(alice.locator(f"#directory button[data-uuid='{bob_id}'] .unread")).to_have_text("1")
    choose(alice, bob_id)
    expect(alice.locator("#messages li.in .text")).to_have_text(["are you there?"])
    expect(waiting).to_have_attribute("data-status", "acknowledged")
    return {"trail": waiting.get_attribute("data-trail"), "problems": problems.seen}


async def test_a_message_waits_while_its_page_is_logged_out(
    chromium: str, relayd: RunningRelayd
) -> None:
    """Alice logs out; Bob's message is queued; she logs in again with uuid and secret, gets it
    and acknowledges it."""
    seen = await in_browser(chromium, lambda browser: away_and_back(browser, app_url(relayd)))
    assert seen["trail"] == "sent queued_offline acknowledged"
    assert seen["problems"] == []


# --- the module's logic, in the page ------------------------------------------------------------


def scenario(url: str, name: str, **arg: Any) -> Callable[[Browser], dict[str, Any]]:
    """A browser part that runs scenario ``name`` in a page of ``url``; it returns what the
    scenario observed, and what went wrong in the page."""

    def part(browser: Browser) -> dict[str, Any]:
        problems = PageProblems()
        page = open_page(browser, url, problems, name)
        result = evaluate(page, SCENARIOS, name, **arg)
        return {"result": result, "problems": problems.seen}

    return part


async def test_close_codes_backoff_and_refresh_point(chromium: str, relayd: RunningRelayd) -> None:
    seen = await in_browser(chromium, scenario(app_url(relayd), "policies"))
    result = seen["result"]
    actions = {int(code): action for code, action in result["actions"].items()}
    # Never back after 4003 (revoked) or 4009 (replaced); after 4001 with a new token; no
    # sooner than 1 s after 1001 and 5 s after 4029; every other code: back with backoff.
    assert {code: a["reconnect"] for code, a in actions.items() if not a["reconnect"]} == {
        4003: False,
        4009: False,
    }
    assert actions[4001].get("newToken") is True
    assert {code: a["minDelay"] for code, a in actions.items() if a["minDelay"]} == {
        1001: 1,
        4029: 5,
    }
    assert [actions[c]["reason"] for c in (4003, 4009, 4001, 4029, 1001, 1006)] == [
        "revoked",
        "replaced",
        "unauthenticated",
        "limited",
        "server_stopping",
        "connection_lost",
    ]
    # Full jitter under a ceiling of 0.5 s doubling to 30 s.
    ceilings = [round(c, 3) for c in result["ceilings"]]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert result["floors"] == [5, 0]
    assert result["refresh"] == [675, 1.5, 0]
    assert result["idsWellFormed"] is True
    assert result["idsDistinct"] == 50
    assert seen["problems"] == []


async def test_the_page_runs_under_its_own_content_security_policy(
    chromium: str, relayd: RunningRelayd
) -> None:
    _, port = relayd.addresses.http
    other = f"http://localhost:{port}"
    seen = await in_browser(chromium, scenario(app_url(relayd), "contentPolicy", otherOrigin=other))
    assert seen["result"] == {
        "inlineRan": False,
        "evalRan": False,
        "otherFetch": "TypeError: Failed to fetch",
        "ownFetch": 200,
    }
    # Chromium's console names each policy it enforced.
    assert all("Content Security Policy" in problem for problem in seen["problems"])
    enforced = re.findall(r"directive:? [\"']([a-z-]+) ", " ".join(seen["problems"]))
    assert sorted(set(enforced)) == ["connect-src", "script-src"]


async def test_a_refresh_token_is_never_presented_twice(
    chromium: str, relayd: RunningRelayd
) -> None:
    seen = await in_browser(chromium, scenario(app_url(relayd), "spentRefreshTokens"))
    result = seen["result"]
    login = ["/auth/token", {"uuid": "u-1", "client_secret": "the-secret"}]

    def refresh(n: int) -> list[Any]:
        return ["/auth/refresh", {"refresh_token": f"R{n}"}]

    assert result["requests"] == [
        login,
        refresh(1),  # its answer is lost: R1 may be spent,
        login,  # so the client logs in with its secret rather than present R1 again
        refresh(2),  # 429: refused before relayd read it,
        refresh(2),  # so R2 is still good
        refresh(3),  # 500: maybe spent,
        login,  # so, again, a new login
        refresh(4),  # refresh_reused: this login is over,
        # and nothing more is presented: no refresh token, and no new login
    ]
    assert result["outcomes"] == [
        "ok",
        "rate_limited",
        "ok",
        "ok",
        "refresh_reused",
        "no_credentials",
    ]
    assert seen["problems"] == []


async def test_the_socket_follows_the_protocol(chromium: str, relayd: RunningRelayd) -> None:
    seen = await in_browser(chromium, scenario(app_url(relayd), "socketLifecycle"))
    result = seen["result"]
    assert result["urls"] == ["ws://relayd.test/ws"] * 3
    assert result["protocols"] == [
        ["relayd.v1", "bearer.A1"],
        ["relayd.v1", "bearer.A1"],
        ["relayd.v1", "bearer.A2"],  # after 4001: a new token first
    ]
    assert result["sentBeforeWelcome"] == 0
    # Written on the first socket, which closed before its receipt: again on the second.
    assert result["sent"] == [[["message", True]], [["message", True]], []]
    assert result["statuses"] == ["sent", "sending", "sent", "pending_ack", "acknowledged"]
    assert result["final"] == "acknowledged"
    assert result["requests"] == ["/auth/token", "/auth/refresh"]
    assert result["wait"] == 5  # after 4029, even with no jitter
    assert [state[:2] for state in result["states"]] == [
        ["connecting", None],
        ["open", None],
        ["reconnecting", "connection_lost"],
        ["reconnecting", None],
        ["open", None],
        ["reconnecting", "unauthenticated"],
        ["reconnecting", None],
        ["open", None],
        ["reconnecting", "limited"],
        ["stopped", "closed"],
    ]
    assert seen["problems"] == []


async def test_concurrent_refreshes_share_one_rotation(
    chromium: str, relayd: RunningRelayd
) -> None:
    seen = await in_browser(chromium, scenario(app_url(relayd), "oneRotationAtATime"))
    assert seen["result"]["requests"] == [
        ["/auth/token", {"uuid": "u-1", "client_secret": "s"}],
        ["/auth/refresh", {"refresh_token": "R1"}],
    ]
    assert seen["result"]["both"] == ["ok", "ok"]


async def test_the_session_outlives_its_access_tokens(
    chromium: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Access tokens of 3 s, no leeway, a warning 1.5 s before expiry: the module rotates each
    token and hands the new one to the open socket, which lives on past the expiry of the
    token it opened with, without reconnecting; and no refresh token is presented twice
    (relayd would revoke the login, and close the socket with 4003)."""
    ttl = 3.0
    config = make_config(
        tmp_path, {"auth": {"access_ttl": ttl, "leeway": 0.0}, "websocket": {"token_warning": 1.5}}
    )
    relayd = await start_relayd(nursery, config)
    seen = await in_browser(chromium, scenario(app_url(relayd), "rotatesInBand", rotations=3))
    result = seen["result"]
    assert result["states"] == [
        ["connecting", None, None],
        ["open", None, None],
        ["stopped", "closed", None],
    ]
    assert result["openFor"] > ttl
    assert result["refreshed"] >= 3
    assert result["rotated"] == result["refreshed"]
    assert result["errors"] == []
    assert result["final"] == "acknowledged"
    assert seen["problems"] == []


async def test_messages_are_acknowledged_after_the_handler_returns(
    chromium: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = make_config(tmp_path, {"relay": {"ack_timeout": 1.0, "backoff_initial": 0.0}})
    relayd = await start_relayd(nursery, config)
    seen = await in_browser(chromium, scenario(app_url(relayd), "acksAfterTheHandler"))
    result = seen["result"]
    log = [tuple(entry) for entry in result["log"]]
    # While the handler held "slow", a full round trip through relayd came back, and "slow"
    # was still pending_ack; acknowledged only once the handler returned.
    assert log[:4] == [
        ("status", "pending_ack"),
        ("probe", "acknowledged", "slow is", "pending_ack"),
        ("handler returns", "slow"),
        ("status", "acknowledged"),
    ]
    # A handler that throws: no ack; relayd delivers it again, flagged, and that one is acked.
    assert log[4:] == [("handler", "throws", 1, False), ("handler", "throws", 2, True)]
    assert result["throws"] == ["pending_ack", "acknowledged"]
    assert result["errors"] == ["handler_failed"]
    assert seen["problems"] == []


async def test_the_module_stops_after_4009_and_4003(chromium: str, relayd: RunningRelayd) -> None:
    services = relayd.daemon.services
    assert services is not None
    admin = services.auth.mint_operator_token("ops", ("admin",), 600).token
    seen = await in_browser(
        chromium, scenario(app_url(relayd), "stopsWhereTheCloseCodeSays", adminToken=admin)
    )
    result = seen["result"]
    assert result["replaced"] == [
        ["connecting", None, None],
        ["open", None, None],
        ["stopped", "replaced", 4009],
    ]
    assert result["revokeStatus"] == 200
    assert result["revoked"] == [
        ["connecting", None, None],
        ["open", None, None],
        ["stopped", "revoked", 4003],
    ]
    assert seen["problems"] == []


class Restartable:
    """relayd that a test can stop and start again on the same port and state."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.port = 0
        self.daemon: Daemon | None = None
        self.stopped = trio.Event()

    async def start(self) -> RunningRelayd:
        config = make_config(
            self.tmp_path,
            {"http": {"listen": f"127.0.0.1:{self.port}"}, "store": {"path": "relayd.sqlite3"}},
        )
        daemon = self.daemon = Daemon(config, environ=TEST_ENV)
        stopped = self.stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await daemon.run(task_status=task_status)
            finally:
                stopped.set()

        running = RunningRelayd(daemon, await self.nursery.start(run))
        self.port = running.addresses.http[1]
        return running

    async def stop(self) -> None:
        assert self.daemon is not None
        self.daemon.stop()
        with trio.fail_after(IO_DEADLINE):
            await self.stopped.wait()

    async def restart(self) -> None:
        await self.start()


def across_a_restart(
    url: str, stop: Callable[[], Awaitable[None]], start: Callable[[], Awaitable[None]]
) -> Callable[[Browser], dict[str, Any]]:
    def part(browser: Browser) -> dict[str, Any]:
        problems = PageProblems()
        page = open_page(browser, url, problems, "restart")
        assert evaluate(page, SCENARIOS, "restartBegin") == "ready"
        trio.from_thread.run(stop)
        down = evaluate(page, SCENARIOS, "restartWhileDown")
        trio.from_thread.run(start)
        after = evaluate(page, SCENARIOS, "restartAfter")
        return {"down": down, "after": after, "problems": problems.seen}

    return part


async def test_the_module_reconnects_across_a_restart(
    chromium: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay = Restartable(nursery, tmp_path)
    first = await relay.start()
    seen = await in_browser(chromium, across_a_restart(app_url(first), relay.stop, relay.restart))
    down, after = seen["down"], seen["after"]
    assert down["down"]["code"] == 1001
    assert down["status"] == "sending"  # held until there is a socket to send it on
    for states in (after["a"], after["b"]):
        assert states[:3] == [
            ["connecting", None, None],
            ["open", None, None],
            ["reconnecting", "server_stopping", 1001],
        ]
        assert states[-2:] == [["open", None, None], ["stopped", "closed", None]]
    assert after["final"] == "acknowledged"
    assert after["got"] == [["sent while relayd was down", False]]
    # Chromium logs each attempt that found no relayd listening; nothing else went wrong.
    assert [p for p in seen["problems"] if "WebSocket connection to" not in p] == []
