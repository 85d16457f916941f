"""The server side of an HL7 connection: framing, bounded waits, frames in order.

Shared by the tenants' listener (listener.py) and the test receiver
(peers.py). The framing is detected per connection from the first meaningful
byte: a start byte (0x0B) means MLLP, ``MSH`` means plain TCP. Every wait has
a timeout: the connection's idle time, a frame from its first byte to its
last, and on plain TCP the idle gap that ends a message. Complete frames
queue in arrival order; the subclass answers them one at a time in
``_pump``, so the answers go back in order (G5).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from udsgateway.framing import Frame, FrameEvent, FrameOverflow, IFramer, OversizedFrame

START_BYTE = b"\x0b"


@frozen
class ConnectionLimits:
    """The waits and the detection bound of one connection (RELIABILITY.md "Default limits")."""

    idle_timeout: float
    frame_timeout: float
    #: Plain TCP: an idle gap this long after data ends the message.
    idle_gap: float
    #: Bytes read without a start byte or ``MSH`` before the connection is closed.
    detect_limit: int


@implementer(IHalfCloseableProtocol)
class FramedServerProtocol(Protocol):
    """Detect the framing, frame, queue complete frames; subclasses answer them in ``_pump``.

    Subclasses build the framer (``_make_framer``) and may refuse a
    connection's first bytes (``_refuse``), react to an oversized frame,
    to a timeout or to new frames in the queue (backpressure) through the
    ``_on_*`` hooks.
    """

    def __init__(self, clock: IReactorTime, limits: ConnectionLimits) -> None:
        self._clock = clock
        self._limits = limits
        self._framer: IFramer | None = None
        #: "mllp" or "tcp" once detected.
        self._connection_type = ""
        self._detect = bytearray()
        self._queue: deque[Frame | OversizedFrame] = deque()
        #: A frame is being answered; the next waits for it.
        self._busy = False
        self._closing = False
        # The sender half-closed: answer what was received, then close.
        self._read_closed = False
        self._idle_timer: IDelayedCall | None = None
        self._frame_timer: IDelayedCall | None = None
        self._gap_timer: IDelayedCall | None = None

    @property
    def connection_type(self) -> str:
        """The framing detected: "mllp" or "tcp" ("" until a message starts)."""
        return self._connection_type

    @property
    def _transport(self) -> Any:
        """The TCP transport (ITCPTransport, IProducer): more than ITransport promises."""
        assert self.transport is not None
        return self.transport

    # -- for subclasses

    def _make_framer(self, connection_type: str) -> IFramer:
        """The framer for a connection detected as "mllp" or "tcp"."""
        raise NotImplementedError

    def _refuse(self, first_bytes: bytes) -> bool:
        """True when the first bytes read are not HL7 at all: the connection is closed."""
        return False

    def _on_overflow(self, size: int) -> None:
        """A frame grew past the size limit (the connection is aborted next)."""

    def _on_queued(self) -> None:
        """Frames were queued, before ``_pump`` runs (backpressure)."""

    def _on_frame_timeout(self) -> None:
        """A frame was not complete within the frame timeout (closed next)."""

    def _on_idle_timeout(self) -> None:
        """Nothing was read within the idle timeout (closed next)."""

    def _pump(self) -> None:
        """Answer queued frames, one at a time, in order."""
        raise NotImplementedError

    # -- Twisted callbacks

    def connectionMade(self) -> None:
        self._idle_timer = self._clock.callLater(self._limits.idle_timeout, self._idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._framer is None:
            data = self._detect_framing(data)
            if self._framer is None:
                return  # no frame start yet: not activity (the idle timeout is absolute)
        was_open = self._framer.frame_open
        commit_acks = self._framer.stats.commit_acks  # frames the framer swallows
        events = self._framer.feed(data)
        if (
            was_open
            or events
            or self._framer.frame_open
            or self._framer.stats.commit_acks != commit_acks
        ):
            # Only bytes of a frame are activity; a frame's own time is bounded
            # by the absolute frame timeout. Junk between frames (a byte now and
            # then, slowloris) does not keep the connection open.
            self._touch()
        self._feed(events)

    def _touch(self) -> None:
        """A frame started, continued or ended: restart the idle timeout."""
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self._limits.idle_timeout)

    def readConnectionLost(self) -> None:
        """The sender half-closed: a plain TCP message ends at end of stream.

        The frames already received are still answered (the sender is still
        reading); the connection is closed after the last answer.
        """
        self._read_closed = True
        if self._framer is not None and not self._closing:
            self._feed(self._framer.flush())
        self._pump()

    def writeConnectionLost(self) -> None:
        self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        self._queue.clear()
        for timer in (self._idle_timer, self._frame_timer, self._gap_timer):
            if timer is not None and timer.active():
                timer.cancel()

    # -- framing

    def _detect_framing(self, data: bytes) -> bytes:
        self._detect += data
        buffered = bytes(self._detect)
        if self._refuse(buffered):
            self._close()
            return b""
        start, msh = buffered.find(START_BYTE), buffered.find(b"MSH")
        if start == -1 and msh == -1:
            if len(buffered) > self._limits.detect_limit:
                self._close()
            return b""
        mllp = start != -1 and (msh == -1 or start < msh)
        self._connection_type = "mllp" if mllp else "tcp"
        self._framer = self._make_framer(self._connection_type)
        self._detect = bytearray()
        return buffered

    def _feed(self, events: list[FrameEvent]) -> None:
        assert self._framer is not None
        for event in events:
            if isinstance(event, FrameOverflow):
                self._on_overflow(event.size)
                self._close(abort=True)
                return
            self._queue.append(event)
        self._watch_frame_timer(bool(events))
        if self._connection_type == "tcp":
            self._watch_gap_timer()
        self._on_queued()
        self._pump()

    def _watch_frame_timer(self, frames_ended: bool) -> None:
        """The frame timeout is absolute: from a frame's first byte to its last."""
        assert self._framer is not None
        timer = self._frame_timer
        if not self._framer.frame_open:
            if timer is not None and timer.active():
                timer.cancel()
            self._frame_timer = None
        elif timer is None or not timer.active() or frames_ended:
            if timer is not None and timer.active():
                timer.cancel()
            self._frame_timer = self._clock.callLater(
                self._limits.frame_timeout, self._frame_timeout
            )

    def _watch_gap_timer(self) -> None:
        assert self._framer is not None
        if self._gap_timer is not None and self._gap_timer.active():
            self._gap_timer.cancel()
        self._gap_timer = None
        if self._framer.frame_open:
            self._gap_timer = self._clock.callLater(self._limits.idle_gap, self._gap)

    def _gap(self) -> None:
        """Plain TCP: an idle gap after data ends the message."""
        self._gap_timer = None
        if self._framer is not None and not self._closing:
            self._feed(self._framer.flush())

    def _frame_timeout(self) -> None:
        self._frame_timer = None
        self._on_frame_timeout()
        if self._framer is not None:
            self._framer.reset()
        self._close()

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        self._on_idle_timeout()
        self._close()

    def _close(self, abort: bool = False) -> None:
        self._closing = True
        self._queue.clear()
        if self.transport is None:
            return
        if abort:
            self._transport.abortConnection()
        else:
            self._transport.loseConnection()
