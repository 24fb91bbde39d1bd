"""One task state for every reader: `TaskHandle.state()` and `stem observe tasks show`
agree at every moment of a task's life, on every store (regression: while a retried
task ran, the handle said RETRY and the CLI said STARTED)."""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout
from pathlib import Path

import orjson
import pytest

from appliance import Stem, TaskState
from appliance.broker.protocol import Consumer, Delivery
from appliance.cli.main import main
from appliance.states import OutcomeStatus, derive_state
from appliance.worker import outcomes
from appliance.worker.ipc import ErrorFields, Outcome
from tests.conftest import wait_until
from tests.process import WorkerProcess


def cli_state(url: str, task_id: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["observe", "tasks", "show", "--id", task_id, "--json", "--broker", url])
    if code != 0:
        return "PENDING"  # "no task with that id": what the handle calls PENDING
    state: str = orjson.loads(out.getvalue())["state"]
    return state


def both(stem: Stem, task_id: str) -> tuple[str, str]:
    return str(stem.handle(task_id).state()), cli_state(stem.settings.broker_url, task_id)


@pytest.mark.parametrize(
    ("message", "result", "expected"),
    [
        (None, None, TaskState.PENDING),
        ("ready", None, TaskState.PENDING),
        ("delayed", None, TaskState.PENDING),
        ("leased", None, TaskState.STARTED),
        ("leased", TaskState.RETRY, TaskState.STARTED),  # the bug: handles said RETRY
        ("delayed", TaskState.RETRY, TaskState.RETRY),
        ("ready", TaskState.RETRY, TaskState.RETRY),  # released after its child died
        (None, TaskState.SUCCESS, TaskState.SUCCESS),
        ("leased", TaskState.SUCCESS, TaskState.SUCCESS),  # a redelivery of a finished task
        (None, TaskState.DEAD, TaskState.DEAD),
        ("ready", TaskState.DEAD, TaskState.DEAD),
        (None, TaskState.REVOKED, TaskState.REVOKED),
    ],
)
def test_the_one_rule(message: str | None, result: TaskState | None, expected: TaskState) -> None:
    assert derive_state(message, result) is expected


def settle(stem: Stem, delivery: Delivery, status: OutcomeStatus) -> None:
    """Record an attempt's end exactly as the supervisor does."""
    envelope = stem.codec.decode(delivery.payload)
    error = None if status is OutcomeStatus.SUCCESS else ErrorFields("RuntimeError", "no")
    outcome = Outcome(1, status, value="ok" if error is None else None, error=error)
    settled = outcomes.from_outcome(
        delivery, envelope, stem.get_task(envelope.name), outcome, worker="w", default_ttl=60
    )
    with stem.stores.unit_of_work():
        if settled.result is not None:
            stem.backend.store([settled.result])
        stem.broker.settle([settled.settlement])


def claim_when_due(stem: Stem, me: Consumer) -> Delivery:
    claimed: list[Delivery] = []

    def poll() -> bool:
        claimed.extend(stem.broker.claim(["default"], 1, consumer=me, lease=30))
        return bool(claimed)

    assert wait_until(poll, timeout=5)
    return claimed[0]


def test_every_step_of_a_retried_task_reads_the_same_for_handle_and_cli(stem: Stem) -> None:
    me = Consumer.this_process()
    handle = stem.enqueue("t.slow_then_ok", args={"seconds": 0})
    assert both(stem, handle.id) == ("PENDING", "PENDING")

    (first,) = stem.broker.claim(["default"], 1, consumer=me, lease=30)
    assert both(stem, handle.id) == ("STARTED", "STARTED")

    settle(stem, first, OutcomeStatus.FAILED)  # retry in 1 s (the task's backoff)
    assert both(stem, handle.id) == ("RETRY", "RETRY")

    second = claim_when_due(stem, me)
    assert both(stem, handle.id) == ("STARTED", "STARTED")

    settle(stem, second, OutcomeStatus.SUCCESS)
    assert both(stem, handle.id) == ("SUCCESS", "SUCCESS")


@pytest.mark.process
def test_handle_and_cli_agree_while_a_live_worker_retries_a_task(
    stem: Stem, tmp_path: Path, store_url: str
) -> None:
    worker = WorkerProcess(tmp_path, store_url, concurrency=1).start()
    try:
        handle = stem.enqueue("t.slow_then_ok", args={"seconds": 0.8})
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not seen or seen[-1] != "SUCCESS"):
            before, cli = both(stem, handle.id)
            after = str(handle.state())
            if before == after:  # no transition between the reads: they must agree
                assert cli == before, (before, cli, seen)
                if not seen or seen[-1] != before:
                    seen.append(before)
            time.sleep(0.02)
        assert [s for s in seen if s != "PENDING"] == ["STARTED", "RETRY", "STARTED", "SUCCESS"]
    finally:
        worker.stop()
