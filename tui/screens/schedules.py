"""Schedules: Beat's entries as stored, with their next and last slot, the drift of
their recent dispatches, their last error, and whether they are enabled. `e` enables or
disables the highlighted entry (asked first; missed slots are not made up)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

from appliance.backend.protocol import WorkerHeartbeat
from appliance.observe import ScheduleView, schedule_views
from tui.screens.base import Loader, StemScreen, Table, styled
from tui.source import Source

# What an operator scans for first (state, next and last slot) fits in 80 columns.
COLUMNS = ("NAME", "STATE", "NEXT (UTC)", "LAST (UTC)", "DRIFT p50/p99", "RUNS", "TASK",
           "SCHEDULE", "LAST ERROR")  # fmt: skip


def _slot(text: str | None) -> str:
    """An ISO 8601 UTC slot as `YYYY-MM-DD HH:MM:SS` (the table is narrow)."""
    return text[:19].replace("T", " ") if text else "-"


def _drift(view: ScheduleView) -> str:
    drift = view.drift_ms
    return f"{drift['p50']:.1f} / {drift['p99']:.1f} ms" if drift else "-"


class SchedulesScreen(StemScreen[list[ScheduleView]]):
    TITLE = "Schedules"
    ACTIONS = frozenset({"enable"})
    BINDINGS: ClassVar[list[BindingType]] = [Binding("e", "enable", "Enable/disable")]

    def __init__(self) -> None:
        super().__init__()
        self.views: list[ScheduleView] = []

    def compose_body(self) -> ComposeResult:
        table = Table(id="schedules")
        for label in COLUMNS:
            table.add_column(label, key=label)
        yield table
        yield Static("", id="schedules-line", classes="status", markup=False)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#schedules", DataTable).focus()

    def loader(self) -> Loader[list[ScheduleView]]:
        def load(source: Source, beats: list[WorkerHeartbeat]) -> list[ScheduleView]:
            return source.read(lambda o: schedule_views(o.stem, limit=100)).value

        return load

    def show(self, data: list[ScheduleView]) -> None:
        self.views = data
        rows = [
            (v.name, (
                v.name,
                styled(self, "enabled", "ok") if v.enabled else styled(self, "disabled", "warn"),
                _slot(v.next_run), _slot(v.last_run), _drift(v), f"{v.runs:,}", v.task, v.spec,
                styled(self, v.last_error[:60], "bad") if v.last_error else "-",
            ))
            for v in data
        ]  # fmt: skip
        self.query_one("#schedules", Table).refill(rows)
        off = sum(1 for v in data if not v.enabled)
        self.query_one("#schedules-line", Static).update(
            f"{len(data)} schedule(s), {off} disabled; Beat dispatches each slot once"
            if data else "no schedules stored (stem.schedule(...) or [[schedules]], then Beat)"
        )  # fmt: skip

    def selected(self) -> ScheduleView | None:
        key = self.query_one("#schedules", Table).highlighted_key()
        return next((v for v in self.views if v.name == key), None)

    def action_enable(self) -> None:
        view = self.selected()
        if view is None:
            self.notify("no schedule highlighted", severity="warning")
            return
        name, enable = view.name, not view.enabled
        if enable:
            title = "Enable schedule"
            body = (
                f"Enable {name}: Beat dispatches it again from its next slot "
                f"({view.spec}); slots missed while it was disabled are not made up."
            )
        else:
            title = "Disable schedule"
            body = (
                f"Disable {name}: Beat stops dispatching it (the entry stays stored; "
                "enable it again here or with `stem schedule enable`)."
            )

        def toggle(source: Source) -> str:
            changed = source.read(lambda o: o.stem.stores.schedules.set_enabled(name, enable))
            if not changed.value:
                return f"{name}: no such schedule any more"
            return f"{name} {'enabled' if enable else 'disabled'}"

        self.act(title, body, toggle)
