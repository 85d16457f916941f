"""The ``udsgateway flows`` commands, run as an operator runs them: a real process.

Each test has its own configuration and SQLite file in a temporary folder;
the ports are only printed (Host, Port, App ID, Flow ID), never listened on.
"""

from __future__ import annotations

import json
import re
import socket
import tomllib
from contextlib import closing
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import (
    DEMO_FLOWS,
    DEMO_TENANT,
    HOST,
    REPO,
    count,
    database_path,
    new_directory,
    query,
    start_gateway,
    udsgateway,
    write_config,
)

DEMO_APP_ID = "APPDEMO0000001"
DEMO_FLOW_IDS = [
    "FLWA04DEMO0001",
    "FLWA04TCPDEMO1",
    "FLWA08DEMO0001",
    "FLWS12DEMO0001",
    "FLWS14DEMO0001",
    "FLWS15DEMO0001",
]

#: A flow file without IDs, with every kind of value a flow file holds.
LAB_FLOWS = """\
name = "Lab results"
tenant = "lab"
description = "Results feed; \\"quoted\\", accented: Zoë, tab:\\t."

[variables]
partner_application = "LIS"
empty = ""

[[flows]]
name = "Results"
description = "Observation results"
[flows.trigger]
connection = "tcp"
message_type = "ORU^R01"
ack = "after_actions"
ack_timeout = 12.5
sample = '''
MSH|^~\\&|LAB|Hospital|LSQ|LeadSquared|202401011231||ORU^R01|MSG00009|P|2.5.1\r
PID|1||67890^^^Hospital||Roe^Jane||19750505|F\r
OBX|1|NM|WBC^White cells||7.2|10*9/L|4.0-11.0|N|||F\\E\\x\r
'''

[[flows]]
name = "Orders (paused)"
enabled = false
[flows.trigger]
message_type = "ORM^O01"
ack_timeout = 5
"""

_HEADING = re.compile(r"\S+(?: \S+)*")


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of a table printed by the CLI, keyed by their upper-case headings."""
    header, *lines = text.splitlines()
    spans = [(m.group(), m.start()) for m in _HEADING.finditer(header)]
    rows = []
    for line in lines:
        row = {}
        for index, (heading, start) in enumerate(spans):
            end = spans[index + 1][1] if index + 1 < len(spans) else None
            row[heading] = line[start:end].strip()
        rows.append(row)
    return rows


def id_columns(rows: list[dict[str, str]]) -> list[tuple[str, str, str, str]]:
    return [(r["HOST"], r["PORT"], r["APP ID"], r["FLOW ID"]) for r in rows]


def assert_contains(test: SynchronousTestCase, original: Any, exported: Any, at: str) -> None:
    """Every value of ``original`` is in ``exported`` at the same place (defaults may be added)."""
    if isinstance(original, dict):
        test.assertIsInstance(exported, dict, at)
        for key, value in original.items():
            test.assertIn(key, exported, f"{at}.{key} lost")
            assert_contains(test, value, exported[key], f"{at}.{key}")
    elif isinstance(original, list):
        test.assertIsInstance(exported, list, at)
        test.assertEqual(len(original), len(exported), at)
        for index, (value, copy) in enumerate(zip(original, exported, strict=True)):
            assert_contains(test, value, copy, f"{at}[{index}]")
    else:
        test.assertEqual(original, exported, at)


class FlowsCommandTests(SynchronousTestCase):
    """``udsgateway flows import / export / list``."""

    def setup_config(self, demo_port: int, lab_port: int) -> Path:
        self.directory = new_directory(self)
        return write_config(self.directory, {DEMO_TENANT: demo_port, "lab": lab_port})

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text, encoding="utf-8")
        return path

    def import_ok(self, config: Path, *files: Path) -> list[dict[str, str]]:
        result = udsgateway(config, "flows", "import", *files)
        self.assertEqual(result.returncode, 0, result.stderr)
        return parse_table(result.stdout)

    def list_json(self, config: Path, *arguments: str) -> list[dict[str, Any]]:
        result = udsgateway(config, "flows", "list", "--json", *arguments)
        self.assertEqual(result.returncode, 0, result.stderr)
        return [json.loads(line) for line in result.stdout.splitlines()]

    def export_ok(self, config: Path, app_id: str, name: str) -> Path:
        path = self.directory / name
        result = udsgateway(config, "flows", "export", app_id, "-o", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        return path

    def test_import_prints_host_port_ids(self) -> None:
        """Importing a flow file prints a table with Host, Port, App ID and Flow ID
        (and the other details) of each of its flows."""
        config = self.setup_config(26600, 26601)
        result = udsgateway(config, "flows", "import", DEMO_FLOWS)
        self.assertEqual(result.returncode, 0, result.stderr)
        header = result.stdout.splitlines()[0].split()
        self.assertEqual(header[:6], ["HOST", "PORT", "APP", "ID", "FLOW", "ID"])
        rows = parse_table(result.stdout)
        self.assertEqual(
            id_columns(rows), [(HOST, "26600", DEMO_APP_ID, flow) for flow in DEMO_FLOW_IDS]
        )
        self.assertEqual(rows[0]["TYPE"], "ADT^A04")
        self.assertEqual(rows[1]["CONNECTION"], "TCP")
        self.assertEqual(rows[0]["NAME"], "Registration (ADT^A04)")

    def test_import_twice_keeps_ids(self) -> None:
        """A file without IDs gets an App ID and Flow IDs on its first import; importing
        it again keeps them and adds nothing."""
        config = self.setup_config(26610, 26611)
        lab = self.write("lab.toml", LAB_FLOWS)
        first = id_columns(self.import_ok(config, lab))
        self.assertEqual(len(first), 2)
        (app_id,) = {row[2] for row in first}
        self.assertRegex(app_id, r"^APP[A-Z0-9]{10}$")
        for _host, port, _app, flow_id in first:
            self.assertEqual(port, "26611")
            self.assertRegex(flow_id, r"^FLW[A-Z0-9]{10}$")
        self.assertEqual(len({row[3] for row in first}), 2)

        second = id_columns(self.import_ok(config, lab))
        self.assertEqual(second, first)
        listed = self.list_json(config)
        self.assertEqual(
            [(r["host"], r["port"], r["app_id"], r["flow_id"]) for r in listed], first
        )

    def test_export_import_lossless(self) -> None:
        """``flows export`` writes a file that holds everything of the imported one;
        importing it changes nothing, and exporting again gives the same text."""
        config = self.setup_config(26620, 26621)
        lab = self.write("lab.toml", LAB_FLOWS)
        imported = self.import_ok(config, DEMO_FLOWS, lab)
        lab_app = imported[-1]["APP ID"]

        for app_id, source in ((DEMO_APP_ID, DEMO_FLOWS), (lab_app, lab)):
            exported = self.export_ok(config, app_id, f"{app_id}-1.toml")
            document = tomllib.loads(exported.read_text(encoding="utf-8"))
            assert_contains(self, tomllib.loads(source.read_text(encoding="utf-8")), document, "")
            self.assertEqual(document["app_id"], app_id)

            again = self.import_ok(config, exported)
            self.assertEqual(
                id_columns(again), [row for row in id_columns(imported) if row[2] == app_id]
            )
            second = self.export_ok(config, app_id, f"{app_id}-2.toml")
            self.assertEqual(
                second.read_text(encoding="utf-8"), exported.read_text(encoding="utf-8")
            )

    def test_invalid_files_report_every_problem(self) -> None:
        """Flow files with several errors: every error is reported, each with its file
        and key, the exit status is 2, and nothing is imported (not even a valid file
        given in the same command)."""
        config = self.setup_config(26630, 26631)
        broken = self.write(
            "broken.toml",
            """\
name = "Broken"
colour = "blue"

[[flows]]
name = "First"
[flows.trigger]
connection = "serial"
message_type = "ADT-A04"

[[flows]]
[flows.trigger]
message_type = "SIU^S12"
ack = "later"
""",
        )
        elsewhere = self.write(
            "elsewhere.toml",
            'name = "Elsewhere"\ntenant = "nobody"\n',
        )
        lab = self.write("lab.toml", LAB_FLOWS)
        result = udsgateway(config, "flows", "import", lab, broken, elsewhere)
        self.assertEqual(result.returncode, 2, result.stdout)
        expected = [
            (broken, "colour"),
            (broken, "tenant"),
            (broken, "flows[0].trigger.connection"),
            (broken, "flows[0].trigger.message_type"),
            (broken, "flows[1].name"),
            (broken, "flows[1].trigger.ack"),
            (elsewhere, "tenant"),
        ]
        for path, key in expected:
            self.assertIn(f"{path}: {key}: ", result.stderr)
        self.assertNotIn(str(lab), result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(self.list_json(config), [])

    def test_list_json(self) -> None:
        """``flows list --json`` prints one JSON object per flow with Host, Port, App ID,
        Flow ID and the flow's details; ``--tenant`` keeps one tenant's flows."""
        config = self.setup_config(26640, 26641)
        lab = self.write("lab.toml", LAB_FLOWS)
        imported = self.import_ok(config, DEMO_FLOWS, lab)

        listed = self.list_json(config)
        self.assertEqual(
            [(r["host"], str(r["port"]), r["app_id"], r["flow_id"]) for r in listed],
            sorted(id_columns(imported), key=lambda row: row[2] != DEMO_APP_ID),
        )
        first = listed[0]
        self.assertEqual(
            (first["tenant"], first["type"], first["connection"], first["name"]),
            (DEMO_TENANT, "ADT^A04", "MLLP", "Registration (ADT^A04)"),
        )
        paused = [r for r in listed if r["tenant"] == "lab" and r["type"] == "ORM^O01"]
        self.assertEqual([r["enabled"] for r in paused], ["no"])

        only_lab = self.list_json(config, "--tenant", "lab")
        self.assertEqual([r for r in listed if r["tenant"] == "lab"], only_lab)
        self.assertEqual(len(only_lab), 2)


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class SendNewControlIdTests(SynchronousTestCase):
    """``udsgateway send --new-control-id`` against a running gateway."""

    def test_resend_as_new_messages(self) -> None:
        """Sending a file again resends duplicates (the stored ACK is replayed and
        nothing new is stored); with --new-control-id every message gets a fresh
        MSH-10, is ACKed with it and stored as a new message, and the file is
        left as it was."""
        directory = new_directory(self)
        # The demo flows, delivering to a port nothing listens on: deliveries queue.
        flows = directory / "demo.toml"
        flows.write_text(
            DEMO_FLOWS.read_text("utf-8").replace("port = 2576", f"port = {free_port()}"),
            encoding="utf-8",
        )
        port = free_port()
        config = write_config(directory, {DEMO_TENANT: port}, {DEMO_TENANT: [flows]})
        start_gateway(self, config, port)
        example = REPO / "examples" / "adt_a04.hl7"
        before = example.read_bytes()
        to = f"{HOST}:{port}"

        def send(*options: str) -> list[list[str]]:
            result = udsgateway(config, "send", *options, example, "--to", to)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            return [line.split() for line in result.stdout.splitlines()]

        self.assertEqual(send(), [["1", "MSG00001", "AA", "MSG00001"]])
        self.assertEqual(send(), [["1", "MSG00001", "AA", "MSG00001"]], "a replayed ACK")
        database = database_path(directory)
        self.assertEqual(count(database, "SELECT count(*) FROM messages"), 1)

        fresh = [send("--new-control-id")[0], send("--new-control-id")[0]]
        for number, control_id, code, msa2 in fresh:
            self.assertEqual((number, code, msa2), ("1", "AA", control_id))
            self.assertNotEqual(control_id, "MSG00001")
        self.assertNotEqual(fresh[0][1], fresh[1][1])
        stored = query(database, "SELECT control_id FROM messages ORDER BY id")
        self.assertEqual(
            [row["control_id"] for row in stored], ["MSG00001", fresh[0][1], fresh[1][1]]
        )
        self.assertEqual(example.read_bytes(), before)
