"""Pure parts of the worker: kill decisions, crash-loop back-off, outcome mapping, framing."""

from __future__ import annotations

import os
import selectors
import subprocess
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance import Stem, TaskContext
from appliance.backend.protocol import TaskResult, decode_result, encode_result
from appliance.broker.protocol import Delivery
from appliance.config import PoolSettings
from appliance.envelope import Envelope
from appliance.envelope_rules import MAX_HEADERS, headers_problem
from appliance.states import (
    DeadLetterReason,
    OutcomeStatus,
    SettleKind,
    SlotState,
    TaskEvent,
    TaskState,
)
from appliance.telemetry import PREVIOUS_ATTEMPT_HEADER
from appliance.worker import outcomes
from appliance.worker.heartbeat import Slot
from appliance.worker.hygiene import children_of_this_process, orphans, trim_heap
from appliance.worker.ipc import (
    ErrorFields,
    FrameReader,
    Outcome,
    Progress,
    ProtocolError,
    decode_message,
    dispatch_frame,
    encode_message,
    split_dispatch,
)
from appliance.worker.limits import check_memory, check_slot, respawn_delay
from appliance.worker.pipes import _decode_into
from appliance.worker.pool import Child, Pool
from appliance.worker.tree import ProcessTree


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


FAILED = Outcome(7, OutcomeStatus.FAILED, error=ErrorFields("E", "m"))


def byte_by_byte(reader: FrameReader, stream: bytes) -> list[bytes]:
    return [f for i in range(len(stream)) for f in reader.feed(stream[i : i + 1])]


def test_frames_split_across_reads() -> None:
    dispatches = dispatch_frame(7, b'{"id":"x"}') + dispatch_frame(8, b"{}")
    frames = byte_by_byte(FrameReader(tagged=False), dispatches)
    assert [split_dispatch(f) for f in frames] == [(7, b'{"id":"x"}'), (8, b"{}")]
    done = Outcome(7, OutcomeStatus.SUCCESS, value={"n": [1, 2.5]}, started=1.0, runtime=0.5)
    (frame,) = byte_by_byte(FrameReader(), encode_message(done))
    assert decode_message(frame) == done


@pytest.mark.parametrize(
    "garbage",
    [b"\x00garbage" * 8, b"\xff\xff\xff\xff" + b"x" * 10, encode_message(FAILED)[:4] + b"zzz"],
    ids=["untagged", "huge", "bad-tag"],
)
def test_garbage_on_a_child_pipe_is_refused_at_once(garbage: bytes) -> None:
    # Regression: a task writing into its own pipe made the supervisor wait for the "rest"
    # of a 6 MB frame, so every later outcome of that child was swallowed.
    with pytest.raises(ProtocolError):
        FrameReader().feed(garbage)


def test_frames_ahead_of_garbage_are_kept_and_the_garbage_refused_for_good() -> None:
    done = encode_message(Outcome(1, OutcomeStatus.SUCCESS, value=1))
    reader = FrameReader()
    with pytest.raises(ProtocolError) as refused:
        reader.feed(done + encode_message(Progress(2, 50.0)) + b"\x00garbage" * 8)
    assert [decode_message(frame) for frame in refused.value.before] == [
        Outcome(1, OutcomeStatus.SUCCESS, value=1), Progress(2, 50.0),
    ]  # fmt: skip
    with pytest.raises(ProtocolError) as again:
        reader.feed(done)  # nothing after garbage is trusted
    assert again.value.before == []


def test_every_child_message_survives_its_codec() -> None:
    for message in (
        FAILED,
        Progress(3, 40.0, {"step": 2}),
        Outcome(1, OutcomeStatus.SKIPPED),
        Outcome(2, OutcomeStatus.RETRY, countdown=5.0, error=ErrorFields("R", "")),
    ):
        (frame,) = FrameReader().feed(encode_message(message))
        assert decode_message(frame) == message


@pytest.mark.parametrize(
    "body",
    [
        {"seq": 1, "status": "success"},  # fields missing
        {**orjson.loads(encode_message(FAILED)[5:]), "status": "exploded"},
        {**orjson.loads(encode_message(FAILED)[5:]), "extra": 1},
        {k: v for k, v in orjson.loads(encode_message(FAILED)[5:]).items() if k != "seq"}
        | {"sequence": 1},
    ],
    ids=["missing-fields", "unknown-status", "extra-field", "renamed-field"],
)
def test_an_outcome_that_is_not_an_outcome_is_a_protocol_error(body: dict[str, Any]) -> None:
    # Decoded by position (the hot path): a frame with other fields must still be
    # refused, never read into the wrong ones.
    with pytest.raises(ProtocolError):
        _decode_into([], [b"o" + orjson.dumps(body)], pid=1)


def _delivery(deliveries: int = 1) -> Delivery:
    return Delivery("r", "default", b"", deliveries, 0.0)


def test_outcome_success_acks_and_stores_value(sqlite_url: str) -> None:
    stem = Stem(broker=sqlite_url)

    @stem.task("x", max_retries=1)
    def x(ctx: TaskContext) -> None: ...

    env = Envelope(id="1", name="x", max_retries=1)
    ok = Outcome(1, OutcomeStatus.SUCCESS, value=3)
    done = outcomes.from_outcome(_delivery(), env, stem.get_task("x"), ok, worker="w",
                                 default_ttl=60)  # fmt: skip
    assert done.event is TaskEvent.SUCCESS
    assert done.settlement.kind is SettleKind.ACK
    assert done.result is not None and done.result.state is TaskState.SUCCESS
    failed = outcomes.from_outcome(_delivery(), env, stem.get_task("x"), FAILED, worker="w",
                                   default_ttl=60)  # fmt: skip
    assert failed.event is TaskEvent.RETRY
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


def test_triage_sorts_out_what_must_not_run(sqlite_url: str) -> None:
    import time

    stem = Stem(broker=sqlite_url)
    encode = stem.codec.encode

    @stem.task("z", max_deliveries=2)
    def z(ctx: TaskContext) -> None: ...

    def verdict(payload: bytes, deliveries: int = 1) -> object:
        delivery = Delivery("r", "default", payload, deliveries, 0.0)
        return outcomes.triage(delivery, stem.registry, stem.codec, default_ttl=60)

    def reason(found: object) -> object:
        assert isinstance(found, outcomes.Settled) and found.settlement.dead is not None
        return found.settlement.dead.reason

    assert reason(verdict(b"{nope")) is DeadLetterReason.UNDECODABLE
    assert reason(verdict(encode(Envelope(id="1", name="other")))) is (
        DeadLetterReason.UNKNOWN_TASK
    )
    assert reason(verdict(encode(Envelope(id="1", name="z")), deliveries=3)) is (
        DeadLetterReason.POISON_PILL
    )
    late = verdict(encode(Envelope(id="1", name="z", expires=time.time() - 1)))
    assert isinstance(late, outcomes.Settled) and late.event is TaskEvent.REVOKED
    runnable = verdict(encode(Envelope(id="1", name="z")))
    assert isinstance(runnable, tuple) and runnable[1].name == "z"


def test_after_child_death_by_cause(sqlite_url: str) -> None:
    from appliance.worker.limits import COLD_SHUTDOWN, KillReason

    stem = Stem(broker=sqlite_url)

    @stem.task("w", max_retries=1)
    def w(ctx: TaskContext) -> None: ...

    env, task = Envelope(id="1", name="w", max_retries=1), stem.get_task("w")

    def after(kill: KillReason | None, running: bool = True) -> outcomes.Settled:
        return outcomes.after_child_death(_delivery(), env, task, kill, running=running,
                                          exit_text="child signal SIGSEGV", worker="w",
                                          default_ttl=60)  # fmt: skip

    prefetched = after(None, running=False).settlement
    assert prefetched.kind is SettleKind.RELEASE and not prefetched.count_delivery
    cold = after(COLD_SHUTDOWN).settlement
    assert cold.kind is SettleKind.RELEASE and not cold.count_delivery
    timed_out = after(KillReason("TimeLimitExceeded", "too slow", True))
    assert timed_out.settlement.kind is SettleKind.RETRY
    crashed = after(None)
    assert crashed.settlement.kind is SettleKind.RELEASE and crashed.settlement.count_delivery
    assert crashed.result is not None and crashed.result.error is not None
    assert crashed.result.error.message == "child signal SIGSEGV"


def test_a_retry_strategy_that_raises_dead_letters_the_task_not_the_worker(
    sqlite_url: str,
) -> None:
    class Broken:
        def delay(self, attempt: int) -> float:
            raise ZeroDivisionError("oops")

    stem = Stem(broker=sqlite_url)

    @stem.task("b", retry_strategy=Broken())
    def b(ctx: TaskContext) -> None: ...

    failed = outcomes.from_outcome(
        _delivery(), Envelope(id="1", name="b"), stem.get_task("b"),
        FAILED, worker="w", default_ttl=60,
    )  # fmt: skip
    assert failed.settlement.dead is not None
    assert failed.settlement.dead.reason is DeadLetterReason.PERMANENT
    assert "retry strategy failed" in failed.settlement.dead.message


# --- prefetch depth ---------------------------------------------------------------------------


def test_a_pool_earns_prefetch_from_its_first_measured_task() -> None:
    """The cautious start (1 s per task: no prefetch) gives way to the first runtime at
    once, so a burst of short tasks is prefetched from its first round on."""
    pool = Pool(PoolSettings(name="p", queues=("default",), concurrency=2), first_slot=0)
    assert pool.depth() == 1
    pool.record_runtime(0.002)
    assert 5 <= pool.depth() <= 6  # ~10 ms of 2 ms tasks behind the running one
    slow = Pool(PoolSettings(name="s", queues=("default",), concurrency=2), first_slot=0)
    slow.record_runtime(2.0)
    assert slow.depth() == 1  # a slow first task keeps the pool unprefetched


def test_a_pool_runtime_estimate_is_the_plain_mean_then_an_ewma() -> None:
    pool = Pool(PoolSettings(name="p", queues=("default",), concurrency=1), first_slot=0)
    for seconds in (0.001, 0.003):
        pool.record_runtime(seconds)
    assert pool.avg_task_s == pytest.approx(0.002)
    for _ in range(200):  # long after the first twenty: one sample moves it by 5 % only
        pool.record_runtime(0.002)
    pool.record_runtime(1.002)
    assert pool.avg_task_s == pytest.approx(0.002 + 0.05 * 1.0)


# --- trace context the supervisor adds ---------------------------------------------------


def test_a_retry_of_a_task_with_the_most_headers_stays_a_valid_message(sqlite_url: str) -> None:
    """With tracing on, a retry carries the failed attempt's span in a header of its own;
    a message that already has as many headers as allowed goes on without it, rather
    than becoming one the next worker refuses."""
    stem = Stem(broker=sqlite_url)

    @stem.task("h", max_retries=1)
    def h(ctx: TaskContext) -> None: ...

    traced = replace(FAILED, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    for count, expected in ((3, 4), (MAX_HEADERS, MAX_HEADERS)):
        headers = {f"h{i}": "v" for i in range(count)}
        env = Envelope(id="1", name="h", max_retries=1, headers=headers)
        settled = outcomes.from_outcome(
            _delivery(), env, stem.get_task("h"), traced, worker="w", default_ttl=60
        )
        following = settled.settlement.envelope
        assert following is not None and len(following.headers) == expected
        assert headers_problem(following.headers) is None
        assert (PREVIOUS_ATTEMPT_HEADER in following.headers) is (count < MAX_HEADERS)


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_trim_heap_gives_freed_malloc_memory_back_to_the_system() -> None:
    """What start-up frees inside malloc's heap stays in the RSS until trimmed; a kept
    block every 64 stops malloc from trimming it by itself on free."""
    blocks = [bytearray(4096) for _ in range(16384)]  # 64 MiB through malloc, not pymalloc
    kept = blocks[::64]
    del blocks
    before = _rss_bytes()
    trim_heap()
    assert before - _rss_bytes() > 32 * 2**20
    assert len(kept) == 256


def test_an_encoded_result_holds_only_its_own_bytes() -> None:
    """orjson 3.12+ returns a buffer of at least 4 KiB however short the JSON; the
    supervisor holds a settle batch of them at once (`encode_result` copies)."""
    result = TaskResult("t1", TaskState.SUCCESS, name="bench.noop", value=None, attempt=1)
    tracemalloc.start()
    try:
        encoded = [encode_result(result) for _ in range(100)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert decode_result(encoded[0]) == result
    assert held < 100 * (len(encoded[0]) + 200)  # the bytes plus the list, not 100 x 4 KiB


def test_orphans_are_the_children_this_process_did_not_fork_itself(tmp_path: Path) -> None:
    """From /proc/self/task/*/children, and from psutil where the kernel has no such
    file (a /proc without it: `tmp_path`)."""
    with subprocess.Popen(["sleep", "30"]) as known, subprocess.Popen(["sleep", "30"]) as other:
        try:
            for proc in ("/proc", str(tmp_path)):
                assert {known.pid, other.pid} <= set(children_of_this_process(proc))
                found = orphans([known.pid], proc=proc)
                assert other.pid in found and known.pid not in found
        finally:
            known.kill()
            other.kill()


def test_garbage_read_after_the_child_was_reaped_kills_no_other_process(sqlite_url: str) -> None:
    # The last read of a reaped child's pipe finds garbage: its pid may belong to another
    # process by now, so the child is marked killed (its task charged) and nothing is
    # signalled. A sleeping process stands in for the one that got the pid.
    stem = Stem(broker=sqlite_url)
    pool = Pool(PoolSettings(name="p", queues=("default",), concurrency=1), first_slot=0)
    selector = selectors.DefaultSelector()
    tree = ProcessTree(stem, [pool], selector, blocked_signals=(), settle=lambda _: None,
                       worker_name="w", supervisor_id="s", supervisor_pid=os.getpid())  # fmt: skip
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"\x00garbage" * 8)
    os.close(write_fd)
    pid_holder = subprocess.Popen(["sleep", "30"])
    try:
        child = Child(pool, 0, pid_holder.pid, -1, read_fd, time.monotonic())
        tree.pipes.watch(child, lambda _mask: None)
        tree._read(child, until_eof=True)
        assert child.kill is not None and child.kill.error_type == "WorkerLostError"
        with pytest.raises(subprocess.TimeoutExpired):  # a SIGKILL would have ended it
            pid_holder.wait(timeout=0.3)
        tree.pipes.close_from(child)
    finally:
        pid_holder.kill()
        pid_holder.wait()
        tree.close()
        selector.close()
