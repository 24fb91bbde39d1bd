"""Logging: text or JSON lines, the task's fields on every line about a task, the worker
on a supervisor's lines, and journald's priority prefix under systemd."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from appliance.config import Settings
from appliance.context import TaskContext, current_task
from appliance.logs import configure_logging, journal_stream, set_worker, task_logger


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def capture(log_format: str) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(Settings(log_format=log_format, log_level="DEBUG"), stream)
    return stream


@pytest.mark.usefixtures("restore_root")
def test_text_lines_show_the_task_id_in_brackets() -> None:
    stream = capture("text")
    log = logging.getLogger("app.billing")
    log.info("outside any task")
    task_logger(log, "abc123").warning("charged %d", 5)
    first, second = stream.getvalue().splitlines()
    assert "INFO" in first and "app.billing: outside any task" in first and "[" not in first
    assert "WARNING" in second and "app.billing [abc123]: charged 5" in second


@pytest.mark.usefixtures("restore_root")
def test_json_lines_carry_task_id_only_when_about_a_task() -> None:
    stream = capture("json")
    log = logging.getLogger("app")
    log.info("plain")
    log.error("failed", extra={"task_id": "t-1"})
    plain, failed = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert plain["message"] == "plain" and "task_id" not in plain
    assert plain["level"] == "INFO" and plain["logger"] == "app" and plain["ts"].endswith("Z")
    assert failed["task_id"] == "t-1" and failed["level"] == "ERROR"


@pytest.mark.usefixtures("restore_root")
def test_lines_logged_inside_a_task_get_its_id() -> None:
    stream = capture("json")
    token = current_task.set(TaskContext(id="running-7", name="demo.add"))
    try:
        logging.getLogger("user.code").info("no extra given")
    finally:
        current_task.reset(token)
    assert orjson.loads(stream.getvalue())["task_id"] == "running-7"


@pytest.mark.usefixtures("restore_root")
def test_json_lines_include_the_exception() -> None:
    stream = capture("json")
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("app").exception("lookup failed")
    line = orjson.loads(stream.getvalue())
    assert "KeyError: 'missing'" in line["exc"]


@pytest.mark.usefixtures("restore_root")
def test_configuring_twice_replaces_the_handler() -> None:
    capture("text")
    stream = capture("text")
    logging.getLogger("app").info("once")
    assert stream.getvalue().count("once") == 1
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_stem_handler", False)]
    assert len(ours) == 1


@pytest.mark.usefixtures("restore_root")
def test_level_from_settings() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_level="WARNING"), stream)
    logging.getLogger("app").info("hidden")
    logging.getLogger("app").warning("shown")
    assert "hidden" not in stream.getvalue() and "shown" in stream.getvalue()


@pytest.fixture
def no_worker() -> Iterator[None]:
    yield
    set_worker(None)


@pytest.mark.usefixtures("restore_root", "no_worker")
def test_json_lines_inside_a_task_carry_its_name_attempt_and_queue() -> None:
    stream = capture("json")
    ctx = TaskContext(id="t-9", name="email.send", attempt=2, queue="email")
    token = current_task.set(ctx)
    try:
        logging.getLogger("user.code").warning("smtp slow", extra={"queue": "own"})
        logging.getLogger("user.code").info("sent")
    finally:
        current_task.reset(token)
    logging.getLogger("user.code").info("after")
    own, sent, after = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert sent["task_id"] == "t-9" and sent["task"] == "email.send"
    assert sent["attempt"] == 2 and sent["queue"] == "email"
    assert own["queue"] == "own"  # a user's own extra is not overwritten
    assert not {"task_id", "task", "attempt", "queue"} & set(after)


@pytest.mark.usefixtures("restore_root", "no_worker")
def test_supervisor_lines_carry_worker_and_pid() -> None:
    stream = capture("json")
    logging.getLogger("stem.worker").info("before set_worker")
    set_worker("edge-1:4242")
    logging.getLogger("stem.worker").info("ready")
    task_logger(logging.getLogger("stem.worker"), "t-3", name="a.b", attempt=1, queue="q").info(
        "retrying"
    )
    before, ready, retrying = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert "worker" not in before
    assert ready["worker"] == "edge-1:4242" and ready["pid"] == os.getpid()
    assert retrying["worker"] == "edge-1:4242"
    assert (retrying["task_id"], retrying["task"], retrying["attempt"]) == ("t-3", "a.b", 1)
    assert retrying["queue"] == "q"


@pytest.mark.usefixtures("restore_root")
def test_under_journald_every_line_gets_the_syslog_priority(tmp_path: Path) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        stat = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        assert journal_stream(stream, env)
        assert not journal_stream(stream, {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
        assert not journal_stream(io.StringIO(), env)
        old = os.environ.get("JOURNAL_STREAM")
        os.environ["JOURNAL_STREAM"] = env["JOURNAL_STREAM"]
        try:
            configure_logging(Settings(log_level="DEBUG"), stream)
        finally:
            os.environ.pop("JOURNAL_STREAM")
            if old is not None:
                os.environ["JOURNAL_STREAM"] = old
        log = logging.getLogger("app")
        log.debug("d")
        log.info("i")
        log.warning("w")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("e")
        log.critical("c")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert [line[:3] for line in lines[:3]] == ["<7>", "<6>", "<4>"]
    assert lines[3].startswith("<3>") and lines[3].endswith("app: e")
    traceback_lines = lines[4:-1]
    assert traceback_lines and all(line.startswith("<3>") for line in traceback_lines)
    assert "<3>ValueError: boom" in traceback_lines
    assert lines[-1].startswith("<2>")


@pytest.mark.usefixtures("restore_root")
def test_a_redirected_stderr_gets_no_prefix() -> None:
    stream = capture("text")  # JOURNAL_STREAM unset, or naming another file
    logging.getLogger("app").warning("plain")
    assert not stream.getvalue().startswith("<")
