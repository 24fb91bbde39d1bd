"""A real full disk under a running supervisor (a tiny tmpfs; needs root, as CI is):
settles fail, children keep running, nothing is lost, work resumes when space returns."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import WorkerProcess, app_on


def _can_mount_tmpfs() -> bool:
    """Root, and allowed to mount (CI is; an unprivileged container is not)."""
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as probe:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True
        )
        if mounted.returncode != 0:
            return False
        subprocess.run(["umount", probe], check=False)
    return True


pytestmark = pytest.mark.skipif(
    not _can_mount_tmpfs(), reason="needs root allowed to mount a tmpfs (as CI runs)"
)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write until the filesystem refuses: ENOSPC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def test_a_full_disk_under_the_supervisor_loses_nothing(small_disk: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{small_disk / 'stem.db'}"
    stem = app_on(url, ledger_app.stem)
    handles = stem.enqueue_many([("t.slow", {"seconds": 0.05}) for _ in range(60)])
    worker = WorkerProcess(tmp_path, url).start()
    try:
        assert wait_until(lambda: len(worker.ledger_lines("start")) >= 2, timeout=10)
        fill(small_disk / "filler")
        with pytest.raises(OSError) as full:
            (small_disk / "more").write_bytes(b"\0" * 65536)
        assert full.value.errno == errno.ENOSPC
        assert wait_until(lambda: "store failed" in worker.read_log(), timeout=15), (
            worker.read_log()
        )
        assert worker.proc is not None and worker.proc.poll() is None  # still serving
        (small_disk / "filler").unlink()
        (small_disk / "more").unlink(missing_ok=True)
        for handle in handles:
            handle.result(timeout=30)
        assert "store reachable again" in worker.read_log()
    finally:
        worker.stop()
        stem.close()
    done = worker.completions()
    assert set(done) == {h.id for h in handles}  # nothing lost
    with sqlite3.connect(small_disk / "stem.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_lease_renewals_during_a_full_disk_back_off_instead_of_spinning(
    small_disk: Path, tmp_path: Path
) -> None:
    # Regression: a failing lease renewal was retried on every loop turn without back-off,
    # and the back-off counter overflowed a float within a second: the supervisor died.
    url = f"sqlite:///{small_disk / 'stem.db'}"
    stem = app_on(url, ledger_app.stem)
    handles = [stem.enqueue("t.renewed", {"seconds": 4.0}) for _ in range(2)]
    worker = WorkerProcess(tmp_path, url).start()
    try:
        assert wait_until(lambda: len(worker.ledger_lines("start")) == 2, timeout=10)
        fill(small_disk / "filler")
        assert wait_until(lambda: "store failed" in worker.read_log(), timeout=10)
        supervisor = psutil.Process(worker.pid)
        before = supervisor.cpu_times()
        time.sleep(2.0)
        after = supervisor.cpu_times()
        busy = (after.user + after.system) - (before.user + before.system)
        assert busy < 0.5, f"the supervisor spun: {busy:.2f} s of CPU in 2 s"
        assert worker.proc is not None and worker.proc.poll() is None
        (small_disk / "filler").unlink()
        for handle in handles:
            handle.result(timeout=30)
    finally:
        worker.stop()
        stem.close()
    assert set(worker.completions()) == {h.id for h in handles}
