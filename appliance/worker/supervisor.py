"""The supervisor: one single-threaded select loop that owns the process tree.

Each turn of the loop: read what the signal pipe, the broker's wake-up fd and the
children's pipes have to say; reap dead children and recover their work; kill children
past their limits; settle everything that finished in one batch; claim what free
children need in one batch; renew leases. Signal handlers do nothing but wake the loop
(`signal.set_wakeup_fd` carries the signal numbers), so all decisions are made here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections import Counter
from collections.abc import Sequence

from appliance import __version__
from appliance.app import Stem
from appliance.backend.protocol import ResultBackend, WorkerHeartbeat
from appliance.broker.protocol import Broker, Consumer, Delivery
from appliance.config import PoolSettings
from appliance.errors import BrokerBusy, BrokerError, BrokerUnavailable, StemError
from appliance.states import ExitCode, OutcomeStatus, SlotState, TaskEvent
from appliance.worker import outcomes
from appliance.worker.child import ChildSetup, child_main
from appliance.worker.heartbeat import HeartbeatTable
from appliance.worker.ipc import ChildMessage, Progress, dispatch_frame
from appliance.worker.limits import (
    BYSTANDER,
    COLD_SHUTDOWN,
    KillReason,
    check_memory,
    check_slot,
    describe_exit,
    respawn_delay,
)
from appliance.worker.pipes import ChildPipes
from appliance.worker.pool import Child, Dispatch, Pool
from appliance.worker.systemd import Notifier

log = logging.getLogger("stem.worker")

# Wait at most this long for other SQLite writers (a producer's 100k-row batch holds the
# lock for seconds): past it the round fails, backs off and is retried, while the loop
# keeps enforcing time limits and heartbeats.
STORE_BUSY_WAIT_S = 0.25
FINAL_SETTLE_S = 10.0  # at exit, keep retrying a failing store this long
CLAIM_LEASE_S = 30.0  # the lease taken at claim; renewed to each task's own timeout
POLL_S = 1.0  # claim at least this often without a wake-up (lost wake-ups, outbox)
SCAN_S = 0.05  # heartbeat-table scan while a task with a deadline runs
IDLE_SCAN_S = 0.5
MEMORY_SCAN_S = 0.05  # one /proc read per child running a task with max_memory
RECOVER_S = 1.0
PURGE_S = 60.0
WORKER_BEAT_S = 5.0  # the supervisor's record in the backend; it expires after 3 beats
IDLE_UPKEEP_S = 10.0  # checkpoint the SQLite WAL at most this often, and only when idle
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


class Supervisor:
    """Runs pools of children for one `Stem` until told to stop. `run()` returns the
    process exit code."""

    def __init__(self, stem: Stem, pools: Sequence[PoolSettings]) -> None:
        self.stem = stem
        self.settings = stem.settings
        first = 0
        self.pools: list[Pool] = []
        for settings in pools:
            self.pools.append(Pool(settings, first))
            first += settings.concurrency
        self.slot_count = first
        self.children: dict[int, Child] = {}  # pid -> child
        self.pending: list[outcomes.Settled] = []
        self._touched: set[Child] = set()  # children with dispatches not yet written
        self.seq = 0
        self.accepting = True
        self.draining_until: float | None = None
        self.cold = False
        self.notifier = Notifier()
        self.store_retry_at = 0.0
        self.store_failures = 0
        self.counts: Counter[TaskEvent] = Counter()
        self._timers = {
            "scan": 0.0,
            "memory": 0.0,
            "recover": 0.0,
            "purge": 0.0,
            "dog": 0.0,
            "beat": 0.0,
            "idle": 0.0,
        }

    # --- life cycle --------------------------------------------------------------------

    def run(self) -> int:
        """Open stores, fork the pools, serve until shutdown; the exit code."""
        self._install_signals()
        try:
            if not self._connect():
                return int(ExitCode.OK)  # told to stop while waiting for the broker
        except StemError as exc:
            log.error("cannot start: %s", exc)
            return int(ExitCode.CONFIG)
        self.table = HeartbeatTable(self.slot_count)
        try:
            self._spawn_missing(time.monotonic())
            self.notifier.send("READY=1", f"STATUS=serving {self._queue_names()}")
            log.info(
                "supervisor %d ready: %d children, queues %s, broker %s",
                os.getpid(), self.slot_count, self._queue_names(), self.broker.url,
            )  # fmt: skip
            while self.children or self.accepting:
                self._turn()
        finally:
            self._close()
        log.info("supervisor %d stopped: %s", os.getpid(), self.counts)
        return int(ExitCode.OK)

    def _install_signals(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.pipes = ChildPipes(self.selector)
        self.signal_r, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.signal_w)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, _record_only)
        self.selector.register(self.signal_r, selectors.EVENT_READ, "signal")

    def _connect(self) -> bool:
        """Open the stores, waiting (with back-off) while the broker is unreachable, so a
        worker started before its Redis comes up instead of crash-looping under systemd.
        False if a stop signal arrived meanwhile."""
        self.broker: Broker
        self.backend: ResultBackend
        self.stores = self.stem.open_stores(busy_wait=STORE_BUSY_WAIT_S)
        self.broker, self.backend = self.stores.broker, self.stores.backend
        self.consumer = Consumer.this_process()
        self.worker_name = f"{self.consumer.host}:{self.consumer.pid}"
        queues = sorted({q for pool in self.pools for q in pool.queues})
        pause = 0.5
        while True:
            try:
                recovered = self.broker.recover(self.consumer)
                self.wake_fd = self.broker.wake_fd(queues)
                break
            except (BrokerUnavailable, BrokerBusy) as exc:
                log.warning("broker unavailable (%s); retrying in %.1fs", exc, pause)
                self.notifier.send(f"STATUS=waiting for broker: {exc}")
                if self._stop_requested_within(pause):
                    return False
                pause = min(pause * 2, 10.0)
        if recovered:
            log.warning("returned %d abandoned deliveries to their queues", recovered)
        for warning in self.broker.durability_warnings():
            log.warning("broker durability: %s", warning)
        if self.wake_fd is not None:
            self.selector.register(self.wake_fd, selectors.EVENT_READ, "wake")
        return True

    def _stop_requested_within(self, seconds: float) -> bool:
        if not self.selector.select(seconds):
            return False
        with contextlib.suppress(BlockingIOError):
            received = os.read(self.signal_r, 64)
            return any(s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) for s in received)
        return False

    def _close(self) -> None:
        """Kill what is left, settle what is known, release shared memory and stores."""
        for child in list(self.children.values()):
            child.kill = child.kill or COLD_SHUTDOWN  # their tasks go back uncounted
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        while self.children:
            self._reap(block=True)
        self.accepting = False
        self._settle_before_exit()
        with contextlib.suppress(BrokerError):
            self.backend.remove_worker(self.consumer.name)
        signal.set_wakeup_fd(-1)
        self.table.close()
        self.stores.close()

    def _settle_before_exit(self) -> None:
        """Settle what is left, retrying through a short store outage: a result or an
        ack dropped here would make a finished task run again."""
        deadline = time.monotonic() + FINAL_SETTLE_S
        self._store_round(time.monotonic(), final=True)
        while self.pending and time.monotonic() < deadline:
            time.sleep(max(0.05, min(0.5, self.store_retry_at - time.monotonic())))
            self._store_round(time.monotonic(), final=True)
        if self.pending:
            log.error(
                "exiting with %d deliveries unsettled: their leases expire and they run again",
                len(self.pending),
            )

    # --- the loop ----------------------------------------------------------------------

    def _turn(self) -> None:
        for key, mask in self.selector.select(self._timeout()):
            if key.data == "signal":
                self._on_signals()
            elif key.data == "wake":
                self.broker.clear_wake()
                for pool in self.pools:
                    pool.maybe_ready = True
            elif mask & selectors.EVENT_READ:
                self._read_child(key.data)
            else:
                self.pipes.flush([key.data])
        now = time.monotonic()
        self._reap(block=False)
        self._scan(now)
        if self.accepting:
            self._spawn_missing(now)
        for pool, delivery in self._store_round(now):
            self._dispatch(pool, delivery, now)
        self.pipes.flush(self._touched)
        self._touched.clear()
        self._renew(now)
        self._housekeeping(now)
        self._progress_shutdown(now)

    def _timeout(self) -> float:
        if self.pending and time.monotonic() >= self.store_retry_at:
            return 0.0
        now = time.monotonic()
        deadlines = [self._timers["scan"], now + POLL_S]
        if self.accepting:
            for pool in self.pools:
                if pool.free_capacity():
                    deadlines.append(now if pool.maybe_ready else pool.next_poll)
                deadlines.extend(pool.respawn_at.values())
        if self.draining_until is not None:
            deadlines.append(self.draining_until)
        for child in self.children.values():
            if child.kill is None:  # a killed child's leases are not renewed: no spinning
                deadlines.extend(
                    max(d.renew_at, self.store_retry_at) for d in child.outstanding.values()
                )
        return max(0.0, min(deadlines) - now)

    # --- signals and shutdown ------------------------------------------------------------

    def _on_signals(self) -> None:
        try:
            received = os.read(self.signal_r, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.accepting:
                    self._begin_warm_shutdown()
                else:
                    self._cold_shutdown("second stop signal")
            elif signum == signal.SIGQUIT:
                self._cold_shutdown("SIGQUIT")

    def _begin_warm_shutdown(self) -> None:
        grace = max(p.settings.shutdown_grace for p in self.pools)
        log.info("warm shutdown: finishing running tasks (grace %gs)", grace)
        self.notifier.send("STOPPING=1", "STATUS=warm shutdown")
        self.accepting = False
        self.draining_until = time.monotonic() + grace
        self.table.header.draining = 1  # children skip what they have not started yet
        for child in self.children.values():
            child.closing = True

    def _cold_shutdown(self, why: str) -> None:
        log.warning("cold shutdown (%s): killing children, returning their tasks", why)
        self.notifier.send("STOPPING=1", "STATUS=cold shutdown")
        self.accepting = False
        self.cold = True
        self.table.header.draining = 1
        for child in self.children.values():
            child.closing = True
            child.kill = child.kill or COLD_SHUTDOWN
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)

    def _progress_shutdown(self, now: float) -> None:
        if self.accepting:
            return
        if self.draining_until is not None and now >= self.draining_until and not self.cold:
            self._cold_shutdown("grace period over")
        for child in list(self.children.values()):
            if not child.outstanding and child.to_fd >= 0:
                self.pipes.close_to(child)  # EOF: the child exits on its own

    # --- children ------------------------------------------------------------------------

    def _spawn_missing(self, now: float) -> None:
        for pool in self.pools:
            for index in pool.empty_slots(now):
                pool.respawn_at.pop(index, None)
                self._spawn(pool, index)

    def _spawn(self, pool: Pool, index: int) -> None:
        slot, header = self.table.slots[index], self.table.header

        def run_child(read_fd: int, write_fd: int) -> None:
            setup = ChildSetup(self.stem, pool.settings, slot, header, read_fd, write_fd,
                               self.consumer.pid)  # fmt: skip
            child_main(setup)

        try:
            pid, to_fd, from_fd = self.pipes.fork(
                (self.signal_r, self.signal_w), HANDLED_SIGNALS, run_child
            )
        except OSError as exc:  # EAGAIN at a process limit (systemd TasksMax=): retry later
            log.error("cannot fork a child for pool %s: %s", pool.settings.name, exc)
            pool.respawn_at[index] = time.monotonic() + 5.0
            return
        self.table.reset(index, pid)
        child = Child(pool, index, pid, to_fd, from_fd, time.monotonic())
        pool.children[index] = child
        self.children[pid] = child
        self.pipes.watch(child)
        log.debug("child %d spawned in pool %s slot %d", pid, pool.settings.name, index)

    def _reap(self, *, block: bool) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._on_child_exit(child, os.waitstatus_to_exitcode(status))
            if block:
                return

    def _on_child_exit(self, child: Child, code: int) -> None:
        self._read_child(child, until_eof=True)  # outcomes it wrote before dying count
        self.pipes.close_from(child)
        self.pipes.close_to(child)
        pool = child.pool
        del pool.children[child.index]
        running = self._running_dispatch(child)
        self.table.slots[child.index].state = SlotState.EMPTY
        unexpected = child.kill is None and bool(child.outstanding or code != 0)
        for dispatch in list(child.outstanding.values()):
            self._recover_dispatch(child, dispatch, running is dispatch, code)
        child.outstanding.clear()
        if unexpected:
            log.warning("child %d exited with %s", child.pid, describe_exit(code))
        pool.mark_lifetime(child, unexpected)
        if self.accepting:
            pool.respawn_at[child.index] = time.monotonic() + respawn_delay(pool.early_deaths)

    def _running_dispatch(self, child: Child) -> Dispatch | None:
        if child.kill is not None and child.killed_seq in child.outstanding:
            return child.outstanding[child.killed_seq]
        slot = self.table.slots[child.index]
        if slot.state == SlotState.RUNNING and slot.seq in child.outstanding:
            return child.outstanding[slot.seq]
        return None

    def _recover_dispatch(self, child: Child, dispatch: Dispatch, running: bool, code: int) -> None:
        kill = child.kill
        if kill is not None and kill.counts_as_task_failure and dispatch.seq != child.killed_seq:
            # The task the kill was meant for finished just before it landed: this one
            # had just started and broke no limit.
            kill = BYSTANDER
        self._settle(outcomes.after_child_death(
            dispatch.delivery, dispatch.envelope, dispatch.task, kill,
            running=running, exit_text=f"child {describe_exit(code)}",
            worker=self.worker_name, default_ttl=self.settings.result_ttl,
        ))  # fmt: skip

    def _read_child(self, child: Child, *, until_eof: bool = False) -> None:
        for message in self.pipes.read(child, until_eof=until_eof):
            self._on_message(child, message)

    def _on_message(self, child: Child, message: ChildMessage) -> None:
        if isinstance(message, Progress):
            return  # progress is kept in the slot; the final percent comes with the outcome
        dispatch = child.outstanding.pop(message.seq, None)
        if dispatch is None:
            return
        child.finished += 1
        if message.status is OutcomeStatus.SKIPPED:
            settled = outcomes.released(dispatch.delivery)
        else:
            if message.runtime is not None:
                child.pool.record_runtime(max(0.0, message.runtime))
            settled = outcomes.from_outcome(
                dispatch.delivery, dispatch.envelope, dispatch.task, message,
                worker=self.worker_name, default_ttl=self.settings.result_ttl,
            )  # fmt: skip
        self._settle(settled)

    # --- limits --------------------------------------------------------------------------

    def _scan(self, now: float) -> None:
        if now < self._timers["scan"]:
            return
        busy = False
        for child in list(self.children.values()):
            slot = self.table.slots[child.index]
            if slot.state == SlotState.RUNNING and (slot.hard_deadline or _memory_limited(child)):
                busy = True  # a limit to watch closely
            if child.kill is None:
                seq = slot.seq  # read first: the verdict below is about this task
                reason = check_slot(slot, now, child.pool.settings.heartbeat_timeout)
                if reason is not None:
                    self._kill(child, reason, seq)
        if now >= self._timers["memory"]:
            self._timers["memory"] = now + MEMORY_SCAN_S
            self._scan_memory()
        self._timers["scan"] = now + (SCAN_S if busy else IDLE_SCAN_S)

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
                self._kill(child, reason, seq)

    def _kill(self, child: Child, reason: KillReason, seq: int) -> None:
        log.warning("killing child %d: %s", child.pid, reason.message)
        child.kill, child.killed_seq, child.closing = reason, seq, True
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)

    # --- claiming and settling -------------------------------------------------------------

    def _store_round(self, now: float, *, final: bool = False) -> list[tuple[Pool, Delivery]]:
        """Settle what finished and claim what free children need, as one unit of work
        (one transaction, one fsync on SQLite). Results are written before the
        settlements, so a crash re-runs a task but never acks one without its result.
        Claimed deliveries are dispatched only after the commit."""
        if not final and time.monotonic() < self.store_retry_at:
            return []
        wants_claim = self.accepting and any(self._wants_claim(p, now) for p in self.pools)
        if not self.pending and not wants_claim:
            return []
        batch: list[outcomes.Settled] = self.pending
        claimed: list[tuple[Pool, Delivery]] = []
        claim_error: BrokerError | None = None
        try:
            with self.stores.unit_of_work():
                if batch:
                    results = [s.result for s in batch if s.result is not None]
                    if results:
                        self.backend.store(results)
                    self.broker.settle([s.settlement for s in batch])
                if wants_claim:
                    claimed, claim_error = self._claim(now)
        except BrokerError as exc:
            self._store_failed(exc)
            return []
        self.pending = self.pending[len(batch) :]
        if claim_error is not None:
            self._store_failed(claim_error)  # what was claimed before it still runs
        elif self.store_failures:
            log.warning("store reachable again; settled %d deliveries", len(batch))
            self.store_failures = 0
        return claimed

    def _wants_claim(self, pool: Pool, now: float) -> bool:
        return bool(pool.free_capacity()) and (pool.maybe_ready or now >= pool.next_poll)

    def _claim(self, now: float) -> tuple[list[tuple[Pool, Delivery]], BrokerError | None]:
        """Claim for each pool with room. A failure stops the round but keeps what the
        pools before it claimed: dropping those would strand them until their lease ends."""
        claimed: list[tuple[Pool, Delivery]] = []
        for pool in self.pools:
            if not self._wants_claim(pool, now):
                continue
            free = pool.free_capacity()
            try:
                deliveries = self.broker.claim(
                    pool.queues, free, consumer=self.consumer, lease=CLAIM_LEASE_S
                )
            except BrokerError as exc:
                return claimed, exc
            claimed.extend((pool, delivery) for delivery in deliveries)
            pool.maybe_ready = len(deliveries) == free
            if not pool.maybe_ready:
                pool.next_poll = now + POLL_S
                with contextlib.suppress(BrokerError):  # only a hint for when to look again
                    due = self.broker.next_due(pool.queues)
                    if due is not None:
                        pool.next_poll = min(pool.next_poll, now + max(0.0, due - time.time()))
        return claimed, None

    def _dispatch(self, pool: Pool, delivery: Delivery, now: float) -> None:
        verdict = outcomes.triage(
            delivery, self.stem.registry, self.stem.codec, default_ttl=self.settings.result_ttl
        )
        if isinstance(verdict, outcomes.Settled):
            self._settle(verdict)
            return
        envelope, task = verdict
        child = pool.pick_child()
        if child is None:  # capacity vanished (a child died meanwhile): give it back
            self._settle(outcomes.released(delivery))
            return
        self.seq += 1
        first_renewal = min(CLAIM_LEASE_S, task.options.visibility_timeout) / 3
        child.outstanding[self.seq] = Dispatch(
            self.seq, delivery, envelope, task, now + first_renewal, now + CLAIM_LEASE_S
        )
        child.sent += 1
        if not child.outbox:
            self._touched.add(child)
        child.outbox += dispatch_frame(self.seq, delivery.payload)

    def _settle(self, settled: outcomes.Settled) -> None:
        self.pending.append(settled)
        self.counts[settled.event] += 1
        if (
            settled.event in (TaskEvent.RETRY, TaskEvent.DEAD)
            and settled.result
            and settled.result.error
        ):
            error = settled.result.error
            log.info(
                "task %s %s: %s: %s",
                settled.result.task_id,
                settled.event,
                error.type,
                error.message,
                extra={"task_id": settled.result.task_id},
            )

    def _store_failed(self, exc: Exception) -> None:
        if not self.store_failures:
            log.error("store failed (%s); running tasks go on, settling is retried", exc)
        self.store_failures += 1
        # The exponent is capped: an outage of hours must not overflow the float.
        self.store_retry_at = time.monotonic() + min(5.0, 0.05 * 2.0 ** min(self.store_failures, 7))

    def _renew(self, now: float) -> None:
        """Extend the leases of held deliveries: every third of the task's visibility
        timeout, and at once when the task asked for more (`ctx.extend_lease`)."""
        if now < self.store_retry_at:
            return  # the store is failing: the back-off decides when to try again
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
        for lease, dispatches in due.items():
            try:
                self.broker.extend([d.delivery for d in dispatches], lease)
            except BrokerError as exc:
                self._store_failed(exc)
                return
            for dispatch in dispatches:
                dispatch.renew_at = now + min(lease, dispatch.task.options.visibility_timeout) / 3
                dispatch.lease_end = now + lease

    def _housekeeping(self, now: float) -> None:
        timers = self._timers
        if now >= timers["recover"]:
            timers["recover"] = now + RECOVER_S
            try:
                if self.broker.recover(self.consumer):
                    for pool in self.pools:
                        pool.maybe_ready = True
            except BrokerError as exc:
                self._store_failed(exc)
        if now >= timers["purge"]:
            timers["purge"] = now + PURGE_S
            with contextlib.suppress(BrokerError):
                self.backend.purge_expired()
        if (
            now >= timers["idle"]
            and not self.pending
            and not any(child.outstanding for child in self.children.values())
        ):
            timers["idle"] = now + IDLE_UPKEEP_S
            self.broker.idle()
        if now >= timers["beat"]:
            timers["beat"] = now + WORKER_BEAT_S
            self._publish_heartbeat()
        interval = self.notifier.watchdog_interval
        if interval and now >= timers["dog"]:
            timers["dog"] = now + interval
            self.notifier.send("WATCHDOG=1")

    def _publish_heartbeat(self) -> None:
        """The worker record `stem worker status` and the TUI read (SPEC section 3)."""
        beat = WorkerHeartbeat(
            id=self.consumer.name, host=self.consumer.host, pid=self.consumer.pid,
            pools=tuple(p.settings.name for p in self.pools),
            queues=tuple(sorted({q for p in self.pools for q in p.queues})),
            concurrency=self.slot_count,
            in_flight=sum(len(c.outstanding) for c in self.children.values()),
            processed=sum(self.counts[e] for e in (TaskEvent.SUCCESS, TaskEvent.DEAD,
                                                   TaskEvent.REVOKED)),
            failed=self.counts[TaskEvent.DEAD], started_at=self.consumer.started,
            version=__version__, sent_at=time.time(),
        )  # fmt: skip
        try:
            self.backend.put_worker_heartbeat(beat, ttl=3 * WORKER_BEAT_S)
        except BrokerError as exc:
            self._store_failed(exc)

    def _queue_names(self) -> str:
        return ",".join(sorted({q for pool in self.pools for q in pool.queues}))


def _memory_limited(child: Child) -> bool:
    return any(d.task.options.max_memory for d in child.outstanding.values())


def _record_only(signum: int, frame: object) -> None:
    """Signal handler: nothing. `set_wakeup_fd` already queued the number for the loop."""
