"""The `ResultBackend` contract (appliance/backend/protocol.py), once per store."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from appliance.backend.protocol import ErrorInfo, ResultBackend, TaskResult
from appliance.config import Settings
from appliance.envelope import new_task_id
from appliance.states import TaskState
from tests.conftest import wait_until
from tests.stores import open_test_stores


@pytest.fixture
def backend(store_url: str) -> Iterator[ResultBackend]:
    opened = open_test_stores(store_url, Settings()).backend
    yield opened
    opened.close()


def result(state: TaskState = TaskState.SUCCESS, **fields: object) -> TaskResult:
    return TaskResult(task_id=new_task_id(), state=state, **fields)  # type: ignore[arg-type]


def test_store_and_get_keep_every_field(backend: ResultBackend) -> None:
    now = time.time()
    stored = result(
        name="email.send", queue="email", value={"sent": [1, 2.5, "x"], "ok": True},
        attempt=2, worker="host:1:2.000", started_at=now - 1, finished_at=now, progress=100.0,
        progress_data={"step": "done"}, meta={"requestId": "r1"}, expires_at=now + 3600,
    )  # fmt: skip
    failed = result(TaskState.DEAD, error=ErrorInfo("ValueError", "bad input", "Traceback (most…)"))
    backend.store([stored, failed])

    assert backend.get(stored.task_id) == stored
    assert backend.get(failed.task_id) == failed
    assert backend.get(new_task_id()) is None


@pytest.mark.parametrize("value", [None, 0, "", [], {}, "text", [1, {"a": None}]])
def test_json_values_round_trip(backend: ResultBackend, value: object) -> None:
    stored = result(value=value)
    backend.store([stored])
    found = backend.get(stored.task_id)
    assert found is not None and found.value == value


def test_a_later_store_replaces_the_earlier(backend: ResultBackend) -> None:
    started = result(TaskState.STARTED, progress=10.0)
    backend.store([started])
    done = TaskResult(started.task_id, TaskState.SUCCESS, value=42, attempt=1)
    backend.store([done])

    found = backend.get(started.task_id)
    assert found == done
    assert isinstance(found.state, TaskState)


def test_expired_results_are_gone(backend: ResultBackend) -> None:
    keep = result(expires_at=time.time() + 3600)
    forever = result()
    short = result(expires_at=time.time() + 0.3)
    past = result(expires_at=time.time() - 1)
    backend.store([keep, forever, short, past])

    assert backend.get(short.task_id) == short
    assert backend.get(past.task_id) is None
    assert wait_until(lambda: backend.get(short.task_id) is None, timeout=5)
    assert set(backend.get_many([keep.task_id, short.task_id, past.task_id])) == {keep.task_id}

    assert backend.purge_expired() >= 0  # stores with native TTLs may have nothing left
    assert backend.get(short.task_id) is None
    assert backend.get(keep.task_id) == keep
    assert backend.get(forever.task_id) == forever


def test_get_many_returns_only_known_ids(backend: ResultBackend) -> None:
    stored = [result(value=i) for i in range(3)]
    backend.store(stored)
    wanted = [stored[0].task_id, new_task_id(), stored[2].task_id]

    found = backend.get_many(wanted)

    assert found == {stored[0].task_id: stored[0], stored[2].task_id: stored[2]}
    assert backend.get_many([]) == {}


def test_forget_deletes(backend: ResultBackend) -> None:
    stored = [result(), result()]
    backend.store(stored)
    backend.forget([stored[0].task_id, new_task_id()])
    assert backend.get(stored[0].task_id) is None
    assert backend.get(stored[1].task_id) == stored[1]


def test_a_result_stored_by_another_process_is_visible(
    store_url: str, backend: ResultBackend
) -> None:
    task_id = new_task_id()
    backend.get(task_id)  # this process has the store open before the other one writes
    code = (
        "import sys\n"
        "from appliance.backend.protocol import TaskResult\n"
        "from appliance.config import Settings\n"
        "from appliance.states import TaskState\n"
        "from appliance.envelope import EnvelopeCodec\n"
        "from appliance.stores import open_stores\n"
        "backend = open_stores(Settings(broker_url=sys.argv[1]), EnvelopeCodec()).backend\n"
        "backend.store([TaskResult(sys.argv[2], TaskState.SUCCESS, value={'from': 'child'})])\n"
        "backend.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, store_url, task_id], check=True, timeout=60)

    found = backend.get(task_id)
    assert found is not None
    assert (found.state, found.value) == (TaskState.SUCCESS, {"from": "child"})
