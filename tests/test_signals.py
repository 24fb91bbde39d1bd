"""Signals: connect/disconnect, the sender filter, decorators, a raising handler logged
and swallowed, enable/disable from the environment, handlers surviving fork, and the
docs table kept in step with the module."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from appliance import signals
from appliance.config import load_settings
from appliance.errors import ConfigError
from appliance.signals import (
    ChildDied,
    TaskFailure,
    TaskPayload,
    TaskSuccess,
    WorkerReady,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "signals.md"


def success(name: str = "email.send", task_id: str = "t-1") -> TaskSuccess:
    return TaskSuccess(
        task_id=task_id, name=name, queue="email", attempt=0, pid=os.getpid(), result=1,
        runtime=0.01,
    )  # fmt: skip


def _disconnect_all() -> None:
    for signal in signals.ALL:
        for handler, _ in list(signal._connected):
            signal.disconnect(handler)


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    """Each test starts with nothing connected and every signal on, and leaves the
    registry as it found it: other test modules import apps that connect handlers at
    import time (tests/apps/signals_app.py), which must neither leak in nor be lost."""
    saved = {signal: list(signal._connected) for signal in signals.ALL}
    _disconnect_all()
    signals.configure()
    yield
    _disconnect_all()
    for signal, connected in saved.items():
        for handler, sender in connected:
            signal.connect(handler, sender=sender)
    signals.configure()


def test_connect_send_disconnect() -> None:
    got: list[TaskSuccess] = []
    assert not signals.task_success.receivers
    signals.task_success.connect(got.append)
    assert signals.task_success.receivers
    signals.task_success.send(success())
    assert signals.task_success.disconnect(got.append)
    assert not signals.task_success.disconnect(got.append)
    signals.task_success.send(success(task_id="t-2"))
    assert [p.task_id for p in got] == ["t-1"]
    assert not signals.task_success.receivers


def test_connecting_twice_calls_once() -> None:
    got: list[str] = []

    def handler(payload: TaskSuccess) -> None:
        got.append(payload.task_id)

    signals.task_success.connect(handler)
    signals.task_success.connect(handler)
    signals.task_success.send(success())
    assert got == ["t-1"]


def test_sender_filters_by_task_name() -> None:
    mine: list[str] = []
    every: list[str] = []
    signals.task_success.connect(lambda p: mine.append(p.name), sender="email.send")
    signals.task_success.connect(lambda p: every.append(p.name))
    signals.task_success.send(success("email.send"))
    signals.task_success.send(success("report.build"))
    assert mine == ["email.send"]
    assert every == ["email.send", "report.build"]


def test_sender_is_refused_on_signals_without_a_task() -> None:
    with pytest.raises(TypeError, match="worker_ready carries no task name"):
        signals.worker_ready.connect(print, sender="email.send")


def test_schedule_signals_filter_on_the_task_they_dispatch() -> None:
    got: list[str] = []
    signals.schedule_entry_due.connect(lambda p: got.append(p.entry), sender="files.cleanup")
    for entry, task in (("cleanup", "files.cleanup"), ("report", "reports.build")):
        signals.schedule_entry_due.send(
            signals.ScheduleEntryDue(entry=entry, task=task, queue="q", scheduled_for=0.0)
        )
    assert got == ["cleanup"]


def test_connect_works_as_a_decorator_with_and_without_sender() -> None:
    got: list[str] = []

    @signals.task_failure.connect
    def any_failure(payload: TaskFailure) -> None:
        got.append(f"any:{payload.name}")

    @signals.task_failure.connect(sender="email.send")
    def email_failure(payload: TaskFailure) -> None:
        got.append(f"email:{payload.name}")

    assert callable(any_failure) and callable(email_failure)  # the decorator returns it
    for name in ("email.send", "other"):
        signals.task_failure.send(TaskFailure(
            task_id="t", name=name, queue="q", attempt=1, pid=1, error_type="KeyError",
            message="x", traceback="", runtime=0.0,
        ))  # fmt: skip
    assert got == ["any:email.send", "email:email.send", "any:other"]


def test_connected_context_manager_disconnects_after() -> None:
    got: list[str] = []
    with signals.task_success.connected(lambda p: got.append(p.task_id)):
        signals.task_success.send(success())
    signals.task_success.send(success(task_id="t-2"))
    assert got == ["t-1"] and not signals.task_success.receivers


def test_a_raising_handler_is_logged_with_its_traceback_and_the_rest_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[str] = []

    def broken(payload: TaskSuccess) -> None:
        raise RuntimeError("handler bug")

    def exits(payload: TaskSuccess) -> None:
        raise SystemExit(3)

    signals.task_success.connect(broken)
    signals.task_success.connect(exits)
    signals.task_success.connect(lambda p: got.append(p.task_id))
    with caplog.at_level(logging.ERROR, logger="stem.signals"):
        signals.task_success.send(success())  # does not raise
    assert got == ["t-1"]
    records = [r for r in caplog.records if r.name == "stem.signals"]
    assert len(records) == 2
    assert "broken" in records[0].getMessage() and "task_success" in records[0].getMessage()
    assert records[0].exc_info is not None and records[0].exc_info[0] is RuntimeError
    assert "RuntimeError: handler bug" in caplog.text  # the traceback is in the log


def test_send_lazy_builds_the_payload_only_when_someone_listens() -> None:
    built: list[int] = []

    def build() -> TaskSuccess:
        built.append(1)
        return success()

    signals.task_success.send_lazy(build)
    assert built == []
    with signals.task_success.connected(lambda p: None):
        signals.task_success.send_lazy(build)
    assert built == [1]


def test_a_disabled_signal_sends_nothing_and_has_no_receivers() -> None:
    got: list[str] = []
    signals.task_success.connect(lambda p: got.append(p.task_id))
    signals.configure(disabled=["task_success"])
    assert not signals.task_success.receivers and not signals.task_success.enabled
    signals.task_success.send(success())
    signals.configure()
    signals.task_success.send(success(task_id="t-2"))
    assert got == ["t-2"]


def test_enabled_means_only_those() -> None:
    signals.configure(enabled=["task_failure", "task_retry"], disabled=["task_retry"])
    on = [s.name for s in signals.ALL if s.enabled]
    assert on == ["task_failure"]


def test_enable_and_disable_come_from_the_environment() -> None:
    settings = load_settings(
        env={"STEM_SIGNALS_ENABLED": "task_success, task_failure ,", "STEM_SIGNALS_DISABLED": ""}
    )
    assert settings.signals_enabled == ("task_success", "task_failure")
    assert settings.signals_disabled == ()
    signals.configure(settings.signals_enabled, settings.signals_disabled)
    assert {s.name for s in signals.ALL if s.enabled} == {"task_success", "task_failure"}


@pytest.mark.parametrize("variable", ["STEM_SIGNALS_ENABLED", "STEM_SIGNALS_DISABLED"])
def test_an_unknown_signal_name_is_a_config_error_naming_the_variable(variable: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(env={variable: "task_success,task_sucess"})
    assert raised.value.source == f"environment {variable}"
    assert "unknown signal 'task_sucess'" in raised.value.reason
    assert "task_success" in raised.value.reason  # the known names are listed
    with pytest.raises(ConfigError, match="task_sucess"):
        signals.configure(disabled=["task_sucess"])


def test_a_handler_connected_before_fork_fires_in_the_child() -> None:
    got: list[str] = []
    signals.child_died.connect(lambda p: got.append(f"parent:{p.child_pid}"))

    def report(payload: TaskSuccess) -> None:
        os.write(write_fd, orjson.dumps({"pid": os.getpid(), "task_id": payload.task_id}))

    read_fd, write_fd = os.pipe()
    signals.task_success.connect(report)
    pid = os.fork()
    if pid == 0:  # the child: send, report through the pipe, and leave without cleanup
        code = 1
        try:
            os.close(read_fd)
            signals.task_success.send(success(task_id="in-child"))
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert orjson.loads(data) == {"pid": pid, "task_id": "in-child"}
    signals.child_died.send(ChildDied(
        worker="w", pool="default", slot=0, child_pid=pid, exit_code=0, reason="recycled",
        expected=True,
    ))  # fmt: skip
    assert got == [f"parent:{pid}"]


def test_payloads_are_frozen_and_task_payloads_carry_the_common_fields() -> None:
    payload = success()
    with pytest.raises(dataclasses.FrozenInstanceError):
        payload.task_id = "other"  # type: ignore[misc]
    for signal in signals.ALL:
        assert dataclasses.is_dataclass(signal.payload)
        assert signal.payload.__dataclass_params__.frozen  # type: ignore[attr-defined]
        if signal.name.startswith(("task_", "before_task", "after_task")):
            assert issubclass(signal.payload, TaskPayload), signal.name
    ready = WorkerReady(worker="w", pid=1, host="h", pools=("p",), queues=("q",), concurrency=2)
    assert ready.concurrency == 2


def test_every_signal_the_spec_names_exists_once() -> None:
    spec_names = [
        "before_task_publish",
        "after_task_publish",
        "task_received",
        "task_prerun",
        "task_postrun",
        "task_success",
        "task_failure",
        "task_retry",
        "task_revoked",
        "task_timeout",
        "task_dead_lettered",
        "worker_init",
        "worker_ready",
        "worker_heartbeat",
        "worker_shutdown",
        "child_spawned",
        "child_died",
        "schedule_entry_due",
        "schedule_entry_dispatched",
        "schedule_entry_failed",
        "control_command_received",
        "control_command_completed",
    ]
    assert [s.name for s in signals.ALL] == spec_names
    assert all(getattr(signals, name) is signals.BY_NAME[name] for name in spec_names)
    assert len({s.payload for s in signals.ALL}) == len(spec_names)  # one payload each


def doc_table() -> str:
    """The table docs/signals.md must hold, rendered from the module."""
    rows = ["| signal | process | when | payload fields |", "| --- | --- | --- | --- |"]
    for signal in signals.ALL:
        names = ", ".join(f"`{f.name}`" for f in dataclasses.fields(signal.payload))
        rows.append(
            f"| `{signal.name}` | {signal.process} | {signal.when} | "
            f"`{signal.payload.__name__}`: {names} |"
        )
    return "\n".join(rows)


def test_the_docs_table_matches_the_module() -> None:
    text = DOC.read_text()
    match = re.search(r"<!-- signals-table -->\n(.*?)\n<!-- /signals-table -->", text, re.S)
    assert match, "docs/signals.md lost its table markers"
    assert match.group(1) == doc_table(), (
        "docs/signals.md is out of date; paste this table:\n" + doc_table()
    )
