"""Logging: text or JSON lines, and the task id on every line about a task."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from appliance.config import Settings
from appliance.context import TaskContext, current_task
from appliance.logs import configure_logging, task_logger


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
