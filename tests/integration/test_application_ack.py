"""Enhanced-mode application ACKs with a real client: @medplum/hl7's ``Hl7Client``.

The client's ``sendAndWait`` waits, by default, for the application ACK
(AA/AE/AR) and skips the accept ACK (CA); before the gateway sent application
ACKs it waited forever. Here a Node script (``medplum_client.cjs``) sends ADT^A04
messages with MSH-15 = MSH-16 = AL to ``twistd udsgateway`` listening on port 0,
whose flow forwards them to a small in-test MLLP destination that answers AA.
The library comes from ``make node-peers`` (tests/peers/node, git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    HOST,
    REPO,
    STARTUP_TIMEOUT,
    GatewayProcess,
    count,
    database_path,
    new_directory,
    query,
    write_config,
)

NODE_MODULES = REPO / "tests" / "peers" / "node" / "node_modules"
CLIENT = Path(__file__).with_name("medplum_client.cjs")
TENANT = "appack"
#: The client run's own bound (the library's sendAndWait has no default timeout).
CLIENT_LIMIT_MS = 15_000
CLIENT_TIMEOUT = 30.0

FLOW = """\
app_id = "APPAPPACK0001"
name = "Application ACK test"
tenant = "appack"

[[flows]]
flow_id = "FLWAPPACK0001"
name = "Registration"
[flows.trigger]
message_type = "ADT^A04"
application_ack = "after_actions"
ack_timeout = 10
sample = '''
MSH|^~\\&|MEDPLUM|CLINIC|LSQ|LeadSquared|20240301090000||ADT^A04|S1|P|2.5
PID|1||MRN1
'''

[[flows.actions]]
name = "forward"
host = "127.0.0.1"
port = {port}
message_type = "ADT^A04"
template = '''
MSH|^~\\&|UDSGATEWAY|TEST|DEST|DESTFAC|{{{{ now }}}}||ADT^A04|{{{{ control_id }}}}|P|2.5
PID|1||{{{{ msg["PID-3.1"] }}}}
'''
"""


class Destination:
    """An MLLP destination on port 0 that answers AA to every message (a thread)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self._server = socket.create_server((HOST, 0))
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            with contextlib.closing(connection):
                connection.settimeout(0.2)
                self._answer(connection)

    def _answer(self, connection: socket.socket) -> None:
        buffer = b""
        while not self._stop.is_set():
            try:
                chunk = connection.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            buffer += chunk
            while b"\x1c\r" in buffer:
                frame, buffer = buffer.split(b"\x1c\r", 1)
                payload = frame[frame.find(b"\x0b") + 1 :]
                self.received.append(payload)
                control_id = payload.split(b"\r", 1)[0].split(b"|")[9].decode()
                ack = (
                    "MSH|^~\\&|DEST|DESTFAC|UDSGATEWAY|TEST|20240301090001||ACK|"
                    f"D{control_id}|P|2.5\rMSA|AA|{control_id}\r"
                ).encode()
                connection.sendall(b"\x0b" + ack + b"\x1c\r")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()


def listening_port(gateway: GatewayProcess, timeout: float = STARTUP_TIMEOUT) -> int:
    """The port the gateway's listener got (it listens on port 0), read from its log."""
    deadline = time.monotonic() + timeout
    process = gateway.process
    assert process is not None
    while time.monotonic() < deadline:
        found = re.search(r"listening on IPv4Address\(.*?port=(\d+)\)", gateway.log_text())
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise AssertionError(f"gateway exited before listening; log:\n{gateway.log_text()}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.05)
    raise AssertionError(f"gateway not listening after {timeout} s; log:\n{gateway.log_text()}")


class MedplumClientTests(SynchronousTestCase):
    """@medplum/hl7's client, default mode, against a running gateway."""

    def setUp(self) -> None:
        node = shutil.which("node")
        if node is None or not (NODE_MODULES / "@medplum" / "hl7").is_dir():
            self.fail("node or @medplum/hl7 missing: run `make node-peers`")
        self.node = node
        self.destination = Destination()
        self.addCleanup(self.destination.stop)
        directory = new_directory(self)
        flows = directory / "appack.toml"
        flows.write_text(FLOW.format(port=self.destination.port), encoding="utf-8")
        config = write_config(directory, {TENANT: 0}, {TENANT: [flows]})
        self.database = database_path(directory)
        self.gateway = GatewayProcess(config, 0, directory / "twistd.log")
        self.addCleanup(self.gateway.stop)
        self.gateway.start()
        self.port = listening_port(self.gateway)

    def run_client(self, messages: int, mode: str = "") -> dict[str, Any]:
        """Run the Node client; its one JSON line of results."""
        argv = [self.node, str(CLIENT), HOST, str(self.port), str(CLIENT_LIMIT_MS), str(messages)]
        env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
        done = subprocess.run(
            [*argv, mode] if mode else argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )
        lines = done.stdout.strip().splitlines()
        self.assertTrue(lines, f"no output; status {done.returncode}; stderr:\n{done.stderr}")
        result: dict[str, Any] = json.loads(lines[-1])
        self.assertEqual(done.returncode, 0, f"{result}\nstderr:\n{done.stderr}")
        return result

    def test_default_client_gets_accept_and_application_ack(self) -> None:
        """sendAndWait in its default mode resolves with AA (no timeout): the client saw
        CA then AA for its MSH-10, each with a fresh MSH-10 of ours; delivered once."""
        result = self.run_client(1)
        self.assertFalse(result["timedOut"])
        self.assertNotIn("error", result)
        self.assertEqual(result["replies"], [{"code": "AA", "control_id": "MP1"}])
        self.assertEqual(
            [(s["code"], s["control_id"]) for s in result["seen"]],
            [
                ("CA", "MP1"),
                ("AA", "MP1"),
            ],
        )
        ours = {s["msh10"] for s in result["seen"]}
        self.assertEqual(len(ours), 2)
        self.assertNotIn("MP1", ours)
        self.assertEqual(len(self.destination.received), 1)
        rows = query(self.database, "SELECT control_id, ack_code FROM messages")
        self.assertEqual([(r["control_id"], r["ack_code"]) for r in rows], [("MP1", "CA")])

    def test_client_acking_our_acks_is_consumed_quietly(self) -> None:
        """A client that answers our CA and AA with ACKs of its own (enhanced mode on its
        connection): those get no answer and are not stored; the next message on the
        same connection still gets its CA and AA."""
        result = self.run_client(2, "ack-back")
        self.assertFalse(result["timedOut"])
        self.assertNotIn("error", result)
        self.assertEqual(
            result["replies"],
            [{"code": "AA", "control_id": "MP1"}, {"code": "AA", "control_id": "MP2"}],
        )
        self.assertEqual(
            [(s["code"], s["control_id"]) for s in result["seen"]],
            [("CA", "MP1"), ("AA", "MP1"), ("CA", "MP2"), ("AA", "MP2")],
        )
        self.assertEqual(count(self.database, "SELECT count(*) FROM messages"), 2)
        log = self.gateway.log_text()
        self.assertGreaterEqual(log.count("inbound ACK ignored"), 3, log)
        self.assertNotIn("Traceback", log)
