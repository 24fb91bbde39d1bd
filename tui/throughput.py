"""Tasks per second over the last minutes, from successive heartbeat snapshots.

A worker's `processed` counts since it started and changes only when it beats (every 2
s), while the TUI samples every refresh (every second): so each worker's rate is the
change of its count between two of its own beats, over their `sent_at` gap, and holds
until its next beat. A worker seen for the first time adds nothing yet (its count covers
an unknown span); one whose count went down (it restarted under the same name) adds
nothing for that beat. Each refresh adds one sample: the sum over the live workers."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_S = 300.0  # the sparkline's span


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # epoch seconds
    rate: float  # tasks per second, all live workers


class Throughput:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[Sample] = deque()
        self._beats: dict[str, tuple[float, int]] = {}  # worker -> (sent_at, processed)
        self._rates: dict[str, float] = {}

    def add(self, at: float, beats: dict[str, tuple[float, int]]) -> None:
        """Record one snapshot: each live worker's last beat time and `processed`."""
        for worker, (sent_at, processed) in beats.items():
            before = self._beats.get(worker)
            if before is not None and sent_at <= before[0]:
                continue  # the same beat as last refresh: its rate holds
            if before is not None:
                self._rates[worker] = max(0, processed - before[1]) / (sent_at - before[0])
            else:
                self._rates[worker] = 0.0
            self._beats[worker] = (sent_at, processed)
        for gone in set(self._beats) - set(beats):
            del self._beats[gone], self._rates[gone]
        if self.samples and at <= self.samples[-1].at:
            return  # two reads in one instant: one sample
        self.samples.append(Sample(at, sum(self._rates.values())))
        while self.samples[0].at < at - self.window_s:
            self.samples.popleft()

    def rates(self) -> list[float]:
        return [s.rate for s in self.samples]

    @property
    def now(self) -> float:
        return self.samples[-1].rate if self.samples else 0.0

    @property
    def peak(self) -> float:
        return max(self.rates(), default=0.0)
