"""The operations facade (admin/operations.py): search, detail, content, queue control,
pause, replay, the audit trail, rates. In memory: inline database runner, task.Clock."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.admin.operations import Conflict, Invalid, NotFound, Operations, Rates
from udsgateway.hl7.header import parse_header
from udsgateway.hl7.keys import search_keys
from udsgateway.outbound.dispatcher import Dispatcher
from udsgateway.store import outbox, schema
from udsgateway.store.audit import AuditQuery
from udsgateway.store.search import Query
from udsgateway.testing import (
    Gateway,
    Outbound,
    control_id_of,
    destination_ack,
    hl7_message,
    mllp,
)

ENDPOINT = "tcp:host=partner.example:port=6661:timeout=10"
ADDRESS = "partner.example:6661"
ADT = "APPTESTMLLP|FLWADTA04MLLP"
SIU = "APPTESTMLLP|FLWSIUS12MLLP"


def result(test: SynchronousTestCase, deferred: Deferred[Any]) -> Any:
    return test.successResultOf(deferred)


def audit_rows(database: Any) -> list[tuple[str, str, str, str, str]]:
    def read(connection: Any) -> list[tuple[str, str, str, str, str]]:
        a = schema.audit
        return [
            (r.who, r.action, r.target, r.result, r.via)
            for r in connection.execute(select(a).order_by(a.c.id))
        ]

    rows: list[tuple[str, str, str, str, str]] = database.transaction_now(read)
    return rows


class SearchKeysTests(SynchronousTestCase):
    """The keys read from the raw bytes, with the message's own separators."""

    def test_pid3_first_identifier_and_sch(self) -> None:
        raw = hl7_message(
            "C1",
            "SIU^S12",
            segments=[
                "SCH|PL77^EPIC|FL88^EPIC",
                "PID|1||P100~P200^^^H||Doe^Jane",
                "PID|2||P300",
            ],
        )
        header = parse_header(raw, default_charset="latin-1")
        assert not hasattr(header, "diagnostic")
        self.assertEqual(
            search_keys(raw, header),
            (("sch1", "PL77"), ("sch2", "FL88"), ("pid3", "P100")),
        )

    def test_other_separators(self) -> None:
        raw = b"MSH#$~\\&#A#B#C#D#2024##ADT$A04#X1#P#2.5\rPID#1##ID9$$$H\r"
        header = parse_header(raw, default_charset="latin-1")
        self.assertEqual(search_keys(raw, header), (("pid3", "ID9"),))  # type: ignore[arg-type]


class MessageTests(SynchronousTestCase):
    """The message browser: search by keys and filters, newest first, paged; detail;
    content views audited."""

    def setUp(self) -> None:
        self.gateway = Gateway()
        self.operations = Operations(
            self.gateway.database,
            self.gateway.clock,
            self.gateway.clock.seconds,
            ingests={"test": self.gateway.ingest},
            listeners={"test": self.gateway.factory},
        )
        sender = self.gateway.connect()
        for number in range(1, 6):
            patient = f"P{number % 2}"
            sender.send(
                mllp(
                    hl7_message(
                        f"A{number}",
                        receiving=ADT,
                        segments=[f"PID|1||{patient}^^^H||Doe^Jane"],
                    )
                )
            )
            self.gateway.clock.advance(60)
        sender.send(mllp(hl7_message("S1", "SIU^S12", receiving=SIU, segments=["SCH|PL1|FL1"])))
        sender.send(mllp(hl7_message("R1", "ADT^A31", receiving=ADT)))  # rejected: type
        sender.received()

    def search(self, **filters: Any) -> dict[str, Any]:
        found: dict[str, Any] = result(
            self, self.operations.messages("ann", "api", Query(**filters))
        )
        return found

    def control_ids(self, **filters: Any) -> list[str]:
        return [m["control_id"] for m in self.search(**filters)["messages"]]

    def test_newest_first_and_paged(self) -> None:
        self.assertEqual(self.control_ids(), ["R1", "S1", "A5", "A4", "A3", "A2", "A1"])
        first = self.search(limit=3)
        self.assertEqual([m["control_id"] for m in first["messages"]], ["R1", "S1", "A5"])
        self.assertEqual(self.control_ids(limit=3, before_id=first["next"]), ["A4", "A3", "A2"])

    def test_keys_and_filters(self) -> None:
        self.assertEqual(self.control_ids(keys=(("pid3", "P1"),)), ["A5", "A3", "A1"])
        self.assertEqual(self.control_ids(keys=(("msh10", "A2"),)), ["A2"])
        self.assertEqual(self.control_ids(keys=(("msh10", "R1"),)), ["R1"])  # rejected
        self.assertEqual(self.control_ids(keys=(("msh10", "R1"),), status="accepted"), [])
        self.assertEqual(self.control_ids(keys=(("msh10", "A3"), ("pid3", "P1"))), ["A3"])
        self.assertEqual(self.control_ids(keys=(("sch1", "PL1"),)), ["S1"])
        self.assertEqual(self.control_ids(keys=(("sch2", "FL1"),)), ["S1"])
        self.assertEqual(self.control_ids(message_type="SIU^S12"), ["S1"])
        self.assertEqual(self.control_ids(status="rejected"), ["R1"])
        self.assertEqual(len(self.control_ids(status="accepted")), 6)
        self.assertEqual(
            self.control_ids(keys=(("pid3", "P1"),), limit=2, before_id=5), ["A3", "A1"]
        )
        start = 1_700_000_000 + 60
        self.assertEqual(self.control_ids(since=start, until=start + 120), ["A3", "A2"])
        self.assertEqual(self.control_ids(tenant="test", limit=1), ["R1"])
        self.assertEqual(self.control_ids(flow_id="FLWSIUS12MLLP"), ["S1"])
        self.assertEqual(self.control_ids(message_type="ADT^A31"), ["R1"])
        self.assertEqual(self.control_ids(message_type="ORM^O01"), [])

    def test_control_id_search_uses_the_duplicate_index(self) -> None:
        """MSH-10 among accepted messages is an index search (messages_dedupe), not a
        scan: the query plan says so."""
        from udsgateway.store import search as store_search

        def plan(connection: Any) -> str:
            statement = store_search._statement(Query(keys=(("msh10", "A2"),), status="accepted"))
            compiled = statement.compile(dialect=connection.dialect)
            rows = connection.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + str(compiled), tuple(compiled.params.values())
            ).all()
            return " ".join(str(row[-1]) for row in rows)

        self.assertIn("messages_dedupe", self.gateway.database.transaction_now(plan))

    def test_bad_filters_are_invalid(self) -> None:
        self.failureResultOf(self.operations.messages("ann", "api", Query(limit=0)), Invalid)
        self.failureResultOf(
            self.operations.messages("ann", "api", Query(keys=(("pid9", "x"),))), Invalid
        )
        self.failureResultOf(self.operations.messages("ann", "api", Query(status="lost")), Invalid)
        self.failureResultOf(self.operations.messages("ann", "web", Query()), Invalid)
        self.failureResultOf(self.operations.messages("ann", "api", Query(tenant="x")), Invalid)

    def test_detail_has_no_content_and_content_is_audited(self) -> None:
        [found] = self.search(keys=(("msh10", "A1"),))["messages"]
        detail = result(self, self.operations.message("ann", "api", found["id"]))
        self.assertEqual(detail["ack_code"], "AA")
        self.assertEqual(detail["status"], "accepted")
        self.assertNotIn("Doe", repr(detail))
        self.assertEqual(audit_rows(self.gateway.database), [])  # metadata: not audited
        shown = result(self, self.operations.content("ann", "manhole", found["id"], "inbound"))
        self.assertIn("PID|1||P1^^^H||Doe^Jane", shown["text"])
        result(self, self.operations.content("bob", "api", found["id"], "ack"))
        self.assertEqual(
            audit_rows(self.gateway.database),
            [
                ("ann", "content.inbound", f"message {found['id']}", "ok", "manhole"),
                ("bob", "content.ack", f"message {found['id']}", "ok", "api"),
            ],
        )

    def test_missing_message(self) -> None:
        self.failureResultOf(self.operations.message("ann", "api", 999), NotFound)
        self.failureResultOf(self.operations.content("ann", "api", 999, "inbound"), NotFound)
        self.assertEqual(
            audit_rows(self.gateway.database),
            [("ann", "content.inbound", "message 999", "refused: no message 999", "api")],
        )

    def test_status_counts_tenant(self) -> None:
        status = result(self, self.operations.status("ann", "api"))
        tenant = status["tenants"]["test"]
        self.assertEqual(tenant["received"], 7)
        self.assertEqual(tenant["accepted"], 6)
        self.assertEqual(tenant["rejected"], 1)
        self.assertEqual(tenant["rejected_by_code"], {"201": 1})
        self.assertEqual(tenant["connections"], 1)
        self.assertEqual(status["flows"]["FLWADTA04MLLP"]["name"], "ADT^A04 flow")

    def test_replay_is_counted_then_confirmed(self) -> None:
        query = Query(keys=(("pid3", "P1"),))
        counted = result(
            self, self.operations.replay_messages("ann", "api", query, "partner lost them")
        )
        self.assertEqual(counted, {"count": 3, "replayed": 0})
        self.failureResultOf(
            self.operations.replay_messages(
                "ann", "api", query, "partner lost them", confirm_count=2
            ),
            Conflict,
        )
        done = result(
            self,
            self.operations.replay_messages(
                "ann", "api", query, "partner lost them", confirm_count=3
            ),
        )
        self.assertEqual(done["replayed"], 3)
        rows = audit_rows(self.gateway.database)
        self.assertEqual([r[1] for r in rows], ["message.replay", "message.replay"])
        self.assertEqual([r[3][:7] for r in rows], ["refused", "ok"])
        self.assertNotIn("P1", rows[1][2])  # a patient identifier is not in the trail

    def test_audit_trail_reads_newest_first(self) -> None:
        for who in ("ann", "bob", "cid"):
            result(self, self.operations.content(who, "api", 1, "inbound"))
        trail = result(self, self.operations.audit_trail("ann", "api", AuditQuery(limit=2)))
        self.assertEqual([e["who"] for e in trail["entries"]], ["cid", "bob"])
        rest = result(
            self,
            self.operations.audit_trail(
                "ann", "api", AuditQuery(before_id=trail["next"], limit=2)
            ),
        )
        self.assertEqual([e["who"] for e in rest["entries"]], ["ann"])
        self.assertIsNone(rest["next"])
        only = result(self, self.operations.audit_trail("ann", "api", AuditQuery(who="bob")))
        self.assertEqual([e["action"] for e in only["entries"]], ["content.inbound"])
        everything = result(self, self.operations.audit_trail("ann", "api"))
        self.assertEqual(len(everything["entries"]), 3)
        failure = self.failureResultOf(
            self.operations.audit_trail("ann", "api", AuditQuery(vias=("telnet",))), Invalid
        )
        self.assertIn("via", failure.getErrorMessage())


class QueueTests(SynchronousTestCase):
    """Pause and resume (persisted), release, skip, retry now, wait reasons."""

    def setUp(self) -> None:
        self.rig = Outbound(held_poll=5.0)
        self.operations = Operations(
            self.rig.database,
            self.rig.clock,
            self.rig.clock.seconds,
            dispatcher=self.rig.dispatcher,
        )
        self.addCleanup(self.rig.stop)

    def test_paused_destination_keeps_queueing_sends_nothing(self) -> None:
        self.rig.start()
        paused = result(self, self.operations.pause("ann", "api", ADDRESS, "partner upgrade"))
        self.assertEqual(paused["paused_by"], "ann")
        self.rig.enqueue("L1", ENDPOINT, ["C1", "C2"])
        self.rig.clock.advance(60)
        self.assertEqual(self.rig.peer(ENDPOINT).received_ids(), [])
        views = result(self, self.operations.deliveries("ann", "api"))
        self.assertEqual(
            [v["waiting"] for v in views],
            ["paused by ann", "waiting for the head of its lane (delivery 1)"],
        )
        status = result(self, self.operations.status("ann", "api"))
        self.assertTrue(status["destinations"][ADDRESS]["paused"])
        self.assertEqual(status["destinations"][ADDRESS]["queued"], 2)
        self.failureResultOf(self.operations.pause("ann", "api", ADDRESS, "again"), Conflict)
        result(self, self.operations.resume("bob", "cli", ADDRESS, "upgrade done"))
        self.rig.run_until(lambda: len(self.rig.peer(ENDPOINT).received_ids()) == 2)
        self.assertEqual(self.rig.peer(ENDPOINT).received_ids(), ["C1", "C2"])
        self.assertEqual(
            audit_rows(self.rig.database),
            [
                ("ann", "destination.pause", f"destination {ADDRESS}", "ok", "api"),
                (
                    "ann",
                    "destination.pause",
                    f"destination {ADDRESS}",
                    f"refused: destination {ADDRESS} is paused already",
                    "api",
                ),
                ("bob", "destination.resume", f"destination {ADDRESS}", "ok", "cli"),
            ],
        )

    def test_pause_survives_a_restart(self) -> None:
        self.rig.start()
        result(self, self.operations.pause("ann", "api", ADDRESS, "partner upgrade"))
        self.rig.stop()
        # A new dispatcher on the same database: it reads the pause at recovery.
        fresh = Outbound(database=self.rig.database, clock=self.rig.clock)
        fresh.enqueue("L1", ENDPOINT, ["C1"], notify=False)
        fresh.start()
        self.addCleanup(fresh.stop)
        fresh.clock.advance(60)
        self.assertEqual(fresh.peer(ENDPOINT).received_ids(), [])
        self.assertEqual(fresh.dispatcher.paused, {ADDRESS: "ann"})
        # Resumed from another process (the CLI, no dispatcher): the sweep notices.
        Operations(self.rig.database, self.rig.clock).resume("bob", "cli", ADDRESS)
        fresh.run_until(lambda: fresh.peer(ENDPOINT).received_ids() == ["C1"])

    def test_held_release_and_skip_are_audited(self) -> None:
        self.rig.start()
        peer = self.rig.peer(ENDPOINT)
        peer.script = lambda connection, payload: connection.reply(
            destination_ack(control_id_of(payload), "AR", 207)
        )
        [first, second] = self.rig.enqueue("L1", ENDPOINT, ["C1", "C2"])
        self.rig.run_until(lambda: self.rig.delivery(first).state == outbox.HELD)
        [held, waiting] = result(self, self.operations.deliveries("ann", "api"))
        self.assertEqual(held["waiting"], "held: AR from destination, ERR 207")
        self.assertEqual(
            waiting["waiting"], f"waiting for the head of its lane (delivery {first})"
        )
        self.failureResultOf(self.operations.skip("ann", "api", first, " "), Invalid)
        self.failureResultOf(self.operations.release("ann", "api", 99, "why"), NotFound)
        skipped = result(self, self.operations.skip("ann", "api", first, "sent by phone"))
        self.assertEqual(skipped["state"], outbox.SKIPPED)
        self.failureResultOf(self.operations.skip("ann", "api", first, "again"), Conflict)
        status = result(self, self.operations.status("ann", "api"))
        self.assertEqual(status["destinations"][ADDRESS]["attempts_since_start"], {"rejected": 1})
        rows = audit_rows(self.rig.database)
        self.assertEqual(
            [(r[1], r[3][:7], r[4]) for r in rows],
            [
                ("delivery.skip", "refused", "api"),
                ("delivery.release", "refused", "api"),
                ("delivery.skip", "ok", "api"),
                ("delivery.skip", "refused", "api"),
            ],
        )
        self.assertEqual(second, first + 1)

    def test_replay_deliveries_counted_then_confirmed(self) -> None:
        self.rig.start()
        [first, second] = self.rig.enqueue("L1", ENDPOINT, ["C1", "C2"])
        self.rig.run_until(lambda: self.rig.delivery(second).state == outbox.DELIVERED)
        self.failureResultOf(
            self.operations.replay_deliveries("ann", "api", ADDRESS, "held", "why"), Invalid
        )
        counted = result(
            self, self.operations.replay_deliveries("ann", "api", ADDRESS, "delivered", "why")
        )
        self.assertEqual(counted, {"count": 2, "replayed": 0})
        other = self.operations.replay_deliveries("ann", "api", "other:1", "delivered", "why")
        self.assertEqual(result(self, other)["count"], 0)
        self.failureResultOf(
            self.operations.replay_deliveries("ann", "api", ADDRESS, "delivered", "why", 3),
            Conflict,
        )
        self.failureResultOf(
            self.operations.replay_deliveries("ann", "api", ADDRESS, "delivered", " ", 2),
            Invalid,
        )
        done = result(
            self,
            self.operations.replay_deliveries("ann", "api", ADDRESS, "delivered", "lost", 2),
        )
        self.assertEqual(done, {"count": 2, "replayed": 2})
        self.rig.run_until(lambda: len(self.rig.peer(ENDPOINT).received_ids()) == 4)
        self.assertEqual(self.rig.peer(ENDPOINT).received_ids(), ["C1", "C2", "C1", "C2"])
        actions = [(r[1], r[3][:7]) for r in audit_rows(self.rig.database)]
        self.assertEqual(
            actions,
            [
                ("deliveries.replay", "refused"),
                ("deliveries.replay", "refused"),
                ("delivery.replay", "ok"),
                ("delivery.replay", "ok"),
                ("deliveries.replay", "ok"),
            ],
        )
        self.assertEqual(first + 1, second)

    def test_backoff_reason_and_retry_now(self) -> None:
        self.rig.start()
        self.rig.peer(ENDPOINT).accepting = False
        [first] = self.rig.enqueue("L1", ENDPOINT, ["C1"])
        self.rig.run_until(lambda: self.rig.delivery(first).attempts > 0)
        view = result(self, self.operations.delivery("ann", "api", first))
        self.assertEqual((view["state"], view["attempts"]), (outbox.QUEUED, 1))
        self.assertTrue(view["waiting"].startswith("backoff until "), view["waiting"])
        retried = result(self, self.operations.retry_now("ann", "api", first))
        self.assertEqual(retried["attempts"], 0)
        self.assertEqual(audit_rows(self.rig.database)[-1][1], "delivery.release")


class RatesTests(SynchronousTestCase):
    """Rates over a minute and an hour from a bounded ring of readings."""

    def test_rates_and_bounded_ring(self) -> None:
        clock = Clock()
        count = {"n": 0}
        rates = Rates(lambda: {"received": count["n"]}, clock, step=10.0)
        rates.start()
        for _ in range(720):  # two hours, 5 messages a second
            count["n"] += 50
            clock.advance(10)
        self.assertEqual(rates.rates(60), {"received": 5.0})
        self.assertEqual(rates.rates(3600), {"received": 5.0})
        for _ in range(6):  # a quiet minute
            clock.advance(10)
        self.assertEqual(rates.rates(60), {"received": 0.0})
        self.assertAlmostEqual(rates.rates(3600)["received"], 5.0 * 3540 / 3600, places=2)
        self.assertLessEqual(len(rates._ring), 361)
        rates.stop()


class ValidationTests(SynchronousTestCase):
    def test_actor_and_via_are_checked(self) -> None:
        rig = Outbound()
        operations = Operations(rig.database, rig.clock)
        self.failureResultOf(operations.status("", "api"), Invalid)
        self.failureResultOf(operations.pause("ann", "http", ADDRESS, "x"), Invalid)
        self.assertEqual(audit_rows(rig.database), [])
        self.assertIsInstance(rig.dispatcher, Dispatcher)


class FlowTests(SynchronousTestCase):
    """Flows: list with Host/Port/App ID/Flow ID, detail, validate, import, export,
    enable/disable (audited), the variable catalogue."""

    def setUp(self) -> None:
        self.gateway = Gateway()
        self.operations = Operations(
            self.gateway.database,
            self.gateway.clock,
            self.gateway.clock.seconds,
            tenants={"test": self.gateway.tenant},
        )

    def test_list_and_detail(self) -> None:
        rows = result(self, self.operations.flows("ann", "api", "test"))
        row = next(r for r in rows if r["flow_id"] == "FLWADTA04MLLP")
        self.assertEqual(
            (row["host"], row["app_id"], row["message_type"], row["enabled"]),
            ("127.0.0.1", "APPTESTMLLP", "ADT^A04", True),
        )
        detail = result(self, self.operations.flow("ann", "api", "FLWADTA04MLLP"))
        self.assertEqual(detail["trigger"]["message_type"], "ADT^A04")
        self.failureResultOf(self.operations.flow("ann", "api", "NOPE"), NotFound)

    def test_validate_import_export(self) -> None:
        exported = result(self, self.operations.export_flows("ann", "api", "APPTESTMLLP"))
        text = exported["text"].replace('name = "Test app mllp"', 'name = "Renamed"')
        checked = result(self, self.operations.validate_flows("ann", "api", text))
        self.assertEqual(checked, {"valid": True, "problems": []})
        bad = result(self, self.operations.validate_flows("ann", "api", "[[flows]]\nname = 1\n"))
        self.assertFalse(bad["valid"])
        self.assertTrue(bad["problems"])
        saved = result(self, self.operations.import_flows("ann", "api", text))
        self.assertEqual({r["app_id"] for r in saved}, {"APPTESTMLLP"})
        self.assertEqual({r["app"] for r in saved}, {"Renamed"})
        self.assertEqual({r["port"] for r in saved}, {0})
        self.failureResultOf(
            self.operations.import_flows("ann", "api", text.replace('"test"', '"elsewhere"')),
            Invalid,
        )
        self.assertEqual(
            [(r[1], r[3][:7]) for r in audit_rows(self.gateway.database)],
            [("flows.import", "ok"), ("flows.import", "refused")],
        )

    def test_flow_changes_reach_the_running_gateway_at_once(self) -> None:
        """An import or an enable/disable answers only once the gateway reloaded."""
        reloads: list[Deferred[None]] = []

        def reload_flows() -> Deferred[None]:
            reloads.append(Deferred())
            return reloads[-1]

        self.operations.reload_flows = reload_flows
        exported = result(self, self.operations.export_flows("ann", "api", "APPTESTMLLP"))
        saving = self.operations.import_flows("ann", "api", exported["text"])
        self.assertNoResult(saving)
        reloads[0].callback(None)
        self.assertEqual({r["app_id"] for r in self.successResultOf(saving)}, {"APPTESTMLLP"})
        disabling = self.operations.set_flow_enabled("ann", "api", "FLWADTA04MLLP", False)
        self.assertNoResult(disabling)
        reloads[1].callback(None)
        self.assertFalse(self.successResultOf(disabling)["enabled"])

    def test_enable_disable_audited(self) -> None:
        row = result(
            self,
            self.operations.set_flow_enabled("ann", "api", "FLWADTA04MLLP", False, "partner gone"),
        )
        self.assertFalse(row["enabled"])
        self.failureResultOf(
            self.operations.set_flow_enabled("ann", "api", "FLWADTA04MLLP", False), Conflict
        )
        result(self, self.operations.set_flow_enabled("bob", "api", "FLWADTA04MLLP", True))
        self.assertEqual(
            [(r[0], r[1], r[2], r[3][:7]) for r in audit_rows(self.gateway.database)],
            [
                ("ann", "flow.disable", "flow FLWADTA04MLLP", "ok"),
                ("ann", "flow.disable", "flow FLWADTA04MLLP", "refused"),
                ("bob", "flow.enable", "flow FLWADTA04MLLP", "ok"),
            ],
        )

    def test_save_flow_into_an_app_and_a_new_one(self) -> None:
        from attrs import evolve

        from udsgateway import flowstore
        from udsgateway.flows import Action, App

        [app] = [
            a
            for a in self.gateway.database.transaction_now(flowstore.load_apps, "test")
            if a.app_id == "APPTESTMLLP"
        ]
        before = [f.flow_id for f in app.flows]
        changed = evolve(app.flows[0], name="renamed")
        saved = result(self, self.operations.save_flow("ann", "api", app, changed))
        self.assertEqual((saved["app_id"], saved["flow_id"]), ("APPTESTMLLP", before[0]))
        self.assertEqual([f["flow_id"] for f in saved["app"]["flows"]], before)
        self.assertEqual(saved["app"]["flows"][0]["name"], "renamed")
        self.assertEqual(saved["host"], "127.0.0.1")
        fresh = evolve(app.flows[0], flow_id="", name="brand new")
        added = result(
            self,
            self.operations.save_flow("ann", "api", App(name="New app", tenant="test"), fresh),
        )
        self.assertTrue(added["app_id"].startswith("APP"))
        self.assertNotEqual(added["flow_id"], before[0])
        broken = evolve(
            changed,
            trigger=evolve(changed.trigger, sample="MSH|^~\\&|A|B|C|D|2024||ADT^A04|S1|P|2.5\n"),
            actions=(
                Action(name="a", host="h", port=1, message_type="ADT^A04", template="{% if %}"),
            ),
        )
        refused = self.operations.save_flow("ann", "api", app, broken)
        self.assertIn("template line 1", str(self.failureResultOf(refused, Invalid).value))
        apps = result(self, self.operations.apps("ann", "api"))
        self.assertIn("New app", [a["name"] for a in apps])
        self.assertEqual(
            [(r[1], r[3][:7]) for r in audit_rows(self.gateway.database)],
            [("flow.save", "ok"), ("flow.save", "ok"), ("flow.save", "refused")],
        )

    def test_variable_catalogue_of_a_pasted_sample(self) -> None:
        sample = hl7_message("V1").decode("latin-1")
        found = result(self, self.operations.variables("ann", "api", sample=sample))
        paths = {v["path"]: v for v in found}
        self.assertEqual(paths["PID-3.1"]["sample"], "12345")
        self.failureResultOf(self.operations.variables("ann", "api", sample="nonsense"), Invalid)
        self.failureResultOf(self.operations.variables("ann", "api"), Invalid)


class LogTests(SynchronousTestCase):
    """The execution log with the filters of ``udsgateway logs``, and the long-poll tail."""

    def setUp(self) -> None:
        self.gateway = Gateway()
        self.operations = Operations(
            self.gateway.database, self.gateway.clock, self.gateway.clock.seconds
        )
        self.sender = self.gateway.connect()

    def send(self, control_id: str, message_type: str = "ADT^A04") -> None:
        self.sender.send(mllp(hl7_message(control_id, message_type, receiving=ADT)))

    def test_newest_first_filtered_paged(self) -> None:
        for number in range(3):
            self.send(f"L{number}")
        self.send("BAD", "ADT^A31")
        lines = result(self, self.operations.logs("ann", "api"))["lines"]
        self.assertEqual([line["control_id"] for line in lines], ["BAD", "L2", "L1", "L0"])
        self.assertEqual(lines[0]["outcome"], "rejected")
        rejected = result(self, self.operations.logs("ann", "api", status="rejected"))
        self.assertEqual([line["control_id"] for line in rejected["lines"]], ["BAD"])
        page = result(self, self.operations.logs("ann", "api", limit=2))
        rest = result(self, self.operations.logs("ann", "api", before_id=page["next"]))
        self.assertEqual([line["control_id"] for line in rest["lines"]], ["L1", "L0"])
        self.failureResultOf(self.operations.logs("ann", "api", limit=0), Invalid)

    def test_event_filter_on_log_and_tail(self) -> None:
        self.send("E0")
        start = result(self, self.operations.tail("ann", "api"))
        self.send("E1")
        received = result(self, self.operations.logs("ann", "api", event="received"))
        self.assertEqual([line["control_id"] for line in received["lines"]], ["E1", "E0"])
        self.assertEqual(
            result(self, self.operations.logs("ann", "api", event="operator")),
            {
                "lines": [],
                "next": None,
            },
        )
        tail = self.operations.tail("ann", "api", after_id=0, event="received", timeout=0)
        self.assertEqual(
            [line["control_id"] for line in result(self, tail)["lines"]], ["E0", "E1"]
        )
        none = self.operations.tail("ann", "api", after_id=start["last"], event="x", timeout=0)
        self.assertEqual(result(self, none), {"lines": [], "last": start["last"]})

    def test_tail_waits_for_new_lines(self) -> None:
        self.send("T0")
        start = result(self, self.operations.tail("ann", "api"))
        self.assertEqual(start["lines"], [])
        waiting = self.operations.tail("ann", "api", after_id=start["last"], timeout=30)
        self.assertNoResult(waiting)
        self.gateway.clock.advance(1)
        self.assertNoResult(waiting)
        self.send("T1")
        self.gateway.clock.advance(1)
        found = result(self, waiting)
        self.assertEqual([line["control_id"] for line in found["lines"]], ["T1"])
        empty = self.operations.tail("ann", "api", after_id=found["last"], timeout=5)
        self.gateway.clock.advance(5)
        self.assertEqual(result(self, empty), {"lines": [], "last": found["last"]})


class EndToEndTests(SynchronousTestCase):
    """A whole gateway in memory: a message in, delivered; the facade's status, detail
    (executions, deliveries, attempts) and audited outbound/response content."""

    def test_detail_status_and_outbound_content(self) -> None:
        from tests.test_executor import TRIGGER_ID, adt, header
        from udsgateway.testing.flows import FlowGateway, action, app, flow

        running = FlowGateway(
            (
                app(
                    flow(
                        "one",
                        "ADT^A04",
                        [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)],
                    )
                ),
            )
        )
        self.addCleanup(running.stop)
        operations = Operations(
            running.database,
            running.clock,
            running.clock.seconds,
            dispatcher=running.outbound.dispatcher,
            executor=running.executor,
            ingests={"test": running.ingest},
            listeners={"test": running.factory},
        )
        rates = Rates(operations.counters, running.clock)
        operations.rates = rates
        rates.start()
        running.send(adt("E2E1"))
        running.settle()
        running.clock.advance(60)
        [found] = result(self, operations.messages("ann", "api", Query()))["messages"]
        detail = result(self, operations.message("ann", "api", found["id"]))
        [execution] = detail["executions"]
        self.assertEqual((execution["flow_id"], execution["state"]), ("FLWONE", "done"))
        [delivery] = detail["deliveries"]
        self.assertEqual(
            (delivery["state"], delivery["ack"], delivery["waiting"]), ("delivered", "AA", "")
        )
        self.assertEqual([a["outcome"] for a in delivery["attempt_log"]], ["delivered"])
        sent = result(
            self, operations.content("ann", "api", part="outbound", delivery_id=delivery["id"])
        )
        self.assertIn("ZTR|E2E1", sent["text"])
        self.assertEqual(sent["message_id"], found["id"])
        reply = result(
            self, operations.content("ann", "api", part="response", delivery_id=delivery["id"])
        )
        self.assertIn("MSA|AA|", reply["text"])
        self.assertEqual(
            [(r[1], r[2]) for r in audit_rows(running.database)],
            [
                ("content.outbound", f"delivery {delivery['id']}"),
                ("content.response", f"delivery {delivery['id']}"),
            ],
        )
        status = result(self, operations.status("ann", "api"))
        [(address, destination)] = status["destinations"].items()
        self.assertEqual(address, "127.0.0.1:2601")
        self.assertEqual(
            (
                destination["delivered"],
                destination["delivered_since_start"],
                destination["queued"],
            ),
            (1, 1, 0),
        )
        self.assertTrue(destination["connected"])
        self.assertEqual(destination["attempts_since_start"], {"accepted": 1})
        self.assertEqual(status["flows"]["FLWONE"]["executions"], {"done": 1})
        one = status["flows"]["FLWONE"]
        self.assertEqual(one["since_start"], {"routed": 1, "done": 1, "failed": 0, "held": 0})
        self.assertGreater(one["rates"]["minute"]["routed"], 0)
        self.assertGreater(one["rates"]["hour"]["done"], 0)
        self.assertEqual(one["rates"]["minute"]["failed"], 0)
        self.assertGreater(destination["rates"]["minute"]["attempts"], 0)
        self.assertGreater(destination["rates"]["minute"]["delivered"], 0)
        # The answer is what the OpenAPI document says it is (and the check can fail).
        from udsgateway.admin.api import STATUS_RESPONSE
        from udsgateway.admin.http import HTTPError, check_schema

        check_schema(status, STATUS_RESPONSE, "status")
        del one["since_start"]
        with self.assertRaises(HTTPError):
            check_schema(status, STATUS_RESPONSE, "status")
        self.assertEqual(status["tenants"]["test"]["accepted"], 1)
        self.assertGreater(status["rates"]["minute"]["tenant.test.received"], 0)
        self.assertGreater(status["rates"]["hour"][f"destination.{address}.delivered"], 0)
        self.assertEqual(destination["connection"], "up")
        self.assertNotIn("last_hour", status["flows"]["FLWONE"])  # only with history
        rates.stop()

        # The timeline: the message's lines of the execution log, oldest first.
        self.assertEqual(
            [(line["event"], line["outcome"]) for line in detail["timeline"]],
            [("received", "accepted"), ("delivery", "delivered"), ("execution", "done")],
        )
        # The dashboard's history: messages routed per flow, executions per minute.
        running.clock.advance(30)  # the execution finished 90 s ago: the minute before last
        history = result(self, operations.status("ann", "api", history=True))
        counted = history["flows"]["FLWONE"]
        self.assertEqual(counted["received"], 1)
        self.assertEqual(len(counted["last_hour"]), 60)
        self.assertEqual(sum(counted["last_hour"]), 1)
        self.assertEqual(counted["last_hour"][-2:], [1, 0])
        running.clock.advance(3600)
        later = result(self, operations.status("ann", "api", history=True))
        self.assertEqual(sum(later["flows"]["FLWONE"]["last_hour"]), 0)
        self.assertEqual(later["flows"]["FLWONE"]["received"], 1)

        # All the content at once: one audited view.
        content = result(self, operations.message_content("ann", "api", found["id"]))
        self.assertIn("ZTR|E2E1", content["deliveries"][0]["outbound"])
        self.assertIn("MSA|AA|", content["deliveries"][0]["response"])
        self.assertIn("MSH|", content["inbound"])
        self.assertEqual(
            audit_rows(running.database)[-1][1:3], ("message.content", f"message {found['id']}")
        )
        self.failureResultOf(operations.message_content("ann", "api", 999), NotFound)


class RenderTests(SynchronousTestCase):
    """Render an action against a pasted message, with a fake earlier response."""

    def test_render_chain_with_fake_response(self) -> None:
        from tests.test_executor import TRIGGER_ID, adt, header
        from udsgateway import flowstore
        from udsgateway.testing import memory_database
        from udsgateway.testing.flows import action, app, flow

        second = header("B") + 'ZAK|{{ responses[0]["MSA-2"] }}\n'
        database = memory_database()
        database.transaction_now(
            flowstore.save_app,
            app(
                flow(
                    "chain",
                    "ADT^A04",
                    [
                        action("first", 2601, "ADT^A04", header("A") + TRIGGER_ID),
                        action("second", 2602, "ADT^A04", second),
                    ],
                )
            ),
            0.0,
        )
        clock = Clock()
        operations = Operations(database, clock, clock.seconds)
        pasted = adt("R1").decode("latin-1").replace("\r", "\n")
        first = result(self, operations.render("ann", "api", "FLWCHAIN", "first", pasted))
        self.assertIn("ZTR|R1", first["text"])
        fake = destination_ack("OUT77").decode("latin-1")
        chained = result(
            self,
            operations.render("ann", "api", "FLWCHAIN", "1", pasted, {"first": fake}),
        )
        self.assertIn("ZAK|OUT77", chained["text"])
        self.failureResultOf(
            operations.render("ann", "api", "FLWCHAIN", "second", pasted, {"second": fake}),
            Invalid,
        )
        self.failureResultOf(
            operations.render("ann", "api", "FLWCHAIN", "third", pasted), NotFound
        )
        self.failureResultOf(operations.render("ann", "api", "FLWCHAIN", "first"), Invalid)
        self.assertEqual(audit_rows(database), [])
