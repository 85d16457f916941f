"""One gateway per database, and damage it notices: real ``twistd`` processes.

The faults of docs/operations.md: a second gateway on the same SQLite database, the
database file deleted under a running gateway, and a restart on a WAL whose
bytes were flipped after acknowledged commits.
"""

from __future__ import annotations

import signal
import socket
from contextlib import ExitStack, closing
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    DEMO_FLOWS,
    HOST,
    accepts_connections,
    count,
    database_path,
    msa,
    new_directory,
    sample_message,
    segment,
    send_mllp,
    start_gateway,
    udsgateway,
)
from tests.integration.test_gateway_process import demo_gateway_config


def _two_ports() -> tuple[int, int]:
    """Two distinct free ports, bound on port 0 together and read back."""
    with ExitStack() as stack:
        probes = [stack.enter_context(closing(socket.socket())) for _ in range(2)]
        for probe in probes:
            probe.bind((HOST, 0))
        first, second = (probe.getsockname()[1] for probe in probes)
        return first, second


def _config_on_port(config: Path, old: int, new: int, name: str) -> Path:
    """A copy of ``config`` (same database) whose listener is on port ``new``."""
    other = config.with_name(name)
    other.write_text(
        config.read_text(encoding="utf-8").replace(f"port={old}:", f"port={new}:"),
        encoding="utf-8",
    )
    return other


def _assert_acked(testcase: SynchronousTestCase, port: int, control_id: str) -> None:
    ack = send_mllp(port, sample_message(control_id))
    assert ack is not None, f"no answer for {control_id}"
    testcase.assertEqual(msa(ack), ("AA", control_id))


class SecondGatewayTests(SynchronousTestCase):
    """A second gateway on the same SQLite database is refused at start."""

    def test_second_gateway_exits_2_naming_the_first(self) -> None:
        """The second gateway exits with status 2 and one line naming the first's
        pid, host and start time, and never listens; the first keeps working. After
        the first is killed with -9 (its lock file stays behind), a new one starts."""
        port, other_port = _two_ports()
        directory = new_directory(self)
        config = demo_gateway_config(directory, port)
        second_config = _config_on_port(config, port, other_port, "second.toml")

        first = start_gateway(self, config, port)
        assert first.process is not None
        second = start_gateway(self, second_config, other_port, wait=False)
        status = second.wait_exit()
        log = second.log_text()
        self.assertEqual(status, 2, log)
        [line] = [text for text in log.splitlines() if "not started" in text]
        self.assertIn(
            f"in use by another gateway: pid {first.process.pid} on host {socket.gethostname()},"
            " since ",
            line,
        )
        self.assertFalse(accepts_connections(other_port))
        _assert_acked(self, port, "LOCK00001")

        first.stop()
        self.assertEqual(first.process.returncode, -signal.SIGKILL)
        self.assertTrue(Path(str(database_path(directory)) + ".lock").exists())
        third = start_gateway(self, second_config, other_port)
        _assert_acked(self, other_port, "LOCK00002")
        third.stop()


class CommandsBesideGatewayTests(SynchronousTestCase):
    """The ``udsgateway`` commands share the database with a running gateway."""

    def test_flows_import_while_running(self) -> None:
        """``flows import`` while a gateway runs succeeds (it does not need the
        gateway's lock, and leaves it held), and the gateway keeps acknowledging."""
        port, other_port = _two_ports()
        directory = new_directory(self)
        config = demo_gateway_config(directory, port)
        gateway = start_gateway(self, config, port)
        _assert_acked(self, port, "CLI00001")

        result = udsgateway(config, "flows", "import", DEMO_FLOWS)
        self.assertEqual(result.returncode, 0, result.stderr)
        _assert_acked(self, port, "CLI00002")
        self.assertTrue(gateway.running)

        second_config = _config_on_port(config, port, other_port, "second.toml")
        second = start_gateway(self, second_config, other_port, wait=False)
        self.assertEqual(second.wait_exit(), 2, second.log_text())


class DamageTests(SynchronousTestCase):
    """The database file deleted while running; a WAL damaged while stopped."""

    def test_deleted_database_gets_nak(self) -> None:
        """With the database files deleted under a running gateway, the next message
        gets AR with code 207 (not AA), and a critical line says why."""
        (port, _) = _two_ports()
        directory = new_directory(self)
        database = database_path(directory)
        gateway = start_gateway(self, demo_gateway_config(directory, port), port)
        _assert_acked(self, port, "DEL00001")

        for suffix in ("", "-wal", "-shm"):
            Path(str(database) + suffix).unlink(missing_ok=True)
        for control_id in ("DEL00002", "DEL00003"):
            ack = send_mllp(port, sample_message(control_id))
            assert ack is not None, gateway.log_text()
            self.assertEqual(msa(ack), ("AR", control_id))
            # The sample is HL7 2.3: the code is in ERR-1 (segment^sequence^field^code&text).
            self.assertEqual(segment(ack, "ERR")[1].split("^")[3].split("&")[0], "207")
        log = gateway.log_text()
        self.assertEqual(log.count("database damaged: database file"), 1, log)
        self.assertIn("was deleted while the gateway ran", log)

    def test_flipped_wal_refuses_to_start(self) -> None:
        """Killed with -9 after 30 AA'd messages (their commits only in the WAL), a
        byte flipped in a WAL frame: the next start refuses with status 2 and says
        which frames (acknowledged messages) would be lost, leaving the WAL as it
        is; ``--accept-damaged-database`` starts it anyway."""
        (port, _) = _two_ports()
        directory = new_directory(self)
        database = database_path(directory)
        config = demo_gateway_config(directory, port)
        gateway = start_gateway(self, config, port)
        for index in range(30):
            _assert_acked(self, port, f"WAL{index:05d}")
        gateway.stop()  # kill -9: no checkpoint, the commits stay in the WAL

        wal = Path(str(database) + "-wal")
        data = bytearray(wal.read_bytes())
        page_size = int.from_bytes(data[8:12], "big")
        frames = (len(data) - 32) // (24 + page_size)
        self.assertGreater(frames, 30)
        frame = frames // 2
        data[32 + (frame - 1) * (24 + page_size) + 24 + 50] ^= 0xFF
        wal.write_bytes(bytes(data))

        refused = start_gateway(self, config, port, wait=False)
        status = refused.wait_exit()
        log = refused.log_text()
        self.assertEqual(status, 2, log)
        self.assertIn("the database cannot be trusted", log)
        self.assertIn(f"frame {frame} of {frames} fails its checksum", log)
        self.assertIn("acknowledged messages", log)
        self.assertIn("--accept-damaged-database", log)
        self.assertFalse(accepts_connections(port))
        self.assertEqual(wal.read_bytes(), bytes(data), "the refused start changed the WAL")

        accepted = start_gateway(self, config, port, options=("--accept-damaged-database",))
        self.assertIn("started on a damaged database", accepted.log_text())
        _assert_acked(self, port, "WAL99999")
        # What the override costs: the messages in the frames after the bad one.
        self.assertLess(count(database, "SELECT count(*) FROM messages"), 31)
