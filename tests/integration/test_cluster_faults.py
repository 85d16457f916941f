"""THE CLUSTER FAULT HARNESS, SHORT VERSION (part of ``make test``; 122 s at a load of 4 to 9).

The long version, with more kills, and the throughput figures: ``python -m
bench.cluster --faults`` and ``--nodes 1,2,3`` (bench/RESULTS.md, "Cluster").

Three gateway nodes in cluster mode (16 buckets, a lease time of 6 s) on a
private PostgreSQL (``tests/integration/cluster_harness.py``: initdb and pg_ctl
as the user postgres under a temporary directory, so it may be restarted), a
receiver that records every arrival and the node that wrote it, and stop-and-wait
senders spread over the nodes, with per-patient sequence numbers (one lane per
patient). After each fault, under load, the harness checks:

* nothing acknowledged to a sender is missing at the receiver;
* no order inversion among the first arrivals of each patient;
* duplicates only under the same MSH-10 and no more than the faults could leave
  in flight (one exchange per node and destination);
* every frame was written by the node that held its lane's bucket at that moment
  (the lease history), and the history never shows two owners of a bucket at once.

The scenarios: kill -9 twice; SIGSTOP longer than the lease, then SIGCONT (no
frame under the old lease after resuming); PostgreSQL stopped (as a crash) for
longer than the lease, then started (no frame once the leases could have
expired, every node delivers again); a node in a network namespace cut off from
PostgreSQL but not from the partner (it stops sending within its lease time).
Measured times are printed (trial's test.log).

They need root (PostgreSQL runs as the user postgres; namespaces need
CAP_NET_ADMIN) and ``/usr/lib/postgresql/*/bin``: skipped otherwise, except in CI.
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.cluster_harness import (
    Cluster,
    Load,
    Report,
    balancer_mode,
    can_make_namespaces,
    can_run_private_postgres,
    scenario_cut,
    scenario_kills,
    scenario_pause,
    scenario_postgres_restart,
)
from tests.integration.helpers import new_directory

LEASE = 6.0
BUCKETS = 16
#: A moved bucket's first delivery by its new owner: its lease's expiry, the
#: taker's round, the lane's start (the brief's target with a short lease: 10 s).
TAKEOVER_TARGET = 10.0
LOAD = Load(connections=6, patients=48, rate=60.0)


def _skip_unless(reason: str | None) -> None:
    if reason is not None:
        if os.environ.get("CI"):
            raise AssertionError(reason)
        raise SkipTest(reason)


class ClusterFaultsShortTests(SynchronousTestCase):
    """The short fault harness: one scenario per test, each on a fresh cluster."""

    def cluster(self, namespaced: str | None = None, haproxy: str = "") -> Cluster:
        _skip_unless(can_run_private_postgres())
        if namespaced:
            _skip_unless(can_make_namespaces())
        directory = new_directory(self)
        cluster = Cluster(
            directory,
            buckets=BUCKETS,
            lease_time=LEASE,
            namespaced=namespaced,
            haproxy=haproxy,
        )
        self.addCleanup(cluster.cleanup)
        cluster.setup()
        return cluster

    def check(self, cluster: Cluster, report: Report) -> None:
        summary = report.summary()
        summary["fault_notes"] = [fault.notes for fault in report.faults]
        print(json.dumps(summary))
        self.assertEqual(report.problems(), [], cluster.logs())
        self.assertGreater(report.acked, 100)
        self.assertEqual(report.unattributed, 0)

    def test_kill_nodes(self) -> None:
        """kill -9 under load, twice: every moved bucket delivers again within the target.
        The senders go through HAProxy when it is installed (with the PROXY protocol
        when the nodes' listeners take it), straight to the nodes otherwise."""
        cluster = self.cluster(haproxy=balancer_mode())
        report = scenario_kills(cluster, 2, LOAD)
        self.check(cluster, report)
        self.assertTrue(report.takeovers)
        self.assertLess(max(report.takeovers), TAKEOVER_TARGET, report.takeovers)
        self.assertGreater(min(report.takeovers), LEASE / 2)  # not before the lease ran out

    def test_pause_node(self) -> None:
        """SIGSTOP longer than the lease, then SIGCONT: nothing sent under the old lease."""
        cluster = self.cluster()
        report = scenario_pause(cluster, "n2", LOAD)
        self.check(cluster, report)
        (fault,) = report.faults
        self.assertEqual(fault.notes["frames_before_its_first_new_lease"], 0)
        # Its own word on resuming: the leases lapsed on its clock (a line in its log).
        self.assertGreaterEqual(report.fenced["n2 lapses"], 1)
        self.assertLess(max(report.takeovers), TAKEOVER_TARGET, report.takeovers)

    def test_restart_postgres(self) -> None:
        """PostgreSQL down (as a crash) for longer than the lease: every node stops
        sending, nothing ACKed is lost, every node delivers again after it returns."""
        cluster = self.cluster()
        report = scenario_postgres_restart(cluster, LEASE + 3.0, LOAD)
        self.check(cluster, report)
        (fault,) = report.faults
        self.assertEqual(fault.notes["frames_while_down_after_lease"], 0)
        self.assertEqual(set(fault.notes["first_frame_after_restart_s"]), set(cluster.members))
        self.assertEqual(fault.notes["buckets_re_leased_after_restart"], BUCKETS)
        # Every node fenced itself: its leases lapsed on its own clock.
        for name in cluster.members:
            self.assertGreaterEqual(report.fenced[f"{name} lapses"], 1, name)

    def test_cut_from_database(self) -> None:
        """A node cut off from PostgreSQL alone stops sending within its lease time."""
        cluster = self.cluster(namespaced="n3")
        report = scenario_cut(cluster, LOAD)
        self.check(cluster, report)
        (fault,) = report.faults
        self.assertLess(fault.notes["last_frame_after_cut_s"], LEASE)
        self.assertGreaterEqual(report.fenced["n3 lapses"], 1)
        self.assertTrue(report.per_node.get("n3"))
