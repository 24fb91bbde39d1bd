"""Pure parts of the worker: kill decisions, crash-loop back-off, outcome mapping, framing."""

from __future__ import annotations

from appliance import Stem, TaskContext
from appliance.broker.protocol import Delivery
from appliance.envelope import Envelope
from appliance.states import DeadLetterReason, SettleKind, SlotState, TaskState
from appliance.worker import outcomes
from appliance.worker.heartbeat import Slot
from appliance.worker.ipc import FrameReader, dispatch_frame, message_frame, split_dispatch
from appliance.worker.limits import check_memory, check_slot, respawn_delay


def running_slot(started: float, hard: float, beat: float) -> Slot:
    slot = Slot()
    slot.state, slot.started, slot.hard_deadline, slot.last_beat = (
        SlotState.RUNNING,
        started,
        hard,
        beat,
    )
    return slot


def test_hard_deadline_kills_as_time_limit() -> None:
    reason = check_slot(running_slot(100.0, 101.0, 101.0), now=101.0, heartbeat_timeout=10)
    assert reason is not None and reason.error_type == "TimeLimitExceeded"
    assert reason.counts_as_task_failure


def test_before_deadline_and_beating_is_left_alone() -> None:
    assert check_slot(running_slot(100.0, 101.0, 100.9), now=100.95, heartbeat_timeout=10) is None


def test_silent_child_is_killed_as_lost() -> None:
    reason = check_slot(running_slot(100.0, 0.0, 100.0), now=111.0, heartbeat_timeout=10)
    assert reason is not None and reason.error_type == "WorkerLostError"
    assert not reason.counts_as_task_failure


def test_memory_limit() -> None:
    assert check_memory(300 * 2**20, 200 * 2**20) is not None
    assert check_memory(100 * 2**20, 200 * 2**20) is None
    assert check_memory(10**12, None) is None


def test_crash_loop_backs_off_and_caps() -> None:
    delays = [respawn_delay(n) for n in range(12)]
    assert delays[:2] == [0.0, 0.0] and delays == sorted(delays) and delays[-1] == 30.0


def test_frames_split_across_reads() -> None:
    stream = dispatch_frame(7, b'{"id":"x"}') + message_frame({"kind": "done", "seq": 7})
    reader = FrameReader()
    frames = [f for i in range(len(stream)) for f in reader.feed(stream[i : i + 1])]
    assert split_dispatch(frames[0]) == (7, b'{"id":"x"}')
    assert frames[1] == b'{"kind":"done","seq":7}'


def _delivery(deliveries: int = 1) -> Delivery:
    return Delivery("r", "default", b"", deliveries, 0.0)


def test_outcome_success_acks_and_stores_value(sqlite_url: str) -> None:
    stem = Stem(broker=sqlite_url)

    @stem.task("x", max_retries=1)
    def x(ctx: TaskContext) -> None: ...

    env = Envelope(id="1", name="x", max_retries=1)
    done = outcomes.from_outcome(_delivery(), env, stem.get_task("x"), {"ok": True, "value": 3},
                                 worker="w", default_ttl=60)  # fmt: skip
    assert done.settlement.kind is SettleKind.ACK
    assert done.result is not None and done.result.state is TaskState.SUCCESS
    failed = outcomes.from_outcome(_delivery(), env, stem.get_task("x"),
                                   {"ok": False, "error": {"type": "E", "message": "m"}},
                                   worker="w", default_ttl=60)  # fmt: skip
    assert failed.settlement.kind is SettleKind.RETRY
    assert failed.settlement.envelope is not None and failed.settlement.envelope.attempt == 1


def test_worker_lost_releases_then_poison_pills(sqlite_url: str) -> None:
    stem = Stem(broker=sqlite_url)

    @stem.task("y", max_deliveries=2)
    def y(ctx: TaskContext) -> None: ...

    env = Envelope(id="1", name="y")
    first = outcomes.worker_lost(_delivery(1), env, stem.get_task("y"), "killed",
                                 worker="w", default_ttl=60)  # fmt: skip
    assert first.settlement.kind is SettleKind.RELEASE and first.settlement.count_delivery
    last = outcomes.worker_lost(_delivery(2), env, stem.get_task("y"), "killed",
                                worker="w", default_ttl=60)  # fmt: skip
    assert last.settlement.kind is SettleKind.DEAD
    assert last.settlement.dead is not None
    assert last.settlement.dead.reason is DeadLetterReason.POISON_PILL
