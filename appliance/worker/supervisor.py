"""The supervisor: one single-threaded select loop that owns the process tree.

Each turn: run the callbacks of the file descriptors that are ready (the signal pipe,
the broker's wake-up fd, the children's pipes); reap dead children and recover their
work; kill children past their limits; settle what finished and claim what free
children need in one unit of work (`StoreRound`); hand out the claims; renew leases; run
the chores that are due (`Duties`). Signal handlers do nothing but wake the loop
(`signal.set_wakeup_fd` carries the signal numbers), so every decision is made here.

A new duty is one line: a selector callback (`self.selector.register(fd, EVENT_READ,
callback)`) or a chore (`self.duties.every(seconds, function)`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable, Sequence

from appliance import __version__, telemetry
from appliance.app import Stem
from appliance.backend.protocol import WorkerHeartbeat
from appliance.beat.scheduler import Beat, start_beat
from appliance.broker.protocol import Consumer, Wake, consumer_gone
from appliance.config import PoolSettings, concurrency_warning
from appliance.control.server import ControlServer
from appliance.errors import (
    BrokerBusy,
    BrokerError,
    BrokerFull,
    BrokerUnavailable,
    ConfigError,
    StemError,
    StoreReplaced,
)
from appliance.logs import set_worker
from appliance.states import ExitCode, TaskEvent
from appliance.worker.commands import WorkerCommands
from appliance.worker.duties import Duties
from appliance.worker.events import SupervisorEvents
from appliance.worker.hygiene import become_subreaper, freeze_heap, start_undertaker
from appliance.worker.pool import Pool
from appliance.worker.store_round import POLL_S, StoreRound
from appliance.worker.systemd import Notifier
from appliance.worker.tree import ProcessTree, claim_lease_for

log = logging.getLogger("stem.worker")

# Wait at most this long for other SQLite writers (a producer's 100k-row batch holds the
# lock for seconds): past it the round fails, backs off and is retried, while the loop
# keeps enforcing time limits and heartbeats.
STORE_BUSY_WAIT_S = 0.25
RECOVER_S = 1.0
CONTROL_POLL_S = 1.0  # read control requests at least this often (a poke may be lost)
FLAGS_S = 2.0  # reload paused queues and revokes at least this often
PURGE_S = 60.0
WORKER_BEAT_S = 2.0  # the supervisor's record in the backend; it expires after 3 beats
IDLE_UPKEEP_S = 10.0  # checkpoint the SQLite WAL at most this often, and only when idle
ORPHAN_SWEEP_S = 5.0  # look for escaped task processes (also after every child exit)
IDENTITY_S = 2.0  # check that the store still holds the data we opened
STATUS_S = 2.0  # systemd STATUS= (when it changed) and EXTEND_TIMEOUT_USEC while draining
FINAL_GRACE_S = 15.0  # beyond the drain: killing children and settling what is left
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
FINISHED = (TaskEvent.SUCCESS, TaskEvent.DEAD, TaskEvent.REVOKED)

Callback = Callable[[int], None]  # called with the ready event mask


class Supervisor:
    """Runs pools of children for one `Stem` until told to stop. `run()` returns the
    process exit code."""

    def __init__(
        self,
        stem: Stem,
        pools: Sequence[PoolSettings],
        *,
        name: str | None = None,
        beat: bool = False,
    ) -> None:
        self.stem = stem
        self.name = name  # the worker id (`--name`); HOST:PID when None
        self.beat_wanted = beat or stem.settings.beat_enabled
        self.beat: Beat | None = None
        self.settings = stem.settings
        self.pools: list[Pool] = []
        first = 0
        for settings in pools:
            self.pools.append(Pool(settings, first))
            first += settings.concurrency
        self.queues = sorted({q for pool in self.pools for q in pool.queues})
        self.accepting = True
        self.draining_until: float | None = None
        self.cold = False
        self.notifier = Notifier()
        self.duties = Duties()
        self._next_scan = 0.0  # monotonic: the next heartbeat-table scan
        self.exit_code = ExitCode.OK
        # Stored in the store by `stem worker pause` / `revoke`, refreshed from there
        # every few seconds and at once on a control request.
        self.paused: set[str] = set()
        self.revoked: set[str] = set()
        self._withheld = False  # the watchdog ping is being withheld (no live child)

    # --- life cycle --------------------------------------------------------------------

    def run(self) -> int:
        """Open stores, fork the pools, serve until shutdown; the exit code."""
        faulthandler.enable()  # a fatal signal (SIGBUS, SIGSEGV) still leaves a log line
        self.consumer = Consumer.this_process()
        self.worker_name = self.name or f"{self.consumer.host}:{self.consumer.pid}"
        set_worker(self.worker_name)
        self.telemetry = telemetry.NOOP
        self.events = SupervisorEvents(self.worker_name)
        pool_names = tuple(p.settings.name for p in self.pools)
        size = sum(p.settings.concurrency for p in self.pools)
        self.events.worker_init(pool_names, tuple(self.queues), size)
        # First, before any store or child exists: the undertaker kills what tasks
        # leave behind if this process is SIGKILLed; as subreaper it adopts escapees.
        self.undertaker_fd = start_undertaker(self.consumer.name)
        if not become_subreaper():
            log.warning("cannot become a child subreaper: escaped task processes may survive")
        self._install_signals()
        try:
            if not self._connect():
                return int(ExitCode.OK)  # told to stop while waiting for the broker
        except StemError as exc:
            log.error("cannot start: %s", exc)
            return int(ExitCode.CONFIG)
        self.tree = ProcessTree(
            self.stem, self.pools, self.selector, blocked_signals=HANDLED_SIGNALS,
            settle=self.round.settle, worker_name=self.worker_name,
            supervisor_id=self.consumer.name, supervisor_pid=self.consumer.pid,
        )  # fmt: skip
        self.tree.revoked = self.revoked
        self.tree.before_fork = self._before_fork
        self.round.paused = self.paused
        try:
            self.telemetry = telemetry.load(self.settings)
        except StemError as exc:
            log.error("cannot start: %s", exc)
            self.tree.close()
            self.stores.close()
            return int(ExitCode.CONFIG)
        self.events = SupervisorEvents(self.worker_name, self.telemetry)
        self.tree.events = self.round.events = self.events
        if self.telemetry.enabled:
            self.telemetry.start_metrics(
                worker=self.worker_name, depth=self.stores.broker.queue_stats,
                pools=self.tree.pool_loads,
            )  # fmt: skip
        self.refresh_flags(time.monotonic())
        self.control = ControlServer(
            self.stores.control, self.worker_name, WorkerCommands(self).handlers()
        )
        if warning := concurrency_warning(self.settings.pools, os.cpu_count() or 1):
            log.warning("%s", warning)
        if self.beat_wanted:
            try:
                self.beat = start_beat(self.stem, self.stores)
            except StemError as exc:
                log.error("cannot start Beat: %s", exc)
                self.tree.close()
                self.stores.close()
                return int(ExitCode.CONFIG)
        self._plan_duties()
        freeze_heap()  # start-up is over: what exists now lives as long as the loop
        try:
            self.tree.spawn_missing(time.monotonic())
            self.notifier.send("READY=1", f"STATUS=serving {','.join(self.queues)}")
            self.events.worker_ready(pool_names, tuple(self.queues), size)
            log.info(
                "supervisor %d ready: %d children, queues %s, broker %s",
                os.getpid(), self.tree.table.header.slots, ",".join(self.queues),
                self.stores.broker.url,
            )  # fmt: skip
            signing = self.stem.settings.signing
            unverified = "off (messages are not verified)"
            log.info("signing: %s", signing.describe() if signing else unverified)
            while self.tree.children or self.accepting:
                self._turn()
        finally:
            self._close()
        counts = ", ".join(f"{count} {event}" for event, count in sorted(self.round.counts.items()))
        log.info("supervisor %d stopped: %s", os.getpid(), counts or "no tasks")
        return int(self.exit_code)

    def _before_fork(self) -> None:
        """No SQLite connection of this process may be open when it forks a child
        (`Database.close_for_fork`): its stores' and the app's own, if it opened any."""
        self.stores.before_fork()
        self.stem.before_fork()

    def _install_signals(self) -> None:
        # poll(2), not epoll: epoll watches the open file behind a descriptor, so after the
        # Redis wake-up fd is re-pointed at a new socket with dup2 (a reconnect) it would
        # go on watching the dead one, and every wake-up would wait for the 1 s poll.
        self.selector: selectors.BaseSelector = selectors.PollSelector()
        self.signal_r, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.signal_w)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, _record_only)
        self._watch(self.signal_r, lambda mask: self._on_signals())

    def _watch(self, fd: int, callback: Callback) -> None:
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def _connect(self) -> bool:
        """Open the stores, waiting (with back-off) while the broker is unreachable, so a
        worker started before its Redis comes up instead of crash-looping under systemd.
        False if a stop signal arrived meanwhile."""
        self.stores = self.stem.open_stores(busy_wait=STORE_BUSY_WAIT_S)
        self.round = StoreRound(self.stores, self.consumer, self.pools, claim_lease_for(self.stem))
        broker = self.stores.broker
        pause = 0.5
        recovered = 0
        while True:
            try:
                wake_fd = broker.wake_fd(self.queues)
                broker.watch_identity()  # learn which data set this is
                self._check_name_is_free()
                recovered = broker.recover(self.consumer)
                break
            except BrokerFull as exc:
                # Start-up never depends on a write succeeding: recovery is retried by
                # its chore, and draining frees the space.
                log.warning("store full at start (%s); serving what can be drained", exc)
                break
            except (BrokerUnavailable, BrokerBusy) as exc:
                log.warning("broker unavailable (%s); retrying in %.1fs", exc, pause)
                self.notifier.send(f"STATUS=waiting for broker: {exc}")
                if self._stop_requested_within(pause):
                    return False
                pause = min(pause * 2, 10.0)
        if recovered:
            log.warning("returned %d abandoned deliveries to their queues", recovered)
        for warning in broker.durability_warnings():
            log.warning("broker durability: %s", warning)
        if wake_fd is not None:
            self._watch(wake_fd, lambda mask: self._on_wake())
        parking = broker.parking()
        if parking is not None:
            self.round.parking = parking
            for pool in self.pools:
                self._watch(parking.fd(pool.settings.name), self._on_parked_of(pool))
        return True

    def _on_parked_of(self, pool: Pool) -> Callback:
        return lambda mask: self._on_parked(pool)

    def _check_name_is_free(self) -> None:
        """Two live workers must not share a name (control requests target it)."""
        for beat in self.stores.backend.list_workers():
            if beat.id != self.worker_name or beat.consumer in ("", self.consumer.name):
                continue
            if not consumer_gone(beat.consumer, self.consumer):
                raise ConfigError(
                    "--name", self.worker_name, f"a worker of that name is running already "
                    f"(pid {beat.pid} on {beat.host}); give each worker a name of its own",
                )  # fmt: skip

    def _plan_duties(self) -> None:
        self.duties.every(CONTROL_POLL_S, self._poll_control)
        self.duties.every(FLAGS_S, self.refresh_flags)
        self.duties.every(RECOVER_S, self._recover)
        self.duties.every(PURGE_S, self._purge_expired)
        self.duties.every(IDLE_UPKEEP_S, self._idle_upkeep)
        self.duties.every(WORKER_BEAT_S, self._publish_heartbeat)
        self.duties.every(ORPHAN_SWEEP_S, self.tree.kill_orphans)
        self.duties.every(IDENTITY_S, self._watch_identity)
        if self.notifier.watchdog_interval:
            self.duties.every(self.notifier.watchdog_interval, self._ping_watchdog)
        self.duties.every(STATUS_S, self._report_status)
        if self.beat is not None:
            self.duties.every(1.0, self.beat.tick)

    def _stop_requested_within(self, seconds: float) -> bool:
        if not self.selector.select(seconds):
            return False
        with contextlib.suppress(BlockingIOError):
            received = os.read(self.signal_r, 64)
            return any(s in STOP_SIGNALS for s in received)
        return False

    def _close(self) -> None:
        """Kill what is left, settle what is known, release shared memory and stores."""
        self.accepting = False
        if self.beat is not None:
            self.beat.stop()
        self.tree.close()  # their tasks go back uncounted
        self.round.settle_before_exit()
        self.round.guarded(lambda: self.stores.backend.remove_worker(self.worker_name))
        counts = self.round.counts
        self.events.worker_shutdown(
            "cold" if self.cold else "warm", sum(counts[e] for e in FINISHED),
            counts[TaskEvent.DEAD],
        )  # fmt: skip
        self.telemetry.shutdown()
        signal.set_wakeup_fd(-1)
        self.stores.close()
        os.close(self.undertaker_fd)  # the undertaker sweeps once more, then exits

    # --- the loop ----------------------------------------------------------------------

    def _turn(self) -> None:
        for key, mask in self.selector.select(self._timeout()):
            key.data(mask)
        now = time.monotonic()
        tree = self.tree
        tree.reap(block=False)
        if now >= self._next_scan:
            self._next_scan = now + tree.scan(now)
        if self.accepting:
            tree.spawn_missing(now)
        for pool, delivery in self.round.run(now, accepting=self.accepting):
            tree.dispatch(pool, delivery, now)
        tree.flush()
        self.round.look_ahead(now)
        self.round.renew(tree.renewals_due(now), now)
        self.duties.run_due(now)
        self.telemetry.tick(now)
        self._progress_shutdown(now)

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [
            self._next_scan, now + POLL_S, self.duties.next_at(), self.round.next_deadline(now),
            max(self.tree.next_renewal(), self.round.retry_at),
        ]  # fmt: skip
        if self.accepting:
            for pool in self.pools:
                if pool.free_capacity():
                    deadlines.append(now if pool.maybe_ready else pool.next_poll)
                if pool.empty_slots(now):
                    deadlines.append(now)  # more children to fork (in steps)
                deadlines.extend(pool.respawn_at.values())
        if self.draining_until is not None:
            deadlines.append(self.draining_until)
        return max(0.0, min(deadlines) - now)

    def _on_wake(self) -> None:
        woke = self.stores.broker.clear_wake()
        if Wake.CONTROL in woke:
            self._poll_control(time.monotonic())
        if Wake.MESSAGES in woke:
            for pool in self.pools:
                if not self.round.parked_covers(pool):  # else the park brings them
                    pool.maybe_ready = True

    def _on_parked(self, pool: Pool) -> None:
        """A parked claim came back: run what it brought at once (before this turn's
        store round, which may claim for other pools), then park again."""
        now = time.monotonic()
        deliveries = self.round.collect_parked(pool, accepting=self.accepting)
        for delivery in deliveries:
            self.tree.dispatch(pool, delivery, now)
        if deliveries:
            self.tree.flush()
        if self.accepting:
            self.round.repark(pool, now)

    # --- signals and shutdown ------------------------------------------------------------

    def _on_signals(self) -> None:
        try:
            received = os.read(self.signal_r, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self.accepting:
                    self.begin_warm_shutdown()
                else:
                    self.cold_shutdown("second stop signal")
            elif signum == signal.SIGQUIT:
                self.cold_shutdown("SIGQUIT")

    def begin_warm_shutdown(self) -> None:
        grace = max(p.settings.shutdown_grace for p in self.pools)
        log.info("warm shutdown: finishing running tasks (grace %gs)", grace)
        self.notifier.send("STOPPING=1", "STATUS=warm shutdown")
        self.accepting = False
        self.draining_until = time.monotonic() + grace
        self.tree.drain()

    def cold_shutdown(self, why: str) -> None:
        log.warning("cold shutdown (%s): killing children, returning their tasks", why)
        self.notifier.send("STOPPING=1", "STATUS=cold shutdown")
        self.accepting = False
        self.cold = True
        self.tree.kill_all()

    def _progress_shutdown(self, now: float) -> None:
        if self.accepting:
            return
        if self.draining_until is not None and now >= self.draining_until and not self.cold:
            self.cold_shutdown("grace period over")
        self.tree.release_idle()

    # --- chores --------------------------------------------------------------------------

    def _poll_control(self, now: float) -> None:
        self.round.guarded(self.control.poll)

    def refresh_flags(self, now: float) -> None:
        """Reload paused queues and live revokes from the store."""
        paused = self.round.guarded(self.stores.broker.paused)
        revoked = self.round.guarded(self.stores.backend.list_revoked)
        if paused is not None and set(paused) != self.paused:
            changed = set(paused) ^ self.paused
            self.paused.clear()
            self.paused.update(paused)
            log.info("paused queues now: %s", ", ".join(sorted(self.paused)) or "none")
            # Claim again now: from resumed queues, and over the new set of queues
            # (a parked claim still reads a queue paused since; the claim cancels it).
            for pool in self.pools:
                if changed & set(pool.queues):
                    pool.maybe_ready = True
        if revoked is not None:
            self.revoked.clear()
            self.revoked.update(revoked)

    def _recover(self, now: float) -> None:
        if self.round.guarded(lambda: self.stores.broker.recover(self.consumer)):
            for pool in self.pools:
                pool.maybe_ready = True

    def _purge_expired(self, now: float) -> None:
        self.round.guarded(self.stores.purge_expired)

    def _idle_upkeep(self, now: float) -> float | None:
        if self.round.pending or self.tree.busy():
            return 0.5  # only when idle: look again soon
        self.stores.broker.idle()
        return None

    def _watch_identity(self, now: float) -> None:
        try:
            lost = self.stores.broker.watch_identity()
        except StoreReplaced as exc:
            log.error("stopping: %s", exc)
            self.exit_code = ExitCode.UNAVAILABLE  # systemd restarts it on the new file
            self.cold_shutdown("the database was replaced")
            return
        except BrokerError as exc:
            self.round.failed(exc)
            return
        if lost:
            log.error(
                "%s; %d deliveries this worker held were lost with it (their tasks run to "
                "the end, but nothing will retry them if they fail)", lost, self.tree.in_flight(),
            )  # fmt: skip

    def _ping_watchdog(self, now: float) -> float | None:
        """WATCHDOG=1 from the loop itself (so a wedged loop is restarted), and only while
        a child is alive and beating, or a shutdown is under way: a pool whose every
        child dies at start (a crash loop, backing off) gets no ping, so systemd restarts
        the service. A store outage is no reason: a restart would not cure it."""
        if self.tree.live_children(now) or not self.accepting:
            self._withheld = False
            self.notifier.send("WATCHDOG=1")
            return None
        if not self._withheld:
            self._withheld = True
            log.error("withholding the systemd watchdog: no child is alive (crash loop?)")
        return min(1.0, self.notifier.watchdog_interval or 1.0)  # ping as soon as one lives

    def _report_status(self, now: float) -> float | None:
        """STATUS= for `systemctl status`: the pool, or what is wrong."""
        self.notifier.status(self.status_line(now))
        if self.draining_until is not None and not self.cold:
            # A long drain: ask systemd for time beyond TimeoutStopSec as it goes.
            remaining = max(0.0, self.draining_until - now) + FINAL_GRACE_S
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(remaining * 1e6)}")
        return None

    def status_line(self, now: float) -> str:
        tree, counts = self.tree, self.round.counts
        pool = (
            f"{tree.live_children(now)}/{tree.table.header.slots} children, "
            f"{tree.in_flight()} in flight, {sum(counts[e] for e in FINISHED)} processed"
        )
        since = self.round.failing_since
        if since is not None:
            stamp = time.strftime("%H:%M:%S", time.localtime(since))
            return f"store unreachable since {stamp}; {pool}"
        return f"{self.status()}; {pool}"

    def status(self) -> str:
        """One short phrase: serving, draining, or what is wrong."""
        if not self.accepting:
            return "cold shutdown" if self.cold else "draining (warm shutdown)"
        if self.round.failures:
            return f"store failing: {self.round.failures} rounds in a row"
        return "serving"

    def _publish_heartbeat(self, now: float) -> None:
        """The worker record `stem worker status` and the TUI read (SPEC section 3)."""
        counts = self.round.counts
        beat = WorkerHeartbeat(
            id=self.worker_name, host=self.consumer.host, pid=self.consumer.pid,
            pools=tuple(p.settings.name for p in self.pools), queues=tuple(self.queues),
            concurrency=self.tree.table.header.slots, in_flight=self.tree.in_flight(),
            processed=sum(counts[e] for e in FINISHED), failed=counts[TaskEvent.DEAD],
            started_at=self.consumer.started, version=__version__, sent_at=time.time(),
            consumer=self.consumer.name, status=self.status(),
            paused=tuple(sorted(self.paused & set(self.queues))),
            children=self.tree.children_info(), interval_s=WORKER_BEAT_S,
        )  # fmt: skip
        self.round.guarded(
            lambda: self.stores.backend.put_worker_heartbeat(beat, 3 * WORKER_BEAT_S)
        )
        self.events.worker_heartbeat(beat.in_flight, beat.processed, beat.failed,
                                     len(self.tree.children))  # fmt: skip


def _record_only(signum: int, frame: object) -> None:
    """Signal handler: nothing. `set_wakeup_fd` already queued the number for the loop."""
