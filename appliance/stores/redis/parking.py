"""Parked claims on Redis: an idle pool waits in `XREADGROUP ... BLOCK 0` on a connection
of its own, so Redis hands it the producer's entry in the producer's own event-loop
turn (and under the producer's AOF fsync).

Why: the wake-up-then-claim path costs a second fsync. With `appendfsync always`, the
claim script's PEL write is fsynced before its reply, so an idle worker's hand-off
was the PUBLISH, a claim and that fsync: 0.79-0.89 ms p50 against 0.07-0.08 ms for a
blocked read (`bench/redis_wake_probe.py`).

What the claim script does that a blocked read cannot, and how it is made up for:
- Priorities, paused queues: a park is only made after a claim came back short (every
  stream it reads was empty), over the pool's unpaused queues; a pause cancels it.
- Delayed messages are promoted by the claim script: the pool's next poll (set for the
  next due message by `StoreRound.look_ahead`) cancels the park and claims.
- Rate limits: a rate-limited entry is given back unstarted (`Parked.give_back`) and
  the pool claims at once, so the claim script books it into its slot.
- Streams that do not exist yet have no group to block on: a park reads only the band
  streams that have delivered to this broker before; a message on any other arrives
  by the wake-up and the ordinary claim (`covers` tells the two apart: each wake-up
  names the bands that got messages).
- The consumer's lease in the `consumers` hash was written by the claim that delivered
  from the stream first.

Failures: a broken connection goes quiet and the pool claims as before; what Redis
delivered into it stays in this consumer's PEL and is re-claimed after its lease (the
sweep, or `recover`), as after a crash. Cancelling is `CLIENT UNBLOCK` from the main
connection, then reading the parked reply (nil, or the entries it got first).
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from appliance.broker.protocol import Consumer, Delivery, Parked
from appliance.stores.redis import keys as rk
from appliance.stores.redis.conn import connect
from appliance.stores.redis.records import text
from appliance.stores.redis.stable_fd import StableFd

if TYPE_CHECKING:
    from appliance.stores.redis.broker import RedisBroker

log = logging.getLogger("stem.redis")

RETRY_S = 1.0  # after a failure, park again no sooner than this
READ_TIMEOUT_S = 1.0  # reading a reply that Redis has sent or is about to send
UNBLOCK_WAIT_S = 0.002  # CLIENT UNBLOCK said "not blocked": wait this long for the reply
UNBLOCK_TRIES = 10  # ... this many times (the read may not have reached Redis yet); then
# the connection is dropped: the loop must not stall on it (time limits wait meanwhile)
FAILURES = (redis.RedisError, OSError)  # a protocol error too: never into the loop
WAKE_BANDS = b"b:"  # a wake-up naming its bands: b"b:0,5" (`scripts.store_batch`)


@dataclass(slots=True)
class _Park:
    fd: StableFd
    client: redis.Redis
    conn: Any = None  # redis-py Connection, held for good
    client_id: int | None = None
    queues: frozenset[str] = frozenset()  # the pool's unpaused queues when parked
    streams: dict[bytes, tuple[str, int]] = field(default_factory=dict)  # key -> q, band
    count: int = 0
    consumer: str = ""
    lease: float = 0.0
    waiting: bool = False  # an XREADGROUP is outstanding
    next_try: float = 0.0  # monotonic


class RedisParking:
    """`ClaimParking` on Redis, one connection per pool; made by `RedisBroker.parking`."""

    def __init__(self, broker: RedisBroker) -> None:
        self.broker = broker
        self.enabled = True
        self._parks: dict[str, _Park] = {}
        # The last wake-up: queue -> the bands it named, or None (unknown: a release,
        # a retry, a replay, an older producer).
        self.woken: dict[str, set[int] | None] = {}

    def fd(self, key: str) -> int:
        park = self._parks.get(key)
        if park is None:
            client = connect(self.broker.url, retry=False)
            # A reply is read only once the socket is readable (or CLIENT UNBLOCK made
            # one certain): a read that still stalls is a broken connection.
            client.connection_pool.connection_kwargs["socket_timeout"] = READ_TIMEOUT_S
            park = self._parks[key] = _Park(StableFd(), client)
        return park.fd.fd

    def is_parked(self, key: str) -> bool:
        park = self._parks.get(key)
        return park is not None and park.waiting

    # --- parking -----------------------------------------------------------------------

    def park(
        self, key: str, queues: Sequence[str], count: int, *, consumer: Consumer, lease: float
    ) -> bool:
        park = self._parks[key]
        if park.waiting:
            return True
        if not self.enabled or count <= 0 or time.monotonic() < park.next_try:
            return False
        stream = self.broker.keys.stream
        known = self.broker.known_streams
        streams = {
            stream(q, band).encode(): (q, band)
            for q in queues
            for band in rk.BANDS_HIGH_FIRST
            if (q, band) in known
        }
        if not streams:
            return False
        try:
            conn = self._connection(park)
            if conn is None:
                return False
        except redis.ResponseError as exc:  # an ACL without CLIENT ID
            self._disable(exc)
            return False
        except FAILURES:
            self._broken(park)
            return False
        try:
            conn.send_command(
                "XREADGROUP", "GROUP", rk.GROUP, consumer.name, "COUNT", count, "BLOCK", 0,
                "STREAMS", *streams, *([">"] * len(streams)),
            )  # fmt: skip
        except FAILURES:
            self._broken(park)
            return False
        park.fd.point_at(conn._sock.fileno())
        park.queues, park.streams = frozenset(queues), streams
        park.count, park.consumer, park.lease = count, consumer.name, lease
        park.waiting = True
        return True

    def _connection(self, park: _Park) -> Any:
        """The park's connection, connected, with its client id; None if parking is
        not allowed here (checked once, on the first connection)."""
        if park.conn is None:
            park.conn = park.client.connection_pool.make_connection()  # ours alone
        conn = park.conn
        if conn._sock is None or park.client_id is None:
            conn.connect()
            conn.send_command("CLIENT", "ID")
            park.client_id = int(conn.read_response())
            if not self._may_unblock(park.client_id):
                return None
        return conn

    def _may_unblock(self, client_id: int) -> bool:
        """Whether this user may CLIENT UNBLOCK (an ACL may deny it): without it a park
        could not be cancelled, so there is no parking."""
        try:
            self._unblock(client_id)  # not blocked: 0, if allowed at all
        except redis.ResponseError as exc:
            self._disable(exc)
            return False
        return True

    def _disable(self, exc: Exception) -> None:
        log.info(
            "parked claims off: this Redis user may not run CLIENT ID and CLIENT UNBLOCK "
            "(%s); idle workers claim after each wake-up instead (grant +client|id "
            "+client|unblock for the shorter hand-off)", exc,
        )  # fmt: skip
        self.enabled = False

    # --- replies -------------------------------------------------------------------------

    def collect(self, key: str) -> Parked:
        park = self._parks[key]
        if not park.waiting:  # the fd is quiet between parks: not expected, but safe
            self._broken(park)
            return Parked(claim_now=True)
        return self._read(park)

    def cancel(self, key: str) -> Parked:
        park = self._parks.get(key)
        if park is None or not park.waiting:
            return Parked()
        if _readable(park.fd.fd, 0):  # served already: no round trip (and none to fail)
            return self._read(park)
        try:
            for _ in range(UNBLOCK_TRIES):
                unblocked = self._unblock(park.client_id)
                # 0: not blocked, because it was served (the reply is on its way) or
                # because the read has not reached Redis yet: look, then ask again.
                if unblocked or _readable(park.fd.fd, UNBLOCK_WAIT_S):
                    return self._read(park)
        except FAILURES:
            pass
        log.warning("could not cancel a parked claim; its connection is dropped")
        self._broken(park)
        return Parked(claim_now=True)

    def _unblock(self, client_id: int | None) -> bool:
        """CLIENT UNBLOCK from the broker's own connection: whether it was blocked."""
        client: Any = self.broker.client
        return bool(client.execute_command("CLIENT", "UNBLOCK", client_id))

    def _read(self, park: _Park) -> Parked:
        park.waiting = False
        park.fd.go_quiet()
        try:
            reply = park.conn.read_response()
        except redis.ResponseError as exc:
            # NOGROUP: a stream was deleted (purged, flushed): read it by claiming again.
            log.info("parked claim refused (%s); claiming instead", exc)
            self.broker.known_streams.difference_update(park.streams.values())
            return Parked(claim_now=True)
        except FAILURES:
            self._broken(park)
            return Parked(claim_now=True)
        try:
            return self._parse(park, reply)
        except (KeyError, TypeError, ValueError) as exc:  # never seen: no worker crash
            log.error("unreadable parked claim reply (%s); its deliveries run after "
                      "their lease", exc)  # fmt: skip
            return Parked(claim_now=True)

    def _parse(self, park: _Park, reply: Any) -> Parked:
        got = Parked()
        if not reply:
            return got
        lease_until = time.time() + park.lease
        n = 0
        # RESP3 (redis-py's default) replies with a map, RESP2 with pairs.
        for stream_key, entries in reply.items() if isinstance(reply, dict) else reply:
            queue, band = park.streams[stream_key]
            for entry_id, flat in entries:
                n += 1
                if not flat:
                    continue
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                payload = fields.get(b"p")
                if payload is None:
                    continue
                entry, task = text(entry_id), text(fields.get(b"t", b""))
                origin = text(fields.get(b"o", entry_id))
                receipt = f"{band}|{entry}|1|{park.consumer}|{origin}|{task}"
                base = int(fields.get(b"b", b"0"))
                delivery = Delivery(receipt, queue, payload, base + 1, lease_until)
                if fields.get(b"rk"):
                    got.give_back.append(delivery)
                else:
                    got.deliveries.append(delivery)
        got.claim_now = n >= park.count or bool(got.give_back)
        return got

    def _broken(self, park: _Park) -> None:
        park.waiting = False
        park.fd.go_quiet()
        park.client_id = None
        park.next_try = time.monotonic() + RETRY_S
        if park.conn is not None:
            park.conn.disconnect()

    # --- wake-ups --------------------------------------------------------------------------

    def note_woken(self, seen: dict[str, set[bytes]], channel_prefix: str) -> None:
        """Remember what a wake-up named (`RedisWake.drain`; the control channel left
        out): for each queue, its bands, or None for any text but b"b:<bands>" (the
        "1" of retries, releases, replays, Beat and older producers: unknown)."""
        self.woken = {}
        for channel, texts in seen.items():
            if not channel.startswith(channel_prefix):
                continue
            self.woken[channel[len(channel_prefix) :]] = _named_bands(texts)

    def covers(self, key: str) -> bool:
        park = self._parks.get(key)
        if park is None or not park.waiting:
            return False
        watched = set(park.streams.values())
        for queue, bands in self.woken.items():
            if queue not in park.queues:
                continue  # not this pool's, or paused: a claim would not read it either
            if bands is None or any((queue, band) not in watched for band in bands):
                return False
        return True

    def close(self) -> None:
        for park in self._parks.values():
            if park.conn is not None:
                park.conn.disconnect()
            park.client.close()
            park.fd.close()
        self._parks.clear()


def _named_bands(texts: set[bytes]) -> set[int] | None:
    """The bands a queue's wake-up texts name, or None if any of them names none."""
    bands: set[int] = set()
    for data in texts:
        parts = data.removeprefix(WAKE_BANDS).split(b",")
        if not data.startswith(WAKE_BANDS) or not all(p.isdigit() for p in parts):
            return None
        bands.update(int(p) for p in parts)
    return bands


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))
