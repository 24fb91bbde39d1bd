"""Retry strategies and the pure function that decides what happens after an attempt."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from appliance.states import DeadLetterReason, SettleKind


class RetryStrategy(Protocol):
    """Says how long to wait before attempt number `attempt + 1`."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the failure of 0-based `attempt`."""
        ...


@dataclass(frozen=True, slots=True)
class ExponentialJitterRetryStrategy:
    """Full-jitter exponential backoff: uniform(0, min(max, base * 2**attempt)).

    Full jitter spreads a burst of failures out instead of retrying them in lockstep
    (the thundering herd the seeds warn about); `jitter=0` gives the plain exponential.
    """

    base: float = 1.0
    max: float = 300.0
    jitter: float = 1.0  # 0..1: the share of the delay that is randomised

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max, self.base * 2.0 ** min(attempt, 62))
        return ceiling * (1 - self.jitter) + random.uniform(0, ceiling * self.jitter)


@dataclass(frozen=True, slots=True)
class FixedRetryStrategy:
    """The same delay before every retry."""

    seconds: float = 1.0

    def delay(self, attempt: int) -> float:
        return self.seconds


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one finished attempt."""

    kind: SettleKind
    not_before: float | None = None  # for RETRY: when the next attempt may start
    reason: DeadLetterReason | None = None  # for DEAD


ACK = Decision(SettleKind.ACK)


def decide(
    *,
    failed: bool,
    permanent: bool,
    attempt: int,
    max_retries: int,
    strategy: RetryStrategy,
    now: float,
    countdown: float | None = None,
) -> Decision:
    """Ack, retry at a time, or dead-letter; pure so every path is easy to test.

    `max_retries` counts retries after the first attempt, so attempts 0..max_retries run.
    An explicit `countdown` (from `ctx.retry(countdown=)`) replaces the strategy's delay.
    """
    if not failed:
        return ACK
    if permanent:
        return Decision(SettleKind.DEAD, reason=DeadLetterReason.PERMANENT)
    if attempt >= max_retries:
        return Decision(SettleKind.DEAD, reason=DeadLetterReason.EXHAUSTED)
    wait = countdown if countdown is not None else strategy.delay(attempt)
    return Decision(SettleKind.RETRY, not_before=now + max(0.0, wait))
