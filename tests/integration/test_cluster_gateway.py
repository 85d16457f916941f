"""Two real gateway nodes in cluster mode on one throwaway PostgreSQL database.

Each node is a ``twistd udsgateway`` process with ``[cluster] enabled = true``
(16 buckets, a lease time of 4 s), its own listener, and the same flow: two
chained actions, each to a ``udsgateway receive`` process, one lane per patient
(``ordering_key = "PID-3.1"``). Senders spread each patient's numbered messages
over both nodes, one at a time (each waits for its ACK), so that a message of a
patient is received by one node after the previous one was ACKed by the other.
The test shows, at both receivers:

* every ACKed message delivered, and per patient in the order sent (first
  arrivals: a duplicate is allowed only after a failover);
* a flow whose ACK waits for its action ("after actions") answers AA on
  either node, whichever node ran the action;
* SIGTERM of a node: it hands its buckets over and the other delivers its
  lanes (the messages sent afterwards too);
* kill -9 of a node right after it ACKed messages: the other takes its buckets
  once the leases expired, and nothing ACKed is lost;
* a node is refused (exit 2) beside a single gateway (not in cluster mode),
  and a single gateway beside the nodes, naming the cluster; so is a second
  process under the name of a live node (exit 1), which leaves that node's
  buckets alone.

The backup polls (``[delivery].held_poll``) are set longer than the test: every
hand-over of work between the nodes is by NOTIFY.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from sqlalchemy import create_engine
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    GatewayProcess,
    msa,
    new_directory,
    send_mllp,
    start_gateway,
    write_config,
)
from tests.integration.postgres import new_database, scalar, use_database
from tests.integration.test_flows_e2e import Receiver, fields, inbound, wait_until
from udsgateway.store import leases as store

TENANT = "clu"
FLOW_ID = "FLWCLUSTER"
LEASE = 4.0
BUCKETS = 16
PATIENTS = [f"P{n}" for n in range(1, 7)]
TIMEOUT = 60.0
#: The dispatcher's sweep and the executor's poll: longer than the whole test, so
#: that only the announcements (NOTIFY) can hand work to the node that owns it.
HELD_POLL = 600


def flow_file(first_port: int, second_port: int) -> str:
    sample = inbound("ADT^A04", "SAMPLE", "P0", "Doe^John").decode().replace("\r", "\n")
    lines = [
        'app_id = "APPCLUSTER001"',
        'name = "Cluster"',
        f'tenant = "{TENANT}"',
        "",
        "[[flows]]",
        f'flow_id = "{FLOW_ID}"',
        'name = "cluster relay"',
        "[flows.trigger]",
        'message_type = "ADT^A04"',
        f"sample = '''\n{sample}'''",
    ]
    for name, port in (("first", first_port), ("second", second_port)):
        lines += [
            "",
            "[[flows.actions]]",
            f'name = "{name}"',
            'host = "127.0.0.1"',
            f"port = {port}",
            'message_type = "ADT^A04"',
            'ordering_key = "PID-3.1"',
            "connect_timeout = 2",
            "backoff_initial = 0.2",
            "backoff_max = 1",
            "template = '''\n"
            f"MSH|^~\\&|UDSGATEWAY|CLU|{name.upper()}|FAC|{{{{ now }}}}||ADT^A04"
            "|{{ control_id }}|P|2.5\n"
            'PID|1||{{ msg["PID-3.1"] }}\n'
            'ZTR|{{ msg["MSH-10"] }}\n'
            "'''",
        ]
    # A second flow whose ACK waits for its action ("after actions"): the action
    # often runs on the other node, which must tell the receiving node it finished.
    sample = inbound("ADT^A08", "SAMPLE", "Q0", "Doe^John").decode().replace("\r", "\n")
    lines += [
        "",
        "[[flows]]",
        f'flow_id = "{FLOW_ID}AA"',
        'name = "cluster relay, ACK after actions"',
        "[flows.trigger]",
        'message_type = "ADT^A08"',
        'ack = "after_actions"',
        f"ack_timeout = {TIMEOUT}",
        f"sample = '''\n{sample}'''",
        "",
        "[[flows.actions]]",
        'name = "first"',
        'host = "127.0.0.1"',
        f"port = {first_port}",
        'message_type = "ADT^A08"',
        'ordering_key = "PID-3.1"',
        "connect_timeout = 2",
        "backoff_initial = 0.2",
        "backoff_max = 1",
        "template = '''\n"
        "MSH|^~\\&|UDSGATEWAY|CLU|FIRST|FAC|{{ now }}||ADT^A08|{{ control_id }}|P|2.5\n"
        'PID|1||{{ msg["PID-3.1"] }}\n'
        'ZTR|{{ msg["MSH-10"] }}\n'
        "'''",
    ]
    return "\n".join(lines) + "\n"


def node_config(directory: Path, url: str, name: str, flows: Path | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, {TENANT: 0}, {TENANT: [flows] if flows else []})
    use_database(
        config,
        url,
        f"[cluster]\nenabled = true\nbuckets = {BUCKETS}\nlease_time = {LEASE}\n"
        # The backup polls out of the way: work reaches the other node by NOTIFY.
        f"[delivery]\nheld_poll = {HELD_POLL}\n",
    )
    text = config.read_text(encoding="utf-8").replace(
        'node_name = "integration"', f'node_name = "{name}"'
    )
    config.write_text(text, encoding="utf-8")
    return config


def arrivals(receiver: Receiver, prefix: str = "S") -> list[tuple[str, int]]:
    """(patient, number) of each message received whose trigger's MSH-10 starts with
    ``prefix``, in arrival order."""
    found = []
    for message in receiver.messages():
        trigger = fields(message, "ZTR")[1]  # S<patient>-<number>
        if trigger.startswith(prefix):
            patient, number = trigger[len(prefix) :].split("-")
            found.append((patient, int(number)))
    return found


class ClusterGatewayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.url = new_database(self)
        self.directory = new_directory(self)
        self.first, self.second = Receiver(self.directory), Receiver(self.directory)
        for receiver in (self.first, self.second):
            self.addCleanup(receiver.stop)
            receiver.start()
        flows = self.directory / "cluster.toml"
        flows.write_text(flow_file(self.first.port, self.second.port), encoding="utf-8")
        self.configs = {
            "node1": node_config(self.directory / "node1", self.url, "node1", flows),
            "node2": node_config(self.directory / "node2", self.url, "node2", None),
        }
        self.sent: dict[str, list[int]] = {patient: [] for patient in PATIENTS}
        self.nodes: dict[str, GatewayProcess] = {}
        self.engine = create_engine(self.url)
        self.addCleanup(self.engine.dispose)

    def logs(self) -> str:
        return "\n".join(f"--- {n}:\n{p.log_text()}" for n, p in self.nodes.items())

    def start(self, name: str) -> GatewayProcess:
        node = start_gateway(self, self.configs[name])
        self.nodes[name] = node
        return node

    def held(self) -> dict[str, int]:
        with self.engine.begin() as connection:
            status = store.cluster_status(connection)
        counts: dict[str, int] = {}
        if status is not None:
            for lease in status.buckets:
                if lease.owner is not None and lease.expires_at > status.now:
                    counts[lease.owner] = counts.get(lease.owner, 0) + 1
        return counts

    def send(self, rounds: int, names: list[str]) -> None:
        """``rounds`` more numbered messages per patient, spread over the nodes
        ``names``; each ACKed (AA) before the next is sent."""
        for _round in range(rounds):
            for index, patient in enumerate(PATIENTS):
                number = len(self.sent[patient]) + 1
                node = self.nodes[names[(number + index) % len(names)]]
                control_id = f"S{patient}-{number}"
                ack = send_mllp(node.port, inbound("ADT^A04", control_id, patient, "Doe^John"))
                assert ack is not None, self.logs()
                self.assertEqual(msa(ack), ("AA", control_id))
                self.sent[patient].append(number)

    def check_delivered(self) -> dict[str, int]:
        """Wait until each receiver has every message sent; check the order of first
        arrivals per patient; return the duplicates per receiver."""
        total = sum(len(numbers) for numbers in self.sent.values())

        def complete(receiver: Receiver) -> bool:
            return len(set(arrivals(receiver))) >= total

        wait_until(
            lambda: complete(self.first) and complete(self.second),
            f"{total} messages at each receiver",
            timeout=TIMEOUT,
            log=self.logs,
        )
        duplicates = {}
        for name, receiver in (("first", self.first), ("second", self.second)):
            seen = arrivals(receiver)
            firsts: dict[str, list[int]] = {patient: [] for patient in PATIENTS}
            for patient, number in seen:
                if number not in firsts[patient]:
                    firsts[patient].append(number)
            self.assertEqual(firsts, self.sent, f"{name}: first arrivals per patient")
            duplicates[name] = len(seen) - len(set(seen))
        return duplicates

    def single_gateway(self) -> GatewayProcess:
        """A gateway alone (not in cluster mode) on the nodes' database."""
        single = self.directory / "single"
        single.mkdir(exist_ok=True)
        config = write_config(single, {TENANT: 0})
        use_database(config, self.url)
        return start_gateway(self, config, wait=False)

    def test_refusals(self) -> None:
        """A node beside a single gateway (the shared lock), a single gateway beside a
        node (naming the cluster), and a second process under a live node's name (at
        its first round, leaving that node's buckets alone): each exits at start."""
        alone = self.single_gateway()
        alone.wait_ready()
        refused = start_gateway(self, self.configs["node1"], wait=False)
        self.assertEqual(refused.wait_exit(), 2, refused.log_text())
        self.assertIn("database is in use by another gateway", refused.log_text())
        alone.send_signal(signal.SIGTERM)
        alone.wait_exit()

        self.start("node1")
        wait_until(
            lambda: self.held() == {"node1": BUCKETS},
            "node1 holding every bucket",
            timeout=TIMEOUT,
            log=self.logs,
        )
        refused = self.single_gateway()
        self.assertEqual(refused.wait_exit(), 2, refused.log_text())
        self.assertIn("the nodes of a cluster", refused.log_text())

        twin = start_gateway(self, self.configs["node1"], wait=False)
        self.assertEqual(twin.wait_exit(), 1, twin.log_text())
        self.assertIn("node name 'node1' is in use by another running gateway", twin.log_text())
        self.assertEqual(self.held(), {"node1": BUCKETS})

    def test_two_nodes_relay_and_fail_over(self) -> None:
        node1 = self.start("node1")
        self.start("node2")
        for receiver in (self.first, self.second):
            receiver.wait_ready()
        wait_until(
            lambda: sorted(self.held().values()) == [BUCKETS // 2, BUCKETS // 2],
            "both nodes holding buckets",
            timeout=TIMEOUT,
            log=self.logs,
        )
        # Both nodes relay, each patient's messages alternating between them.
        self.send(5, ["node1", "node2"])
        self.assertEqual(self.check_delivered(), {"first": 0, "second": 0})

        # "After actions" ACKs: AA once the action finished, on whichever node.
        for number in (1, 2):
            for index, patient in enumerate(("Q1", "Q2", "Q3", "Q4")):
                node = self.nodes[("node1", "node2")[(number + index) % 2]]
                control_id = f"A{patient}-{number}"
                ack = send_mllp(node.port, inbound("ADT^A08", control_id, patient, "Doe^John"))
                assert ack is not None, self.logs()
                self.assertEqual(msa(ack), ("AA", control_id), self.logs())
        self.assertEqual(
            sorted(arrivals(self.first, "A")),
            [(f"Q{p}", n) for p in range(1, 5) for n in (1, 2)],
        )

        # SIGTERM: node1 hands its buckets over; node2 delivers every lane.
        node1.send_signal(signal.SIGTERM)
        self.assertEqual(node1.wait_exit(), -signal.SIGTERM, self.logs())  # twistd re-raises it
        wait_until(
            lambda: self.held() == {"node2": BUCKETS},
            "node2 holding every bucket",
            timeout=TIMEOUT,
            log=self.logs,
        )
        self.send(2, ["node2"])
        self.check_delivered()

        # node1 back; then kill -9 node2 right after it ACKed: nothing ACKed lost.
        self.start("node1")
        wait_until(
            lambda: sorted(self.held().values()) == [BUCKETS // 2, BUCKETS // 2],
            "node1 back with its share",
            timeout=TIMEOUT,
            log=self.logs,
        )
        self.send(3, ["node1", "node2"])
        killed_at = time.monotonic()
        self.nodes["node2"].send_signal(signal.SIGKILL)
        self.send(2, ["node1"])
        duplicates = self.check_delivered()
        print(
            f"after kill -9: all delivered {time.monotonic() - killed_at:.1f} s later,"
            f" duplicates {duplicates}"
        )
        wait_until(
            lambda: scalar(self.url, "SELECT count(*) FROM executions WHERE state != 'done'") == 0,
            "every execution done",
            timeout=TIMEOUT,
            log=self.logs,
        )
        self.assertEqual(
            scalar(self.url, "SELECT count(*) FROM messages"),
            sum(len(numbers) for numbers in self.sent.values()) + 8,
        )
