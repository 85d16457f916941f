"""Cluster mode's work: the executor claims pending executions per node (fenced by
epoch), new work wakes the node that owns it (NOTIFY), and a lane's deliveries are
numbered under a per-lane lock.

The executor and dispatcher tests run on an in-memory SQLite database with real
LeaseManagers on a ``task.Clock`` (as ``test_cluster_delivery``); the NOTIFY and
the lane lock need a real PostgreSQL (a throwaway schema, as the store contract).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from attrs import evolve
from sqlalchemy import create_engine, text, update
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.test_store_contract import throwaway_schema_engine
from udsgateway.cluster.fence import BucketFence
from udsgateway.cluster.leases import LeaseManager
from udsgateway.cluster.notify import NotifyListener
from udsgateway.config import ConfigError, parse_config
from udsgateway.flows import App, Flow
from udsgateway.flowstore import load_apps, save_app
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.interfaces import IDeliveryQueue
from udsgateway.outbound.executor import Executor, lane_name
from udsgateway.store import executions, inbound, outbox
from udsgateway.store import leases as store
from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine
from udsgateway.store.outbox import DELIVERED, QUEUED, NewDelivery
from udsgateway.store.records import PENDING, WAITING, Finished, Settlement
from udsgateway.testing import (
    Outbound,
    PeerConnection,
    control_id_of,
    destination_ack,
    inbound_record,
    memory_database,
)
from udsgateway.testing.flows import action, app, flow

BUCKETS = 4
LEASE = 15.0
DEST = "tcp:host=lab.example:port=7001"
TEMPLATE = (
    "MSH|^~\\&|UDSGATEWAY|TEST|LAB|LABFAC|20240101||ADT^A04|{{ control_id }}|P|2.5\n"
    'ZTR|{{ msg["MSH-10"] }}\n'
)


def flow_in(buckets: set[int], prefix: str, steps: int = 1) -> Flow:
    """A flow whose first action's lane (``<Flow ID>/0``) falls in one of ``buckets``."""
    for n in range(1000):
        made = flow(
            f"{prefix}{n}",
            "ADT^A04",
            [action(f"a{step}", 7001 + step, "ADT^A04", TEMPLATE) for step in range(steps)],
        )
        if store.bucket_of(lane_name(made.flow_id, 0), BUCKETS) in buckets:
            return made
    raise AssertionError("no such flow")


def delivered(
    database: Database, delivery: Any, step: int, at: float, after: Callable[..., Any]
) -> None:
    """Record ``delivery`` (action ``step``) as delivered at ``at``, the executor's
    ``after`` hook in the same transaction (as the dispatcher records an ACK)."""
    database.transaction_now(
        outbox.record,
        [
            Settlement(
                delivery.id,
                DELIVERED,
                1,
                0.0,
                execution_id=delivery.execution_id,
                step=step,
                control_id=delivery.control_id,
            )
        ],
        at,
        after,
    )


@implementer(IDeliveryQueue)
class Queue:
    """The executor's delivery queue: records the lanes it is told of."""

    def __init__(self) -> None:
        self.lanes: list[str] = []

    def enqueued(self, lane: str, destination: str, protocol: str, count: int = 1) -> None:
        self.lanes.append(lane)

    def is_full(self, destination: str) -> bool:
        return False


class ExecutorClaimTests(SynchronousTestCase):
    """Two nodes' executors on one database: each renders only its flow actions."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.database = memory_database()
        self.database.transaction_now(store.ensure_cluster_schema, BUCKETS)
        self.mine = flow_in({0, 1}, "mine")
        self.theirs = flow_in({2, 3}, "theirs")
        self.apps: list[App] = [app(self.mine, self.theirs)]

    def manager(self, name: str) -> LeaseManager:
        manager = LeaseManager(self.database, self.clock, name, LEASE)
        manager.startService()
        self.addCleanup(lambda: manager.running and manager.stopService())
        return manager

    def executor(self, manager: LeaseManager | None) -> tuple[Executor, Queue]:
        queue = Queue()
        executor = Executor(
            self.database,
            queue,
            self.clock,
            ControlIdSource("T" + (manager.node if manager else "x")),
            fence=BucketFence(manager) if manager is not None else None,
        )
        executor.load(self.apps)
        return executor, queue

    def receive(self, *control_ids: str) -> None:
        """Messages committed by some node's inbound, each running both flows (pending)."""
        self.database.transaction_now(
            inbound.commit_inbound,
            [
                inbound_record(c, flows=(self.mine.flow_id, self.theirs.flow_id))
                for c in control_ids
            ],
        )

    def enqueued(self) -> dict[tuple[str, str], int]:
        """Deliveries per (flow, trigger control ID): each execution's action, counted."""
        rows = self.database.transaction_now(
            lambda c: c.execute(
                text(
                    "SELECT e.flow_id, m.control_id, count(d.id) FROM executions e"
                    " JOIN messages m ON m.id = e.message_id"
                    " LEFT JOIN deliveries d ON d.execution_id = e.id"
                    " GROUP BY e.flow_id, m.control_id"
                )
            ).all()
        )
        return {(flow_id, control_id): count for flow_id, control_id, count in rows}

    def states(self, flow_id: str) -> list[str]:
        return [
            row.state
            for row in self.database.transaction_now(executions.list_executions, (), 1000)
            if row.flow_id == flow_id
        ]

    def test_each_node_renders_only_its_flow_actions(self) -> None:
        """Node a holds buckets 0-1, b 2-3: a's executor renders the executions of the
        flow whose first action is in a's buckets, and leaves the others pending for
        b; b's renders those. Each execution's action is enqueued exactly once."""
        a, b = self.manager("a"), self.manager("b")
        a.tick()
        b.tick()
        self.assertEqual((sorted(a.owned), sorted(b.owned)), ([0, 1], [2, 3]))
        self.receive("C1", "C2", "C3")
        executor_a, queue_a = self.executor(a)
        executor_a.wake()
        self.assertEqual(self.states(self.mine.flow_id), [WAITING] * 3)
        self.assertEqual(self.states(self.theirs.flow_id), [PENDING] * 3)
        self.assertEqual(set(queue_a.lanes), {lane_name(self.mine.flow_id, 0)})
        executor_b, queue_b = self.executor(b)
        executor_b.wake()
        executor_a.wake()
        self.assertEqual(self.states(self.theirs.flow_id), [WAITING] * 3)
        self.assertEqual(set(queue_b.lanes), {lane_name(self.theirs.flow_id, 0)})
        self.assertEqual(set(self.enqueued().values()), {1})
        self.assertEqual(len(self.enqueued()), 6)

    def test_without_a_fence_every_execution_is_run(self) -> None:
        """A gateway alone (no fence) renders every pending execution, as before."""
        self.receive("C1")
        executor, _queue = self.executor(None)
        executor.wake()
        self.assertEqual(
            self.enqueued(), {(self.mine.flow_id, "C1"): 1, (self.theirs.flow_id, "C1"): 1}
        )

    def test_a_node_that_holds_nothing_renders_nothing(self) -> None:
        """Before its first round (no bucket held), a node's executor takes nothing."""
        a = LeaseManager(self.database, self.clock, "a", LEASE)  # not started
        self.receive("C1")
        executor, queue = self.executor(a)
        executor.wake()
        self.assertEqual(queue.lanes, [])
        self.assertEqual(set(self.enqueued().values()), {0})

    def test_takeover_after_a_clean_stop(self) -> None:
        """b stops cleanly (hands its buckets over); a takes them and its executor,
        woken as the service's ``on_gained`` does, renders b's pending executions:
        none lost, none doubled."""
        a, b = self.manager("a"), self.manager("b")
        a.tick()
        b.tick()
        self.receive("C1", "C2")
        executor_a, _queue = self.executor(a)
        a.on_gained = lambda _gained: executor_a.wake()
        executor_a.wake()
        self.assertEqual(self.states(self.theirs.flow_id), [PENDING] * 2)
        b.stopService()
        a.tick()
        self.assertEqual(sorted(a.owned), [0, 1, 2, 3])
        self.assertEqual(self.states(self.theirs.flow_id), [WAITING] * 2)
        self.assertEqual(set(self.enqueued().values()), {1})

    def test_claim_under_a_stale_epoch_is_refused(self) -> None:
        """Node a believes it holds every bucket (its monotonic clock says the leases
        are good), but b took over the bucket of a flow on the database meanwhile: a's
        claim is rolled back by the epoch check in its transaction (nothing enqueued,
        the executions stay pending), and b's executor renders them once."""
        a = self.manager("a")
        a.tick()
        bucket = store.bucket_of(lane_name(self.theirs.flow_id, 0), BUCKETS)
        self.database.transaction_now(
            lambda c: c.execute(
                update(store.buckets)
                .where(store.buckets.c.bucket == bucket)
                .values(owner="b", epoch=store.buckets.c.epoch + 1)
            )
        )
        self.assertIn(bucket, a.owned)  # a has not noticed
        self.receive("C1", "C2")
        executor_a, queue_a = self.executor(a)
        executor_a.wake()
        self.assertEqual(executor_a.fenced, 1)
        self.assertEqual(queue_a.lanes, [])
        self.assertEqual(set(self.enqueued().values()), {0})
        b = LeaseManager(self.database, self.clock, "b", LEASE)
        b.owned = {bucket: store_held(self.database, bucket)}
        b.total = BUCKETS
        executor_b, queue_b = self.executor(b)
        executor_b.wake()
        self.assertEqual(set(queue_b.lanes), {lane_name(self.theirs.flow_id, 0)})
        self.assertEqual(self.states(self.theirs.flow_id), [WAITING] * 2)
        self.assertEqual(self.enqueued()[(self.theirs.flow_id, "C1")], 1)

    def test_a_flow_not_loaded_yet_is_not_finished_early(self) -> None:
        """Another node saved a two-action flow and folded a message's first action;
        this node, which delivered it, has not reloaded its flows yet: recording the
        outcome moves the execution to its second action (the store says the flow
        has two), it does not finish it."""
        a = self.manager("a")
        a.tick()
        two = flow(
            "twosteps",
            "ADT^A04",
            [action(f"a{n}", 7001 + n, "ADT^A04", TEMPLATE) for n in range(2)],
        )
        self.database.transaction_now(save_app, app(two), 1.0)
        saved = self.database.transaction_now(load_apps, None)
        (flow_id,) = [f.flow_id for stored in saved for f in stored.flows]
        first = NewDelivery(lane_name(flow_id, 0), DEST, "mllp", "X1", b"MSH|x", {})
        record = evolve(inbound_record("C1", flows=(flow_id,)), first=(first,))
        self.database.transaction_now(inbound.commit_inbound, [record])
        (delivery,) = self.database.transaction_now(outbox.list_deliveries, (), None, 10)
        stale, _queue = self.executor(a)  # loaded with self.apps: not this flow
        delivered(self.database, delivery, 0, 2.0, stale.after_record)
        (row,) = self.database.transaction_now(executions.list_executions, (), 10)
        self.assertEqual((row.state, row.step), (PENDING, 1))

    def folded(self, control_id: str) -> Any:
        """A message whose first action (of the one-action flow ``mine``) was folded
        by the inbound node: its execution waits on that delivery."""
        first = NewDelivery(
            lane_name(self.mine.flow_id, 0), DEST, "mllp", "X" + control_id, b"MSH|x", {}
        )
        record = evolve(inbound_record(control_id, flows=(self.mine.flow_id,)), first=(first,))
        self.database.transaction_now(inbound.commit_inbound, [record])
        return next(
            d
            for d in self.database.transaction_now(outbox.list_deliveries, (), None, 100)
            if d.control_id == "X" + control_id
        )

    def settle(self, executor: Executor, delivery: Any, state: str, error: str = "") -> None:
        """The outcome of ``delivery`` recorded by ``executor``'s node (its lane's owner)."""
        self.database.transaction_now(
            outbox.record,
            [
                Settlement(
                    delivery.id,
                    state,
                    1,
                    0.0,
                    last_error=error,
                    execution_id=delivery.execution_id,
                    step=0,
                    control_id=delivery.control_id,
                )
            ],
            2.0,
            executor.after_record,
        )

    def test_an_execution_finished_on_another_node_reaches_its_watcher(self) -> None:
        """The inbound node waits on an execution ("after actions" ACK) that another
        node finishes: the announcement (or, as backup, the poll) makes the inbound
        node read its state from the store and fire the watcher: done, or held with
        the delivery's error. An execution not finished yet fires nothing."""
        a = self.manager("a")
        a.tick()
        delivering, _queue = self.executor(a)
        receiving, _queue = self.executor(None)
        receiving.announce = True
        done, held, open_ = self.folded("C1"), self.folded("C2"), self.folded("C3")
        seen: dict[int, Any] = {}

        def remember(result: Any, execution_id: int) -> None:
            seen[execution_id] = result

        for delivery in (done, held, open_):
            receiving.watch(delivery.execution_id, 30.0).addBoth(remember, delivery.execution_id)
        self.settle(delivering, done, DELIVERED)
        self.settle(delivering, held, "held", "AR from LAB")
        self.assertEqual(seen, {})  # the delivering node's own watchers are others
        receiving.finished_announced([done.execution_id, open_.execution_id])
        self.assertEqual(seen, {done.execution_id: Finished(done.execution_id, "done", "")})
        receiving.poll(5.0)
        self.addCleanup(receiving.stop_polling)
        self.clock.advance(5.0)
        self.assertEqual(
            seen[held.execution_id], Finished(held.execution_id, "held", "AR from LAB")
        )
        self.assertNotIn(open_.execution_id, seen)

    def test_announced_steps_wake_only_their_owner(self) -> None:
        """An announcement of pending executions at another node's flow action does not
        run this node's executor; one at its own does."""
        a, b = self.manager("a"), self.manager("b")
        a.tick()
        b.tick()
        self.receive("C1")
        executor_a, queue_a = self.executor(a)
        executor_a.work_announced([(self.theirs.flow_id, 0)])
        self.assertEqual(queue_a.lanes, [])
        executor_a.work_announced([(self.mine.flow_id, 0)])
        self.assertEqual(queue_a.lanes, [lane_name(self.mine.flow_id, 0)])


def store_held(database: Database, bucket: int) -> Any:
    """The lease as the database has it now (b's view of a bucket it took)."""
    from udsgateway.cluster.leases import Held

    epoch = database.transaction_now(
        lambda c: c.execute(
            text("SELECT epoch FROM cluster_buckets WHERE bucket = :b"), {"b": bucket}
        ).scalar_one()
    )
    return Held(int(epoch), float("inf"))


def lane_in(bucket: int, prefix: str) -> str:
    return next(
        f"{prefix}{n}" for n in range(1000) if store.bucket_of(f"{prefix}{n}", BUCKETS) == bucket
    )


class DispatcherWakeTests(SynchronousTestCase):
    """Deliveries another node enqueued: the announcement starts this node's lanes at
    once; the sweep (``held_poll``) is only the backup."""

    def setUp(self) -> None:
        self.rig = Outbound(held_poll=600.0)
        self.addCleanup(self.rig.stop)
        self.rig.database.transaction_now(store.ensure_cluster_schema, BUCKETS)
        self.sent: list[str] = []
        peer = self.rig.peer(DEST)
        peer.latency = 0.5

        def answer(connection: PeerConnection, payload: bytes) -> None:
            self.sent.append(control_id_of(payload))
            connection.reply(destination_ack(control_id_of(payload)))

        peer.script = answer
        self.a = LeaseManager(self.rig.database, self.rig.clock, "a", LEASE)
        self.b = LeaseManager(self.rig.database, self.rig.clock, "b", LEASE)
        for manager in (self.a, self.b):
            manager.startService()
            self.addCleanup(stop_if_running, manager)
        self.a.tick()
        self.b.tick()
        self.rig.dispatcher.fence = BucketFence(self.a)
        self.rig.start()

    def states(self, lane: str) -> list[tuple[str, str]]:
        return [(d.control_id, d.state) for d in self.rig.deliveries(lane)]

    def test_announced_lanes_start_at_once(self) -> None:
        """Another node's commit put deliveries in a lane of this node and in one of
        the other node's: without the announcement nothing is sent (the sweep is ten
        minutes away); with it, this node's lane is sent within a second, the other
        node's not at all."""
        mine, theirs = lane_in(0, "mine"), lane_in(2, "theirs")
        self.rig.enqueue(mine, DEST, ["M1", "M2"], notify=False)
        self.rig.enqueue(theirs, DEST, ["T1"], notify=False)
        self.rig.clock.advance(5)
        self.assertEqual(self.sent, [])
        self.rig.dispatcher.work_announced([(mine, DEST, "mllp"), (theirs, DEST, "mllp")])
        self.rig.clock.pump([0.1] * 20)
        self.assertEqual(self.states(mine), [("M1", DELIVERED), ("M2", DELIVERED)])
        self.assertEqual(self.states(theirs), [("T1", QUEUED)])

    def test_announcement_wakes_a_running_lane(self) -> None:
        """A lane running here (its first message on the wire) learns of a delivery
        another node added behind it, and sends it next instead of ending idle."""
        mine = lane_in(1, "mine")
        self.rig.enqueue(mine, DEST, ["M1"])
        self.rig.clock.advance(0.1)  # M1 is out, its ACK due in 0.5 s
        self.assertIn(mine, self.rig.dispatcher.lanes)
        self.rig.enqueue(mine, DEST, ["M2"], notify=False)
        self.rig.dispatcher.work_announced([(mine, DEST, "mllp")])
        self.rig.clock.pump([0.1] * 20)
        self.assertEqual(self.states(mine), [("M1", DELIVERED), ("M2", DELIVERED)])

    def test_unannounced_work_waits_for_the_sweep(self) -> None:
        """The backup: work nobody announced is found by the sweep."""
        mine = lane_in(0, "mine")
        self.rig.enqueue(mine, DEST, ["M1"], notify=False)
        self.rig.clock.pump([1.0] * 30)
        self.assertEqual(self.states(mine), [("M1", QUEUED)])
        self.rig.clock.advance(600)
        self.rig.clock.pump([0.1] * 20)
        self.assertEqual(self.states(mine), [("M1", DELIVERED)])


class RefusedNodeTests(SynchronousTestCase):
    def test_a_refused_node_stopping_leaves_the_live_ones_buckets(self) -> None:
        """A second process under the name of a live node is refused at its first
        round; when it stops (the gateway exits), it hands nothing over: the buckets
        under that name are the live process's."""
        clock = Clock()
        database = memory_database()
        database.transaction_now(store.ensure_cluster_schema, BUCKETS)
        live = LeaseManager(database, clock, "n1", LEASE)
        live.startService()
        self.addCleanup(stop_if_running, live)
        self.assertEqual(len(live.owned), BUCKETS)
        second = LeaseManager(database, clock, "n1", LEASE)
        second.startService()
        self.assertTrue(second.first_round.called)
        self.assertIn("in use by another running gateway", second.refused or "")
        second.stopService()
        status = database.transaction_now(store.cluster_status)
        assert status is not None
        self.assertEqual(
            {(lease.owner, lease.expires_at > status.now) for lease in status.buckets},
            {("n1", True)},
        )
        self.assertEqual([node.state(status.now) for node in status.nodes], ["live"])


def stop_if_running(manager: LeaseManager) -> None:
    if manager.running:
        manager.stopService()


class PayloadTests(SynchronousTestCase):
    def test_parse_what_is_announced(self) -> None:
        self.assertEqual(
            store.parse_work("d\tF1/0\ttcp:host=h:port=1\tmllp\ne\tF2\t1"),
            store.Work((("F1/0", "tcp:host=h:port=1", "mllp"),), (("F2", 1),)),
        )
        self.assertEqual(store.parse_work("x\t17\nx\t18"), store.Work(finished=(17, 18)))
        self.assertEqual(store.parse_work("*"), store.Work(all=True))
        self.assertEqual(store.parse_work("garbage"), store.Work(all=True))


class ConfigTests(SynchronousTestCase):
    BASE = '[gateway]\ndatabase = "postgresql+psycopg://u@h/db"\nnode_name = "n1"\n'

    def test_leases_on_their_own_thread(self) -> None:
        """A node's lease rounds use the database (thread and connection) given for
        them; without one, the data path's."""
        from twisted.internet.testing import MemoryReactorClock

        from udsgateway.service import GatewayService

        config = parse_config(self.BASE + "[cluster]\nenabled = true\n")
        data = Database(make_engine("sqlite://"), InlineRunner())
        leases = Database(make_engine("sqlite://"), InlineRunner())
        self.addCleanup(data.close)
        self.addCleanup(leases.close)

        class Threads:
            def __init__(self, name: str) -> None:
                self.name = name

            def start(self) -> None:
                pass

            def stop(self) -> None:
                pass

        service = GatewayService(
            config,
            MemoryReactorClock(),
            data,
            ControlIdSource("T"),
            threads=Threads("data"),
            lease_database=leases,
            lease_threads=Threads("leases"),
        )
        assert service.leases is not None
        self.assertIs(service.leases.database, leases)
        self.assertEqual(service._lease_threads.name, "leases")  # type: ignore[union-attr]
        shared = GatewayService(config, MemoryReactorClock(), data, ControlIdSource("T"))
        assert shared.leases is not None
        self.assertIs(shared.leases.database, data)

    def test_defaults_and_values(self) -> None:
        config = parse_config(self.BASE)
        self.assertEqual(
            (config.cluster.enabled, config.cluster.buckets, config.cluster.lease_time),
            (False, 64, 15.0),
        )
        config = parse_config(
            self.BASE + "[cluster]\nenabled = true\nbuckets = 16\nlease_time = 4\n"
        )
        self.assertEqual(
            (config.cluster.enabled, config.cluster.buckets, config.cluster.lease_time),
            (True, 16, 4.0),
        )

    def test_errors(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            parse_config(
                self.BASE + "[cluster]\nenabled = 1\nbuckets = 0\nlease_time = 2.5\nnodes = 3\n"
            )
        self.assertEqual(
            raised.exception.problems,
            [
                "<config>: cluster.nodes: unknown key",
                "<config>: cluster.enabled: expected bool, got int",
                "<config>: cluster.buckets: must be from 1 to 4096",
                "<config>: cluster.lease_time: must be at least 3 (seconds)",
            ],
        )
        with self.assertRaises(ConfigError) as raised:
            parse_config(self.BASE + "[cluster]\nbuckets = 4097\n")
        self.assertEqual(
            raised.exception.problems, ["<config>: cluster.buckets: must be from 1 to 4096"]
        )

    def test_cluster_needs_postgresql(self) -> None:
        with self.assertRaises(ConfigError) as raised:
            parse_config('[gateway]\ndatabase = "sqlite:///g.db"\n[cluster]\nenabled = true\n')
        (problem,) = raised.exception.problems
        self.assertIn("cluster.enabled: a cluster needs a PostgreSQL database", problem)
        self.assertIn("[gateway].database", problem)
        parse_config('[gateway]\ndatabase = "sqlite:///g.db"\n[cluster]\nenabled = false\n')


class PostgreSQLWorkTests(SynchronousTestCase):
    """The lane lock and the announcements on a real PostgreSQL."""

    def setUp(self) -> None:
        self.engine = throwaway_schema_engine(self)
        self.database = Database(self.engine, InlineRunner())
        self.addCleanup(self.database.close)
        self.database.transaction_now(ensure_schema)

    def delivery(self, lane: str, control_id: str) -> NewDelivery:
        return NewDelivery(lane, DEST, "mllp", control_id, b"MSH|x", {})

    def waiting_on_lock(self, pid: int) -> bool:
        with self.engine.connect() as connection:
            found = connection.execute(
                text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": pid},
            ).scalar()
        return found == "Lock"

    def test_a_lanes_ids_are_committed_in_order(self) -> None:
        """A transaction enqueuing to a lane holds the lane's lock until it commits: a
        second one enqueuing to the same lane waits (it gets its id only then, so a
        larger one), while one enqueuing to another lane does not wait."""
        lane, other_lane = f"L{uuid.uuid4().hex[:6]}/0", f"M{uuid.uuid4().hex[:6]}/0"
        first = self.engine.connect()
        self.addCleanup(first.close)
        (first_id,) = outbox.enqueue(first, [self.delivery(lane, "D1")], 1.0)
        # Another lane: no wait.
        with self.engine.connect() as other:
            outbox.enqueue(other, [self.delivery(other_lane, "O1")], 1.0)
            other.commit()
        second = self.engine.connect()
        self.addCleanup(second.close)
        pid = second.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        second.commit()
        result: list[int] = []

        def enqueue_second() -> None:
            result.extend(outbox.enqueue(second, [self.delivery(lane, "D2")], 1.0))
            second.commit()

        thread = threading.Thread(target=enqueue_second)
        thread.start()
        deadline = time.monotonic() + 30
        while not self.waiting_on_lock(pid):
            self.assertLess(time.monotonic(), deadline, "the second enqueue never waited")
            time.sleep(0.02)
        self.assertEqual(result, [])
        first.commit()
        thread.join(30)
        self.assertFalse(thread.is_alive())
        (second_id,) = result
        self.assertGreater(second_id, first_id)

    def test_commits_announce_their_work(self) -> None:
        """A node's inbound commit announces its folded deliveries' lanes and its
        pending executions' flow actions on the work channel; the listener hands each
        announcement over, and it reads back as it was sent."""
        heard: list[str] = []
        got = threading.Event()

        class Inline:
            def callFromThread(self, function: Any, *args: Any) -> None:
                function(*args)

        def on_work(payload: str) -> None:
            heard.append(payload)
            got.set()

        listener = NotifyListener(
            self.engine,
            Inline(),  # type: ignore[arg-type]
            lambda _p: None,
            others={store.WORK_CHANNEL: on_work},
        )
        listener.start()
        self.addCleanup(listener.stop)
        self.assertTrue(listener.listening.wait(30))
        tag = uuid.uuid4().hex[:6]
        folded = self.delivery(f"F{tag}/0", "D1")
        records = [
            inbound_record(f"C{tag}1", flows=(f"F{tag}",)),
            inbound_record(f"C{tag}2", flows=(f"G{tag}",)),
        ]
        records[0] = evolve(records[0], first=(folded,))
        self.database.transaction_now(inbound.commit_inbound, records, True)
        self.assertTrue(got.wait(30))
        work = store.parse_work(heard[0])
        self.assertEqual(work.lanes, ((f"F{tag}/0", DEST, "mllp"),))
        self.assertEqual(work.steps, ((f"G{tag}", 0),))

    def test_listener_back_after_a_lost_connection_says_what_may_be_missed(self) -> None:
        """The listener's session is ended by the server: it reconnects, listens again,
        and tells every handler that announcements may have been missed (``*``: the
        dispatcher rescans, the executor runs, the lease manager runs a round)."""
        from tests.test_store_contract import POSTGRES_URL
        from udsgateway.cluster.notify import MISSED

        tag = f"udsgw-listen-{uuid.uuid4().hex[:8]}"
        engine = create_engine(POSTGRES_URL, connect_args={"application_name": tag})
        self.addCleanup(engine.dispose)
        heard: dict[str, list[str]] = {"leases": [], "work": []}
        missed = threading.Event()

        class Inline:
            def callFromThread(self, function: Any, *args: Any) -> None:
                function(*args)

        def on(name: str) -> Any:
            def handler(payload: str) -> None:
                heard[name].append(payload)
                if MISSED in heard["leases"] and MISSED in heard["work"]:
                    missed.set()

            return handler

        listener = NotifyListener(
            engine,
            Inline(),  # type: ignore[arg-type]
            on("leases"),
            others={store.WORK_CHANNEL: on("work")},
        )
        listener.start()
        self.addCleanup(listener.stop)

        # Other trial workers share the database and its channels: their announcements
        # may arrive too; what this test is about is the "missed" marker, once each.
        def markers() -> dict[str, list[str]]:
            return {name: [p for p in payloads if p == MISSED] for name, payloads in heard.items()}

        self.assertTrue(listener.listening.wait(30))
        self.assertEqual(markers(), {"leases": [], "work": []})
        with self.engine.connect() as connection:
            ended = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = :tag"
                ),
                {"tag": tag},
            ).scalar_one()
        self.assertEqual(ended, 1)
        self.assertTrue(missed.wait(30), heard)
        self.assertEqual(markers(), {"leases": [MISSED], "work": [MISSED]})
        self.assertEqual(store.parse_work(MISSED), store.Work(all=True))

    def heard(self, driver: Any, mine: Callable[[str], bool]) -> str:
        """The first announcement ``mine`` accepts: the database is shared with other
        tests running at the same time (trial --jobs), whose announcements are skipped."""
        for notify in driver.notifies(timeout=10):
            if mine(notify.payload):
                return str(notify.payload)
        self.fail("no announcement of this test within 10 s")

    def listen(self) -> Any:
        raw = self.engine.raw_connection()
        self.addCleanup(raw.close)
        driver: Any = raw.driver_connection
        driver.autocommit = True
        driver.execute(f'LISTEN "{store.WORK_CHANNEL}"')
        return driver

    def test_executor_announces_its_enqueues_and_next_actions(self) -> None:
        """A node's executor announces the lanes it enqueued to, and the recording of a
        delivered first action announces the flow's second action (now pending),
        whose bucket may be another node's."""
        two = flow(
            f"two{uuid.uuid4().hex[:6]}",
            "ADT^A04",
            [action(f"a{step}", 7001 + step, "ADT^A04", TEMPLATE) for step in range(2)],
        )
        self.database.transaction_now(
            inbound.commit_inbound, [inbound_record("C1", flows=(two.flow_id,))]
        )
        driver = self.listen()
        executor = Executor(self.database, Queue(), Clock(), ControlIdSource("TX"), announce=True)
        executor.load([app(two)])
        executor.wake()
        ours = lambda payload: two.flow_id in payload  # noqa: E731
        heard = self.heard(driver, ours)
        (delivery,) = self.database.transaction_now(outbox.list_deliveries, (), None, 10)
        self.assertEqual(
            store.parse_work(heard).lanes,
            ((lane_name(two.flow_id, 0), delivery.destination, "mllp"),),
        )
        delivered(self.database, delivery, 0, 2.0, executor.after_record)
        heard = self.heard(driver, ours)
        self.assertEqual(store.parse_work(heard).steps, ((two.flow_id, 1),))
        self.assertEqual(store.parse_work(heard).finished, ())
        executor.wake()  # the second action
        heard = self.heard(driver, ours)
        second = next(
            d
            for d in self.database.transaction_now(outbox.list_deliveries, (), None, 10)
            if d.step == 1
        )
        delivered(self.database, second, 1, 3.0, executor.after_record)
        heard = self.heard(
            driver, lambda payload: store.parse_work(payload).finished == (second.execution_id,)
        )
        self.assertEqual(store.parse_work(heard).finished, (second.execution_id,))

    def test_no_announcement_without_cluster_mode(self) -> None:
        """A gateway alone on PostgreSQL announces nothing (NOTIFY costs every commit)."""
        raw = self.engine.raw_connection()
        self.addCleanup(raw.close)
        driver: Any = raw.driver_connection
        driver.autocommit = True
        driver.execute(f'LISTEN "{store.WORK_CHANNEL}"')
        tag = uuid.uuid4().hex[:6]
        self.database.transaction_now(
            inbound.commit_inbound, [inbound_record(f"C{tag}", flows=(f"G{tag}",))]
        )
        # The database is shared with other tests running at the same time (trial
        # --jobs): only this test's announcements (its tag) count.
        self.assertEqual([n.payload for n in driver.notifies(timeout=0.5) if tag in n.payload], [])
        self.database.transaction_now(
            inbound.commit_inbound, [inbound_record(f"E{tag}", flows=(f"G{tag}",))], True
        )
        heard = []
        for notify in driver.notifies(timeout=10):
            if tag in notify.payload:
                heard.append(notify.payload)
                break
        self.assertEqual(heard, [f"e\tG{tag}\t0"])
