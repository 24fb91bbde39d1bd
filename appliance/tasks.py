"""Task definitions: frozen `TaskOptions`, the `Task` a decorator registers, the
class-based `TaskHandler` form, and the `TaskHandle` an enqueue returns."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from appliance.errors import ResultTimeout, task_error
from appliance.ratelimit import parse_rate
from appliance.retry import ExponentialJitterRetryStrategy, RetryStrategy
from appliance.states import TaskState
from appliance.units import (
    MAX_COUNT,
    check_int,
    check_name,
    check_priority,
    check_seconds,
    parse_bytes,
    parse_seconds,
)

if TYPE_CHECKING:
    from appliance.app import Stem
    from appliance.backend.protocol import TaskResult
    from appliance.canvas import Signature
    from appliance.context import TaskContext


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-task options (SPEC section 1). Times in seconds, memory in bytes."""

    queue: str = "default"
    priority: int = 0
    max_retries: int = 3
    retry_backoff: tuple[float, float, float] | None = None  # (base, max, jitter)
    retry_strategy: RetryStrategy | None = None
    visibility_timeout: float = 30.0
    soft_time_limit: float | None = None
    hard_time_limit: float | None = None
    max_memory: int | None = None
    max_deliveries: int = 3  # child deaths under one attempt before it is a poison pill
    acks_late: bool = True
    idempotent: bool = False
    result_ttl: float | None = None  # None: the Stem's default
    ignore_result: bool = False
    # A second enqueue of the same call within `unique_for` seconds (default: the
    # visibility timeout) returns the first task's handle and stores nothing.
    unique: bool = False
    unique_for: float | None = None
    unique_key: str | Callable[[dict[str, Any]], str] | None = None  # template or callable
    rate_limit: str | None = None  # "N/s", "N/m", "N/h": global, across every worker
    rate_limit_key: str | None = None  # a header: one limit per value of it
    # Derived from rate_limit: seconds between runs (`appliance.ratelimit`).
    rate_interval: float | None = field(default=None, init=False, compare=False)

    _NAMES: ClassVar[frozenset[str]]

    @classmethod
    def build(cls, **options: Any) -> TaskOptions:
        """Validate user-supplied options; unknown names and bad values fail here."""
        unknown = sorted(set(options) - cls._NAMES)
        if unknown:
            raise TypeError(
                f"unknown task option(s) {', '.join(unknown)}; "
                f"valid options: {', '.join(sorted(cls._NAMES))}"
            )
        converters = dict.fromkeys(_SECONDS_OPTIONS, parse_seconds) | {"max_memory": parse_bytes}
        for key, convert in converters.items():
            if options.get(key) is not None:
                try:
                    options[key] = convert(options[key])
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        if options.get("retry_backoff") is not None:
            base, cap, jitter = (*tuple(options["retry_backoff"]), 1.0)[:3]
            options["retry_backoff"] = (float(base), float(cap), float(jitter))
        return cls(**options)

    def __post_init__(self) -> None:
        # Checked on every construction, `build` or direct: a bad value must fail where
        # the task is declared, not in a worker or in the store at enqueue.
        check_name(self.queue, "queue")
        check_priority(self.priority)
        check_int(self.max_retries, "max_retries", 0, MAX_COUNT)
        check_int(self.max_deliveries, "max_deliveries", 1, MAX_COUNT)
        for key in _SECONDS_OPTIONS:
            _check_seconds_option(key, getattr(self, key))
        if not self.visibility_timeout > 0:
            raise ValueError(f"visibility_timeout must be > 0, got {self.visibility_timeout!r}")
        if self.result_ttl is not None and not self.result_ttl >= 1:
            raise ValueError(
                f"result_ttl must be at least 1s (use ignore_result=True to keep no result), "
                f"got {self.result_ttl!r}"
            )
        if (
            self.soft_time_limit is not None
            and self.hard_time_limit is not None
            and self.soft_time_limit >= self.hard_time_limit
        ):
            raise ValueError("soft_time_limit must be below hard_time_limit")
        self._check_unique()
        if self.rate_limit is not None:
            object.__setattr__(self, "rate_interval", parse_rate(self.rate_limit))
        if self.rate_limit_key is not None:
            if self.rate_limit is None:
                raise ValueError("rate_limit_key needs a rate_limit")
            check_name(self.rate_limit_key, "rate_limit_key")

    def _check_unique(self) -> None:
        if self.unique_for is not None:
            if not self.unique:
                raise ValueError("unique_for needs unique=True")
            if not self.unique_for >= 1:
                raise ValueError(f"unique_for must be at least 1 second, got {self.unique_for!r}")
        if self.unique_key is not None:
            if not self.unique:
                raise ValueError("unique_key needs unique=True")
            if not (isinstance(self.unique_key, str) or callable(self.unique_key)):
                raise TypeError(
                    f"unique_key must be a template string or a callable of the args, "
                    f"got {self.unique_key!r}"
                )

    @property
    def unique_ttl(self) -> float:
        """How long a unique task's lock lasts at most (it goes when the task ends)."""
        return self.unique_for if self.unique_for is not None else self.visibility_timeout

    @property
    def strategy(self) -> RetryStrategy:
        if self.retry_strategy is not None:
            return self.retry_strategy
        if self.retry_backoff is not None:
            base, cap, jitter = self.retry_backoff
            return ExponentialJitterRetryStrategy(base=base, max=cap, jitter=jitter)
        return DEFAULT_RETRY_STRATEGY


_SECONDS_OPTIONS = (
    "soft_time_limit", "hard_time_limit", "visibility_timeout", "result_ttl", "unique_for"
)  # fmt: skip


def _check_seconds_option(key: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number of seconds, got {value!r}")
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{key} must be >= 0, got {value!r}")
    check_seconds(value, key)


TaskOptions._NAMES = frozenset(f.name for f in fields(TaskOptions) if f.init)
DEFAULT_RETRY_STRATEGY = ExponentialJitterRetryStrategy()


class TaskHandler:
    """The class-based form: subclass, set `name` and `options`, implement `__call__`.

    `__call__(ctx, args)` receives the args as one dict, as in the seeds; it may be
    `async def`.
    """

    name: str = ""
    options: TaskOptions = TaskOptions()

    def __call__(self, ctx: TaskContext, args: dict[str, Any]) -> Any:
        raise TypeError(f"{type(self).__name__} must implement __call__(ctx, args)")


@dataclass(frozen=True)
class Task:
    """A registered task: its name, options and the callable that runs it."""

    stem: Stem = field(repr=False, compare=False)
    name: str
    fn: Callable[..., Any] = field(repr=False)
    options: TaskOptions
    takes_args_dict: bool = False  # TaskHandler form: fn(ctx, args) instead of fn(ctx, **args)
    is_async: bool = field(default=False, compare=False)
    params: _Params | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Refused at registration, as at enqueue: the name is a key in both stores and in
        # every log line (non-empty printable text, at most 200 characters).
        check_name(self.name, "task name")
        # Computed once: inspect.signature() and even Signature.bind() cost more than a
        # no-op task runs, and every enqueue and every run checks the arguments.
        target = self.fn.__call__ if isinstance(self.fn, TaskHandler) else self.fn
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(target))
        if not self.takes_args_dict:
            object.__setattr__(self, "params", _Params.of(self.fn))

    def check_args(self, args: Mapping[str, Any]) -> None:
        """Raise TypeError if `args` cannot be passed as keywords to the handler."""
        if self.params is not None:
            problem = self.params.problem(args)
            if problem:
                raise TypeError(f"arguments do not match task {self.name!r}: {problem}")

    def invoke(self, ctx: TaskContext, args: dict[str, Any]) -> Any:
        """Call the handler (returns a coroutine for async handlers)."""
        if self.takes_args_dict:
            return self.fn(ctx, args)
        return self.fn(ctx, **args)

    def enqueue(self, **kwargs: Any) -> TaskHandle:
        """Typed enqueue: the handler's keyword arguments, checked before storing."""
        return self.stem.enqueue(self.name, args=kwargs)

    def s(self, **kwargs: Any) -> Signature:
        """A signature of this task with these keyword arguments (for links and canvas)."""
        from appliance.canvas import Signature

        return Signature(self.name, kwargs, {}, self.stem)

    def signature(self, args: Mapping[str, Any] | None = None, **options: Any) -> Signature:
        """A signature with args and enqueue options (queue, countdown, link, ...)."""
        from appliance.canvas import Signature

        return Signature(self.name, dict(args or {}), options, self.stem)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calling the task runs the function in-process (as a plain function)."""
        return self.fn(*args, **kwargs)


@dataclass(frozen=True, slots=True)
class _Params:
    """What `fn(ctx, **args)` accepts, precomputed from its signature."""

    names: frozenset[str]  # keyword-passable parameters after ctx
    required: frozenset[str]  # of those, the ones without a default
    any_keyword: bool  # fn has **kwargs

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> _Params:
        params = list(inspect.signature(fn).parameters.values())[1:]  # after ctx
        keywords = [
            p for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]  # fmt: skip
        return cls(
            names=frozenset(p.name for p in keywords),
            required=frozenset(p.name for p in keywords if p.default is inspect.Parameter.empty)
            | frozenset(p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY),
            any_keyword=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params),
        )

    def problem(self, args: Mapping[str, Any]) -> str | None:
        keys = args.keys()
        if self.required <= keys and (self.any_keyword or keys <= self.names):
            return None  # the common case, without building any set
        missing = self.required - args.keys()
        if missing:
            return f"missing required argument(s) {', '.join(sorted(missing))}"
        unexpected = () if self.any_keyword else args.keys() - self.names
        if unexpected:
            return f"unexpected argument(s) {', '.join(sorted(unexpected))}"
        return None


_POLL_START, _POLL_MAX = 0.002, 0.1


@dataclass(frozen=True)
class TaskHandle:
    """A reference to an enqueued task; works from any process that can reach the stores."""

    id: str
    stem: Stem = field(repr=False, compare=False)

    def info(self) -> TaskResult | None:
        return self.stem.backend.get(self.id)

    def state(self) -> TaskState:
        """The current state (PENDING when nothing is known yet)."""
        return self.stem.task_state(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task to finish and return its value or raise its error.

        Polls the result backend (no in-process waiting, so any process can wait). Raises
        `ResultTimeout` (a `TimeoutError`) if it has not finished within `timeout`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _POLL_START
        while True:
            found = self.stem.backend.get(self.id)
            if found is not None and found.state.is_final:
                return _value_or_raise(found)
            if deadline is not None and time.monotonic() >= deadline:
                state = found.state if found else TaskState.PENDING
                raise ResultTimeout(f"task {self.id} not finished after {timeout}s ({state})")
            wait = pause if deadline is None else min(pause, deadline - time.monotonic())
            time.sleep(max(0.0, wait))
            pause = min(_POLL_MAX, pause * 1.5)


def _value_or_raise(found: TaskResult) -> Any:
    if found.state is TaskState.SUCCESS:
        return found.value
    error = found.error
    raise task_error(
        error.type if error else found.state.value,
        error.message if error else f"task ended {found.state}",
        traceback=error.traceback if error else "",
        task_id=found.task_id,
        state=found.state.value,
    )
