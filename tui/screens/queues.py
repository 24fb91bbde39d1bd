"""Queues: ready, delayed, in flight, dead and paused per queue, and the throughput of
every worker over the last minutes. `p` pauses or resumes the highlighted queue;
`enter` shows its dead letters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Sparkline, Static

from appliance.backend.protocol import WorkerHeartbeat
from appliance.broker.protocol import QueueStats
from tui import format as fmt
from tui.screens.base import Loader, StemScreen, Table, styled
from tui.source import Source
from tui.throughput import WINDOW_S


@dataclass(frozen=True, slots=True)
class QueuesData:
    stats: list[QueueStats]
    rates: list[float]
    now_rate: float
    peak_rate: float
    workers: int


class QueuesScreen(StemScreen[QueuesData]):
    TITLE = "Queues"
    ACTIONS = frozenset({"pause"})
    BINDINGS: ClassVar[list[BindingType]] = [Binding("p", "pause", "Pause/resume")]

    def __init__(self) -> None:
        super().__init__()
        self.data = QueuesData([], [], 0.0, 0.0, 0)

    def compose_body(self) -> ComposeResult:
        table = Table(id="queues")
        for label in ("QUEUE", "READY", "DELAYED", "IN FLIGHT", "DEAD", "STATE"):
            table.add_column(label, key=label)
        yield table
        yield Static("", id="rate-title", classes="section", markup=False)
        yield Sparkline([], id="rate")
        yield Static("", id="queues-line", classes="status", markup=False)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#queues", DataTable).focus()

    def loader(self) -> Loader[QueuesData]:
        def load(source: Source, beats: list[WorkerHeartbeat]) -> QueuesData:
            stats = source.read(lambda o: o.queue_stats()).value
            tp = source.throughput
            return QueuesData(stats, tp.rates(), tp.now, tp.peak, len(beats))

        return load

    def show(self, data: QueuesData) -> None:
        self.data = data
        rows = [
            (s.queue, (
                s.queue, f"{s.ready:,}", f"{s.delayed:,}", f"{s.in_flight:,}",
                styled(self, f"{s.dead:,}", "bad" if s.dead else "ok"),
                styled(self, "paused", "warn") if s.paused else "active",
            ))
            for s in data.stats
        ]  # fmt: skip
        self.query_one("#queues", Table).refill(rows)
        minutes = WINDOW_S / 60
        self.query_one("#rate-title", Static).update(
            f"Throughput, all {data.workers} worker(s), last {minutes:.0f} min: "
            f"now {data.now_rate:.1f}/s, peak {data.peak_rate:.1f}/s"
        )
        self.query_one("#rate", Sparkline).data = data.rates or [0.0]
        total = sum(s.ready + s.delayed + s.in_flight for s in data.stats)
        self.query_one("#queues-line", Static).update(
            f"{len(data.stats)} queue(s), {total:,} message(s) waiting or running"
            if data.stats else "no queues hold messages or dead letters"
        )  # fmt: skip

    def selected(self) -> QueueStats | None:
        key = self.query_one("#queues", Table).highlighted_key()
        return next((s for s in self.data.stats if s.queue == key), None)

    @on(DataTable.RowSelected, "#queues")
    def _dead_letters(self) -> None:
        stats = self.selected()
        if stats is not None:
            self.tui.show_dead_letters(stats.queue)

    def action_pause(self) -> None:
        stats = self.selected()
        if stats is None:
            self.notify("no queue highlighted", severity="warning")
            return
        queue, resume = stats.queue, stats.paused
        if resume:
            title, body = "Resume queue", (
                f"Resume {queue}: every worker starts claiming from it again "
                f"({stats.ready:,} ready).")  # fmt: skip
        else:
            title, body = "Pause queue", (
                f"Pause {queue}: every worker (and any started later) stops claiming from "
                f"it; its {stats.ready + stats.delayed:,} waiting message(s) stay. "
                "Tasks already running finish.")  # fmt: skip

        def toggle(source: Source) -> str:
            control = source.control()
            change = control.resume if resume else control.pause
            changed, result = change(queue, timeout=source.control_timeout)
            verb = "resumed" if resume else "paused"
            state = f"{queue} {verb}" if changed else f"{queue} was already {verb}"
            return fmt.call_summary(result, stored=state)

        self.act(title, body, toggle)
