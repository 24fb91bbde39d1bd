"""Fixtures for the TUI tests: a real SQLite store in tmp_path and a way to drive the
app with Pilot from a plain (sync) test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from textual.pilot import Pilot

from appliance.app import Stem
from tui.app import StemTui
from tui.source import Source

Scenario = Callable[[StemTui, Pilot[None]], Awaitable[None]]


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stem.db'}"


@pytest.fixture
def stem(url: str) -> Iterator[Stem]:
    """The test's own handle on the store (the app opens its own, read-only)."""
    app = Stem(broker=url)
    app.stores  # noqa: B018 (creates the database the app will only open)
    yield app
    app.close()


def drive(
    url: str,
    scenario: Scenario,
    *,
    size: tuple[int, int] = (100, 30),
    read_only: bool = False,
    refresh_s: float = 0.25,
    control_timeout: float = 0.5,  # the seeded heartbeats belong to no process
) -> StemTui:
    """Run the app on `url` under Pilot through `scenario`; returns the app."""
    source = Source(Stem(broker=url))
    source.control_timeout = control_timeout
    app = StemTui(source, read_only=read_only, refresh_s=refresh_s)

    async def run() -> None:
        async with app.run_test(size=size) as pilot:
            await scenario(app, pilot)

    asyncio.run(run())
    return app
