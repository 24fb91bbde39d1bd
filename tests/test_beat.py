"""Beat against real stores and processes (issue 21): each slot exactly once from any
number of instances, a leader hand-over that loses and doubles nothing, catch-up after
downtime, and bad entries refused before anything is stored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance import Stem
from appliance.beat.calendar import format_slot
from appliance.beat.scheduler import Beat
from appliance.beat.spec import ScheduleEntry
from appliance.errors import ConfigError
from tests.conftest import wait_until
from tests.process import ROOT, WorkerProcess

APP = "tests.apps.beat_app:stem"
LEASE = "2"  # seconds: a hand-over happens within this
GRACE = "4"  # seconds a slot is on time (two leases)
# Seconds before and after the leader is killed (STEM_TEST_BEAT_SECONDS=60 for the
# two-minute run of the issue; the suite's default keeps it short).
HALF = float(os.environ.get("STEM_TEST_BEAT_SECONDS", "8"))


class BeatProcess:
    """`stem beat run` as a subprocess, in its own session."""

    def __init__(self, tmp: Path, url: str, **env: str) -> None:
        self.log = tmp / f"beat-{time.monotonic_ns()}.log"
        environment = dict(os.environ, STEM_BROKER_URL=url, PYTHONPATH=str(ROOT),
                           STEM_BEAT_LEASE=LEASE, STEM_BEAT_GRACE=GRACE, **env)  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "beat", "run", "--app", APP], cwd=ROOT,
                env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def leads(self) -> bool:
        return "leads (lease" in self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def beats() -> Iterator[list[BeatProcess]]:
    started: list[BeatProcess] = []
    yield started
    for beat in started:
        beat.kill()


def slots_run(worker: WorkerProcess) -> Counter[str]:
    return Counter(parts[0].removeprefix("slot=") for parts in worker.ledger_lines_all()
                   if parts[0].startswith("slot="))  # fmt: skip


def whole_seconds(start: datetime, end: datetime) -> list[str]:
    first = start.replace(microsecond=0) + timedelta(seconds=1)
    return [
        format_slot(first + timedelta(seconds=i)) for i in range(int((end - first).total_seconds()))
    ]


@pytest.mark.process
def test_two_instances_dispatch_each_slot_once_and_hand_over_without_a_gap(
    tmp_path: Path, store_url: str, beats: list[BeatProcess]
) -> None:
    worker = WorkerProcess(tmp_path, store_url, app=APP, concurrency=2).start()
    try:
        beats += [BeatProcess(tmp_path, store_url), BeatProcess(tmp_path, store_url)]
        assert wait_until(lambda: any(b.leads() for b in beats), timeout=15)
        started = datetime.now(UTC)
        time.sleep(HALF)
        leader = next(b for b in beats if b.leads())
        leader.kill()  # SIGKILL: no lease given up, the other must wait it out
        time.sleep(HALF + 2)
        ended = datetime.now(UTC)
        other = next(b for b in beats if b is not leader)
        assert other.leads(), other.log.read_text()
        time.sleep(2)  # let the last tasks run
        done = slots_run(worker)
        window = whole_seconds(started, ended - timedelta(seconds=1))
        assert [s for s in window if done[s] != 1] == [], {s: done[s] for s in window}
        assert max(done.values()) == 1  # never twice, before or after the hand-over
    finally:
        worker.stop()


@pytest.mark.parametrize(("catch_up", "made_up"), [("once", 1), ("skip", 0)])
def test_a_restart_after_downtime_catches_up_one_missed_slot_or_none(
    store_url: str, catch_up: str, made_up: int
) -> None:
    """In-process, on a travelling clock: Beat dispatches, "stops" for ten minutes, and
    a new Beat instance (a restart: only the store remembers) plans the gap."""
    import time_machine

    stem = Stem(broker=store_url)

    @stem.task("minutely")
    def minutely(ctx: object) -> None: ...

    entry = ScheduleEntry.from_options("minutely", "minutely", every=60, catch_up=catch_up)
    start = datetime(2026, 6, 1, 12, 0, 30, tzinfo=UTC)
    with time_machine.travel(start, tick=False) as clock:
        first = Beat(stem, stem.stores, lease=2, grace=timedelta(seconds=10))
        first.apply([entry], "test")
        clock.move_to(start + timedelta(seconds=35))  # 12:01:05: the 12:01 slot is due
        first.tick(time.monotonic())
        assert first.dispatched == 1
        first.stop()
        clock.move_to(start + timedelta(minutes=10, seconds=5))  # 12:10:35: 9 slots missed
        second = Beat(stem, stem.stores, lease=2, grace=timedelta(seconds=10))
        second.tick(time.monotonic())
        assert second.dispatched == made_up
        runs = stem.stores.schedules.runs("minutely")
        expected = ["2026-06-01T12:10:00+00:00"] if made_up else []
        assert [r.slot for r in runs[:-1]] == expected  # the newest missed, or none
        clock.move_to(start + timedelta(minutes=10, seconds=35))  # 12:11:05: on time
        second.tick(time.monotonic())
        assert second.dispatched == made_up + 1
    stem.close()


def test_a_bad_entry_stops_the_start_and_nothing_is_applied(store_url: str) -> None:
    stem = Stem(broker=store_url)

    @stem.task("ok.task")
    def ok(ctx: object) -> None: ...

    good = ScheduleEntry.from_options("good", "ok.task", every=5)
    unknown = ScheduleEntry.from_options("typo", "no.such.task", every=5)
    beat = Beat(stem, stem.stores)
    with pytest.raises(ConfigError, match="typo"):
        beat.apply([good, unknown], "test")
    assert stem.stores.schedules.entries() == []  # not half-applied
    stem.close()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"cron": "61 * * * *"}, "cron"), ({"every": 0}, "every"),
        ({"every": 5, "cron": "* * * * *"}, "exactly one"),
        ({"timezone": "Mars/Olympus", "every": 5}, "timezone"),
        ({"solar": "sunset"}, "latitude"),
    ],
)  # fmt: skip
def test_bad_schedules_are_refused_with_the_entry_named(options: dict, fragment: str) -> None:  # type: ignore[type-arg]
    stem = Stem(broker="sqlite:///unused.db")
    with pytest.raises(ConfigError, match=f"stem.schedule\\('nightly'\\).*{fragment}"):
        stem.schedule("nightly", "ok.task", **options)
