"""`stem worker multi`: real detached workers on a SQLite store in tmp_path, driven
through the real CLI in subprocesses (the workers outlive the command that started
them, as they do for users). Every process the tests start carries a marker in its
environment, and teardown kills whatever still has it."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from appliance.cli.main import main
from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import ROOT, app_on

pytestmark = pytest.mark.process

APP = ["--app", "tests.apps.ledger_app:stem", "--concurrency", "1"]
MARK = "STEM_TEST_MULTI"


class Multi:
    """Runs `stem worker multi ...` in tmp_path, so the default ./var/run and ./var/log
    land there, against a SQLite store in tmp_path."""

    def __init__(self, tmp: Path, broker_url: str) -> None:
        self.tmp = tmp
        self.ledger = tmp / "ledger.txt"
        self.mark = uuid.uuid4().hex
        self.env = dict(
            os.environ,
            STEM_BROKER_URL=broker_url,
            STEM_TEST_LEDGER=str(self.ledger),
            PYTHONPATH=str(ROOT),
            **{MARK: self.mark},
        )

    def __call__(
        self, *argv: str, worker_args: list[str] | None = APP
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "appliance", "worker", "multi", *argv]
        if worker_args is not None:
            command += ["--", *worker_args]
        return subprocess.run(
            command, cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=90
        )

    def pidfile(self, name: str) -> Path:
        return self.tmp / "var" / "run" / f"{name}.pid"

    def pid(self, name: str) -> int:
        return int(self.pidfile(name).read_text())

    def spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        """An unrelated marked process (teardown kills it if the test does not)."""
        return subprocess.Popen(argv, env=self.env, start_new_session=True)

    def leftovers(self) -> list[psutil.Process]:
        """Every live process carrying this test's marker."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.status() != psutil.STATUS_ZOMBIE and (
                    process.environ().get(MARK) == self.mark
                ):
                    found.append(process)
        return found

    def kill_all(self) -> None:
        ours = os.getpgid(0)
        for process in self.leftovers():
            with contextlib.suppress(OSError, psutil.Error):
                group = os.getpgid(process.pid)
                if group != ours:
                    os.killpg(group, signal.SIGKILL)
                process.kill()


@pytest.fixture
def multi(tmp_path: Path, sqlite_url: str) -> Iterator[Multi]:
    runner = Multi(tmp_path, sqlite_url)
    yield runner
    runner.kill_all()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def runs_as(pid: int, name: str) -> bool:
    argv = psutil.Process(pid).cmdline()
    return ("worker", "run") in itertools.pairwise(argv) and ("--name", name) in set(
        itertools.pairwise(argv)
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_start_returns_ready_workers_and_stop_waits_until_they_exit(
    multi: Multi, sqlite_url: str
) -> None:
    started = multi("start", "w1", "w2")
    assert started.returncode == 0, started.stdout + started.stderr
    pids = {name: multi.pid(name) for name in ("w1", "w2")}
    for name, pid in pids.items():
        assert f"{name}: started (pid {pid}, ready in " in started.stdout
        assert runs_as(pid, name) and os.getsid(pid) == pid  # detached: its own session
        # READY=1 comes after the pool is forked: a start that did not wait would
        # return before the child exists.
        assert psutil.Process(pid).children(), "returned before the pool was forked"
        assert mode(multi.pidfile(name)) == 0o600
        assert mode(multi.tmp / "var" / "log" / f"{name}.log") == 0o600
    assert mode(multi.tmp / "var" / "run") == mode(multi.tmp / "var" / "log") == 0o700

    again = multi("start", "w1", "w2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "w1: already running (pid" in again.stdout and "w2: already running" in again.stdout
    assert {name: multi.pid(name) for name in pids} == pids

    status = multi("status", "w1", "w2", "--json", worker_args=None)
    assert status.returncode == 0, status.stderr
    assert [(r["name"], r["pid"], r["state"]) for r in json.loads(status.stdout)] == [
        ("w1", pids["w1"], "running"),
        ("w2", pids["w2"], "running"),
    ]
    first = json.loads(status.stdout)[0]
    assert first["pidfile"] == str(multi.pidfile("w1"))
    assert first["logfile"] == str(multi.tmp / "var" / "log" / "w1.log")
    assert first["uptime_s"] >= 0

    stem = app_on(sqlite_url, ledger_app.stem)
    try:
        assert stem.enqueue("t.record", {"n": 7}).result(timeout=20) == 7
    finally:
        stem.close()

    stopped = multi("stop", "w1", "w2", worker_args=None)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for name, pid in pids.items():
        assert f"{name}: stopped (pid {pid}, warm shutdown in " in stopped.stdout
        assert not alive(pid), "stop returned before the worker exited"
        assert not multi.pidfile(name).exists()
    assert wait_until(lambda: not multi.leftovers(), timeout=10), multi.leftovers()

    after = multi("status", "w1", "w2", worker_args=None)
    assert after.returncode == 1
    assert after.stdout.splitlines() == ["w1: stopped", "w2: stopped"]


def test_restart_goes_one_name_at_a_time_and_gives_new_pids(multi: Multi) -> None:
    assert multi("start", "2").returncode == 0  # a count: w1 and w2
    old = {name: multi.pid(name) for name in ("w1", "w2")}

    restarted = multi("restart", "2", "--json")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    reports = json.loads(restarted.stdout)
    new = {name: multi.pid(name) for name in ("w1", "w2")}
    assert [(r["name"], r["state"], r["pid"]) for r in reports] == [
        ("w1", "running", new["w1"]),
        ("w2", "running", new["w2"]),
    ]
    for name in ("w1", "w2"):
        assert new[name] != old[name] and not alive(old[name]) and runs_as(new[name], name)
    assert reports[0]["notes"][0].startswith(f"stopped (pid {old['w1']}, warm shutdown")
    assert reports[0]["notes"][1].startswith(f"started (pid {new['w1']}, ready in")

    # A release that cannot start takes down the first worker only.
    bad = multi("restart", "2", worker_args=["--app", "tests.apps.nope:stem"])
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[1:] == [
        "w1: failed: exited with code 2 before it was ready (its log's last lines are on stderr)",
        "w2: not restarted, left running: w1 failed first",
    ]
    assert not alive(new["w1"]) and not multi.pidfile("w1").exists()
    assert alive(new["w2"]) and multi.pid("w2") == new["w2"]

    assert multi("stop", "2", worker_args=None).returncode == 0
    assert wait_until(lambda: not multi.leftovers(), timeout=10), multi.leftovers()


def test_stale_pidfiles_are_reported_by_status_and_removed_by_start_and_stop(
    multi: Multi,
) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    sleeper = multi.spawn("sleep", "60")
    run_dir = multi.tmp / "var" / "run"
    run_dir.mkdir(parents=True)
    multi.pidfile("w1").write_text(f"{gone.pid}\n")
    multi.pidfile("w2").write_text(f"{sleeper.pid}\n")
    multi.pidfile("w3").write_text(f"{sleeper.pid}\n")
    hour_ago = time.time() - 3600  # written before the sleeper started: its pid was reused
    os.utime(multi.pidfile("w3"), (hour_ago, hour_ago))
    multi.pidfile("w4").write_text("not a pid\n")

    status = multi("status", "4", "--json", worker_args=None)
    assert status.returncode == 1
    reports = json.loads(status.stdout)
    assert [r["state"] for r in reports] == ["stale"] * 4
    notes = [r["notes"][0] for r in reports]
    assert f"pid {gone.pid} is not running" in notes[0]
    assert f"pid {sleeper.pid} is `sleep 60`, not `stem worker run --name w2`" in notes[1]
    assert "reused by a process started after the pidfile" in notes[2]
    assert "it holds 'not a pid', not a pid" in notes[3]
    assert all(multi.pidfile(f"w{i}").exists() for i in range(1, 5))  # status changes nothing

    started = multi("start", "w1", "w2")
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"w1: removed a stale pidfile {multi.pidfile('w1')}: pid {gone.pid}" in started.stdout
    assert f"w2: removed a stale pidfile {multi.pidfile('w2')}: pid {sleeper.pid}" in (
        started.stdout
    )
    assert runs_as(multi.pid("w1"), "w1") and runs_as(multi.pid("w2"), "w2")
    assert sleeper.poll() is None  # the unrelated process was left alone

    stopped = multi("stop", "w1", "w2", "w3", "w4", "w5", worker_args=None)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "w3: removed a stale pidfile" in stopped.stdout
    assert "w4: removed a stale pidfile" in stopped.stdout
    assert "w5: not running (no pidfile)" in stopped.stdout
    assert not any(run_dir.glob("*.pid"))
    assert sleeper.poll() is None
    sleeper.kill()
    sleeper.wait()


def test_a_worker_that_exits_fails_start_with_the_tail_of_its_own_log(multi: Multi) -> None:
    bad_app = ["--app", "tests.apps.nope:stem"]
    for _ in range(2):  # the second tail shows the second run only, not the whole log
        failed = multi("start", "w1", worker_args=bad_app)
        assert failed.returncode == 1
        assert "w1: failed: exited with code 2 before it was ready" in failed.stdout
        assert f"w1: last lines of {multi.tmp / 'var' / 'log' / 'w1.log'}:" in failed.stderr
        assert failed.stderr.count("no module named 'tests.apps.nope'") == 1, failed.stderr
        assert not multi.pidfile("w1").exists()
    log = (multi.tmp / "var" / "log" / "w1.log").read_text()
    assert log.count("no module named 'tests.apps.nope'") == 2  # appended, never truncated
    assert wait_until(lambda: not multi.leftovers(), timeout=10), multi.leftovers()


def test_a_worker_not_ready_in_time_is_killed_and_start_fails(multi: Multi) -> None:
    # An unreachable Redis keeps the supervisor retrying its connection: never READY.
    unreachable = [*APP, "--broker", "redis://127.0.0.1:1/0"]
    failed = multi("start", "w1", "--timeout", "2", worker_args=unreachable)
    assert failed.returncode == 1
    assert "w1: failed: not ready after 2s" in failed.stdout
    assert "unreachable" in failed.stderr  # the worker's own log line, from the tail
    assert not multi.pidfile("w1").exists()
    assert wait_until(lambda: not multi.leftovers(), timeout=10), multi.leftovers()


def test_one_worker_failing_leaves_the_others_running(multi: Multi) -> None:
    (multi.tmp / "var" / "log" / "w2.log").mkdir(parents=True)  # w2 cannot open its log
    result = multi("start", "w1", "w2")
    assert result.returncode == 1
    assert "w1: started (pid" in result.stdout
    assert "w2: failed: cannot open" in result.stdout
    assert runs_as(multi.pid("w1"), "w1") and not multi.pidfile("w2").exists()
    assert multi("stop", "w1", "w2", worker_args=None).returncode == 0


def test_a_warm_stop_that_outlasts_its_timeout_fails_and_a_cold_stop_ends_it(
    multi: Multi, sqlite_url: str
) -> None:
    assert multi("start", "w1").returncode == 0
    pid = multi.pid("w1")
    stem = app_on(sqlite_url, ledger_app.stem)
    try:
        stem.enqueue("t.slow", {"seconds": 60})
    finally:
        stem.close()
    assert wait_until(lambda: multi.ledger.exists() and "start" in multi.ledger.read_text())

    warm = multi("stop", "w1", "--timeout", "1", worker_args=None)
    assert warm.returncode == 1
    assert f"w1: still running after 1s (pid {pid}); pidfile kept; try --mode cold" in warm.stdout
    assert alive(pid) and multi.pid("w1") == pid

    cold = multi("stop", "w1", "--mode", "cold", worker_args=None)
    assert cold.returncode == 0, cold.stdout + cold.stderr
    assert f"w1: stopped (pid {pid}, cold shutdown in " in cold.stdout
    assert not alive(pid) and not multi.pidfile("w1").exists()
    assert wait_until(lambda: not multi.leftovers(), timeout=10), multi.leftovers()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["start", "w1"], "after --: the following arguments are required: --app"),
        (["start", "w1", "--", *APP, "--name", "x"], "leave out --name"),
        (["start", "w1", "--", *APP, "--bogus"], "`stem worker run` does not take --bogus"),
        (["start", "0", "--", *APP], "a count of workers must be 1 to 256"),
        (["start", "w1", "w1", "--", *APP], "worker name given twice: w1"),
        (["status", "w1", "12"], "a worker name cannot be a number (12)"),
        (["status", "../w1"], "bad worker name '../w1'"),
        (["start", "w1", "--timeout", "0", "--", *APP], "--timeout: must be > 0, got 0"),
        (["stop", "w1", "--timeout", "-1"], "--timeout: must be > 0, got -1"),
        (["status", "w1", "w2", "--pidfile", "one.pid"], "gives w1 and w2 the same file"),
        (["status", "w1", "--logfile", "%q.log"], "unknown %q"),
        (["stop", "--", "w1"], "the following arguments are required: NAME"),
    ],
)
def test_bad_input_is_a_usage_error_and_starts_nothing(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["worker", "multi", *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
