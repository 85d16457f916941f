"""Tests for the ``udsgateway`` command line (cli.py, operate.py): in process, on a
SQLite file in a temporary folder. The commands that talk to a gateway (send,
receive) are in test_peers.py; whole processes in tests/integration/test_cli.py."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from udsgateway import __version__
from udsgateway.cli.main import main, open_database, print_table, render_flow_action
from udsgateway.cli.operate import LOG_COLUMNS, destination_address
from udsgateway.config import load_config
from udsgateway.flows import parse_app
from udsgateway.flowstore import save_app
from udsgateway.peers.commands import read_message_files
from udsgateway.store import logs
from udsgateway.store.records import LogEntry
from udsgateway.testing import control_id_of, destination_ack, read_ack
from udsgateway.testing.flows import FlowGateway

REPO = Path(__file__).resolve().parents[1]

#: Two actions: the second reads the first one's response (MSA-1 of its ACK).
CHAINED_FLOWS = """\
app_id = "APPCLITEST0001"
name = "CLI test"
tenant = "clinic"

[[flows]]
flow_id = "FLWCLITEST0001"
name = "Chained"
[flows.trigger]
connection = "MLLP"
message_type = "ADT^A04"
sample = '''
MSH|^~\\&|HIS|Hospital|GW|GW|202401011230||ADT^A04|MSG00001|P|2.3
PID|1||12345^^^Hospital||Testperson^Alex
'''

[[flows.actions]]
name = "first"
host = "127.0.0.1"
port = 2999
message_type = "ADT^A04"
template = '''
MSH|^~\\&|GW|GW|P1|P1|{{ now }}||ADT^A04|{{ control_id }}|P|2.5
PID|1||{{ msg["PID-3.1"] }}||{{ msg["PID-5.1"] }}
'''

[[flows.actions]]
name = "second"
host = "127.0.0.1"
port = 2999
protocol = "TCP"
message_type = "ADT^A08"
template = '''
MSH|^~\\&|GW|GW|P2|P2|{{ now }}||ADT^A08|{{ control_id }}|P|2.5
ZRS|{{ responses.first["MSA-1"] }}|{{ responses.first["MSA-2"] }}|{{ msg["PID-5.1"] }}
'''
"""


def log_line(number: int, **fields: Any) -> LogEntry:
    """A log line as the store writes it (no PHI: IDs and codes only)."""
    values: dict[str, Any] = {
        "at": 1_700_000_000.0 + number,
        "control_id": f"CTL{number:05d}",
        "message_type": "ADT^A04",
        "event": "received",
        "outcome": "accepted",
        "ack_code": "AA",
        **fields,
    }
    return LogEntry(**values)


class CommandTestCase(SynchronousTestCase):
    """A configuration with one tenant ("clinic", default charset 8859/1) and its store."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        self.config = self.directory / "gateway.toml"
        self.config.write_text(
            "[gateway]\n"
            f'database = "sqlite:///{self.directory / "gateway.db"}"\n'
            "\n[[tenants]]\n"
            'name = "clinic"\n'
            'listen = "tcp:port=2599:interface=127.0.0.1"\n',
            encoding="utf-8",
        )
        self.database = open_database(load_config(str(self.config)))

    def run_command(self, *argv: str, config_first: bool = True) -> tuple[int, str, str]:
        """Run ``udsgateway`` with the configuration; exit status, stdout, stderr."""
        out, err = io.StringIO(), io.StringIO()
        arguments = ["--config", str(self.config), *argv] if config_first else list(argv)
        with redirect_stderr(err), redirect_stdout(out):
            try:
                status = main(arguments, out=out)
            except SystemExit as exit:
                status = int(exit.code or 0)
        return status, out.getvalue(), err.getvalue()

    def add_logs(self, *rows: LogEntry) -> None:
        self.database.transaction_now(logs.insert_logs, list(rows))


class LogsCommandTests(CommandTestCase):
    """``udsgateway logs``."""

    def test_newest_first_by_default(self) -> None:
        """Without options the newest lines come first, as in every log viewer, and
        --limit keeps the newest ones, not the oldest."""
        self.add_logs(*(log_line(n) for n in range(1, 6)))
        status, out, _ = self.run_command("logs", "--json", "--limit", "3")
        self.assertEqual(status, 0)
        rows = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["control_id"] for r in rows], ["CTL00005", "CTL00004", "CTL00003"])

    def test_tail_is_the_newest_in_order(self) -> None:
        """--tail N prints the newest N lines in the order they happened."""
        self.add_logs(*(log_line(n) for n in range(1, 6)))
        status, out, _ = self.run_command("logs", "--json", "--tail", "2")
        self.assertEqual(status, 0)
        rows = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["control_id"] for r in rows], ["CTL00004", "CTL00005"])

    def test_empty_prints_header_and_none(self) -> None:
        """No lines: the headings and "(none)", as `deliveries list` prints."""
        status, out, _ = self.run_command("logs")
        self.assertEqual(status, 0)
        heading, none = out.splitlines()
        self.assertEqual(
            heading.split(),
            [c.upper() for c in ("id", "time", "event", "outcome")]
            + [
                "APP",
                "ID",
                "FLOW",
                "ID",
                "CONTROL",
                "ID",
                "TYPE",
                "ACTION",
                "ATTEMPT",
                "ACK",
                "REASON",
            ],
        )
        self.assertEqual(none, "(none)")

    def test_bad_status_is_an_error(self) -> None:
        """A --status that is no outcome is a usage error (status 2), not an empty list."""
        self.add_logs(log_line(1))
        status, out, err = self.run_command("logs", "--status", "acepted")
        self.assertEqual(status, 2)
        self.assertEqual(out, "")
        self.assertIn("unknown status 'acepted'", err)

    def test_status_from_the_store(self) -> None:
        """An outcome this version does not list but the logs hold is accepted."""
        self.add_logs(log_line(1, outcome="quarantined"), log_line(2))
        status, out, err = self.run_command("logs", "--json", "--status", "quarantined")
        self.assertEqual(status, 0, err)
        self.assertEqual([json.loads(x)["control_id"] for x in out.splitlines()], ["CTL00001"])

    def test_status_words(self) -> None:
        """ok selects delivered lines; an outcome selects itself."""
        self.add_logs(
            log_line(1),
            log_line(2, event="delivery", outcome="delivered", step=0, attempt=1),
            log_line(3, event="delivery", outcome="held", step=0, attempt=2, ack_code="AE"),
        )
        _, out, _ = self.run_command("logs", "--json", "--status", "ok")
        self.assertEqual([json.loads(x)["control_id"] for x in out.splitlines()], ["CTL00002"])
        _, out, _ = self.run_command("logs", "--json", "--status", "accepted")
        self.assertEqual([json.loads(x)["control_id"] for x in out.splitlines()], ["CTL00001"])

    def test_json_types(self) -> None:
        """In --json, action and attempt are numbers, or null when a line has none."""
        self.add_logs(
            log_line(1),
            log_line(2, event="delivery", outcome="delivered", step=0, attempt=1),
        )
        _, out, _ = self.run_command("logs", "--json", "--tail", "2")
        received, delivery = (json.loads(line) for line in out.splitlines())
        self.assertIsNone(received["action"])
        self.assertIsNone(received["attempt"])
        self.assertEqual((delivery["action"], delivery["attempt"]), (0, 1))
        self.assertEqual(list(received), list(LOG_COLUMNS))

    def test_config_after_the_subcommand(self) -> None:
        """--config may follow the subcommand."""
        self.add_logs(log_line(1))
        status, out, err = self.run_command(
            "logs", "--json", "--config", str(self.config), config_first=False
        )
        self.assertEqual(status, 0, err)
        self.assertEqual(json.loads(out)["control_id"], "CTL00001")


class VersionTests(CommandTestCase):
    """``udsgateway --version``."""

    def test_version(self) -> None:
        """--version prints the package's version and exits 0."""
        status, out, _ = self.run_command("--version", config_first=False)
        self.assertEqual(status, 0)
        self.assertEqual(out.strip(), f"udsgateway {__version__}")


class DeliveriesListTests(CommandTestCase):
    """``udsgateway deliveries list``."""

    def test_empty(self) -> None:
        """No deliveries: the headings and "(none)"."""
        status, out, _ = self.run_command("deliveries", "list")
        self.assertEqual(status, 0)
        heading, none = out.splitlines()
        self.assertTrue(heading.startswith("ID  STATE  LANE  DESTINATION"), heading)
        self.assertEqual(none, "(none)")

    def test_destination_address(self) -> None:
        """A destination shows as protocol://host:port, not as a Twisted endpoint."""
        self.assertEqual(
            destination_address("tcp:host=127.0.0.1:port=2576:timeout=10", "mllp"),
            "mllp://127.0.0.1:2576",
        )
        self.assertEqual(
            destination_address("tcp:host=lab.example:port=7000:timeout=5", "tcp"),
            "tcp://lab.example:7000",
        )
        self.assertEqual(
            destination_address("tls:host=a.example:port=7:timeout=5:trustRoots=/ca", "mllp"),
            "mllp+tls://a.example:7",
        )
        # Not an endpoint we write: shown as it is.
        self.assertEqual(destination_address("unix:/tmp/x", "mllp"), "unix:/tmp/x")

    def test_escaped_host(self) -> None:
        """An IPv6 host, written with escaped colons in the endpoint string."""
        self.assertEqual(
            destination_address("tcp:host=fe80\\:\\:1:port=2576:timeout=10", "mllp"),
            "mllp://[fe80::1]:2576",
        )


class TableTests(SynchronousTestCase):
    """print_table."""

    def test_none_is_blank(self) -> None:
        """A None cell prints as nothing (JSON keeps null)."""
        out = io.StringIO()
        print_table([{"a": None, "b": 1}], out)
        self.assertEqual(out.getvalue().splitlines(), ["A  B", "   1"])


class FlowsRenderTests(CommandTestCase):
    """``udsgateway flows render``."""

    def setUp(self) -> None:
        super().setUp()
        self.database.transaction_now(save_app, parse_app(CHAINED_FLOWS), 0.0)

    def write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def test_fake_response(self) -> None:
        """--response NAME=FILE gives a later action an earlier action's response."""
        ack = self.write("ack.hl7", b"MSH|^~\\&|P1|P1|GW|GW|20240101||ACK|A1|P|2.5\nMSA|AA|X42\n")
        status, out, err = self.run_command(
            "flows", "render", "FLWCLITEST0001", "second", "--response", f"first={ack}"
        )
        self.assertEqual(status, 0, err)
        self.assertIn("ZRS|AA|X42|Testperson", out.splitlines())

    def test_without_response(self) -> None:
        """Without a fake response the earlier action's response is empty."""
        status, out, err = self.run_command("flows", "render", "FLWCLITEST0001", "second")
        self.assertEqual(status, 0, err)
        self.assertIn("ZRS|||Testperson", out.splitlines())

    def test_response_of_an_unknown_action(self) -> None:
        """--response names an earlier action, or it is an error."""
        ack = self.write("ack.hl7", b"MSH|^~\\&|P1|P1|GW|GW|20240101||ACK|A1|P|2.5\rMSA|AA|X\r")
        status, _, err = self.run_command(
            "flows", "render", "FLWCLITEST0001", "first", "--response", f"second={ack}"
        )
        self.assertEqual(status, 2)
        self.assertIn("not an earlier action", err)

    def test_tenant_charset(self) -> None:
        """A message without MSH-18 is read with the tenant's default charset (8859/1
        here), as the gateway reads it, not as UTF-8."""
        message = self.write(
            "latin1.hl7",
            "MSH|^~\\&|HIS|Hospital|GW|GW|202401011230||ADT^A04|M1|P|2.3\r"
            "PID|1||12345^^^Hospital||Zoë^Alex\r".encode("latin-1"),
        )
        status, out, err = self.run_command(
            "flows", "render", "FLWCLITEST0001", "first", "--message", message
        )
        self.assertEqual(status, 0, err)
        self.assertIn("PID|1||12345||Zoë", out.splitlines())


#: A chain whose templates take nothing from the clock or a control ID counter, so
#: the command line and the running gateway render the same bytes; the sample
#: has a non-ASCII name and no MSH-18 (read with the tenant's 8859/1).
NON_ASCII_CHAIN = """\
app_id = "APPCLIRENDER01"
name = "Render parity"
tenant = "clinic"

[[flows]]
flow_id = "FLWCLIRENDER01"
name = "Parity"
[flows.trigger]
connection = "MLLP"
message_type = "ADT^A04"
sample = '''
MSH|^~\\&|HIS|Hospital|GW|GW|202401011230||ADT^A04|MSG00001|P|2.3
PID|1||12345^^^Hospital||Zoë^Ærøskøbing
'''

[[flows.actions]]
name = "first"
host = "127.0.0.1"
port = 2997
message_type = "ADT^A04"
template = '''
MSH|^~\\&|GW|GW|P1|P1|{{ msg["MSH-7"] }}||ADT^A04|{{ msg["MSH-10"] }}|P|2.5
PID|1||{{ msg["PID-3.1"] }}||{{ msg["PID-5.1"] }}^{{ msg["PID-5.2"] }}
'''

[[flows.actions]]
name = "second"
host = "127.0.0.1"
port = 2998
message_type = "ADT^A08"
template = '''
MSH|^~\\&|GW|GW|P2|P2|{{ msg["MSH-7"] }}||ADT^A08|{{ msg["MSH-10"] }}|P|2.5
ZRS|{{ responses.first["MSA-1"] }}|{{ responses.first["MSA-2"] }}|{{ msg["PID-5.1"] }}
'''
"""


class RenderParityTests(CommandTestCase):
    """``flows render`` and the executor share one render (``outbound.render``)."""

    def test_same_bytes_as_the_executor(self) -> None:
        """A latin-1 tenant, a sample with non-ASCII names: the command line prints
        exactly the bytes the running gateway sends to each destination, the chained
        action included (given the first destination's real response as a fake one)."""
        chain = parse_app(NON_ASCII_CHAIN)
        self.database.transaction_now(save_app, chain, 0.0)
        tenant = load_config(str(self.config)).tenants[0]
        self.assertEqual(tenant.default_charset, "8859/1")
        running = FlowGateway(apps=(chain,), tenant=tenant)
        self.addCleanup(running.stop)
        sent = chain.flows[0].trigger.sample.lstrip("\n").replace("\n", "\r").encode("latin-1")
        self.assertIn("Zoë".encode("latin-1"), sent)
        self.assertEqual(read_ack(running.send(sent)).code, "AA")
        running.settle()
        (first,) = running.peer(2997).received
        (second,) = running.peer(2998).received
        self.assertIn("Zoë^Ærøskøbing".encode("latin-1"), first)
        self.assertIn(b"ZRS|AA|MSG00001|" + "Zoë".encode("latin-1"), second)

        config = load_config(str(self.config))
        rendered, _ = render_flow_action(config, "FLWCLIRENDER01", "first", None, ())
        self.assertEqual(rendered, first)
        status, out, err = self.run_command("flows", "render", "FLWCLIRENDER01", "first")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.replace("\n", "\r").encode("latin-1"), first)

        response = self.directory / "first-ack.hl7"
        response.write_bytes(destination_ack(control_id_of(first)))
        fake = (f"first={response}",)
        rendered, _ = render_flow_action(config, "FLWCLIRENDER01", "second", None, fake)
        self.assertEqual(rendered, second)
        status, out, err = self.run_command(
            "flows", "render", "FLWCLIRENDER01", "second", "--response", *fake
        )
        self.assertEqual(status, 0, err)
        self.assertEqual(out.replace("\n", "\r").encode("latin-1"), second)

    def test_sample_outside_the_tenant_charset(self) -> None:
        """A sample that the tenant's charset cannot encode is an error that says so,
        not a render from bytes no sender could have sent."""
        chain = parse_app(NON_ASCII_CHAIN.replace("Zoë", "Zoëł"))
        self.database.transaction_now(save_app, chain, 0.0)
        status, _, err = self.run_command("flows", "render", "FLWCLIRENDER01", "first")
        self.assertEqual(status, 2)
        self.assertIn("the flow's sample: the message has characters that", err)


class FlowFileTests(SynchronousTestCase):
    """Flow files as `flows list` prints them."""

    def test_connection_any_case(self) -> None:
        """connection and protocol take MLLP / TCP as `flows list` prints them."""
        app = parse_app(CHAINED_FLOWS)
        flow = app.flows[0]
        self.assertEqual(flow.trigger.connection, "mllp")
        self.assertEqual([a.protocol for a in flow.actions], ["mllp", "tcp"])


class DemoSampleTests(SynchronousTestCase):
    """The demo's synthetic messages."""

    def test_next_of_kin_phone_in_nk1_5(self) -> None:
        """The next of kin's phone number is in NK1-5 (Phone Number), not NK1-4 (Address)."""
        demo = parse_app((REPO / "etc" / "flows" / "demo.toml").read_text("utf-8"))
        samples = [flow.trigger.sample.encode() for flow in demo.flows]
        samples += read_message_files([str(p) for p in sorted((REPO / "examples").iterdir())])
        checked = 0
        for sample in samples:
            for line in sample.replace(b"\r", b"\n").split(b"\n"):
                if line.startswith(b"NK1|"):
                    fields = line.split(b"|")
                    self.assertEqual(fields[4:5], [b""], line)
                    self.assertTrue(fields[5].isdigit(), line)
                    checked += 1
        self.assertGreater(checked, 0)
