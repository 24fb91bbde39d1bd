"""`stem health`: is this appliance fit to serve? One report of named checks, each
passing or not with its figure, so a deploy pipeline (or systemd, or a load balancer)
can gate on the exit code and a person can read why.

Checks: the broker and the backend answer; the store's own checks (SQLite integrity
and WAL size, Redis durability settings, latency and memory); enough live workers, none
of them late; and how much the dead-letter queue grew since the last look (remembered
in the backend, so each run compares with the one before).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from appliance.broker.protocol import HealthCheck
from appliance.errors import StemError

if TYPE_CHECKING:
    from appliance.app import Stem
    from appliance.backend.protocol import WorkerHeartbeat

LAST_LOOK_KEY = "health:dlq"  # backend key: the DLQ size at the last look, and when
LAST_LOOK_TTL_S = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class HealthReport:
    healthy: bool
    checks: list[HealthCheck]


def check_health(
    stem: Stem, *, min_workers: int = 1, max_dlq_growth: int | None = None
) -> HealthReport:
    """Run every check; a store that cannot be reached fails its checks, it never raises."""
    checks: list[HealthCheck] = []
    try:
        stores = stem.stores
        stats = stores.broker.queue_stats()
        waiting = sum(s.ready + s.delayed for s in stats)
        checks.append(HealthCheck("broker", True, f"{len(stats)} queues, {waiting} waiting"))
        checks += stores.broker.health_checks()
    except StemError as exc:
        checks.append(HealthCheck("broker", False, str(exc)))
        return HealthReport(False, checks)
    try:
        beats = stores.backend.list_workers()
        checks.append(HealthCheck("backend", True, "reachable"))
    except StemError as exc:
        checks.append(HealthCheck("backend", False, str(exc)))
        return HealthReport(False, checks)
    checks.append(_workers(beats, min_workers))
    checks.append(_dlq_growth(stem, max_dlq_growth))
    return HealthReport(all(c.ok for c in checks), checks)


def _workers(beats: list[WorkerHeartbeat], min_workers: int) -> HealthCheck:
    now = time.time()
    late = [b.id for b in beats if b.interval_s and now - b.sent_at > 2 * b.interval_s]
    live = len(beats) - len(late)
    detail = f"{live} live" + (f", late: {', '.join(late)}" if late else "")
    if min_workers:
        detail += f" (at least {min_workers} wanted)"
    return HealthCheck("workers", live >= min_workers and not late, detail)


def _dlq_growth(stem: Stem, max_growth: int | None) -> HealthCheck:
    backend = stem.stores.backend
    count = stem.stores.broker.dlq_count()
    now = time.time()
    last = backend.get_key(LAST_LOOK_KEY)
    backend.delete_key(LAST_LOOK_KEY)
    backend.put_if_absent(LAST_LOOK_KEY, orjson.dumps({"count": count, "at": now}), LAST_LOOK_TTL_S)
    if last is None:
        return HealthCheck("dead letters", True, f"{count} in the DLQ (first look)")
    before = orjson.loads(last)
    grew = count - int(before["count"])
    minutes = (now - float(before["at"])) / 60
    detail = f"{count} in the DLQ, {grew:+d} since the last look {minutes:.0f} min ago"
    ok = max_growth is None or grew <= max_growth
    return HealthCheck("dead letters", ok, detail + ("" if ok else f" (more than {max_growth})"))
