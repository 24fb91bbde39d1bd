"""The stores: one opener that turns the settings into a broker, a result backend and
their shared unit of work (`Stores`), and the one place that maps URL schemes.

Each store is one package (`stores/sqlite/`, `stores/redis/`) with its connection,
layout, scripts, wake-ups, broker and backend; its `open_store` returns a `Stores` whose
broker and backend share one connection, so that `Stores.unit_of_work()` can make what
both write commit together. Adapters import lazily: SQLite users never load redis.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from appliance.errors import UnsupportedBroker

if TYPE_CHECKING:
    from appliance.backend.protocol import ResultBackend
    from appliance.beat.store import ScheduleStore
    from appliance.broker.protocol import Broker
    from appliance.config import Settings
    from appliance.control.protocol import ControlChannel
    from appliance.envelope import EnvelopeCodec

SCHEMES = ("sqlite", "redis", "rediss")


def scheme_of(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise UnsupportedBroker(
            "url", url, f"unsupported scheme {scheme!r}; use sqlite:///PATH or redis://HOST"
        )
    return scheme


def preload(*urls: str) -> None:
    """Import the store packages `urls` will need, without connecting to anything.

    `Stem()` calls it, so that the import (redis-py: 110-160 ms, with every module it
    pulls in; SQLite's package: ~50 ms) happens when the application loads rather than
    inside its first enqueue: a producer that took 160 ms over its first message then
    sent the next 30 in a burst, which queued behind each other (p99 of a paced run).
    An unknown scheme is left for `open_stores` to report, where it always was."""
    for url in urls:
        scheme = urlsplit(url).scheme
        if scheme in SCHEMES:
            importlib.import_module(f"appliance.stores.{_PACKAGES[scheme]}")


_PACKAGES = {"sqlite": "sqlite", "redis": "redis", "rediss": "redis"}


class UnitOfWork(Protocol):
    """`unit_of_work()` of `Stores`; `durable=False` may commit without waiting for the
    disk (SQLite: no fsync), for a unit whose loss to a power cut only re-runs tasks."""

    def __call__(self, *, durable: bool = True) -> contextlib.AbstractContextManager[None]: ...


@dataclass
class Stores:
    """A broker, a result backend, and their unit of work.

    `unit_of_work()` is a context manager: what the broker and the backend write inside
    it commits together, all or none, when the block ends; an exception inside the
    block commits nothing. SQLite: one `BEGIN IMMEDIATE` transaction (one fsync). Redis:
    one MULTI/EXEC transaction sent in one round trip (Redis has no rollback, so each
    script checks before it writes; a claim inside the unit sends what the unit holds so
    far together with itself, because its reply is needed at once; at `maxmemory`, where
    Redis refuses scripts inside MULTI, the unit goes as a plain pipeline, results first).
    Broker and backend on different stores: each store's unit, the backend's committed
    first, so a crash between the two re-runs a task but never acks one without its result.
    """

    broker: Broker
    backend: ResultBackend
    unit_of_work: UnitOfWork
    control: ControlChannel  # requests to live workers and their replies (the broker's store)
    schedules: ScheduleStore  # Beat's entries and runs (the broker's store)
    closers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    # Called before this process forks (the supervisor, before each batch of children):
    # an SQLite store closes its connection so a child inherits no SQLite state
    # (`Database.close_for_fork`); the next use reopens it.
    fork_guards: list[Callable[[], None]] = field(default_factory=list, repr=False)

    # What deletes expired rows for good. Default: the backend's purge. Split stores add
    # the broker's store: its chords, rate limiters, records and control requests live
    # there, and its own backend is otherwise never asked.
    purgers: list[Callable[[], int]] = field(default_factory=list, repr=False)

    def purge_expired(self) -> int:
        """Delete what has expired in every store these use; how many entries went."""
        return sum(purge() for purge in self.purgers or [self.backend.purge_expired])

    def before_fork(self) -> None:
        for guard in self.fork_guards:
            guard()

    def close(self) -> None:
        """Release everything opened for these stores (each adapter's own resources, then
        the shared connections); safe to call twice."""
        closers, self.closers = self.closers, []
        for close in closers:
            close()


def open_stores(
    settings: Settings,
    codec: EnvelopeCodec,
    *,
    busy_wait: float | None = None,
    create: bool = True,
) -> Stores:
    """The broker of `settings.broker_url` and the backend of `settings.backend_url`; on
    one store they share a connection and one unit of work.

    `busy_wait` is for an owner whose loop must never stall (the supervisor): it caps
    how long one SQLite call waits for other writers before it raises `BrokerBusy`
    (a producer's big batch), and gives Redis calls a short timeout and one quick
    retry instead of two seconds of back-off (the loop backs off by itself).
    `create=False` is for reads: an SQLite store is only opened if it exists (never
    created, migrated or switched to WAL), so a look never changes a file.
    """
    broker_store = _open_one(settings.broker_url, settings, codec, busy_wait, create)
    if settings.backend_url == settings.broker_url:
        return broker_store
    try:
        backend_store = _open_one(settings.backend_url, settings, codec, busy_wait, create)
    except BaseException:
        broker_store.close()
        raise

    @contextlib.contextmanager
    def both(*, durable: bool = True) -> Iterator[None]:
        # Entered broker first, so the backend's unit commits first (see `Stores`).
        with (
            broker_store.unit_of_work(durable=durable),
            backend_store.unit_of_work(durable=durable),
        ):
            yield

    return Stores(
        broker_store.broker, backend_store.backend, both, broker_store.control,
        broker_store.schedules, [broker_store.close, backend_store.close],
        [*broker_store.fork_guards, *backend_store.fork_guards],
        [broker_store.purge_expired, backend_store.purge_expired],
    )  # fmt: skip


def _open_one(
    url: str, settings: Settings, codec: EnvelopeCodec, busy_wait: float | None, create: bool
) -> Stores:
    if scheme_of(url) == "sqlite":
        from appliance.stores import sqlite

        return sqlite.open_store(url, settings, codec, busy_wait=busy_wait, create=create)
    from appliance.stores import redis

    return redis.open_store(url, settings, codec, quick=busy_wait is not None)
