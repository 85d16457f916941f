"""The database layer's plumbing: engines, the database thread, group commit.

All SQL runs in one dedicated thread (a single writer for SQLite), never on
the reactor. SQLite runs in WAL mode with ``synchronous=FULL``, so a commit
that returned is on disk before any ACK is written (G4).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import queue
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, ParamSpec, TypeVar

from attrs import define, field, frozen
from sqlalchemy import Connection, Engine, bindparam, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from udsgateway.store import meta, schema

P = ParamSpec("P")
R = TypeVar("R")
Item = TypeVar("Item")
Result = TypeVar("Result")

log = Logger()

#: How long SQLite waits on a lock before the commit fails (NAK 206).
SQLITE_BUSY_TIMEOUT_MS = 2000

#: With a ``Checkpointer``: the WAL size (pages) at which a committing connection
#: checkpoints anyway, the safety valve when the checkpointer cannot keep up or a
#: long reader holds the WAL (about 64 MiB with 4 KiB pages).
WAL_AUTOCHECKPOINT_PAGES = 16384
#: With a ``Checkpointer``: the size a WAL file is cut back to when it restarts.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
#: How often the ``Checkpointer`` looks at the WAL (seconds).
CHECKPOINT_INTERVAL = 0.25


class SchemaError(Exception):
    """The database holds a schema this version cannot use."""


class DatabaseInUseError(Exception):
    """Another gateway holds this database (its lock names the holder)."""


class DatabaseDamagedError(Exception):
    """The database cannot be trusted: replaced, removed, or failing an integrity check."""


def is_locked(error: BaseException) -> bool:
    """True when a database error means "locked by someone else" (HL7 206)."""
    if isinstance(error, OperationalError):
        text = str(error.orig).lower()
        return "locked" in text or "busy" in text or "could not obtain lock" in text
    return False


def dead_peer_settings(lease_time: float) -> dict[str, Any]:
    """A cluster node's PostgreSQL connection settings, so that a dead or frozen peer
    costs the others seconds, never the cluster (fractions of the lease time: with a
    lease of 6 s, exactly what the fault harness runs with).

    On the server, for this node's own sessions: ``lock_timeout`` (lease / 6: a
    statement waits at most that long for a lock a frozen node's transaction holds,
    then fails: the sender gets a NAK and sends again, and the node's database thread
    is free for its lease round), ``idle_in_transaction_session_timeout`` (lease / 3:
    the session of a node gone in the middle of a transaction is ended, its locks
    released), keepalives (probed after lease / 3, dropped after 2 unanswered) and
    ``tcp_user_timeout`` (lease / 2). On the client (libpq) the same keepalives and
    ``tcp_user_timeout``: a node cut off from PostgreSQL gets an error instead of a
    read that never ends. And no pipelines: ``executemany`` runs one statement at a
    time (``_statement_cursor``), so the idle-in-transaction timeout covers a node
    frozen between two rows of one.
    """

    def ms(fraction: float) -> int:
        return max(500, int(lease_time * 1000 * fraction))

    idle = max(1, int(lease_time / 3))
    server = {
        "lock_timeout": f"{ms(1 / 6)}ms",
        "idle_in_transaction_session_timeout": f"{ms(1 / 3)}ms",
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": "1",
        "tcp_keepalives_count": "2",
        "tcp_user_timeout": str(ms(1 / 2)),
    }
    return {
        "options": " ".join(f"-c {name}={value}" for name, value in server.items()),
        "cursor_factory": _statement_cursor(),
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": 1,
        "keepalives_count": 2,
        "tcp_user_timeout": ms(1 / 2),
    }


def _statement_cursor() -> type:
    """psycopg's cursor, with ``executemany`` one statement and one round trip at a time.

    psycopg sends an ``executemany`` as a pipeline: every row's statement, one Sync at
    the end. Between two of them the server is not "idle in transaction" but still
    running the pipeline, so ``idle_in_transaction_session_timeout`` does not apply: a
    node frozen (SIGSTOP, a stalled VM) in the middle of one kept its transaction and
    its locks (the lease row it read ``FOR SHARE``) until it woke, and no other node
    could take its buckets over (the fault harness's pause scenario caught it). One
    statement at a time, the server is idle in the transaction between statements, and
    a frozen node's session ends after lease / 3 like any other. The cost is a round
    trip per row, on outcome groups of a few rows.
    """
    import psycopg

    class StatementCursor(psycopg.Cursor[Any]):
        def executemany(self, query: Any, params_seq: Any, *, returning: bool = False) -> None:
            no_pipeline = getattr(self, "_executemany_gen_no_pipeline", None)
            if no_pipeline is None:  # another psycopg: the plain loop (rowcount: the last)
                for params in params_seq:
                    self.execute(query, params)
                return
            with self._conn.lock:
                self._conn.wait(no_pipeline(query, params_seq, returning))

    return StatementCursor


def make_engine(
    url: str,
    connect_args: Mapping[str, Any] | None = None,
    *,
    background_checkpoints: bool = False,
) -> Engine:
    """Create an engine; SQLite files are created 0600, in WAL with synchronous=FULL.

    ``hide_parameters``: a database error's text never carries the statement's
    parameters, which hold message bodies (G6: no PHI in logs). ``connect_args``:
    PostgreSQL connection settings (a cluster node's ``dead_peer_settings``).
    ``background_checkpoints``: a ``Checkpointer`` copies the WAL into the database
    file on a thread of its own, so the connections of this engine checkpoint only
    when the WAL has grown to ``WAL_AUTOCHECKPOINT_PAGES`` (SQLite's default, 1,000
    pages, would stall the commit that crosses it for the whole copy).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(
            url, pool_pre_ping=True, hide_parameters=True, connect_args=dict(connect_args or {})
        )
    database = parsed.database or ""
    if database and database != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
        # Create the file ourselves so it is 0600 from its first byte; SQLite
        # gives the -wal and -shm files the same permissions.
        os.close(os.open(database, os.O_CREAT | os.O_RDWR, 0o600))
        engine = create_engine(url, hide_parameters=True)
    else:
        engine = create_engine(
            "sqlite://",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
            hide_parameters=True,
        )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's transaction control the BEGIN (pysqlite quirk).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if background_checkpoints:
            cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # temp_store stays the default (files): a GROUP BY over a million queued
        # deliveries at recovery sorts in temp files, not in the process's memory.
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # IMMEDIATE takes the write lock up front: no deadlock between readers
        # that upgrade, and a lock conflict shows at BEGIN (NAK 206), not later.
        # Database.transaction_now begins on the driver connection itself; SQLAlchemy's
        # own begin then finds the transaction open.
        if not connection.connection.dbapi_connection.in_transaction:  # type: ignore[union-attr]
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def ensure_schema(connection: Connection) -> int:
    """Create the tables on an empty database, or migrate an older one; return the version."""
    schema.metadata.create_all(connection)
    version = meta.schema_version(connection)
    if version is None:
        meta.set_schema_version(connection, schema.SCHEMA_VERSION)
        return schema.SCHEMA_VERSION
    if version > schema.SCHEMA_VERSION:
        raise SchemaError(
            f"database schema {version} is newer than this udsgateway ({schema.SCHEMA_VERSION})"
        )
    while version < schema.SCHEMA_VERSION:
        schema.MIGRATIONS[version](connection)
        version += 1
        meta.set_schema_version(connection, version)
    return version


class IDatabaseRunner(Interface):
    """Runs blocking database functions away from the reactor."""

    def run(function: Callable[..., Any], *args: Any) -> Deferred[Any]:  # noqa: N805
        """Call ``function(*args)`` in the database thread; fire with its result."""


@implementer(IDatabaseRunner)
@define
class ThreadRunner:
    """One dedicated thread for all SQL (SQLite has a single writer anyway).

    A plain queue and ``callFromThread``, not Twisted's general thread pool:
    every group commit crosses between the reactor and this thread twice,
    and the pool's bookkeeping on each crossing is Python run under the GIL
    both threads need.

    Results go back in batches: a finished job's result joins a list, and only
    the first result of a list asks the reactor (``callFromThread``, which
    writes to the reactor's waker pipe) to hand the list over. Jobs that finish
    while the reactor is busy with something else ride on that one crossing, in
    the order they finished; no result waits for a later job.
    """

    _reactor: IReactorFromThreads
    name: str = "udsgateway-db"
    _queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]] | None] = (
        field(factory=queue.SimpleQueue)
    )
    _thread: threading.Thread | None = None
    #: Finished jobs not yet handed to the reactor: (Deferred, succeeded, result).
    _finished: list[tuple[Deferred[Any], bool, Any]] = field(factory=list)
    _finished_lock: threading.Lock = field(factory=threading.Lock)
    #: Crossings back to the reactor, and results handed over (handed / crossings:
    #: the batching's effect; read by tests and the bench).
    crossings: int = 0
    handed: int = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the work already queued, then end the thread (waits for it)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def run(self, function: Callable[..., R], *args: Any) -> Deferred[R]:
        if self._thread is None:
            return fail(RuntimeError("the database thread is not running"))
        done: Deferred[R] = Deferred()
        self._queue.put((function, args, done))
        return done

    def _work(self) -> None:
        call_from_thread = self._reactor.callFromThread
        finished = self._finished_lock
        while True:
            item = self._queue.get()
            if item is None:
                return
            function, args, done = item
            del item
            try:
                outcome: tuple[Deferred[Any], bool, Any] = (done, True, function(*args))
            except BaseException:
                outcome = (done, False, Failure())
            with finished:
                self._finished.append(outcome)
                first = len(self._finished) == 1
            if first:
                self.crossings += 1
                call_from_thread(self._hand_over)
            del function, args, done, outcome  # hold nothing while waiting for the next job

    def _hand_over(self) -> None:
        """In the reactor: fire the Deferreds of every job finished so far, in order."""
        with self._finished_lock:
            batch, self._finished = self._finished, []
        self.handed += len(batch)
        for done, succeeded, result in batch:
            try:
                if succeeded:
                    done.callback(result)
                else:
                    done.errback(result)
            except Exception:
                # Never lose the rest of the batch (a Deferred fired twice is a bug).
                log.failure("handing a database result to the reactor failed")


@implementer(IDatabaseRunner)
class InlineRunner:
    """Runs database functions synchronously: for the CLI and deterministic tests."""

    def run(self, function: Callable[..., R], *args: Any) -> Deferred[R]:
        try:
            return succeed(function(*args))
        except BaseException:
            return fail()


@define
class Database:
    """An engine plus the runner that all of its SQL goes through."""

    engine: Engine
    runner: Any  # IDatabaseRunner
    _held: threading.local = field(factory=threading.local, init=False, repr=False)

    def transaction(self, function: Callable[..., R], *args: Any) -> Deferred[R]:
        """Run ``function(connection, *args)`` in one transaction in the database thread."""
        return self.runner.run(self.transaction_now, function, *args)

    def transaction_now(self, function: Callable[..., R], *args: Any) -> R:
        """The same, synchronously, in the calling thread (the CLI, the db thread).

        Each thread keeps its connection open between transactions: a pool
        check-out and reset per group commit cost more than the commit's SQL.
        The transaction is begun and committed on the driver connection
        (SQLite: ``BEGIN IMMEDIATE``), not through SQLAlchemy's transaction
        objects, whose bookkeeping cost as much as a small group's SQL; a
        function that runs SQLAlchemy statements joins the same transaction
        (SQLAlchemy's begin finds it open) and is committed through SQLAlchemy.
        A connection that failed is dropped, and the next transaction opens a
        fresh one.
        """
        connection: Connection | None = getattr(self._held, "connection", None)
        if connection is None or connection.closed or connection.invalidated:
            connection = self.engine.connect()
            self._held.connection = connection
        driver = connection.connection
        try:
            if connection.dialect.name == "sqlite":
                _driver_sql(connection, "BEGIN IMMEDIATE")
            result = function(connection, *args)
            if connection.in_transaction():
                connection.commit()
            else:
                driver.commit()
            return result
        except BaseException as error:
            if not _rolled_back(connection) or connection.invalidated:
                self._held.connection = None
                connection.close()
            converted = _as_sqlalchemy_error(connection, error)
            if converted is not None:
                raise converted from error
            raise

    def close(self) -> None:
        """Close this thread's held connection (the engine's pool keeps no other)."""
        connection = getattr(self._held, "connection", None)
        if connection is not None:
            self._held.connection = None
            connection.close()


class Checkpointer:
    """Copies a SQLite database's WAL into the database file, on a thread of its own.

    In WAL mode a commit appends to the ``-wal`` file, and a checkpoint copies the
    pages back into the database file and syncs it. SQLite's automatic checkpoint
    runs inside the commit that takes the WAL past 1,000 pages: that commit (and
    every ACK waiting behind it on the database thread) waited 15 to 25 ms for the
    copy, once every second or two under load. Here a connection of our own runs a
    ``PASSIVE`` checkpoint every ``interval`` seconds while the WAL changes: it takes
    no lock a writer or a reader waits for, so commits go on meanwhile; the engine's
    connections checkpoint only at ``WAL_AUTOCHECKPOINT_PAGES``
    (``make_engine(background_checkpoints=True)``). A checkpoint that fails is logged
    and tried again at the next interval; the safety valve keeps the WAL bounded.
    Durability does not depend on checkpoints: a commit is on disk in the WAL.
    """

    def __init__(
        self,
        database_path: str,
        *,
        interval: float = CHECKPOINT_INTERVAL,
        name: str = "udsgateway-checkpoint",
    ) -> None:
        self.database_path = database_path
        self.wal_path = database_path + "-wal"
        self.interval = interval
        self.name = name
        #: Checkpoints run and failed, and SQLite's answer to the last one (busy,
        #: frames in the WAL, frames copied): read by tests and the bench.
        self.checkpoints = 0
        self.failures = 0
        self.last: tuple[int, int, int] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None
        self._seen: tuple[int, int] | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread (waits up to ``timeout`` for a checkpoint in progress)."""
        thread, self._thread = self._thread, None
        if thread is None:
            self._close()  # a connection that run_once opened without the thread
            return
        self._stopping.set()
        thread.join(timeout)
        if thread.is_alive():
            log.warn("the checkpoint thread did not stop within {timeout} s", timeout=timeout)

    def _work(self) -> None:
        try:
            while not self._stopping.wait(self.interval):
                self.run_once()
        finally:
            self._close()

    def run_once(self) -> tuple[int, int, int] | None:
        """One look at the WAL: a ``PASSIVE`` checkpoint when it changed since the last
        one. Returns SQLite's answer (busy, frames in the WAL, frames checkpointed) or
        None when nothing was run."""
        try:
            stat = os.stat(self.wal_path)
        except FileNotFoundError:
            return None
        seen = (stat.st_size, stat.st_mtime_ns)
        if seen == self._seen:
            return None
        try:
            if self._connection is None:
                self._connection = sqlite3.connect(
                    self.database_path, isolation_level=None, check_same_thread=False
                )
            cursor = self._connection.cursor()
            try:
                row = cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                cursor.close()
        except sqlite3.Error as error:
            self.failures += 1
            self._close()
            log.warn(
                "WAL checkpoint failed ({error}); trying again in {interval} s",
                error=type(error).__name__,
                interval=self.interval,
            )
            return None
        busy, frames, copied = (int(value) for value in row)
        # All copied: nothing to do until the WAL changes again (a commit).
        self._seen = seen if not busy and frames == copied else None
        self.checkpoints += 1
        self.last = (busy, frames, copied)
        return self.last

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.close()


def _as_sqlalchemy_error(connection: Connection, error: BaseException) -> Exception | None:
    """A driver error from a statement run on the driver connection, as SQLAlchemy
    would have raised it (OperationalError, IntegrityError...), without its parameters,
    so callers see one family of errors; None for any other exception."""
    dbapi = connection.dialect.loaded_dbapi
    if not isinstance(error, dbapi.Error):
        return None
    return DBAPIError.instance(
        None, None, error, dbapi.Error, hide_parameters=True, dialect=connection.dialect
    )


def _rolled_back(connection: Connection) -> bool:
    """Roll back after a failure; False when the connection no longer answers.

    The check runs on the driver connection, outside any transaction: it takes
    no lock, so a database locked by another writer does not make it wait.
    """
    try:
        if connection.in_transaction():
            connection.rollback()
        driver = connection.connection
        driver.rollback()
        cursor = driver.cursor()
        try:
            cursor.execute("SELECT 1")
            cursor.fetchall()
        finally:
            cursor.close()
        driver.rollback()  # PostgreSQL: the SELECT opened a transaction
    except Exception:
        return False
    return True


@define
class _Pending(Generic[Item, Result]):
    item: Item
    deferred: Deferred[Result]


#: Upper bounds (seconds) of the commit-time buckets (the metrics' histogram).
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Bounds for a delivery's time in the queue, from enqueue to the partner's ACK
#: (seconds to an hour: a backlog or an outage makes it long).
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


@define
class Durations:
    """A histogram of durations in fixed buckets: a few list operations per observation,
    no lock (observed and read on the reactor thread)."""

    bounds: tuple[float, ...] = COMMIT_BUCKETS
    #: counts[i]: observations <= bounds[i] and > bounds[i-1]; the last: above them all.
    counts: list[int] = field(init=False)
    total: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


@define
class GroupCommitter(Generic[Item, Result]):
    """Commit items in groups: items that arrive while a commit runs go into the next one.

    ``batch`` runs in the database thread inside one transaction and returns
    one result per item, in order. When the transaction fails, every item of
    the group gets the failure (the caller turns it into a NAK, never an AA).

    With a ``clock`` (the reactor), a group that would start while the
    database is idle starts at the end of the current reactor turn instead:
    every frame read in that turn (one per ready connection) joins it, where
    starting at once would commit the first frame alone and the others in
    the next group. Without a clock (the CLI, tests), it starts at once.
    """

    _database: Database
    _batch: Callable[[Connection, list[Item]], list[Result]]
    _max_batch: int = 512
    clock: IReactorTime | None = None
    #: Called in the database thread before each group (fault injection in tests).
    before_batch: Callable[[], None] | None = None
    #: Called in the database thread after each group's SQL, before its commit: raises
    #: (DatabaseDamagedError) to roll the group back and NAK it (FileIdentity.ensure).
    guard: Callable[[], None] | None = None
    #: Called (on the reactor) with the reason when ``guard`` refused a group.
    on_damaged: Callable[[str], None] | None = None
    _pending: list[_Pending[Item, Result]] = field(factory=list)
    _running: bool = False
    groups: int = 0
    committed: int = 0
    #: How long each group took from its hand-over to the database thread to its
    #: commit (the admin service's metrics read it).
    commit_times: Durations = field(factory=Durations)
    _started_at: float = 0.0
    #: Set by ``SharedCommits.join``: this committer's groups share its transactions.
    shared: SharedCommits | None = field(default=None, init=False)

    @property
    def database(self) -> Database:
        """The database this committer commits to (its callers' other statements too)."""
        return self._database

    def submit(self, item: Item) -> Deferred[Result]:
        """Queue an item for the next group; fire with its result once committed."""
        deferred: Deferred[Result] = Deferred()
        self._pending.append(_Pending(item, deferred))
        if self.shared is not None:
            self._running = True  # this committer's group is due (``busy``)
            self.shared.due()
        elif not self._running:
            if self.clock is None:
                self._next()
            else:
                self._running = True  # the group is due; more items join it
                self.clock.callLater(0, self._next)
        return deferred

    @property
    def queued(self) -> int:
        """Items waiting for the next group."""
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """A group of this committer is committing or due: an item submitted now waits
        for it to end. (In a ``SharedCommits``, another member's transaction alone does
        not make this one busy: the ingest's fold decision sees the inbound groups.)"""
        return self._running

    def _take(self) -> list[_Pending[Item, Result]]:
        """The next group: the oldest pending items, at most ``max_batch`` of them."""
        group = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self.groups += 1
        self._started_at = time.perf_counter()
        return group

    def _next(self) -> None:
        if not self._pending:
            self._running = False
            return
        self._running = True
        group = self._take()
        done = self._database.transaction(self._run_batch, [p.item for p in group])
        done.addCallbacks(
            self._committed, self._failed, callbackArgs=(group,), errbackArgs=(group,)
        )

    def _run_batch(self, connection: Connection, items: list[Item]) -> list[Result]:
        results = self._sql(connection, items)
        if self.guard is not None:
            self.guard()
        return results

    def _sql(self, connection: Connection, items: list[Item]) -> list[Result]:
        """A group's statements (after the fault hook), without the guard: a
        ``SharedCommits`` runs each member's, then the guards once each."""
        if self.before_batch is not None:
            self.before_batch()
        return self._batch(connection, items)

    def _committed(self, results: list[Result], group: list[_Pending[Item, Result]]) -> None:
        # The callbacks first, then the next group. Handing the next group over first
        # (so the database thread commits it while the callbacks run) was tried: ingest
        # +7 to 14 %, but the relay 0.93x in one A/B and 1.08x in another (the database
        # thread and the lanes' sends then contend for the GIL); bench/RESULTS.md.
        self._hand_back(results, group)
        self._next()

    def _hand_back(self, results: list[Result], group: list[_Pending[Item, Result]]) -> None:
        """Fire the group's Deferreds with their results, once its transaction committed."""
        self.commit_times.observe(time.perf_counter() - self._started_at)
        self.committed += len(group)
        for pending, result in zip(group, results, strict=True):
            pending.deferred.callback(result)

    def _failed(self, failure: Any, group: list[_Pending[Item, Result]]) -> None:
        self._fail_group(failure, group)
        self._next()

    def _fail_group(self, failure: Any, group: list[_Pending[Item, Result]]) -> None:
        """Fail every item of a group that was not committed (the caller NAKs them)."""
        if failure.check(DatabaseDamagedError):
            log.warn("group commit refused: the database is damaged", size=len(group))
            if self.on_damaged is not None:
                self.on_damaged(str(failure.value))
        elif not failure.check(SQLAlchemyError):
            log.failure("group commit failed unexpectedly", failure, size=len(group))
        else:
            log.warn(
                "group commit failed: {error}",
                error=type(failure.value).__name__,
                locked=is_locked(failure.value),
                size=len(group),
            )
        for pending in group:
            pending.deferred.errback(failure)


@define
class SharedCommits:
    """One transaction for the pending groups of several committers.

    The gateway commits inbound messages (``assembly``: the ingest's committer) and
    delivery outcomes (the dispatcher's) in groups of their own. Run as two
    transactions, every relayed message paid for two commits, and a commit is most
    of the database thread's CPU (the WAL's pages written and flushed): the lanes'
    outcome groups are small (one settlement per lane). Joined here, whatever the
    members have pending when the database is free goes into one transaction, one
    commit, one hand-back to the reactor.

    Each member's group runs in a savepoint of its own: a group that fails (a
    fault, a bug) is rolled back alone and only its items fail, as they would
    have in a transaction of their own; the others commit. A ``guard`` refusal
    (``DatabaseDamagedError``) or a failed commit fails every group of the
    transaction. With one member pending the transaction is exactly the
    member's own (no savepoint). Members run in the order they joined.

    ``clock``: as ``GroupCommitter.clock``, a transaction that would start while
    the database is idle starts at the end of the reactor turn.
    """

    _database: Database
    clock: IReactorTime | None = None
    _members: list[GroupCommitter[Any, Any]] = field(factory=list)
    _running: bool = False
    #: Transactions run, and those that held the groups of more than one member.
    transactions: int = 0
    joined: int = 0

    def join(self, committer: GroupCommitter[Any, Any]) -> None:
        """From now on, ``committer``'s groups go into this object's transactions."""
        if committer.database is not self._database:
            raise ValueError("a shared transaction needs every committer on one database")
        if committer.shared is not None or committer.busy or committer.queued:
            raise ValueError("join a committer before it commits anything")
        committer.shared = self
        self._members.append(committer)

    @property
    def busy(self) -> bool:
        """A transaction is running or due: an item submitted now waits for it to end."""
        return self._running

    def due(self) -> None:
        """A member has an item pending: start a transaction unless one is running."""
        if self._running:
            return
        self._running = True
        if self.clock is None:
            self._next()
        else:
            self.clock.callLater(0, self._next)

    def _next(self) -> None:
        # After the last transaction's callbacks: members with nothing pending are idle.
        for member in self._members:
            if not member.queued:
                member._running = False
        parts = [(member, member._take()) for member in self._members if member.queued]
        if not parts:
            self._running = False
            return
        self._running = True
        self.transactions += 1
        if len(parts) > 1:
            self.joined += 1
        done = self._database.transaction(
            self._run, [(member, [p.item for p in group]) for member, group in parts]
        )
        done.addCallbacks(
            self._committed, self._failed, callbackArgs=(parts,), errbackArgs=(parts,)
        )

    def _run(
        self, connection: Connection, parts: list[tuple[GroupCommitter[Any, Any], list[Any]]]
    ) -> list[tuple[bool, Any]]:
        """In the database thread: every member's group, each in its savepoint; then the
        guards, once each, before the commit."""
        if len(parts) == 1:
            member, items = parts[0]
            return [(True, member._run_batch(connection, items))]
        outcomes: list[tuple[bool, Any]] = []
        for index, (member, items) in enumerate(parts):
            savepoint = f"udsgateway_group_{index}"
            _driver_sql(connection, f"SAVEPOINT {savepoint}")
            try:
                outcomes.append((True, member._sql(connection, items)))
            except Exception as error:
                converted = _as_sqlalchemy_error(connection, error)
                outcomes.append((False, Failure() if converted is None else Failure(converted)))
                # When SQLite rolled the whole transaction back itself (a full disk, an
                # I/O error), this fails too, and so does every group: none committed.
                _driver_sql(connection, f"ROLLBACK TO SAVEPOINT {savepoint}")
            _driver_sql(connection, f"RELEASE SAVEPOINT {savepoint}")
        guards = []
        for member, _items in parts:
            if member.guard is not None and member.guard not in guards:
                guards.append(member.guard)
                member.guard()
        return outcomes

    def _committed(
        self,
        outcomes: list[tuple[bool, Any]],
        parts: list[tuple[GroupCommitter[Any, Any], list[_Pending[Any, Any]]]],
    ) -> None:
        for (member, group), (succeeded, value) in zip(parts, outcomes, strict=True):
            if succeeded:
                member._hand_back(value, group)
            else:
                member._fail_group(value, group)
        self._next()

    def _failed(
        self, failure: Any, parts: list[tuple[GroupCommitter[Any, Any], list[_Pending[Any, Any]]]]
    ) -> None:
        for member, group in parts:
            member._fail_group(failure, group)
        self._next()


def _driver_sql(connection: Connection, sql: str) -> None:
    """One statement on the driver connection (its transaction is the caller's)."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


@define
class Prepared:
    """A statement compiled once per dialect to its driver SQL, for the hot path.

    SQLAlchemy Core builds and caches statements well, but each execution
    still walks its compiler cache and execution context; on the inbound
    path that costs more than the SQL itself. ``Prepared`` keeps the SQL
    dialect-neutral (it is compiled by SQLAlchemy for whichever dialect the
    connection speaks) and executes it with ``exec_driver_sql``.
    """

    build: Callable[[], Any]
    _compiled: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = field(factory=dict)

    def sql(self, connection: Connection) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        """Driver SQL, the parameter names in order (positional paramstyles only), and
        the values of parameters the dialect added itself (SQLite's ``OFFSET 0``)."""
        name = connection.dialect.name
        found = self._compiled.get(name)
        if found is None:
            compiled = self.build().compile(dialect=connection.dialect)
            order = tuple(compiled.positiontup) if compiled.positiontup else None
            defaults = {k: v for k, v in compiled.params.items() if v is not None}
            found = (str(compiled), order, defaults)
            self._compiled[name] = found
        return found

    def execute(self, connection: Connection, rows: list[dict[str, Any]]) -> list[Any]:
        """Run with one parameter set, or as executemany with several; return any rows.

        The DBAPI cursor belongs to the connection's current transaction.
        """
        sql, order, defaults = self.sql(connection)
        if defaults:
            rows = [{**defaults, **row} for row in rows]
        params: Any = [tuple(row[k] for k in order) for row in rows] if order else rows
        cursor = connection.connection.cursor()
        try:
            if len(params) == 1:
                cursor.execute(sql, params[0])
            else:
                cursor.executemany(sql, params)
            return list(cursor.fetchall()) if cursor.description else []
        finally:
            cursor.close()


@define
class RowInsert:
    """An INSERT of the given columns of ``table``, for one row or many.

    On SQLite several rows go in as one multi-row ``INSERT ... VALUES (...), (...)``
    per chunk of up to ``chunk`` rows, not one statement per row: each statement
    the database thread runs releases and re-takes the GIL, and on the inbound
    path those hand-offs with the busy reactor cost more than the SQL itself.
    PostgreSQL gets multi-row statements too (psycopg's executemany is a pipeline,
    which a cluster node does not send: ``dead_peer_settings``); other dialects use
    the driver's executemany.
    """

    table: Any
    columns: tuple[str, ...]
    chunk: int = 64
    _single: Prepared = field(init=False)
    _multi: dict[int, tuple[str, tuple[str, ...]]] = field(factory=dict, init=False)
    _pg: dict[int, str] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._single = Prepared(
            lambda: self.table.insert().values({c: bindparam(c) for c in self.columns})
        )

    def execute(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> int | None:
        """Insert ``rows`` (every column given); on SQLite return the last new rowid."""
        if connection.dialect.name == "postgresql":
            cursor = connection.connection.cursor()
            try:
                for start in range(0, len(rows), self.chunk):
                    part = rows[start : start + self.chunk]
                    sql = self._pg_sql(connection, len(part))
                    cursor.execute(sql, [row[c] for row in part for c in self.columns])
            finally:
                cursor.close()
            return None
        if connection.dialect.name != "sqlite":
            self._single.execute(connection, [dict(row) for row in rows])
            return None
        cursor = connection.connection.cursor()
        try:
            for start in range(0, len(rows), self.chunk):
                part = rows[start : start + self.chunk]
                sql, columns = self._multi_sql(connection, len(part))
                cursor.execute(sql, [row[c] for row in part for c in columns])
            return int(cursor.lastrowid) if rows else None
        finally:
            cursor.close()

    def _pg_sql(self, connection: Connection, size: int) -> str:
        """PostgreSQL's multi-row statement for ``size`` rows (psycopg's ``%s``), in the
        order of ``columns``; built once per size."""
        found = self._pg.get(size)
        if found is None:
            quote = connection.dialect.identifier_preparer.quote
            names = ", ".join(quote(c) for c in self.columns)
            row = "(" + ", ".join(["%s"] * len(self.columns)) + ")"
            found = self._pg[size] = (
                f"INSERT INTO {quote(self.table.name)} ({names}) VALUES " + ", ".join([row] * size)
            )
        return found

    def _multi_sql(self, connection: Connection, size: int) -> tuple[str, tuple[str, ...]]:
        """SQLite's multi-row statement for ``size`` rows, compiled once per size, and
        the column order of its parameters (the table's order), the same in every row."""
        found = self._multi.get(size)
        if found is None:
            statement = self.table.insert().values(
                [{c: bindparam(f"r{i}_{c}") for c in self.columns} for i in range(size)]
            )
            compiled = statement.compile(dialect=connection.dialect)
            order = tuple(name.partition("_")[2] for name in (compiled.positiontup or ()))
            columns = order[: len(self.columns)]
            expected = [f"r{i}_{c}" for i in range(size) for c in columns]
            if sorted(columns) != sorted(self.columns) or compiled.positiontup != expected:
                raise AssertionError(f"unexpected parameter order for {self.table.name}")
            found = self._multi[size] = (str(compiled), columns)
        return found


def prepared_insert(table: Any, columns: Sequence[str]) -> RowInsert:
    """An INSERT of the given columns of ``table``, every value a bind parameter."""
    return RowInsert(table, tuple(columns))


def insert_with_ids(
    connection: Connection, table: Any, insert: RowInsert, rows: Sequence[Mapping[str, Any]]
) -> list[int]:
    """Insert rows and return their ids, in order.

    SQLite: multi-row statements and no RETURNING; inside our write
    transaction the rows get consecutive rowids ending at the last one
    inserted. Other dialects: INSERT ... RETURNING in parameter order.
    """
    if not rows:
        return []
    if connection.dialect.name == "sqlite":
        last = insert.execute(connection, rows)
        assert last is not None
        return list(range(last - len(rows) + 1, last + 1))
    result = connection.execute(
        table.insert().returning(table.c.id, sort_by_parameter_order=True), list(rows)
    )
    return [row[0] for row in result]


# -- exclusivity and damage detection (docs/operations.md, "One gateway per database")


def sqlite_path(url: str) -> str | None:
    """The absolute path of a SQLite database file, or None (in memory, not SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if not database or database == ":memory:":
        return None
    return os.path.abspath(database)


def holder_text(pid: int, host: str, since: float) -> str:
    """How a lock's holder is named in the lock file and in messages."""
    started = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"pid {pid} on host {host}, since {started}"


@define
class FileLock:
    """An exclusive ``flock`` on ``<database>.lock``, held for the life of the process.

    The kernel releases it when the process ends, however it ends (kill -9
    included), so a stale lock file never blocks a restart. The file holds
    the holder's pid, host and start time, for the message a second gateway
    prints. The descriptor survives twistd's fork into the background (a
    flock belongs to the open file, shared with the child): ``rewrite`` then
    records the child's pid.
    """

    path: str
    _fd: int | None = None

    @classmethod
    def acquire(cls, database_path: str, now: float) -> FileLock:
        """Take the lock, or raise DatabaseInUseError naming the holder."""
        path = database_path + ".lock"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise DatabaseInUseError(
                f"database {database_path} is in use by another gateway: "
                f"{holder or 'holder unknown'} (lock file {path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        lock = cls(path, fd)
        lock.rewrite(now)
        return lock

    def rewrite(self, since: float) -> None:
        """Record this process (its pid now: after a fork, the child's) as the holder."""
        if self._fd is None:
            return
        text = holder_text(os.getpid(), socket.gethostname(), since) + "\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode("utf-8"), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock


#: The key of the PostgreSQL advisory lock a gateway holds on its database.
PG_LOCK_KEY = 0x75647367  # "udsg"
#: How long a start waits for an advisory lock whose holder no session shows (its
#: backend exiting after a stop) before it is refused (seconds).
LOCK_HOLDER_EXIT_WAIT = 2.0


@define
class AdvisoryLock:
    """A session-level ``pg_try_advisory_lock`` on a connection kept open for the process.

    One gateway per PostgreSQL database: a single gateway takes it
    exclusively. The nodes of a cluster (``udsgateway.cluster``) take it
    ``shared``: any number of them together, but never beside a single
    gateway, and a single gateway never beside them. The connection's
    ``application_name`` names the holder, so a refused gateway can say who
    holds the lock.
    """

    connection: Connection | None

    @classmethod
    def acquire(
        cls, engine: Engine, now: float, key: int = PG_LOCK_KEY, shared: bool = False
    ) -> AdvisoryLock:
        """Take the lock (``key`` below 2**31), or raise DatabaseInUseError naming the holder."""
        connection = engine.connect()
        try:
            name = "udsgateway " + holder_text(os.getpid(), socket.gethostname(), now)
            connection.exec_driver_sql(
                "SELECT set_config('application_name', %(name)s, false)", {"name": name[:63]}
            )
            function = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
            # A holder whose session is ending (a gateway that just stopped) keeps the
            # lock until its backend has exited, a moment after its close returned, and
            # no session shows it meanwhile: try again for up to LOCK_HOLDER_EXIT_WAIT.
            deadline = time.monotonic() + LOCK_HOLDER_EXIT_WAIT
            while True:
                got = connection.exec_driver_sql(
                    f"SELECT {function}(CAST(%(key)s AS bigint))", {"key": key}
                ).scalar()
                if got:
                    break
                holder = connection.exec_driver_sql(
                    "SELECT a.application_name, a.client_addr::text, a.pid, l.mode"
                    " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted"
                    " AND l.classid = 0 AND l.objid::bigint = %(key)s"
                    " AND l.database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                    " ORDER BY a.backend_start LIMIT 1",
                    {"key": key},
                ).first()
                if holder is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                connection.commit()
                _end_session(connection)
                who = "holder unknown"
                if holder is not None:
                    name, client, backend, mode = holder
                    who = f"{name or 'unnamed'} (client {client or 'local'}, backend {backend})"
                    if mode == "ShareLock":
                        who = "the nodes of a cluster, among them " + who
                raise DatabaseInUseError(f"database is in use by another gateway: {who}")
            connection.commit()  # the lock is session-level: it outlives the transaction
        except DatabaseInUseError:
            raise
        except BaseException:
            _end_session(connection)
            raise
        return cls(connection)

    def release(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            _end_session(connection)  # ending the session releases the lock


def _end_session(connection: Connection) -> None:
    """Close the driver connection itself: back in the pool, its session (the lock, the
    application name) would live on."""
    connection.invalidate()
    connection.close()


def lock_database(
    url: str, engine: Engine, now: float, shared: bool = False
) -> FileLock | AdvisoryLock | None:
    """Hold the database exclusively for this process (DatabaseInUseError if another has
    it); ``shared`` (a cluster node, PostgreSQL only): together with the other nodes,
    never beside a single gateway."""
    path = sqlite_path(url)
    if path is not None:
        return FileLock.acquire(path, now)
    if engine.dialect.name == "postgresql":
        return AdvisoryLock.acquire(engine, now, shared=shared)
    return None


# The WAL format: https://www.sqlite.org/fileformat2.html#walformat
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # checksums on little / big-endian words
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24


def _wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum over ``data`` (a multiple of 8 bytes), from (s0, s1)."""
    words = struct.iter_unpack(">II" if big_endian else "<II", data)
    for x0, x1 in words:
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return s0, s1


@frozen
class WalReport:
    """What SQLite would make of a WAL file when it opens the database."""

    frames: int  #: complete frames of the current WAL generation in the file
    applied: int  #: frames up to the last valid commit frame (what SQLite replays)
    bad_frame: int | None  #: the first frame failing its checksum (1-based), or None
    header_ok: bool
    #: Commit frames after the bad frame: committed transactions SQLite would drop.
    commits_lost: int = 0

    @property
    def damaged(self) -> bool:
        """Committed transactions would be lost (an uncommitted tail is not damage: a
        crash or power loss while a transaction was written, never acknowledged)."""
        if not self.header_ok:
            return self.frames > 0
        return self.commits_lost > 0


def read_wal(path: str) -> WalReport | None:
    """Check a WAL file's header and frame checksums; None when there is no WAL.

    SQLite replays frames up to the last commit frame before the first frame
    whose salt or checksum does not match, and ignores the rest without a
    word. Frames with other salts are left over from an earlier generation
    (the file is reused after a checkpoint) and are normal; commit frames with
    this generation's salts after a bad one are transactions that would be
    lost. The file is read one frame at a time (a WAL can be large).
    """
    try:
        wal = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with wal:
        header = wal.read(_WAL_HEADER)
        if len(header) < _WAL_HEADER:
            return None  # empty or torn at creation: SQLite ignores it, nothing was in it
        magic, _version, page_size, _seq, salt1, salt2, sum1, sum2 = struct.unpack(">8I", header)
        valid_size = 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0
        big_endian = magic == _WAL_MAGIC[1]
        header_ok = (
            magic in _WAL_MAGIC
            and valid_size
            and _wal_checksum(header[:24], big_endian, 0, 0) == (sum1, sum2)
        )
        if not header_ok:
            # SQLite ignores the whole WAL; count the frames it held, as far as readable.
            size = os.fstat(wal.fileno()).st_size
            frames = (size - _WAL_HEADER) // (_WAL_FRAME_HEADER + page_size) if valid_size else 0
            return WalReport(frames, 0, None, header_ok=False)
        frame_size = _WAL_FRAME_HEADER + page_size
        s0, s1 = sum1, sum2
        frames = applied = commits_lost = 0
        bad: int | None = None
        while len(frame := wal.read(frame_size)) == frame_size:
            page, commit_size, fsalt1, fsalt2, fsum1, fsum2 = struct.unpack(
                ">6I", frame[:_WAL_FRAME_HEADER]
            )
            if (fsalt1, fsalt2) != (salt1, salt2):
                if bad is None:
                    break  # an earlier generation's frames: the end of this WAL
                continue  # after a bad frame: keep counting this generation's frames
            frames += 1
            if bad is not None:
                commits_lost += 1 if commit_size else 0
                continue
            s0, s1 = _wal_checksum(frame[:8], big_endian, s0, s1)
            s0, s1 = _wal_checksum(frame[_WAL_FRAME_HEADER:], big_endian, s0, s1)
            if page == 0 or (s0, s1) != (fsum1, fsum2):
                bad = frames
            elif commit_size:
                applied = frames
    return WalReport(frames, applied, bad, header_ok=True, commits_lost=commits_lost)


def damage_before_open(url: str) -> list[str]:
    """Problems with a SQLite database's WAL, found before SQLite opens (and recovers) it.

    Must run before any connection: SQLite replays the valid part of a WAL,
    checkpoints it into the database on the last close and deletes the WAL,
    and with it the evidence of what was dropped.
    """
    path = sqlite_path(url)
    if path is None:
        return []
    report = read_wal(path + "-wal")
    if report is None or not report.damaged:
        return []
    if not report.header_ok:
        return [
            f"{path}-wal: the WAL header fails its checksum; SQLite would ignore all "
            f"{report.frames} frames in it: every transaction committed since the last "
            "checkpoint (acknowledged messages, delivery outcomes) would be lost"
        ]
    assert report.bad_frame is not None
    return [
        f"{path}-wal: frame {report.bad_frame} of {report.frames} fails its checksum; "
        f"SQLite would silently ignore it and the {report.frames - report.bad_frame} frames "
        f"after it, with {report.commits_lost} committed transactions (acknowledged "
        "messages, delivery outcomes): they would be lost"
    ]


def damage_before_command(url: str, now: float) -> list[str]:
    """``damage_before_open`` for a ``udsgateway`` command, when no gateway runs.

    A running gateway holds the lock and checked the WAL at its start; its
    live WAL is not read (a frame being written would look damaged). When no
    gateway runs, the lock is taken for the check only, and released before
    the command opens the database.
    """
    path = sqlite_path(url)
    if path is None:
        return []
    try:
        lock = FileLock.acquire(path, now)
    except DatabaseInUseError:
        return []
    try:
        return damage_before_open(url)
    finally:
        lock.release()


def quick_check(connection: Connection) -> list[str]:
    """``PRAGMA quick_check``: an empty list when the database file is consistent."""
    if connection.dialect.name != "sqlite":
        return []
    result = connection.exec_driver_sql("PRAGMA quick_check").fetchall()
    lines = [line for row in result for line in str(row[0]).splitlines() if line.strip()]
    if lines == ["ok"]:
        return []
    shown = [f"PRAGMA quick_check: {line}" for line in lines[:10]]
    if len(lines) > 10:
        shown.append(f"PRAGMA quick_check: ... and {len(lines) - 10} more")
    return shown


@define
class FileIdentity:
    """Watches that the database file the gateway writes is still the one at its path.

    A database file deleted or replaced under a running gateway leaves it
    writing (and acknowledging) into a file nobody will read again. ``check``
    compares the path's device and inode with those of the file opened at
    start, and that the file still has a link; it runs in the database thread
    (it is file I/O), on a timer and before each group commit. Once it found
    a problem, the gateway stays damaged until it is restarted.
    """

    path: str
    _fd: int | None = None
    _identity: tuple[int, int] | None = None
    damage: str | None = None
    #: Called once, in the thread that found it, with the first problem found.
    on_damage: Callable[[str], None] | None = None

    def watch(self) -> None:
        """Record the identity of the file at the path now (the database thread, at start)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        status = os.fstat(fd)
        self._fd, self._identity = fd, (status.st_dev, status.st_ino)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def check(self) -> str | None:
        """The problem with the database file, or None; remembered once found."""
        if self.damage is not None or self._fd is None:
            return self.damage
        problem: str | None = None
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            problem = f"database file {self.path} was deleted while the gateway ran"
        else:
            if (status.st_dev, status.st_ino) != self._identity:
                problem = f"database file {self.path} was replaced while the gateway ran"
            elif os.fstat(self._fd).st_nlink == 0:  # the path is a stale cache entry
                problem = f"database file {self.path} was deleted while the gateway ran"
        if problem is not None:
            self.damage = problem
            if self.on_damage is not None:
                self.on_damage(problem)
        return problem

    def ensure(self) -> None:
        """Raise DatabaseDamagedError when ``check`` finds a problem (the commit path)."""
        problem = self.check()
        if problem is not None:
            raise DatabaseDamagedError(problem)
