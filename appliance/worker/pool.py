"""A pool: a fixed number of child slots serving the same queues with the same limits.

The pool keeps the bookkeeping of its children (what each one holds, in order) and
chooses which child gets the next delivery; the supervisor does all the I/O.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import psutil

from appliance.broker.protocol import Delivery
from appliance.config import PoolSettings
from appliance.envelope import Envelope
from appliance.tasks import Task
from appliance.worker.ipc import FrameReader
from appliance.worker.limits import KillReason

# A child gets at most this much queued work behind the task it runs: enough to stay
# busy across one settle-and-claim round of the supervisor (one fsync, ~0.2-1 ms), yet
# bounded in time, so a message never waits long behind a slow task (slow pools get no
# prefetch at all).
PREFETCH_WINDOW_S = 0.010
EWMA_WEIGHT = 0.05


@dataclass(eq=False, slots=True)
class Dispatch:
    """A delivery handed to a child and not yet settled."""

    seq: int
    delivery: Delivery
    envelope: Envelope
    task: Task
    renew_at: float  # monotonic: when the lease next needs extending
    lease_end: float  # monotonic: when the lease we hold runs out
    lease_lost: bool = False  # it expired and was taken over (this worker was stalled)


@dataclass(eq=False)
class Child:
    """One forked child as the supervisor sees it."""

    pool: Pool
    index: int  # slot index in the heartbeat table
    pid: int
    to_fd: int  # dispatches go here
    from_fd: int  # outcomes come from here
    spawned_at: float
    reader: FrameReader = field(default_factory=FrameReader)
    outbox: bytearray = field(default_factory=bytearray)
    outstanding: OrderedDict[int, Dispatch] = field(default_factory=OrderedDict)
    sent: int = 0
    finished: int = 0
    kill: KillReason | None = None
    killed_seq: int = 0
    closing: bool = False  # no more dispatches (recycling or shutting down)
    _process: psutil.Process | None = None

    def rss(self) -> int:
        if self._process is None:
            self._process = psutil.Process(self.pid)
        return int(self._process.memory_info().rss)

    def accepts(self, depth: int) -> bool:
        if self.closing or self.kill is not None:
            return False
        limit = self.pool.settings.max_tasks_per_child
        if limit and self.sent >= limit:
            return False  # it will exit after its last task: hold nothing behind it
        return len(self.outstanding) < depth


class Pool:
    """Children of one `PoolSettings`, with crash-loop back-off and prefetch depth."""

    def __init__(self, settings: PoolSettings, first_slot: int) -> None:
        self.settings = settings
        self.slot_indexes = list(range(first_slot, first_slot + settings.concurrency))
        self.children: dict[int, Child] = {}  # slot index -> child
        self.respawn_at: dict[int, float] = {}  # empty slot index -> monotonic time
        self.early_deaths = 0
        self.avg_task_s = 1.0  # pessimistic until measured: no prefetch at start
        self.runtimes_seen = 0
        self.maybe_ready = True  # the queues may hold claimable messages
        self.next_poll = 0.0  # monotonic: claim again by then even without a wake-up

    @property
    def queues(self) -> tuple[str, ...]:
        return self.settings.queues

    def claimable_queues(self, paused: set[str]) -> tuple[str, ...]:
        """The pool's queues that are not paused (`stem worker pause`)."""
        return tuple(q for q in self.settings.queues if q not in paused)

    def depth(self) -> int:
        """Deliveries a child may hold: the running one plus ~10 ms of short tasks."""
        extra = int(PREFETCH_WINDOW_S / max(self.avg_task_s, 1e-6))
        return 1 + min(self.settings.prefetch, extra)

    def free_capacity(self) -> int:
        depth = self.depth()
        return sum(
            max(0, depth - len(c.outstanding)) for c in self.children.values() if c.accepts(depth)
        )

    def pick_child(self) -> Child | None:
        """The child holding the least work (idle children first)."""
        depth = self.depth()
        best: Child | None = None
        for child in self.children.values():
            if child.accepts(depth) and (
                best is None or len(child.outstanding) < len(best.outstanding)
            ):
                best = child
        return best

    def record_runtime(self, seconds: float) -> None:
        # The plain mean of the first runtimes (1/n stays above the EWMA's weight up to
        # the 20th), so the first one replaces the cautious start at once: with the EWMA
        # alone, 1 ms tasks needed ~100 runs before they earned any prefetch.
        self.runtimes_seen += 1
        weight = max(EWMA_WEIGHT, 1.0 / self.runtimes_seen)
        self.avg_task_s += weight * (seconds - self.avg_task_s)

    def held(self) -> int:
        return sum(len(c.outstanding) for c in self.children.values())

    def empty_slots(self, now: float) -> list[int]:
        return [
            i for i in self.slot_indexes
            if i not in self.children and self.respawn_at.get(i, 0.0) <= now
        ]  # fmt: skip

    def mark_lifetime(self, child: Child, unexpected: bool) -> None:
        """Count children that die young without finishing anything (a crash loop)."""
        young = time.monotonic() - child.spawned_at < 5.0
        if unexpected and young and child.finished == 0:
            self.early_deaths += 1
        elif child.finished:
            self.early_deaths = 0
