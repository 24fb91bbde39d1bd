"""Issue 22 end to end, on a real supervisor: every signal fires in the process docs say
with the payload it should carry, a raising handler breaks nothing, signals can be
disabled; JSON log lines from a real worker carry the task and worker fields; and traces
and metrics from a real producer and worker reach a real OTLP/HTTP receiver."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance import Stem, TaskError, TaskRevokedError, TimeLimitExceeded, signals
from appliance.canvas import chain
from appliance.config import Settings
from appliance.control.client import ControlClient
from appliance.envelope import new_task_id
from tests.apps import signals_app
from tests.conftest import wait_until
from tests.otlp_receiver import OtlpReceiver
from tests.process import ROOT, WorkerProcess, app_on

pytestmark = pytest.mark.process
APP = "tests.apps.signals_app:stem"


def fired(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def named(lines: list[dict[str, Any]], signal: str, **match: Any) -> list[dict[str, Any]]:
    return [
        line for line in lines
        if line["signal"] == signal and all(line.get(k) == v for k, v in match.items())
    ]  # fmt: skip


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return tmp_path / "signals.jsonl"


@pytest.fixture
def stem(store_url: str, record: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stem]:
    monkeypatch.setattr(signals_app, "RECORD", str(record))
    signals_app.connect()  # the producer's signals, recorded in this process
    app = app_on(store_url, signals_app.stem)
    try:
        yield app
    finally:
        app.close()
        signals_app.disconnect()


def test_every_signal_fires_in_its_process_with_its_payload(
    stem: Stem, store_url: str, tmp_path: Path, record: Path
) -> None:
    worker = WorkerProcess(tmp_path, store_url, app=APP, extra=["--beat", "--name", "w1"],
                           env={"STEM_TEST_SIGNALS": str(record)}).start()  # fmt: skip
    try:
        ok = stem.enqueue("s.ok", {"n": 3})
        assert ok.result(timeout=20) == 3
        with pytest.raises(TaskError):
            stem.enqueue("s.fail").result(timeout=20)
        with pytest.raises(TaskError):
            stem.enqueue("s.reject").result(timeout=20)
        with pytest.raises(TaskError, match="SoftTimeLimitExceeded"):
            stem.enqueue("s.soft").result(timeout=20)
        with pytest.raises(TimeLimitExceeded):
            stem.enqueue("s.hard").result(timeout=20)
        expired = stem.enqueue("s.ok", countdown=1.0, expires=0.5)
        with pytest.raises(TaskRevokedError):
            expired.result(timeout=20)
        answered = ControlClient(stem.stores).call("ping", worker="w1", timeout=5)
        assert [a.worker for a in answered.answers] == ["w1"]
        assert wait_until(lambda: named(fired(record), "schedule_entry_dispatched"), timeout=10)
        assert wait_until(lambda: named(fired(record), "worker_heartbeat"), timeout=10)
    finally:
        worker.stop()
    lines = fired(record)
    supervisor, producer = worker.pid, os.getpid()
    children = {line["child_pid"] for line in named(lines, "child_spawned")}
    assert len(children) >= 2  # the pool, and the child forked after the hard kill

    def where(signal: str) -> set[int]:
        return {line["pid"] for line in named(lines, signal)}

    for signal in signals.ALL:
        assert named(lines, signal.name), f"{signal.name} never fired"
        # Beat, inside the supervisor here, is a producer too: it publishes each run.
        expected = {"producer": {producer, supervisor}, "supervisor": {supervisor},
                    "beat": {supervisor}}  # fmt: skip
        pids = where(signal.name)
        if signal.process == "child":
            assert pids <= children, (signal.name, pids, children)
        else:
            assert pids == expected[signal.process], (signal.name, pids)
    # Payloads say what happened.
    (success,) = named(lines, "task_success", task_id=ok.id)
    assert (success["name"], success["result"], success["attempt"]) == ("s.ok", 3, 0)
    assert named(lines, "task_received", task_id=ok.id)[0]["worker"] == "w1"
    retry = named(lines, "task_retry", name="s.fail")
    assert retry and retry[0]["error_type"] == "ValueError" and retry[0]["countdown"] >= 0
    dead = {line["name"]: line["reason"] for line in named(lines, "task_dead_lettered")}
    assert dead["s.fail"] == "exhausted" and dead["s.reject"] == "permanent"
    assert named(lines, "task_failure", name="s.reject")[0]["permanent"] is True
    kinds = {(line["name"], line["kind"]) for line in named(lines, "task_timeout")}
    assert {("s.soft", "soft"), ("s.hard", "hard")} <= kinds
    assert named(lines, "task_revoked", task_id=expired.id)[0]["reason"] == "expired"
    hard_death = [line for line in named(lines, "child_died") if not line["expected"]]
    assert hard_death and "hard time limit" in hard_death[0]["reason"]
    assert named(lines, "control_command_completed", command="ping")[0]["ok"] is True
    assert named(lines, "schedule_entry_dispatched")[0]["entry"] == "tick"
    assert named(lines, "worker_shutdown")[0]["mode"] == "warm"
    # The raising handler was logged with its traceback; its task succeeded all the same.
    log = worker.read_log()
    assert "a handler that always raises" in log and "Traceback" in log


def test_disabled_signals_fire_nowhere(
    stem: Stem, store_url: str, tmp_path: Path, record: Path
) -> None:
    env = {"STEM_TEST_SIGNALS": str(record), "STEM_SIGNALS_DISABLED": "task_success,task_prerun"}
    worker = WorkerProcess(tmp_path, store_url, app=APP, env=env).start()
    try:
        assert stem.enqueue("s.ok", {"n": 1}).result(timeout=20) == 1
    finally:
        worker.stop()
    lines = fired(record)
    assert named(lines, "task_postrun") and named(lines, "task_received")
    assert not named(lines, "task_success") and not named(lines, "task_prerun")
    assert "a handler that always raises" not in worker.read_log()


def test_json_logs_from_a_real_worker_carry_the_task_and_worker(
    stem: Stem, store_url: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(tmp_path, store_url, app=APP, extra=["--name", "jw"],
                           env={"STEM_LOG_FORMAT": "json"}).start()  # fmt: skip
    try:
        handle = stem.enqueue("s.ok", {"n": 5}, queue="default")
        assert handle.result(timeout=20) == 5
    finally:
        worker.stop()
    lines = [orjson.loads(line) for line in worker.read_log().splitlines() if line.startswith("{")]
    assert lines, worker.read_log()
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= line.keys()
    mine = [line for line in lines if line["message"] == "working on 5"]
    assert mine and mine[0]["task_id"] == handle.id and mine[0]["task"] == "s.ok"
    assert mine[0]["attempt"] == 0 and mine[0]["queue"] == "default"
    ready = [line for line in lines if "ready" in line["message"]]
    assert ready and ready[0]["worker"] == "jw" and ready[0]["pid"] == worker.pid


# --- OpenTelemetry ------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


def test_spans_join_producer_and_worker_and_metrics_arrive(
    store_url: str, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    pytest.importorskip("opentelemetry.sdk")
    otel = {"STEM_OTLP_ENDPOINT": receiver.url, "STEM_OTLP_METRICS_INTERVAL": "1"}
    app = Stem(settings=Settings(broker_url=store_url, otlp_endpoint=receiver.url))
    app.registry.update(signals_app.stem.registry)
    worker = WorkerProcess(tmp_path, store_url, app=APP, env=otel).start()
    try:
        ok = app.enqueue("s.ok", {"n": 2})
        assert ok.result(timeout=20) == 2
        with pytest.raises(TaskError):
            app.enqueue("s.fail").result(timeout=20)
        step_ids = [new_task_id(), new_task_id()]
        steps = chain(
            app.signature("s.add", {"n": 5}, task_id=step_ids[0]),
            app.signature("s.add", {"n": 6}, task_id=step_ids[1]),
        ).enqueue()
        assert steps.result(timeout=20) == 11
        app.telemetry.flush()

        def spans() -> list[dict[str, Any]]:
            return receiver.snapshot().spans

        assert wait_until(lambda: len([s for s in spans() if s["name"] == "run s.fail"]) >= 2,
                          timeout=20)  # fmt: skip
        assert wait_until(
            lambda: any(p["name"] == "stem.task.outcomes" for p in receiver.snapshot().points),
            timeout=20,
        )
    finally:
        worker.stop()
        app.close()
    received = spans()
    (enqueue,) = [s for s in received if s["name"] == "enqueue s.ok"]
    (run,) = [s for s in received if s["name"] == "run s.ok"]
    assert run["trace_id"] == enqueue["trace_id"] and run["parent_span_id"] == enqueue["span_id"]
    assert run["resource"]["process.pid"] != enqueue["resource"]["process.pid"]
    assert run["attributes"]["stem.task.id"] == ok.id
    first, second = sorted((s for s in received if s["name"] == "run s.fail"),
                           key=lambda s: s["attributes"]["stem.attempt"])  # fmt: skip
    assert second["links"] == [(first["trace_id"], first["span_id"])]  # the retry links back
    # A chain is one trace: the next step's run is a child of the step before it, which
    # is a child of the chain's enqueue.
    (step1,) = [s for s in received if s["name"] == "run s.add" and _task_id(s) == step_ids[0]]
    (step2,) = [s for s in received if s["name"] == "run s.add" and _task_id(s) == step_ids[1]]
    (start,) = [s for s in received if s["name"] == "enqueue s.add"]
    assert step1["trace_id"] == start["trace_id"] and step1["parent_span_id"] == start["span_id"]
    assert step2["trace_id"] == step1["trace_id"] and step2["parent_span_id"] == step1["span_id"]
    points = receiver.snapshot().points
    names = {p["name"] for p in points}
    assert {"stem.queue.depth", "stem.pool.concurrency", "stem.task.duration"} <= names, names
    outcomes = {p["attributes"].get("stem.outcome") for p in points
                if p["name"] == "stem.task.outcomes"}  # fmt: skip
    assert {"success", "retry", "dead"} <= outcomes, outcomes


def _task_id(span: dict[str, Any]) -> Any:
    return span["attributes"].get("stem.task.id")


def test_a_worker_without_the_endpoint_imports_no_opentelemetry(
    store_url: str, tmp_path: Path
) -> None:
    script = (
        "import sys\n"
        "from tests.apps import signals_app\n"
        "from appliance.worker.supervisor import Supervisor\n"
        "print(any(m.startswith('opentelemetry') for m in sys.modules))\n"
    )
    made = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert made.stdout.strip() == "False", made.stderr
