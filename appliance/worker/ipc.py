"""Framing on the pipes between the supervisor and a child.

Supervisor -> child: a dispatch, `[u32 length][u64 seq][envelope bytes]`, the envelope
exactly as the broker stored it. Child -> supervisor: `[u32 length][orjson object]`
(an outcome or a progress report). Pipes carry bytes; frames give them edges.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
from typing import Any

import orjson

_LEN = struct.Struct("!I")
_DISPATCH = struct.Struct("!IQ")
PIPE_BYTES = 1 << 20  # big pipes: a burst of prefetched dispatches never blocks a write
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def make_pipe() -> tuple[int, int]:
    """A pipe whose buffer is enlarged where the kernel allows it."""
    read_fd, write_fd = os.pipe()
    # Capped by /proc/sys/fs/pipe-max-size; the default 64 KiB still works, only slower.
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_BYTES)
    return read_fd, write_fd


def dispatch_frame(seq: int, payload: bytes) -> bytes:
    return _DISPATCH.pack(len(payload) + 8, seq) + payload


def message_frame(message: dict[str, Any]) -> bytes:
    body = orjson.dumps(message)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes and yields whole frames (without the length prefix)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= 4:
            (length,) = _LEN.unpack_from(buffer, offset)
            end = offset + 4 + length
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[offset + 4 : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return frames


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
