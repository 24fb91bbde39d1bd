"""An app that connects a handler to every signal, recording each firing as one JSON line
(signal, pid, payload fields) in $STEM_TEST_SIGNALS; a raising handler on task_success;
tasks that succeed, fail, retry, log, and run past a soft or hard time limit; a Beat
entry every second."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import orjson

from appliance import Reject, Stem, TaskContext, signals

stem = Stem()  # broker from STEM_BROKER_URL, set by the test
RECORD = os.environ.get("STEM_TEST_SIGNALS", "/dev/null")
log = logging.getLogger("tests.signals_app")


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else repr(value)


def _recorder(name: str) -> Any:
    def record(payload: signals.Payload) -> None:
        fields = {f.name: _plain(getattr(payload, f.name)) for f in dataclasses.fields(payload)}
        line = orjson.dumps({"signal": name, "pid": os.getpid(), **fields}) + b"\n"
        fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    return record


def _broken_handler(payload: signals.TaskSuccess) -> None:
    raise RuntimeError("a handler that always raises")


_RECORDERS = [(signal, _recorder(signal.name)) for signal in signals.ALL]


def connect() -> None:
    """Connect the recorders and the raising handler. Done at import only in a worker
    (STEM_TEST_SIGNALS set): the pytest process imports this module too, and handlers
    left connected there would fire for every enqueue of every later test."""
    for signal, handler in _RECORDERS:
        signal.connect(handler)
    signals.task_success.connect(_broken_handler, sender="s.ok")


def disconnect() -> None:
    for signal, handler in _RECORDERS:
        signal.disconnect(handler)
    signals.task_success.disconnect(_broken_handler)


if "STEM_TEST_SIGNALS" in os.environ:
    connect()


@stem.task("s.ok")
def ok(ctx: TaskContext, n: int = 0) -> int:
    log.info("working on %d", n)  # a user's own logging line, inside the task
    return n


@stem.task("s.add")
def add(ctx: TaskContext, n: int = 0, previous: int = 0) -> int:
    return previous + n  # a chain's step: the step before it gives `previous`


@stem.task("s.fail", max_retries=1, retry_backoff=(0.05, 0.05, 0.0))
def fail(ctx: TaskContext) -> None:
    raise ValueError("always")


@stem.task("s.reject")
def reject(ctx: TaskContext) -> None:
    raise Reject("not this one")


@stem.task("s.soft", soft_time_limit=0.2, hard_time_limit=5, max_retries=0)
def soft(ctx: TaskContext) -> None:
    time.sleep(2)


@stem.task("s.hard", hard_time_limit=0.5, max_retries=0)
def hard(ctx: TaskContext) -> None:
    time.sleep(30)


stem.schedule("tick", "s.ok", every=1, args={"n": 7})
# Its args do not fit the task: every slot fails (schedule_entry_failed).
stem.schedule("broken", "s.ok", every=1, args={"nope": 1})
