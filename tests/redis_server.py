"""A private redis-server for the test session: free loopback port, temp dir, AOF on.

Never the system service on 6379. It can be killed (SIGKILL) and restarted on the same
port and directory, so fault tests exercise a real server losing its process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


class RedisServer:
    """One redis-server process; `kill()` and `start()` keep port and data dir."""

    def __init__(
        self, workdir: Path, *, appendonly: bool = True, password: str | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed; on Debian: apt-get install -y redis-server "
                "(.ci/run does this)"
            )
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password  # requirepass: every client must AUTH
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.password is not None:
            return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def _auth(self) -> bytes:
        """The AUTH command to send first on a raw connection (nothing without a password)."""
        if self.password is None:
            return b""
        secret = self.password.encode()
        return b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret)

    def start(self) -> None:
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--daemonize", "no", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always", "--logfile", str(self.dir / "redis.log"),
            *(["--requirepass", self.password] if self.password is not None else []),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.dir / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(self._auth() + b"PING\r\n")
                    if b"+PONG" in _replies(s, 2 if self.password is not None else 1):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def kill(self) -> None:
        """SIGKILL: the server loses its process, not its AOF."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(self._auth() + b"FLUSHALL\r\n")
            _replies(s, 2 if self.password is not None else 1)


def _replies(sock: socket.socket, count: int) -> bytes:
    """Read until `count` reply lines arrived (short replies: +OK, +PONG, -ERR ...)."""
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data
