"""The guarded enqueue (`Broker.enqueue_guarded`) and Beat's `ScheduleStore`, once per
store: the primitives behind unique tasks and exactly-once slots."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from appliance.beat.spec import ScheduleEntry
from appliance.config import Settings
from appliance.envelope import Envelope, new_task_id
from appliance.stores import Stores
from tests.conftest import wait_until
from tests.stores import open_test_stores


@pytest.fixture
def stores(store_url: str) -> Stores:
    return open_test_stores(store_url, Settings())


def envelope() -> Envelope:
    return Envelope(id=new_task_id(), name="t.beat", enqueued_at=time.time())


def queued(stores: Stores) -> int:
    return sum(s.ready for s in stores.broker.queue_stats())


def test_a_guarded_enqueue_stores_once_and_names_the_holder(stores: Stores) -> None:
    first, second = envelope(), envelope()
    assert stores.broker.enqueue_guarded(first, "unique:x", 30) is None
    assert stores.broker.enqueue_guarded(second, "unique:x", 30) == first.id
    assert queued(stores) == 1
    assert stores.backend.get_key("unique:x") == first.id.encode()
    assert stores.backend.delete_key("unique:x", first.id)  # released by its holder
    assert stores.broker.enqueue_guarded(second, "unique:x", 30) is None
    assert queued(stores) == 2


def test_a_guard_expires_with_its_ttl(stores: Stores) -> None:
    assert stores.broker.enqueue_guarded(envelope(), "unique:brief", 0.2) is None
    assert wait_until(lambda: stores.broker.enqueue_guarded(envelope(), "unique:brief", 30)
                      is None, timeout=5)  # fmt: skip
    assert queued(stores) == 2


ENTRY = ScheduleEntry.from_options("tick", "t.beat", every=5)
SLOT = datetime(2026, 6, 1, 12, 0, 5, tzinfo=UTC)


def test_apply_reports_new_and_changed_entries_only(stores: Stores) -> None:
    schedules = stores.schedules
    assert schedules.apply([ENTRY], "code") == ["tick"]
    assert schedules.apply([ENTRY], "code") == []  # the same again: nothing changed
    faster = ScheduleEntry.from_options("tick", "t.beat", every=2)
    assert schedules.apply([faster], "code") == ["tick"]
    (stored,) = schedules.entries()
    assert stored.entry.every == 2 and stored.enabled and stored.last_slot is None


def test_the_operators_enable_flag_outlives_a_reapply(stores: Stores) -> None:
    schedules = stores.schedules
    schedules.apply([ENTRY], "code")
    applied = schedules.entries()[0].applied_at
    assert schedules.set_enabled("tick", False)
    schedules.apply([ScheduleEntry.from_options("tick", "t.beat", every=3)], "code")
    assert not schedules.get("tick").enabled  # type: ignore[union-attr]
    time.sleep(0.01)
    assert schedules.set_enabled("tick", True)
    assert schedules.get("tick").applied_at > applied  # type: ignore[union-attr]
    assert not schedules.set_enabled("nope", True)


def test_a_slot_is_dispatched_once_and_recorded(stores: Stores) -> None:
    schedules = stores.schedules
    schedules.apply([ENTRY], "code")
    one, two = envelope(), envelope()
    assert schedules.dispatch("tick", SLOT, one, drift_ms=1.5, guard_ttl=60)
    assert not schedules.dispatch("tick", SLOT, two, drift_ms=2.0, guard_ttl=60)
    assert queued(stores) == 1
    stored = schedules.get("tick")
    assert stored is not None and stored.last_slot == SLOT
    (run,) = schedules.runs("tick")
    assert (run.slot, run.task_id, run.drift_ms) == ("2026-06-01T12:00:05+00:00", one.id, 1.5)
    assert schedules.dispatch("tick", SLOT + timedelta(seconds=5), two, drift_ms=0.5,
                              guard_ttl=60)  # fmt: skip
    assert [r.task_id for r in schedules.runs("tick")] == [two.id, one.id]  # newest first


def test_a_failed_slot_is_recorded_and_moves_on(stores: Stores) -> None:
    schedules = stores.schedules
    schedules.apply([ENTRY], "code")
    schedules.record_failure("tick", SLOT, "TypeError: bad args")
    stored = schedules.get("tick")
    assert stored is not None and stored.last_slot == SLOT
    assert stored.last_error == "TypeError: bad args"
    assert schedules.runs("tick")[0].error == "TypeError: bad args"


def test_delete_removes_the_entry_and_its_runs(stores: Stores) -> None:
    schedules = stores.schedules
    schedules.apply([ENTRY], "code")
    schedules.dispatch("tick", SLOT, envelope(), drift_ms=1.0, guard_ttl=60)
    assert schedules.delete("tick")
    assert schedules.get("tick") is None and schedules.runs("tick") == []
    assert not schedules.delete("tick")
