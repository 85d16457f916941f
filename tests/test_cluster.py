"""Bucket leases: the store's SQL (SQLite and a real PostgreSQL) and the LeaseManager.

The managers run on a ``task.Clock`` with the inline runner, each on a Database
of its own (its own session on PostgreSQL), so a test decides exactly when each
node runs a round. The database clock is real: a node that "died" is aged by
moving its rows back in time by a lease (``age``), as if it had stopped
renewing that long ago. Every test ends by checking the lease history: epochs
go up by one per bucket and no lease began before the previous one ended.
"""

from __future__ import annotations

import io
import json
import os
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, text
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.test_store_contract import POSTGRES_URL
from udsgateway.cli.main import main
from udsgateway.cluster.fence import BucketFence, Token
from udsgateway.cluster.leases import LeaseManager, even_share, ranges
from udsgateway.cluster.notify import NotifyListener
from udsgateway.interfaces import FencedError
from udsgateway.store import leases as store
from udsgateway.store.engine import Database, InlineRunner, make_engine

BUCKETS = 8
LEASE = 15.0


class PureTests(SynchronousTestCase):
    def test_bucket_of_is_stable(self) -> None:
        """CRC-32 of the lane key: the same value on every node and in every process
        (Python's ``hash()`` of a string differs between processes)."""
        self.assertEqual(store.bucket_of("lab:127.0.0.1:7001", 64), 30)
        self.assertEqual(store.bucket_of("lab:127.0.0.1:7001", 1000), 1135852894 % 1000)
        spread = {store.bucket_of(f"lane{n}", 16) for n in range(200)}
        self.assertEqual(spread, set(range(16)))

    def test_even_share_with_hysteresis(self) -> None:
        """64 buckets over three nodes: 22, 21, 21 by name; one more kept while no node
        is more than one below its share."""
        share = even_share(1)
        settled = {"a": 23, "b": 21, "c": 20}
        self.assertEqual(
            [share(["b", "a", "c"], me, 64, settled) for me in "abc"],
            [(22, 23), (21, 22), (21, 22)],
        )
        starved = {"a": 32, "b": 32}  # c just joined
        self.assertEqual(
            [share(["b", "a", "c"], me, 64, starved) for me in "abc"],
            [(22, 22), (21, 21), (21, 21)],
        )
        self.assertEqual(share([], "a", 64, {}), (64, 64))  # a node not yet live counts itself

    def test_ranges(self) -> None:
        self.assertEqual(ranges([0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10")
        self.assertEqual(ranges([]), "")


if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


class LeaseFixture(_Base):
    """Managers on one database, each its own session (tests/test_cluster_ops.py too)."""

    def new_engine(self) -> Engine:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.admin = Database(self.new_engine(), InlineRunner())
        self.addCleanup(self.admin.close)
        self.assertEqual(self.run_sql(store.ensure_cluster_schema, BUCKETS), BUCKETS)
        # The count is fixed at creation: a later node asking for another keeps it.
        self.assertEqual(self.run_sql(store.ensure_cluster_schema, 64), BUCKETS)
        self.lost: dict[str, list[int]] = {}
        self.addCleanup(self.check_history)

    def run_sql(self, function: Callable[..., Any], *args: Any) -> Any:
        return self.admin.transaction_now(function, *args)

    def manager(self, name: str, start: bool = True, **options: Any) -> LeaseManager:
        database = Database(self.new_engine(), InlineRunner())
        self.addCleanup(database.close)
        manager = LeaseManager(database, self.clock, name, LEASE, **options)
        self.lost[name] = []
        manager.on_lost = self.lost[name].extend
        if start:
            manager.startService()
            self.addCleanup(lambda: manager.running and manager.stopService())
        return manager

    def age(self, node: str, seconds: float) -> None:
        """Move a node's heartbeat and leases ``seconds`` into the past."""

        def shift(connection: Any) -> None:
            parameters = {"node": node, "s": seconds}
            for statement in (
                "UPDATE cluster_buckets SET expires_at = expires_at - :s,"
                " acquired_at = acquired_at - :s WHERE owner = :node",
                "UPDATE cluster_lease_history SET valid_until = valid_until - :s,"
                " acquired_at = acquired_at - :s WHERE owner = :node",
                "UPDATE cluster_nodes SET seen_at = seen_at - :s,"
                " started_at = started_at - :s WHERE name = :node",
            ):
                connection.execute(text(statement), parameters)

        self.run_sql(shift)

    def owners(self) -> dict[int, str | None]:
        status = self.run_sql(store.cluster_status)
        return {lease.bucket: lease.owner for lease in status.buckets}

    def check_history(self) -> None:
        history = self.run_sql(store.lease_history)
        self.assertEqual(store.overlaps(history), [])


class LeaseContract(LeaseFixture):
    """The lease contract; mixed into one TestCase per dialect."""

    def test_single_node_takes_every_bucket(self) -> None:
        """Alone, a node takes every bucket at epoch 1 and may send on each."""
        a = self.manager("a")
        self.assertEqual({b: h.epoch for b, h in a.owned.items()}, dict.fromkeys(range(8), 1))
        self.assertTrue(all(a.may_send(bucket, 1) for bucket in range(BUCKETS)))
        self.assertFalse(a.may_send(0, 2))
        status = self.run_sql(store.cluster_status)
        self.assertEqual([(n.name, n.buckets) for n in status.nodes], [("a", BUCKETS)])

    def test_renewal_keeps_the_lease(self) -> None:
        """Rounds every lease/3 renew the lease: still held, same epoch, a minute later."""
        a = self.manager("a")
        for _ in range(12):
            self.clock.advance(a.renew_interval)
        self.assertEqual(len(a.owned), BUCKETS)
        self.assertTrue(a.may_send(3, 1))
        self.assertEqual(self.lost["a"], [])

    def test_join_shares_evenly(self) -> None:
        """A second node gets half once the first's next round gives it up; a third
        gets its share the same way (3, 3, 2 of eight)."""
        a = self.manager("a")
        b = self.manager("b")
        self.assertEqual(len(b.owned), 0)  # nothing free yet
        a.tick()  # sees b: gives up down to its share
        self.assertEqual(sorted(self.lost["a"]), [4, 5, 6, 7])
        b.tick()
        self.assertEqual(sorted(b.owned), [4, 5, 6, 7])
        self.assertEqual({h.epoch for h in b.owned.values()}, {2})  # a takeover bumps
        c = self.manager("c")
        a.tick()
        b.tick()
        c.tick()
        self.assertEqual(sorted(len(m.owned) for m in (a, b, c)), [2, 3, 3])
        owners = self.owners()
        self.assertEqual(len(owners), BUCKETS)
        for manager in (a, b, c):
            self.assertEqual(
                sorted(manager.owned), sorted(k for k, v in owners.items() if v == manager.node)
            )

    def test_excess_dropped_before_it_is_released(self) -> None:
        """A node above its share stops using the excess (no frame may leave for it)
        while the database still shows it as the owner, and releases it only after:
        another node, woken by the release, can never send on a bucket this node may
        still send on."""
        a = self.manager("a")
        self.manager("b")
        seen_at_drop: dict[int, str | None] = {}

        def dropped(buckets: list[int]) -> None:
            self.lost["a"].extend(buckets)
            owners = self.owners()
            seen_at_drop.update({bucket: owners[bucket] for bucket in buckets})
            self.assertFalse(any(a.may_send(bucket, 1) for bucket in buckets))

        a.on_lost = dropped
        a.tick()
        self.assertEqual(seen_at_drop, dict.fromkeys([4, 5, 6, 7], "a"))
        owners = self.owners()
        self.assertEqual([owners[bucket] for bucket in (4, 5, 6, 7)], [None] * 4)
        self.assertEqual(a.released_count, 4)

    def test_settled_cluster_moves_nothing(self) -> None:
        """Once three nodes hold 3, 3 and 2 of eight, further rounds move no bucket."""
        a, b, c = self.manager("a"), self.manager("b"), self.manager("c")
        for manager in (a, b, c, a, b, c):
            manager.tick()
        self.assertEqual((len(a.owned), len(b.owned), len(c.owned)), (3, 3, 2))
        before = len(self.run_sql(store.lease_history))
        for _ in range(5):
            self.clock.advance(a.renew_interval)
        self.assertEqual(len(self.run_sql(store.lease_history)), before)
        self.assertEqual((len(a.owned), len(b.owned), len(c.owned)), (3, 3, 2))

    def test_takeover_after_expiry_bumps_the_epoch(self) -> None:
        """A node that stops renewing (killed): once its leases expired on the database
        clock, the others take its buckets at the next epoch; its old epoch no longer
        passes the fencing check, and it had stopped using them before."""
        a = self.manager("a")
        b = self.manager("b")
        a.tick()
        b.tick()
        held_by_a = {bucket: held.epoch for bucket, held in a.owned.items()}
        self.assertEqual(len(held_by_a), 4)
        del self.lost["a"][:]
        a._loop.stop()  # a dies: no more rounds
        # Not expired yet: nobody takes them.
        b.tick()
        self.assertEqual(len(b.owned), 4)
        for bucket, epoch in held_by_a.items():
            self.assertTrue(self.run_sql(store.holds, bucket, "a", epoch))
        self.age("a", LEASE)
        b.tick()
        self.assertEqual(len(b.owned), BUCKETS)
        for bucket, epoch in held_by_a.items():
            self.assertEqual(b.owned[bucket].epoch, epoch + 1)
            self.assertFalse(self.run_sql(store.holds, bucket, "a", epoch))
            self.assertTrue(self.run_sql(store.holds, bucket, "b", epoch + 1))
        # On its own monotonic clock a stopped using them a margin before they expired.
        self.clock.advance(LEASE - a.margin)
        self.assertEqual(a.owned, {})
        self.assertEqual(sorted(self.lost["a"]), sorted(held_by_a))

    def test_clean_stop_hands_over_at_once(self) -> None:
        """A node stopping cleanly releases its buckets in one transaction: the next
        round of another node takes them at once, without waiting for an expiry."""
        a = self.manager("a")
        b = self.manager("b")
        a.tick()
        b.tick()
        del self.lost["a"][:]
        a.stopService()
        self.assertEqual(sorted(self.lost["a"]), [0, 1, 2, 3])
        self.assertFalse(a.may_send(0))
        b.tick()
        self.assertEqual(sorted(b.owned), list(range(BUCKETS)))
        status = self.run_sql(store.cluster_status)
        self.assertEqual([(n.name, n.stopped) for n in status.nodes], [("a", True), ("b", False)])
        self.assertEqual({b.owned[bucket].epoch for bucket in range(4)}, {2})
        # a's leases: 4-7 given up when b joined, 0-3 at its stop; all released cleanly.
        released = [lease.bucket for lease in self.run_sql(store.lease_history) if lease.released]
        self.assertEqual(sorted(released), list(range(BUCKETS)))

    def test_stops_sending_when_it_cannot_renew(self) -> None:
        """The database fails: the node keeps its leases until lease - margin after the
        last round that succeeded started, then stops sending on all of them, while
        the database still shows them valid (it stopped first). Once the database
        answers again it renews them at the same epoch (nobody took them)."""
        a = self.manager("a")
        real = a.database
        a.database = Failing()  # type: ignore[assignment]
        self.clock.advance(a.renew_interval)
        self.clock.advance(a.renew_interval)
        self.assertTrue(a.may_send(0))
        self.assertEqual(self.lost["a"], [])
        self.clock.advance(LEASE - a.margin - 2 * a.renew_interval)
        self.assertFalse(a.may_send(0))
        self.assertEqual(sorted(self.lost["a"]), list(range(BUCKETS)))
        self.assertEqual(a.failed_rounds, 2)
        self.assertTrue(self.run_sql(store.holds, 0, "a", 1))  # not expired on the database
        a.database = real
        gained: list[dict[int, int]] = []
        a.on_gained = gained.append
        a.tick()
        self.assertEqual(gained, [dict.fromkeys(range(BUCKETS), 1)])

    def test_fence_tokens(self) -> None:
        """A lane's token is its bucket and the epoch held; after a takeover the old
        token fails the check inside a transaction (rolled back, counted), and the old
        owner's own clock had already made it stop sending."""
        a = self.manager("a")
        fence = BucketFence(a)
        lane = "lab:127.0.0.1:7001"
        bucket = store.bucket_of(lane, BUCKETS)
        token = fence.token(lane)
        self.assertEqual(token, Token(bucket, 1))
        self.assertTrue(fence.may_send(token))
        self.run_sql(fence.check, token)  # passes: no exception
        lanes = [f"lane{n}" for n in range(40)]
        inside = fence.lanes_in([bucket], lanes)
        self.assertTrue(inside)
        self.assertEqual(inside, [x for x in lanes if store.bucket_of(x, BUCKETS) == bucket])
        a._loop.stop()  # a stalls
        self.age("a", LEASE)
        b = self.manager("b")
        self.assertEqual(b.owned[bucket].epoch, 2)
        with self.assertRaises(FencedError):
            self.run_sql(fence.check, token)
        self.assertEqual(fence.rejected, 1)
        self.clock.advance(LEASE - a.margin)
        self.assertFalse(fence.may_send(token))
        self.assertIsNone(fence.token(lane))
        self.assertEqual(BucketFence(b).token(lane), Token(bucket, 2))

    def test_node_name_in_use(self) -> None:
        """A second process under the name of a live node is refused; after a clean stop
        of the first the name is free again."""
        a = self.manager("a")
        again = self.manager("a")
        self.assertIsNotNone(again.refused)
        self.assertEqual(again.owned, {})
        self.assertEqual(len(a.owned), BUCKETS)
        a.stopService()
        later = self.manager("a")
        self.assertIsNone(later.refused)
        self.assertEqual(len(later.owned), BUCKETS)


class Inline:
    """``callFromThread`` that calls at once (the test's callbacks are thread-safe)."""

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        function(*args)


class Failing:
    """A database whose every transaction fails (PostgreSQL unreachable)."""

    def transaction(self, *_args: Any) -> Any:
        return fail(RuntimeError("connection lost"))


class SQLiteFile(_Base):
    """One SQLite file (``self.path``) for every ``new_engine``. Mixed in before a fixture."""

    def new_engine(self) -> Engine:
        if not hasattr(self, "path"):
            self.path = f"{os.path.abspath(self.mktemp())}.db"
        return make_engine(f"sqlite:///{self.path}")


class SQLiteLeaseTests(SQLiteFile, LeaseContract, SynchronousTestCase):
    """On SQLite the gateway never runs in cluster mode; the SQL is the same."""

    def status(self, *options: str) -> str:
        config = os.path.abspath(self.mktemp()) + ".toml"
        with open(config, "w", encoding="utf-8") as file:
            file.write(f'[gateway]\ndatabase = "sqlite:///{self.path}"\n')
        out = io.StringIO()
        self.assertEqual(main(["--config", config, "cluster", "status", *options], out), 0)
        return out.getvalue()

    def test_status_command(self) -> None:
        """``udsgateway cluster status``: live and stopped nodes, buckets per node as
        ranges, heartbeat ages; ``--buckets`` each lease's owner, epoch and expiry."""
        a, b = self.manager("a"), self.manager("b")
        a.tick()
        b.tick()
        c = self.manager("c")
        c.stopService()
        text = self.status()
        lines = text.splitlines()
        self.assertRegex(lines[0], r"^2 of 3 nodes live, 8 buckets, 0 without a valid lease;")
        self.assertEqual(
            lines[2].split(), ["NODE", "STATE", "BUCKETS", "HELD", "HEARTBEAT", "JOINED"]
        )
        self.assertEqual(lines[3].split()[:4], ["a", "live", "4", "0-3"])
        self.assertEqual(lines[4].split()[:4], ["b", "live", "4", "4-7"])
        self.assertEqual(lines[5].split()[:3], ["c", "stopped", "0"])
        rows = [json.loads(line) for line in self.status("--buckets", "--json").splitlines()]
        self.assertEqual([row["owner"] for row in rows], ["a"] * 4 + ["b"] * 4)
        self.assertEqual([row["epoch"] for row in rows], [1] * 4 + [2] * 4)
        self.assertTrue(all(5.0 < float(row["expires_in"][:-1]) <= 15.0 for row in rows))
        b.stopService()
        self.assertIn("1 of 3 nodes live, 8 buckets, 4 without a valid lease (4-7)", self.status())

    def test_status_of_a_single_gateway_database(self) -> None:
        """A database no node ever ran on in cluster mode says so."""
        self.path = f"{os.path.abspath(self.mktemp())}.db"
        self.assertEqual(
            self.status(), "not a cluster database: no node ever ran in cluster mode on it\n"
        )


class PostgreSQLSchema(_Base):
    """A throwaway schema on a real PostgreSQL, dropped at cleanup; each ``new_engine``
    a session of its own in it. Mixed in before a fixture."""

    def setUp(self) -> None:
        self.schema = f"udsgw_{uuid.uuid4().hex[:12]}"
        admin = create_engine(POSTGRES_URL)
        try:
            with admin.begin() as connection:
                connection.execute(text(f"CREATE SCHEMA {self.schema}"))
        except Exception as error:
            if os.environ.get("CI"):
                raise
            raise SkipTest(f"no PostgreSQL at {POSTGRES_URL}: {type(error).__name__}") from None
        self.engines: list[Engine] = []

        def drop() -> None:
            for engine in self.engines:
                engine.dispose()
            with admin.begin() as connection:
                connection.execute(text(f"DROP SCHEMA {self.schema} CASCADE"))
            admin.dispose()

        self.addCleanup(drop)
        super().setUp()

    def new_engine(self) -> Engine:
        engine = create_engine(
            POSTGRES_URL, connect_args={"options": f"-c search_path={self.schema}"}
        )
        self.engines.append(engine)
        return engine


class PostgreSQLLeaseTests(PostgreSQLSchema, LeaseContract, SynchronousTestCase):
    """On a real PostgreSQL, in a throwaway schema; each manager its own session."""

    def test_notify_wakes_the_other_node_at_once(self) -> None:
        """A clean stop announces itself (NOTIFY); the other node's listener hears it
        and its round runs at once, taking the buckets without waiting for its timer."""
        tag = uuid.uuid4().hex[:8]
        a, b = self.manager(f"a{tag}"), self.manager(f"b{tag}")
        a.tick()
        b.tick()
        heard: list[str] = []
        left = threading.Event()

        def on_notify(payload: str) -> None:
            heard.append(payload)
            if payload == f"left a{tag}":
                left.set()

        listener = NotifyListener(self.new_engine(), Inline(), on_notify)  # type: ignore[arg-type]
        listener.start()
        self.addCleanup(listener.stop)
        self.assertTrue(listener.listening.wait(10))
        self.assertEqual(len(b.owned), 4)
        a.stopService()
        self.assertTrue(left.wait(10), heard)
        b.poke(f"left a{tag}")  # what the service's callback does, in the reactor
        self.clock.advance(0)  # the poke's round, well before the next renewal
        self.assertEqual(len(b.owned), BUCKETS)

    def test_fenced_transaction_holds_off_a_takeover(self) -> None:
        """While a fenced transaction (a claim, an outcome) is in flight, its lease row
        is share-locked: the takeover's UPDATE cannot run until it ends."""
        from sqlalchemy.exc import OperationalError

        a = self.manager("a")
        fence = BucketFence(a)
        token = fence.token("lane")
        assert isinstance(token, Token)
        engine = self.new_engine()
        with engine.connect() as in_flight:
            fence.check(in_flight, token)  # the transaction stays open
            with engine.connect() as other, self.assertRaises(OperationalError) as raised:
                other.execute(text("SET LOCAL lock_timeout = '200ms'"))
                other.execute(
                    text("UPDATE cluster_buckets SET epoch = epoch + 1 WHERE bucket = :b"),
                    {"b": token.bucket},
                )
            self.assertIn("lock timeout", str(raised.exception))
            in_flight.rollback()
        with engine.begin() as other:  # once it ended, the row can be taken
            other.execute(text("SET LOCAL lock_timeout = '200ms'"))
            other.execute(
                text("UPDATE cluster_buckets SET owner = NULL WHERE bucket = :b"),
                {"b": token.bucket},
            )

    def test_racing_rounds_never_share_a_bucket(self) -> None:
        """Three nodes run rounds at the same time in three threads, giving buckets
        up and taking them over and over: no bucket ever had two owners at once
        (the lease history), and every bucket ends with exactly one owner."""
        share_of = {"a": 8, "b": 0, "c": 0}
        errors: list[BaseException] = []

        def node(name: str) -> None:
            database = Database(self.new_engine(), InlineRunner())
            instance = uuid.uuid4().hex
            try:
                for turn in range(15):
                    # Shares that move every turn: each round takes or gives up buckets.
                    wanted = (turn + "abc".index(name)) % 4 + 1

                    def share(*_args: Any, wanted: int = wanted) -> Any:
                        return wanted, wanted

                    result = database.transaction_now(
                        store.heartbeat_round, name, instance, 60.0, share
                    )
                    share_of[name] = len(result.owned)
            except BaseException as error:
                errors.append(error)
            finally:
                database.close()

        threads = [threading.Thread(target=node, args=(name,)) for name in "abc"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        history = self.run_sql(store.lease_history)
        self.assertGreater(len(history), BUCKETS)  # buckets did move
        self.assertEqual(store.overlaps(history), [])
        owners = self.owners()
        held = {name: sorted(b for b, o in owners.items() if o == name) for name in "abc"}
        self.assertEqual({name: len(buckets) for name, buckets in held.items()}, share_of)
