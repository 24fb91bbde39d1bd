"""Workers: each supervisor, and each child slot of the highlighted one, live from the
heartbeat records (pid, state, task, runtime against its hard limit, progress, RSS,
heartbeat age). `v`/`V` revoke the highlighted slot's task (and kill it), `S` shuts the
highlighted supervisor down warm; `enter` on a slot looks its task up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Static

from appliance.backend.protocol import ChildInfo, WorkerHeartbeat
from tui import format as fmt
from tui.screens.base import Loader, Row, StemScreen, Table, styled
from tui.source import Source


@dataclass(frozen=True, slots=True)
class WorkersData:
    beats: list[WorkerHeartbeat]
    now: float


class WorkersScreen(StemScreen[WorkersData]):
    TITLE = "Workers"
    ACTIONS = frozenset({"revoke", "terminate", "shutdown"})
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("v", "revoke", "Revoke"),
        Binding("V", "terminate", "Revoke+kill"),
        Binding("S", "shutdown", "Shutdown"),
        Binding("tab", "app.focus_next", "Switch table", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.data = WorkersData([], 0.0)

    def compose_body(self) -> ComposeResult:
        yield Static("Supervisors", classes="section")
        supervisors = Table(id="supervisors")
        supervisors.add_columns("WORKER", "PID", "STATE", "UP", "POOLS", "BUSY", "DONE",
                                "FAILED", "BEAT")  # fmt: skip
        yield supervisors
        yield Static("Child slots", classes="section", id="slots-title")
        slots = Table(id="slots")
        slots.add_columns("SLOT", "PID", "STATE", "TASK", "RUNTIME", "PROG", "RSS", "BEAT")
        yield slots
        yield Static("", id="slot-line", classes="status", markup=False)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#slots", DataTable).focus()

    def loader(self) -> Loader[WorkersData]:
        def load(source: Source, beats: list[WorkerHeartbeat]) -> WorkersData:
            return WorkersData(sorted(beats, key=lambda b: b.id), source.clock())

        return load

    def show(self, data: WorkersData) -> None:
        self.data = data
        table = self.query_one("#supervisors", Table)
        table.refill([self._supervisor_row(b) for b in data.beats])
        table.styles.height = min(len(data.beats), 5) + 1
        if not data.beats:
            self.query_one("#slots-title", Static).update("Child slots: no workers alive")
        self._show_slots()

    def _supervisor_row(self, beat: WorkerHeartbeat) -> Row:
        now = self.data.now
        health = fmt.worker_health(beat, now)
        pools = ",".join(beat.pools)
        return beat.id, (
            beat.id, beat.pid, styled(self, health.word, health.level),
            fmt.seconds(now - beat.started_at), pools, f"{beat.in_flight}/{beat.concurrency}",
            beat.processed, styled(self, str(beat.failed), "warn" if beat.failed else "ok"),
            styled(self, fmt.seconds(now - beat.sent_at), health.level),
        )  # fmt: skip

    def selected_worker(self) -> WorkerHeartbeat | None:
        key = self.query_one("#supervisors", Table).highlighted_key()
        return next((b for b in self.data.beats if b.id == key), None)

    def selected_child(self) -> ChildInfo | None:
        beat = self.selected_worker()
        key = self.query_one("#slots", Table).highlighted_key()
        if beat is None or key is None:
            return None
        return next((c for c in beat.children if _slot_key(c) == key), None)

    @on(DataTable.RowHighlighted, "#supervisors")
    def _show_slots(self) -> None:
        beat = self.selected_worker()
        children = list(beat.children) if beat is not None else []
        if beat is not None:
            title = f"Child slots of {beat.id} ({beat.status}; queues {', '.join(beat.queues)})"
            self.query_one("#slots-title", Static).update(title)
        self.query_one("#slots", Table).refill([self._slot_row(c) for c in children])
        self._show_slot_line()

    def _slot_row(self, child: ChildInfo) -> Row:
        health = fmt.child_health(child)
        beat_level = "ok" if health.level == "ok" else health.level
        return _slot_key(child), (
            child.slot if len(self._pools()) == 1 else f"{child.pool}/{child.slot}",
            child.pid or "-", styled(self, health.word, health.level), child.task or "",
            self._runtime_cell(child), fmt.percent(child.progress), fmt.size(child.rss),
            styled(self, fmt.seconds(child.beat_age_s), beat_level),
        )  # fmt: skip

    def _runtime_cell(self, child: ChildInfo) -> Text:
        """The bar in the level's colour on a dim track, then the time."""
        run = fmt.runtime(child)
        if run is None:
            return Text("")
        if not run.width:  # no hard limit: the time alone
            return styled(self, run.label, run.level)
        cell = styled(self, "━" * run.filled, "good" if run.level == "ok" else run.level)
        cell.append("━" * (run.width - run.filled), style="dim")
        return cell.append(" ").append_text(styled(self, run.label, run.level))

    def _pools(self) -> set[str]:
        beat = self.selected_worker()
        return {c.pool for c in beat.children} if beat is not None else set()

    @on(DataTable.RowHighlighted, "#slots")
    def _show_slot_line(self) -> None:
        child = self.selected_child()
        line = self.query_one("#slot-line", Static)
        if child is None:
            line.update("")
        elif child.task_id:
            line.update(f"slot {child.slot}: {child.task} {child.task_id} (enter: look it up)")
        else:
            line.update(f"slot {child.slot}: {fmt.child_health(child).word}, "
                        f"{child.tasks_done} tasks done")  # fmt: skip

    @on(DataTable.RowSelected, "#slots")
    def _look_up(self) -> None:
        child = self.selected_child()
        if child is not None and child.task_id:
            self.tui.show_task(child.task_id)

    # --- actions -----------------------------------------------------------------------

    def action_revoke(self) -> None:
        self._revoke(terminate=False)

    def action_terminate(self) -> None:
        self._revoke(terminate=True)

    def _revoke(self, *, terminate: bool) -> None:
        child = self.selected_child()
        if child is None or not child.task_id:
            self.notify("the highlighted slot runs no task", severity="warning")
            return
        task_id, name = child.task_id, child.task
        if terminate:
            body = (f"Revoke task {name} {task_id} and kill the child running it now "
                    f"(pid {child.pid}). The task ends REVOKED and is not retried.")  # fmt: skip
        else:
            body = (f"Revoke task {name} {task_id}: it ends REVOKED; the run in progress "
                    "is not interrupted (V kills it). Stored: a worker started later "
                    "honours it too.")  # fmt: skip

        def revoke(source: Source) -> str:
            result = source.control().revoke(
                [task_id], terminate=terminate, timeout=source.control_timeout
            )
            return fmt.call_summary(result, stored="the revoke is stored")

        self.act("Revoke and terminate" if terminate else "Revoke", body, revoke)

    def action_shutdown(self) -> None:
        beat = self.selected_worker()
        if beat is None:
            self.notify("no supervisor highlighted", severity="warning")
            return
        worker = beat.id
        body = (f"Warm shutdown of {worker} (pid {beat.pid} on {beat.host}): it stops "
                f"claiming, lets its {beat.in_flight} running task(s) finish within its "
                "grace period, returns the rest to the queue and exits.")  # fmt: skip

        def shutdown(source: Source) -> str:
            result = source.control().shutdown(
                worker=worker, mode="warm", timeout=source.control_timeout
            )
            return fmt.call_summary(result)

        self.act("Warm shutdown", body, shutdown)


def _slot_key(child: ChildInfo) -> str:
    return f"{child.pool}/{child.slot}"
