"""Parked claims on Redis (`appliance.stores.redis.parking`): an idle pool's claim waits
in XREADGROUP BLOCK; what it brings, cancelling it (before and after it was served),
the streams and wake-ups it covers, rate limits, a Redis restart under it, an ACL that
forbids it. A real redis-server (tests/redis_server.py); SQLite has no parking."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from appliance.broker.protocol import Consumer, Delivery, Settlement
from appliance.config import Settings
from appliance.envelope import Envelope
from appliance.errors import BrokerUnavailable
from appliance.stores.redis.broker import RedisBroker
from appliance.stores.redis.parking import RedisParking
from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import WorkerProcess, app_on
from tests.redis_server import RedisServer
from tests.stores import open_test_stores
from tests.test_control import stem_cli

ME = Consumer("host-a", 1001, 1.0)
POOL = "default"


def envelope(i: int, queue: str = "q", **fields: object) -> Envelope:
    return Envelope(id=f"{queue}-{i}", name="noop", queue=queue, enqueued_at=time.time(), **fields)  # type: ignore[arg-type]


@pytest.fixture
def broker(redis_url: str) -> Iterator[RedisBroker]:
    b = open_test_stores(redis_url, Settings()).broker
    b.wake_fd(["q", "other"])
    yield b
    b.close()


@pytest.fixture
def parking(broker: RedisBroker) -> RedisParking:
    found = broker.parking()
    assert found is not None
    found.fd(POOL)
    return found


def known(broker: RedisBroker, queue: str = "q", lease: float = 30, **fields: object) -> None:
    """Make `queue`'s stream known: one message enqueued, claimed and acked (which also
    records `lease` as this consumer's)."""
    broker.enqueue([envelope(999, queue, **fields)])
    (delivery,) = broker.claim([queue], 1, consumer=ME, lease=lease)
    broker.settle([Settlement.ack(delivery)])


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_sqlite_has_no_parking(sqlite_url: str) -> None:
    assert open_test_stores(sqlite_url, Settings()).broker.parking() is None


def test_no_park_before_a_stream_has_delivered(broker: RedisBroker, parking: RedisParking) -> None:
    assert not parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    known(broker)
    assert parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    assert parking.is_parked(POOL)


def test_a_park_brings_the_next_message_and_it_settles(
    broker: RedisBroker, parking: RedisParking
) -> None:
    known(broker)
    assert parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    fd = parking.fd(POOL)
    assert not readable(fd, 0.05)
    broker.enqueue([envelope(1)])
    assert readable(fd, 2.0)
    got = parking.collect(POOL)
    assert not parking.is_parked(POOL)
    (delivery,) = got.deliveries
    assert (delivery.queue, delivery.deliveries) == ("q", 1)
    assert broker.codec.decode(delivery.payload).id == "q-1"
    assert not got.give_back and not got.claim_now  # one of two: nothing more waits
    assert not readable(fd, 0.05)  # quiet again until the next park
    broker.settle([Settlement.ack(delivery)])
    assert broker.queue_stats() == []  # acked with the park's receipt: gone


def test_a_full_park_says_claim_now(broker: RedisBroker, parking: RedisParking) -> None:
    known(broker)
    parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    broker.enqueue([envelope(i) for i in range(3)])
    assert readable(parking.fd(POOL), 2.0)
    got = parking.collect(POOL)
    assert len(got.deliveries) == 2 and got.claim_now
    assert len(broker.claim(["q"], 5, consumer=ME, lease=30)) == 1  # the third


def test_cancel_before_anything_came_loses_nothing(
    broker: RedisBroker, parking: RedisParking
) -> None:
    known(broker)
    for _ in range(30):  # also right after parking, before the read reached Redis
        assert parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
        assert parking.cancel(POOL).deliveries == []
        assert not parking.is_parked(POOL)
    broker.enqueue([envelope(1)])
    # The cancelled read is not still blocked somewhere, taking the message.
    (delivery,) = broker.claim(["q"], 2, consumer=ME, lease=30)
    assert broker.codec.decode(delivery.payload).id == "q-1"


def test_cancel_after_it_was_served_returns_what_came(
    broker: RedisBroker, parking: RedisParking
) -> None:
    known(broker)
    parking.park(POOL, ["q"], 3, consumer=ME, lease=30)
    broker.enqueue([envelope(1)])
    assert readable(parking.fd(POOL), 2.0)
    got = parking.cancel(POOL)  # not collected: the claim that follows cancels first
    assert [broker.codec.decode(d.payload).id for d in got.deliveries] == ["q-1"]
    assert broker.claim(["q"], 3, consumer=ME, lease=30) == []


def test_wake_ups_are_covered_only_for_parked_streams(
    broker: RedisBroker, parking: RedisParking
) -> None:
    known(broker)
    parking.park(POOL, ["q", "other"], 2, consumer=ME, lease=30)
    broker.enqueue([envelope(1)])  # band 0 of q: parked on it
    time.sleep(0.1)
    broker.clear_wake()
    assert parking.covers(POOL)
    parking.cancel(POOL)
    parking.park(POOL, ["q", "other"], 2, consumer=ME, lease=30)
    broker.enqueue([envelope(2, priority=5)])  # band 5 of q: never delivered, not parked
    time.sleep(0.1)
    broker.clear_wake()
    assert not parking.covers(POOL)
    broker.enqueue([envelope(3, queue="other")])  # a queue with no known stream
    time.sleep(0.1)
    broker.clear_wake()
    assert not parking.covers(POOL)
    parking.note_woken({broker.keys.wake("q"): {b"b:1x"}}, broker.keys.wake(""))
    assert not parking.covers(POOL)  # a text that names no bands: unknown


def test_the_wake_up_text_of_other_scripts_is_unknown_whatever_the_bands(
    broker: RedisBroker, parking: RedisParking
) -> None:
    known(broker, priority=1)  # band 1 is watched: "1" must still not read as band 1
    parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    wake = {broker.keys.wake("q"): {b"1"}}  # a retry, a release, a replay, Beat
    parking.note_woken(wake, broker.keys.wake(""))
    assert not parking.covers(POOL)
    parking.note_woken({broker.keys.wake("q"): {b"b:1"}}, broker.keys.wake(""))
    assert parking.covers(POOL)
    parking.note_woken({broker.keys.wake("q"): {b"b:1", b"*"}}, broker.keys.wake(""))
    assert not parking.covers(POOL)  # a batch with delayed messages: claim
    broker.enqueue([envelope(1, priority=1), envelope(2, priority=1, not_before=time.time() + 60)])
    time.sleep(0.1)
    broker.clear_wake()
    assert not parking.covers(POOL)  # the real "*" of a batch with a delayed message


def test_a_stream_deleted_under_a_park_is_forgotten_and_claimed_again(
    broker: RedisBroker, parking: RedisParking, raw_client: redis.Redis
) -> None:
    known(broker)
    parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    raw_client.delete(broker.keys.stream("q", 0))  # FLUSHALL, a hand-made DEL
    assert readable(parking.fd(POOL), 2.0)  # Redis unblocks the read with an error
    got = parking.collect(POOL)
    assert got.deliveries == [] and got.claim_now
    assert ("q", 0) not in broker.known_streams
    assert not parking.park(POOL, ["q"], 2, consumer=ME, lease=30)  # nothing to block on
    broker.enqueue([envelope(1)])
    (delivery,) = broker.claim(["q"], 2, consumer=ME, lease=30)  # makes the group again
    assert broker.codec.decode(delivery.payload).id == "q-1"
    assert parking.park(POOL, ["q"], 2, consumer=ME, lease=30)


def test_a_rate_limited_message_is_given_back_for_the_claim_to_book(
    broker: RedisBroker, parking: RedisParking
) -> None:
    known(broker, rate=["t.lim", 30.0])  # takes the limiter's first slot
    parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    broker.enqueue([envelope(1, rate=["t.lim", 30.0])])
    assert readable(parking.fd(POOL), 2.0)
    got = parking.collect(POOL)
    assert got.deliveries == [] and got.claim_now
    (limited,) = got.give_back
    broker.settle([Settlement.release(limited, count_delivery=False)])
    # The claim books it 30 s ahead instead of running it now.
    assert broker.claim(["q"], 2, consumer=ME, lease=30) == []
    (stats,) = broker.queue_stats()
    assert (stats.ready, stats.delayed, stats.in_flight) == (0, 1, 0)


def test_a_redis_restart_under_a_park_loses_nothing(
    redis_server: RedisServer, broker: RedisBroker, parking: RedisParking
) -> None:
    known(broker)
    parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    redis_server.kill()
    assert readable(parking.fd(POOL), 2.0)  # the closed connection
    got = parking.collect(POOL)
    assert got.deliveries == [] and got.claim_now and not parking.is_parked(POOL)
    assert not readable(parking.fd(POOL), 0.05)  # quiet, not spinning the loop
    redis_server.start()
    assert not parking.park(POOL, ["q"], 2, consumer=ME, lease=30)  # backs off first
    broker.enqueue([envelope(1)])
    (delivery,) = claim_when_back(broker, lease=30)
    assert broker.codec.decode(delivery.payload).id == "q-1"
    time.sleep(1.0)  # the park's back-off
    broker.settle([Settlement.ack(delivery)])
    assert parking.park(POOL, ["q"], 2, consumer=ME, lease=30)
    broker.enqueue([envelope(2)])
    assert readable(parking.fd(POOL), 2.0)
    assert len(parking.collect(POOL).deliveries) == 1


def test_a_reply_lost_with_its_connection_is_claimed_again_after_the_lease(
    broker: RedisBroker, parking: RedisParking
) -> None:
    known(broker, lease=0.3)
    parking.park(POOL, ["q"], 2, consumer=ME, lease=0.3)
    broker.enqueue([envelope(1)])
    assert readable(parking.fd(POOL), 2.0)
    # The worker dies holding the unread reply (here: its connection is dropped).
    parking._broken(parking._parks[POOL])
    time.sleep(0.4)  # past the lease: the entry in this consumer's PEL is taken over
    broker._next_sweep = 0.0
    (delivery,) = broker.claim(["q"], 2, consumer=ME, lease=0.3)
    assert broker.codec.decode(delivery.payload).id == "q-1"
    assert delivery.deliveries == 2  # it was delivered once, into the lost park


def claim_when_back(broker: RedisBroker, lease: float) -> list[Delivery]:
    deadline = time.monotonic() + 10
    while True:
        try:
            return broker.claim(["q"], 2, consumer=ME, lease=lease)
        except BrokerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize(
    ("rules", "parks"),
    [
        (["+@all", "-client|unblock"], False),
        # The least-privilege user docs/security.md suggests.
        (["+@all", "-@dangerous", "+client|id", "+client|unblock"], True),
    ],
)
def test_parking_needs_client_unblock(
    redis_server: RedisServer, raw_client: redis.Redis, rules: list[str], parks: bool
) -> None:
    raw_client.execute_command(
        "ACL", "SETUSER", "parker", "reset", "on", ">pw", "~stem:*", "&stem:*", *rules
    )
    try:
        url = f"redis://parker:pw@127.0.0.1:{redis_server.port}/0"
        broker = open_test_stores(url, Settings()).broker
        parking = broker.parking()
        assert parking is not None
        parking.fd(POOL)
        known(broker)
        assert parking.park(POOL, ["q"], 2, consumer=ME, lease=30) is parks
        assert parking.enabled is parks
        if parks:
            assert parking.cancel(POOL).deliveries == []
        broker.close()
    finally:
        raw_client.execute_command("ACL", "DELUSER", "parker")


@pytest.fixture
def raw_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --- a real worker -----------------------------------------------------------------------


def blocked_reads(client: redis.Redis) -> int:
    """Clients blocked in XREADGROUP: the worker's parked claims."""
    return sum(
        1 for c in client.client_list() if c.get("cmd") == "xreadgroup" and "b" in c["flags"]
    )


def test_an_idle_worker_parks_its_claim_and_a_pause_still_holds(
    tmp_path: Path, redis_url: str, raw_client: redis.Redis
) -> None:
    stem = app_on(redis_url, ledger_app.stem)
    worker = WorkerProcess(tmp_path, redis_url).start()
    try:
        assert stem.enqueue("t.record", args={"n": 0}).result(timeout=15) == 0
        assert wait_until(lambda: blocked_reads(raw_client) == 1, timeout=5)  # one pool
        for n in range(1, 6):  # lone tasks, each handed over by the park
            assert stem.enqueue("t.record", args={"n": n}).result(timeout=15) == n
        assert wait_until(lambda: blocked_reads(raw_client) == 1, timeout=5)
        code, _, err = stem_cli(redis_url, "worker", "pause", "--queue", "default")
        assert code == 0, err
        # The pause reaches the worker at once (a control request): the park is cancelled.
        assert wait_until(lambda: blocked_reads(raw_client) == 0, timeout=5)
        paused = stem.enqueue("t.record", args={"n": 7})
        time.sleep(1.5)
        assert worker.completions()[paused.id] == 0
        (queue,) = stem.broker.queue_stats()
        assert (queue.paused, queue.ready, queue.in_flight) == (True, 1, 0)
        code, _, err = stem_cli(redis_url, "worker", "resume", "--queue", "default")
        assert code == 0, err
        assert paused.result(timeout=15) == 7
        assert len(worker.completions()) == 7
    finally:
        worker.stop()
        stem.close()
    assert worker.proc is not None and worker.proc.returncode == 0
    assert blocked_reads(raw_client) == 0  # the warm stop cancelled the park
    assert "parked claim" not in worker.read_log()  # no failure of one was logged
