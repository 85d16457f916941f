"""Tests for udsgateway.inbound.ingest through the real listener: what each frame is answered.

Every test drives the real inbound path of one tenant (``udsgateway.testing.Gateway``:
listener, ingest, routing, group commit, SQLite store) over ``StringTransport``
on a ``task.Clock``, and asserts the answer on the wire (MSA-1, MSA-2, ERR-2,
ERR-3, ERR-7), the rows in the store and the log events. The rows of
docs/guarantees.md "Bad input on a listener" about a frame's content are here;
those about framing, timers and connections are in ``test_listener``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from attrs import define, field, frozen
from sqlalchemy.exc import OperationalError
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.strict_ack import STRICT_VERSIONS, strictly_valid
from udsgateway.config import Limits, TenantConfig
from udsgateway.flows import App, Flow, Trigger, read_app_file
from udsgateway.hl7.ack import parse_reply
from udsgateway.hl7.header import read_delimiters
from udsgateway.interfaces import IFlowRunner
from udsgateway.store.records import CommitResult, Finished
from udsgateway.testing import Connection, Gateway, ManualRunner, hl7_message, mllp
from udsgateway.testing.flows import action, app, flow

SENT_AT = "20240101123000"
REPO = Path(__file__).resolve().parent.parent


#: The message builder of these tests (``test_listener`` imports it from here too).
hl7 = hl7_message


def padded(message: bytes, size: int) -> bytes:
    """``message`` with an NTE segment appended so that it is exactly ``size`` bytes."""
    filler = size - len(message) - len(b"NTE|1||\r")
    assert filler >= 0, "message already larger than the size asked for"
    return message + b"NTE|1||" + b"x" * filler + b"\r"


@frozen
class Reply:
    """One ACK or NAK as written on the wire, split into fields.

    ``msh[n]`` is MSH-n, ``msa[n]`` MSA-n and ``err[n]`` ERR-n (``err`` is
    empty when the reply has no ERR segment).
    """

    raw: bytes
    msh: tuple[str, ...]
    msa: tuple[str, ...]
    err: tuple[str, ...]
    component: str
    subcomponent: str

    @property
    def code(self) -> str:
        """MSA-1."""
        return self.msa[1]

    @property
    def control_id(self) -> str:
        """MSA-2: the MSH-10 of the message answered."""
        return self.msa[2] if len(self.msa) > 2 else ""

    @property
    def legacy(self) -> bool:
        """True for the ERR-1 layout of versions 2.1 to 2.4 (no ERR-2 to ERR-7)."""
        return len(self.err) == 2 and self.err[1].count(self.component) == 3

    @property
    def error_code(self) -> int | None:
        """ERR-3.1 (HL7 table 0357), ERR-1.4.1 before 2.5, or None without an ERR segment."""
        if self.legacy:
            return int(self.err[1].split(self.component)[3].split(self.subcomponent)[0])
        if len(self.err) <= 3:
            return None
        return int(self.err[3].split(self.component)[0])

    @property
    def error_location(self) -> str:
        """ERR-2 (ERR-1.1 to ERR-1.3 before 2.5), written with ``^``."""
        if self.legacy:
            return "^".join(self.err[1].split(self.component)[:3])
        return self.err[2] if len(self.err) > 2 else ""

    @property
    def diagnostic(self) -> str:
        """ERR-7."""
        return self.err[7] if len(self.err) > 7 else ""


def read_reply(raw: bytes, strict: bool = True) -> Reply:
    """Parse one unframed ACK; fail the test when it is not a well-formed one.

    ``strict``: also check it with hl7apy for its version (a reply that echoes a
    hostile sender's over-long values, as the fuzz tests send, cannot pass that)."""
    parsed = parse_reply(raw)
    # MSA-2 is empty, rightly, in the NAK to a message whose MSH-10 is empty.
    assert parsed.problem in ("", "reply MSA-2 empty"), f"{parsed.problem}: {raw!r}"
    delimiters = read_delimiters(raw)
    assert delimiters is not None
    separator = delimiters.field
    lines = [line for line in raw.decode("latin-1").split("\r") if line]
    parts = lines[0].split(separator)
    msh = ("MSH", separator, *parts[1:])
    msa: tuple[str, ...] = ()
    err: tuple[str, ...] = ()
    for line in lines[1:]:
        if line.startswith("MSA" + separator):
            msa = tuple(line.split(separator))
        elif line.startswith("ERR" + separator):
            err = tuple(line.split(separator))
    assert msa, f"no MSA in {raw!r}"
    assert parsed.ack_code == msa[1]
    if strict and msh[12] in STRICT_VERSIONS and len(msa) > 2 and msa[2]:
        # Every answer of these tests is checked by hl7apy for its version, but
        # the NAK to a message without MSH-10, whose MSA-2 (required) is empty.
        strictly_valid(raw)
    return Reply(raw, msh, msa, err, delimiters.component, delimiters.subcomponent)


def mllp_replies(data: bytes, strict: bool = True) -> list[Reply]:
    """Split bytes written back on an MLLP connection into replies; each must be framed."""
    replies = []
    while data:
        assert data.startswith(b"\x0b"), f"reply not MLLP framed: {data!r}"
        end = data.find(b"\x1c\r")
        assert end > 0, f"MLLP reply without end block: {data!r}"
        replies.append(read_reply(data[1:end], strict))
        data = data[end + 2 :]
    return replies


def plain_replies(data: bytes, strict: bool = True) -> list[Reply]:
    """Split bytes written back on a plain TCP connection into replies (unframed)."""
    assert b"\x0b" not in data and b"\x1c" not in data, f"plain reply framed: {data!r}"
    return [read_reply(part, strict) for part in re.split(rb"(?<=\r)(?=MSH)", data) if part]


def one_reply(connection: Connection) -> Reply:
    """The single MLLP reply written back since the last call."""
    replies = mllp_replies(connection.received())
    assert len(replies) == 1, f"expected one reply, got {len(replies)}"
    return replies[0]


def log_text(event: LogEvent) -> str:
    """A log event as text: the formatted message and the repr of every field."""
    fields = sorted((str(key), repr(value)) for key, value in event.items())
    return formatEvent(event) + "\n" + "\n".join(f"{k}={v}" for k, v in fields)


class GatewayTestCase(SynchronousTestCase):
    """Captures every log event of the test in ``self.events``."""

    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        observer: ILogObserver = self.events.append  # type: ignore[assignment]
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def gateway_events(self, text: str = "") -> list[LogEvent]:
        """The gateway's own log events (not Twisted's) whose format contains ``text``."""
        return [
            event
            for event in self.events
            if str(event.get("log_namespace", "")).startswith("udsgateway")
            and text in str(event.get("log_format", ""))
        ]

    def send_one(self, gateway: Gateway, message: bytes) -> Reply:
        """Send ``message`` over MLLP on a new connection; return its one reply."""
        connection = gateway.connect()
        connection.send(mllp(message))
        return one_reply(connection)


class AcknowledgmentTests(GatewayTestCase):
    """The shape of a positive ACK (docs/guarantees.md "Wire facts")."""

    def test_ack_swaps_applications_and_echoes_control_id(self) -> None:
        """AA: MSH-3/4 swapped with MSH-5/6, a fresh MSH-10, MSA-2 = the message's MSH-10."""
        gateway = Gateway()
        reply = self.send_one(gateway, hl7("CTRL42"))
        self.assertEqual(reply.code, "AA")
        self.assertEqual(reply.control_id, "CTRL42")
        self.assertEqual(reply.msh[3:7], ("LSQ", "LeadSquared", "HIS", "Hospital"))
        self.assertEqual(reply.msh[9], "ACK^A04^ACK")
        self.assertNotEqual(reply.msh[10], "CTRL42")
        self.assertEqual(reply.msh[11:13], ("P", "2.5"))
        self.assertEqual(reply.err, ())
        [stored] = gateway.messages()
        self.assertEqual(stored.control_id, "CTRL42")
        self.assertTrue(stored.accepted)
        self.assertEqual(stored.ack_code, "AA")

    def test_acks_carry_distinct_control_ids(self) -> None:
        """Each ACK carries its own fresh MSH-10."""
        gateway = Gateway()
        first = self.send_one(gateway, hl7("A1"))
        second = self.send_one(gateway, hl7("A2"))
        self.assertNotEqual(first.msh[10], second.msh[10])


class HeaderValidationTests(GatewayTestCase):
    """Rows of "Bad input on a listener" about the message header and content."""

    def test_control_bytes_nak_102_naming_offset(self) -> None:
        """A control byte (0x00-0x08, 0x0E-0x1A) in the message: AE 102, ERR-7 names its offset."""
        for byte in (0x00, 0x01, 0x08, 0x0E, 0x1A):
            gateway = Gateway()
            message = hl7("CTL1", patient=b"Doe^Jo" + bytes([byte]) + b"hn")
            reply = self.send_one(gateway, message)
            self.assertEqual(reply.code, "AE", hex(byte))
            self.assertEqual(reply.control_id, "CTL1")
            self.assertEqual(reply.error_code, 102)
            self.assertIn(f"offset {message.index(bytes([byte]))}", reply.diagnostic)
            self.assertEqual(gateway.messages(), [])

    def test_allowed_low_bytes_accepted(self) -> None:
        """TAB and ESC (0x09, 0x1B) are not control bytes to refuse: AA."""
        gateway = Gateway()
        message = hl7("TAB1", patient=b"Doe\t^John\x1b")
        self.assertEqual(self.send_one(gateway, message).code, "AA")
        self.assertEqual(gateway.messages()[0].raw, message)

    def test_crlf_and_lf_segment_separators_accepted_bytes_kept(self) -> None:
        """CR LF or LF between segments: AA, and the original bytes are stored unchanged."""
        for separator in (b"\r\n", b"\n"):
            gateway = Gateway()
            message = hl7("NL1", separator=separator)
            reply = self.send_one(gateway, message)
            self.assertEqual((reply.code, reply.control_id), ("AA", "NL1"))
            [stored] = gateway.messages()
            self.assertEqual(stored.raw, message)
            self.assertEqual(stored.flows, ("FLWADTA04MLLP",))

    def test_non_default_delimiters_parsed_and_used_in_ack(self) -> None:
        """MSH#$%@!: the message is parsed with its delimiters and the ACK uses them."""
        message = (
            b"MSH#$%@!#HIS#Hospital#LSQ#LeadSquared#20240101123000##ADT$A04#DELIM1#P#2.5\r"
            b"PID#1##12345$$$Hospital##Doe$John\r"
        )
        gateway = Gateway()
        reply = self.send_one(gateway, message)
        self.assertTrue(reply.raw.startswith(b"MSH#$%@!#LSQ#LeadSquared#HIS#Hospital#"))
        self.assertIn(b"\rMSA#AA#DELIM1\r", reply.raw)
        self.assertEqual(reply.msh[9], "ACK$A04$ACK")
        [stored] = gateway.messages()
        self.assertEqual((stored.message_type, stored.raw), ("ADT^A04", message))

    def test_non_default_delimiters_in_nak(self) -> None:
        """A NAK to a message with its own delimiters writes ERR-2 and ERR-3 with them."""
        message = b"MSH#$%@!#HIS#Hospital#LSQ#LeadSquared#20240101123000##ADT$A04#DELIM2#X#2.5\r"
        reply = self.send_one(Gateway(), message)
        self.assertEqual((reply.code, reply.control_id), ("AR", "DELIM2"))
        self.assertEqual(reply.error_location, "MSH$1$11")
        self.assertTrue(reply.err[3].startswith("202$"))

    def test_garbled_msh2_nak_102(self) -> None:
        """MSH-2 not four distinct characters: AR 102 at MSH-2, MSA-2 echoed, not stored."""
        for encoding in (b"^^&&", b"^~", b"^~\\&&&"):
            gateway = Gateway()
            message = hl7("ENC1").replace(b"^~\\&", encoding, 1)
            reply = self.send_one(gateway, message)
            self.assertEqual((reply.code, reply.control_id), ("AR", "ENC1"), encoding)
            self.assertEqual(reply.error_code, 102)
            self.assertEqual(reply.error_location, "MSH^1^2")
            self.assertEqual(gateway.messages(), [])

    def test_empty_msh10_nak_101(self) -> None:
        """MSH-10 empty: AR 101 at MSH-10 with MSA-2 empty; not stored."""
        gateway = Gateway()
        reply = self.send_one(gateway, hl7(""))
        self.assertEqual((reply.code, reply.control_id), ("AR", ""))
        self.assertEqual(reply.error_code, 101)
        self.assertEqual(reply.error_location, "MSH^1^10")
        self.assertEqual(gateway.messages(), [])

    def test_missing_msh9_nak_101(self) -> None:
        """MSH-9 missing: AR 101 at MSH-9; not stored."""
        gateway = Gateway()
        reply = self.send_one(gateway, hl7("TYP1", message_type=""))
        self.assertEqual((reply.code, reply.control_id), ("AR", "TYP1"))
        self.assertEqual(reply.error_code, 101)
        self.assertEqual(reply.error_location, "MSH^1^9")
        self.assertEqual(gateway.messages(), [])

    def test_type_no_flow_accepts_ar_200_recorded(self) -> None:
        """A message type no flow takes: AR 200, recorded as rejected with a reason."""
        gateway = Gateway()
        reply = self.send_one(gateway, hl7("ORU1", message_type="ORU^R01"))
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "ORU1", 200))
        [stored] = gateway.messages()
        self.assertFalse(stored.accepted)
        self.assertEqual(stored.flows, ())
        self.assertEqual(stored.ack_code, "AR")
        self.assertIn("200", stored.reason)

    def test_event_no_flow_accepts_ar_201_recorded(self) -> None:
        """A known message type with an event no flow takes: AR 201, recorded as rejected."""
        gateway = Gateway()
        reply = self.send_one(gateway, hl7("EVT1", message_type="ADT^A99"))
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "EVT1", 201))
        [stored] = gateway.messages()
        self.assertFalse(stored.accepted)
        self.assertIn("201", stored.reason)

    def test_processing_id_not_accepted_ar_202(self) -> None:
        """MSH-11 T on a listener that accepts only P: AR 202 at MSH-11; never accepted."""
        gateway = Gateway(tenant=TenantConfig(name="test", listen="tcp:0", processing_ids=("P",)))
        reply = self.send_one(gateway, hl7("PID1", processing_id="T"))
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "PID1", 202))
        self.assertEqual(reply.error_location, "MSH^1^11")
        self.assertEqual([m for m in gateway.messages() if m.accepted], [])
        self.assertEqual(self.send_one(gateway, hl7("PID2", processing_id="P")).code, "AA")

    def test_version_not_accepted_ar_203(self) -> None:
        """MSH-12 not in the tenant's versions: AR 203 at MSH-12; never accepted."""
        gateway = Gateway(tenant=TenantConfig(name="test", listen="tcp:0", versions=("2.5",)))
        reply = self.send_one(gateway, hl7("VER1", version="2.3"))
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "VER1", 203))
        self.assertEqual(reply.error_location, "MSH^1^12")
        self.assertEqual([m for m in gateway.messages() if m.accepted], [])

    def test_unknown_charset_nak_103(self) -> None:
        """MSH-18 names an unknown charset: AR 103 at MSH-18; not stored."""
        gateway = Gateway()
        reply = self.send_one(gateway, hl7("CS1", charset="KLINGON"))
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "CS1", 103))
        self.assertEqual(reply.error_location, "MSH^1^18")
        self.assertEqual(gateway.messages(), [])

    def test_bytes_invalid_for_declared_charset_nak_102(self) -> None:
        """Bytes invalid for MSH-18 (Latin-1 in a UTF-8 message): AR 102 naming the byte."""
        gateway = Gateway()
        message = hl7("CS2", charset="UNICODE UTF-8", patient=b"M\xfcller^Hans")
        reply = self.send_one(gateway, message)
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "CS2", 102))
        self.assertEqual(reply.error_location, "MSH^1^18")
        offset = message.index(b"\xfc")
        self.assertIn(f"0xFC at offset {offset}", reply.diagnostic)
        self.assertEqual(gateway.messages(), [])

    def test_declared_charset_accepted_stored_byte_exact(self) -> None:
        """Valid bytes in the declared charset: AA echoing MSH-18; stored byte for byte."""
        gateway = Gateway()
        message = hl7("CS3", charset="UNICODE UTF-8", patient="Müller^Zoë".encode())
        reply = self.send_one(gateway, message)
        self.assertEqual((reply.code, reply.control_id), ("AA", "CS3"))
        self.assertEqual(reply.msh[18], "UNICODE UTF-8")
        self.assertEqual(gateway.messages()[0].raw, message)

    def test_empty_charset_high_bytes_use_tenant_default(self) -> None:
        """MSH-18 empty with bytes above 0x7F: decoded with the tenant default; stored exact."""
        latin = hl7("CS4", patient=b"M\xfcller^Hans")
        gateway = Gateway()  # default charset 8859/1
        self.assertEqual(self.send_one(gateway, latin).code, "AA")
        self.assertEqual(gateway.messages()[0].raw, latin)

        utf8_tenant = TenantConfig(name="test", listen="tcp:0", default_charset="UNICODE UTF-8")
        gateway = Gateway(tenant=utf8_tenant)
        utf8 = hl7("CS5", patient="Müller^Hans".encode())
        self.assertEqual(self.send_one(gateway, utf8).code, "AA")
        self.assertEqual(gateway.messages()[0].raw, utf8)
        # The same Latin-1 bytes are not valid UTF-8: refused, never decoded lossily.
        reply = self.send_one(gateway, latin)
        self.assertEqual((reply.code, reply.error_code), ("AE", 102))
        self.assertEqual(len(gateway.messages()), 1)

    def test_malformed_escapes_passed_through(self) -> None:
        """Malformed escapes (\\X4, an unterminated \\) are stored unchanged and get AA."""
        gateway = Gateway()
        message = hl7("ESC1", patient=b"Do\\X4\\e^J\\.br\\ohn\\")
        reply = self.send_one(gateway, message)
        self.assertEqual((reply.code, reply.control_id), ("AA", "ESC1"))
        self.assertEqual(gateway.messages()[0].raw, message)


class StoreThenAckTests(GatewayTestCase):
    """G4: no AA before the commit; a failed commit gives a NAK, never AA."""

    def test_nothing_answered_or_stored_before_commit(self) -> None:
        """While the commit is held, nothing is written back and nothing is stored."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(mllp(hl7("G4A")))
        self.assertEqual(connection.received(), b"")
        self.assertEqual(gateway.messages(), [])
        self.assertEqual(len(runner.calls), 1)
        runner.run_next()
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id), ("AA", "G4A"))
        self.assertEqual([m.control_id for m in gateway.messages()], ["G4A"])

    def test_frames_of_one_turn_commit_together(self) -> None:
        """With the reactor's clock, a group starts at the end of the turn that read its frames.

        Three senders' frames read in one turn make one group; a frame that
        arrives while that group commits goes into the next, started as soon
        as the first commit ends (no further wait).
        """
        runner = ManualRunner()
        gateway = Gateway(runner=runner, group_by_turn=True)
        connections = [gateway.connect() for _ in range(3)]
        for number, connection in enumerate(connections):
            connection.send(mllp(hl7(f"TURN{number}")))
        self.assertEqual(runner.calls, [])
        gateway.clock.advance(0)
        self.assertEqual(len(runner.calls), 1)
        late = gateway.connect()
        late.send(mllp(hl7("LATE")))
        gateway.clock.advance(0)
        self.assertEqual(len(runner.calls), 1)  # waits for the running group
        runner.run_next()
        for number, connection in enumerate(connections):
            reply = one_reply(connection)
            self.assertEqual((reply.code, reply.control_id), ("AA", f"TURN{number}"))
        self.assertEqual(late.received(), b"")
        self.assertEqual(len(runner.calls), 1)  # the next group started at once
        runner.run_next()
        self.assertEqual(one_reply(late).control_id, "LATE")
        self.assertEqual(gateway.ingest._committer.groups, 2)
        self.assertEqual(len(gateway.messages()), 4)

    def test_failed_commit_nak_207_then_next_message_normal(self) -> None:
        """A failed commit gives AR 207 (not AA, not stored); the next message gets AA."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(mllp(hl7("G4B")))
        runner.fail_next(OperationalError("INSERT", {}, Exception("disk I/O error")))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "G4B", 207))
        self.assertEqual(gateway.messages(), [])
        self.assertFalse(connection.closed)

        connection.send(mllp(hl7("G4C")))
        runner.run_next()
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id), ("AA", "G4C"))
        self.assertEqual([m.control_id for m in gateway.messages()], ["G4C"])

    def test_disk_full_nak_207(self) -> None:
        """A full disk during the commit ("database or disk is full"): AR 207."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(mllp(hl7("G4F")))
        runner.fail_next(OperationalError("INSERT", {}, Exception("database or disk is full")))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.error_code), ("AR", 207))
        self.assertEqual(gateway.messages(), [])

    def test_locked_database_nak_206(self) -> None:
        """A locked database during the commit: AR 206, not stored; then normal again."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(mllp(hl7("G4D")))
        runner.fail_next(OperationalError("BEGIN", {}, Exception("database is locked")))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "G4D", 206))
        self.assertEqual(gateway.messages(), [])

        # The sender resends after the NAK: processed once, normally.
        connection.send(mllp(hl7("G4D")))
        runner.run_next()
        self.assertEqual(one_reply(connection).code, "AA")
        self.assertEqual([m.control_id for m in gateway.messages()], ["G4D"])

    def test_failed_commit_enhanced_mode_cr(self) -> None:
        """In enhanced mode a failed commit is answered CR, never CA."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(mllp(hl7("G4E", accept_ack="AL")))
        runner.fail_next(OperationalError("INSERT", {}, Exception("disk I/O error")))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.error_code), ("CR", 207))
        self.assertEqual(gateway.messages(), [])

    def test_failed_group_naks_every_member(self) -> None:
        """When a group commit fails, every message in it gets a NAK; none is stored."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        first, second, third = gateway.connect(), gateway.connect(), gateway.connect()
        first.send(mllp(hl7("GRP1")))
        second.send(mllp(hl7("GRP2")))
        third.send(mllp(hl7("GRP3")))
        runner.run_next()  # the first group: GRP1 alone
        self.assertEqual(one_reply(first).code, "AA")
        runner.fail_next(OperationalError("INSERT", {}, Exception("disk I/O error")))
        self.assertEqual(one_reply(second).error_code, 207)
        self.assertEqual(one_reply(third).error_code, 207)
        self.assertEqual([m.control_id for m in gateway.messages()], ["GRP1"])


@implementer(IFlowRunner)
@define
class AskedFlows:
    """A flow runner that records the triggers it is asked to fold, and renders none."""

    asked: list[bytes] = field(factory=list)

    def first_actions(self, _tenant: str, flows: Sequence[str], raw: bytes) -> tuple[None, ...]:
        self.asked.append(raw)
        return tuple(None for _ in flows)

    def stored(self, _result: CommitResult) -> None:
        pass

    def watch(self, _execution_id: int, _timeout: float) -> Deferred[Finished]:
        return Deferred()

    def is_full(self, _destination: str) -> bool:
        return False


class FoldPolicyTests(GatewayTestCase):
    """When the first actions are rendered before the commit (the executor's fold)."""

    def gateway_with_an_action(self, **options: object) -> tuple[Gateway, list[bytes]]:
        """A gateway whose ADT^A04 flow has one action; the first actions it asks for are
        recorded (by trigger) and left unrendered."""
        with_action = app(flow("relay", "ADT^A04", [action("send", 2601, "ADT^A04", "MSH")]))
        flows = AskedFlows()
        self.assertTrue(verifyObject(IFlowRunner, flows))
        gateway = Gateway(apps=(with_action,), flows=flows, **options)  # type: ignore[arg-type]
        return gateway, flows.asked

    def test_only_while_a_commit_is_running(self) -> None:
        """An idle gateway commits and answers at once (the executor renders after the
        ACK); a message that arrives while a commit runs has its first actions rendered
        while it waits for the next one. Flows without actions never ask."""
        runner = ManualRunner()
        gateway, asked = self.gateway_with_an_action(runner=runner)
        first, second, third = gateway.connect(), gateway.connect(), gateway.connect()
        first.send(mllp(hl7("IDLE1")))
        self.assertEqual(asked, [])
        second.send(mllp(hl7("BUSY1")))
        third.send(mllp(hl7("BUSY2", "ADT^A08")))  # routed to a flow without actions
        self.assertEqual(asked, [hl7("BUSY1")])
        runner.run_next()
        self.assertEqual(one_reply(first).control_id, "IDLE1")
        runner.run_next()
        self.assertEqual(one_reply(second).control_id, "BUSY1")
        self.assertEqual(one_reply(third).control_id, "BUSY2")
        fourth = gateway.connect()
        fourth.send(mllp(hl7("IDLE2")))
        self.assertEqual(asked, [hl7("BUSY1")])
        runner.run_next()
        self.assertEqual(one_reply(fourth).code, "AA")

    def test_always_when_asked_to(self) -> None:
        """``fold_while_idle`` (an inline database, in tests): before every commit."""
        gateway, asked = self.gateway_with_an_action(fold_while_idle=True)
        self.assertEqual(self.send_one(gateway, hl7("IDLE1")).code, "AA")
        self.assertEqual(asked, [hl7("IDLE1")])


class DuplicateTests(GatewayTestCase):
    """G3: a resend is not processed twice; the same MSH-10 with other bytes is refused."""

    def test_resend_replays_stored_ack_byte_for_byte(self) -> None:
        """Same sender, MSH-10 and bytes: the stored ACK is replayed exactly; stored once."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(mllp(hl7("DUP1")))
        original = connection.received()
        self.assertEqual(mllp_replies(original)[0].code, "AA")
        connection.send(mllp(hl7("DUP1")))
        self.assertEqual(connection.received(), original)
        self.assertEqual([m.control_id for m in gateway.messages()], ["DUP1"])
        self.assertEqual(len(self.gateway_events("stored ACK replayed")), 1)

    def test_resend_on_new_connection_replays(self) -> None:
        """A resend on a new connection (another source port) replays the stored ACK."""
        gateway = Gateway()
        first = gateway.connect(port=40001)
        first.send(mllp(hl7("DUP2")))
        original = first.received()
        first.protocol.connectionLost()
        second = gateway.connect(port=40002)
        second.send(mllp(hl7("DUP2")))
        self.assertEqual(second.received(), original)
        self.assertEqual(len(gateway.messages()), 1)

    def test_same_control_id_other_bytes_nak_205(self) -> None:
        """Same sender and MSH-10, different bytes: AR 205 at MSH-10, logged, not stored."""
        gateway = Gateway()
        self.assertEqual(self.send_one(gateway, hl7("DUP3")).code, "AA")
        reply = self.send_one(gateway, hl7("DUP3", patient=b"Roe^Jane"))
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "DUP3", 205))
        self.assertEqual(reply.error_location, "MSH^1^10")
        [stored] = gateway.messages()
        self.assertEqual(stored.raw, hl7("DUP3"))
        [event] = self.gateway_events("same MSH-10")
        self.assertEqual(event["control_id"], "DUP3")

    def test_same_control_id_other_sender_is_new(self) -> None:
        """The same MSH-10 from another sender (MSH-3/MSH-4) is a new message."""
        gateway = Gateway()
        self.assertEqual(self.send_one(gateway, hl7("DUP4")).code, "AA")
        other = hl7("DUP4", sending="LAB|Hospital")
        self.assertEqual(self.send_one(gateway, other).code, "AA")
        self.assertEqual([m.sender for m in gateway.messages()], ["HIS|Hospital", "LAB|Hospital"])

    def test_resend_while_original_waits_in_same_group(self) -> None:
        """A resend committed in the same group as the original replays the original's ACK."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        busy, original, resend = gateway.connect(), gateway.connect(), gateway.connect()
        busy.send(mllp(hl7("OTHER")))  # holds the committer, so the next two group together
        original.send(mllp(hl7("DUP5")))
        resend.send(mllp(hl7("DUP5")))
        runner.run_next()
        runner.run_next()
        first = original.received()
        self.assertEqual(mllp_replies(first)[0].code, "AA")
        self.assertEqual(resend.received(), first)
        self.assertEqual(sorted(m.control_id for m in gateway.messages()), ["DUP5", "OTHER"])

    def test_resend_after_rejection_is_not_a_duplicate(self) -> None:
        """A message first rejected (AR, recorded) and resent is judged again, not replayed."""
        gateway = Gateway()
        self.assertEqual(self.send_one(gateway, hl7("DUP6", message_type="ORU^R01")).code, "AR")
        reply = self.send_one(gateway, hl7("DUP6", message_type="ORU^R01"))
        self.assertEqual((reply.code, reply.error_code), ("AR", 200))
        self.assertEqual([m.accepted for m in gateway.messages()], [False, False])


def routing_apps() -> tuple[App, ...]:
    """Two apps with an ADT^A04 MLLP flow each, a plain TCP flow and a disabled flow."""
    return (
        App(
            name="Lab",
            tenant="test",
            app_id="APPLAB",
            flows=(
                Flow(name="lab a04", flow_id="FLWLABA04", trigger=Trigger("mllp", "ADT^A04")),
                Flow(
                    name="lab off",
                    flow_id="FLWLABOFF",
                    enabled=False,
                    trigger=Trigger("mllp", "SIU^S12"),
                ),
            ),
        ),
        App(
            name="Crm",
            tenant="test",
            app_id="APPCRM",
            flows=(
                Flow(name="crm a04", flow_id="FLWCRMA04", trigger=Trigger("mllp", "ADT^A04")),
                Flow(name="crm a08", flow_id="FLWCRMA08", trigger=Trigger("tcp", "ADT^A08")),
            ),
        ),
    )


class RoutingTests(GatewayTestCase):
    """docs/protocol.md "Routing", seen from the sender."""

    def setUp(self) -> None:
        super().setUp()
        self.gateway = Gateway(apps=routing_apps())

    def send_plain(self, message: bytes) -> Reply:
        """Send ``message`` over plain TCP, ended by a half-close; return its one reply."""
        connection = self.gateway.connect()
        connection.send(message)
        connection.protocol.readConnectionLost()
        [reply] = plain_replies(connection.received())
        return reply

    def test_app_and_flow_id_name_one_flow(self) -> None:
        """MSH-5/MSH-6 naming an enabled flow route the message to that flow only."""
        reply = self.send_one(self.gateway, hl7("R1", receiving="APPCRM|FLWCRMA04"))
        self.assertEqual(reply.code, "AA")
        [stored] = self.gateway.messages()
        self.assertEqual(stored.flows, ("FLWCRMA04",))

    def test_type_routing_runs_every_matching_flow(self) -> None:
        """Without a named flow, every enabled flow for MSH-9 over this framing runs."""
        reply = self.send_one(self.gateway, hl7("R2"))
        self.assertEqual(reply.code, "AA")
        [stored] = self.gateway.messages()
        self.assertEqual(sorted(stored.flows), ["FLWCRMA04", "FLWLABA04"])
        self.assertTrue(stored.accepted)

    def test_named_flow_other_event_ar_201(self) -> None:
        """A named flow that takes another event: AR 201, recorded with the reason."""
        message = hl7("R3", message_type="ADT^A08", receiving="APPCRM|FLWCRMA04")
        reply = self.send_one(self.gateway, message)
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "R3", 201))
        [stored] = self.gateway.messages()
        self.assertFalse(stored.accepted)
        self.assertIn("ADT^A04", stored.reason)

    def test_named_flow_other_type_ar_200(self) -> None:
        """A named flow that takes another message type: AR 200."""
        message = hl7("R3B", message_type="ORU^R01", receiving="APPCRM|FLWCRMA04")
        reply = self.send_one(self.gateway, message)
        self.assertEqual((reply.code, reply.error_code), ("AR", 200))
        self.assertFalse(self.gateway.messages()[0].accepted)

    def test_unknown_flow_of_known_app_ar_204(self) -> None:
        """App ID known, Flow ID unknown and no flow for the type: AR 204 at MSH-6, recorded."""
        message = hl7("R4", message_type="ORU^R01", receiving="APPLAB|FLWNOSUCH")
        reply = self.send_one(self.gateway, message)
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "R4", 204))
        self.assertEqual(reply.error_location, "MSH^1^6")
        [stored] = self.gateway.messages()
        self.assertFalse(stored.accepted)
        self.assertEqual(stored.flows, ())

    def test_disabled_flow_is_not_routed(self) -> None:
        """A message naming a disabled flow is not routed to it: AR 204, recorded."""
        message = hl7("R5", message_type="SIU^S12", receiving="APPLAB|FLWLABOFF")
        reply = self.send_one(self.gateway, message)
        self.assertEqual((reply.code, reply.error_code), ("AR", 204))
        self.assertFalse(self.gateway.messages()[0].accepted)

    def test_mistyped_flow_id_of_known_app_never_falls_back(self) -> None:
        """A known App ID with a mistyped Flow ID: AR 204, even though flows take the type."""
        message = hl7("R4B", receiving="APPCRM|FLWCRMA0X")
        reply = self.send_one(self.gateway, message)
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "R4B", 204))
        self.assertEqual(reply.error_location, "MSH^1^6")
        [stored] = self.gateway.messages()
        self.assertEqual((stored.accepted, stored.flows), (False, ()))

    def test_disabled_flow_of_known_app_never_falls_back(self) -> None:
        """A known App ID naming its disabled flow: AR 204, not the type's other flows."""
        message = hl7("R4C", receiving="APPLAB|FLWLABOFF")  # ADT^A04: two flows take it
        reply = self.send_one(self.gateway, message)
        self.assertEqual((reply.code, reply.error_code), ("AR", 204))
        [stored] = self.gateway.messages()
        self.assertEqual((stored.accepted, stored.flows), (False, ()))

    def test_app_with_only_disabled_flows_is_still_an_app_id(self) -> None:
        """An App ID whose flows are all disabled still addresses it: AR 204, no fallback."""
        apps = (
            *routing_apps(),
            App(
                name="Off",
                tenant="test",
                app_id="APPOFF",
                flows=(
                    Flow(
                        name="off a04",
                        flow_id="FLWOFFA04",
                        enabled=False,
                        trigger=Trigger("mllp", "ADT^A04"),
                    ),
                ),
            ),
        )
        gateway = Gateway(apps=apps)
        reply = self.send_one(gateway, hl7("R4D", receiving="APPOFF|FLWOFFA04"))
        self.assertEqual((reply.code, reply.error_code), ("AR", 204))
        self.assertEqual([m.flows for m in gateway.messages()], [()])

    def test_unknown_app_id_falls_back_to_message_type(self) -> None:
        """MSH-5 that is no App ID of the tenant: routed by message type to every flow."""
        reply = self.send_one(self.gateway, hl7("R4E", receiving="NOTANAPP|FLWCRMA04"))
        self.assertEqual(reply.code, "AA")
        [stored] = self.gateway.messages()
        self.assertEqual(sorted(stored.flows), ["FLWCRMA04", "FLWLABA04"])

    def test_demo_config_routes_the_examples(self) -> None:
        """etc/flows/demo.toml routes every examples/ message (MSH-5 is no App ID: by type)."""
        demo = read_app_file(str(REPO / "etc" / "flows" / "demo.toml"))
        gateway = Gateway(tenant=TenantConfig(name="demo", listen="tcp:0"), apps=(demo,))
        flows = {flow.flow_id: flow.trigger for flow in demo.flows}
        examples = sorted((REPO / "examples").glob("*.hl7"))
        self.assertEqual(len(examples), 5)
        for path in examples:
            connection = gateway.connect()
            connection.send(mllp(path.read_bytes()))
            reply = one_reply(connection)
            self.assertEqual(reply.code, "AA", path.name)
            stored = gateway.messages()[-1]
            self.assertEqual(
                [(flows[f].message_type, flows[f].connection) for f in stored.flows],
                [(stored.message_type, "mllp")],
                path.name,
            )

    def test_plain_tcp_message_for_mllp_only_flow_rejected_and_recorded(self) -> None:
        """Over plain TCP, a type only MLLP flows take: AR 200, recorded with a reason."""
        reply = self.send_plain(hl7("R6"))
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "R6", 200))
        [stored] = self.gateway.messages()
        self.assertEqual((stored.connection, stored.accepted), ("tcp", False))
        self.assertIn("tcp", stored.reason)
        self.assertEqual(len(self.gateway_events("message rejected")), 1)

    def test_named_flow_over_wrong_framing_rejected(self) -> None:
        """A named plain-TCP flow reached over MLLP: AR, recorded; over plain TCP: AA."""
        message = hl7("R7", message_type="ADT^A08", receiving="APPCRM|FLWCRMA08")
        reply = self.send_one(self.gateway, message)
        self.assertEqual((reply.code, reply.error_code), ("AR", 200))
        self.assertEqual(
            self.send_plain(hl7("R8", "ADT^A08", receiving="APPCRM|FLWCRMA08")).code, "AA"
        )
        rows = self.gateway.messages()
        self.assertEqual(
            [(m.accepted, m.flows) for m in rows], [(False, ()), (True, ("FLWCRMA08",))]
        )
        self.assertIn("mllp", rows[0].reason + rows[0].connection)


class EnhancedModeTests(GatewayTestCase):
    """MSH-15/MSH-16 present: enhanced mode; the message is stored in every case."""

    def answers(self, message: bytes) -> list[Reply]:
        """Send ``message`` to a new gateway (``self.gateway``); return the replies."""
        self.gateway = Gateway()
        connection = self.gateway.connect()
        connection.send(mllp(message))
        return mllp_replies(connection.received())

    def test_ne_never_answered_stored(self) -> None:
        """MSH-15 NE: no accept ACK, the message is stored."""
        self.assertEqual(self.answers(hl7("E1", accept_ack="NE")), [])
        self.assertEqual(
            [(m.control_id, m.accepted) for m in self.gateway.messages()], [("E1", True)]
        )

    def test_ne_rejected_not_answered_recorded(self) -> None:
        """MSH-15 NE on a message no flow takes: no answer, and it is recorded."""
        self.assertEqual(self.answers(hl7("E1R", "ORU^R01", accept_ack="NE")), [])
        self.assertEqual([m.accepted for m in self.gateway.messages()], [False])

    def test_er_success_not_answered_stored(self) -> None:
        """MSH-15 ER on success: no answer; stored."""
        self.assertEqual(self.answers(hl7("E2", accept_ack="ER")), [])
        self.assertEqual([m.control_id for m in self.gateway.messages()], ["E2"])

    def test_er_rejected_answered_cr(self) -> None:
        """MSH-15 ER on a rejected message: CR with ERR-3 200; recorded."""
        [reply] = self.answers(hl7("E3", "ORU^R01", accept_ack="ER"))
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("CR", "E3", 200))
        self.assertEqual([m.accepted for m in self.gateway.messages()], [False])

    def test_er_header_error_answered_ce(self) -> None:
        """MSH-15 ER on a content error (control byte): CE 102."""
        [reply] = self.answers(hl7("E3B", accept_ack="ER", patient=b"Doe\x02"))
        self.assertEqual((reply.code, reply.error_code), ("CE", 102))

    def test_su_success_answered_ca(self) -> None:
        """MSH-15 SU on success: CA; stored."""
        [reply] = self.answers(hl7("E4", accept_ack="SU"))
        self.assertEqual((reply.code, reply.control_id), ("CA", "E4"))
        self.assertEqual([m.control_id for m in self.gateway.messages()], ["E4"])

    def test_su_rejected_not_answered_recorded(self) -> None:
        """MSH-15 SU on a rejected message: no answer; recorded."""
        self.assertEqual(self.answers(hl7("E5", "ORU^R01", accept_ack="SU")), [])
        self.assertEqual([m.accepted for m in self.gateway.messages()], [False])

    def test_al_always_answered(self) -> None:
        """MSH-15 AL: CA on success, CR on rejection; both stored."""
        [reply] = self.answers(hl7("E6", accept_ack="AL"))
        self.assertEqual((reply.code, reply.control_id), ("CA", "E6"))
        self.assertEqual(len(self.gateway.messages()), 1)
        [reply] = self.answers(hl7("E7", "ORU^R01", accept_ack="AL"))
        self.assertEqual((reply.code, reply.error_code), ("CR", 200))
        self.assertEqual(len(self.gateway.messages()), 1)

    def test_msh16_alone_means_enhanced(self) -> None:
        """MSH-15 empty and MSH-16 AL: enhanced mode, CA, then the application ACK AA."""
        accept, application = self.answers(hl7("E8", application_ack="AL"))
        self.assertEqual((accept.code, accept.control_id), ("CA", "E8"))
        self.assertEqual((application.code, application.control_id), ("AA", "E8"))

    def test_ne_resend_not_answered_not_stored_twice(self) -> None:
        """A resend of an NE message is not answered and not stored again."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(mllp(hl7("E9", accept_ack="NE")) * 2)
        self.assertEqual(connection.received(), b"")
        self.assertEqual(len(gateway.messages()), 1)


class InboundAckTests(GatewayTestCase):
    """An inbound ACK (MSH-9 = ACK) is never acknowledged."""

    def test_inbound_ack_not_answered_not_stored_logged(self) -> None:
        """An ACK gets no answer, is not stored, is logged; the connection keeps working."""
        gateway = Gateway()
        connection = gateway.connect()
        ack = (
            b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|20240101||ACK^A04^ACK|ACK1|P|2.5\rMSA|AA|X1\r"
        )
        connection.send(mllp(ack))
        self.assertEqual(connection.received(), b"")
        self.assertEqual(gateway.messages(), [])
        [event] = self.gateway_events("inbound ACK")
        self.assertEqual(event["control_id"], "ACK1")
        self.assertFalse(connection.closed)
        connection.send(mllp(hl7("AFTER")))
        self.assertEqual(one_reply(connection).control_id, "AFTER")

    def test_malformed_inbound_ack_not_answered(self) -> None:
        """An ACK with a header problem (empty MSH-10, control byte) is not answered either."""
        for ack in (
            b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|20240101||ACK||P|2.5\rMSA|AA|X1\r",
            b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|20240101||ACK|A2|P|2.5\rMSA|AA|X\x01\r",
        ):
            gateway = Gateway()
            connection = gateway.connect()
            connection.send(mllp(ack))
            self.assertEqual(connection.received(), b"", ack)
            self.assertEqual(gateway.messages(), [])
            self.assertFalse(connection.closed)


PHI_MARKERS = ("ZQXFAMILYMARKER", "ZQXGIVENMARKER", "ZQXPLAINMARKER")


class NoPhiInLogsTests(GatewayTestCase):
    """G6: planted patient names never appear in any log event."""

    def patient(self, n: int = 0) -> bytes:
        """A PID-5 value made of marker words."""
        return f"{PHI_MARKERS[0]}{n}^{PHI_MARKERS[1]}".encode("ascii")

    def test_no_marker_in_any_log_event(self) -> None:
        """Across accepted, duplicate, rejected, malformed, oversized and failed messages."""
        limits = Limits(max_frame_size=2048, frame_timeout=30.0)
        gateway = Gateway(tenant=TenantConfig(name="test", listen="tcp:0", limits=limits))
        patient = self.patient()
        scenarios = [
            hl7("P1", patient=patient),  # AA
            hl7("P1", patient=patient),  # replayed
            hl7("P1", patient=self.patient(1)),  # 205
            hl7("P2", "ORU^R01", patient=patient),  # AR 200
            hl7("P3", patient=patient).replace(b"^~\\&", b"^^&&", 1),  # 102 MSH-2
            hl7("P4", patient=patient + b"\x01"),  # 102 control byte
            hl7("P5", charset="UNICODE UTF-8", patient=patient + b"\xff"),  # 102 charset
            hl7("P6", charset="KLINGON", patient=patient),  # 103
            hl7("P7", patient=patient, version="9.9"),  # 203
            hl7("", patient=patient),  # 101
            hl7("P8", "ACK^A04^ACK", patient=patient),  # inbound ACK
            padded(hl7("P9", patient=patient), 3000),  # 104
            b"PID|1||" + patient + b"\r",  # not MSH: closed
        ]
        for message in scenarios:
            connection = gateway.connect()
            connection.send(mllp(message))
            connection.protocol.connectionLost()
        self.assertIn(patient, gateway.messages()[0].raw)

        # Plain TCP, a frame that never ends, a partial frame that times out.
        plain = gateway.connect()
        plain.send(hl7("P10", patient=PHI_MARKERS[2].encode("ascii")))
        gateway.clock.advance(gateway.tenant.tcp.idle_gap)
        endless = gateway.connect()
        endless.send(b"\x0b" + padded(hl7("P11", patient=patient), 5000))
        partial = gateway.connect()
        partial.send(b"\x0b" + hl7("P12", patient=patient))
        gateway.clock.advance(limits.frame_timeout)
        http = gateway.connect()
        http.send(b"GET /patients?name=" + patient + b" HTTP/1.1\r\n\r\n")

        # A commit that fails.
        runner = ManualRunner()
        failing = Gateway(runner=runner)
        connection = failing.connect()
        connection.send(mllp(hl7("P13", patient=patient)))
        runner.fail_next(OperationalError("INSERT", {"raw": patient}, Exception("disk I/O error")))
        self.assertEqual(one_reply(connection).error_code, 207)

        self.assertEqual(endless.transport.disconnecting, True)
        self.assertGreaterEqual(len(self.gateway_events()), 12)
        for event in self.events:
            text = log_text(event).upper()
            for marker in PHI_MARKERS:
                self.assertNotIn(marker, text, formatEvent(event))


class WallClockTests(SynchronousTestCase):
    """Timestamps come from the wall clock, apart from the clock timers run on
    (monotonic in the service: docs/guarantees.md "the wall clock jumps")."""

    def test_received_at_and_ack_time_read_the_wall_clock(self) -> None:
        wall = Clock()
        wall.advance(1_800_000_000)  # 2027-01-15 08:00:00 UTC
        gateway = Gateway(wall=wall)
        connection = gateway.connect()
        connection.send(mllp(hl7("W1")))
        ack = connection.received().strip(b"\x0b\x1c\r").split(b"\r")[0]
        self.assertEqual(ack.split(b"|")[6], b"20270115080000")
        [message] = gateway.messages()
        self.assertEqual(message.received_at, 1_800_000_000)
        self.assertEqual(gateway.clock.seconds(), 1_700_000_000, "the timer clock is apart")
