"""Stem appliance: a single-host, multiprocessing-native task queue.

from appliance import Stem, TaskContext
stem = Stem()                       # sqlite:///./var/stem.db by default

@stem.task("email.send", queue="email", max_retries=4)
def send_email(ctx: TaskContext, to: str) -> dict: ...
"""

from appliance.app import EnqueueRequest, Stem
from appliance.canvas import GroupHandle, Signature, chain, chord, group
from appliance.context import TaskContext
from appliance.errors import (
    ChainError,
    ChordError,
    MemoryLimitExceeded,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    StemError,
    TaskError,
    TaskRevokedError,
    TimeLimitExceeded,
    WorkerLostError,
)
from appliance.retry import ExponentialJitterRetryStrategy, FixedRetryStrategy, RetryStrategy
from appliance.states import DeadLetterReason, TaskState
from appliance.tasks import Task, TaskHandle, TaskHandler, TaskOptions

__version__ = "0.1.0"

__all__ = [
    "ChainError",
    "ChordError",
    "DeadLetterReason",
    "EnqueueRequest",
    "ExponentialJitterRetryStrategy",
    "FixedRetryStrategy",
    "GroupHandle",
    "MemoryLimitExceeded",
    "Reject",
    "Retry",
    "RetryStrategy",
    "Signature",
    "SoftTimeLimitExceeded",
    "Stem",
    "StemError",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskHandle",
    "TaskHandler",
    "TaskOptions",
    "TaskRevokedError",
    "TaskState",
    "TimeLimitExceeded",
    "WorkerLostError",
    "__version__",
    "chain",
    "chord",
    "group",
]
