"""Task lookup: an id typed or pasted, then `enter`: state, attempts, timings, worker,
result or error with its traceback, progress and meta, refreshed while it is shown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import Input, Static

from appliance.backend.protocol import WorkerHeartbeat
from appliance.observe import TaskDetail
from appliance.states import TaskState
from tui import format as fmt
from tui.screens.base import Loader, StemScreen, styled
from tui.source import Source

MAX_CHILDREN = 20  # ids listed; a chord can have thousands

LEVELS = {
    TaskState.SUCCESS: "good", TaskState.FAILURE: "bad", TaskState.DEAD: "bad",
    TaskState.REVOKED: "warn", TaskState.RETRY: "warn",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Lookup:
    task_id: str
    detail: TaskDetail | None  # None: neither store knows the id


class TaskLookupScreen(StemScreen[Lookup | None]):
    TITLE = "Task lookup"
    BINDINGS: ClassVar[list[BindingType]] = [
        # The id box takes every typed key (ids hold digits); escape leaves it, so 1-4
        # and q work again, and brings it back.
        Binding("escape", "toggle_edit", "Edit id / leave"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.task_id = ""

    def compose_body(self) -> ComposeResult:
        yield Input(placeholder="task id (type or paste, then enter)", id="task-id")
        with VerticalScroll(id="task"):
            yield Static("", id="task-body")

    def on_mount(self) -> None:
        super().on_mount()
        box = self.query_one("#task-id", Input)
        box.value = self.task_id
        (box if not self.task_id else self.query_one("#task", VerticalScroll)).focus()

    def look_up(self, task_id: str) -> None:
        """Show `task_id` (called as the view opens, maybe before it is mounted)."""
        self.task_id = task_id.strip()
        if self.is_mounted:
            self.query_one("#task-id", Input).value = self.task_id
            self.query_one("#task", VerticalScroll).focus()
            self.tui.refresh_now()

    @on(Input.Submitted, "#task-id")
    def _submitted(self, event: Input.Submitted) -> None:
        self.look_up(event.value)

    def action_toggle_edit(self) -> None:
        box = self.query_one("#task-id", Input)
        if box.has_focus:
            self.query_one("#task", VerticalScroll).focus()
        else:
            box.focus()

    def loader(self) -> Loader[Lookup | None]:
        task_id = self.task_id

        def load(source: Source, beats: list[WorkerHeartbeat]) -> Lookup | None:
            if not task_id:
                return None
            return Lookup(task_id, source.read(lambda o: o.task_show(task_id)).value)

        return load

    def show(self, data: Lookup | None) -> None:
        body = self.query_one("#task-body", Static)
        if data is None:
            body.update("Type or paste a task id and press enter.")
        elif data.detail is None:
            body.update(styled(self, f"no task with id {data.task_id} in the broker or "
                                     "the result backend (expired, or never enqueued here)",
                               "warn"))  # fmt: skip
        else:
            body.update(render_task(self, data.detail))


def render_task(screen: StemScreen[Any], detail: TaskDetail) -> Text:
    text = Text()
    message, result = detail.message, detail.result

    def line(label: str, value: object, level: str = "ok") -> None:
        text.append(f"{label:>11}  ", style="bold")
        text.append(styled(screen, str(value), level))
        text.append("\n")

    line("task id", detail.task_id)
    line("state", detail.state.value, LEVELS.get(detail.state, "ok"))
    name = result.name if result and result.name else (message.name if message else "?")
    queue = result.queue if result and result.queue else (message.queue if message else "?")
    line("name", name)
    line("queue", queue)
    if message is not None:
        line("message", f"{message.state}, attempt {message.attempt}, {message.deliveries} "
                        f"deliveries, priority {message.priority}")  # fmt: skip
        if message.not_before:
            line("due", fmt.when(message.not_before))
        if message.owner:
            line("leased by", f"{message.owner} until {fmt.when(message.lease_until)}")
    _lineage(detail, line)
    if result is not None:
        line("attempt", result.attempt)
        line("worker", result.worker or "-")
        line("started", fmt.when(result.started_at))
        line("finished", fmt.when(result.finished_at))
        if result.started_at and result.finished_at:
            line("runtime", fmt.seconds(result.finished_at - result.started_at))
        if result.progress is not None:
            line("progress", fmt.percent(result.progress))
        if result.progress_data is not None:
            line("progress data", _json(result.progress_data).strip())
        if result.meta:
            text.append("\nmeta\n", style="bold underline")
            text.append(_json(result.meta))
        if result.error is not None:
            text.append("\nerror\n", style="bold underline")
            text.append(styled(screen, f"{result.error.type}: {result.error.message}", "bad"))
            text.append("\n" + (result.error.traceback or "(no traceback recorded)").rstrip())
            text.append("\n")
        elif detail.state is TaskState.SUCCESS:
            text.append("\nresult\n", style="bold underline")
            text.append(_json(result.value))
    return text


def _lineage(detail: TaskDetail, line: Callable[[str, object], None]) -> None:
    """Parent, root, children and canvas place, as far as the records have them."""
    if detail.parent_id:
        line("parent", detail.parent_id)
    if detail.root_id and detail.root_id not in (detail.parent_id, detail.task_id):
        line("root", detail.root_id)
    if detail.children:
        shown = ", ".join(detail.children[:MAX_CHILDREN])
        more = len(detail.children) - MAX_CHILDREN
        line("children", shown + (f" (+{more} more)" if more > 0 else ""))
    if detail.canvas:
        canvas = detail.canvas
        place = f"{canvas.get('kind', '?')} {canvas.get('id', '')}".strip()
        if canvas.get("index") is not None and canvas.get("size") is not None:
            place += f", member {canvas['index'] + 1} of {canvas['size']}"
        line("canvas", place)
    if detail.duplicates:
        line("duplicates", f"{detail.duplicates} enqueue(s) returned this task "
                           f"(last {fmt.when(detail.last_duplicate_at)})")  # fmt: skip


def _json(value: object) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n"
    except TypeError:
        return repr(value) + "\n"
