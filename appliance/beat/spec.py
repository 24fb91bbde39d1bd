"""Schedule entries: what `stem.schedule(...)` and `[[schedules]]` in `stem.toml` declare.

A `ScheduleEntry` is frozen and valid: the ways in (`ScheduleEntry.from_options` for
code, `ScheduleEntry.from_table` and `entries_from_config` for TOML) check all of it
and raise `ConfigError(source, key, reason)` whose source names the entry (and for TOML
the file and the table's position), so a bad schedule fails at `apply` or at start and
nothing is half-applied. The calendar maths lives in `appliance.beat.calendar`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from appliance.errors import ConfigError

Kind = Literal["every", "cron", "at", "solar"]
CatchUp = Literal["once", "skip"]
SolarEvent = Literal["sunrise", "sunset", "noon", "dawn", "dusk"]

KINDS: tuple[Kind, ...] = ("every", "cron", "at", "solar")
SOLAR_EVENTS: tuple[SolarEvent, ...] = ("sunrise", "sunset", "noon", "dawn", "dusk")
CATCH_UP_MODES: tuple[CatchUp, ...] = ("once", "skip")
CRON_FIELDS = "minute hour day-of-month month day-of-week"

# Upper bounds keep every slot and dispatch time inside datetime's range; nobody schedules
# an interval longer than ten years or spreads one run over more than a week.
MAX_EVERY_S = 10 * 365 * 86400
MAX_JITTER_S = 7 * 86400
_CHECK_FROM = datetime(2000, 1, 1, tzinfo=UTC)  # a fixed start keeps validation pure


@dataclass(frozen=True)
class ScheduleEntry:
    """One schedule: which task Beat enqueues, when, and with what.

    Build it with `from_options` or `from_table`, which check everything; the bare
    constructor checks nothing (it is for values already checked, e.g. `replace`).

    Exactly one of `every` (seconds, >= 1), `cron` (5 fields), `at` (an aware datetime,
    kept in UTC) or `solar` (an event of `SOLAR_EVENTS`, with `latitude` and `longitude`)
    is set. `queue` and `priority` left as None mean the task's own defaults. `origin`
    says where the entry was declared, for error messages; it takes no part in equality.
    """

    name: str
    task: str
    every: float | None = None
    cron: str | None = None
    at: datetime | None = None
    solar: SolarEvent | None = None
    latitude: float | None = None
    longitude: float | None = None
    args: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    jitter: float = 0.0
    timezone: str = "UTC"
    enabled: bool = True
    catch_up: CatchUp = "once"
    origin: str = field(default="", compare=False)

    @classmethod
    def from_options(cls, name: str, task: str, **options: Any) -> ScheduleEntry:
        """The entry `stem.schedule(name, task, **options)` declares; raises ConfigError."""
        return _build({"name": name, "task": task, **options}, f"stem.schedule({name!r})")

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str = "stem.toml") -> ScheduleEntry:
        """The entry one `[[schedules]]` table declares (`source` names the file and table)."""
        name = table.get("name")
        where = f"{source} {name!r}" if isinstance(name, str) and name else source
        return _build(table, where)

    @property
    def kind(self) -> Kind:
        """Which of every/cron/at/solar this entry is."""
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def tz(self) -> tzinfo:
        """The entry's timezone (zoneinfo caches the zone, so this is cheap)."""
        return UTC if self.timezone == "UTC" else ZoneInfo(self.timezone)

    @property
    def spec(self) -> str:
        """A one-line text for `stem schedule list`: "every 30s", "cron 0 7 * * mon-fri"."""
        suffix = "" if self.timezone == "UTC" else f" ({self.timezone})"
        if self.every is not None:
            return f"every {_num(self.every)}s"
        if self.cron is not None:
            return f"cron {self.cron}{suffix}"
        if self.at is not None:
            return f"at {self.at.isoformat()}"
        return f"solar {self.solar} {_num(self.latitude)},{_num(self.longitude)}{suffix}"

    def to_table(self) -> dict[str, Any]:
        """A `[[schedules]]`-shaped dict (JSON-ready) that `from_table` reads back equal."""
        table: dict[str, Any] = {"name": self.name, "task": self.task}
        for key in _OPTIONAL:
            value = getattr(self, key)
            if value is not None and value != _DEFAULTS.get(key):
                table[key] = value.isoformat() if isinstance(value, datetime) else value
        return table


def _num(value: float | None) -> str:
    """30.0 as "30", 1.5 as "1.5": the shortest text that reads back the same number."""
    assert value is not None
    return str(int(value)) if float(value).is_integer() else repr(value)


def entries_from_config(tables: Any, source: str) -> tuple[ScheduleEntry, ...]:
    """Every entry of a `[[schedules]]` array from `source`, all valid or a ConfigError."""
    if not isinstance(tables, list):
        raise ConfigError(source, "schedules", "must be an array of tables ([[schedules]])")
    entries = []
    for index, table in enumerate(tables, start=1):
        where = f"{source}: [[schedules]] #{index}"
        if not isinstance(table, Mapping):
            raise ConfigError(where, "schedules", "must be a table")
        entries.append(ScheduleEntry.from_table(table, where))
    return validate_entries(entries, source=source)


def validate_entries(
    entries: Iterable[ScheduleEntry], *, source: str, tasks: Collection[str] | None = None
) -> tuple[ScheduleEntry, ...]:
    """The entries as a tuple once names are unique (and, given `tasks`, every task known).

    Call it on the whole new set before applying any of it, so a bad set changes nothing.
    """
    checked = tuple(entries)
    seen: dict[str, ScheduleEntry] = {}
    for entry in checked:
        if entry.name in seen:
            places = f"{seen[entry.name].origin or '?'} and {entry.origin or '?'}"
            raise ConfigError(source, "name", f"two schedules are named {entry.name!r} ({places})")
        seen[entry.name] = entry
        if tasks is not None and entry.task not in tasks:
            raise ConfigError(
                entry.origin or source,
                "task",
                f"no task named {entry.task!r} is registered (schedule {entry.name!r})",
            )
    return checked


# --- validation -------------------------------------------------------------------------


def _build(values: Mapping[str, Any], where: str) -> ScheduleEntry:
    unknown = sorted(set(values) - _KNOWN)
    if unknown:
        raise ConfigError(where, unknown[0], f"unknown key; known: {sorted(_KNOWN)}")
    clean: dict[str, Any] = {}
    for key, check in _CHECKS.items():
        if values.get(key) is not None:
            clean[key] = _checked(check, values[key], where, key)
    for key in ("name", "task"):
        if key not in clean:
            raise ConfigError(where, key, f"every schedule needs a {key}")
    kinds = [k for k in KINDS if k in clean]
    if len(kinds) != 1:
        found = f"got {' and '.join(kinds)}" if kinds else "got none"
        raise ConfigError(where, "/".join(KINDS), f"give exactly one of them, {found}")
    _check_place(clean, where)
    if "cron" in clean:
        _check_cron(clean["cron"], clean.get("timezone", "UTC"), where)
    return ScheduleEntry(**clean, origin=where)


def _checked(check: Callable[[Any], Any], raw: Any, where: str, key: str) -> Any:
    try:
        return check(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, key, str(exc)) from None


def _check_place(clean: dict[str, Any], where: str) -> None:
    """Latitude and longitude belong to solar entries, and solar entries need both."""
    for key in ("latitude", "longitude"):
        if "solar" in clean and key not in clean:
            raise ConfigError(where, key, "a solar schedule needs latitude and longitude")
        if "solar" not in clean and key in clean:
            raise ConfigError(where, key, "only solar schedules take latitude and longitude")


def _check_cron(expr: str, zone: str, where: str) -> None:
    if len(expr.split()) != 5:
        raise ConfigError(where, "cron", f"{expr!r} needs 5 fields ({CRON_FIELDS})")
    from cronsim import CronSim, CronSimError  # on first use: see calendar._solar_on

    try:
        next(CronSim(expr, _CHECK_FROM.astimezone(ZoneInfo(zone))))
    except CronSimError as exc:
        raise ConfigError(where, "cron", f"{exc} in {expr!r} ({CRON_FIELDS})") from None
    except StopIteration:
        raise ConfigError(where, "cron", f"{expr!r} never matches a date") from None


def _text(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"must be a non-empty string, got {raw!r}")
    if raw != raw.strip() or not raw.isprintable():
        raise ValueError(f"must have no surrounding spaces or control characters: {raw!r}")
    return raw


def _number(raw: Any, low: float, high: float, what: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise TypeError(f"must be a number of {what}, got {raw!r}")
    if not math.isfinite(raw):
        raise ValueError(f"must be a finite number of {what}, got {raw!r}")
    if raw < low:
        raise ValueError(f"must be at least {_num(low)} {what}, got {raw!r}")
    if raw > high:
        raise ValueError(f"must be at most {_num(high)} {what}, got {raw!r}")
    return float(raw)


def _every(raw: Any) -> float:
    seconds = raw.total_seconds() if isinstance(raw, timedelta) else raw
    return _number(seconds, 1, MAX_EVERY_S, "seconds")


def _cron(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.isprintable():
        raise ValueError(f"must be a cron expression ({CRON_FIELDS}), got {raw!r}")
    return " ".join(raw.split())


def _at(raw: Any) -> datetime:
    if isinstance(raw, str):
        try:
            raw = datetime.fromisoformat(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an ISO 8601 date and time") from None
    if not isinstance(raw, datetime):
        raise TypeError(f"must be a datetime or an ISO 8601 string, got {raw!r}")
    if raw.utcoffset() is None:
        raise ValueError(f"{raw.isoformat()} has no timezone; add one (+00:00 or Z)")
    return raw.astimezone(UTC)


def _solar(raw: Any) -> str:
    if raw not in SOLAR_EVENTS:
        raise ValueError(f"unknown solar event {raw!r}; known: {list(SOLAR_EVENTS)}")
    return cast(str, raw)


def _timezone(raw: Any) -> str:
    name = _text(raw)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (an IANA name like Europe/Berlin)") from None
    return name


def _args(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise TypeError(f"must be a JSON object (a dict of keyword arguments), got {raw!r}")
    try:
        # A round trip through the one JSON codec: the entry keeps its own copy, and what
        # cannot be encoded fails here rather than at the first dispatch.
        return cast(dict[str, Any], orjson.loads(orjson.dumps(dict(raw))))
    except TypeError as exc:
        raise TypeError(f"must be a JSON object: {exc}") from None


def _priority(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError(f"must be an integer, got {raw!r}")
    return raw


def _flag(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise TypeError(f"must be true or false, got {raw!r}")
    return raw


def _catch_up(raw: Any) -> str:
    if raw not in CATCH_UP_MODES:
        raise ValueError(f"must be one of {list(CATCH_UP_MODES)}, got {raw!r}")
    return cast(str, raw)


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "name": _text,
    "task": _text,
    "every": _every,
    "cron": _cron,
    "at": _at,
    "solar": _solar,
    "latitude": lambda raw: _number(raw, -90, 90, "degrees"),
    "longitude": lambda raw: _number(raw, -180, 180, "degrees"),
    "args": _args,
    "queue": _text,
    "priority": _priority,
    "jitter": lambda raw: _number(raw, 0, MAX_JITTER_S, "seconds"),
    "timezone": _timezone,
    "enabled": _flag,
    "catch_up": _catch_up,
}
_KNOWN = frozenset(_CHECKS)
_OPTIONAL = tuple(k for k in _CHECKS if k not in ("name", "task"))
_DEFAULTS: dict[str, Any] = {
    "args": {},
    "jitter": 0.0,
    "timezone": "UTC",
    "enabled": True,
    "catch_up": "once",
}
