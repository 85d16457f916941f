"""Tests for udsgateway.mapping.catalogue: the variable catalogue of a trigger's sample."""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from udsgateway.hl7.message import MessageParseError, PathSyntaxError, parse_message
from udsgateway.mapping.catalogue import Variable, path_name, variable_catalogue
from udsgateway.mapping.templating import TemplateData, compile_template, render_body

FIXTURES = Path(__file__).parent / "fixtures"
REQUIRED_SEGMENTS: tuple[str, ...] = ("MSH", "EVN", "PID", "PD1", "PV1", "PV2", "NK1", "AL1")
REQUIRED_SEGMENTS += ("DG1", "IN1", "SCH", "TQ1", "NTE", "RGS", "AIS", "AIG", "AIL", "AIP")
REQUIRED_SEGMENTS += ("MSA", "ERR")
SAMPLES = {
    "ADT^A04": "adt_a04.hl7",
    "ADT^A08": "adt_a08.hl7",
    "SIU^S12": "siu_s12.hl7",
    "SIU^S14": "siu_s14.hl7",
    "SIU^S15": "siu_s15.hl7",
}


def sample(name: str) -> str:
    """A sample message from tests/fixtures, as text with CR between segments."""
    return (FIXTURES / name).read_bytes().decode("utf-8")


def by_path(variables: list[Variable]) -> dict[str, Variable]:
    """Index a catalogue by path."""
    return {variable.path: variable for variable in variables}


class FirstClassSampleTests(SynchronousTestCase):
    """The catalogue of each first-class message type's sample."""

    def assert_entries(self, message_type: str, expected: list[tuple[str, str, str]]) -> None:
        """The catalogue of the sample holds these (path, name, value) entries."""
        catalogue = by_path(variable_catalogue(sample(SAMPLES[message_type])))
        for path, name, value in expected:
            self.assertIn(path, catalogue)
            self.assertEqual((catalogue[path].name, catalogue[path].value), (name, value))
            self.assertEqual(catalogue[path].expression, f'{{{{ msg["{path}"] }}}}')

    def test_adt_a04(self) -> None:
        """ADT^A04: header, event, identifiers by repetition, escaped name, next of kin."""
        self.assert_entries(
            "ADT^A04",
            [
                ("MSH-9", "Message Type", "ADT^A04^ADT_A01"),
                ("MSH-9.2", "Message Type / Trigger Event", "A04"),
                ("MSH-10", "Message Control ID", "ADT0001"),
                ("EVN-1", "Event Type Code", "A04"),
                ("EVN-5.2", "Operator ID / Family Name", "Frontdesk"),
                (
                    "PID-3",
                    "Patient Identifier List",
                    "MRN100234^^^SYNTHHOSP^MR~INS-77120^^^SYNTHINS^MB",
                ),
                ("PID-3[1]", "Patient Identifier List", "MRN100234^^^SYNTHHOSP^MR"),
                ("PID-3.1", "Patient Identifier List / ID Number", "MRN100234"),
                ("PID-3[2].1", "Patient Identifier List / ID Number", "INS-77120"),
                ("PID-3[2].5", "Patient Identifier List / Identifier Type Code", "MB"),
                ("PID-5", "Patient Name", "D\\F\\Angelo^Maria^Luisa^^^^L"),
                ("PID-5.1", "Patient Name / Family Name", "D\\F\\Angelo"),
                ("PID-5.2", "Patient Name / Given Name", "Maria"),
                ("PID-7", "Date Time of Birth", "19850314"),
                ("PID-8", "Administrative Sex", "F"),
                ("PID-11.3", "Patient Address / City", "Springfield"),
                ("PV1-2", "Patient Class", "O"),
                ("PV1-3.1", "Assigned Patient Location / Point of Care", "CLINIC1"),
                ("PV1-19", "Visit Number", "VIS0001"),
                ("NK1-2.1", "Name / Family Name", "D\\F\\Angelo"),
                ("NK1[2]-2.1", "Name / Family Name", "Bianchi"),
                ("NK1[2]-3.2", "Relationship / Text", "Sister"),
            ],
        )

    def test_adt_a08(self) -> None:
        """ADT^A08: the updated address and the business phone with its extension."""
        self.assert_entries(
            "ADT^A08",
            [
                ("MSH-9.2", "Message Type / Trigger Event", "A08"),
                ("EVN-1", "Event Type Code", "A08"),
                ("PID-11.1", "Patient Address / Street Address", "48 Sample Avenue"),
                ("PID-11.5", "Patient Address / Zip or Postal Code", "62704"),
                ("PID-14.8", "Phone Number Business / Extension", "12"),
                ("PV1-3.3", "Assigned Patient Location / Bed", "B"),
            ],
        )

    def test_siu_s12(self) -> None:
        """SIU^S12: appointment IDs, timing, note and the three resource segments."""
        self.assert_entries(
            "SIU^S12",
            [
                ("SCH-1", "Placer Appointment ID", "APT1001^SCHEDSYS"),
                ("SCH-1.1", "Placer Appointment ID / Entity Identifier", "APT1001"),
                ("SCH-2.2", "Filler Appointment ID / Namespace ID", "SCHEDSYS"),
                ("SCH-9", "Appointment Duration", "30"),
                ("SCH-11.4", "Appointment Timing Quantity / Start Date Time", "20240510140000"),
                ("SCH-25", "Filler Status Code", "Booked"),
                ("NTE-3", "Comment", "Patient prefers afternoon appointments."),
                ("RGS-2", "Segment Action Code", "A"),
                ("AIS-3.2", "Universal Service Identifier / Text", "Follow-up visit"),
                ("AIS-4", "Start Date Time", "20240510140000"),
                ("AIL-3.1", "Location Resource ID / Point of Care", "CLINIC1"),
                ("AIP-3.2", "Personnel Resource ID / Family Name", "Careful"),
                ("AIP-4.1", "Resource Type / Identifier", "ATTENDING"),
            ],
        )

    def test_siu_s14(self) -> None:
        """SIU^S14: the event reason and the new start time."""
        self.assert_entries(
            "SIU^S14",
            [
                ("MSH-9.2", "Message Type / Trigger Event", "S14"),
                ("SCH-6.1", "Event Reason / Identifier", "RESCHED"),
                ("SCH-11.4", "Appointment Timing Quantity / Start Date Time", "20240510150000"),
                ("AIS-2", "Segment Action Code", "U"),
            ],
        )

    def test_siu_s15(self) -> None:
        """SIU^S15: cancellation reason and status; a malformed escape kept as received."""
        self.assert_entries(
            "SIU^S15",
            [
                ("MSH-9.2", "Message Type / Trigger Event", "S15"),
                ("SCH-6.2", "Event Reason / Text", "Cancelled at patient request"),
                ("SCH-25", "Filler Status Code", "Cancelled"),
                ("NTE-3", "Comment", "Patient called to cancel \\X4 see desk."),
                ("AIL-12", "Filler Status Code", "Cancelled"),
            ],
        )

    def test_values_match_the_message(self) -> None:
        """Every entry's value is what Message.get returns for its path, and is not empty."""
        for name in SAMPLES.values():
            message = parse_message(sample(name))
            for variable in variable_catalogue(sample(name)):
                self.assertNotEqual(variable.value, "", variable.path)
                self.assertEqual(message.get(variable.path), variable.value, variable.path)

    def test_expressions_insert_the_value(self) -> None:
        """Each entry's expression, pasted into a template, inserts exactly its value."""
        for message_type, name in SAMPLES.items():
            trigger = parse_message(sample(name))
            for variable in variable_catalogue(sample(name)):
                if variable.path in ("MSH-1", "MSH-2"):
                    continue  # a delimiter inside a field would change the structure
                template = compile_template(
                    f"MSH|^~\\&|GW||||||{message_type}|1\rNTE|1||{variable.expression}|end"
                )
                body = render_body(
                    template,
                    TemplateData(trigger),
                    message_type=message_type,
                    now=lambda: datetime(2024, 5, 1),
                    new_control_id=lambda: "1",
                )
                self.assertEqual(
                    body.decode("utf-8").split("\r")[1],
                    f"NTE|1||{variable.value}|end",
                    variable.path,
                )


class CatalogueTests(SynchronousTestCase):
    """Order, completeness, separators and versions."""

    def test_message_order(self) -> None:
        """Entries come in message order: by segment, field, repetition, component."""
        paths = [v.path for v in variable_catalogue(sample("adt_a04.hl7"))]
        for earlier, later in (
            ("MSH-1", "MSH-2"),
            ("MSH-10", "EVN-1"),
            ("PID-3", "PID-3[1]"),
            ("PID-3[1]", "PID-3.1"),
            ("PID-3.5", "PID-3[2]"),
            ("PID-3[2].5", "PID-5"),
            ("PID-18", "PV1-1"),
            ("NK1-5.7", "NK1[2]-1"),
        ):
            self.assertLess(paths.index(earlier), paths.index(later), (earlier, later))
        self.assertEqual(paths[:3], ["MSH-1", "MSH-2", "MSH-3"])

    def test_only_populated_paths(self) -> None:
        """Empty fields and components are left out; leaves of populated ones are in."""
        paths = {v.path for v in variable_catalogue(sample("adt_a04.hl7"))}
        self.assertNotIn("PID-2", paths)
        self.assertNotIn("PID-4", paths)
        self.assertNotIn("PID-5.3.1", paths)
        self.assertNotIn("PID-5.4", paths)
        self.assertIn("PID-5.7", paths)
        self.assertNotIn("MSH-2.1", paths)

    def test_subcomponents(self) -> None:
        """A component with subcomponents lists the component and each subcomponent."""
        variables = by_path(
            variable_catalogue("MSH|^~\\&|A|B|C|D|2024||ADT^A04|1|P|2.5\rPID|1||7^^^H&1.2.3&ISO\r")
        )
        self.assertEqual(variables["PID-3.4"].value, "H&1.2.3&ISO")
        self.assertEqual(
            (variables["PID-3.4.2"].name, variables["PID-3.4.2"].value),
            ("Patient Identifier List / Assigning Authority / Universal ID", "1.2.3"),
        )

    def test_separators_do_not_matter(self) -> None:
        """A sample pasted with LF or CRLF gives the same catalogue as with CR."""
        text = sample("siu_s12.hl7")
        expected = variable_catalogue(text)
        self.assertEqual(variable_catalogue(text.replace("\r", "\n")), expected)
        self.assertEqual(variable_catalogue(text.replace("\r", "\r\n")), expected)
        self.assertEqual(variable_catalogue(text.encode("utf-8")), expected)

    def test_version_from_msh_12_and_override(self) -> None:
        """Names follow MSH-12 unless a version is given (PID-8 is "Sex" in 2.3)."""
        text = sample("adt_a04.hl7")
        self.assertEqual(by_path(variable_catalogue(text))["PID-8"].name, "Administrative Sex")
        old = by_path(variable_catalogue(text, "2.3"))
        self.assertEqual(old["PID-8"].name, "Sex")
        self.assertEqual(old["PID-7"].name, "Date of Birth")

    def test_unknown_version_falls_back(self) -> None:
        """A later version uses the latest tables we have; nonsense uses the default."""
        text = sample("adt_a04.hl7")
        self.assertEqual(
            by_path(variable_catalogue(text, "2.8"))["PID-8"].name, "Administrative Sex"
        )
        self.assertEqual(
            by_path(variable_catalogue(text, "banana"))["PID-5.1"].name,
            "Patient Name / Family Name",
        )

    def test_unknown_segment_has_no_name(self) -> None:
        """A Z-segment is listed with its paths and values but an empty name."""
        variables = by_path(
            variable_catalogue("MSH|^~\\&|A|B|C|D|2024||ADT^A04|1|P|2.5\rZPD|1|x^y\r")
        )
        self.assertEqual((variables["ZPD-2.2"].name, variables["ZPD-2.2"].value), ("", "y"))

    def test_not_a_message(self) -> None:
        """A sample that is not HL7 raises MessageParseError."""
        self.assertRaises(MessageParseError, variable_catalogue, "hello")


class PathNameTests(SynchronousTestCase):
    """path_name and the segment tables."""

    def test_names(self) -> None:
        """Fields, components and subcomponents are named from the tables."""
        self.assertEqual(path_name("PID-5"), "Patient Name")
        self.assertEqual(path_name("PID-5.1.1", "2.5"), "Patient Name / Family Name / Surname")
        self.assertEqual(path_name("MSH-10"), "Message Control ID")
        self.assertEqual(path_name("MSA-2", "2.3"), "Message Control ID")
        self.assertEqual(path_name("ERR-3", "2.5"), "HL7 Error Code")

    def test_unknown_parts(self) -> None:
        """An unknown component is numbered; an unknown field or segment has no name."""
        self.assertEqual(path_name("PID-8.3", "2.5"), "Administrative Sex / Component 3")
        self.assertEqual(path_name("PID-99"), "")
        self.assertEqual(path_name("ZPD-1"), "")
        self.assertEqual(path_name("PID"), "")
        self.assertRaises(PathSyntaxError, path_name, "PID5")

    def test_segment_defined_only_later(self) -> None:
        """TQ1 first appears in 2.5; asked for 2.3 it is still named from 2.5."""
        self.assertEqual(path_name("TQ1-7", "2.3"), path_name("TQ1-7", "2.5"))
        self.assertNotEqual(path_name("TQ1-7", "2.3"), "")

    def test_tables_cover_the_required_segments(self) -> None:
        """segments.json names every required segment for every required version."""
        data = json.loads(
            resources.files("udsgateway").joinpath("data/segments.json").read_text("utf-8")
        )
        self.assertEqual(data["versions"], ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"])
        for segment in REQUIRED_SEGMENTS:
            self.assertIn(segment, data["segments"])
            for version in data["versions"]:
                self.assertNotEqual(path_name(f"{segment}-1", version), "", (segment, version))
