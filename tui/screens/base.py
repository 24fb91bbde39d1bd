"""What every view shares: the navigation bar, the store banner, the footer, the
read-only rule, and the load (thread) / show (UI thread) split of a refresh."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar, cast

from rich.text import Text
from textual.app import ComposeResult
from textual.dom import DOMNode
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from appliance.backend.protocol import WorkerHeartbeat
from tui.messages import Loaded
from tui.source import Source

if TYPE_CHECKING:
    from tui.app import StemTui

D = TypeVar("D")

# What a view's refresh runs in the thread worker: the source and the live workers
# (read on every refresh anyway: they feed the throughput history).
Loader = Callable[[Source, list[WorkerHeartbeat]], D]


class NavBar(Static):
    """The views and their keys, the current one highlighted, and the store's URL."""

    def __init__(self, current: str) -> None:
        super().__init__(id="nav")
        self.current = current

    def on_mount(self) -> None:
        app = cast("StemTui", self.app)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(" stem ", style="bold")
        for view in app.views:
            style = "reverse bold" if view.title == self.current else ""
            text.append(f" {view.key} {view.title} ", style=style)
        text.append(f"  {app.source.url}", style="dim")
        if app.read_only:
            text.append("  read-only", style="bold")
        self.update(text)


class _ViewMeta(type(Screen), ABCMeta):  # type: ignore[misc]
    """Textual's metaclass (private: taken from `Screen`, not imported) and abc's
    together, so that a view that lacks a hook cannot be made."""


# mypy cannot see through type(Screen) above: the conflict it reports is not there.
class StemScreen(Screen[None], Generic[D], metaclass=_ViewMeta):  # type: ignore[metaclass]
    """A view. `loader()` (UI thread) returns the blocking read the app runs in a thread
    worker; `show()` (UI thread) puts its result on screen."""

    TITLE: ClassVar[str] = ""
    # Actions that change something: hidden and refused with --read-only.
    ACTIONS: ClassVar[frozenset[str]] = frozenset()
    # `tui.loads` as this view's own last load left it (0: nothing shown yet). Tests and
    # the bench wait on it: a load of the view just left can land after a switch.
    shown_at_load = 0

    @property
    def tui(self) -> StemTui:
        return cast("StemTui", self.app)

    def compose(self) -> ComposeResult:
        yield NavBar(self.TITLE)
        yield Static("", id="banner", markup=False)
        yield from self.compose_body()
        yield Footer(compact=True)

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        self.watch(self.app, "store_problem", self._show_problem)

    def _show_problem(self, problem: str | None) -> None:
        banner = self.query_one("#banner", Static)
        banner.update(f"store unreachable: {problem} (retrying every refresh)" if problem else "")
        banner.set_class(bool(problem), "shown")

    def on_screen_resume(self) -> None:
        self.tui.refresh_now()  # a view is never shown with data from its last visit only

    @abstractmethod
    def loader(self) -> Loader[D]: ...

    @abstractmethod
    def show(self, data: D) -> None: ...

    def on_loaded(self, message: Loaded) -> None:
        self.show(cast(D, message.data))
        self.tui.last_load_ms = message.elapsed_ms
        self.tui.loads += 1
        self.shown_at_load = self.tui.loads

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # False hides the key from the footer and refuses it.
        return not (action in self.ACTIONS and self.tui.read_only)

    def act(
        self,
        title: str,
        body: str,
        action: Callable[[Source], str],
        on_yes: Callable[[], None] | None = None,
    ) -> None:
        """Ask (the modal says `body`), then run `action` in a thread worker."""
        self.tui.confirm_then_run(title, body, action, on_yes)


Row = tuple[str, Sequence[object]]  # a row key and its cells


class Table(DataTable[object]):
    """A row-cursor table that refreshes in place (`refill`)."""

    def __init__(self, *, id: str) -> None:
        super().__init__(id=id, cursor_type="row")
        self._rows: list[Row] = []

    def refill(self, rows: Sequence[Row]) -> None:
        """Replace the rows, keeping the cursor on the same key (a refresh must not
        throw the operator's place away); unchanged rows cost no redraw."""
        if list(rows) == self._rows:
            return
        self._rows = list(rows)
        keep = self.highlighted_key()
        self.clear()
        for key, cells in rows:
            self.add_row(*cells, key=key)
        index = next((i for i, (key, _) in enumerate(rows) if key == keep), None)
        if index is not None:
            self.move_cursor(row=index, animate=False, scroll=False)

    def highlighted_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # CellDoesNotExist: an empty or shrunk table
            return None
        return key.value

    def mark(self, column: int, value: object) -> None:
        """Change one cell of the highlighted row (the next refresh redraws it all)."""
        self.update_cell_at(self.cursor_coordinate._replace(column=column), value)
        self._rows = []


def styled(node: DOMNode, text: str, level: str) -> Text:
    """`text` in the theme's readable warning/error/success colour for `level`
    ("ok" stays plain), so it shows on dark and light themes alike."""
    if level == "ok":
        return Text(text)
    token = {"warn": "text-warning", "bad": "text-error", "good": "text-success"}[level]
    return Text(text, style=f"bold {node.app.theme_variables[token]}")
