"""Opening SQLite databases for the broker and the result backend, and running write
transactions on them.

Why it looks like this (measured on the target machine, see docs/architecture.md):
- Every write is `BEGIN IMMEDIATE`: claiming is read-then-write, and a DEFERRED
  transaction that upgrades gets SQLITE_BUSY without the busy handler ever running.
- The stock busy handler (`timeout=`) sleeps 1, 2, 5 ... 100 ms and let one process
  starve another (1 vs 14,356 claims in 5 s). So the connection has a busy timeout of 0
  and `Database.write` retries after a random 0-1 ms sleep, up to a deadline, which
  kept two processes at an even split with the same total.
- SQLite may roll a transaction back by itself after SQLITE_FULL, IOERR, BUSY or NOMEM,
  so every error path checks `in_transaction` before issuing ROLLBACK.
- WAL does not work over a network filesystem ("Write-Ahead Logging" section 1), so the
  directory's filesystem type is read from /proc/self/mountinfo and refused there.
- A connection must never be used (not even closed) in a process other than the one
  that opened it ("How To Corrupt An SQLite Database File" section 2.6).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from appliance.errors import BrokerBusy, BrokerError, BrokerFull, BrokerUnavailable, ConfigError
from appliance.units import DEFAULT_NAMESPACE, check_namespace

T = TypeVar("T")

MOUNTINFO = Path("/proc/self/mountinfo")
BUSY_DEADLINE = 30.0  # seconds a write may wait for other writers before BrokerBusy
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024  # bytes the WAL is truncated to after a checkpoint
SYNCHRONOUS = ("FULL", "NORMAL")
FILE_MODE = 0o600  # the database; SQLite gives its -wal and -shm the same
DIR_MODE = 0o700  # a directory this module creates for it
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre"}
)

_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _as_null(value: None) -> None:
    return value


# CPython's sqlite3 binds int, float and str directly but sends None and bytes through
# its adapter protocol: a registry miss, then __adapt__ and __conform__ lookups, ~0.7 us
# for a None and ~1 us for bytes against 0.12 us for an int (measured, 3.11). A results
# row binds six Nones and a blob; registered, each is one lookup that hits (~0.3 us).
# What is bound is unchanged: None is NULL, bytes a BLOB (`bytes(b)` is `b` itself).
# Registered per type, so subclasses and every other type are not affected.
sqlite3.register_adapter(type(None), _as_null)
sqlite3.register_adapter(bytes, bytes)


@dataclass(frozen=True, slots=True)
class SqliteTarget:
    """A parsed `sqlite:///path` URL: the absolute database path and its durability."""

    url: str
    path: Path
    synchronous: str


def parse_url(url: str, synchronous: str = "FULL") -> SqliteTarget:
    """`sqlite:///relative/path` or `sqlite:////absolute/path`, optionally with
    `?synchronous=NORMAL` (which wins over the `synchronous` setting)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigError("url", url, "not an sqlite:// URL")
    if parts.netloc:
        raise ConfigError(
            "url", url, "an SQLite URL has no host: use sqlite:///relative or sqlite:////abs"
        )
    # urlsplit keeps the slash that separates the (empty) host from the path.
    raw_path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if not raw_path or raw_path == ":memory:":
        raise ConfigError("url", url, "needs a database file path shared by all processes")
    options = dict(parse_qsl(parts.query))
    unknown = sorted(set(options) - {"synchronous"})
    if unknown:
        raise ConfigError("url", url, f"unknown option {unknown[0]!r}; known: synchronous")
    chosen = options.get("synchronous", synchronous).upper()
    if chosen not in SYNCHRONOUS:
        raise ConfigError("url", url, f"synchronous must be FULL or NORMAL, got {chosen!r}")
    return SqliteTarget(url, Path(os.path.abspath(raw_path)), chosen)


def namespaced_url(url: str, namespace: str) -> str:
    """The URL of the database file of `namespace`: the configured one for the default
    namespace, else the same path with the namespace before its extension
    (`sqlite:///var/stem.db`, "staging" -> `sqlite:///var/stem.staging.db`).

    A file per namespace rather than a namespace column: environments on one host then
    never contend for one write lock (SQLite has one per file), and every table (tasks,
    results, DLQ, workers, control, revokes, schedules, rate limits, locks) is isolated
    with no per-query cost and no way for a query to forget the filter. A URL that does
    not parse is returned as it is, for `parse_url` to refuse with its reasons."""
    if namespace == DEFAULT_NAMESPACE:
        return url
    try:
        check_namespace(namespace)  # a Settings built in code skips the config parser
    except (TypeError, ValueError) as exc:
        raise ConfigError("namespace", str(namespace)[:64], str(exc)) from None
    parts = urlsplit(url)
    head, slash, name = parts.path.rpartition("/")
    if parts.scheme != "sqlite" or parts.netloc or not name or name == ":memory:":
        return url
    stem, dot, extension = name.rpartition(".")
    renamed = f"{stem}.{namespace}.{extension}" if dot and stem else f"{name}.{namespace}"
    query = f"?{parts.query}" if parts.query else ""
    return f"sqlite://{head}{slash}{renamed}{query}"


def filesystem_type(directory: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the filesystem holding `directory`, or None if unknown (no /proc)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(directory)
    best: tuple[int, str] | None = None
    for line in lines:
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mount_point = _unescape(fields[4])
        if _is_under(target, mount_point) and (best is None or len(mount_point) >= best[0]):
            # `>=`: a later line for the same mount point is mounted over the earlier one.
            best = (len(mount_point), tail.split()[0])
    return best[1] if best else None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape")


def _is_under(path: str, mount_point: str) -> bool:
    if mount_point == "/":
        return True
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def check_local_filesystem(directory: Path, mountinfo: Path = MOUNTINFO) -> None:
    """Refuse a database on a network filesystem: WAL needs shared memory on one host."""
    fstype = filesystem_type(directory, mountinfo)
    if fstype is None:
        return
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse."):
        raise ConfigError(
            "broker_url",
            str(directory),
            f"the database directory is on a {fstype} filesystem; SQLite in WAL mode only "
            "works on a local disk (all processes on one host). Move the database to a "
            "local path or use a redis:// broker",
        )


# Errors that say the path can never work (as opposed to a disk that is failing now).
_PATH_ERRORS = frozenset({
    errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.EISDIR, errno.ELOOP,
})  # fmt: skip


def _prepare_files(path: Path, mountinfo: Path) -> None:
    """Create the directory (0o700) and an empty owner-only database file (0o600) if
    missing. Both are created with those modes (the umask can only narrow them, never
    widen them, so there is no moment they are open to others) and then set exactly,
    since a strict umask (0o277) would leave a file its owner cannot write. Existing
    files and directories keep the mode they have: an operator may have opened one to a
    group on purpose."""
    parent = path.parent
    try:
        if not parent.exists():
            parent.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
            os.chmod(parent, DIR_MODE)
        check_local_filesystem(parent, mountinfo)
        # O_EXCL: only ever create. Opening and closing an fd on a database this process
        # already has open would drop all its POSIX locks ("How To Corrupt" 2.2).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        reason = (
            f"cannot create the database file ({exc.strerror or exc}); choose a path on a "
            "local disk in a directory this user can write"
        )
        if exc.errno in _PATH_ERRORS:  # the path itself is wrong: a config error
            raise ConfigError("broker_url", str(path), reason) from None
        raise BrokerUnavailable(f"{path}: {reason}") from None
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        # SQLite creates -wal and -shm with the mode of this file, and fchmods them to it
        # if the umask narrowed them (unix_open's robust_open): 0o600 as well.
        os.close(fd)


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # missing, or a path that cannot name a file (too long, not a dir)
        return False


# PRAGMA application_id of every database this appliance creates ("STEM" in ASCII), so
# that it never mistakes, migrates or switches to WAL another program's SQLite file.
APPLICATION_ID = 0x5354454D


def check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a database that is not ours: another application id, or an unmarked file
    holding tables of its own. Reads only the header and the schema (no changes)."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == APPLICATION_ID:
        return
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    ours_before_the_mark = "_sqlite_migrations" in tables and "messages" in tables
    if app_id == 0 and (not tables or ours_before_the_mark):
        return  # new and empty, or made by a version from before the mark
    what = f"application_id {app_id:#x}" if app_id else f"tables {', '.join(sorted(tables)[:5])}"
    raise ConfigError(
        "broker_url", str(path), f"this is not a Stem database ({what}); Stem only opens "
        "files it created: point the URL at a file of its own"
    )  # fmt: skip


class StoreMissing(BrokerUnavailable):
    """A read found no database where the URL points (nothing is created for a read)."""


class Database:
    """One connection, owned by the process that opened it, with the write helper."""

    def __init__(
        self, conn: sqlite3.Connection, target: SqliteTarget, busy_deadline: float = BUSY_DEADLINE
    ) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.target = target
        self.pid = os.getpid()
        self.busy_deadline = busy_deadline
        # check_same_thread=False plus this lock: a TUI may read from a worker thread.
        self._lock = threading.RLock()
        # > 0 inside unit_of_work(): writes of the thread that opened it join its
        # transaction; another thread (the supervisor's store round runs in one, metrics
        # export in another) waits for the lock instead of writing into it.
        self._unit_depth = 0
        self._unit_thread = 0
        self._after_commit: list[Callable[[], None]] = []

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection, opened again if `close_for_fork` closed it."""
        if self._conn is None:
            self._conn = _open(self.target)
            _configure(self._conn, self.target)
        return self._conn

    def close_for_fork(self) -> None:
        """Close the connection before this process forks; the next use reopens it.

        SQLite keeps per-process state for every open file (lock counts, the -shm
        mapping and its descriptor) in the library, not in the connection, and a child
        forked while any connection is open inherits it: a connection the child opens
        to the same file then shares that state, whose descriptors the child has
        pointed at /dev/null (`worker.hygiene`), and writes the WAL without the locks
        it believes it holds (measured: "database disk image is malformed" at the
        first task that enqueued from inside a child). With every connection closed,
        the child starts as if it had never seen the file."""
        with self._lock:
            if self._in_unit():
                raise RuntimeError("cannot close for fork() inside a unit of work")
            if self._conn is not None and os.getpid() == self.pid:
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def unit_of_work(self, *, durable: bool = True) -> Iterator[None]:
        """Every read and write made inside joins one `BEGIN IMMEDIATE` transaction that
        commits at the end (group commit: one fsync for many settles and claims).
        Reentrant within its thread; an exception rolls the whole unit back.
        `durable=False`: committed without the fsync (see `write`)."""
        if self._in_unit():
            self._unit_depth += 1
            try:
                yield
            finally:
                self._unit_depth -= 1
            return
        with self._lock, self._fsync_unless(durable):
            self._begin_unit()
            try:
                yield
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self.rollback()
                raise translate(exc, self.path) from exc
            except BaseException:
                self.rollback()
                raise
            finally:
                self._unit_depth = 0
                committed, self._after_commit = self._after_commit, []
            for action in committed:  # only reached when the COMMIT went through
                action()

    def _begin_unit(self) -> None:
        """BEGIN IMMEDIATE for a unit of work of this thread (the lock held)."""
        self._retrying(lambda conn: None, "BEGIN IMMEDIATE", commit=False)
        self._unit_depth, self._unit_thread = 1, threading.get_ident()

    def on_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once what was just written is committed: now outside a unit of
        work, after its COMMIT inside one (wake-ups must not reach a listener before
        the rows they announce can be seen)."""
        if self._in_unit():
            self._after_commit.append(action)
        else:
            action()

    def _in_unit(self) -> bool:
        """Whether this thread has a unit of work open (other threads' units don't count)."""
        return self._unit_depth > 0 and self._unit_thread == threading.get_ident()

    @property
    def path(self) -> Path:
        return self.target.path

    def write(self, work: Callable[[sqlite3.Connection], T], *, durable: bool = True) -> T:
        """Run `work` in one `BEGIN IMMEDIATE` transaction and commit; all or none.

        `work` may run more than once (after SQLITE_BUSY), so it must only touch the
        database. Raises `BrokerBusy` after `busy_deadline`, `BrokerFull` when out of space.
        `durable=False` (a heartbeat, rewritten every few seconds) commits without the
        fsync of `synchronous=FULL`: still atomic and in order, it may only be lost to a
        power cut, and the next durable commit's fsync persists it too. On a slow disk
        that fsync stalled the supervisor's loop 4-8 ms every 2 s.
        """
        if durable or self._in_unit():
            return self._retrying(work, "BEGIN IMMEDIATE")
        with self._lock, self._fsync_unless(durable):
            return self._retrying(work, "BEGIN IMMEDIATE")

    @contextlib.contextmanager
    def _fsync_unless(self, durable: bool) -> Iterator[None]:
        """`synchronous=NORMAL` for the transactions inside when not `durable` (on a FULL
        database; the lock held, set and restored between transactions, never in one).
        Such a commit is atomic and ordered like any other; only a power cut can undo it,
        and the next durable commit's fsync persists it too."""
        if durable or self.target.synchronous != "FULL":
            yield
            return
        self.conn.execute("PRAGMA synchronous = NORMAL")
        try:
            yield
        finally:
            self.conn.execute("PRAGMA synchronous = FULL")

    def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one read transaction (one consistent snapshot)."""
        return self._retrying(work, "BEGIN")

    def autocommit(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` outside any transaction (PRAGMAs), with the same busy retry."""
        return self._retrying(work, None)

    def _retrying(
        self, work: Callable[[sqlite3.Connection], T], begin: str | None, *, commit: bool = True
    ) -> T:
        self._check_pid()
        if self._in_unit():  # inside our unit of work: its transaction is ours; no retry
            try:
                return work(self.conn)
            except sqlite3.Error as exc:
                raise translate(exc, self.path) from exc
        deadline = time.monotonic() + self.busy_deadline
        with self._lock:
            while True:
                try:
                    return self._transaction(work, begin, commit)
                except sqlite3.Error as exc:
                    if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _BUSY_CODES:
                        raise translate(exc, self.path) from exc
                    if time.monotonic() >= deadline:
                        raise BrokerBusy(
                            f"{self.path}: other writers kept the database locked for "
                            f"{self.busy_deadline:g} s; is a process stuck inside a "
                            "transaction (an open sqlite3 shell, a stopped process)?"
                        ) from exc
                # Random 0-1 ms: spreads the retries of competing processes (fairness).
                time.sleep(random.random() / 1000)

    def _transaction(
        self, work: Callable[[sqlite3.Connection], T], begin: str | None, commit: bool
    ) -> T:
        conn = self.conn
        if begin is None:
            return work(conn)
        conn.execute(begin)
        try:
            result = work(conn)
            if commit:
                conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        return result

    def rollback(self) -> None:
        """Roll back if a transaction is still open: SQLite may already have done it."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def _check_pid(self) -> None:
        if os.getpid() != self.pid:
            raise BrokerError(
                f"{self.path}: this connection was opened by process {self.pid} and used "
                f"in process {os.getpid()}; open the broker again after fork()"
            )

    def close(self) -> None:
        """Close the connection, unless it was inherited through fork (never touch it)."""
        if os.getpid() == self.pid and self._conn is not None:
            self._conn.close()
            self._conn = None


def translate(exc: sqlite3.Error, path: Path) -> BrokerError:
    """A user-facing error for an sqlite3 error; the raw text names the cause."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return BrokerFull(
            f"{path}: no space left (disk full or page limit reached); nothing was "
            "written. Free disk space, purge the DLQ or expired results, then retry"
        )
    if code in _BUSY_CODES:
        return BrokerBusy(f"{path}: the database stayed locked by other writers ({exc})")
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR):
        return BrokerUnavailable(
            f"{path}: cannot use the database file ({exc}); check that it exists, that "
            "this user can write it and its directory, and that the disk is healthy"
        )
    return BrokerError(f"{path}: {exc}")


def connect(
    target: SqliteTarget,
    *,
    mountinfo: Path = MOUNTINFO,
    busy_deadline: float = BUSY_DEADLINE,
    create: bool = True,
) -> Database:
    """Open `target`: checked local filesystem, owner-only files, ours (`check_ours`),
    WAL, synchronous. `busy_deadline` caps how long one call waits for other writers
    (`BrokerBusy`). `create=False` (read commands) opens only an existing file and
    raises `StoreMissing` where there is none."""
    if create:
        _prepare_files(target.path, mountinfo)
    elif not _is_file(target.path):
        raise StoreMissing(
            f"no Stem database at {target.path} (nothing has been enqueued there yet, or "
            "the --broker URL or config names another file)"
        )
    conn = _open(target, check=False)
    db = Database(conn, target, busy_deadline)
    try:
        # Both under the busy retry: while another process makes a new file WAL (a
        # lock) or creates its schema, even reading its header meets SQLITE_BUSY
        # (measured: two `worker multi start` supervisors opening one new file).
        db.autocommit(lambda conn: check_ours(conn, target.path))
        db.autocommit(lambda conn: _configure(conn, target))
    except BaseException:
        conn.close()
        raise
    return db


def _open(target: SqliteTarget, *, check: bool = True) -> sqlite3.Connection:
    """A connection to the existing file of `target`, checked to be ours (`check`)."""
    conn: sqlite3.Connection | None = None
    try:
        # mode=rw: a read must not create the file it was pointed at.
        conn = sqlite3.connect(
            f"file:{quote(str(target.path))}?mode=rw", uri=True, isolation_level=None,
            timeout=0, check_same_thread=False,
        )  # fmt: skip
        if check:
            check_ours(conn, target.path)
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise translate(exc, target.path) from exc
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, target: SqliteTarget) -> None:
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {target.synchronous}")  # one of SYNCHRONOUS
    conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
