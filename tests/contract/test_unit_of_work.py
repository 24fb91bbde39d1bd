"""The unit of work (`Stores.unit_of_work`), once per store: what the broker and the
backend write inside one unit commits together, or not at all.

This is the seam the supervisor's settle round stands on (a task is never acked
without its result), and chord counters, Beat slot claims and revokes will too.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from appliance.backend.protocol import TaskResult
from appliance.broker.protocol import Consumer, Delivery, Settlement
from appliance.config import Settings
from appliance.envelope import Envelope, new_task_id
from appliance.errors import BrokerError
from appliance.states import TaskState
from appliance.stores import Stores
from tests.redis_server import RedisServer
from tests.stores import open_test_stores


@pytest.fixture
def stores(store_url: str) -> Stores:
    return open_test_stores(store_url, Settings())


def leased_one(stores: Stores, me: Consumer) -> tuple[Envelope, Delivery]:
    envelope = Envelope(id=new_task_id(), name="tests.noop", enqueued_at=time.time())
    stores.broker.enqueue([envelope])
    (delivery,) = stores.broker.claim(["default"], 1, consumer=me, lease=30)
    return envelope, delivery


def finish(stores: Stores, envelope: Envelope, delivery: Delivery) -> None:
    """What the supervisor writes when a task succeeded: its result, then the ack."""
    stores.backend.store([TaskResult(envelope.id, TaskState.SUCCESS, value=42)])
    stores.broker.settle([Settlement.ack(delivery)])


def assert_untouched(stores: Stores, envelope: Envelope) -> None:
    """Neither the result nor the settlement committed: still leased, no result."""
    message = stores.broker.find_message(envelope.id)
    assert message is not None and message.state == "leased"
    assert stores.backend.get(envelope.id) is None


def test_a_unit_of_work_commits_the_result_and_the_settlement_together(stores: Stores) -> None:
    envelope, delivery = leased_one(stores, Consumer.this_process())
    with stores.unit_of_work():
        finish(stores, envelope, delivery)
    assert stores.broker.find_message(envelope.id) is None
    found = stores.backend.get(envelope.id)
    assert found is not None and found.value == 42


def test_a_unit_of_work_that_raises_commits_neither(stores: Stores) -> None:
    envelope, delivery = leased_one(stores, Consumer.this_process())
    with pytest.raises(RuntimeError), stores.unit_of_work():
        finish(stores, envelope, delivery)
        raise RuntimeError("the round failed after both writes")
    assert_untouched(stores, envelope)
    with stores.unit_of_work():  # the same writes, retried, then commit
        finish(stores, envelope, delivery)
    assert stores.broker.find_message(envelope.id) is None


def test_a_sqlite_unit_that_runs_out_of_space_commits_neither(sqlite_url: str) -> None:
    stores = open_test_stores(sqlite_url, Settings())
    envelope, delivery = leased_one(stores, Consumer.this_process())
    conn: sqlite3.Connection = stores.broker._db.conn  # type: ignore[attr-defined]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the database may not grow
    big = "x" * 200_000  # a result too large for the pages left
    with pytest.raises(BrokerError, match="no space"), stores.unit_of_work():
        stores.broker.settle([Settlement.ack(delivery)])
        stores.backend.store([TaskResult(envelope.id, TaskState.SUCCESS, value=big)])
    conn.execute(f"PRAGMA max_page_count = {pages * 1000}")
    assert_untouched(stores, envelope)


def test_a_redis_unit_whose_server_dies_before_it_is_sent_commits_neither(
    redis_server: RedisServer, redis_url: str
) -> None:
    stores = open_test_stores(redis_url, Settings())
    envelope, delivery = leased_one(stores, Consumer.this_process())
    with pytest.raises(BrokerError), stores.unit_of_work():
        finish(stores, envelope, delivery)
        redis_server.kill()  # SIGKILL: the unit never reaches the server
    redis_server.start()  # the same port and data directory (AOF on)
    assert_untouched(stores, envelope)


# -- units and threads ----------------------------------------------------------------------


def test_a_unit_belongs_to_its_thread(stores: Stores) -> None:
    """A write from another thread while a unit is open is its own: it waits for the
    unit instead of joining it, so the unit's rollback cannot take it along (the
    supervisor's metrics export reads from a thread of its own)."""
    envelope, delivery = leased_one(stores, Consumer.this_process())
    other = Envelope(id=new_task_id(), name="tests.noop", enqueued_at=time.time())
    done = threading.Event()

    def enqueue_from_another_thread() -> None:
        stores.broker.enqueue([other])
        done.set()

    with pytest.raises(RuntimeError), stores.unit_of_work():
        finish(stores, envelope, delivery)
        thread = threading.Thread(target=enqueue_from_another_thread)
        thread.start()
        # SQLite: the other thread waits for the unit's lock; Redis: it is sent at once.
        done.wait(0.3)
        raise RuntimeError("the unit fails after the other thread wrote")
    thread.join(10)
    assert done.is_set()
    assert_untouched(stores, envelope)  # the unit's own writes were undone ...
    found = stores.broker.find_message(other.id)
    assert found is not None and found.state == "ready"  # ... the other thread's were not


def test_a_redis_unit_is_invisible_to_other_threads(redis_url: str) -> None:
    stores = open_test_stores(redis_url, Settings())
    session = stores.broker.session  # type: ignore[attr-defined]
    seen: list[object] = []
    with stores.unit_of_work():
        assert session.pipe is not None
        thread = threading.Thread(target=lambda: seen.append(session.pipe))
        thread.start()
        thread.join(10)
    assert seen == [None]
