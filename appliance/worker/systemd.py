"""sd_notify without libsystemd: one datagram per state change to $NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    """Sends READY=1, STATUS=..., STOPPING=1 and WATCHDOG=1 when run under systemd."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() else None

    def send(self, *fields: str) -> None:
        if self._address is None:
            return
        # Best effort: systemd gone or the socket missing must not stop the worker.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto("\n".join(fields).encode(), self._address)
