"""The operator's half of the control channel (the CLI and the TUI): send a command to
one live worker or to all of them, wait for each to answer or for the timeout, and say
who did not. Stored commands (revoke, pause, resume) are written to the store first, so
they hold for workers that are down or start later; the request only makes the live
ones apply them at once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.backend.protocol import WorkerHeartbeat
from appliance.control.protocol import BROADCAST, ControlRequest
from appliance.errors import StemError
from appliance.stores import Stores

DEFAULT_TIMEOUT_S = 5.0
REVOKE_TTL_S = 7 * 86400.0  # revokes are kept a week unless told otherwise
_POLL_FIRST_S, _POLL_MAX_S = 0.0005, 0.02


class UnknownWorker(StemError):
    """A command named a worker that has no live heartbeat record."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One worker's reply, and how long the round trip took as this side saw it."""

    worker: str
    reply: dict[str, Any]
    latency_ms: float


@dataclass(frozen=True, slots=True)
class Missing:
    """A worker that was asked and did not answer in time, with when it last beat."""

    worker: str
    beat_age_s: float


@dataclass(frozen=True, slots=True)
class CallResult:
    command: str
    answers: list[Answer]
    missing: list[Missing]

    @property
    def complete(self) -> bool:
        return not self.missing


class ControlClient:
    """Commands to the workers sharing `stores`."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores

    def live_workers(self) -> list[WorkerHeartbeat]:
        """The workers with a live heartbeat record (they expire by themselves)."""
        return self.stores.backend.list_workers()

    def call(
        self,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        worker: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> CallResult:
        """Send `command` to `worker` (or to every live worker) and wait up to `timeout`
        seconds for each to answer. Raises `UnknownWorker` for a name with no live
        record; with no live workers at all, nobody is asked (empty answers)."""
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        live = {beat.id: beat for beat in self.live_workers()}
        if worker is not None and worker not in live:
            known = ", ".join(sorted(live)) or "none"
            raise UnknownWorker(f"no live worker named {worker!r} (live workers: {known})")
        targets = [worker] if worker is not None else sorted(live)
        if not targets:
            return CallResult(command, [], [])
        request = ControlRequest(command, args or {}, worker or BROADCAST)
        started = time.monotonic()
        self.stores.control.send(request)
        answers = self._gather(request, targets, started, started + timeout)
        answered = {a.worker for a in answers}
        now = time.time()
        missing = [
            Missing(w, round(now - live[w].sent_at, 1)) for w in targets if w not in answered
        ]
        return CallResult(command, sorted(answers, key=lambda a: a.worker), missing)

    def _gather(
        self, request: ControlRequest, targets: Sequence[str], started: float, deadline: float
    ) -> list[Answer]:
        wanted, seen = set(targets), {}
        pause = _POLL_FIRST_S
        while True:
            now = time.monotonic()
            for reply in self.stores.control.replies(request.id):
                if reply.worker in wanted and reply.worker not in seen:
                    seen[reply.worker] = Answer(reply.worker, reply.reply, (now - started) * 1000)
            if len(seen) == len(wanted) or now >= deadline:
                return list(seen.values())
            time.sleep(min(pause, max(0.0, deadline - now)))
            pause = min(_POLL_MAX_S, pause * 1.5)

    # --- stored commands ---------------------------------------------------------------

    def revoke(
        self,
        task_ids: Sequence[str],
        *,
        terminate: bool = False,
        ttl: float = REVOKE_TTL_S,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> CallResult:
        """Store the revokes (a worker started later honours them; a task enqueued later
        with one of these ids never runs), then tell the live workers."""
        self.stores.backend.revoke(list(task_ids), ttl)
        return self.call("revoke", {"ids": list(task_ids), "terminate": terminate}, timeout=timeout)

    def pause(self, queue: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, CallResult]:
        """Store the pause (every worker, and one started later, stops claiming from
        `queue`; its messages stay); True if it was not paused before."""
        changed = self.stores.broker.pause(queue)
        return changed, self.call("refresh", timeout=timeout)

    def resume(self, queue: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bool, CallResult]:
        changed = self.stores.broker.resume(queue)
        return changed, self.call("refresh", timeout=timeout)

    def shutdown(
        self, *, worker: str | None = None, mode: str = "warm", timeout: float = DEFAULT_TIMEOUT_S
    ) -> CallResult:
        if mode not in ("warm", "cold"):
            raise ValueError(f"mode must be warm or cold, got {mode!r}")
        return self.call("shutdown", {"mode": mode}, worker=worker, timeout=timeout)
