"""The Beat loop: turn each entry's due slots into tasks, exactly once, from any number of
instances on one store.

Every instance can dispatch (the store's atomic slot claim makes that safe), but only the
one holding the leader lease does, so the others do not all compute every tick: the
lease is a key in the backend (`beat:leader`), refreshed at a third of its TTL by its
holder and tried at the same pace by the others, so a leader that dies is replaced within
one lease TTL. The catch-up grace (`calendar.plan`) is longer than a lease, so slots due
during a hand-over are still on time for the new leader.

`tick(now)` is all a host needs to call: the supervisor runs it as one of its chores
(`stem worker run --beat`), `stem beat run` in a loop of its own. It returns how long
until it next has something to do, so dispatches come within milliseconds of their slot.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TypedDict

from appliance import signals
from appliance.beat.calendar import DEFAULT_GRACE, dispatch_at, format_slot, plan
from appliance.beat.spec import ScheduleEntry, validate_entries
from appliance.beat.store import StoredSchedule
from appliance.errors import ConfigError, StemError

if TYPE_CHECKING:
    from appliance.app import Stem
    from appliance.stores import Stores

log = logging.getLogger("stem.beat")

LEADER_KEY = "beat:leader"
DEFAULT_LEASE_S = 10.0
HEADER_SCHEDULE = "stem-schedule"
HEADER_SCHEDULED_FOR = "stem-scheduled-for"


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


class Beat:
    """One Beat instance on `stores`, enqueueing through `stem` (its codec and tasks)."""

    def __init__(
        self,
        stem: Stem,
        stores: Stores,
        *,
        lease: float = DEFAULT_LEASE_S,
        grace: timedelta = DEFAULT_GRACE,
        instance: str | None = None,
    ) -> None:
        if grace.total_seconds() < 2 * lease:
            raise ValueError("the catch-up grace must be at least two leader leases long")
        self.stem = stem
        self.stores = stores
        self.lease = lease
        self.grace = grace
        self.instance = instance or instance_id()
        self.leader = False
        self.dispatched = 0
        self._refresh_at = 0.0  # monotonic: when to refresh or try the lease next

    # --- entries -----------------------------------------------------------------------

    def apply(self, entries: Sequence[ScheduleEntry], origin: str) -> list[str]:
        """Check every entry (unknown tasks included, when this app knows its tasks)
        before storing any, then store them in one step: nothing is half-applied."""
        tasks = set(self.stem.registry) or None
        validate_entries(entries, source=origin, tasks=tasks)
        return self.stores.schedules.apply(entries, origin)

    # --- the loop ------------------------------------------------------------------------

    def tick(self, now: float) -> float:
        """Hold or seek the lease, dispatch what is due; seconds until the next tick."""
        if now >= self._refresh_at:
            self._lead()
            self._refresh_at = now + self.lease / 3
        wait = self._refresh_at - now
        if not self.leader:
            return wait
        try:
            entries = self.stores.schedules.entries()
        except StemError as exc:
            log.warning("cannot read the schedules (%s); trying again", exc)
            return min(wait, 1.0)
        wall = datetime.now(UTC)
        for stored in entries:
            if stored.enabled:
                wait = min(wait, self._dispatch_due(stored, wall))
        return max(0.0, wait)

    def _lead(self) -> None:
        backend = self.stores.backend
        try:
            if self.leader:
                self.leader = backend.refresh_key(LEADER_KEY, self.instance, self.lease)
                if not self.leader:
                    log.warning(
                        "beat %s lost its leader lease; another instance leads", self.instance
                    )
            else:
                self.leader = backend.put_if_absent(LEADER_KEY, self.instance, self.lease)
                if self.leader:
                    log.info("beat %s leads (lease %gs)", self.instance, self.lease)
        except StemError as exc:
            log.warning("cannot reach the store for the leader lease (%s)", exc)
            self.leader = False

    def _dispatch_due(self, stored: StoredSchedule, wall: datetime) -> float:
        """Dispatch the entry's due slots; seconds until its next one (inf: none)."""
        entry = stored.entry
        applied = datetime.fromtimestamp(stored.applied_at, UTC)
        baseline = max(stored.last_slot, applied) if stored.last_slot else applied
        due = plan(entry, baseline, wall, grace=self.grace)
        if due.dropped:
            log.info("schedule %s: slots missed while Beat was down are not made up (%s)",
                     entry.name, entry.catch_up)  # fmt: skip
        for slot in due.dispatch:
            self._dispatch_slot(entry, slot)
        if due.next_dispatch is None:
            return float("inf")
        return (due.next_dispatch - datetime.now(UTC)).total_seconds()

    def _dispatch_slot(self, entry: ScheduleEntry, slot: datetime) -> None:
        from appliance.app import EnqueueRequest

        headers = {HEADER_SCHEDULE: entry.name, HEADER_SCHEDULED_FOR: format_slot(slot)}
        if signals.schedule_entry_due.receivers:
            signals.schedule_entry_due.send(signals.ScheduleEntryDue(**_place(entry, slot)))
        try:
            envelope = self.stem.build_envelope(EnqueueRequest(
                entry.task, entry.args, headers=headers, queue=entry.queue,
                priority=entry.priority,
            ))  # fmt: skip
            envelope = self.stem.announce([envelope])[0]
        except (TypeError, ValueError) as exc:  # the task refuses these arguments
            log.error("schedule %s: slot %s not dispatched: %s", entry.name, slot, exc)
            self.stores.schedules.record_failure(entry.name, slot, f"{type(exc).__name__}: {exc}")
            _failed(entry, slot, exc)
            return
        drift_ms = (time.time() - dispatch_at(entry, slot).timestamp()) * 1000
        guard_ttl = 2 * self.grace.total_seconds() + entry.jitter + 60
        try:
            if self.stores.schedules.dispatch(
                entry.name, slot, envelope, drift_ms=drift_ms, guard_ttl=guard_ttl
            ):
                self.dispatched += 1
                log.debug("schedule %s: slot %s -> task %s (drift %.1f ms)",
                          entry.name, slot, envelope.id, drift_ms)  # fmt: skip
                self.stem.announced([envelope])
                if signals.schedule_entry_dispatched.receivers:
                    signals.schedule_entry_dispatched.send(signals.ScheduleEntryDispatched(
                        **_place(entry, slot), task_id=envelope.id, drift=drift_ms / 1000
                    ))  # fmt: skip
        except StemError as exc:  # the store failed: the slot is still due next tick
            log.warning("schedule %s: slot %s not dispatched yet: %s", entry.name, slot, exc)
            _failed(entry, slot, exc)

    def stop(self) -> None:
        """Give the lease up at once, so another instance leads without waiting it out."""
        if self.leader:
            try:
                self.stores.backend.delete_key(LEADER_KEY, self.instance)
            except StemError as exc:
                log.warning("could not release the leader lease (%s); it expires by itself", exc)
            self.leader = False


class _Place(TypedDict):
    entry: str
    task: str
    queue: str
    scheduled_for: float


def _place(entry: ScheduleEntry, slot: datetime) -> _Place:
    """The fields every schedule signal carries."""
    return {"entry": entry.name, "task": entry.task, "queue": entry.queue or "",
            "scheduled_for": slot.timestamp()}  # fmt: skip


def _failed(entry: ScheduleEntry, slot: datetime, exc: Exception) -> None:
    if signals.schedule_entry_failed.receivers:
        signals.schedule_entry_failed.send(signals.ScheduleEntryFailed(
            **_place(entry, slot), error_type=type(exc).__name__, message=str(exc)
        ))  # fmt: skip


def start_beat(stem: Stem, stores: Stores) -> Beat:
    """A Beat on `stores` with the app's schedules (`stem.schedule(...)`) and the
    config's (`[[schedules]]`) applied: every entry is checked first, so a bad one stops
    the start (`ConfigError` naming it) with nothing half-applied."""
    settings = stem.settings
    if settings.beat_grace < 2 * settings.beat_lease:
        raise ConfigError(
            settings.source, "[beat] grace",
            f"must be at least two leases long (lease {settings.beat_lease:g}s, "
            f"grace {settings.beat_grace:g}s)",
        )  # fmt: skip
    beat = Beat(stem, stores, lease=settings.beat_lease,
                grace=timedelta(seconds=settings.beat_grace))  # fmt: skip
    entries = [*stem.schedules.values(), *settings.schedules]
    validate_entries(entries, source=settings.source, tasks=set(stem.registry) or None)
    code = list(stem.schedules.values())
    if code:
        beat.stores.schedules.apply(code, "code")
    if settings.schedules:
        beat.stores.schedules.apply(list(settings.schedules), settings.source)
    return beat
