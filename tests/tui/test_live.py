"""The actions against a live supervisor subprocess: a replayed dead letter really runs,
a revoke with terminate kills the running task, a pause reaches the worker, a warm
shutdown stops it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from appliance.app import Stem
from appliance.states import TaskState
from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import WorkerProcess, app_on
from tests.tui.conftest import drive
from tests.tui.seed import dead_letters, loaded, until
from tests.tui.test_pilot import confirm, notes, open_view, rows
from tui.app import StemTui
from tui.screens.dead_letters import DeadLettersScreen
from tui.screens.queues import QueuesScreen
from tui.screens.workers import WorkersScreen

pytestmark = pytest.mark.process


@pytest.fixture
def producer(url: str) -> Iterator[Stem]:
    app = app_on(url, ledger_app.stem)
    yield app
    app.close()


@pytest.fixture
def worker(tmp_path: Path, url: str, producer: Stem) -> Iterator[WorkerProcess]:
    producer.stores  # noqa: B018 (the worker and the app open this database)
    proc = WorkerProcess(tmp_path, url, concurrency=2)
    yield proc
    proc.stop()


def test_replay_runs_the_task_and_revoke_terminate_kills_one(
    url: str, producer: Stem, worker: WorkerProcess
) -> None:
    [dead] = dead_letters(producer, ["t.record"])
    worker.start()
    slow = producer.enqueue("t.slow", args={"seconds": 60}).id

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "3", DeadLettersScreen)
        await pilot.press("r")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: dead in worker.completions(), timeout=15)

        await open_view(app, pilot, "1", WorkersScreen)
        line = app.screen.query_one("#slot-line")
        await until(pilot, lambda: any(r[3] == "t.slow" for r in rows(app, "#slots")))
        while "t.slow" not in str(line.render()):  # highlight its slot
            await pilot.press("down")
        await pilot.press("V")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: "answered:" in notes(app), timeout=20)

    drive(url, scenario, size=(120, 30), control_timeout=10.0)
    assert wait_until(lambda: producer.task_state(dead) is TaskState.SUCCESS, timeout=10)
    assert wait_until(lambda: producer.task_state(slow) is TaskState.REVOKED, timeout=10)
    assert slow not in worker.completions()  # killed, never finished


def test_pause_reaches_the_worker_and_shutdown_stops_it(
    url: str, producer: Stem, worker: WorkerProcess
) -> None:
    producer.enqueue("t.record", countdown=600)  # keeps the queue listed
    worker.start()

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await until(
            pilot,
            lambda: (
                producer.task_state(producer.enqueue("t.record").id) is not None
                and bool(app.screen.query("#supervisors"))
            ),
            timeout=5,
        )
        await open_view(app, pilot, "2", QueuesScreen)
        await until(pilot, lambda: bool(rows(app, "#queues")))
        await pilot.press("p")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: "answered:" in notes(app), timeout=20)
        assert "default paused" in notes(app)

        def paused() -> tuple[str, ...]:
            beats = producer.backend.list_workers()
            return beats[0].paused if beats else ()

        await until(pilot, lambda: paused() == ("default",), timeout=10)

        await open_view(app, pilot, "1", WorkersScreen)
        await until(pilot, lambda: bool(rows(app, "#supervisors")))
        check = loaded(app, WorkersScreen)
        await pilot.press("S")
        await confirm(app, pilot, "y")
        await until(pilot, check)
        await until(pilot, lambda: worker.proc is not None and worker.proc.poll() is not None,
                    timeout=20)  # fmt: skip

    drive(url, scenario, size=(120, 30), control_timeout=10.0)
    assert worker.wait(timeout=5) == 0
    assert producer.broker.paused().keys() == {"default"}
