"""Smoke test of ``bench.cluster``'s latency runs (``latency``): real processes, small.

It proves the run works end to end, never speed: the load generator's fixed-rate run
through a real HAProxy (PROXY protocol v2) reaches the gateway, every ACK is verified,
the latency figures are there, and every message (warm-up included) reaches the
harness's receiver. One gateway on SQLite needs only Debian's haproxy; two nodes in
cluster mode also need the private PostgreSQL of the fault harness (root and
``/usr/lib/postgresql/*/bin``). Skipped without them, except in CI.
"""

from __future__ import annotations

import os

from bench.cluster import LATENCY_WARMUP, latency
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.cluster_harness import can_run_haproxy, can_run_private_postgres


def _skip_unless(reason: str | None) -> None:
    if reason is not None:
        if os.environ.get("CI"):
            raise AssertionError(reason)
        raise SkipTest(reason)


class LatencyRunTests(SynchronousTestCase):
    def check(self, run: dict[str, object], store: str, nodes: int, messages: int) -> None:
        self.assertEqual((run["store"], run["nodes"], run["run"]), (store, nodes, "latency"))
        self.assertTrue(run["latency_verified"], run)
        self.assertEqual((run["latency_ok"], run["latency_errors"]), (messages, {}))
        self.assertEqual((run["delivered"], run["undelivered"]), (messages + LATENCY_WARMUP, 0))
        p50, p99, highest = run["ack_p50_ms"], run["ack_p99_ms"], run["ack_max_ms"]
        assert isinstance(p50, float) and isinstance(p99, float) and isinstance(highest, float)
        self.assertTrue(0 < p50 <= p99 <= highest, run)
        rate = run["latency_msgs_per_s"]
        assert isinstance(rate, float)
        self.assertTrue(0 < rate <= 50 * 1.05, run)

    def test_one_gateway_on_sqlite_behind_haproxy(self) -> None:
        _skip_unless(can_run_haproxy())
        self.check(latency(1, 50.0, 60, "sqlite"), "sqlite", 1, 60)

    def test_two_nodes_behind_haproxy(self) -> None:
        _skip_unless(can_run_haproxy())
        _skip_unless(can_run_private_postgres())
        run = latency(2, 50.0, 60, "cluster")
        self.check(run, "cluster", 2, 60)
        per_node = run["per_node_deliveries"]
        assert isinstance(per_node, dict)
        self.assertEqual(set(per_node), {"n1", "n2"}, run)
