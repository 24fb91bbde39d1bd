"""Beat, the scheduler: entries (`spec`) and their calendar maths (`calendar`).

Pure so far: the loop that claims slots in the store and enqueues them builds on these.
"""

from appliance.beat.calendar import (
    DEFAULT_GRACE,
    EPOCH,
    Plan,
    dispatch_at,
    dry_run,
    format_slot,
    iter_slots,
    jitter_offset,
    latest_slot,
    next_slot,
    plan,
    slots_between,
)
from appliance.beat.spec import (
    CATCH_UP_MODES,
    KINDS,
    SOLAR_EVENTS,
    ScheduleEntry,
    entries_from_config,
    validate_entries,
)

__all__ = [
    "CATCH_UP_MODES",
    "DEFAULT_GRACE",
    "EPOCH",
    "KINDS",
    "SOLAR_EVENTS",
    "Plan",
    "ScheduleEntry",
    "dispatch_at",
    "dry_run",
    "entries_from_config",
    "format_slot",
    "iter_slots",
    "jitter_offset",
    "latest_slot",
    "next_slot",
    "plan",
    "slots_between",
    "validate_entries",
]
