"""`stem tui` in a real terminal (tmux) against a live supervisor: keys in with
`send-keys`, the screen read back with `capture-pane`, `q` ends the process."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apps import ledger_app
from tests.conftest import wait_until
from tests.process import ROOT, WorkerProcess, app_on
from tests.tui.seed import dead_letters

pytestmark = pytest.mark.process


class Tmux:
    """A private tmux server (its own socket: never the user's sessions)."""

    def __init__(self, tmp: Path) -> None:
        self.socket = f"stem-tui-test-{os.getpid()}-{time.monotonic_ns()}"
        self.tmp = tmp

    def run(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10, check=True)  # fmt: skip
        return done.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "tui")

    def shows(self, *parts: str, timeout: float = 15.0) -> bool:
        return wait_until(lambda: all(p in self.screen() for p in parts), timeout, 0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True,
                       timeout=10)  # fmt: skip


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    session = Tmux(tmp_path)
    yield session
    session.kill()


def test_stem_tui_in_tmux_against_a_live_worker(tmp_path: Path, tmux: Tmux) -> None:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    producer = app_on(url, ledger_app.stem)
    dead_letters(producer, ["t.record"])
    producer.enqueue("t.record", countdown=600, queue="default")
    worker = WorkerProcess(tmp_path, url, concurrency=2, extra=["--name", "edge-tmux"])
    worker.start()
    rc_file = tmp_path / "rc"
    command = (f"{shlex.quote(sys.executable)} -m appliance tui --broker {shlex.quote(url)} "
               f"--refresh 0.5; echo $? > {shlex.quote(str(rc_file))}")  # fmt: skip
    try:
        tmux.run("new-session", "-d", "-s", "tui", "-x", "100", "-y", "30",
                 "-e", f"PYTHONPATH={ROOT}", "-e", "TERM=xterm-256color", command)  # fmt: skip
        assert tmux.shows("1 Workers", "edge-tmux", "serving", "idle"), tmux.screen()
        tmux.run("send-keys", "-t", "tui", "2")
        assert tmux.shows("QUEUE", "default", "Throughput"), tmux.screen()
        tmux.run("send-keys", "-t", "tui", "3")
        assert tmux.shows("t.record", "exhausted", "1 dead letter(s)"), tmux.screen()
        tmux.run("send-keys", "-t", "tui", "r")
        assert tmux.shows("Yes (y)", "No (n)"), tmux.screen()
        tmux.run("send-keys", "-t", "tui", "n")
        assert wait_until(lambda: "Yes (y)" not in tmux.screen(), 10, 0.1), tmux.screen()
        tmux.run("send-keys", "-t", "tui", "q")
        assert wait_until(rc_file.exists, 15), tmux.screen()
        assert rc_file.read_text().strip() == "0"
        assert producer.broker.dlq_count() == 1  # the cancelled replay changed nothing
    finally:
        worker.stop()
        producer.close()


def test_stem_tui_without_a_terminal_says_so(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "tui", "--broker", f"sqlite:///{tmp_path}/s.db"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done
    assert done.stderr.startswith("stem: error: stem tui needs a terminal"), done.stderr
    assert not (tmp_path / "s.db").exists()
