"""Logging setup: text or JSON lines on stderr, and the task id on every task log line.

The convention: a record about a task carries a `task_id` attribute. Inside a running
task it is filled in from `appliance.context.current_task`, so a user's plain
`logging.getLogger(__name__).info(...)` line carries it without any effort; code that
logs about a task from outside it (the supervisor) passes `extra={"task_id": ...}` or
uses `task_logger()`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from appliance.context import current_task

if TYPE_CHECKING:
    from appliance.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(task_tag)s: %(message)s"

# Marks the handler this module installed, so configuring twice replaces it instead of
# printing every line twice (the CLI and tests may call configure_logging repeatedly).
_OWNED = "_stem_handler"


class TaskIdFilter(logging.Filter):
    """Gives every record a `task_id` (None outside tasks) and a `task_tag` for text."""

    def filter(self, record: logging.LogRecord) -> bool:
        task_id = getattr(record, "task_id", None)
        if task_id is None:
            running = current_task.get()
            task_id = running.id if running is not None else None
        record.task_id = task_id
        record.task_tag = f" [{task_id}]" if task_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `task_id` only when the record is about a task."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id:
            line["task_id"] = task_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def _iso(created: float) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{stamp}.{int(created % 1 * 1000):03d}Z"


class TaskLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose every line is about one task (for code running outside it)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def task_logger(logger: logging.Logger, task_id: str) -> TaskLogger:
    """`logger`, with `task_id` attached to every line it writes."""
    return TaskLogger(logger, {"task_id": task_id})


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Install one stderr handler on the root logger per `settings.log_format`/`log_level`.

    Returns the handler (tests read from a stream of their own this way).
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(TaskIdFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    setattr(handler, _OWNED, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OWNED, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler
