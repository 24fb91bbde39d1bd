"""The supervisor's store round against real stores: the group-commit linger never holds
back a delivery an idle child could start (counted, not timed)."""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Iterator
from typing import Any

import pytest

from appliance import Stem
from appliance.broker.protocol import Consumer, Delivery
from appliance.config import PoolSettings
from appliance.states import OutcomeStatus, TaskEvent
from appliance.stores import Stores
from appliance.worker import outcomes
from appliance.worker.ipc import Outcome
from appliance.worker.pool import Child, Dispatch, Pool
from appliance.worker.store_round import LINGER_S, POLL_S, StoreRound
from tests.redis_server import RedisServer


@pytest.fixture
def stores(stem: Stem) -> Iterator[Stores]:
    opened = stem.open_stores(busy_wait=0.25)
    yield opened
    opened.close()


def _pool_of_two() -> Pool:
    """A pool with two children as the supervisor books them (no processes: the round
    only reads what each child holds)."""
    pool = Pool(PoolSettings(concurrency=2), 0)
    pool.avg_task_s = 1e-4  # no-op tasks: deep prefetch, as in a drain
    for index in (0, 1):
        pool.children[index] = Child(pool, index, pid=0, to_fd=-1, from_fd=-1, spawned_at=0.0)
    return pool


def _done(stem: Stem, delivery: Delivery) -> outcomes.Settled:
    """The settle of a delivery whose task succeeded."""
    envelope = stem.codec.decode(delivery.payload)
    outcome = Outcome(1, OutcomeStatus.SUCCESS, started=1.0, finished=1.0, runtime=1e-4)
    task = stem.get_task(envelope.name)
    return outcomes.from_outcome(delivery, envelope, task, outcome, worker="w", default_ttl=60)


def _hold(stem: Stem, child: Child, delivery: Delivery, seq: int) -> None:
    envelope = stem.codec.decode(delivery.payload)
    task = stem.get_task(envelope.name)
    child.outstanding[seq] = Dispatch(seq, delivery, envelope, task, 1e9, 1e9)


def test_an_idle_child_gets_new_work_at_once_while_settles_are_pending(
    stem: Stem, stores: Stores
) -> None:
    pool = _pool_of_two()
    round_ = StoreRound(stores, Consumer.this_process(), [pool], claim_lease=30.0)
    stem.enqueue("t.record")
    (first,) = [d for _, d in round_.run(1.0, accepting=True)]
    round_.settle(_done(stem, first))  # it finished: its settle waits for a commit
    assert round_.pending and not pool.maybe_ready
    stem.enqueue("t.record", args={"n": 2})
    pool.maybe_ready = True  # what the wake-up does
    claimed = round_.run(1.0001, accepting=True)  # well inside the linger window
    assert [stem.codec.decode(d.payload).args for _, d in claimed] == [{"n": 2}]
    assert not round_.pending  # settled in the same unit, nothing held back


def test_settles_linger_only_while_every_child_has_work_queued(stem: Stem, stores: Stores) -> None:
    pool = _pool_of_two()
    round_ = StoreRound(stores, Consumer.this_process(), [pool], claim_lease=30.0)
    stem.enqueue_many([("t.record", {"n": i}) for i in range(5)])
    claimed = [d for _, d in round_.run(1.0, accepting=True)]
    assert len(claimed) == 5
    for seq, delivery in enumerate(claimed[:4]):
        _hold(stem, pool.children[seq % 2], delivery, seq)
    round_.settle(_done(stem, claimed[4]))
    pool.maybe_ready = True
    assert round_.run(1.0001, accepting=True) == [] and round_.pending  # both busy: linger
    pool.children[1].outstanding.popitem()  # one child is down to its running task
    round_.run(1.0002, accepting=True)
    assert not round_.pending  # committed at once


def test_settles_linger_behind_queued_work_when_the_queue_is_empty(
    stem: Stem, stores: Stores
) -> None:
    """The end of a drain: nothing left to claim, but a child still works through what
    it was prefetched; those outcomes share the commit, until the linger is over."""
    pool = _pool_of_two()
    round_ = StoreRound(stores, Consumer.this_process(), [pool], claim_lease=30.0)
    stem.enqueue_many([("t.record", {"n": i}) for i in range(3)])
    claimed = [d for _, d in round_.run(1.0, accepting=True)]
    assert len(claimed) == 3 and not pool.maybe_ready
    _hold(stem, pool.children[0], claimed[0], 0)
    _hold(stem, pool.children[0], claimed[1], 1)
    round_.settle(_done(stem, claimed[2]))
    since = round_.pending_since
    assert round_.run(since + 0.0001, accepting=True) == [] and round_.pending  # more coming
    round_.run(since + 2 * LINGER_S, accepting=True)
    assert not round_.pending  # the linger is over


def test_a_short_claim_learns_when_the_next_delayed_message_is_due_after_handing_out(
    stem: Stem, stores: Stores
) -> None:
    """The hint (the next delayed message's due time) is a store call of its own on
    Redis: it is asked after the claims were handed out (`look_ahead`), never before."""
    pool = _pool_of_two()
    round_ = StoreRound(stores, Consumer.this_process(), [pool], claim_lease=30.0)
    stem.enqueue("t.record")
    stem.enqueue("t.record", args={"n": 2}, countdown=0.5)
    claimed = round_.run(100.0, accepting=True)
    assert len(claimed) == 1 and not pool.maybe_ready
    assert pool.next_poll == 100.0 + POLL_S  # no hint yet: nothing waited for it
    round_.look_ahead(100.0)
    assert 100.0 + 0.2 < pool.next_poll <= 100.0 + 0.5  # the delayed one's due time
    round_.look_ahead(100.0)  # asked once per short claim
    assert round_._hints_due == []


def test_a_round_that_only_claims_commits_without_the_fsync(stem: Stem, stores: Stores) -> None:
    """Claims alone may be lost to a power cut (their messages run again, as after any
    crash); a round with settles in it (results, acks) is always durable."""
    kinds: list[bool] = []
    real = stores.unit_of_work

    def recording(*, durable: bool = True) -> contextlib.AbstractContextManager[None]:
        kinds.append(durable)
        return real(durable=durable)

    stores.unit_of_work = recording
    pool = _pool_of_two()
    round_ = StoreRound(stores, Consumer.this_process(), [pool], claim_lease=30.0)
    stem.enqueue("t.record")
    (first,) = [d for _, d in round_.run(1.0, accepting=True)]
    round_.settle(_done(stem, first))
    round_.run(1.0, accepting=True, final=True)
    assert kinds == [False, True]


def test_a_sqlite_unit_without_the_fsync_runs_at_normal_and_restores_full(
    sqlite_url: str,
) -> None:
    from tests.stores import open_test_stores

    stores = open_test_stores(sqlite_url)
    db = stores.broker._db  # type: ignore[attr-defined]

    def level(conn: Any) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])  # 1 NORMAL, 2 FULL

    with stores.unit_of_work(durable=False):
        assert db.write(level) == 1  # joins the unit
    with pytest.raises(ZeroDivisionError), stores.unit_of_work(durable=False):
        db.write(lambda conn: 1 // 0)
    with stores.unit_of_work():
        assert db.write(level) == 2
    stores.close()


# --- parked claims (Redis) -----------------------------------------------------------------


@pytest.fixture
def redis_round(redis_url: str) -> Iterator[tuple[Stem, StoreRound, Pool]]:
    from tests.apps import ledger_app
    from tests.process import app_on

    app = app_on(redis_url, ledger_app.stem)
    opened = app.open_stores(busy_wait=0.25)
    pool = _pool_of_two()
    round_ = StoreRound(opened, Consumer.this_process(), [pool], claim_lease=30.0)
    round_.parking = opened.broker.parking()
    assert round_.parking is not None
    round_.parking.fd(pool.settings.name)
    yield app, round_, pool
    opened.close()
    app.close()


def test_a_parked_pool_is_never_given_more_than_its_room(
    redis_round: tuple[Stem, StoreRound, Pool],
) -> None:
    stem, round_, pool = redis_round
    assert round_.parking is not None
    room = pool.free_capacity()
    stem.enqueue("t.record")
    ((_, first),) = round_.run(1.0, accepting=True)  # short: the pool parks for the rest
    _hold(stem, pool.children[0], first, 0)  # dispatched
    assert round_.parking.is_parked(pool.settings.name)
    stem.enqueue_many([("t.record", {"n": i}) for i in range(room + 5)])
    pool.maybe_ready = True  # as after a wake-up it does not cover, or the poll
    claimed = round_.run(2.0, accepting=True)  # cancels the park, then claims
    assert not round_.parking.is_parked(pool.settings.name)
    assert 1 + len(claimed) == room  # what the park got and what the claim added
    assert len({first.receipt, *(d.receipt for _, d in claimed)}) == room


def test_a_stop_gives_back_what_a_park_brought_uncounted(
    redis_round: tuple[Stem, StoreRound, Pool],
) -> None:
    stem, round_, pool = redis_round
    assert round_.parking is not None
    stem.enqueue("t.record")
    (_, first) = round_.run(1.0, accepting=True)[0]
    round_.settle(_done(stem, first))
    round_.run(1.1, accepting=True, final=True)  # settled; the pool parks
    assert round_.parking.is_parked(pool.settings.name)
    handle = stem.enqueue("t.record", args={"n": 7})  # delivered into the park
    time.sleep(0.1)
    round_.run(2.0, accepting=False, final=True)  # stopping: cancel, give back, settle
    assert not round_.parking.is_parked(pool.settings.name) and not round_.pending
    assert round_.counts[TaskEvent.RELEASED] == 1
    (again,) = round_.stores.broker.claim(["default"], 5, consumer=round_.consumer, lease=30)
    assert stem.codec.decode(again.payload).id == handle.id
    assert again.deliveries == 1  # given back unstarted: not counted against the task


def test_what_a_park_brought_is_handed_out_even_when_the_store_then_fails(
    redis_round: tuple[Stem, StoreRound, Pool], redis_server: RedisServer
) -> None:
    stem, round_, pool = redis_round
    assert round_.parking is not None
    stem.enqueue("t.record")
    ((_, first),) = round_.run(1.0, accepting=True)
    _hold(stem, pool.children[0], first, 0)
    assert round_.parking.is_parked(pool.settings.name)
    handle = stem.enqueue("t.record", args={"n": 3})  # delivered into the park
    fd = round_.parking.fd(pool.settings.name)
    assert select.select([fd], [], [], 2.0)[0]
    redis_server.kill()
    pool.maybe_ready = True  # the poll, or a wake-up the park does not cover
    claimed = round_.run(2.0, accepting=True)  # the claim fails: Redis is down
    assert [stem.codec.decode(d.payload).id for _, d in claimed] == [handle.id]
    assert round_.failures == 1
