"""The delivery engine fenced by bucket leases: lanes run only on the node that holds
their bucket, no frame after the lease lapsed, no outcome recorded under a stale epoch.

The delivery rig of the delivery tests (in-memory SQLite, ``task.Clock``, in-memory
destination peers), with real LeaseManagers on the same database and clock: the
dispatcher gets a ``BucketFence`` over node "a"'s manager, and the manager's
``on_gained``/``on_lost`` call ``dispatcher.fence_changed``, as a cluster node's
service will.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.cluster.fence import BucketFence
from udsgateway.cluster.leases import LeaseManager
from udsgateway.store import leases as store
from udsgateway.store.outbox import DELIVERED, QUEUED
from udsgateway.testing import Outbound, PeerConnection, control_id_of, destination_ack

DEST = "tcp:host=lab.example:port=7001"
BUCKETS = 4
LEASE = 15.0


class Failing:
    """A database whose every transaction fails (PostgreSQL unreachable from the node)."""

    def transaction(self, *_args: Any) -> Any:
        return fail(RuntimeError("connection lost"))


def lane_in(bucket: int, prefix: str) -> str:
    """A lane name that falls in ``bucket``."""
    return next(
        f"{prefix}{n}" for n in range(1000) if store.bucket_of(f"{prefix}{n}", BUCKETS) == bucket
    )


class FencedDeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = Outbound()
        self.addCleanup(self.rig.stop)
        self.rig.database.transaction_now(store.ensure_cluster_schema, BUCKETS)
        self.sent_at: list[tuple[str, float]] = []
        peer = self.rig.peer(DEST)
        peer.latency = 1.0

        def answer(connection: PeerConnection, payload: bytes) -> None:
            self.sent_at.append((control_id_of(payload), self.rig.clock.seconds()))
            connection.reply(destination_ack(control_id_of(payload)))

        peer.script = answer

    def node(self, name: str) -> LeaseManager:
        manager = LeaseManager(self.rig.database, self.rig.clock, name, LEASE)
        manager.startService()
        self.addCleanup(lambda: manager.running and manager.stopService())
        return manager

    def fence(self, manager: LeaseManager) -> BucketFence:
        fence = BucketFence(manager)
        self.rig.dispatcher.fence = fence
        manager.on_gained = lambda _gained: self.rig.dispatcher.fence_changed()
        manager.on_lost = lambda _lost: self.rig.dispatcher.fence_changed()
        return fence

    def states(self, lane: str) -> list[tuple[str, str]]:
        return [(d.control_id, d.state) for d in self.rig.deliveries(lane)]

    def test_only_the_lanes_of_held_buckets_run(self) -> None:
        """Of two lanes, the one whose bucket the other node holds is not sent; once
        that node stops cleanly and this one takes the bucket, it is, in order."""
        a, b = self.node("a"), self.node("b")
        a.tick()
        b.tick()
        self.assertEqual((sorted(a.owned), sorted(b.owned)), ([0, 1], [2, 3]))
        self.fence(a)
        mine, theirs = lane_in(0, "mine"), lane_in(2, "theirs")
        self.rig.start()
        self.rig.enqueue(mine, DEST, ["M1", "M2"])
        self.rig.enqueue(theirs, DEST, ["T1", "T2"])
        self.rig.run_until(lambda: self.states(mine) == [("M1", DELIVERED), ("M2", DELIVERED)])
        self.rig.clock.advance(30)  # sweeps: still not this node's lane
        self.assertEqual(self.states(theirs), [("T1", QUEUED), ("T2", QUEUED)])
        b.stopService()
        a.tick()
        self.rig.run_until(lambda: self.states(theirs) == [("T1", DELIVERED), ("T2", DELIVERED)])
        self.assertEqual([c for c, _at in self.sent_at], ["M1", "M2", "T1", "T2"])

    def test_no_frame_after_the_lease_lapsed(self) -> None:
        """The node cannot renew (its database connection fails): the lane sends one
        message a second until lease - margin after the last renewal started, then
        stops, the message in flight unrecorded; nothing is sent after that moment."""
        a = self.node("a")
        self.fence(a)
        lane = lane_in(1, "lane")
        self.rig.start()
        started = self.rig.clock.seconds()
        a.database = Failing()  # type: ignore[assignment]
        self.rig.enqueue(lane, DEST, [f"D{n:02d}" for n in range(30)])
        self.rig.clock.pump([0.25] * 160)  # 40 s
        lapse = started + LEASE - a.margin
        self.assertEqual(a.owned, {})
        self.assertTrue(self.sent_at)
        self.assertTrue(all(at < lapse for _c, at in self.sent_at), (self.sent_at, lapse))
        states = self.states(lane)
        delivered = [c for c, state in states if state == DELIVERED]
        self.assertEqual(delivered, [c for c, _at in self.sent_at][: len(delivered)])
        self.assertGreaterEqual(len(delivered), 10)
        self.assertEqual({state for _c, state in states[len(delivered) :]}, {QUEUED})
        self.assertEqual(self.rig.dispatcher.lanes, {})

    def test_each_frame_checks_the_lease_clock(self) -> None:
        """Even before the lapse is acted on (the lapse timer not yet run, as in the
        first reactor turn after a SIGSTOP), a lane checks the lease on the monotonic
        clock before each frame: the first message due after the moment is not sent."""
        a = self.node("a")
        self.fence(a)
        a.on_lost = lambda _lost: None  # the lapse is not acted on
        lane = lane_in(2, "lane")
        self.rig.start()
        started = self.rig.clock.seconds()
        a.database = Failing()  # type: ignore[assignment]
        self.rig.enqueue(lane, DEST, [f"F{n:02d}" for n in range(30)])
        self.rig.clock.pump([0.25] * 160)
        lapse = started + LEASE - a.margin
        self.assertGreaterEqual(len(self.sent_at), 10)
        self.assertTrue(all(at < lapse for _c, at in self.sent_at), (self.sent_at, lapse))
        self.assertEqual(self.rig.dispatcher.lanes, {})

    def test_outcome_under_a_stale_epoch_is_not_recorded(self) -> None:
        """The bucket is taken over while a message is in flight (the node's own clock
        still says the lease is good): its ACK comes back, but the recording
        transaction finds the new epoch; nothing is recorded, the lane stops, and the
        message stays queued for the new owner (sent again: at least once)."""
        a = self.node("a")
        fence = self.fence(a)
        lane = lane_in(3, "lane")
        self.rig.peer(DEST).latency = 3.0  # the ACK comes before a's next round (5 s)
        self.rig.start()
        self.rig.enqueue(lane, DEST, ["S1", "S2"])
        self.rig.clock.advance(0)
        self.rig.clock.advance(0)  # connected, S1 on the wire

        def expire(connection: Any) -> None:
            connection.execute(
                text("UPDATE cluster_buckets SET expires_at = expires_at - :s"), {"s": LEASE}
            )
            connection.execute(
                text(
                    "UPDATE cluster_lease_history SET valid_until = valid_until - :s,"
                    " acquired_at = acquired_at - :s"
                ),
                {"s": LEASE},
            )
            connection.execute(
                text("UPDATE cluster_nodes SET seen_at = seen_at - :s"), {"s": LEASE}
            )

        self.rig.database.transaction_now(expire)
        b = self.node("b")  # takes every expired bucket at the next epoch
        self.assertEqual(b.owned[3].epoch, 2)
        self.assertTrue(a.may_send(3))  # a's clock has not caught up
        self.rig.clock.advance(3.0)
        self.rig.clock.advance(0)
        self.assertEqual(fence.rejected, 1)
        self.assertEqual([c for c, _at in self.sent_at], ["S1"])
        self.assertEqual(self.states(lane), [("S1", QUEUED), ("S2", QUEUED)])
        self.assertEqual([d.attempts for d in self.rig.deliveries(lane)], [0, 0])
        self.assertEqual(self.rig.dispatcher.lanes, {})
        history = self.rig.database.transaction_now(store.lease_history)
        self.assertEqual(store.overlaps(history), [])
