"""``http.backlog`` reaches every listening socket: the HTTP port, the metrics listener and the
dedicated WebSocket listener, with and without TLS.

The backlog is read back from the kernel rather than from what relayd passed along: on Linux,
``getsockopt(TCP_INFO)`` on a listening socket reports its accept-queue limit in
``tcpi_sacked`` (``tcp_get_info``: "listeners aliased fields"), the number ``ss -ltn`` shows as
Send-Q. Unlike ``ss`` it needs no external tool, and unlike ``/proc/net/tcp`` it has the field.
The test finds the daemon's sockets among this process's descriptors by their bound address.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from .support import make_config, start_relayd

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads Linux's TCP_INFO")

# Below any net.core.somaxconn in use (the kernel would cap it), and no library's default.
BACKLOG = 37
# struct tcp_info: eight one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked.
TCP_INFO_HEAD = struct.Struct("=8x6I")


def listen_backlog(address: tuple[str, int]) -> int:
    """The accept-queue limit of this process's TCP socket listening on ``address``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            fd = os.dup(int(name))
        except OSError:
            continue  # closed since the directory was listed
        with socket.socket(fileno=fd) as sock:
            if (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and sock.getsockname()[:2] == address
            ):
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
                *_, sacked = TCP_INFO_HEAD.unpack_from(info)
                found.append(sacked)
    assert len(found) == 1, f"{len(found)} sockets listen on {address}"
    backlog: int = found[0]
    return backlog


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_every_listener_has_the_configured_backlog(
    nursery: trio.Nursery, tmp_path: Path, tls: bool
) -> None:
    overrides: dict[str, Any] = {
        "http": {"backlog": BACKLOG},
        "metrics": {"listen": "127.0.0.1:0"},
        "websocket": {"listen": "127.0.0.1:0"},
    }
    if tls:
        cert = trustme.CA().issue_cert("127.0.0.1")
        cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        overrides["tls"] = {"cert_file": str(cert_file), "key_file": str(key_file)}
    relayd = await start_relayd(nursery, make_config(tmp_path, overrides))
    addresses = relayd.addresses
    assert addresses.metrics is not None
    assert addresses.websocket is not None
    listeners = {"http": addresses.http, "metrics": addresses.metrics, "ws": addresses.websocket}
    backlogs = {name: listen_backlog(address) for name, address in listeners.items()}
    assert backlogs == {"http": BACKLOG, "metrics": BACKLOG, "ws": BACKLOG}
    relayd.daemon.stop()
