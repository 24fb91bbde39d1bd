"""Wake-ups for the Redis broker: a pub/sub subscriber whose file descriptor a select
loop can wait on, and which survives Redis restarts."""

from __future__ import annotations

import time

import redis

from appliance.stores.redis.stable_fd import StableFd


class RedisWake:
    """The wake-up subscriber behind `wake_fd`, with a file descriptor that never changes.

    The supervisor selects on `fd` (a `StableFd`), a copy of the subscriber's socket.
    When that socket is replaced (Redis restarted), the same number is re-pointed at the
    new one; while Redis is down it points at a socket nobody writes to, so the loop
    falls back to its 1 s poll instead of spinning on a dead connection.

    An enqueue's message names the priority bands its queue got messages in ("b:0",
    "b:0,5"; any other text: unknown), so a pool parked on those streams need not claim
    (`drain` returns the texts; `RedisParking.note_woken` reads them).
    """

    RETRY_EVERY = 1.0

    def __init__(self, client: redis.Redis, channels: list[str]) -> None:
        self.client = client
        self.channels = channels
        self.pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self._fd = StableFd()
        self.fd = self._fd.fd
        self.next_try = 0.0

    @property
    def listening(self) -> bool:
        """Whether `fd` points at a live subscription (not at the quiet socket)."""
        return self._fd.target is not None

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
        self._fd.point_at(sock.fileno())

    def _go_quiet(self) -> None:
        self._fd.go_quiet()
        self.next_try = time.monotonic() + self.RETRY_EVERY

    def drain(self) -> dict[str, set[bytes]]:
        """Read every pending message without blocking: for each channel a message came
        on, the texts it carried."""
        seen: dict[str, set[bytes]] = {}
        if not self.listening:
            self.maybe_resubscribe()
            return seen
        try:
            while (message := self.pubsub.get_message(timeout=0)) is not None:
                channel, data = message.get("channel"), message.get("data")
                # A (re)subscription's confirmation carries no text: "unknown", so it
                # wakes every pool (messages may have come while it was away).
                if isinstance(channel, bytes):
                    seen.setdefault(channel.decode(), set()).add(
                        data if isinstance(data, bytes) else b""
                    )
            self._point_at_socket()
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._go_quiet()
        return seen

    def maybe_resubscribe(self) -> None:
        if not self.listening and time.monotonic() >= self.next_try:
            self.subscribe()

    def close(self) -> None:
        try:
            self.pubsub.close()
        finally:
            self._fd.close()
            self.client.close()
