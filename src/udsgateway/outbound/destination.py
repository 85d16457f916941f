"""A destination: one endpoint, its connection made on demand, one exchange at a time.

A **destination** is one endpoint (``tcp:`` or ``tls:``) spoken to over MLLP
or plain TCP, on a connection made on demand (when a lane has work) and kept;
a close after a complete exchange is no failure, a failed connect starts the
documented backoff. One message is in flight per connection; an ACK counts
only when its MSA-2 equals the MSH-10 sent (the caller's ``judge``). On a
response timeout or a garbled, MSA-less or mismatched reply the connection is
closed, so a late ACK can never be matched to the next message.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, TimeoutError
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from udsgateway.outbound.errors import (
    ConnectError,
    ConnectionLostError,
    DeliveryError,
    ReplyTimeoutError,
    StaleConnectionError,
    StoppedError,
)
from udsgateway.outbound.policy import Timing
from udsgateway.store.engine import Durations
from udsgateway.wire.framed import write_now
from udsgateway.wire.framing import Frame, IFramer, MLLPFramer, PlainTCPFramer

_Judged = TypeVar("_Judged")


class DestinationProtocol(Protocol):
    """One connection to a destination: send a message, wait for its one reply."""

    def __init__(self, framer: IFramer, clock: IReactorTime, timing: Timing) -> None:
        self._framer = framer
        self._clock = clock
        self._timing = timing
        self._waiting: Deferred[bytes] | None = None
        self._gap: IDelayedCall | None = None
        #: The response deadline: one timer per connection, moved to a full
        #: response timeout by each exchange (see ``_arm``).
        self._deadline: IDelayedCall | None = None
        self.connected_ok = True
        #: Exchanges completed on this connection, and whether the one in
        #: flight has had any byte of reply yet.
        self.exchanges = 0
        self._answered = False

    def connectionMade(self) -> None:
        # One small message, then wait for its ACK: Nagle would only add latency.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def exchange(self, payload: bytes) -> Deferred[bytes]:
        """Send one message; fire with the reply frame, or fail with DeliveryError."""
        if self._waiting is not None:
            raise RuntimeError("one message in flight per connection")
        waiting: Deferred[bytes] = Deferred()
        self._waiting = waiting
        self._answered = False
        self._arm()
        assert self.transport is not None
        write_now(self.transport, self._framer.encode(payload))
        return waiting

    def _arm(self) -> None:
        """Give the exchange starting now a full response timeout.

        The connection keeps one timer for its deadline (Twisted's
        ``TimeoutMixin`` idea) instead of a ``callLater`` and its cancel, and
        a Deferred timeout's callbacks, per exchange: a reply leaves the timer
        running, and the next exchange only moves it later, which a reactor
        does without touching its queue of timers. Should it fire with no
        exchange in flight, it does nothing (``_deadline_passed``).
        """
        deadline = self._deadline
        if deadline is not None and deadline.active():
            deadline.reset(self._timing.response_timeout)
        else:
            self._deadline = self._clock.callLater(
                self._timing.response_timeout, self._deadline_passed
            )

    def _deadline_passed(self) -> None:
        """The last exchange's response timeout is over: if it had no reply, it failed."""
        self._deadline = None
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            return  # answered in time; the connection was idle since
        self.drop()
        waiting.errback(ReplyTimeoutError(f"no reply within {self._timing.response_timeout:g}s"))

    def dataReceived(self, data: bytes) -> None:
        self._answered = True
        for event in self._framer.feed(data):
            if isinstance(event, Frame):
                self._reply(event.payload)
            else:
                self._fail(DeliveryError("reply too large"))
        if isinstance(self._framer, PlainTCPFramer) and self._framer.frame_open:
            if self._gap is not None and self._gap.active():
                self._gap.cancel()
            self._gap = self._clock.callLater(self._timing.reply_gap, self._flush)

    def _flush(self) -> None:
        self._gap = None
        for event in self._framer.flush():
            if isinstance(event, Frame):
                self._reply(event.payload)

    def _reply(self, payload: bytes) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            # Unsolicited or late: this connection is out of step; start afresh.
            self.drop()
            return
        self.exchanges += 1
        waiting.callback(payload)

    def _fail(self, error: DeliveryError) -> None:
        waiting, self._waiting = self._waiting, None
        self.drop()
        if waiting is not None:
            waiting.errback(error)

    def drop(self) -> None:
        """Close this connection now; the next exchange connects again."""
        self.connected_ok = False
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ok = False
        if self._gap is not None and self._gap.active():
            self._gap.cancel()
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            return
        if self.exchanges > 0 and not self._answered:
            # A receiver that closes after each ACK closed this connection after
            # the previous exchange, before it read this message.
            waiting.errback(
                StaleConnectionError("connection closed by the destination after an ACK")
            )
        else:
            waiting.errback(ConnectionLostError("connection lost before the reply"))


class _DestinationFactory(Factory):
    noisy = False

    def __init__(self, protocol: str, clock: IReactorTime, timing: Timing) -> None:
        self._protocol = protocol
        self._clock = clock
        self._timing = timing

    def buildProtocol(self, addr: Any) -> DestinationProtocol:
        framer: IFramer
        if self._protocol == "mllp":
            framer = MLLPFramer(max_frame_size=self._timing.max_reply_size)
        else:
            framer = PlainTCPFramer(max_frame_size=self._timing.max_reply_size)
        return DestinationProtocol(framer, self._clock, self._timing)


@define(eq=False)
class Destination:
    """One destination endpoint with its connection, made on demand.

    Lanes to the same destination take turns on the connection (a
    ``DeferredLock``): one message in flight at a time, as MLLP requires. A
    connection is made only when a lane has a message to send (an idle
    gateway makes none). A close by the destination after a complete exchange
    is no failure: the next exchange connects again at once. A failed connect
    (refused, timed out) starts the documented backoff (``Timing.backoff``):
    until it ends, exchanges fail at once without connecting; the first good
    connect ends it and calls ``on_up``.

    The destination carries the timing of the deliveries sent through it
    (their action's timeouts and backoff) and the jitter's generator: the
    lanes read both here, and nowhere else.
    """

    endpoint: str
    protocol: str
    _clock: IReactorTime
    timing: Timing = field(factory=Timing)
    _client: IStreamClientEndpoint | None = None
    _current: DestinationProtocol | None = None
    _connecting: Deferred[Any] | None = None
    #: The turns on the connection: held by the lane whose message is in flight.
    _turn: DeferredLock = field(factory=DeferredLock)
    #: Releases of the turn still to make, and whether a release is running.
    _releases: int = 0
    _releasing: bool = False
    _connect_failures: int = 0
    _reconnect_at: float = 0.0
    _connect_error: str = ""
    last_error: str = ""
    sent: int = 0
    connects: int = 0
    #: Seconds from a message written to its reply read (replies only, not timeouts).
    ack_wait: Durations = field(factory=Durations)
    #: Turns the endpoint string into an endpoint (tests pass an in-memory one).
    endpoint_factory: Callable[[Any, str], IStreamClientEndpoint] = clientFromString
    #: Reconnect and retry jitter, drawn from the dispatcher's generator so tests can seed it.
    rng: random.Random = field(factory=random.Random)
    #: Called when a connect succeeds after failed ones (lanes backing off may go now).
    on_up: Callable[[Destination], None] | None = None

    def start(self, reactor: Any) -> None:
        self._client = self.endpoint_factory(reactor, self.endpoint)

    def stop(self) -> Deferred[None]:
        self._client = None
        for waiting in list(self._turn.waiting):
            waiting.cancel()  # a lane waiting for its turn stops waiting
        if self._connecting is not None:
            self._connecting.cancel()
        self.drop()
        return Deferred.fromCoroutine(_nothing())

    @property
    def waiting(self) -> int:
        """Exchanges waiting for their turn on the connection."""
        return len(self._turn.waiting)

    async def exchange(self, payload: bytes, judge: Callable[[bytes], _Judged]) -> _Judged:
        """Send one message over the connection; return what ``judge`` makes of the reply.

        The reply is judged within this lane's turn: when ``judge`` finds it
        untrustworthy (DeliveryError), the connection is closed before another
        lane can write to it.
        """
        turn = self._turn
        if turn.locked:
            await turn.acquire()
        else:
            # Nobody holds the turn, so nobody waits for it: take it as
            # ``DeferredLock.acquire`` would, without its Deferred.
            turn.locked = True
        try:
            protocol = self._current
            if protocol is None or not protocol.connected_ok:
                protocol = await self._connection()
            self.sent += 1
            started = self._clock.seconds()
            reply = await protocol.exchange(payload)
            self.ack_wait.observe(self._clock.seconds() - started)
            try:
                return judge(reply)
            except DeliveryError:
                self.drop()
                raise
        finally:
            self._pass_turn()

    def _pass_turn(self) -> None:
        """Give the connection to the next lane waiting, in a loop, never by recursion.

        ``DeferredLock.release`` runs the next lane waiting at once, inside the
        call. That lane may fail at once (no connection) and pass the turn on
        from within it: that release is only counted here, and made by the
        loop below once the current one returns, so no chain of calls grows
        with the number of lanes waiting. With nobody waiting and no release
        running, the release is only the lock's flag.
        """
        turn = self._turn
        if not turn.waiting and not self._releasing:
            turn.locked = False
            return
        self._releases += 1
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._releases:
                self._releases -= 1
                turn.release()
        finally:
            self._releasing = False

    async def _connection(self) -> DestinationProtocol:
        """A new connection (``exchange`` reuses an open one without calling this)."""
        self._current = None
        if self._client is None:
            raise StoppedError("destination stopped")
        wait = self._reconnect_at - self._clock.seconds()
        if wait > 0:
            raise ConnectError(self._connect_error)
        connecting = self._client.connect(
            _DestinationFactory(self.protocol, self._clock, self.timing)
        )
        self._connecting = connecting
        self.connects += 1
        connecting.addTimeout(self.timing.connect_timeout, self._clock)
        try:
            protocol = await connecting
        except TimeoutError:
            reason = f"could not connect within {self.timing.connect_timeout:g}s"
        except CancelledError:
            raise StoppedError("destination stopped") from None
        except Exception as error:
            reason = f"connect failed: {type(error).__name__}"
        else:
            reason = ""
        finally:
            self._connecting = None
        if reason:
            self._connect_failures += 1
            delay = self.timing.backoff(self._connect_failures, self.rng)
            self._reconnect_at = self._clock.seconds() + delay
            self._connect_error = reason
            raise ConnectError(reason)
        assert isinstance(protocol, DestinationProtocol)
        if self._client is None:
            protocol.drop()
            raise StoppedError("destination stopped")
        was_down = self._connect_failures > 0
        self._connect_failures = 0
        self._reconnect_at = 0.0
        self._current = protocol
        if was_down and self.on_up is not None:
            self.on_up(self)
        return protocol

    @property
    def connected(self) -> bool:
        """A connection to the destination is open now (status: connection up)."""
        return self._current is not None and self._current.connected_ok

    @property
    def down(self) -> bool:
        """The last connect failed and none has succeeded since (status: connection down)."""
        return self._connect_failures > 0

    def reconnect_in(self) -> float:
        """Seconds until the next connect may be tried (0: now)."""
        return max(0.0, self._reconnect_at - self._clock.seconds())

    def drop(self) -> None:
        """Close the current connection (after a reply that cannot be trusted)."""
        if self._current is not None:
            self._current.drop()
            self._current = None


async def _nothing() -> None:
    return None
