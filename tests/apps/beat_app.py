"""A Beat app for the scheduler's process tests: one entry every second, whose task
writes the slot it was dispatched for to the ledger (`STEM_TEST_LEDGER`)."""

from __future__ import annotations

import os

from appliance import Stem, TaskContext
from tests.apps.ledger_app import record

stem = Stem()  # broker from STEM_BROKER_URL, set by the test


@stem.task("beat.mark")
def mark(ctx: TaskContext) -> str:
    slot = ctx.headers["stem-scheduled-for"]
    record(ctx, f"slot={slot}")
    return slot


stem.schedule(
    "every-second", "beat.mark", every=1,
    catch_up=os.environ.get("STEM_TEST_CATCH_UP", "once"),
)  # fmt: skip
