"""Smoke test of the benchmark's gateway scenarios, in seconds: correctness, never speed.

A real gateway (``twistd``) and a real ``udsgateway receive``, each on a port reserved for the
test (``refusing_port``: bound on port 0 and held, so no other process takes it, while the
scenario's processes listen on it and restart on it):
the relay scenario must get a verified ACK for every message (MSA-1 AA, MSA-2 equal to its
MSH-10) and every mapped message must reach the destination; the recovery scenario must
send a stored backlog again after a kill -9 and a restart. No timing is asserted.
"""

from __future__ import annotations

from bench import gateway_scenarios
from twisted.trial.unittest import TestCase

from tests.integration.helpers import refusing_port


class GatewayBenchSmokeTests(TestCase):
    """The bench's gateway scenarios work end to end on a small scale."""

    timeout = 180

    def setUp(self) -> None:
        gateway, receiver = refusing_port(), refusing_port()
        self.addCleanup(gateway.close)
        self.addCleanup(receiver.close)
        gateway_scenarios.use_ports(gateway.getsockname()[1], receiver.getsockname()[1])

    def test_relay_acks_and_delivers_every_message(self) -> None:
        """Every message is ACKed correctly and delivered (the receiver exits at its count)."""
        result = gateway_scenarios.run_relay(quick=True)
        self.assertEqual(result["ingest_ok"], result["messages"])
        self.assertEqual(sum(result["ingest_errors"].values()), 0)  # type: ignore[attr-defined]
        self.assertGreater(float(str(result["relay_msgs_per_s"])), 0.0)

    def test_recovery_sends_a_stored_backlog_again(self) -> None:
        """A gateway started on a store with queued deliveries sends them again."""
        result = gateway_scenarios.run_recovery(quick=True, backlog=500)
        self.assertEqual(result["queued_deliveries"], 500)
        self.assertIsNotNone(result["sending_again_after_s"])
