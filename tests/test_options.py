"""Task options in full (issue 19): bad values refused at definition or enqueue before
anything is stored, and on real supervisors on both stores: unique tasks raced by two
producers, a rate limit shared by two supervisors, expiry, priorities, lineage shown by
`stem observe tasks show`, and `stem enqueue`'s flags."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance import Stem, TaskRevokedError, TaskState
from appliance.app import EnqueueRequest
from tests.apps import canvas_app
from tests.chaos import kill_workers
from tests.conftest import wait_until
from tests.process import ROOT, WorkerProcess, app_on

APP = "tests.apps.canvas_app:stem"
Spawn = Callable[..., WorkerProcess]


@pytest.fixture
def stem(store_url: str) -> Iterator[Stem]:
    app = app_on(store_url, canvas_app.stem)
    yield app
    app.close()


@pytest.fixture
def spawn(tmp_path: Path, store_url: str) -> Iterator[Spawn]:
    made: list[WorkerProcess] = []

    def make(concurrency: int = 4, extra: list[str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, store_url, app=APP, concurrency=concurrency, extra=extra)
        made.append(worker)
        return worker

    yield make
    kill_workers(made)


def ledger(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "ledger.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


# --- refused before anything is stored -------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"rate_limit": "ten per second"}, ValueError, "not N/s"),
        ({"rate_limit": "0/s"}, ValueError, "allows nothing"),
        ({"rate_limit": "5/fortnight"}, ValueError, "not N/s"),
        ({"rate_limit": 10}, TypeError, "must be a string"),
        ({"rate_limit_key": "tenant"}, ValueError, "needs a rate_limit"),
        ({"unique": True, "unique_for": -1}, ValueError, "negative"),
        ({"unique": True, "unique_for": 0.5}, ValueError, "at least 1 second"),
        ({"unique_for": 30}, ValueError, "needs unique=True"),
        ({"unique": True, "unique_key": 42}, TypeError, "template string or a callable"),
    ],
)
def test_bad_options_fail_at_definition(
    options: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        Stem(broker="sqlite:////nonexistent/never.db").task("t.bad", **options)


def test_bad_enqueue_options_fail_before_storing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    stem = app_on(url, canvas_app.stem)
    naive = datetime(2030, 1, 1, 12, 0)
    with pytest.raises(ValueError, match="timezone-aware"):
        stem.enqueue("c.fast", eta=naive)
    with pytest.raises(ValueError, match="in the past"):
        stem.enqueue("c.fast", expires=datetime.now(UTC) - timedelta(seconds=5))
    with pytest.raises(ValueError, match="expires=0"):
        stem.enqueue("c.fast", expires=0)
    with pytest.raises(TypeError, match="must be a signature"):
        stem.enqueue("c.fast", link={"name": "c.note"})
    with pytest.raises(TypeError, match="headers must map strings"):
        stem.enqueue("c.fast", headers={"n": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"unique_key .* does not fit"):
        Stem(broker=url).task("t.keyed", unique=True, unique_key="{missing}")(
            lambda ctx: None
        ).enqueue()
    with pytest.raises(TypeError, match="unique task"):
        import sqlite3

        stem.enqueue("c.unique", {"key": "k"}, connection=sqlite3.connect(":memory:"))
    assert stem.broker.queue_stats() == []
    stem.close()


def test_the_unique_key_ignores_headers_and_order(tmp_path: Path) -> None:
    stem = app_on(f"sqlite:///{tmp_path}/s.db", canvas_app.stem)
    first = stem.enqueue("c.unique", {"key": "k", "seconds": 0}, headers={"traceparent": "a"})
    again = stem.enqueue("c.unique", {"seconds": 0, "key": "k"}, headers={"traceparent": "b"})
    other = stem.enqueue("c.unique", {"key": "other"})
    assert first.id == again.id != other.id
    many = stem.enqueue_many([EnqueueRequest("c.unique", {"key": "k", "seconds": 0})] * 3)
    assert {h.id for h in many} == {first.id}
    detail = stem.broker.task_record(first.id)
    assert detail is not None and detail.duplicates == 4
    stem.close()


# --- on real supervisors ------------------------------------------------------------------------


@pytest.mark.process
def test_two_producers_racing_a_unique_task_get_one_run(
    stem: Stem, spawn: Spawn, store_url: str, tmp_path: Path
) -> None:
    script = (
        "import sys\n"
        "from tests.apps.canvas_app import stem\n"
        "ids = {stem.enqueue('c.unique', {'key': 'race', 'seconds': 0.5}).id "
        "for _ in range(50)}\n"
        "print(' '.join(sorted(ids)))\n"
    )
    env = {"STEM_BROKER_URL": store_url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    producers = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0].split() for p in producers]
    assert all(p.returncode == 0 for p in producers)
    ids = set(outputs[0]) | set(outputs[1])
    assert len(ids) == 1, ids  # both producers got the first task's handle, every time
    spawn().start()
    (task_id,) = ids
    assert stem.handle(task_id).result(timeout=20) == "race"
    time.sleep(0.5)
    assert [parts[0] for parts in ledger(tmp_path)].count("unique") == 1
    record = stem.broker.task_record(task_id)
    assert record is not None and record.duplicates == 99
    # The lock went with the task's end: the same call now enqueues a new task.
    assert stem.enqueue("c.unique", {"key": "race", "seconds": 0.5}).id != task_id


@pytest.mark.process
def test_a_rate_limit_is_shared_by_two_supervisors(
    stem: Stem, spawn: Spawn, tmp_path: Path
) -> None:
    limited = stem.enqueue_many([EnqueueRequest("c.limited", {"n": i}) for i in range(30)])
    first, second = spawn(concurrency=4).start(), spawn(concurrency=4).start()
    fast = stem.enqueue_many([EnqueueRequest("c.fast", {"n": i}) for i in range(200)])
    assert wait_until(lambda: all(h.state() is TaskState.SUCCESS for h in fast), timeout=30)
    fast_done = time.time()
    assert wait_until(lambda: all(h.state() is TaskState.SUCCESS for h in limited), timeout=30)
    times = sorted(float(p[4]) for p in ledger(tmp_path) if p[0] == "limited")
    assert len(times) == 30
    # GCRA books slot k no sooner than the first slot + k * 0.1 s, and no run starts before
    # its slot, so the k-th start (sorted) is at least k * 0.1 s after the first slot. The
    # first run starts after its slot by its claim-to-start delay (allowed 0.25 s). Runs
    # that are late (a loaded host) may bunch; none may be early. No limit at all would
    # start all 30 within a tenth of a second, a limit twice too lax would take 1.5 s.
    early = [k for k, start in enumerate(times) if start - times[0] < k * 0.1 - 0.25]
    assert not early, times
    assert times[-1] - times[0] <= 4.0, times  # and not throttled far below 10/s
    assert fast_done < times[-1]  # other tasks drained meanwhile: no head-of-line blocking
    pids = {p[3] for p in ledger(tmp_path) if p[0] == "limited"}
    assert len(pids) > 1  # the limited tasks ran on children of both supervisors
    assert first.proc is not None and second.proc is not None


@pytest.mark.process
def test_a_per_tenant_limit_limits_each_tenant_apart(
    stem: Stem, spawn: Spawn, tmp_path: Path
) -> None:
    handles = [
        stem.enqueue("c.per_tenant", {"n": i}, headers={"tenant": tenant})
        for i in range(5) for tenant in ("acme", "globex")
    ]  # fmt: skip
    spawn().start()
    assert wait_until(lambda: all(h.state() is TaskState.SUCCESS for h in handles), timeout=20)
    for tenant in ("acme", "globex"):
        times = sorted(float(p[4]) for p in ledger(tmp_path) if p[0] == f"tenant:{tenant}")
        assert 0.7 <= times[-1] - times[0] <= 1.3  # 5 runs at 5/s: 0.8 s from first to last


@pytest.mark.process
def test_an_expired_delivery_is_revoked_not_run(stem: Stem, spawn: Spawn, tmp_path: Path) -> None:
    handle = stem.enqueue("c.fast", {"n": 1}, countdown=1.5, expires=1.0)
    keeper = stem.enqueue("c.fast", {"n": 2}, expires=60)
    spawn().start()
    with pytest.raises(TaskRevokedError, match="expired"):
        handle.result(timeout=20)
    assert handle.state() is TaskState.REVOKED
    assert keeper.result(timeout=20) == 2
    assert [p[1] for p in ledger(tmp_path)] == [keeper.id]


@pytest.mark.process
def test_higher_priority_runs_first(stem: Stem, spawn: Spawn, tmp_path: Path) -> None:
    low = [stem.enqueue("c.fast", {"n": i}, priority=1) for i in range(5)]
    high = [stem.enqueue("c.fast", {"n": i}, priority=8) for i in range(5)]
    spawn(concurrency=1).start()
    assert wait_until(lambda: all(h.state() is TaskState.SUCCESS for h in low), timeout=20)
    order = [p[1] for p in ledger(tmp_path)]
    assert order[:5] == [h.id for h in high]


@pytest.mark.process
def test_lineage_in_observe_tasks_show(stem: Stem, spawn: Spawn, store_url: str) -> None:
    spawn().start()
    parent = stem.enqueue("c.spawn", {"n": 3})
    children = parent.result(timeout=20)
    for child in children:
        assert stem.handle(child).result(timeout=20) is not None
    shown = subprocess.run(
        [sys.executable, "-m", "appliance", "observe", "tasks", "show", "--id", parent.id,
         "--json", "--broker", store_url],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["children"] == children
    assert detail["parent_id"] is None
    child = json.loads(subprocess.run(
        [sys.executable, "-m", "appliance", "observe", "tasks", "show", "--id", children[0],
         "--json", "--broker", store_url],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    ).stdout)  # fmt: skip
    assert (child["parent_id"], child["root_id"]) == (parent.id, parent.id)
    text = subprocess.run(
        [sys.executable, "-m", "appliance", "observe", "tasks", "show", "--id", parent.id,
         "--broker", store_url], cwd=ROOT, capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    assert "children (3)" in text


@pytest.mark.process
def test_stem_enqueue_flags(stem: Stem, store_url: str) -> None:
    eta = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    made = subprocess.run(
        [sys.executable, "-m", "appliance", "enqueue", "c.fast", "--broker", store_url,
         "--eta", eta, "--expires", "7200", "--priority", "5", "--header", "tenant=acme",
         "--task-id", "flagged-1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    message = stem.broker.find_message("flagged-1")
    assert message is not None and message.state == "delayed" and message.priority == 5
    assert message.not_before is not None
    assert abs(message.not_before - datetime.fromisoformat(eta).timestamp()) < 0.01
    naive = subprocess.run(
        [sys.executable, "-m", "appliance", "enqueue", "c.fast", "--broker", store_url,
         "--eta", "2030-01-01T00:00:00"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert naive.returncode == 2 and "no timezone" in naive.stderr
