"""The supervisor's conversation with its stores: settle what finished and claim what free
children need, as one unit of work per loop turn; renew leases; back off while the
store fails.

One unit of work per turn is the group commit the throughput rests on: on SQLite the
results, the settlements and the next claims are one `BEGIN IMMEDIATE` transaction (one
fsync for everything that finished since the last turn); on Redis one round trip.
Results are written before the settlements, so a crash re-runs a task but never acks
one without its result. A failing store never stops the loop: the round is retried
after a capped exponential back-off while children keep running and limits are enforced.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

from appliance.broker.protocol import ClaimParking, Consumer, Delivery
from appliance.errors import BrokerBusy, BrokerError
from appliance.states import TaskEvent
from appliance.stores import Stores
from appliance.worker.events import SupervisorEvents
from appliance.worker.outcomes import Settled, released
from appliance.worker.pool import Dispatch, Pool

log = logging.getLogger("stem.worker")

T = TypeVar("T")

CLAIM_LEASE_S = 30.0  # the longest lease taken at claim; renewed to each task's own
POLL_S = 1.0  # claim at least this often without a wake-up (lost wake-ups, outbox)
FINAL_SETTLE_S = 10.0  # at exit, keep retrying a failing store this long
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.05, 5.0
# Group commit, lengthened while it costs nobody anything: when every child still has
# work queued behind the task it runs, settles wait up to LINGER_S (or until
# LINGER_BATCH are pending) to share one commit, so fewer fsyncs are paid per task. The
# commit was 44% of the supervisor's time in a SQLite drain (py-spy), with 58 tasks per
# commit; an idle pool (a child without queued work) never waits, so latency is untouched.
LINGER_S = 0.002
LINGER_BATCH = 256


class StoreRound:
    """Pending settlements, the per-turn round, lease renewals and the store back-off."""

    def __init__(
        self, stores: Stores, consumer: Consumer, pools: Sequence[Pool], claim_lease: float
    ) -> None:
        self.stores = stores
        self.consumer = consumer
        self.pools = pools
        # A claim cannot know which task it takes before it decodes it, so it leases for
        # the shortest visibility timeout of the tasks this worker runs: a task with a
        # short one is taken over in time if this worker stalls; the first renewal
        # extends the others to their own.
        self.claim_lease = claim_lease
        self.paused: set[str] = set()  # queues not to claim from (the supervisor refreshes it)
        self.pending: list[Settled] = []
        self.pending_since = 0.0  # monotonic: when the oldest pending settle arrived
        self.counts: Counter[TaskEvent] = Counter()
        self.retry_at = 0.0  # monotonic: no store call before this while failing
        self.failures = 0
        self.failing_since: float | None = None  # wall clock of the first failure in a row
        self.events = SupervisorEvents()  # the supervisor sets its own
        self._hints_due: list[tuple[Pool, tuple[str, ...]]] = []  # for `look_ahead`
        # Parked claims (Redis): a pool whose claim came back short waits inside the
        # store for its next messages; any other claim for it cancels the park first.
        self.parking: ClaimParking | None = None

    # --- settling --------------------------------------------------------------------

    def settle(self, settled: Settled) -> None:
        """Queue a settlement (and its result) for the next round."""
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(settled)
        self.counts[settled.event] += 1
        self.events.settled(settled)
        result = settled.result
        if settled.event in (TaskEvent.RETRY, TaskEvent.DEAD) and result and result.error:
            log.info(
                "task %s %s: %s: %s", result.task_id, settled.event, result.error.type,
                result.error.message, extra={"task_id": result.task_id},
            )  # fmt: skip

    def run(
        self, now: float, *, accepting: bool, final: bool = False
    ) -> list[tuple[Pool, Delivery]]:
        """Settle what finished and claim for pools with room, as one unit of work.
        Claimed deliveries are returned only after the commit (dispatch them then)."""
        if not accepting and self.parking is not None:
            self._give_back_parked()
        if not final and time.monotonic() < self.retry_at:
            return []
        if not final and accepting and self.pending and self._may_linger(now):
            return []
        claiming = [p for p in self.pools if self.wants_claim(p, now)] if accepting else []
        if not self.pending and not claiming:
            return []
        # Parks are cancelled before the unit of work: what they brought is this
        # worker's whatever the unit does, so it is handed out even if the unit fails.
        parked = self._cancel_parks(claiming) if claiming and self.parking is not None else {}
        batch = self.pending[:]
        claimed: list[tuple[Pool, Delivery]] = [
            (pool, delivery) for pool, got in parked.items() for delivery in got
        ]
        claim_error: BrokerError | None = None
        try:
            # A round that only claims commits without the fsync: lost to a power cut, its
            # leases vanish and the messages run again, as after any crash; what must
            # survive one (results, acks, retries) always goes in a durable unit. On an
            # idle pool every delivery waited for this fsync (the claim's transaction:
            # 0.8 ms p50, 9 ms p99 on this disk).
            with self.stores.unit_of_work(durable=bool(batch)):
                if batch:
                    results = [s.result for s in batch if s.result is not None]
                    results += [more for s in batch for more in s.more]
                    if results:
                        self.stores.backend.store(results)
                    self.stores.broker.settle([s.settlement for s in batch])
                if claiming:
                    claim_error = self._claim(now, claiming, parked, claimed)
        except BrokerError as exc:
            self.failed(exc)
            return claimed[: sum(len(got) for got in parked.values())]
        if claim_error is not None:
            # What was claimed before the failure still runs. The settlements may not have
            # been sent (Redis sends them with the claim), so they stay pending and go
            # again: settling twice changes nothing, dropping them would re-run tasks.
            self.failed(claim_error)
            return claimed
        self.pending = self.pending[len(batch) :]
        if self.pending:
            self.pending_since = now
        if self.failures:
            log.info("store reachable again; settled %d deliveries", len(batch))
            self.failures = 0
            self.failing_since = None
        return claimed

    def _may_linger(self, now: float) -> bool:
        """Whether the pending settles may wait for more to share their commit: not too
        many, not for long, and only while every child that could be given work (its
        pool may have messages ready) has queued work to go on with."""
        if len(self.pending) >= LINGER_BATCH or now - self.pending_since >= LINGER_S:
            return False
        # With no pool ready (an idle pool) all() of nothing is true, so an idle settle
        # waits the linger out: results show 2-3 ms later. Settling those at once was
        # measured (2026-12-02, same-run pairs): enqueue-to-start p50 rose 0.5 ms on
        # SQLite and up to 0.3 ms on Redis, for a cause not found. Kept until it is.
        return all(
            len(child.outstanding) >= 2
            for pool in self.pools
            if pool.maybe_ready
            for child in pool.children.values()
        )

    def wants_claim(self, pool: Pool, now: float) -> bool:
        return bool(pool.free_capacity()) and (pool.maybe_ready or now >= pool.next_poll)

    def _cancel_parks(self, pools: Sequence[Pool]) -> dict[Pool, list[Delivery]]:
        """Cancel the parks of `pools` (those about to claim, or all at a stop): a park
        holds its pool's room, so what it got is taken first and the pool is never given
        more than it has room for. Rate-limited deliveries are given back here."""
        assert self.parking is not None
        got: dict[Pool, list[Delivery]] = {}
        for pool in pools:
            if self.parking.is_parked(pool.settings.name):
                parked = self.parking.cancel(pool.settings.name)
                self._give_back(parked.give_back)
                got[pool] = parked.deliveries
        return got

    def _claim(
        self,
        now: float,
        pools: Sequence[Pool],
        parked: dict[Pool, list[Delivery]],
        claimed: list[tuple[Pool, Delivery]],
    ) -> BrokerError | None:
        """Claim into `claimed` for each of `pools` (those with room, less what its park
        brought). A failure stops the round but keeps what the pools before it claimed:
        dropping those would strand them until their lease ends."""
        broker = self.stores.broker
        for pool in pools:
            room = pool.free_capacity() - len(parked.get(pool, ()))
            queues = pool.claimable_queues(self.paused)
            try:
                deliveries = (
                    broker.claim(queues, room, consumer=self.consumer, lease=self.claim_lease)
                    if room > 0 else []
                )  # fmt: skip
            except BrokerError as exc:
                return exc
            claimed.extend((pool, delivery) for delivery in deliveries)
            pool.maybe_ready = len(deliveries) >= room
            if not pool.maybe_ready:
                pool.next_poll = now + POLL_S
                if queues:
                    self._hints_due.append((pool, queues))
                self._park(pool, queues, room - len(deliveries))
        return None

    # --- parked claims (`ClaimParking`) ------------------------------------------------

    def collect_parked(self, pool: Pool, *, accepting: bool) -> list[Delivery]:
        """What the pool's park brought, after its fd turned readable: deliveries to
        dispatch now (then call `repark`). Not accepting: they are given back."""
        assert self.parking is not None
        parked = self.parking.collect(pool.settings.name)
        self._give_back(parked.give_back)
        if parked.claim_now:
            pool.maybe_ready = True
        if not accepting:
            self._give_back(parked.deliveries)
            return []
        return parked.deliveries

    def repark(self, pool: Pool, now: float) -> None:
        """Park the pool again after its park's deliveries were dispatched, unless it
        is to claim anyway (more may be waiting) or the store is failing."""
        if pool.maybe_ready or time.monotonic() < self.retry_at:
            return
        self._park(pool, pool.claimable_queues(self.paused), pool.free_capacity())

    def _park(self, pool: Pool, queues: tuple[str, ...], count: int) -> None:
        if self.parking is not None:
            self.parking.park(
                pool.settings.name, queues, count, consumer=self.consumer, lease=self.claim_lease
            )

    def parked_covers(self, pool: Pool) -> bool:
        """Whether the last wake-up's messages for this pool all come through its park."""
        return self.parking is not None and self.parking.covers(pool.settings.name)

    def _give_back_parked(self) -> None:
        for deliveries in self._cancel_parks(self.pools).values():
            self._give_back(deliveries)

    def _give_back(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self.settle(released(delivery))

    def look_ahead(self, now: float) -> None:
        """For pools whose last claim came back short: when their next delayed message is
        due, so they claim again then instead of at the next poll. Called after the
        claims were handed out: on Redis it is a round trip of its own (~50 us), which
        an idle pool's delivery must not wait for."""
        hints, self._hints_due = self._hints_due, []
        if now < self.retry_at:
            return
        broker = self.stores.broker
        for pool, queues in hints:
            with contextlib.suppress(BrokerError):  # only a hint for when to look again
                due = broker.next_due(queues)
                if due is not None:
                    pool.next_poll = min(pool.next_poll, now + max(0.0, due - time.time()))

    def settle_before_exit(self) -> None:
        """Settle what is left, retrying through a short store outage: a result or an
        ack dropped here would make a finished task run again."""
        deadline = time.monotonic() + FINAL_SETTLE_S
        self.run(time.monotonic(), accepting=False, final=True)
        while self.pending and time.monotonic() < deadline:
            time.sleep(max(0.05, min(0.5, self.retry_at - time.monotonic())))
            self.run(time.monotonic(), accepting=False, final=True)
        if self.pending:
            log.error(
                "exiting with %d deliveries unsettled: their leases expire and they run again",
                len(self.pending),
            )

    # --- leases ----------------------------------------------------------------------

    def renew(self, due: dict[float, list[Dispatch]], now: float) -> None:
        """Extend the leases of `due` (grouped by the lease to take), unless backing off."""
        if now < self.retry_at:
            return  # the store is failing: the back-off decides when to try again
        for lease, dispatches in due.items():
            try:
                lost = self.stores.broker.extend([d.delivery for d in dispatches], lease)
            except BrokerError as exc:
                self.failed(exc)
                return
            self.events.lease_renewals(len(dispatches) - len(lost))
            for dispatch in dispatches:
                dispatch.renew_at = now + min(lease, dispatch.task.options.visibility_timeout) / 3
                dispatch.lease_end = now + lease
            for dispatch in (d for d in dispatches if d.delivery in lost and not d.lease_lost):
                self._lease_lost(dispatch)

    @staticmethod
    def _lease_lost(dispatch: Dispatch) -> None:
        dispatch.lease_lost = True
        log.warning(
            "task %s: its lease ran out before this worker renewed it (stopped, or cut off "
            "from the store, for longer than its visibility timeout of %gs), so another "
            "worker may be running it too; when it finishes here its result is kept and "
            "its message removed", dispatch.envelope.id, dispatch.task.options.visibility_timeout,
            extra={"task_id": dispatch.envelope.id},
        )  # fmt: skip

    # --- failures --------------------------------------------------------------------

    def guarded(self, call: Callable[[], T]) -> T | None:
        """Run a store call of a chore; a failure joins the round's back-off (None)."""
        try:
            return call()
        except BrokerError as exc:
            self.failed(exc)
            return None

    def failed(self, exc: Exception) -> None:
        if not self.failures:
            self.failing_since = time.time()
            if isinstance(exc, BrokerBusy):  # normal contention: a producer's big batch
                log.info("store busy (%s); retrying shortly", exc)
            else:
                log.error("store failed (%s); running tasks go on, settling is retried", exc)
        self.failures += 1
        # The exponent is capped: an outage of hours must not overflow the float.
        delay = BACKOFF_BASE_S * 2.0 ** min(self.failures, 7)
        self.retry_at = time.monotonic() + min(BACKOFF_CAP_S, delay)

    def next_deadline(self, now: float) -> float:
        """When the round next has something to do on its own (pending settles)."""
        if self.pending:
            linger_end = self.pending_since + LINGER_S if self._may_linger(now) else now
            return max(linger_end, self.retry_at)
        return float("inf")
