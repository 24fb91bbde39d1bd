"""Dead letters: newest first, a page at a time, filtered by queue, name and reason.
`enter` opens an entry (args, meta, error, full traceback, attempts); `r` replays the
highlighted entry, `space` selects, `R` replays the selection, `x` purges the selection
(or the highlighted entry); each asks first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Input, Static

from appliance.backend.protocol import WorkerHeartbeat
from appliance.envelope import Envelope
from appliance.observe import DeadLetter, DeadLetterFilter, DeadLetterPage
from tui import format as fmt
from tui.screens.base import Loader, StemScreen, Table, styled
from tui.source import Source

PAGE_SIZE = 50
FILTER_KEYS = ("queue", "name", "reason")


def parse_filter(text: str) -> DeadLetterFilter:
    """`queue:Q name:N reason:R` in any order; bare words filter on the name."""
    found: dict[str, str] = {}
    bare = []
    for word in text.split():
        key, sep, value = word.partition(":")
        if sep and key in FILTER_KEYS:
            found[key] = value
        else:
            bare.append(word)
    name = " ".join([*bare, found.get("name", "")]).strip()
    return DeadLetterFilter(found.get("queue") or None, name, found.get("reason", ""))


def describe(where: DeadLetterFilter) -> str:
    parts = [f"{k}:{v}" for k, v in (("queue", where.queue), ("name", where.name),
                                     ("reason", where.reason)) if v]  # fmt: skip
    return " ".join(parts)


@dataclass
class Selection:
    """Chosen entry ids (kept across pages and refreshes until acted on)."""

    ids: set[str] = field(default_factory=set)

    def toggle(self, entry_id: str) -> None:
        self.ids.symmetric_difference_update({entry_id})

    def clear(self) -> None:
        self.ids.clear()


class DeadLettersScreen(StemScreen[DeadLetterPage]):
    TITLE = "Dead letters"
    ACTIONS = frozenset({"replay", "replay_selected", "purge"})
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("r", "replay", "Replay"),
        Binding("space", "select", "Select"),
        Binding("R", "replay_selected", "Replay sel"),
        Binding("x", "purge", "Purge"),
        # Shown in the status line: the footer has no room for them at 80 columns.
        Binding("left_square_bracket", "page(-1)", "Previous page", show=False),
        Binding("right_square_bracket", "page(1)", "Next page", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.where = DeadLetterFilter()
        self.page_number = 1
        self.page = DeadLetterPage([], 0, 1, PAGE_SIZE)
        self.selection = Selection()

    def compose_body(self) -> ComposeResult:
        yield Input(placeholder="filter: queue:Q name:N reason:R (enter applies, escape "
                    "clears)", id="filter")  # fmt: skip
        table = Table(id="dlq")
        table.add_columns(" ", "DEAD AT", "NAME", "QUEUE", "REASON", "ERROR", "TRIES")
        yield table
        yield Static("", id="dlq-line", classes="status", markup=False)

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#filter", Input).value = describe(self.where)
        self.query_one("#dlq", DataTable).focus()

    def loader(self) -> Loader[DeadLetterPage]:
        where, page = self.where, self.page_number

        def load(source: Source, beats: list[WorkerHeartbeat]) -> DeadLetterPage:
            found = source.read(lambda o: o.dlq_find(where, page, PAGE_SIZE)).value
            if found.page > found.pages:  # the last page emptied (purged, replayed)
                return source.read(lambda o: o.dlq_find(where, found.pages, PAGE_SIZE)).value
            return found

        return load

    def show(self, data: DeadLetterPage) -> None:
        self.page, self.page_number = data, data.page
        rows = [
            (e.id, (
                "✓" if e.id in self.selection.ids else " ", fmt.when(e.dead_at)[5:],
                e.name or "?", e.queue, styled(self, e.reason, "bad"), e.error_type,
                e.attempts,
            ))
            for e in data.entries
        ]  # fmt: skip
        self.query_one("#dlq", Table).refill(rows)
        self._show_line()

    def _show_line(self) -> None:
        data = self.page
        parts = [f"page {data.page}/{data.pages} ([ ] turn)", f"{data.total:,} dead letter(s)"]
        if self.selection.ids:
            parts.append(f"{len(self.selection.ids)} selected")
        if self.where != DeadLetterFilter():
            parts.append(f"filter {describe(self.where)}")
        self.query_one("#dlq-line", Static).update(" · ".join(parts))

    def highlighted(self) -> DeadLetter | None:
        key = self.query_one("#dlq", Table).highlighted_key()
        return next((e for e in self.page.entries if e.id == key), None)

    # --- filter and pages -------------------------------------------------------------

    def filter_queue(self, queue: str) -> None:
        """Show `queue`'s dead letters (called as the view opens, maybe before mount)."""
        self.where = DeadLetterFilter(queue=queue)
        self.page_number = 1
        if self.is_mounted:
            self.query_one("#filter", Input).value = describe(self.where)
            self.tui.refresh_now()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("shown")
        box.focus()

    @on(Input.Submitted, "#filter")
    def _apply_filter(self, event: Input.Submitted) -> None:
        self.where = parse_filter(event.value)
        self.page_number = 1
        self.query_one("#dlq", DataTable).focus()
        self.tui.refresh_now()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("shown")
        self.query_one("#dlq", DataTable).focus()
        if self.where != DeadLetterFilter():
            self.where = DeadLetterFilter()
            self.page_number = 1
            self.tui.refresh_now()

    def action_page(self, step: int) -> None:
        wanted = min(max(1, self.page_number + step), self.page.pages)
        if wanted != self.page_number:
            self.page_number = wanted
            self.tui.refresh_now()

    @on(DataTable.RowSelected, "#dlq")
    def _open(self) -> None:
        entry = self.highlighted()
        if entry is not None:
            self.app.push_screen(DeadLetterDetail(entry))

    # --- actions ----------------------------------------------------------------------

    def action_select(self) -> None:
        entry = self.highlighted()
        if entry is None:
            return
        self.selection.toggle(entry.id)
        table = self.query_one("#dlq", Table)
        table.mark(0, "✓" if entry.id in self.selection.ids else " ")
        self._show_line()
        table.action_cursor_down()

    def action_replay(self) -> None:
        entry = self.highlighted()
        if entry is not None:
            replay_entries(self, [entry.id], f"{entry.name} {entry.task_id} (queue {entry.queue})")

    def action_replay_selected(self) -> None:
        ids = sorted(self.selection.ids)
        if not ids:
            self.notify("nothing selected (space selects)", severity="warning")
            return
        replay_entries(self, ids, f"the {len(ids)} selected dead letter(s)", self.selection.clear)

    def action_purge(self) -> None:
        ids = sorted(self.selection.ids)
        if ids:
            purge_entries(
                self, ids, f"the {len(ids)} selected dead letter(s)", self.selection.clear
            )
            return
        entry = self.highlighted()
        if entry is not None:
            purge_entries(self, [entry.id], f"{entry.name} {entry.task_id} (queue {entry.queue})")


def replay_entries(
    screen: StemScreen[Any], ids: list[str], what: str, on_yes: Callable[[], None] | None = None
) -> None:
    body = (f"Replay {what}: each goes back on its queue as a fresh first attempt and "
            "leaves the dead-letter queue; its DEAD result is forgotten.")  # fmt: skip

    def replay(source: Source) -> str:
        task_ids = source.read(lambda o: o.dlq_replay_entries(ids)).value
        gone = len(ids) - len(task_ids)
        return f"replayed {len(task_ids)} dead letter(s)" + (
            f"; {gone} were already gone" if gone else "")  # fmt: skip

    screen.act("Replay", body, replay, on_yes)


def purge_entries(
    screen: StemScreen[Any], ids: list[str], what: str, on_yes: Callable[[], None] | None = None
) -> None:
    body = (f"Purge {what}: deleted from the dead-letter queue for good (cannot be "
            "undone; their DEAD results stay as history).")  # fmt: skip

    def purge(source: Source) -> str:
        return f"purged {source.read(lambda o: o.dlq_purge_entries(ids)).value} dead letter(s)"

    screen.act("Purge", body, purge, on_yes)


@dataclass(frozen=True, slots=True)
class Detail:
    entry: DeadLetter | None
    envelope: Envelope | None  # meta, headers, lineage; None if it does not decode


class DeadLetterDetail(StemScreen[Detail]):
    """One dead letter in full; `r` replays it, `x` purges it, `escape` goes back."""

    TITLE = "Dead letters"
    ACTIONS = frozenset({"replay", "purge"})
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "replay", "Replay"),
        Binding("x", "purge", "Purge"),
        Binding("t", "task", "Look up task"),
    ]

    def __init__(self, entry: DeadLetter) -> None:
        super().__init__()
        self.entry: DeadLetter | None = entry
        self.entry_id = entry.id

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(id="detail"):
            yield Static(id="detail-body")

    def on_mount(self) -> None:
        super().on_mount()
        self.show(Detail(self.entry, None))
        self.query_one("#detail", VerticalScroll).focus()

    def loader(self) -> Loader[Detail]:
        entry_id = self.entry_id

        def load(source: Source, beats: list[WorkerHeartbeat]) -> Detail:
            return source.read(
                lambda o: Detail(o.dlq_show(entry_id), o.dlq_envelope(entry_id))
            ).value

        return load

    def show(self, data: Detail) -> None:
        self.entry = data.entry
        body = self.query_one("#detail-body", Static)
        if data.entry is None:
            body.update(f"dead letter {self.entry_id} is gone (replayed or purged)")
        else:
            body.update(render_dead_letter(self, data.entry, data.envelope))

    def action_replay(self) -> None:
        if self.entry is not None:
            replay_entries(self, [self.entry.id], f"{self.entry.name} {self.entry.task_id}")

    def action_purge(self) -> None:
        if self.entry is not None:
            purge_entries(self, [self.entry.id], f"{self.entry.name} {self.entry.task_id}")

    def action_task(self) -> None:
        if self.entry is not None and self.entry.task_id:
            self.tui.show_task(self.entry.task_id)


def render_dead_letter(
    screen: StemScreen[Any], entry: DeadLetter, envelope: Envelope | None
) -> Text:
    text = Text()
    fields = (
        ("entry", entry.id), ("task id", entry.task_id or "-"), ("name", entry.name or "?"),
        ("queue", entry.queue), ("reason", entry.reason), ("attempts", str(entry.attempts)),
        ("enqueued", fmt.when(entry.enqueued_at)), ("dead at", fmt.when(entry.dead_at)),
        ("error", f"{entry.error_type}: {entry.message}" if entry.error_type else entry.message),
    )  # fmt: skip
    for label, value in fields:
        text.append(f"{label:>9}  ", style="bold")
        text.append(styled(screen, value, "bad") if label in ("reason", "error") else value)
        text.append("\n")
    text.append("\nargs\n", style="bold underline")
    if entry.args is not None:
        text.append(_json(entry.args))
    else:
        text.append(f"(the payload does not decode; raw)\n{entry.raw}\n")
    if envelope is not None:
        text.append("\nmeta\n", style="bold underline")
        text.append(_json(envelope.meta) if envelope.meta else "{}\n")
        lineage = (("parent", envelope.parent_id), ("root", envelope.root_id),
                   ("priority", envelope.priority), ("retries", envelope.max_retries))  # fmt: skip
        text.append("  ".join(f"{k}: {v if v is not None else '-'}" for k, v in lineage) + "\n")
        if envelope.headers:
            text.append("headers: " + _json(envelope.headers))
    text.append("\ntraceback\n", style="bold underline")
    text.append((entry.traceback or "(none recorded)").rstrip() + "\n")
    return text


def _json(value: object) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n"
