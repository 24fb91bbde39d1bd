"""The batch path of `Stem.enqueue_many` (`appliance.batch`): what it stores is what the
full path (one `Envelope` built, announced and encoded per task) stores, byte for byte,
on both stores; bad input is refused with the full path's errors before anything is
stored; and what a template cannot express falls back to the full path."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from appliance import Stem, signals
from appliance.app import ENQUEUE_BATCH, EnqueueRequest
from appliance.broker.protocol import Consumer
from appliance.config import Settings
from appliance.context import TaskContext, current_task
from appliance.envelope import Envelope, decode
from appliance.errors import PayloadTooLarge
from appliance.signing import SigningConfig

CONSUMER = Consumer("test-host", 1, 1.0)


def make_stem(url: str, **settings: Any) -> Stem:
    stem = Stem(settings=replace(Settings(), broker_url=url, **settings))

    @stem.task("b.add")
    def add(ctx: TaskContext, x: int, y: int = 0) -> int:
        return x + y

    @stem.task("b.mail", queue="mail", priority=3, max_retries=7)
    def mail(ctx: TaskContext, to: str) -> None: ...

    @stem.task("b.limited", rate_limit="100/s")
    def limited(ctx: TaskContext, **args: Any) -> None: ...

    @stem.task("b.unique", unique=True)
    def unique(ctx: TaskContext, key: str) -> None: ...

    return stem


@pytest.fixture
def stem(store_url: str) -> Iterator[Stem]:
    app = make_stem(store_url)
    yield app
    app.close()


# Requests of every shape the batch path takes, and some it hands to the full path (meta,
# a countdown, a task id), mixed so that runs of one template are broken up.
REQUESTS: list[EnqueueRequest | tuple[str, Any]] = [
    ("b.add", {"x": 1}),
    ("b.add", {"x": 2, "y": 3.25}),
    EnqueueRequest("b.mail", {"to": "a@example.com"}),
    EnqueueRequest("b.mail", {"to": "b@example.com"}, queue="mail", priority=3),
    ("b.add", {"x": 4, "y": -1}),
    EnqueueRequest("b.add", {"x": 5}, meta={"request": "r1"}),  # the full path
    ("b.add", {"x": 6}),
    EnqueueRequest("elsewhere.task", {"nested": {"list": [1, None, "é"], "t": True}}),
    # args as pairs, which dict() takes (and so the full path)
    EnqueueRequest("b.add", [("x", 7)], priority=9),  # type: ignore[arg-type]
    EnqueueRequest("b.add", {"x": 8}, task_id="given-id"),  # the full path
    ("elsewhere.task", None),
]


def claim_all(stem: Stem, queues: Sequence[str]) -> list[bytes]:
    payloads: list[bytes] = []
    while found := stem.broker.claim(queues, 100, consumer=CONSUMER, lease=60):
        payloads += [d.payload for d in found]
    return payloads


def expected_payload(stem: Stem, request: Any, stored: Envelope) -> bytes:
    """What the full path stores for `request`, with the stored copy's id and time."""
    full = stem.build_envelope(
        request if isinstance(request, EnqueueRequest) else EnqueueRequest(*request)
    )
    if full.id == "given-id":
        return stem.codec.encode(replace(full, enqueued_at=stored.enqueued_at))
    return stem.codec.encode(replace(full, id=stored.id, enqueued_at=stored.enqueued_at))


def test_the_batch_path_stores_what_the_full_path_stores(stem: Stem) -> None:
    handles = stem.enqueue_many(REQUESTS)
    by_id = {decode(p).id: p for p in claim_all(stem, ["default", "mail"])}
    assert sorted(by_id) == sorted(h.id for h in handles)
    for request, handle in zip(REQUESTS, handles, strict=True):
        stored = by_id[handle.id]
        assert stored == expected_payload(stem, request, decode(stored)), request


def test_stored_rows_match_the_full_path_on_every_field(stem: Stem) -> None:
    batch = stem.enqueue_many(REQUESTS)
    full = stem.publish([stem.build_envelope(_request(r)) for r in REQUESTS[:5]])
    for one, other in zip(batch[:5], full, strict=True):
        mine, theirs = stem.broker.find_message(one.id), stem.broker.find_message(other.id)
        assert mine is not None and theirs is not None
        assert replace(mine, task_id="") == replace(theirs, task_id="")


def test_claims_come_in_request_order(stem: Stem) -> None:
    handles = stem.enqueue_many([("b.add", {"x": i}) for i in range(250)])
    assert [decode(p).id for p in claim_all(stem, ["default"])] == [h.id for h in handles]


def test_a_rate_limited_task_keeps_its_limiter(stem: Stem) -> None:
    (handle,) = stem.enqueue_many([("b.limited", {"n": 1})])
    (payload,) = claim_all(stem, ["default"])
    envelope = decode(payload)
    assert envelope.id == handle.id and envelope.rate == ["b.limited", pytest.approx(0.01)]
    assert payload == expected_payload(stem, ("b.limited", {"n": 1}), envelope)


def test_lineage_and_task_records_inside_a_running_task(stem: Stem) -> None:
    token = current_task.set(TaskContext(id="parent-1", name="b.add", root_id="root-1"))
    try:
        handles = stem.enqueue_many([("b.add", {"x": i}) for i in range(3)])
    finally:
        current_task.reset(token)
    for payload in claim_all(stem, ["default"]):
        envelope = decode(payload)
        assert (envelope.parent_id, envelope.root_id) == ("parent-1", "root-1")
    record = stem.broker.task_record("parent-1")
    assert record is not None and list(record.children) == [h.id for h in handles]
    child = stem.broker.task_record(handles[0].id)
    assert child is not None and (child.parent_id, child.root_id) == ("parent-1", "root-1")


def test_chunks_stay_in_order_and_each_has_its_own_templates(stem: Stem) -> None:
    count = ENQUEUE_BATCH + 10
    handles = stem.enqueue_many([("b.add", {"x": i}) for i in range(count)])
    payloads = claim_all(stem, ["default"])
    assert [decode(p).id for p in payloads] == [h.id for h in handles]
    assert decode(payloads[0]).args == {"x": 0} and decode(payloads[-1]).args == {"x": count - 1}


BAD: list[tuple[Any, type[Exception], str]] = [
    ({"x": object()}, TypeError, "not JSON-serialisable"),
    ({"x": math.nan}, ValueError, "has no JSON form"),
    ({"x": [1, {"deep": -math.inf}]}, ValueError, "has no JSON form"),
    ({"x": math.nan, "y": object()}, ValueError, "has no JSON form"),  # NaN first, as before
    ({"y": 1}, TypeError, "missing required argument(s) x"),
    ({"x": 1, "z": 2}, TypeError, "unexpected argument(s) z"),
    ({"x": "a" * 300_000}, PayloadTooLarge, "above the 262144-byte limit"),
]
BAD_ANYWHERE = [  # for a task not registered here: no argument check
    ({1: 2}, TypeError, "not JSON-serialisable"),
    ({"x": b"bytes"}, TypeError, "not JSON-serialisable"),
]


@pytest.mark.parametrize(
    ("name", "args", "error", "words"),
    [("b.add", *bad) for bad in BAD] + [("elsewhere.task", *bad) for bad in BAD_ANYWHERE],
)
def test_bad_args_are_refused_as_by_the_full_path_and_nothing_is_stored(
    stem: Stem, name: str, args: Any, error: type[Exception], words: str
) -> None:
    requests = [(name, {"x": 1}), (name, args)]
    with pytest.raises(error) as by_batch:
        stem.enqueue_many(requests)
    with pytest.raises(error) as by_full:
        stem.publish([stem.build_envelope(EnqueueRequest(*r)) for r in requests])
    # The same words; a size may differ by a digit of the enqueue time.
    assert re.sub(r"\d+ bytes", "N bytes", str(by_batch.value)) == re.sub(
        r"\d+ bytes", "N bytes", str(by_full.value)
    )
    assert words in str(by_batch.value)
    assert claim_all(stem, ["default"]) == []


@pytest.mark.parametrize(
    ("request_", "error", "words"),
    [
        (("", {}), ValueError, "task name"),
        (("b.add\n", {"x": 1}), ValueError, "task name"),
        (EnqueueRequest("b.add", {"x": 1}, queue=""), ValueError, "queue"),
        (EnqueueRequest("b.add", {"x": 1}, priority=2**31), ValueError, "priority"),
        (EnqueueRequest("b.add", {"x": 1}, priority=True), TypeError, "priority"),
        (("b.add", "not a mapping"), ValueError, "dictionary update sequence"),
        (EnqueueRequest("b.add", {"x": 1}, queue=["mail"]), TypeError, "queue must be a str"),  # type: ignore[arg-type]
        (EnqueueRequest("b.add", {"x": 1}, priority={}), TypeError, "priority"),  # type: ignore[arg-type]
        ((7, {"x": 1}), TypeError, "task name must be a string"),
    ],
)
def test_bad_options_are_refused_before_anything_is_stored(
    stem: Stem, request_: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        stem.enqueue_many([("b.add", {"x": 1}), request_])
    assert claim_all(stem, ["default"]) == []


def test_a_bad_request_in_a_later_chunk_stores_nothing(stem: Stem) -> None:
    requests: list[tuple[str, Any]] = [("b.add", {"x": i}) for i in range(ENQUEUE_BATCH + 5)]
    requests.append(("b.add", {"x": math.inf}))
    with pytest.raises(ValueError, match="has no JSON form"):
        stem.enqueue_many(requests)
    assert claim_all(stem, ["default"]) == []


def test_unique_tasks_in_a_batch_take_the_full_path(stem: Stem) -> None:
    handles = stem.enqueue_many(
        [("b.add", {"x": 1}), ("b.unique", {"key": "k"}), ("b.unique", {"key": "k"})]
    )
    assert handles[1].id == handles[2].id  # the duplicate got the first one's handle
    assert len(claim_all(stem, ["default"])) == 2


def test_publish_signals_turn_the_batch_path_off(stem: Stem) -> None:
    seen: list[str] = []

    def before(event: signals.BeforeTaskPublish) -> None:
        seen.append(event.task_id)

    signals.before_task_publish.connect(before)
    try:
        handles = stem.enqueue_many([("b.add", {"x": i}) for i in range(3)])
    finally:
        signals.before_task_publish.disconnect(before)
    assert seen == [h.id for h in handles]


def test_signed_batches_are_signed_one_by_one(tmp_path: Path) -> None:
    key = base64.b64encode(b"s" * 32).decode()
    signing = SigningConfig.from_env({"STEM_SIGNING_KEYS": f"k1:{key}"})
    stem = make_stem(f"sqlite:///{tmp_path / 'stem.db'}", signing=signing)
    try:
        assert stem._batch([("b.add", {"x": 1})]) is None
        handles = stem.enqueue_many([("b.add", {"x": i}) for i in range(3)])
        payloads = claim_all(stem, ["default"])
        assert [stem.codec.decode(p).id for p in payloads] == [h.id for h in handles]
        assert all(decode(p).sig is not None for p in payloads)
    finally:
        stem.close()


def _request(given: Any) -> EnqueueRequest:
    return given if isinstance(given, EnqueueRequest) else EnqueueRequest(*given)


def test_sqlite_rows_match_the_full_path_column_by_column(sqlite_url: str) -> None:
    stem = make_stem(sqlite_url)
    try:
        requests: list[Any] = [
            ("b.limited", {"n": 1}),
            EnqueueRequest("b.mail", {"to": "x"}, priority=-2),
        ]
        batch = stem.enqueue_many(requests)
        full = stem.publish([stem.build_envelope(_request(r)) for r in requests])
        db = stem.broker._db  # type: ignore[attr-defined]
        columns = "name, queue, priority, state, not_before, lease_until, owner, deliveries, "
        columns += "attempt, rate_key, rate_interval"
        rows = db.read(
            lambda conn: {
                row[0]: row[1:] for row in conn.execute(f"SELECT task_id, {columns} FROM messages")
            }
        )
        for one, other in zip(batch, full, strict=True):
            assert rows[one.id] == rows[other.id]
    finally:
        stem.close()
