"""The worker's half of the control channel: read the requests for this worker from the
store and answer each, from the supervisor's loop (a selector callback on the wake-up
fd, and a once-a-second poll in case a poke was lost), never from a thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from appliance import signals
from appliance.control.protocol import ControlChannel, ControlReply, ControlRequest

log = logging.getLogger("stem.control")

Handler = Callable[[ControlRequest], dict[str, Any]]


class ControlServer:
    """Runs each request through its command's handler and stores the replies. A handler
    that raises answers with the error (the worker goes on); an unknown command answers
    that it is unknown."""

    def __init__(
        self, channel: ControlChannel, worker: str, handlers: Mapping[str, Handler]
    ) -> None:
        self.channel = channel
        self.worker = worker
        self.handlers = dict(handlers)
        self.cursor = channel.cursor()  # commands sent before this worker started are not its
        self.served = 0

    def poll(self, now: float | None = None) -> None:
        """Answer every request sent since the last poll (store errors propagate: the
        caller backs off, and the cursor has not moved, so nothing is skipped)."""
        requests, cursor = self.channel.receive(self.cursor, self.worker)
        answered = [(r, *self._timed(r)) for r in requests]
        self.channel.reply([ControlReply(r.id, self.worker, reply) for r, reply, _ in answered])
        self.cursor = cursor
        self.served += len(answered)
        if signals.control_command_completed.receivers:
            for request, reply, took in answered:
                error = reply.get("error")
                signals.control_command_completed.send(signals.ControlCommandCompleted(
                    worker=self.worker, command=request.command, request_id=request.id,
                    ok=error is None, duration=took, error=None if error is None else str(error),
                ))  # fmt: skip

    def _timed(self, request: ControlRequest) -> tuple[dict[str, Any], float]:
        if signals.control_command_received.receivers:
            signals.control_command_received.send(signals.ControlCommandReceived(
                worker=self.worker, command=request.command, request_id=request.id,
                arguments=request.args,
            ))  # fmt: skip
        started = time.monotonic()
        reply = self._answer(request)
        return reply, time.monotonic() - started

    def _answer(self, request: ControlRequest) -> dict[str, Any]:
        handler = self.handlers.get(request.command)
        if handler is None:
            return {"error": f"unknown command {request.command!r}; known: {sorted(self.handlers)}"}
        started = time.monotonic()
        try:
            reply = handler(request)
        except Exception as exc:  # a bad request must not stop the worker
            log.exception("control command %s failed", request.command)
            return {"error": f"{type(exc).__name__}: {exc}"}
        log.debug(
            "control %s from request %s answered in %.1f ms", request.command, request.id,
            (time.monotonic() - started) * 1000,
        )  # fmt: skip
        return reply
