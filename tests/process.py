"""Run the real `stem worker run` as a subprocess, in its own session, and read the
ledger its tasks write. Readiness comes from a real sd_notify datagram socket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from appliance import Stem

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """One supervisor subprocess with its NOTIFY_SOCKET and log file."""

    def __init__(
        self,
        tmp: Path,
        broker_url: str,
        *,
        app: str = "tests.apps.ledger_app:stem",
        concurrency: int | None = 2,  # None: from the config
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.broker_url = broker_url
        self.ledger = tmp / "ledger.txt"
        self.log = tmp / f"worker-{time.monotonic_ns()}.log"
        self.argv = [
            sys.executable,
            "-m",
            "appliance",
            "worker",
            "run",
            "--app",
            app,
            *(["--concurrency", str(concurrency)] if concurrency is not None else []),
            *(extra or []),
        ]
        self.env = dict(
            os.environ,
            STEM_BROKER_URL=broker_url,
            STEM_TEST_LEDGER=str(self.ledger),
            PYTHONPATH=str(ROOT),
            **(env or {}),
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = tmp / f"notify-{time.monotonic_ns()}.sock"

    def start(self, ready_timeout: float = 20.0) -> WorkerProcess:
        """Launch and wait for READY=1."""
        self.launch()
        return self.wait_ready(ready_timeout)

    def launch(self) -> WorkerProcess:
        """Start the process without waiting for it to be ready."""
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))
        self._notify.settimeout(0.2)
        env = dict(self.env, NOTIFY_SOCKET=str(self.notify_path))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 20.0) -> WorkerProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in self._notify.recv(4096):
                        return self
                if self.proc.poll() is not None:
                    break
        finally:
            self._notify.close()
            self.notify_path.unlink(missing_ok=True)
        raise AssertionError(f"worker not ready; log:\n{self.read_log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Warm stop, then kill the whole session if it lingers."""
        notify = getattr(self, "_notify", None)
        if notify is not None and notify.fileno() >= 0:  # launched, never waited for
            notify.close()
            self.notify_path.unlink(missing_ok=True)
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # orphans, if any, share the session

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def ledger_lines(self, event: str = "done") -> list[list[str]]:
        if not self.ledger.exists():
            return []
        lines = [line.split() for line in self.ledger.read_text().splitlines()]
        return [parts for parts in lines if parts and parts[0] == event]

    def ledger_lines_all(self) -> list[list[str]]:
        if not self.ledger.exists():
            return []
        return [line.split() for line in self.ledger.read_text().splitlines() if line.strip()]

    def completions(self) -> Counter[str]:
        """How many times each task id ran to its end."""
        return Counter(parts[1] for parts in self.ledger_lines("done"))


def app_on(url: str, source: Stem) -> Stem:
    """A `Stem` on `url` with the task definitions of the test app `source`, so a test
    can enqueue typed tasks into the store a worker subprocess serves."""
    app = Stem(broker=url)
    app.registry.update(source.registry)
    return app
