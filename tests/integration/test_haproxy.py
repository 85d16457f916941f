"""A gateway behind a real HAProxy (Debian's ``haproxy``) sending the PROXY protocol.

HAProxy in TCP mode, started by the test on free ports, in front of one
gateway process whose tenant listens with ``haproxy:tcp:...``: the senders
connect from 127.0.0.2 and 127.0.0.3 (every 127/8 address is this machine's
loopback), HAProxy from 127.0.0.1. The allowlist lets 127.0.0.2 in, so the
gateway must judge the sender named by the header, not HAProxy. A sender
that reaches the gateway's port directly, without a header, is closed.
The configuration files are those of ``make cluster`` (``testing.cluster``),
with one gateway alone on SQLite.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.helpers import (
    DEMO_FLOWS,
    IO_TIMEOUT,
    _mllp_frame_end,
    _receive_until,
    new_directory,
    sample_message,
)
from udsgateway.testing import mllp
from udsgateway.testing.cluster import (
    LocalCluster,
    free_port,
    haproxy_binary,
    plan,
    write_files,
)

DELIVERY_TIMEOUT = 60.0


def haproxy_or_skip() -> None:
    """Skip without Debian's haproxy (``make test`` installs it); fail in CI."""
    if not (shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")):
        if os.environ.get("CI"):
            raise AssertionError("haproxy is not installed: make haproxy")
        raise SkipTest("haproxy is not installed (make haproxy: apt-get install haproxy)")


def send_from(source: str, port: int, payload: bytes, timeout: float = IO_TIMEOUT) -> bytes | None:
    """Send one MLLP frame from the local address ``source``; the answer, or None if closed."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as connection:
        connection.bind((source, 0))
        connection.settimeout(timeout)
        connection.connect(("127.0.0.1", port))
        connection.sendall(mllp(payload))
        data, closed = _receive_until(connection, _mllp_frame_end, deadline)
    if closed and not _mllp_frame_end(data):
        return None
    return data


def msa(answer: bytes | None) -> str:
    assert answer is not None, "closed without an answer"
    match = re.search(rb"MSA\|([A-Z]{2})\|", answer)
    assert match is not None, answer
    return match.group(1).decode()


def wait_for(condition: object, what: str, timeout: float = DELIVERY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def delivered(cluster: LocalCluster) -> int:
    """Messages the receiver answered (one line each, after its first)."""
    assert cluster.receiving is not None
    return len(re.findall(r" AA mllp$", cluster.receiving.log_text(), re.MULTILINE))


class HAProxyGatewayTests(SynchronousTestCase):
    """One gateway behind HAProxy: the sender's address is the one the gateway judges."""

    def start(self, send_proxy: str) -> tuple[LocalCluster, Path]:
        haproxy_or_skip()
        directory = new_directory(self)
        database = directory / "gateway.db"
        cluster = LocalCluster(
            plan(
                directory / "run",
                database=f"sqlite:///{database}",
                nodes=1,
                destination_port=free_port(),
                flows=DEMO_FLOWS,
                cluster=False,
                send_proxy=send_proxy,
                check_interval=0.5,
                allow=("127.0.0.2",),
            )
        )
        self.addCleanup(cluster.stop)
        cluster.start()
        return cluster, database

    def peers(self, database: Path) -> dict[str, str]:
        with sqlite3.connect(database) as connection:
            return dict(connection.execute("SELECT control_id, peer FROM messages").fetchall())

    def test_v2_sender_address_allowlist_and_delivery(self) -> None:
        """PROXY v2: 127.0.0.2 is ACKed, stored as 127.0.0.2 and delivered; 127.0.0.3 is
        closed unanswered; bytes straight to the gateway's port without a header are
        closed, and a connection there from outside ``proxies`` too."""
        cluster, database = self.start("send-proxy-v2")
        port = cluster.plan.port
        # HAProxy marks the server up after its first /readyz check.
        wait_for(lambda: send_from("127.0.0.2", port, sample_message("HAP1")) is not None, "up")
        self.assertEqual(msa(send_from("127.0.0.2", port, sample_message("HAP2"))), "AA")
        self.assertIsNone(send_from("127.0.0.3", port, sample_message("HAP3")))
        node = cluster.plan.nodes[0]
        self.assertIsNone(send_from("127.0.0.1", node.port, sample_message("DIRECT1")))
        self.assertIsNone(send_from("127.0.0.2", node.port, sample_message("DIRECT2")))
        self.assertEqual(self.peers(database), {"HAP1": "127.0.0.2", "HAP2": "127.0.0.2"})
        wait_for(lambda: delivered(cluster) >= 2, "both messages delivered")
        log = cluster.nodes[node.name].log_text()
        self.assertIn("connection refused: peer not in the allowlist", log)
        self.assertIn("PROXY protocol: connection closed: no PROXY header", log)
        self.assertIn("PROXY protocol: connection closed: not from a listed proxy", log)
        self.assertEqual(delivered(cluster), 2)
        statuses = cluster.stop()
        # twistd ends a clean stop on SIGTERM by that signal.
        self.assertIn(statuses[node.name], (0, -signal.SIGTERM))
        self.assertIn("Server Shut Down.", cluster.nodes[node.name].log_text())

    def test_v1_sender_address(self) -> None:
        """PROXY v1 (text): the same sender address reaches the store."""
        cluster, database = self.start("send-proxy")
        port = cluster.plan.port
        wait_for(lambda: send_from("127.0.0.2", port, sample_message("V1A")) is not None, "up")
        self.assertIsNone(send_from("127.0.0.3", port, sample_message("V1B")))
        self.assertEqual(self.peers(database), {"V1A": "127.0.0.2"})


class GeneratedConfigTests(SynchronousTestCase):
    """HAProxy itself accepts the configuration ``make cluster`` writes (``haproxy -c``)."""

    def test_haproxy_checks_the_config(self) -> None:
        haproxy_or_skip()
        directory = new_directory(self)
        for send_proxy in ("send-proxy-v2", "send-proxy"):
            the_plan = plan(directory / send_proxy, flows=DEMO_FLOWS, send_proxy=send_proxy)
            write_files(the_plan)
            check = subprocess.run(
                [haproxy_binary(), "-c", "-f", str(the_plan.run_dir / "haproxy.cfg")],
                capture_output=True,
                text=True,
                timeout=60,
            )
            self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
