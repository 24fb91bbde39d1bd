"""The read façade (`appliance.observe.Observer`) on every store: what the CLI and the
TUI show must not depend on the broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.app import Stem
from appliance.backend.protocol import ErrorInfo, TaskResult
from appliance.broker.protocol import Consumer, DeadLetterInfo, Delivery, Settlement
from appliance.config import Settings
from appliance.observe import Observer
from appliance.states import DeadLetterReason, TaskState


@pytest.fixture
def stem(store_url: str) -> Iterator[Stem]:
    app = Stem(settings=Settings(broker_url=store_url))
    yield app
    app.close()


def claim(stem: Stem, count: int, queue: str = "default") -> list[Delivery]:
    deliveries = stem.broker.claim([queue], count, consumer=Consumer.this_process(), lease=30)
    assert len(deliveries) == count
    return deliveries


def kill(stem: Stem, names: list[str], queue: str = "default") -> list[str]:
    """Dead-letter fresh tasks as a worker would, with DEAD results stored."""
    handles = stem.enqueue_many([(name, {"n": i}) for i, name in enumerate(names)])
    info = DeadLetterInfo(DeadLetterReason.PERMANENT, "Reject", "no", "Traceback ...")
    for delivery in claim(stem, len(names), queue):  # one by one: DLQ order is dead time
        stem.broker.settle([Settlement.dead_letter(delivery, info)])
    stem.backend.store(
        [
            TaskResult(h.id, TaskState.DEAD, name=n, error=ErrorInfo("Reject", "no"))
            for h, n in zip(handles, names, strict=True)
        ]
    )
    return [h.id for h in handles]


def test_queue_stats_sorted_by_queue(stem: Stem) -> None:
    stem.enqueue("t", queue="zeta")
    stem.enqueue("t", queue="alpha", countdown=60)
    stats = Observer(stem).queue_stats()
    assert [(s.queue, s.ready, s.delayed) for s in stats] == [("alpha", 0, 1), ("zeta", 1, 0)]


def test_tasks_list_pages(stem: Stem) -> None:
    ids = [stem.enqueue("t", args={"n": i}).id for i in range(5)]
    observer = Observer(stem)
    assert [m.task_id for m in observer.tasks_list(limit=2, offset=1)] == ids[1:3]
    assert observer.tasks_list("other") == []


def test_task_show_merges_the_stores(stem: Stem) -> None:
    observer = Observer(stem)
    task_id = stem.enqueue("t").id
    pending = observer.task_show(task_id)
    assert pending is not None and pending.state is TaskState.PENDING
    assert pending.message is not None and pending.result is None

    claim(stem, 1)
    # The backend still says RETRY from the attempt before; the held lease wins.
    stem.backend.store([TaskResult(task_id, TaskState.RETRY, name="t", attempt=0)])
    running = observer.task_show(task_id)
    assert running is not None and running.state is TaskState.STARTED

    stem.backend.store([TaskResult(task_id, TaskState.SUCCESS, name="t", value=7)])
    done = observer.task_show(task_id)
    assert done is not None and done.state is TaskState.SUCCESS and done.result is not None
    assert done.result.value == 7
    assert observer.task_show("unknown") is None


def test_task_show_of_a_retry_waiting_for_its_time(stem: Stem) -> None:
    task_id = stem.enqueue("t", countdown=60).id
    stem.backend.store([TaskResult(task_id, TaskState.RETRY, name="t", attempt=1)])
    shown = Observer(stem).task_show(task_id)
    assert shown is not None and shown.state is TaskState.RETRY


def test_dlq_pages_newest_first_with_total(stem: Stem) -> None:
    ids = kill(stem, ["a", "b", "c"])
    observer = Observer(stem)
    first = observer.dlq_list(page=1, page_size=2)
    second = observer.dlq_list(page=2, page_size=2)
    assert (first.total, first.pages, second.total) == (3, 2, 3)
    listed = [e.task_id or "" for e in first.entries + second.entries]
    assert sorted(listed) == sorted(ids) and len(second.entries) == 1
    assert observer.dlq_list("other").total == 0
    with pytest.raises(ValueError):
        observer.dlq_list(page=0)


def test_dlq_show_decodes_args(stem: Stem) -> None:
    [task_id] = kill(stem, ["a"])
    observer = Observer(stem)
    [entry] = observer.dlq_list().entries
    shown = observer.dlq_show(entry.id)
    assert shown is not None
    assert (shown.task_id, shown.name, shown.queue) == (task_id, "a", "default")
    assert (shown.reason, shown.error_type, shown.args, shown.raw) == (
        "permanent",
        "Reject",
        {"n": 0},
        None,
    )
    assert observer.dlq_show("no-such-entry") is None


def test_dlq_replay_forgets_results_so_tasks_read_pending(stem: Stem) -> None:
    ids = kill(stem, ["a", "b"])
    observer = Observer(stem)
    [replayed] = observer.dlq_replay(limit=1)
    assert replayed in ids
    assert stem.backend.get(replayed) is None
    shown = observer.task_show(replayed)
    assert shown is not None and shown.state is TaskState.PENDING
    [other] = [i for i in ids if i != replayed]
    assert stem.task_state(other) is TaskState.DEAD  # not replayed: untouched
    assert observer.dlq_count() == 1


def test_dlq_purge(stem: Stem) -> None:
    kill(stem, ["a", "b"])
    observer = Observer(stem)
    assert observer.dlq_purge("other") == 0
    assert observer.dlq_purge() == 2
    assert observer.dlq_count() == 0


def test_workers_lists_live_heartbeat_records(store_url: str) -> None:
    import time

    from appliance import Stem
    from appliance.backend.protocol import WorkerHeartbeat
    from appliance.observe import Observer

    stem = Stem(broker=store_url)
    beat = WorkerHeartbeat(
        id="h:1:2.000", host="h", pid=1, pools=("default",), queues=("default",),
        concurrency=2, in_flight=0, processed=5, failed=1, started_at=time.time(),
        version="0.1.0", sent_at=time.time(),
    )  # fmt: skip
    stem.backend.put_worker_heartbeat(beat, ttl=30)
    assert Observer(stem).workers() == [beat]
    stem.close()
