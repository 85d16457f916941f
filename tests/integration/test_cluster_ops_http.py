"""A two-node cluster of real gateway processes on PostgreSQL, seen through the admin API.

Both nodes in cluster mode (short lease) with the admin API on port 0; a viewer
token in the database. Checked over HTTP: ``GET /api/v1/cluster`` lists both
nodes live and every bucket held; ``/metrics`` of the two nodes together show
each singleton job running on exactly one node, the buckets owned adding up to
all of them, and the database gauges read by one node only; after SIGTERM of
the node running the gauges the other node runs every job.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    HOST,
    STARTUP_TIMEOUT,
    GatewayProcess,
    new_directory,
    start_gateway,
    write_config,
)
from tests.integration.postgres import new_database, use_database
from tests.integration.test_admin_http import _ADMIN_LISTENING, _get
from udsgateway.cluster.singleton import JOBS
from udsgateway.testing.admin import api_token

BUCKETS = 8
LEASE = 6.0


def _wait(what: str, check: Callable[[], Any], timeout: float = STARTUP_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


class Node:
    def __init__(self, process: GatewayProcess, token: str) -> None:
        self.process = process
        self.token = token
        found = _wait("admin API listening", lambda: _ADMIN_LISTENING.search(process.log_text()))
        self.base = f"http://{HOST}:{found.group(1)}"

    def get(self, path: str) -> Any:
        status, body, _ = _get(self.base + path, self.token)
        assert status == 200, (path, status, body)
        return body

    def cluster(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.get("/api/v1/cluster"))
        return found

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(self.get("/metrics").decode())
            for sample in family.samples
        }


class ClusterOpsProcessTests(SynchronousTestCase):
    def node(self, directory: Path, url: str, name: str, token: str) -> Node:
        config = write_config(directory, {"demo": 0})
        text = config.read_text(encoding="utf-8")
        config.write_text(re.sub(r'node_name = ".*"', f'node_name = "{name}"', text))
        use_database(
            config,
            url,
            f"\n[cluster]\nenabled = true\nbuckets = {BUCKETS}\nlease_time = {LEASE}\n"
            f'\n[admin]\nenabled = true\nlisten = "tcp:port=0:interface={HOST}"\n'
            "refresh_interval = 0.5\n",
        )
        return Node(start_gateway(self, config), token)

    def test_two_nodes_through_the_api(self) -> None:
        url = new_database(self)
        token = api_token(url, "vera", "viewer", time.time())
        root = new_directory(self)
        nodes = {}
        for name in ("n1", "n2"):
            directory = root / name
            directory.mkdir()
            nodes[name] = self.node(directory, url, name, token)

        def settled() -> dict[str, Any] | None:
            found = nodes["n1"].cluster()
            live = [n for n in found.get("nodes", ()) if n["state"] == "live"]
            held = sorted(n["buckets"] for n in live)
            if len(live) == 2 and held == [BUCKETS // 2] * 2 and found["without_lease"] == "":
                return found
            return None

        found = _wait("two live nodes sharing the buckets", settled)
        self.assertTrue(found["cluster"])
        self.assertEqual(found["this_node"]["node"], "n1")
        self.assertEqual(found["bucket_count"], BUCKETS)
        self.assertEqual(set(found["singletons"]), set(JOBS))
        self.assertTrue(set(found["singletons"].values()) <= {"n1", "n2"})

        def one_runner_each() -> dict[str, Any] | None:
            scrapes = {name: node.metrics() for name, node in nodes.items()}
            running = {
                job: sum(
                    scrape.get(("udsgw_singleton_running", (("job", job), ("node", name))), 0)
                    for name, scrape in scrapes.items()
                )
                for job in JOBS
            }
            refreshed = [
                name
                for name, scrape in scrapes.items()
                if scrape.get(("udsgw_metrics_refreshed_timestamp_seconds", ()), 0) > 0
            ]
            if running == dict.fromkeys(JOBS, 1) and len(refreshed) == 1:
                return {"scrapes": scrapes, "gauges": refreshed[0]}
            return None

        seen = _wait("each job on one node, the gauges read by one", one_runner_each)
        scrapes = seen["scrapes"]
        owned = sum(
            scrapes[name][("udsgw_cluster_buckets_owned", (("node", name),))] for name in nodes
        )
        self.assertEqual(owned, BUCKETS)
        for name in nodes:
            self.assertEqual(scrapes[name][("udsgw_cluster_nodes_live", (("node", name),))], 2)

        # The node running the gauges stops cleanly: the other runs every job.
        gauges = seen["gauges"]
        other = next(name for name in nodes if name != gauges)
        nodes[gauges].process.send_signal(signal.SIGTERM)
        self.assertEqual(nodes[gauges].process.wait_exit(), -signal.SIGTERM)  # twistd re-raises

        def alone() -> dict[str, Any] | None:
            found = nodes[other].cluster()
            if found["singletons"] == dict.fromkeys(JOBS, other):
                return found
            return None

        found = _wait(f"{other} running every job", alone)
        self.assertEqual(
            {n["node"]: n["state"] for n in found["nodes"]}, {gauges: "stopped", other: "live"}
        )

        def exporting() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            scrape = nodes[other].metrics()
            refreshed = scrape.get(("udsgw_metrics_refreshed_timestamp_seconds", ()), 0)
            return scrape if refreshed > 0 else None

        scrape = _wait(f"{other} exporting the gauges", exporting)
        for job in JOBS:
            self.assertEqual(
                scrape[("udsgw_singleton_running", (("job", job), ("node", other)))], 1
            )
