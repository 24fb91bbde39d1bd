"""The TUI's pure parts: throughput from successive snapshots, the health words, the
runtime bar, the DLQ filter syntax."""

from __future__ import annotations

import pytest

from appliance.backend.protocol import ChildInfo
from appliance.control.client import Answer, CallResult, Missing
from appliance.observe import DeadLetterFilter
from tests.tui.seed import heartbeat
from tui import format as fmt
from tui.screens.dead_letters import describe, parse_filter
from tui.throughput import Throughput


def test_throughput_is_each_workers_change_between_its_own_beats() -> None:
    tp = Throughput(window_s=100)
    tp.add(0, {"a": (0.0, 10)})
    tp.add(1, {"a": (0.0, 10)})  # no new beat yet
    tp.add(2, {"a": (2.0, 30), "b": (1.5, 500)})  # b is new: its count covers an unknown span
    tp.add(3, {"a": (2.0, 30), "b": (1.5, 500)})  # the rates hold until the next beats
    tp.add(3, {"a": (2.0, 30), "b": (1.5, 500)})  # the same instant again: one sample
    tp.add(4, {"a": (4.0, 5), "b": (3.5, 520)})  # a restarted: its count went down
    tp.add(6, {"b": (5.5, 520)})  # a is gone
    assert tp.rates() == [0.0, 0.0, 10.0, 10.0, 10.0, 0.0]
    assert (tp.now, tp.peak) == (0.0, 10.0)
    tp.add(200, {"b": (199.5, 720)})
    assert tp.rates() == [200 / 194]  # older samples left the window


def test_worker_health_words() -> None:
    now = 1000.0
    assert fmt.worker_health(heartbeat(now=now, age=0.5), now).word == "serving"
    assert fmt.worker_health(heartbeat(now=now, age=5), now) == fmt.Health("late", "warn")
    assert fmt.worker_health(heartbeat(now=now, age=11), now) == fmt.Health("stale", "bad")


@pytest.mark.parametrize(
    ("child", "word", "level"),
    [
        (ChildInfo(0, "p", 10, "running", beat_age_s=0.4), "running", "ok"),
        (ChildInfo(0, "p", 10, "running", beat_age_s=2.5), "running late", "warn"),
        (ChildInfo(0, "p", 10, "idle", beat_age_s=6.0), "idle stale", "bad"),
        (ChildInfo(0, "p", 10, "exiting", beat_age_s=0.1), "exiting", "warn"),
        (ChildInfo(0, "p", 0, "empty"), "dead", "bad"),
    ],
)
def test_child_health_is_a_word_as_well_as_a_colour(
    child: ChildInfo, word: str, level: str
) -> None:
    assert fmt.child_health(child) == fmt.Health(word, level)


def test_runtime_bar_against_the_hard_limit() -> None:
    half = ChildInfo(0, "p", 1, "running", "t", "n", runtime_s=5, hard_limit_s=10)
    assert fmt.runtime(half) == fmt.Runtime(5, 10, "5.0s/10s", "ok")
    over_soft = ChildInfo(0, "p", 1, "running", "t", "n", 6, soft_limit_s=5, hard_limit_s=10)
    assert fmt.runtime(over_soft) == fmt.Runtime(6, 10, "6.0s/10s", "warn")
    over_hard = ChildInfo(0, "p", 1, "running", "t", "n", runtime_s=25, hard_limit_s=10)
    assert fmt.runtime(over_hard) == fmt.Runtime(10, 10, "25s/10s", "warn")
    no_limit = ChildInfo(0, "p", 1, "running", "t", "n", runtime_s=75)
    assert fmt.runtime(no_limit) == fmt.Runtime(0, 0, "1m15s", "ok")
    assert fmt.runtime(ChildInfo(0, "p", 1, "idle")) is None


def test_sizes_and_durations() -> None:
    assert [fmt.seconds(v) for v in (0.42, 12, 185, 7620, 273600, None)] == [
        "0.4s", "12s", "3m05s", "2h07m", "3d04h", "-"
    ]  # fmt: skip
    assert [fmt.size(v) for v in (512, 38_000_000, 3 * 2**30, None)] == [
        "512B", "36.2M", "3.0G", "-"
    ]  # fmt: skip


def test_filter_syntax() -> None:
    assert parse_filter("queue:mail reason:exh send") == DeadLetterFilter("mail", "send", "exh")
    assert parse_filter("name:report") == DeadLetterFilter(None, "report", "")
    assert parse_filter("") == DeadLetterFilter()
    assert describe(parse_filter("queue:q x")) == "queue:q name:x"


def test_call_summary_names_who_answered_and_who_did_not() -> None:
    result = CallResult("revoke", [Answer("w1", {}, 3.2)], [Missing("w2", 12.0)])
    assert fmt.call_summary(result, stored="stored") == (
        "answered: w1 (3 ms); no answer: w2 (last beat 12.0s ago); stored"
    )
    assert fmt.call_summary(CallResult("shutdown", [], [])) == "no live workers"


def test_a_view_without_its_hooks_cannot_be_made() -> None:
    from tui.screens.base import StemScreen

    class Unfinished(StemScreen[int]):
        pass

    with pytest.raises(TypeError, match="abstract methods loader, show"):
        Unfinished()
