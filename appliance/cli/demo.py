"""`stem demo`: the real supervisor on a fresh SQLite file, a burst of demo tasks, live
progress, a summary, and an exit status that says whether everything behaved."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.app import EnqueueRequest
from appliance.cli import output
from appliance.cli.common import Commands, bounded_int
from appliance.config import MAX_CONCURRENCY, load_settings
from appliance.errors import ConfigError
from appliance.observe import DeadLetter, Observer
from appliance.states import TaskState

if TYPE_CHECKING:
    from appliance.app import Stem
    from appliance.backend.protocol import TaskResult

DEADLINE = 60.0  # seconds for the whole burst; the demo normally needs a few
STOP_GRACE = 15.0  # seconds for the supervisor's warm shutdown before it is killed
POLL = 0.1
# The burst must finish within DEADLINE on a small host (~700 tasks/s on two cores).
MAX_TASKS = 100_000

# One task per behaviour the demo shows; names match `appliance.demo`.
SPECIALS = ("demo.flaky", "demo.always_fails", "demo.sleepy", "demo.progress")

# Variables that would point the demo at another store or reshape its pool; the demo
# always runs on its own file with the default queue.
_ISOLATE = (
    "STEM_CONFIG",
    "STEM_BROKER_URL",
    "STEM_RESULT_BACKEND_URL",
    "STEM_QUEUES",
    "STEM_CONCURRENCY",
)


@dataclass
class DemoSummary:
    """What the demo saw, and what went differently from what it expects."""

    total: int
    elapsed: float
    states: dict[str, int]
    retries: int
    dead_letters: list[DeadLetter]
    problems: list[str] = field(default_factory=list)


def register(commands: Commands) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a worker on a local SQLite file with a burst of demo tasks",
        description="Start the real supervisor on a fresh SQLite database, enqueue a burst "
        "of demo tasks (fast adds, a flaky task that succeeds on retry, one that exhausts "
        "its retries into the dead-letter queue, one killed by its hard time limit, one "
        "reporting progress), show live progress and a summary. Exits 0 only when every "
        "task ended as expected.",
    )
    parser.add_argument(
        "--dir",
        default="./var/demo",
        metavar="DIR",
        help="where the demo database lives; its demo.* files are wiped "
        "first (default: ./var/demo)",
    )
    parser.add_argument(
        "--tasks",
        type=bounded_int(1, MAX_TASKS),
        default=1000,
        metavar="N",
        help=f"how many demo.add tasks in the burst, at most {MAX_TASKS} (default: 1000)",
    )
    parser.add_argument(
        "--concurrency",
        type=bounded_int(1, MAX_CONCURRENCY),
        default=4,
        metavar="N",
        help=f"worker children, at most {MAX_CONCURRENCY} (default: 4)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    directory = _prepare(args.dir)
    url = f"sqlite:///{directory / 'demo.db'}"
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATE} | {"STEM_BROKER_URL": url}
    from appliance.demo import stem  # the demo app; imported only by this command

    stem.configure(load_settings(env=env))
    log_path = directory / "demo.log"
    try:
        _ = stem.broker  # opening it creates the schema before the supervisor starts
        output.demo_started(url, args.concurrency, log_path)
        proc = _start_supervisor(env, args.concurrency, log_path)
        try:
            summary = _run_burst(stem, proc, args.tasks)
        finally:
            stop_problem = _stop(proc)
    finally:
        stem.close()
    if stop_problem:
        summary.problems.append(stop_problem)
    output.demo_summary(summary)
    if summary.problems:
        output.log_tail(log_path)
    return 0 if not summary.problems else 1


def _prepare(text: str) -> Path:
    """The demo's directory, created, with its old demo.* files gone; a directory that
    cannot be used is a ConfigError naming it (one line, exit 78), not an OSError."""
    try:
        directory = Path(text).resolve()
        _wipe(directory)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError("command line", "--dir", f"cannot use {text!r}: {reason}") from None
    return directory


def _wipe(directory: Path) -> None:
    # Only the demo's own files: --dir may point somewhere that holds other things.
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("demo.*"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _start_supervisor(
    env: dict[str, str], concurrency: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """The real `stem worker run`, in its own session, logging to `log_path`."""
    command = [
        sys.executable,
        "-m",
        "appliance",
        "worker",
        "run",
        "--app",
        "appliance.demo:stem",
        "--concurrency",
        str(concurrency),
    ]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # a Ctrl-C at the terminal reaches only the demo
        )


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """Warm shutdown (SIGTERM); returns what went wrong, or "" if it stopped cleanly."""
    if proc.poll() is not None:
        return ""  # it died during the burst: _watch already reported that
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the children go too
        proc.wait()
        return f"the supervisor did not stop within {STOP_GRACE:.0f}s of SIGTERM"
    return f"the supervisor exited with status {code} after SIGTERM" if code else ""


def _run_burst(stem: Stem, proc: subprocess.Popen[bytes], adds: int) -> DemoSummary:
    started = time.monotonic()
    requests = [EnqueueRequest(name) for name in SPECIALS]
    requests += [EnqueueRequest("demo.add", {"x": i, "y": i}) for i in range(adds)]
    handles = stem.enqueue_many(requests)
    ids = [h.id for h in handles]
    special_ids = dict(zip(SPECIALS, ids, strict=False))
    results, retries, problems = _watch(stem, proc, ids, started)
    elapsed = time.monotonic() - started
    observer = Observer(stem)
    dead = observer.dlq_list(page_size=max(50, len(ids))).entries
    problems += check_outcome(results, special_ids, ids[len(SPECIALS) :], dead)
    states: dict[str, int] = {}
    for task_id in ids:
        state = results[task_id].state if task_id in results else TaskState.PENDING
        states[state] = states.get(state, 0) + 1
    return DemoSummary(len(ids), elapsed, states, retries, dead, problems)


def _watch(
    stem: Stem, proc: subprocess.Popen[bytes], ids: list[str], started: float
) -> tuple[dict[str, TaskResult], int, list[str]]:
    """Poll until every task is final, the supervisor dies, or the deadline passes."""
    line = output.ProgressLine()
    retries: dict[str, int] = {}
    while True:
        results = stem.backend.get_many(ids)
        for task_id, result in results.items():
            # A RETRY result means one more attempt is on its way.
            seen = result.attempt + (result.state is TaskState.RETRY)
            retries[task_id] = max(retries.get(task_id, 0), seen)
        done = sum(r.state.is_final for r in results.values())
        elapsed = time.monotonic() - started
        text = output.demo_progress(
            done, len(ids), sum(retries.values()), stem.broker.dlq_count(), elapsed
        )
        problem = _stalled(proc, elapsed)
        if done == len(ids) or problem:
            line.finish(text)
            return results, sum(retries.values()), [problem] if problem else []
        line.update(text)
        time.sleep(POLL)


def _stalled(proc: subprocess.Popen[bytes], elapsed: float) -> str:
    if proc.poll() is not None:
        return f"the supervisor exited early with status {proc.returncode}"
    if elapsed > DEADLINE:
        return f"not every task was final after {DEADLINE:.0f}s"
    return ""


def check_outcome(
    results: dict[str, TaskResult],
    special: dict[str, str],
    add_ids: list[str],
    dead: list[DeadLetter],
) -> list[str]:
    """Everything that ended differently from what the demo tasks are built to do."""
    problems = []
    wrong_adds = [i for i in add_ids if _state(results, i) is not TaskState.SUCCESS]
    if wrong_adds:
        problems.append(f"{len(wrong_adds)} demo.add task(s) did not succeed")
    flaky = results.get(special["demo.flaky"])
    if flaky is None or flaky.state is not TaskState.SUCCESS or flaky.attempt != 2:
        problems.append(f"demo.flaky should succeed on attempt 2, got {_describe(flaky)}")
    if _state(results, special["demo.progress"]) is not TaskState.SUCCESS:
        problems.append(
            f"demo.progress should succeed, got {_describe(results.get(special['demo.progress']))}"
        )
    by_task = {entry.task_id: entry for entry in dead}
    for name, reason, error_type in (
        ("demo.always_fails", "exhausted", "ValueError"),
        ("demo.sleepy", None, "TimeLimitExceeded"),
    ):
        entry = by_task.get(special[name])
        if entry is None:
            problems.append(f"{name} should be in the dead-letter queue")
        elif entry.error_type != error_type or reason not in (None, entry.reason):
            problems.append(
                f"{name} should be dead with {error_type}"
                f"{f' ({reason})' if reason else ''}, got "
                f"{entry.error_type} ({entry.reason})"
            )
    return problems


def _state(results: dict[str, TaskResult], task_id: str) -> TaskState:
    found = results.get(task_id)
    return found.state if found is not None else TaskState.PENDING


def _describe(result: TaskResult | None) -> str:
    if result is None:
        return "no result"
    error = f", {result.error.type}: {result.error.message}" if result.error else ""
    return f"{result.state} on attempt {result.attempt}{error}"
