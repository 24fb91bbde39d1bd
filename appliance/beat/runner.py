"""`stem beat run`: Beat alone, in a process of its own (a systemd `Type=notify` unit,
or by hand): READY once the schedules are applied, WATCHDOG from the loop, STOPPING on
SIGTERM or SIGINT, and the leader lease given up on the way out, so another instance
leads at once."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time

from appliance.app import Stem
from appliance.beat.scheduler import start_beat
from appliance.errors import StemError
from appliance.states import ExitCode
from appliance.worker.systemd import Notifier

log = logging.getLogger("stem.beat")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def run_beat(stem: Stem) -> int:
    """Serve until a stop signal; the process exit code."""
    notifier = Notifier()
    selector = selectors.DefaultSelector()
    signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(signal_w)
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: None)  # the wake-up fd carries it
    selector.register(signal_r, selectors.EVENT_READ)
    stores = stem.open_stores(busy_wait=0.25)
    try:
        beat = start_beat(stem, stores)
    except StemError as exc:
        log.error("cannot start Beat: %s", exc)
        stores.close()
        return int(ExitCode.CONFIG)
    notifier.send("READY=1", f"STATUS=beat {beat.instance}")
    log.info("beat %s started: %d schedules", beat.instance, len(stores.schedules.entries()))
    watchdog = notifier.watchdog_interval or float("inf")
    try:
        while True:
            now = time.monotonic()
            wait = min(beat.tick(now), watchdog)
            notifier.send("WATCHDOG=1")  # the loop turned: it is alive
            notifier.status(f"{'leading' if beat.leader else 'standing by'}; "
                            f"{beat.dispatched} slots dispatched")  # fmt: skip
            if selector.select(wait) and _stop_requested(signal_r):
                break
    finally:
        notifier.send("STOPPING=1")
        beat.stop()
        stores.close()
        signal.set_wakeup_fd(-1)
    log.info("beat %s stopped after %d slots", beat.instance, beat.dispatched)
    return int(ExitCode.OK)


def _stop_requested(signal_r: int) -> bool:
    try:
        received = os.read(signal_r, 64)
    except BlockingIOError:
        return False
    return any(s in STOP_SIGNALS for s in received)
