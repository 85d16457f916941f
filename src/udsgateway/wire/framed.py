"""The server side of an HL7 connection: framing, bounded waits, frames in order.

Shared by the tenants' listener (listener.py) and the test receiver
(peers.py). The framing is detected per connection from the first meaningful
byte: a start byte (0x0B) means MLLP, ``MSH`` (or a batch's ``FHS`` or
``BHS``) means plain TCP. Every wait has
a timeout: the connection's idle time, a frame from its first byte to its
last, and on plain TCP the idle gap that ends a message. Complete frames
queue in arrival order; the subclass answers them one at a time in
``_pump``, so the answers go back in order (G5).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from attrs import define, field, frozen
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from udsgateway.wire.framing import Frame, FrameEvent, FrameOverflow, IFramer, OversizedFrame

START_BYTE = b"\x0b"

log = Logger()

#: The shortest pause of a connection over its address's byte budget, in seconds.
_MIN_BUDGET_WAIT = 0.005


def failure_site(error: BaseException) -> str:
    """``file:line`` where an exception was raised: enough to find a bug, never data (PHI)."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return "?"
    code = traceback.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{traceback.tb_lineno}"


@define
class ByteBudget:
    """A token bucket of bytes for one peer address, shared by its connections.

    Charged with every byte read and refunded with the bytes of each complete
    frame, so what it limits is the bytes that do not (yet) make a frame:
    junk, partial frames, drained oversized frames. A sender of complete
    frames is never slowed by it.
    """

    _clock: IReactorTime
    rate: float
    capacity: float
    _tokens: float = field(init=False)
    _stamp: float = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.capacity
        self._stamp = self._clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        self._tokens = min(self.capacity, self._tokens + max(0.0, now - self._stamp) * self.rate)
        self._stamp = now

    def charge(self, size: int) -> None:
        self._refill()
        self._tokens -= size

    def refund(self, size: int) -> None:
        self._refill()
        self._tokens = min(self.capacity, self._tokens + size)

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.capacity

    def wait(self) -> float:
        """Seconds until the budget is no longer overdrawn (0: read on)."""
        self._refill()
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


@frozen
class ConnectionLimits:
    """The waits and detection bound of one connection (docs/guarantees.md "Default limits")."""

    idle_timeout: float
    frame_timeout: float
    #: Plain TCP: an idle gap this long after data ends the message.
    idle_gap: float
    #: Bytes read without a start byte or ``MSH`` before the connection is closed.
    detect_limit: int


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to the connection, straight to its socket when nothing waits ahead.

    Twisted's ``transport.write`` buffers and sends on the reactor's next pass
    (registering the socket for writability, then unregistering it once sent):
    two more ``epoll_ctl`` calls, a poll and a dispatch for every ACK and every
    outbound message. When the transport is a plain TCP connection with nothing
    buffered, the bytes go to the socket at once instead (a non-blocking
    ``send``, as Twisted's own would be), in the same order. Whatever the socket
    does not take now, any error, a TLS connection, or any other transport goes
    through ``transport.write`` as before (Twisted then finds the error and
    closes the connection its usual way).
    """
    # Only Twisted's own TCP connection, by class: a TLS connection wraps one
    # (TLSMemoryBIOProtocol), and a wrapper answers attribute reads with those of the
    # connection under it, socket included, so any duck-typed check would send
    # plaintext past the TLS layer. Twisted's TLS started on the connection itself
    # (startTLS) sets its TLS flag.
    if (
        not isinstance(transport, Connection)
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport.dataBuffer
        or transport._tempDataBuffer
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(data)  # Twisted's write path reports the error and closes
        return
    if sent < len(data):
        transport.write(data[sent:])


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
        #: The peer address's byte budget; None: not limited.
        self._budget: ByteBudget | None = None
        self._budget_timer: IDelayedCall | None = None
        #: Why reading is paused ("backpressure", "budget"); read on when empty.
        self._pause_reasons: set[str] = set()

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

    def _on_error(self, error: Exception) -> None:
        """Input made the connection's code fail (it is aborted next): log one line."""
        log.warn(
            "input handling failed ({error}, at {site}): connection aborted",
            error=type(error).__name__,
            site=failure_site(error),
        )

    def _pump(self) -> None:
        """Answer queued frames, one at a time, in order."""
        raise NotImplementedError

    # -- Twisted callbacks

    def connectionMade(self) -> None:
        self._idle_timer = self._clock.callLater(self._limits.idle_timeout, self._idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._data_received(data)
        except Exception as error:
            # A bug reached by some input: handled here, one line, never the bytes.
            self._on_error(error)
            self._close(abort=True)

    def _data_received(self, data: bytes) -> None:
        if self._budget is not None:
            self._budget.charge(len(data))
        if self._framer is None:
            data = self._detect_framing(data)
        if self._framer is not None:
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
        # else: no frame start yet, not activity (the idle timeout is absolute)
        self._check_budget()

    def _check_budget(self) -> None:
        """Past the peer's byte budget: stop reading until it refills."""
        if self._budget is None or self._closing or self._budget_timer is not None:
            return
        wait = self._budget.wait()
        if wait > 0:
            self._on_budget_exceeded()
            self._pause_reading("budget")
            # At least a few ms: a wait below the clock's resolution would fire
            # at once, again and again.
            self._budget_timer = self._clock.callLater(
                max(wait, _MIN_BUDGET_WAIT), self._budget_refilled
            )

    def _budget_refilled(self) -> None:
        self._budget_timer = None
        self._resume_reading("budget")
        self._check_budget()  # another connection of the peer may have spent it again

    def _on_budget_exceeded(self) -> None:
        """The peer address went past its byte budget (reading pauses next)."""

    def _pause_reading(self, reason: str) -> None:
        if not self._pause_reasons and not self._closing and self.transport is not None:
            self._transport.pauseProducing()
        self._pause_reasons.add(reason)

    def _resume_reading(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if (
            not self._pause_reasons
            and not self._closing
            and not self._read_closed
            and self.transport is not None
        ):
            self._transport.resumeProducing()

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
        for timer in (self._idle_timer, self._frame_timer, self._gap_timer, self._budget_timer):
            if timer is not None and timer.active():
                timer.cancel()

    # -- framing

    def _detect_framing(self, data: bytes) -> bytes:
        self._detect += data
        buffered = bytes(self._detect)
        if self._refuse(buffered):
            self._close()
            return b""
        start = buffered.find(START_BYTE)
        found = [at for at in map(buffered.find, (b"MSH", b"FHS", b"BHS")) if at >= 0]
        msh = min(found, default=-1)
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
            if self._budget is not None and isinstance(event, Frame):
                self._budget.refund(len(event.payload))
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
