"""What a supervisor answers on the control channel (SPEC section 4): ping, stats,
inspect, revoke, refresh (paused queues and revokes, now) and shutdown. Each handler
reads or steers the supervisor's own state from its loop; the JSON shapes are the ones
`stem worker ... --json` prints."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from appliance.control.protocol import ControlRequest
from appliance.states import SlotState, TaskEvent

if TYPE_CHECKING:
    from appliance.worker.supervisor import Supervisor

log = logging.getLogger("stem.control")

FINISHED = (TaskEvent.SUCCESS, TaskEvent.DEAD, TaskEvent.REVOKED)


class WorkerCommands:
    """The handlers of one supervisor (`ControlServer` calls them by command name)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    def handlers(self) -> dict[str, Any]:
        return {
            "ping": self.ping, "stats": self.stats, "inspect": self.inspect,
            "revoke": self.revoke, "refresh": self.refresh, "shutdown": self.shutdown,
        }  # fmt: skip

    def ping(self, request: ControlRequest) -> dict[str, Any]:
        return {"pong": True}

    def stats(self, request: ControlRequest) -> dict[str, Any]:
        sup = self.sup
        counts = sup.round.counts
        return {
            "worker": sup.worker_name, "host": sup.consumer.host, "pid": sup.consumer.pid,
            "queues": list(sup.queues), "concurrency": sup.tree.table.header.slots,
            "in_flight": sup.tree.in_flight(), "processed": sum(counts[e] for e in FINISHED),
            "failed": counts[TaskEvent.DEAD], "paused": sorted(sup.paused & set(sup.queues)),
        }  # fmt: skip

    def inspect(self, request: ControlRequest) -> dict[str, Any]:
        """The tasks this worker runs now, with how long they ran and held their lease."""
        now = time.monotonic()
        active = []
        for child in self.sup.tree.children.values():
            slot = self.sup.tree.table.slots[child.index]
            dispatch = child.outstanding.get(slot.seq)
            if dispatch is None or slot.state != SlotState.RUNNING:
                continue
            lease_age = dispatch.task.options.visibility_timeout - (dispatch.lease_end - now)
            active.append({
                "task_id": dispatch.envelope.id, "name": dispatch.envelope.name,
                "runtime_s": round(now - slot.started, 3), "lease_age_s": round(lease_age, 3),
                "pid": child.pid,
            })  # fmt: skip
        return {"worker": self.sup.worker_name, "active": active}

    def revoke(self, request: ControlRequest) -> dict[str, Any]:
        """The ids are stored revoked already (by the sender); apply them now: skip them
        at claim, and with `terminate` kill the children running them."""
        ids = [str(i) for i in request.args.get("ids", [])]
        terminate = bool(request.args.get("terminate"))
        self.sup.revoked.update(ids)
        stopped = self.sup.tree.revoke(set(ids), terminate=terminate)
        if stopped:
            log.info("revoked and killed the children running %s", ", ".join(stopped))
        return {"worker": self.sup.worker_name, "terminated": stopped}

    def refresh(self, request: ControlRequest) -> dict[str, Any]:
        """Reload paused queues and revokes from the store now (after a pause or resume)."""
        self.sup.refresh_flags(time.monotonic())
        return {"worker": self.sup.worker_name, "paused": sorted(self.sup.paused)}

    def shutdown(self, request: ControlRequest) -> dict[str, Any]:
        mode = request.args.get("mode", "warm")
        if mode not in ("warm", "cold"):
            return {"error": f"mode must be warm or cold, got {mode!r}"}
        log.info("shutdown (%s) requested on the control channel", mode)
        if mode == "cold":
            self.sup.cold_shutdown("control request")
        elif self.sup.accepting:
            self.sup.begin_warm_shutdown()
        return {"worker": self.sup.worker_name, "mode": mode}
