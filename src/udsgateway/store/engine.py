"""The database layer's plumbing: engines, the database thread, group commit.

All SQL runs in one dedicated thread (a single writer for SQLite), never on
the reactor. SQLite runs in WAL mode with ``synchronous=FULL``, so a commit
that returned is on disk before any ACK is written (G4).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, ParamSpec, TypeVar

from attrs import define, field
from sqlalchemy import Connection, Engine, bindparam, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from udsgateway.store import schema

P = ParamSpec("P")
R = TypeVar("R")
Item = TypeVar("Item")
Result = TypeVar("Result")

log = Logger()

#: How long SQLite waits on a lock before the commit fails (NAK 206).
SQLITE_BUSY_TIMEOUT_MS = 2000


class SchemaError(Exception):
    """The database holds a schema this version cannot use."""


def is_locked(error: BaseException) -> bool:
    """True when a database error means "locked by someone else" (HL7 206)."""
    if isinstance(error, OperationalError):
        text = str(error.orig).lower()
        return "locked" in text or "busy" in text or "could not obtain lock" in text
    return False


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite files are created 0600, in WAL with synchronous=FULL.

    ``hide_parameters``: a database error's text never carries the statement's
    parameters, which hold message bodies (G6: no PHI in logs).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, hide_parameters=True)
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
    row = connection.execute(
        select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
    ).first()
    if row is None:
        connection.execute(
            schema.meta.insert().values(key="schema_version", value=str(schema.SCHEMA_VERSION))
        )
        return schema.SCHEMA_VERSION
    version = int(row[0])
    if version > schema.SCHEMA_VERSION:
        raise SchemaError(
            f"database schema {version} is newer than this udsgateway ({schema.SCHEMA_VERSION})"
        )
    while version < schema.SCHEMA_VERSION:
        schema.MIGRATIONS[version](connection)
        version += 1
        connection.execute(
            schema.meta.update()
            .where(schema.meta.c.key == "schema_version")
            .values(value=str(version))
        )
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
    """

    _reactor: IReactorFromThreads
    name: str = "udsgateway-db"
    _queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]] | None] = (
        field(factory=queue.SimpleQueue)
    )
    _thread: threading.Thread | None = None

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
        while True:
            item = self._queue.get()
            if item is None:
                return
            function, args, done = item
            del item
            try:
                result = function(*args)
            except BaseException:
                call_from_thread(done.errback, Failure())
            else:
                call_from_thread(done.callback, result)
                del result
            del function, args, done  # hold nothing while waiting for the next job


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
                cursor = driver.cursor()
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                finally:
                    cursor.close()
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
            dbapi = connection.dialect.loaded_dbapi
            if isinstance(error, dbapi.Error):
                # A driver error from a statement run on the driver connection: raise
                # it as SQLAlchemy would have (OperationalError, IntegrityError...),
                # without its parameters, so callers see one family of errors.
                raise DBAPIError.instance(
                    None,
                    None,
                    error,
                    dbapi.Error,
                    hide_parameters=True,
                    dialect=connection.dialect,
                ) from error
            raise

    def close(self) -> None:
        """Close this thread's held connection (the engine's pool keeps no other)."""
        connection = getattr(self._held, "connection", None)
        if connection is not None:
            self._held.connection = None
            connection.close()


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
    _pending: list[_Pending[Item, Result]] = field(factory=list)
    _running: bool = False
    groups: int = 0
    committed: int = 0

    def submit(self, item: Item) -> Deferred[Result]:
        """Queue an item for the next group; fire with its result once committed."""
        deferred: Deferred[Result] = Deferred()
        self._pending.append(_Pending(item, deferred))
        if not self._running:
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
        """A group is committing or due: an item submitted now waits for it to end."""
        return self._running

    def _next(self) -> None:
        if not self._pending:
            self._running = False
            return
        self._running = True
        group = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self.groups += 1
        done = self._database.transaction(self._run_batch, [p.item for p in group])
        done.addCallbacks(
            self._committed, self._failed, callbackArgs=(group,), errbackArgs=(group,)
        )

    def _run_batch(self, connection: Connection, items: list[Item]) -> list[Result]:
        if self.before_batch is not None:
            self.before_batch()
        return self._batch(connection, items)

    def _committed(self, results: list[Result], group: list[_Pending[Item, Result]]) -> None:
        self.committed += len(group)
        for pending, result in zip(group, results, strict=True):
            pending.deferred.callback(result)
        self._next()

    def _failed(self, failure: Any, group: list[_Pending[Item, Result]]) -> None:
        if not failure.check(SQLAlchemyError):
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
        self._next()


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
    Other dialects (PostgreSQL) use the driver's executemany, one round trip.
    """

    table: Any
    columns: tuple[str, ...]
    chunk: int = 64
    _single: Prepared = field(init=False)
    _multi: dict[int, tuple[str, tuple[str, ...]]] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._single = Prepared(
            lambda: self.table.insert().values({c: bindparam(c) for c in self.columns})
        )

    def execute(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> int | None:
        """Insert ``rows`` (every column given); on SQLite return the last new rowid."""
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
