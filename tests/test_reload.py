"""Reloading the config on SIGHUP: what can change safely applies at once, the rest is named
as needing a restart, and a bad file leaves the running config alone."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import attrs
import trio

from relayd._config import RELOADABLE, changed_keys, with_keys

from .support import make_config, start_relayd
from .test_cli import SECRET, clean_env, serving, write_config
from .ws_support import connect_url

DEADLINE = 30.0


def test_changed_keys_and_with_keys(tmp_path: Path) -> None:
    old = make_config(tmp_path)
    new = make_config(
        tmp_path,
        {"drain_timeout": 3.0, "log": {"level": "debug"}, "http": {"listen": "127.0.0.1:9"}},
    )
    assert changed_keys(old, new) == ["drain_timeout", "http.listen", "log.level"]
    merged = with_keys(old, new, ["log.level"])
    assert merged.log.level == "debug"
    assert merged.http == old.http
    assert merged.drain_timeout == old.drain_timeout
    assert "http.listen" not in RELOADABLE


async def test_reload_applies_registration_policy_and_limits_at_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = make_config(tmp_path)
    relayd = await start_relayd(nursery, config)
    assert (await relayd.http.post("/register", {"name": "before"})).status == 200
    closed = attrs.evolve(
        config,
        auth=attrs.evolve(config.auth, registration="closed"),
        http=attrs.evolve(config.http, listen="127.0.0.1:1", register_burst=1),
        websocket=attrs.evolve(config.websocket, max_connections=7),
    )
    applied, restart = relayd.daemon.reload(closed)
    assert applied == ["http.register_burst", "websocket.max_connections", "auth.registration"]
    assert restart == ["http.listen"]
    response = await relayd.http.post("/register", {"name": "after"})
    assert (response.status, response.error_code) == (403, "registration_closed")
    assert relayd.daemon.hub is not None
    assert relayd.daemon.hub.core.ws.max_connections == 7
    # What needs a restart was not applied: relayd still serves where it did.
    assert relayd.daemon.config.http.listen == config.http.listen


async def test_sighup_reloads_the_log_level(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    with trio.fail_after(DEADLINE):
        async with serving(tmp_path, config_path, clean_env(RELAYD_SECRET=SECRET)) as serve:
            client = await serve.wait_ready()
            assert not any(" DEBUG " in line for line in serve.lines)
            text = config_path.read_text()
            config_path.write_text(text + '\n[log]\nlevel = "debug"\n')
            serve.process.send_signal(signal.SIGHUP)
            reloaded = await serve.wait_for_line(re.compile(r"config reloaded"))
            assert "applied=log.level" in reloaded
            # Debug lines now appear: open a socket.
            alice = await client.register("alice")
            url = f"ws://{client.host}:{client.port}/ws?token={alice['access_token']}"
            async with connect_url(url) as socket:
                assert (await socket.next())["type"] == "connection"
            await serve.wait_for_line(re.compile(r" DEBUG relayd.relay: authenticated"))
            serve.process.send_signal(signal.SIGHUP)  # unchanged: nothing applied
            await serve.wait_for_line(re.compile(r"config reloaded applied=\"\""))
            config_path.write_text(text + "\n[log]\nlevel = 'loud'\n")
            serve.process.send_signal(signal.SIGHUP)
            refused = await serve.wait_for_line(re.compile(r"reload refused"))
            assert "log.level" in refused
            serve.process.send_signal(signal.SIGTERM)
            assert await serve.exit_code() == 0


async def test_reload_applies_the_api_limit_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = make_config(tmp_path)
    relayd = await start_relayd(nursery, config)
    alice = await relayd.http.register("alice")
    assert (await relayd.http.get("/clients", token=alice["access_token"])).status == 200
    strict = attrs.evolve(config, http=attrs.evolve(config.http, api_burst=1, api_per_minute=1))
    applied, restart = relayd.daemon.reload(strict)
    assert (applied, restart) == (["http.api_per_minute", "http.api_burst"], [])
    # The bucket holds at most the new burst: one request, then 429.
    assert (await relayd.http.get("/clients", token=alice["access_token"])).status == 200
    limited = await relayd.http.get("/clients", token=alice["access_token"])
    assert (limited.status, limited.error_code) == (429, "rate_limited")
