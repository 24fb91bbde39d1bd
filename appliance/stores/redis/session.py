"""What the Redis broker and backend of one store share: the client, the scripts (loaded
together), the outage log, and the open unit of work."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
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
        # Idle connections of `call` (deque: pop and append are atomic, no lock needed).
        self._idle: deque[Any] = deque()
        self._pid = os.getpid()

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

    def call(self, script: Script, args: Sequence[Any], keys: Sequence[str] = ()) -> Any:
        """Run `script` now and return its reply: one EVALSHA, loaded again after a
        NOSCRIPT (a server that restarted) and sent once more.

        Sent on a connection of the session's own, not through `redis.Redis`: its
        command path (a pool lock, a poll for stale data, a dozen observability hooks)
        took ~50 us a call, a third of a single enqueue's round trip here. The
        connection is the client's kind, made by its pool (same URL, TLS, timeouts,
        retry policy): only the bookkeeping around it is skipped."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return self._round_trip(command)
        except redis.exceptions.NoScriptError:
            self._loaded = False
            self.load_scripts()
            return self._round_trip(command)

    def _round_trip(self, command: tuple[Any, ...]) -> Any:
        """Send `command` on an idle connection of ours, retried like the client's own
        commands (its `Retry`: reconnect, back off). A connection always goes back
        clean: redis-py's `Connection` drops its socket itself when a send or a read
        fails part-way (a timeout too), so no late reply is left on it."""
        if self._pid != os.getpid():  # inherited through fork: never share a socket
            self._idle.clear()
            self._pid = os.getpid()
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self.client.connection_pool.make_connection()
        try:
            return conn.retry.call_with_retry(
                lambda: _send_and_read(conn, command), lambda _error: conn.disconnect()
            )
        finally:
            self._idle.append(conn)

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
        while self._idle:
            self._idle.pop().disconnect()
        self.client.close()


def _send_and_read(conn: Any, command: tuple[Any, ...]) -> Any:
    conn.send_command(*command)
    return conn.read_response()


def _out_of_memory(exc: redis.exceptions.ResponseError) -> bool:
    cause = exc.__context__
    return any(
        isinstance(e, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(e)
        for e in (exc, cause) if e is not None
    )  # fmt: skip
