"""``make cluster`` for real: three gateway nodes on PostgreSQL behind HAProxy.

``LocalCluster`` (what ``make cluster`` runs) starts a receiver, three nodes
in cluster mode on a throwaway database (8 buckets, a lease time of 3 s) and
HAProxy sending the PROXY protocol v2. Messages sent through HAProxy, each on
a new connection (so ``leastconn`` spreads them over the nodes), are all
ACKed and all delivered once; ``udsgateway cluster status`` shows three live
nodes sharing the buckets; a stop ends every process cleanly, each node
handing its buckets over.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import DEMO_FLOWS, new_directory, sample_message
from tests.integration.postgres import new_database
from tests.integration.test_haproxy import delivered, haproxy_or_skip, msa, send_from, wait_for
from udsgateway.testing.cluster import LocalCluster, free_port, plan

MESSAGES = 30


class LocalClusterTests(SynchronousTestCase):
    def test_three_nodes_behind_haproxy(self) -> None:
        haproxy_or_skip()
        url = new_database(self)
        cluster = LocalCluster(
            plan(
                new_directory(self) / "run",
                database=url,
                nodes=3,
                destination_port=free_port(),
                flows=DEMO_FLOWS,
                buckets=8,
                lease_time=3.0,
                check_interval=0.5,
                held_poll=0.5,
            )
        )
        self.addCleanup(cluster.stop)
        cluster.start()
        port = cluster.plan.port
        wait_for(lambda: send_from("127.0.0.1", port, sample_message("CLU0")) is not None, "up")
        started = time.monotonic()
        codes = [
            msa(send_from("127.0.0.1", port, sample_message(f"CLU{n}")))
            for n in range(1, MESSAGES)
        ]
        self.assertEqual(codes, ["AA"] * (MESSAGES - 1))
        wait_for(lambda: delivered(cluster) >= MESSAGES, f"{MESSAGES} deliveries")
        print(f"{MESSAGES} messages ACKed and delivered in {time.monotonic() - started:.1f} s")

        status = subprocess.run(
            [*cluster.status_command(), "--json"], capture_output=True, text=True, timeout=120
        )
        self.assertEqual(status.returncode, 0, status.stdout + status.stderr)
        nodes = [json.loads(line) for line in status.stdout.splitlines() if line.strip()]
        self.assertEqual(sorted(n["node"] for n in nodes), ["node1", "node2", "node3"], nodes)
        self.assertEqual({n["state"] for n in nodes}, {"live"}, nodes)

        self.assertEqual(delivered(cluster), MESSAGES)  # each once
        statuses = cluster.stop()
        for name in ("node1", "node2", "node3"):
            self.assertIn(statuses[name], (0, -signal.SIGTERM), cluster.nodes[name].log_text())
