"""The supervisor's side of its children's pipes: forking with clean file descriptors,
framed reads, and non-blocking buffered writes, all on the supervisor's selector."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
from collections.abc import Callable, Iterable

from appliance.worker.hygiene import neutralize_inherited_fds
from appliance.worker.ipc import ChildMessage, ProtocolError, decode_message, make_pipe
from appliance.worker.pool import Child

# 64 KiB: ~400 outcomes a read. Each read allocates its whole size before the kernel
# fills a few hundred bytes of it; at 256 KiB those allocations (above malloc's mmap
# threshold, then moved into its heap) added ~0.3 MB to the supervisor's peak RSS.
READ_CHUNK = 1 << 16


class ChildPipes:
    """Owns every pipe fd of every child and their registration on the selector."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.fds: set[int] = set()

    def fork(
        self, blocked_signals: Iterable[int], run_child: Callable[[int, int], None]
    ) -> tuple[int, int, int]:
        """Fork a child with signals blocked across the fork. In the child, every
        descriptor of the supervisor's (stores, the selector, other children's pipes) is
        neutralised and the child leads a process group of its own (see `hygiene`); then
        `run_child(read_fd, write_fd)` runs and must never return. In the parent: (pid,
        fd to write dispatches to, fd to read outcomes from). Raises `OSError` (EAGAIN at
        a process limit) with nothing leaked."""
        to_r, to_w = make_pipe()
        from_r, from_w = make_pipe()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, blocked_signals)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for fd in (to_r, to_w, from_r, from_w):
                os.close(fd)
            raise
        if pid == 0:
            signal.set_wakeup_fd(-1)
            neutralize_inherited_fds([to_r, from_w])
            with contextlib.suppress(OSError):
                os.setpgid(0, 0)
            run_child(to_r, from_w)
            os._exit(70)  # run_child never returns; this is the guard if it does
        # Also from this side, so a kill of the group cannot race the child's own call.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(to_r)
        os.close(from_w)
        os.set_blocking(to_w, False)
        os.set_blocking(from_r, False)
        self.fds.update((to_w, from_r))
        return pid, to_w, from_r

    def watch(self, child: Child, on_ready: Callable[[int], None]) -> None:
        """Call `on_ready(mask)` from the loop when the child's outcome pipe is readable."""
        self.selector.register(child.from_fd, selectors.EVENT_READ, on_ready)

    def read(self, child: Child, *, until_eof: bool = False) -> list[ChildMessage]:
        """The messages that arrived; all of them up to EOF for a child that exited.
        Raises `ProtocolError` for bytes that are not our frames (a task that wrote
        into its own pipe): the child is then killed, never trusted again. The messages
        that arrived whole before the garbage ride on the error (`before`)."""
        messages: list[ChildMessage] = []
        while True:
            try:
                data = os.read(child.from_fd, READ_CHUNK)
            except BlockingIOError:
                return messages
            if not data:
                return messages
            try:
                frames = child.reader.feed(data)
            except ProtocolError as exc:
                _decode_into(messages, exc.before, child.pid)
                raise ProtocolError(str(exc), before=messages) from exc
            _decode_into(messages, frames, child.pid)
            if not until_eof and len(data) < READ_CHUNK:
                return messages

    def flush(self, children: Iterable[Child]) -> None:
        """Write what each child's outbox holds; wait for writability if the pipe is full."""
        for child in children:
            if child.to_fd < 0:
                continue  # closed: what it still held is recovered when it is reaped
            had_backlog = child.to_fd in self.selector.get_map()
            self._write(child)
            if child.outbox and not had_backlog:
                self.selector.register(
                    child.to_fd, selectors.EVENT_WRITE, lambda mask, c=child: self.flush([c])
                )
            elif not child.outbox and had_backlog:
                self.selector.unregister(child.to_fd)

    def _write(self, child: Child) -> None:
        if not child.outbox:
            return
        try:
            written = os.write(child.to_fd, child.outbox)
        except BlockingIOError:
            written = 0
        except BrokenPipeError:
            written = len(child.outbox)  # it died: its dispatches are recovered on reap
        del child.outbox[:written]

    def close_to(self, child: Child) -> None:
        """Close the dispatch pipe: the child reads EOF and leaves once it is idle."""
        if child.to_fd < 0:
            return
        if child.to_fd in self.selector.get_map():
            self.selector.unregister(child.to_fd)
        self.fds.discard(child.to_fd)
        os.close(child.to_fd)
        child.to_fd = -1

    def close_from(self, child: Child) -> None:
        self.selector.unregister(child.from_fd)
        self.fds.discard(child.from_fd)
        os.close(child.from_fd)


def _decode_into(messages: list[ChildMessage], frames: list[bytes], pid: int) -> None:
    """Append each frame's message; at the first that does not decode, raise with the
    ones before it."""
    for frame in frames:
        try:
            messages.append(decode_message(frame))
        except ProtocolError as exc:
            raise ProtocolError(str(exc), before=messages) from exc
        except Exception as exc:  # orjson, or fields that are not an Outcome's
            raise ProtocolError(f"undecodable message from child {pid}: {exc}",
                                before=messages) from exc  # fmt: skip
