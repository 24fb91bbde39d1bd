"""Wake-ups for the SQLite broker: each supervisor binds a unix datagram socket in
`<db>-wake/`, and every enqueue commit sends one byte to each, so an idle pool starts a
new task within a millisecond instead of polling the database."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import psutil

MESSAGES = b"\x01"  # a wake-up byte: messages may be due
CONTROL = b"\x02"  # a wake-up byte: a control request was sent
_SUN_PATH_MAX = 107  # bytes of a unix socket path, NUL excluded (Linux sun_path is 108)
DIR_MODE = 0o700  # `<db>-wake/`: only the database's owner can reach the sockets in it
SOCKET_MODE = 0o600
# The umask while a socket is bound: bind() has no mode argument and creates the node as
# 0o777 minus the umask. 0o077, not 0o177: the umask is the whole process's, and a file
# or directory another thread creates meanwhile only becomes owner-only, never unusable.
_BIND_UMASK = 0o077


def _bind_owner_only(sock: socket.socket, address: str) -> None:
    """Bind `sock` so its node is never wider than owner-only, then make it 0o600."""
    old = os.umask(_BIND_UMASK)
    try:
        sock.bind(address)
    finally:
        os.umask(old)
    os.chmod(address, SOCKET_MODE)  # the x bits the umask left mean nothing on a socket


class SqliteWaker:
    """Wake-ups between processes through unix datagram sockets (0o600) in `<db>-wake/`
    (0o700): only the database's owner can wake its workers (others' enqueues still run,
    found by the 1 s fallback poll).

    A listener binds `<pid>-<n>.sock` and selects on it. `poke()` sends one byte to every
    socket there; the listing is cached until the directory's mtime changes (or a
    second passes: mtime ticks are coarse). A lost wake-up costs at most the worker's
    1 s fallback poll, so poke never fails an enqueue that has already committed.
    """

    def __init__(self, db_path: Path) -> None:
        self.dir = Path(f"{db_path}-wake")
        self._listener: socket.socket | None = None
        self._own: Path | None = None
        self._sender: socket.socket | None = None
        self._dirfd: int | None = None
        self._listed_mtime = -1
        self._listed_at = 0.0
        self._targets: list[str] = []

    def listen(self) -> int:
        if self._listener is not None:
            return self._listener.fileno()
        if not self.dir.exists():
            self.dir.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(self.dir, DIR_MODE)  # a strict umask narrows it past usable
        self._remove_dead()
        name = f"{os.getpid()}-{id(self):x}.sock"
        own = self.dir / name
        with contextlib.suppress(FileNotFoundError):
            own.unlink()  # left by an earlier process that had our pid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _bind_owner_only(sock, self._address(name))
        except BaseException:
            sock.close()
            raise
        self._listener, self._own = sock, own
        return sock.fileno()

    def _remove_dead(self) -> None:
        """Remove the sockets of processes that are gone (crashed without close())."""
        for name in os.listdir(self.dir):
            pid_text = name.split("-", 1)[0].split(".", 1)[0]
            if (
                name.endswith(".sock")
                and pid_text.isdigit()
                and not psutil.pid_exists(int(pid_text))
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / name)

    def _address(self, name: str) -> str:
        """The socket path, through /proc/self/fd/<dir fd> when the full path would not
        fit in sun_path (deep state directories, pytest tmp dirs)."""
        full = os.path.join(self.dir, name)
        if len(os.fsencode(full)) <= _SUN_PATH_MAX:
            return full
        if self._dirfd is None:
            self._dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._dirfd}/{name}"

    def poke(self, what: bytes = MESSAGES) -> None:
        try:
            mtime = os.stat(self.dir).st_mtime_ns
            now = time.monotonic()
            if mtime != self._listed_mtime or now - self._listed_at > 1.0:
                names = [name for name in os.listdir(self.dir) if name.endswith(".sock")]
                self._targets = [self._address(name) for name in names]
                self._listed_mtime, self._listed_at = mtime, now
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
        except FileNotFoundError:
            return  # nobody has ever listened
        except OSError:
            return  # see the class docstring: the fallback poll covers it
        for address in self._targets:
            try:
                self._sender.sendto(what, address)
            except OSError:
                # ENOENT/ECONNREFUSED: the listener is gone; EAGAIN: it already has a
                # wake-up queued. Anything else is still no reason to fail the enqueue.
                continue

    def drain(self) -> bytes:
        """Read every pending wake-up; the distinct bytes they carried."""
        if self._listener is None:
            return b""
        seen = bytearray()
        with contextlib.suppress(BlockingIOError):
            while data := self._listener.recv(64):
                seen += data
        return bytes(set(seen))

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._own is not None:
            with contextlib.suppress(FileNotFoundError):
                self._own.unlink()
            self._own = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None
