"""Pure formatting for the screens: ages, sizes, bars and the words that say a slot or
a worker is not well. Every warning is a word as well as a colour (a colour alone is
lost on a monochrome terminal and to colour-blind eyes)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from appliance.backend.protocol import ChildInfo, WorkerHeartbeat
from appliance.control.client import CallResult

# Children beat every 0.5 s (appliance/worker/child.py BEAT_INTERVAL); a slot silent for
# four beats is late, for ten it is stale (the supervisor kills it at heartbeat_timeout).
CHILD_LATE_S = 2.0
CHILD_STALE_S = 5.0
BAR_WIDTH = 10


@dataclass(frozen=True, slots=True)
class Health:
    """A word and the style class (`tcss`) that goes with it: ok, warn or bad."""

    word: str
    level: str  # "ok" | "warn" | "bad"


def worker_health(beat: WorkerHeartbeat, now: float) -> Health:
    """Late past two beat intervals (as `stem health` says), stale past five."""
    age = now - beat.sent_at
    if beat.interval_s and age > 5 * beat.interval_s:
        return Health("stale", "bad")
    if beat.interval_s and age > 2 * beat.interval_s:
        return Health("late", "warn")
    if beat.status != "serving":
        return Health(beat.status.split(" since")[0], "warn")
    return Health("serving", "ok")


def child_health(child: ChildInfo) -> Health:
    if child.state == "empty" or child.pid == 0:
        return Health("dead", "bad")  # no process in the slot: it died, not yet replaced
    age = child.beat_age_s or 0.0
    if age > CHILD_STALE_S:
        return Health(f"{child.state} stale", "bad")
    if age > CHILD_LATE_S:
        return Health(f"{child.state} late", "warn")
    if child.state in ("exiting", "starting"):
        return Health(child.state, "warn")
    return Health(child.state, "ok")


def seconds(value: float | None) -> str:
    """A duration for a narrow column: 0.4s, 12s, 3m05s, 2h07m, 3d04h."""
    if value is None:
        return "-"
    value = max(0.0, value)
    if value < 10:
        return f"{value:.1f}s"
    whole = int(value)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value = value / 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class Runtime:
    """A runtime cell: `filled` of `width` bar cells against the hard limit (0 of 0
    without one), the time as text, and its level."""

    filled: int
    width: int
    label: str
    level: str


def runtime(child: ChildInfo, width: int = BAR_WIDTH) -> Runtime | None:
    """The running task's time against its hard limit (warn past the soft limit or 80%
    of the hard one); the bare time when it has no hard limit; None when idle."""
    if child.runtime_s is None:
        return None
    if not child.hard_limit_s:
        return Runtime(0, 0, seconds(child.runtime_s), "ok")
    fraction = min(1.0, max(0.0, child.runtime_s / child.hard_limit_s))
    over_soft = child.soft_limit_s is not None and child.runtime_s > child.soft_limit_s
    level = "warn" if over_soft or fraction > 0.8 else "ok"
    label = f"{seconds(child.runtime_s)}/{seconds(child.hard_limit_s)}"
    return Runtime(round(fraction * width), width, label, level)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def when(epoch: float | None) -> str:
    """Local date and time to the second (operators read their own clock)."""
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def short_id(task_id: str | None, width: int = 12) -> str:
    return "-" if not task_id else task_id[:width]


def call_summary(result: CallResult, *, stored: str = "") -> str:
    """What a control command reached: who answered, who did not (and when they last
    beat). `stored` says what holds even for workers that were not asked."""
    parts = []
    if result.answers:
        parts.append("answered: " + ", ".join(
            f"{a.worker} ({a.latency_ms:.0f} ms)" for a in result.answers
        ))  # fmt: skip
    if result.missing:
        parts.append("no answer: " + ", ".join(
            f"{m.worker} (last beat {m.beat_age_s:.1f}s ago)" for m in result.missing
        ))  # fmt: skip
    if not result.answers and not result.missing:
        parts.append("no live workers")
    if stored:
        parts.append(stored)
    return "; ".join(parts)
