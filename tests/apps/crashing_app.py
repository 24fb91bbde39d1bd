"""An app whose every worker child dies the moment it is forked (a bad import-time hook:
the pool can never serve), for the systemd watchdog test."""

from __future__ import annotations

import os

from appliance import Stem, TaskContext

stem = Stem()  # broker from STEM_BROKER_URL, set by the test

os.register_at_fork(after_in_child=lambda: os._exit(3))


@stem.task("c.noop")
def noop(ctx: TaskContext) -> None:
    return None
