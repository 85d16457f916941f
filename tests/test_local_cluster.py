"""Tests for udsgateway.testing.cluster, the files ``make cluster`` generates.

The processes are started by tests/integration/test_haproxy.py (one gateway
behind HAProxy, and ``haproxy -c`` on these files) and
tests/integration/test_local_cluster.py (three nodes on PostgreSQL).
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from udsgateway.config import parse_config
from udsgateway.testing.cluster import (
    ClusterPlan,
    LocalCluster,
    banner,
    flows_for,
    haproxy_config,
    node_config,
    plan,
    write_files,
)

REPO = Path(__file__).resolve().parents[1]
DEMO_FLOWS = REPO / "etc" / "flows" / "demo.toml"


def demo_plan(directory: Path, **settings: object) -> ClusterPlan:
    return plan(directory, flows=DEMO_FLOWS, base_port=2580, **settings)  # type: ignore[arg-type]


class PlanTests(SynchronousTestCase):
    def test_fixed_ports(self) -> None:
        """base_port: HAProxy on it, the nodes on the next ports, admin 100 above."""
        the_plan = demo_plan(Path(self.mktemp()))
        self.assertEqual((the_plan.port, the_plan.stats_port), (2580, 2584))
        self.assertEqual(
            [(n.name, n.port, n.admin_port) for n in the_plan.nodes],
            [("node1", 2581, 2681), ("node2", 2582, 2682), ("node3", 2583, 2683)],
        )

    def test_free_ports_all_different(self) -> None:
        the_plan = plan(Path(self.mktemp()), flows=DEMO_FLOWS, nodes=3)
        ports = [the_plan.port, the_plan.stats_port]
        ports += [p for n in the_plan.nodes for p in (n.port, n.admin_port)]
        self.assertEqual(len(set(ports)), 8)
        self.assertNotIn(0, ports)


class NodeConfigTests(SynchronousTestCase):
    def test_node_config_is_a_valid_cluster_node(self) -> None:
        """Each node: cluster mode on the plan's database, admin on loopback, the tenant
        behind the PROXY protocol from HAProxy's address only."""
        the_plan = demo_plan(Path(self.mktemp()), lease_time=6.0, buckets=16)
        write_files(the_plan)
        node = the_plan.nodes[1]
        path = the_plan.run_dir / "node2.toml"
        config = parse_config(path.read_text(), str(path))
        self.assertEqual(config.node_name, "node2")
        self.assertEqual(config.database, the_plan.database)
        self.assertEqual(
            (config.cluster.enabled, config.cluster.buckets, config.cluster.lease_time),
            (True, 16, 6.0),
        )
        self.assertTrue(config.admin.enabled)
        self.assertEqual(config.admin.listen, f"tcp:port={node.admin_port}:interface=127.0.0.1")
        [tenant] = config.tenants
        self.assertEqual(tenant.listen, f"haproxy:tcp:port={node.port}:interface=127.0.0.1")
        self.assertEqual(tenant.proxies, (ipaddress.ip_network("127.0.0.1/32"),))
        self.assertEqual(tenant.flow_files, (str(the_plan.run_dir / "flows.toml"),))

    def test_single_gateway_has_no_cluster_section(self) -> None:
        the_plan = demo_plan(Path(self.mktemp()), cluster=False, allow=("127.0.0.2",))
        text = node_config(the_plan, the_plan.nodes[0])
        self.assertNotIn("[cluster]", text)
        [tenant] = parse_config(text, str(Path(self.mktemp()) / "n.toml")).tenants
        self.assertEqual(tenant.allow, (ipaddress.ip_network("127.0.0.2/32"),))


class HAProxyConfigTests(SynchronousTestCase):
    def test_servers_with_proxy_header_and_readyz_checks(self) -> None:
        the_plan = demo_plan(Path(self.mktemp()), check_interval=0.5)
        text = haproxy_config(the_plan)
        self.assertIn("    mode tcp\n", text)
        self.assertIn("    bind 127.0.0.1:2580\n", text)
        self.assertIn("    option httpchk GET /readyz\n", text)
        self.assertIn("    default-server inter 500ms fall 2 rise 1 send-proxy-v2\n", text)
        servers = [line.split() for line in text.splitlines() if line.startswith("    server ")]
        self.assertEqual(
            servers,
            [
                ["server", f"node{n}", f"127.0.0.1:{2580 + n}", "check", "port", str(2680 + n)]
                for n in (1, 2, 3)
            ],
        )

    def test_v1_when_asked(self) -> None:
        text = haproxy_config(demo_plan(Path(self.mktemp()), send_proxy="send-proxy"))
        self.assertIn(" send-proxy\n", text)
        self.assertNotIn("send-proxy-v2", text)


class FlowsTests(SynchronousTestCase):
    def test_every_destination_goes_to_the_receiver(self) -> None:
        the_plan = demo_plan(Path(self.mktemp()), destination_port=39999)
        document = tomllib.loads(flows_for(the_plan))
        original = tomllib.loads(DEMO_FLOWS.read_text())
        self.assertEqual(len(document["flows"]), len(original["flows"]))
        actions = [a for flow in document["flows"] for a in flow.get("actions", [])]
        self.assertTrue(actions)
        self.assertEqual({(a["host"], a["port"]) for a in actions}, {("127.0.0.1", 39999)})
        self.assertEqual(
            document["flows"][0]["actions"][0]["template"],
            original["flows"][0]["actions"][0]["template"],
        )

    def test_flows_of_another_tenant_refused(self) -> None:
        with self.assertRaises(ValueError):
            flows_for(demo_plan(Path(self.mktemp()), tenant="other"))


class BannerTests(SynchronousTestCase):
    def test_says_where_to_send_and_how_to_see_status(self) -> None:
        the_plan = demo_plan(Path(self.mktemp()))
        text = banner(LocalCluster(the_plan))
        self.assertIn("send HL7 (MLLP or plain TCP) to 127.0.0.1:2580", text)
        self.assertIn(f"--config {the_plan.run_dir / 'node1.toml'} cluster status", text)
        self.assertIn("Ctrl-C stops everything", text)
