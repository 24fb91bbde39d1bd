"""Owner-only files: the SQLite database, its -wal and -shm (0600), the wake-up socket
directory (0700) and its sockets (0600), and the shared-memory heartbeat table (0600),
whatever the umask of the process that creates them: a permissive one (0o022, 0o000)
must not widen them, a strict one (0o277) must not leave them unusable."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.worker.heartbeat import SHM_DIR
from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import ROOT, WorkerProcess, app_on


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def database_files(db: Path) -> list[Path]:
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def worker_with_umask(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A real supervisor started under the umask, on a database it creates itself, in a
    directory that does not exist yet."""
    db = tmp_path / "state" / "stem.db"
    proc = WorkerProcess(tmp_path, f"sqlite:///{db}")
    proc.argv = ["sh", "-c", f'umask {request.param:03o} && exec "$@"', "sh", *proc.argv]
    yield proc
    proc.stop()


@pytest.mark.process
def test_a_worker_under_a_permissive_umask_creates_everything_owner_only(
    worker_with_umask: WorkerProcess, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "stem.db"
    worker = worker_with_umask.start()
    stem = app_on(worker.broker_url, ledger_app.stem)
    try:
        assert stem.enqueue("t.record", {"n": 7}).result(timeout=20) == 7, worker.read_log()
    finally:
        stem.close()
    assert mode(db.parent) == 0o700
    for path in database_files(db):
        assert mode(path) == 0o600, path
    wake = Path(f"{db}-wake")
    assert mode(wake) == 0o700
    sockets = [p for p in wake.iterdir() if p.name.endswith(".sock")]
    assert any(p.name.startswith(f"{worker.pid}-") for p in sockets), sockets
    for sock in sockets:
        assert stat.S_ISSOCK(os.stat(sock).st_mode) and mode(sock) == 0o600, sock
    table = SHM_DIR / f"stem-hb-{worker.pid}"
    assert wait_until(table.exists, timeout=5)
    assert mode(table) == 0o600


# Each creator called directly, in a fresh interpreter that sets its umask first (the
# umask is the whole process's, so never in the test process itself).
CREATE_ALL = textwrap.dedent(
    """
    import os, sys
    os.umask(int(sys.argv[2], 8))
    from pathlib import Path
    from appliance.stores.sqlite.db import connect, parse_url
    from appliance.stores.sqlite.wake import SqliteWaker
    from appliance.worker.heartbeat import HeartbeatTable
    db = Path(sys.argv[1])
    conn = connect(parse_url(f"sqlite:///{db}"))
    conn.write(lambda c: c.execute("CREATE TABLE t (x)"))  # -wal and -shm exist now
    waker = SqliteWaker(db)
    waker.listen()
    waker.poke()
    assert waker.drain()  # the socket still works for its owner
    table = HeartbeatTable(2)
    table.slots[0].pid = 1  # mapped for writing
    print(table.path, flush=True)
    sys.stdin.read()  # keep everything open until the test has looked
    """
)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277], ids=lambda u: f"umask-{u:03o}")
def test_each_file_is_created_owner_only_and_usable_under_any_umask(
    tmp_path: Path, umask: int
) -> None:
    db = tmp_path / "new-dir" / "stem.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", CREATE_ALL, str(db), f"{umask:o}"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line, proc.communicate(timeout=10)[1].decode()
        table = Path(line)
        assert mode(db.parent) == 0o700
        for path in database_files(db):
            assert mode(path) == 0o600, path
        wake = Path(f"{db}-wake")
        assert mode(wake) == 0o700
        (sock,) = wake.iterdir()
        assert mode(sock) == 0o600
        assert mode(table) == 0o600
    finally:
        _, err = proc.communicate(input=b"", timeout=10)
    assert proc.returncode == 0, err.decode()


def test_an_existing_database_keeps_the_mode_its_operator_gave_it(tmp_path: Path) -> None:
    """Owner-only is how files are created; a file opened to a group on purpose (a
    producer running as another user) is not narrowed behind the operator's back."""
    from appliance.stores.sqlite.db import connect, parse_url

    db = tmp_path / "stem.db"
    connect(parse_url(f"sqlite:///{db}")).close()
    os.chmod(db, 0o660)
    connect(parse_url(f"sqlite:///{db}")).close()
    assert mode(db) == 0o660
