"""Tests for udsgateway.peers.commands: the ``send`` and ``receive`` tools, all in memory."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Sequence

import twisted.test
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.filepath import FilePath
from twisted.test.iosim import ConnectionCompleter, IOPump
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.cli.main import main
from udsgateway.hl7.ack import ControlIdSource, Reply, parse_reply
from udsgateway.peers.commands import (
    GARBAGE,
    Framing,
    ReceivedMessage,
    ReceiverFactory,
    ReceiverOptions,
    ReceiverProtocol,
    SendResult,
    _run_reactor,
    _SenderFactory,
    client_endpoint,
    client_tls_options,
    exit_status,
    output_record,
    parse_address,
    read_message_files,
    run_receive,
    run_send,
    split_messages,
    with_control_id,
)
from udsgateway.testing import hl7_message, mllp
from udsgateway.wire.framing import Frame, MLLPFramer

PORT = 2575
# twisted's own test certificate and key, in one PEM file.
SERVER_PEM = FilePath(twisted.test.__file__).sibling("server.pem").path


def hl7(
    control_id: str,
    *,
    accept_ack: str = "",
    application_ack: str = "",
    sep: bytes = b"\r",
    event: str = "A04",
) -> bytes:
    """A synthetic ADT message (no real person) with its segments ended by ``sep``."""
    return hl7_message(
        control_id,
        f"ADT^{event}",
        sending="REGSYS|GENHOSP",
        receiving="UDSGW|DEMO",
        sent_at="20240102030405",
        accept_ack=accept_ack,
        application_ack=application_ack,
        segments=["EVN|A04|20240102030405", "PID|1||123456^^^GENHOSP^MR||TESTPERSON^ALEX"],
        separator=sep,
    )


def replies(data: bytes) -> list[Reply]:
    """The MLLP frames in ``data``, read as ACKs."""
    framer = MLLPFramer()
    return [parse_reply(event.payload) for event in framer.feed(data) if isinstance(event, Frame)]


class SplitMessagesTests(SynchronousTestCase):
    def test_cr_separated(self) -> None:
        """A message whose segments end with CR comes back unchanged."""
        self.assertEqual(split_messages(hl7("M1")), [hl7("M1")])

    def test_lf_and_crlf(self) -> None:
        """LF and CR LF separators are re-joined with CR, every segment ended by CR."""
        self.assertEqual(split_messages(hl7("M1", sep=b"\n")), [hl7("M1")])
        self.assertEqual(split_messages(hl7("M1", sep=b"\r\n")), [hl7("M1")])

    def test_last_segment_without_separator(self) -> None:
        """A file that does not end with a separator still gives a CR-terminated message."""
        self.assertEqual(split_messages(hl7("M1", sep=b"\n").rstrip(b"\n")), [hl7("M1")])

    def test_several_messages_mixed_separators(self) -> None:
        """Each line starting with MSH starts a message; blank lines between them are ignored."""
        data = (
            b"\n\r\n"
            + hl7("M1", sep=b"\r\n")
            + b"\r\n\r\n"
            + hl7("M2", sep=b"\n")
            + b"   \n\t\n"
            + hl7("M3")
            + b"\n\n"
        )
        self.assertEqual(split_messages(data), [hl7("M1"), hl7("M2"), hl7("M3")])

    def test_segment_bytes_unchanged(self) -> None:
        """Bytes inside a segment (escapes, non-ASCII, trailing spaces) are sent as they are."""
        pid = b"PID|1||X\\F\\Y||M\xfcLLER^J\xc3\xb6RG \\E\\ \\X0D\\  "
        data = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A04|M1|P|2.5\n" + pid + b"\n"
        self.assertEqual(
            split_messages(data), [b"MSH|^~\\&|A|B|C|D|20240101||ADT^A04|M1|P|2.5\r" + pid + b"\r"]
        )

    def test_byte_order_mark_dropped(self) -> None:
        """A UTF-8 byte order mark at the start of the file is not sent."""
        self.assertEqual(split_messages(b"\xef\xbb\xbf" + hl7("M1")), [hl7("M1")])

    def test_text_before_first_msh(self) -> None:
        """Anything but blank lines before the first MSH is an error naming the line."""
        with self.assertRaises(ValueError) as caught:
            split_messages(b"\nhello\n" + hl7("M1"))
        self.assertIn("line 2", str(caught.exception))

    def test_empty(self) -> None:
        """An empty or blank file holds no message."""
        self.assertEqual(split_messages(b""), [])
        self.assertEqual(split_messages(b"\r\n \n"), [])

    def test_read_message_files(self) -> None:
        """Files are read in order; a missing or message-less file is an error naming it."""
        first, second, blank = self.mktemp(), self.mktemp(), self.mktemp()
        FilePath(first).setContent(hl7("M1") + hl7("M2"))
        FilePath(second).setContent(hl7("M3", sep=b"\n"))
        FilePath(blank).setContent(b"\n\n")
        self.assertEqual(read_message_files([first, second]), [hl7("M1"), hl7("M2"), hl7("M3")])
        with self.assertRaises(ValueError) as caught:
            read_message_files([first, blank])
        self.assertIn(blank, str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            read_message_files([first + ".missing"])
        self.assertIn("cannot read", str(caught.exception))


class _Receiver:
    """A ReceiverFactory with one connection on a StringTransport and a task.Clock."""

    def __init__(self, options: ReceiverOptions | None = None) -> None:
        self.clock = Clock()
        self.records: list[ReceivedMessage] = []
        self.factory = ReceiverFactory(
            self.clock,
            options or ReceiverOptions(),
            on_message=self.records.append,
            control_ids=ControlIdSource("TEST"),
        )
        self.protocol, self.transport = self.connect()

    def connect(self) -> tuple[ReceiverProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, *messages: bytes) -> None:
        for message in messages:
            self.protocol.dataReceived(mllp(message))

    def replies(self) -> list[Reply]:
        return replies(self.transport.value())


class ReceiverTests(SynchronousTestCase):
    def test_ack_echoes_control_id(self) -> None:
        """An MLLP message gets one MLLP-framed AA whose MSA-2 is the message's MSH-10."""
        receiver = _Receiver()
        receiver.send(hl7("MSG00001"))
        data = receiver.transport.value()
        self.assertTrue(data.startswith(b"\x0bMSH|^~\\&|UDSGW|DEMO|REGSYS|GENHOSP|"))
        self.assertTrue(data.endswith(b"\x1c\r"))
        [reply] = receiver.replies()
        self.assertEqual((reply.ack_code, reply.control_id, reply.problem), ("AA", "MSG00001", ""))
        self.assertFalse(receiver.transport.disconnecting)

    def test_record_and_line(self) -> None:
        """Each message is reported with peer, MSH-9, MSH-10, size and answer, no body."""
        receiver = _Receiver()
        receiver.send(hl7("MSG00001"))
        [record] = receiver.records
        self.assertEqual(
            (record.number, record.message_type, record.control_id, record.payload),
            (1, "ADT^A04", "MSG00001", hl7("MSG00001")),
        )
        self.assertEqual(
            record.line(),
            f"1970-01-01T00:00:00.000Z 192.168.1.1:54321 ADT^A04 MSG00001 "
            f"{len(hl7('MSG00001'))} AA mllp",
        )
        self.assertNotIn("TESTPERSON", record.line())

    def test_enhanced_mode(self) -> None:
        """A message with MSH-15/16 gets CA; with MSH-15 NE it gets no answer at all."""
        receiver = _Receiver()
        receiver.send(
            hl7("M1", accept_ack="AL", application_ack="NE"),
            hl7("M2", accept_ack="NE", application_ack="NE"),
        )
        self.assertEqual([(r.ack_code, r.control_id) for r in receiver.replies()], [("CA", "M1")])
        self.assertEqual([r.answer for r in receiver.records], ["CA", "none"])

    def test_several_frames_in_one_chunk(self) -> None:
        """Frames arriving together are answered in order."""
        receiver = _Receiver()
        receiver.protocol.dataReceived(mllp(hl7("M1")) + mllp(hl7("M2")) + mllp(hl7("M3")))
        self.assertEqual([r.control_id for r in receiver.replies()], ["M1", "M2", "M3"])

    def test_plain_tcp_answered_after_idle_gap(self) -> None:
        """Plain TCP is detected from MSH, ends after the idle gap and gets an unframed ACK."""
        receiver = _Receiver()
        receiver.protocol.dataReceived(hl7("M1"))
        self.assertEqual(receiver.transport.value(), b"")
        receiver.clock.advance(0.2)
        data = receiver.transport.value()
        self.assertTrue(data.startswith(b"MSH|"))
        reply = parse_reply(data)
        self.assertEqual((reply.ack_code, reply.control_id), ("AA", "M1"))
        self.assertEqual(receiver.records[0].framing, "tcp")

    def test_plain_tcp_next_msh_ends_message(self) -> None:
        """Plain TCP: the next MSH ends a message at once; the last one waits for the gap."""
        receiver = _Receiver()
        receiver.protocol.dataReceived(hl7("M1") + hl7("M2"))
        self.assertEqual([r.control_id for r in receiver.records], ["M1"])
        receiver.clock.advance(0.2)
        self.assertEqual([r.control_id for r in receiver.records], ["M1", "M2"])

    def test_plain_tcp_half_close(self) -> None:
        """A plain TCP sender that half-closes gets its ACK, then the connection closes."""
        receiver = _Receiver()
        receiver.protocol.dataReceived(hl7("M1"))
        receiver.protocol.readConnectionLost()
        self.assertEqual(parse_reply(receiver.transport.value()).control_id, "M1")
        self.assertTrue(receiver.transport.disconnecting)

    def test_nak_every_nth(self) -> None:
        """--nak AR --nak-every 2: messages 2 and 4 get AR with ERR-3 207; the others AA."""
        receiver = _Receiver(ReceiverOptions(nak="AR", nak_every=2))
        receiver.send(*(hl7(f"M{n}") for n in range(1, 5)))
        got = [(r.ack_code, r.control_id, r.error_code) for r in receiver.replies()]
        self.assertEqual(
            got, [("AA", "M1", None), ("AR", "M2", 207), ("AA", "M3", None), ("AR", "M4", 207)]
        )
        self.assertEqual(receiver.replies()[1].text, "test receiver: --nak AR")

    def test_nak_every_message(self) -> None:
        """--nak CE alone answers every message with CE and the chosen ERR-3 code."""
        receiver = _Receiver(ReceiverOptions(nak="CE", nak_error=206))
        receiver.send(hl7("M1"), hl7("M2"))
        got = [(r.ack_code, r.control_id, r.error_code) for r in receiver.replies()]
        self.assertEqual(got, [("CE", "M1", 206), ("CE", "M2", 206)])

    def test_delay(self) -> None:
        """--delay 5: the ACK goes out 5 s after the message, on the clock; later ones queue."""
        receiver = _Receiver(ReceiverOptions(delay=5))
        receiver.send(hl7("M1"), hl7("M2"))
        receiver.clock.advance(4.9)
        self.assertEqual(receiver.replies(), [])
        receiver.clock.advance(0.1)
        self.assertEqual([r.control_id for r in receiver.replies()], ["M1"])
        receiver.clock.advance(5)
        self.assertEqual([r.control_id for r in receiver.replies()], ["M1", "M2"])

    def test_drop_every_nth(self) -> None:
        """--drop-every 2: message 2 is not answered; the connection is closed instead."""
        receiver = _Receiver(ReceiverOptions(drop_every=2))
        receiver.send(hl7("M1"))
        self.assertFalse(receiver.transport.disconnecting)
        receiver.send(hl7("M2"))
        self.assertEqual([r.control_id for r in receiver.replies()], ["M1"])
        self.assertTrue(receiver.transport.disconnecting)
        self.assertEqual([r.answer for r in receiver.records], ["AA", "closed"])

    def test_drop_after_delay(self) -> None:
        """With --delay the drop also happens late."""
        receiver = _Receiver(ReceiverOptions(drop_every=1, delay=3))
        receiver.send(hl7("M1"))
        receiver.clock.advance(2.9)
        self.assertFalse(receiver.transport.disconnecting)
        receiver.clock.advance(0.1)
        self.assertTrue(receiver.transport.disconnecting)
        self.assertEqual(receiver.transport.value(), b"")

    def test_messages_numbered_across_connections(self) -> None:
        """Fault counting spans connections: the 2nd message overall is dropped."""
        receiver = _Receiver(ReceiverOptions(drop_every=2))
        receiver.send(hl7("M1"))
        second, transport = receiver.connect()
        second.dataReceived(mllp(hl7("M2")))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(receiver.transport.disconnecting)

    def test_wrong_msa2_every_nth(self) -> None:
        """--wrong-msa2-every 2: message 2's AA carries an MSA-2 that is not its MSH-10."""
        receiver = _Receiver(ReceiverOptions(wrong_msa2_every=2))
        receiver.send(hl7("M1"), hl7("M2"), hl7("M3"))
        got = [(r.ack_code, r.control_id) for r in receiver.replies()]
        self.assertEqual(got, [("AA", "M1"), ("AA", "WRONGM2"), ("AA", "M3")])
        self.assertEqual(receiver.records[1].notes, ("wrong-msa2",))

    def test_garbage_every_nth(self) -> None:
        """--garbage-every 2: message 2 is answered with non-HL7 bytes in an MLLP frame."""
        receiver = _Receiver(ReceiverOptions(garbage_every=2))
        receiver.send(hl7("M1"), hl7("M2"))
        self.assertEqual(
            receiver.transport.value().split(b"\x1c\r")[1], b"\x0b" + GARBAGE.rstrip(b"\r") + b"\r"
        )
        reply = receiver.replies()[1]
        self.assertEqual((reply.ack_code, reply.problem), (None, "reply does not start with MSH"))

    def test_no_ack(self) -> None:
        """--no-ack: nothing is ever written and the connection stays open."""
        receiver = _Receiver(ReceiverOptions(no_ack=True))
        receiver.send(hl7("M1"), hl7("M2"))
        receiver.clock.advance(59)
        self.assertEqual(receiver.transport.value(), b"")
        self.assertFalse(receiver.transport.disconnecting)
        self.assertEqual([r.answer for r in receiver.records], ["none", "none"])

    def test_fault_precedence(self) -> None:
        """When faults meet: drop beats garbage, garbage beats NAK, NAK and wrong MSA-2 combine."""
        receiver = _Receiver(
            ReceiverOptions(nak="AE", nak_every=2, wrong_msa2_every=2, garbage_every=3)
        )
        receiver.send(hl7("M1"), hl7("M2"), hl7("M3"))
        self.assertEqual([r.answer for r in receiver.records], ["AA", "AE", "garbage"])
        second = receiver.replies()[1]
        self.assertEqual((second.ack_code, second.control_id), ("AE", "WRONGM2"))
        both = _Receiver(ReceiverOptions(drop_every=1, garbage_every=1))
        both.send(hl7("M1"))
        self.assertEqual(both.records[0].answer, "closed")

    def test_count(self) -> None:
        """--count 2: `finished` fires once the second message is answered; later frames close."""
        receiver = _Receiver(ReceiverOptions(count=2, delay=1))
        receiver.send(hl7("M1"), hl7("M2"), hl7("M3"))
        receiver.clock.advance(1)
        self.assertNoResult(receiver.factory.finished)
        receiver.clock.advance(1)
        self.successResultOf(receiver.factory.finished)
        self.assertEqual([r.control_id for r in receiver.replies()], ["M1", "M2"])
        self.assertEqual(len(receiver.records), 2)
        self.assertTrue(receiver.transport.disconnecting)

    def test_inbound_ack_not_answered(self) -> None:
        """An ACK sent to the receiver is never acknowledged."""
        receiver = _Receiver()
        ack = b"MSH|^~\\&|A|B|C|D|20240101||ACK^A04^ACK|X1|P|2.5\rMSA|AA|M1\r"
        receiver.send(ack)
        self.assertEqual(receiver.transport.value(), b"")
        self.assertEqual(receiver.records[0].notes, ("inbound-ack",))

    def test_bad_header_gets_nak(self) -> None:
        """A message with an empty MSH-10 gets AE with ERR-3 101 and an empty MSA-2."""
        receiver = _Receiver()
        receiver.send(hl7(""))
        [reply] = receiver.replies()
        self.assertEqual((reply.ack_code, reply.control_id, reply.error_code), ("AE", "", 101))

    def test_oversized_frame_gets_nak_104(self) -> None:
        """A frame over the size limit gets AE with ERR-3 104 and the right MSA-2."""
        receiver = _Receiver(ReceiverOptions(max_frame_size=150))
        receiver.send(hl7("M1") + b"NTE|1||" + b"x" * 50 + b"\r")
        [reply] = receiver.replies()
        self.assertEqual((reply.ack_code, reply.control_id, reply.error_code), ("AE", "M1", 104))
        self.assertEqual(receiver.records[0].notes, ("err=104",))

    def test_unreadable_frame_closes(self) -> None:
        """A frame without a readable MSH is not answered; the connection is closed."""
        receiver = _Receiver()
        receiver.protocol.dataReceived(mllp(b"HELLO"))
        self.assertEqual(receiver.transport.value(), b"")
        self.assertTrue(receiver.transport.disconnecting)
        self.assertEqual(receiver.records[0].answer, "closed")

    def test_frame_timeout(self) -> None:
        """A frame that never ends is dropped and the connection closed after 60 s."""
        receiver = _Receiver()
        receiver.protocol.dataReceived(b"\x0bMSH|^~\\&|")
        receiver.clock.advance(59)
        self.assertFalse(receiver.transport.disconnecting)
        receiver.clock.advance(1)
        self.assertTrue(receiver.transport.disconnecting)
        self.assertEqual(receiver.records, [])

    def test_idle_timeout(self) -> None:
        """A silent connection is closed after the idle timeout."""
        receiver = _Receiver(ReceiverOptions(idle_timeout=10))
        receiver.clock.advance(10)
        self.assertTrue(receiver.transport.disconnecting)

    def test_timers_cancelled_on_close(self) -> None:
        """A lost connection leaves no timer behind, and a pending delayed answer is dropped."""
        receiver = _Receiver(ReceiverOptions(delay=5, count=1))
        receiver.send(hl7("M1"))
        receiver.protocol.connectionLost()
        self.assertEqual(receiver.clock.getDelayedCalls(), [])
        self.successResultOf(receiver.factory.finished)

    def test_output_record(self) -> None:
        """--output writes a message with CR turned to LF, ending with LF, re-sendable."""
        self.assertEqual(output_record(b"MSH|a\rPID|b\r"), b"MSH|a\nPID|b\n")
        self.assertEqual(output_record(b"MSH|a\rPID|b"), b"MSH|a\nPID|b\n")
        self.assertEqual(split_messages(output_record(hl7("M1")) * 2), [hl7("M1")] * 2)

    def test_options_validated(self) -> None:
        """Unknown NAK codes and negative values are refused."""
        self.assertRaises(ValueError, ReceiverOptions, nak="AA")
        self.assertRaises(ValueError, ReceiverOptions, delay=-1)
        self.assertRaises(ValueError, ReceiverOptions, drop_every=-1)
        self.assertRaises(ValueError, ReceiverOptions, nak_every=0)


class _Link:
    """run_send against a ReceiverFactory, connected in memory on one MemoryReactorClock."""

    def __init__(
        self,
        messages: Sequence[bytes],
        options: ReceiverOptions | None = None,
        framing: Framing = "mllp",
        timeout: float = 30.0,
        connect: bool = True,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.records: list[ReceivedMessage] = []
        self.factory = ReceiverFactory(
            self.reactor,
            options or ReceiverOptions(),
            on_message=self.records.append,
            control_ids=ControlIdSource("TEST"),
        )
        self.reactor.listenTCP(PORT, self.factory)
        endpoint = client_endpoint(self.reactor, "127.0.0.1", PORT, 10.0)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.status = Deferred.fromCoroutine(
            run_send(self.reactor, endpoint, messages, framing, timeout, 10.0, self.out, self.err)
        )
        self.pump: IOPump | None = None
        if connect:
            self.pump = ConnectionCompleter(self.reactor).succeedOnce()
            assert self.pump is not None
            self.pump.flush()

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """Move simulated time forward in steps, moving bytes after each step."""
        while seconds > 0:
            self.reactor.advance(min(step, seconds))
            seconds -= step
            if self.pump is not None:
                self.pump.flush()

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()


def _ack(code: str, control_id: str) -> bytes:
    msh = f"MSH|^~\\&|B|B|A|A|20240101||ACK^A04^ACK|X{control_id}|P|2.5"
    return mllp(f"{msh}\rMSA|{code}|{control_id}\r".encode())


class _ScriptedReceiver(Protocol):
    """Answers each message with the replies scripted for its MSH-10, after their delays."""

    def __init__(self, reactor: MemoryReactorClock, script: dict[str, list[tuple[float, bytes]]]):
        self.reactor = reactor
        self.script = script
        self.framer = MLLPFramer()

    def dataReceived(self, data: bytes) -> None:
        for event in self.framer.feed(data):
            assert isinstance(event, Frame)
            control_id = event.payload.split(b"\r")[0].split(b"|")[9].decode()
            for delay, reply in self.script.pop(control_id, []):
                assert self.transport is not None
                self.reactor.callLater(delay, self.transport.write, reply)


class _ScriptedLink(_Link):
    """run_send against a receiver that answers as scripted (application ACKs)."""

    def __init__(
        self, messages: Sequence[bytes], script: dict[str, list[tuple[float, bytes]]]
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.records = []
        factory = Factory.forProtocol(lambda: _ScriptedReceiver(self.reactor, script))
        self.reactor.listenTCP(PORT, factory)
        endpoint = client_endpoint(self.reactor, "127.0.0.1", PORT, 10.0)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.status = Deferred.fromCoroutine(
            run_send(self.reactor, endpoint, messages, "mllp", 30.0, 10.0, self.out, self.err)
        )
        self.pump = ConnectionCompleter(self.reactor).succeedOnce()
        assert self.pump is not None
        self.pump.flush()


class ApplicationAckSenderTests(SynchronousTestCase):
    """``send`` in enhanced mode: an application ACK after the accept ACK is expected."""

    def test_application_ack_waited_for_with_al(self) -> None:
        """MSH-16 = AL: the sender waits for the AA after the CA, then sends the next."""
        messages = [hl7(f"MSG{n}", accept_ack="AL", application_ack="AL") for n in (1, 2)]
        link = _ScriptedLink(
            messages,
            {
                "MSG1": [(0, _ack("CA", "MSG1")), (5, _ack("AA", "MSG1"))],
                "MSG2": [(0, _ack("CA", "MSG2") + _ack("AA", "MSG2"))],
            },
        )
        link.advance(4)
        self.assertNoResult(link.status)
        link.advance(2)
        self.assertEqual(self.successResultOf(link.status), 0)
        self.assertEqual(link.lines(), ["1 MSG1 CA MSG1 app=AA", "2 MSG2 CA MSG2 app=AA"])
        self.assertEqual(link.err.getvalue(), "")

    def test_application_error_fails_the_run(self) -> None:
        """An AE application ACK after the CA is a failure (exit status 1)."""
        messages = [hl7("MSG1", accept_ack="AL", application_ack="AL")]
        script: dict[str, list[tuple[float, bytes]]] = {
            "MSG1": [(0, _ack("CA", "MSG1")), (1, _ack("AE", "MSG1"))]
        }
        link = _ScriptedLink(messages, script)
        link.advance(2)
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(link.lines(), ["1 MSG1 CA MSG1 app=AE"])

    def test_missing_application_ack_times_out(self) -> None:
        """AL and no application ACK within the timeout: the run ends, status 1."""
        messages = [hl7(f"MSG{n}", accept_ack="AL", application_ack="AL") for n in (1, 2)]
        link = _ScriptedLink(messages, {"MSG1": [(0, _ack("CA", "MSG1"))]})
        link.advance(31)
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(
            link.lines(),
            ['1 MSG1 CA MSG1 app=- problem="no application ACK: no reply within 30s"'],
        )

    def test_late_application_ack_with_er_is_reported(self) -> None:
        """MSH-16 = ER: the next message is sent after the CA; an AE that comes
        later is reported with its message instead of ending the connection."""
        messages = [hl7(f"MSG{n}", accept_ack="AL", application_ack="ER") for n in (1, 2)]
        link = _ScriptedLink(
            messages,
            {
                "MSG1": [(0, _ack("CA", "MSG1"))],
                "MSG2": [(0, _ack("AE", "MSG1")), (1, _ack("CA", "MSG2"))],
            },
        )
        link.advance(2)
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(
            link.lines(), ["1 MSG1 CA MSG1", "1 MSG1 CA MSG1 app=AE", "2 MSG2 CA MSG2"]
        )

    def test_extra_reply_in_original_mode_still_ends_the_connection(self) -> None:
        """Original mode: a second reply nobody asked for is a stream out of step."""
        link = _ScriptedLink(
            [hl7("MSG1"), hl7("MSG2")],
            {"MSG1": [(0, _ack("AA", "MSG1") + _ack("AA", "MSG1"))]},
        )
        link.advance(1)
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(link.lines()[0], "1 MSG1 AA MSG1")
        self.assertIn("unexpected extra reply", link.lines()[1])


class SenderTests(SynchronousTestCase):
    def test_all_accepted(self) -> None:
        """Every message gets AA with its MSH-10: one line each, exit status 0, no timers left."""
        link = _Link([hl7("MSG1"), hl7("MSG2")])
        self.assertEqual(self.successResultOf(link.status), 0)
        self.assertEqual(link.lines(), ["1 MSG1 AA MSG1", "2 MSG2 AA MSG2"])
        self.assertEqual([r.payload for r in link.records], [hl7("MSG1"), hl7("MSG2")])
        self.assertEqual(link.err.getvalue(), "")
        self.assertEqual(link.reactor.getDelayedCalls(), [])

    def test_enhanced_mode_accepted(self) -> None:
        """CA counts as success."""
        link = _Link([hl7("MSG1", accept_ack="AL", application_ack="NE")])
        self.assertEqual(self.successResultOf(link.status), 0)
        self.assertEqual(link.lines(), ["1 MSG1 CA MSG1"])

    def test_nak(self) -> None:
        """A NAK prints its ERR-3 and MSA-3, the run goes on, and the exit status is 1."""
        link = _Link(
            [hl7("MSG1"), hl7("MSG2"), hl7("MSG3")], ReceiverOptions(nak_every=2, nak="AE")
        )
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(
            link.lines(),
            [
                "1 MSG1 AA MSG1",
                '2 MSG2 AE MSG2 err=207 text="test receiver: --nak AE"',
                "3 MSG3 AA MSG3",
            ],
        )

    def test_msa2_mismatch(self) -> None:
        """An AA whose MSA-2 is not the MSH-10 sent is a failure: exit status 1."""
        link = _Link([hl7("MSG1"), hl7("MSG2")], ReceiverOptions(wrong_msa2_every=1))
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(
            link.lines(),
            [
                '1 MSG1 AA WRONGMSG1 problem="MSA-2 does not match MSH-10"',
                '2 MSG2 AA WRONGMSG2 problem="MSA-2 does not match MSH-10"',
            ],
        )

    def test_timeout_ends_run(self) -> None:
        """No ACK within the timeout: that message is the last, the rest are not sent, status 1."""
        link = _Link([hl7("MSG1"), hl7("MSG2")], ReceiverOptions(no_ack=True), timeout=30)
        link.advance(29.75)
        self.assertNoResult(link.status)
        link.advance(0.25)
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(link.lines(), ['1 MSG1 - - problem="no reply within 30s"'])
        self.assertEqual([r.control_id for r in link.records], ["MSG1"])
        self.assertIn("1 of 2 not sent", link.err.getvalue())
        self.assertEqual(link.reactor.getDelayedCalls(), [])

    def test_delay_within_timeout(self) -> None:
        """A late ACK that comes before the timeout is accepted."""
        link = _Link([hl7("MSG1"), hl7("MSG2")], ReceiverOptions(delay=20), timeout=30)
        link.advance(20)
        self.assertNoResult(link.status)
        link.advance(20)
        self.assertEqual(self.successResultOf(link.status), 0)
        self.assertEqual(link.lines(), ["1 MSG1 AA MSG1", "2 MSG2 AA MSG2"])

    def test_plain_tcp(self) -> None:
        """--tcp sends unframed; replies end at the idle gap; the receiver sees plain TCP."""
        link = _Link([hl7("MSG1"), hl7("MSG2")], framing="tcp")
        link.advance(1)
        self.assertEqual(self.successResultOf(link.status), 0)
        self.assertEqual(link.lines(), ["1 MSG1 AA MSG1", "2 MSG2 AA MSG2"])
        self.assertEqual([r.framing for r in link.records], ["tcp", "tcp"])
        self.assertEqual([r.payload for r in link.records], [hl7("MSG1"), hl7("MSG2")])

    def test_garbage_reply(self) -> None:
        """A non-HL7 reply is a failure for that message; the next one is still sent."""
        for framing in ("mllp", "tcp"):
            link = _Link(
                [hl7("MSG1"), hl7("MSG2")], ReceiverOptions(garbage_every=1), framing=framing
            )
            link.advance(1)
            self.assertEqual(self.successResultOf(link.status), 1)
            self.assertEqual(
                link.lines(),
                [
                    '1 MSG1 - - problem="reply does not start with MSH"',
                    '2 MSG2 - - problem="reply does not start with MSH"',
                ],
                framing,
            )

    def test_dropped_connection_ends_run(self) -> None:
        """The receiver closing instead of answering ends the run with exit status 1."""
        link = _Link([hl7("MSG1"), hl7("MSG2"), hl7("MSG3")], ReceiverOptions(drop_every=2))
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(
            link.lines(),
            ["1 MSG1 AA MSG1", '2 MSG2 - - problem="connection closed before the reply"'],
        )
        self.assertIn("1 of 3 not sent", link.err.getvalue())

    def test_connection_refused(self) -> None:
        """A refused connection sends nothing, prints why and exits 1."""
        link = _Link([hl7("MSG1")], connect=False)
        ConnectionCompleter(link.reactor).failOnce()
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertEqual(link.lines(), [])
        self.assertIn("could not connect", link.err.getvalue())

    def test_connect_timeout(self) -> None:
        """A connection that never completes is given up after the connect timeout."""
        link = _Link([hl7("MSG1")], connect=False)
        link.advance(9.75)
        self.assertNoResult(link.status)
        link.advance(0.25)
        self.assertEqual(self.successResultOf(link.status), 1)
        self.assertIn("could not connect within 10s", link.err.getvalue())

    def test_plain_tcp_reply_ends_at_close(self) -> None:
        """Plain TCP: a reply followed by the connection closing is taken at the close."""
        clock = Clock()
        protocol = _SenderFactory("tcp", clock, 0.2).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        reply = protocol.exchange(hl7("MSG1"), 30)
        self.assertEqual(transport.value(), hl7("MSG1"))
        ack = b"MSH|^~\\&|B|B|A|A|20240101||ACK^A04^ACK|X1|P|2.5\rMSA|AA|MSG1\r"
        protocol.dataReceived(ack)
        self.assertNoResult(reply)
        protocol.connectionLost()
        self.assertEqual(self.successResultOf(reply), ack)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_result_line_and_exit_status(self) -> None:
        """Result lines quote MSA-3 and problems; only a full run of AA/CA exits 0."""
        ok = SendResult(1, "A", "AA", "A", None, "", "")
        nak = SendResult(2, "B", "AR", "B", 200, 'bad "type"', "")
        self.assertEqual(nak.line(), '2 B AR B err=200 text="bad \\"type\\""')
        self.assertEqual(exit_status([ok], 1), 0)
        self.assertEqual(exit_status([ok, nak], 2), 1)
        self.assertEqual(exit_status([ok], 2), 1)
        self.assertFalse(SendResult(1, "", "AA", "", None, "", "reply MSA-2 empty").ok)


class ToolClockTests(SynchronousTestCase):
    """docs/guarantees.md "the wall clock jumps": the tools time out on the monotonic clock."""

    def test_timers_on_the_monotonic_clock(self) -> None:
        """The tools' reactor schedules on time.monotonic before their main runs."""
        reactor = MemoryReactorClock()
        seen: list[object] = []

        def main(running: MemoryReactorClock) -> Deferred[int]:
            seen.append(running.seconds)
            return succeed(3)

        self.assertEqual(_run_reactor(main, interrupted=1, _reactor=reactor), 3)
        self.assertEqual(seen, [time.monotonic])

    def test_receiver_stamps_with_the_wall_clock(self) -> None:
        """received_at and the ACK's MSH-7 come from the wall clock, not the timer clock."""
        timers, wall = Clock(), Clock()
        wall.advance(1_700_000_000)  # 2023-11-14T22:13:20Z
        records: list[ReceivedMessage] = []
        factory = ReceiverFactory(
            timers,
            ReceiverOptions(),
            on_message=records.append,
            control_ids=ControlIdSource("TEST"),
            wall=wall.seconds,
        )
        protocol, transport = factory.buildProtocol(None), StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(mllp(hl7("WALL1")))
        [record] = records
        self.assertEqual(record.received_at, 1_700_000_000)
        self.assertIn(b"|20231114221320|", transport.value())  # MSH-7


class ReceiveCommandTests(SynchronousTestCase):
    def test_run_receive_until_count(self) -> None:
        """run_receive listens, answers --count messages, closes its connections and returns 0."""
        reactor = MemoryReactorClock()
        records: list[ReceivedMessage] = []
        factory = ReceiverFactory(reactor, ReceiverOptions(count=2), on_message=records.append)
        err = io.StringIO()
        status = Deferred.fromCoroutine(
            run_receive(reactor, factory, f"tcp:port={PORT}:interface=127.0.0.1", err)
        )
        self.assertEqual(reactor.tcpServers[0][0], PORT)
        self.assertIn(f"listening on 0.0.0.0:{PORT}", err.getvalue())
        endpoint = client_endpoint(reactor, "127.0.0.1", PORT, 10.0)
        out = io.StringIO()
        sent = Deferred.fromCoroutine(
            run_send(reactor, endpoint, [hl7("M1"), hl7("M2")], "mllp", 30, 10, out, io.StringIO())
        )
        pump = ConnectionCompleter(reactor).succeedOnce()
        assert pump is not None
        pump.flush()
        self.assertEqual(self.successResultOf(status), 0)
        self.assertEqual(self.successResultOf(sent), 0)
        self.assertEqual([r.control_id for r in records], ["M1", "M2"])
        self.assertEqual(reactor.getDelayedCalls(), [])


class NewControlIdTests(SynchronousTestCase):
    """``send --new-control-id`` rewrites MSH-10 and nothing else."""

    def test_rewrites_msh_10_only(self) -> None:
        """MSH-10 gets the new value; every other byte of the message is kept."""
        original = hl7("M1")
        rewritten = with_control_id(original, "NEW42")
        self.assertEqual(rewritten, hl7("NEW42"))

    def test_own_separator_and_short_msh(self) -> None:
        """The message's own field separator is used; a short MSH gets MSH-10 added."""
        self.assertEqual(
            with_control_id(b"MSH#^~\\&#A#B\rPID#1\r", "X1"),
            b"MSH#^~\\&#A#B######X1\rPID#1\r",
        )

    def test_not_a_message(self) -> None:
        """Something that does not start with MSH is a ValueError."""
        self.assertRaises(ValueError, with_control_id, b"PID|1\r", "X1")


class CommandLineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.missing_config = self.mktemp()

    def run_cli(self, *argv: str) -> int:
        return main(["--config", self.missing_config, *argv], out=io.StringIO())

    def test_send_needs_no_config(self) -> None:
        """`send` runs without a configuration file; a missing message file exits 2."""
        missing = self.mktemp()
        self.assertEqual(self.run_cli("send", missing, "--to", "127.0.0.1:1"), 2)
        self.assertIn(f"cannot read {missing}", self.stderr.getvalue())
        self.assertNotIn("configuration", self.stderr.getvalue())

    def test_send_usage_errors(self) -> None:
        """A bad --to, TLS files without --tls, or --key without --cert exit 2."""
        path = self.mktemp()
        FilePath(path).setContent(hl7("M1"))
        self.assertEqual(self.run_cli("send", path, "--to", "nowhere"), 2)
        self.assertEqual(self.run_cli("send", path, "--to", "h:1", "--ca", path), 2)
        self.assertEqual(self.run_cli("send", path, "--to", "h:1", "--tls", "--key", path), 2)
        self.assertEqual(self.run_cli("send", path, "--to", "h:1", "--tls", "--ca", path), 2)
        self.assertIn("no PEM certificate", self.stderr.getvalue())

    def test_receive_needs_no_config(self) -> None:
        """`receive` runs without a configuration file; an unwritable --output exits 2."""
        output = FilePath(self.mktemp()).child("no-such-dir").child("out.hl7").path
        self.assertEqual(self.run_cli("receive", "--port", "0", "--output", output), 2)
        self.assertIn("cannot open", self.stderr.getvalue())

    def test_parse_address(self) -> None:
        """--to takes HOST:PORT and [IPv6]:PORT."""
        self.assertEqual(parse_address("gw.example:2575"), ("gw.example", 2575))
        self.assertEqual(parse_address("[::1]:2575"), ("::1", 2575))
        for bad in ("gw.example", ":2575", "gw:0", "gw:x", "gw:70000"):
            self.assertRaises(ValueError, parse_address, bad)

    def test_tls_options(self) -> None:
        """--tls reads a CA file and a client certificate whose key may share its file."""
        options = client_tls_options("localhost", SERVER_PEM, SERVER_PEM, None)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(options))
        options = client_tls_options("localhost", SERVER_PEM, SERVER_PEM, SERVER_PEM)
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(options))
        with self.assertRaises(ValueError):
            client_tls_options("localhost", self.mktemp(), None, None)
