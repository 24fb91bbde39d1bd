"""Beat's calendar maths: known cron cases (month ends, leap days, the dom/dow union, DST
both ways in two zones), cross-checks against cronsim and against the cron fields,
interval anchoring, jitter, solar times, and the catch-up rule."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from appliance.beat import (
    EPOCH,
    ScheduleEntry,
    dispatch_at,
    dry_run,
    format_slot,
    jitter_offset,
    latest_slot,
    next_slot,
    plan,
    slots_between,
)
from appliance.errors import ConfigError

BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")
S = timedelta(seconds=1)


def cron(expr: str, zone: str = "UTC", **options: Any) -> ScheduleEntry:
    return ScheduleEntry.from_options("c", "t", cron=expr, timezone=zone, **options)


def every(seconds: float, **options: Any) -> ScheduleEntry:
    return ScheduleEntry.from_options("e", "t", every=seconds, **options)


def upcoming(entry: ScheduleEntry, after: datetime, count: int) -> list[str]:
    """The next `count` slots as ISO text in the entry's own zone (readable expectations)."""
    slots = slots_between(entry, after, after + timedelta(days=366 * 30), limit=count)
    return [slot.astimezone(entry.tz).isoformat() for slot in slots]


# (expression, zone, after (local wall time in that zone), the next slots in local time)
KNOWN = [
    # month ends: the 31st only in months that have one
    ("0 0 31 * *", "UTC", "2026-01-01T00:00",
     ["2026-01-31T00:00:00+00:00", "2026-03-31T00:00:00+00:00", "2026-05-31T00:00:00+00:00",
      "2026-07-31T00:00:00+00:00", "2026-08-31T00:00:00+00:00"]),
    ("0 12 30 * *", "UTC", "2027-01-30T12:00",
     ["2027-03-30T12:00:00+00:00", "2027-04-30T12:00:00+00:00"]),
    # leap days: Feb 29 only in leap years, and 28-31 of February
    ("0 0 29 2 *", "UTC", "2026-01-01T00:00",
     ["2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"]),
    ("0 0 29 2 *", "UTC", "2024-01-01T00:00",
     ["2024-02-29T00:00:00+00:00", "2028-02-29T00:00:00+00:00"]),
    ("0 0 28-31 2 *", "UTC", "2027-02-01T00:00",
     ["2027-02-28T00:00:00+00:00", "2028-02-28T00:00:00+00:00", "2028-02-29T00:00:00+00:00",
      "2029-02-28T00:00:00+00:00"]),
    # dom/dow union: both restricted, either fires (April 2026: the 13th is a Monday)
    ("0 0 13 * fri", "UTC", "2026-04-01T00:00",
     ["2026-04-03T00:00:00+00:00", "2026-04-10T00:00:00+00:00", "2026-04-13T00:00:00+00:00",
      "2026-04-17T00:00:00+00:00", "2026-04-24T00:00:00+00:00", "2026-05-01T00:00:00+00:00"]),
    # ... a `*` day-of-week leaves the day-of-month alone
    ("0 0 13 * *", "UTC", "2026-04-01T00:00",
     ["2026-04-13T00:00:00+00:00", "2026-05-13T00:00:00+00:00"]),
    # ... and as in Vixie cron, a field starting with `*` (here `*/2`) makes it an AND:
    # the 1st, when it is a Sunday, Tuesday, Thursday or Saturday
    ("0 0 1 * */2", "UTC", "2026-01-01T00:00",
     ["2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00", "2026-08-01T00:00:00+00:00",
      "2026-09-01T00:00:00+00:00"]),
    # steps, lists, ranges, names; 7 is Sunday too
    ("*/15 * * * *", "UTC", "2026-05-05T10:07",
     ["2026-05-05T10:15:00+00:00", "2026-05-05T10:30:00+00:00", "2026-05-05T10:45:00+00:00",
      "2026-05-05T11:00:00+00:00"]),
    ("5,35 9-17/4 * * *", "UTC", "2026-05-05T09:30",
     ["2026-05-05T09:35:00+00:00", "2026-05-05T13:05:00+00:00", "2026-05-05T13:35:00+00:00",
      "2026-05-05T17:05:00+00:00", "2026-05-05T17:35:00+00:00", "2026-05-06T09:05:00+00:00"]),
    ("5/20 * * * *", "UTC", "2026-05-05T10:07",  # `N/step` runs from N to the maximum
     ["2026-05-05T10:25:00+00:00", "2026-05-05T10:45:00+00:00", "2026-05-05T11:05:00+00:00"]),
    ("0 0 1 jan,JUL *", "UTC", "2026-03-01T00:00",
     ["2026-07-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"]),
    ("0 9 * * sun", "UTC", "2026-05-05T00:00", ["2026-05-10T09:00:00+00:00"]),
    ("0 9 * * 7", "UTC", "2026-05-05T00:00", ["2026-05-10T09:00:00+00:00"]),
    ("0 7 * * mon-fri", "Europe/Berlin", "2026-01-02T08:00",
     ["2026-01-05T07:00:00+01:00", "2026-01-06T07:00:00+01:00", "2026-01-07T07:00:00+01:00"]),
    # strictly after: a slot exactly at `after` is not the next one
    ("0 0 * * *", "UTC", "2026-05-05T00:00", ["2026-05-06T00:00:00+00:00"]),
    # DST, spring forward (Berlin 2026-03-29 02:00 -> 03:00): 02:30 does not exist and
    # runs at 03:00 CEST, the first instant after the gap
    ("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00",
     ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
    # ... two slots inside one gap are one run
    ("0,30 2 * * *", "Europe/Berlin", "2026-03-28T12:00",
     ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
    # DST, fall back (Berlin 2026-10-25 03:00 -> 02:00): 02:30 happens twice, runs once
    ("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00",
     ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]),
    # New York, spring forward 2026-03-08 02:00 -> 03:00 and fall back 2026-11-01 02:00 -> 01:00
    ("30 2 * * *", "America/New_York", "2026-03-07T12:00",
     ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]),
    ("30 1 * * *", "America/New_York", "2026-10-31T12:00",
     ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]),
    ("0 7 * * mon-fri", "America/New_York", "2026-10-30T08:00",
     ["2026-11-02T07:00:00-05:00"]),
    # entries with a `*` minute or hour run by elapsed time: the repeated hour runs again,
    # the skipped hour never happens
    ("*/30 * * * *", "Europe/Berlin", "2026-10-25T01:10",
     ["2026-10-25T01:30:00+02:00", "2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00",
      "2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00", "2026-10-25T03:00:00+01:00"]),
    ("0 * * * *", "Europe/Berlin", "2026-03-29T00:30",
     ["2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"]),
    ("0 * * * *", "America/New_York", "2026-11-01T00:30",
     ["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"]),
]  # fmt: skip


@pytest.mark.parametrize(("expr", "zone", "after", "expected"), KNOWN, ids=[k[0] for k in KNOWN])
def test_known_cron_cases(expr: str, zone: str, after: str, expected: list[str]) -> None:
    entry = cron(expr, zone)
    start = datetime.fromisoformat(after).replace(tzinfo=entry.tz)
    assert upcoming(entry, start, len(expected)) == expected


def test_a_start_inside_the_repeated_hour_never_returns_its_first_occurrence() -> None:
    # 02:10 CET is the second pass through 02:xx; 02:30 CEST (the slot) was an hour ago.
    # cronsim counts this entry on the naive wall clock and would say 02:30 CEST.
    entry = cron("30 2 * * *", "Europe/Berlin")
    second_pass = datetime(2026, 10, 25, 2, 10, tzinfo=BERLIN, fold=1)
    assert next_slot(entry, second_pass) == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)


def test_slots_are_utc_and_strictly_after() -> None:
    entry = cron("0 7 * * mon-fri", "Europe/Berlin")
    after = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)  # 07:00 Berlin: exactly a slot
    slot = next_slot(entry, after)
    assert slot == datetime(2026, 1, 6, 6, 0, tzinfo=UTC)
    assert slot.tzinfo is UTC
    assert next_slot(entry, after - timedelta(microseconds=1)) == after


# --- cross-checks: against cronsim itself and against the fields, in local time --------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]  # 30 min DST
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


@dataclass(frozen=True)
class Field:
    text: str
    values: frozenset[int]
    star: bool  # starts with `*`: counts as unrestricted for the dom/dow rule


@st.composite
def cron_field(draw: Any, low: int, high: int, names: list[str] | None = None) -> Field:
    """A random field and, built alongside (not parsed), the values it stands for."""

    def atom() -> tuple[str, set[int]]:
        kind = draw(st.sampled_from(["value", "range", "range-step", "star-step"]))
        a = draw(st.integers(low, high))
        b = draw(st.integers(a, high))
        step = draw(st.integers(1, max(1, high - low)))
        spell = (lambda v: names[v - low]) if names and draw(st.booleans()) else str
        if kind in ("value", "range-step"):
            return spell(a), {a}
        if kind == "range":
            return f"{spell(a)}-{spell(b)}", set(range(a, b + 1))
        if kind == "range-step" and a < b:  # cronsim reads a degenerate `5-5/2` as `5/2`
            return f"{a}-{b}/{step}", set(range(a, b + 1, step))
        return f"*/{step}", set(range(low, high + 1, step))

    if draw(st.integers(0, 4)) == 0:
        return Field("*", frozenset(range(low, high + 1)), star=True)
    parts = [atom() for _ in range(draw(st.integers(1, 3)))]
    text = ",".join(p[0] for p in parts)
    return Field(text, frozenset().union(*(p[1] for p in parts)), star=text.startswith("*"))


@st.composite
def cron_case(draw: Any) -> tuple[str, list[Field]]:
    fields = [
        draw(cron_field(0, 59)),
        draw(cron_field(0, 23)),
        draw(cron_field(1, 31)),
        draw(cron_field(1, 12, MONTHS)),
        draw(cron_field(0, 6, DAYS)),
    ]
    return " ".join(f.text for f in fields), fields


def matches(local: datetime, fields: list[Field]) -> bool:
    minute, hour, dom, month, dow = fields
    in_dom, in_dow = local.day in dom.values, (local.isoweekday() % 7) in dow.values
    either = not dom.star and not dow.star  # Vixie cron: the union when both restricted
    day_ok = (in_dom or in_dow) if either else (in_dom and in_dow)
    return (
        local.minute in minute.values
        and local.hour in hour.values
        and (local.month in month.values and day_ok)
    )


def just_after_a_gap(slot: datetime, zone: ZoneInfo) -> bool:
    """The instant ends a spring-forward gap: the rule moved a missing local time here."""
    return slot.astimezone(zone).utcoffset() != (slot - S).astimezone(zone).utcoffset() and (
        slot.astimezone(zone).dst() != timedelta(0)
    )


@settings(max_examples=300, deadline=None)
@given(
    case=cron_case(),
    zone=st.sampled_from(ZONES),
    after=st.datetimes(datetime(2020, 1, 1), datetime(2030, 12, 31), timezones=st.just(UTC)),
)
def test_next_slot_agrees_with_cronsim_and_with_the_fields(
    case: tuple[str, list[Field]], zone: str, after: datetime
) -> None:
    expr, fields = case
    try:
        entry = cron(expr, zone)
    except ConfigError:
        # Only an impossible date may be refused: the 30th/31st when every month lacks it.
        dom, month, dow = fields[2], fields[3], fields[4]
        longest = {m: 29 if m == 2 else 30 if m in (4, 6, 9, 11) else 31 for m in month.values}
        assert dom.star or dow.star  # the days must match the day-of-month (AND) ...
        assert min(dom.values) > max(longest.values())  # ... and none ever can
        assume(False)
    tz = ZoneInfo(zone)
    slots = slots_between(entry, after, after + timedelta(days=366 * 30), limit=5)
    assume(slots)
    # 1. The wrapper is cronsim's next time, in UTC, strictly after `after`.
    theirs = next(t.astimezone(UTC) for t in CronSim(expr, after.astimezone(tz)) if t > after)
    assert slots[0] == theirs
    # 2. Strictly increasing, whole minutes, in UTC.
    assert all(a < b for a, b in pairwise([after, *slots]))
    assert all(s.tzinfo is UTC and s.second == 0 and s.microsecond == 0 for s in slots)
    # 3. Each matches the fields on the local wall clock, unless DST moved it to a gap's end.
    for slot in slots:
        assert matches(slot.astimezone(tz), fields) or just_after_a_gap(slot, tz), slot
    # 4. The same slots whatever the starting point (what exactly-once dedupes on).
    for previous, slot in pairwise(slots):
        assert next_slot(entry, slot - timedelta(microseconds=1)) == slot
        assert next_slot(entry, previous) == slot
    # 5. Looking back finds the same slots as looking forward.
    assert latest_slot(entry, slots[-1], after) == slots[-1]
    assert latest_slot(entry, slots[-1] - timedelta(microseconds=1), after) == slots[-2:][0]


# --- interval, one-off, jitter -----------------------------------------------------------


@pytest.mark.parametrize("seconds", [1, 7, 30, 1.5, 3600, 86400])
def test_interval_slots_are_anchored_to_the_epoch(seconds: float) -> None:
    entry = every(seconds)
    a = datetime(2026, 5, 5, 10, 0, 0, 123456, tzinfo=UTC)
    b = a + timedelta(seconds=1234.567)  # another instance, started later
    end = a + timedelta(days=2)
    from_a = slots_between(entry, a, end, limit=200_000)
    from_b = slots_between(entry, b, end, limit=200_000)
    assert from_a[-1] == latest_slot(entry, end, a)
    assert from_b and from_a[-len(from_b) :] == from_b
    step = timedelta(seconds=seconds)
    assert all((slot - EPOCH) % step == timedelta(0) for slot in from_a)
    assert all(later - earlier == step for earlier, later in pairwise(from_a))


def test_interval_is_strictly_after_and_ignores_the_timezone() -> None:
    entry = every(30)
    on_slot = datetime(2026, 5, 5, 10, 0, 30, tzinfo=UTC)
    assert next_slot(entry, on_slot) == on_slot + timedelta(seconds=30)
    assert next_slot(entry, on_slot - timedelta(microseconds=1)) == on_slot
    berlin = every(30, timezone="Europe/Berlin")
    assert next_slot(berlin, on_slot) == next_slot(entry, on_slot)
    assert every(30, timezone="Europe/Berlin").spec == "every 30s"


def test_a_fractional_interval_does_not_drift() -> None:
    entry = every(1.1)
    far = datetime(2030, 1, 1, tzinfo=UTC)
    slot = next_slot(entry, far)
    assert slot is not None
    assert (slot - EPOCH) // timedelta(microseconds=1) % 1_100_000 == 0


def test_at_has_one_slot() -> None:
    when = datetime(2027, 1, 1, tzinfo=UTC)
    entry = ScheduleEntry.from_options("once", "t", at=when)
    assert next_slot(entry, when - S) == when
    assert next_slot(entry, when) is None
    assert dry_run(entry, when - S, 5) == ["2027-01-01T00:00:00+00:00"]
    assert dry_run(entry, when, 5) == []


def test_jitter_is_deterministic_bounded_and_spread() -> None:
    entry = every(1, jitter=5)
    slots = slots_between(entry, EPOCH, EPOCH + timedelta(seconds=2000), limit=2000)
    offsets = [jitter_offset(entry, slot) for slot in slots]
    assert offsets == [jitter_offset(every(1, jitter=5), slot) for slot in slots]
    assert all(timedelta(0) <= o < timedelta(seconds=5) for o in offsets)
    mean = sum(o.total_seconds() for o in offsets) / len(offsets)
    assert 2.25 < mean < 2.75  # uniform on [0, 5): 2.5, with a standard error of 0.03
    assert len(set(offsets)) > 1990
    other = ScheduleEntry.from_options("other", "t", every=1, jitter=5)
    assert [jitter_offset(other, s) for s in slots] != offsets  # per entry, not per time
    assert dispatch_at(entry, slots[0]) == slots[0] + offsets[0]
    assert jitter_offset(every(1), slots[0]) == timedelta(0)
    # A slot's identity never moves: jitter changes when, not which.
    assert slots_between(entry, EPOCH, EPOCH + 10 * S) == slots_between(
        every(1), EPOCH, EPOCH + 10 * S
    )


def test_dry_run_prints_iso_8601_in_utc() -> None:
    entry = cron("0 7 * * mon-fri", "Europe/Berlin")
    now = datetime(2026, 3, 27, 12, tzinfo=UTC)  # a Friday, before the change to CEST
    assert dry_run(entry, now, 3) == [
        "2026-03-30T05:00:00+00:00",
        "2026-03-31T05:00:00+00:00",
        "2026-04-01T05:00:00+00:00",
    ]
    assert dry_run(entry, now, 0) == []
    assert dry_run(every(1.5), EPOCH, 2) == [
        "1970-01-01T00:00:01.500000+00:00",
        "1970-01-01T00:00:03+00:00",
    ]
    assert format_slot(datetime(2026, 1, 1, 1, tzinfo=BERLIN)) == "2026-01-01T00:00:00+00:00"
    with pytest.raises(ValueError, match="count"):
        dry_run(entry, now, -1)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="no timezone"):
        next_slot(every(5), datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="no timezone"):
        plan(every(5), None, datetime(2026, 1, 1))


def test_slots_between_is_bounded() -> None:
    got = slots_between(every(1), EPOCH, EPOCH + timedelta(days=365), limit=10)
    assert len(got) == 10
    assert slots_between(every(60), EPOCH, EPOCH + timedelta(seconds=59)) == []


# --- solar ----------------------------------------------------------------------------------


def solar(event: str, latitude: float, longitude: float, zone: str = "UTC") -> ScheduleEntry:
    return ScheduleEntry.from_options(
        event, "t", solar=event, latitude=latitude, longitude=longitude, timezone=zone
    )


def test_solar_events_come_in_order_on_a_normal_day() -> None:
    start = datetime(2026, 6, 1, 0, 0, tzinfo=BERLIN)
    times = {
        event: next_slot(solar(event, 52.5, 13.4, "Europe/Berlin"), start)
        for event in ("dawn", "sunrise", "noon", "sunset", "dusk")
    }
    order = [times[e] for e in ("dawn", "sunrise", "noon", "sunset", "dusk")]
    assert all(t is not None for t in order)
    assert order == sorted(order)  # type: ignore[type-var]
    assert {t.astimezone(BERLIN).date() for t in order if t} == {start.date()}
    sunrise, sunset = times["sunrise"], times["sunset"]
    assert sunrise is not None and sunset is not None
    # Berlin on June 1: sunrise about 04:50, sunset about 21:20 CEST
    assert abs(sunrise.astimezone(BERLIN) - start.replace(hour=4, minute=50)) < timedelta(
        minutes=15
    )
    assert abs(sunset.astimezone(BERLIN) - start.replace(hour=21, minute=20)) < timedelta(
        minutes=15
    )
    assert sunrise.microsecond == 0  # whole seconds: a stable store key


def test_solar_slots_are_one_a_day_and_start_independent() -> None:
    entry = solar("sunset", 52.5, 13.4)
    start = datetime(2026, 3, 20, tzinfo=UTC)
    days = slots_between(entry, start, start + timedelta(days=30))
    assert len(days) == 30
    gaps = [b - a for a, b in pairwise(days)]
    assert all(timedelta(hours=23) < g < timedelta(hours=25) for g in gaps)
    assert all(next_slot(entry, d - S) == d for d in days)
    assert latest_slot(entry, days[10] + S, start) == days[10]
    assert latest_slot(entry, days[0] - S, start) is None


def test_polar_day_and_night_skip_the_missing_days_without_hanging() -> None:
    # Longyearbyen (78.2 N): midnight sun from late April to late August.
    entry = solar("sunrise", 78.2, 15.6, "Arctic/Longyearbyen")
    began = time.monotonic()
    slot = next_slot(entry, datetime(2026, 6, 1, tzinfo=UTC))
    assert slot is not None and slot.month == 8
    # Polar night: no sunrise from early November to mid-February.
    slot = next_slot(entry, datetime(2026, 12, 1, tzinfo=UTC))
    assert slot is not None and slot.month == 2 and slot.year == 2027
    # Astral finds no sunset at the pole in 2020: the search gives up after a year.
    pole = ScheduleEntry(name="pole", task="t", solar="sunset", latitude=90.0, longitude=0.0)
    assert next_slot(pole, datetime(2020, 1, 1, tzinfo=UTC)) is None
    assert dry_run(pole, datetime(2020, 1, 1, tzinfo=UTC), 3) == []
    assert time.monotonic() - began < 5


# --- the catch-up rule ------------------------------------------------------------------------

DAY1 = datetime(2026, 5, 4, 5, 0, tzinfo=UTC)  # 07:00 CEST, a Monday


def test_a_slot_is_due_once_its_time_has_come() -> None:
    entry = every(60)
    slot = datetime(2026, 5, 5, 10, 1, tzinfo=UTC)
    before = plan(entry, slot - 60 * S, slot - 0.5 * S)
    assert before.dispatch == () and before.next_slot == slot and before.next_dispatch == slot
    on_time = plan(entry, slot - 60 * S, slot + 0.01 * S)
    assert on_time.dispatch == (slot,) and on_time.next_slot == slot + 60 * S
    assert not on_time.dropped
    assert plan(entry, slot, slot + 0.02 * S).dispatch == ()  # dispatched already


def test_catch_up_once_runs_the_most_recent_missed_slot_only() -> None:
    entry = cron("0 7 * * *", "Europe/Berlin")
    now = DAY1 + timedelta(days=2, hours=2)  # down since day 1's run, up at 09:00 on day 3
    once = plan(entry, DAY1, now)
    assert once.dispatch == (DAY1 + timedelta(days=2),)
    assert once.dropped  # day 2 was missed too
    assert once.next_slot == DAY1 + timedelta(days=3)
    skip = plan(replace(entry, catch_up="skip"), DAY1, now)
    assert skip.dispatch == () and skip.dropped
    assert skip.next_slot == DAY1 + timedelta(days=3)
    # one missed slot: made up, nothing dropped
    single = plan(entry, DAY1, DAY1 + timedelta(days=1, hours=2))
    assert single.dispatch == (DAY1 + timedelta(days=1),) and not single.dropped


def test_a_late_slot_within_grace_is_on_time_even_with_skip() -> None:
    entry = cron("0 7 * * *", "Europe/Berlin", catch_up="skip")
    late = plan(entry, DAY1, DAY1 + timedelta(days=1, seconds=50), grace=timedelta(seconds=60))
    assert late.dispatch == (DAY1 + timedelta(days=1),) and not late.dropped
    missed = plan(entry, DAY1, DAY1 + timedelta(days=1, seconds=70), grace=timedelta(seconds=60))
    assert missed.dispatch == () and missed.dropped


def test_without_a_baseline_nothing_older_than_grace_is_made_up() -> None:
    entry = cron("0 7 * * *", "Europe/Berlin")
    assert plan(entry, None, DAY1 + timedelta(hours=2)).dispatch == ()
    assert plan(entry, None, DAY1 + 30 * S).dispatch == (DAY1,)


def test_a_one_off_missed_while_down_runs_once_with_once_and_never_with_skip() -> None:
    when = datetime(2027, 1, 1, tzinfo=UTC)
    applied = when - timedelta(days=3)
    entry = ScheduleEntry.from_options("once", "t", at=when)
    later = when + timedelta(hours=5)
    assert plan(entry, applied, later).dispatch == (when,)
    assert plan(replace(entry, catch_up="skip"), applied, later).dispatch == ()
    done = plan(entry, when, later)
    assert done == plan(entry, when, later) and done.dispatch == () and done.next_slot is None


def test_a_disabled_entry_has_nothing_due() -> None:
    entry = every(1, enabled=False)
    assert plan(entry, EPOCH, EPOCH + timedelta(hours=1)).dispatch == ()


def simulate(entry: ScheduleEntry, start: datetime, ticks: list[datetime]) -> list[datetime]:
    """A Beat loop reduced to its decisions: plan at each tick, dispatch, remember the last."""
    last, dispatched = start, []
    for now in ticks:
        step = plan(entry, last, now)
        for slot in step.dispatch:
            assert dispatch_at(entry, slot) <= now
            dispatched.append(slot)
        last = max([last, *step.dispatch])
    return dispatched


def test_a_ticking_loop_dispatches_every_slot_once_in_order_even_with_jitter() -> None:
    entry = every(1, jitter=3)  # jitter above the interval: later slots must not overtake
    start = datetime(2026, 5, 5, 10, tzinfo=UTC)
    ticks = [start + timedelta(milliseconds=100 * i) for i in range(1, 1200)]
    dispatched = simulate(entry, start, ticks)
    expected = slots_between(entry, start, ticks[-1] - 3 * S)
    assert dispatched[: len(expected)] == expected
    assert len(dispatched) == len(set(dispatched)) and dispatched == sorted(dispatched)


def test_a_pause_shorter_than_grace_loses_no_slot() -> None:
    # A leader handover: nothing ticks for 20 s, then another instance goes on.
    entry = every(1, catch_up="skip")
    start = datetime(2026, 5, 5, 10, tzinfo=UTC)
    ticks = [start + timedelta(milliseconds=250 * i) for i in range(1, 41)]
    ticks += [
        ticks[-1] + timedelta(seconds=20) + timedelta(milliseconds=250 * i) for i in range(40)
    ]
    dispatched = simulate(entry, start, ticks)
    assert dispatched == slots_between(entry, start, ticks[-1])


def test_downtime_beyond_grace_makes_up_one_slot_then_runs_on_time() -> None:
    entry = every(1)
    start = datetime(2026, 5, 5, 10, tzinfo=UTC)
    now = start + timedelta(hours=1)
    step = plan(entry, start, now, grace=timedelta(seconds=10))
    missed, *on_time = step.dispatch
    assert missed == now - 10 * S  # the newest slot not younger than the grace
    assert on_time == slots_between(entry, now - 10 * S, now)
    assert step.dropped
