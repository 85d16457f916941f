"""One gateway per database, and the damage it can notice (docs/operations.md).

The lock file and its holder, the PostgreSQL advisory lock, the WAL checksum
reader, ``PRAGMA quick_check``, the database file's identity (deleted or
replaced under a running gateway) on a task.Clock timer and in the commit path.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import socket
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import OperationalError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.test_store_contract import POSTGRES_URL
from udsgateway.cli import main as cli
from udsgateway.config import GatewayConfig, TenantConfig
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.service import GatewayService
from udsgateway.store import inbound, logs
from udsgateway.store.engine import (
    AdvisoryLock,
    Database,
    DatabaseDamagedError,
    DatabaseInUseError,
    FileIdentity,
    FileLock,
    GroupCommitter,
    InlineRunner,
    SharedCommits,
    damage_before_command,
    damage_before_open,
    dead_peer_settings,
    ensure_schema,
    make_engine,
    quick_check,
    read_wal,
)
from udsgateway.store.records import CommitOutcome, LogEntry
from udsgateway.testing import inbound_record

#: An HL7 message of a synthetic person, for the service tests.
MESSAGE = (
    b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|202401011230||ADT^A04|{id}|P|2.3\r"
    b"PID|1||12345^^^Hospital||Testperson^Alex||19800101|M\r"
)


def _directory(testcase: SynchronousTestCase) -> Path:
    directory = Path(testcase.mktemp()).resolve()
    directory.mkdir(parents=True)
    return directory


class FileLockTests(SynchronousTestCase):
    """The ``<database>.lock`` flock: one holder, named to whoever else tries."""

    def test_second_holder_refused_with_the_first_named(self) -> None:
        """A second lock on the same database fails, naming the first holder's pid,
        host and start time; once the first releases it, it can be taken again."""
        database = str(_directory(self) / "gateway.db")
        first = FileLock.acquire(database, 1_700_000_000.0)
        self.addCleanup(first.release)
        with self.assertRaises(DatabaseInUseError) as refused:
            FileLock.acquire(database, 1_700_000_100.0)
        message = str(refused.exception)
        self.assertIn(f"pid {os.getpid()} on host {socket.gethostname()}", message)
        self.assertIn("since 2023-11-14T22:13:20Z", message)
        self.assertIn(database + ".lock", message)
        self.assertNotIn("\n", message)

        first.release()
        again = FileLock.acquire(database, 1_700_000_200.0)
        self.addCleanup(again.release)
        holder = Path(database + ".lock").read_text(encoding="utf-8")
        self.assertIn("since 2023-11-14T22:16:40Z", holder)
        self.assertEqual(os.stat(database + ".lock").st_mode & 0o777, 0o600)


class AdvisoryLockTests(SynchronousTestCase):
    """PostgreSQL: a session-level advisory lock, one holder per database."""

    def setUp(self) -> None:
        self.engines = [create_engine(POSTGRES_URL) for _ in range(2)]
        for engine in self.engines:
            self.addCleanup(engine.dispose)
        try:
            with self.engines[0].connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as error:
            if os.environ.get("CI"):
                raise
            raise SkipTest(f"no PostgreSQL at {POSTGRES_URL}: {type(error).__name__}") from None
        # A key of this test's own: other tests (and gateways) on the server keep theirs.
        self.key = random.randrange(1 << 20, 1 << 30)

    def test_second_holder_refused_with_the_first_named(self) -> None:
        """A second gateway's advisory lock on the same database fails and names the
        first (pid and host through its application_name); released, it is free."""
        first = AdvisoryLock.acquire(self.engines[0], 1_700_000_000.0, key=self.key)
        self.addCleanup(first.release)
        with self.assertRaises(DatabaseInUseError) as refused:
            AdvisoryLock.acquire(self.engines[1], 1_700_000_000.0, key=self.key)
        self.assertIn(f"pid {os.getpid()} on host", str(refused.exception))
        first.release()
        again = AdvisoryLock.acquire(self.engines[1], 1_700_000_000.0, key=self.key)
        again.release()

    def test_cluster_nodes_share_it_a_single_gateway_does_not(self) -> None:
        """Cluster nodes take the lock shared: together, but never beside a single
        gateway, which is refused naming "the nodes of a cluster"; and a node is
        refused beside a single gateway."""
        self.engines.append(create_engine(POSTGRES_URL))
        self.addCleanup(self.engines[2].dispose)
        nodes = [
            AdvisoryLock.acquire(engine, 1_700_000_000.0, key=self.key, shared=True)
            for engine in self.engines[:2]
        ]
        for node in nodes:
            self.addCleanup(node.release)
        with self.assertRaises(DatabaseInUseError) as refused:
            AdvisoryLock.acquire(self.engines[2], 1_700_000_000.0, key=self.key)
        self.assertIn("in use by another gateway: the nodes of a cluster", str(refused.exception))
        for node in nodes:
            node.release()
        single = AdvisoryLock.acquire(self.engines[2], 1_700_000_000.0, key=self.key)
        self.addCleanup(single.release)
        with self.assertRaises(DatabaseInUseError) as refused:
            AdvisoryLock.acquire(self.engines[0], 1_700_000_000.0, key=self.key, shared=True)
        self.assertNotIn("cluster", str(refused.exception))


def _wal_snapshot(directory: Path, rows: int) -> Path:
    """A database whose last ``rows`` commits are only in its WAL, as a kill -9 leaves it.

    The files are copied while the writing connection is still open (its close
    would checkpoint the WAL into the database and delete it).
    """
    live = directory / "live.db"
    with closing(sqlite3.connect(live, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA wal_autocheckpoint=0")
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        for index in range(rows):
            connection.execute("INSERT INTO t (body) VALUES (?)", (bytes([index]) * 3000,))
        copy = directory / "copy.db"
        shutil.copyfile(live, copy)
        shutil.copyfile(str(live) + "-wal", str(copy) + "-wal")
    return copy


def _rows(database: Path) -> int:
    with closing(sqlite3.connect(database)) as connection:
        return int(connection.execute("SELECT count(*) FROM t").fetchone()[0])


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


class DeadPeerSettingsTests(SynchronousTestCase):
    """A cluster node's sessions carry the settings that keep a dead or frozen peer
    from stalling it (fractions of the lease time)."""

    def node_connection(self) -> Connection:
        """A connection as a cluster node opens it (lease 6 s); skipped without PostgreSQL
        except in CI."""
        engine = make_engine(POSTGRES_URL, dead_peer_settings(6.0))
        self.addCleanup(engine.dispose)
        try:
            return engine.connect()
        except Exception as error:
            if os.environ.get("CI"):
                raise
            raise SkipTest(f"no PostgreSQL at {POSTGRES_URL}: {type(error).__name__}") from None

    def test_a_nodes_sessions_have_them(self) -> None:
        connection = self.node_connection()
        with connection:
            shown = {
                name: connection.execute(text(f"SHOW {name}")).scalar()
                for name in (
                    "lock_timeout",
                    "idle_in_transaction_session_timeout",
                    "tcp_user_timeout",
                    "tcp_keepalives_idle",
                )
            }
        self.assertEqual(
            shown,
            {
                "lock_timeout": "1s",
                "idle_in_transaction_session_timeout": "2s",
                "tcp_user_timeout": "3000",
                "tcp_keepalives_idle": "2",
            },
        )

    def test_executemany_runs_no_pipeline(self) -> None:
        """A node's executemany runs one statement per round trip: between two rows its
        session is idle in the transaction, so a node frozen there is ended by the
        idle-in-transaction timeout instead of holding its locks (a pipeline is not
        "idle" until its Sync)."""
        import psycopg

        connection = self.node_connection()

        def no_pipelines(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("executemany entered a pipeline")

        self.patch(psycopg.Connection, "pipeline", no_pipelines)
        self.patch(psycopg.Connection, "_pipeline_nolock", no_pipelines)
        with connection:
            connection.execute(text("CREATE TEMPORARY TABLE rows_here (id int, value int)"))
            connection.execute(text("INSERT INTO rows_here VALUES (1, 0), (2, 0), (3, 0)"))
            cursor = connection.connection.cursor()
            cursor.executemany(
                "UPDATE rows_here SET value = %s WHERE id = %s", [(10, 1), (20, 2), (30, 3)]
            )
            self.assertEqual(cursor.rowcount, 3)
            cursor.close()
            values = connection.execute(text("SELECT value FROM rows_here ORDER BY id")).all()
            self.assertEqual([row[0] for row in values], [10, 20, 30])

    def test_scaled_by_the_lease(self) -> None:
        settings = dead_peer_settings(15.0)
        self.assertIn("-c lock_timeout=2500ms", settings["options"])
        self.assertIn("-c idle_in_transaction_session_timeout=5000ms", settings["options"])
        self.assertEqual((settings["keepalives_idle"], settings["tcp_user_timeout"]), (5, 7500))


class WalTests(SynchronousTestCase):
    """The WAL reader finds the frames SQLite would silently drop."""

    def test_intact_wal(self) -> None:
        """An intact WAL: every frame is replayed, nothing is reported."""
        database = _wal_snapshot(_directory(self), 20)
        report = read_wal(str(database) + "-wal")
        assert report is not None
        self.assertGreater(report.frames, 20)
        self.assertEqual(
            (report.applied, report.bad_frame, report.damaged), (report.frames, None, False)
        )
        self.assertEqual(damage_before_open(f"sqlite:///{database}"), [])
        self.assertEqual(_rows(database), 20)

    def test_flipped_frame(self) -> None:
        """A byte flipped in a frame's page: the committed transactions after it are
        reported, and SQLite indeed drops (at least) those rows."""
        database = _wal_snapshot(_directory(self), 20)
        wal = Path(str(database) + "-wal")
        page_size = int.from_bytes(wal.read_bytes()[8:12], "big")
        frame = 5
        _flip(wal, 32 + (frame - 1) * (24 + page_size) + 24 + 100)
        report = read_wal(str(wal))
        assert report is not None
        self.assertEqual(report.bad_frame, frame)
        self.assertLess(report.applied, frame)
        self.assertTrue(report.damaged)
        self.assertGreater(report.commits_lost, 10)
        [problem] = damage_before_open(f"sqlite:///{database}")
        self.assertIn(f"frame {frame} of {report.frames} fails its checksum", problem)
        self.assertIn(f"with {report.commits_lost} committed transactions", problem)
        self.assertIn("would be lost", problem)
        # What SQLite makes of it: the transactions from the bad frame on are gone.
        self.assertLessEqual(_rows(database), 20 - report.commits_lost)

    def test_torn_last_frame(self) -> None:
        """The last frame failing its checksum, no commit after it (a crash or power
        loss while a transaction was written, never acknowledged): not damage."""
        database = _wal_snapshot(_directory(self), 5)
        wal = Path(str(database) + "-wal")
        _flip(wal, wal.stat().st_size - 10)
        report = read_wal(str(wal))
        assert report is not None
        self.assertEqual(report.bad_frame, report.frames)
        self.assertFalse(report.damaged)
        self.assertEqual(damage_before_open(f"sqlite:///{database}"), [])

    def test_flipped_header(self) -> None:
        """A byte flipped in the WAL header: SQLite ignores the whole WAL; reported."""
        database = _wal_snapshot(_directory(self), 5)
        _flip(Path(str(database) + "-wal"), 20)
        [problem] = damage_before_open(f"sqlite:///{database}")
        self.assertIn("WAL header fails its checksum", problem)

    def test_no_wal(self) -> None:
        """No WAL file (a clean stop): nothing to report."""
        self.assertIsNone(read_wal(str(_directory(self) / "none.db-wal")))
        self.assertEqual(damage_before_open("sqlite:///:memory:"), [])


class QuickCheckTests(SynchronousTestCase):
    """``PRAGMA quick_check`` at start."""

    def test_consistent_and_corrupt(self) -> None:
        """A consistent database passes; one with a b-tree page overwritten fails."""
        directory = _directory(self)
        path = directory / "q.db"
        with closing(sqlite3.connect(path, isolation_level=None)) as connection:
            connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
            connection.execute("CREATE INDEX t_body ON t (body)")
            for index in range(300):
                connection.execute("INSERT INTO t (body) VALUES (?)", (f"row {index}" * 20,))
        engine = make_engine(f"sqlite:///{path}")
        self.addCleanup(engine.dispose)
        with engine.connect() as connection:
            self.assertEqual(quick_check(connection), [])
        engine.dispose()
        # Overwrite the b-tree page header of page 3 (a page of the table or index).
        with path.open("r+b") as file:
            file.seek(2 * 4096)
            file.write(b"\x0d" + b"\xff" * 7)
        with engine.connect() as connection:
            problems = quick_check(connection)
        self.assertTrue(problems)
        self.assertTrue(all(p.startswith("PRAGMA quick_check: ") for p in problems))


class FileIdentityTests(SynchronousTestCase):
    """The database file is still the one opened at start."""

    def setUp(self) -> None:
        self.path = _directory(self) / "gateway.db"
        self.path.write_bytes(b"")
        self.reasons: list[str] = []
        self.identity = FileIdentity(str(self.path), on_damage=self.reasons.append)
        self.identity.watch()
        self.addCleanup(self.identity.close)

    def test_unchanged(self) -> None:
        """The same file at the path: no problem, ``ensure`` passes."""
        self.assertIsNone(self.identity.check())
        self.identity.ensure()
        self.assertEqual(self.reasons, [])

    def test_deleted(self) -> None:
        """The file deleted: reported once, and remembered after it comes back."""
        self.path.unlink()
        self.assertIn("was deleted", self.identity.check() or "")
        self.path.write_bytes(b"")  # a new, empty file at the path does not heal it
        self.assertIn("was deleted", self.identity.check() or "")
        self.assertRaises(DatabaseDamagedError, self.identity.ensure)
        self.assertEqual(len(self.reasons), 1)

    def test_replaced(self) -> None:
        """Another file renamed over the path: reported as replaced."""
        other = self.path.with_name("other.db")
        other.write_bytes(b"")
        other.rename(self.path)
        self.assertIn("was replaced", self.identity.check() or "")


class GuardedCommitTests(SynchronousTestCase):
    """The group commit's guard: a refused group is rolled back and fails."""

    def test_guard_rolls_back(self) -> None:
        """When the guard raises, the group's messages are not stored, each of them
        gets the failure (a NAK, never an AA), and on_damaged hears the reason."""
        database = Database(make_engine("sqlite:///:memory:"), InlineRunner())
        database.transaction_now(ensure_schema)
        damaged: list[str] = []

        def guard() -> None:
            raise DatabaseDamagedError("database file x was deleted while the gateway ran")

        committer = GroupCommitter(
            database, inbound.commit_inbound, guard=guard, on_damaged=damaged.append
        )
        failure = self.failureResultOf(committer.submit(inbound_record("G1")))
        failure.trap(DatabaseDamagedError)
        self.assertEqual(damaged, ["database file x was deleted while the gateway ran"])
        stored = database.transaction_now(
            lambda connection: connection.execute(text("SELECT count(*) FROM messages")).scalar()
        )
        self.assertEqual(stored, 0)


class _CountingRunner(InlineRunner):
    """Runs database functions at once, counting the calls (one per transaction)."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, function: Any, *args: Any) -> Any:
        self.calls += 1
        return super().run(function, *args)


def _note(connection: Connection, texts: list[str]) -> list[str]:
    """A second committer's batch: log lines (the table the outcome record writes)."""
    logs.insert_logs(connection, [LogEntry(at=1.0, event="test", reason=t) for t in texts])
    return texts


def _failing(connection: Connection, texts: list[str]) -> list[str]:
    logs.insert_logs(connection, [LogEntry(at=1.0, event="test", reason=t) for t in texts])
    raise RuntimeError("a bug in this group")


class SharedCommitsTests(SynchronousTestCase):
    """Two committers' groups in one transaction, each in its savepoint."""

    def setUp(self) -> None:
        self.runner = _CountingRunner()
        self.database = Database(make_engine("sqlite:///:memory:"), self.runner)
        self.database.transaction_now(ensure_schema)
        self.clock = Clock()
        self.shared = SharedCommits(self.database, clock=self.clock)

    def count(self, table: str) -> int:
        return int(
            self.database.transaction_now(
                lambda connection: connection.execute(
                    text(f"SELECT count(*) FROM {table}")
                ).scalar()
            )
        )

    def join(self, batch: Any, **options: Any) -> GroupCommitter[Any, Any]:
        committer: GroupCommitter[Any, Any] = GroupCommitter(self.database, batch, **options)
        self.shared.join(committer)
        return committer

    def test_one_transaction_for_both(self) -> None:
        """Items of two committers pending at the end of the turn are committed in one
        transaction, and each item gets its own committer's result."""
        messages = self.join(inbound.commit_inbound)
        notes = self.join(_note)
        stored = messages.submit(inbound_record("S1"))
        noted = [notes.submit("first"), notes.submit("second")]
        self.assertTrue(messages.busy and notes.busy)
        self.assertEqual(self.runner.calls, 0)
        self.clock.advance(0)
        self.assertEqual(
            (self.runner.calls, self.shared.transactions, self.shared.joined), (1, 1, 1)
        )
        self.assertEqual(self.successResultOf(stored).outcome, CommitOutcome.STORED)
        self.assertEqual([self.successResultOf(d) for d in noted], ["first", "second"])
        self.assertEqual((self.count("messages"), self.count("logs")), (1, 3))
        self.assertFalse(messages.busy or notes.busy)
        self.assertEqual((messages.committed, notes.committed), (1, 2))

    def test_busy_is_per_member(self) -> None:
        """A member is busy while a group of its own is due or committing, not while
        another member's transaction runs alone (the ingest folds on its own groups)."""
        messages = self.join(inbound.commit_inbound)
        notes = self.join(_note)
        seen: list[tuple[bool, bool]] = []
        done = notes.submit("alone")
        done.addCallback(lambda _: seen.append((messages.busy, notes.busy)))
        self.assertEqual((messages.busy, notes.busy, self.shared.busy), (False, True, True))
        self.clock.advance(0)
        # During its own callbacks a member is still busy, as a lone committer is.
        self.assertEqual(seen, [(False, True)])
        self.assertEqual((messages.busy, notes.busy, self.shared.busy), (False, False, False))

    def test_one_member_pending_runs_alone(self) -> None:
        """With one committer pending, the transaction is its own (no savepoint)."""
        self.join(inbound.commit_inbound)
        notes = self.join(_note)
        done = notes.submit("alone")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(done), "alone")
        self.assertEqual((self.shared.transactions, self.shared.joined), (1, 0))

    def test_a_failing_group_fails_alone(self) -> None:
        """A group that raises is rolled back to its savepoint: its items fail, its
        rows are gone, and the other committer's group commits."""
        messages = self.join(inbound.commit_inbound)
        broken = self.join(_failing)
        stored = messages.submit(inbound_record("S2"))
        failed = broken.submit("lost")
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(stored).outcome, CommitOutcome.STORED)
        self.failureResultOf(failed, RuntimeError)
        self.assertEqual(self.count("messages"), 1)
        # The failing group's log line was rolled back; the stored message's stays.
        self.assertEqual(self.count("logs"), 1)
        self.flushLoggedErrors(RuntimeError)

    def test_a_driver_error_fails_as_sqlalchemy_would(self) -> None:
        """A driver error inside a savepoint reaches the caller as SQLAlchemy's error
        (as it would from a transaction of its own), and the next transaction works."""

        def bad_sql(connection: Connection, items: list[str]) -> list[str]:
            cursor = connection.connection.cursor()
            cursor.execute("INSERT INTO no_such_table VALUES (1)")
            return items

        messages = self.join(inbound.commit_inbound)
        broken = self.join(bad_sql)
        stored = messages.submit(inbound_record("S3"))
        failed = broken.submit("x")
        self.clock.advance(0)
        self.failureResultOf(failed, OperationalError)
        self.assertEqual(self.successResultOf(stored).outcome, CommitOutcome.STORED)
        again = messages.submit(inbound_record("S4"))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(again).outcome, CommitOutcome.STORED)

    def test_guard_refusal_fails_every_group(self) -> None:
        """The guard runs once after every group's SQL; its refusal rolls the whole
        transaction back and fails the items of every member."""
        damaged: list[str] = []
        calls: list[int] = []

        def guard() -> None:
            calls.append(1)
            raise DatabaseDamagedError("database file x was deleted while the gateway ran")

        messages = self.join(inbound.commit_inbound, guard=guard, on_damaged=damaged.append)
        notes = self.join(_note)
        stored = messages.submit(inbound_record("S5"))
        noted = notes.submit("refused")
        self.clock.advance(0)
        self.failureResultOf(stored, DatabaseDamagedError)
        self.failureResultOf(noted, DatabaseDamagedError)
        self.assertEqual((len(calls), len(damaged)), (1, 1))
        self.assertEqual((self.count("messages"), self.count("logs")), (0, 0))

    def test_items_submitted_by_callbacks_go_in_the_next_transaction(self) -> None:
        """An item submitted while the results are handed back waits for that hand-back
        to end, then commits in the next transaction."""
        messages = self.join(inbound.commit_inbound)
        notes = self.join(_note)
        later: list[Any] = []
        first = messages.submit(inbound_record("S6"))

        def submit_another(result: Any) -> Any:
            later.append(notes.submit("after"))
            return result

        first.addCallback(submit_another)
        self.clock.advance(0)
        self.assertEqual(self.runner.calls, 2)
        self.assertEqual(self.successResultOf(later[0]), "after")

    def test_join_checks(self) -> None:
        """A committer on another database, or one already in use, cannot join."""
        other = Database(make_engine("sqlite:///:memory:"), InlineRunner())
        with self.assertRaises(ValueError):
            self.shared.join(GroupCommitter(other, _note))
        used: GroupCommitter[Any, Any] = GroupCommitter(self.database, _note, clock=self.clock)
        used.submit("pending")
        with self.assertRaises(ValueError):
            self.shared.join(used)
        joined = self.join(_note)
        with self.assertRaises(ValueError):
            self.shared.join(joined)


class ServiceIdentityTests(SynchronousTestCase):
    """GatewayService: the identity timer on the reactor's clock, and the NAKs after."""

    def setUp(self) -> None:
        self.path = _directory(self) / "gateway.db"
        url = f"sqlite:///{self.path}"
        self.reactor = MemoryReactorClock()
        database = Database(make_engine(url), InlineRunner())
        self.addCleanup(database.engine.dispose)
        self.addCleanup(database.close)
        config = GatewayConfig(
            path="test.toml",
            database=url,
            database_check_interval=2.0,
            tenants=(TenantConfig(name="demo", listen="tcp:0"),),
        )
        self.service = GatewayService(
            config,
            self.reactor,
            database,
            ControlIdSource(prefix="T"),
            wall=lambda: 1_700_000_000.0,
            identity=FileIdentity(str(self.path)),
        )
        self.events: list[LogEvent] = []
        observer: ILogObserver = self.events.append  # type: ignore[assignment]
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.service.startService()
        self.successResultOf(self.service.ready)
        self.addCleanup(self.service.stopService)

    def _critical(self) -> list[LogEvent]:
        return [e for e in self.events if e["log_level"].name == "critical"]

    def test_timer_notices_a_deleted_file(self) -> None:
        """The database file deleted: within one check interval readiness goes false
        and one critical log line names the reason (no message content)."""
        self.assertTrue(self.service.accepting)
        self.reactor.advance(2.0)
        self.assertTrue(self.service.accepting)
        os.unlink(self.path)
        self.reactor.advance(1.9)
        self.assertTrue(self.service.accepting)
        self.reactor.advance(0.1)
        self.assertFalse(self.service.accepting)
        self.assertIn("was deleted", self.service.database_damage or "")
        self.reactor.advance(10.0)
        [event] = self._critical()
        self.assertIn("was deleted", event["problem"])

    def test_commit_path_naks_before_the_timer(self) -> None:
        """A message right after the file was deleted, before the timer runs: NAK
        (AR, ERR 207) and not stored; readiness false; the next message too."""
        ingest = self.service.ingests["demo"]
        os.unlink(self.path)
        for control_id in ("DEL1", "DEL2"):
            answering = ingest.handle(MESSAGE.replace(b"{id}", control_id.encode()), "peer", "tcp")
            self.reactor.advance(0)  # the group commit starts at the end of the turn
            answer = self.successResultOf(answering)
            assert answer.data is not None
            self.assertIn(b"MSA|AR|" + control_id.encode(), answer.data)
            self.assertIn(b"ERR|", answer.data)
            self.assertIn(b"207", answer.data.split(b"ERR|", 1)[1])
        self.assertFalse(self.service.accepting)
        self.assertEqual(len(self._critical()), 1)
        self.assertEqual(ingest.stats.stored, 0)


class CommandCheckTests(SynchronousTestCase):
    """``udsgateway`` commands leave a damaged WAL alone."""

    def test_damaged_wal_refused_unless_a_gateway_holds_it(self) -> None:
        """With no gateway running, a command on a database with a damaged WAL is
        refused (exit 2) and the WAL stays as it was; while a gateway holds the
        lock, its live WAL is not read (the gateway checked it at its start)."""
        directory = _directory(self)
        database = _wal_snapshot(directory, 20)
        wal = Path(str(database) + "-wal")
        _flip(wal, 32 + 24 + 10)
        damaged = wal.read_bytes()
        config = directory / "gateway.toml"
        config.write_text(
            f'[gateway]\ndatabase = "sqlite:///{database}"\n\n'
            '[[tenants]]\nname = "demo"\nlisten = "tcp:0"\n',
            encoding="utf-8",
        )
        errors = io.StringIO()
        self.patch(sys, "stderr", errors)
        status = cli.main(["--config", str(config), "flows", "list"], io.StringIO())
        self.assertEqual(status, 2)
        self.assertIn("the database cannot be trusted", errors.getvalue())
        self.assertIn("fails its checksum", errors.getvalue())
        self.assertEqual(wal.read_bytes(), damaged)

        url = f"sqlite:///{database}"
        self.assertTrue(damage_before_command(url, 0.0))
        held = FileLock.acquire(str(database), 0.0)
        self.addCleanup(held.release)
        self.assertEqual(damage_before_command(url, 0.0), [])
