"""The sd_notify protocol as systemd sees it (issue 17): a test binds the NOTIFY_SOCKET,
sets WATCHDOG_USEC and runs the real supervisor; READY, STATUS, WATCHDOG and STOPPING
arrive in order; during a store outage WATCHDOG goes on and STATUS says so; with no child
able to live, WATCHDOG is withheld so systemd would restart the service."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.process import ROOT
from tests.redis_server import RedisServer

pytestmark = pytest.mark.process
WATCHDOG_USEC = 400_000  # a ping every 0.2 s


class Systemd:
    """The notify socket of one supervisor, and everything it said, with arrival times."""

    def __init__(self, tmp: Path, url: str, app: str) -> None:
        self.path = tmp / f"notify-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.05)
        self.log = tmp / "worker.log"
        self.messages: list[tuple[float, str]] = []
        env = dict(
            os.environ, STEM_BROKER_URL=url, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=str(self.path),
            WATCHDOG_USEC=str(WATCHDOG_USEC), STEM_TEST_LEDGER=str(tmp / "ledger.txt"),
        )  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "worker", "run", "--app", app,
                 "--concurrency", "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def listen(self, seconds: float) -> list[str]:
        """Collect what arrives for `seconds`; the new messages (one field per line)."""
        deadline, new = time.monotonic() + seconds, []
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            for field in data.splitlines():
                self.messages.append((time.monotonic(), field))
                new.append(field)
        return new

    def until(self, prefix: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.startswith(prefix) for m in self.listen(0.1)):
                return
        raise AssertionError(f"no {prefix} in {self.fields()}; log:\n{self.log.read_text()}")

    def fields(self) -> list[str]:
        return [field for _, field in self.messages]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[list[Systemd]]:
    started: list[Systemd] = []
    yield started
    for one in started:
        one.close()


def test_ready_status_watchdog_and_stopping_arrive_in_order(
    tmp_path: Path, store_url: str, systemd: list[Systemd]
) -> None:
    unit = Systemd(tmp_path, store_url, "tests.apps.ledger_app:stem")
    systemd.append(unit)
    unit.until("READY=1")
    unit.listen(1.5)
    fields = unit.fields()
    watchdogs = [t for t, f in unit.messages if f == "WATCHDOG=1"]
    assert len(watchdogs) >= 4, fields  # about every 0.2 s
    assert max(b - a for a, b in itertools.pairwise(watchdogs)) < 0.6
    assert any(f.startswith("STATUS=") and "children" in f for f in fields), fields
    unit.proc.send_signal(signal.SIGTERM)
    unit.until("STOPPING=1")
    assert unit.proc.wait(timeout=20) == 0
    order = [f.split("=")[0] for f in unit.fields()]
    assert order.index("READY") < order.index("WATCHDOG") < order.index("STOPPING")


def test_a_store_outage_keeps_the_watchdog_and_says_so(
    tmp_path: Path, systemd: list[Systemd]
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        unit = Systemd(tmp_path, server.url, "tests.apps.ledger_app:stem")
        systemd.append(unit)
        unit.until("READY=1")
        server.kill()
        unit.until("STATUS=store unreachable since", timeout=20)
        before = len([f for f in unit.fields() if f == "WATCHDOG=1"])
        unit.listen(1.0)
        assert len([f for f in unit.fields() if f == "WATCHDOG=1"]) > before + 2
    finally:
        server.stop()


def test_no_watchdog_while_no_child_can_live(
    tmp_path: Path, sqlite_url: str, systemd: list[Systemd]
) -> None:
    unit = Systemd(tmp_path, sqlite_url, "tests.apps.crashing_app:stem")
    systemd.append(unit)
    unit.until("READY=1")
    unit.listen(1.0)  # the first child, while it is being forked, may still earn one ping
    later = unit.listen(2.5)  # children die at once, again and again, backing off
    assert "WATCHDOG=1" not in later, unit.fields()
    assert "withholding the systemd watchdog" in unit.log.read_text()
