"""Tests for udsgateway.inbound.listener: framing detection, timers, limits, caps, order.

The real protocol and factory of one tenant (``udsgateway.testing.Gateway``)
on ``StringTransport`` and ``task.Clock``: no sockets, no sleeps. The rows of
docs/guarantees.md "Bad input on a listener" about framing, timers and
connections are here; those about a frame's content are in ``test_ingest``.
"""

from __future__ import annotations

import ipaddress
import tracemalloc

from sqlalchemy.exc import OperationalError
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from tests.test_ingest import (
    GatewayTestCase,
    hl7,
    mllp_replies,
    one_reply,
    padded,
    plain_replies,
)
from udsgateway.config import Limits, PlainTCP, TenantConfig
from udsgateway.testing import Connection, Gateway, ManualRunner, mllp

TLS_CLIENT_HELLO = (
    b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(32)) + b"\x00\x00\x02\x13\x01"
)
# Keys twisted.python.log's bridge adds to every event it sees.
LEGACY_LOG_KEYS = {"format", "isError", "system", "time", "message"}
# Timers are compared in floating point at about 1.7e9 seconds (a plausible
# wall clock), where a sum of advances can fall a few ulps short of a deadline.
TICK = 1e-3
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: gateway\r\nUser-Agent: probe\r\n\r\n"


def tenant(**kwargs: object) -> TenantConfig:
    """The test tenant with some settings changed."""
    return TenantConfig(name="test", listen="tcp:port=0", **kwargs)  # type: ignore[arg-type]


def hang_up(connection: Connection) -> None:
    """What the reactor does once a transport is closed: tell the protocol."""
    connection.protocol.connectionLost(Failure(ConnectionDone()))


def refused(gateway: Gateway, host: str, port: int = 40000) -> bool:
    """Whether the listener refuses a new connection from ``host``."""
    return gateway.factory.buildProtocol(IPv4Address("TCP", host, port)) is None


class MLLPFramingTests(GatewayTestCase):
    """MLLP framing on the listener: junk, resyncs, FS rules, several frames per write."""

    def test_junk_before_start_byte_dropped(self) -> None:
        """Junk bytes, NULs and blank lines before a start byte are dropped; the frame gets AA."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(b"\r\n\r\n\x00\x00junk bytes\x07\xff\r\n")
        connection.send(b"\x00\n" + mllp(hl7("JUNK1")))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id), ("AA", "JUNK1"))
        [stored] = gateway.messages()
        self.assertEqual((stored.raw, stored.connection), (hl7("JUNK1"), "mllp"))
        self.assertFalse(connection.closed)

    def test_junk_between_frames_dropped(self) -> None:
        """Bytes between two frames are dropped; both frames get AA."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(mllp(hl7("GAP1")) + b"\r\n\x00 noise " + mllp(hl7("GAP2")))
        replies = mllp_replies(connection.received())
        self.assertEqual([r.control_id for r in replies], ["GAP1", "GAP2"])
        self.assertEqual([r.code for r in replies], ["AA", "AA"])

    def test_unframed_hl7_on_mllp_connection_dropped_then_idle_close(self) -> None:
        """Unframed HL7 after MLLP is dropped while no frame is open; idle timeout closes."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(mllp(hl7("FRAMED")))
        self.assertEqual(one_reply(connection).code, "AA")
        gateway.clock.advance(100)
        connection.send(hl7("UNFRAMED"))
        gateway.clock.advance(gateway.tenant.limits.frame_timeout + 1)
        self.assertEqual(connection.received(), b"")
        self.assertFalse(connection.closed)
        gateway.clock.advance(gateway.tenant.limits.idle_timeout)
        self.assertTrue(connection.closed)
        self.assertEqual([m.control_id for m in gateway.messages()], ["FRAMED"])

    def test_fs_without_cr_is_data_in_strict_mode(self) -> None:
        """Strict: an FS not followed by CR is data; the frame ends at FS CR, one AA."""
        gateway = Gateway()
        connection = gateway.connect()
        message = hl7("FS1")
        connection.send(b"\x0b" + message + b"\x1c")
        self.assertEqual(connection.received(), b"")
        rest = b"NTE|1||after FS\r"
        connection.send(rest + b"\x1c\r")
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id), ("AA", "FS1"))
        [stored] = gateway.messages()
        self.assertEqual(stored.raw, message + b"\x1c" + rest)

    def test_fs_inside_one_chunk_is_data(self) -> None:
        """Strict: an FS followed by another byte in the same chunk is data too."""
        gateway = Gateway()
        connection = gateway.connect()
        payload = hl7("FS2") + b"NTE|1||a\x1cb\r"
        connection.send(mllp(payload))
        self.assertEqual(one_reply(connection).control_id, "FS2")
        self.assertEqual(gateway.messages()[0].raw, payload)

    def test_lenient_fs_accepts_fs_alone(self) -> None:
        """With the lenient switch a bare FS ends the frame; a CR after it is not data."""
        gateway = Gateway(tenant=tenant(lenient_fs=True))
        connection = gateway.connect()
        connection.send(b"\x0b" + hl7("LEN1") + b"\x1c")
        self.assertEqual(one_reply(connection).control_id, "LEN1")
        connection.send(b"\r\x0b" + hl7("LEN2") + b"\x1c\r")
        self.assertEqual(one_reply(connection).control_id, "LEN2")
        self.assertEqual([m.raw for m in gateway.messages()], [hl7("LEN1"), hl7("LEN2")])

    def test_new_start_byte_mid_frame_resyncs(self) -> None:
        """A start byte inside an open frame drops the partial; the good frame gets AA."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(b"\x0b" + hl7("PARTIAL")[:40])
        connection.send(mllp(hl7("GOOD")))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id), ("AA", "GOOD"))
        self.assertEqual([m.control_id for m in gateway.messages()], ["GOOD"])

    def test_empty_frame_closes_not_stored(self) -> None:
        """An empty frame has no header to answer: closed without an answer, nothing stored."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(mllp(b""))
        self.assertEqual(connection.received(), b"")
        self.assertTrue(connection.closed)
        self.assertEqual(gateway.messages(), [])

    def test_frame_not_starting_with_msh_closes_not_stored(self) -> None:
        """A frame that does not start with MSH (no header to read): closed, not stored."""
        for payload in (b"PID|1||12345\r", b"\rMSH", b"MSH", b"HELLO WORLD"):
            gateway = Gateway()
            connection = gateway.connect()
            connection.send(mllp(payload))
            self.assertEqual(connection.received(), b"", payload)
            self.assertTrue(connection.closed, payload)
            self.assertEqual(gateway.messages(), [])

    def test_frame_with_readable_header_is_naked_not_closed(self) -> None:
        """A bad frame whose header can be read gets a NAK and the connection stays open."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(mllp(hl7("BAD1", message_type="")))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "BAD1", 101))
        self.assertFalse(connection.closed)
        self.assertEqual(gateway.messages(), [])

    def test_three_frames_in_one_write_answered_in_order(self) -> None:
        """Two or three frames in one TCP write: all processed, ACKs in order."""
        gateway = Gateway()
        connection = gateway.connect()
        two = [hl7("W1"), hl7("W2", message_type="SIU^S12")]
        three = [hl7("W3", message_type="ADT^A08"), hl7("W4"), hl7("W5", message_type="SIU^S15")]
        connection.send(b"".join(mllp(m) for m in two))
        connection.send(b"".join(mllp(m) for m in three))
        replies = mllp_replies(connection.received())
        self.assertEqual([r.control_id for r in replies], ["W1", "W2", "W3", "W4", "W5"])
        self.assertEqual({r.code for r in replies}, {"AA"})
        self.assertEqual([m.raw for m in gateway.messages()], two + three)

    def test_one_byte_per_packet_reassembled(self) -> None:
        """A message split into one byte per packet is reassembled: exactly one ACK."""
        gateway = Gateway()
        connection = gateway.connect()
        for byte in mllp(hl7("BYTES")):
            connection.send(bytes([byte]))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id), ("AA", "BYTES"))
        self.assertEqual([m.raw for m in gateway.messages()], [hl7("BYTES")])

    def test_mllp2_commit_blocks_ignored(self) -> None:
        """MLLP release 2 commit ACK/NAK blocks are ignored: no answer, not closed."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(b"\x0b\x06\x1c\r\x0b\x15\x1c\r")
        self.assertEqual(connection.received(), b"")
        self.assertFalse(connection.closed)
        connection.send(mllp(hl7("AFTER")))
        self.assertEqual(one_reply(connection).control_id, "AFTER")
        self.assertEqual(len(gateway.messages()), 1)


class PlainTCPTests(GatewayTestCase):
    """Plain TCP senders on the same listener: where a message ends; unframed ACKs."""

    def test_mllp_and_plain_tcp_on_one_listener(self) -> None:
        """One listener serves MLLP and plain TCP senders; each gets its framing back."""
        gateway = Gateway()
        framed, plain = gateway.connect(port=40001), gateway.connect(port=40002)
        framed.send(mllp(hl7("VIA-MLLP")))
        plain.send(hl7("VIA-TCP"))
        gateway.clock.advance(gateway.tenant.tcp.idle_gap)
        self.assertEqual(one_reply(framed).control_id, "VIA-MLLP")
        [reply] = plain_replies(plain.received())
        self.assertEqual((reply.code, reply.control_id), ("AA", "VIA-TCP"))
        self.assertEqual(
            [(m.control_id, m.connection, m.flows) for m in gateway.messages()],
            [
                ("VIA-MLLP", "mllp", ("FLWADTA04MLLP",)),
                ("VIA-TCP", "tcp", ("FLWADTA04TCP",)),
            ],
        )
        self.assertEqual(gateway.messages()[1].raw, hl7("VIA-TCP"))

    def test_message_ends_at_next_msh(self) -> None:
        """A plain TCP message ends at the next MSH at a segment start."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(hl7("T1") + hl7("T2"))
        [reply] = plain_replies(connection.received())
        self.assertEqual(reply.control_id, "T1")
        gateway.clock.advance(gateway.tenant.tcp.idle_gap)
        [reply] = plain_replies(connection.received())
        self.assertEqual(reply.control_id, "T2")
        self.assertEqual([m.raw for m in gateway.messages()], [hl7("T1"), hl7("T2")])

    def test_message_ends_at_idle_gap(self) -> None:
        """A plain TCP message ends after the idle gap; data before the gap restarts it."""
        gateway = Gateway()
        gap = gateway.tenant.tcp.idle_gap
        connection = gateway.connect()
        message = hl7("GAP")
        connection.send(message[:30])
        gateway.clock.advance(gap * 0.6)
        connection.send(message[30:])
        gateway.clock.advance(gap * 0.6)
        self.assertEqual(connection.received(), b"")
        self.assertEqual(gateway.messages(), [])
        gateway.clock.advance(gap * 0.4 + TICK)
        [reply] = plain_replies(connection.received())
        self.assertEqual((reply.code, reply.control_id), ("AA", "GAP"))
        self.assertEqual([m.raw for m in gateway.messages()], [message])
        self.assertFalse(connection.closed)

    def test_message_ends_at_end_bytes(self) -> None:
        """With end bytes configured, they end the message at once; the ACK carries them."""
        gateway = Gateway(tenant=tenant(tcp=PlainTCP(end_bytes=b"\x1c\r")))
        connection = gateway.connect()
        connection.send(hl7("END1") + b"\x1c\r" + hl7("END2") + b"\x1c\r")
        data = connection.received()
        self.assertTrue(data.endswith(b"\x1c\r"))
        replies = [
            mllp_replies(b"\x0b" + part + b"\x1c\r")[0] for part in data.split(b"\x1c\r")[:-1]
        ]
        self.assertEqual([r.control_id for r in replies], ["END1", "END2"])
        self.assertEqual([m.raw for m in gateway.messages()], [hl7("END1"), hl7("END2")])

    def test_start_and_end_bytes(self) -> None:
        """Start and end bytes (STX/ETX): not part of the message, added to the ACK."""
        gateway = Gateway(tenant=tenant(tcp=PlainTCP(start_bytes=b"\x02", end_bytes=b"\x03")))
        connection = gateway.connect()
        connection.send(b"\x02" + hl7("STX1") + b"\x03")
        data = connection.received()
        self.assertTrue(data.startswith(b"\x02MSH") and data.endswith(b"\x03"), data)
        [reply] = plain_replies(data[1:-1])
        self.assertEqual((reply.code, reply.control_id), ("AA", "STX1"))
        self.assertEqual(gateway.messages()[0].raw, hl7("STX1"))

    def test_message_ends_at_half_close(self) -> None:
        """A plain TCP message ends when the sender half-closes; the ACK is sent, then close."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(hl7("HALF"))
        self.assertEqual(connection.received(), b"")
        connection.protocol.readConnectionLost()
        [reply] = plain_replies(connection.received())
        self.assertEqual((reply.code, reply.control_id), ("AA", "HALF"))
        self.assertTrue(connection.closed)
        self.assertEqual([m.control_id for m in gateway.messages()], ["HALF"])

    def test_half_close_waits_for_the_commit_then_acks(self) -> None:
        """After a half-close the ACK is still written once the held commit returns."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(hl7("HALF1") + hl7("HALF2"))
        connection.protocol.readConnectionLost()
        self.assertEqual(connection.received(), b"")
        self.assertFalse(connection.closed)
        runner.run_next()
        runner.run_next()
        replies = plain_replies(connection.received())
        self.assertEqual(
            [(r.code, r.control_id) for r in replies], [("AA", "HALF1"), ("AA", "HALF2")]
        )
        self.assertTrue(connection.closed)

    def test_mllp_half_close_answers_pending_frames(self) -> None:
        """An MLLP sender that half-closes still gets the ACKs of its complete frames."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(mllp(hl7("MH1")) + b"\x0b" + hl7("MH2")[:20])
        connection.protocol.readConnectionLost()
        runner.run_next()
        self.assertEqual(one_reply(connection).control_id, "MH1")
        self.assertTrue(connection.closed)
        self.assertEqual([m.control_id for m in gateway.messages()], ["MH1"])

    def test_one_byte_per_packet_plain(self) -> None:
        """Plain TCP one byte per packet: reassembled, one ACK at the idle gap."""
        gateway = Gateway()
        connection = gateway.connect()
        for byte in hl7("PB") + hl7("PB2"):
            connection.send(bytes([byte]))
        gateway.clock.advance(gateway.tenant.tcp.idle_gap)
        replies = plain_replies(connection.received())
        self.assertEqual([r.control_id for r in replies], ["PB", "PB2"])
        self.assertEqual([m.raw for m in gateway.messages()], [hl7("PB"), hl7("PB2")])

    def test_blank_lines_before_plain_message(self) -> None:
        """Blank lines before MSH on a plain TCP connection are dropped."""
        gateway = Gateway()
        connection = gateway.connect()
        connection.send(b"\r\n\r\n")
        connection.send(hl7("BL", separator=b"\n"))
        gateway.clock.advance(gateway.tenant.tcp.idle_gap)
        [reply] = plain_replies(connection.received())
        self.assertEqual(reply.control_id, "BL")
        self.assertEqual(gateway.messages()[0].raw, hl7("BL", separator=b"\n"))


class OrderAndBackpressureTests(GatewayTestCase):
    """G5 order while commits are held, and backpressure on a fast sender."""

    def test_acks_in_order_while_commits_held(self) -> None:
        """Several frames in one write with commits held: one ACK per commit, in order."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        ids = ["O1", "O2", "O3", "O4"]
        connection.send(b"".join(mllp(hl7(i)) for i in ids))
        for expected in ids:
            self.assertEqual(connection.received(), b"")
            self.assertEqual(len(runner.calls), 1)
            runner.run_next()
            self.assertEqual(one_reply(connection).control_id, expected)
        self.assertEqual([m.control_id for m in gateway.messages()], ids)

    def test_failure_in_the_middle_keeps_order(self) -> None:
        """A failed commit between good ones: AA, NAK 207, AA, in the frames' order."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(b"".join(mllp(hl7(i)) for i in ("F1", "F2", "F3")))
        runner.run_next()
        runner.fail_next(OperationalError("INSERT", {}, Exception("disk I/O error")))
        runner.run_next()
        replies = mllp_replies(connection.received())
        self.assertEqual(
            [(r.control_id, r.code, r.error_code) for r in replies],
            [("F1", "AA", None), ("F2", "AR", 207), ("F3", "AA", None)],
        )

    def test_oversized_frame_answered_in_order(self) -> None:
        """An oversized frame's NAK waits for the frames before it."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner, tenant=tenant(limits=Limits(max_frame_size=1024)))
        connection = gateway.connect()
        connection.send(mllp(hl7("BEFORE")) + mllp(padded(hl7("BIG"), 1500)))
        self.assertEqual(connection.received(), b"")
        runner.run_next()
        replies = mllp_replies(connection.received())
        self.assertEqual(
            [(r.control_id, r.code) for r in replies], [("BEFORE", "AA"), ("BIG", "AE")]
        )

    def test_backpressure_pauses_and_resumes(self) -> None:
        """More than max_pending_frames queued: the transport is paused, resumed once drained."""
        runner = ManualRunner()
        limits = Limits(max_pending_frames=4)
        gateway = Gateway(runner=runner, tenant=tenant(limits=limits))
        connection = gateway.connect()
        ids = [f"BP{n}" for n in range(7)]
        connection.send(b"".join(mllp(hl7(i)) for i in ids))
        self.assertEqual(connection.transport.producerState, "paused")
        while runner.calls:
            runner.run_next()
            if connection.transport.producerState == "producing":
                break
        self.assertEqual(connection.transport.producerState, "producing")
        self.assertLess(len(gateway.messages()), len(ids))
        while runner.calls:
            runner.run_next()
        replies = mllp_replies(connection.received())
        self.assertEqual([r.control_id for r in replies], ids)
        self.assertEqual(connection.transport.producerState, "producing")

    def test_sender_gone_before_ack_then_resend_replays(self) -> None:
        """The sender disconnects while its commit is held: the commit completes, nothing is
        written on the dead connection, and the resend on a new one replays the ACK."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect(port=1)
        connection.send(mllp(hl7("GONE")))
        hang_up(connection)
        runner.run_next()
        self.assertEqual(connection.received(), b"")
        [stored] = gateway.messages()
        again = gateway.connect(port=2)
        again.send(mllp(hl7("GONE")))
        runner.run_next()
        self.assertEqual(again.received(), mllp(stored.ack))
        self.assertEqual(len(gateway.messages()), 1)
        self.assertEqual([e for e in self.events if e.get("log_failure")], [])

    def test_no_pause_below_the_limit(self) -> None:
        """Fewer frames than max_pending_frames do not pause the transport."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner, tenant=tenant(limits=Limits(max_pending_frames=4)))
        connection = gateway.connect()
        connection.send(b"".join(mllp(hl7(f"NP{n}")) for n in range(3)))
        self.assertEqual(connection.transport.producerState, "producing")


class TimeoutTests(GatewayTestCase):
    """Every wait has a timeout: frame (absolute) and idle."""

    def test_partial_frame_then_silence_frame_timeout(self) -> None:
        """Start byte and part of a message, then silence: at the frame timeout the partial
        is discarded and the connection closed; a new connection works."""
        gateway = Gateway()
        timeout = gateway.tenant.limits.frame_timeout
        connection = gateway.connect()
        connection.send(b"\x0b" + hl7("SILENT")[:50])
        gateway.clock.advance(timeout - 0.5)
        self.assertFalse(connection.closed)
        gateway.clock.advance(0.5)
        self.assertTrue(connection.closed)
        self.assertEqual(connection.received(), b"")
        self.assertEqual(gateway.factory.stats.frame_timeouts, 1)
        # The rest of the frame arriving now is not processed.
        connection.send(hl7("SILENT")[50:] + b"\x1c\r")
        hang_up(connection)
        self.assertEqual(gateway.messages(), [])

        fresh = gateway.connect()
        fresh.send(mllp(hl7("FRESH")))
        self.assertEqual(one_reply(fresh).control_id, "FRESH")

    def test_frame_timeout_is_absolute(self) -> None:
        """Trickling a byte every few seconds does not extend the frame timeout (slowloris)."""
        gateway = Gateway()
        timeout = gateway.tenant.limits.frame_timeout
        connection = gateway.connect()
        message = hl7("SLOW")
        connection.send(b"\x0b" + message[:10])
        sent = 10
        elapsed = 0.0
        while elapsed + 5 < timeout:
            gateway.clock.advance(5)
            elapsed += 5
            connection.send(message[sent : sent + 1])
            sent += 1
            self.assertFalse(connection.closed)
        gateway.clock.advance(timeout - elapsed)
        self.assertTrue(connection.closed)
        self.assertEqual(gateway.messages(), [])

    def test_frame_timeout_runs_per_frame(self) -> None:
        """Each frame gets its own frame timeout, from its own start byte."""
        gateway = Gateway()
        timeout = gateway.tenant.limits.frame_timeout
        connection = gateway.connect()
        connection.send(b"\x0b" + hl7("F1")[:20])
        gateway.clock.advance(timeout - 1)
        connection.send(hl7("F1")[20:] + b"\x1c\r\x0b" + hl7("F2")[:20])
        self.assertEqual(one_reply(connection).control_id, "F1")
        gateway.clock.advance(timeout - 1)
        self.assertFalse(connection.closed)
        connection.send(hl7("F2")[20:] + b"\x1c\r")
        self.assertEqual(one_reply(connection).control_id, "F2")
        gateway.clock.advance(timeout * 2)
        self.assertFalse(connection.closed)

    def test_plain_tcp_frame_timeout_is_absolute(self) -> None:
        """Plain TCP trickling within the idle gap is still cut at the frame timeout."""
        gateway = Gateway()
        limits, gap = gateway.tenant.limits, gateway.tenant.tcp.idle_gap
        connection = gateway.connect()
        connection.send(b"MSH|^~\\&|HIS|Hospital|LSQ|LS|2024||ADT^A04|DRIP|P|2.5\rNTE|1||")
        elapsed = 0.0
        while elapsed + gap / 2 < limits.frame_timeout:
            gateway.clock.advance(gap / 2)
            elapsed += gap / 2
            connection.send(b"x")
        self.assertFalse(connection.closed)
        gateway.clock.advance(limits.frame_timeout - elapsed + TICK)
        self.assertTrue(connection.closed)
        self.assertEqual(connection.received(), b"")
        self.assertEqual(gateway.messages(), [])

    def test_idle_timeout_closes(self) -> None:
        """A connection without traffic is closed at the idle timeout; traffic restarts it."""
        gateway = Gateway()
        idle = gateway.tenant.limits.idle_timeout
        connection = gateway.connect()
        gateway.clock.advance(idle / 2)
        connection.send(mllp(hl7("KEEP")))
        self.assertEqual(one_reply(connection).control_id, "KEEP")
        gateway.clock.advance(idle - 1)
        self.assertFalse(connection.closed)
        gateway.clock.advance(1)
        self.assertTrue(connection.closed)
        self.assertEqual(gateway.factory.stats.idle_timeouts, 1)

    def test_slowloris_between_frames_frees_the_slot(self) -> None:
        """A byte now and then between frames does not hold a slot past the idle timeout."""
        gateway = Gateway(
            tenant=tenant(limits=Limits(idle_timeout=30, max_connections_per_peer=1))
        )
        connection = gateway.connect(host="10.0.0.7", port=1)
        connection.send(mllp(hl7("SLOW")))
        self.assertEqual(one_reply(connection).code, "AA")
        for _ in range(5):
            gateway.clock.advance(5)
            connection.send(b"\r")
        self.assertTrue(refused(gateway, "10.0.0.7", 2))
        gateway.clock.advance(5 + TICK)
        self.assertTrue(connection.closed)
        self.assertEqual(gateway.factory.stats.idle_timeouts, 1)
        hang_up(connection)
        self.assertFalse(refused(gateway, "10.0.0.7", 3))

    def test_idle_timeout_without_any_byte(self) -> None:
        """A connection that never sends a byte is closed at the idle timeout."""
        gateway = Gateway(tenant=tenant(limits=Limits(idle_timeout=30)))
        connection = gateway.connect()
        gateway.clock.advance(29.9)
        self.assertFalse(connection.closed)
        gateway.clock.advance(0.1)
        self.assertTrue(connection.closed)

    def test_timers_cancelled_on_close(self) -> None:
        """Once a connection is gone it leaves no timer behind."""
        gateway = Gateway()
        before = len(gateway.clock.getDelayedCalls())
        connection = gateway.connect()
        connection.send(b"\x0b" + hl7("OPEN")[:30])
        plain = gateway.connect()
        plain.send(hl7("OPEN2")[:30])
        hang_up(connection)
        hang_up(plain)
        self.assertEqual(len(gateway.clock.getDelayedCalls()), before)


class SizeLimitTests(GatewayTestCase):
    """Every buffer has a bound: the max frame size."""

    def test_complete_oversized_frame_nak_104(self) -> None:
        """A complete frame over the max size: AE 104 with MSA-2 from its header; not stored."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=1024)))
        connection = gateway.connect()
        connection.send(mllp(padded(hl7("HUGE"), 1025)))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AE", "HUGE", 104))
        self.assertEqual(gateway.messages(), [])
        self.assertFalse(connection.closed)
        connection.send(mllp(hl7("NEXT")))
        self.assertEqual(one_reply(connection).code, "AA")

    def test_oversized_frame_enhanced_mode_ce(self) -> None:
        """An oversized frame in enhanced mode (AL) is answered CE 104."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=1024)))
        connection = gateway.connect()
        connection.send(mllp(padded(hl7("HUGE2", accept_ack="AL"), 1800)))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.error_code), ("CE", 104))

    def test_oversized_plain_tcp_nak_104(self) -> None:
        """Plain TCP: a message over the max size gets AE 104; not stored."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=1024)))
        connection = gateway.connect()
        connection.send(padded(hl7("HUGE3"), 1500))
        gateway.clock.advance(gateway.tenant.tcp.idle_gap)
        [reply] = plain_replies(connection.received())
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AE", "HUGE3", 104))
        self.assertEqual(gateway.messages(), [])

    def test_oversized_unreadable_frame_closes(self) -> None:
        """An oversized frame without a readable header is closed, not answered."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=1024)))
        connection = gateway.connect()
        connection.send(mllp(b"X" * 1500))
        self.assertEqual(connection.received(), b"")
        self.assertTrue(connection.closed)

    def test_frame_exactly_max_size_accepted(self) -> None:
        """A frame exactly at the max size is accepted and stored whole."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=1024)))
        connection = gateway.connect()
        message = padded(hl7("EXACT"), 1024)
        connection.send(mllp(message))
        reply = one_reply(connection)
        self.assertEqual((reply.code, reply.control_id), ("AA", "EXACT"))
        [stored] = gateway.messages()
        self.assertEqual((stored.size, stored.raw), (1024, message))

    def test_frame_exactly_max_size_plain_tcp(self) -> None:
        """Plain TCP: a message exactly at the max size is accepted."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=1024)))
        connection = gateway.connect()
        connection.send(padded(hl7("EXACT2"), 1024))
        connection.protocol.readConnectionLost()
        [reply] = plain_replies(connection.received())
        self.assertEqual(reply.code, "AA")
        self.assertEqual(gateway.messages()[0].size, 1024)

    def test_endless_frame_closed_size_logged_only(self) -> None:
        """A frame that never ends and grows past the limit: closed (aborted), the size logged,
        nothing stored, later bytes ignored."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=1024)))
        connection = gateway.connect()
        connection.send(b"\x0b" + hl7("ENDLESS"))
        chunk = b"NTE|1||" + b"y" * 249 + b"\r"
        for _ in range(40):
            if connection.closed:
                break
            connection.send(chunk)
        self.assertTrue(connection.closed)
        self.assertTrue(connection.transport.disconnected)  # aborted, not flushed
        self.assertEqual(gateway.factory.stats.overflows, 1)
        connection.send(b"\x1c\r" + mllp(hl7("LATE")))
        self.assertEqual(connection.received(), b"")
        self.assertEqual(gateway.messages(), [])
        [event] = self.gateway_events("size limit")
        fields = {key for key in event if not key.startswith("log_")} - LEGACY_LOG_KEYS
        self.assertEqual(fields, {"size", "peer", "tenant"})
        self.assertIsInstance(event["size"], int)
        self.assertGreater(event["size"], 1024)

    def test_endless_frame_memory_stays_flat(self) -> None:
        """Memory held for an endless frame stays near the max size, not the bytes sent."""
        max_size = 1024 * 1024
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=max_size)))
        connection = gateway.connect()
        connection.send(b"\x0b" + hl7("FLAT"))
        chunk = b"z" * 65536
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        tracemalloc.reset_peak()
        while not connection.closed:
            connection.send(chunk)
        _current, peak = tracemalloc.get_traced_memory()
        # Without the bound the frame's 2 MiB would be buffered before the close.
        self.assertLess(peak, max_size * 1.5)


class ConnectionLimitTests(GatewayTestCase):
    """Caps on connections and the peer allowlist, checked before any byte is read."""

    def test_max_connections(self) -> None:
        """Past max_connections new connections are refused; established ones keep working."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_connections=3)))
        open_ = [gateway.connect(host=f"10.0.0.{n}") for n in range(1, 4)]
        self.assertTrue(refused(gateway, "10.0.0.9"))
        self.assertTrue(refused(gateway, "10.0.0.1", 40001))
        self.assertEqual(gateway.factory.stats.refused, 2)
        for n, connection in enumerate(open_):
            connection.send(mllp(hl7(f"CAP{n}")))
            self.assertEqual(one_reply(connection).code, "AA")
        hang_up(open_[0])
        self.assertFalse(refused(gateway, "10.0.0.9"))

    def test_max_connections_per_peer(self) -> None:
        """Past max_connections_per_peer one address is refused; others are not."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_connections_per_peer=2)))
        first = gateway.connect(host="10.0.0.1", port=1)
        second = gateway.connect(host="10.0.0.1", port=2)
        self.assertTrue(refused(gateway, "10.0.0.1", 3))
        other = gateway.connect(host="10.0.0.2", port=1)
        for connection in (first, second, other):
            connection.send(mllp(hl7("PEER")))
            self.assertEqual(one_reply(connection).code, "AA")
        hang_up(second)
        self.assertFalse(refused(gateway, "10.0.0.1", 4))

    def test_allowlist_refuses_other_peers(self) -> None:
        """A peer outside the allowlist is refused before any byte is read; inside works."""
        gateway = Gateway(tenant=tenant(allow=(ipaddress.ip_network("10.0.0.0/8"),)))
        for host in ("192.168.1.5", "127.0.0.1", "11.0.0.1"):
            self.assertTrue(refused(gateway, host), host)
        self.assertEqual(gateway.factory.stats.refused, 3)
        self.assertEqual(gateway.factory.stats.open_connections, 0)
        connection = gateway.connect(host="10.20.30.40")
        connection.send(mllp(hl7("ALLOWED")))
        self.assertEqual(one_reply(connection).code, "AA")

    def test_allowlist_on_dual_stack_socket(self) -> None:
        """An IPv4 peer seen as an IPv4-mapped IPv6 address is judged by its IPv4 address."""
        gateway = Gateway(tenant=tenant(allow=(ipaddress.ip_network("10.0.0.0/8"),)))
        build = gateway.factory.buildProtocol
        self.assertIsNotNone(build(IPv6Address("TCP", "::ffff:10.1.2.3", 1)))
        self.assertIsNone(build(IPv6Address("TCP", "::ffff:192.168.1.1", 1)))
        self.assertIsNone(build(IPv6Address("TCP", "2001:db8::1", 1)))

    def test_refusals_log_rate_limited(self) -> None:
        """Thousands of refused connections log a bounded number of lines."""
        gateway = Gateway(tenant=tenant(allow=(ipaddress.ip_network("10.0.0.0/8"),)))
        for port in range(2000):
            self.assertTrue(refused(gateway, "192.168.1.5", port))
        self.assertEqual(gateway.factory.stats.refused, 2000)
        self.assertEqual(len(self.gateway_events("refused")), 1)
        gateway.clock.advance(60)
        refused(gateway, "192.168.1.5")
        self.assertEqual(len(self.gateway_events("refused")), 2)


class NotHL7Tests(GatewayTestCase):
    """HTTP, TLS and load balancer probes on an HL7 port."""

    def probe(self, gateway: Gateway, data: bytes, port: int) -> Connection:
        """A new connection that sends ``data``."""
        connection = gateway.connect(port=port)
        connection.send(data)
        return connection

    def test_http_request_closed_at_once(self) -> None:
        """An HTTP request is closed at once, without an answer, and counted."""
        gateway = Gateway()
        connection = self.probe(gateway, HTTP_REQUEST, 1)
        self.assertTrue(connection.closed)
        self.assertEqual(connection.received(), b"")
        self.assertEqual(gateway.factory.stats.closed_not_hl7, 1)
        self.assertEqual(gateway.messages(), [])

    def test_tls_client_hello_closed_at_once(self) -> None:
        """A TLS ClientHello on a plain port is closed at once, without an answer, and counted."""
        gateway = Gateway()
        connection = self.probe(gateway, TLS_CLIENT_HELLO, 1)
        self.assertTrue(connection.closed)
        self.assertEqual(connection.received(), b"")
        self.assertEqual(gateway.factory.stats.closed_not_hl7, 1)

    def test_http_one_byte_at_a_time(self) -> None:
        """An HTTP request trickled byte by byte is closed once its method is recognised."""
        gateway = Gateway()
        connection = gateway.connect()
        for byte in HTTP_REQUEST[:4]:
            connection.send(bytes([byte]))
        self.assertTrue(connection.closed)

    def test_not_hl7_log_rate_limited(self) -> None:
        """Many HTTP and TLS probes: each closed and counted, the log rate-limited."""
        gateway = Gateway()
        for port in range(500):
            connection = self.probe(gateway, HTTP_REQUEST if port % 2 else TLS_CLIENT_HELLO, port)
            self.assertTrue(connection.closed)
            hang_up(connection)
        self.assertEqual(gateway.factory.stats.closed_not_hl7, 500)
        self.assertEqual(len(self.gateway_events("not HL7")), 1)
        gateway.clock.advance(60)
        hang_up(self.probe(gateway, HTTP_REQUEST, 9999))
        events = self.gateway_events("not HL7")
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["suppressed"], 499)
        self.assertEqual(gateway.factory.stats.open_connections, 0)
        self.assertEqual(gateway.messages(), [])

    def test_garbage_without_start_closed_at_detect_limit(self) -> None:
        """Bytes that are neither MLLP nor HL7 are not buffered without bound."""
        limits = Limits(detect_limit=256)
        gateway = Gateway(tenant=tenant(limits=limits))
        connection = gateway.connect()
        connection.send(b"\x00" * 200)
        self.assertFalse(connection.closed)
        connection.send(b"\x00" * 100)
        self.assertTrue(connection.closed)

    def test_thousands_of_empty_connections(self) -> None:
        """Connect and close without data, thousands of times: no messages, no errors,
        no timers left, bounded log volume, the per-peer cap not exhausted."""
        gateway = Gateway()
        timers = len(gateway.clock.getDelayedCalls())
        for port in range(5000):
            hang_up(gateway.connect(port=port))
        self.assertEqual(gateway.messages(), [])
        self.assertEqual(gateway.factory.stats.connections, 5000)
        self.assertEqual(gateway.factory.stats.open_connections, 0)
        self.assertEqual(len(gateway.clock.getDelayedCalls()), timers)
        self.assertLessEqual(len(self.gateway_events()), 1)
        self.assertEqual([e for e in self.events if e.get("log_failure")], [])
        # The same peer can still open its full share of connections.
        for port in range(gateway.tenant.limits.max_connections_per_peer):
            gateway.connect(port=port)


class PeerLimitTests(GatewayTestCase):
    """What one peer address can take: connections, bytes outside frames, frames per turn."""

    def test_default_eight_connections_per_address(self) -> None:
        """By default an address gets 8 connections; a ninth is refused, others are not."""
        gateway = Gateway()
        self.assertEqual(gateway.tenant.limits.max_connections_per_peer, 8)
        for port in range(8):
            gateway.connect(host="10.0.0.1", port=port)
        self.assertTrue(refused(gateway, "10.0.0.1", 99))
        self.assertFalse(refused(gateway, "10.0.0.2", 99))

    def test_dual_stack_spelling_is_the_same_address(self) -> None:
        """An IPv4 peer seen as ``::ffff:a.b.c.d`` on a dual-stack socket shares its cap."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_connections_per_peer=2)))
        gateway.connect(host="10.0.0.1", port=1)
        mapped = gateway.factory.buildProtocol(IPv6Address("TCP", "::ffff:10.0.0.1", 2))
        self.assertIsNotNone(mapped)
        self.assertTrue(refused(gateway, "10.0.0.1", 3))

    def test_junk_past_the_byte_budget_pauses_the_address(self) -> None:
        """Past the address's budget, bytes that make no frame stop the reading of each of its
        connections that reads, until the budget refills; another address is not affected."""
        limits = Limits(peer_bytes_per_second=1000, max_frame_size=1000)
        gateway = Gateway(tenant=tenant(limits=limits))
        first = gateway.connect(host="10.0.0.1", port=1)
        second = gateway.connect(host="10.0.0.1", port=2)
        other = gateway.connect(host="10.0.0.2", port=1)
        first.send(b"\x0b" + b"x" * 900)  # a partial frame: charged
        self.assertEqual(first.transport.producerState, "producing")
        second.send(b"\x00" * 300)  # junk before detection, same address: over budget
        self.assertEqual(second.transport.producerState, "paused")
        self.assertEqual(gateway.factory.stats.budget_pauses, 1)
        other.send(b"\x00" * 300)
        self.assertEqual(other.transport.producerState, "producing")
        first.send(b"x")
        self.assertEqual(first.transport.producerState, "paused")
        gateway.clock.advance(0.25)  # 202 bytes overdrawn at 1000 bytes/s
        self.assertEqual(first.transport.producerState, "producing")
        self.assertEqual(second.transport.producerState, "producing")

    def test_complete_frames_are_not_limited(self) -> None:
        """The bytes of complete frames are given back: a fast sender of frames never pauses."""
        message = mllp(hl7("FAST"))
        limits = Limits(peer_bytes_per_second=len(message), max_frame_size=len(message))
        gateway = Gateway(tenant=tenant(limits=limits))
        connection = gateway.connect(host="10.0.0.1")
        for _ in range(20):
            connection.send(message)
            self.assertEqual(one_reply(connection).code, "AA")
        self.assertEqual(connection.transport.producerState, "producing")
        self.assertEqual(gateway.factory.stats.budget_pauses, 0)

    def test_reconnecting_does_not_refill_the_budget(self) -> None:
        """An address that spent its budget and reconnects is still over it."""
        limits = Limits(peer_bytes_per_second=1000, max_frame_size=1000)
        gateway = Gateway(tenant=tenant(limits=limits))
        connection = gateway.connect(host="10.0.0.1", port=1)
        connection.send(b"\x0b" + b"x" * 1500)
        self.assertEqual(connection.transport.producerState, "paused")
        hang_up(connection)
        again = gateway.connect(host="10.0.0.1", port=2)
        again.send(b"\x00")
        self.assertEqual(again.transport.producerState, "paused")

    def test_frames_per_turn_yields_to_the_reactor(self) -> None:
        """Frames answered at once are answered ``frames_per_turn`` at a time, one turn
        each, in order; the rest follow on the next turns."""
        gateway = Gateway(tenant=tenant(limits=Limits(frames_per_turn=4)))
        connection = gateway.connect()
        # MSH-12 not accepted: answered AR at once, with no database work.
        frames = b"".join(mllp(hl7(f"V{n:02}", version="9.9")) for n in range(10))
        connection.send(frames)
        self.assertEqual(
            [r.control_id for r in mllp_replies(connection.received())],
            ["V00", "V01", "V02", "V03"],
        )
        gateway.clock.advance(0)
        gateway.clock.advance(0)
        replies = mllp_replies(connection.received())
        self.assertEqual([r.control_id for r in replies], [f"V{n:02}" for n in range(4, 10)])
        self.assertEqual({r.code for r in replies}, {"AR"})
        self.assertEqual(gateway.factory.stats.turn_yields, 2)

    def test_many_frames_answered_at_once_do_not_nest(self) -> None:
        """Thousands of frames answered at once in one chunk: no recursion, every one answered."""
        gateway = Gateway(tenant=tenant(limits=Limits(frames_per_turn=100_000)))
        connection = gateway.connect()
        count = 3000
        connection.send(b"".join(mllp(hl7(f"R{n}", version="9.9")) for n in range(count)))
        replies = mllp_replies(connection.received())
        self.assertEqual(len(replies), count)
        self.assertEqual(replies[-1].control_id, f"R{count - 1}")
        self.assertFalse(connection.closed)
        self.assertEqual([e for e in self.events if e.get("log_failure")], [])

    def test_budgets_kept_are_bounded(self) -> None:
        """Many addresses that each spent their budget and left: the budgets kept stay bounded."""
        limits = Limits(peer_bytes_per_second=100, max_frame_size=100, max_connections=4)
        gateway = Gateway(tenant=tenant(limits=limits))
        for n in range(200):
            connection = gateway.connect(host=f"10.1.{n // 250}.{n % 250}")
            connection.send(b"\x00" * 150)
            hang_up(connection)
        self.assertLessEqual(len(gateway.factory._budgets), 2 * limits.max_connections)
