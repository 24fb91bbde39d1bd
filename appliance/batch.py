"""The batch path of `Stem.enqueue_many`: tasks that share their options are encoded
from one template instead of one `Envelope` each.

Why: a batch of 1,000 spent ~21 us per task building, validating and serialising an
envelope from scratch, four times what SQLite takes to insert its row. Here the options
of each distinct (name, queue, priority) are validated once, by the same code as a
single enqueue (`Stem._template_envelope`), and each task costs only what is its own:
its argument check, a new id, the JSON of its args spliced into the template's bytes
(`EnvelopeTemplate`), and the size limit. What a template cannot express (meta,
headers, times, task ids, links, unique tasks) takes the full path, per request, in
order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from appliance.broker.protocol import Copies
from appliance.envelope import Envelope, EnvelopeCodec, EnvelopeTemplate, new_task_id
from appliance.units import check_name

if TYPE_CHECKING:
    from appliance.tasks import Task

# (name, queue, priority) as given: what the copies of one template share.
TemplateKey = tuple[str, str | None, int | None]


class BatchBuilder:
    """Encodes the requests of one `enqueue_many` call into chunks of `Copies`, each at
    most `chunk` messages (one broker call, all or none), in request order.

    `template(key)` builds the envelope a template copies, or None when such a task
    needs the full path (a unique task); `build(key, args)` builds one envelope by the
    full path. Templates are made again for every chunk, so that a copy's enqueue time
    is that of its own chunk."""

    def __init__(
        self,
        codec: EnvelopeCodec,
        tasks: Mapping[str, Task],
        template: Callable[[TemplateKey], Envelope | None],
        build: Callable[[TemplateKey, Mapping[str, Any] | None], Envelope],
        chunk: int,
    ) -> None:
        self._codec = codec
        self._tasks = tasks
        self._template = template
        self._build = build
        self._chunk = chunk
        self.chunks: list[list[Copies]] = []
        self.guarded = False  # a unique task was met: the batch needs `Stem.publish`
        self._count = chunk  # messages in the current chunk: full, so the first starts one
        self._templates: dict[TemplateKey, tuple[EnvelopeTemplate, Envelope] | None] = {}
        self._last: Copies | None = None  # the current run of copies of one template
        self._last_template: EnvelopeTemplate | None = None

    def add(self, key: TemplateKey, args: Mapping[str, Any] | None) -> None:
        """One request that only names a task, its args, queue and priority."""
        if self._count >= self._chunk:
            self._next_chunk()
        name = key[0]
        task = self._tasks.get(name)
        if task is None and key not in self._templates:
            check_name(name, "task name")  # first, as `Stem.build_envelope` does
        # The same copy and check as `Stem.build_envelope`, in the same order.
        values = args if type(args) is dict else dict(args or {})
        if task is not None:
            task.check_args(values)
        found = self._templates.get(key, _UNSEEN)
        if found is _UNSEEN:
            found = self._templates[key] = self._make(key)
        if found is None:
            self.add_envelope(self._build(key, values))
            return
        encoder, envelope = found
        task_id = new_task_id()
        payload = self._codec.encode_copy(encoder, task_id, values)
        if self._last_template is not encoder or self._last is None:
            self._last = Copies(envelope, [], [])
            self._last_template = encoder
            self.chunks[-1].append(self._last)
        self._last.ids.append(task_id)
        self._last.payloads.append(payload)
        self._count += 1

    def add_envelope(self, envelope: Envelope) -> None:
        """One request built by the full path (`Stem.build_envelope`)."""
        if self._count >= self._chunk:
            self._next_chunk()
        if envelope.flow is not None and "unique" in envelope.flow:
            self.guarded = True  # stored one at a time with its lock: not here
        self.chunks[-1].append(Copies.of(envelope, self._codec.encode(envelope)))
        self._last = self._last_template = None
        self._count += 1

    def ids(self) -> list[str]:
        return [task_id for chunk in self.chunks for copies in chunk for task_id in copies.ids]

    def _make(self, key: TemplateKey) -> tuple[EnvelopeTemplate, Envelope] | None:
        envelope = self._template(key)
        if envelope is None:
            return None
        encoder = self._codec.template(envelope)
        return None if encoder is None else (encoder, envelope)

    def _next_chunk(self) -> None:
        self.chunks.append([])
        self._count = 0
        self._templates = {}
        self._last = self._last_template = None


_UNSEEN: Any = object()
