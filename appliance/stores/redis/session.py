"""What the Redis broker and backend of one store share: the client, the scripts (loaded
together), the outage log, and the open unit of work."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.commands.core import Script

from appliance.stores.redis.conn import OutageLog, guarded, redact


class RedisSession:
    """One client per store and process (connections never cross fork).

    Inside `unit_of_work()` writes are queued on one MULTI/EXEC pipeline instead of being
    sent: the whole unit goes out in one round trip and the server applies it as one
    transaction. Scripts are sent as EVALSHA, so they must be loaded first: `load_scripts`
    loads every script of the store in one round trip, and a NOSCRIPT (a server that
    restarted) marks them for loading again before the failed unit is retried.
    """

    def __init__(self, url: str, client: redis.Redis) -> None:
        self.url = url
        self.client = client
        self.outage = OutageLog(redact(url))
        # The open unit's pipeline belongs to the thread that opened it: the supervisor's
        # store round may run in a thread of its own while metrics export reads in another.
        self._local = threading.local()
        self._scripts: list[Script] = []
        self._loaded = False

    @property
    def pipe(self) -> Any:
        """This thread's open unit of work (a MULTI/EXEC pipeline), or None."""
        return getattr(self._local, "pipe", None)

    @pipe.setter
    def pipe(self, value: Any) -> None:
        self._local.pipe = value

    def script(self, source: str) -> Script:
        """Register a script of this store (loaded by `load_scripts`)."""
        script = self.client.register_script(source)
        self._scripts.append(script)
        self._loaded = False
        return script

    def guard(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Map redis-py errors raised inside to the appliance's errors (see `conn`)."""
        return guarded(self.outage, what)

    def load_scripts(self) -> None:
        """Load every script in one round trip, before a big call or a unit: otherwise
        EVALSHA of a 20k-message enqueue is sent twice (NOSCRIPT, then again)."""
        if not self._loaded:
            pipe = self.client.pipeline(transaction=False)
            for script in self._scripts:
                pipe.script_load(script.script)
            pipe.execute()
            self._loaded = True

    def run(self, script: Script, args: Sequence[Any], keys: Sequence[str] = ()) -> Any:
        """Run a script now (redis-py reloads it after NOSCRIPT)."""
        return script(keys=list(keys), args=list(args))

    def queue(self, script: Script, args: Sequence[Any], keys: Sequence[str] = ()) -> None:
        """Queue a script on the open unit. EVALSHA rather than the Script object: a
        pipeline holding Script objects asks SCRIPT EXISTS on every execute."""
        self.pipe.evalsha(script.sha, len(keys), *keys, *args)

    @contextlib.contextmanager
    def unit_of_work(self, *, durable: bool = True) -> Iterator[None]:
        """Queue what is written inside; send it as one transaction at the end. Nothing is
        sent when the block raises. Reentrant. `durable` changes nothing here: the
        server's AOF policy decides for every write alike."""
        if self.pipe is not None:
            yield
            return
        if not self._loaded:  # guarded only when it talks: a no-op must not say "reachable"
            with self.guard("loading scripts"):
                self.load_scripts()
        self.pipe = self.client.pipeline(transaction=True)
        try:
            yield
            if self.pipe.command_stack:
                with self.guard("committing a unit of work"):
                    self.flush()
        finally:
            self.pipe = None

    def flush(self, then: tuple[Script, list[Any]] | None = None) -> Any:
        """Send what the unit holds (plus `then`) in one round trip; `then`'s reply.
        Later writes of the same unit go in the next flush."""
        if then is not None:
            self.queue(*then)
        pipe, self.pipe = self.pipe, self.client.pipeline(transaction=True)
        commands = list(pipe.command_stack)
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:
            # The server restarted and forgot the scripts (its data may be gone too:
            # `RedisBroker.watch_identity` says so). Everything in the unit is safe to
            # send twice (result writes and settles are idempotent), so reload and send
            # it again, once, without troubling the caller.
            self._loaded = False
            self.load_scripts()
            replies = self._resend(commands, transaction=True)
        except redis.exceptions.ResponseError as exc:
            if not _out_of_memory(exc):
                raise
            # At maxmemory Redis refuses every EVAL queued in a MULTI, whatever its
            # flags, and applies none of the unit. Sent as a plain pipeline, the
            # `allow-oom` scripts run: results first, so a prefix applied by a failure
            # part-way re-runs tasks but never acks one without its result.
            replies = self._resend(commands, transaction=False)
        return replies[-1] if then is not None else None

    def _resend(self, commands: list[Any], *, transaction: bool) -> list[Any]:
        pipe = self.client.pipeline(transaction=transaction)
        for args, options in commands:
            pipe.pipeline_execute_command(*args, **options)
        replies: list[Any] = pipe.execute()
        return replies

    def close(self) -> None:
        self.client.close()


def _out_of_memory(exc: redis.exceptions.ResponseError) -> bool:
    cause = exc.__context__
    return any(
        isinstance(e, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(e)
        for e in (exc, cause) if e is not None
    )  # fmt: skip
