"""LeaseManager: a node's share of the buckets, renewed, handed over, and fenced in time.

Every ``lease_time / 3`` seconds (and at once when another node announces a
join or a hand-over) the manager runs one round in one database transaction
(``store.leases.heartbeat_round``): it heartbeats, renews the leases it holds,
gives up buckets above its share and takes free or expired ones up to it. The
expiry is on the database clock; what this node believes is on its own
**monotonic** clock (the reactor's, see ``udsgateway.clock``): a lease renewed
by a round that started at local time ``t0`` expires on the database no
earlier than ``t0 + lease_time``, because the database read its clock after
the round was issued. So the node may use the lease until
``t0 + lease_time - margin`` and no longer: ``may_send`` says so before each
frame, and when that moment passes without a successful renewal the manager
drops the buckets and calls ``on_lost`` (stop sending, close the partner
connections) before any other node can take them over.

The share: with ``n`` live nodes and ``b`` buckets, each node wants
``b // n`` buckets, the first ``b % n`` of them by name one more. A node gives
buckets up only when it holds more than its share plus ``hysteresis``, or when
another live node holds more than ``hysteresis`` below its share (a node that
joined), so that buckets do not move back and forth for a one-bucket
imbalance, and a new node still gets its share.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from udsgateway.store import leases as store
from udsgateway.store.engine import Database
from udsgateway.store.leases import NodeNameInUseError, Round

log = Logger()

#: Seconds a lease lasts on the database clock ([cluster].lease_time).
DEFAULT_LEASE_TIME = 15.0


def even_share(hysteresis: int = 1) -> store.SharePolicy:
    """The share policy: (buckets wanted, most kept) for a node among ``live`` nodes.

    A node keeps up to ``hysteresis`` buckets above its share, unless some live
    node holds more than ``hysteresis`` below its own: then it gives up
    everything above its share, so that a node that joins gets buckets.
    """

    def share(live: Sequence[str], me: str, total: int, counts: dict[str, int]) -> tuple[int, int]:
        members = sorted(set(live) | {me})
        base, extra = divmod(total, len(members))
        wanted = {name: base + (1 if index < extra else 0) for index, name in enumerate(members)}
        starved = any(counts.get(name, 0) < wanted[name] - hysteresis for name in members)
        return wanted[me], wanted[me] + (0 if starved else hysteresis)

    return share


@frozen
class Held:
    """A lease as this node sees it: its epoch, and until when (monotonic) it may use it."""

    epoch: int
    safe_until: float


class LeaseManager(Service):
    """One node's leases; start it after the database is ready, stop it before it closes."""

    def __init__(
        self,
        database: Database,
        clock: IReactorTime,
        node: str,
        lease_time: float = DEFAULT_LEASE_TIME,
        hysteresis: int = 1,
        margin: float | None = None,
        instance: str | None = None,
    ) -> None:
        self.database = database
        self.clock = clock
        self.node = node
        self.lease_time = lease_time
        #: How long before the earliest possible expiry the node stops using a lease.
        self.margin = lease_time / 6 if margin is None else margin
        self.instance = instance or uuid.uuid4().hex
        self.share = even_share(hysteresis)
        #: Buckets held now: bucket -> Held.
        self.owned: dict[int, Held] = {}
        #: Called with {bucket: epoch} of buckets gained (taken, or back after a lapse).
        self.on_gained: Callable[[dict[int, int]], None] = lambda _gained: None
        #: Called with buckets this node must stop sending for (handed over, lost, lapsed).
        self.on_lost: Callable[[list[int]], None] = lambda _lost: None
        #: The buckets the database has (known after the first round).
        self.total = 0
        self.nodes: tuple[str, ...] = ()
        #: Counters for the metrics: lease transitions and renewal failures. ``lost_count``
        #: counts every bucket this node stopped using; of those, ``released_count`` it
        #: handed over (share, clean stop), ``lapsed_count`` it dropped on its own clock
        #: (no renewal in time); the rest were found taken or expired at a round.
        self.gained_count = 0
        self.lost_count = 0
        self.released_count = 0
        self.lapsed_count = 0
        self.failed_rounds = 0
        #: Monotonic time (``clock.seconds()``) at which the last successful round
        #: started, or None before the first one.
        self.last_round_at: float | None = None
        #: Why this node gave up (its name in use by a live process), or None.
        self.refused: str | None = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self._deadline: IDelayedCall | None = None
        self._ticking = False
        self._again = False
        self._soon: IDelayedCall | None = None
        #: A share above what this node may keep is given up in two rounds: the first
        #: keeps every lease but stops using the excess (``_withheld``, dropped at once:
        #: no frame leaves for them), the next releases them in the database. So no
        #: frame of this node follows a release that another node may act on at once.
        #: ``_withheld_from``: the share (``wanted``) the excess was counted from.
        self._withheld: set[int] = set()
        self._withheld_from: int | None = None
        self._excess_from: int | None = None
        #: Fires after the first round ended (taken part, refused or failed): a
        #: gateway starting in cluster mode waits for it.
        self.first_round: Deferred[None] = Deferred()

    @property
    def renew_interval(self) -> float:
        return self.lease_time / 3

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.renew_interval, now=True).addErrback(
            lambda failure: log.failure("lease loop stopped", failure)
        )

    def stopService(self) -> Deferred[None]:
        """Stop renewing, stop using every lease, hand them all over at once (NOTIFY)."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for call in (self._deadline, self._soon):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._soon = None
        self.released_count += len(self.owned)
        self._drop(list(self.owned))
        if self.refused is not None:
            # Never joined: the buckets under this name are the live process's.
            return succeed(None)
        done = self.database.transaction(store.leave, self.node, self.instance)

        def left(released: list[int]) -> None:
            log.info("left the cluster, {count} buckets handed over", count=len(released))

        def failed(failure: object) -> None:
            log.warn(
                "could not hand the buckets over ({error}); they move when their leases expire",
                error=getattr(failure, "value", failure),
            )

        return done.addCallbacks(left, failed)

    def may_send(self, bucket: int, epoch: int | None = None) -> bool:
        """The check before each frame: this node holds ``bucket`` (at ``epoch``) and its
        lease cannot have expired yet, on the monotonic clock."""
        held = self.owned.get(bucket)
        if held is None or (epoch is not None and held.epoch != epoch):
            return False
        return self.clock.seconds() < held.safe_until

    def epoch(self, bucket: int) -> int | None:
        held = self.owned.get(bucket)
        return None if held is None else held.epoch

    def poke(self, _payload: str = "") -> None:
        """Another node joined or handed buckets over: run a round soon (NOTIFY)."""
        if not self.running or (self._soon is not None and self._soon.active()):
            return
        self._soon = self.clock.callLater(0, self.tick)

    def tick(self) -> Deferred[Round | None]:
        """One round; a round asked for while one runs follows it at once."""
        return Deferred.fromCoroutine(self._tick())

    async def _tick(self) -> Round | None:
        if self.refused is not None:
            return None
        if self._ticking:
            self._again = True
            return None
        self._ticking = True
        try:
            result = await self._round()
            while self._again and self.running:
                self._again = False
                result = await self._round()
            return result
        finally:
            self._ticking = False

    async def _round(self) -> Round | None:
        try:
            return await self._one_round()
        finally:
            if not self.first_round.called:
                self.first_round.callback(None)

    async def _one_round(self) -> Round | None:
        started = self.clock.seconds()
        self._excess_from = None
        try:
            result: Round = await self.database.transaction(
                store.heartbeat_round,
                self.node,
                self.instance,
                self.lease_time,
                self._two_step_share(self._withheld_from if self._withheld else None),
            )
        except NodeNameInUseError as error:
            self.refused = str(error)
            log.critical("not joining the cluster: {error}", error=error)
            if self._loop.running:
                self._loop.stop()
            return None
        except Exception as error:
            self.failed_rounds += 1
            log.warn(
                "lease round failed ({error}); {count} buckets held until their "
                "leases could lapse",
                error=error,
                count=len(self.owned),
            )
            return None
        if not self.running:
            return result  # stopped while the round ran: stopService hands them over
        self.last_round_at = started
        safe_until = started + self.lease_time - self.margin
        # Above its share: stop using the excess now, release it at the next round.
        withhold: set[int] = set()
        if self._excess_from is not None:
            withhold = set(sorted(result.owned)[self._excess_from :])
        withheld_before = self._withheld
        self._withheld, self._withheld_from = withhold, self._excess_from
        lost = [
            bucket
            for bucket, held in self.owned.items()
            if result.owned.get(bucket) != held.epoch or bucket in withhold
        ]
        gained = {
            bucket: epoch
            for bucket, epoch in result.owned.items()
            if bucket not in withhold
            and (bucket not in self.owned or self.owned[bucket].epoch != epoch)
        }
        # Released now: withheld at the round before (already counted as lost), or lost now.
        self.released_count += len(set(result.released) & (set(lost) | withheld_before))
        self._drop(lost)
        self.owned = {
            bucket: Held(epoch, safe_until)
            for bucket, epoch in result.owned.items()
            if bucket not in withhold
        }
        if withhold:
            self._again = True  # release them at once, now that nothing is sent for them
        self.total, self.nodes = result.total, result.nodes
        self._arm(safe_until)
        if gained:
            self.gained_count += len(gained)
            log.info(
                "buckets taken: {count} ({buckets}), {held} held",
                count=len(gained),
                buckets=ranges(sorted(gained)),
                held=len(self.owned),
            )
            self.on_gained(gained)
        return result

    def _two_step_share(self, withheld_from: int | None) -> store.SharePolicy:
        """The share policy of one round: when this node holds more than it may keep,
        it keeps everything this round (and notes from which share the excess counts,
        ``_excess_from``) unless that excess was withheld at the round before, from a
        share no larger than now (the excess is then among the withheld buckets)."""
        policy = self.share

        def share(
            live: Sequence[str], me: str, total: int, counts: dict[str, int]
        ) -> tuple[int, int]:
            wanted, keep = policy(live, me, total, counts)
            mine = counts.get(me, 0)
            if mine > keep and (withheld_from is None or wanted < withheld_from):
                self._excess_from = wanted
                return mine, mine
            return wanted, keep

        return share

    def _arm(self, safe_until: float) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.owned:
            delay = max(0.0, safe_until - self.clock.seconds())
            self._deadline = self.clock.callLater(delay, self._lapse)

    def _lapse(self) -> None:
        """No renewal in time: stop using every lease before the database can expire it."""
        self._deadline = None
        now = self.clock.seconds()
        lapsed = [bucket for bucket, held in self.owned.items() if held.safe_until <= now]
        if lapsed:
            self.lapsed_count += len(lapsed)
            log.error(
                "leases not renewed in time: stopped sending for {count} buckets",
                count=len(lapsed),
            )
            self._drop(lapsed)

    def _drop(self, buckets: list[int]) -> None:
        gone = [bucket for bucket in buckets if self.owned.pop(bucket, None) is not None]
        if gone:
            self.lost_count += len(gone)
            self.on_lost(sorted(gone))


def ranges(numbers: Sequence[int]) -> str:
    """``0-3,7,9-10``: a short text for a set of bucket numbers."""
    parts: list[str] = []
    start = previous = None
    for number in numbers:
        if previous is not None and number == previous + 1:
            previous = number
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = number
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(parts)
