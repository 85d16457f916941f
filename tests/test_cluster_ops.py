"""Cluster operations: singleton jobs, lease metrics, the cluster in the API and console.

Real LeaseManagers on one database (SQLite, and a real PostgreSQL in a
throwaway schema), on a ``task.Clock`` with the inline runner, as in
tests/test_cluster.py: a test decides when each node runs a round; a node that
"died" is aged on the database clock. Every test ends by checking the lease
history (no bucket with two owners at once).
"""

from __future__ import annotations

import io
import os

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from tests.test_admin_metrics import _Service
from tests.test_cluster import (
    BUCKETS,
    LEASE,
    Failing,
    LeaseFixture,
    PostgreSQLSchema,
    SQLiteFile,
)
from udsgateway.admin.metrics import IDENTIFIER_LABELS, LABEL_ENUMS, Metrics
from udsgateway.admin.operations import Operations
from udsgateway.cli.main import main
from udsgateway.cluster.fence import BucketFence, Token
from udsgateway.cluster.leases import LeaseManager
from udsgateway.cluster.singleton import (
    GAUGES,
    JOBS,
    RETENTION,
    Singleton,
    Singletons,
    job_bucket,
)
from udsgateway.cluster.status import singleton_owners, summary
from udsgateway.config import GatewayConfig, RetentionConfig
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.interfaces import FencedError
from udsgateway.service import GatewayService
from udsgateway.store import inbound, messages
from udsgateway.store import leases as store
from udsgateway.store.engine import Database, InlineRunner, ensure_schema
from udsgateway.testing import inbound_record
from udsgateway.testing.admin import AdminClient
from udsgateway.testing.console import ConsoleClient


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


class OpsFixture(LeaseFixture):
    """The lease tests' fixture over a database with the gateway's tables too."""

    def setUp(self) -> None:
        super().setUp()
        self.run_sql(ensure_schema)


class SingletonContract(OpsFixture):
    """Singleton jobs over real lease managers; mixed into one TestCase per dialect."""

    def settled(self, *names: str) -> list[LeaseManager]:
        managers = [self.manager(name) for name in names]
        for _ in range(2):
            for manager in managers:
                manager.tick()
        return managers

    def runners(self, managers: list[LeaseManager], job: str) -> dict[str, Token]:
        """Which nodes may run ``job`` now, with their tokens."""
        found = {}
        for manager in managers:
            token = Singleton(manager, job).token()
            if token is not None:
                found[manager.node] = token
        return found

    def holder(self, managers: list[LeaseManager], job: str) -> LeaseManager:
        [name] = self.runners(managers, job)
        return next(m for m in managers if m.node == name)

    def test_exactly_one_node_runs_each_job(self) -> None:
        """Three settled nodes: for each job exactly one may run it, the owner of the
        job's bucket in the database; a fenced batch of another node is refused even
        with the holder's bucket and epoch."""
        managers = self.settled("a", "b", "c")
        status = self.run_sql(store.cluster_status)
        owners = singleton_owners(status)
        self.assertEqual(set(owners), set(JOBS))
        for job in JOBS:
            runners = self.runners(managers, job)
            self.assertEqual(list(runners), [owners[job]], job)
            [(node, token)] = runners.items()
            self.assertEqual(token.bucket, job_bucket(job, BUCKETS))
            holder = next(m for m in managers if m.node == node)
            singleton = Singleton(holder, job)
            self.assertIsNotNone(self.run_sql(singleton.fenced(store.database_now), token))
            other = Singleton(next(m for m in managers if m.node != node), job)
            with self.assertRaises(FencedError):
                self.run_sql(other.fenced(store.database_now), token)
            self.assertEqual(other.rejected, 1)

    def test_job_moves_at_a_clean_stop(self) -> None:
        """The node running the job stops cleanly: the next round of another node takes
        the job's bucket at the next epoch, and only that node runs the job."""
        managers = self.settled("a", "b", "c")
        holder = self.holder(managers, RETENTION)
        before = Singleton(holder, RETENTION).token()
        assert before is not None
        holder.stopService()
        self.assertIsNone(Singleton(holder, RETENTION).token())
        rest = [m for m in managers if m is not holder]
        for manager in rest:
            manager.tick()
        runners = self.runners(rest, RETENTION)
        self.assertEqual(len(runners), 1)
        [token] = runners.values()
        self.assertEqual(token, Token(before.bucket, before.epoch + 1))

    def test_job_moves_after_expiry_and_the_old_node_stops_first(self) -> None:
        """The node running the job stops renewing (paused, cut off): on its own clock
        it stops the job a margin before its lease can expire, while the database
        still shows the lease valid and no other node can take it; once it expired,
        another node takes it over, and a batch under the old lease is refused."""
        managers = self.settled("a", "b", "c")
        holder = self.holder(managers, RETENTION)
        old = Singleton(holder, RETENTION)
        token = old.token()
        assert token is not None
        holder._loop.stop()  # no more rounds: its leases run out
        rest = [m for m in managers if m is not holder]
        self.clock.advance(LEASE - holder.margin - 0.001)
        self.assertIsNotNone(old.token())
        self.assertEqual(self.runners(rest, RETENTION), {})
        self.clock.advance(0.001)  # its safe_until: it stops
        self.assertIsNone(old.token())
        self.assertTrue(self.run_sql(store.holds, token.bucket, holder.node, token.epoch))
        for manager in rest:
            manager.tick()
        self.assertEqual(self.runners(rest, RETENTION), {})  # not expired: nobody takes it
        self.age(holder.node, LEASE)
        for manager in rest:
            manager.tick()
        runners = self.runners(rest, RETENTION)
        self.assertEqual(list(runners.values()), [Token(token.bucket, token.epoch + 1)])
        with self.assertRaises(FencedError):
            self.run_sql(old.fenced(store.database_now), token)
        self.assertEqual(old.rejected, 1)

    def test_history_never_two_runners_at_once(self) -> None:
        """Every node tries the job at every step of a run with a crash, two joins and
        a clean stop: at each step exactly one node ran it (the crashed node, whose
        clock had not told it yet, tried and was refused), and every run happened,
        on the database clock, inside the lease (bucket, epoch) of its node in the
        lease history."""
        runs: list[tuple[int, str, int, float]] = []
        refused: list[tuple[int, str]] = []
        nodes: list[LeaseManager] = []

        def step(number: int) -> None:
            for manager in nodes:
                singleton = Singleton(manager, GAUGES)
                token = singleton.token()
                if token is None:
                    continue
                try:
                    at = self.run_sql(singleton.fenced(store.database_now), token)
                except FencedError:
                    refused.append((number, manager.node))
                    continue
                runs.append((number, manager.node, token.epoch, at))

        a = self.manager("a")
        nodes.append(a)
        step(0)
        a._loop.stop()  # a crashes; b joins and takes over once a's leases expired
        b = self.manager("b")
        nodes.append(b)
        self.assertEqual(b.owned, {})
        self.age("a", LEASE)
        b.tick()
        step(1)
        c = self.manager("c")
        nodes.append(c)
        for manager in (b, c, b, c):
            manager.tick()
        step(2)
        holder = self.holder([b, c], GAUGES)
        holder.stopService()
        for manager in (b, c):
            if manager.running:
                manager.tick()
        step(3)
        self.assertEqual([number for number, *_ in runs], [0, 1, 2, 3], runs)
        self.assertEqual({number for number, node in refused}, {1, 2, 3})
        self.assertEqual({node for number, node in refused}, {"a"})
        self.assertGreaterEqual(len({node for _, node, _, _ in runs}), 2)  # it moved
        bucket = job_bucket(GAUGES, BUCKETS)
        leases = {
            lease.epoch: lease
            for lease in self.run_sql(store.lease_history)
            if lease.bucket == bucket
        }
        for _, node, epoch, at in runs:
            lease = leases[epoch]
            self.assertEqual(lease.owner, node)
            # A run of the crashed node is as old as its aged lease (``age``).
            if node != "a":
                self.assertTrue(lease.acquired_at <= at <= lease.valid_until, (lease, at))

    # -- retention on a cluster node

    def gateway(self, manager: LeaseManager | None) -> GatewayService:
        from twisted.internet.testing import MemoryReactorClock

        config = GatewayConfig(
            path="t.toml",
            database="sqlite:///:memory:",
            tenants=(),
            retention=RetentionConfig(days=1.0, interval=300.0, batch=2),
        )
        database = Database(self.new_engine(), InlineRunner())
        self.addCleanup(database.close)
        service = GatewayService(
            config, MemoryReactorClock(), database, ControlIdSource("T"), wall=lambda: 1.0e9
        )
        # What cluster mode sets up at construction.
        service.leases = manager
        service.singletons = Singletons(manager)
        service.running = True  # _prune runs only while the service runs
        return service

    def stored(self) -> list[str]:
        return sorted(m.control_id for m in self.run_sql(messages.find_messages, "t", None))

    def prune(self, service: GatewayService) -> int:
        before = service.pruned
        done: Deferred[None] = Deferred.fromCoroutine(service._prune())
        self.successResultOf(done)
        return service.pruned - before

    def test_retention_runs_on_one_node(self) -> None:
        """Five old finished messages: a node that does not hold the retention lease
        prunes nothing; the holder prunes them all (batches of two); a single gateway
        (no lease manager) prunes as it always did."""
        self.run_sql(inbound.commit_inbound, [inbound_record(f"R{n}") for n in range(5)])
        managers = self.settled("a", "b")
        holder = self.holder(managers, RETENTION)
        other = next(m for m in managers if m is not holder)
        self.assertEqual(self.prune(self.gateway(other)), 0)
        self.assertEqual(len(self.stored()), 5)
        self.assertEqual(self.prune(self.gateway(holder)), 5)
        self.assertEqual(self.stored(), [])
        self.run_sql(inbound.commit_inbound, [inbound_record("S1")])
        self.assertEqual(self.prune(self.gateway(None)), 1)

    def test_retention_pass_of_a_node_that_lost_the_lease_is_refused(self) -> None:
        """A node whose clock has not yet told it that its lease is gone (paused, then
        resumed) tries a batch: the fencing check in the batch's transaction refuses
        it and the pass ends; nothing is deleted by it."""
        self.run_sql(inbound.commit_inbound, [inbound_record(f"R{n}") for n in range(3)])
        managers = self.settled("a", "b")
        holder = self.holder(managers, RETENTION)
        other = next(m for m in managers if m is not holder)
        holder._loop.stop()
        self.age(holder.node, LEASE)
        other.tick()
        self.assertIsNotNone(Singleton(holder, RETENTION).token())  # its clock: still held
        service = self.gateway(holder)
        self.assertEqual(self.prune(service), 0)
        self.assertEqual(len(self.stored()), 3)
        self.assertEqual(self.prune(self.gateway(other)), 3)


class SQLiteSingletonTests(SQLiteFile, SingletonContract, SynchronousTestCase):
    pass


class PostgreSQLSingletonTests(PostgreSQLSchema, SingletonContract, SynchronousTestCase):
    """On a real PostgreSQL, in a throwaway schema; each manager its own session."""


class LeaseMetricsTests(SQLiteFile, OpsFixture, SynchronousTestCase):
    def node(self, manager: LeaseManager | None) -> tuple[_Service, Metrics]:
        service = _Service()
        service.leases = manager  # type: ignore[attr-defined]
        service.singletons = Singletons(manager)  # type: ignore[attr-defined]
        return service, Metrics(service)

    def scrape(self, metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(metrics.exposition()[0])

    def transitions(self, metrics: Metrics, node: str) -> dict[str, float]:
        found = self.scrape(metrics)
        return {
            kind: found[("udsgw_lease_transitions_total", (("node", node), ("transition", kind)))]
            for kind in ("gained", "released", "lost", "lapsed")
        }

    def test_names_and_values(self) -> None:
        """Buckets owned and in all, live nodes, transitions, failed rounds, fenced
        rejections, the last round's age, and which jobs run here; every label a node
        name or a fixed enum."""
        a = self.manager("a")
        service, metrics = self.node(a)
        fence = BucketFence(a)
        service.dispatcher.fence = fence  # type: ignore[attr-defined]
        fence.rejected = 2
        service.singletons.jobs[RETENTION].rejected = 1  # type: ignore[attr-defined]
        self.clock.advance(1.5)
        found = self.scrape(metrics)
        node = (("node", "a"),)
        self.assertEqual(found[("udsgw_cluster_buckets_owned", node)], BUCKETS)
        self.assertEqual(found[("udsgw_cluster_buckets", node)], BUCKETS)
        self.assertEqual(found[("udsgw_cluster_nodes_live", node)], 1)
        self.assertEqual(found[("udsgw_lease_fenced_rejections_total", node)], 3)
        self.assertEqual(found[("udsgw_lease_failed_rounds_total", node)], 0)
        self.assertEqual(found[("udsgw_lease_round_age_seconds", node)], 1.5)
        for job in JOBS:
            self.assertEqual(
                found[("udsgw_singleton_running", (("job", job), ("node", "a")))], 1, job
            )
        self.assertEqual(
            self.transitions(metrics, "a"),
            {"gained": BUCKETS, "released": 0, "lost": 0, "lapsed": 0},
        )
        for (_name, labels), _value in found.items():
            for label, value in labels:
                if label in IDENTIFIER_LABELS:
                    continue
                self.assertIn(value, LABEL_ENUMS[label], label)

    def test_transitions(self) -> None:
        """a hands half over when b joins (released); b stops cleanly (released); a
        cannot renew and drops everything on its clock (lapsed), then gets them back."""
        a = self.manager("a")
        b = self.manager("b")
        _, metrics_a = self.node(a)
        _, metrics_b = self.node(b)
        a.tick()
        b.tick()
        self.assertEqual(
            self.transitions(metrics_a, "a"),
            {"gained": 8, "released": 4, "lost": 0, "lapsed": 0},
        )
        self.assertEqual(self.transitions(metrics_b, "b")["gained"], 4)
        b.stopService()
        self.assertEqual(self.transitions(metrics_b, "b")["released"], 4)
        a.tick()
        self.assertEqual(len(a.owned), BUCKETS)
        real = a.database
        a.database = Failing()  # type: ignore[assignment]
        for _ in range(3):  # three rounds fail; it stops a margin before the lease ends
            self.clock.advance(a.renew_interval)
        self.assertEqual(
            self.transitions(metrics_a, "a"),
            {"gained": 12, "released": 4, "lost": 0, "lapsed": 8},
        )
        self.assertEqual(
            self.scrape(metrics_a)[("udsgw_lease_failed_rounds_total", (("node", "a"),))], 3
        )
        a.database = real
        a.tick()  # renewed at the same epochs: gained back
        self.assertEqual(self.transitions(metrics_a, "a")["gained"], 20)

    def test_lost_at_a_round(self) -> None:
        """A node stalled while its leases expired and were taken finds them gone at its
        next round (lost), before its own clock told it (not lapsed)."""
        x = self.manager("x")
        x._loop.stop()
        self.age("x", LEASE)
        y = self.manager("y")
        self.assertEqual(len(y.owned), BUCKETS)
        x.tick()
        _, metrics = self.node(x)
        self.assertEqual(
            self.transitions(metrics, "x"),
            {"gained": BUCKETS, "released": 0, "lost": BUCKETS, "lapsed": 0},
        )

    def test_gauges_come_from_one_node(self) -> None:
        """The database-derived gauges are read by the node holding the gauges' lease
        only; the other exports none (a dashboard summing nodes counts each delivery
        once). A single gateway reads them as before."""
        a = self.manager("a")
        b = self.manager("b")
        a.tick()
        b.tick()
        self.run_sql(inbound.commit_inbound, [inbound_record("G1", flows=("F",))])
        holder = a if Singleton(a, GAUGES).token() else b
        other = b if holder is a else a
        for manager, expected in ((holder, True), (other, False)):
            _, metrics = self.node(manager)
            self.successResultOf(ensureDeferred(metrics.refresh(self.admin)))
            found = self.scrape(metrics)
            gauges = [key for key in found if key[0] == "udsgw_open_executions"]
            self.assertEqual(bool(gauges), expected, manager.node)
            running = found[("udsgw_singleton_running", (("job", GAUGES), ("node", manager.node)))]
            self.assertEqual(running, 1 if expected else 0)
        _, single = self.node(None)
        self.successResultOf(ensureDeferred(single.refresh(self.admin)))
        found = self.scrape(single)
        self.assertTrue([key for key in found if key[0] == "udsgw_open_executions"])
        self.assertFalse([key for key in found if key[0].startswith("udsgw_lease")])

    def test_gauges_cleared_when_the_job_moves(self) -> None:
        """A node that read the gauges and then lost the job stops exporting them."""
        a = self.manager("a")
        _, metrics = self.node(a)
        self.run_sql(inbound.commit_inbound, [inbound_record("G1", flows=("F",))])
        self.successResultOf(ensureDeferred(metrics.refresh(self.admin)))
        self.assertTrue([k for k in self.scrape(metrics) if k[0] == "udsgw_open_executions"])
        a.stopService()
        self.successResultOf(ensureDeferred(metrics.refresh(self.admin)))
        self.assertFalse([k for k in self.scrape(metrics) if k[0] == "udsgw_open_executions"])


class ClusterAPITests(SQLiteFile, OpsFixture, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.a = self.manager("a")
        self.b = self.manager("b")
        self.a.tick()
        self.b.tick()

    def client(self, manager: LeaseManager | None) -> AdminClient:
        operations = Operations(
            self.admin, self.clock, self.clock.seconds, lease_manager=lambda: manager
        )
        return AdminClient(database=self.admin, operations=operations)

    def test_viewer_reads_the_cluster(self) -> None:
        """Without credentials 401; a viewer gets the nodes, their state and buckets,
        every lease, the singletons and this node's own view."""
        client = self.client(self.a)
        viewer = client.add_user("vera", "viewer")
        self.assertEqual(client.request("GET", "/api/v1/cluster").status, 401)
        reply = client.request("GET", "/api/v1/cluster", token=viewer)
        self.assertEqual(reply.status, 200, reply.body)
        found = reply.json
        self.assertTrue(found["cluster"])
        self.assertRegex(found["database_time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(
            [(n["node"], n["state"], n["buckets"], n["held"]) for n in found["nodes"]],
            [("a", "live", 4, "0-3"), ("b", "live", 4, "4-7")],
        )
        self.assertTrue(all(0 <= n["heartbeat_age"] < LEASE for n in found["nodes"]))
        self.assertEqual((found["nodes_live"], found["bucket_count"]), (2, BUCKETS))
        self.assertEqual(found["without_lease"], "")
        self.assertEqual([row["owner"] for row in found["buckets"]], ["a"] * 4 + ["b"] * 4)
        self.assertTrue(all(0 < row["expires_in"] <= LEASE for row in found["buckets"]))
        self.assertTrue(all(row["held_for"] >= 0 for row in found["buckets"]))
        expected = {job: "a" if job_bucket(job, BUCKETS) < 4 else "b" for job in JOBS}
        self.assertEqual(found["singletons"], expected)
        this = found["this_node"]
        self.assertEqual((this["node"], this["buckets_held"], this["held"]), ("a", 4, "0-3"))
        self.assertEqual(this["last_round_age"], 0)
        self.b.stopService()
        after = client.request("GET", "/api/v1/cluster", token=viewer).json
        self.assertEqual([n["state"] for n in after["nodes"]], ["live", "stopped"])
        self.assertEqual(after["without_lease"], "4-7")

    def test_same_data_as_the_command(self) -> None:
        """The API's rows are the command's (one view: cluster.status)."""
        from udsgateway.cli.cluster import bucket_rows, node_rows

        status = self.run_sql(store.cluster_status)
        views = summary(status)
        self.assertEqual(
            [row["held"] for row in node_rows(status)], [v["held"] for v in views["nodes"]]
        )
        self.assertEqual(
            [row["owner"] for row in bucket_rows(status)], [v["owner"] for v in views["buckets"]]
        )

    def test_command_names_the_job_runners(self) -> None:
        """``udsgateway cluster status`` ends with which node runs each job."""
        config = os.path.abspath(self.mktemp()) + ".toml"
        with open(config, "w", encoding="utf-8") as file:
            file.write(f'[gateway]\ndatabase = "sqlite:///{self.path}"\n')
        out = io.StringIO()
        self.assertEqual(main(["--config", config, "cluster", "status"], out), 0)
        expected = ", ".join(
            f"{job} on {'a' if job_bucket(job, BUCKETS) < 4 else 'b'}" for job in JOBS
        )
        self.assertEqual(out.getvalue().splitlines()[-1], f"jobs: {expected}")

    def test_manhole_helper(self) -> None:
        """The manhole's ``cluster()`` calls the same facade method."""
        from types import SimpleNamespace

        from udsgateway.manhole import namespace

        operations = Operations(
            self.admin, self.clock, self.clock.seconds, lease_manager=lambda: self.b
        )
        names = namespace(SimpleNamespace(config=None), "otto", operations)
        found = self.successResultOf(names["cluster"]())
        self.assertEqual(found["this_node"]["node"], "b")
        self.assertEqual([n["node"] for n in found["nodes"]], ["a", "b"])

    def test_single_gateway_is_not_a_cluster(self) -> None:
        client = self.client(None)
        viewer = client.add_user("vera", "viewer")
        reply = client.request("GET", "/api/v1/cluster", token=viewer)
        self.assertEqual(reply.status, 200)
        self.assertIs(reply.json["cluster"], False)
        self.assertIn("not a node of a cluster", reply.json["message"])


class ClusterConsoleTests(SQLiteFile, OpsFixture, SynchronousTestCase):
    def console(self, manager: LeaseManager | None) -> ConsoleClient:
        operations = Operations(
            self.admin, self.clock, self.clock.seconds, lease_manager=lambda: manager
        )
        client = ConsoleClient.over(self.admin, self.clock, operations=operations)
        client.login("viewer")
        return client

    def test_page_lists_nodes_jobs_and_leases(self) -> None:
        a = self.manager("a")
        b = self.manager("b")
        a.tick()
        b.tick()
        page = self.console(a).get("/console/cluster")
        self.assertEqual(page.status, 200)
        body = page.body
        self.assertIn('<tr class="" data-node="a">', body)
        self.assertIn('<td data-col="held">4-7</td>', body)
        self.assertIn("This node, <strong>a</strong>, holds 4 buckets (0-3)", body)
        for job in JOBS:
            self.assertIn(f'data-job="{job}"', body)
        self.assertEqual(body.count('<tr class=""><td>'), BUCKETS)  # every lease valid
        self.assertNotIn("<script>", body)  # strict CSP: no inline script

    def test_single_gateway_page(self) -> None:
        page = self.console(None).get("/console/cluster")
        self.assertEqual(page.status, 200)
        self.assertIn("not a node of a cluster", page.body)

    def test_needs_a_login(self) -> None:
        client = ConsoleClient.over(self.admin, self.clock)
        self.assertEqual(client.get("/console/cluster").status, 303)
