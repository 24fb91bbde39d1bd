"""`STEM_NAMESPACE` separates environments sharing one store URL: tasks, results, DLQ,
workers, control, revokes, schedules and keys (rate limits, locks). On Redis a key
prefix; on SQLite a database file of its own (`stores/sqlite/db.py:namespaced_url`).
Tested with a real worker in each of two namespaces on the same URL, on both stores."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance import Stem, TaskState
from appliance.beat.spec import ScheduleEntry
from appliance.config import Settings, load_settings
from appliance.errors import ConfigError
from appliance.stores.sqlite.db import namespaced_url
from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import ROOT, WorkerProcess

NAMESPACES = ("blue", "green")


def app_in(url: str, namespace: str) -> Stem:
    app = Stem(settings=replace(Settings(), broker_url=url, namespace=namespace))
    app.registry.update(ledger_app.stem.registry)
    return app


def stem_cli(url: str, namespace: str, *argv: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEM_")}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "stem"), *argv, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=env | {"STEM_BROKER_URL": url, "STEM_NAMESPACE": namespace},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


@pytest.fixture
def workers(store_url: str, tmp_path: Path) -> Iterator[dict[str, WorkerProcess]]:
    started: dict[str, WorkerProcess] = {}
    try:
        for namespace in NAMESPACES:
            place = tmp_path / namespace
            place.mkdir()
            started[namespace] = WorkerProcess(
                place, store_url, env={"STEM_NAMESPACE": namespace},
                extra=["--name", f"worker-{namespace}"],
            ).start()  # fmt: skip
        yield started
    finally:
        for proc in started.values():
            proc.stop()


@pytest.fixture
def apps(store_url: str) -> Iterator[dict[str, Stem]]:
    opened = {namespace: app_in(store_url, namespace) for namespace in NAMESPACES}
    yield opened
    for app in opened.values():
        app.close()


@pytest.mark.process
def test_two_namespaces_on_one_url_never_meet(
    store_url: str, workers: dict[str, WorkerProcess], apps: dict[str, Stem], tmp_path: Path
) -> None:
    handles = {ns: [apps[ns].enqueue("t.record", {"n": i}) for i in range(20)] for ns in apps}
    for ns, batch in handles.items():
        assert [h.result(timeout=30) for h in batch] == list(range(20)), workers[ns].read_log()
    for ns, batch in handles.items():
        assert set(workers[ns].completions()) == {h.id for h in batch}  # ran here only
    blue, green = apps["blue"], apps["green"]
    some_blue = handles["blue"][0].id

    # Results: green knows nothing of blue's tasks.
    assert blue.task_state(some_blue) is TaskState.SUCCESS
    assert green.backend.get(some_blue) is None

    # DLQ: a task that fails for good in blue is dead in blue only.
    doomed = blue.enqueue("t.fails_until_flag", {"flag": str(tmp_path / "never")})
    assert wait_until(lambda: blue.broker.dlq_count() == 1, timeout=30), workers["blue"].read_log()
    assert doomed.state() is TaskState.DEAD
    assert green.broker.dlq_count() == 0

    # Queues as `stem observe queues` shows them: waiting work in a queue nobody serves.
    blue.enqueue("t.record", queue="only-blue")
    green.enqueue("t.record", queue="only-green")
    for ns in NAMESPACES:
        names = {row["queue"] for row in stem_cli(store_url, ns, "observe", "queues")}
        assert f"only-{ns}" in names and not names & {f"only-{o}" for o in NAMESPACES if o != ns}

    # Workers and control: each namespace sees and reaches only its own worker.
    for ns in NAMESPACES:
        seen = [w["id"] for w in stem_cli(store_url, ns, "observe", "workers")]
        assert seen == [f"worker-{ns}"]
        answers = stem_cli(store_url, ns, "worker", "ping")
        assert [a["worker"] for a in answers] == [f"worker-{ns}"]

    # Revokes, keys (unique tasks, locks, rate limits) and schedules.
    blue.backend.revoke(["shared-id"], ttl=60)
    assert blue.backend.is_revoked("shared-id") and not green.backend.is_revoked("shared-id")
    assert blue.backend.put_if_absent("lock:report", "blue", ttl=60)
    assert green.backend.put_if_absent("lock:report", "green", ttl=60)  # not blue's lock
    assert blue.backend.incr("rate:api") == 1 and green.backend.incr("rate:api") == 1
    entry = ScheduleEntry.from_options("nightly", "t.record", every=3600)
    blue.stores.schedules.apply([entry], origin="test")
    assert [s.entry.name for s in blue.stores.schedules.entries()] == ["nightly"]
    assert green.stores.schedules.entries() == []

    if store_url.startswith("sqlite:"):
        db = Path(store_url.removeprefix("sqlite:///"))
        assert not db.exists()  # neither namespace is the default's file
        for ns in NAMESPACES:
            assert db.with_name(f"stem.{ns}.db").exists()


def test_the_default_namespace_keeps_the_configured_file() -> None:
    assert namespaced_url("sqlite:///var/stem.db", "stem") == "sqlite:///var/stem.db"
    assert namespaced_url("sqlite:///var/stem.db", "staging") == "sqlite:///var/stem.staging.db"
    assert (
        namespaced_url("sqlite:////srv/q/jobs.sqlite3?synchronous=NORMAL", "prod")
        == "sqlite:////srv/q/jobs.prod.sqlite3?synchronous=NORMAL"
    )
    assert namespaced_url("sqlite:///var/queue", "a") == "sqlite:///var/queue.a"
    assert namespaced_url("redis://localhost/0", "a") == "redis://localhost/0"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "a:b", ".hidden", "a b", "x" * 65, "ns\n"])
def test_a_namespace_that_would_escape_its_file_or_prefix_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="STEM_NAMESPACE"):
        load_settings(env={"STEM_NAMESPACE": bad})
    with pytest.raises(ConfigError, match="namespace"):
        namespaced_url("sqlite:///var/stem.db", bad)
