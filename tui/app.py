"""The thin App: the views and their keys, the refresh timer, confirmations and the
thread workers that read and act (the UI thread never waits on a store)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import get_current_worker

from tui.confirm import ConfirmModal
from tui.messages import ActionDone, Loaded, StoreProblem
from tui.screens.base import Loader, StemScreen
from tui.screens.dead_letters import DeadLettersScreen
from tui.screens.queues import QueuesScreen
from tui.screens.schedules import SchedulesScreen
from tui.screens.task_lookup import TaskLookupScreen
from tui.screens.workers import WorkersScreen
from tui.source import Source, StoreDown

DEFAULT_REFRESH_S = 1.0


@dataclass(frozen=True, slots=True)
class View:
    key: str
    mode: str
    title: str
    screen: type[StemScreen[Any]]


# The views, in key order. A new view (Schedules, once Beat exists) is its screen class
# plus one line here: its key, mode, title and the footer/palette entries follow.
VIEWS: tuple[View, ...] = (
    View("1", "workers", "Workers", WorkersScreen),
    View("2", "queues", "Queues", QueuesScreen),
    View("3", "dead_letters", "Dead letters", DeadLettersScreen),
    View("4", "task_lookup", "Task lookup", TaskLookupScreen),
    View("5", "schedules", "Schedules", SchedulesScreen),
)


class StemTui(App[None]):
    CSS_PATH = Path(__file__).with_name("stem.tcss")
    TITLE = "stem"
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = {v.mode: v.screen for v in VIEWS}
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(v.key, f"show_view('{v.mode}')", v.title, show=False) for v in VIEWS),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+q", "quit", "Quit", show=False),
    ]

    store_problem: reactive[str | None] = reactive(None)

    def __init__(
        self, source: Source, *, read_only: bool = False, refresh_s: float = DEFAULT_REFRESH_S
    ) -> None:
        super().__init__()
        self.source = source
        self.read_only = read_only
        self.refresh_s = refresh_s
        self.views = VIEWS
        self.last_load_ms: float | None = None
        self.loads = 0  # data shown so far (tests and the bench wait on it)
        self._loading_since: float | None = None

    def on_mount(self) -> None:
        self.switch_mode(VIEWS[0].mode)
        self.set_interval(self.refresh_s, self._tick)

    def on_unmount(self) -> None:
        self.source.close()

    # --- views -------------------------------------------------------------------------

    def action_show_view(self, mode: str) -> None:
        if self.current_mode != mode:
            self.switch_mode(mode)

    def show_task(self, task_id: str) -> None:
        """Open Task lookup on `task_id` (from a slot or a dead letter)."""
        self.switch_mode("task_lookup")
        screen = self.screen
        if isinstance(screen, TaskLookupScreen):
            screen.look_up(task_id)

    def show_dead_letters(self, queue: str) -> None:
        self.switch_mode("dead_letters")
        screen = self.screen
        if isinstance(screen, DeadLettersScreen):
            screen.filter_queue(queue)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for view in VIEWS:
            yield SystemCommand(
                f"Show {view.title}",
                f"key {view.key}",
                lambda m=view.mode: self.action_show_view(m),
            )
        yield SystemCommand("Refresh now", "read the stores again", self.refresh_now)

    # --- refresh -----------------------------------------------------------------------

    def _tick(self) -> None:
        # A read still running (a slow store) is left to finish, not stacked behind.
        if self._loading_since is None or time.monotonic() - self._loading_since > 30:
            self.refresh_now()

    def refresh_now(self) -> None:
        """Read the current view's data again, in a thread worker."""
        stack = self.screen_stack
        if not stack:  # the app is closing: the refresh timer can fire after the last screen
            return
        screen = stack[-1]
        if isinstance(screen, StemScreen):
            self._loading_since = time.monotonic()
            self._load(screen, screen.loader())

    @work(thread=True, exclusive=True, group="refresh")
    def _load(self, screen: StemScreen[Any], loader: Loader[Any]) -> None:
        started = time.perf_counter()
        try:
            beats = self.source.workers()
            data = loader(self.source, beats)
        except StoreDown as exc:
            self.post_message(StoreProblem(str(exc)))
            return
        if not get_current_worker().is_cancelled:  # superseded by a newer refresh
            screen.post_message(Loaded(data, (time.perf_counter() - started) * 1000))
            self.post_message(StoreProblem(""))

    def on_store_problem(self, message: StoreProblem) -> None:
        self._loading_since = None
        self.store_problem = message.text or None

    # --- actions -----------------------------------------------------------------------

    def confirm_then_run(
        self,
        title: str,
        body: str,
        action: Callable[[Source], str],
        on_yes: Callable[[], None] | None = None,
    ) -> None:
        """The modal says what will happen; only `y` runs `action` (in a thread), and
        `on_yes` (on the UI thread: a view forgetting its selection, say)."""
        if self.read_only:
            return

        def decided(yes: bool | None) -> None:
            if yes:
                if on_yes is not None:
                    on_yes()
                self._act(title, action)

        self.push_screen(ConfirmModal(title, body), decided)

    @work(thread=True, group="action")
    def _act(self, title: str, action: Callable[[Source], str]) -> None:
        try:
            self.post_message(ActionDone(title, action(self.source)))
        except Exception as exc:  # shown, never fatal: the operator reads why and retries
            self.post_message(ActionDone(title, f"{type(exc).__name__}: {exc}", ok=False))

    def on_action_done(self, message: ActionDone) -> None:
        self.notify(
            message.text,
            title=message.title,
            severity="information" if message.ok else "error",
            timeout=8 if message.ok else 15,
        )
        self.refresh_now()
