"""Wake-ups for the Redis broker: a pub/sub subscriber whose file descriptor a select
loop can wait on, and which survives Redis restarts."""

from __future__ import annotations

import os
import socket
import time

import redis


class RedisWake:
    """The wake-up subscriber behind `wake_fd`, with a file descriptor that never changes.

    The supervisor selects on `fd`, a dup of the subscriber's socket. When that socket is
    replaced (Redis restarted), `dup2` re-points the same fd number at the new one; while
    Redis is down it points at a socket nobody writes to, so the loop falls back to its
    1 s poll instead of spinning on a dead connection. Watch it with poll(2) or
    select(2), which look the number up on every call; epoll would keep watching the
    socket the number pointed at when it was registered.
    """

    RETRY_EVERY = 1.0

    def __init__(self, client: redis.Redis, channels: list[str]) -> None:
        self.client = client
        self.channels = channels
        self.pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self._quiet, self._quiet_peer = socket.socketpair()
        self.fd = os.dup(self._quiet.fileno())
        self.sock_fd: int | None = None
        self.next_try = 0.0

    def subscribe(self) -> None:
        try:
            self.pubsub.reset()
            self.pubsub.subscribe(*self.channels)
            # Read the confirmations now, so the fd is not readable for no reason.
            for _ in self.channels:
                self.pubsub.get_message(timeout=1.0)
            self._point_at_socket()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._go_quiet()

    def _point_at_socket(self) -> None:
        conn = self.pubsub.connection
        sock = conn._sock if conn is not None else None
        if sock is None:
            self._go_quiet()
            return
        if sock.fileno() != self.sock_fd:
            os.dup2(sock.fileno(), self.fd)
            self.sock_fd = sock.fileno()

    def _go_quiet(self) -> None:
        os.dup2(self._quiet.fileno(), self.fd)
        self.sock_fd = None
        self.next_try = time.monotonic() + self.RETRY_EVERY

    def drain(self) -> set[str]:
        """Read every pending message without blocking; the channels they came on."""
        seen: set[str] = set()
        if self.sock_fd is None:
            self.maybe_resubscribe()
            return seen
        try:
            while (message := self.pubsub.get_message(timeout=0)) is not None:
                channel = message.get("channel")
                if isinstance(channel, bytes):
                    seen.add(channel.decode())
            self._point_at_socket()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._go_quiet()
        return seen

    def maybe_resubscribe(self) -> None:
        if self.sock_fd is None and time.monotonic() >= self.next_try:
            self.subscribe()

    def close(self) -> None:
        try:
            self.pubsub.close()
        finally:
            os.close(self.fd)
            self._quiet.close()
            self._quiet_peer.close()
            self.client.close()
