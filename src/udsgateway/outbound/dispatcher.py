"""The dispatcher: recovery, the lanes running at once, and the recording of outcomes.

The **dispatcher** recovers lanes from the store at start (before anything is
sent), runs a bounded number of them at once, and records every outcome
through a group committer, together with whatever the outcome unlocks (the
next action of an execution, ``IDeliveryOutcomes``) in the same transaction.
It is the ``IDeliveryQueue`` the executor hands committed deliveries to.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import define, field, frozen
from sqlalchemy import Connection
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from udsgateway.clock import Wall, wall_of
from udsgateway.interfaces import FencedError, IDeliveryOutcomes, IDeliveryQueue, ILaneFence
from udsgateway.outbound.destination import Destination
from udsgateway.outbound.lanes import Lane, LaneContext
from udsgateway.outbound.policy import Timing
from udsgateway.store import destinations, outbox
from udsgateway.store.engine import (
    DELIVERY_BUCKETS,
    Database,
    Durations,
    GroupCommitter,
    SharedCommits,
)
from udsgateway.store.records import Delivery, Settlement

log = Logger()


@define(eq=False)
class _Unlocked:
    """What one group's commit unlocked (``IDeliveryOutcomes.after_record``'s value),
    shared by every outcome of the group and handed to ``on_recorded`` once."""

    value: object
    handed: bool = False


@frozen
class _Recorded:
    """One committed outcome: its lane's own settlement, and what its group unlocked."""

    settlement: Settlement
    unlocked: _Unlocked
    #: Not recorded: the lane's token failed the fencing check in the transaction.
    fenced: bool = False


@implementer(IDeliveryQueue)
@define(eq=False)
class Dispatcher(Service):
    """Runs the lanes: recovery first, then a bounded number of lanes at once."""

    database: Database
    clock: IReactorTime
    reactor: Any
    #: Told of every recorded group of outcomes: ``after_record`` in the database
    #: thread, in the transaction that records them (executions advance there);
    #: ``on_recorded`` in the reactor, after the commit, with what it returned.
    outcomes: IDeliveryOutcomes | None = None
    #: Called when a destination answered an attempt, before the outcome is
    #: recorded (fault injection in tests: tap.py's crash points).
    after_send: Callable[[], None] | None = None
    #: The timing of an endpoint's deliveries that carry none in their policy.
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
    #: Several nodes on one database: which lanes are this node's (None: all, always).
    #: A lane starts only with a token, checks it before each frame, and its outcomes
    #: are recorded only if the token passes ``check`` in the recording transaction.
    fence: ILaneFence | None = None
    destinations: dict[str, Destination] = field(factory=dict)
    lanes: dict[str, Lane] = field(factory=dict)
    queued: dict[str, int] = field(factory=dict)
    _waiting: OrderedDict[str, tuple[str, str]] = field(factory=OrderedDict)
    _rescan: bool = True
    _filling: bool = False
    _started: bool = False
    _committer: GroupCommitter[Settlement, _Recorded] = field(init=False)
    _lane_context: LaneContext = field(init=False)
    _sweeper: LoopingCall | None = None
    _restarts: dict[str, tuple[str, str]] = field(factory=dict)
    _restart_call: IDelayedCall | None = None
    #: Paused destinations (by address, host:port) and who paused them, as stored.
    paused: dict[str, str] = field(factory=dict)
    #: Deliveries delivered since start, by destination address (host:port).
    sent: dict[str, int] = field(factory=dict)
    #: Seconds from a delivery's enqueue to its partner's positive answer.
    delivery_latency: Durations = field(factory=lambda: Durations(DELIVERY_BUCKETS))
    #: Attempts recorded since start, by destination address and outcome
    #: (``errors.ATTEMPT_OUTCOMES``).
    attempts: dict[str, dict[str, int]] = field(factory=dict)
    #: The fencing token of each running lane, and of each delivery being sent.
    _lane_tokens: dict[str, object] = field(factory=dict)
    _sending: dict[int, object] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self._committer = GroupCommitter(self.database, self._record_batch, 256)
        self._lane_context = LaneContext(
            clock=self.clock,
            now=self.now,
            read_page=self._read_page,
            page_size=self.page_size,
            held_poll=self.held_poll,
            destination_for=self.destination_for,
            record=self.record,
            answered=self._answered,
            delivered=self.delivered,
            paused_by=self.paused_by,
            attempted=self.attempted,
            may_send=self._may_send,
        )

    def attempted(self, endpoint: str, settlement: Settlement, outcome: str) -> None:
        """Count a recorded attempt by destination address and outcome (one of
        ``errors.ATTEMPT_OUTCOMES``: accepted, error, rejected, timeout, connect_failed...)."""
        counts = self.attempts.setdefault(destinations.address_of(endpoint), {})
        counts[outcome] = counts.get(outcome, 0) + 1

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
            if not self._started:
                return  # stopped meanwhile: the database thread may be gone already
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

    def work_announced(
        self, lanes: Sequence[tuple[str, str, str]], everything: bool = False
    ) -> None:
        """A node (this one or another) committed deliveries to ``lanes`` (lane,
        destination, protocol): run those that are this node's now, without waiting
        for the sweep. ``everything``: too many to name, look at the store."""
        if not self._started:
            return
        if everything:
            self._rescan = True
            self._fill_soon()
            return
        wanted = False
        for lane, destination, protocol in lanes:
            running = self.lanes.get(lane)
            if running is not None:
                running.wake()
                continue
            if self.fence is not None and self.fence.token(lane) is None:
                continue  # another node's lane
            if lane in self._waiting:
                continue
            if len(self._waiting) < self.max_waiting_lanes:
                self._waiting[lane] = (destination, protocol)
            else:
                self._rescan = True
            wanted = True
        if wanted:
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
                if self.fence is not None and lane not in self.lanes:
                    token = self.fence.token(lane)
                    if token is None:
                        continue  # another node's lane now; found again if it comes back
                    self._lane_tokens[lane] = token
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
        return self.timing(endpoint).with_policy(policy)

    def destination_for(self, delivery: Delivery) -> Destination:
        """The Destination a delivery goes to, with its action's timing."""
        return self.destination(
            delivery.destination,
            delivery.protocol,
            self.timing_for(delivery.destination, delivery.policy),
        )

    def destination(
        self, endpoint: str, protocol: str, timing: Timing | None = None
    ) -> Destination:
        """The Destination for an endpoint, framing and timing, started on first use.

        Actions with the same endpoint but other timeouts get connections of
        their own, so each action's timeouts and backoff apply as configured.
        """
        default = self.timing(endpoint)
        timing = timing if timing is not None else default
        key = f"{protocol} {endpoint}"
        if timing is not default and timing != default:
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

    def _read_page(self, lane: str, after: int, limit: int) -> Deferred[list[Delivery]]:
        return self.database.transaction(outbox.lane_page, lane, after, limit)

    def _answered(self) -> None:
        if self.after_send is not None:
            self.after_send()

    def _start_lane(self, name: str, endpoint: str, protocol: str) -> None:
        lane = Lane(name, self._lane_context, self.destination(endpoint, protocol))
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
            if self._started and not lane.stopped:
                target = lane.destination
                self._restart_later(lane.name, target.endpoint, target.protocol)

    def _lane_done(self, _result: Any, lane: Lane) -> None:
        if self.lanes.get(lane.name) is lane:
            del self.lanes[lane.name]
            self._lane_tokens.pop(lane.name, None)
        if self._started:
            self._fill_soon()

    # -- recording outcomes

    def join_commits(self, shared: SharedCommits) -> None:
        """Record outcomes in ``shared``'s transactions, with the inbound groups."""
        shared.join(self._committer)

    def record(self, settlement: Settlement) -> Deferred[Settlement]:
        """Commit an attempt's outcome (grouped with others); fire with it once committed.

        Every outcome of a group comes back to its own lane. What the group's
        commit unlocked (``outcomes.after_record``) goes to ``outcomes.on_recorded``
        once per group, whichever of its lanes are still waiting.
        """
        own: Deferred[Settlement] = Deferred()
        # A lane cancelled while waiting cancels only its own Deferred, not the commit.
        # One pair of callbacks fires it (not a callback and a chained Deferred's pair).
        self._committer.submit(settlement).addCallbacks(
            self._recorded, own.errback, callbackArgs=(own,)
        )
        return own

    def _recorded(self, recorded: _Recorded, own: Deferred[Settlement]) -> None:
        self._sending.pop(recorded.settlement.delivery_id, None)
        if recorded.fenced:
            own.errback(FencedError(f"delivery {recorded.settlement.delivery_id}: lane fenced"))
            return
        unlocked = recorded.unlocked
        if not unlocked.handed and self.outcomes is not None:
            unlocked.handed = True
            try:
                self.outcomes.on_recorded(unlocked.value)
            except Exception:
                # The outcome is committed: the lane must not commit it again.
                log.failure("handling a recorded group of outcomes failed")
        own.callback(recorded.settlement)

    def _record_batch(
        self, connection: Connection, settlements: list[Settlement]
    ) -> list[_Recorded]:
        fenced = self._fenced(connection, settlements)
        kept = [s for s in settlements if s.delivery_id not in fenced]
        if not kept:
            nothing = _Unlocked(None, handed=True)
            return [_Recorded(settlement, nothing, fenced=True) for settlement in settlements]
        outcomes = self.outcomes
        after = outcomes.after_record if outcomes is not None else None
        unlocked = _Unlocked(outbox.record(connection, kept, self.now(), after))
        return [
            _Recorded(settlement, unlocked, fenced=settlement.delivery_id in fenced)
            for settlement in settlements
        ]

    def _fenced(self, connection: Connection, settlements: list[Settlement]) -> set[int]:
        """The deliveries whose lane's token fails the check in this transaction."""
        if self.fence is None:
            return set()
        passed: dict[object, bool] = {}
        fenced = set()
        for settlement in settlements:
            token = self._sending.get(settlement.delivery_id)
            if token is None:
                fenced.add(settlement.delivery_id)  # sent without a token: cannot vouch
                continue
            if token not in passed:
                try:
                    self.fence.check(connection, token)
                    passed[token] = True
                except FencedError:
                    passed[token] = False
            if not passed[token]:
                fenced.add(settlement.delivery_id)
        return fenced

    # -- fencing (several nodes on one database)

    def _may_send(self, lane: str, delivery_id: int) -> bool:
        """Before each frame: the lane's token is still good on the monotonic clock."""
        if self.fence is None:
            return True
        token = self._lane_tokens.get(lane)
        if token is None or not self.fence.may_send(token):
            return False
        self._sending[delivery_id] = token
        return True

    def fence_changed(self) -> None:
        """The node gained or lost buckets: stop the lanes it may no longer send for
        (closing the connection of one caught mid-exchange), and look for the lanes
        it may now run."""
        if self.fence is None:
            return
        for lane in list(self.lanes.values()):
            if not self.fence.may_send(self._lane_tokens.get(lane.name)):
                if lane.state == "sending":
                    lane.destination.drop()
                lane.stop()
        self._rescan = True
        self._fill_soon()

    def delivered(self, destination: str, seconds: float = 0.0) -> None:
        """One delivery left the destination's queue (backpressure counter), ``seconds``
        after it was queued (the delivery latency, on the wall clock)."""
        self.delivery_latency.observe(max(0.0, seconds))
        address = destinations.address_of(destination)
        self.sent[address] = self.sent.get(address, 0) + 1
        self.queued[destination] = max(0, self.queued.get(destination, 0) - 1)
