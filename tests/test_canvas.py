"""The canvas on real supervisors, on both stores: chains driven by the worker (the
producer may exit at once), groups, chords counted exactly once, their failure paths,
links, nested canvases refused, and the chaos run (50 chords of 20 members while children
and the supervisor are SIGKILLed)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import ChainError, ChordError, Stem, TaskState
from appliance.canvas import Signature, chain, chord, group
from tests.apps import canvas_app
from tests.chaos import ChildKiller, kill_session, kill_workers
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

    def make(concurrency: int = 4, env: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess(tmp_path, store_url, app=APP, concurrency=concurrency, env=env)
        made.append(worker)
        return worker

    yield make
    kill_workers(made)


def runs(tmp_path: Path, event: str) -> Counter[str]:
    """How many times each task id ran `event` (a ledger line per run)."""
    ledger = tmp_path / "ledger.txt"
    if not ledger.exists():
        return Counter()
    lines = [line.split() for line in ledger.read_text().splitlines()]
    return Counter(parts[1] for parts in lines if parts[0] == event)


def sig(stem: Stem, name: str, **args: object) -> Signature:
    return stem.signature(name, args)


pytestmark = pytest.mark.process


def test_chain_passes_each_result_on(stem: Stem, spawn: Spawn) -> None:
    spawn().start()
    handle = chain(sig(stem, "c.add", x=1, y=2), sig(stem, "c.double"), sig(stem, "c.double"))
    assert handle.enqueue().result(timeout=20) == 12


def test_a_chain_goes_on_after_its_producer_exits(
    stem: Stem, spawn: Spawn, store_url: str, tmp_path: Path
) -> None:
    # The producer stores the chain and exits before any worker exists: the steps are
    # in the store, and the worker enqueues each next one.
    script = (
        "from tests.apps.canvas_app import stem\n"
        "from appliance.canvas import chain\n"
        "h = chain(stem.signature('c.add', {'x': 3, 'y': 4}), stem.signature('c.double'))"
        ".enqueue()\n"
        "print(h.id)\n"
    )
    made = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"STEM_BROKER_URL": store_url, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    spawn().start()
    assert stem.handle(made.stdout.strip()).result(timeout=20) == 14


def test_a_failed_step_ends_the_chain_with_chain_error(
    stem: Stem, spawn: Spawn, tmp_path: Path
) -> None:
    spawn().start()
    handle = chain(sig(stem, "c.add", x=1), sig(stem, "c.fail"), sig(stem, "c.double")).enqueue()
    with pytest.raises(ChainError, match=r"chain step 2 of 3 \(c\.fail"):
        handle.result(timeout=20)
    assert handle.state() is TaskState.FAILURE
    time.sleep(0.5)
    assert sum(runs(tmp_path, "double").values()) == 0  # the later step never ran


def test_group_results_in_member_order(stem: Stem, spawn: Spawn) -> None:
    spawn().start()
    handle = group(sig(stem, "c.add", x=i, y=i) for i in range(10)).enqueue()
    assert handle.results(timeout=20) == [2 * i for i in range(10)]
    assert handle.state() is TaskState.SUCCESS
    assert len(handle.handles) == 10 and handle.id


def test_group_state_is_failure_when_a_member_fails(stem: Stem, spawn: Spawn) -> None:
    handle = group(sig(stem, "c.add", x=1), sig(stem, "c.fail")).enqueue()
    assert handle.state() is TaskState.PENDING
    spawn().start()
    assert wait_until(lambda: handle.state() is TaskState.FAILURE, timeout=20)


def test_chord_callback_gets_member_values_in_order(stem: Stem, spawn: Spawn) -> None:
    spawn().start()
    members = group(sig(stem, "c.add", x=i, y=1) for i in range(20))
    result = chord(members, sig(stem, "c.total")).enqueue().result(timeout=30)
    assert result == {"sum": 210, "count": 20, "values": list(range(1, 21))}


def test_a_failed_member_fails_the_chord(stem: Stem, spawn: Spawn, tmp_path: Path) -> None:
    spawn().start()
    members = [sig(stem, "c.add", x=1), sig(stem, "c.fail", why="member broke")]
    handle = chord(members, sig(stem, "c.total", tag="never")).enqueue()
    with pytest.raises(ChordError, match=r"chord member 1 of 2 \(c\.fail.*member broke"):
        handle.result(timeout=20)
    time.sleep(0.5)
    assert sum(runs(tmp_path, "total:never").values()) == 0


def test_link_and_link_error_get_previous(stem: Stem, spawn: Spawn) -> None:
    spawn().start()
    ok = stem.enqueue("c.add", {"x": 5}, link=sig(stem, "c.note", tag="ok"))
    assert ok.result(timeout=20) == 5
    children = wait_for_children(stem, ok.id, 1)
    linked = stem.handle(children[0]).result(timeout=20)
    assert linked == {"previous": 5, "parent": ok.id, "root": ok.id}
    bad = stem.enqueue("c.fail", link_error=sig(stem, "c.note", tag="err"))
    errback = stem.handle(wait_for_children(stem, bad.id, 1)[0]).result(timeout=20)
    assert errback["previous"]["task_id"] == bad.id
    assert errback["previous"]["error_type"] == "Reject"


def wait_for_children(stem: Stem, task_id: str, count: int) -> list[str]:
    found: list[str] = []

    def look() -> bool:
        record = stem.broker.task_record(task_id)
        found[:] = list(record.children) if record else []
        return len(found) >= count

    assert wait_until(look, timeout=20)
    return found


def test_canvas_members_are_routed_like_any_enqueue(stem: Stem, spawn: Spawn) -> None:
    # A member for a queue nobody serves waits there; the rest of the group runs.
    handle = group(sig(stem, "c.add", x=1), sig(stem, "c.add", x=2).set(queue="elsewhere"))
    enqueued = handle.enqueue()
    spawn().start()
    assert enqueued.handles[0].result(timeout=20) == 1
    waiting = stem.broker.find_message(enqueued.handles[1].id)
    assert waiting is not None and waiting.queue == "elsewhere"


# --- refused before anything is stored ----------------------------------------------------------


def test_nested_canvases_are_refused_with_what_to_do(stem: Stem) -> None:
    members = group(sig(stem, "c.add", x=1))
    with pytest.raises(TypeError, match="use chord"):
        chain(sig(stem, "c.add", x=1), members)
    with pytest.raises(TypeError, match="chain inside a group"):
        group(chain(sig(stem, "c.add", x=1)))
    with pytest.raises(TypeError, match="signature"):
        chord(members, chain(sig(stem, "c.double")))  # type: ignore[arg-type]


def test_signatures_are_checked_against_the_task(stem: Stem) -> None:
    with pytest.raises(TypeError, match="unexpected argument"):
        sig(stem, "c.add", x=1, z=3)
    with pytest.raises(TypeError, match="unknown signature option"):
        sig(stem, "c.add", x=1).set(colour="blue")
    with pytest.raises(TypeError, match="missing required"):
        chain(sig(stem, "c.add", x=1), sig(stem, "c.add")).enqueue()  # `add` has no `previous`
    with pytest.raises(TypeError, match="must be a signature"):
        stem.enqueue("c.add", {"x": 1}, link="c.note")
    with pytest.raises(ValueError, match="unique and cannot be a member of a chord"):
        chord([sig(stem, "c.unique", key="k")], sig(stem, "c.total")).enqueue()
    assert stem.broker.queue_stats() == []  # none of it stored anything


def test_a_signature_survives_json() -> None:
    original = Signature("c.add", {"x": 1}, {"queue": "q", "link": [Signature("c.note")]})
    again = Signature.from_json(original.to_json())
    assert again == original


# --- chaos ------------------------------------------------------------------------------------


def test_chords_complete_exactly_once_under_kills(stem: Stem, spawn: Spawn, tmp_path: Path) -> None:
    """50 chords of 20 members while a random child is SIGKILLed every 200 ms and the
    supervisor is SIGKILLed and restarted once: every callback runs exactly once, with
    the right inputs."""
    env = {"STEM_TEST_SLOW_S": "0.01"}
    handles = [
        chord(group(sig(stem, "c.add", x=c * 100 + i) for i in range(20)),
              sig(stem, "c.total", tag=f"chord{c}")).enqueue()
        for c in range(50)
    ]  # fmt: skip
    worker = spawn(env=env).start()
    killer = ChildKiller(lambda: [worker.pid], interval=0.2, seed=7)
    killer.start()
    try:
        time.sleep(1.5)
        kill_session(worker.pid)  # the supervisor and its children, mid-run
        worker.proc.wait(timeout=10)  # type: ignore[union-attr]
        worker = spawn(env=env).start()
        finished = wait_until(
            lambda: all(h.state().is_final for h in handles), timeout=180, interval=0.5
        )
    finally:
        kills = killer.stop()
    assert finished, worker.read_log()[-4000:]
    for c, handle in enumerate(handles):
        expected = [c * 100 + i for i in range(20)]
        assert handle.result(timeout=1) == {"sum": sum(expected), "count": 20,
                                            "values": expected}  # fmt: skip
    # Each chord enqueued one callback (one task id per chord, the handle's), and it
    # ran once; a second run only where a kill hit it after its ledger line was written
    # and before it was settled (at-least-once execution), never a second callback.
    lines = [line.split() for line in (tmp_path / "ledger.txt").read_text().splitlines()]
    callback_ids: dict[str, set[str]] = {}
    for parts in lines:
        if parts[0].startswith("total:"):
            callback_ids.setdefault(parts[0], set()).add(parts[1])
    assert callback_ids == {f"total:chord{c}": {handles[c].id} for c in range(50)}
    callback_runs = sum(1 for parts in lines if parts[0].startswith("total:"))
    assert 50 <= callback_runs <= 50 + kills
    assert kills >= 3
