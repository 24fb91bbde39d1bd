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
        pid = os.environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())  # sd_watchdog_enabled(3): maybe not ours
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and ours else None
        self._last_status = ""

    def status(self, text: str) -> None:
        """STATUS=text, sent only when it changed (systemctl status shows the last one)."""
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def send(self, *fields: str) -> None:
        if self._address is None:
            return
        # Best effort: systemd gone or the socket missing must not stop the worker.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto("\n".join(fields).encode(), self._address)
