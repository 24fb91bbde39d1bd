"""A descriptor number a select loop can keep watching while the socket behind it is
replaced (a Redis reconnect) or absent (Redis down)."""

from __future__ import annotations

import os
import socket


class StableFd:
    """`fd` points at a live socket (`point_at`) or at one end of a socket pair nobody
    writes to (`go_quiet`), so it is never readable for no reason and never closed.

    Watch it with poll(2) or select(2), which look the number up on every call: epoll
    would keep watching the socket the number pointed at when it was registered.
    """

    def __init__(self) -> None:
        self._quiet, self._quiet_peer = socket.socketpair()
        self.fd = os.dup(self._quiet.fileno())
        self.target: int | None = None  # the socket `fd` points at; None: quiet

    def point_at(self, fileno: int) -> None:
        if fileno != self.target:
            os.dup2(fileno, self.fd, inheritable=False)
            self.target = fileno

    def go_quiet(self) -> None:
        if self.target is not None:
            os.dup2(self._quiet.fileno(), self.fd, inheritable=False)
            self.target = None

    def close(self) -> None:
        os.close(self.fd)
        self._quiet.close()
        self._quiet_peer.close()
