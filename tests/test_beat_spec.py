"""Schedule entries: the code and `[[schedules]]` forms, their texts, and every bad input
refused with a ConfigError that names the entry."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from appliance.beat import ScheduleEntry, entries_from_config, validate_entries
from appliance.errors import ConfigError

BERLIN_DAILY = """
[[schedules]]
name = "report"
task = "reports.build"
cron = "0 7 * * mon-fri"
timezone = "Europe/Berlin"
args = { kind = "daily" }
queue = "reports"
jitter = 5

[[schedules]]
name = "once"
task = "ops.migrate"
at = 2027-01-01T01:00:00+01:00

[[schedules]]
name = "once-text"
task = "ops.migrate"
at = "2027-01-01T00:00:00Z"
catch_up = "skip"

[[schedules]]
name = "lights"
task = "home.lights"
solar = "sunset"
latitude = 52.5
longitude = 13.4
enabled = false

[[schedules]]
name = "cleanup"
task = "files.cleanup"
every = 30
priority = 3
"""


def test_the_spec_examples_build_from_code() -> None:
    cleanup = ScheduleEntry.from_options("cleanup", "files.cleanup", every=30)
    report = ScheduleEntry.from_options(
        "report", "reports.build", cron="0 7 * * mon-fri", timezone="Europe/Berlin",
        args={"kind": "daily"}, queue="reports", jitter=5,
    )  # fmt: skip
    once = ScheduleEntry.from_options("once", "ops.migrate", at=datetime(2027, 1, 1, tzinfo=UTC))
    lights = ScheduleEntry.from_options(
        "lights", "home.lights", solar="sunset", latitude=52.5, longitude=13.4
    )
    assert [e.kind for e in (cleanup, report, once, lights)] == ["every", "cron", "at", "solar"]
    assert cleanup.spec == "every 30s"
    assert report.spec == "cron 0 7 * * mon-fri (Europe/Berlin)"
    assert once.spec == "at 2027-01-01T00:00:00+00:00"
    assert lights.spec == "solar sunset 52.5,13.4"
    assert (report.queue, report.jitter, report.args) == ("reports", 5.0, {"kind": "daily"})
    assert (cleanup.enabled, cleanup.catch_up, cleanup.timezone) == (True, "once", "UTC")
    assert (cleanup.queue, cleanup.priority) == (None, None)  # the task's own defaults
    assert cleanup.origin == "stem.schedule('cleanup')"


def test_every_takes_floats_and_timedeltas() -> None:
    assert ScheduleEntry.from_options("a", "t", every=1.5).spec == "every 1.5s"
    assert ScheduleEntry.from_options("b", "t", every=timedelta(minutes=5)).every == 300.0
    assert ScheduleEntry.from_options("c", "t", every=1).spec == "every 1s"


def test_at_is_kept_in_utc_and_a_toml_datetime_or_iso_text_both_work() -> None:
    entries = entries_from_config(tomllib.loads(BERLIN_DAILY)["schedules"], "stem.toml")
    by_name = {e.name: e for e in entries}
    assert by_name["once"].at == datetime(2027, 1, 1, tzinfo=UTC)
    assert by_name["once"].at.tzinfo is UTC
    assert by_name["once-text"].at == datetime(2027, 1, 1, tzinfo=UTC)
    assert by_name["once-text"].catch_up == "skip"
    assert by_name["lights"].enabled is False
    assert by_name["cleanup"].priority == 3
    assert by_name["report"].origin == "stem.toml: [[schedules]] #1 'report'"
    code = ScheduleEntry.from_options(
        "report", "reports.build", cron="0 7 * * mon-fri", timezone="Europe/Berlin",
        args={"kind": "daily"}, queue="reports", jitter=5,
    )  # fmt: skip
    assert by_name["report"] == code  # the two forms declare the same entry


def test_to_table_reads_back_equal() -> None:
    for entry in entries_from_config(tomllib.loads(BERLIN_DAILY)["schedules"], "stem.toml"):
        table = entry.to_table()
        assert ScheduleEntry.from_table(table) == entry
        assert "origin" not in table


def test_args_are_copied_through_json() -> None:
    args: dict[str, Any] = {"ids": (1, 2), "nested": {"a": [1]}}
    entry = ScheduleEntry.from_options("a", "t", every=5, args=args)
    args["nested"]["a"].append(2)
    assert entry.args == {"ids": [1, 2], "nested": {"a": [1]}}


def test_cron_text_is_normalised_and_names_are_accepted() -> None:
    entry = ScheduleEntry.from_options("a", "t", cron="  0   7 * JAN,jul  Mon-FRI ")
    assert entry.cron == "0 7 * JAN,jul Mon-FRI"


# One row per bad input: (options, the key the error names, a piece of its reason).
BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"every": 0}, "every", "at least 1"),
    ({"every": 0.5}, "every", "at least 1"),
    ({"every": -3}, "every", "at least 1"),
    ({"every": float("inf")}, "every", "finite"),
    ({"every": "30"}, "every", "number"),
    ({"every": True}, "every", "number"),
    ({"cron": "61 * * * *"}, "cron", "Bad minute"),
    ({"cron": "0 24 * * *"}, "cron", "Bad hour"),
    ({"cron": "0 0 32 * *"}, "cron", "Bad day-of-month"),
    ({"cron": "0 0 0 * *"}, "cron", "Bad day-of-month"),
    ({"cron": "0 0 * 13 *"}, "cron", "Bad month"),
    ({"cron": "0 0 * * 8"}, "cron", "Bad day-of-week"),
    ({"cron": "0 0 * * funday"}, "cron", "Bad day-of-week"),
    ({"cron": "0 0 30 2 *"}, "cron", "day-of-month"),  # no February has a 30th
    ({"cron": "* * * *"}, "cron", "5 fields"),
    ({"cron": ""}, "cron", "5 fields"),
    ({"cron": 5}, "cron", "cron expression"),
    ({"cron": "0 * * * * *"}, "cron", "5 fields"),  # no seconds field
    ({"cron": "*/0 * * * *"}, "cron", "Bad minute"),
    ({"every": 5, "timezone": "Mars/Olympus"}, "timezone", "unknown timezone"),
    ({"every": 5, "timezone": "../../etc/passwd"}, "timezone", "unknown timezone"),
    ({"every": 5, "cron": "* * * * *"}, "every/cron/at/solar", "got every and cron"),
    ({"cron": "* * * * *", "at": datetime(2027, 1, 1, tzinfo=UTC)}, "every/cron/at/solar", "got"),
    ({}, "every/cron/at/solar", "got none"),
    ({"every": None}, "every/cron/at/solar", "got none"),
    ({"solar": "sunset"}, "latitude", "needs latitude and longitude"),
    ({"solar": "sunset", "latitude": 52.5}, "longitude", "needs latitude and longitude"),
    ({"solar": "sunburst", "latitude": 1, "longitude": 2}, "solar", "unknown solar event"),
    ({"solar": "sunset", "latitude": 91, "longitude": 2}, "latitude", "at most 90"),
    ({"solar": "sunset", "latitude": 1, "longitude": -181}, "longitude", "at least -180"),
    ({"every": 5, "latitude": 52.5}, "latitude", "only solar"),
    ({"at": datetime(2027, 1, 1)}, "at", "no timezone"),
    ({"at": "2027-01-01T00:00:00"}, "at", "no timezone"),
    ({"at": "next tuesday"}, "at", "ISO 8601"),
    ({"at": 1798761600}, "at", "datetime"),
    ({"every": 5, "args": [1, 2]}, "args", "JSON object"),
    ({"every": 5, "args": {"when": datetime}}, "args", "JSON object"),
    ({"every": 5, "args": {1: "x"}}, "args", "JSON object"),
    ({"every": 5, "jitter": -1}, "jitter", "at least 0"),
    ({"every": 5, "jitter": 8 * 86400}, "jitter", "at most"),
    ({"every": 5, "priority": 1.5}, "priority", "integer"),
    ({"every": 5, "queue": ""}, "queue", "non-empty"),
    ({"every": 5, "enabled": "yes"}, "enabled", "true or false"),
    ({"every": 5, "catch_up": "all"}, "catch_up", "once"),
    ({"every": 5, "evry": 5}, "evry", "unknown key"),
]


@pytest.mark.parametrize(("options", "key", "reason"), BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_input_from_code_names_the_entry(
    options: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        ScheduleEntry.from_options("nightly", "ops.run", **options)
    error = caught.value
    assert error.source == "stem.schedule('nightly')"
    assert error.key == key
    assert reason in error.reason
    assert "nightly" in str(error)


@pytest.mark.parametrize(("options", "key", "reason"), BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_input_from_toml_names_the_file_table_and_entry(
    options: dict[str, Any], key: str, reason: str
) -> None:
    good = {"name": "fine", "task": "ops.run", "every": 5}
    tables = [good, {"name": "nightly", "task": "ops.run", **options}]
    with pytest.raises(ConfigError) as caught:
        entries_from_config(tables, "/etc/stem/stem.toml")
    assert caught.value.source == "/etc/stem/stem.toml: [[schedules]] #2 'nightly'"
    assert caught.value.key == key
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"task": "t", "every": 5}, "name"),
        ({"name": "x", "every": 5}, "task"),
        ({"name": "", "task": "t", "every": 5}, "name"),
        ({"name": 3, "task": "t", "every": 5}, "name"),
        ({"name": "a\nb", "task": "t", "every": 5}, "name"),
        ({"name": " x", "task": "t", "every": 5}, "name"),
    ],
)
def test_a_table_needs_a_good_name_and_task(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        entries_from_config([table], "stem.toml")
    assert caught.value.source.startswith("stem.toml: [[schedules]] #1")
    assert caught.value.key == key


def test_schedules_must_be_an_array_of_tables() -> None:
    with pytest.raises(ConfigError, match="array of tables"):
        entries_from_config({"name": "x"}, "stem.toml")
    with pytest.raises(ConfigError, match="must be a table"):
        entries_from_config(["every 5"], "stem.toml")


def test_duplicate_names_are_refused_for_the_whole_set() -> None:
    tables = [
        {"name": "a", "task": "t", "every": 5},
        {"name": "b", "task": "t", "every": 5},
        {"name": "a", "task": "t", "cron": "* * * * *"},
    ]
    with pytest.raises(ConfigError) as caught:
        entries_from_config(tables, "stem.toml")
    assert caught.value.key == "name"
    assert "'a'" in caught.value.reason
    assert "#1" in caught.value.reason and "#3" in caught.value.reason
    code = [ScheduleEntry.from_options("x", "t", every=5)] * 2
    with pytest.raises(ConfigError, match="two schedules are named 'x'"):
        validate_entries(code, source="stem.schedule()")


def test_unknown_tasks_are_refused_naming_the_entry() -> None:
    entries = entries_from_config(tomllib.loads(BERLIN_DAILY)["schedules"], "stem.toml")
    known = {"reports.build", "ops.migrate", "home.lights", "files.cleanup"}
    assert validate_entries(entries, source="stem.toml", tasks=known) == entries
    with pytest.raises(ConfigError) as caught:
        validate_entries(entries, source="stem.toml", tasks=known - {"home.lights"})
    assert caught.value.source == "stem.toml: [[schedules]] #4 'lights'"
    assert caught.value.key == "task"
    assert "home.lights" in caught.value.reason


def test_an_offset_at_keeps_its_instant() -> None:
    plus_two = timezone(timedelta(hours=2))
    entry = ScheduleEntry.from_options("a", "t", at=datetime(2027, 6, 1, 12, tzinfo=plus_two))
    assert entry.at == datetime(2027, 6, 1, 10, tzinfo=UTC)
