"""Shared fixtures: real stores only. SQLite files live in tmp_path; Redis is a private
redis-server on a free port (see tests/redis_server.py). A missing redis-server fails
the run: it never skips."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import Stem
from appliance.config import Settings
from tests.redis_server import RedisServer
from tests.stores import close_opened

STORES = ["sqlite", "redis"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _close_test_stores() -> Iterator[None]:
    yield
    close_opened()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean Redis for each test (the server is shared by the session)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()  # a fault test left it down
    redis_server.flush()
    yield redis_server.url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stem.db'}"


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh store, once per store kind (the contract suites use this)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'stem.db'}"
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def stem(store_url: str) -> Iterator[Stem]:
    """An app with the ledger tasks (`tests.apps.ledger_app`) on the store under test;
    a module with a `stem` fixture of its own uses that one instead."""
    from tests.apps import ledger_app  # here: they import this module's helpers
    from tests.process import app_on

    app = app_on(store_url, ledger_app.stem)
    yield app
    app.close()


@pytest.fixture
def settings() -> Settings:
    return Settings()


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01
) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
