"""Every view on Redis (a smoke test: the views read only through the Observer, whose
behaviour on both stores tests/test_observe*.py check), plus one replay by key."""

from __future__ import annotations

from textual.pilot import Pilot

from appliance.app import Stem
from appliance.observe import Observer
from tests.tui.conftest import drive
from tests.tui.seed import dead_letters, heartbeat, publish, until
from tests.tui.test_pilot import confirm, open_view, rows, text_of
from tui.app import StemTui
from tui.screens.dead_letters import DeadLetterDetail, DeadLettersScreen
from tui.screens.queues import QueuesScreen
from tui.screens.task_lookup import TaskLookupScreen
from tui.screens.workers import WorkersScreen


def test_every_view_on_redis(redis_url: str) -> None:
    stem = Stem(broker=redis_url)
    [first, second] = dead_letters(stem, ["mail.send", "report.build"])
    stem.enqueue_many([("t", {})] * 3)
    publish(stem, heartbeat())

    async def scenario(app: StemTui, pilot: Pilot[None]) -> None:
        await open_view(app, pilot, "2", QueuesScreen)
        assert rows(app, "#queues") == [["default", "3", "0", "0", "2", "active"]]
        await open_view(app, pilot, "1", WorkersScreen)
        assert rows(app, "#supervisors")[0][0] == "edge-1" and len(rows(app, "#slots")) == 4
        await open_view(app, pilot, "3", DeadLettersScreen)
        assert [r[2] for r in rows(app, "#dlq")] == ["report.build", "mail.send"]
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DeadLetterDetail))
        assert "Traceback" in text_of(app, "#detail-body")
        await pilot.press("r")
        await confirm(app, pilot, "y")
        await until(pilot, lambda: "is gone" in text_of(app, "#detail-body"))
        await open_view(app, pilot, "4", TaskLookupScreen)
        await pilot.press(*first, "enter")
        await until(pilot, lambda: "DEAD" in text_of(app, "#task-body"))

    drive(redis_url, scenario)
    assert [e.task_id for e in Observer(stem).dlq_list().entries] == [first]
    assert second in {m.task_id for m in Observer(stem).tasks_list()}
    stem.close()
