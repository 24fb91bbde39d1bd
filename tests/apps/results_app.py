"""Tasks whose results are as big as they are asked to be (the `max_result_bytes` tests)."""

from __future__ import annotations

from appliance import Stem, TaskContext

stem = Stem()  # broker from STEM_BROKER_URL, set by the test


@stem.task("r.sized", max_retries=1, retry_backoff=(0.01, 0.01, 0.0))
def sized(ctx: TaskContext, size: int) -> str:
    """A JSON string of `size` + 2 bytes (its quotes), on every attempt."""
    return "x" * size
