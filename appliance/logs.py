"""Logging setup: text or JSON lines on stderr, with the task and worker on every line.

The convention: a record about a task carries `task_id` (and `task`, `attempt`, `queue`
when known). Inside a running task they are filled in from
`appliance.context.current_task`, so a user's plain `logging.getLogger(__name__).info(...)`
line carries them without any effort; code that logs about a task from outside it (the
supervisor) passes `extra={"task_id": ...}` or uses `task_logger()`.

A supervisor names itself once with `set_worker(worker_id)`: every later line of that
process, and of the children it forks, carries `worker` (JSON) and the pid.

Every line passes a `Redactor` on its way out (`Redacting`): URL passwords, OTLP header
values and signing keys become `***`, whichever module logged them.

Under systemd (`JOURNAL_STREAM` names our stderr) each line starts with the `<N>`
syslog priority prefix that journald strips and stores as the entry's PRIORITY
(sd-daemon(3)), so `journalctl -p warning` works; the text stays as it was.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from appliance.context import current_task
from appliance.redaction import Redactor, secrets_of

if TYPE_CHECKING:
    from appliance.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(task_tag)s: %(message)s"

# syslog priorities (sd-daemon(3): SD_CRIT "<2>" ... SD_DEBUG "<7>") by logging level.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}

# This process's worker id (see `set_worker`); forked children inherit it.
_worker: str | None = None

# Marks the handler this module installed, so configuring twice replaces it instead of
# printing every line twice (the CLI and tests may call configure_logging repeatedly).
_OWNED = "_stem_handler"


def set_worker(worker: str | None) -> None:
    """Name the worker this process belongs to (the supervisor calls it once it knows its
    id); every line logged after it carries `worker`. None forgets it."""
    global _worker
    _worker = worker


class TaskIdFilter(logging.Filter):
    """Gives every record `task_id` (None outside tasks), the running task's `task`,
    `attempt` and `queue` when it has none of its own, `worker`, and `task_tag` for text."""

    def filter(self, record: logging.LogRecord) -> bool:
        task_id = getattr(record, "task_id", None)
        if task_id is None:
            running = current_task.get()
            if running is not None:
                task_id = running.id
                own = record.__dict__  # a user's own `extra` of the same name wins
                own.setdefault("task", running.name)
                own.setdefault("attempt", running.attempt)
                own.setdefault("queue", running.queue)
        record.task_id = task_id
        record.task_tag = f" [{task_id}]" if task_id else ""
        if _worker is not None and not hasattr(record, "worker"):
            record.worker = _worker
        return True


# Optional fields of a JSON line, in this order, present when the record has them.
_JSON_EXTRAS = ("task_id", "task", "attempt", "queue", "worker")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, message; the task fields only
    when the record is about a task, `worker` once `set_worker` named it."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key in _JSON_EXTRAS:
            value = getattr(record, key, None)
            if value is not None and value != "":
                line[key] = value
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


def task_logger(
    logger: logging.Logger,
    task_id: str,
    *,
    name: str | None = None,
    attempt: int | None = None,
    queue: str | None = None,
) -> TaskLogger:
    """`logger`, with `task_id` (and the task's name, attempt and queue when given)
    attached to every line it writes."""
    extra: dict[str, object] = {"task_id": task_id}
    for key, value in (("task", name), ("attempt", attempt), ("queue", queue)):
        if value is not None:
            extra[key] = value
    return TaskLogger(logger, extra)


class JournalPrefix(logging.Formatter):
    """Wraps a formatter: every physical line gets the record's `<N>` priority, so a
    traceback's lines land in the journal at the record's level, not at INFO."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


class Redacting(logging.Formatter):
    """Wraps a formatter: the whole formatted line (message, arguments, traceback) goes
    through `redact`, so no module can log a secret by quoting a URL or an error."""

    def __init__(self, inner: logging.Formatter, redact: Redactor) -> None:
        super().__init__()
        self.inner = inner
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(self.inner.format(record))


def _priority(levelno: int) -> int:
    for level, priority in _PRIORITY.items():  # highest first
        if levelno >= level:
            return priority
    return 7  # DEBUG and below


def journal_stream(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is the journal: systemd sets `JOURNAL_STREAM=DEV:INODE` to
    the stream it connected, and a redirect (`2>file`) changes the inode."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # io.StringIO has no fileno
        return False


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Install one stderr handler on the root logger per `settings.log_format`/`log_level`.

    Under systemd the lines go to stderr as everywhere (journald captures it), with the
    `<N>` priority prefix when stderr is the journal. Returns the handler (tests read
    from a stream of their own this way).
    """
    target = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(target)
    handler.addFilter(TaskIdFilter())
    formatter: logging.Formatter = (
        JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    formatter = Redacting(formatter, Redactor(secrets_of(settings)))
    if journal_stream(target):
        formatter = JournalPrefix(formatter)
    handler.setFormatter(formatter)
    setattr(handler, _OWNED, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OWNED, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler
