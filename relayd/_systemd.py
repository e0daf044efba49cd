"""Telling systemd the truth: the ``sd_notify`` datagram protocol, in the standard library.

Under ``Type=notify`` systemd passes a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an
abstract socket when it starts with ``@``). relayd sends ``READY=1`` once every listener is
bound and the store is open, ``STOPPING=1`` when it starts draining, ``RELOADING=1`` and
``READY=1`` around a reload, and, when ``WatchdogSec=`` is set (``$WATCHDOG_USEC``),
``WATCHDOG=1`` at half that interval from a Trio task: if the event loop stalls, the pings
stop and systemd restarts relayd. Without ``$NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger("relayd")


class Notifier:
    """Sends state changes to systemd's notify socket, if there is one."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address:
            # "@name" is an abstract socket: a leading NUL byte in the kernel's namespace.
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # systemd's advice: ping at half the timeout.
            self.watchdog_interval = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram. Never raises:
        a notify socket that went away must not take relayd down."""
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(fields).encode())
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd 253+ matches a reload to its completion with it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        """Ping the watchdog until cancelled (returns at once if no watchdog is set)."""
        if self.address is None or self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)
