"""The whole gateway on PostgreSQL: a real ``twistd udsgateway`` process relaying to
two ``udsgateway receive`` destinations, its store a throwaway PostgreSQL database.

* The flows of the SQLite end-to-end test (five types, two chained actions each)
  give the same bytes at the receivers, and the store records every delivery once.
* A second gateway on the same database, not in cluster mode, exits with status 2
  naming the first (the advisory lock), and the first keeps working.
* A gateway killed with -9 and restarted on PostgreSQL loses nothing it ACKed.
"""

from __future__ import annotations

import signal
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    msa,
    new_directory,
    send_mllp,
    start_gateway,
    write_config,
)
from tests.integration.postgres import new_database, rows, scalar, use_database
from tests.integration.test_flows_e2e import (
    TENANT,
    TYPES,
    Receiver,
    expected_first,
    flow_file,
    inbound,
    patients,
    start_all,
    wait_until,
)

DELIVERIES = (
    "SELECT d.step, d.control_id, d.state, d.attempts, m.control_id AS trig"
    " FROM deliveries d JOIN executions e ON e.id = d.execution_id"
    " JOIN messages m ON m.id = e.message_id ORDER BY d.id"
)


class PostgreSQLGatewayTests(SynchronousTestCase):
    """One gateway process on PostgreSQL."""

    def setup(self) -> tuple[str, Receiver, Receiver, Path]:
        url = new_database(self)
        directory = new_directory(self)
        first, second = Receiver(directory), Receiver(directory)
        self.addCleanup(first.stop)
        self.addCleanup(second.stop)
        flows = directory / "e2e.toml"
        flows.write_text(flow_file(first.port, second.port), encoding="utf-8")
        config = write_config(directory, {TENANT: 0}, {TENANT: [flows]})
        use_database(config, url)
        return url, first, second, config

    def test_relay_and_second_gateway_refused(self) -> None:
        """Five types through two chained actions: each receiver gets the five
        messages SQLite's run gives; the store on PostgreSQL has ten deliveries, each
        delivered at the first attempt. A second gateway exits 2 naming the first."""
        url, first, second, config = self.setup()
        gateway = start_all(self, [first, second], config)
        sent = []
        for number, (message_type, (_flow_id, name)) in enumerate(TYPES.items(), start=1):
            control_id = f"PG{number:05d}"
            ack = send_mllp(gateway.port, inbound(message_type, control_id, f"MRN{number}", name))
            assert ack is not None, gateway.log_text()
            self.assertEqual(msa(ack), ("AA", control_id))
            sent.append((message_type, f"MRN{number}", name))
        wait_until(
            lambda: len(first.messages()) == 5 and len(second.messages()) == 5,
            "five messages at each receiver",
            log=gateway.log_text,
        )
        wait_until(
            lambda: scalar(url, "SELECT count(*) FROM executions WHERE state != 'done'") == 0,
            "every execution done",
            log=gateway.log_text,
        )
        for message, (message_type, mrn, name) in zip(first.messages(), sent, strict=True):
            control_id = message.split(b"\r")[0].split(b"|")[9].decode()
            now = message.split(b"\r")[0].split(b"|")[6].decode()
            expected = expected_first(message_type, mrn, name).format(
                now=now, control_id=control_id
            )
            self.assertEqual(message, expected.encode("latin-1"))
        found = rows(url, DELIVERIES)
        self.assertEqual(len(found), 10)
        self.assertEqual({(row["state"], row["attempts"]) for row in found}, {("delivered", 1)})
        self.assertEqual(
            [row["trig"] for row in found if row["step"] == 0],
            [f"PG{n:05d}" for n in range(1, 6)],
        )

        other = start_gateway(self, config, wait=False)
        self.assertEqual(other.wait_exit(), 2, other.log_text())
        self.assertIn("in use by another gateway", other.log_text())
        assert gateway.process is not None
        self.assertIn(f"pid {gateway.process.pid}", other.log_text())
        ack = send_mllp(gateway.port, inbound("ADT^A04", "PG00006", "MRN6", "Doe^John"))
        assert ack is not None
        self.assertEqual(msa(ack), ("AA", "PG00006"))
        wait_until(lambda: len(first.messages()) == 6, "the sixth message", log=gateway.log_text)

    def test_kill_and_restart(self) -> None:
        """kill -9 with deliveries queued for a receiver that is down; after a restart
        on the same database every ACKed message reaches it, in arrival order."""
        url, first, second, config = self.setup()
        gateway = start_all(self, [second], config)
        for number in range(1, 5):
            control_id = f"PGK{number:04d}"
            ack = send_mllp(
                gateway.port, inbound("ADT^A04", control_id, f"MRN{number}", "Doe^John")
            )
            assert ack is not None, gateway.log_text()
            self.assertEqual(msa(ack), ("AA", control_id))
        gateway.send_signal(signal.SIGKILL)
        self.assertEqual(gateway.wait_exit(), -signal.SIGKILL)
        # The session of the killed process ends with it, and its lock with it.
        restarted = start_all(self, [first], config)
        wait_until(
            lambda: len(first.messages()) == 4 and len(second.messages()) == 4,
            "every message at both receivers after the restart",
            log=restarted.log_text,
        )
        self.assertEqual(patients(first.messages()), [f"MRN{n}" for n in range(1, 5)])
        self.assertEqual(patients(second.messages()), [f"MRN{n}" for n in range(1, 5)])
        self.assertEqual(scalar(url, "SELECT count(*) FROM messages"), 4)
