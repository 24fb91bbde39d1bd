"""Process hygiene for the supervisor's tree: what a child may hold, and how nothing of a
task outlives the kill, the child or the supervisor.

- Descriptors: a forked child inherits every descriptor of the supervisor, among them
  the SQLite database, its `-wal` and `-shm`, and the Redis socket. A task writing to
  one of them (`os.write(6, ...)`) overwrote the database header. So the first thing a
  child does is point every inherited descriptor but its own pipes and 0-2 at
  /dev/null (`neutralize_inherited_fds`). Not closed: a closed number is reused by the
  next file the child opens, and an inherited object that closes "its" descriptor
  later (a connection the garbage collector finalises) would close that file; a
  /dev/null copy at the same number makes every such late write or close harmless.
- Process groups: each child leads a process group of its own, and a kill (limit,
  revoke, shutdown) kills the group and every descendant found before it
  (`kill_tree`), so a task's subprocess dies with it even when it ignores SIGTERM.
- Escapees: a grandchild that left the group (`setsid`) is re-parented, when its
  parent dies, to the supervisor, which is a child subreaper (`become_subreaper`):
  anything the supervisor did not fork itself is a task's leftover (`orphans`).
- The heap: everything the supervisor imported and built before its loop (redis-py,
  the app's tasks, the stores: ~150k objects on Redis) lives as long as the process.
  `freeze_heap` moves it out of the garbage collector's reach (`gc.freeze`), once,
  before the first fork: a full collection in the supervisor took 18 ms of its loop
  (a task arriving then waited for it; measured with gc callbacks at 200 tasks/s, one
  every ~5 s), and in a child it would also write to every inherited object's header,
  copying the pages it shares with the supervisor. Before it, `trim_heap` hands back
  what the imports freed.
- The undertaker: if the supervisor is SIGKILLed, its children die of their
  parent-death signal, but their descendants do not. A small process forked first
  (`start_undertaker`) waits on a pipe only the supervisor holds; when it reads EOF
  (the supervisor ended, however), it kills every process carrying this supervisor's
  mark in its environment (`MARK`, set by each child and inherited by what it starts).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
from collections.abc import Iterable

import psutil

MARK = "STEM_SUPERVISOR"  # environment variable: the supervisor a process works for
PR_SET_CHILD_SUBREAPER = 36
PROC = "/proc"


def neutralize_inherited_fds(keep: Iterable[int]) -> None:
    """Point every open descriptor except 0, 1, 2 and `keep` at /dev/null (see above)."""
    kept = {0, 1, 2, *keep}
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for name in os.listdir(f"{PROC}/self/fd"):
        fd = int(name)
        if fd in kept or fd == devnull:
            continue
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
            os.dup2(devnull, fd, inheritable=False)
    os.close(devnull)


def freeze_heap() -> None:
    """Collect what start-up left as garbage, give the freed memory back to the system,
    then freeze the rest (see above): later collections, here and in every child forked
    after this, only look at newer objects."""
    gc.collect()
    trim_heap()
    gc.freeze()


def trim_heap() -> None:
    """Return the free memory at the top of malloc's heap to the system (glibc's
    `malloc_trim`; nothing elsewhere). Importing leaves some behind, the compiler's
    and the importer's temporaries: 1.7 MB of the supervisor's RSS on Redis (39.6 ->
    37.9 MB after its imports), and children forked after it do not inherit it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux); False where it cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group and every descendant (found before the kill:
    after it, they are re-parented and no longer descend from `pid`)."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # each child leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for process in descendants:
        with contextlib.suppress(psutil.Error):
            process.kill()


def orphans(known: Iterable[int], *, proc: str = PROC) -> list[int]:
    """This process's children that it did not fork itself: adopted escapees."""
    mine = set(known)
    return [pid for pid in children_of_this_process(proc) if pid not in mine]


def children_of_this_process(proc: str = PROC) -> list[int]:
    """The pids of this process's children. Read from each thread's
    `/proc/self/task/<tid>/children` (Linux 3.5+, CONFIG_PROC_CHILDREN): 0.1 ms, where
    psutil reads the status of every process on the host (2-25 ms measured here, in the
    supervisor's loop every 5 s, so a task arriving then waited for it). psutil where
    the kernel has no such file."""
    pid = os.getpid()
    try:
        found: list[int] = []
        for tid in os.listdir(f"{proc}/{pid}/task"):
            with open(f"{proc}/{pid}/task/{tid}/children", "rb") as listing:
                found += [int(child) for child in listing.read().split()]
        return found
    except FileNotFoundError:
        pass  # no such kernel feature (or the thread just ended): ask psutil
    except OSError:
        return []
    try:
        return [p.pid for p in psutil.Process().children()]
    except psutil.Error:
        return []


def marked(mark: str) -> list[int]:
    """Pids of the processes whose environment has `MARK=mark` (those this user may read)."""
    needle = f"{MARK}={mark}".encode() + b"\0"
    found = []
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        try:
            with open(f"{PROC}/{name}/environ", "rb") as environ:
                if needle in environ.read() + b"\0":
                    found.append(int(name))
        except OSError:  # gone, or another user's
            continue
    return found


def start_undertaker(mark: str) -> int:
    """Fork the undertaker (see above) and return the pipe descriptor the supervisor
    must hold, open, for as long as it lives. The undertaker is forked twice so that it
    is nobody's child here (a subreaper would adopt it) and is in a session of its own,
    so a kill of the supervisor's process group does not take it."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked processes
        try:
            os.setsid()
            if os.fork() == 0:
                _undertake(read_fd, write_fd, mark)
        finally:
            os._exit(0)
    os.close(read_fd)
    os.waitpid(pid, 0)  # the intermediate process exits at once
    return write_fd


def _undertake(read_fd: int, write_fd: int, mark: str) -> None:  # pragma: no cover
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)
    os.close(write_fd)
    neutralize_inherited_fds([read_fd])
    with contextlib.suppress(OSError):
        while os.read(read_fd, 64):
            pass  # nothing is ever written: only EOF matters
    for pid in marked(mark):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
