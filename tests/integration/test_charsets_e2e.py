"""Non-ASCII names and non-default delimiters end to end: a sender, ``twistd
udsgateway`` and a ``udsgateway receive`` destination, over real sockets, with
the SQLite file (issue 17 item 0, issue 11 items 1 and 4).

* A flow whose template copies PID-5 (and MSH-18) relays ADT^A04s naming
  Müller^Anna: 0xFC with MSH-18 empty (the tenant's default charset), 0xFC with
  ``8859/1``, UTF-8 with ``UNICODE UTF-8``; each is delivered once, and the next
  message of the lane too.
* A pass-through flow (``{{ msg }}``) forwards VistA-delimited, LF-separated and
  UTF-8 messages byte-exact to an MLLP receiver in this process (``udsgateway
  receive`` writes CR as LF, so it cannot show the bytes).

Every port is chosen by the system (port 0) and read back from the logs.
"""

from __future__ import annotations

import os
import re
import signal
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    STARTUP_TIMEOUT,
    UDSGATEWAY,
    GatewayProcess,
    LoggedProcess,
    database_path,
    msa,
    new_directory,
    query,
    send_mllp,
    write_config,
)
from udsgateway.hl7.header import HeaderProblem, parse_header
from udsgateway.peers.commands import split_messages
from udsgateway.testing import destination_ack

TENANT = "charsets"
SENT_AT = "20240301090000"
DELIVERY_TIMEOUT = 20.0


def wait_for(done: Callable[[], object], what: str, log: Callable[[], str]) -> object:
    """Poll ``done()`` until it returns something true; fail after DELIVERY_TIMEOUT."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while not (found := done()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {DELIVERY_TIMEOUT} s\n{log()}")
        time.sleep(0.05)
    return found


class Receiver:
    """``udsgateway receive --port 0``: its port is read back from its log."""

    def __init__(self, test: SynchronousTestCase, directory: Path) -> None:
        self.output = directory / "received.hl7"
        self._child = LoggedProcess(directory / "receive.log")
        test.addCleanup(self._child.stop, signal.SIGTERM)
        argv = [str(UDSGATEWAY), "receive", "--port", "0", "--output", str(self.output)]
        self._child.spawn(argv, directory, os.environ)
        found = wait_for(
            lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", self._child.log_text()),
            "the receiver listening",
            self._child.log_text,
        )
        assert isinstance(found, re.Match)
        self.port = int(found.group(1))

    def messages(self) -> list[bytes]:
        """Every message received so far (whole records only), in order."""
        try:
            data = self.output.read_bytes()
        except FileNotFoundError:
            return []
        return split_messages(data[: data.rfind(b"\n") + 1])


class RawReceiver:
    """An MLLP receiver in this process (a thread): keeps each frame's exact bytes and
    answers AA echoing its MSH-10, read with the message's own delimiters."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.frames: list[bytes] = []
        frames = self.frames

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(DELIVERY_TIMEOUT)
                data = b""
                while chunk := self.request.recv(65536):
                    data += chunk
                    while (end := data.find(b"\x1c\r")) >= 0:
                        frame, data = data[1:end], data[end + 2 :]
                        frames.append(frame)
                        header = parse_header(frame, default_charset="latin-1")
                        assert not isinstance(header, HeaderProblem), header
                        self.request.sendall(
                            b"\x0b" + destination_ack(header.control_id) + b"\x1c\r"
                        )

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        thread.start()
        test.addCleanup(self._server.server_close)
        test.addCleanup(self._server.shutdown)


def start_gateway(test: SynchronousTestCase, directory: Path, flows: str) -> tuple[int, Path]:
    """A gateway listening on a port of the system's choice; returns it and the database."""
    flow_file = directory / "flows.toml"
    flow_file.write_text(flows, encoding="utf-8")
    config = write_config(directory, {TENANT: 0}, {TENANT: [flow_file]})
    gateway = GatewayProcess(config, 0, directory / "twistd.log")
    test.addCleanup(gateway.stop)
    gateway.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (found := re.search(r"listening on .*port=(\d+)", gateway.log_text())):
        if time.monotonic() >= deadline or not gateway.running:
            raise AssertionError(f"gateway did not start:\n{gateway.log_text()}")
        time.sleep(0.05)
    return int(found.group(1)), database_path(directory)


def flow_file(port: int, template: str) -> str:
    """One app, one ADT^A04 flow with one MLLP action to ``port``."""
    return f"""app_id = "APPCHARSETS01"
name = "Charsets"
tenant = "{TENANT}"

[[flows]]
flow_id = "FLWCHARSETS"
name = "relay"
[flows.trigger]
message_type = "ADT^A04"
sample = '''
{SAMPLE}'''

[[flows.actions]]
name = "relay"
host = "127.0.0.1"
port = {port}
protocol = "mllp"
message_type = "ADT^A04"
connect_timeout = 2
backoff_initial = 0.2
backoff_max = 1
template = '''
{template}'''
"""


#: The flow's sample trigger (flows are checked against it at import).
SAMPLE = (
    f"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|{SENT_AT}||ADT^A04|SAMPLE|P|2.5\n"
    f"EVN|A04|{SENT_AT}\nPID|1||P1^^^H^MR||Doe^Anna\n"
)


def adt(control_id: str, msh18: str, encoding: str, name: str = "Müller") -> bytes:
    """An ADT^A04 for P1 ``name``^Anna, in ``encoding`` with MSH-18 ``msh18``."""
    return (
        f"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|{SENT_AT}||ADT^A04|{control_id}|P|2.5"
        f"||||||{msh18}\rEVN|A04|{SENT_AT}\rPID|1||P1^^^H^MR||{name}^Anna\r"
    ).encode(encoding)


def deliveries(database: Path) -> list[tuple[str, str, int]]:
    """(control ID, state, attempts) of every delivery, in enqueue order."""
    return [
        (str(row["control_id"]), str(row["state"]), int(row["attempts"]))
        for row in query(
            database, "SELECT control_id, state, attempts FROM deliveries ORDER BY id"
        )
    ]


class NonAsciiEndToEndTests(SynchronousTestCase):
    """The three charset cases of issue 17 item 0 against a real receiver."""

    TEMPLATE = (
        "MSH|^~\\&|UDSGATEWAY|GW|RCV|RCVFAC|{{ now }}||ADT^A04|{{ control_id }}|P|2.5"
        '||||||{{ msg["MSH-18"] }}\n'
        'PID|1||{{ msg["PID-3"] }}||{{ msg["PID-5"] }}\n'
        'ZTR|{{ msg["MSH-10"] }}\n'
    )

    def test_each_charset_delivered_once_and_the_lane_goes_on(self) -> None:
        """0xFC with MSH-18 empty, 0xFC with 8859/1, UTF-8 with UNICODE UTF-8, then an
        ASCII message: the receiver gets each once, in order, the name in the charset
        the outbound MSH-18 declares, and every delivery is delivered at the first
        attempt under the control ID the receiver echoed."""
        directory = new_directory(self)
        receiver = Receiver(self, directory)
        port, database = start_gateway(self, directory, flow_file(receiver.port, self.TEMPLATE))
        sent = [
            ("LATIN1", adt("LATIN1", "", "latin-1"), "Müller".encode("latin-1")),
            ("DECLARED", adt("DECLARED", "8859/1", "latin-1"), "Müller".encode("latin-1")),
            ("UTF8", adt("UTF8", "UNICODE UTF-8", "utf-8"), "Müller".encode()),
            ("NEXT", adt("NEXT", "", "ascii", "Doe"), b"Doe"),
        ]
        for control_id, message, _name in sent:
            ack = send_mllp(port, message)
            assert ack is not None
            self.assertEqual(msa(ack), ("AA", control_id))
        logs = (directory / "twistd.log").read_text
        wait_for(lambda: len(receiver.messages()) >= 4, "four messages received", logs)
        wait_for(
            lambda: all(state == "delivered" for _c, state, _a in deliveries(database)),
            "every delivery recorded",
            logs,
        )
        received = receiver.messages()
        self.assertEqual(len(received), 4)
        rows = deliveries(database)
        for (control_id, _message, name), message, row in zip(sent, received, rows, strict=True):
            self.assertIn(b"\rPID|1||P1^^^H^MR||" + name + b"^Anna\r", message)
            self.assertIn(b"\rZTR|" + control_id.encode() + b"\r", message)
            msh10 = message.split(b"\r")[0].split(b"|")[9].decode()
            self.assertEqual(row, (msh10, "delivered", 1))
        self.assertNotIn("does not match", logs())


class PassThroughEndToEndTests(SynchronousTestCase):
    """``{{ msg }}`` forwards exactly the bytes the gateway stored (issue 11 items 1, 4)."""

    def test_odd_delimiters_line_endings_and_utf8_byte_exact(self) -> None:
        """VistA's ``MSH^~|\\&`` with LF endings, ``#!@%*`` with CRLF and no final
        separator, and UTF-8 with MSH-18: the receiver gets the identical bytes."""
        directory = new_directory(self)
        receiver = RawReceiver(self)
        port, database = start_gateway(self, directory, flow_file(receiver.port, "{{ msg }}\n"))
        sent = [
            b"MSH^~|\\&^VISTA^500^LSQ^FAC^20240301^^ADT~A04^VISTA1^P^2.4\n"
            b"PID^1^^P1~~~H~MR^^Doe~Ann\n",
            b"MSH#!@%*#HIS#H#LSQ#F#20240301##ADT!A04#HASH1#P#2.3.1\r\nPID#1##P1!!!H!MR##Doe!Ann",
            adt("UTF8PASS", "UNICODE UTF-8", "utf-8"),
        ]
        for message in sent:
            # MSA-1 is AA, written with the message's own field separator.
            self.assertRegex(send_mllp(port, message) or b"", rb"\rMSA(.)AA\1")
        logs = (directory / "twistd.log").read_text
        wait_for(
            lambda: (
                len(deliveries(database)) == 3
                and all(state == "delivered" for _c, state, _a in deliveries(database))
            ),
            "three deliveries delivered",
            logs,
        )
        self.assertEqual([row[0] for row in deliveries(database)], ["VISTA1", "HASH1", "UTF8PASS"])
        self.assertEqual(receiver.frames, sent)
