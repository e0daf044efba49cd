"""TLS on relayd's own listeners: HTTPS and WSS on the HTTP port, WSS on the dedicated one."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import trio
import trio_websocket
import trustme

from relayd import ConfigError, Daemon

from .support import IO_DEADLINE, TEST_ENV, _exchange, make_config, start_relayd


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return {"cert_file": str(cert_file), "key_file": str(key_file)}


async def test_https_and_wss_on_both_transports(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA
) -> None:
    config = make_config(
        tmp_path, {"tls": tls_files(ca, tmp_path), "websocket": {"listen": "127.0.0.1:0"}}
    )
    relayd = await start_relayd(nursery, config)
    assert relayd.addresses.http_url.startswith("https://")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    host, port = relayd.addresses.http
    with trio.fail_after(IO_DEADLINE):
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=client)
        async with stream:
            body = json.dumps({"name": "alice"}).encode()
            headers = {
                "Host": f"{host}:{port}",
                "Connection": "close",
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
            }
            response = await _exchange(stream, "POST", "/register", headers, body)
    assert response.status == 200, response
    token = response.json()["access_token"]
    main = f"wss://{host}:{port}/ws?token={token}"
    dedicated = f"{relayd.addresses.websocket_url}?token={token}"
    assert dedicated.startswith("wss://")
    for url in (main, dedicated):
        with trio.fail_after(IO_DEADLINE):
            async with trio_websocket.open_websocket_url(url, ssl_context=client) as socket:
                welcome = json.loads(await socket.get_message())
        assert welcome["type"] == "connection"


async def test_an_unreadable_key_is_a_configuration_error(tmp_path: Path, ca: trustme.CA) -> None:
    files = tls_files(ca, tmp_path)
    files["key_file"] = str(tmp_path / "missing.pem")
    daemon = Daemon(make_config(tmp_path, {"tls": files}), environ=TEST_ENV)
    with pytest.raises(ConfigError, match="tls: cannot load"):
        await daemon.run()


def test_cert_without_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tls\.key_file: give both or neither"):
        make_config(tmp_path, {"tls": {"cert_file": "/etc/ssl/cert.pem"}})
