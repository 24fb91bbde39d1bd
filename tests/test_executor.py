"""Running one task in-process: every way user code can end becomes an outcome."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from appliance import Reject, Stem, TaskContext, TaskHandler, TaskOptions
from appliance.config import Settings
from appliance.context import _Detached
from appliance.envelope import Envelope
from appliance.errors import TaskError
from appliance.observe import Observer
from appliance.states import OutcomeStatus
from appliance.worker.executor import Executor
from appliance.worker.ipc import Outcome
from tests.apps import results_app
from tests.process import WorkerProcess, app_on


@pytest.fixture
def stem(sqlite_url: str) -> Stem:
    return Stem(broker=sqlite_url)


def run(stem: Stem, name: str, args: dict[str, Any] | None = None, attempt: int = 0) -> Outcome:
    envelope = Envelope(id="t1", name=name, args=args or {}, attempt=attempt)
    return Executor(uvloop.new_event_loop).run(7, stem.get_task(name), envelope, _Detached())


def test_sync_success_returns_value(stem: Stem) -> None:
    @stem.task("t.add")
    def add(ctx: TaskContext, a: int, b: int) -> int:
        return a + b

    out = run(stem, "t.add", {"a": 2, "b": 3})
    assert out.status is OutcomeStatus.SUCCESS and out.value == 5 and out.seq == 7
    assert out.finished is not None and out.started is not None
    assert out.finished >= out.started


def test_async_task_runs_on_the_child_loop(stem: Stem) -> None:
    @stem.task("t.async")
    async def later(ctx: TaskContext, x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 2

    assert run(stem, "t.async", {"x": 21}).value == 42


def test_exception_is_a_retriable_failure_with_traceback(stem: Stem) -> None:
    @stem.task("t.boom")
    def boom(ctx: TaskContext) -> None:
        raise RuntimeError("kaboom")

    out = run(stem, "t.boom")
    assert out.status is OutcomeStatus.FAILED and out.error is not None
    assert out.error.type == "RuntimeError"
    assert "kaboom" in out.error.message and "Traceback" in out.error.traceback


def test_reject_is_permanent(stem: Stem) -> None:
    @stem.task("t.reject")
    def reject(ctx: TaskContext) -> None:
        raise Reject("bad order")

    out = run(stem, "t.reject")
    assert out.status is OutcomeStatus.REJECTED
    assert out.error is not None and out.error.message == "bad order"


def test_args_that_do_not_bind_are_permanent(stem: Stem) -> None:
    @stem.task("t.sig")
    def sig(ctx: TaskContext, needed: int) -> None:
        return None

    out = run(stem, "t.sig", {"other": 1})
    assert out.status is OutcomeStatus.REJECTED
    assert out.error is not None and out.error.type == "TypeError"


def test_ctx_retry_carries_countdown(stem: Stem) -> None:
    @stem.task("t.retry")
    def again(ctx: TaskContext) -> None:
        ctx.retry(countdown=7)

    out = run(stem, "t.retry")
    assert out.status is OutcomeStatus.RETRY and out.countdown == 7


def test_unserialisable_result_is_recorded_as_failure(stem: Stem) -> None:
    @stem.task("t.result")
    def result(ctx: TaskContext) -> object:
        return object()

    out = run(stem, "t.result")
    assert out.status is OutcomeStatus.FAILED
    assert out.error is not None and "not JSON-serialisable" in out.error.message


def test_exception_that_cannot_be_printed_is_still_a_failure(stem: Stem) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    @stem.task("t.unprintable")
    def unprintable(ctx: TaskContext) -> None:
        raise Unprintable()

    out = run(stem, "t.unprintable")
    assert out.status is OutcomeStatus.FAILED
    assert out.error is not None and out.error.type == "Unprintable"
    assert "unprintable" in out.error.message


def test_sys_exit_in_a_task_is_a_failure_not_an_exit(stem: Stem) -> None:
    @stem.task("t.exit")
    def leave(ctx: TaskContext) -> None:
        raise SystemExit(3)

    error = run(stem, "t.exit").error
    assert error is not None and error.type == "SystemExit"


def test_soft_time_limit_raises_inside_sync_task(stem: Stem) -> None:
    @stem.task("t.soft", soft_time_limit=0.1, hard_time_limit=5)
    def slow(ctx: TaskContext) -> None:
        time.sleep(3)

    started = time.monotonic()
    out = run(stem, "t.soft")
    assert time.monotonic() - started < 1.5
    assert out.error is not None and out.error.type == "SoftTimeLimitExceeded"


def test_soft_time_limit_raises_inside_async_task(stem: Stem) -> None:
    @stem.task("t.asoft", soft_time_limit=0.1)
    async def slow(ctx: TaskContext) -> None:
        await asyncio.sleep(3)

    error = run(stem, "t.asoft").error
    assert error is not None and error.type == "SoftTimeLimitExceeded"


def test_class_based_handler_gets_args_dict(stem: Stem) -> None:
    class Sync(TaskHandler):
        name = "orders.sync"
        options = TaskOptions(max_retries=3)

        def __call__(self, ctx: TaskContext, args: dict[str, Any]) -> str:
            return f"{args['orderId']}@{ctx.attempt}"

    stem.register(Sync())
    assert run(stem, "orders.sync", {"orderId": "o-42"}, attempt=1).value == "o-42@1"


def test_progress_is_reported_in_outcome(stem: Stem) -> None:
    @stem.task("t.progress")
    def progress(ctx: TaskContext) -> None:
        ctx.progress(40)
        ctx.progress(90, {"step": 2})

    assert run(stem, "t.progress").progress == 90.0


def test_a_retry_countdown_that_is_not_a_number_fails_the_attempt(stem: Stem) -> None:
    # Regression: a string countdown reached the supervisor's retry decision and killed it.
    @stem.task("t.badretry")
    def bad(ctx: TaskContext) -> None:
        ctx.retry(countdown="5")  # type: ignore[arg-type]

    out = run(stem, "t.badretry")
    assert out.status is OutcomeStatus.FAILED  # not RETRY: the countdown itself was bad
    assert out.error is not None and out.error.type == "TypeError"
    assert "countdown" in out.error.message


def test_a_result_over_max_result_bytes_fails_the_attempt_and_names_size_and_limit(
    sqlite_url: str,
) -> None:
    stem = Stem(settings=Settings(broker_url=sqlite_url, max_result_bytes=1024))

    @stem.task("t.big")
    def big(ctx: TaskContext, size: int) -> str:
        return "x" * size

    out = run(stem, "t.big", {"size": 1022})  # 1024 bytes of JSON with its quotes: fits
    assert out.status is OutcomeStatus.SUCCESS and out.value == "x" * 1022
    out = run(stem, "t.big", {"size": 1023})
    assert out.status is OutcomeStatus.FAILED and out.value is None  # retried as any failure
    assert out.error is not None and out.error.type == "ResultTooLarge"
    assert "1025 bytes" in out.error.message and "1024-byte limit" in out.error.message
    assert "max_result_bytes" in out.error.message and "return a reference" in out.error.message


def test_the_default_result_limit_is_one_mebibyte(stem: Stem) -> None:
    @stem.task("t.mib")
    def mib(ctx: TaskContext, size: int) -> str:
        return "x" * size

    assert run(stem, "t.mib", {"size": 2**20 - 2}).status is OutcomeStatus.SUCCESS
    assert run(stem, "t.mib", {"size": 2**20 - 1}).status is OutcomeStatus.FAILED


@pytest.mark.parametrize("store_url", ["sqlite", "redis"], indirect=True)
def test_a_worker_retries_then_dead_letters_a_task_whose_result_is_too_large(
    tmp_path: Path, store_url: str
) -> None:
    app = app_on(store_url, results_app.stem)
    worker = WorkerProcess(
        tmp_path, store_url, app="tests.apps.results_app:stem", concurrency=1,
        env={"STEM_MAX_RESULT_BYTES": "1KiB"},
    ).start()  # fmt: skip
    try:
        small, large = app.enqueue("r.sized", {"size": 100}), app.enqueue("r.sized", {"size": 4000})
        assert small.result(timeout=20) == "x" * 100
        with pytest.raises(TaskError) as caught:
            large.result(timeout=20)
        assert caught.value.error_type == "ResultTooLarge"
        assert "4002 bytes" in str(caught.value) and "1024-byte limit" in str(caught.value)
        [dead] = Observer(app).dlq_list().entries
        assert (dead.task_id, dead.attempts, dead.error_type) == (large.id, 2, "ResultTooLarge")
    finally:
        worker.stop()
        app.close()
