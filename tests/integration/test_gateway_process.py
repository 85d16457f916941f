"""The gateway as operators run it: ``twistd -n udsgateway``, real sockets, the SQLite file.

Covers the spec sample over MLLP and plain TCP, the two crash rows of
docs/guarantees.md's "Faults" table (kill -9 before and after the commit, through
``UDSGATEWAY_TEST_CRASH_AT``) and a clean SIGTERM shutdown.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    DEMO_FLOWS,
    DEMO_TENANT,
    HOST,
    IO_TIMEOUT,
    MLLP_START,
    GatewayProcess,
    accepts_connections,
    closed_by_peer,
    count,
    database_path,
    msa,
    new_directory,
    query,
    refusing_port,
    sample_message,
    segment,
    send_mllp,
    send_plain,
    start_gateway,
    write_config,
)

#: Flows of DEMO_FLOWS that take ADT^A04 over each framing.
MLLP_A04_FLOW = "FLWA04DEMO0001"
TCP_A04_FLOW = "FLWA04TCPDEMO1"

#: How long a SIGTERM'd gateway may take to exit.
SHUTDOWN_BOUND = 10.0


def demo_gateway_config(directory: Path, port: int = 0) -> Path:
    """One demo tenant on ``port`` (0: any free port), with the repository's demo flows."""
    return write_config(directory, {DEMO_TENANT: port}, {DEMO_TENANT: [DEMO_FLOWS]})


def received_count(database: Path, control_id: str) -> int:
    """How many times a message with this MSH-10 was received and processed."""
    return count(
        database,
        "SELECT count(*) FROM logs WHERE event = 'received' AND control_id = ?",
        control_id,
    )


class SampleMessageTests(SynchronousTestCase):
    """The spec's sample message, sent to a running gateway."""

    def test_sample_over_mllp_and_plain_tcp(self) -> None:
        """The sample gets AA echoing its MSH-10 over MLLP and over plain TCP (ended by
        the idle gap, or by the sender's half-close), and each message is stored byte
        for byte with the ACK sent and the flow it went to."""
        directory = new_directory(self)
        config = demo_gateway_config(directory)
        port = start_gateway(self, config).port
        over_mllp, over_tcp = sample_message("MSG00001"), sample_message("MSG00002")
        half_closed = sample_message("MSG00003")

        mllp_ack = send_mllp(port, over_mllp)
        assert mllp_ack is not None, "connection closed without an ACK"
        self.assertEqual(msa(mllp_ack), ("AA", "MSG00001"))
        # The demo sample is HL7 2.3: MSH-9 of its ACK has two components.
        self.assertEqual(segment(mllp_ack, "MSH")[8], "ACK^A04")

        tcp_ack = send_plain(port, over_tcp)
        assert tcp_ack is not None, "connection closed without an ACK"
        self.assertFalse(tcp_ack.startswith(MLLP_START), "a plain TCP ACK must be unframed")
        self.assertTrue(tcp_ack.startswith(b"MSH|"), tcp_ack)
        self.assertEqual(msa(tcp_ack), ("AA", "MSG00002"))

        end_ack = send_plain(port, half_closed, half_close=True)
        assert end_ack is not None, "connection closed without an ACK after a half-close"
        self.assertEqual(msa(end_ack), ("AA", "MSG00003"))

        rows = query(
            database_path(directory),
            "SELECT id, control_id, connection, raw, accepted, flows, ack_code, ack"
            " FROM messages ORDER BY id",
        )
        self.assertEqual(
            [(r["control_id"], r["connection"], r["accepted"], r["ack_code"]) for r in rows],
            [
                ("MSG00001", "mllp", 1, "AA"),
                ("MSG00002", "tcp", 1, "AA"),
                ("MSG00003", "tcp", 1, "AA"),
            ],
        )
        self.assertEqual([r["raw"] for r in rows], [over_mllp, over_tcp, half_closed])
        self.assertEqual([r["ack"] for r in rows], [mllp_ack, tcp_ack, end_ack])
        flows = [MLLP_A04_FLOW, TCP_A04_FLOW, TCP_A04_FLOW]
        self.assertEqual([json.loads(r["flows"]) for r in rows], [[flow] for flow in flows])
        received = query(
            database_path(directory),
            "SELECT message_id, flow_id, outcome FROM logs WHERE event = 'received' ORDER BY id",
        )
        self.assertEqual(
            [(r["message_id"], r["flow_id"], r["outcome"]) for r in received],
            [(row["id"], flow, "accepted") for row, flow in zip(rows, flows, strict=True)],
        )


class CrashTests(SynchronousTestCase):
    """docs/guarantees.md "Faults", rows 1 and 2: kill -9 around the commit."""

    def test_killed_before_commit(self) -> None:
        """Killed after reading a frame and before committing it: the sender gets no
        ACK, nothing of the message is stored; after a restart the resent message
        gets AA and is stored once."""
        directory = new_directory(self)
        database = database_path(directory)
        config = demo_gateway_config(directory)
        message = sample_message("CRASH00001")

        crashing = start_gateway(self, config, crash_at="before_commit")
        self.assertIsNone(send_mllp(crashing.port, message), "an ACK was sent without a commit")
        self.assertEqual(crashing.wait_exit(), -signal.SIGKILL, crashing.log_text())

        # The store is intact (the flows imported at start are there) and holds
        # nothing of the message: no row, no execution, no log line.
        self.assertEqual(count(database, "SELECT count(*) FROM flows"), 6)
        self.assertEqual(count(database, "SELECT count(*) FROM messages"), 0)
        self.assertEqual(count(database, "SELECT count(*) FROM executions"), 0)
        self.assertEqual(
            count(database, "SELECT count(*) FROM logs WHERE control_id = ?", "CRASH00001"), 0
        )
        self.assertEqual(count(database, "SELECT count(*) FROM deliveries"), 0)

        restarted = start_gateway(self, config)
        ack = send_mllp(restarted.port, message)
        assert ack is not None, f"no ACK after the restart; log:\n{restarted.log_text()}"
        self.assertEqual(msa(ack), ("AA", "CRASH00001"))
        rows = query(database, "SELECT control_id, raw, ack FROM messages")
        self.assertEqual(rows, [{"control_id": "CRASH00001", "raw": message, "ack": ack}])
        self.assertEqual(received_count(database, "CRASH00001"), 1)

    def test_killed_after_commit(self) -> None:
        """Killed after the commit and before the ACK is written: the sender gets no
        ACK but the message is stored; after a restart the resent bytes get the
        stored ACK replayed, and the message is still stored and processed once."""
        directory = new_directory(self)
        database = database_path(directory)
        config = demo_gateway_config(directory)
        message = sample_message("CRASH00002")

        crashing = start_gateway(self, config, crash_at="after_commit")
        self.assertIsNone(send_mllp(crashing.port, message), "an ACK was sent despite the crash")
        self.assertEqual(crashing.wait_exit(), -signal.SIGKILL, crashing.log_text())

        (stored,) = query(database, "SELECT control_id, raw, ack_code, ack FROM messages")
        self.assertEqual(
            (stored["control_id"], stored["raw"], stored["ack_code"]),
            ("CRASH00002", message, "AA"),
        )
        self.assertEqual(msa(stored["ack"]), ("AA", "CRASH00002"))

        restarted = start_gateway(self, config)
        replayed = send_mllp(restarted.port, message)
        assert replayed is not None, f"no ACK after the restart; log:\n{restarted.log_text()}"
        self.assertEqual(replayed, stored["ack"])
        self.assertEqual(msa(replayed), ("AA", "CRASH00002"))
        self.assertEqual(count(database, "SELECT count(*) FROM messages"), 1)
        self.assertEqual(received_count(database, "CRASH00002"), 1)


class ShutdownTests(SynchronousTestCase):
    """SIGTERM: a clean, bounded shutdown."""

    def test_sigterm(self) -> None:
        """On SIGTERM the gateway closes its port and open connections (idle ones and
        one in the middle of a frame), shuts down cleanly and exits within the
        bound; what it acknowledged stays stored."""
        directory = new_directory(self)
        config = demo_gateway_config(directory)
        gateway = start_gateway(self, config)
        port = gateway.port
        ack = send_mllp(port, sample_message("TERM00001"))
        assert ack is not None, "no ACK"
        self.assertEqual(msa(ack), ("AA", "TERM00001"))

        # Pending idle and frame timeouts (minutes) must not delay the exit.
        idle = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
        self.addCleanup(idle.close)
        partial = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
        self.addCleanup(partial.close)
        partial.sendall(MLLP_START + sample_message("TERM00002")[:40])

        started = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        status = gateway.wait_exit(SHUTDOWN_BOUND)
        elapsed = time.monotonic() - started

        log = gateway.log_text()
        # twistd re-raises the signal that stopped it, once shut down.
        self.assertEqual(status, -signal.SIGTERM, log)
        self.assertLess(elapsed, SHUTDOWN_BOUND)
        for line in ("Received SIGTERM", "Main loop terminated.", "Server Shut Down."):
            self.assertIn(line, log)
        for problem in ("Traceback", "Unhandled", "#critical", "#error"):
            self.assertNotIn(problem, log)
        self.assertTrue(closed_by_peer(idle), "idle connection left open")
        self.assertTrue(closed_by_peer(partial), "connection with a partial frame left open")
        self.assertFalse(accepts_connections(port))
        rows = query(database_path(directory), "SELECT control_id, ack FROM messages")
        self.assertEqual(rows, [{"control_id": "TERM00001", "ack": ack}])


class FailedStartTests(SynchronousTestCase):
    """A gateway that cannot start says so, in its log and in its exit status."""

    def test_port_in_use(self) -> None:
        """When its port is taken the gateway logs why it could not start and exits
        with a non-zero status, so a supervisor or ``make run`` sees the failure."""
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(taken.close)
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        directory = new_directory(self)
        config = demo_gateway_config(directory, port)

        gateway = GatewayProcess(config, port, directory / "twistd.log")
        self.addCleanup(gateway.stop)
        gateway.start()
        status = gateway.wait_exit()

        log = gateway.log_text()
        self.assertEqual(status, 1, log)
        self.assertIn("udsgateway could not start", log)
        self.assertIn(f"Couldn't listen on {HOST}:{port}", log)

    def test_invalid_configuration(self) -> None:
        """An invalid configuration file: every problem is printed with its key, and
        the exit status is 2."""
        directory = new_directory(self)
        config = directory / "gateway.toml"
        config.write_text(
            '[gateway]\ncolour = "blue"\n\n[[tenants]]\nname = "demo"\n', encoding="utf-8"
        )
        gateway = GatewayProcess(config, 0, directory / "twistd.log")
        self.addCleanup(gateway.stop)
        gateway.start()
        status = gateway.wait_exit()

        log = gateway.log_text()
        self.assertEqual(status, 2, log)
        self.assertIn(f"{config}: gateway.colour: unknown key", log)
        self.assertIn(f"{config}: tenants[0].listen: required", log)


class StartErrorTests(SynchronousTestCase):
    """Start-up errors an operator can fix are one clear log line, not a traceback."""

    def failed_start(self, config: Path, port: int) -> str:
        gateway = GatewayProcess(config, port, config.parent / "twistd.log")
        self.addCleanup(gateway.stop)
        gateway.start()
        status = gateway.wait_exit()
        log = gateway.log_text()
        self.assertEqual(status, 1, log)
        self.assertNotIn("Traceback", log)
        return log

    def test_port_in_use_one_line(self) -> None:
        """A port in use: one line naming the tenant, the address and the error."""
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(taken.close)
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        directory = new_directory(self)
        config = demo_gateway_config(directory, port)
        log = self.failed_start(config, port)
        self.assertIn(
            f"udsgateway could not start: tenant {DEMO_TENANT}: Couldn't listen on {HOST}:{port}",
            log,
        )

    def test_missing_flow_file(self) -> None:
        """A flow file that cannot be read stops the gateway (every tenant) with one
        line naming the tenant and the file."""
        placeholder = refusing_port()
        self.addCleanup(placeholder.close)
        port = placeholder.getsockname()[1]
        directory = new_directory(self)
        missing = directory / "missing.toml"
        config = write_config(directory, {DEMO_TENANT: port}, {DEMO_TENANT: [missing]})
        log = self.failed_start(config, port)
        self.assertIn(
            f"udsgateway could not start: tenant {DEMO_TENANT}: {missing}: cannot read: "
            "No such file or directory",
            log,
        )
        self.assertFalse(accepts_connections(port))
