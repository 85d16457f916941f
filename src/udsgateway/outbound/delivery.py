"""The outbound delivery engine: destinations, lanes and the dispatcher.

* A **destination** is one endpoint (``tcp:`` or ``tls:``) spoken to over MLLP
  or plain TCP, on a connection made on demand (when a lane has work) and
  kept; a close after a complete exchange is no failure, a failed connect
  starts the documented backoff. One message is in flight per connection; an ACK
  counts only when its MSA-2 equals the MSH-10 sent. On a response timeout
  or a garbled, MSA-less or mismatched reply the connection is closed, so a
  late ACK can never be matched to the next message.
* A **lane** is the unit of ordering (G2): its deliveries are sent strictly
  in order, one at a time; a held head blocks the lane until an operator
  releases, skips or replays it. Lanes page through the store, so memory
  stays bounded however long the backlog is.
* The **dispatcher** recovers lanes from the store at start (before anything
  is sent), runs a bounded number of them at once, and records every
  outcome through a group committer, together with whatever the outcome
  unlocks (the next action of an execution) in the same transaction. A lane
  whose outcome cannot be committed sends nothing until it is.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from attrs import define, evolve, field, frozen
from sqlalchemy import Connection
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from udsgateway.clock import Wall, wall_of
from udsgateway.flows import DEFAULT_DECISIONS, DEFAULT_MAX_RETRIES
from udsgateway.hl7.ack import parse_reply
from udsgateway.store import destinations, outbox
from udsgateway.store.engine import Database, GroupCommitter
from udsgateway.store.messages import Origin
from udsgateway.store.outbox import DELIVERED, HELD, QUEUED, Delivery, Settlement
from udsgateway.wire.framing import Frame, IFramer, MLLPFramer, PlainTCPFramer

log = Logger()

_Judged = TypeVar("_Judged")

SUCCESS, RETRY, HOLD = "success", "retry", "hold"
#: What a delivery's stored policy falls back to: the defaults of flows.py.
DEFAULT_POLICY: dict[str, Any] = {**DEFAULT_DECISIONS, "max_retries": DEFAULT_MAX_RETRIES}


#: Policy keys that carry an action's timing with each of its deliveries.
TIMING_KEYS = ("connect_timeout", "response_timeout", "backoff_initial", "backoff_max")

#: While a delivery's outcome cannot be committed, its lane retries the commit
#: after this many seconds, doubling up to the maximum (and sends nothing).
RECORD_RETRY_INITIAL = 1.0
RECORD_RETRY_MAX = 30.0


class DeliveryError(Exception):
    """An attempt that did not get a usable answer; the message is sent again later."""


class ConnectError(DeliveryError):
    """No connection to the destination (refused, timed out, or in its reconnect backoff)."""


class StaleConnectionError(DeliveryError):
    """The destination had closed a reused connection before reading the message.

    Not a failure of the message or the destination (many receivers close
    after every ACK): it is sent again at once on a new connection.
    """


@frozen
class Timing:
    """Timeouts and backoff of a destination (docs/guarantees.md "Default limits")."""

    connect_timeout: float = 10.0
    response_timeout: float = 30.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    reply_gap: float = 0.1  # plain TCP: an idle gap ends the reply
    max_reply_size: int = 1024 * 1024

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failures`` failures in a row (exponential, capped)."""
        delay = min(self.backoff_initial * (2 ** min(failures - 1, 60)), self.backoff_max)
        return delay * (1 + 0.1 * rng.random()) if rng is not None else delay


class DestinationProtocol(Protocol):
    """One connection to a destination: send a message, wait for its one reply."""

    def __init__(self, framer: IFramer, clock: IReactorTime, timing: Timing) -> None:
        self._framer = framer
        self._clock = clock
        self._timing = timing
        self._waiting: Deferred[bytes] | None = None
        self._gap: IDelayedCall | None = None
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
        waiting.addTimeout(self._timing.response_timeout, self._clock, self._timed_out)
        assert self.transport is not None
        self.transport.write(self._framer.encode(payload))
        return waiting

    def _timed_out(self, result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(CancelledError):
            self._waiting = None
            self.drop()
            raise DeliveryError(f"no reply within {timeout:g}s")
        return result

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
            waiting.errback(DeliveryError("connection lost before the reply"))


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

    Lanes to the same destination take turns on the connection: one message
    in flight at a time, as MLLP requires. A connection is made only when a
    lane has a message to send (an idle gateway makes none). A close by the
    destination after a complete exchange is no failure: the next exchange
    connects again at once. A failed connect (refused, timed out) starts the
    documented backoff (``Timing.backoff``): until it ends, exchanges fail at
    once without connecting; the first good connect ends it and calls
    ``on_up``.
    """

    endpoint: str
    protocol: str
    _clock: IReactorTime
    timing: Timing = field(factory=Timing)
    _client: IStreamClientEndpoint | None = None
    _current: DestinationProtocol | None = None
    _connecting: Deferred[Any] | None = None
    _busy: bool = False
    _handing_over: bool = False
    _again: bool = False
    _turns: deque[Deferred[None]] = field(factory=deque)
    _connect_failures: int = 0
    _reconnect_at: float = 0.0
    _connect_error: str = ""
    last_error: str = ""
    sent: int = 0
    connects: int = 0
    #: Turns the endpoint string into an endpoint (tests pass an in-memory one).
    endpoint_factory: Callable[[Any, str], IStreamClientEndpoint] = clientFromString
    #: Reconnect jitter, drawn from the dispatcher's generator so tests can seed it.
    rng: random.Random = field(factory=random.Random)
    #: Called when a connect succeeds after failed ones (lanes backing off may go now).
    on_up: Callable[[Destination], None] | None = None

    def start(self, reactor: Any) -> None:
        self._client = self.endpoint_factory(reactor, self.endpoint)

    def stop(self) -> Deferred[None]:
        self._client = None
        for turn in self._turns:
            turn.cancel()
        self._turns.clear()
        if self._connecting is not None:
            self._connecting.cancel()
        self.drop()
        return Deferred.fromCoroutine(_nothing())

    async def exchange(self, payload: bytes, judge: Callable[[bytes], _Judged]) -> _Judged:
        """Send one message over the connection; return what ``judge`` makes of the reply.

        The reply is judged within this lane's turn: when ``judge`` finds it
        untrustworthy (DeliveryError), the connection is closed before another
        lane can write to it.
        """
        await self._take_turn()
        try:
            reply = await self._exchange(payload)
            try:
                return judge(reply)
            except DeliveryError:
                self.drop()
                raise
        finally:
            self._pass_turn()

    def _take_turn(self) -> Deferred[None]:
        if not self._busy:
            self._busy = True
            return Deferred.fromCoroutine(_nothing())
        turn: Deferred[None] = Deferred()
        self._turns.append(turn)
        return turn

    def _pass_turn(self) -> None:
        """Give the connection to the next lane waiting, in a loop, never by recursion.

        The next lane may fail at once (no connection) and pass the turn on
        from within this call: that only tells the loop below to go on, so
        no chain of calls grows with the number of lanes waiting.
        """
        if self._handing_over:
            self._again = True
            return
        self._handing_over = True
        try:
            self._again = True
            while self._again:
                self._again = False
                while self._turns and self._client is not None:
                    turn = self._turns.popleft()
                    if not turn.called:  # not cancelled (a stopped lane)
                        turn.callback(None)  # runs that lane until it waits
                        break
                else:
                    self._busy = False
        finally:
            self._handing_over = False

    async def _exchange(self, payload: bytes) -> bytes:
        protocol = await self._connection()
        self.sent += 1
        return await protocol.exchange(payload)

    async def _connection(self) -> DestinationProtocol:
        current = self._current
        if current is not None and current.connected_ok:
            return current
        self._current = None
        if self._client is None:
            raise DeliveryError("destination stopped")
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
            raise DeliveryError("destination stopped") from None
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
            raise DeliveryError("destination stopped")
        was_down = self._connect_failures > 0
        self._connect_failures = 0
        self._reconnect_at = 0.0
        self._current = protocol
        if was_down and self.on_up is not None:
            self.on_up(self)
        return protocol

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


def judge(delivery: Delivery, reply_bytes: bytes, now: float, nak_retries: int) -> Settlement:
    """Turn a destination's reply into the delivery's new state (the response policy)."""
    reply = parse_reply(reply_bytes)
    if reply.ack_code is None or reply.problem:
        raise DeliveryError(f"unusable reply: {reply.problem or 'no MSA'}")
    if reply.control_id != delivery.control_id:
        raise DeliveryError("reply MSA-2 does not match the MSH-10 sent")
    policy = {**DEFAULT_POLICY, **delivery.policy}
    decision = policy.get(reply.ack_code, HOLD)
    attempts = delivery.attempts + 1
    if decision == SUCCESS:
        return Settlement(delivery.id, DELIVERED, attempts, 0.0, "", reply_bytes, reply.ack_code)
    if decision == RETRY and nak_retries < int(policy["max_retries"]):
        return Settlement(
            delivery.id,
            QUEUED,
            attempts,
            now,
            f"{reply.ack_code} (retry {nak_retries + 1})",
            reply_bytes,
            reply.ack_code,
        )
    reason = f"{reply.ack_code} from destination" + (
        f" after {nak_retries} retries" if decision == RETRY else ""
    )
    if reply.error_code:
        reason += f", ERR {reply.error_code}"
    return Settlement(delivery.id, HELD, attempts, 0.0, reason, reply_bytes, reply.ack_code)


@define(eq=False)
class Lane:
    """One ordering lane: sends its deliveries strictly in order, one at a time."""

    name: str
    _dispatcher: Dispatcher
    destination: Destination
    _page: deque[Delivery] = field(factory=deque)
    _loaded_up_to: int = 0
    _failures: int = 0
    _nak_retries: int = 0
    _dirty: bool = False
    _complete: bool = False
    _sleeping: Deferred[None] | None = None
    _stopped: bool = False
    #: The head's next attempt on the timer clock, when this lane chose it; a
    #: stored next_attempt_at (wall clock) is only a hint after a restart.
    _retry: tuple[int, float] | None = None
    #: An operator acted on this lane in the store: read it again from its first
    #: open delivery before sending anything else (a replay goes first).
    _rewind: bool = False
    #: The head waits for its destination's reconnect backoff (not for its own).
    _waiting_for_connect: bool = False
    state: str = "idle"
    running: Deferred[None] | None = None

    def wake(self) -> None:
        """New work arrived, or an operator acted: look again."""
        self._dirty = True
        if self._sleeping is not None and self.state in ("held", "idle"):
            sleeping, self._sleeping = self._sleeping, None
            sleeping.cancel()

    def rewind(self) -> None:
        """An operator released, skipped or replayed a delivery of this lane: read the
        lane again from the store before the next send, and stop any wait now."""
        self._rewind = True
        self._dirty = True
        if self._sleeping is not None:
            sleeping, self._sleeping = self._sleeping, None
            sleeping.cancel()

    def saw_first_open(self, first_id: int) -> None:
        """The store's first open delivery of this lane is ``first_id`` (a sweep): if
        that is not the head this lane is working on, an operator acted behind it."""
        head = self._page[0].id if self._page else self._loaded_up_to + 1
        if first_id < head or (self._page and first_id != head):
            self.rewind()

    def retrying_head(self) -> Delivery | None:
        """The head this lane has tried and will try again, if any."""
        if self._page and self._page[0].state == QUEUED and self._page[0].attempts > 0:
            return self._page[0]
        return None

    def destination_up(self) -> None:
        """Its destination accepts connections again: a head waiting for that goes now."""
        if self._waiting_for_connect and self.state == "backoff" and self._retry is not None:
            self._retry = (self._retry[0], self._dispatcher.clock.seconds())
            if self._sleeping is not None:
                sleeping, self._sleeping = self._sleeping, None
                sleeping.cancel()

    def stop(self) -> None:
        self._stopped = True
        if self._sleeping is not None:
            sleeping, self._sleeping = self._sleeping, None
            sleeping.cancel()

    async def run(self) -> None:
        dispatcher = self._dispatcher
        while not self._stopped:
            if self._rewind:
                self._rewind = False
                await self._reload_from(1)
                self._retry = None
            if not self._page:
                if self._complete and not self._dirty:
                    # The last page held every open delivery and nothing was
                    # enqueued since: no need to ask the store again.
                    self.state = "idle"
                    return
                self._dirty = False
                page = await dispatcher.database.transaction(
                    outbox.lane_page, self.name, self._loaded_up_to, dispatcher.page_size
                )
                self._page.extend(page)
                self._complete = len(page) < dispatcher.page_size
                if not self._page:
                    if self._dirty:
                        continue
                    self.state = "idle"
                    return
                self._loaded_up_to = self._page[-1].id
            head = self._page[0]
            if head.state == HELD:
                self.state = "held"
                await self._sleep(dispatcher.held_poll)
                await self._reload_from(head.id)
                continue
            if dispatcher.paused_by(head.destination) is not None:
                # Paused by an operator: it keeps queueing, nothing is sent.
                self.state = "paused"
                await self._sleep(dispatcher.held_poll)
                continue
            wait = self._wait(head)
            if wait > 0:
                self.state = "backoff"
                await self._sleep(wait)
                continue
            self.state = "sending"
            settlement, delay = await self._attempt(head)
            if self._stopped:
                return
            self._retry = (head.id, dispatcher.clock.seconds() + delay) if delay else None
            if settlement.response is not None and dispatcher.after_send is not None:
                dispatcher.after_send()
            settlement = evolve(
                settlement,
                execution_id=head.execution_id,
                step=head.step,
                control_id=head.control_id,
            )
            if not await self._record(settlement):
                return
            if settlement.state == DELIVERED:
                dispatcher.delivered(head.destination)
                self._page.popleft()
                self._failures = self._nak_retries = 0
            else:
                self._page[0] = evolve(
                    head,
                    state=settlement.state,
                    attempts=settlement.attempts,
                    next_attempt_at=settlement.next_attempt_at,
                    last_error=settlement.last_error,
                )
                if settlement.state == HELD:
                    log.warn(
                        "delivery held: {reason}"
                        " (lane {lane}, delivery {delivery}, control ID {control_id})",
                        reason=settlement.last_error,
                        lane=self.name,
                        delivery=head.id,
                        control_id=head.control_id,
                    )
                    self._nak_retries = 0

    def _wait(self, head: Delivery) -> float:
        """Seconds until the head may be sent again.

        Measured on the timer clock when this lane set the backoff; a
        next_attempt_at read from the store (after a restart) is wall-clock
        time and is trusted for at most the longest backoff, so a wall clock
        set back cannot hold a lane for longer than that.
        """
        clock = self._dispatcher.clock
        if self._retry is not None and self._retry[0] == head.id:
            return self._retry[1] - clock.seconds()
        if head.next_attempt_at <= 0:
            return 0.0
        wait = head.next_attempt_at - self._dispatcher.now()
        if wait <= 0:
            return wait
        timing = self._dispatcher.timing_for(head.destination, head.policy)
        wait = min(wait, timing.backoff_max)
        self._retry = (head.id, clock.seconds() + wait)
        return wait

    async def _attempt(self, head: Delivery) -> tuple[Settlement, float]:
        """Send the head once: its new state, and the seconds to wait before the next try."""
        dispatcher = self._dispatcher
        # Each action's own timeouts and backoff travel with its deliveries.
        self.destination = dispatcher.destination(
            head.destination, head.protocol, dispatcher.timing_for(head.destination, head.policy)
        )
        try:
            settlement = await self.destination.exchange(
                head.payload,
                lambda reply: judge(head, reply, dispatcher.now(), self._nak_retries),
            )
        except DeliveryError as failure:
            reason = str(failure)
            self._waiting_for_connect = isinstance(failure, ConnectError)
            if isinstance(failure, StaleConnectionError):
                # Closed after the previous ACK: no failure; again at once, newly connected.
                delay = 0.0
            elif self._waiting_for_connect:
                # One reconnect backoff per destination, shared by its lanes.
                delay = self.destination.reconnect_in()
            else:
                self._failures += 1
                delay = self.destination.timing.backoff(self._failures, dispatcher.rng)
            self.destination.last_error = reason
            log.info(
                "delivery attempt failed: {reason}"
                " (lane {lane}, delivery {delivery}, control ID {control_id})",
                reason=reason,
                lane=self.name,
                delivery=head.id,
                control_id=head.control_id,
            )
            settlement = Settlement(
                head.id, QUEUED, head.attempts + 1, dispatcher.now() + delay, reason
            )
            return settlement, delay
        if settlement.state == QUEUED:
            # A negative ACK the policy retries: back off like any failure.
            self._nak_retries += 1
            self._failures += 1
            delay = self.destination.timing.backoff(self._failures, dispatcher.rng)
            settlement = evolve(settlement, next_attempt_at=settlement.next_attempt_at + delay)
            return settlement, delay
        return settlement, 0.0

    async def _record(self, settlement: Settlement) -> bool:
        """Commit the head's outcome, however long the store refuses it; False: stopped.

        While the outcome cannot be recorded (disk full, I/O errors) the lane
        sends nothing: the outcome is kept here and committed again after
        ``RECORD_RETRY_INITIAL`` seconds, doubling up to ``RECORD_RETRY_MAX``,
        so the destination never gets the head again in this run.
        """
        failures = 0
        while not self._stopped:
            try:
                await self._dispatcher.record(settlement)
                return True
            except Exception as error:
                if self._stopped:
                    break
                failures += 1
                delay = min(RECORD_RETRY_INITIAL * 2 ** min(failures - 1, 60), RECORD_RETRY_MAX)
                log.warn(
                    "delivery {delivery} (control ID {control_id}) of lane {lane}: outcome not"
                    " recorded ({error}); lane paused, retry in {delay:g}s",
                    error=type(error).__name__,
                    delay=delay,
                    lane=self.name,
                    delivery=settlement.delivery_id,
                    control_id=settlement.control_id,
                )
                self.state = "recording"
                await self._sleep(delay)
        return False

    async def _reload_from(self, head_id: int) -> None:
        self._page.clear()
        self._complete = False
        self._loaded_up_to = head_id - 1
        self._failures = 0

    async def _sleep(self, seconds: float) -> None:
        """Wait on the injected clock; ``wake`` or ``stop`` cut the wait short."""
        call: IDelayedCall | None = None

        def cancel(_: Deferred[None]) -> None:
            if call is not None and call.active():
                call.cancel()

        sleeping: Deferred[None] = Deferred(cancel)
        call = self._dispatcher.clock.callLater(seconds, sleeping.callback, None)
        self._sleeping = sleeping
        try:
            await sleeping
        except CancelledError:
            pass
        finally:
            if self._sleeping is sleeping:
                self._sleeping = None


@frozen
class _Recorded:
    """One committed outcome; the first of its group carries what the commit unlocked."""

    settlement: Settlement
    group: Any = None


@define(eq=False)
class Dispatcher(Service):
    """Runs the lanes: recovery first, then a bounded number of lanes at once."""

    database: Database
    clock: IReactorTime
    reactor: Any
    #: Runs in the same transaction as every recorded outcome (executions advance there).
    after_record: Callable[[Connection, list[Settlement], Mapping[int, Origin]], Any] | None = None
    #: Called in the reactor with what ``after_record`` returned, after the commit.
    on_recorded: Callable[[Any], None] | None = None
    #: Called when a destination answered an attempt, before the outcome is
    #: recorded (fault injection in tests: tap.py's crash points).
    after_send: Callable[[], None] | None = None
    timing: Callable[[str], Timing] = field(default=lambda _endpoint: Timing())
    page_size: int = 64
    max_active_lanes: int = 512
    max_waiting_lanes: int = 10_000
    held_poll: float = 5.0
    max_queued_per_destination: int = 100_000
    rng: random.Random = field(factory=random.Random)
    #: Wall clock for what is stored (next_attempt_at, updated_at, log times); None:
    #: ``clock``'s. Waits are measured on ``clock`` (monotonic in the service).
    wall: Wall | None = None
    #: Turns an endpoint string into an endpoint; tests inject in-memory destinations.
    endpoint_factory: Callable[[Any, str], IStreamClientEndpoint] = clientFromString
    destinations: dict[str, Destination] = field(factory=dict)
    lanes: dict[str, Lane] = field(factory=dict)
    queued: dict[str, int] = field(factory=dict)
    _waiting: OrderedDict[str, tuple[str, str]] = field(factory=OrderedDict)
    _rescan: bool = True
    _filling: bool = False
    _started: bool = False
    _committer: GroupCommitter[Settlement, _Recorded] = field(init=False)
    _sweeper: LoopingCall | None = None
    _restarts: dict[str, tuple[str, str]] = field(factory=dict)
    _restart_call: IDelayedCall | None = None
    #: Paused destinations (by address, host:port) and who paused them, as stored.
    paused: dict[str, str] = field(factory=dict)
    #: Deliveries delivered since start, by destination address (host:port).
    sent: dict[str, int] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self._committer = GroupCommitter(self.database, self._record_batch, 256)

    def paused_by(self, endpoint: str) -> str | None:
        """Who paused the destination of ``endpoint``; None when it is not paused."""
        if not self.paused:
            return None
        return self.paused.get(destinations.address_of(endpoint))

    def set_pauses(self, found: Mapping[str, str]) -> None:
        """The paused destinations as the store has them now (address -> who): lanes
        of a destination resumed are woken."""
        resumed = set(self.paused) - set(found)
        self.paused = dict(found)
        if resumed:
            for lane in list(self.lanes.values()):
                if destinations.address_of(lane.destination.endpoint) in resumed:
                    lane.rewind()

    async def _load_pauses(self) -> None:
        found = await self.database.transaction(destinations.pauses)
        self.set_pauses({address: pause.paused_by for address, pause in found.items()})

    def now(self) -> float:
        """The wall-clock time, for what is stored or logged."""
        return wall_of(self.clock, self.wall)()

    # -- lifecycle

    async def recover(self) -> None:
        """Load the backpressure counters and the lanes with work, before anything is sent."""
        self.queued = await self.database.transaction(outbox.queued_per_destination)
        await self._load_pauses()
        self._rescan = True
        self._started = True
        log.info(
            "delivery recovery: {count} open deliveries",
            count=sum(self.queued.values()),
        )
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.clock
        self._sweeper.start(self.held_poll, now=False).addErrback(
            lambda failure: log.failure("delivery sweep stopped", failure)
        )
        await self._fill()

    async def _sweep(self) -> None:
        """Every held_poll: pick up what changed in the store behind our back.

        An operator's replay from the CLI, or work another process enqueued,
        is found by a rescan; the backpressure counters are recounted so they
        never drift (a skip from the CLI, say).
        """
        try:
            self.queued = await self.database.transaction(outbox.queued_per_destination)
            await self._load_pauses()  # paused or resumed from the command line
            # A scan even when every lane slot is taken: running lanes learn of
            # operators' actions behind them (a replay, a skipped head).
            await self._scan()
            await self._fill()
        except Exception:
            log.failure("delivery sweep failed; it runs again")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._started = False
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        self._restarts.clear()
        lanes = list(self.lanes.values())
        for lane in lanes:
            lane.stop()
        for destination in self.destinations.values():
            await destination.stop()
        for lane in lanes:
            if lane.running is not None and not lane.running.called:
                lane.running.cancel()
        self.lanes.clear()

    # -- work arriving

    def is_full(self, destination: str) -> bool:
        """Backpressure: the destination's queue is at its cap."""
        return self.queued.get(destination, 0) >= self.max_queued_per_destination

    def enqueued(self, lane: str, destination: str, protocol: str, count: int = 1) -> None:
        """Deliveries were committed to ``lane``: make sure it runs."""
        self.queued[destination] = self.queued.get(destination, 0) + count
        if not self._started:
            return
        running = self.lanes.get(lane)
        if running is not None:
            running.wake()
            return
        if len(self._waiting) < self.max_waiting_lanes:
            self._waiting[lane] = (destination, protocol)
        else:
            self._rescan = True
        self._fill_soon()

    def operator_acted(self, lane: str) -> None:
        """An operator released, skipped or replayed a delivery of this lane."""
        running = self.lanes.get(lane)
        if running is not None:
            running.rewind()
        else:
            self._rescan = True
            self._fill_soon()

    # -- running lanes

    def _fill_soon(self) -> None:
        """Start waiting lanes now; a failure is logged, and the next sweep tries again."""
        Deferred.fromCoroutine(self._fill()).addErrback(
            lambda failure: log.failure("starting lanes failed; the next sweep retries", failure)
        )

    async def _fill(self) -> None:
        if self._filling or not self._started:
            return
        self._filling = True
        try:
            while len(self.lanes) < self.max_active_lanes:
                if not self._waiting:
                    if not self._rescan:
                        break
                    await self._scan()
                    if not self._waiting:
                        break
                lane, (destination, protocol) = self._waiting.popitem(last=False)
                if lane not in self.lanes:
                    try:
                        self._start_lane(lane, destination, protocol)
                    except Exception:
                        log.failure(
                            "lane {lane} could not start; retried in {delay:g}s",
                            lane=lane,
                            delay=self.held_poll,
                        )
                        self._restart_later(lane, destination, protocol)
                        break
        finally:
            self._filling = False

    def _restart_later(self, lane: str, destination: str, protocol: str) -> None:
        """Start ``lane`` again after held_poll seconds (never forgotten, never a tight loop)."""
        self._restarts[lane] = (destination, protocol)
        if self._restart_call is None or not self._restart_call.active():
            self._restart_call = self.clock.callLater(self.held_poll, self._restart)

    def _restart(self) -> None:
        self._restart_call = None
        restarts, self._restarts = self._restarts, {}
        for lane, target in restarts.items():
            if lane not in self.lanes and lane not in self._waiting:
                self._waiting[lane] = target
        self._fill_soon()

    async def _scan(self) -> None:
        self._rescan = False
        found = await self.database.transaction(outbox.lanes_with_work)
        room = self.max_waiting_lanes - len(self._waiting)
        for work in found:
            running = self.lanes.get(work.lane)
            if running is not None:
                running.saw_first_open(work.first_id)
                continue
            if work.lane in self._waiting:
                continue
            if room <= 0:
                self._rescan = True
                break
            self._waiting[work.lane] = (work.destination, work.protocol)
            room -= 1
        # A retrying head released or replayed in the store (its attempts reset) is
        # read again by its lane now, not after its backoff.
        heads = {
            lane.name: head
            for lane in self.lanes.values()
            if (head := lane.retrying_head()) is not None
        }
        if heads:
            stored = await self.database.transaction(
                outbox.attempts_of, [head.id for head in heads.values()]
            )
            for name, head in heads.items():
                if stored.get(head.id, head.attempts) < head.attempts and name in self.lanes:
                    self.lanes[name].rewind()

    def timing_for(self, endpoint: str, policy: Mapping[str, Any]) -> Timing:
        """The timing of a delivery: its action's values, stored in its policy."""
        base = self.timing(endpoint)
        values = {key: float(policy[key]) for key in TIMING_KEYS if key in policy}
        return evolve(base, **values) if values else base  # type: ignore[arg-type]

    def destination(
        self, endpoint: str, protocol: str, timing: Timing | None = None
    ) -> Destination:
        """The Destination for an endpoint, framing and timing, started on first use.

        Actions with the same endpoint but other timeouts get connections of
        their own, so each action's timeouts and backoff apply as configured.
        """
        timing = timing if timing is not None else self.timing(endpoint)
        key = f"{protocol} {endpoint}"
        if timing != self.timing(endpoint):
            key += f" {timing}"
        destination = self.destinations.get(key)
        if destination is None:
            destination = Destination(
                endpoint,
                protocol,
                self.clock,
                timing,
                endpoint_factory=self.endpoint_factory,
                rng=self.rng,
                on_up=self._destination_up,
            )
            destination.start(self.reactor)
            self.destinations[key] = destination
        return destination

    def _destination_up(self, destination: Destination) -> None:
        for lane in list(self.lanes.values()):
            if lane.destination is destination:
                lane.destination_up()

    def _start_lane(self, name: str, endpoint: str, protocol: str) -> None:
        lane = Lane(name, self, self.destination(endpoint, protocol))
        self.lanes[name] = lane
        lane.running = Deferred.fromCoroutine(lane.run())
        lane.running.addErrback(self._lane_failed, lane)
        lane.running.addBoth(self._lane_done, lane)

    def _lane_failed(self, failure: Failure, lane: Lane) -> None:
        if not failure.check(CancelledError):
            # Not restarted at once: an error that repeats would re-send the head
            # in a tight loop. Restarted after held_poll seconds.
            log.failure(
                "lane {lane} stopped on an error; restarted in {delay:g}s",
                failure,
                lane=lane.name,
                delay=self.held_poll,
            )
            if self._started and not lane._stopped:
                target = lane.destination
                self._restart_later(lane.name, target.endpoint, target.protocol)

    def _lane_done(self, _result: Any, lane: Lane) -> None:
        if self.lanes.get(lane.name) is lane:
            del self.lanes[lane.name]
        if self._started:
            self._fill_soon()

    # -- recording outcomes

    def record(self, settlement: Settlement) -> Deferred[Settlement]:
        """Commit an attempt's outcome (grouped with others); fire with it once committed.

        What the group's commit unlocked (``after_record``) goes to
        ``on_recorded`` once per group, whatever became of the lanes waiting.
        """
        own: Deferred[Settlement] = Deferred()
        # A lane cancelled while waiting cancels only its own Deferred, not the commit.
        self._committer.submit(settlement).addCallback(self._recorded).chainDeferred(own)
        return own

    def _recorded(self, recorded: _Recorded) -> Settlement:
        if recorded.group is not None and self.on_recorded is not None:
            try:
                self.on_recorded(recorded.group)
            except Exception:
                # The outcome is committed: the lane must not commit it again.
                log.failure("handling a recorded group of outcomes failed")
        return recorded.settlement

    def _record_batch(
        self, connection: Connection, settlements: list[Settlement]
    ) -> list[_Recorded]:
        group = outbox.record(connection, settlements, self.now(), self.after_record)
        return [
            _Recorded(settlement, group if index == 0 else None)
            for index, settlement in enumerate(settlements)
        ]

    def delivered(self, destination: str) -> None:
        """One delivery left the destination's queue (backpressure counter)."""
        address = destinations.address_of(destination)
        self.sent[address] = self.sent.get(address, 0) + 1
        self.queued[destination] = max(0, self.queued.get(destination, 0) - 1)
