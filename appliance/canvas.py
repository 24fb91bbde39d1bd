"""The canvas: signatures, chains, groups and chords (SPEC section 1.2).

A producer builds every envelope of a canvas up front (ids assigned, arguments checked,
routed, rate-limited and sealed like any other enqueue) and stores only what can run
now; the rest rides in the stored messages and is enqueued by the supervisor in the
same unit of work that settles the task before it (`appliance.flow`). So a chain goes
on after its producer exits, and a crash between a step and the next can neither lose
nor double it.

- chain(a, b, c): `a` is stored carrying `b` and `c` (its `then`); each step's success
  enqueues the next with the result as `previous`. A step that fails for good ends the
  chain: the later steps get a `ChainError` result naming it, and never run.
- group(...): the members are stored in one batch (all or none up to 5,000).
- chord(group, callback): the members are stored together with the chord's record (its
  size and the callback's sealed message), in one transaction. Each member's success
  records its value and counts, in the unit that settles it, once per member index,
  so a redelivered member never counts twice; the settle that completes the count
  enqueues the callback, whose `previous` is the members' values in order (read from
  the store when it runs, so no message grows with the chord). A member that fails
  for good gives the callback a `ChordError` result; the callback never runs.

Nesting: a chain's steps, a group's members, a chord's members and its callback are
signatures; a group or a chord inside a chain and a chain inside a group are refused
with an error saying what to use instead (docs/canvas.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from appliance.envelope import Envelope, new_task_id, to_raw
from appliance.errors import ResultTimeout
from appliance.states import TaskState
from appliance.tasks import TaskHandle

if TYPE_CHECKING:
    from appliance.app import Lineage, Stem

# The options a signature may carry: those of `Stem.enqueue` (but `connection`).
SIGNATURE_OPTIONS = frozenset(
    {"meta", "headers", "queue", "priority", "countdown", "eta", "expires", "task_id",
     "link", "link_error"}
)  # fmt: skip
MAX_CHORD = 100_000  # members: the chord's record and its members are one transaction
CHORD_TTL_MIN_S = 7 * 86400.0  # a chord's record outlives slow members by far


@dataclass(frozen=True)
class Signature:
    """A task call not made yet: the task's name, its args and enqueue options.

    Immutable (`set` returns a new one) and JSON-encodable (`to_json`), so it can be
    passed to a task as an argument. Built by `task.s(...)` or `stem.signature(...)`."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    stem: Stem | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - SIGNATURE_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown signature option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(SIGNATURE_OPTIONS))}"
            )
        object.__setattr__(self, "args", MappingProxyType(dict(self.args)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        if self.stem is not None:
            task = self.stem.registry.get(self.name)
            if task is not None:  # `previous` may come: its place in a canvas decides
                try:
                    task.check_args(self.args)
                except TypeError:
                    task.check_args({**self.args, "previous": None})

    def set(self, **options: Any) -> Signature:
        """A copy with these enqueue options added (queue, priority, countdown, eta,
        expires, meta, headers, task_id, link, link_error)."""
        return replace(self, options={**self.options, **options})

    def enqueue(self, stem: Stem | None = None) -> TaskHandle:
        """Enqueue this call now; the handle of the task."""
        return _stem_of(stem, self).enqueue(self.name, dict(self.args), **self.options)

    def build(
        self, stem: Stem, *, lineage: Lineage | None, flow: Mapping[str, Any],
        expects_previous: bool, task_id: str | None = None,
    ) -> Envelope:  # fmt: skip
        from appliance.app import EnqueueRequest

        options = dict(self.options)
        if task_id is not None:
            options["task_id"] = task_id
        request = EnqueueRequest(self.name, dict(self.args), **options)
        return stem.build_envelope(
            request, lineage=lineage, flow=flow, expects_previous=expects_previous
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON object `Signature.from_json` turns back into this signature (datetimes
        in options become epoch seconds; links are nested signatures)."""
        options: dict[str, Any] = {}
        for key, value in self.options.items():
            if key in ("link", "link_error"):
                value = [s.to_json() for s in _as_list(value)]
            elif key in ("eta", "expires") and hasattr(value, "timestamp"):
                value = value.timestamp()
            options[key] = value
        return {"name": self.name, "args": dict(self.args), "options": options}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], stem: Stem | None = None) -> Signature:
        options = dict(data.get("options") or {})
        for key in ("link", "link_error"):
            if key in options:
                options[key] = [cls.from_json(item, stem) for item in options[key]]
        return cls(str(data["name"]), dict(data.get("args") or {}), options, stem)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _stem_of(stem: Stem | None, *items: Any) -> Stem:
    for item in (stem, *(getattr(i, "stem", None) for i in items)):
        if item is not None:
            return item
    raise TypeError(
        "this signature belongs to no Stem: build it with task.s(...) or "
        "stem.signature(...), or pass the stem: .enqueue(stem)"
    )


def _signatures(items: Iterable[Any], where: str) -> list[Signature]:
    found = list(items)
    for item in found:
        if isinstance(item, Chain | Group | Chord):
            raise TypeError(_NESTED[where, type(item).__name__])
        if not isinstance(item, Signature):
            raise TypeError(f"a {where} takes signatures (task.s(...)), got {item!r}")
    return found


_NESTED = {
    ("chain", "Group"): "a group inside a chain is not supported: to run a step after a "
    "group, use chord(group(...), step.s())",
    ("chain", "Chord"): "a chord inside a chain is not supported: link the chord's callback "
    "instead (callback.set(link=next.s()))",
    ("chain", "Chain"): "a chain inside a chain: write its steps into the outer chain",
    ("group", "Chain"): "a chain inside a group is not supported: group the chain's first "
    "steps and link the rest to each (first.set(link=second.s()))",
    ("group", "Group"): "a group inside a group: write its members into the outer group",
    ("group", "Chord"): "a chord inside a group is not supported",
    ("chord", "Chain"): "a chord's members and callback are signatures, not chains",
    ("chord", "Group"): "a chord's members and callback are signatures, not groups",
    ("chord", "Chord"): "a chord inside a chord is not supported",
}


def _refuse_unique(stem: Stem, signature: Signature, where: str) -> None:
    task = stem.registry.get(signature.name)
    if task is not None and task.options.unique:
        raise ValueError(
            f"task {signature.name!r} is unique and cannot be {where}: a duplicate would "
            "leave it waiting for a task that is not part of it"
        )


def _lineage_here() -> Lineage:
    from appliance.app import Lineage
    from appliance.context import current_task

    parent = current_task.get()
    if parent is None:
        return Lineage(None, None)
    return Lineage(parent.id, parent.root_id or parent.id)


@dataclass(frozen=True)
class Chain:
    """Steps run one after another, each given the result before it as `previous`."""

    steps: tuple[Signature, ...]

    def enqueue(self, stem: Stem | None = None) -> TaskHandle:
        """Store the first step (carrying the others); the handle of the last step,
        whose `result()` raises `ChainError` if a step before it fails for good."""
        app = _stem_of(stem, *self.steps)
        for step in self.steps:
            _refuse_unique(app, step, "a step of a chain")
        size = len(self.steps)
        ids = [str(s.options.get("task_id") or new_task_id()) for s in self.steps]
        chain_id, last = new_task_id(), ids[-1]
        from appliance.app import Lineage

        here = _lineage_here()
        root = here.root_id or ids[0]
        built: list[Envelope] = []
        for index, step in enumerate(self.steps):
            lineage = here if index == 0 else Lineage(ids[index - 1], root)
            info = {"id": chain_id, "index": index, "size": size, "last": last}
            envelope = step.build(
                app, lineage=lineage, flow={"chain": info}, expects_previous=index > 0,
                task_id=ids[index],
            )  # fmt: skip
            built.append(envelope)
        first, rest = built[0], [to_raw(app.codec.seal(e)) for e in built[1:]]
        if first.flow is not None and "delay" in first.flow:  # the first runs from now
            first = replace(first, not_before=first.enqueued_at + first.flow["delay"])
        app.publish([replace(first, then=rest or None)])
        return TaskHandle(last, app)


def chain(*steps: Signature | Iterable[Signature]) -> Chain:
    """chain(a.s(), b.s(), c.s()): b gets a's result as `previous`, c gets b's."""
    flat: list[Any] = []
    for step in steps:
        flat.extend(step if isinstance(step, list | tuple) else [step])
    if not flat:
        raise ValueError("a chain needs at least one step")
    return Chain(tuple(_signatures(flat, "chain")))


@dataclass(frozen=True)
class GroupHandle:
    """The members of an enqueued group: `id`, `handles` (member order), `results()`
    and `state()`."""

    id: str
    handles: tuple[TaskHandle, ...]

    def results(self, timeout: float | None = None) -> list[Any]:
        """Every member's value in member order, waiting up to `timeout` seconds in all;
        the first failed member's error is raised, `ResultTimeout` if not done in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for handle in self.handles:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                values.append(handle.result(timeout=left))
            except ResultTimeout:
                raise ResultTimeout(f"group {self.id} not finished after {timeout}s") from None
        return values

    def state(self) -> TaskState:
        """SUCCESS when every member succeeded, FAILURE when one failed for good (or was
        revoked), STARTED while any has started, else PENDING."""
        if not self.handles:
            return TaskState.SUCCESS
        stem = self.handles[0].stem
        found = stem.backend.get_many([h.id for h in self.handles])
        states = [found[h.id].state if h.id in found else h.state() for h in self.handles]
        if all(s is TaskState.SUCCESS for s in states):
            return TaskState.SUCCESS
        if any(s.is_final and s is not TaskState.SUCCESS for s in states):
            return TaskState.FAILURE
        if any(s is not TaskState.PENDING for s in states):
            return TaskState.STARTED
        return TaskState.PENDING


@dataclass(frozen=True)
class Group:
    """Members run in parallel; their results are collected in member order."""

    members: tuple[Signature, ...]

    def enqueue(self, stem: Stem | None = None) -> GroupHandle:
        app = _stem_of(stem, *self.members)
        group_id, size = new_task_id(), len(self.members)
        envelopes = [
            member.build(app, lineage=None, flow={"group": {"id": group_id, "index": i,
                         "size": size}}, expects_previous=False)
            for i, member in enumerate(self.members)
        ]  # fmt: skip
        envelopes = [_started_now(e) for e in envelopes]
        return GroupHandle(group_id, tuple(app.publish(envelopes)))


def group(*members: Signature | Iterable[Signature]) -> Group:
    """group(a.s(x=1), a.s(x=2)) or group(a.s(x=i) for i in range(10))."""
    flat: list[Any] = []
    for member in members:
        if isinstance(member, Signature | Chain | Group | Chord):
            flat.append(member)
        else:
            flat.extend(member)
    return Group(tuple(_signatures(flat, "group")))


def _started_now(envelope: Envelope) -> Envelope:
    """A canvas envelope stored at once: its countdown counts from now."""
    if envelope.flow is None or "delay" not in envelope.flow:
        return envelope
    return replace(envelope, not_before=envelope.enqueued_at + envelope.flow["delay"])


@dataclass(frozen=True)
class Chord:
    """A group whose callback runs once, after every member succeeded, with their values
    in member order as `previous`."""

    header: Group
    callback: Signature

    def enqueue(self, stem: Stem | None = None) -> TaskHandle:
        """Store the chord's record (size, the callback's sealed message) and every
        member in one transaction; the callback's handle (`ChordError` if a member fails
        for good)."""
        app = _stem_of(stem, self.callback, *self.header.members)
        members = self.header.members
        if not members:
            raise ValueError("a chord needs at least one member (call the callback instead)")
        if len(members) > MAX_CHORD:
            raise ValueError(f"a chord may have at most {MAX_CHORD} members, got {len(members)}")
        for member in members:
            _refuse_unique(app, member, "a member of a chord")
        _refuse_unique(app, self.callback, "a chord's callback")
        chord_id, size = new_task_id(), len(members)
        callback = self.callback.build(
            app, lineage=_lineage_here(), flow={"chord_of": {"id": chord_id, "size": size}},
            expects_previous=True,
        )  # fmt: skip
        callback = app.codec.seal(_started_now(callback))
        built = []
        for index, member in enumerate(members):
            place = {"id": chord_id, "index": index, "size": size, "callback": callback.id}
            built.append(
                member.build(app, lineage=None, flow={"chord": place}, expects_previous=False)
            )
        ttl = max(CHORD_TTL_MIN_S, app.settings.result_ttl)
        stored = app.announce([_started_now(e) for e in built])
        app.broker.enqueue_chord(chord_id, stored, callback, ttl)
        app.announced(stored)
        return TaskHandle(callback.id, app)


def chord(header: Group | Iterable[Signature], callback: Signature) -> Chord:
    """chord(group(add.s(x=i, y=1) for i in range(20)), total.s())."""
    members = header if isinstance(header, Group) else group(*header)
    if isinstance(callback, Chain | Group | Chord):
        raise TypeError(_NESTED["chord", type(callback).__name__])
    if not isinstance(callback, Signature):
        raise TypeError(f"a chord's callback is a signature (task.s(...)), got {callback!r}")
    for member in members.members:
        _signatures([member], "chord")
    return Chord(members, callback)
