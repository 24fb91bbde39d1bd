"""The calendar maths of Beat: when an entry's slots fall, and which are due now.

Pure functions of an entry and aware datetimes: no store, no clock, no I/O. Every time
returned is an aware datetime in UTC. A *slot* is one scheduled time of one entry; the
pair (entry name, slot) is what the store claims exactly once, so every function here
gives every Beat instance the same slots whatever moment it starts counting from:

- `every`: slots are the multiples of the interval since the Unix epoch
  (1970-01-01T00:00:00Z), counted in whole microseconds, so `every=30` fires at :00 and
  :30 of each minute on every host, whenever each host started.
- `cron`: the expression's matches on the entry's local wall clock (cronsim).
- `at`: the one datetime.
- `solar`: the event on each local date at the latitude and longitude (astral), cut to
  the whole second.

Jitter moves when a slot is dispatched, never which slot it is: the offset is a hash of
(entry name, slot), so every instance agrees on it too.

Cron library: cronsim, not croniter. Both parse the same syntax (names, lists, ranges,
steps), but on the two points that decide a scheduler's correctness cronsim is right:
- DST: cronsim reproduces Debian cron. croniter 7.0.0 runs a daily `30 1 * * *` twice on
  the fall-back day (at 01:30 of both offsets); cronsim runs it once.
- The day-of-month/day-of-week union: cronsim takes Vixie cron's rule (the union unless
  either field starts with `*`, so `0 0 1 * */2` means "the 1st, if an even weekday");
  croniter ORs any restricted fields unless `implement_cron_bug=True`.
cronsim is also typed (`py.typed`), has no dependencies (croniter needs python-dateutil
and separate stubs), targets zoneinfo, and is maintained for Healthchecks, whose job is
exactly this arithmetic; croniter's maintainer retired it in 2024 before Pallets-Eco
took it over.

DST, one rule (Debian cron's, which cronsim implements):
- An entry whose minute and hour fields are both fixed (neither starts with `*`, e.g.
  `30 2 * * *`, `0 7 * * mon-fri`, `0 1-3 * * *`) follows the local wall clock. A local
  time that does not exist (the spring-forward gap) runs at the first instant after the
  gap: 02:30 in Europe/Berlin on the last Sunday of March runs at 03:00 CEST, and several
  slots inside one gap become that one run. A local time that happens twice (fall-back)
  runs once, at its first occurrence (01:30 EDT, not 01:30 EST).
- An entry whose minute or hour field starts with `*` (`*/15 * * * *`, `0 * * * *`) runs
  by elapsed time: at every real instant whose local time matches, so it also runs in
  the repeated hour, and the local times inside a gap simply never happen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from itertools import islice

from appliance.beat.spec import ScheduleEntry

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# A solar event repeats with the year: no event on 367 consecutive local dates means
# none at all, so searches stop there instead of looping (polar day and night).
SOLAR_SEARCH_DAYS = 367
# The default for `plan(grace=...)`: the loop must pass at least the leader lease TTL plus
# one tick, so that slots passed during a leader handover still count as on time.
DEFAULT_GRACE = timedelta(seconds=60)


def format_slot(slot: datetime) -> str:
    """The canonical text of a slot: ISO 8601 in UTC (`stem-scheduled-for`, store keys)."""
    return slot.astimezone(UTC).isoformat()


def next_slot(entry: ScheduleEntry, after: datetime) -> datetime | None:
    """The entry's first slot strictly after `after`, or None.

    None means: a past `at`; a cron expression without a match in 50 years (cronsim's
    bound); or a solar event that does not happen on any of the next 367 local dates
    (astral finds no sunset at the poles in some years): ask again later.
    """
    return next(iter_slots(entry, after), None)


def iter_slots(entry: ScheduleEntry, after: datetime) -> Iterator[datetime]:
    """The entry's slots strictly after `after`, ascending (endless unless `at` or solar)."""
    _require_aware(after)
    after = after.astimezone(UTC)
    if entry.every is not None:
        return _every_slots(_step(entry), after)
    if entry.cron is not None:
        return _cron_slots(entry.cron, entry.tz, after)
    if entry.at is not None:
        return iter([entry.at] if entry.at > after else [])
    return _solar_slots(entry, after)


def slots_between(
    entry: ScheduleEntry, start: datetime, end: datetime, limit: int = 1000
) -> list[datetime]:
    """The slots in (start, end], ascending, at most the first `limit` of them."""
    _require_aware(end)
    found: list[datetime] = []
    for slot in iter_slots(entry, start):
        if slot > end or len(found) == limit:
            break
        found.append(slot)
    return found


def latest_slot(entry: ScheduleEntry, at_or_before: datetime, floor: datetime) -> datetime | None:
    """The entry's last slot in (floor, at_or_before], or None; cost bounded by the gap."""
    _require_aware(at_or_before)
    _require_aware(floor)
    if entry.every is not None:
        step = _step(entry)
        candidate = EPOCH + _US * (_micros(at_or_before) // step * step)
        return candidate if candidate > floor else None
    if entry.at is not None:
        return entry.at if floor < entry.at <= at_or_before else None
    if entry.solar is not None:
        return _latest_solar(entry, at_or_before, floor)
    return _latest_by_windows(entry, at_or_before, floor)


def dry_run(entry: ScheduleEntry, now: datetime, count: int) -> list[str]:
    """The next `count` slots after `now` as ISO 8601 in UTC: `stem schedule dry-run`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return [format_slot(slot) for slot in islice(iter_slots(entry, now), count)]


# --- jitter and the catch-up rule ---------------------------------------------------------


def jitter_offset(entry: ScheduleEntry, slot: datetime) -> timedelta:
    """How long after `slot` it is dispatched: 0 <= offset < jitter, the same on every host.

    A hash rather than `random`: two instances must agree on a slot's dispatch time, and a
    restarted instance must not draw a new one.
    """
    if entry.jitter == 0:
        return timedelta(0)
    key = f"{entry.name}\x00{format_slot(slot)}".encode()
    fraction = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest()) / 2**64
    return timedelta(microseconds=int(fraction * entry.jitter * 1_000_000))


def dispatch_at(entry: ScheduleEntry, slot: datetime) -> datetime:
    """When `slot` becomes due: the slot plus its jitter."""
    return slot + jitter_offset(entry, slot)


@dataclass(frozen=True)
class Plan:
    """What the Beat loop does for one entry at one moment.

    `dispatch`: slots to claim and enqueue now, ascending (each claim is exactly-once in
    the store, so offering a slot twice is harmless). `next_slot` and `next_dispatch`:
    the first slot not yet due and when it becomes due (sleep until then), or None.
    `dropped`: missed slots were left out by the catch-up rule (worth a log line).
    """

    dispatch: tuple[datetime, ...]
    next_slot: datetime | None
    next_dispatch: datetime | None
    dropped: bool = False


def plan(
    entry: ScheduleEntry,
    last: datetime | None,
    now: datetime,
    *,
    grace: timedelta = DEFAULT_GRACE,
) -> Plan:
    """The slots of `entry` due at `now`, given `last`, the last slot dispatched.

    When the entry has never run, pass the time it was applied as `last`, so a slot that
    fell while Beat was down still counts as missed; None means "no baseline": then only
    slots within `grace` of now count and nothing older is made up.

    A slot is *on time* while it is younger than `grace` (plus the entry's jitter); those
    are dispatched in slot order, each once its jittered time has come (a later slot never
    overtakes an earlier one, so `last` can simply be the newest slot dispatched). Older
    slots are *missed*: `catch_up="once"` dispatches the most recent of them, `"skip"`
    none. A disabled entry has nothing due and no next slot.
    """
    _require_aware(now)
    if not entry.enabled:
        return Plan((), None, None)
    now = now.astimezone(UTC)
    horizon = now - grace - timedelta(seconds=entry.jitter)
    lower = horizon if last is None else max(last.astimezone(UTC), horizon)
    due: list[datetime] = []
    dropped = False
    # The first slot after `last` tells cheaply whether anything was missed at all; only
    # then is the most recent missed one looked up (between ticks `last` is usually older
    # than the horizon, with nothing missed).
    first = None if last is None or last >= horizon else next_slot(entry, last)
    if last is not None and first is not None and first <= horizon:
        missed = latest_slot(entry, horizon, last)
        if entry.catch_up == "once" and missed is not None:
            due.append(missed)
        # More than one missed slot means some are dropped even under "once".
        dropped = first != missed or entry.catch_up == "skip"
    for slot in iter_slots(entry, lower):
        when = dispatch_at(entry, slot)
        if when > now:  # ends the loop: slots only grow, and `when` >= slot
            return Plan(tuple(due), slot, when, dropped)
        due.append(slot)
    return Plan(tuple(due), None, None, dropped)


# --- the four kinds -------------------------------------------------------------------


def _require_aware(moment: datetime) -> None:
    if moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no timezone; Beat works in aware datetimes")


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // _US


def _step(entry: ScheduleEntry) -> int:
    """The interval in whole microseconds: integer slot arithmetic never drifts."""
    assert entry.every is not None
    return round(entry.every * 1_000_000)


def _every_slots(step: int, after: datetime) -> Iterator[datetime]:
    index = _micros(after) // step + 1
    while True:
        yield EPOCH + _US * (index * step)
        index += 1


def _cron_slots(expr: str, zone: tzinfo, after: datetime) -> Iterator[datetime]:
    # cronsim counts fixed-time entries on the naive wall clock, so started inside a
    # repeated hour it can return that hour's first occurrence, which is before `after`:
    # those are dropped, keeping "strictly after" exact.
    from cronsim import CronSim  # here, not at the top: see _solar_on

    for found in CronSim(expr, after.astimezone(zone)):
        slot = found.astimezone(UTC)
        if slot > after:
            yield slot


def _latest_by_windows(
    entry: ScheduleEntry, at_or_before: datetime, floor: datetime
) -> datetime | None:
    """The last slot in (floor, at_or_before], looking back over doubling windows.

    Only the forward iteration defines slots (cronsim's reverse mode treats DST gaps its
    own way), and doubling keeps the work near the number of slots in the last window.
    """
    width = timedelta(minutes=1)
    while True:
        start = max(floor, at_or_before - width)
        found = None
        for slot in iter_slots(entry, start):
            if slot > at_or_before:
                break
            found = slot
        if found is not None or start == floor:
            return found
        width *= 2


def _solar_on(entry: ScheduleEntry, day: date) -> datetime | None:
    """The entry's solar event on local date `day`, or None when the sun skips it there."""
    assert entry.solar is not None and entry.latitude is not None
    assert entry.longitude is not None
    # astral and cronsim are imported by the first schedule that needs them: the Redis
    # store imports this module, and a supervisor without schedules (most) would carry
    # them for nothing (its RSS is a target; see bench/README.md).
    from astral import Observer, sun

    observer = Observer(latitude=entry.latitude, longitude=entry.longitude)
    # The events are astral's own names; dawn and dusk are civil (the sun 6 degrees down).
    event: Callable[..., datetime] = getattr(sun, entry.solar)
    try:
        moment = event(observer, day, tzinfo=entry.tz)
    except ValueError:  # astral's way of saying: polar day or night, no such event
        return None
    # Whole seconds: a slot is a store key, and sub-second noise would only make it longer.
    return moment.astimezone(UTC).replace(microsecond=0)


def _solar_slots(entry: ScheduleEntry, after: datetime) -> Iterator[datetime]:
    day = after.astimezone(entry.tz).date() - timedelta(days=1)
    misses = 0
    while misses < SOLAR_SEARCH_DAYS:
        slot = _solar_on(entry, day)
        day += timedelta(days=1)
        if slot is None:
            misses += 1
            continue
        misses = 0
        if slot > after:
            yield slot


def _latest_solar(entry: ScheduleEntry, at_or_before: datetime, floor: datetime) -> datetime | None:
    day = at_or_before.astimezone(entry.tz).date() + timedelta(days=1)
    for _ in range(SOLAR_SEARCH_DAYS):
        slot = _solar_on(entry, day)
        day -= timedelta(days=1)
        if slot is not None and slot <= floor:
            return None
        if slot is not None and slot <= at_or_before:
            return slot
    return None
