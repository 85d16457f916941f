"""Tests for flows end to end in memory: executions, the executor, "after actions" ACKs,
execution logs, no PHI in logs, and retention.

Every test drives the real objects the service wires (listener factory, ingest,
group commit, SQLite store, executor, dispatcher, destination protocol) through
``udsgateway.testing.flows.FlowGateway``: an in-memory database on a synchronous
runner, a ``task.Clock``, and scripted in-memory destinations. Assertions are on
bytes (what each destination received, what the sender was answered), rows in
the store and log events.
"""

from __future__ import annotations

import gc
import io
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import evolve
from sqlalchemy import insert
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.cli import main as cli
from udsgateway.cli.operate import delivery_action
from udsgateway.flows import App
from udsgateway.flowstore import load_apps, save_app
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.hl7.header import HeaderProblem, parse_header
from udsgateway.outbound.executor import Executor, lane_name
from udsgateway.store import executions, inbound, messages, operator, schema
from udsgateway.store.records import CommitOutcome, CommitResult, NewDelivery
from udsgateway.store.retention import prune
from udsgateway.testing import (
    Connection,
    PeerConnection,
    control_id_of,
    destination_ack,
    hl7_message,
    inbound_record,
    read_ack,
)
from udsgateway.testing.flows import (
    START,
    FlowGateway,
    action,
    answer_with,
    app,
    flow,
    never_answer,
)

SENT_AT = "20240101123000"
#: ``now`` in a template, rendered at the clock's start (START).
NOW = "20231114221320"
DAY = 86_400.0


def adt(
    control_id: str,
    *,
    event: str = "A04",
    family: str = "Doe",
    given: str = "John",
    mrn: str = "12345",
    dob: str = "19800101",
    street: str = "1 Main St",
    phone: str = "5550100",
    kin: str = "Doe^Jane",
) -> bytes:
    """An ADT message from the hospital, with the default delimiters."""
    return hl7_message(
        control_id,
        f"ADT^{event}",
        sent_at=SENT_AT,
        segments=[
            f"EVN|{event}|{SENT_AT}",
            f"PID|1||{mrn}^^^Hospital||{family}^{given}||{dob}|M|||{street}^^City^ST^12345"
            f"||{phone}",
            f"NK1|1|{kin}|SPOUSE",
        ],
    )


def header(receiver: str, message_type: str = "ADT^A04") -> str:
    """A template's MSH line, towards ``receiver``."""
    return (
        f"MSH|^~\\&|UDSGATEWAY|TEST|{receiver}|{receiver}FAC|{{{{ now }}}}||{message_type}"
        "|{{ control_id }}|P|2.5\n"
    )


def sent_header(
    receiver: str, control_id: str, message_type: str = "ADT^A04", now: str = NOW
) -> str:
    """The MSH line that ``header(receiver)`` renders to (at ``now``)."""
    return (
        f"MSH|^~\\&|UDSGATEWAY|TEST|{receiver}|{receiver}FAC|{now}||{message_type}"
        f"|{control_id}|P|2.5\r"
    )


#: A segment carrying the trigger's MSH-10, so a test can tell the messages apart.
TRIGGER_ID = 'ZTR|{{ msg["MSH-10"] }}\n'


def trigger_ids(payloads: list[bytes]) -> list[str]:
    """The trigger MSH-10 in each payload's ZTR segment."""
    found = []
    for payload in payloads:
        match = re.search(rb"\rZTR\|([^\r]*)\r", payload)
        assert match is not None, f"no ZTR segment in {payload!r}"
        found.append(match.group(1).decode())
    return found


def ack_fields(ack: bytes) -> dict[str, Any]:
    """MSA-1, MSA-2, ERR-3.1 and ERR-7 of an ACK (read by ``read_ack``)."""
    reply = read_ack(ack)
    return {
        "code": reply.code,
        "control_id": reply.control_id,
        "error": reply.error_code,
        "diagnostic": reply.diagnostic,
    }


def answered(connection: Connection) -> Callable[[], bool]:
    """True once something was written back on ``connection``."""
    return lambda: connection.transport.value() != b""


def gateway(test: SynchronousTestCase, *apps: App, **options: Any) -> FlowGateway:
    """A FlowGateway for ``test``, stopped in its cleanup."""
    running = FlowGateway(apps, **options)
    test.addCleanup(running.stop)
    return running


def states(running: FlowGateway) -> list[tuple[str, str, int, str]]:
    """(flow_id, state, step, error) of every execution, in creation order."""
    return [
        (row["flow_id"], row["state"], row["step"], row["error"])
        for row in running.rows(schema.executions)
    ]


class ExecutionStateTests(SynchronousTestCase):
    """The execution state machine: pending -> waiting -> (next action) -> done, or failed."""

    def test_pending_waiting_done(self) -> None:
        """A stored message's execution is pending until the executor runs it, waiting
        while its delivery is out, done once the destination answered AA."""
        running = gateway(
            self,
            app(
                flow("one", "ADT^A04", [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)])
            ),
            autorun=False,
        )
        destination = running.peer(2601)
        destination.latency = 1.0

        ack = running.send(adt("MSG1"))
        self.assertEqual(ack_fields(ack)["code"], "AA")
        self.assertEqual(states(running), [("FLWONE", "pending", 0, "")])
        self.assertEqual(running.rows(schema.deliveries), [])

        running.executor.wake()
        self.assertEqual(states(running), [("FLWONE", "waiting", 0, "")])
        running.run_until(lambda: len(destination.received) == 1)
        self.assertEqual(states(running), [("FLWONE", "waiting", 0, "")])

        running.clock.advance(1.0)
        self.assertEqual(states(running), [("FLWONE", "done", 0, "")])
        self.assertEqual(
            destination.received, [(sent_header("A", "OUT1") + "ZTR|MSG1\r").encode()]
        )
        (delivery,) = running.rows(schema.deliveries)
        self.assertEqual(
            (delivery["state"], delivery["response_code"], delivery["control_id"]),
            ("delivered", "AA", "OUT1"),
        )

    def test_second_action_uses_the_first_response(self) -> None:
        """The second action is rendered only once the first was answered, from that
        answer: responses[0]["MSA-2"], actions.first["MSA-1"], actions.first["MSH-10"]."""
        second = (
            header("B")
            + 'PID|1||{{ msg["PID-3.1"] }}||{{ msg["PID-5"] }}\n'
            + 'ZAK|{{ responses[0]["MSA-2"] }}|{{ actions.first["MSA-1"] }}'
            + '|{{ actions.first["MSH-10"] }}|{{ responses.size }}\n'
        )
        running = gateway(
            self,
            app(
                flow(
                    "chain",
                    "ADT^A04",
                    [
                        action("first", 2601, "ADT^A04", header("A") + TRIGGER_ID),
                        action("second", 2602, "ADT^A08", second.replace("ADT^A04", "ADT^A08")),
                    ],
                )
            ),
        )
        first_peer, second_peer = running.peer(2601), running.peer(2602)
        first_peer.latency = 5.0
        second_peer.latency = 1.0

        running.send(adt("MSG1", family="O\\S\\Brien", given="Mary"))
        running.run_until(lambda: len(first_peer.received) == 1)
        self.assertEqual(states(running), [("FLWCHAIN", "waiting", 0, "")])
        running.clock.advance(4.9)
        self.assertEqual(second_peer.received, [])

        running.run_until(lambda: len(second_peer.received) == 1)
        self.assertEqual(states(running), [("FLWCHAIN", "waiting", 1, "")])
        running.settle()
        self.assertEqual(states(running), [("FLWCHAIN", "done", 1, "")])
        self.assertEqual(first_peer.received, [(sent_header("A", "OUT1") + "ZTR|MSG1\r").encode()])
        # The peer's ACK to OUT1 is "MSH|...|ACK|ROUT1|...\rMSA|AA|OUT1\r".
        self.assertEqual(
            second_peer.received,
            [
                (
                    # Rendered when the first answer came, 5 s after the start.
                    sent_header("B", "OUT2", "ADT^A08", now="20231114221325")
                    + "PID|1||12345||O\\S\\Brien^Mary\r"
                    + "ZAK|OUT1|AA|ROUT1|1\r"
                ).encode()
            ],
        )
        self.assertEqual(
            [(row["step"], row["state"]) for row in running.rows(schema.deliveries)],
            [(0, "delivered"), (1, "delivered")],
        )

    def test_template_errors_hold_their_execution_only(self) -> None:
        """A template that fails to render, or does not compile, holds that flow's
        execution with the reason (logged, for an operator); the other flow of the
        message is delivered."""
        running = gateway(
            self,
            app(
                flow(
                    "good", "ADT^A04", [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)]
                ),
                flow(
                    "joins",
                    "ADT^A04",
                    [
                        action(
                            "send",
                            2602,
                            "ADT^A04",
                            header("B") + 'PID|{{ msg["PID-3"] | join: "," }}\n',
                        )
                    ],
                ),
                flow(
                    "syntax",
                    "ADT^A04",
                    [action("send", 2603, "ADT^A04", header("C") + "PID|{% if %}\n")],
                ),
            ),
        )
        ack = running.send(adt("MSG1"))
        running.settle()

        self.assertEqual(ack_fields(ack)["code"], "AA")
        self.assertEqual(
            states(running),
            [
                ("FLWGOOD", "done", 0, ""),
                (
                    "FLWJOINS",
                    "held",
                    0,
                    "action send: join expected an array, found WireText (template line 2)",
                ),
                ("FLWSYNTAX", "held", 0, "template: line 2: missing expression"),
            ],
        )
        self.assertEqual(trigger_ids(running.peer(2601).received), ["MSG1"])
        self.assertEqual(running.peer(2602).received + running.peer(2603).received, [])
        self.assertEqual((running.executor.failed, running.executor.held), (0, 2))
        # The per-flow counters (metrics, status): each flow's own outcome.
        self.assertEqual(
            running.executor.flow_executions,
            {"FLWGOOD": {"done": 1}, "FLWJOINS": {"held": 1}, "FLWSYNTAX": {"held": 1}},
        )
        self.assertEqual(
            running.executor.flow_actions,
            {"FLWGOOD": {"rendered": 1}, "FLWJOINS": {"held": 1}, "FLWSYNTAX": {"held": 1}},
        )
        self.assertEqual(
            dict(running.ingest.stats.routed), {"FLWGOOD": 1, "FLWJOINS": 1, "FLWSYNTAX": 1}
        )
        failed_logs = [
            (row["flow_id"], row["control_id"], row["reason"])
            for row in running.rows(schema.logs)
            if row["event"] == "execution" and row["outcome"] == "held"
        ]
        self.assertEqual(
            failed_logs,
            [
                (
                    "FLWJOINS",
                    "MSG1",
                    "action send: join expected an array, found WireText (template line 2)",
                ),
                ("FLWSYNTAX", "MSG1", "template: line 2: missing expression"),
            ],
        )

    def test_a_message_that_breaks_its_template_every_time(self) -> None:
        """A message that breaks its template every time holds its execution with the
        reason, once; the lane goes on with the next message, and the other flow of the
        same message type is unaffected."""
        dated = header("A") + TRIGGER_ID + 'ZDT|{{ msg["PID-7"] | hl7_date: "%Y%m%d" }}\n'
        running = gateway(
            self,
            app(
                flow("dated", "ADT^A04", [action("send", 2601, "ADT^A04", dated)]),
                flow(
                    "plain", "ADT^A04", [action("send", 2602, "ADT^A04", header("B") + TRIGGER_ID)]
                ),
            ),
        )
        bad = adt("MSG2", dob="unknown")
        for message in (adt("MSG1"), bad, adt("MSG3"), bad, adt("MSG4", dob="unknown")):
            self.assertEqual(ack_fields(running.send(message))["code"], "AA")
            running.settle()

        reason = "action send: hl7_date: the value is not a date (template line 3)"
        self.assertEqual(
            [(flow_id, state, error) for flow_id, state, _step, error in states(running)],
            [
                ("FLWDATED", "done", ""),
                ("FLWPLAIN", "done", ""),
                ("FLWDATED", "held", reason),
                ("FLWPLAIN", "done", ""),
                ("FLWDATED", "done", ""),
                ("FLWPLAIN", "done", ""),
                # The resent MSG2 was a duplicate: its stored ACK replayed, no new execution.
                ("FLWDATED", "held", reason),
                ("FLWPLAIN", "done", ""),
            ],
        )
        self.assertEqual(trigger_ids(running.peer(2601).received), ["MSG1", "MSG3"])
        self.assertEqual(
            trigger_ids(running.peer(2602).received), ["MSG1", "MSG2", "MSG3", "MSG4"]
        )
        self.assertEqual(running.rows(schema.deliveries)[0]["payload"].count(b"ZDT|19800101\r"), 1)


class BackpressureTests(SynchronousTestCase):
    """docs/guarantees.md: a destination that refuses connections keeps its messages
    queued; inbound messages are ACKed until its queue cap, then NAKed 207."""

    def test_nak_207_at_the_queue_cap_then_aa_after_draining(self) -> None:
        running = gateway(
            self,
            app(
                flow("one", "ADT^A04", [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)])
            ),
        )
        running.outbound.dispatcher.max_queued_per_destination = 2
        destination = running.peer(2601)
        destination.accepting = False

        codes = []
        for number in range(1, 5):
            reply = ack_fields(running.send(adt(f"MSG{number}")))
            codes.append((reply["code"], reply["error"]))
            running.clock.advance(1)
        self.assertEqual(codes, [("AA", None), ("AA", None), ("AR", 207), ("AR", 207)])
        self.assertEqual(len(running.rows(schema.deliveries)), 2, "NAKed messages not stored")

        destination.accepting = True
        running.settle()
        self.assertEqual(trigger_ids(destination.received), ["MSG1", "MSG2"])
        self.assertEqual(ack_fields(running.send(adt("MSG5")))["code"], "AA")
        running.run_until(lambda: len(destination.received) == 3)
        self.assertEqual(trigger_ids(destination.received), ["MSG1", "MSG2", "MSG5"])


class OrderingTests(SynchronousTestCase):
    """G2: each action's destination gets the messages in arrival order."""

    def test_arrival_order_per_action_lane(self) -> None:
        """Thirty messages through a two-action chain and a one-action flow, with
        destination answers of varying latency and small executor batches: every
        destination receives them in arrival order, each once."""
        running = gateway(
            self,
            app(
                flow(
                    "chain",
                    "ADT^A04",
                    [
                        action("first", 2601, "ADT^A04", header("A") + TRIGGER_ID),
                        action(
                            "second",
                            2602,
                            "ADT^A04",
                            header("B") + TRIGGER_ID + 'ZAK|{{ actions.first["MSA-2"] }}\n',
                        ),
                    ],
                ),
                flow(
                    "single",
                    "ADT^A04",
                    [action("send", 2603, "ADT^A04", header("C") + TRIGGER_ID)],
                ),
            ),
        )
        running.executor.batch_size = 3
        latencies = itertools.cycle([0.5, 0.0, 2.0, 0.1, 0.0, 1.3])

        def varying(connection: PeerConnection, payload: bytes) -> None:
            connection.reply(destination_ack(control_id_of(payload)), next(latencies))

        for port in (2601, 2602, 2603):
            running.peer(port).script = varying
        sent = [f"MSG{number:02d}" for number in range(30)]
        for number, control_id in enumerate(sent):
            self.assertEqual(ack_fields(running.send(adt(control_id)))["code"], "AA")
            if number % 4 == 0:
                running.clock.advance(0.3)
        running.settle()

        for port in (2601, 2602, 2603):
            self.assertEqual(trigger_ids(running.peer(port).received), sent, f"port {port}")
        deliveries = running.rows(schema.deliveries)
        self.assertEqual({row["state"] for row in deliveries}, {"delivered"})
        for lane in {row["lane"] for row in deliveries}:
            in_lane = [row for row in deliveries if row["lane"] == lane]
            self.assertEqual(trigger_ids([row["payload"] for row in in_lane]), sent, lane)
        self.assertEqual({row["state"] for row in running.rows(schema.executions)}, {"done"})

    def test_ordering_key_gives_one_lane_per_value(self) -> None:
        """With an ordering key, a held head blocks only its own key's lane; the other
        patient's messages keep flowing in order. Lane names carry a hash, not the value."""
        running = gateway(
            self,
            app(
                flow(
                    "keyed",
                    "ADT^A04",
                    [
                        action(
                            "send",
                            2601,
                            "ADT^A04",
                            header("A") + TRIGGER_ID,
                            ordering_key="PID-3.1",
                        )
                    ],
                )
            ),
        )

        def reject_mrn_111(connection: PeerConnection, payload: bytes) -> None:
            code = "AR" if b"|MSGA" in payload else "AA"
            connection.reply(destination_ack(control_id_of(payload), code))

        running.peer(2601).script = reject_mrn_111
        order = [("MSGA1", "111"), ("MSGB1", "222"), ("MSGA2", "111"), ("MSGB2", "222")]
        order += [("MSGB3", "222"), ("MSGA3", "111")]
        for control_id, mrn in order:
            running.send(adt(control_id, mrn=mrn))
        running.run_until(lambda: len(running.peer(2601).received) == 4)
        running.clock.advance(60)

        self.assertEqual(
            trigger_ids(running.peer(2601).received), ["MSGA1", "MSGB1", "MSGB2", "MSGB3"]
        )
        lanes = {row["lane"] for row in running.rows(schema.deliveries)}
        self.assertEqual(lanes, {lane_name("FLWKEYED", 0, "111"), lane_name("FLWKEYED", 0, "222")})
        for lane in lanes:
            self.assertRegex(lane, r"^FLWKEYED/0#[0-9a-f]{16}$")
        self.assertEqual(
            [(row["state"], row["step"]) for row in running.rows(schema.executions)],
            [
                ("waiting", 0),
                ("done", 0),
                ("waiting", 0),
                ("done", 0),
                ("done", 0),
                ("waiting", 0),
            ],
        )


def statements(running: FlowGateway) -> list[str]:
    """Every SQL statement the gateway runs from now on (its one SQLite connection)."""
    seen: list[str] = []

    def trace(connection: Any) -> None:
        connection.connection.dbapi_connection.set_trace_callback(seen.append)

    running.database.transaction_now(trace)
    return seen


class FoldTests(SynchronousTestCase):
    """The fold: a new message's first action is rendered before its commit and
    enqueued in it, unless older executions of its flow still wait for theirs."""

    def one_flow(self, **options: Any) -> FlowGateway:
        return gateway(
            self,
            app(
                flow("one", "ADT^A04", [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)])
            ),
            **options,
        )

    def test_first_action_is_enqueued_in_the_inbound_commit(self) -> None:
        """The message, its execution (already waiting) and its delivery go in one
        transaction; the executor never reads the message back."""
        running = self.one_flow()
        running.peer(2601).latency = 1.0
        seen = statements(running)

        self.assertEqual(ack_fields(running.send(adt("MSG1")))["code"], "AA")
        self.assertEqual(states(running), [("FLWONE", "waiting", 0, "")])
        (delivery,) = running.rows(schema.deliveries)
        self.assertEqual(delivery["state"], "queued")
        begin = [i for i, sql in enumerate(seen) if sql == "BEGIN IMMEDIATE"]
        stored = next(i for i, sql in enumerate(seen) if sql.startswith("INSERT INTO messages"))
        enqueued = next(i for i, sql in enumerate(seen) if sql.startswith("INSERT INTO deliver"))
        commit = next(i for i, sql in enumerate(seen) if i > stored and sql == "COMMIT")
        self.assertLess(max(i for i in begin if i < stored), stored)
        self.assertLess(enqueued, commit)
        self.assertFalse([sql for sql in seen if "messages.raw" in sql], "executor read")

        running.settle()
        self.assertEqual(trigger_ids(running.peer(2601).received), ["MSG1"])
        self.assertEqual(states(running), [("FLWONE", "done", 0, "")])

    def test_older_pending_executions_keep_their_place(self) -> None:
        """A message stored while older ones of its flow wait for the executor is not
        folded: the executor enqueues them all, oldest first (G2)."""
        running = self.one_flow(autorun=False)
        for control_id in ("MSG1", "MSG2"):
            self.assertEqual(ack_fields(running.send(adt(control_id)))["code"], "AA")
        running.autorun = True
        self.assertEqual(ack_fields(running.send(adt("MSG3")))["code"], "AA")
        running.settle()

        self.assertEqual(trigger_ids(running.peer(2601).received), ["MSG1", "MSG2", "MSG3"])
        queued = running.rows(schema.deliveries)
        self.assertEqual(trigger_ids([row["payload"] for row in queued]), ["MSG1", "MSG2", "MSG3"])
        # Once the executor caught up, the next message folds again.
        self.assertEqual(ack_fields(running.send(adt("MSG4")))["code"], "AA")
        self.assertEqual(states(running)[-1], ("FLWONE", "waiting", 0, ""))

    def test_pending_executions_of_a_previous_run_go_first(self) -> None:
        """Executions a stopped gateway left pending are enqueued by the next one's
        executor at start, before the first new message, which then folds again."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        url = f"sqlite:///{directory / 'gateway.db'}"
        before = self.one_flow(database_url=url, autorun=False)
        for control_id in ("MSG1", "MSG2"):
            self.assertEqual(ack_fields(before.send(adt(control_id)))["code"], "AA")
        before.stop()

        after = self.one_flow(database_url=url)
        self.assertEqual([state for _f, state, _s, _e in states(after)], ["waiting"] * 2)
        self.assertEqual(ack_fields(after.send(adt("MSG3")))["code"], "AA")
        self.assertEqual(states(after)[-1], ("FLWONE", "waiting", 0, ""))
        after.settle()
        self.assertEqual(trigger_ids(after.peer(2601).received), ["MSG1", "MSG2", "MSG3"])

    def test_which_executions_the_store_folds(self) -> None:
        """Folded: a first action given for a flow with nothing pending at step 0.
        Not: a flow with an older execution pending at step 0, in the store or
        earlier in the group, nor a duplicate. Other flows and later steps do not
        block."""
        running = self.one_flow()
        database = running.database

        def commit(*records: Any) -> list[CommitResult]:
            return database.transaction_now(inbound.commit_inbound, list(records))

        def delivery(lane: str) -> NewDelivery:
            return NewDelivery(lane, "tcp:host=dest.example:port=2575", "mllp", lane, b"", {})

        (alone,) = commit(evolve(inbound_record("R1", flows=("F",)), first=(delivery("d1"),)))
        self.assertEqual((alone.folded[0][1].lane, alone.pending), ("d1", False))
        self.assertEqual(alone.folded[0][0], alone.execution_ids[0])

        unrendered, after, other = commit(
            evolve(inbound_record("R2", flows=("F",)), first=(None,)),
            evolve(inbound_record("R3", flows=("F",)), first=(delivery("d3"),)),
            evolve(inbound_record("R4", flows=("G",)), first=(delivery("d4"),)),
        )
        self.assertEqual((unrendered.folded, unrendered.pending), ((), True))
        self.assertEqual((after.folded, after.pending), ((), True))
        self.assertEqual(([d.lane for _e, d in other.folded], other.pending), (["d4"], False))

        (blocked,) = commit(evolve(inbound_record("R5", flows=("F",)), first=(delivery("d5"),)))
        self.assertEqual((blocked.folded, blocked.pending), ((), True))

        database.transaction_now(
            lambda connection: connection.execute(
                schema.executions.update()
                .where(schema.executions.c.state == "pending")
                .values(step=1)
            )
        )
        (later_step,) = commit(evolve(inbound_record("R6", flows=("F",)), first=(delivery("d6"),)))
        self.assertEqual([d.lane for _e, d in later_step.folded], ["d6"])

        (again,) = commit(evolve(inbound_record("R1", flows=("F",)), first=(delivery("d1"),)))
        self.assertEqual((again.outcome, again.folded), (CommitOutcome.REPLAY, ()))
        self.assertEqual(
            [(row["flow_id"], row["state"]) for row in running.rows(schema.executions)],
            [
                ("F", "waiting"),
                ("F", "pending"),
                ("F", "pending"),
                ("G", "waiting"),
                ("F", "pending"),
                ("F", "waiting"),
            ],
        )

    def test_nothing_rendered_before_the_executor_looked(self) -> None:
        """An executor that has not yet looked at the store (recovery) renders nothing
        before a commit; after a look that finds no backlog, it does."""
        running = self.one_flow()
        fresh = Executor(
            running.database, running.outbound.dispatcher, running.clock, ControlIdSource("X")
        )
        fresh.load(running.database.transaction_now(load_apps, None))
        self.assertEqual(fresh.first_actions("test", ("FLWONE",), adt("MSG1")), ())
        fresh.wake()
        (rendered,) = fresh.first_actions("test", ("FLWONE",), adt("MSG1"))
        assert rendered is not None
        self.assertEqual(trigger_ids([rendered.payload]), ["MSG1"])
        self.assertEqual(rendered.lane, lane_name("FLWONE", 0))
        # A flow that is not loaded, or a trigger that does not parse, is left to the
        # executor, which reports it as for any other execution.
        self.assertEqual(fresh.first_actions("test", ("FLWNONE",), adt("MSG1")), (None,))
        self.assertEqual(fresh.first_actions("test", ("FLWONE",), b"not HL7 at all"), ())


class AfterActionsAckTests(SynchronousTestCase):
    """A flow whose trigger says ``ack = "after_actions"``: the sender's ACK reflects
    the action chain's outcome, within the flow's ``ack_timeout``."""

    def chain(self, second_template: str | None = None, ack_timeout: float = 30.0) -> FlowGateway:
        """A gateway with one "after actions" flow: two actions to ports 2601 and 2602."""
        return gateway(
            self,
            app(
                flow(
                    "waits",
                    "ADT^A04",
                    [
                        action("first", 2601, "ADT^A04", header("A") + TRIGGER_ID),
                        action(
                            "second",
                            2602,
                            "ADT^A04",
                            second_template or header("B") + TRIGGER_ID,
                            response_timeout=60.0,
                        ),
                    ],
                    ack="after_actions",
                    ack_timeout=ack_timeout,
                )
            ),
        )

    def assert_replayed(self, running: FlowGateway, message: bytes, ack: bytes) -> None:
        """A resend of ``message`` gets ``ack`` again, byte for byte, at once."""
        (stored,) = running.messages()
        self.assertEqual(stored.ack, ack)
        self.assertEqual(running.send(message), ack)
        self.assertEqual(len(running.messages()), 1)

    def test_aa_when_the_chain_is_done(self) -> None:
        """No answer while the actions run; AA once the last one is delivered. The
        stored ACK becomes the one sent, so a resend replays it."""
        running = self.chain()
        running.peer(2601).latency = 2.0
        running.peer(2602).latency = 3.0
        connection = running.connect()
        message = adt("MSG1")

        connection.send(b"\x0b" + message + b"\x1c\r")
        self.assertEqual(connection.received(), b"")
        running.run_until(lambda: len(running.peer(2602).received) == 1)
        self.assertEqual(connection.received(), b"")
        self.assertEqual(states(running), [("FLWWAITS", "waiting", 1, "")])

        running.clock.advance(3.0)
        framed = connection.received()
        ack = framed[1:-2]
        self.assertEqual(
            ack_fields(ack), {"code": "AA", "control_id": "MSG1", "error": None, "diagnostic": ""}
        )
        self.assertEqual(states(running), [("FLWWAITS", "done", 1, "")])
        self.assert_replayed(running, message, ack)

    def test_ae_207_when_an_action_fails(self) -> None:
        """The second action's template fails after the first was delivered: AE with
        ERR-3 207 and the reason; the stored ACK is that AE."""
        running = self.chain(second_template=header("B") + 'PID|{{ msg["PID-3"] | join: "," }}\n')
        connection = running.connect()
        message = adt("MSG1")
        connection.send(b"\x0b" + message + b"\x1c\r")
        self.assertEqual(connection.received(), b"")
        running.settle()
        ack = connection.received()[1:-2]
        (stored,) = running.messages()

        self.assertEqual(
            ack_fields(ack),
            {
                "code": "AE",
                "control_id": "MSG1",
                "error": 207,
                "diagnostic": "actions held: action second: join expected an array, "
                "found WireText (template line 2)",
            },
        )
        self.assertEqual(stored.ack_code, "AE")
        self.assertEqual(trigger_ids(running.peer(2601).received), ["MSG1"])
        self.assert_replayed(running, message, ack)

    def test_ae_207_when_a_delivery_is_held(self) -> None:
        """The second destination rejects (AR, held by the default policy): AE 207."""
        running = self.chain()
        running.peer(2602).script = answer_with("AR", 206)
        connection = running.connect()
        message = adt("MSG1")
        connection.send(b"\x0b" + message + b"\x1c\r")
        running.run_until(answered(connection))
        ack = connection.received()[1:-2]

        self.assertEqual(
            ack_fields(ack),
            {
                "code": "AE",
                "control_id": "MSG1",
                "error": 207,
                "diagnostic": "actions held: AR from destination, ERR 206",
            },
        )
        self.assertEqual(states(running), [("FLWWAITS", "waiting", 1, "")])
        self.assert_replayed(running, message, ack)
        self.assertEqual(running.executor.flow_executions, {"FLWWAITS": {"held": 1}})
        self.assertEqual(running.executor.flow_actions, {"FLWWAITS": {"rendered": 2}})

    def test_ae_207_at_the_timeout(self) -> None:
        """A destination that never answers: AE 207 exactly at the flow's ack_timeout."""
        running = self.chain(ack_timeout=5.0)
        running.peer(2602).script = never_answer
        connection = running.connect()
        message = adt("MSG1")
        connection.send(b"\x0b" + message + b"\x1c\r")
        running.run_until(lambda: len(running.peer(2602).received) == 1)
        self.assertEqual(running.clock.seconds(), START)

        running.clock.advance(4.5)
        self.assertEqual(connection.received(), b"")
        running.clock.advance(0.5)
        ack = connection.received()[1:-2]
        self.assertEqual(
            ack_fields(ack),
            {
                "code": "AE",
                "control_id": "MSG1",
                "error": 207,
                "diagnostic": "actions did not finish within 5s",
            },
        )
        self.assertEqual(states(running), [("FLWWAITS", "waiting", 1, "")])
        self.assert_replayed(running, message, ack)

    def test_resend_while_the_actions_run_waits_for_their_outcome(self) -> None:
        """G3 with "after actions": a resend that arrives while the chain runs is not
        given the provisional AA (never sent); it gets the chain's ACK, like the
        original, and the message is processed once."""
        running = self.chain()
        running.peer(2601).latency = 2.0
        running.peer(2602).latency = 3.0
        message = adt("MSG1")
        first = running.connect(40001)
        first.send(b"\x0b" + message + b"\x1c\r")
        running.run_until(lambda: len(running.peer(2601).received) == 1)
        (stored,) = running.messages()
        self.assertEqual((stored.ack_code, stored.ack), ("", b""), "not decided yet")

        again = running.connect(40002)
        again.send(b"\x0b" + message + b"\x1c\r")
        running.clock.advance(0)
        self.assertEqual(again.received(), b"")
        running.run_until(lambda: answered(first)() and answered(again)())
        for connection in (first, again):
            ack = connection.received()[1:-2]
            self.assertEqual(ack_fields(ack)["code"], "AA")
            self.assertEqual(ack_fields(ack)["control_id"], "MSG1")
        self.assertEqual(trigger_ids(running.peer(2601).received), ["MSG1"])
        self.assertEqual(trigger_ids(running.peer(2602).received), ["MSG1"])
        (stored,) = running.messages()
        self.assertEqual(stored.ack_code, "AA")
        self.assert_replayed(running, message, stored.ack)

    def test_resend_in_the_same_group_as_the_original(self) -> None:
        """The original and its resend committed in one group: the resend waits too."""
        running = self.chain()
        message = adt("MSG1")
        first, again = running.connect(40001), running.connect(40002)
        first.send(b"\x0b" + message + b"\x1c\r")
        again.send(b"\x0b" + message + b"\x1c\r")
        self.assertEqual((first.received(), again.received()), (b"", b""))
        running.settle()
        running.run_until(lambda: answered(first)() and answered(again)())
        codes = [ack_fields(c.received()[1:-2])["code"] for c in (first, again)]
        self.assertEqual(codes, ["AA", "AA"])
        self.assertEqual(len(running.messages()), 1)

    def test_resend_after_an_unsaved_outcome_is_decided_from_the_store(self) -> None:
        """The chain finished but its ACK was never stored (the gateway stopped in
        between): a resend gets the outcome at once, from the executions' states."""
        for template, code, diagnostic in (
            (None, "AA", ""),
            (
                header("B") + 'PID|{{ msg["PID-3"] | join: "," }}\n',
                "AE",
                "actions held: action second: join expected an array, "
                "found WireText (template line 2)",
            ),
        ):
            running = self.chain(second_template=template)
            message = adt("MSG1")
            running.connect().send(b"\x0b" + message + b"\x1c\r")
            running.settle()
            (stored,) = running.messages()
            running.database.transaction_now(messages.update_ack, stored.id, "", b"")

            ack = running.send(message)
            fields = ack_fields(ack)
            self.assertEqual((fields["code"], fields["diagnostic"]), (code, diagnostic))
            (stored,) = running.messages()
            self.assertEqual((stored.ack_code, stored.ack), (code, ack))

    def test_resend_when_the_executions_cannot_be_read(self) -> None:
        """The store cannot be read for a pending resend: AE 207, and nothing is stored,
        so the original's outcome is still the one kept."""
        running = self.chain()
        running.peer(2601).latency = 2.0
        message = adt("MSG1")
        first = running.connect(40001)
        first.send(b"\x0b" + message + b"\x1c\r")
        running.clock.advance(0)

        def unreadable(_connection: object, _message_id: int) -> None:
            raise RuntimeError("db down")

        self.patch(executions, "execution_states", unreadable)

        fields = ack_fields(running.send(message))
        self.assertEqual(
            (fields["code"], fields["error"], fields["diagnostic"]),
            ("AE", 207, "actions' outcome could not be read"),
        )
        self.assertEqual(running.messages()[0].ack_code, "")
        self.flushLoggedErrors(RuntimeError)
        running.run_until(answered(first))
        self.assertEqual(ack_fields(first.received()[1:-2])["code"], "AA")
        self.assertEqual(running.messages()[0].ack_code, "AA")

    def test_the_other_watches_end_quietly(self) -> None:
        """A message for two "after actions" flows: one fails at once, so the AE goes at
        once; the other flow's wait is dropped without an unhandled error when its
        timeout passes."""
        running = gateway(
            self,
            app(
                flow(
                    "fails",
                    "ADT^A04",
                    [action("send", 2601, "ADT^A04", header("A") + "PID|{% if %}\n")],
                    ack="after_actions",
                    ack_timeout=5.0,
                ),
                flow(
                    "stalls",
                    "ADT^A04",
                    [
                        action(
                            "send",
                            2602,
                            "ADT^A04",
                            header("B") + TRIGGER_ID,
                            response_timeout=60.0,
                        )
                    ],
                    ack="after_actions",
                    ack_timeout=5.0,
                ),
            ),
        )
        running.peer(2602).script = never_answer
        ack = running.send(adt("MSG1"))
        self.assertEqual(
            ack_fields(ack),
            {
                "code": "AE",
                "control_id": "MSG1",
                "error": 207,
                "diagnostic": "actions held: template: line 2: missing expression",
            },
        )
        running.clock.advance(10.0)
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_two_flows_time_out_quietly(self) -> None:
        """A message for two "after actions" flows whose destinations never answer:
        one AE 207 at the timeout, and no unhandled error for either wait."""
        running = gateway(
            self,
            app(
                *(
                    flow(
                        name,
                        "ADT^A04",
                        [
                            action(
                                "send",
                                port,
                                "ADT^A04",
                                header("A") + TRIGGER_ID,
                                response_timeout=60.0,
                            )
                        ],
                        ack="after_actions",
                        ack_timeout=5.0,
                    )
                    for name, port in (("one", 2601), ("two", 2602))
                )
            ),
        )
        running.peer(2601).script = running.peer(2602).script = never_answer
        connection = running.connect()
        connection.send(b"\x0b" + adt("MSG1") + b"\x1c\r")
        running.clock.advance(5.0)
        self.assertEqual(
            ack_fields(connection.received()[1:-2]),
            {
                "code": "AE",
                "control_id": "MSG1",
                "error": 207,
                "diagnostic": "actions did not finish within 5s",
            },
        )
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_on_commit_flows_answer_at_once(self) -> None:
        """The default timing: AA as soon as the message is committed, actions or not."""
        running = gateway(
            self,
            app(
                flow("now", "ADT^A04", [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)])
            ),
        )
        running.peer(2601).script = never_answer
        ack = running.send(adt("MSG1"))
        self.assertEqual(ack_fields(ack)["code"], "AA")
        self.assertEqual(running.peer(2601).received, [])


class LogTests(SynchronousTestCase):
    maxDiff = None
    """``udsgateway logs``: one line per event, with what an operator needs."""

    def test_logs_command_shows_every_field(self) -> None:
        """Time, App ID (joined from the flow), Flow ID, control ID, type, action,
        attempt, outcome, ACK code and reason, for receipts, attempts and executions."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        url = f"sqlite:///{directory / 'gateway.db'}"
        config = directory / "gateway.toml"
        config.write_text(
            f'[gateway]\ndatabase = "{url}"\n\n[[tenants]]\nname = "test"\n'
            'listen = "tcp:port=0:interface=127.0.0.1"\n',
            encoding="utf-8",
        )
        running = gateway(
            self,
            app(
                flow(
                    "chain",
                    "ADT^A04",
                    [
                        action("first", 2601, "ADT^A04", header("A") + TRIGGER_ID),
                        action("second", 2602, "ADT^A04", header("B") + TRIGGER_ID),
                    ],
                ),
                flow(
                    "broken",
                    "ADT^A04",
                    [
                        action(
                            "send",
                            2603,
                            "ADT^A04",
                            header("C") + 'PID|{{ msg["PID-3"] | join: "," }}\n',
                        )
                    ],
                ),
            ),
            database_url=url,
        )

        def nak_first(connection: PeerConnection, payload: bytes) -> None:
            if len(connection.peer.received) == 1:
                connection.reply(destination_ack(control_id_of(payload), "AE", 207))
            else:
                connection.reply(destination_ack(control_id_of(payload)))

        running.peer(2601).script = nak_first
        running.send(adt("MSG1"))
        running.settle()

        out = io.StringIO()
        self.assertEqual(
            cli.main(["--config", str(config), "logs", "--json", "--tail", "100"], out=out), 0
        )
        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        for row in rows:
            del row["id"]
        when = "2023-11-14 22:13:20"
        retried = "2023-11-14 22:13:21"  # one second of backoff after the AE
        common = {"app_id": "APPFLOWTEST", "type": "ADT^A04"}
        self.assertEqual(
            rows,
            [
                {
                    **common,
                    "time": when,
                    "event": "received",
                    "outcome": "accepted",
                    "app_id": "",
                    "flow_id": "",
                    "control_id": "MSG1",
                    "action": None,
                    "attempt": None,
                    "ack": "AA",
                    "reason": "",
                },
                {
                    **common,
                    "time": when,
                    "event": "execution",
                    "outcome": "held",
                    "flow_id": "FLWBROKEN",
                    "control_id": "MSG1",
                    "action": 0,
                    "attempt": None,
                    "ack": "",
                    "reason": "action send: join expected an array, found WireText "
                    "(template line 2)",
                },
                {
                    **common,
                    "time": when,
                    "event": "delivery",
                    "outcome": "retry",
                    "flow_id": "FLWCHAIN",
                    "control_id": "OUT1",
                    "action": 0,
                    "attempt": 1,
                    "ack": "AE",
                    "reason": "AE (retry 1)",
                },
                {
                    **common,
                    "time": retried,
                    "event": "delivery",
                    "outcome": "delivered",
                    "flow_id": "FLWCHAIN",
                    "control_id": "OUT1",
                    "action": 0,
                    "attempt": 2,
                    "ack": "AA",
                    "reason": "",
                },
                {
                    **common,
                    "time": retried,
                    "event": "delivery",
                    "outcome": "delivered",
                    "flow_id": "FLWCHAIN",
                    # OUT2 and OUT3 went to the broken flow's header before its
                    # template failed: once rendered before the commit (the fold),
                    # once by the executor, which holds the execution.
                    "control_id": "OUT4",
                    "action": 1,
                    "attempt": 1,
                    "ack": "AA",
                    "reason": "",
                },
                {
                    **common,
                    "time": retried,
                    "event": "execution",
                    "outcome": "done",
                    "flow_id": "FLWCHAIN",
                    "control_id": "MSG1",
                    "action": 1,
                    "attempt": None,
                    "ack": "",
                    "reason": "",
                },
            ],
        )

        out = io.StringIO()
        cli.main(["--config", str(config), "logs", "--json", "--status", "held"], out=out)
        self.assertEqual(
            [json.loads(line)["flow_id"] for line in out.getvalue().splitlines()], ["FLWBROKEN"]
        )


#: Planted in every patient field; no log may ever contain it (G6).
MARKER = "ZZMARKER"


class NoPHITests(SynchronousTestCase):
    """G6 and docs/guarantees.md "Security": with marker values planted in the patient
    fields, no log event and no row of the logs (nor any reason or error column)
    contains them, whatever happens to the message."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer: ILogObserver = self.events.append  # type: ignore[assignment]
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def test_markers_appear_in_no_log(self) -> None:
        """Delivered chains, a held destination whose NAKs quote the patient, template
        failures that involve patient values, an "after actions" AE, a rejected
        message and a same-MSH-10-different-content NAK: no marker in any log."""
        body = (
            'PID|1||{{ msg["PID-3"] }}||{{ msg["PID-5"] }}||{{ msg["PID-7"] }}|||'
            '{{ msg["PID-11"] }}||{{ msg["PID-13"] }}\n'
            'NK1|1|{{ msg["NK1-2"] }}\n'
        )
        running = gateway(
            self,
            app(
                flow(
                    "chain",
                    "ADT^A04",
                    [
                        action(
                            "first", 2611, "ADT^A04", header("A") + body, ordering_key="PID-3.1"
                        ),
                        action(
                            "second",
                            2612,
                            "ADT^A04",
                            header("B") + body + 'ZAK|{{ actions.first["MSA-2"] }}\n',
                        ),
                    ],
                ),
                flow(
                    "type_from_patient",
                    "ADT^A04",
                    [
                        action(
                            "send",
                            2613,
                            "ADT^A04",
                            header("C", '{{ msg["PID-5.1"] }}^{{ msg["PID-5.2"] }}') + body,
                        )
                    ],
                    ack="after_actions",
                ),
                flow(
                    "liquid_error",
                    "ADT^A04",
                    [
                        action(
                            "send",
                            2614,
                            "ADT^A04",
                            header("D") + 'PID|{{ 5 | divided_by: msg["PID-5.1"] }}\n',
                        )
                    ],
                ),
                flow(
                    "naks",
                    "ADT^A04",
                    [action("send", 2615, "ADT^A04", header("E") + body, max_retries=1)],
                ),
            ),
        )

        def nak_quoting_the_patient(connection: PeerConnection, payload: bytes) -> None:
            control_id = control_id_of(payload)
            connection.reply(
                (
                    "MSH|^~\\&|DEST|FAC|GATEWAY|FAC|20240101000001||ACK|R1|P|2.5\r"
                    f"MSA|AE|{control_id}|ZZMARKERFAMILY unknown\r"
                    f"ERR||PID^1^5|207^Application error^HL70357|E||||ZZMARKERGIVEN rejected\r"
                ).encode()
            )

        running.peer(2615).script = nak_quoting_the_patient
        patient = {
            "family": "ZZMARKERFAMILY",
            "given": "ZZMARKERGIVEN",
            "mrn": "ZZMARKERMRN",
            "street": "ZZMARKERSTREET",
            "phone": "ZZMARKERPHONE",
            "kin": "ZZMARKERKIN^ZZMARKERKINGIVEN",
        }
        acks = []
        for control_id in ("MSG1", "MSG2"):
            connection = running.connect()
            connection.send(b"\x0b" + adt(control_id, **patient) + b"\x1c\r")
            running.run_until(answered(connection))
            acks.append(connection.received())
        acks.append(running.send(adt("MSG3", event="A99", **patient)))
        acks.append(running.send(adt("MSG1", **{**patient, "family": "ZZMARKEROTHER"})))
        running.run_until(
            lambda: len(running.peer(2612).received) == 2 and len(running.peer(2615).received) == 2
        )
        running.clock.advance(60)  # the held lane polls; nothing more is sent

        # The scenario did what it says.
        self.assertEqual([ack_fields(a[1:-2])["code"] for a in acks[:2]], ["AE", "AE"])
        self.assertEqual([ack_fields(a)["error"] for a in acks[2:]], [201, 205])
        self.assertEqual(len(running.peer(2611).received), 2)
        self.assertEqual(len(running.peer(2612).received), 2)
        self.assertEqual(len(running.peer(2615).received), 2)  # MSG1: AE, AE; MSG2 waits
        self.assertIn(b"ZZMARKERFAMILY", running.peer(2612).received[0])
        self.assertEqual(
            [(row["flow_id"], row["state"]) for row in running.rows(schema.executions)][:4],
            [
                ("FLWCHAIN", "done"),
                ("FLWTYPEFROMPATIENT", "held"),
                ("FLWLIQUIDERROR", "held"),
                ("FLWNAKS", "waiting"),
            ],
        )
        self.assertTrue(self.events)

        leaks = []
        for event in self.events:
            text = formatEvent(event) + repr(event)
            failure = event.get("log_failure")
            if failure is not None:
                text += failure.getTraceback()
            if MARKER in text.upper():
                leaks.append(("log event", text))
        for ack in acks:
            if MARKER.encode() in ack.upper():
                leaks.append(("ACK", ack.decode("latin-1")))
        bodies = {"raw", "payload", "response"}  # the message store: PHI by design
        for table in (
            schema.logs,
            schema.executions,
            schema.deliveries,
            schema.messages,
            schema.audit,
        ):
            for row in running.rows(table):
                for column, value in row.items():
                    if column in bodies:
                        continue
                    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                    if MARKER in text.upper():
                        leaks.append((f"{table.name}.{column}", text))
        self.assertEqual(leaks, [])


class RetentionTests(SynchronousTestCase):
    """``store.retention.prune``: old finished messages go with their executions, deliveries and
    logs, in batches; unfinished work is never deleted (G1)."""

    def setUp(self) -> None:
        one = header("A") + TRIGGER_ID
        self.running = gateway(
            self,
            app(
                flow("ok", "ADT^A04", [action("send", 2601, "ADT^A04", one)]),
                flow(
                    "broken",
                    "ADT^A08",
                    [action("send", 2602, "ADT^A08", header("B", "ADT^A08") + "{% if %}")],
                ),
                flow(
                    "slow",
                    "SIU^S12",
                    [action("send", 2603, "SIU^S12", header("C", "SIU^S12") + TRIGGER_ID)],
                ),
                flow(
                    "held",
                    "SIU^S14",
                    [action("send", 2604, "SIU^S14", header("D", "SIU^S14") + TRIGGER_ID)],
                ),
                flow(
                    "later",
                    "SIU^S15",
                    [action("send", 2605, "SIU^S15", header("E", "SIU^S15") + TRIGGER_ID)],
                ),
                flow("record", "ADT^A31", []),
            ),
        )
        self.running.peer(2603).script = never_answer
        self.running.peer(2604).script = answer_with("AR")

    def send(self, control_id: str, message_type: str = "ADT^A04") -> None:
        event = message_type.split("^")[1]
        message = adt(control_id, event=event).replace(
            f"ADT^{event}".encode(), message_type.encode(), 1
        )
        self.running.send(message)
        self.running.clock.advance(0)

    def prune(self, limit: int = 500, days: float = 30.0) -> int:
        before = self.running.clock.seconds() - days * DAY
        return self.running.database.transaction_now(prune, before, limit)

    def control_ids(self, table: Any = schema.messages) -> list[str]:
        return [row["control_id"] for row in self.running.rows(table)]

    def message_ids_in(self, table: Any) -> set[int]:
        if table is schema.deliveries:
            executions = {
                row["id"]: row["message_id"] for row in self.running.rows(schema.executions)
            }
            return {executions[row["execution_id"]] for row in self.running.rows(table)}
        return {
            row["message_id"] for row in self.running.rows(table) if row["message_id"] is not None
        }

    def test_old_finished_messages_go_with_their_records(self) -> None:
        """Done and rejected messages older than the retention go, with their
        executions, deliveries and logs; unfinished ones (pending, waiting on a slow
        destination, held delivery, held because their template broke) and recent
        ones stay whole."""
        running = self.running
        self.send("DONE1")
        self.send("FAILED1", "ADT^A08")
        self.send("REJECTED1", "ADT^A99")
        self.send("SLOW1", "SIU^S12")
        self.send("HELD1", "SIU^S14")
        running.autorun = False
        self.send("PENDING1", "SIU^S15")
        running.database.transaction_now(
            lambda connection: connection.execute(
                insert(schema.logs).values(at=START, event="delivery", outcome="retry")
            )
        )
        running.clock.advance(31 * DAY)
        self.send("RECENT1", "ADT^A31")
        self.assertEqual(
            [(row["flow_id"], row["state"]) for row in running.rows(schema.executions)],
            [
                ("FLWOK", "done"),
                ("FLWBROKEN", "held"),
                ("FLWSLOW", "waiting"),
                ("FLWHELD", "waiting"),
                ("FLWLATER", "pending"),
            ],
        )
        ids = {row["control_id"]: row["id"] for row in running.rows(schema.messages)}

        self.assertEqual(self.prune(), 2)

        kept = ["FAILED1", "SLOW1", "HELD1", "PENDING1", "RECENT1"]
        self.assertEqual(self.control_ids(), kept)
        kept_ids = {ids[control_id] for control_id in kept}
        self.assertEqual(self.message_ids_in(schema.logs), kept_ids)
        self.assertEqual(self.message_ids_in(schema.executions), kept_ids - {ids["RECENT1"]})
        self.assertEqual(self.message_ids_in(schema.deliveries), {ids["SLOW1"], ids["HELD1"]})
        self.assertEqual(
            [row["state"] for row in running.rows(schema.deliveries)], ["queued", "held"]
        )
        self.assertNotIn(None, [row["message_id"] for row in running.rows(schema.logs)])
        self.assertEqual(self.prune(), 0)

    def test_in_batches_oldest_first(self) -> None:
        """``limit`` bounds each call: five old messages go 2, 2, 1, oldest first."""
        for number in range(5):
            self.send(f"OLD{number}")
            self.running.clock.advance(1)
        self.running.clock.advance(31 * DAY)
        self.send("NEW")

        self.assertEqual(self.prune(limit=2), 2)
        self.assertEqual(self.control_ids(), ["OLD2", "OLD3", "OLD4", "NEW"])
        self.assertEqual(self.prune(limit=2), 2)
        self.assertEqual(self.prune(limit=2), 1)
        self.assertEqual(self.prune(limit=2), 0)
        self.assertEqual(self.control_ids(), ["NEW"])
        self.assertEqual(len(self.running.rows(schema.deliveries)), 1)

    def test_a_replayed_delivery_keeps_its_message_only(self) -> None:
        """A finished message whose delivery an operator replayed (open again) stays
        until it is delivered; older and newer finished messages still go."""
        running = self.running
        for control_id in ("OLD1", "OLD2", "OLD3"):
            self.send(control_id)
        # The replay goes out again and stays open: the destination does not answer.
        running.peer(2601).script = never_answer
        (replayed,) = [
            row["id"] for row in running.rows(schema.deliveries) if b"ZTR|OLD2\r" in row["payload"]
        ]
        running.database.transaction_now(
            delivery_action, replayed, "replay", "tester", "partner lost it", START
        )
        running.clock.advance(31 * DAY)

        self.assertEqual(self.prune(limit=2), 2)
        self.assertEqual(self.control_ids(), ["OLD2"])
        self.assertEqual(self.prune(limit=2), 0)
        self.assertEqual(self.control_ids(), ["OLD2"])
        self.assertEqual([row["state"] for row in running.rows(schema.deliveries)], ["queued"])


def accented(control_id: str, msh18: str, encoding: str) -> bytes:
    """An ADT^A04 naming Müller^Anna, encoded in ``encoding`` with MSH-18 ``msh18``."""
    return (
        f"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|{SENT_AT}||ADT^A04|{control_id}|P|2.5"
        f"||||||{msh18}\rEVN|A04|{SENT_AT}\rPID|1||P1^^^H^MR||Müller^Anna\r"
    ).encode(encoding)


class OutboundCharsetTests(SynchronousTestCase):
    """The control ID an outbound delivery waits for is read from the bytes sent, in the
    charset they are sent in (issue 17 item 0): a non-ASCII name copied from the trigger
    never leaves a delivery unmatched, resent forever, with an empty control ID."""

    #: (trigger MSH-18, trigger encoding, template's MSH-18, bytes the PID-5 is sent as)
    CASES = (
        ("", "latin-1", "", "Müller".encode("latin-1")),
        ("8859/1", "latin-1", "", "Müller".encode("latin-1")),
        ("UNICODE UTF-8", "utf-8", "", "Müller".encode("latin-1")),
        ("UNICODE UTF-8", "utf-8", '{{ msg["MSH-18"] }}', "Müller".encode()),
    )

    def check(self, msh18: str, encoding: str, template_msh18: str, sent_name: bytes) -> None:
        template = (
            header("A").rstrip("\n")
            + f"||||||{template_msh18}\n"
            + 'PID|1||{{ msg["PID-3"] }}||{{ msg["PID-5"] }}\n'
            + TRIGGER_ID
        )
        running = gateway(
            self, app(flow("names", "ADT^A04", [action("send", 2601, "ADT^A04", template)]))
        )
        destination = running.peer(2601)
        for control_id in ("MSG1", "MSG2"):
            ack = running.send(accented(control_id, msh18, encoding))
            self.assertEqual(ack_fields(ack)["code"], "AA")
        running.settle()

        self.assertEqual(trigger_ids(destination.received), ["MSG1", "MSG2"])
        self.assertIn(b"||" + sent_name + b"^Anna\r", destination.received[0])
        self.assertEqual(
            [
                (row["control_id"], row["state"], row["attempts"])
                for row in running.rows(schema.deliveries)
            ],
            [("OUT1", "delivered", 1), ("OUT2", "delivered", 1)],
        )

    def test_never_queued_without_a_control_id(self) -> None:
        """When the control ID cannot be read back from the rendered bytes, nothing is
        queued: the execution is held with the reason, visibly."""
        from udsgateway.outbound import executor as executor_module

        self.patch(
            executor_module,
            "parse_header",
            lambda _body, default_charset: HeaderProblem(102, "MSH^1^10", "bytes invalid", None),
        )
        template = header("A") + TRIGGER_ID
        running = gateway(
            self, app(flow("names", "ADT^A04", [action("send", 2601, "ADT^A04", template)]))
        )
        self.assertEqual(ack_fields(running.send(adt("MSG1")))["code"], "AA")
        running.settle()
        self.assertEqual(running.rows(schema.deliveries), [])
        self.assertEqual(
            states(running),
            [
                (
                    "FLWNAMES",
                    "held",
                    0,
                    "action send: the rendered message's control ID is unreadable: bytes invalid",
                )
            ],
        )

    def test_latin1_without_msh18(self) -> None:
        """0xFC with MSH-18 empty (the tenant's default charset, 8859/1): delivered once;
        the next message of the lane too."""
        self.check(*self.CASES[0])

    def test_latin1_declared(self) -> None:
        """0xFC with MSH-18 8859/1: delivered once; the next message of the lane too."""
        self.check(*self.CASES[1])

    def test_utf8_trigger_sent_in_the_tenant_charset(self) -> None:
        """UTF-8 with MSH-18 UNICODE UTF-8, copied into a template without MSH-18: sent
        in the tenant's charset, its control ID read in that charset; delivered once."""
        self.check(*self.CASES[2])

    def test_utf8_trigger_sent_in_utf8(self) -> None:
        """UTF-8 with MSH-18 UNICODE UTF-8, copied into a template that copies MSH-18:
        sent in UTF-8, its control ID read in UTF-8; delivered once."""
        self.check(*self.CASES[3])


class HeldExecutionTests(SynchronousTestCase):
    """An execution whose action cannot be rendered after its message was ACKed is held
    where an operator sees it, and released (rendered again) once the flow is fixed
    (issue 11 item 1)."""

    def test_held_listed_then_released_after_the_flow_is_fixed(self) -> None:
        """A broken template holds the execution: ``executions list --state held`` shows
        it with the reason; the lane's next message is unaffected; after the flow is
        fixed, ``executions release`` makes the gateway render and deliver it (found by
        the executor's poll), audited."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        url = f"sqlite:///{directory / 'gateway.db'}"
        config = directory / "gateway.toml"
        config.write_text(
            f'[gateway]\ndatabase = "{url}"\n\n[[tenants]]\nname = "test"\n'
            'listen = "tcp:port=0:interface=127.0.0.1"\n',
            encoding="utf-8",
        )
        broken = header("A") + TRIGGER_ID + 'PID|{{ msg["PID-3"] | join: "," }}\n'
        running = gateway(
            self,
            app(flow("one", "ADT^A04", [action("send", 2601, "ADT^A04", broken)])),
            database_url=url,
        )
        running.executor.poll(5.0)
        self.addCleanup(running.executor.stop_polling)
        self.assertEqual(ack_fields(running.send(adt("MSG1")))["code"], "AA")
        running.settle()
        reason = "action send: join expected an array, found WireText (template line 3)"
        self.assertEqual(states(running), [("FLWONE", "held", 0, reason)])
        self.assertEqual(running.peer(2601).received, [])

        out = io.StringIO()
        cli.main(
            ["--config", str(config), "executions", "list", "--state", "held", "--json"], out=out
        )
        (listed,) = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(
            (listed["state"], listed["flow_id"], listed["control_id"], listed["reason"]),
            ("held", "FLWONE", "MSG1", reason),
        )

        fixed = app(
            flow("one", "ADT^A04", [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)])
        )
        running.database.transaction_now(save_app, fixed, running.clock.seconds())
        running.executor.load(running.database.transaction_now(load_apps, None))
        out = io.StringIO()
        code = cli.main(
            [
                "--config",
                str(config),
                "executions",
                "release",
                str(listed["id"]),
                "--reason",
                "template fixed",
                "--who",
                "ops",
            ],
            out=out,
        )
        self.assertEqual(code, 0)
        self.assertIn("released", out.getvalue())
        running.run_until(lambda: len(running.peer(2601).received) == 1, limit=10.0)
        running.settle()
        self.assertEqual(states(running), [("FLWONE", "done", 0, "")])
        self.assertEqual(trigger_ids(running.peer(2601).received), ["MSG1"])
        self.assertEqual(
            [(row["who"], row["action"], row["reason"]) for row in running.rows(schema.audit)],
            [("ops", "execution.release", "template fixed")],
        )

    def test_release_refuses_what_is_not_held(self) -> None:
        """Only a held execution can be released; a missing one is named."""
        running = gateway(
            self,
            app(
                flow("one", "ADT^A04", [action("send", 2601, "ADT^A04", header("A") + TRIGGER_ID)])
            ),
        )
        running.send(adt("MSG1"))
        running.settle()
        with self.assertRaises(ValueError) as raised:
            running.database.transaction_now(operator.release_execution, 1, "ops", "why", 0.0)
        self.assertEqual(str(raised.exception), "execution 1 is done, not held")
        with self.assertRaises(LookupError):
            running.database.transaction_now(operator.release_execution, 99, "ops", "why", 0.0)


#: (field separator, encoding characters) of the delimiter sets senders use.
DELIMITER_SETS = (("|", "^~\\&"), ("^", "~|\\&"), ("#", "!@%*"))
VERSIONS = (
    "2.1",
    "2.2",
    "2.3",
    "2.3.1",
    "2.4",
    "2.5",
    "2.5.1",
    "2.6",
    "2.7",
    "2.7.1",
    "2.8",
    "2.8.1",
)
#: (segment separator, what follows the last segment)
ENDINGS = (("\r", "\r"), ("\n", "\n"), ("\r\n", "\r\n"), ("\r", ""), ("\r", "\r\r"))


def shaped(
    control_id: str,
    delimiters: tuple[str, str],
    version: str,
    ending: tuple[str, str],
    charset: tuple[str, str] = ("", "ascii"),
) -> bytes:
    """A synthetic ADT^A04 with the given delimiters, version, segment endings and
    charset (MSH-18 and the encoding; a non-ASCII name when the encoding allows)."""
    fs, encoding = delimiters
    cs = encoding[0]
    msh18, codec = charset
    name = "Müller" if codec != "ascii" else "Muller"
    segments = [
        f"MSH{fs}{encoding}{fs}HIS{fs}Hospital{fs}LSQ{fs}LeadSquared{fs}{SENT_AT}{fs}{fs}"
        f"ADT{cs}A04{fs}{control_id}{fs}P{fs}{version}"
        + (f"{fs}{fs}{fs}{fs}{fs}{fs}{msh18}" if msh18 else ""),
        f"EVN{fs}A04{fs}{SENT_AT}",
        f"PID{fs}1{fs}{fs}P1{cs}{cs}{cs}H{cs}MR{fs}{fs}{name}{cs}Anna",
    ]
    separator, last = ending
    return (separator.join(segments) + last).encode(codec)


def answer_any_delimiters(connection: PeerConnection, payload: bytes) -> None:
    """AA echoing the MSH-10 of a message with any delimiters and charset."""
    parsed = parse_header(payload, default_charset="latin-1")
    assert not isinstance(parsed, HeaderProblem), parsed
    connection.reply(destination_ack(parsed.control_id))


class PassThroughTests(SynchronousTestCase):
    """``{{ msg }}`` alone forwards the trigger exactly as stored, whatever its
    delimiters, version, segment endings or charset (issue 11 items 1 and 4)."""

    def passthrough(self) -> FlowGateway:
        running = gateway(
            self, app(flow("relay", "ADT^A04", [action("send", 2601, "ADT^A04", "{{ msg }}\n")]))
        )
        running.peer(2601).script = answer_any_delimiters
        return running

    def assert_forwarded(self, running: FlowGateway, messages: list[bytes]) -> None:
        for message in messages:
            self.assertEqual(ack_fields(running.send(message))["code"], "AA", message)
            running.settle()
        self.assertEqual(running.peer(2601).received, messages)
        self.assertEqual({row["state"] for row in running.rows(schema.executions)}, {"done"})
        self.assertEqual(
            [row["attempts"] for row in running.rows(schema.deliveries)], [1] * len(messages)
        )

    def test_every_delimiter_set_and_version(self) -> None:
        """Each delimiter set (|^~\\&, VistA's ^~|\\&, #!@%*) with each version 2.1 to
        2.8.1: the destination receives the stored bytes, once each."""
        running = self.passthrough()
        numbers = itertools.count(1)
        messages = [
            shaped(f"M{next(numbers)}", delimiters, version, ("\r", "\r"))
            for delimiters in DELIMITER_SETS
            for version in VERSIONS
        ]
        self.assert_forwarded(running, messages)

    def test_every_segment_ending(self) -> None:
        """LF, CRLF, no trailing CR and a blank line at the end, with each delimiter set:
        forwarded byte-exact (never normalised to CR)."""
        running = self.passthrough()
        numbers = itertools.count(1)
        messages = [
            shaped(f"M{next(numbers)}", delimiters, "2.5", ending)
            for delimiters in DELIMITER_SETS
            for ending in ENDINGS
        ]
        self.assert_forwarded(running, messages)

    def test_non_ascii_with_each_charset(self) -> None:
        """A non-ASCII name with MSH-18 empty (the tenant's 8859/1), 8859/1 and
        UNICODE UTF-8, with each delimiter set: forwarded byte-exact, and the
        delivery's control ID is the MSH-10 sent."""
        running = self.passthrough()
        numbers = itertools.count(1)
        messages = [
            shaped(f"M{next(numbers)}", delimiters, "2.5", ("\r", "\r"), charset)
            for delimiters in DELIMITER_SETS
            for charset in (("", "latin-1"), ("8859/1", "latin-1"), ("UNICODE UTF-8", "utf-8"))
        ]
        self.assert_forwarded(running, messages)
        self.assertEqual(
            [row["control_id"] for row in running.rows(schema.deliveries)],
            [f"M{n}" for n in range(1, len(messages) + 1)],
        )

    def test_other_type_than_the_action_is_held(self) -> None:
        """A pass-through of a trigger whose MSH-9 is not the action's type is held with
        the reason, never sent."""
        running = gateway(
            self, app(flow("relay", "ADT^A04", [action("send", 2601, "ADT^A08", "{{ msg }}")]))
        )
        running.send(adt("MSG1"))
        running.settle()
        self.assertEqual(
            states(running),
            [
                (
                    "FLWRELAY",
                    "held",
                    0,
                    "action send: MSH-9 is not ADT^A08, the action's message type",
                )
            ],
        )
        self.assertEqual(running.peer(2601).received, [])
