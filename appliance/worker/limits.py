"""Pure decisions on a child's slot: should the supervisor kill it, and why."""

from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass

from appliance.states import SlotState
from appliance.worker.heartbeat import Slot


@dataclass(frozen=True, slots=True)
class KillReason:
    error_type: str  # the error the task is failed with
    message: str
    counts_as_task_failure: bool  # False: the child, not the task, is at fault


# Killed by a cold shutdown: the task goes back uncounted (it did nothing wrong).
COLD_SHUTDOWN = KillReason("WorkerLostError", "cold shutdown", counts_as_task_failure=False)
# Killed for a limit another task broke (it finished as the kill landed): uncounted too.
BYSTANDER = KillReason("WorkerLostError", "killed for another task", counts_as_task_failure=False)
# Killed because the task it held was revoked: that task ends REVOKED, never retried; the
# others it held go back uncounted.
REVOKED = KillReason("TaskRevokedError", "revoked", counts_as_task_failure=False)


def protocol_violation(detail: str) -> KillReason:
    """The child's pipe carried bytes that are not our frames: it is killed and never
    trusted again; its task is counted as lost (a task that keeps doing it ends as a
    poison pill)."""
    return KillReason(
        "WorkerLostError", f"child killed: {detail} (did the task write into its own pipe?)",
        counts_as_task_failure=False,
    )  # fmt: skip


def check_slot(slot: Slot, now: float, heartbeat_timeout: float) -> KillReason | None:
    """A reason to kill this child now, or None. `now` is time.monotonic()."""
    state = slot.state
    if state == SlotState.RUNNING and slot.hard_deadline and now >= slot.hard_deadline:
        limit = slot.hard_deadline - slot.started
        return KillReason("TimeLimitExceeded", f"hard time limit of {limit:g}s exceeded", True)
    if state in (SlotState.RUNNING, SlotState.IDLE) and now - slot.last_beat > heartbeat_timeout:
        return KillReason(
            "WorkerLostError",
            f"child silent for {now - slot.last_beat:.1f}s (heartbeat timeout "
            f"{heartbeat_timeout:g}s): stopped or wedged",
            False,
        )
    return None


def check_memory(rss: int, max_memory: int | None) -> KillReason | None:
    if max_memory and rss > max_memory:
        return KillReason(
            "MemoryLimitExceeded",
            f"child RSS {rss / 2**20:.0f} MiB exceeded the task's max_memory "
            f"{max_memory / 2**20:.0f} MiB",
            True,
        )
    return None


def respawn_delay(early_deaths: int) -> float:
    """Back-off for a crash loop: children dying before finishing any task."""
    if early_deaths <= 1:
        return 0.0
    return min(30.0, 0.25 * 2.0 ** min(early_deaths - 2, 8))  # capped: no float overflow


def describe_exit(code: int) -> str:
    """ "exit code 3" or "signal SIGKILL", from `os.waitstatus_to_exitcode`."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"
