"""What the supervisor and a child say to each other over their pipes, and its framing.

Supervisor -> child: a dispatch, `[u32 length][u64 seq][envelope bytes]`, the envelope
exactly as the broker stored it (the child decodes it; nothing is re-encoded).
Child -> supervisor: `[u32 length][tag byte][orjson body]`, one typed message per frame:
an `Outcome` (tag `o`) when a dispatch ended, a `Progress` report (tag `p`) while it runs.
One codec (`encode_message`, `decode_message`) for both directions of typing, so a new
field is added in one dataclass and nowhere else.
"""

from __future__ import annotations

import contextlib
import fcntl
import operator
import os
import struct
from dataclasses import dataclass
from typing import Any

import orjson

from appliance.records import record
from appliance.states import OutcomeStatus

_LEN = struct.Struct("!I")
# A frame longer than this is not one of ours (results are capped far below it): the
# bytes are garbage, and waiting for "the rest" would buffer without end.
MAX_FRAME_BYTES = 64 * 1024 * 1024
_DISPATCH = struct.Struct("!IQ")
PIPE_BYTES = 1 << 20  # big pipes: a burst of prefetched dispatches never blocks a write
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass(frozen=True, slots=True)
class ErrorFields:
    """A failure as data (it crosses a process boundary): type name, message, traceback."""

    type: str
    message: str
    traceback: str = ""


@record
class Outcome:
    """How one dispatch ended. Times: `started`/`finished` wall clock (for results),
    `runtime` monotonic seconds (for prefetch sizing; immune to clock jumps)."""

    seq: int
    status: OutcomeStatus
    value: Any = None  # SUCCESS: the JSON value returned
    error: ErrorFields | None = None  # every other status but SKIPPED
    countdown: float | None = None  # RETRY: seconds asked for by `ctx.retry(countdown=)`
    started: float | None = None
    finished: float | None = None
    runtime: float | None = None
    progress: float | None = None  # the last percent reported
    traceparent: str | None = None  # the attempt's execution span, when tracing is on

    @property
    def ok(self) -> bool:
        return self.status is OutcomeStatus.SUCCESS


@dataclass(frozen=True, slots=True)
class Progress:
    """`ctx.progress()` of the dispatch `seq`, while it runs."""

    seq: int
    percent: float
    data: Any = None


ChildMessage = Outcome | Progress
_OUTCOME_FIELDS = tuple(Outcome.__dataclass_fields__)
if _OUTCOME_FIELDS[:4] != ("seq", "status", "value", "error"):  # what `decode_message` unpacks
    raise ImportError("Outcome must start with its seq, status, value and error fields")
_OUTCOME_VALUES = operator.itemgetter(*_OUTCOME_FIELDS)
_STATUSES = {status.value: status for status in OutcomeStatus}
_OUTCOME, _PROGRESS = b"o", b"p"
_TAGS = frozenset(_OUTCOME + _PROGRESS)


def encode_message(message: ChildMessage) -> bytes:
    """One child message as a frame. Raises `TypeError` for a value with no JSON form."""
    tag = _OUTCOME if isinstance(message, Outcome) else _PROGRESS
    body = tag + orjson.dumps(message)  # orjson serialises (slotted) dataclasses natively
    return _LEN.pack(len(body)) + body


def decode_message(frame: bytes) -> ChildMessage:
    """The message of one frame body (without its length prefix)."""
    fields: dict[str, Any] = orjson.loads(frame[1:])
    if frame[:1] == _PROGRESS:
        return Progress(**fields)
    if frame[:1] != _OUTCOME:
        raise ProtocolError(f"unknown message tag {frame[:1]!r}")
    if len(fields) != len(_OUTCOME_FIELDS):
        raise ProtocolError(f"an outcome has the fields {sorted(fields)}")
    # By position (a KeyError for a field that is not an Outcome's): a third of the cost
    # of the keyword call, for one message per task.
    seq, status, value, error, *rest = _OUTCOME_VALUES(fields)
    errors = ErrorFields(**error) if error else None
    return Outcome(seq, _STATUSES[status], value, errors, *rest)


def make_pipe() -> tuple[int, int]:
    """A pipe whose buffer is enlarged where the kernel allows it."""
    read_fd, write_fd = os.pipe()
    # Capped by /proc/sys/fs/pipe-max-size; the default 64 KiB still works, only slower.
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_BYTES)
    return read_fd, write_fd


def dispatch_frame(seq: int, payload: bytes) -> bytes:
    return _DISPATCH.pack(len(payload) + 8, seq) + payload


class ProtocolError(Exception):
    """Bytes on a child's pipe that are not our frames. `before` holds what arrived whole
    ahead of them (frames from `FrameReader`, messages from `ChildPipes.read`): outcomes
    of tasks that ended before the garbage was written, still to be settled."""

    def __init__(self, detail: str, before: list[Any] | None = None) -> None:
        super().__init__(detail)
        self.before: list[Any] = before or []


class FrameReader:
    """Accumulates bytes and yields whole frames (without the length prefix)."""

    def __init__(self, *, tagged: bool = True) -> None:
        # Child messages start with a tag byte: checking it as soon as it arrives catches
        # garbage at once, instead of waiting for the "rest" of a frame that never was.
        self.tagged = tagged
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= 4:
            (length,) = _LEN.unpack_from(buffer, offset)
            if length > MAX_FRAME_BYTES:
                self._refuse(offset, frames, f"a frame of {length} bytes: not a message of ours")
            if self.tagged and len(buffer) > offset + 4 and buffer[offset + 4] not in _TAGS:
                tag = bytes(buffer[offset + 4 : offset + 5])
                self._refuse(offset, frames, f"a frame tagged {tag!r}")
            end = offset + 4 + length
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[offset + 4 : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return frames

    def _refuse(self, offset: int, frames: list[bytes], detail: str) -> None:
        # The garbage stays at the head of the buffer: every later feed refuses it again.
        del self._buffer[:offset]
        raise ProtocolError(detail, before=frames)


def split_dispatch(frame: bytes) -> tuple[int, bytes]:
    """(seq, envelope bytes) of a dispatch frame body."""
    (seq,) = struct.unpack_from("!Q", frame, 0)
    return seq, frame[8:]


def write_all(fd: int, data: bytes) -> None:
    """Blocking write of the whole buffer (the child's side of its outcome pipe)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
