"""Tests for udsgateway.hl7.message: the full parse and HL7 path access of the mapping layer."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from udsgateway.hl7.message import (
    ALL,
    Delimiters,
    MessageParseError,
    PathSyntaxError,
    decode,
    delimiters_from_header,
    parse_message,
    parse_path,
)

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    """The bytes of a sample message under tests/fixtures (segments end with CR)."""
    return (FIXTURES / name).read_bytes()


ADT = fixture("adt_a04.hl7").decode("utf-8")


class ParseTests(SynchronousTestCase):
    """Parsing whole messages."""

    def test_segment_separators(self) -> None:
        """CR, LF and CRLF between segments give the same segments."""
        lf = ADT.replace("\r", "\n")
        crlf = ADT.replace("\r", "\r\n")
        expected = parse_message(ADT).segments
        self.assertEqual(parse_message(lf).segments, expected)
        self.assertEqual(parse_message(crlf).segments, expected)
        self.assertEqual([s.name for s in expected], ["MSH", "EVN", "PID", "PV1", "NK1", "NK1"])

    def test_blank_lines_and_bom_are_skipped(self) -> None:
        """A pasted sample with a BOM and blank lines parses like the plain one."""
        pasted = "\ufeff\n" + ADT.replace("\r", "\n\n") + "\n\n"
        self.assertEqual(parse_message(pasted).segments, parse_message(ADT).segments)

    def test_bytes_are_decoded_by_msh_18(self) -> None:
        """Bytes are decoded with the charset MSH-18 names (8859/1 here)."""
        data = "MSH|^~\\&|A|B|C|D|20240501||ADT^A04|1|P|2.5||||||8859/1\rPID|1||1||Müller\r"
        message = parse_message(data.encode("iso8859-1"))
        self.assertEqual(message.get("PID-5"), "Müller")

    def test_bytes_with_empty_msh_18_use_the_default(self) -> None:
        """An empty MSH-18 decodes with the default charset given by the caller."""
        data = "MSH|^~\\&|A|B|C|D|20240501||ADT^A04|1|P|2.5\rPID|1||1||Ønsker\r"
        self.assertEqual(parse_message(data.encode("utf-8")).get("PID-5"), "Ønsker")
        latin = parse_message(data.encode("iso8859-1"), default_charset="iso8859-1")
        self.assertEqual(latin.get("PID-5"), "Ønsker")

    def test_invalid_bytes_are_rejected_not_replaced(self) -> None:
        """Bytes invalid in the charset raise MessageParseError, never decode lossily."""
        data = b"MSH|^~\\&|A|B|C|D|20240501||ADT^A04|1|P|2.5\rPID|1||1||M\xfcller\r"
        error = self.assertRaises(MessageParseError, parse_message, data)
        self.assertEqual(error.reason, "the bytes are not valid utf-8")

    def test_unknown_charset(self) -> None:
        """An MSH-18 we cannot map to a codec raises MessageParseError."""
        data = b"MSH|^~\\&|A|B|C|D|20240501||ADT^A04|1|P|2.5||||||KLINGON\r"
        self.assertRaises(MessageParseError, decode, data)

    def test_not_a_message(self) -> None:
        """Empty input and input that does not start with MSH raise MessageParseError."""
        self.assertRaises(MessageParseError, parse_message, "")
        self.assertRaises(MessageParseError, parse_message, "\r\n")
        self.assertRaises(MessageParseError, parse_message, "PID|1||123\r")
        self.assertRaises(MessageParseError, parse_message, "GET / HTTP/1.1\r\n")

    def test_garbled_delimiters(self) -> None:
        """MSH-1/MSH-2 that repeat a character or use letters raise MessageParseError."""
        for header in ("MSH|^^\\&|A", "MSH|A~\\&|B", "MSH||", "MSH"):
            self.assertRaises(MessageParseError, delimiters_from_header, header)

    def test_non_default_delimiters(self) -> None:
        """A header declaring #$%@! is parsed with those delimiters."""
        message = parse_message("MSH#$%@!#A#B#C#D#2024##ADT$A04#1#P#2.5\rPID#1##1%2##Doe$Jo!Ann\r")
        self.assertEqual(message.delimiters, Delimiters("#", "$", "%", "@", "!"))
        self.assertEqual(message.get("MSH-9.2"), "A04")
        self.assertEqual(message.get("PID-3[2]"), "2")
        self.assertEqual(message.get("PID-5.2.2"), "Ann")

    def test_text_round_trip(self) -> None:
        """Message.text gives back the received message byte for byte."""
        self.assertEqual(parse_message(ADT).text, ADT)


class PathAccessTests(SynchronousTestCase):
    """Message.get with HL7 paths."""

    def setUp(self) -> None:
        self.message = parse_message(ADT)

    def test_whole_field_keeps_its_separators(self) -> None:
        """PID-5 is the whole field in wire form, with its component separators."""
        self.assertEqual(self.message.get("PID-5"), "D\\F\\Angelo^Maria^Luisa^^^^L")

    def test_whole_field_with_repetitions(self) -> None:
        """A repeating field's path without an index gives every repetition."""
        self.assertEqual(
            self.message.get("PID-3"), "MRN100234^^^SYNTHHOSP^MR~INS-77120^^^SYNTHINS^MB"
        )

    def test_component_of_first_repetition(self) -> None:
        """PID-3.1 is component 1 of the first repetition."""
        self.assertEqual(self.message.get("PID-3.1"), "MRN100234")

    def test_repetitions(self) -> None:
        """PID-3[2] is the second repetition; PID-3[2].4 a component of it."""
        self.assertEqual(self.message.get("PID-3[1]"), "MRN100234^^^SYNTHHOSP^MR")
        self.assertEqual(self.message.get("PID-3[2]"), "INS-77120^^^SYNTHINS^MB")
        self.assertEqual(self.message.get("PID-3[2].4"), "SYNTHINS")
        self.assertEqual(self.message.get("PID-13[2].4"), "maria.dangelo@example.org")

    def test_subcomponents(self) -> None:
        """PID-3.4.2 is a subcomponent; a component without & has itself as subcomponent 1."""
        message = parse_message("MSH|^~\\&|A\rPID|1||123^^^H&1.2.3&ISO^MR\r")
        self.assertEqual(message.get("PID-3.4"), "H&1.2.3&ISO")
        self.assertEqual(message.get("PID-3.4.2"), "1.2.3")
        self.assertEqual(message.get("PID-3.4.3"), "ISO")
        self.assertEqual(message.get("PID-3.1.1"), "123")
        self.assertEqual(message.get("PID-3.1.2"), "")

    def test_second_segment(self) -> None:
        """NK1[2]-2 is field 2 of the second NK1; NK1-2 of the first."""
        self.assertEqual(self.message.get("NK1-2"), "D\\F\\Angelo^Paolo")
        self.assertEqual(self.message.get("NK1[2]-2"), "Bianchi^Giulia")
        self.assertEqual(self.message.get("NK1[2]-3.2"), "Sister")

    def test_whole_segment(self) -> None:
        """A path without a field gives the segment's wire text."""
        self.assertEqual(
            self.message.get("NK1[2]"),
            "NK1|2|Bianchi^Giulia|SIS^Sister^HL70063||^PRN^PH^^1^217^5550199",
        )

    def test_msh_numbering(self) -> None:
        """MSH-1 is the field separator, MSH-2 the encoding characters, MSH-3 the sender."""
        self.assertEqual(self.message.get("MSH-1"), "|")
        self.assertEqual(self.message.get("MSH-2"), "^~\\&")
        self.assertEqual(self.message.get("MSH-3"), "REGSYS")
        self.assertEqual(self.message.get("MSH-9"), "ADT^A04^ADT_A01")
        self.assertEqual(self.message.get("MSH-10"), "ADT0001")

    def test_msh_2_is_never_split(self) -> None:
        """MSH-2 holds the delimiters: its first component is all of it, no second one."""
        self.assertEqual(self.message.get("MSH-2.1"), "^~\\&")
        self.assertEqual(self.message.get("MSH-2[1]"), "^~\\&")
        self.assertEqual(self.message.get("MSH-2.2"), "")
        self.assertEqual(self.message.get("MSH-2[2]"), "")
        self.assertEqual(self.message.get("MSH-2[1].1.1"), "^~\\&")
        self.assertEqual(self.message.get("MSH-2.1.2"), "")
        self.assertEqual(self.message.get("MSH-1[1].1"), "|")

    def test_missing_paths_are_empty(self) -> None:
        """Absent segments, fields, repetitions, components and subcomponents give ""."""
        for path in (
            "ZZZ-1",
            "NK1[3]-2",
            "PV2-1",
            "PID-99",
            "PID-4",
            "PID-3[3]",
            "PID-3[3].1",
            "PID-5.9",
            "PID-5.1.2",
            "EVN-1.2",
            "NK1[9]",
        ):
            self.assertEqual(self.message.get(path), "", path)

    def test_wire_form_is_kept(self) -> None:
        """Escapes, including a malformed one, come back exactly as received."""
        message = parse_message(fixture("siu_s15.hl7"))
        self.assertEqual(message.get("PID-5.1"), "D\\F\\Angelo")
        self.assertEqual(message.get("NTE-3"), "Patient called to cancel \\X4 see desk.")

    def test_invalid_paths_raise(self) -> None:
        """A string that is not a path raises PathSyntaxError."""
        for path in (
            "PID5",
            "pid-5",
            "PID-",
            "PID-0",
            "PID-5.",
            "PID-5..1",
            "PID-5.1.2.3",
            "PID[0]-1",
            "PID-3[x]",
            "PI-5",
            "PID-5 ",
            "NK1[*]-2",
            "PID-3[*].1",
            "",
        ):
            self.assertRaises(PathSyntaxError, self.message.get, path)

    def test_wildcards_are_refused_by_get(self) -> None:
        """[*] selects several values, which Message.get cannot return."""
        self.assertRaises(PathSyntaxError, self.message.get, "NK1[*]")
        self.assertRaises(PathSyntaxError, self.message.get, "PID-3[*]")


class PathSyntaxTests(SynchronousTestCase):
    """parse_path and the canonical spelling of paths."""

    def test_parts(self) -> None:
        """Every part of SEG[n]-F[r].C.S is parsed."""
        path = parse_path("NK1[2]-3[4].5.6")
        self.assertEqual(
            (path.segment, path.occurrence, path.field, path.repetition),
            ("NK1", 2, 3, 4),
        )
        self.assertEqual((path.component, path.subcomponent), (5, 6))

    def test_wildcards(self) -> None:
        """[*] is accepted for all segments or all repetitions."""
        self.assertEqual(parse_path("NK1[*]").occurrence, ALL)
        self.assertEqual(parse_path("PID-3[*]").repetition, ALL)
        self.assertTrue(parse_path("PID-3[*]").has_wildcard)
        self.assertFalse(parse_path("PID-3[2]").has_wildcard)

    def test_canonical_spelling(self) -> None:
        """str(path) spells the path canonically, dropping a [1] segment index."""
        for text, canonical in (
            ("PID-5.1", "PID-5.1"),
            ("NK1[2]-2", "NK1[2]-2"),
            ("NK1[1]-2", "NK1-2"),
            ("PID-3[2].1", "PID-3[2].1"),
            ("PID-3[*]", "PID-3[*]"),
            ("ZPD", "ZPD"),
        ):
            self.assertEqual(str(parse_path(text)), canonical)
