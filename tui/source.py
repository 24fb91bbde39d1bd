"""Where the screens' data comes from: one `Stem` opened for reads, the `Observer` over
it and the `ControlClient` for actions, with reconnection after a store went away.

Everything here blocks (it is called from Textual thread workers, never from the UI
thread) and imports nothing from Textual, so it is tested on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from appliance.app import Stem
from appliance.backend.protocol import WorkerHeartbeat
from appliance.control.client import DEFAULT_TIMEOUT_S, ControlClient
from appliance.errors import StemError
from appliance.observe import Observer
from appliance.stores import scheme_of
from tui.throughput import Throughput

T = TypeVar("T")


class StoreDown(StemError):
    """A read failed because a store is unreachable, missing or was replaced; the next
    read reopens the stores."""


@dataclass(frozen=True, slots=True)
class Timed(Generic[T]):
    """A read's value and how long the read took (the TUI shows it; the bench measures it)."""

    value: T
    elapsed_ms: float


class Source:
    """Reads and actions on one `Stem`'s stores, safe to call from several threads."""

    def __init__(self, stem: Stem, *, clock: Callable[[], float] = time.time) -> None:
        stem.create_stores = False  # a look never creates or migrates a database
        self.stem = stem
        self.clock = clock
        self.throughput = Throughput()
        # How long an action waits for the live workers' replies (in a thread worker).
        self.control_timeout = DEFAULT_TIMEOUT_S
        # Opening and closing the stores is serialised; the stores lock their own calls.
        self._lock = threading.RLock()
        self._sqlite = scheme_of(stem.settings.broker_url) == "sqlite"

    @property
    def url(self) -> str:
        return self.stem.settings.broker_url

    def read(self, fn: Callable[[Observer], T]) -> Timed[T]:
        """Run one read through the Observer; a store error closes the stores (the next
        read opens them again) and is raised as `StoreDown`."""
        started = time.perf_counter()
        with self._lock:
            try:
                if self._sqlite:
                    # SQLite goes on serving a deleted or replaced file's old inode
                    # without a word; this says so, and the reopen finds the new file.
                    self.stem.broker.watch_identity()
                value = fn(Observer(self.stem))
            except (StemError, OSError) as exc:
                self.stem.close()
                raise StoreDown(str(exc) or type(exc).__name__) from exc
        return Timed(value, (time.perf_counter() - started) * 1000)

    def workers(self) -> list[WorkerHeartbeat]:
        """The live supervisors; every call also feeds the throughput history."""
        beats = self.read(lambda o: o.workers()).value
        self.throughput.add(self.clock(), {b.id: (b.sent_at, b.processed) for b in beats})
        return beats

    def control(self) -> ControlClient:
        """A control client on the open stores (actions wait for replies outside the lock)."""
        with self._lock:
            try:
                return ControlClient(self.stem.stores)
            except (StemError, OSError) as exc:
                self.stem.close()
                raise StoreDown(str(exc)) from exc

    def close(self) -> None:
        with self._lock:
            self.stem.close()
