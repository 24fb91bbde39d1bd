"""The Observer's DLQ reads and edits for the TUI (filters, chosen entries), on every
store: a filtered page, and replaying or purging exactly the entries picked."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.app import Stem
from appliance.broker.protocol import DeadLetterInfo, Settlement
from appliance.config import Settings
from appliance.observe import DeadLetterFilter, Observer
from appliance.states import DeadLetterReason, TaskState
from tests.test_observe import claim, kill


@pytest.fixture
def stem(store_url: str) -> Iterator[Stem]:
    app = Stem(settings=Settings(broker_url=store_url))
    yield app
    app.close()


def ids_by_name(observer: Observer) -> dict[str, str]:
    """DLQ entry id of each task name (every test names its tasks uniquely)."""
    return {e.name or "": e.id for e in observer.dlq_list(page_size=100).entries}


def test_find_by_name_and_reason_pages_newest_first(stem: Stem) -> None:
    kill(stem, ["mail.send", "mail.bounce", "report.build"])
    info = DeadLetterInfo(DeadLetterReason.EXHAUSTED, "Boom", "x")
    stem.enqueue("mail.retry")
    [delivery] = claim(stem, 1)
    stem.broker.settle([Settlement.dead_letter(delivery, info)])
    observer = Observer(stem)

    mail = observer.dlq_find(DeadLetterFilter(name="MAIL"), page=1, page_size=2)
    assert (mail.total, mail.pages) == (3, 2)
    assert [e.name for e in mail.entries] == ["mail.retry", "mail.bounce"]
    second = observer.dlq_find(DeadLetterFilter(name="mail"), page=2, page_size=2)
    assert [e.name for e in second.entries] == ["mail.send"]

    exhausted = observer.dlq_find(DeadLetterFilter(reason="exhaust"))
    assert [e.name for e in exhausted.entries] == ["mail.retry"]
    both = observer.dlq_find(DeadLetterFilter(name="mail", reason="permanent"))
    assert both.total == 2
    assert observer.dlq_find(DeadLetterFilter(queue="other", name="mail")).total == 0
    assert observer.dlq_find(DeadLetterFilter(queue="default")).total == 4
    with pytest.raises(ValueError):
        observer.dlq_find(DeadLetterFilter(name="x"), page=0)


def test_find_scans_past_one_chunk(stem: Stem, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.observe.DLQ_SCAN_CHUNK", 2)
    kill(stem, ["a1", "b1", "a2", "b2", "a3"])
    found = Observer(stem).dlq_find(DeadLetterFilter(name="a"), page=1, page_size=10)
    assert [e.name for e in found.entries] == ["a3", "a2", "a1"] and found.total == 3


def test_replay_entries_replays_only_those_chosen(stem: Stem) -> None:
    task_ids = dict(zip(["a", "b", "c"], kill(stem, ["a", "b", "c"]), strict=True))
    observer = Observer(stem)
    entries = ids_by_name(observer)

    replayed = observer.dlq_replay_entries([entries["a"], entries["c"], "no-such-entry"])
    assert sorted(replayed) == sorted([task_ids["a"], task_ids["c"]])
    assert set(ids_by_name(observer)) == {"b"}
    for name in "ac":
        shown = observer.task_show(task_ids[name])
        assert shown is not None and shown.state is TaskState.PENDING
        assert shown.message is not None and shown.message.attempt == 0
    assert stem.task_state(task_ids["b"]) is TaskState.DEAD
    # Replayed once: the entries are gone, a second replay changes nothing.
    assert observer.dlq_replay_entries([entries["a"]]) == []
    assert [m.task_id for m in observer.tasks_list()].count(task_ids["a"]) == 1


def test_purge_entries_deletes_only_those_chosen(stem: Stem) -> None:
    kill(stem, ["a", "b", "c"])
    observer = Observer(stem)
    entries = ids_by_name(observer)
    assert observer.dlq_purge_entries([entries["b"], "no-such-entry"]) == 1
    assert set(ids_by_name(observer)) == {"a", "c"}
    assert observer.dlq_purge_entries([entries["b"]]) == 0
    assert observer.dlq_count() == 2 and observer.dlq_count("default") == 2
    assert [s.dead for s in observer.queue_stats()] == [2]


def test_dlq_envelope_has_meta_and_lineage(stem: Stem) -> None:
    stem.enqueue("a", args={"n": 1}, meta={"tenant": "t1"}, headers={"h": "v"})
    info = DeadLetterInfo(DeadLetterReason.PERMANENT, "Reject", "no")
    [delivery] = claim(stem, 1)
    stem.broker.settle([Settlement.dead_letter(delivery, info)])
    observer = Observer(stem)
    [entry] = observer.dlq_list().entries
    envelope = observer.dlq_envelope(entry.id)
    assert envelope is not None
    assert (envelope.meta, envelope.headers, envelope.args) == ({"tenant": "t1"}, {"h": "v"},
                                                                {"n": 1})  # fmt: skip
    assert envelope.parent_id is None
    assert observer.dlq_envelope("no-such-entry") is None
