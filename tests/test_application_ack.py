"""Tests for enhanced-mode application acknowledgments (MSH-15 and MSH-16).

In enhanced mode the sender gets the accept ACK (CA/CE/CR, by MSH-15) once its
message is committed, then an application ACK (AA/AE/AR, by MSH-16) once the
flows' actions settle, or at once for a flow whose trigger says
``application_ack = "on_commit"``. Both go back on the sender's connection,
before any answer to its next frame (G5). The unit tests drive the real
listener, ingest and store on ``StringTransport`` and ``task.Clock``
(``udsgateway.testing.Gateway`` without actions, ``udsgateway.testing.flows
.FlowGateway`` with scripted destinations) and assert the bytes on the wire.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.test_executor import TRIGGER_ID, adt, header, trigger_ids
from tests.test_ingest import Reply, hl7, mllp_replies
from udsgateway.flows import FlowFileError, parse_app, write_app
from udsgateway.store import schema
from udsgateway.testing import Connection, Gateway, mllp
from udsgateway.testing.flows import (
    FlowGateway,
    action,
    answer_with,
    app,
    flow,
    never_answer,
)

#: What a sender gets for an accepted message of a flow without actions, by
#: (MSH-15, MSH-16): the accept ACK per MSH-15, then the application ACK per MSH-16.
ACCEPTED: dict[tuple[str, str], list[str]] = {
    ("", "AL"): ["CA", "AA"],
    ("", "NE"): ["CA"],
    ("", "ER"): ["CA"],
    ("", "SU"): ["CA", "AA"],
    ("AL", ""): ["CA"],
    ("AL", "AL"): ["CA", "AA"],
    ("AL", "NE"): ["CA"],
    ("AL", "ER"): ["CA"],
    ("AL", "SU"): ["CA", "AA"],
    ("NE", ""): [],
    ("NE", "AL"): ["AA"],
    ("NE", "NE"): [],
    ("NE", "ER"): [],
    ("NE", "SU"): ["AA"],
    ("ER", ""): [],
    ("ER", "AL"): ["AA"],
    ("ER", "NE"): [],
    ("ER", "ER"): [],
    ("ER", "SU"): ["AA"],
    ("SU", ""): ["CA"],
    ("SU", "AL"): ["CA", "AA"],
    ("SU", "NE"): ["CA"],
    ("SU", "ER"): ["CA"],
    ("SU", "SU"): ["CA", "AA"],
}

#: The same for a message no flow takes (AR 200): a rejected message gets no
#: application ACK after its CR; when MSH-15 suppresses the CR but MSH-16 wants an
#: answer on error, the rejection is sent as the application ACK (AR).
REJECTED: dict[tuple[str, str], list[str]] = {
    ("", "AL"): ["CR"],
    ("", "NE"): ["CR"],
    ("", "ER"): ["CR"],
    ("", "SU"): ["CR"],
    ("AL", ""): ["CR"],
    ("AL", "AL"): ["CR"],
    ("AL", "NE"): ["CR"],
    ("AL", "ER"): ["CR"],
    ("AL", "SU"): ["CR"],
    ("NE", ""): [],
    ("NE", "AL"): ["AR"],
    ("NE", "NE"): [],
    ("NE", "ER"): ["AR"],
    ("NE", "SU"): [],
    ("ER", ""): ["CR"],
    ("ER", "AL"): ["CR"],
    ("ER", "NE"): ["CR"],
    ("ER", "ER"): ["CR"],
    ("ER", "SU"): ["CR"],
    ("SU", ""): [],
    ("SU", "AL"): ["AR"],
    ("SU", "NE"): [],
    ("SU", "ER"): ["AR"],
    ("SU", "SU"): [],
}


def enhanced(message: bytes, accept: str = "AL", application: str = "AL") -> bytes:
    """``message`` (an ``adt``) with MSH-15 and MSH-16 set."""
    msh, rest = message.split(b"\r", 1)
    return msh + f"|||{accept}|{application}".encode() + b"\r" + rest


def replies(connection: Connection) -> list[Reply]:
    """The replies written back on ``connection`` since the last call."""
    return mllp_replies(connection.received())


def codes(found: list[Reply]) -> list[tuple[str, str]]:
    """(MSA-1, MSA-2) of each reply."""
    return [(reply.code, reply.control_id) for reply in found]


class CombinationTests(SynchronousTestCase):
    """Every MSH-15/MSH-16 combination of enhanced mode, on success and on rejection."""

    def answer_codes(self, message: bytes) -> list[str]:
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(mllp(message))
        found = replies(connection)
        control_id = message.split(b"|")[9].decode()
        self.assertEqual({reply.control_id for reply in found} - {control_id}, set())
        return [reply.code for reply in found]

    def test_every_combination_accepted(self) -> None:
        """An accepted message: the accept ACK by MSH-15, then the application ACK by
        MSH-16, each only when its field asks for it."""
        for (accept, application), expected in ACCEPTED.items():
            message = hl7("C1", accept_ack=accept, application_ack=application)
            with self.subTest(msh15=accept, msh16=application):
                self.assertEqual(self.answer_codes(message), expected)

    def test_every_combination_rejected(self) -> None:
        """A rejected message (AR 200): CR by MSH-15, never an AA after it; AR when
        MSH-15 keeps the CR back and MSH-16 wants errors answered."""
        for (accept, application), expected in REJECTED.items():
            message = hl7("C2", "ORU^R01", accept_ack=accept, application_ack=application)
            with self.subTest(msh15=accept, msh16=application):
                self.assertEqual(self.answer_codes(message), expected)

    def test_case_and_unknown_values(self) -> None:
        """MSH-16 is compared without regard to case; an unknown value is answered."""
        self.assertEqual(
            self.answer_codes(hl7("C3", accept_ack="al", application_ack="al")), ["CA", "AA"]
        )
        self.assertEqual(
            self.answer_codes(hl7("C4", accept_ack="AL", application_ack="XX")), ["CA", "AA"]
        )
        self.assertEqual(
            self.answer_codes(hl7("C5", accept_ack="AL", application_ack="ne")), ["CA"]
        )

    def test_application_ack_is_a_message_of_its_own(self) -> None:
        """The application ACK has a fresh MSH-10 (not the accept ACK's), MSA-2 the
        message's MSH-10, the sender's MSH-3/4 as MSH-5/6, and no ERR on success."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(mllp(hl7("C6", accept_ack="AL", application_ack="AL")))
        accept, application = replies(connection)
        self.assertEqual(application.code, "AA")
        self.assertEqual(application.control_id, "C6")
        self.assertNotEqual(application.msh[10], accept.msh[10])
        self.assertNotEqual(application.msh[10], "C6")
        self.assertEqual(application.msh[5:7], ("HIS", "Hospital"))
        self.assertEqual(application.err, ())
        self.assertEqual(len(gateway.messages()), 1)

    def test_original_mode_unchanged(self) -> None:
        """MSH-15 and MSH-16 empty: one AA, no application ACK."""
        self.assertEqual(self.answer_codes(hl7("C7")), ["AA"])


class ActionsTests(SynchronousTestCase):
    """The application ACK and the flow's actions (FlowGateway, scripted destinations)."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer: ILogObserver = self.events.append  # type: ignore[assignment]
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def chain(
        self, application_ack: str = "after_actions", ack: str = "on_commit", timeout: float = 30.0
    ) -> FlowGateway:
        """A gateway with one flow of two actions, to ports 2701 and 2702."""
        running = FlowGateway(
            (
                app(
                    flow(
                        "appack",
                        "ADT^A04",
                        [
                            action("first", 2701, "ADT^A04", header("A") + TRIGGER_ID),
                            action("second", 2702, "ADT^A04", header("B") + TRIGGER_ID),
                        ],
                        ack=ack,
                        ack_timeout=timeout,
                        application_ack=application_ack,
                    )
                ),
            )
        )
        self.addCleanup(running.stop)
        return running

    def test_accept_on_commit_application_after_actions(self) -> None:
        """CA at once; AA only once the last action is delivered; processed once."""
        running = self.chain()
        running.peer(2701).latency = 2.0
        running.peer(2702).latency = 3.0
        connection = running.connect()
        connection.send(mllp(enhanced(adt("M1"))))
        self.assertEqual(codes(replies(connection)), [("CA", "M1")])
        running.run_until(lambda: len(running.peer(2702).received) == 1)
        self.assertEqual(replies(connection), [])
        running.clock.advance(3.0)
        self.assertEqual(codes(replies(connection)), [("AA", "M1")])
        self.assertEqual(trigger_ids(running.peer(2702).received), ["M1"])
        [stored] = running.messages()
        self.assertEqual(stored.ack_code, "CA")

    def test_ae_207_when_an_action_is_held(self) -> None:
        """A destination rejects (held by the default policy): CA, then AE 207 with
        the reason in ERR-7."""
        running = self.chain()
        running.peer(2702).script = answer_with("AR", 206)
        connection = running.connect()
        connection.send(mllp(enhanced(adt("M2"))))
        self.assertEqual(codes(replies(connection)), [("CA", "M2")])
        running.run_until(lambda: connection.transport.value() != b"")
        [application] = replies(connection)
        self.assertEqual((application.code, application.error_code), ("AE", 207))
        self.assertEqual(application.diagnostic, "actions held: AR from destination, ERR 206")

    def test_ae_207_at_the_timeout(self) -> None:
        """A destination that never answers: AE 207 exactly at the trigger's ack_timeout."""
        running = self.chain(timeout=5.0)
        running.peer(2702).script = never_answer
        connection = running.connect()
        connection.send(mllp(enhanced(adt("M3"))))
        self.assertEqual(codes(replies(connection)), [("CA", "M3")])
        running.run_until(lambda: len(running.peer(2702).received) == 1)
        running.clock.advance(4.9)
        self.assertEqual(replies(connection), [])
        running.clock.advance(0.1)
        [application] = replies(connection)
        self.assertEqual((application.code, application.error_code), ("AE", 207))
        self.assertEqual(application.diagnostic, "actions did not finish within 5s")

    def test_msh16_er_and_su(self) -> None:
        """MSH-16 ER: no AA on success, AE on failure; SU: AA on success, no AE."""
        running = self.chain(timeout=5.0)
        connection = running.connect()
        connection.send(mllp(enhanced(adt("M4"), application="ER")))
        running.settle()
        self.assertEqual(codes(replies(connection)), [("CA", "M4")])
        connection.send(mllp(enhanced(adt("M5"), application="SU")))
        running.settle()
        self.assertEqual(codes(replies(connection)), [("CA", "M5"), ("AA", "M5")])

        running.peer(2702).script = never_answer
        connection.send(mllp(enhanced(adt("M6"), application="SU")))
        running.clock.advance(0)
        running.clock.advance(5.0)
        self.assertEqual(codes(replies(connection)), [("CA", "M6")])
        connection.send(mllp(enhanced(adt("M7"), application="ER")))
        running.clock.advance(0)
        running.clock.advance(5.0)
        self.assertEqual(codes(replies(connection)), [("CA", "M7"), ("AE", "M7")])

    def test_on_commit_setting_answers_at_once(self) -> None:
        """``application_ack = "on_commit"``: CA and AA at once, the actions still running."""
        running = self.chain(application_ack="on_commit")
        running.peer(2701).script = never_answer
        connection = running.connect()
        connection.send(mllp(enhanced(adt("M8"))))
        self.assertEqual(codes(replies(connection)), [("CA", "M8"), ("AA", "M8")])

    def test_after_actions_ack_setting_keeps_the_accept_ack_on_commit(self) -> None:
        """A flow with ``ack = "after_actions"``: an enhanced sender asking for an
        application ACK still gets its CA at commit; the AA waits for the actions."""
        running = self.chain(ack="after_actions")
        running.peer(2702).latency = 3.0
        connection = running.connect()
        connection.send(mllp(enhanced(adt("M9"))))
        self.assertEqual(codes(replies(connection)), [("CA", "M9")])
        running.settle()
        self.assertEqual(codes(replies(connection)), [("AA", "M9")])

    def test_answers_in_order_with_pipelined_frames(self) -> None:
        """Two frames in one write: CA1, AA1, CA2, AA2; the second message's answers
        never overtake the first's application ACK (G5)."""
        running = self.chain()
        running.peer(2702).latency = 3.0
        connection = running.connect()
        connection.send(mllp(enhanced(adt("P1"))) + mllp(enhanced(adt("P2"))))
        self.assertEqual(codes(replies(connection)), [("CA", "P1")])
        running.settle()
        self.assertEqual(codes(replies(connection)), [("AA", "P1"), ("CA", "P2"), ("AA", "P2")])

    def test_partners_ack_of_our_application_ack_is_consumed_quietly(self) -> None:
        """The sender's CA to our AA (MSH-9 ACK) gets no answer, is not stored, and the
        connection keeps working."""
        running = self.chain(application_ack="on_commit")
        connection = running.connect()
        connection.send(mllp(enhanced(adt("Q1"))))
        _accept, application = replies(connection)
        their_ack = (
            "MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|20240101123001||ACK^A04^ACK|HACK1|P|2.5\r"
            f"MSA|CA|{application.msh[10]}\r"
        ).encode()
        connection.send(mllp(their_ack))
        self.assertEqual(replies(connection), [])
        connection.send(mllp(enhanced(adt("Q2"))))
        self.assertEqual(codes(replies(connection)), [("CA", "Q2"), ("AA", "Q2")])
        self.assertEqual([m.control_id for m in running.messages()], ["Q1", "Q2"])
        self.assertFalse(connection.closed)

    def test_connection_gone_before_the_application_ack(self) -> None:
        """The sender closes before the actions settle: nothing is written; the lost
        application ACK is logged (no PHI) and recorded in the store's log."""
        running = self.chain()
        running.peer(2702).latency = 3.0
        connection = running.connect()
        connection.send(mllp(enhanced(adt("L1"))))
        self.assertEqual(codes(replies(connection)), [("CA", "L1")])
        connection.transport.loseConnection()
        connection.protocol.connectionLost()
        running.settle()
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(running.ingest.stats.application_acks_lost, 1)
        [event] = [e for e in self.events if "not sent: connection closed" in e["log_format"]]
        self.assertEqual((event["control_id"], event["ack_code"]), ("L1", "AA"))
        self.assertNotIn("Doe", repr(event))
        [row] = [r for r in running.rows(schema.logs) if r["event"] == "application ack lost"]
        self.assertEqual(
            (row["control_id"], row["ack_code"], row["outcome"]), ("L1", "AA", "not sent")
        )
        self.assertEqual(row["message_id"], running.messages()[0].id)

    def test_resend_gets_the_application_ack_again(self) -> None:
        """A resend (its AA lost with the connection): the stored CA replayed and the
        AA decided from the executions; the message is processed once."""
        running = self.chain()
        first = running.connect(40001)
        first.send(mllp(enhanced(adt("R1"))))
        first.transport.loseConnection()
        first.protocol.connectionLost()
        running.settle()
        again = running.connect(40002)
        again.send(mllp(enhanced(adt("R1"))))
        running.clock.advance(0)
        self.assertEqual(codes(replies(again)), [("CA", "R1"), ("AA", "R1")])
        self.assertEqual(trigger_ids(running.peer(2702).received), ["R1"])
        self.assertEqual(len(running.messages()), 1)


class SettingTests(SynchronousTestCase):
    """The trigger's ``application_ack`` key in flow files."""

    BASE = (
        'name = "A"\ntenant = "t"\n[[flows]]\nname = "f"\n'
        '[flows.trigger]\nmessage_type = "ADT^A04"\n'
    )

    def test_read_written_and_checked(self) -> None:
        """Default after_actions; on_commit read and written back; a bad value is an error."""
        self.assertEqual(parse_app(self.BASE).flows[0].trigger.application_ack, "after_actions")
        loaded = parse_app(self.BASE + 'application_ack = "on_commit"\n')
        self.assertEqual(loaded.flows[0].trigger.application_ack, "on_commit")
        self.assertEqual(parse_app(write_app(loaded)), loaded)
        with self.assertRaises(FlowFileError) as raised:
            parse_app(self.BASE + 'application_ack = "never"\n')
        self.assertIn(
            "application_ack: expected after_actions or on_commit", str(raised.exception)
        )
