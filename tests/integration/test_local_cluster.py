"""``make cluster`` for real: three gateway nodes on PostgreSQL behind HAProxy.

``LocalCluster`` (what ``make cluster`` runs) starts a receiver, three nodes
in cluster mode on a throwaway database (8 buckets, a lease time of 3 s) and
HAProxy sending the PROXY protocol v2. Messages sent through HAProxy, each on
a new connection (so ``leastconn`` spreads them over the nodes), are all
ACKed and all delivered once, and every node took some; ``udsgateway cluster
status`` shows three live nodes. Then one node is killed (``kill -9``): the
senders keep getting AA through HAProxy, and every message is delivered (the
dead node's buckets move once their leases expire). A stop ends the other
processes cleanly, each node handing its buckets over.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import DEMO_FLOWS, new_directory, sample_message
from tests.integration.postgres import new_database
from tests.integration.test_haproxy import delivered, haproxy_or_skip, msa, send_from, wait_for
from udsgateway.testing.cluster import LocalCluster, free_port, plan

MESSAGES = 30


def delivered_ids(cluster: LocalCluster) -> set[str]:
    """MSH-10 of the messages the receiver answered (each once, duplicates or not)."""
    assert cluster.receiving is not None
    return set(re.findall(r" (\S+) \d+ AA mllp$", cluster.receiving.log_text(), re.MULTILINE))


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
        sessions = cluster.haproxy_sessions()
        self.assertEqual(sorted(sessions), ["node1", "node2", "node3"])
        self.assertTrue(all(count > 0 for count in sessions.values()), sessions)

        # kill -9 a node: HAProxy sends new connections to the others (a refused
        # connection is redispatched before the health check marks the node down);
        # its buckets move once their leases expire; every message is delivered.
        cluster.nodes["node2"].stop(signal.SIGKILL)
        started = time.monotonic()
        codes = [
            msa(send_from("127.0.0.1", port, sample_message(f"AFTER{n}"))) for n in range(MESSAGES)
        ]
        self.assertEqual(codes, ["AA"] * MESSAGES)
        wait_for(lambda: len(delivered_ids(cluster)) >= 2 * MESSAGES, "deliveries after the kill")
        print(f"after kill -9: all delivered {time.monotonic() - started:.1f} s after the kill")

        statuses = cluster.stop()
        for name in ("node1", "node3"):
            self.assertIn(statuses[name], (0, -signal.SIGTERM), cluster.nodes[name].log_text())
