"""Tasks per second over the last minutes, from successive heartbeat snapshots.

A worker's `processed` counts since it started, so the rate is the change between two
snapshots, per worker: a worker seen for the first time adds nothing (its count covers
an unknown span) and one that restarted (its count went down) adds its new count only
from the next snapshot on."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_S = 300.0  # the sparkline's span


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # epoch seconds
    rate: float  # tasks per second since the sample before


class Throughput:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[Sample] = deque()
        self._last: tuple[float, dict[str, int]] | None = None

    def add(self, at: float, processed: dict[str, int]) -> None:
        """Record one snapshot of each live worker's `processed` count."""
        if self._last is not None:
            before, counts = self._last
            span = at - before
            if span <= 0:
                return  # the same instant (two reads in one tick): nothing new
            done = sum(max(0, n - counts[w]) for w, n in processed.items() if w in counts)
            self.samples.append(Sample(at, done / span))
        self._last = (at, dict(processed))
        while self.samples and self.samples[0].at < at - self.window_s:
            self.samples.popleft()

    def rates(self) -> list[float]:
        return [s.rate for s in self.samples]

    @property
    def now(self) -> float:
        return self.samples[-1].rate if self.samples else 0.0

    @property
    def peak(self) -> float:
        return max(self.rates(), default=0.0)
