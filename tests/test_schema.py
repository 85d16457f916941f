"""The schema version and its migrations."""

from __future__ import annotations

import os
import threading
from typing import Any

from sqlalchemy import inspect, select, update
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.store import schema
from udsgateway.store.engine import (
    Checkpointer,
    SchemaError,
    ThreadRunner,
    ensure_schema,
    make_engine,
)
from udsgateway.store.inbound import commit_inbound
from udsgateway.testing import inbound_record


class SchemaTests(SynchronousTestCase):
    """A database is created at the current version and older ones are migrated."""

    def test_new_database_gets_current_version(self) -> None:
        """An empty database is created with every table at SCHEMA_VERSION."""
        engine = make_engine("sqlite:///:memory:")
        with engine.begin() as connection:
            self.assertEqual(ensure_schema(connection), schema.SCHEMA_VERSION)
            names = set(inspect(connection).get_table_names())
        self.assertEqual(names, set(schema.metadata.tables))

    def test_version_1_is_migrated(self) -> None:
        """A version 1 database (old index column order, no open-deliveries index) is migrated."""
        engine = make_engine("sqlite:///:memory:")
        with engine.begin() as connection:
            ensure_schema(connection)
            schema.index(schema.deliveries, "deliveries_open").drop(connection)
            connection.execute(
                update(schema.meta).where(schema.meta.c.key == "schema_version").values(value="1")
            )
        with engine.begin() as connection:
            self.assertEqual(ensure_schema(connection), schema.SCHEMA_VERSION)
            indexes = {i["name"]: i for i in inspect(connection).get_indexes("deliveries")}
            self.assertIn("deliveries_open", indexes)
            lookup = {i["name"]: i for i in inspect(connection).get_indexes("messages")}
            self.assertEqual(lookup["messages_dedupe"]["column_names"][0], "control_id")
            version = connection.execute(
                select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
            ).scalar_one()
        self.assertEqual(version, str(schema.SCHEMA_VERSION))

    def test_version_2_is_migrated(self) -> None:
        """Version 2's redundant messages_lookup index is dropped; the rows stay."""
        engine = make_engine("sqlite:///:memory:")
        with engine.begin() as connection:
            ensure_schema(connection)
            connection.exec_driver_sql(
                "CREATE INDEX messages_lookup ON messages (control_id, tenant, sender)"
            )
            connection.execute(
                update(schema.meta).where(schema.meta.c.key == "schema_version").values(value="2")
            )
        with engine.begin() as connection:
            self.assertEqual(ensure_schema(connection), schema.SCHEMA_VERSION)
            names = {i["name"] for i in inspect(connection).get_indexes("messages")}
        self.assertNotIn("messages_lookup", names)
        self.assertIn("messages_dedupe", names)

    def test_duplicate_check_uses_the_unique_index(self) -> None:
        """The duplicate check's lookup is an index search, not a scan of the messages."""
        from udsgateway.store.messages import _LOOKUPS

        engine = make_engine("sqlite:///:memory:")
        with engine.begin() as connection:
            ensure_schema(connection)
            sql, _order, _defaults = _LOOKUPS[2].sql(connection)
            plan = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, ("A", "B")).all()
        self.assertIn("USING INDEX messages_dedupe", " ".join(str(row[-1]) for row in plan))

    def test_version_4_is_migrated(self) -> None:
        """Version 5's indexes for the status and the dashboard are built on a version 4
        database (its rows kept)."""
        engine = make_engine("sqlite:///:memory:")
        with engine.begin() as connection:
            ensure_schema(connection)
            commit_inbound(connection, [inbound_record("OLD4", flows=("F1",))])
            for table, name in schema.STATUS_INDEXES:
                schema.index(table, name).drop(connection)
            connection.execute(
                update(schema.meta).where(schema.meta.c.key == "schema_version").values(value="4")
            )
        with engine.begin() as connection:
            self.assertEqual(ensure_schema(connection), schema.SCHEMA_VERSION)
            found = {
                (table.name, index["name"]): index["column_names"]
                for table, _name in schema.STATUS_INDEXES
                for index in inspect(connection).get_indexes(table.name)
            }
            count = connection.exec_driver_sql("SELECT count(*) FROM messages").scalar()
        self.assertEqual(
            [found.get((table.name, name)) for table, name in schema.STATUS_INDEXES],
            [["flow_id", "state"], ["event", "at", "flow_id"]],
        )
        self.assertEqual(count, 1)

    def test_status_reads_indexes_only(self) -> None:
        """The status's counts of executions and the dashboard's chart read their index
        alone (SQLite says ``COVERING INDEX``), never the tables' rows; the chart a range
        of it, not every line since."""
        from sqlalchemy import event

        from udsgateway.store import logs, overview

        engine = make_engine("sqlite:///:memory:")
        with engine.begin() as connection:
            ensure_schema(connection)
            statements: list[tuple[str, Any]] = []

            def seen(_conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
                statements.append((sql, params))

            event.listen(connection, "before_cursor_execute", seen)
            overview.flow_counts(connection)
            logs.per_minute(connection, "execution", 1000.0, 60)
            event.remove(connection, "before_cursor_execute", seen)
            plans = {
                sql: " ".join(
                    str(row[-1])
                    for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)
                )
                for sql, params in statements
                if "GROUP BY" in sql
            }
        self.assertEqual(len(plans), 2, plans)
        self.assertEqual(
            sorted(plan.split("COVERING INDEX ")[1].split()[0] for plan in plans.values()),
            ["executions_flow", "logs_event"],
            plans,
        )
        [chart] = [plan for sql, plan in plans.items() if "FROM logs" in sql]
        self.assertIn("SEARCH logs USING COVERING INDEX logs_event (event=? AND at>?)", chart)

    def test_newer_database_is_refused(self) -> None:
        """A database written by a newer udsgateway is refused, not damaged."""
        engine = make_engine("sqlite:///:memory:")
        with engine.begin() as connection:
            ensure_schema(connection)
            connection.execute(
                update(schema.meta)
                .where(schema.meta.c.key == "schema_version")
                .values(value=str(schema.SCHEMA_VERSION + 1))
            )
        with engine.begin() as connection, self.assertRaises(SchemaError):
            ensure_schema(connection)


class DatabaseErrorTests(SynchronousTestCase):
    """Database errors must not carry statement parameters into logs (G6)."""

    def test_error_text_hides_parameters(self) -> None:
        """A failing statement's error names the SQL but never the values bound to it."""
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError

        engine = make_engine("sqlite:///:memory:")
        with self.assertRaises(OperationalError) as raised, engine.begin() as connection:
            connection.execute(text("INSERT INTO missing VALUES (:name)"), {"name": "ZZMARKER"})
        self.assertNotIn("ZZMARKER", str(raised.exception))
        self.assertIn("hidden", str(raised.exception))


class _CallsFromThreads:
    """IReactorFromThreads for a test: calls are kept and run by the test thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, function: Any, *args: Any) -> None:
        self.calls.append((function, args))

    def run_calls(self) -> None:
        for function, args in self.calls:
            function(*args)


class ThreadRunnerTests(SynchronousTestCase):
    """The database thread runs jobs in order, off the calling thread, and reports back
    through the reactor."""

    def test_results_and_failures_come_back_through_the_reactor(self) -> None:
        reactor = _CallsFromThreads()
        runner = ThreadRunner(reactor)  # type: ignore[arg-type]
        runner.start()
        order: list[int] = []

        def first_job() -> int:
            order.append(1)
            return threading.get_ident()

        first = runner.run(first_job)
        second = runner.run(lambda: 1 // 0)
        third = runner.run(order.append, 3)
        runner.stop()  # waits for the queued jobs
        self.assertNoResult(first)  # nothing fires until the reactor runs the calls
        reactor.run_calls()
        self.assertNotEqual(self.successResultOf(first), threading.get_ident())
        self.failureResultOf(second, ZeroDivisionError)
        self.assertIsNone(self.successResultOf(third))
        self.assertEqual(order, [1, 3])

    def test_results_finished_before_the_reactor_runs_cross_back_together(self) -> None:
        # Jobs that finish while the reactor has not yet taken the previous results
        # go back with them: one callFromThread (one waker write) for the lot, in order.
        reactor = _CallsFromThreads()
        runner = ThreadRunner(reactor)  # type: ignore[arg-type]
        runner.start()
        fired: list[object] = []
        jobs = [runner.run(lambda n=n: n) for n in range(5)]
        failing = runner.run(lambda: 1 // 0)
        for job in jobs:
            job.addCallback(fired.append)
        failing.addErrback(lambda failure: fired.append(failure.type))
        runner.stop()
        self.assertEqual(len(reactor.calls), 1)
        self.assertEqual((runner.crossings, runner.handed), (1, 0))
        reactor.run_calls()
        self.assertEqual(fired, [0, 1, 2, 3, 4, ZeroDivisionError])
        self.assertEqual((runner.crossings, runner.handed), (1, 6))
        # Once handed over, the next result crosses on its own.
        reactor.calls.clear()
        runner.start()
        later = runner.run(lambda: "later")
        runner.stop()
        self.assertEqual(len(reactor.calls), 1)
        reactor.run_calls()
        self.assertEqual(self.successResultOf(later), "later")
        self.assertEqual((runner.crossings, runner.handed), (2, 7))

    def test_refuses_work_when_not_running(self) -> None:
        runner = ThreadRunner(_CallsFromThreads())  # type: ignore[arg-type]
        self.failureResultOf(runner.run(int), RuntimeError)
        runner.start()
        runner.stop()
        runner.stop()  # a second stop is harmless
        self.failureResultOf(runner.run(int), RuntimeError)


class AuditMigrationTests(SynchronousTestCase):
    """Version 3's audit table gains result and via; its rows keep their values."""

    def test_version_3_audit_is_migrated(self) -> None:
        engine = make_engine("sqlite:///:memory:")
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE TABLE audit (id INTEGER PRIMARY KEY, at FLOAT NOT NULL,"
                " who VARCHAR(128) NOT NULL, action VARCHAR(64) NOT NULL,"
                " target VARCHAR(255) NOT NULL, reason VARCHAR(255) NOT NULL)"
            )
            connection.exec_driver_sql(
                "INSERT INTO audit (at, who, action, target, reason)"
                " VALUES (1.0, 'ann', 'delivery.skip', 'delivery 1', 'stuck')"
            )
            ensure_schema(connection)
            # A message stored by version 3: no search keys yet.
            commit_inbound(connection, [inbound_record("OLD1", flows=("F1",))])
            connection.exec_driver_sql("DELETE FROM message_keys")
            connection.execute(
                update(schema.meta).where(schema.meta.c.key == "schema_version").values(value="3")
            )
        with engine.begin() as connection:
            self.assertEqual(ensure_schema(connection), schema.SCHEMA_VERSION)
            rows = connection.exec_driver_sql("SELECT who, action, result, via FROM audit").all()
            names = {i["name"] for i in inspect(connection).get_indexes("audit")}
            keys = connection.exec_driver_sql(
                "SELECT name, value FROM message_keys ORDER BY name"
            ).all()
        self.assertEqual([tuple(r) for r in rows], [("ann", "delivery.skip", "ok", "cli")])
        self.assertIn("audit_at", names)
        self.assertEqual(
            [tuple(k) for k in keys],
            [("flow", "F1"), ("msh9", "ADT^A04"), ("tenant", "t")],
        )


class CheckpointerTests(SynchronousTestCase):
    """A SQLite store's WAL is copied into the database file by a thread of its own,
    not by the commit that happens to fill it."""

    PAGE = 4096

    def write_pages(self, background: bool, pages: int) -> str:
        """A file database whose commits appended about ``pages`` pages to the WAL."""
        path = os.path.join(self.mktemp(), "store.db")
        engine = make_engine("sqlite:///" + path, background_checkpoints=background)
        self.addCleanup(engine.dispose)
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE t (body BLOB)")
        blob = b"x" * (self.PAGE * 8)
        for _ in range(pages // 8):
            with engine.begin() as connection:
                connection.exec_driver_sql("INSERT INTO t VALUES (?)", (blob,))
        return path

    def wal_pages(self, path: str) -> int:
        return os.path.getsize(path + "-wal") // self.PAGE

    def test_commits_leave_the_wal_to_the_checkpointer(self) -> None:
        # SQLite's default: the commit that passes 1,000 pages checkpoints, and the
        # WAL starts again from its beginning, so its file stays near 1,000 pages.
        self.assertLess(self.wal_pages(self.write_pages(False, 3000)), 1200)
        # With background checkpoints the commits only append.
        path = self.write_pages(True, 3000)
        self.assertGreater(self.wal_pages(path), 2900)
        checkpointer = Checkpointer(path)
        self.addCleanup(checkpointer.stop)
        answer = checkpointer.run_once()
        assert answer is not None
        busy, frames, copied = answer
        self.assertEqual(busy, 0)
        self.assertGreater(frames, 2900)
        self.assertEqual(copied, frames)
        # Nothing changed since: no second checkpoint.
        self.assertIsNone(checkpointer.run_once())
        self.assertEqual((checkpointer.checkpoints, checkpointer.failures), (1, 0))
        checkpointer.stop()  # closes its connection, thread or not
        self.assertIsNone(checkpointer._connection)

    def test_the_next_commit_starts_the_wal_again(self) -> None:
        path = self.write_pages(True, 400)
        checkpointer = Checkpointer(path)
        self.addCleanup(checkpointer.stop)
        checkpointer.run_once()
        engine = make_engine("sqlite:///" + path, background_checkpoints=True)
        self.addCleanup(engine.dispose)
        with engine.begin() as connection:
            connection.exec_driver_sql("INSERT INTO t VALUES (x'00')")
        answer = checkpointer.run_once()
        assert answer is not None
        self.assertEqual(answer[0], 0)
        self.assertLess(answer[1], 10, "the commit after a full checkpoint reuses the WAL")

    def test_no_wal_no_checkpoint(self) -> None:
        path = os.path.join(self.mktemp(), "none.db")
        self.assertIsNone(Checkpointer(path).run_once())

    def test_a_failed_checkpoint_is_counted_and_tried_again(self) -> None:
        # A database that cannot be opened (a directory), beside a WAL file.
        base = self.mktemp()
        path = os.path.join(base, "store.db")
        os.makedirs(path)
        with open(path + "-wal", "wb") as wal:
            wal.write(b"\0" * 32)
        checkpointer = Checkpointer(path)
        self.assertIsNone(checkpointer.run_once())
        self.assertIsNone(checkpointer.run_once())
        self.assertEqual((checkpointer.checkpoints, checkpointer.failures), (0, 2))
        self.flushLoggedErrors()

    def test_start_and_stop(self) -> None:
        path = self.write_pages(True, 80)
        checkpointer = Checkpointer(path, interval=3600)
        checkpointer.start()
        thread = checkpointer._thread
        assert thread is not None
        self.assertEqual(thread.name, "udsgateway-checkpoint")
        checkpointer.stop()  # does not wait for the interval
        self.assertFalse(thread.is_alive())
        checkpointer.stop()  # a second stop is harmless
