"""A daemon started as a worker of ``relayd serve --workers`` (``reuse_port``, ``worker``):
every listener (the HTTP port, the dedicated WebSocket listener, the metrics listener) is bound
with ``SO_REUSEPORT``, so that the other workers bind it too, and every answer names the
worker (``Relayd-Worker``). A daemon that is no worker keeps its ports to itself.
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio

from relayd import Daemon

from .support import TEST_ENV, HttpClient, make_config
from .ws_support import WsClient, connect_url


def worker_of(client: WsClient) -> str:
    headers = dict(client.connection.handshake_headers)
    return headers[b"relayd-worker"].decode()


def joins(address: tuple[str, int]) -> bool:
    """Whether a socket with SO_REUSEPORT can bind ``address`` too (it listens there)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(address)
        except OSError:
            return False
        return True


async def test_a_worker_binds_every_listener_with_reuse_port_and_names_itself(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path,
        {"websocket": {"listen": "127.0.0.1:0"}, "metrics": {"listen": "127.0.0.1:0"}},
    )
    daemon = Daemon(config, environ=TEST_ENV, reuse_port=True, worker=3)
    addresses = await nursery.start(daemon.run)
    assert addresses.metrics is not None
    assert addresses.websocket is not None
    assert [joins(a) for a in (addresses.http, addresses.websocket, addresses.metrics)] == [
        True,
        True,
        True,
    ]
    response = await HttpClient(*addresses.http).get("/health/live")
    assert response.headers["relayd-worker"] == "3"
    metrics = await HttpClient(*addresses.metrics).get("/metrics")
    assert metrics.headers["relayd-worker"] == "3"
    for url in (addresses.websocket_url, f"ws://127.0.0.1:{addresses.http[1]}/ws"):
        async with connect_url(url) as client:
            assert worker_of(client) == "3"
    refused = await HttpClient(*addresses.websocket).get("/elsewhere")
    assert (refused.status, refused.headers["relayd-worker"]) == (404, "3")
    daemon.stop()


async def test_a_daemon_that_is_no_worker_keeps_its_ports_and_names_no_worker(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = make_config(tmp_path, {"websocket": {"listen": "127.0.0.1:0"}})
    daemon = Daemon(config, environ=TEST_ENV)
    addresses = await nursery.start(daemon.run)
    assert addresses.websocket is not None
    assert [joins(a) for a in (addresses.http, addresses.websocket)] == [False, False]
    response = await HttpClient(*addresses.http).get("/health/live")
    assert "relayd-worker" not in response.headers
    daemon.stop()
