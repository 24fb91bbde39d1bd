"""Every view and action driven by key presses against a real SQLite store, with the
store checked afterwards (no worker here: tests/tui/test_live.py has those)."""

from __future__ import annotations

import time
from pathlib import Path

from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from appliance.app import Stem
from appliance.backend.protocol import ErrorInfo, TaskResult
from appliance.envelope import Envelope
from appliance.observe import Observer
from appliance.states import DeadLetterReason, TaskState
from tests.tui.conftest import drive
from tests.tui.seed import dead_letters, heartbeat, loaded, publish, until
from tui.app import StemTui
from tui.confirm import ConfirmModal
from tui.screens.dead_letters import DeadLetterDetail, DeadLettersScreen
from tui.screens.queues import QueuesScreen
from tui.screens.schedules import SchedulesScreen
from tui.screens.task_lookup import TaskLookupScreen
from tui.screens.workers import WorkersScreen


def text_of(app: StemTui, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def rows(app: StemTui, selector: str) -> list[list[str]]:
    table: DataTable[object] = app.screen.query_one(selector, DataTable)
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def open_view(app: StemTui, pilot: Pilot[None], key: str, screen: type) -> None:
    check = loaded(app, screen)
    await pilot.press(key)
    await until(pilot, check)


async def confirm(app: StemTui, pilot: Pilot[None], answer: str) -> None:
    await until(pilot, lambda: isinstance(app.screen, ConfirmModal))
    await pilot.press(answer)
    await until(pilot, lambda: not isinstance(app.screen, ConfirmModal))


def notes(app: StemTui) -> str:
    return "\n".join(n.message for n in app._notifications)


def dlq_names(stem: Stem) -> list[str]:
    return [e.name or "" for e in Observer(stem).dlq_list(page_size=100).entries]


# --- dead letters --------------------------------------------------------------------


def test_replay_highlighted_entry_reenqueues_it(url: str, stem: Stem) -> None:
    [old, new] = dead_letters(stem, ["mail.old", "mail.new"])

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "3", DeadLettersScreen)
        assert [r[2] for r in rows(app, "#dlq")] == ["mail.new", "mail.old"]  # newest first
        check = loaded(app, DeadLettersScreen)
        await pilot.press("r")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: check() and len(rows(app, "#dlq")) == 1)

    drive(url, scenario)
    assert dlq_names(stem) == ["mail.old"]
    assert stem.task_state(new) is TaskState.PENDING and stem.task_state(old) is TaskState.DEAD
    [message] = Observer(stem).tasks_list()
    assert (message.task_id, message.attempt, message.state) == (new, 0, "ready")


def test_cancelled_modals_change_nothing(url: str, stem: Stem) -> None:
    dead_letters(stem, ["a", "b"])
    stem.enqueue("t", queue="mail")

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "3", DeadLettersScreen)
        for key, answer in (("r", "n"), ("x", "escape"), ("space", None), ("R", "n")):
            await pilot.press(key)
            if answer is not None:
                await confirm(app, pilot, answer)
        await pilot.press("x")
        await confirm(app, pilot, "n")
        assert "1 selected" in text_of(app, "#dlq-line")  # a cancelled R or x keeps it
        await open_view(app, pilot, "2", QueuesScreen)
        await pilot.press("p")
        await confirm(app, pilot, "escape")
        # No action worker was ever started (a refresh may be running: a loaded machine).
        assert not [w for w in app.workers if w.group == "action"]

    drive(url, scenario)
    assert sorted(dlq_names(stem)) == ["a", "b"]
    assert stem.broker.paused() == {}


def test_select_replay_selection_and_purge(url: str, stem: Stem) -> None:
    ids = dict(zip("abcd", dead_letters(stem, ["a", "b", "c", "d"]), strict=True))

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "3", DeadLettersScreen)
        # Rows newest first: d c b a. Select d and b (space moves down), replay both.
        await pilot.press("space", "down", "space")
        assert [r[0] for r in rows(app, "#dlq")] == ["✓", " ", "✓", " "]
        assert "2 selected" in text_of(app, "#dlq-line")
        check = loaded(app, DeadLettersScreen)
        await pilot.press("R")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: check() and len(rows(app, "#dlq")) == 2)
        # The cursor stayed on its entry (a); up to c and purge it (no selection left).
        assert [r[2] for r in rows(app, "#dlq")] == ["c", "a"]
        await pilot.press("up")
        check = loaded(app, DeadLettersScreen)
        await pilot.press("x")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: check() and len(rows(app, "#dlq")) == 1)

    drive(url, scenario)
    assert dlq_names(stem) == ["a"]
    assert {m.task_id for m in Observer(stem).tasks_list()} == {ids["b"], ids["d"]}
    assert stem.task_state(ids["c"]) is not TaskState.PENDING  # purged, never re-enqueued


def test_purge_selection(url: str, stem: Stem) -> None:
    dead_letters(stem, ["a", "b", "c"])

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "3", DeadLettersScreen)
        await pilot.press("space", "space")  # c and b
        check = loaded(app, DeadLettersScreen)
        await pilot.press("x")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: check() and len(rows(app, "#dlq")) == 1)

    drive(url, scenario)
    assert dlq_names(stem) == ["a"]
    assert Observer(stem).tasks_list() == []


def test_filter_pages_and_detail(url: str, stem: Stem) -> None:
    dead_letters(stem, [f"mail.send.{i}" for i in range(60)] + ["report.build"])
    dead_letters(stem, ["bad.payload"], reason=DeadLetterReason.PERMANENT)

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "3", DeadLettersScreen)
        assert "page 1/2" in text_of(app, "#dlq-line") and "62 dead" in text_of(app, "#dlq-line")
        check = loaded(app, DeadLettersScreen)
        await pilot.press("right_square_bracket")
        await until(pilot, lambda: check() and "page 2/2" in text_of(app, "#dlq-line"))
        assert len(rows(app, "#dlq")) == 12

        check = loaded(app, DeadLettersScreen)
        await pilot.press("slash")
        assert app.screen.query_one("#filter", Input).has_focus
        await pilot.press(*"reason:perm", "enter")
        await until(pilot, lambda: check() and len(rows(app, "#dlq")) == 1)
        assert rows(app, "#dlq")[0][2] == "bad.payload"
        assert "filter reason:perm" in text_of(app, "#dlq-line")

        check = loaded(app, DeadLettersScreen)
        await pilot.press("slash", "ctrl+a", "ctrl+k", *"report", "enter")
        await until(
            pilot, lambda: check() and [r[2] for r in rows(app, "#dlq")] == ["report.build"]
        )

        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DeadLetterDetail))
        body = text_of(app, "#detail-body")
        for part in (
            "report.build",
            "exhausted",
            "ValueError: mailbox ops@example.com is full",
            '"n": 60',
            "Traceback (most recent call last)",
            "attempts  1",
            "meta",
        ):
            assert part in body, part
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, DeadLettersScreen))
        check = loaded(app, DeadLettersScreen)
        await pilot.press("escape")  # clears the filter
        await until(pilot, lambda: check() and "62 dead" in text_of(app, "#dlq-line"))

    drive(url, scenario)


def test_replay_from_the_detail_view(url: str, stem: Stem) -> None:
    [task_id] = dead_letters(stem, ["a"])

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "3", DeadLettersScreen)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DeadLetterDetail))
        await pilot.press("r")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: "is gone" in text_of(app, "#detail-body"))

    drive(url, scenario)
    assert dlq_names(stem) == [] and stem.task_state(task_id) is TaskState.PENDING


# --- queues, workers, task lookup ----------------------------------------------------


def test_pause_and_resume_a_queue(url: str, stem: Stem) -> None:
    dead_letters(stem, ["a"])
    stem.enqueue_many([("t", {})] * 3)
    stem.enqueue("t", queue="reports", countdown=60)

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "2", QueuesScreen)
        assert rows(app, "#queues") == [["default", "3", "0", "0", "1", "active"],
                                        ["reports", "0", "1", "0", "0", "active"]]  # fmt: skip
        check = loaded(app, QueuesScreen)
        await pilot.press("p")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: check() and rows(app, "#queues")[0][5] == "paused")
        assert "paused" in notes(app)
        check = loaded(app, QueuesScreen)
        await pilot.press("p")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: check() and rows(app, "#queues")[0][5] == "active")

    drive(url, scenario)
    assert stem.broker.paused() == {}


def test_enter_on_a_queue_shows_its_dead_letters(url: str, stem: Stem) -> None:
    dead_letters(stem, ["a"])
    dead_letters(stem, ["r1", "r2"], queue="reports")

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "2", QueuesScreen)
        check = loaded(app, DeadLettersScreen)
        await pilot.press("down", "enter")
        await until(pilot, lambda: check() and len(rows(app, "#dlq")) == 2)
        assert "filter queue:reports" in text_of(app, "#dlq-line")

    drive(url, scenario)


def test_workers_show_slots_and_revoke_stores_it(url: str, stem: Stem) -> None:
    publish(stem, heartbeat())

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await until(pilot, loaded(app, WorkersScreen))
        [supervisor] = rows(app, "#supervisors")
        assert supervisor[:4] == ["edge-1", "4242", "serving", "1h02m"]
        slots = rows(app, "#slots")
        assert [r[2] for r in slots] == ["running", "idle", "running late", "dead"]
        assert slots[0][3] == "mail.send" and "3.2s/10s" in slots[0][4]
        assert "6f1c2a9e0b7d4c3f8a5e1d2c3b4a5f60" in text_of(app, "#slot-line")
        await pilot.press("v")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: "revoke is stored" in notes(app))

    drive(url, scenario)
    assert stem.backend.is_revoked("6f1c2a9e0b7d4c3f8a5e1d2c3b4a5f60")


def test_task_lookup_by_typed_id_and_from_a_slot(url: str, stem: Stem) -> None:
    done = stem.enqueue("t.add", task_id="task-one").id
    error = ErrorInfo("KeyError", "'x'", "Traceback ...\nKeyError")
    result = TaskResult(done, TaskState.FAILURE, name="t.add", attempt=2, error=error,
                        worker="edge-1", started_at=100.0, finished_at=103.5)  # fmt: skip
    stem.backend.store([result])
    children = [Envelope(id=f"child-{i}", name="t.part", parent_id=done, root_id=done,
                         enqueued_at=time.time()) for i in range(2)]  # fmt: skip
    stem.broker.enqueue(children)
    publish(stem, heartbeat())

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "4", TaskLookupScreen)
        assert "Type or paste" in text_of(app, "#task-body")
        check = loaded(app, TaskLookupScreen)
        await pilot.press(*"task-one", "enter")
        await until(pilot, lambda: check() and "KeyError: 'x'" in text_of(app, "#task-body"))
        body = text_of(app, "#task-body")
        for part in ("FAILURE", "t.add", "attempt  2", "edge-1", "3.5s", "Traceback ...",
                     "children  child-0, child-1"):  # fmt: skip
            assert part in body, part
        check = loaded(app, TaskLookupScreen)
        await pilot.press("escape", "ctrl+a", "ctrl+k", *"child-1", "enter")
        await until(pilot, lambda: check() and "parent  task-one" in text_of(app, "#task-body"))
        # After enter the result has the focus, so 1 switches views again.
        await open_view(app, pilot, "1", WorkersScreen)
        check = loaded(app, TaskLookupScreen)
        await pilot.press("enter")  # the first slot's task
        await until(pilot, lambda: check() and "6f1c2a9e0b7d" in text_of(app, "#task-body"))
        assert "no task with id" in text_of(app, "#task-body")
        # In the id box digits are typed; escape leaves the box (and comes back to it).
        box = app.screen.query_one("#task-id", Input)
        await pilot.press("escape", "1", "2")
        assert box.has_focus and box.value.endswith("12")
        await open_view(app, pilot, "escape", TaskLookupScreen)  # leaves: the view reloads
        assert not box.has_focus
        await open_view(app, pilot, "2", QueuesScreen)

    drive(url, scenario)


# --- read-only, store problems -------------------------------------------------------


def test_read_only_hides_and_refuses_every_action(url: str, stem: Stem) -> None:
    dead_letters(stem, ["a"])
    publish(stem, heartbeat())
    shown: dict[str, set[str]] = {}

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        for key, screen, presses in (("1", WorkersScreen, "vVS"), ("2", QueuesScreen, "p"),
                                     ("3", DeadLettersScreen, "rRx")):  # fmt: skip
            await open_view(app, pilot, key, screen)
            shown[key] = {b.binding.key for b in app.screen.active_bindings.values()
                          if b.enabled and b.binding.show}  # fmt: skip
            await pilot.press(*presses)
            await pilot.pause(0.1)
            assert not isinstance(app.screen, ConfirmModal)
        await pilot.press("space", "R", "x", "enter", "r", "x")
        await pilot.pause(0.1)
        assert isinstance(app.screen, DeadLetterDetail)

    drive(url, scenario, read_only=True)
    assert shown["1"].isdisjoint("vVS") and shown["2"].isdisjoint("p")
    assert shown["3"].isdisjoint({"r", "R", "x"}) and "slash" in shown["3"]
    assert dlq_names(stem) == ["a"] and not stem.backend.is_revoked(
        "6f1c2a9e0b7d4c3f8a5e1d2c3b4a5f60"
    )


def test_keys_are_shown_in_the_footer(url: str, stem: Stem) -> None:
    shown: dict[str, set[str]] = {}

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        for key, screen in (("1", WorkersScreen), ("2", QueuesScreen), ("3", DeadLettersScreen)):
            await open_view(app, pilot, key, screen)
            shown[key] = {b.binding.key for b in app.screen.active_bindings.values()
                          if b.enabled and b.binding.show}  # fmt: skip

    drive(url, scenario)
    assert {"v", "V", "S", "q"} <= shown["1"] and {"p", "q"} <= shown["2"]
    assert {"slash", "r", "space", "R", "x", "q"} <= shown["3"]


def test_a_missing_store_shows_a_banner_until_it_appears(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'later.db'}"

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await until(pilot, lambda: app.store_problem is not None)
        assert "no Stem database" in text_of(app, "#banner")
        assert app.screen.query_one("#banner").has_class("shown")
        assert not (tmp_path / "later.db").exists()  # a look never creates the file
        producer = Stem(broker=url)
        producer.enqueue("t")
        producer.close()
        await open_view(app, pilot, "2", QueuesScreen)
        await until(pilot, lambda: app.store_problem is None and len(rows(app, "#queues")) == 1)
        assert not app.screen.query_one("#banner").has_class("shown")

    drive(url, scenario)


def test_a_deleted_store_is_noticed_and_the_new_file_read(
    url: str, stem: Stem, tmp_path: Path
) -> None:
    stem.enqueue("t")

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "2", QueuesScreen)
        assert rows(app, "#queues")[0][1] == "1"
        stem.close()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"stem.db{suffix}").unlink(missing_ok=True)
        await until(pilot, lambda: app.store_problem is not None)
        fresh = Stem(broker=url)
        fresh.enqueue_many([("t", {})] * 5)
        fresh.close()
        await until(pilot, lambda: app.store_problem is None and rows(app, "#queues")[0][1] == "5")

    drive(url, scenario)


# --- schedules -------------------------------------------------------------------------


def seed_schedules(stem: Stem) -> None:
    from appliance.beat.scheduler import Beat

    entries = [
        stem.schedule("cleanup", "files.cleanup", every=30),
        stem.schedule("report", "reports.build", cron="0 7 * * mon-fri", enabled=False),
    ]
    Beat(stem, stem.stores).apply(entries, "code")


def test_schedules_are_listed_and_one_is_disabled_then_enabled(url: str, stem: Stem) -> None:
    seed_schedules(stem)

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "5", SchedulesScreen)
        table = rows(app, "#schedules")
        assert [(r[0], r[6], r[1]) for r in table] == [
            ("cleanup", "files.cleanup", "enabled"), ("report", "reports.build", "disabled"),
        ]  # fmt: skip
        assert table[0][2] != "-" and table[1][2] == "-"  # a next slot only while enabled
        assert "2 schedule(s), 1 disabled" in text_of(app, "#schedules-line")
        check = loaded(app, SchedulesScreen)
        await pilot.press("e")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: check() and rows(app, "#schedules")[0][1] == "disabled")
        assert "cleanup disabled" in notes(app)
        check = loaded(app, SchedulesScreen)
        await pilot.press("down", "e")
        await confirm(app, pilot, "n")  # cancelled: nothing changes
        await pilot.press("e")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: check() and rows(app, "#schedules")[1][1] == "enabled")

    drive(url, scenario)
    enabled = {s.entry.name: s.enabled for s in stem.stores.schedules.entries()}
    assert enabled == {"cleanup": False, "report": True}


def test_read_only_shows_schedules_but_changes_none(url: str, stem: Stem) -> None:
    seed_schedules(stem)
    shown: set[str] = set()

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "5", SchedulesScreen)
        shown.update(b.binding.key for b in app.screen.active_bindings.values()
                     if b.enabled and b.binding.show)  # fmt: skip
        await pilot.press("e")
        await pilot.pause(0.1)
        assert not isinstance(app.screen, ConfirmModal)

    drive(url, scenario, read_only=True)
    assert "e" not in shown
    assert all(s.enabled for s in stem.stores.schedules.entries() if s.entry.name == "cleanup")


def test_a_refresh_tick_while_the_app_closes_is_harmless(url: str, stem: Stem) -> None:
    # The refresh timer fired once after the last screen had gone (the app was exiting)
    # and `App.screen` raised ScreenStackError out of the timer.
    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await until(pilot, lambda: bool(app.screen.query("#supervisors")))

    app = drive(url, scenario)
    assert app.screen_stack == []  # closed: exactly the moment the timer can still fire
    app.refresh_now()
