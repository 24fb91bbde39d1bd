"""The real `stem` command, run as a subprocess against SQLite files in tmp_path (plus
the demo's verdict and progress line, checked in-process at the end)."""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from appliance.app import Stem
from appliance.backend.protocol import ErrorInfo, TaskResult
from appliance.broker.protocol import Consumer, DeadLetterInfo, Settlement
from appliance.cli.demo import SPECIALS, check_outcome
from appliance.cli.output import ProgressLine
from appliance.config import Settings
from appliance.observe import DeadLetter
from appliance.states import DeadLetterReason, ExitCode, TaskState
from tests.conftest import wait_until
from tests.process import WorkerProcess

STEM = Path(sys.executable).parent / "stem"  # the installed console script


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without STEM_* settings that would leak into the command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEM_")}
    return env | extra


def stem(
    *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(STEM), *argv],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return orjson.loads(ok(result))


def assert_user_error(
    result: subprocess.CompletedProcess[str], code: ExitCode, *words: str
) -> None:
    """One `stem: error:` line, the exit code, and never a traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stem: error: "), result.stderr
    for word in words:
        assert word in lines[0]
    assert result.stdout == ""


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stem.db'}"


@pytest.fixture
def app(url: str) -> Iterator[Stem]:
    """The test's own view of the store the commands use."""
    opened = Stem(settings=Settings(broker_url=url))
    yield opened
    opened.close()


def cli(tmp_path: Path, url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return stem(*argv, "--broker", url, cwd=tmp_path)


def dead_letters(app: Stem, count: int) -> list[str]:
    """Put `count` tasks in the DLQ the way a worker does: claim, settle DEAD, store DEAD."""
    handles = app.enqueue_many([("demo.add", {"x": i, "y": i}) for i in range(count)])
    deliveries = app.broker.claim(["default"], count, consumer=Consumer.this_process(), lease=30)
    assert len(deliveries) == count
    info = DeadLetterInfo(
        DeadLetterReason.EXHAUSTED,
        "ValueError",
        "boom",
        "Traceback (most recent call last):\nValueError: boom",
    )
    app.broker.settle([Settlement.dead_letter(d, info) for d in deliveries])
    app.backend.store(
        [
            TaskResult(
                h.id,
                TaskState.DEAD,
                name="demo.add",
                queue="default",
                attempt=3,
                error=ErrorInfo("ValueError", "boom"),
            )
            for h in handles
        ]
    )
    return [h.id for h in handles]


# --- enqueue ------------------------------------------------------------------------------


def test_enqueue_prints_the_id_and_the_row_exists(tmp_path: Path, url: str, app: Stem) -> None:
    task_id = ok(cli(tmp_path, url, "enqueue", "demo.add", "--args", '{"x": 1, "y": 2}')).strip()
    message = app.broker.find_message(task_id)
    assert message is not None
    assert (message.name, message.queue, message.state) == ("demo.add", "default", "ready")


def test_enqueue_options_and_json(tmp_path: Path, url: str, app: Stem) -> None:
    out = as_json(
        cli(
            tmp_path,
            url,
            "enqueue",
            "report.build",
            "--queue",
            "reports",
            "--countdown",
            "60",
            "--priority",
            "3",
            "--json",
        )
    )
    assert out["name"] == "report.build" and out["queue"] == "reports"
    message = app.broker.find_message(out["id"])
    assert message is not None
    assert (message.queue, message.priority, message.state) == ("reports", 3, "delayed")


def test_enqueue_with_app_checks_the_args_before_storing(
    tmp_path: Path, url: str, app: Stem
) -> None:
    result = cli(
        tmp_path, url, "enqueue", "demo.add", "--args", '{"x": 1}', "--app", "appliance.demo:stem"
    )
    assert_user_error(result, ExitCode.USAGE, "missing required argument(s) y")
    unknown = cli(tmp_path, url, "enqueue", "demo.nope", "--app", "appliance.demo:stem")
    assert_user_error(unknown, ExitCode.USAGE, "no task named 'demo.nope'")
    assert app.broker.queue_stats() == []


@pytest.mark.parametrize(
    ("args", "words"),
    [("{not json", "--args is not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_enqueue_bad_args_json(tmp_path: Path, url: str, app: Stem, args: str, words: str) -> None:
    assert_user_error(
        cli(tmp_path, url, "enqueue", "demo.add", "--args", args), ExitCode.USAGE, words
    )
    assert app.broker.queue_stats() == []


def test_enqueue_oversized_payload_is_refused(tmp_path: Path, url: str, app: Stem) -> None:
    # A small limit from the environment: one argv string cannot exceed 128 KiB.
    big = orjson.dumps({"blob": "x" * 2000}).decode()
    env = clean_env(STEM_MAX_PAYLOAD_BYTES="1KiB")
    result = stem("enqueue", "demo.blob", "--args", big, "--broker", url, cwd=tmp_path, env=env)
    assert_user_error(result, ExitCode.USAGE, "1024-byte limit", "pass a reference")
    assert app.broker.queue_stats() == []


# --- observe ------------------------------------------------------------------------------


def test_observe_queues(tmp_path: Path, url: str, app: Stem) -> None:
    assert app.broker.queue_stats() == []  # the store exists, and is empty
    assert "no messages waiting, in flight or dead" in ok(cli(tmp_path, url, "observe", "queues"))
    app.enqueue("a.task", queue="alpha")
    app.enqueue("a.task", queue="beta", countdown=60)
    lines = ok(cli(tmp_path, url, "observe", "queues")).splitlines()
    assert lines[0].split() == ["QUEUE", "READY", "DELAYED", "IN-FLIGHT", "DEAD", "PAUSED"]
    assert [line.split() for line in lines[1:]] == [
        ["alpha", "1", "0", "0", "0", "-"],
        ["beta", "0", "1", "0", "0", "-"],
    ]
    stats = as_json(cli(tmp_path, url, "observe", "queues", "--json"))
    assert stats == [
        {"queue": "alpha", "ready": 1, "delayed": 0, "in_flight": 0, "dead": 0, "paused": False},
        {"queue": "beta", "ready": 0, "delayed": 1, "in_flight": 0, "dead": 0, "paused": False},
    ]


def test_observe_tasks_list(tmp_path: Path, url: str, app: Stem) -> None:
    first = app.enqueue("a.task", queue="alpha").id
    second = app.enqueue("b.task", queue="beta").id
    text = ok(cli(tmp_path, url, "observe", "tasks", "list"))
    assert first in text and second in text and "a.task" in text
    listed = as_json(cli(tmp_path, url, "observe", "tasks", "list", "--json"))
    assert [m["task_id"] for m in listed] == [first, second]
    assert listed[0]["state"] == "ready" and listed[0]["name"] == "a.task"
    only_beta = as_json(cli(tmp_path, url, "observe", "tasks", "list", "--queue", "beta", "--json"))
    assert [m["task_id"] for m in only_beta] == [second]
    limited = as_json(cli(tmp_path, url, "observe", "tasks", "list", "--limit", "1", "--json"))
    assert len(limited) == 1


def test_observe_tasks_show_merges_message_and_result(tmp_path: Path, url: str, app: Stem) -> None:
    waiting = app.enqueue("a.task", args={"n": 1}).id
    shown = as_json(cli(tmp_path, url, "observe", "tasks", "show", "--id", waiting, "--json"))
    assert shown["state"] == "PENDING"
    assert shown["message"]["name"] == "a.task" and shown["result"] is None
    assert "PENDING" in ok(cli(tmp_path, url, "observe", "tasks", "show", "--id", waiting))

    app.backend.store([TaskResult("done-1", TaskState.SUCCESS, name="a.task", value={"ok": 1})])
    done = as_json(cli(tmp_path, url, "observe", "tasks", "show", "--id", "done-1", "--json"))
    assert done["state"] == "SUCCESS" and done["message"] is None
    assert done["result"]["value"] == {"ok": 1}
    text = ok(cli(tmp_path, url, "observe", "tasks", "show", "--id", "done-1"))
    assert "SUCCESS" in text and '{"ok":1}' in text


def test_observe_tasks_show_unknown_id(tmp_path: Path, url: str, app: Stem) -> None:
    assert app.broker.find_message("nope") is None  # the store exists
    result = cli(tmp_path, url, "observe", "tasks", "show", "--id", "nope")
    assert_user_error(result, ExitCode.FAILURE, "no task with id 'nope'")


# --- the dead-letter queue ------------------------------------------------------------------


def test_dlq_list_and_pages(tmp_path: Path, url: str, app: Stem) -> None:
    assert app.broker.dlq_count() == 0  # the store exists, and is empty
    assert "empty" in ok(cli(tmp_path, url, "dlq", "list"))
    task_ids = dead_letters(app, 3)
    text = ok(cli(tmp_path, url, "dlq", "list"))
    assert "exhausted" in text and "ValueError" in text and "page 1 of 1 (3 entries)" in text
    page = as_json(
        cli(tmp_path, url, "dlq", "list", "default", "--page-size", "2", "--page", "2", "--json")
    )
    assert (page["total"], page["pages"], page["page"], len(page["entries"])) == (3, 2, 2, 1)
    everything = as_json(cli(tmp_path, url, "dlq", "list", "--json"))["entries"]
    assert sorted(e["task_id"] for e in everything) == sorted(task_ids)
    assert {e["reason"] for e in everything} == {"exhausted"}
    other = as_json(cli(tmp_path, url, "dlq", "list", "elsewhere", "--json"))
    assert other["total"] == 0


def test_dlq_show(tmp_path: Path, url: str, app: Stem) -> None:
    [task_id] = dead_letters(app, 1)
    [entry] = as_json(cli(tmp_path, url, "dlq", "list", "--json"))["entries"]
    shown = as_json(cli(tmp_path, url, "dlq", "show", entry["id"], "--json"))
    assert shown["task_id"] == task_id and shown["args"] == {"x": 0, "y": 0}
    assert shown["error_type"] == "ValueError" and "ValueError: boom" in shown["traceback"]
    text = ok(cli(tmp_path, url, "dlq", "show", entry["id"]))
    assert "exhausted" in text and "Traceback" in text and '{"x":0,"y":0}' in text
    assert_user_error(
        cli(tmp_path, url, "dlq", "show", "no-such-entry"), ExitCode.FAILURE, "no dead letter"
    )


def test_dlq_replay_needs_confirm_and_changes_nothing_without(
    tmp_path: Path, url: str, app: Stem
) -> None:
    dead_letters(app, 2)
    before = app.broker.queue_stats()
    result = cli(tmp_path, url, "dlq", "replay")
    assert_user_error(result, ExitCode.USAGE, "--confirm", "2 dead letter(s)")
    assert app.broker.queue_stats() == before
    assert app.broker.dlq_count() == 2


def test_dlq_replay_puts_tasks_back_as_pending(tmp_path: Path, url: str, app: Stem) -> None:
    task_ids = dead_letters(app, 3)
    out = as_json(cli(tmp_path, url, "dlq", "replay", "--limit", "1", "--confirm", "--json"))
    assert out["count"] == 1
    [replayed] = out["replayed"]
    assert replayed in task_ids
    assert app.broker.dlq_count() == 2
    shown = as_json(cli(tmp_path, url, "observe", "tasks", "show", "--id", replayed, "--json"))
    assert shown["state"] == "PENDING"  # its DEAD result was forgotten
    assert shown["message"]["state"] == "ready" and shown["message"]["attempt"] == 0
    text = ok(cli(tmp_path, url, "dlq", "replay", "default", "--confirm"))
    assert "replayed 2 dead letter(s)" in text
    assert app.broker.dlq_count() == 0


def test_dlq_purge_needs_confirm(tmp_path: Path, url: str, app: Stem) -> None:
    dead_letters(app, 2)
    assert_user_error(cli(tmp_path, url, "dlq", "purge"), ExitCode.USAGE, "--confirm")
    assert app.broker.dlq_count() == 2
    assert as_json(cli(tmp_path, url, "dlq", "purge", "--confirm", "--json")) == {"purged": 2}
    assert app.broker.dlq_count() == 0


# --- errors -------------------------------------------------------------------------------


def test_unknown_command(tmp_path: Path) -> None:
    assert_user_error(stem("frobnicate", cwd=tmp_path), ExitCode.USAGE, "invalid choice")
    assert_user_error(stem("observe", cwd=tmp_path), ExitCode.USAGE, "required")
    assert_user_error(stem("dlq", "list", "--page", "0", cwd=tmp_path), ExitCode.USAGE, "--page")


def test_bad_broker_url_scheme(tmp_path: Path) -> None:
    result = stem("observe", "queues", "--broker", "mysql://db/x", cwd=tmp_path)
    assert_user_error(result, ExitCode.CONFIG, "--broker", "unsupported scheme 'mysql'")
    from_env = stem("dlq", "list", cwd=tmp_path, env=clean_env(STEM_BROKER_URL="amqp://x"))
    assert_user_error(from_env, ExitCode.CONFIG, "STEM_BROKER_URL", "'amqp'")
    backend = stem("observe", "queues", "--result-backend", "s3://bucket", cwd=tmp_path)
    assert_user_error(backend, ExitCode.CONFIG, "--result-backend")


def test_unreachable_broker(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = stem("observe", "queues", "--broker", f"redis://127.0.0.1:{port}/0", cwd=tmp_path)
    assert_user_error(result, ExitCode.UNAVAILABLE, "unreachable")


def test_bad_config_file_value_names_file_key_and_reason(tmp_path: Path) -> None:
    config = tmp_path / "stem.toml"
    config.write_text('[log]\nformat = "xml"\n')
    result = stem("observe", "queues", "--config", str(config), cwd=tmp_path)
    assert_user_error(result, ExitCode.CONFIG, str(config), "format", "must be one of")
    via_env = stem("observe", "queues", cwd=tmp_path, env=clean_env(STEM_CONFIG=str(config)))
    assert_user_error(via_env, ExitCode.CONFIG, str(config))


def test_missing_app_module(tmp_path: Path, url: str) -> None:
    result = cli(tmp_path, url, "worker", "run", "--app", "no_such_module:stem")
    assert_user_error(result, ExitCode.USAGE, "no module named 'no_such_module'")
    not_a_stem = cli(tmp_path, url, "observe", "queues", "--app", "appliance.demo:add")
    assert_user_error(not_a_stem, ExitCode.USAGE, "expected a Stem")
    shape = cli(tmp_path, url, "worker", "run", "--app", "appliance.demo")
    assert_user_error(shape, ExitCode.USAGE, "MODULE:ATTR")


def test_app_module_that_fails_at_import(tmp_path: Path, url: str) -> None:
    (tmp_path / "broken_app.py").write_text("import json\n1 / 0\n")
    result = cli(tmp_path, url, "worker", "run", "--app", "broken_app:stem")
    assert_user_error(result, ExitCode.FAILURE, "broken_app.py:2", "ZeroDivisionError")


def test_app_is_found_in_the_working_directory(tmp_path: Path, url: str) -> None:
    (tmp_path / "my_app.py").write_text(
        "from appliance import Stem\nstem = Stem()\n\n"
        "@stem.task('my.task')\ndef my_task(ctx, n: int) -> int:\n    return n\n"
    )
    result = cli(tmp_path, url, "enqueue", "my.task", "--args", '{"n": 1}', "--app", "my_app:stem")
    assert len(ok(result).strip()) == 32


def test_worker_run_argument_errors(tmp_path: Path, url: str) -> None:
    assert_user_error(cli(tmp_path, url, "worker", "run"), ExitCode.USAGE, "--app")
    zero = cli(tmp_path, url, "worker", "run", "--app", "appliance.demo:stem", "--concurrency", "0")
    assert_user_error(zero, ExitCode.USAGE, "--concurrency", "must be >= 1")
    config = tmp_path / "stem.toml"
    config.write_text("[worker]\nprefetch = -2\n")
    bad = cli(
        tmp_path, url, "worker", "run", "--app", "appliance.demo:stem", "--config", str(config)
    )
    assert_user_error(bad, ExitCode.CONFIG, str(config), "prefetch")


# --- user errors that were tracebacks (exit 70) -------------------------------------------


def test_a_config_path_that_is_a_directory_is_one_line_and_exit_78(tmp_path: Path) -> None:
    result = stem("observe", "queues", "--config", str(tmp_path), cwd=tmp_path)
    assert_user_error(result, ExitCode.CONFIG, str(tmp_path), "is a directory")
    via_env = stem("dlq", "list", cwd=tmp_path, env=clean_env(STEM_CONFIG="/proc"))
    assert_user_error(via_env, ExitCode.CONFIG, "/proc", "is a directory")


@pytest.mark.parametrize("flag", ["--page", "--page-size"])
def test_a_page_beyond_64_bits_is_a_usage_error(tmp_path: Path, url: str, flag: str) -> None:
    result = cli(tmp_path, url, "dlq", "list", flag, "999999999999999999999")
    assert_user_error(result, ExitCode.USAGE, flag, "must be >= 1 and <= 2147483647")


@pytest.mark.parametrize(
    "argv",
    [
        ("observe", "tasks", "list", "--offset", "-99999999999999999999"),
        ("observe", "tasks", "list", "--offset", "-1"),
        ("observe", "tasks", "list", "--limit", str(2**63)),
        ("dlq", "replay", "--limit", str(2**70), "--confirm"),
    ],
)
def test_counts_out_of_range_are_usage_errors(
    tmp_path: Path, url: str, argv: tuple[str, ...]
) -> None:
    flag = next(a for a in argv if a in ("--offset", "--limit"))
    assert_user_error(cli(tmp_path, url, *argv), ExitCode.USAGE, flag, "2147483647")


A_FILE = "a-file"  # a regular file in tmp_path: nothing can be created below it


@pytest.mark.parametrize(
    "path",
    ["/proc/x.db", "/proc/x/y.db", f"{A_FILE}/x.db", f"{A_FILE}/sub/x.db", "x" * 300 + ".db"],
)
def test_a_database_path_that_cannot_be_created_is_one_line(tmp_path: Path, path: str) -> None:
    (tmp_path / A_FILE).write_text("not a directory\n")
    target = path if path.startswith("/") else str(tmp_path / path)
    result = stem("observe", "queues", "--broker", f"sqlite:///{target}", cwd=tmp_path)
    assert result.returncode in (ExitCode.UNAVAILABLE, ExitCode.CONFIG), result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("stem: error: ") and target[:40] in line


def test_a_demo_dir_where_no_database_can_be_created_is_one_line(tmp_path: Path) -> None:
    result = stem("demo", "--dir", "/proc", cwd=tmp_path)
    assert result.returncode in (ExitCode.UNAVAILABLE, ExitCode.CONFIG), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_demo_dir_that_cannot_be_created_is_exit_78(tmp_path: Path) -> None:
    (tmp_path / A_FILE).write_text("not a directory\n")
    result = stem("demo", "--dir", f"{A_FILE}/demo", cwd=tmp_path)
    assert_user_error(result, ExitCode.CONFIG, "--dir", "Not a directory")


def test_arguments_that_are_not_utf8_are_refused_in_one_line(tmp_path: Path, url: str) -> None:
    # Bytes that are not UTF-8 reach Python as lone surrogates, which crashed SQLite's
    # encoder (exit 70) for a queue filter or an id.
    for argv in (["dlq", "show", "\udcff"], ["observe", "tasks", "list", "--queue", "q\udcff"]):
        result = subprocess.run(
            [os.fsencode(str(STEM)), *(os.fsencode(a) for a in argv), b"--broker", url.encode()],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert_user_error(result, ExitCode.USAGE, "not valid UTF-8")


def test_an_empty_app_is_a_usage_error_not_a_worker_without_tasks(tmp_path: Path, url: str) -> None:
    # A regression: `--app ""` ran a supervisor with no tasks, which would dead-letter
    # everything it claimed as unknown.
    result = cli(tmp_path, url, "worker", "run", "--app", "")
    assert_user_error(result, ExitCode.USAGE, "MODULE:ATTR")


def test_an_option_given_a_bare_double_dash_is_a_usage_error(tmp_path: Path, url: str) -> None:
    # argparse hands `--app=--` an empty list, which crashed load_app (exit 70).
    result = cli(tmp_path, url, "observe", "queues", "--app=--")
    assert_user_error(result, ExitCode.USAGE, "--app", "expected one argument")


def test_an_error_quoting_control_characters_stays_one_line(tmp_path: Path, url: str) -> None:
    result = cli(tmp_path, url, "enqueue", "t", "--queue", "a\nb\x1b[2J")
    assert_user_error(result, ExitCode.USAGE, "queue must be printable", "\\n")
    assert "\x1b" not in result.stderr


# --- accepted but harmful values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("--priority", str(2**70)), ("--priority", "priority must be <= 2147483647")),
        (("--priority", "-2147483649"), ("--priority", "priority must be >= -2147483648")),
        (("--countdown", "1e308"), ("--countdown", "at most 315360000 seconds (10 years)")),
        (("--countdown", "nan"), ("--countdown", "must be >= 0")),
        (("--queue", ""), ("queue must not be empty",)),
        (("--queue", "a\x01"), ("queue must be printable",)),
    ],
)
def test_enqueue_refuses_harmful_values_and_stores_nothing(
    tmp_path: Path, url: str, app: Stem, argv: tuple[str, ...], words: tuple[str, ...]
) -> None:
    assert_user_error(cli(tmp_path, url, "enqueue", "t", *argv), ExitCode.USAGE, *words)
    assert app.broker.list_messages() == []


@pytest.mark.parametrize("name", ["", "a\x01b", "x" * 201])
def test_enqueue_refuses_a_bad_task_name(tmp_path: Path, url: str, app: Stem, name: str) -> None:
    assert_user_error(cli(tmp_path, url, "enqueue", name), ExitCode.USAGE, "task name")
    assert app.broker.list_messages() == []


def test_a_heartbeat_timeout_of_one_millisecond_stops_the_worker_at_start(
    tmp_path: Path, url: str
) -> None:
    # A regression: it was accepted, and every child was killed as silent in a loop.
    env = clean_env(STEM_HEARTBEAT_TIMEOUT="1ms")
    result = stem(
        "worker", "run", "--app", "appliance.demo:stem", "--broker", url, cwd=tmp_path, env=env
    )
    assert_user_error(result, ExitCode.CONFIG, "STEM_HEARTBEAT_TIMEOUT", "at least 1.5s")


def test_a_concurrency_above_the_maximum_is_refused(tmp_path: Path, url: str) -> None:
    result = cli(
        tmp_path, url, "worker", "run", "--app", "appliance.demo:stem", "--concurrency", "5000"
    )
    assert_user_error(result, ExitCode.USAGE, "--concurrency", "must be <= 1024")
    from_env = stem(
        "worker", "run", "--app", "appliance.demo:stem", "--broker", url,
        cwd=tmp_path, env=clean_env(STEM_CONCURRENCY="5000"),
    )  # fmt: skip
    assert_user_error(from_env, ExitCode.CONFIG, "STEM_CONCURRENCY", "must be <= 1024")


def test_python_dash_m_appliance(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and result.stdout.startswith("stem ")


# --- the real worker and the demo ------------------------------------------------------------


@pytest.mark.process
def test_worker_run_runs_what_enqueue_stores(tmp_path: Path, url: str, app: Stem) -> None:
    worker = WorkerProcess(tmp_path, url, app="appliance.demo:stem", concurrency=1).start()
    try:
        task_id = ok(cli(tmp_path, url, "enqueue", "demo.add", "--args", '{"x": 2, "y": 3}'))
        task_id = task_id.strip()

        def finished() -> bool:
            found = app.backend.get(task_id)
            return found is not None and found.state.is_final

        assert wait_until(finished, timeout=20), worker.read_log()
        shown = as_json(cli(tmp_path, url, "observe", "tasks", "show", "--id", task_id, "--json"))
        assert shown["state"] == "SUCCESS" and shown["result"]["value"] == 5
    finally:
        worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.read_log()


@pytest.mark.process
def test_demo_finishes_with_the_expected_outcome(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    (demo_dir / "keep.txt").write_text("not the demo's")  # the wipe spares other files
    result = stem(
        "demo", "--dir", str(demo_dir), "--tasks", "50", "--concurrency", "2", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Demo OK" in result.stdout
    assert "demo.always_fails" in result.stdout and "TimeLimitExceeded" in result.stdout
    assert "54/54 tasks final" in result.stdout
    assert (demo_dir / "keep.txt").exists()


# --- the demo's verdict and live line (in-process) -------------------------------------------


def demo_results(**changes: TaskResult) -> tuple[dict[str, TaskResult], dict[str, str], list[str]]:
    special = {name: f"id-{name}" for name in SPECIALS}
    results = {
        special["demo.flaky"]: TaskResult("f", TaskState.SUCCESS, attempt=2),
        special["demo.progress"]: TaskResult("p", TaskState.SUCCESS),
        "add-1": TaskResult("add-1", TaskState.SUCCESS),
    }
    for name, result in changes.items():
        results[special[f"demo.{name}"]] = result
    return results, special, ["add-1"]


def dead(task_id: str, error_type: str, reason: str = "exhausted") -> DeadLetter:
    return DeadLetter(
        id="d",
        task_id=task_id,
        name=None,
        queue="default",
        reason=reason,
        error_type=error_type,
        message="",
        traceback="",
        attempts=1,
        enqueued_at=None,
        dead_at=0.0,
        args={},
        raw=None,
    )


def test_demo_verdict_accepts_the_expected_outcome() -> None:
    results, special, adds = demo_results()
    dlq = [
        dead(special["demo.always_fails"], "ValueError"),
        dead(special["demo.sleepy"], "TimeLimitExceeded"),
    ]
    assert check_outcome(results, special, adds, dlq) == []


def test_demo_verdict_names_every_deviation() -> None:
    results, special, adds = demo_results(flaky=TaskResult("f", TaskState.SUCCESS, attempt=0))
    results["add-1"] = TaskResult("add-1", TaskState.DEAD)
    dlq = [dead(special["demo.always_fails"], "ValueError", reason="permanent")]
    problems = check_outcome(results, special, adds, dlq)
    assert problems == [
        "1 demo.add task(s) did not succeed",
        "demo.flaky should succeed on attempt 2, got SUCCESS on attempt 0",
        "demo.always_fails should be dead with ValueError (exhausted), got ValueError (permanent)",
        "demo.sleepy should be in the dead-letter queue",
    ]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_redraws_in_place_on_a_terminal() -> None:
    out = FakeTerminal()
    line = ProgressLine(out)
    line.update("1/2")
    line.finish("2/2")
    assert out.getvalue() == "\r\x1b[K1/2\r\x1b[K2/2\n"


def test_progress_line_prints_plain_lines_now_and_then_elsewhere() -> None:
    out = io.StringIO()
    line = ProgressLine(out, every=3600)
    line.update("1/3")
    line.update("2/3")  # too soon after the last line: skipped
    line.finish("3/3")
    assert out.getvalue() == "1/3\n3/3\n"


# --- reads never create or change files (issue 15) -----------------------------------------

READS = [
    ("observe", "queues"), ("observe", "workers"), ("observe", "tasks", "list"),
    ("observe", "tasks", "show", "--id", "x"), ("dlq", "list"), ("dlq", "show", "x"),
    ("dlq", "replay"), ("dlq", "purge"),
]  # fmt: skip


@pytest.mark.parametrize("argv", READS, ids=[" ".join(a) for a in READS])
def test_a_read_of_a_missing_database_creates_nothing(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    state = tmp_path / "state"
    result = cli(tmp_path, f"sqlite:///{state / 'stem.db'}", *argv)
    assert_user_error(result, ExitCode.UNAVAILABLE, "no Stem database at")
    assert not state.exists()  # not even the directory


@pytest.mark.parametrize("argv", READS, ids=[" ".join(a) for a in READS])
def test_another_programs_database_is_refused_and_left_as_it_was(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    # Regression: `stem observe queues` on another program's file added 11 tables and
    # switched it to WAL.
    theirs = tmp_path / "theirs.db"
    with sqlite3.connect(theirs) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (9.5)")
    conn.close()
    before = theirs.read_bytes()
    result = cli(tmp_path, f"sqlite:///{theirs}", *argv)
    assert_user_error(result, ExitCode.CONFIG, "not a Stem database")
    assert theirs.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("theirs")) == [
        "theirs.db"
    ]  # no -wal, -shm or -wake beside it


def test_a_writer_refuses_another_programs_database_too(tmp_path: Path) -> None:
    theirs = tmp_path / "app.db"
    with sqlite3.connect(theirs) as conn:
        conn.execute("PRAGMA application_id = 42")
    conn.close()
    result = cli(tmp_path, f"sqlite:///{theirs}", "enqueue", "a.task")
    assert_user_error(result, ExitCode.CONFIG, "application_id 0x2a")


def test_our_databases_carry_the_mark(tmp_path: Path, url: str) -> None:
    ok(cli(tmp_path, url, "enqueue", "a.task"))
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x5354454D
    conn.close()
