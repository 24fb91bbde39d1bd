"""The broker's part in task options and the canvas, once per store: unique guards with
duplicates, rate-limit booking inside the claim, follow-ups applied by the settle that
removes the message (once), chords counted once per member, task records.

Only the `Broker` protocol is used (`open_stores`), so both adapters are held to the
same semantics."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import orjson
import pytest

from appliance.broker.protocol import Broker, Consumer, DeadLetterInfo, Settlement
from appliance.config import Settings
from appliance.envelope import Envelope, decode, new_task_id
from appliance.flow import ChordCount, FollowUps
from appliance.states import DeadLetterReason
from tests.conftest import wait_until
from tests.stores import open_test_stores

LEASE = 30.0


@pytest.fixture
def broker(store_url: str) -> Iterator[Broker]:
    opened = open_test_stores(store_url, Settings()).broker
    yield opened
    opened.close()


@pytest.fixture
def me() -> Consumer:
    return Consumer.this_process()


def envelope(name: str = "tests.noop", **fields: object) -> Envelope:
    return Envelope(id=new_task_id(), name=name, enqueued_at=time.time(), **fields)  # type: ignore[arg-type]


def claim_all(broker: Broker, me: Consumer, limit: int = 100) -> list[Envelope]:
    return [decode(d.payload) for d in broker.claim(["default"], limit, consumer=me, lease=LEASE)]


def claim_deliveries(broker: Broker, me: Consumer, limit: int = 100) -> list:  # type: ignore[type-arg]
    return broker.claim(["default"], limit, consumer=me, lease=LEASE)


# --- unique guards ---------------------------------------------------------------------


def test_a_held_guard_returns_the_holder_and_counts_the_duplicate(broker: Broker) -> None:
    first, second = envelope(), envelope()
    assert broker.enqueue_guarded(first, "unique:t", 60, note_duplicate=True) is None
    assert broker.enqueue_guarded(second, "unique:t", 60, note_duplicate=True) == first.id
    assert broker.enqueue_guarded(envelope(), "unique:t", 60, note_duplicate=True) == first.id
    record = broker.task_record(first.id)
    assert record is not None and record.duplicates == 2
    assert record.last_duplicate_at is not None and record.last_duplicate_at <= time.time()
    assert broker.find_message(second.id) is None  # nothing of the duplicate was stored


def test_the_settle_that_ends_a_unique_task_releases_its_guard(
    broker: Broker, me: Consumer
) -> None:
    first = envelope(flow={"unique": ["unique:r", 60]})
    assert broker.enqueue_guarded(first, "unique:r", 60) is None
    delivery = claim_deliveries(broker, me)[0]
    broker.settle([Settlement.ack(delivery, FollowUps(first.id, release="unique:r"))])
    again = envelope()
    assert broker.enqueue_guarded(again, "unique:r", 60) is None  # the lock went with it


def test_a_release_never_frees_a_guard_another_task_holds(broker: Broker, me: Consumer) -> None:
    holder = envelope()
    assert broker.enqueue_guarded(holder, "unique:h", 60) is None
    stranger = envelope()
    broker.enqueue([stranger])
    delivery = next(d for d in claim_deliveries(broker, me) if decode(d.payload).id == stranger.id)
    broker.settle([Settlement.ack(delivery, FollowUps(stranger.id, release="unique:h"))])
    assert broker.enqueue_guarded(envelope(), "unique:h", 60) == holder.id


# --- rate limits ----------------------------------------------------------------------------


def test_limited_messages_are_booked_into_slots_and_others_still_claimed(
    broker: Broker, me: Consumer
) -> None:
    limited = [envelope(rate=["t.lim", 0.4]) for _ in range(4)]
    plain = envelope()
    broker.enqueue([*limited, plain])
    claimed = claim_all(broker, me)
    # One limited message may run now; the plain one behind them is not blocked.
    assert {e.id for e in claimed} == {limited[0].id, plain.id}
    booked = [broker.find_message(e.id) for e in limited[1:]]
    assert all(m is not None and m.state == "delayed" for m in booked)
    slots = sorted(m.not_before for m in booked if m is not None and m.not_before)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert len(slots) == 3 and all(abs(gap - 0.4) < 0.01 for gap in gaps), slots
    # Each runs in its slot, once, and its wait was not an attempt.
    started = time.time()
    seen: list[tuple[str, float, int]] = []

    def take() -> bool:
        for d in claim_deliveries(broker, me):
            seen.append((decode(d.payload).id, time.time() - started, d.deliveries))
        return len(seen) == 3

    assert wait_until(take, timeout=5, interval=0.01)
    assert [s[0] for s in seen] == [e.id for e in limited[1:]]
    assert all(count == 1 for _, _, count in seen)
    assert seen[-1][1] >= 1.1  # three slots 0.4 s apart after the first


def test_limits_are_per_key(broker: Broker, me: Consumer) -> None:
    a, b = envelope(rate=["t\x1facme", 10.0]), envelope(rate=["t\x1fglobex", 10.0])
    broker.enqueue([a, b])
    assert {e.id for e in claim_all(broker, me)} == {a.id, b.id}


def test_a_retry_of_a_limited_task_is_limited_again(broker: Broker, me: Consumer) -> None:
    first = envelope(rate=["t.retry", 30.0])
    broker.enqueue([first])
    delivery = claim_deliveries(broker, me)[0]
    broker.settle([Settlement.retry(delivery, first.next_attempt(time.time()))])
    assert claim_all(broker, me) == []  # its next slot is 30 s away
    message = broker.find_message(first.id)
    assert message is not None and message.state == "delayed"
    assert message.not_before is not None and message.not_before > time.time() + 25


# --- follow-ups -----------------------------------------------------------------------------


def test_follow_ups_are_stored_once_even_when_the_task_settles_twice(
    broker: Broker, me: Consumer
) -> None:
    task = envelope()
    broker.enqueue([task])
    delivery = claim_deliveries(broker, me)[0]
    link = envelope("tests.link", previous=41)
    follow = FollowUps(task.id, enqueue=(link,))
    broker.settle([Settlement.ack(delivery, follow)])
    broker.settle([Settlement.ack(delivery, follow)])  # the same task finishing twice
    claimed = claim_all(broker, me)
    assert [e.id for e in claimed] == [link.id]
    assert claimed[0].previous == 41


def test_a_dead_letter_carries_its_error_links(broker: Broker, me: Consumer) -> None:
    task = envelope()
    broker.enqueue([task])
    delivery = claim_deliveries(broker, me)[0]
    errback = envelope("tests.errback", previous={"task_id": task.id})
    info = DeadLetterInfo(DeadLetterReason.PERMANENT, "Reject", "no")
    broker.settle([Settlement.dead_letter(delivery, info, FollowUps(task.id, (errback,)))])
    assert broker.dlq_count() == 1
    assert [e.id for e in claim_all(broker, me)] == [errback.id]


def test_a_follow_up_of_a_unique_task_is_deduplicated(broker: Broker, me: Consumer) -> None:
    holder = envelope()
    assert broker.enqueue_guarded(holder, "unique:f", 60) is None
    task = envelope()
    broker.enqueue([task])
    tasks = {decode(d.payload).id: d for d in claim_deliveries(broker, me)}
    duplicate = envelope(flow={"unique": ["unique:f", 60]})
    broker.settle([Settlement.ack(tasks[task.id], FollowUps(task.id, (duplicate,)))])
    assert broker.find_message(duplicate.id) is None


def test_follow_ups_record_lineage(broker: Broker, me: Consumer) -> None:
    task = envelope()
    broker.enqueue([task])
    delivery = claim_deliveries(broker, me)[0]
    child = envelope("tests.child", parent_id=task.id, root_id=task.id)
    broker.settle([Settlement.ack(delivery, FollowUps(task.id, (child,)))])
    parent = broker.task_record(task.id)
    assert parent is not None and parent.children == (child.id,)
    record = broker.task_record(child.id)
    assert record is not None and (record.parent_id, record.root_id) == (task.id, task.id)


def test_enqueued_children_are_listed_in_order(broker: Broker) -> None:
    root = new_task_id()
    children = [envelope(parent_id=root, root_id=root) for _ in range(3)]
    broker.enqueue(children)
    record = broker.task_record(root)
    assert record is not None and record.children == tuple(c.id for c in children)
    assert broker.task_record(new_task_id()) is None


# --- chords -------------------------------------------------------------------------------------


def chord_of(size: int) -> tuple[str, list[Envelope], Envelope]:
    chord_id = new_task_id()
    callback = envelope("tests.callback", flow={"chord_of": {"id": chord_id, "size": size},
                                                "takes_previous": True})  # fmt: skip
    members = [
        envelope(
            flow={"chord": {"id": chord_id, "index": i, "size": size, "callback": callback.id}}
        )
        for i in range(size)
    ]
    return chord_id, members, callback


def test_the_callback_is_stored_once_when_every_member_counted(
    broker: Broker, me: Consumer
) -> None:
    chord_id, members, callback = chord_of(3)
    broker.enqueue_chord(chord_id, members, callback, 3600)
    deliveries = {decode(d.payload).id: d for d in claim_deliveries(broker, me)}
    assert set(deliveries) == {m.id for m in members}  # the callback waits

    def done(member: Envelope, value: object) -> Settlement:
        index = member.flow["chord"]["index"]  # type: ignore[index]
        follow = FollowUps(member.id, chord=ChordCount(chord_id, index, orjson.dumps(value)))
        return Settlement.ack(deliveries[member.id], follow)

    broker.settle([done(members[2], "c"), done(members[0], "a")])
    broker.settle([done(members[0], "a-again")])  # redelivered: never counts twice
    assert claim_all(broker, me) == []
    broker.settle([done(members[1], "b")])
    claimed = claim_all(broker, me)
    assert [e.id for e in claimed] == [callback.id]
    assert broker.chord_values(chord_id, 3) == ["a", "b", "c"]
    broker.settle([done(members[1], "b")])
    assert claim_all(broker, me) == []  # completing twice stores nothing more


def test_chord_values_refuse_an_incomplete_chord(broker: Broker) -> None:
    chord_id, members, callback = chord_of(2)
    broker.enqueue_chord(chord_id, members, callback, 3600)
    with pytest.raises(LookupError, match="0 of 2"):
        broker.chord_values(chord_id, 2)


def test_a_chord_records_each_members_place(broker: Broker) -> None:
    chord_id, members, callback = chord_of(2)
    broker.enqueue_chord(chord_id, members, callback, 3600)
    record = broker.task_record(members[1].id)
    assert record is not None
    assert record.canvas == {"kind": "chord", "id": chord_id, "index": 1, "size": 2}
    callback_record = broker.task_record(callback.id)
    assert callback_record is not None and callback_record.canvas is not None
    assert callback_record.canvas["kind"] == "chord callback"
