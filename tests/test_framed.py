"""Tests for udsgateway.wire.framed: the framed server connection under the listener and receiver.

A minimal subclass answers each frame with its size, so these tests pin the base's
contract (detection, bounded waits, order, half-close) apart from what the listener
and the test receiver add on top; test_listener and test_peers cover those.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.tcp import Connection
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from udsgateway.wire.framed import ConnectionLimits, FramedServerProtocol, write_now
from udsgateway.wire.framing import Frame, IFramer, MLLPFramer, PlainTCPFramer

LIMITS = ConnectionLimits(idle_timeout=600.0, frame_timeout=60.0, idle_gap=0.2, detect_limit=64)
MSH = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A04|"


class Sizes(FramedServerProtocol):
    """Answers each complete frame with ``<size>;``, in order, at once."""

    def __init__(self, clock: Clock, max_frame_size: int = 1024) -> None:
        super().__init__(clock, LIMITS)
        self.max_frame_size = max_frame_size
        self.events: list[str] = []

    def _make_framer(self, connection_type: str) -> IFramer:
        if connection_type == "mllp":
            return MLLPFramer(max_frame_size=self.max_frame_size)
        return PlainTCPFramer(max_frame_size=self.max_frame_size)

    def _refuse(self, first_bytes: bytes) -> bool:
        return first_bytes.startswith(b"GET ")

    def _on_overflow(self, size: int) -> None:
        self.events.append(f"overflow {size}")

    def _on_frame_timeout(self) -> None:
        self.events.append("frame timeout")

    def _on_idle_timeout(self) -> None:
        self.events.append("idle timeout")

    def _pump(self) -> None:
        while self._queue and not self._closing:
            event = self._queue.popleft()
            assert isinstance(event, Frame)
            self._transport.write(b"%d;" % len(event.payload))
        if self._read_closed and not self._queue:
            self._transport.loseConnection()


class FramedServerTests(SynchronousTestCase):
    def connect(self, **kwargs: int) -> tuple[Sizes, StringTransport, Clock]:
        clock = Clock()
        protocol = Sizes(clock, **kwargs)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport, clock

    def test_mllp_after_junk_frames_in_order(self) -> None:
        """Junk before the first start byte is dropped; frames are answered in order."""
        protocol, transport, _clock = self.connect()
        protocol.dataReceived(b"\r\n\x00junk\x0b" + MSH + b"1\x1c\r\x0b" + MSH + b"22\x1c\r")
        self.assertEqual(protocol.connection_type, "mllp")
        self.assertEqual(transport.value(), b"%d;%d;" % (len(MSH) + 1, len(MSH) + 2))

    def test_plain_tcp_ends_at_the_idle_gap(self) -> None:
        """Plain TCP: a message with no end marker ends after the idle gap."""
        protocol, transport, clock = self.connect()
        protocol.dataReceived(MSH + b"1\r")
        self.assertEqual(transport.value(), b"")
        clock.advance(LIMITS.idle_gap)
        self.assertEqual(protocol.connection_type, "tcp")
        self.assertEqual(transport.value(), b"%d;" % (len(MSH) + 2))

    def test_no_hl7_within_the_detect_limit_closes(self) -> None:
        """Bytes with neither a start byte nor MSH are buffered up to the limit, then closed."""
        protocol, transport, _clock = self.connect()
        protocol.dataReceived(b"x" * LIMITS.detect_limit)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"x")
        self.assertTrue(transport.disconnecting)

    def test_refused_first_bytes_close(self) -> None:
        """What the subclass refuses (an HTTP request, here) is closed before any framing."""
        protocol, transport, _clock = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.connection_type, "")

    def test_overflow_aborts(self) -> None:
        """A frame that grows past the limit: the hook hears its size, the connection aborts."""
        protocol, transport, _clock = self.connect(max_frame_size=100)
        protocol.dataReceived(b"\x0b" + MSH + b"x" * 200)
        self.assertEqual(len(protocol.events), 1)
        self.assertTrue(protocol.events[0].startswith("overflow "))
        self.assertTrue(transport.disconnected)  # abortConnection, not loseConnection

    def test_frame_timeout_is_absolute(self) -> None:
        """Trickling bytes does not extend the frame timeout; at it the connection closes."""
        protocol, transport, clock = self.connect()
        protocol.dataReceived(b"\x0b" + MSH)
        for _ in range(5):
            clock.advance(LIMITS.frame_timeout / 6)
            protocol.dataReceived(b"x")
        self.assertFalse(transport.disconnecting)
        clock.advance(LIMITS.frame_timeout / 6)
        self.assertEqual(protocol.events, ["frame timeout"])
        self.assertTrue(transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """Data resets the idle timer; silence for the whole timeout closes."""
        protocol, transport, clock = self.connect()
        clock.advance(LIMITS.idle_timeout - 1)
        protocol.dataReceived(b"\x0b" + MSH + b"1\x1c\r")
        clock.advance(LIMITS.idle_timeout - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertEqual(protocol.events, ["idle timeout"])
        self.assertTrue(transport.disconnecting)

    def test_half_close_answers_the_last_message_then_closes(self) -> None:
        """Plain TCP: end of stream ends the message; it is answered, then the connection ends."""
        protocol, transport, _clock = self.connect()
        protocol.dataReceived(MSH + b"1\r")
        protocol.readConnectionLost()
        self.assertEqual(transport.value(), b"%d;" % (len(MSH) + 2))
        self.assertTrue(transport.disconnecting)

    def test_connection_lost_cancels_every_timer(self) -> None:
        """Once the connection is gone, no timer of it is left on the clock."""
        protocol, _transport, clock = self.connect()
        protocol.dataReceived(MSH + b"partial")  # idle, frame and gap timers all running
        self.assertEqual(len(clock.getDelayedCalls()), 3)
        protocol.connectionLost()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_junk_between_frames_does_not_extend_the_idle_timeout(self) -> None:
        """Slowloris between frames: a byte now and then outside a frame is not activity."""
        protocol, transport, clock = self.connect()
        protocol.dataReceived(b"\x0b" + MSH + b"1\x1c\r")
        for _ in range(9):
            clock.advance(LIMITS.idle_timeout / 10)
            protocol.dataReceived(b"x")
        self.assertFalse(transport.disconnecting)
        clock.advance(LIMITS.idle_timeout / 10)
        self.assertEqual(protocol.events, ["idle timeout"])
        self.assertTrue(transport.disconnecting)

    def test_plain_tcp_junk_between_messages_is_not_activity(self) -> None:
        """Plain TCP: after a message ended, bytes that are not ``MSH`` do not restart the wait."""
        protocol, transport, clock = self.connect()
        protocol.dataReceived(MSH + b"1\r")
        clock.advance(LIMITS.idle_gap)
        self.assertEqual(transport.value(), b"%d;" % (len(MSH) + 2))
        for junk in (b"M", b"S", b"\r\n", b"x", b"MS", b"\x00"):
            clock.advance(LIMITS.idle_timeout / 7)
            protocol.dataReceived(junk)
        self.assertFalse(transport.disconnecting)
        clock.advance(LIMITS.idle_timeout / 7)
        self.assertEqual(protocol.events, ["idle timeout"])

    def test_bytes_before_detection_are_not_activity(self) -> None:
        """Slowloris before any frame: bytes that start no frame do not restart the idle wait."""
        protocol, transport, clock = self.connect()
        for _ in range(9):
            clock.advance(LIMITS.idle_timeout / 10)
            protocol.dataReceived(b"\r")
        self.assertFalse(transport.disconnecting)
        clock.advance(LIMITS.idle_timeout / 10)
        self.assertEqual(protocol.events, ["idle timeout"])

    def test_a_frame_start_is_activity(self) -> None:
        """A frame that starts after junk restarts the idle timeout, as before."""
        protocol, transport, clock = self.connect()
        clock.advance(LIMITS.idle_timeout - 1)
        protocol.dataReceived(b"junk\x0b" + MSH)
        clock.advance(LIMITS.frame_timeout / 2)
        protocol.dataReceived(b"1\x1c\r")
        clock.advance(LIMITS.idle_timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"%d;" % (len(MSH) + 1))


class _Socket:
    """A socket's ``send``: takes at most ``room`` bytes, or raises ``error``."""

    def __init__(self, room: int = 1 << 20, error: OSError | None = None) -> None:
        self.room, self.error, self.sent = room, error, b""

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        taken = bytes(data[: self.room])
        self.sent += taken
        return len(taken)


class _TCPTransport(Connection):
    """Twisted's TCP connection with a stand-in socket; ``write`` records."""

    socket: Any

    def __init__(self, sock: Any) -> None:  # no super().__init__: no reactor, no fd
        self.socket = sock
        self.TLS = False
        self.connected = True
        self.disconnecting = False
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _Wrapper:
    """What a TLS connection (TLSMemoryBIOProtocol, a ProtocolWrapper) looks like: its
    own ``write``, every other attribute read from the connection under it."""

    def __init__(self, inner: _TCPTransport) -> None:
        self.inner = inner
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class WriteNowTests(SynchronousTestCase):
    """ACKs and outbound frames go to the socket at once when nothing waits ahead of them,
    and through the transport's buffered write otherwise, never out of order."""

    def test_straight_to_the_socket_when_nothing_is_buffered(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        transport = _TCPTransport(ours)
        write_now(transport, b"\x0bMSH|ACK\x1c\r")
        self.assertEqual(theirs.recv(100), b"\x0bMSH|ACK\x1c\r")
        self.assertEqual(transport.written, [])

    def test_what_the_socket_does_not_take_is_buffered(self) -> None:
        transport = _TCPTransport(_Socket(room=3))
        write_now(transport, b"abcdefgh")
        self.assertEqual(transport.socket.sent, b"abc")
        self.assertEqual(transport.written, [b"defgh"])

    def test_a_full_socket_buffers_it_all(self) -> None:
        transport = _TCPTransport(_Socket(error=BlockingIOError()))
        write_now(transport, b"abc")
        self.assertEqual(transport.written, [b"abc"])

    def test_a_socket_error_is_left_to_twisted(self) -> None:
        transport = _TCPTransport(_Socket(error=ConnectionResetError()))
        write_now(transport, b"abc")
        self.assertEqual(transport.written, [b"abc"])

    def test_buffered_bytes_go_first(self) -> None:
        for attribute, value in (("dataBuffer", b"older"), ("_tempDataBuffer", [b"older"])):
            transport = _TCPTransport(_Socket())
            setattr(transport, attribute, value)
            write_now(transport, b"newer")
            self.assertEqual((transport.socket.sent, transport.written), (b"", [b"newer"]))

    def test_tls_closing_or_other_transports_use_their_write(self) -> None:
        tls = _TCPTransport(_Socket())
        tls.TLS = True
        closing = _TCPTransport(_Socket())
        closing.disconnecting = True
        gone = _TCPTransport(_Socket())
        gone.connected = False
        for transport in (tls, closing, gone):
            write_now(transport, b"abc")
            self.assertEqual((transport.socket.sent, transport.written), (b"", [b"abc"]))
        # A wrapper that shows the socket of the connection under it (TLS) is not
        # bypassed: the bytes go through its write, never plaintext to the socket.
        wrapped = _Wrapper(_TCPTransport(_Socket()))
        write_now(wrapped, b"abc")
        self.assertEqual((wrapped.inner.socket.sent, wrapped.written), (b"", [b"abc"]))
        string = StringTransport()
        write_now(string, b"abc")
        self.assertEqual(string.value(), b"abc")


class WriteNowOnTwistedTCPTests(TestCase):
    """On a real TCP connection of the reactor, ``write_now`` sends at once: nothing is
    left in Twisted's buffers (the attributes it reads are there and mean what it thinks)."""

    def test_a_real_connection_takes_the_bytes_at_once(self) -> Deferred[Any]:
        from twisted.internet import reactor as the_reactor
        from twisted.internet.protocol import ClientFactory, Factory, Protocol

        received: Deferred[bytes] = Deferred()
        connected: Deferred[Any] = Deferred()

        class Receiver(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if not received.called:
                    received.callback(data)

        class Sender(Protocol):
            def connectionMade(self) -> None:
                connected.callback(self.transport)

        reactor: Any = the_reactor
        port = reactor.listenTCP(0, Factory.forProtocol(Receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = ClientFactory.forProtocol(Sender)
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client)
        self.addCleanup(connector.disconnect)

        def send(transport: Any) -> Deferred[bytes]:
            write_now(transport, b"hello")
            # Sent by the socket already: nothing buffered, no writer registered.
            self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
            self.assertNotIn(transport, reactor.getWriters())
            return received

        connected.addCallback(send)
        connected.addCallback(self.assertEqual, b"hello")
        return connected
