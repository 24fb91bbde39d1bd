"""Where Beat keeps its schedules and the runs of their slots (`ScheduleStore`), one per
store (`Stores.schedules`): the entries every instance dispatches, and the exactly-once
dispatch of a slot.

A slot (entry, scheduled time) is dispatched by one atomic step in the store: take the
slot's guard (a key that exists once), store the task's message, move the entry's last
slot and record the run, in one SQLite transaction or one Redis script. So any number of
Beat instances, racing or not, dispatch each slot once; the one that loses the guard
stores nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from appliance.beat.calendar import format_slot
from appliance.beat.spec import ScheduleEntry
from appliance.envelope import Envelope

RUNS_KEPT = 500  # runs kept per entry (older ones are trimmed as new ones come)


def guard_key(name: str, slot: datetime) -> str:
    """The key whose single existence makes a slot's dispatch happen once."""
    return f"beat:{name}:{format_slot(slot)}"


@dataclass(frozen=True, slots=True)
class StoredSchedule:
    """An entry as the store holds it: `enabled` is the operator's word (enable/disable
    outlive a re-apply), `last_slot` the newest slot dispatched."""

    entry: ScheduleEntry
    enabled: bool
    origin: str  # "code" | a config file | "cli"
    applied_at: float  # epoch seconds: the baseline of catch-up before the first run
    last_slot: datetime | None
    last_run_at: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class ScheduleRun:
    """One dispatch of one slot (or its failure)."""

    name: str
    slot: str  # ISO 8601 in UTC, as in the `stem-scheduled-for` header
    dispatched_at: float  # epoch seconds
    task_id: str | None
    drift_ms: float | None  # dispatch time minus the slot's (jittered) due time
    error: str | None = None


class ScheduleStore(Protocol):
    """Schedules and their runs, on the broker's store (see the module docstring)."""

    def apply(self, entries: Sequence[ScheduleEntry], origin: str) -> list[str]:
        """Upsert `entries` in one step (all or none); an entry new to the store takes its
        own `enabled`, one already there keeps the operator's. Returns the names of the
        entries that were new or changed."""
        ...

    def entries(self) -> list[StoredSchedule]:
        """Every stored entry, by name."""
        ...

    def get(self, name: str) -> StoredSchedule | None: ...

    def set_enabled(self, name: str, enabled: bool) -> bool:
        """Enable or disable an entry (False: no such entry). Re-enabling moves its
        catch-up baseline to now, so slots missed while it was off are not made up."""
        ...

    def delete(self, name: str) -> bool: ...

    def dispatch(
        self, name: str, slot: datetime, envelope: Envelope, *, drift_ms: float, guard_ttl: float
    ) -> bool:
        """The exactly-once step: if the slot's guard is free, take it (for `guard_ttl`
        seconds), store `envelope`, set the entry's last slot and record the run, all
        at once; else change nothing. True if this call dispatched the slot."""
        ...

    def record_failure(self, name: str, slot: datetime, error: str) -> None:
        """Record that a slot could not be dispatched (the entry's last error, a run row)
        and move the last slot past it: a slot that cannot be dispatched (arguments the
        task refuses, say) is reported once, not retried on every tick."""
        ...

    def runs(self, name: str, limit: int = 50) -> list[ScheduleRun]:
        """The entry's runs, newest first."""
        ...
