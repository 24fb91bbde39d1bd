"""The supervisor's periodic chores, as one list of `(every, function)`.

A chore is something the loop does every so often besides its own work (recovering
abandoned leases, purging expired rows, publishing its worker record, pinging the
systemd watchdog, and later refreshing revokes or ticking Beat): adding one is one
`duties.every(...)` line, and the loop's select timeout accounts for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class Duty:
    """One chore: `run(now)` every `every` seconds of the monotonic clock. `run` may
    return a delay to use for the next time instead (a chore that knows it is needed
    sooner or later than usual)."""

    name: str
    every: float
    run: Callable[[float], float | None]
    next_at: float = 0.0  # monotonic; 0: at the first turn


class Duties:
    """The chores of one supervisor, run from its loop (never from a thread)."""

    def __init__(self) -> None:
        self._duties: list[Duty] = []

    def every(
        self, seconds: float, run: Callable[[float], float | None], *, name: str = ""
    ) -> Duty:
        """Run `run(now)` at the next turn, then every `seconds`."""
        duty = Duty(name or getattr(run, "__name__", "duty"), seconds, run)
        self._duties.append(duty)
        return duty

    def run_due(self, now: float) -> None:
        for duty in self._duties:
            if now >= duty.next_at:
                delay = duty.run(now)
                duty.next_at = now + (duty.every if delay is None else delay)

    def next_at(self) -> float:
        """When the earliest chore is due (monotonic), for the loop's select timeout."""
        return min((duty.next_at for duty in self._duties), default=float("inf"))
