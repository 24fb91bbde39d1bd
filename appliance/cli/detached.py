"""The process mechanics of `stem worker multi`: pidfiles, a `stem worker run` launched
in its own session with a private sd_notify socket, waiting for its READY=1, and
signalled stops. `cli/multi.py` decides what to do; this module does it."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

RUNNING = "running"
STOPPED = "stopped"
STALE = "stale"

# systemd's variables for a unit's main process. A worker started by `multi` from inside a
# unit is not that process: it must not ping the unit's watchdog nor take its sockets.
_SYSTEMD_VARS = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)
# A pidfile is written just after its process starts, so a process created later than
# the file is a reused pid. The slack covers psutil's rounded create time and coarse
# file-system timestamps.
_PIDFILE_SLACK = 1.0
# How long a worker that failed to become ready gets to leave on SIGTERM before its
# whole session is killed.
_ABANDON_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class NamedWorker:
    """One `multi` worker: its name (the `--name` it runs with) and its two files."""

    name: str
    pidfile: Path
    logfile: Path


@dataclass(frozen=True, slots=True)
class Found:
    """What a worker's pidfile says now: RUNNING (with its process), STOPPED (no
    pidfile) or STALE (`why`: the pid is gone, or is some other program)."""

    state: str
    pid: int | None = None
    process: psutil.Process | None = None
    why: str | None = None


# --- pidfiles ------------------------------------------------------------------------


def look(worker: NamedWorker) -> Found:
    """Read `worker`'s pidfile and check its pid is that worker, without changing anything."""
    try:
        fd = os.open(worker.pidfile, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Found(STOPPED)
    with os.fdopen(fd) as file:
        written_at = os.fstat(fd).st_mtime  # the same file as the text, even mid-rename
        text = file.read(64).strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        return Found(STALE, why=f"it holds {text!r}, not a pid")
    pid = int(text)
    try:
        process = psutil.Process(pid)
        why = _not_the_worker(process, worker.name, written_at)
    except psutil.NoSuchProcess:
        why = f"pid {pid} is not running"
    except psutil.AccessDenied:
        why = f"pid {pid} belongs to another user"
    if why is not None:
        return Found(STALE, pid, why=why)
    return Found(RUNNING, pid, process)


def _not_the_worker(process: psutil.Process, name: str, written_at: float) -> str | None:
    """Why `process` is not `stem worker run --name NAME`, or None when it is."""
    with process.oneshot():
        if process.status() == psutil.STATUS_ZOMBIE:
            return f"pid {process.pid} has exited"
        if process.create_time() > written_at + _PIDFILE_SLACK:
            return f"pid {process.pid} was reused by a process started after the pidfile"
        argv = process.cmdline()
    pairs = set(itertools.pairwise(argv))
    if ("worker", "run") in pairs and ("--name", name) in pairs:
        return None
    shown = shlex.join(argv)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"pid {process.pid} is `{shown}`, not `stem worker run --name {name}`"


def write_pidfile(path: Path, pid: int) -> None:
    """Write `pid` to `path` atomically (a 0600 temporary file renamed over it), so a
    reader never sees a half-written pid."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(f"{pid}\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def remove_pidfile(path: Path) -> None:
    path.unlink(missing_ok=True)


def ensure_dir(directory: Path) -> None:
    """Create `directory` and any missing parents 0700 (pids and logs are private);
    directories that exist are left as they are."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)


@contextlib.contextmanager
def locked(directories: Iterable[Path], on_wait: Callable[[Path], None]) -> Iterator[None]:
    """Hold an exclusive flock on each existing directory (in a fixed order), so two
    `multi` commands on the same pidfiles cannot both start one worker. `on_wait` is
    told when another command holds a lock and this one waits for it."""
    with contextlib.ExitStack() as stack:
        for directory in sorted(set(directories)):
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # no directory, no pidfiles in it to race for
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait(directory)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield


# --- start ---------------------------------------------------------------------------


@dataclass(slots=True)
class Launch:
    """A worker launched by this command, until it is ready or has failed."""

    worker: NamedWorker
    process: subprocess.Popen[bytes]
    notify: socket.socket
    notify_dir: str
    log_offset: int  # where this run's output starts in the log file
    started: float  # monotonic
    ready_after: float | None = None  # seconds from launch to READY=1
    failure: str | None = None


def worker_argv(name: str, worker_args: Sequence[str]) -> list[str]:
    # The running interpreter, not a `stem` found on PATH: the worker runs the very
    # installation that launched it.
    return [sys.executable, "-m", "appliance", "worker", "run", "--name", name, *worker_args]


def launch(worker: NamedWorker, worker_args: Sequence[str]) -> Launch:
    """Start `stem worker run --name NAME WORKER-ARGS` detached: its own session, stdin
    /dev/null, stdout and stderr appended to the log file (created 0600), and
    NOTIFY_SOCKET naming a socket in a fresh 0700 directory, so only this user's
    processes can claim it is ready. Raises OSError when the log cannot be opened."""
    log_fd = os.open(worker.logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    notify_dir = tempfile.mkdtemp(prefix="stem-multi-")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        path = os.path.join(notify_dir, "notify")
        notify.bind(path)
        env = {key: value for key, value in os.environ.items() if key not in _SYSTEMD_VARS}
        env["NOTIFY_SOCKET"] = path
        offset = os.fstat(log_fd).st_size
        process = subprocess.Popen(
            worker_argv(worker.name, worker_args),
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        notify.close()
        shutil.rmtree(notify_dir, ignore_errors=True)
        raise
    finally:
        os.close(log_fd)
    return Launch(worker, process, notify, notify_dir, offset, time.monotonic())


def wait_ready(launches: Sequence[Launch], timeout: float) -> None:
    """Wait up to `timeout` for every launch to send READY=1; each ends with
    `ready_after` set, or `failure` saying why not (it exited, or the time ran out)."""
    deadline = time.monotonic() + timeout
    pending = list(launches)
    with selectors.DefaultSelector() as selector:
        for item in pending:
            selector.register(item.notify, selectors.EVENT_READ, item)
        while pending and (left := deadline - time.monotonic()) > 0:
            # The short select also bounds how late an exit is noticed.
            for key, _ in selector.select(min(left, 0.1)):
                item = key.data
                if _said_ready(item.notify):
                    item.ready_after = time.monotonic() - item.started
            for item in pending:
                code = item.process.poll() if item.ready_after is None else None
                if code is not None:
                    item.failure = f"exited with code {code} before it was ready"
            for item in [i for i in pending if i.ready_after is not None or i.failure]:
                selector.unregister(item.notify)
                pending.remove(item)
    for item in pending:
        item.failure = f"not ready after {timeout:g}s"
    for item in launches:
        item.notify.close()
        shutil.rmtree(item.notify_dir, ignore_errors=True)


def _said_ready(notify: socket.socket) -> bool:
    ready = False
    while True:  # drain every queued datagram (STATUS=... may come with READY=1)
        try:
            datagram = notify.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return ready
        ready = ready or "READY=1" in datagram.decode(errors="replace").splitlines()


def abandon(item: Launch) -> None:
    """Stop a launch that failed: SIGTERM, then SIGKILL after a grace period. The
    supervisor's own hygiene does the rest: its children die with it (parent-death
    signal) and its undertaker kills what their tasks left behind."""
    if item.process.poll() is None:
        item.process.terminate()
        try:
            item.process.wait(_ABANDON_GRACE)
        except subprocess.TimeoutExpired:
            item.process.kill()
    item.process.wait()


def log_tail(item: Launch, lines: int = 20) -> list[str]:
    """The last `lines` lines this launch wrote to its log (not earlier runs')."""
    try:
        with open(item.worker.logfile, "rb") as file:
            file.seek(item.log_offset)
            text = file.read()[-64 * 1024 :].decode(errors="replace")
    except OSError as exc:
        return [f"(cannot read {item.worker.logfile}: {exc.strerror})"]
    return text.splitlines()[-lines:]


# --- stop ----------------------------------------------------------------------------


def stop_all(
    processes: Sequence[psutil.Process], signum: int, timeout: float
) -> dict[int, float | None]:
    """Send `signum` to each process and wait up to `timeout` for all of them to exit;
    per pid, the seconds it took, or None when it is still running."""
    started = time.monotonic()
    took: dict[int, float | None] = {}
    signalled = []
    for process in processes:
        try:
            process.send_signal(signum)  # psutil refuses a pid reused since `look`
            signalled.append(process)
        except psutil.NoSuchProcess:
            took[process.pid] = 0.0
    _gone, alive = psutil.wait_procs(
        signalled,
        timeout=timeout,
        callback=lambda p: took.__setitem__(p.pid, time.monotonic() - started),
    )
    for process in alive:
        took[process.pid] = None
    return took


def uptime(process: psutil.Process) -> float | None:
    try:
        return max(0.0, time.time() - process.create_time())
    except psutil.Error:
        return None
