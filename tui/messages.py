"""The app's typed messages: what a thread worker tells the UI thread
(`post_message` is the thread-safe way in; see toolong's messages.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class Loaded(Message, bubble=False):
    """A screen's data, read in a thread worker, for `show` on the UI thread."""

    data: Any
    elapsed_ms: float  # the whole read, for the status line and the bench


@dataclass
class StoreProblem(Message):
    """A read failed: a store is unreachable or gone. The banner says so until a read
    succeeds again (every refresh retries)."""

    text: str


@dataclass
class ActionDone(Message):
    """An action finished (or failed): what to notify."""

    title: str
    text: str
    ok: bool = True
