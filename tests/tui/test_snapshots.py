"""Snapshots of every view with seeded data and a frozen clock, at 80x24 and 160x48
(pytest-textual-snapshot; `pytest --snapshot-update` rewrites them after a deliberate
change: look at the report it writes before accepting one)."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import time_machine
from textual.pilot import Pilot
from textual.widgets import Input

from appliance.app import Stem
from appliance.backend.protocol import ErrorInfo, TaskResult
from appliance.states import DeadLetterReason, TaskState
from tests.tui.seed import dead_letters, heartbeat, loaded, publish, until
from tui.app import StemTui
from tui.confirm import ConfirmModal
from tui.screens.base import StemScreen
from tui.screens.dead_letters import DeadLetterDetail, DeadLettersScreen
from tui.screens.queues import QueuesScreen
from tui.screens.schedules import SchedulesScreen
from tui.screens.task_lookup import TaskLookupScreen
from tui.screens.workers import WorkersScreen
from tui.source import Source

NOW = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((160, 48), id="160x48")]
URL = "sqlite:///stem.db"  # relative to the test's directory: the same title every run


@pytest.fixture
def frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fixed wall clock (Textual's timers run on the monotonic one), UTC, fixed ids."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    counter = itertools.count(1)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=next(counter)))
    with time_machine.travel(NOW, tick=False):
        yield
    time.tzset()


@pytest.fixture
def seeded(frozen: None) -> Iterator[None]:
    stem = Stem(broker=URL)
    now = time.time()
    names = ["mail.send", "mail.bounce", "report.build", "thumbnail.make"] * 6
    dead_letters(stem, names, task_ids=[f"dead-{i:02d}" for i in range(len(names))])
    dead_letters(stem, ["odd.payload"], reason=DeadLetterReason.PERMANENT, task_ids=["dead-p"])
    publish(stem, heartbeat(now=now))
    publish(stem, heartbeat("edge-2", now=now, age=5.0, processed=40))
    stem.enqueue_many([("mail.send", {"n": i}) for i in range(1234)])
    stem.enqueue_many([("report.build", {})] * 7)
    stem.enqueue("report.build", queue="reports", countdown=600, task_id="report-later")
    stem.broker.pause("reports")
    error = ErrorInfo("KeyError", "'customer'", 'Traceback (most recent call last):\n  File '
                      '"app/tasks.py", line 40, in bill\nKeyError: \'customer\'')  # fmt: skip
    stem.backend.store([TaskResult(
        "task-failed", TaskState.FAILURE, name="billing.charge", queue="default", attempt=3,
        error=error, worker="edge-1", started_at=now - 65, finished_at=now - 61.5,
        progress=80.0, meta={"customer": 7},
    )])  # fmt: skip
    from appliance.beat.scheduler import Beat

    Beat(stem, stem.stores).apply([
        stem.schedule("cleanup", "files.cleanup", every=30),
        stem.schedule("report", "report.build", cron="0 7 * * mon-fri", timezone="Europe/Berlin"),
        stem.schedule("lights", "home.lights", solar="sunset", latitude=52.5, longitude=13.4,
                      enabled=False),
    ], "code")  # fmt: skip
    stem.close()
    yield


def app_for_snapshot() -> StemTui:
    source = Source(Stem(broker=URL))
    # Ten minutes of throughput as successive heartbeat snapshots would leave it.
    processed = 0
    for step in range(60):
        processed += 10 * ((step * 7) % 23)
        at = time.time() - 600 + step * 10
        source.throughput.add(at, {"edge-1": (at, processed)})
    # Refreshes come from the tests only: a frozen clock makes them identical anyway.
    return StemTui(source, refresh_s=3600)


def view(
    key: str, screen: type[StemScreen[object]], *then: str
) -> Callable[[Pilot[None]], Awaitable[None]]:
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, StemTui)
        await until(pilot, loaded(app, WorkersScreen))
        if key != "1":
            check = loaded(app, screen)
            await pilot.press(key)
            await until(pilot, check)
        for press in then:
            await pilot.press(press)
        for box in app.screen.query(Input):
            box.cursor_blink = False
        await pilot.pause(0.1)

    return run_before


@pytest.mark.parametrize("size", SIZES)
def test_workers(seeded: None, snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    assert snap_compare(app_for_snapshot(), terminal_size=size, run_before=view("1", WorkersScreen))


@pytest.mark.parametrize("size", SIZES)
def test_queues(seeded: None, snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    assert snap_compare(app_for_snapshot(), terminal_size=size, run_before=view("2", QueuesScreen))


@pytest.mark.parametrize("size", SIZES)
def test_dead_letters(
    seeded: None, snap_compare: Callable[..., bool], size: tuple[int, int]
) -> None:
    run_before = view("3", DeadLettersScreen, "down", "space", "down", "space")
    assert snap_compare(app_for_snapshot(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_dead_letter_detail(
    seeded: None, snap_compare: Callable[..., bool], size: tuple[int, int]
) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, StemTui)
        await view("3", DeadLettersScreen)(pilot)
        check = loaded(app, DeadLetterDetail)
        await pilot.press("down", "enter")
        await until(pilot, check)  # with its envelope read (the list has no meta)
        await pilot.pause(0.1)

    assert snap_compare(app_for_snapshot(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_task_lookup(
    seeded: None, snap_compare: Callable[..., bool], size: tuple[int, int]
) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, StemTui)
        await view("4", TaskLookupScreen)(pilot)
        check = loaded(app, TaskLookupScreen)
        await pilot.press(*"task-failed", "enter")
        await until(pilot, check)
        await pilot.pause(0.1)

    assert snap_compare(app_for_snapshot(), terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_schedules(seeded: None, snap_compare: Callable[..., bool], size: tuple[int, int]) -> None:
    run_before = view("5", SchedulesScreen)
    assert snap_compare(app_for_snapshot(), terminal_size=size, run_before=run_before)


def test_confirmation(seeded: None, snap_compare: Callable[..., bool]) -> None:
    async def run_before(pilot: Pilot[None]) -> None:
        await view("3", DeadLettersScreen, "space", "down", "space")(pilot)
        await pilot.press("x")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmModal))
        await pilot.pause(0.1)

    assert snap_compare(app_for_snapshot(), terminal_size=(80, 24), run_before=run_before)
