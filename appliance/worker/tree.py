"""The supervisor's children: fork them into their slots, hand them deliveries, read what
they report, reap them, and kill those past their limits. Every decision is a pure
function elsewhere (`outcomes`, `limits`); this module does the process work and hands
each verdict to the settle callback (the store round)."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import time
from collections.abc import Callable, Iterable, Sequence

from appliance.app import Stem
from appliance.backend.protocol import ChildInfo
from appliance.broker.protocol import Delivery
from appliance.states import OutcomeStatus, SlotState
from appliance.telemetry import PoolLoad
from appliance.worker import outcomes
from appliance.worker.child import ChildSetup, child_main
from appliance.worker.events import SupervisorEvents
from appliance.worker.heartbeat import HeartbeatTable
from appliance.worker.hygiene import kill_tree, orphans
from appliance.worker.ipc import ChildMessage, Progress, ProtocolError, dispatch_frame
from appliance.worker.limits import (
    BYSTANDER,
    COLD_SHUTDOWN,
    REVOKED,
    KillReason,
    check_memory,
    check_slot,
    describe_exit,
    protocol_violation,
    respawn_delay,
)
from appliance.worker.pipes import ChildPipes
from appliance.worker.pool import Child, Dispatch, Pool
from appliance.worker.store_round import CLAIM_LEASE_S

log = logging.getLogger("stem.worker")

SCAN_S = 0.05  # heartbeat-table scan while a task with a deadline runs
IDLE_SCAN_S = 0.5
MEMORY_SCAN_S = 0.05  # one /proc read per child running a task with max_memory
FORK_RETRY_S = 5.0
SPAWN_STEP = 16  # children forked per loop turn (about 2 ms each here)
_SERVING = (SlotState.IDLE, SlotState.RUNNING)


class ProcessTree:
    """The children of one supervisor, slot by slot, in their pools."""

    def __init__(
        self,
        stem: Stem,
        pools: Sequence[Pool],
        selector: selectors.BaseSelector,
        *,
        blocked_signals: Iterable[int],
        settle: Callable[[outcomes.Settled], None],
        worker_name: str,
        supervisor_id: str,
        supervisor_pid: int,
    ) -> None:
        self.stem = stem
        self.pools = pools
        self.settle = settle
        self.worker_name = worker_name
        self.supervisor_id = supervisor_id  # the mark every child carries (`hygiene.MARK`)
        self.supervisor_pid = supervisor_pid
        self.blocked_signals = tuple(blocked_signals)
        self.orphans_found = 0  # escaped grandchildren killed (adopted as subreaper)
        self.claim_lease = claim_lease_for(stem)
        self.revoked: set[str] = set()  # task ids never to run (the supervisor refreshes it)
        self.pipes = ChildPipes(selector)
        self.children: dict[int, Child] = {}  # pid -> child
        self.table = HeartbeatTable(sum(p.settings.concurrency for p in pools))
        self.seq = 0
        self.accepting = True  # respawn children that exit
        self._touched: set[Child] = set()  # children with dispatches not yet written
        self._next_memory_scan = 0.0
        self._default_ttl = stem.settings.result_ttl
        # Set by the supervisor to its stores' `before_fork` (and the app's own stores').
        self.before_fork: Callable[[], None] = lambda: None
        self.events = SupervisorEvents(worker_name)  # the supervisor sets its own

    # --- spawning ------------------------------------------------------------------------

    def spawn_missing(self, now: float) -> None:
        """Fork children into empty slots, at most `SPAWN_STEP` per loop turn: a pool of
        hundreds must not hold the loop (limits, settles, signals) while it forks."""
        budget = SPAWN_STEP
        if any(pool.empty_slots(now) for pool in self.pools):
            self.before_fork()  # no SQLite state may cross into a child
        for pool in self.pools:
            for index in pool.empty_slots(now)[:budget]:
                pool.respawn_at.pop(index, None)
                self._spawn(pool, index)
                budget -= 1
            if budget <= 0:
                return

    def missing(self) -> int:
        """Slots without a child (being started, or waiting out a crash-loop back-off)."""
        return sum(p.settings.concurrency - len(p.children) for p in self.pools)

    def _spawn(self, pool: Pool, index: int) -> None:
        slot, header = self.table.slots[index], self.table.header

        def run_child(read_fd: int, write_fd: int) -> None:
            child_main(ChildSetup(self.stem, pool.settings, slot, header, read_fd, write_fd,
                                  self.supervisor_pid, self.supervisor_id))  # fmt: skip

        try:
            pid, to_fd, from_fd = self.pipes.fork(self.blocked_signals, run_child)
        except OSError as exc:  # EAGAIN at a process limit (systemd TasksMax=): retry later
            log.error("cannot fork a child for pool %s: %s", pool.settings.name, exc)
            pool.respawn_at[index] = time.monotonic() + FORK_RETRY_S
            return
        self.table.reset(index, pid)
        child = Child(pool, index, pid, to_fd, from_fd, time.monotonic())
        pool.children[index] = child
        self.children[pid] = child
        self.pipes.watch(child, lambda mask: self._on_pipe(child, mask))
        log.debug("child %d spawned in pool %s slot %d", pid, pool.settings.name, index)
        self.events.child_spawned(pool.settings.name, index, pid)

    # --- dispatching ---------------------------------------------------------------------

    def dispatch(self, pool: Pool, delivery: Delivery, now: float) -> None:
        """Hand a claimed delivery to the least busy child of its pool, or settle it at
        once when it must not run (undecodable, unknown task, poison pill, expired)."""
        verdict = outcomes.triage(
            delivery, self.stem.registry, self.stem.codec, default_ttl=self._default_ttl
        )
        if isinstance(verdict, outcomes.Settled):
            self.settle(verdict)
            return
        envelope, task = verdict
        if envelope.id in self.revoked:
            self.settle(outcomes.revoked(
                delivery, envelope, outcomes.REVOKED_BEFORE_RUN, worker=self.worker_name,
                default_ttl=self._default_ttl,
            ))  # fmt: skip
            return
        child = pool.pick_child()
        if child is None:  # capacity vanished (a child died meanwhile): give it back
            self.settle(outcomes.released(delivery))
            return
        self.seq += 1
        first_renewal = min(self.claim_lease, task.options.visibility_timeout) / 3
        child.outstanding[self.seq] = Dispatch(
            self.seq, delivery, envelope, task, now + first_renewal, now + self.claim_lease
        )
        child.sent += 1
        self.events.received(envelope, pool.settings.name, delivery)
        if not child.outbox:
            self._touched.add(child)
        child.outbox += dispatch_frame(self.seq, delivery.payload)

    def flush(self) -> None:
        """Write this turn's dispatches: one pipe write per child."""
        self.pipes.flush(self._touched)
        self._touched.clear()

    # --- what children say -----------------------------------------------------------------

    def _on_pipe(self, child: Child, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._read(child)
        if mask & selectors.EVENT_WRITE:
            self.pipes.flush([child])

    def _read(self, child: Child, *, until_eof: bool = False) -> None:
        try:
            messages = self.pipes.read(child, until_eof=until_eof)
        except ProtocolError as exc:
            for message in exc.before:  # tasks that ended before the garbage was written
                self._on_message(child, message)
            if child.kill is None:
                # A reaped child (the read up to EOF) is not signalled: its pid may be
                # another process's by now.
                self.kill(child, protocol_violation(str(exc)), self._writer_of_garbage(child),
                          signal=not until_eof)  # fmt: skip
            return
        for message in messages:
            self._on_message(child, message)

    def _writer_of_garbage(self, child: Child) -> int:
        """The dispatch that wrote bytes that are not our frames: the oldest one still
        outstanding, since a child answers in dispatch order and a task writes its
        outcome only after it returns. Not the one running now: a task that scribbled
        and returned leaves its child running the next, innocent, task."""
        return next(iter(child.outstanding), self.table.slots[child.index].seq)

    def _on_message(self, child: Child, message: ChildMessage) -> None:
        if isinstance(message, Progress):
            return  # progress is kept in the slot; the final percent comes with the outcome
        dispatch = child.outstanding.pop(message.seq, None)
        if dispatch is None:
            return
        child.finished += 1
        if message.status is OutcomeStatus.SKIPPED:
            self.settle(outcomes.released(dispatch.delivery))
            return
        error = message.error
        if message.status is OutcomeStatus.REJECTED and error and error.type == "SignatureInvalid":
            # The child refused it before running anything (`child._handle`).
            self.settle(outcomes.signature_invalid(
                dispatch.delivery, error.message, default_ttl=self._default_ttl
            ))  # fmt: skip
            return
        if message.runtime is not None:
            child.pool.record_runtime(max(0.0, message.runtime))
        overdue = time.monotonic() - dispatch.lease_end
        if overdue > 0 and not dispatch.lease_lost:
            log.warning(
                "task %s finished %.1fs after its lease ran out (this worker was stopped or "
                "cut off from the store): another worker may have run it too; its result is "
                "kept and its message removed", dispatch.envelope.id, overdue,
                extra={"task_id": dispatch.envelope.id},
            )  # fmt: skip
        self.settle(outcomes.from_outcome(
            dispatch.delivery, dispatch.envelope, dispatch.task, message,
            worker=self.worker_name, default_ttl=self._default_ttl,
        ))  # fmt: skip

    # --- reaping -------------------------------------------------------------------------

    def reap(self, *, block: bool) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._on_exit(child, os.waitstatus_to_exitcode(status))
            if block:
                return

    def _on_exit(self, child: Child, code: int) -> None:
        self._read(child, until_eof=True)  # outcomes it wrote before dying count
        self.pipes.close_from(child)
        self.pipes.close_to(child)
        pool = child.pool
        del pool.children[child.index]
        running = self._running_dispatch(child)
        self.table.slots[child.index].state = SlotState.EMPTY
        unexpected = child.kill is None and bool(child.outstanding or code != 0)
        for dispatch in list(child.outstanding.values()):
            self._recover(child, dispatch, running is dispatch, code)
        child.outstanding.clear()
        if unexpected:
            log.warning("child %d exited with %s", child.pid, describe_exit(code))
        reason = child.kill.message if child.kill else ("crashed" if unexpected else "recycled")
        self.events.child_died(
            pool.settings.name, child.index, child.pid, code, reason,
            expected=not unexpected and child.kill in (None, COLD_SHUTDOWN),
            task_id=running.envelope.id if running else None,
        )  # fmt: skip
        pool.mark_lifetime(child, unexpected)
        if self.accepting:
            pool.respawn_at[child.index] = time.monotonic() + respawn_delay(pool.early_deaths)
        self.kill_orphans()  # what the child started and left behind is adopted by now

    def _running_dispatch(self, child: Child) -> Dispatch | None:
        if child.kill is not None and child.killed_seq in child.outstanding:
            return child.outstanding[child.killed_seq]
        slot = self.table.slots[child.index]
        if slot.state == SlotState.RUNNING and slot.seq in child.outstanding:
            return child.outstanding[slot.seq]
        return None

    def _recover(self, child: Child, dispatch: Dispatch, running: bool, code: int) -> None:
        kill = child.kill
        if kill is REVOKED:
            if dispatch.seq == child.killed_seq:  # the revoked task itself: never retried
                why = outcomes.REVOKED_TERMINATED if running else outcomes.REVOKED_BEFORE_RUN
                self.settle(outcomes.revoked(
                    dispatch.delivery, dispatch.envelope, why, worker=self.worker_name,
                    default_ttl=self._default_ttl,
                ))  # fmt: skip
            else:  # held behind it, or interrupted for it: back uncounted
                self.settle(outcomes.released(dispatch.delivery))
            return
        if kill is not None and kill.counts_as_task_failure and dispatch.seq != child.killed_seq:
            # The task the kill was meant for finished just before it landed: this one
            # had just started and broke no limit.
            kill = BYSTANDER
        self.settle(outcomes.after_child_death(
            dispatch.delivery, dispatch.envelope, dispatch.task, kill,
            running=running, exit_text=f"child {describe_exit(code)}",
            worker=self.worker_name, default_ttl=self._default_ttl,
        ))  # fmt: skip

    # --- limits --------------------------------------------------------------------------

    def scan(self, now: float) -> float:
        """Kill children past a limit; the delay until the next scan (short while a task
        with a deadline or a memory limit runs)."""
        busy = False
        for child in list(self.children.values()):
            slot = self.table.slots[child.index]
            if slot.state == SlotState.RUNNING and (slot.hard_deadline or _memory_limited(child)):
                busy = True  # a limit to watch closely
            if child.kill is None:
                seq = slot.seq  # read first: the verdict below is about this task
                reason = check_slot(slot, now, child.pool.settings.heartbeat_timeout)
                if reason is not None:
                    self.kill(child, reason, seq)
        if now >= self._next_memory_scan:
            self._next_memory_scan = now + MEMORY_SCAN_S
            self._scan_memory()
        return SCAN_S if busy else IDLE_SCAN_S

    def _scan_memory(self) -> None:
        for child in list(self.children.values()):
            slot = self.table.slots[child.index]
            seq = slot.seq
            dispatch = child.outstanding.get(seq)
            if child.kill is not None or dispatch is None or slot.state != SlotState.RUNNING:
                continue
            limit = dispatch.task.options.max_memory
            if not limit:
                continue
            try:
                reason = check_memory(child.rss(), limit)
            except Exception:  # psutil: the child is gone; the reaper handles it
                continue
            if reason is not None:
                self.kill(child, reason, seq)

    def kill(self, child: Child, reason: KillReason, seq: int, *, signal: bool = True) -> None:
        """Kill a child and everything its task started (its process group and every
        descendant): a subprocess that ignores SIGTERM dies with the task. Without
        `signal`, only record why (the child has exited already)."""
        child.kill, child.killed_seq, child.closing = reason, seq, True
        if not signal:
            log.warning("child %d exited; it had broken a rule: %s", child.pid, reason.message)
            return
        log.warning("killing child %d: %s", child.pid, reason.message)
        kill_tree(child.pid)
        held = child.outstanding.get(seq)
        if reason.error_type == "TimeLimitExceeded" and held is not None:
            limit = held.task.options.hard_time_limit or 0.0
            self.events.hard_timeout(held.envelope, limit, child.pid)

    def kill_orphans(self, now: float | None = None) -> None:
        """Kill the processes re-parented to the supervisor that it did not fork: the
        leftovers of tasks that escaped their child's group (daemons, `setsid`)."""
        for pid in orphans(self.children):
            log.warning("killing process %d: left behind by a task (its parent is gone)", pid)
            self.orphans_found += 1
            kill_tree(pid)

    # --- revokes -------------------------------------------------------------------------

    def revoke(self, task_ids: set[str], *, terminate: bool) -> list[str]:
        """Stop revoked tasks this worker holds: one waiting in a child's pipe (prefetched)
        would run before the child hears of the revoke, so its child is killed and what
        else it held goes back uncounted; a running one is killed only with `terminate`.
        Returns the revoked task ids whose child was killed."""
        killed = []
        for child in list(self.children.values()):
            if child.kill is not None:
                continue
            slot = self.table.slots[child.index]
            for dispatch in child.outstanding.values():
                if dispatch.envelope.id not in task_ids:
                    continue
                running = slot.state == SlotState.RUNNING and slot.seq == dispatch.seq
                if running and not terminate:
                    continue  # it runs to its end; a retry of it will not run
                self.kill(child, REVOKED, dispatch.seq)
                killed.append(dispatch.envelope.id)
                break
        return killed

    # --- shutdown ------------------------------------------------------------------------

    def drain(self) -> None:
        """Warm shutdown: children start nothing new and leave once idle."""
        self.accepting = False
        self.table.header.draining = 1
        for child in self.children.values():
            child.closing = True

    def kill_all(self) -> None:
        """Cold shutdown: kill every child; their tasks go back uncounted."""
        self.drain()
        for child in list(self.children.values()):
            child.kill = child.kill or COLD_SHUTDOWN
            kill_tree(child.pid)

    def release_idle(self) -> None:
        """Close the dispatch pipe of children holding nothing: they read EOF and exit."""
        for child in list(self.children.values()):
            if not child.outstanding and child.to_fd >= 0:
                self.pipes.close_to(child)

    def close(self) -> None:
        """Kill and reap what is left; unlink the heartbeat table."""
        self.kill_all()
        while self.children:
            self.reap(block=True)
        self.kill_orphans()
        self.reap_strays()
        self.table.close()

    def reap_strays(self) -> None:
        """Collect exited adoptees (never our children, so `reap` ignores them)."""
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass

    # --- what the loop and the store round need to know -------------------------------------

    def renewals_due(self, now: float) -> dict[float, list[Dispatch]]:
        """Held deliveries whose lease needs extending now, grouped by the lease to take:
        every third of the task's visibility timeout, and at once when the task asked for
        more (`ctx.extend_lease`). A killed child's leases are not renewed."""
        due: dict[float, list[Dispatch]] = {}
        for child in self.children.values():
            if child.kill is not None:
                continue
            slot = self.table.slots[child.index]
            for dispatch in child.outstanding.values():
                lease = dispatch.task.options.visibility_timeout
                if slot.seq == dispatch.seq and slot.lease_request > dispatch.lease_end:
                    lease = max(lease, slot.lease_request - now)  # what the task asked for
                elif dispatch.renew_at > now:
                    continue
                due.setdefault(lease, []).append(dispatch)
        return due

    def next_renewal(self) -> float:
        return min(
            (d.renew_at for c in self.children.values() if c.kill is None
             for d in c.outstanding.values()),
            default=float("inf"),
        )  # fmt: skip

    def children_info(self) -> tuple[ChildInfo, ...]:
        """Every slot as it is now, for the worker's heartbeat record (the TUI)."""
        now = time.monotonic()
        found = []
        for pool in self.pools:
            for index in pool.slot_indexes:
                child = pool.children.get(index)
                found.append(self._slot_info(pool, index, child, now))
        return tuple(found)

    def _slot_info(self, pool: Pool, index: int, child: Child | None, now: float) -> ChildInfo:
        name = pool.settings.name
        if child is None:
            return ChildInfo(index, name, 0, "empty")
        slot = self.table.slots[index]
        state = SlotState(slot.state).name.lower()
        dispatch = child.outstanding.get(slot.seq) if slot.state == SlotState.RUNNING else None
        try:
            rss: int | None = child.rss()
        except Exception:  # psutil: gone or not readable; the reaper handles it
            rss = None
        if dispatch is None:
            return ChildInfo(index, name, child.pid, state, rss=rss,
                             beat_age_s=round(now - slot.last_beat, 3),
                             tasks_done=slot.tasks_done)  # fmt: skip
        options = dispatch.task.options
        return ChildInfo(
            index, name, child.pid, state, task_id=dispatch.envelope.id,
            task=dispatch.envelope.name, runtime_s=round(now - slot.started, 3),
            soft_limit_s=options.soft_time_limit, hard_limit_s=options.hard_time_limit,
            progress=slot.progress if slot.progress >= 0 else None, rss=rss,
            beat_age_s=round(now - slot.last_beat, 3), tasks_done=slot.tasks_done,
        )  # fmt: skip

    def live_children(self, now: float) -> int:
        """Children that are up and beating: what the systemd watchdog vouches for."""
        alive = 0
        for child in self.children.values():
            slot = self.table.slots[child.index]
            timeout = child.pool.settings.heartbeat_timeout
            if slot.state == SlotState.STARTING:  # forked, not yet beating: young is fine
                beating = now - child.spawned_at < timeout
            else:
                beating = slot.state in _SERVING and now - slot.last_beat < timeout
            if child.kill is None and beating:
                alive += 1
        return alive

    def pool_loads(self) -> list[PoolLoad]:
        """Each pool's size and its children busy now (the telemetry gauges)."""
        return [
            PoolLoad(pool.settings.name, pool.settings.concurrency,
                     sum(1 for c in pool.children.values() if c.outstanding))
            for pool in self.pools
        ]  # fmt: skip

    def in_flight(self) -> int:
        return sum(len(c.outstanding) for c in self.children.values())

    def busy(self) -> bool:
        return any(child.outstanding for child in self.children.values())


def _memory_limited(child: Child) -> bool:
    return any(d.task.options.max_memory for d in child.outstanding.values())


def claim_lease_for(stem: Stem) -> float:
    """The lease a claim takes: the shortest visibility timeout among the app's tasks
    (see `StoreRound.claim_lease`), at most `CLAIM_LEASE_S`."""
    timeouts = [task.options.visibility_timeout for task in stem.registry.values()]
    return min([CLAIM_LEASE_S, *timeouts])
