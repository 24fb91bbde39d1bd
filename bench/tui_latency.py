"""How fast `stem tui` opens and refreshes each view on a big SQLite store.

Seeds 100,000 waiting messages and 10,000 dead letters (claimed and settled dead, as a
worker does) plus one worker's heartbeat record, then drives the real app headless
with Pilot and reports, per view, the key-to-screen latency (key press until the view
shows data read after the press) and the refresh time (the thread worker's read), as
medians and maxima. Usage:

    .venv/bin/python bench/tui_latency.py [--messages N] [--dead N] [--reps N] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from textual import events  # noqa: E402
from textual.pilot import Pilot  # noqa: E402
from textual.widgets import Input  # noqa: E402

from appliance.app import Stem  # noqa: E402
from appliance.broker.protocol import Consumer, DeadLetterInfo, Settlement  # noqa: E402
from appliance.states import DeadLetterReason  # noqa: E402
from tests.tui.seed import heartbeat, publish  # noqa: E402
from tui.app import StemTui  # noqa: E402
from tui.screens.base import StemScreen  # noqa: E402
from tui.screens.dead_letters import DeadLetterDetail, DeadLettersScreen  # noqa: E402
from tui.screens.queues import QueuesScreen  # noqa: E402
from tui.screens.task_lookup import TaskLookupScreen  # noqa: E402
from tui.screens.workers import WorkersScreen  # noqa: E402
from tui.source import Source  # noqa: E402

VIEWS: list[tuple[str, type[StemScreen[object]]]] = [
    ("1", WorkersScreen), ("2", QueuesScreen), ("3", DeadLettersScreen),
    ("4", TaskLookupScreen),
]  # fmt: skip


def seed(url: str, messages: int, dead: int) -> str:
    """Fill the store; returns one dead task's id (for the lookup)."""
    stem = Stem(broker=url)
    names = ["mail.send", "mail.bounce", "report.build", "thumbnail.make"]
    stem.enqueue_many([(names[i % 4], {"n": i}) for i in range(dead)])
    info = DeadLetterInfo(DeadLetterReason.EXHAUSTED, "ValueError", "boom", "Traceback ...\n" * 8)
    consumer, left = Consumer.this_process(), dead
    while left:
        batch = stem.broker.claim(["default"], min(1000, left), consumer=consumer, lease=600)
        stem.broker.settle([Settlement.dead_letter(d, info) for d in batch])
        left -= len(batch)
    stem.enqueue_many([(names[i % 4], {"n": i}) for i in range(messages)])
    task_id = stem.broker.dlq_list(limit=1)[0].task_id or ""
    publish(stem, heartbeat())
    stem.close()
    return task_id


async def wait_loaded(app: StemTui, pilot: Pilot[None], screen: type, marker: int) -> None:
    deadline = time.monotonic() + 30
    while not (isinstance(app.screen, screen) and app.screen.shown_at_load > marker):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{screen.__name__} never loaded")
        await asyncio.sleep(0.0005)


async def timed(app: StemTui, pilot: Pilot[None], keys: list[str], screen: type) -> float:
    """Milliseconds from the last key's event to the view showing data read after it.

    The keys before the last are typed with Pilot (untimed); the last is sent as the
    terminal driver sends it, without Pilot's wait-for-idle, whose sleeps would
    otherwise be part of the figure."""
    if keys[-1] in "1234" and isinstance(app.focused, Input):
        await pilot.press("escape")  # out of the id box, where digits are typed
    await pilot.press(*keys[:-1])
    marker = app.loads
    event = events.Key(keys[-1], keys[-1] if len(keys[-1]) == 1 else None)
    event.set_sender(app)
    assert app._driver is not None
    started = time.perf_counter()
    app._driver.send_message(event)
    await wait_loaded(app, pilot, screen, marker)
    return (time.perf_counter() - started) * 1000


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 1), "max_ms": round(max(values), 1)}


async def measure(url: str, task_id: str, reps: int) -> dict[str, dict[str, float]]:
    app = StemTui(Source(Stem(broker=url)), refresh_s=3600)  # refreshes only when asked
    results: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    async with app.run_test(size=(120, 40)) as pilot:
        await wait_loaded(app, pilot, WorkersScreen, -1)
        await timed(app, pilot, ["4"], TaskLookupScreen)  # so the first "1" switches
        for _ in range(reps):
            for key, screen in VIEWS:
                add(f"key {key} ({screen.TITLE}) to screen", await timed(app, pilot, [key], screen))
                marker = app.loads
                app.refresh_now()
                await wait_loaded(app, pilot, screen, marker)
                add(f"refresh {screen.TITLE} (read)", app.last_load_ms or 0.0)
        await timed(app, pilot, ["3"], DeadLettersScreen)
        for _ in range(reps):
            add("dead letters: next page", await timed(app, pilot, ["right_square_bracket"],
                                                      DeadLettersScreen))  # fmt: skip
            add(
                "dead letters: filter by name (scan)",
                await timed(
                    app, pilot, ["slash", "ctrl+a", "ctrl+k", *"report", "enter"], DeadLettersScreen
                ),
            )
            add("refresh dead letters filtered by name (read)", app.last_load_ms or 0.0)
            add("dead letters: filter by queue", await timed(
                app, pilot, ["slash", "ctrl+a", "ctrl+k", *"queue:default", "enter"],
                DeadLettersScreen))  # fmt: skip
            add("dead letters: open detail", await timed(app, pilot, ["enter"], DeadLetterDetail))
            await pilot.press("escape")
            await wait_loaded(app, pilot, DeadLettersScreen, -1)
        await timed(app, pilot, ["4"], TaskLookupScreen)
        for _ in range(reps):
            if not isinstance(app.focused, Input):
                await pilot.press("escape")  # into the id box
            await pilot.pause(0.05)
            add(
                "task lookup: id + enter",
                await timed(app, pilot, ["ctrl+a", "ctrl+k", *task_id, "enter"], TaskLookupScreen),
            )
    return {name: summary(values) for name, values in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--dead", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/stem.db"
        started = time.perf_counter()
        task_id = seed(url, args.messages, args.dead)
        print(f"seeded {args.messages:,} messages and {args.dead:,} dead letters in "
              f"{time.perf_counter() - started:.1f}s", file=sys.stderr)  # fmt: skip
        figures = asyncio.run(measure(url, task_id, args.reps))
    width = max(map(len, figures))
    for name, figure in figures.items():
        print(
            f"{name:<{width}}  median {figure['median_ms']:7.1f} ms  max {figure['max_ms']:7.1f} ms"
        )
    if args.out:
        args.out.write_text(json.dumps({"messages": args.messages, "dead": args.dead,
                                        "figures": figures}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
