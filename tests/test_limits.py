"""The bounds on what goes in (docs/limits.md): names, priorities, delays and expiries,
task options; each refused where it enters with a message that says what is allowed,
and docs/limits.md states the same numbers as the code."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance import Stem, TaskContext, TaskHandler, TaskOptions
from appliance.app import EnqueueRequest
from appliance.config import CHILDREN_PER_CPU, MAX_CONCURRENCY, MIN_HEARTBEAT_TIMEOUT
from appliance.units import (
    MAX_COUNT,
    MAX_MESSAGE_BYTES,
    MAX_NAME,
    MAX_SECONDS,
    PRIORITY_MAX,
    PRIORITY_MIN,
)
from appliance.worker.child import BEAT_INTERVAL

LIMITS_DOC = Path(__file__).resolve().parent.parent / "docs" / "limits.md"
TEN_YEARS = 10 * 365 * 86400

BAD_NAMES = [
    ("", "must not be empty"),
    ("a\x00b", "printable"),
    ("a\nb", "printable"),
    ("\x1b[2J", "printable"),
    ("\udcff", "printable"),
    (" padded", "spaces"),
    ("x" * (MAX_NAME + 1), f"at most {MAX_NAME} characters"),
]


@pytest.fixture
def stem(sqlite_url: str) -> Stem:
    return Stem(broker=sqlite_url)


def stored(stem: Stem) -> int:
    return sum(s.ready + s.delayed for s in stem.broker.queue_stats())


# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reason"), BAD_NAMES)
def test_a_bad_task_name_is_refused_at_enqueue_and_nothing_is_stored(
    stem: Stem, name: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=f"^task name .*{reason}"):
        stem.enqueue(name)
    assert stored(stem) == 0


@pytest.mark.parametrize(("name", "reason"), BAD_NAMES)
def test_a_bad_task_name_is_refused_at_registration(stem: Stem, name: str, reason: str) -> None:
    with pytest.raises(ValueError, match="task name"):
        stem.task(name)(lambda ctx: None)

    class Handler(TaskHandler):
        def __call__(self, ctx: TaskContext, args: dict[str, Any]) -> None:
            return None

    handler = Handler()
    handler.name = name
    with pytest.raises(ValueError, match="name"):
        stem.register(handler)
    assert stem.registry == {}


@pytest.mark.parametrize(("queue", "reason"), BAD_NAMES)
def test_a_bad_queue_is_refused_at_enqueue_never_replaced_by_the_default(
    stem: Stem, queue: str, reason: str
) -> None:
    # A regression: queue="" was silently replaced by the task's queue.
    with pytest.raises(ValueError, match=f"^queue .*{reason}"):
        stem.enqueue("t.any", queue=queue)
    assert stored(stem) == 0


@pytest.mark.parametrize(("queue", "reason"), BAD_NAMES)
def test_a_bad_queue_is_refused_in_task_options(queue: str, reason: str) -> None:
    with pytest.raises(ValueError, match="queue"):
        TaskOptions.build(queue=queue)
    with pytest.raises(ValueError, match="queue"):
        TaskOptions(queue=queue)


def test_an_empty_task_id_is_refused_not_replaced(stem: Stem) -> None:
    with pytest.raises(ValueError, match="task id must not be empty"):
        stem.enqueue("t.any", task_id="")
    assert stem.enqueue("t.any", task_id="mine").id == "mine"


def test_good_names_pass_everywhere(stem: Stem) -> None:
    name = "émail.send-v2:fast " + "x" * (MAX_NAME - 19)
    assert len(name) == MAX_NAME
    task = stem.task(name, queue="mail.é")(lambda ctx: None)
    handle = stem.enqueue(task.name, queue="other queue")
    assert stem.broker.list_messages()[0].queue == "other queue" and handle.id


# --- priority ------------------------------------------------------------------------


@pytest.mark.parametrize("priority", [PRIORITY_MAX + 1, PRIORITY_MIN - 1, 2**70, -(2**70)])
def test_a_priority_outside_32_bits_is_refused_with_its_range(stem: Stem, priority: int) -> None:
    # A regression: 2**70 was reported as "task arguments are not JSON-serialisable".
    with pytest.raises(ValueError, match=r"priority must be [<>]= -?[0-9]+, got"):
        stem.enqueue("t.any", priority=priority)
    with pytest.raises(ValueError, match="priority must be"):
        TaskOptions.build(priority=priority)
    assert stored(stem) == 0


@pytest.mark.parametrize("priority", [True, 1.5, "3", None.__class__])
def test_a_priority_that_is_not_an_int_is_refused(stem: Stem, priority: object) -> None:
    with pytest.raises(TypeError, match="priority must be an integer"):
        stem.enqueue("t.any", priority=priority)
    with pytest.raises(TypeError, match="priority must be an integer"):
        TaskOptions(priority=priority)  # type: ignore[arg-type]


def test_the_priority_range_ends_are_accepted(stem: Stem) -> None:
    stem.enqueue("t.any", priority=PRIORITY_MAX)
    stem.enqueue("t.any", priority=PRIORITY_MIN)
    assert sorted(m.priority for m in stem.broker.list_messages()) == [PRIORITY_MIN, PRIORITY_MAX]


# --- countdown, eta, expires ---------------------------------------------------------

FAR = [TEN_YEARS + 100, 1e308, math.inf, 2**2000]


@pytest.mark.parametrize("countdown", FAR)
def test_a_countdown_beyond_ten_years_is_refused(stem: Stem, countdown: float) -> None:
    with pytest.raises(ValueError, match="countdown must be at most 315360000 seconds"):
        stem.enqueue("t.any", countdown=countdown)
    assert stored(stem) == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"countdown": math.nan}, "countdown must be >= 0"),
        ({"countdown": -1}, "countdown must be >= 0"),
        ({"countdown": True}, "countdown must be a number"),
        ({"countdown": "5"}, "countdown must be a number"),
        ({"eta": math.nan}, "eta must be a finite time"),
        ({"eta": math.inf}, "eta must be a finite time"),
        ({"eta": 1e308}, "eta must be a finite time|at most 10 years"),
        ({"eta": 2**2000}, "eta must be a finite time"),
        ({"eta": "tomorrow"}, "eta must be a datetime"),
        ({"expires": -5}, "expires must be >= 0"),
        ({"expires": math.nan}, "expires must be a finite time"),
        ({"expires": 1e308}, "expires must be a finite time|at most 10 years"),
        ({"expires": TEN_YEARS + 100}, "10 years"),  # relative: seconds from now
    ],
)
def test_bad_times_are_refused_with_what_is_allowed(
    stem: Stem, options: dict[str, Any], message: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        stem.enqueue("t.any", **options)
    assert stored(stem) == 0


def test_times_within_ten_years_are_kept(stem: Stem) -> None:
    now = time.time()
    eta = datetime.now(UTC) + timedelta(days=365 * 9)
    stem.enqueue_many(
        [
            EnqueueRequest("t.any", countdown=TEN_YEARS - 100),
            EnqueueRequest("t.any", eta=eta, expires=eta.timestamp() + 1),
            EnqueueRequest("t.any", eta=now - 10**9, expires=60),  # an eta in the past: now
        ]
    )
    assert stored(stem) == 3
    with pytest.raises(ValueError, match="at most 10 years"):
        stem.enqueue("t.any", eta=datetime.now(UTC) + timedelta(days=365 * 11))


# --- task options --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_retries": 2**70}, "max_retries must be <= 2147483647"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"max_retries": 1.5}, "max_retries must be an integer"),
        ({"max_deliveries": 0}, "max_deliveries must be >= 1"),
        ({"soft_time_limit": math.nan}, "soft_time_limit"),
        ({"hard_time_limit": 1e308}, "hard_time_limit"),
        ({"visibility_timeout": 0}, "visibility_timeout must be > 0"),
        ({"result_ttl": 0}, "result_ttl must be at least 1s"),
        ({"result_ttl": "500ms"}, "result_ttl must be at least 1s"),
        ({"max_memory": "2PiB"}, "max_memory"),
    ],
)
def test_bad_task_options_fail_where_the_task_is_declared(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        TaskOptions.build(**options)


def test_direct_task_options_are_checked_too() -> None:
    with pytest.raises(ValueError, match="soft_time_limit must be >= 0"):
        TaskOptions(soft_time_limit=math.nan)
    with pytest.raises(TypeError, match="visibility_timeout must be a number"):
        TaskOptions(visibility_timeout="30s")  # type: ignore[arg-type]


# --- the documented numbers ------------------------------------------------------------


def test_limits_doc_states_the_bounds_the_code_applies() -> None:
    text = LIMITS_DOC.read_text()
    for number in (
        PRIORITY_MIN, PRIORITY_MAX, int(MAX_SECONDS), MAX_COUNT, MAX_NAME, MAX_CONCURRENCY,
    ):  # fmt: skip
        assert str(number) in text, number
    assert MAX_MESSAGE_BYTES == 512 * 2**20 and "512 MiB" in text
    assert f"{MIN_HEARTBEAT_TIMEOUT:g} s" in text and f"{CHILDREN_PER_CPU} children per CPU" in text
    assert MAX_SECONDS == TEN_YEARS


def test_the_heartbeat_minimum_is_three_beats() -> None:
    assert MIN_HEARTBEAT_TIMEOUT >= 3 * BEAT_INTERVAL
