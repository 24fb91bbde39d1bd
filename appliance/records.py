"""`@record`: an immutable value class for the per-task hot path.

A frozen dataclass sets each field through `object.__setattr__` (its own `__setattr__`
refuses), which made a 14-field `TaskResult` cost 4.2 us to build against 0.4 us for
the same class unfrozen. The supervisor builds five such values per task (the
delivery, the outcome, the settlement, the result, what settled), so freezing at run
time cost it ~12 % of its time in a drain (measured 2026-12-03, same-run pairs: 70 ->
62 us of supervisor CPU per task).

A record is frozen to the type checker (`dataclass_transform(frozen_default=True)`:
mypy rejects an assignment to a field, as for a frozen dataclass) and hashed by value
as a frozen dataclass is; only the run-time guard against assignment is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    """A slotted dataclass, read-only to the type checker, hashed by its fields."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
