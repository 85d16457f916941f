"""One contract for the store, run against SQLite and against a real PostgreSQL.

The SQL is dialect-neutral (docs/operations.md "PostgreSQL"): the same functions must
behave the same on both. The PostgreSQL run uses the server of the machine
(127.0.0.1:5432, database ``test``, or ``UDSGATEWAY_TEST_POSTGRES``) in a
schema of its own that it drops afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, text
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from udsgateway import flowstore
from udsgateway.flows import new_id
from udsgateway.store import (
    apps,
    audit,
    executions,
    inbound,
    logs,
    messages,
    operator,
    outbox,
    retention,
)
from udsgateway.store.engine import Database, InlineRunner, ensure_schema, is_locked, make_engine
from udsgateway.store.records import (
    CommitOutcome,
    LogEntry,
    StoredApp,
    StoredFlow,
    Transition,
)
from udsgateway.testing import demo_app, inbound_record

POSTGRES_URL = os.environ.get(
    "UDSGATEWAY_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def stored_flow(flow_id: str) -> StoredFlow:
    """A flow as the store keeps it, with no actions."""
    return StoredFlow(
        flow_id,
        "a flow",
        True,
        "",
        "mllp",
        "ADT^A04",
        "",
        "on_commit",
        30.0,
        "after_actions",
        "[]",
    )


def throwaway_schema_engine(test: SynchronousTestCase) -> Engine:
    """An engine on PostgreSQL whose connections work in a schema of their own, as a
    deployment would in its own database; the schema is dropped at ``test``'s cleanup.
    SkipTest without PostgreSQL, except under CI, where that is an error."""
    schema = f"udsgw_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as error:
        if os.environ.get("CI"):
            raise
        raise SkipTest(f"no PostgreSQL at {POSTGRES_URL}: {type(error).__name__}") from None
    engine = create_engine(POSTGRES_URL, connect_args={"options": f"-c search_path={schema}"})

    def drop() -> None:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    test.addCleanup(drop)
    return engine


if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


class StoreContract(_Base):
    """The behaviour every dialect must show; mixed into one TestCase per dialect."""

    engine: Engine
    database: Database

    def open_database(self) -> None:
        """The production transaction path (Database.transaction_now) on ``engine``."""
        self.database = Database(self.engine, InlineRunner())
        self.addCleanup(self.database.close)
        self.transaction(ensure_schema)

    def transaction(self, function: Callable[..., Any], *args: Any) -> Any:
        return self.database.transaction_now(function, *args)

    def test_failed_transaction_rolls_back(self) -> None:
        """A function that fails after its inserts leaves nothing behind; the next one works."""

        def store_then_fail(connection: Any) -> None:
            inbound.commit_inbound(connection, [inbound_record("R1", flows=("F1",))])
            raise RuntimeError("after the insert")

        self.assertRaises(RuntimeError, self.transaction, store_then_fail)
        self.assertEqual(self.transaction(messages.find_messages, "t", None), [])
        [result] = self.transaction(inbound.commit_inbound, [inbound_record("R1")])
        self.assertEqual(result.outcome, CommitOutcome.STORED)

    def test_core_statements_join_the_transaction(self) -> None:
        """SQLAlchemy statements and driver-level statements commit or roll back together."""
        app = demo_app(tenant="t")

        def both(connection: Any, fail: bool) -> None:
            flowstore.save_app(connection, app, 1.0)  # SQLAlchemy Core
            inbound.commit_inbound(connection, [inbound_record("J1")])  # driver statements
            if fail:
                raise RuntimeError("roll both back")

        self.assertRaises(RuntimeError, self.transaction, both, True)
        self.assertEqual(self.transaction(flowstore.load_apps, "t"), [])
        self.assertEqual(self.transaction(messages.find_messages, "t", None), [])
        self.transaction(both, False)
        self.assertEqual(len(self.transaction(flowstore.load_apps, "t")), 1)
        self.assertEqual(len(self.transaction(messages.find_messages, "t", None)), 1)

    def test_group_larger_than_one_statement(self) -> None:
        """A group of more rows than one multi-row statement holds keeps ids and order."""
        records = [inbound_record(f"B{i:03d}", flows=("F1",)) for i in range(150)]
        results = self.transaction(inbound.commit_inbound, records)
        ids = [r.message_id for r in results]
        self.assertEqual(ids, list(range(ids[0], ids[0] + 150)))
        stored = self.transaction(messages.find_messages, "t", None, 1000)
        self.assertEqual([m.id for m in stored], ids)
        self.assertEqual([m.control_id for m in stored], [r.control_id for r in records])

    def test_commit_then_duplicate_replays(self) -> None:
        """A stored message's resend replays its ACK; other bytes under its MSH-10 conflict."""
        [first] = self.transaction(inbound.commit_inbound, [inbound_record("A1")])
        self.assertEqual(first.outcome, CommitOutcome.STORED)
        again, other = self.transaction(
            inbound.commit_inbound, [inbound_record("A1"), inbound_record("A1", b"PID|2")]
        )
        self.assertEqual((again.outcome, again.ack), (CommitOutcome.REPLAY, b"ACK A1"))
        self.assertEqual(other.outcome, CommitOutcome.CONFLICT)
        self.assertEqual(len(self.transaction(messages.find_messages, "t", "A1")), 1)

    def test_group_keeps_order_and_makes_executions(self) -> None:
        """A group stores its messages in order with one execution per flow with actions."""
        results = self.transaction(
            inbound.commit_inbound, [inbound_record(f"G{i}", flows=("F1", "F2")) for i in range(5)]
        )
        ids = [r.message_id for r in results]
        self.assertEqual(ids, sorted(ids))
        self.assertTrue(all(len(r.execution_ids) == 2 for r in results))
        stored = self.transaction(messages.find_messages, "t", None)
        self.assertEqual([m.control_id for m in stored], [f"G{i}" for i in range(5)])

    def test_origins_of_many_executions(self) -> None:
        """Each execution's flow, message and step come back, across query chunks."""
        records = [inbound_record(f"O{i:03d}", flows=("F1",)) for i in range(70)]
        results = self.transaction(inbound.commit_inbound, records)
        wanted = {
            r.execution_ids[0]: (r.message_id, rec.control_id)
            for r, rec in zip(results, records, strict=True)
        }
        found = self.transaction(messages.origins, [*wanted, *wanted, 10**9])
        self.assertEqual(set(found), set(wanted))
        for execution_id, (message_id, control_id) in wanted.items():
            origin = found[execution_id]
            self.assertEqual(
                (origin.flow_id, origin.message_id, origin.control_id, origin.tenant, origin.step),
                ("F1", message_id, control_id, "t", 0),
            )

    def test_pending_ack_until_updated(self) -> None:
        """An "after actions" message is stored without an ACK; a resend reads as pending
        until update_ack stores the one finally sent; its executions can be read."""
        from attrs import evolve

        pending = evolve(inbound_record("W1", flows=("F1", "F2")), ack_pending=True)
        [stored] = self.transaction(inbound.commit_inbound, [pending])
        [again] = self.transaction(inbound.commit_inbound, [pending])
        self.assertEqual(
            (again.outcome, again.message_id, again.ack, again.ack_pending),
            (CommitOutcome.REPLAY, stored.message_id, b"", True),
        )
        states = self.transaction(executions.execution_states, stored.message_id)
        self.assertEqual(
            [(s.id, s.flow_id, s.state) for s in states],
            list(zip(stored.execution_ids, ("F1", "F2"), ("pending", "pending"), strict=True)),
        )
        self.transaction(messages.update_ack, stored.message_id, "AA", b"ACK W1 final")
        [final] = self.transaction(inbound.commit_inbound, [pending])
        self.assertEqual((final.ack, final.ack_pending), (b"ACK W1 final", False))

    def test_folded_first_actions_are_enqueued_with_the_message(self) -> None:
        """The inbound commit enqueues the first actions rendered before it, in
        creation order, with their executions waiting; a flow with an execution
        pending at step 0 is not folded."""
        from attrs import evolve

        def action(control_id: str) -> outbox.NewDelivery:
            return outbox.NewDelivery("F1/0", "tcp:host=h:port=1", "mllp", control_id, b"M", {})

        [pending] = self.transaction(inbound.commit_inbound, [inbound_record("P1", flows=("F2",))])
        results = self.transaction(
            inbound.commit_inbound,
            [
                evolve(
                    inbound_record(f"D{i}", flows=("F1", "F2")),
                    first=(action(f"O{i}"), action("X")),
                )
                for i in range(3)
            ],
        )
        self.assertTrue(pending.pending)
        for index, result in enumerate(results):
            ((_delivery_id, delivery),) = result.enqueued
            self.assertEqual(
                (delivery.execution_id, delivery.control_id, result.pending),
                (result.execution_ids[0], f"O{index}", True),
            )
        ids = [result.enqueued[0][0] for result in results]
        self.assertEqual(ids, sorted(ids))
        page = self.transaction(outbox.lane_page, "F1/0", 0, 10)
        self.assertEqual([d.control_id for d in page], ["O0", "O1", "O2"])
        states = self.transaction(executions.execution_states, results[0].message_id)
        self.assertEqual(
            [(s.flow_id, s.state) for s in states], [("F1", "waiting"), ("F2", "pending")]
        )

    def test_lane_order_and_settlement(self) -> None:
        """Deliveries come back in lane order; recorded outcomes are stored with the reply."""
        items = [
            outbox.NewDelivery("L1", "tcp:host=h:port=1", "mllp", f"C{i}", b"MSH|x", {})
            for i in range(3)
        ]
        ids = self.transaction(outbox.enqueue, items, 5.0)
        self.assertEqual(ids, sorted(ids))
        page = self.transaction(outbox.lane_page, "L1", 0, 10)
        self.assertEqual([d.control_id for d in page], ["C0", "C1", "C2"])
        settlement = outbox.Settlement(ids[0], outbox.DELIVERED, 1, 0.0, "", b"MSA|AA|C0", "AA")
        self.transaction(outbox.record, [settlement], 6.0)
        page = self.transaction(outbox.lane_page, "L1", 0, 10)
        self.assertEqual([d.control_id for d in page], ["C1", "C2"])
        done = self.transaction(outbox.get_delivery, ids[0])
        self.assertEqual((done.state, done.response_code), ("delivered", "AA"))
        work = self.transaction(outbox.lanes_with_work)
        self.assertEqual([(w.lane, w.open) for w in work], [("L1", 2)])

    def test_prune_keeps_unfinished_work(self) -> None:
        """Retention deletes old finished messages only."""
        self.transaction(
            inbound.commit_inbound, [inbound_record("P1"), inbound_record("P2", flows=("F",))]
        )
        deleted = self.transaction(retention.prune, 2000.0, 100)
        self.assertEqual(deleted, 1)
        left = [m.control_id for m in self.transaction(messages.find_messages, "t", None)]
        self.assertEqual(left, ["P2"])

    # -- the log query (``udsgateway logs``)

    def test_log_lines_filter_and_order(self) -> None:
        """Lines after an id, oldest or newest first, by flow, outcome and time; a line
        without an App ID shows its flow's as stored now."""
        stored = self.transaction(
            apps.save_app,
            StoredApp("APPLOG0001", "t", "logs app", "", {}, (stored_flow("FLWLOG0001"),)),
            1.0,
            new_id,
        )
        self.assertEqual(stored.flows[0].flow_id, "FLWLOG0001")
        entries = [
            LogEntry(at=100.0, event="received", outcome="accepted", flow_id="FLWLOG0001"),
            LogEntry(at=200.0, event="delivery", outcome="retry", flow_id="FLWLOG0001", attempt=1),
            LogEntry(
                at=300.0, event="delivery", outcome="held", flow_id="FLWGONE001", app_id="APPX"
            ),
            LogEntry(at=400.0, event="execution", outcome="done", flow_id="FLWLOG0001", step=0),
            LogEntry(at=500.0, event="custom", outcome="newword", reason="r" * 300),
        ]
        self.transaction(logs.insert_logs, entries)
        lines = self.transaction(logs.log_lines)
        self.assertEqual([line.at for line in lines], [100.0, 200.0, 300.0, 400.0, 500.0])
        ids = [line.id for line in lines]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(
            [line.app_id for line in lines], ["APPLOG0001", "APPLOG0001", "APPX", "APPLOG0001", ""]
        )
        self.assertEqual((lines[1].attempt, lines[1].step), (1, None))
        self.assertEqual((lines[3].attempt, lines[3].step), (None, 0))
        self.assertEqual(len(lines[4].reason), 255)

        newest = self.transaction(logs.log_lines, None, None, None, 0, 2, True)
        self.assertEqual([line.at for line in newest], [500.0, 400.0])
        after = self.transaction(logs.log_lines, None, None, None, ids[2], 10)
        self.assertEqual([line.at for line in after], [400.0, 500.0])
        by_flow = self.transaction(logs.log_lines, "FLWLOG0001")
        self.assertEqual([line.at for line in by_flow], [100.0, 200.0, 400.0])
        held = self.transaction(logs.log_lines, None, "held")
        self.assertEqual([line.at for line in held], [300.0])
        since = self.transaction(logs.log_lines, "FLWLOG0001", None, 200.0)
        self.assertEqual([line.at for line in since], [200.0, 400.0])
        known = self.transaction(logs.known_outcomes)
        self.assertIn("newword", known)
        self.assertTrue(set(logs.LOG_OUTCOMES) <= known)

    # -- operators' actions

    def held_delivery(self, control_id: str = "H1") -> tuple[int, int]:
        """A delivery of an execution, held after one attempt: (delivery id, execution id)."""
        from attrs import evolve

        first = outbox.NewDelivery("F1/0", "tcp:host=h:port=1", "mllp", control_id, b"MSH", {})
        [result] = self.transaction(
            inbound.commit_inbound,
            [evolve(inbound_record(control_id, flows=("F1",)), first=(first,))],
        )
        ((delivery_id, delivery),) = result.enqueued
        assert delivery.execution_id is not None
        held = outbox.Settlement(
            delivery_id, outbox.HELD, 1, 0.0, "AR from the destination", None, "AR",
            delivery.execution_id, 0, control_id,
        )  # fmt: skip
        self.transaction(outbox.record, [held], 10.0)
        return delivery_id, delivery.execution_id

    def test_release_and_skip_a_held_delivery(self) -> None:
        """Release queues a held delivery again with no attempts; skip gives up on it and
        fails its execution; both are in the execution log and the audit log."""
        released, _ = self.held_delivery("H1")
        skipped, execution_id = self.held_delivery("H2")
        after = self.transaction(
            operator.delivery_action, released, "release", "alice", "fixed", 20.0
        )
        self.assertEqual(
            (after.state, after.attempts, after.last_error, after.control_id),
            ("queued", 0, "", "H1"),
        )
        after = self.transaction(operator.delivery_action, skipped, "skip", "bob", "dup", 21.0)
        self.assertEqual((after.state, after.last_error), ("skipped", "skipped by bob"))
        [state] = [
            s
            for s in self.transaction(executions.list_executions, (), 100, execution_id)
            if s.id == execution_id
        ]
        self.assertEqual((state.state, state.error), ("failed", "step 0 skipped by an operator"))
        with self.assertRaises(ValueError):
            self.transaction(operator.delivery_action, skipped, "release", "alice", "x", 22.0)
        with self.assertRaises(LookupError):
            self.transaction(operator.delivery_action, 10**9, "skip", "bob", "x", 22.0)
        with self.assertRaises(ValueError):
            self.transaction(operator.delivery_action, released, "explode", "bob", "x", 22.0)
        trail = self.transaction(audit.entries)
        self.assertEqual(
            [(a.who, a.action, a.target, a.reason) for a in reversed(trail)],
            [
                ("alice", "delivery.release", f"delivery {released} lane F1/0", "fixed"),
                ("bob", "delivery.skip", f"delivery {skipped} lane F1/0", "dup"),
            ],
        )
        lines = self.transaction(logs.log_lines, None, None, None, 0, 100)
        self.assertEqual(
            [
                (line.event, line.outcome, line.reason)
                for line in lines
                if line.event == "operator"
            ],
            [
                ("operator", "release", "release of a held delivery by alice: fixed"),
                ("operator", "skip", "skip of a held delivery by bob: dup"),
            ],
        )

    def test_replay_takes_the_callers_control_id(self) -> None:
        """A replay of a delivered delivery queues it again; with an edited payload it
        needs the payload's MSH-10 from the caller, and stores both."""
        delivery_id, _ = self.held_delivery("R1")
        self.transaction(operator.delivery_action, delivery_id, "release", "a", "x", 20.0)
        done = outbox.Settlement(delivery_id, outbox.DELIVERED, 1, 0.0, "", b"MSA|AA|R1", "AA")
        self.transaction(outbox.record, [done], 21.0)
        current = self.transaction(outbox.get_delivery, delivery_id)
        self.assertFalse(operator.needs_control_id(current, "replay", None))
        self.assertTrue(operator.needs_control_id(current, "replay", b"MSH|edited"))
        with self.assertRaises(ValueError):
            self.transaction(
                operator.delivery_action, delivery_id, "replay", "c", "y", 22.0, b"MSH|edited"
            )
        self.assertEqual(self.transaction(outbox.get_delivery, delivery_id).state, "delivered")
        replayed = self.transaction(
            operator.delivery_action, delivery_id, "replay", "c", "y", 22.0, b"MSH|edited", "R1-B"
        )
        self.assertEqual(
            (replayed.state, replayed.payload, replayed.control_id, replayed.attempts),
            ("queued", b"MSH|edited", "R1-B", 0),
        )

    def test_release_a_held_execution(self) -> None:
        """A held execution goes back to pending, audited; any other state is refused."""
        [result] = self.transaction(inbound.commit_inbound, [inbound_record("E1", flows=("F",))])
        (execution_id,) = result.execution_ids
        with self.assertRaises(ValueError):
            self.transaction(operator.release_execution, execution_id, "ops", "why", 5.0)
        self.transaction(
            executions.apply, [Transition(execution_id, error="template error", hold=True)], 6.0
        )
        [held] = self.transaction(executions.list_executions, ("held",))
        self.assertEqual((held.id, held.error), (execution_id, "template error"))
        row = self.transaction(operator.release_execution, execution_id, "ops", "fixed", 7.0)
        self.assertEqual((row.state, row.error, row.updated_at), ("pending", "", 7.0))
        with self.assertRaises(LookupError):
            self.transaction(operator.release_execution, 10**9, "ops", "why", 8.0)
        [entry] = self.transaction(audit.entries)
        self.assertEqual(
            (entry.who, entry.action, entry.target, entry.reason),
            ("ops", "execution.release", f"execution {execution_id}", "fixed"),
        )
        outcomes = [line.outcome for line in self.transaction(logs.log_lines)]
        self.assertEqual(outcomes, ["accepted", "held", "release"])


class SQLiteStoreTests(StoreContract, SynchronousTestCase):
    """The contract on the embedded SQLite default."""

    def setUp(self) -> None:
        self.path = f"{os.path.abspath(self.mktemp())}.db"
        self.engine = make_engine(f"sqlite:///{self.path}")
        self.open_database()

    def test_locked_database_is_reported_as_locked(self) -> None:
        """Another writer holding the lock: the error is SQLAlchemy's, and reads as locked
        (HL7 206), though the BEGIN runs on the driver connection."""
        import sqlite3

        from sqlalchemy.exc import OperationalError

        self.transaction(lambda connection: connection.exec_driver_sql("PRAGMA busy_timeout=1"))
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        with self.assertRaises(OperationalError) as raised:
            self.transaction(inbound.commit_inbound, [inbound_record("L1")])
        self.assertTrue(is_locked(raised.exception))
        other.execute("ROLLBACK")
        [result] = self.transaction(inbound.commit_inbound, [inbound_record("L1")])
        self.assertEqual(result.outcome, CommitOutcome.STORED)


class PostgreSQLStoreTests(StoreContract, SynchronousTestCase):
    """The contract on PostgreSQL, in a throwaway schema."""

    def setUp(self) -> None:
        self.engine = throwaway_schema_engine(self)
        self.open_database()
