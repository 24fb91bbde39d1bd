"""The `Broker` contract (appliance/broker/protocol.py), once per store.

Only the protocol is used, through `open_stores`, so the same tests hold every adapter
to the same semantics. Waits are bounded (`wait_until`), never bare sleeps for a result.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

import psutil
import pytest

from appliance.broker.protocol import Broker, Consumer, DeadLetterInfo, Delivery, Settlement
from appliance.config import Settings
from appliance.envelope import Envelope, decode, new_task_id
from appliance.states import DeadLetterReason
from tests.conftest import wait_until
from tests.stores import open_test_stores, overwrite_dead_letter_payload

LEASE = 30.0
SHORT_LEASE = 0.3


@pytest.fixture
def broker(store_url: str) -> Iterator[Broker]:
    opened = open_test_stores(store_url, Settings()).broker
    yield opened
    opened.close()


@pytest.fixture
def me() -> Consumer:
    return Consumer.this_process()


@pytest.fixture
def other() -> Iterator[Consumer]:
    """A second live consumer (another supervisor): a real process on this host."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(process.pid).create_time()
        yield Consumer(socket.gethostname(), process.pid, started)
    finally:
        process.kill()
        process.wait()


def envelope(queue: str = "default", **fields: object) -> Envelope:
    return Envelope(
        id=new_task_id(), name="tests.noop", queue=queue, enqueued_at=time.time(), **fields
    )  # type: ignore[arg-type]


def task_ids(deliveries: Sequence[Delivery]) -> list[str]:
    return [decode(delivery.payload).id for delivery in deliveries]


def claim_one(broker: Broker, consumer: Consumer, lease: float = LEASE) -> Delivery:
    claimed = broker.claim(["default"], 1, consumer=consumer, lease=lease)
    assert len(claimed) == 1
    return claimed[0]


def claim_eventually(broker: Broker, consumer: Consumer, timeout: float = 5) -> list[Delivery]:
    """Poll claim until it returns something (a due time passing), bounded."""
    claimed: list[Delivery] = []

    def poll() -> bool:
        claimed.extend(broker.claim(["default"], 10, consumer=consumer, lease=LEASE))
        return bool(claimed)

    assert wait_until(poll, timeout=timeout)
    return claimed


def lose_lease(broker: Broker, holder: Consumer, thief: Consumer) -> tuple[Delivery, Delivery]:
    """`holder` claims with a short lease that expires; `thief` recovers and claims it."""
    lost = claim_one(broker, holder, lease=SHORT_LEASE)
    assert wait_until(lambda: broker.recover(thief) >= 1, timeout=5)
    taken = claim_one(broker, thief)
    assert task_ids([taken]) == task_ids([lost])
    return lost, taken


# --- claim order and timing ---------------------------------------------------------


def test_claim_order_is_priority_then_fifo(broker: Broker, me: Consumer) -> None:
    envs = [envelope(priority=p) for p in (0, 5, 0, 5, -1, 9)]
    broker.enqueue(envs)
    expected = [envs[i].id for i in (5, 1, 3, 0, 2, 4)]

    first = broker.claim(["default"], 2, consumer=me, lease=LEASE)
    rest = broker.claim(["default"], 10, consumer=me, lease=LEASE)

    assert task_ids(first) + task_ids(rest) == expected
    assert all(d.deliveries == 1 and d.queue == "default" for d in first + rest)
    assert broker.claim(["default"], 10, consumer=me, lease=LEASE) == []


def test_claim_returns_the_payload_verbatim(broker: Broker, me: Consumer) -> None:
    env = envelope(args={"to": "a@example.com", "n": [1, 2.5]}, meta={"requestId": "r1"})
    broker.enqueue([env])
    assert decode(claim_one(broker, me).payload) == env


def test_not_before_is_never_claimed_early(broker: Broker, me: Consumer) -> None:
    due = time.time() + 0.5
    env = envelope(not_before=due)
    broker.enqueue([env])

    assert broker.claim(["default"], 10, consumer=me, lease=LEASE) == []
    claimed = claim_eventually(broker, me)
    assert time.time() >= due
    assert task_ids(claimed) == [env.id]


def test_next_due_is_the_earliest_delayed_message(broker: Broker) -> None:
    assert broker.next_due(["default", "other"]) is None
    now = time.time()
    broker.enqueue([envelope(not_before=now + 300), envelope(not_before=now + 100)])
    broker.enqueue([envelope("other", not_before=now + 50), envelope("ready")])

    assert broker.next_due(["default"]) == pytest.approx(now + 100, abs=0.01)
    assert broker.next_due(["default", "other"]) == pytest.approx(now + 50, abs=0.01)
    assert broker.next_due(["ready"]) is None


def test_multiple_queues_and_limit(broker: Broker, me: Consumer) -> None:
    broker.enqueue([envelope("a") for _ in range(3)] + [envelope("b") for _ in range(3)])
    broker.enqueue([envelope("c")])

    first = broker.claim(["a", "b"], 4, consumer=me, lease=LEASE)
    second = broker.claim(["a", "b"], 4, consumer=me, lease=LEASE)

    assert len(first) == 4 and len(second) == 2
    assert sorted(d.queue for d in first + second) == ["a"] * 3 + ["b"] * 3
    assert broker.claim(["a", "b"], 4, consumer=me, lease=LEASE) == []
    assert [d.queue for d in broker.claim(["c"], 4, consumer=me, lease=LEASE)] == ["c"]


def test_no_queue_starves_when_each_claim_fills_its_limit(broker: Broker, me: Consumer) -> None:
    broker.enqueue([envelope("a") for _ in range(10)] + [envelope("b") for _ in range(10)])
    seen = {d.queue for _ in range(4) for d in broker.claim(["a", "b"], 2, consumer=me, lease=1)}
    assert seen == {"a", "b"}


# --- leases ---------------------------------------------------------------------------


def test_expired_lease_is_recovered_and_redelivered(broker: Broker, me: Consumer) -> None:
    env = envelope()
    broker.enqueue([env])
    claim_one(broker, me, lease=SHORT_LEASE)
    assert broker.claim(["default"], 1, consumer=me, lease=LEASE) == []  # still leased

    assert wait_until(lambda: broker.recover(me) >= 1, timeout=5)
    again = claim_one(broker, me)

    assert task_ids([again]) == [env.id]
    assert again.deliveries == 2


def test_extend_prevents_redelivery(broker: Broker, me: Consumer) -> None:
    broker.enqueue([envelope()])
    held = claim_one(broker, me, lease=SHORT_LEASE)
    assert broker.extend([held], LEASE) == []  # still ours: nothing lost

    time.sleep(SHORT_LEASE * 2)  # past the original lease: it must not matter now
    assert broker.recover(me) == 0
    assert broker.claim(["default"], 1, consumer=me, lease=LEASE) == []
    broker.settle([Settlement.ack(held)])
    assert broker.find_message(decode(held.payload).id) is None


def test_recover_frees_leases_of_dead_consumers_on_this_host_at_once(
    broker: Broker, me: Consumer
) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = Consumer(me.host, int(gone.stdout), time.time() - 5)
    previous_me = Consumer(me.host, me.pid, me.started - 100)  # our pid, an earlier process
    elsewhere = Consumer("another-host", me.pid, me.started)  # not provably dead
    broker.enqueue([envelope() for _ in range(4)])
    for holder in (dead_pid, previous_me, elsewhere, me):
        claim_one(broker, holder)

    assert broker.recover(me) == 2
    again = broker.claim(["default"], 10, consumer=me, lease=LEASE)
    assert len(again) == 2 and all(d.deliveries == 2 for d in again)
    assert broker.recover(me) == 0


# --- settling ---------------------------------------------------------------------------


def test_ack_removes_the_message(broker: Broker, me: Consumer) -> None:
    env = envelope()
    broker.enqueue([env])
    broker.settle([Settlement.ack(claim_one(broker, me))])

    assert broker.find_message(env.id) is None
    assert broker.list_messages() == []
    assert broker.claim(["default"], 10, consumer=me, lease=LEASE) == []
    assert all(s.ready + s.delayed + s.in_flight == 0 for s in broker.queue_stats())


def test_retry_stores_the_next_attempt_and_resets_deliveries(broker: Broker, me: Consumer) -> None:
    env = envelope()
    broker.enqueue([env])
    first = claim_one(broker, me)
    due = time.time() + 0.4
    broker.settle([Settlement.retry(first, env.next_attempt(due))])

    info = broker.find_message(env.id)
    assert info is not None and info.state == "delayed" and info.attempt == 1
    assert info.deliveries == 0
    assert broker.claim(["default"], 1, consumer=me, lease=LEASE) == []
    assert broker.next_due(["default"]) == pytest.approx(due, abs=0.01)

    claimed = claim_eventually(broker, me)
    assert time.time() >= due
    assert decode(claimed[0].payload) == env.next_attempt(due)
    assert claimed[0].deliveries == 1


def test_retry_without_delay_is_claimable_at_once(broker: Broker, me: Consumer) -> None:
    env = envelope()
    broker.enqueue([env])
    broker.settle([Settlement.retry(claim_one(broker, me), env.next_attempt(time.time()))])
    assert decode(claim_one(broker, me).payload).attempt == 1


def test_dead_letter_keeps_reason_and_error(broker: Broker, me: Consumer) -> None:
    env = envelope("mail")
    broker.enqueue([env])
    held = broker.claim(["mail"], 1, consumer=me, lease=LEASE)[0]
    info = DeadLetterInfo(DeadLetterReason.EXHAUSTED, "ValueError", "bad input", "Traceback…")
    broker.settle([Settlement.dead_letter(held, info)])

    assert broker.find_message(env.id) is None
    assert broker.claim(["mail"], 10, consumer=me, lease=LEASE) == []
    assert broker.dlq_count() == 1 and broker.dlq_count("mail") == 1
    (entry,) = broker.dlq_list()
    assert (entry.task_id, entry.name, entry.queue) == (env.id, env.name, "mail")
    assert (entry.reason, entry.error_type, entry.message, entry.traceback) == (
        "exhausted", "ValueError", "bad input", "Traceback…",
    )  # fmt: skip
    assert entry.attempts == 1
    assert decode(entry.payload) == env
    assert entry.dead_at == pytest.approx(time.time(), abs=5)
    assert broker.dlq_get(entry.id) == entry


def test_release_counted_and_uncounted(broker: Broker, me: Consumer) -> None:
    broker.enqueue([envelope()])
    first = claim_one(broker, me)
    broker.settle([Settlement.release(first, count_delivery=True)])
    second = claim_one(broker, me)
    assert second.deliveries == 2

    broker.settle([Settlement.release(second, count_delivery=False)])
    third = claim_one(broker, me)
    assert third.deliveries == 2


def test_settle_applies_a_mixed_batch(broker: Broker, me: Consumer) -> None:
    envs = [envelope(priority=-i) for i in range(4)]
    broker.enqueue(envs)
    held = broker.claim(["default"], 4, consumer=me, lease=LEASE)
    broker.settle([
        Settlement.ack(held[0]),
        Settlement.retry(held[1], envs[1].next_attempt(time.time() + 300)),
        Settlement.dead_letter(held[2], DeadLetterInfo(DeadLetterReason.PERMANENT)),
        Settlement.release(held[3], count_delivery=False),
    ])  # fmt: skip

    assert broker.find_message(envs[0].id) is None
    retried = broker.find_message(envs[1].id)
    assert retried is not None and retried.state == "delayed"
    assert [e.task_id for e in broker.dlq_list()] == [envs[2].id]
    released = broker.find_message(envs[3].id)
    assert released is not None and released.state == "ready" and released.deliveries == 0


def test_extend_reports_exactly_the_leases_that_were_lost(
    broker: Broker, me: Consumer, other: Consumer
) -> None:
    broker.enqueue([envelope()])
    lost, taken = lose_lease(broker, me, other)
    broker.enqueue([envelope()])
    kept = claim_one(broker, me)
    assert broker.extend([kept, lost], LEASE) == [lost]
    assert broker.extend([taken], LEASE) == []


def test_stale_retry_and_release_change_nothing(
    broker: Broker, me: Consumer, other: Consumer
) -> None:
    env = envelope()
    broker.enqueue([env])
    lost, taken = lose_lease(broker, me, other)

    broker.settle([Settlement.retry(lost, env.next_attempt(time.time() + 300))])
    broker.settle([Settlement.release(lost, count_delivery=False)])
    assert broker.extend([lost], 0.01) == [lost]  # reported lost, and not extended

    info = broker.find_message(env.id)
    assert info is not None
    assert (info.state, info.attempt, info.deliveries) == ("leased", 0, 2)
    assert broker.recover(other) == 0  # the thief's lease was not shortened
    broker.settle([Settlement.ack(taken)])
    assert broker.find_message(env.id) is None


def test_stale_ack_still_removes_the_message(broker: Broker, me: Consumer, other: Consumer) -> None:
    env = envelope()
    broker.enqueue([env])
    lost, _taken = lose_lease(broker, me, other)
    broker.settle([Settlement.ack(lost)])  # the task did finish
    assert broker.find_message(env.id) is None


def test_late_ack_after_the_message_left_touches_no_newer_message(
    broker: Broker, me: Consumer, other: Consumer
) -> None:
    broker.enqueue([envelope()])
    lost, taken = lose_lease(broker, me, other)
    broker.settle([Settlement.ack(taken)])
    newer = envelope()
    broker.enqueue([newer])

    broker.settle([Settlement.ack(lost)])
    broker.settle([Settlement.dead_letter(lost, DeadLetterInfo(DeadLetterReason.PERMANENT))])

    assert broker.find_message(newer.id) is not None
    assert broker.dlq_count() == 0


# --- observation ---------------------------------------------------------------------------


def test_list_and_find_messages(broker: Broker, me: Consumer) -> None:
    low, high, later = envelope(priority=0), envelope(priority=3), envelope("other")
    broker.enqueue([low, high, later])

    assert [m.task_id for m in broker.list_messages("default")] == [high.id, low.id]
    assert [m.task_id for m in broker.list_messages("default", limit=1, offset=1)] == [low.id]
    assert {m.task_id for m in broker.list_messages()} == {low.id, high.id, later.id}
    found = broker.find_message(high.id)
    assert found is not None
    assert (found.name, found.queue, found.priority, found.attempt, found.state) == (
        "tests.noop", "default", 3, 0, "ready",
    )  # fmt: skip
    assert found.deliveries == 0 and found.lease_until is None

    claim_one(broker, me)
    leased = broker.find_message(high.id)
    assert leased is not None and leased.state == "leased" and leased.deliveries == 1
    assert leased.lease_until == pytest.approx(time.time() + LEASE, abs=5)
    assert broker.find_message(new_task_id()) is None


def test_queue_stats(broker: Broker, me: Consumer) -> None:
    broker.enqueue([envelope("a") for _ in range(4)] + [envelope("a", not_before=1e10)])
    broker.enqueue([envelope("b")])
    held = broker.claim(["a"], 2, consumer=me, lease=LEASE)
    dead = broker.claim(["b"], 1, consumer=me, lease=LEASE)
    info = DeadLetterInfo(DeadLetterReason.UNKNOWN_TASK)
    broker.settle([Settlement.dead_letter(held[0], info), Settlement.dead_letter(dead[0], info)])

    stats = {s.queue: s for s in broker.queue_stats()}
    assert set(stats) == {"a", "b"}
    a, b = stats["a"], stats["b"]
    assert (a.ready, a.delayed, a.in_flight, a.dead) == (2, 1, 1, 1)
    assert (b.ready, b.delayed, b.in_flight, b.dead) == (0, 0, 0, 1)  # only dead letters


# --- the DLQ -------------------------------------------------------------------------------


def dead_letter_all(broker: Broker, me: Consumer, envs: Sequence[Envelope]) -> None:
    """Enqueue and dead-letter each envelope in turn (so "newest" is well defined)."""
    for env in envs:
        broker.enqueue([env])
        (held,) = broker.claim([env.queue], 1, consumer=me, lease=LEASE)
        broker.settle([Settlement.dead_letter(held, DeadLetterInfo(DeadLetterReason.PERMANENT))])


def test_dlq_pages_newest_first(broker: Broker, me: Consumer) -> None:
    envs = [envelope("a" if i % 2 else "b") for i in range(5)]
    dead_letter_all(broker, me, envs)
    newest_first = [env.id for env in reversed(envs)]

    pages = [broker.dlq_list(limit=2, offset=offset) for offset in (0, 2, 4, 6)]
    assert [[e.task_id for e in page] for page in pages] == [
        newest_first[0:2], newest_first[2:4], newest_first[4:], [],
    ]  # fmt: skip
    assert [e.task_id for e in broker.dlq_list("a")] == [envs[3].id, envs[1].id]
    assert [e.task_id for e in broker.dlq_list("b", limit=1, offset=1)] == [envs[2].id]
    assert (broker.dlq_count(), broker.dlq_count("a"), broker.dlq_count("b")) == (5, 2, 3)
    assert broker.dlq_count("none") == 0
    assert broker.dlq_get("no-such-entry") is None


def test_dlq_replay_oldest_first_as_fresh_first_attempts(broker: Broker, me: Consumer) -> None:
    envs = [envelope(priority=1) for _ in range(3)]
    broker.enqueue([envs[0]])
    first = claim_one(broker, me)
    broker.settle([Settlement.retry(first, envs[0].next_attempt(time.time()))])
    retried = claim_one(broker, me)
    info = DeadLetterInfo(DeadLetterReason.EXHAUSTED)
    broker.settle([Settlement.dead_letter(retried, info)])
    dead_letter_all(broker, me, envs[1:])
    assert broker.dlq_list()[-1].attempts == 2

    assert broker.dlq_replay(limit=2) == [envs[0].id, envs[1].id]
    assert [e.task_id for e in broker.dlq_list()] == [envs[2].id]

    replayed = broker.claim(["default"], 10, consumer=me, lease=LEASE)
    assert task_ids(replayed) == [envs[0].id, envs[1].id]
    assert [decode(d.payload) for d in replayed] == [e.for_replay() for e in envs[:2]]
    assert all(d.deliveries == 1 for d in replayed)


def test_an_undecodable_dead_letter_is_replayed_verbatim_with_its_priority(
    broker: Broker, me: Consumer
) -> None:
    # Regression: SQLite kept the recorded priority while Redis dropped it to band 0.
    urgent = envelope(priority=7)
    dead_letter_all(broker, me, [urgent])
    (entry,) = broker.dlq_list()
    overwrite_dead_letter_payload(broker, entry.id, b"{not an envelope")
    broker.enqueue([envelope(priority=5)])

    assert broker.dlq_replay() == [urgent.id]  # the id its DLQ record kept
    first = claim_one(broker, me)
    assert first.payload == b"{not an envelope"  # verbatim, and still ahead of priority 5
    assert broker.dlq_count() == 0


def test_dlq_replay_per_queue_and_purge_per_queue(broker: Broker, me: Consumer) -> None:
    envs = [envelope("a"), envelope("b"), envelope("a"), envelope("b")]
    dead_letter_all(broker, me, envs)

    assert broker.dlq_replay("b", limit=None) == [envs[1].id, envs[3].id]
    assert task_ids(broker.claim(["b"], 10, consumer=me, lease=LEASE)) == [
        envs[1].id, envs[3].id,
    ]  # fmt: skip
    dead_letter_all(broker, me, [envelope("b")])

    assert broker.dlq_purge("a") == 2
    assert broker.dlq_count("a") == 0 and broker.dlq_count("b") == 1
    assert broker.dlq_purge() == 1
    assert broker.dlq_count() == 0
    assert broker.dlq_replay() == []


# --- wake-ups -------------------------------------------------------------------------------


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_wake_fd_turns_readable_after_an_enqueue_elsewhere(store_url: str, broker: Broker) -> None:
    fd = broker.wake_fd(["default"])
    assert fd is not None
    broker.clear_wake()
    assert not readable(fd, 0)

    producer = open_test_stores(store_url, Settings()).broker
    try:
        producer.enqueue([envelope()])
        assert readable(fd, 5)
        broker.clear_wake()
        assert not readable(fd, 0.05)
        producer.enqueue([envelope()])
        assert readable(fd, 5)
    finally:
        producer.close()


def test_durability_warnings_is_a_list_of_text(broker: Broker) -> None:
    # The test stores keep what they acknowledge (SQLite FULL, Redis AOF always).
    assert broker.durability_warnings() == []


def test_a_later_short_claim_does_not_shorten_an_extended_lease(
    broker: Broker, other: Consumer, me: Consumer
) -> None:
    # Regression: Redis kept one lease per consumer and let the latest claim overwrite it,
    # so a long task renewed at a third of its visibility timeout was taken away (and
    # run twice) once a quick task was claimed with a shorter lease.
    broker.enqueue([envelope(), envelope()])
    [long_task] = broker.claim(["default"], 1, consumer=other, lease=SHORT_LEASE)
    broker.extend([long_task], 5.0)
    [quick] = broker.claim(["default"], 1, consumer=other, lease=SHORT_LEASE)
    broker.settle([Settlement.ack(quick)])
    time.sleep(3 * SHORT_LEASE)
    broker.recover(me)
    assert broker.claim(["default"], 1, consumer=me, lease=LEASE) == []
    stats = broker.queue_stats()
    assert [(s.ready, s.in_flight) for s in stats] == [(0, 1)]
