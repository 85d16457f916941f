"""The operations' store parts (audit trail, destination pauses, search keys, the
message search, the log view, replays) behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from attrs import fields
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from twisted.trial.unittest import SynchronousTestCase

from tests.test_store_contract import throwaway_schema_engine
from udsgateway.store import audit, destinations, executions, inbound, logs, messages, search
from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine
from udsgateway.store.records import LogEntry, MessageSummary
from udsgateway.store.search import Query
from udsgateway.testing import inbound_record

if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


def stored(
    control_id: str, at: float, keys: tuple[tuple[str, str], ...] = (), **changes: Any
) -> Any:
    from attrs import evolve

    record = inbound_record(control_id, flows=("F1",))
    return evolve(record, received_at=at, keys=keys, **changes)


class OpsContract(_Base):
    engine: Engine
    database: Database

    def open_database(self) -> None:
        self.database = Database(self.engine, InlineRunner())
        self.addCleanup(self.database.close)
        self.tx(ensure_schema)

    def tx(self, function: Any, *args: Any) -> Any:
        return self.database.transaction_now(function, *args)

    def test_audit_append_and_filters(self) -> None:
        self.tx(audit.append, "ann", "delivery.skip", "delivery 1", 10.0, "why", "ok", "api")
        self.tx(audit.append, "bob", "destination.pause", "destination h:1", 20.0, "", "ok", "cli")
        self.tx(
            audit.append, "ann", "content.inbound", "message 3", 30.0, "", "refused: x", "manhole"
        )
        rows = self.tx(audit.entries)
        self.assertEqual([r.who for r in rows], ["ann", "bob", "ann"])
        self.assertEqual(rows[0].result, "refused: x")
        Q = audit.AuditQuery  # noqa: N806
        self.assertEqual(
            [r.action for r in self.tx(audit.entries, Q(who="ann"))][1], "delivery.skip"
        )
        self.assertEqual(len(self.tx(audit.entries, Q(action="delivery."))), 1)
        self.assertEqual(len(self.tx(audit.entries, Q(action="delivery"))), 0)
        self.assertEqual(len(self.tx(audit.entries, Q(target="message 3"))), 1)
        self.assertEqual(len(self.tx(audit.entries, Q(since=15.0))), 2)
        self.assertEqual(len(self.tx(audit.entries, Q(until=30.0))), 2)
        self.assertEqual(len(self.tx(audit.entries, Q(limit=1))), 1)
        self.assertEqual(
            [r.via for r in self.tx(audit.entries, Q(before_id=rows[0].id))],
            ["cli", "api"],
        )
        vias = self.tx(audit.entries, Q(vias=["cli"]))
        self.assertEqual([r.who for r in vias], ["bob"])
        both = self.tx(audit.entries, Q(who="ann", vias=("api", "cli")))
        self.assertEqual([r.action for r in both], ["delivery.skip"])

    def test_pauses(self) -> None:
        self.assertTrue(self.tx(destinations.pause, "h:1", "ann", "upgrade", 5.0))
        self.assertFalse(self.tx(destinations.pause, "h:1", "bob", "again", 6.0))
        self.assertEqual(self.tx(destinations.pauses)["h:1"].paused_by, "ann")
        self.assertTrue(self.tx(destinations.resume, "h:1"))
        self.assertFalse(self.tx(destinations.resume, "h:1"))
        self.assertEqual(self.tx(destinations.pauses), {})

    def test_search_by_keys_filters_and_pages(self) -> None:
        records = [
            stored("K1", 100.0, (("pid3", "P1"),)),
            stored("K2", 200.0, (("pid3", "P2"),)),
            stored("K3", 300.0, (("pid3", "P1"),), message_type="SIU^S12"),
            stored("K4", 400.0, (("pid3", "P1"),), accepted=False, flows=()),
        ]
        self.tx(inbound.commit_inbound, records)

        def ids(**filters: Any) -> list[str]:
            return [m.control_id for m in self.tx(search.search, Query(**filters))]

        self.assertEqual(ids(), ["K4", "K3", "K2", "K1"])
        self.assertEqual(ids(keys=(("pid3", "P1"),)), ["K4", "K3", "K1"])
        self.assertEqual(ids(keys=(("pid3", "P1"),), status="accepted"), ["K3", "K1"])
        self.assertEqual(ids(status="rejected"), ["K4"])
        self.assertEqual(ids(message_type="SIU^S12"), ["K3"])
        self.assertEqual(ids(flow_id="F1"), ["K3", "K2", "K1"])
        self.assertEqual(ids(keys=(("msh10", "K2"),)), ["K2"])
        self.assertEqual(ids(since=150.0, until=350.0), ["K3", "K2"])
        self.assertEqual(ids(keys=(("pid3", "P1"),), since=150.0), ["K4", "K3"])
        first = self.tx(search.search, Query(limit=2))
        self.assertEqual(ids(limit=2, before_id=first[-1].id), ["K2", "K1"])
        self.assertEqual(
            self.tx(search.matching_ids, Query(keys=(("pid3", "P1"),)), None),
            [first[1].id - 2, first[1].id, first[0].id],
        )
        detail = self.tx(search.detail, first[0].id)
        self.assertFalse(detail.message.accepted)
        self.assertEqual(self.tx(search.content, first[0].id)[1], b"ACK K4")

    def test_replay_and_log_view(self) -> None:
        [result] = self.tx(inbound.commit_inbound, [stored("R1", 100.0)])
        made = self.tx(executions.replay, [(result.message_id, "F1")], "ann", "why", 5.0)
        self.assertEqual(len(made), 1)
        lines = self.tx(logs.log_lines, None, None, None, 0, 100, True)
        self.assertEqual([line.outcome for line in lines], ["replay", "accepted"])
        self.assertEqual(self.tx(logs.last_log_id), lines[0].id)
        self.assertEqual(
            [line.outcome for line in self.tx(logs.log_lines, None, "accepted")],
            ["accepted"],
        )

    def test_a_stored_message_and_its_summary_agree(self) -> None:
        """``messages.find_messages`` (with content) and the browser's summary read the
        same metadata: a ``StoredMessage`` is a ``MessageSummary`` with its bytes."""
        [result] = self.tx(inbound.commit_inbound, [stored("S1", 100.0)])
        [message] = self.tx(messages.find_messages, "t", "S1")
        summary = self.tx(search.detail, result.message_id).message
        self.assertIsInstance(message, MessageSummary)
        self.assertEqual(
            MessageSummary(**{f.name: getattr(message, f.name) for f in fields(MessageSummary)}),
            summary,
        )
        self.assertEqual((summary.flows, summary.accepted), (("F1",), True))
        self.assertEqual(self.tx(search.search, Query()), [summary])
        self.assertEqual((message.raw[:3], message.ack), (b"MSH", b"ACK S1"))

    def test_one_log_query_for_timeline_events_pages_and_charts(self) -> None:
        """``logs.log_lines``: a message's lines (its own and its executions'), by event,
        before an id; ``logs.per_minute`` and ``search.flow_totals`` for the dashboard."""
        [one, _two] = self.tx(inbound.commit_inbound, [stored("T1", 1000.0), stored("T2", 1100.0)])
        [run] = self.tx(executions.replay, [(one.message_id, "F1")], "ann", "why", 1200.0)
        operator_line = LogEntry(at=1300.0, event="operator", outcome="skip", execution_id=run)
        self.tx(logs.insert_logs, [operator_line])
        mine = self.tx(lambda c: logs.log_lines(c, message_id=one.message_id, execution_ids=[run]))
        self.assertEqual(
            [(line.event, line.outcome) for line in mine],
            [("received", "accepted"), ("execution", "replay"), ("operator", "skip")],
        )
        self.assertEqual(mine[-1].execution_id, run)
        self.assertEqual(mine[0].message_id, one.message_id)
        self.assertEqual(mine[0].tenant, "t")
        own = self.tx(lambda c: logs.log_lines(c, message_id=one.message_id))
        self.assertEqual([line.outcome for line in own], ["accepted", "replay"])
        received = self.tx(lambda c: logs.log_lines(c, event="received", newest_first=True))
        self.assertEqual([line.control_id for line in received], ["T2", "T1"])
        older = self.tx(lambda c: logs.log_lines(c, before_id=received[0].id))
        self.assertEqual(older[-1].id, received[1].id)
        self.assertEqual(self.tx(search.flow_totals), {"F1": 2})
        execution_line = LogEntry(at=1250.0, event="execution", outcome="done", flow_id="F1")
        self.tx(logs.insert_logs, [execution_line, execution_line])
        late = LogEntry(at=1299.0, event="execution", outcome="done", flow_id="F2")
        self.tx(logs.insert_logs, [late])
        series = self.tx(logs.per_minute, "execution", 1200.0, 3)
        self.assertEqual(series, {"F1": [3, 0, 0], "F2": [0, 1, 0]})  # the replay too
        self.assertEqual(self.tx(logs.per_minute, "execution", 1260.0, 2), {"F2": [1, 0]})
        self.assertEqual(self.tx(logs.per_minute, "received", 1200.0, 3), {})
        self.assertEqual(self.tx(logs.per_minute, "received", 990.0, 3)["F1"], [1, 1, 0])

    def test_a_read_does_not_hold_up_the_writer(self) -> None:
        """While a read (read_now) is open, a commit in the database's own thread goes
        through; the read sees its snapshot; writes inside a read are refused."""
        import threading

        from udsgateway.store.reads import read_now

        self.tx(inbound.commit_inbound, [stored("W1", 1.0)])
        written: list[Any] = []

        def write() -> None:
            written.append(self.tx(inbound.commit_inbound, [stored("W2", 2.0)]))

        def read(connection: Any) -> list[str]:
            before = [m.control_id for m in search.search(connection, Query())]
            worker = threading.Thread(target=write)
            worker.start()
            worker.join(10)
            self.assertFalse(worker.is_alive(), "the writer waited for the reader")
            after = [m.control_id for m in search.search(connection, Query())]
            self.assertEqual(before, after)  # one snapshot
            return after

        self.assertEqual(read_now(self.engine, read), ["W1"])
        self.assertEqual(len(written), 1)
        self.assertEqual(
            [m.control_id for m in read_now(self.engine, search.search, Query())], ["W2", "W1"]
        )
        with self.assertRaises(DBAPIError):
            read_now(self.engine, audit.append, "ann", "x", "y", 1.0)
        self.assertEqual(self.tx(audit.entries), [])
        # The connection is usable again after the refused write.
        self.assertEqual(len(read_now(self.engine, search.search, Query())), 2)

    def test_deliveries_by_destination_address(self) -> None:
        from udsgateway.store import outbox, overview
        from udsgateway.testing import outbound_message

        endpoints = [
            "tcp:host=lab.example:port=7000:timeout=5",
            "tcp:host=lab.example:port=70001:timeout=5",
            "tcp:host=fe80\\:\\:1:port=7000:timeout=5",
            "tls:host=lab.example:port=7000:timeout=9:trustRoots=/ca",
        ]
        self.tx(
            outbox.enqueue,
            [
                outbox.NewDelivery(f"L{i}", e, "mllp", f"C{i}", outbound_message(f"C{i}"), {})
                for i, e in enumerate(endpoints)
            ],
            1.0,
        )
        found = self.tx(overview.deliveries_page, (), "lab.example:7000")
        self.assertEqual([d.control_id for d in found], ["C0", "C3"])
        found = self.tx(overview.deliveries_page, ("queued",), "[fe80::1]:7000")
        self.assertEqual([d.control_id for d in found], ["C2"])
        self.assertEqual(self.tx(overview.lane_heads, ["L0", "L9"]), {"L0": found[0].id - 2})
        [counts] = [c for c in self.tx(overview.destination_counts) if c.endpoint == endpoints[0]]
        self.assertEqual(
            (counts.state, counts.count, counts.oldest_created_at), ("queued", 1, 1.0)
        )

    def test_many_keys_in_power_of_two_chunks(self) -> None:
        """Keys of a large group all arrive (chunks of 256, 128, ... rows)."""
        from sqlalchemy import func, select

        from udsgateway.store import schema

        keys = [[("pid3", f"P{n}"), ("sch1", f"S{n}"), ("pid3", f"P{n}")] for n in range(351)]
        self.tx(search.insert_keys, keys, list(range(1, 352)))
        count = self.tx(
            lambda c: c.execute(select(func.count()).select_from(schema.message_keys)).scalar()
        )
        self.assertEqual(count, 702)  # the repeated pid3 once

    def test_boots_are_numbered(self) -> None:
        """Each start of a gateway on the database draws the next number."""
        from udsgateway.store import meta

        self.assertEqual([self.tx(meta.next_boot) for _ in range(3)], [1, 2, 3])

    def test_keys_written_again_are_left_alone(self) -> None:
        """A catch-up or a batch may write keys that are there already (another
        node's): no conflict, no second row; and the nodes' marks of written keys."""
        from udsgateway.store import meta

        records = [stored("A1", 1.0, (("pid3", "P1"),))]
        self.tx(lambda c: inbound.commit_inbound(c, records, write_keys=False))
        self.assertEqual(self.tx(search.search, Query(keys=(("pid3", "P1"),))), [])
        [row] = self.tx(search.stored_after, 0, 10)
        self.assertEqual((row.control_id, row.flows, row.accepted), ("A1", ("F1",), True))
        keys = search.keys_from(
            row.tenant,
            row.message_type,
            row.flows,
            row.accepted,
            row.control_id,
            (("pid3", "P1"),),
        )
        self.tx(search.insert_keys, [keys], [row.id])
        self.tx(lambda c: search.insert_keys(c, [keys, keys], [row.id, row.id], again=True))
        found = self.tx(search.search, Query(keys=(("pid3", "P1"),)))
        self.assertEqual([m.control_id for m in found], ["A1"])
        count = self.tx(lambda c: c.exec_driver_sql("SELECT count(*) FROM message_keys").scalar())
        self.assertEqual(count, len(keys))
        self.assertEqual(self.tx(search.last_message_id), row.id)
        self.assertEqual(self.tx(search.stored_after, row.id, 10), [])
        self.assertIsNone(self.tx(meta.keys_through, "node1"))
        self.tx(meta.set_keys_through, "node1", 7)
        self.tx(meta.set_keys_through, "node1", 8)
        self.assertEqual(self.tx(meta.keys_through, "node1"), 8)

    def test_login_failures_lock_and_clear(self) -> None:
        """The login lockout's counts (store.users), on both databases."""
        from udsgateway.store import users

        for _ in range(2):
            self.tx(users.login_failed, "vera", "10.0.0.1", 100.0, 3, 900.0)
        self.assertFalse(self.tx(users.login_locked, "vera", "10.0.0.2", 100.0))
        self.tx(users.login_failed, "vera", "10.0.0.2", 101.0, 3, 900.0)
        self.assertTrue(self.tx(users.login_locked, "vera", "10.0.0.3", 101.0))
        self.assertFalse(self.tx(users.login_locked, "vera", "10.0.0.3", 1002.0))
        self.tx(users.login_failed, "otto", "10.0.0.9", 200.0, 3, 900.0)
        self.tx(users.login_succeeded, "otto", "10.0.0.9")
        for _ in range(2):
            self.tx(users.login_failed, "otto", "10.0.0.8", 201.0, 3, 900.0)
        self.assertFalse(self.tx(users.login_locked, "otto", "10.0.0.7", 201.0))

    def test_schema_3_is_migrated(self) -> None:
        """A version-3 database (audit without result and via, no keys) gets them."""
        from sqlalchemy import update

        from udsgateway.store import schema

        self.tx(inbound.commit_inbound, [stored("M3", 1.0, accepted=False, flows=())])

        def make_it_version_3(connection: Any) -> None:
            connection.exec_driver_sql("DROP INDEX IF EXISTS audit_at")
            connection.exec_driver_sql("ALTER TABLE audit DROP COLUMN result")
            connection.exec_driver_sql("ALTER TABLE audit DROP COLUMN via")
            connection.exec_driver_sql("DELETE FROM message_keys")
            connection.exec_driver_sql(
                "INSERT INTO audit (at, who, action, target, reason)"
                " VALUES (1.0, 'ann', 'delivery.skip', 'delivery 1', 'old')"
            )
            connection.execute(
                update(schema.meta).where(schema.meta.c.key == "schema_version").values(value="3")
            )

        self.tx(make_it_version_3)
        self.assertEqual(self.tx(ensure_schema), schema.SCHEMA_VERSION)
        [entry] = self.tx(audit.entries)
        self.assertEqual((entry.who, entry.result, entry.via), ("ann", "ok", "cli"))
        found = self.tx(search.search, Query(keys=(("msh10", "M3"),)))
        self.assertEqual([m.control_id for m in found], ["M3"])
        self.assertEqual(len(self.tx(search.search, Query(status="rejected", tenant="t"))), 1)

    def test_schema_4_is_migrated(self) -> None:
        """Version 5's indexes (the status and the dashboard read them alone) are built
        on a version-4 database, and the status reads answer from them."""
        from sqlalchemy import inspect, update

        from udsgateway.store import overview, schema

        [result] = self.tx(inbound.commit_inbound, [stored("M4", 1000.0)])

        def make_it_version_4(connection: Any) -> None:
            for table, name in schema.STATUS_INDEXES:
                schema.index(table, name).drop(connection)
            connection.execute(
                update(schema.meta).where(schema.meta.c.key == "schema_version").values(value="4")
            )

        def indexes(connection: Any) -> set[str]:
            inspector = inspect(connection)
            return {
                index["name"]
                for table, _name in schema.STATUS_INDEXES
                for index in inspector.get_indexes(table.name)
            }

        self.tx(make_it_version_4)
        wanted = {name for _table, name in schema.STATUS_INDEXES}
        self.assertEqual(self.tx(indexes) & wanted, set())
        self.assertEqual(self.tx(ensure_schema), schema.SCHEMA_VERSION)
        self.assertEqual(self.tx(indexes) & wanted, wanted)
        [counts] = self.tx(overview.flow_counts)
        self.assertEqual((counts.flow_id, sum(counts.executions.values())), ("F1", 1))
        self.assertEqual(result.outcome.name, "STORED")


class SQLiteOpsTests(OpsContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = make_engine(f"sqlite:///{os.path.abspath(self.mktemp())}.db")
        self.open_database()


class PostgreSQLOpsTests(OpsContract, SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = throwaway_schema_engine(self)
        self.open_database()
