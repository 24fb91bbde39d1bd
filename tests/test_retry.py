"""The pure retry decision and the strategies."""

from __future__ import annotations

from appliance.retry import (
    ExponentialJitterRetryStrategy,
    FixedRetryStrategy,
    decide,
)
from appliance.states import DeadLetterReason, SettleKind


def test_success_acks() -> None:
    d = decide(failed=False, permanent=False, attempt=0, max_retries=0,
               strategy=FixedRetryStrategy(), now=0.0)  # fmt: skip
    assert d.kind is SettleKind.ACK


def test_failure_retries_until_max_retries_then_exhausts() -> None:
    strategy = FixedRetryStrategy(2.0)
    kinds = [
        decide(failed=True, permanent=False, attempt=a, max_retries=2, strategy=strategy, now=100.0)
        for a in range(3)
    ]
    assert [k.kind for k in kinds] == [SettleKind.RETRY, SettleKind.RETRY, SettleKind.DEAD]
    assert kinds[0].not_before == 102.0
    assert kinds[2].reason is DeadLetterReason.EXHAUSTED


def test_permanent_goes_straight_to_dead() -> None:
    d = decide(failed=True, permanent=True, attempt=0, max_retries=5,
               strategy=FixedRetryStrategy(), now=0.0)  # fmt: skip
    assert (d.kind, d.reason) == (SettleKind.DEAD, DeadLetterReason.PERMANENT)


def test_explicit_countdown_replaces_the_strategy() -> None:
    d = decide(failed=True, permanent=False, attempt=0, max_retries=1,
               strategy=FixedRetryStrategy(50), now=10.0, countdown=0.5)  # fmt: skip
    assert d.not_before == 10.5


def test_exponential_jitter_stays_within_its_ceiling() -> None:
    strategy = ExponentialJitterRetryStrategy(base=1.0, max=10.0)
    for attempt in range(20):
        delays = [strategy.delay(attempt) for _ in range(200)]
        ceiling = min(10.0, 2.0**attempt)
        assert all(0 <= d <= ceiling for d in delays)
    assert len({round(strategy.delay(3), 6) for _ in range(50)}) > 10  # really jittered


def test_zero_jitter_is_plain_exponential() -> None:
    strategy = ExponentialJitterRetryStrategy(base=0.5, max=100.0, jitter=0.0)
    assert [strategy.delay(a) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]
