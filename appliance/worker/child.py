"""The forked child: read a dispatch, run it, write the outcome, repeat.

A child holds no broker connection of its own for this loop (the supervisor claims and
settles); it only opens one lazily if a task enqueues from inside. It exits when its
pipe closes (supervisor gone or shutting down), when it is recycled, or when the
kernel kills it because its parent died (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from appliance.app import Stem
from appliance.config import PoolSettings
from appliance.errors import DecodeError, NotRegistered
from appliance.states import OutcomeStatus, SlotState
from appliance.worker.executor import Executor, error_fields
from appliance.worker.heartbeat import Header, Slot
from appliance.worker.hygiene import MARK
from appliance.worker.ipc import (
    ErrorFields,
    FrameReader,
    Outcome,
    Progress,
    encode_message,
    split_dispatch,
    write_all,
)

PR_SET_PDEATHSIG = 1
BEAT_INTERVAL = 0.5


@dataclass
class ChildSetup:
    """Everything a child needs, handed over by fork (no pickling)."""

    stem: Stem
    pool: PoolSettings
    slot: Slot
    header: Header
    read_fd: int  # dispatches from the supervisor
    write_fd: int  # outcomes to the supervisor
    supervisor_pid: int
    supervisor_id: str  # carried in the environment (`hygiene.MARK`), inherited by subprocesses


class _SlotRuntime:
    """`TaskContext`'s channel: the heartbeat slot plus progress frames on the pipe."""

    def __init__(self, slot: Slot, write_fd: int) -> None:
        self.slot = slot
        self.write_fd = write_fd
        self.seq = 0

    def beat(self) -> None:
        self.slot.last_beat = time.monotonic()

    def request_lease(self, seconds: float) -> None:
        self.slot.lease_request = time.monotonic() + seconds
        self.beat()

    def report_progress(self, percent: float, data: Any) -> None:
        self.slot.progress = percent
        self.beat()
        write_all(self.write_fd, encode_message(Progress(self.seq, percent, data)))


def child_main(setup: ChildSetup) -> None:
    """Entry point after fork; never returns."""
    code = 0
    try:
        _prepare_process(setup)
        setup.stem.telemetry.setup_child()  # the parent's exporters did not survive fork
        _serve(setup)
    except BaseException:  # last resort: the supervisor sees the exit and recovers the task
        code = 70
    finally:
        with contextlib.suppress(BaseException):  # spans buffered: os._exit runs no atexit
            setup.stem.telemetry.flush()
        os._exit(code)  # no atexit, no finalisers of objects inherited from the parent


def _prepare_process(setup: ChildSetup) -> None:
    # The supervisor owns signals: Ctrl-C in a terminal and `timeout`/`kill -- -PGID`
    # reach the whole process group, and a child must finish its task on a warm
    # shutdown rather than die of them. The supervisor stops children with SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for signum in (signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != setup.supervisor_pid:  # the parent died before prctl took effect
        os._exit(0)
    os.environ[MARK] = setup.supervisor_id
    # systemd's notify socket is the supervisor's alone (NotifyAccess=main).
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _beat_forever(slot: Slot, stop: threading.Event) -> None:
    # A thread, so that a task blocked in a long call still looks alive; a frozen or
    # stopped process (SIGSTOP, a deadlock holding the GIL) stops beating and is killed.
    while not stop.wait(BEAT_INTERVAL):
        slot.last_beat = time.monotonic()


def _serve(setup: ChildSetup) -> None:
    import uvloop

    slot = setup.slot
    slot.last_beat = time.monotonic()
    slot.state = SlotState.IDLE
    threading.Thread(target=_beat_forever, args=(slot, threading.Event()), daemon=True).start()
    executor = Executor(uvloop.new_event_loop)
    runtime = _SlotRuntime(slot, setup.write_fd)
    reader = FrameReader(tagged=False)  # dispatches carry a sequence number, not a tag
    while True:
        data = os.read(setup.read_fd, 1 << 16)
        if not data:
            return  # the supervisor closed our pipe: leave quietly
        for frame in reader.feed(data):
            seq, payload = split_dispatch(frame)
            outcome = _handle(setup, executor, runtime, seq, payload)
            write_all(setup.write_fd, _frame(outcome))
            if _should_recycle(setup, slot):
                slot.state = SlotState.EXITING
                return


def _handle(
    setup: ChildSetup, executor: Executor, runtime: _SlotRuntime, seq: int, payload: bytes
) -> Outcome:
    slot = setup.slot
    if setup.header.draining:  # warm shutdown: the supervisor gives it back unstarted
        return Outcome(seq, OutcomeStatus.SKIPPED)
    try:
        # The supervisor decoded this payload before it dispatched it; here it becomes
        # the envelope again and, with signing, is verified before anything runs.
        envelope = setup.stem.codec.decode(payload)
        task = setup.stem.get_task(envelope.name)
    except (DecodeError, NotRegistered) as exc:  # the supervisor checks first; belt and braces
        return Outcome(seq, OutcomeStatus.REJECTED, error=error_fields(exc))
    now = time.monotonic()
    options = task.options
    slot.seq = seq
    slot.task_id = envelope.id.encode()[:40]
    slot.started = now
    slot.soft_deadline = now + options.soft_time_limit if options.soft_time_limit else 0.0
    slot.hard_deadline = now + options.hard_time_limit if options.hard_time_limit else 0.0
    slot.lease_request = 0.0
    slot.progress = -1.0
    slot.last_beat = now
    slot.state = SlotState.RUNNING
    runtime.seq = seq
    try:
        return executor.run(seq, task, envelope, runtime)
    finally:
        slot.state = SlotState.IDLE
        slot.hard_deadline = 0.0
        slot.tasks_done += 1


def _frame(outcome: Outcome) -> bytes:
    """The outcome as a frame; if something in it will not encode, a failure that says so,
    never a dead child (which would hand the task back uncounted, again and again)."""
    try:
        return encode_message(outcome)
    except (TypeError, ValueError) as exc:
        message = f"the task's outcome could not be reported: {exc}"
        return encode_message(Outcome(
            outcome.seq, OutcomeStatus.FAILED, error=ErrorFields("TypeError", message),
            started=outcome.started, finished=outcome.finished,
        ))  # fmt: skip


def _should_recycle(setup: ChildSetup, slot: Slot) -> bool:
    pool = setup.pool
    if pool.max_tasks_per_child and slot.tasks_done >= pool.max_tasks_per_child:
        return True
    if pool.max_memory_per_child:
        return _own_rss() > pool.max_memory_per_child
    return False


def _own_rss() -> int:
    # /proc/self/statm: cheaper than psutil for a check after every task.
    with open("/proc/self/statm", "rb") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
