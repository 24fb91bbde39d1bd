"""The shared-memory heartbeat table: one fixed-layout slot per child.

The supervisor creates the table before forking and unlinks it when it exits; children
inherit the mapping through fork and write only their own slot. The supervisor reads
every slot many times a second, so liveness never depends on a disk (gunicorn#1305)
or on a thread inside the task's process answering.

Times are CLOCK_MONOTONIC seconds (`time.monotonic()`), which is system-wide on Linux,
so the supervisor can compare a child's deadlines with its own clock, and wall-clock
jumps do not move them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
from pathlib import Path

from appliance.states import SlotState

log = logging.getLogger("stem.worker")

SHM_DIR = Path("/dev/shm")
MAGIC = 0x5354454D  # "STEM"
LAYOUT_VERSION = 1
TASK_ID_BYTES = 40
TABLE_MODE = 0o600


class Header(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("slots", ctypes.c_uint32),
        ("supervisor_pid", ctypes.c_int32),
        ("draining", ctypes.c_uint32),  # 1: children start no new task (warm shutdown)
        ("_pad", ctypes.c_uint32),
    ]


class Slot(ctypes.Structure):
    """One child. Every field is naturally aligned, so each read or write of one field
    is a single machine access; the supervisor checks `seq` to pair fields of a task."""

    _fields_ = [
        ("pid", ctypes.c_int32),
        ("state", ctypes.c_int32),  # SlotState
        ("seq", ctypes.c_uint64),  # dispatch sequence of the task running (0: none)
        ("started", ctypes.c_double),
        ("soft_deadline", ctypes.c_double),  # 0: none
        ("hard_deadline", ctypes.c_double),  # 0: none
        ("last_beat", ctypes.c_double),
        ("lease_request", ctypes.c_double),  # keep the lease until at least this time
        ("progress", ctypes.c_double),  # percent; -1: never reported
        ("tasks_done", ctypes.c_uint64),
        ("task_id", ctypes.c_char * TASK_ID_BYTES),
    ]


class HeartbeatTable:
    """The table of one supervisor. Create in the supervisor, before any fork."""

    def __init__(self, slots: int, *, owner_pid: int | None = None) -> None:
        self.owner_pid = owner_pid or os.getpid()
        self.path: Path | None = SHM_DIR / f"stem-hb-{self.owner_pid}"
        self.size = ctypes.sizeof(Header) + slots * ctypes.sizeof(Slot)
        sweep_stale_tables()
        try:
            self._map = self._map_file()
        except OSError as exc:
            # A full or read-only /dev/shm: the children can still share anonymous memory
            # inherited through fork; only readers from outside (the TUI) lose the table.
            log.warning(
                "cannot create the heartbeat table %s (%s); using private shared memory, "
                "so other processes cannot read the live slots", self.path, exc,
            )  # fmt: skip
            self.path = None
            self._map = mmap.mmap(-1, self.size, mmap.MAP_SHARED)
        self.header = Header.from_buffer(self._map, 0)
        self.header.magic, self.header.version = MAGIC, LAYOUT_VERSION
        self.header.slots, self.header.supervisor_pid = slots, self.owner_pid
        base = ctypes.sizeof(Header)
        self.slots = [
            Slot.from_buffer(self._map, base + i * ctypes.sizeof(Slot)) for i in range(slots)
        ]

    def _map_file(self) -> mmap.mmap:
        assert self.path is not None
        # O_EXCL + 0o600: only this supervisor's user may read it; never reuse a name.
        # Created owner-only (a umask only narrows it), then set exactly: a strict umask
        # would leave a table the supervisor itself cannot map for writing.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, TABLE_MODE)
        try:
            os.fchmod(fd, TABLE_MODE)
            # Reserve the pages now: on a full tmpfs a sparse file (ftruncate) maps fine
            # and the first write to it kills the process with SIGBUS.
            os.posix_fallocate(fd, 0, self.size)
            return mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            raise
        finally:
            os.close(fd)

    def reset(self, index: int, pid: int) -> Slot:
        """Clear a slot for a newly forked child."""
        slot = self.slots[index]
        ctypes.memset(ctypes.addressof(slot), 0, ctypes.sizeof(Slot))
        slot.pid, slot.state, slot.progress = pid, SlotState.STARTING, -1.0
        return slot

    def close(self) -> None:
        """Unlink the table (supervisor only, at exit)."""
        if os.getpid() != self.owner_pid or self.path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def sweep_stale_tables() -> None:
    """Remove tables left by supervisors that were SIGKILLed (nobody else unlinks them)."""
    for path in SHM_DIR.glob("stem-hb-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
