"""A lane: the unit of ordering, and the narrow context it runs in.

A **lane** sends its deliveries strictly in order, one at a time (G2); a held
head blocks the lane until an operator releases, skips or replays it. Lanes
page through the store, so memory stays bounded however long the backlog is.
A lane whose outcome cannot be committed sends nothing until it is.

A lane sees the engine that runs it only through a ``LaneContext``: the
clocks, its paging, where its head goes (a ``Destination``, which carries the
head's timing), and where its outcomes go.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from attrs import define, evolve, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from udsgateway.interfaces import FencedError
from udsgateway.outbound.destination import Destination
from udsgateway.outbound.errors import (
    ConnectError,
    DeliveryError,
    StaleConnectionError,
    ack_outcome,
)
from udsgateway.outbound.policy import Timing, judge
from udsgateway.store.records import DELIVERED, HELD, QUEUED, Delivery, Settlement

log = Logger()

#: While a delivery's outcome cannot be committed, its lane retries the commit
#: after this many seconds, doubling up to the maximum (and sends nothing).
RECORD_RETRY_INITIAL = 1.0
RECORD_RETRY_MAX = 30.0


@frozen
class LaneContext:
    """What a lane needs from the engine that runs it, and nothing more."""

    #: The timer clock: waits and retry times (monotonic in the service).
    clock: IReactorTime
    #: The wall-clock time, for what is stored or logged.
    now: Callable[[], float]
    #: ``read_page(lane, after_id, limit)``: the lane's next open deliveries, oldest first.
    read_page: Callable[[str, int, int], Deferred[list[Delivery]]]
    page_size: int
    #: Seconds between two looks at a held head.
    held_poll: float
    #: The Destination a delivery goes to, with its timing: the one road timing
    #: reaches a lane by.
    destination_for: Callable[[Delivery], Destination]
    #: Commit an attempt's outcome; fires with this lane's own outcome once committed.
    record: Callable[[Settlement], Deferred[Settlement]]
    #: A destination answered an attempt, before its outcome is recorded.
    answered: Callable[[], None]
    #: One delivery to this endpoint left its queue (the backpressure counter), after
    #: this many seconds since it was queued (the delivery latency).
    delivered: Callable[[str, float], None]
    #: Who paused the destination of an endpoint (None: not paused): nothing is sent.
    paused_by: Callable[[str], str | None] = lambda _endpoint: None
    #: An attempt to this endpoint was recorded: ``attempted(endpoint, settlement,
    #: outcome)``, the outcome one of ``errors.ATTEMPT_OUTCOMES`` (status, metrics).
    attempted: Callable[[str, Settlement, str], None] = lambda _endpoint, _settlement, _o: None
    #: ``may_send(lane, delivery_id)``, before each frame: False when this node no
    #: longer holds the lane (several nodes on one database, ``ILaneFence``).
    may_send: Callable[[str, int], bool] = lambda _lane, _delivery_id: True


@define(eq=False)
class Lane:
    """One ordering lane: sends its deliveries strictly in order, one at a time."""

    name: str
    _context: LaneContext
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

    @property
    def stopped(self) -> bool:
        """``stop`` was called: the lane sends nothing more."""
        return self._stopped

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
            self._retry = (self._retry[0], self._context.clock.seconds())
            if self._sleeping is not None:
                sleeping, self._sleeping = self._sleeping, None
                sleeping.cancel()

    def stop(self) -> None:
        self._stopped = True
        if self._sleeping is not None:
            sleeping, self._sleeping = self._sleeping, None
            sleeping.cancel()

    async def run(self) -> None:
        context = self._context
        while not self._stopped:
            if self._rewind:
                self._rewind = False
                self._reload_from(1)
                self._retry = None
            if not self._page:
                if self._complete and not self._dirty:
                    # The last page held every open delivery and nothing was
                    # enqueued since: no need to ask the store again.
                    self.state = "idle"
                    return
                self._dirty = False
                page = await context.read_page(self.name, self._loaded_up_to, context.page_size)
                self._page.extend(page)
                self._complete = len(page) < context.page_size
                if not self._page:
                    if self._dirty:
                        continue
                    self.state = "idle"
                    return
                self._loaded_up_to = self._page[-1].id
            head = self._page[0]
            if head.state == HELD:
                self.state = "held"
                await self._sleep(context.held_poll)
                self._reload_from(head.id)
                continue
            if context.paused_by(head.destination) is not None:
                # Paused by an operator: it keeps queueing, nothing is sent.
                self.state = "paused"
                await self._sleep(context.held_poll)
                continue
            # Where the head goes, with its action's timeouts and backoff.
            self.destination = context.destination_for(head)
            wait = self._wait(head, self.destination.timing)
            if wait > 0:
                self.state = "backoff"
                await self._sleep(wait)
                continue
            if not context.may_send(self.name, head.id):
                # The lane's bucket is no longer this node's: not one more frame.
                self.state = "fenced"
                self.stop()
                return
            self.state = "sending"
            # The attempt and the commit of its outcome are awaited here, not in
            # helpers of their own: each coroutine between this loop and the reply
            # is one more frame to resume per delivery.
            destination = self.destination
            try:
                judged = await destination.exchange(head.payload, self._judge(head))
            except DeliveryError as failure:
                settlement, delay, outcome = self._failed(head, destination, failure)
            else:
                settlement, delay, outcome = self._judged(head, destination, judged)
            if self._stopped:
                return
            self._retry = (head.id, context.clock.seconds() + delay) if delay else None
            if settlement.response is not None:
                context.answered()
            try:
                await context.record(settlement)
            except Exception as error:
                if not await self._record_again(settlement, error):
                    return
            context.attempted(head.destination, settlement, outcome)
            if settlement.state == DELIVERED:
                context.delivered(head.destination, context.now() - head.created_at)
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

    def _wait(self, head: Delivery, timing: Timing) -> float:
        """Seconds until the head may be sent again.

        Measured on the timer clock when this lane set the backoff; a
        next_attempt_at read from the store (after a restart) is wall-clock
        time and is trusted for at most the longest backoff, so a wall clock
        set back cannot hold a lane for longer than that.
        """
        clock = self._context.clock
        if self._retry is not None and self._retry[0] == head.id:
            return self._retry[1] - clock.seconds()
        if head.next_attempt_at <= 0:
            return 0.0
        wait = head.next_attempt_at - self._context.now()
        if wait <= 0:
            return wait
        wait = min(wait, timing.backoff_max)
        self._retry = (head.id, clock.seconds() + wait)
        return wait

    def _judge(self, head: Delivery) -> Callable[[bytes], Settlement]:
        """What the head's reply means (``policy.judge``), judged when it arrives."""
        context = self._context
        return lambda reply: judge(head, reply, context.now(), self._nak_retries)

    def _failed(
        self, head: Delivery, destination: Destination, failure: DeliveryError
    ) -> tuple[Settlement, float, str]:
        """An attempt at the head got no usable answer: its new state, the seconds to
        wait before the next try, and the attempt's outcome (``errors.ATTEMPT_OUTCOMES``)."""
        reason = str(failure)
        self._waiting_for_connect = isinstance(failure, ConnectError)
        if isinstance(failure, StaleConnectionError):
            # Closed after the previous ACK: no failure; again at once, newly connected.
            delay = 0.0
        elif self._waiting_for_connect:
            # One reconnect backoff per destination, shared by its lanes.
            delay = destination.reconnect_in()
        else:
            self._failures += 1
            delay = destination.timing.backoff(self._failures, destination.rng)
        destination.last_error = reason
        log.info(
            "delivery attempt failed: {reason}"
            " (lane {lane}, delivery {delivery}, control ID {control_id})",
            reason=reason,
            lane=self.name,
            delivery=head.id,
            control_id=head.control_id,
        )
        settlement = Settlement(
            head.id,
            QUEUED,
            head.attempts + 1,
            self._context.now() + delay,
            reason,
            execution_id=head.execution_id,
            step=head.step,
            control_id=head.control_id,
        )
        return settlement, delay, failure.outcome

    def _judged(
        self, head: Delivery, destination: Destination, judged: Settlement
    ) -> tuple[Settlement, float, str]:
        """The head was answered and ``judge`` made ``judged`` of the reply: the outcome
        to record, the seconds to wait before the next try, and the attempt's outcome.

        The outcome to record is ``judged`` with the head's own IDs (and, for a
        negative ACK the policy retries, the backoff added to its next attempt),
        made in one construction rather than ``evolve``d: this runs once per
        delivery, and ``evolve`` costs several times a plain construction.
        """
        outcome = ack_outcome(judged.response_code)
        delay = 0.0
        if judged.state == QUEUED:
            # A negative ACK the policy retries: back off like any failure.
            self._nak_retries += 1
            self._failures += 1
            delay = destination.timing.backoff(self._failures, destination.rng)
        settlement = Settlement(
            judged.delivery_id,
            judged.state,
            judged.attempts,
            judged.next_attempt_at + delay,
            judged.last_error,
            judged.response,
            judged.response_code,
            execution_id=head.execution_id,
            step=head.step,
            control_id=head.control_id,
        )
        return settlement, delay, outcome

    async def _record_again(self, settlement: Settlement, error: Exception) -> bool:
        """The head's outcome was not committed (``error``): commit it again, however
        long the store refuses it; False: stopped.

        While the outcome cannot be recorded (disk full, I/O errors) the lane
        sends nothing: the outcome is kept here and committed again after
        ``RECORD_RETRY_INITIAL`` seconds, doubling up to ``RECORD_RETRY_MAX``,
        so the destination never gets the head again in this run.
        """
        failures = 0
        while True:
            if isinstance(error, FencedError):
                # Another node holds the lane now: it sends the head again (at least once).
                self.state = "fenced"
                self.stop()
                return False
            if self._stopped:
                return False
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
            if self._stopped:
                return False
            try:
                await self._context.record(settlement)
                return True
            except Exception as again:
                error = again

    def _reload_from(self, head_id: int) -> None:
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
        call = self._context.clock.callLater(seconds, sleeping.callback, None)
        self._sleeping = sleeping
        try:
            await sleeping
        except CancelledError:
            pass
        finally:
            if self._sleeping is sleeping:
                self._sleeping = None
