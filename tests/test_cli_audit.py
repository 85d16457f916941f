"""``udsgateway audit`` and ``udsgateway destinations``: the audit trail and pauses from
the command line; CLI operator actions are audited with via ``cli``."""

from __future__ import annotations

import json

from tests.test_cli import CommandTestCase
from udsgateway.store import destinations, outbox
from udsgateway.testing import outbound_message


class AuditCommandTests(CommandTestCase):
    def enqueue(self) -> int:
        [delivery_id] = self.database.transaction_now(
            outbox.enqueue,
            [
                outbox.NewDelivery(
                    "L1",
                    "tcp:host=lab.example:port=7000:timeout=5",
                    "mllp",
                    "C1",
                    outbound_message("C1"),
                    {},
                )
            ],
            1.0,
        )
        return int(delivery_id)

    def test_cli_actions_are_in_the_trail(self) -> None:
        delivery_id = self.enqueue()
        status, _, err = self.run_command(
            "deliveries", "skip", str(delivery_id), "--reason", "sent by fax", "--who", "dora"
        )
        self.assertEqual((status, err), (0, ""))
        status, out, _ = self.run_command(
            "destinations", "pause", "lab.example:7000", "--reason", "upgrade", "--who", "ed"
        )
        self.assertEqual(status, 0, out)
        self.assertIn("lab.example:7000", self.database.transaction_now(destinations.pauses))
        status, out, _ = self.run_command("audit", "--json")
        rows = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(
            [(r["who"], r["action"], r["via"], r["result"]) for r in rows],
            [
                ("ed", "destination.pause", "cli", "ok"),
                ("dora", "delivery.skip", "cli", "ok"),
            ],
        )
        self.assertEqual(rows[1]["reason"], "sent by fax")
        status, out, _ = self.run_command("audit", "--who", "dora")
        self.assertEqual(status, 0)
        self.assertIn("delivery.skip", out)
        self.assertNotIn("destination.pause", out)
        status, out, _ = self.run_command("audit", "--action", "destination.")
        self.assertEqual(len(out.splitlines()), 2)  # heading and one row

    def test_pause_twice_is_an_error_and_audited(self) -> None:
        self.run_command("destinations", "pause", "lab.example:7000", "--reason", "a")
        status, _, err = self.run_command(
            "destinations", "pause", "lab.example:7000", "--reason", "b"
        )
        self.assertEqual(status, 2)
        self.assertIn("paused already", err)
        status, out, _ = self.run_command("destinations", "list", "--json")
        [row] = [json.loads(line) for line in out.splitlines()]
        self.assertTrue(row["paused"])
        status, out, _ = self.run_command("destinations", "resume", "lab.example:7000")
        self.assertEqual(status, 0)
        _, out, _ = self.run_command("audit", "--json")
        results = [json.loads(line)["result"] for line in out.splitlines()]
        self.assertEqual(results[0], "ok")
        self.assertTrue(results[1].startswith("refused: "))
