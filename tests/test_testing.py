"""The shared test kit (``udsgateway.testing``): its doubles and its HL7 helpers."""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.testing import (
    AckFields,
    DestinationPeer,
    destination_ack,
    hl7_message,
    outbound_message,
    read_ack,
)


class ReprTests(SynchronousTestCase):
    """Doubles that end up in log lines have a short repr that does not grow."""

    def test_endpoint_repr_stays_short_however_much_the_peer_received(self) -> None:
        """``ClientService`` logs its endpoint's repr on every retry: after a
        thousand messages the repr of a peer's endpoint is as short as before."""
        clock = Clock()
        peer = DestinationPeer(clock)
        endpoint = peer.endpoint()
        before = repr(endpoint)
        connecting = endpoint.connect(Factory.forProtocol(Protocol))
        clock.advance(0)
        self.successResultOf(connecting)
        for number in range(1000):
            peer.current.from_gateway(b"\x0b" + outbound_message(f"M{number}") + b"\x1c\r")
        self.assertEqual(len(peer.received), 1000)
        self.assertLess(len(repr(endpoint)), 100)
        self.assertEqual(len(repr(endpoint)), len(before))
        self.assertLess(len(repr(peer)), 200)
        self.assertLess(len(repr(peer.current)), 200)


class MessageBuilderTests(SynchronousTestCase):
    """``hl7_message``: one builder for the tests' synthetic messages."""

    def test_default_message(self) -> None:
        """By default an ADT^A04 from HIS|Hospital to LSQ|LeadSquared, version 2.5, with an
        EVN and a PID, every segment ended by CR."""
        self.assertEqual(
            hl7_message("C1"),
            b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|20240101123000||ADT^A04|C1|P|2.5\r"
            b"EVN|A04|20240101123000\rPID|1||12345^^^Hospital||Doe^John||19800101|M\r",
        )

    def test_acknowledgment_types_and_charset(self) -> None:
        """MSH-15, MSH-16 and MSH-18 land in their places; the segments and the
        separator are the caller's."""
        message = hl7_message(
            "C2",
            "SIU^S12",
            accept_ack="AL",
            application_ack="NE",
            charset="8859/1",
            segments=["SCH|1", b"NTE|1||M\xfcller"],
            separator=b"\n",
        )
        msh, sch, nte, end = message.split(b"\n")
        fields = msh.split(b"|")
        self.assertEqual((fields[8], fields[9]), (b"SIU^S12", b"C2"))
        self.assertEqual((fields[14], fields[15], fields[17]), (b"AL", b"NE", b"8859/1"))
        self.assertEqual((sch, nte, end), (b"SCH|1", b"NTE|1||M\xfcller", b""))


class AckReaderTests(SynchronousTestCase):
    """``read_ack``: one reader for the ACKs the tests receive."""

    def test_fields(self) -> None:
        """MSA-1, MSA-2, ERR-3.1 and ERR-7, whatever ends the segments."""
        ack = b"MSH|^~\\&|A|B|C|D|2024||ACK|X|P|2.5\nMSA|AE|C1\nERR||PID^1|207^x^HL70357|E|||bad\n"
        self.assertEqual(read_ack(ack), AckFields("AE", "C1", 207, "bad"))
        self.assertEqual(read_ack(destination_ack("C2")), AckFields("AA", "C2", None, ""))

    def test_not_an_ack_fails_the_test(self) -> None:
        """A reply without MSA, or with an empty MSA-2, is an AssertionError."""
        for reply in (b"MSH|^~\\&|A|B\rPID|1\r", b"MSH|^~\\&|A|B\rMSA|AA|\r", b"garbage"):
            self.assertRaises(AssertionError, read_ack, reply)
