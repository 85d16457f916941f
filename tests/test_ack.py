"""Tests for udsgateway.hl7.ack: the ACKs we send and the ACKs we read."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from tests.strict_ack import NOT_STRICT_VERSIONS, STRICT_VERSIONS, strictly_valid
from udsgateway.hl7.ack import (
    TABLE_0357,
    AckError,
    ControlIdSource,
    Outcome,
    Reply,
    ack_code,
    ack_layout,
    build_ack,
    hl7_timestamp,
    is_enhanced,
    parse_reply,
    wants_accept_ack,
)
from udsgateway.hl7.header import Delimiters, Header, HeaderProblem, parse_header

# Synthetic people and systems only.
ADT_A04 = (
    b"MSH|^~\\&|REGSYS|GENHOSP|UDSGW|DEMO|20240102030405||ADT^A04^ADT_A01|MSG00001|P|2.5\r"
    b"EVN|A04|20240102030405\r"
    b"PID|1||123456^^^GENHOSP^MR||TESTPERSON^ALEX||19800101|F\r"
)
NOW = "20240607080910"


def _header(frame: bytes, **kwargs: str) -> Header:
    result = parse_header(frame, **kwargs)
    assert isinstance(result, Header), result
    return result


def _problem(frame: bytes) -> HeaderProblem:
    result = parse_header(frame)
    assert isinstance(result, HeaderProblem), result
    return result


def _with_ack_types(accept: str, application: str) -> Header:
    frame = ADT_A04.replace(b"|P|2.5\r", f"|P|2.5|||{accept}|{application}\r".encode(), 1)
    return _header(frame)


def _nak_for(problem: HeaderProblem) -> bytes:
    assert problem.header is not None
    return build_ack(
        problem.header,
        "AR",
        control_id="GW1",
        timestamp=NOW,
        error=AckError(problem.code, problem.location, problem.diagnostic),
    )


class TableTests(SynchronousTestCase):
    def test_table_0357(self) -> None:
        """Table 0357 holds the codes 100-104 and 200-207 with their HL7 texts."""
        self.assertEqual(sorted(TABLE_0357), [*range(100, 105), *range(200, 208)])
        self.assertEqual(TABLE_0357[101], "Required field missing")
        self.assertEqual(TABLE_0357[207], "Application internal error")


class AckModeTests(SynchronousTestCase):
    def test_original_mode_codes(self) -> None:
        """Without MSH-15 and MSH-16 the codes are AA, AE and AR."""
        header = _header(ADT_A04)
        self.assertFalse(is_enhanced(header))
        self.assertEqual([ack_code(header, outcome) for outcome in Outcome], ["AA", "AE", "AR"])

    def test_enhanced_mode_codes(self) -> None:
        """MSH-15 or MSH-16 present selects enhanced mode: CA, CE and CR."""
        for accept, application in (("AL", ""), ("", "AL"), ("NE", "NE")):
            header = _with_ack_types(accept, application)
            self.assertTrue(is_enhanced(header))
            self.assertEqual(
                [ack_code(header, outcome) for outcome in Outcome], ["CA", "CE", "CR"]
            )

    def test_original_mode_always_acks(self) -> None:
        """In original mode every outcome is acknowledged."""
        header = _header(ADT_A04)
        for outcome in Outcome:
            self.assertTrue(wants_accept_ack(header, outcome))

    def test_enhanced_conditions(self) -> None:
        """MSH-15 AL (or empty) always, NE never, ER only on failure, SU only on success."""
        accept, error, reject = Outcome.ACCEPT, Outcome.ERROR, Outcome.REJECT
        expected = {
            ("AL", accept): True,
            ("AL", error): True,
            ("AL", reject): True,
            ("", accept): True,
            ("", reject): True,
            ("NE", accept): False,
            ("NE", error): False,
            ("NE", reject): False,
            ("ER", accept): False,
            ("ER", error): True,
            ("ER", reject): True,
            ("SU", accept): True,
            ("SU", error): False,
            ("SU", reject): False,
            ("ne", accept): False,
            ("XX", accept): True,
        }
        for (condition, outcome), wanted in expected.items():
            header = _with_ack_types(condition, "AL")
            self.assertEqual(wants_accept_ack(header, outcome), wanted, (condition, outcome))


class BuildAckTests(SynchronousTestCase):
    def test_ack_exact_bytes(self) -> None:
        """An AA swaps the applications, echoes MSH-10 in MSA-2 and carries our MSH-10."""
        ack = build_ack(_header(ADT_A04), "AA", control_id="GW000A1", timestamp=NOW)
        self.assertEqual(
            ack,
            b"MSH|^~\\&|UDSGW|DEMO|REGSYS|GENHOSP|20240607080910||ACK^A04^ACK|GW000A1|P|2.5\r"
            b"MSA|AA|MSG00001\r",
        )

    def test_nak_exact_bytes(self) -> None:
        """An AE carries MSA-3 text and an ERR with location, 0357 code, severity, diagnostic."""
        ack = build_ack(
            _header(ADT_A04),
            "AE",
            control_id="GW000A2",
            timestamp=NOW,
            error=AckError(102, "PID^1^7", "date | invalid"),
            text="Rejected: see ERR",
        )
        self.assertEqual(
            ack,
            b"MSH|^~\\&|UDSGW|DEMO|REGSYS|GENHOSP|20240607080910||ACK^A04^ACK|GW000A2|P|2.5\r"
            b"MSA|AE|MSG00001|Rejected: see ERR\r"
            b"ERR||PID^1^7|102^Data type error^HL70357|E|||date \\F\\ invalid\r",
        )

    def test_nak_for_empty_control_id(self) -> None:
        """MSH-10 empty: the NAK is a 101 at MSH-10 and MSA-2 is empty."""
        frame = ADT_A04.replace(b"|MSG00001|", b"||")
        nak = _nak_for(_problem(frame))
        self.assertEqual(
            nak,
            b"MSH|^~\\&|UDSGW|DEMO|REGSYS|GENHOSP|20240607080910||ACK^A04^ACK|GW1|P|2.5\r"
            b"MSA|AR|\r"
            b"ERR||MSH^1^10|101^Required field missing^HL70357|E|||"
            b"MSH-10 message control id empty\r",
        )

    def test_nak_for_missing_type(self) -> None:
        """MSH-9 missing: the NAK is a 101 at MSH-9, MSH-9 of the ACK is ACK alone."""
        frame = ADT_A04.replace(b"|ADT^A04^ADT_A01|", b"||")
        nak = _nak_for(_problem(frame))
        self.assertIn(b"||ACK|GW1|P|2.5\rMSA|AR|MSG00001\r", nak)
        self.assertIn(b"\rERR||MSH^1^9|101^Required field missing^HL70357|E|||", nak)

    def test_nak_for_garbled_msh2(self) -> None:
        """A garbled MSH-2 gets a 102 at MSH-2 with default encoding characters and MSA-2."""
        frame = ADT_A04.replace(b"^~\\&", b"^^\\&", 1)
        nak = _nak_for(_problem(frame))
        self.assertTrue(nak.startswith(b"MSH|^~\\&|UDSGW|DEMO|REGSYS|GENHOSP|"), nak)
        self.assertIn(b"\rMSA|AR|MSG00001\r", nak)
        self.assertIn(b"\rERR||MSH^1^2|102^Data type error^HL70357|E|||", nak)

    def test_nak_for_control_byte(self) -> None:
        """A control byte gets a 102 whose ERR-7 names the offset."""
        frame = ADT_A04.replace(b"ALEX", b"AL\x01EX")
        nak = _nak_for(_problem(frame))
        offset = frame.index(b"\x01")
        self.assertTrue(
            nak.endswith(
                b"\rERR|||102^Data type error^HL70357|E|||"
                + f"control byte 0x01 at offset {offset}".encode()
                + b"\r"
            ),
            nak,
        )

    def test_non_default_delimiters(self) -> None:
        """The ACK of a MSH#$%@! message is written with #$%@!, ERR-2 and ERR-3 included."""
        frame = b"MSH#$%@!#SND#SF#RCV#RF#2024##SIU$S12$SIU_S12#ID7#T#2.5\rSCH#1\r"
        ack = build_ack(
            _header(frame),
            "AE",
            control_id="GW3",
            timestamp=NOW,
            error=AckError(103, "SCH^1^25", "x#y"),
        )
        self.assertEqual(
            ack,
            b"MSH#$%@!#RCV#RF#SND#SF#20240607080910##ACK$S12$ACK#GW3#T#2.5\r"
            b"MSA#AE#ID7\r"
            b"ERR##SCH$1$25#103$Table value not found$HL70357#E###x@F@y\r",
        )

    def test_event_empty(self) -> None:
        """A message type without an event gives MSH-9 = ACK."""
        header = _header(ADT_A04.replace(b"ADT^A04^ADT_A01", b"ADT"))
        ack = build_ack(header, "AA", control_id="GW4", timestamp=NOW)
        self.assertIn(b"||ACK|GW4|", ack)

    def test_defaults_for_processing_and_version(self) -> None:
        """MSH-11 and MSH-12 default to P and 2.5 when the message has none."""
        header = _header(b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|C1\r")
        ack = build_ack(header, "AA", control_id="GW5", timestamp=NOW)
        self.assertEqual(
            ack, b"MSH|^~\\&|C|D|A|B|20240607080910||ACK^A08^ACK|GW5|P|2.5\rMSA|AA|C1\r"
        )

    def test_echoes_processing_id_and_version(self) -> None:
        """MSH-11 and MSH-12 echo the first component of the sender's values."""
        header = _header(b"MSH|^~\\&|A|B|C|D|2024||ADT^A08|C1|T^A|2.3.1^USA\r")
        ack = build_ack(header, "AA", control_id="GW6", timestamp=NOW)
        self.assertIn(b"|GW6|T|2.3.1\r", ack)

    def test_latin1_sender(self) -> None:
        """A latin-1 sender gets a latin-1 encoded ACK that echoes MSH-18."""
        frame = b"MSH|^~\\&|R\xe9g|GENHOSP|UDSGW|DEMO|2024||ADT^A04|C1|P|2.5||||||8859/1\r"
        ack = build_ack(_header(frame), "AA", control_id="GW7", timestamp=NOW, text="re\u00e7u")
        self.assertEqual(
            ack,
            b"MSH|^~\\&|UDSGW|DEMO|R\xe9g|GENHOSP|20240607080910||ACK^A04^ACK|GW7|P|2.5"
            b"||||||8859/1\r"
            b"MSA|AA|C1|re\xe7u\r",
        )

    def test_utf8_sender(self) -> None:
        """A UTF-8 sender gets a UTF-8 encoded ACK that echoes MSH-18."""
        frame = "MSH|^~\\&|R\u00e9g|H|U|D|2024||ADT^A04|C1|P|2.5||||||UNICODE UTF-8\r".encode()
        ack = build_ack(_header(frame), "AA", control_id="GW8", timestamp=NOW)
        self.assertIn("|U|D|R\u00e9g|H|".encode(), ack)
        self.assertIn(b"|P|2.5||||||UNICODE UTF-8\r", ack)

    def test_default_charset_sender(self) -> None:
        """MSH-18 empty, decoded with a latin-1 default: the ACK is latin-1, MSH-18 still empty."""
        frame = b"MSH|^~\\&|R\xe9g|H|U|D|2024||ADT^A04|C1|P|2.5\r"
        header = _header(frame, default_charset="8859/1")
        ack = build_ack(header, "AA", control_id="GW9", timestamp=NOW)
        self.assertEqual(
            ack, b"MSH|^~\\&|U|D|R\xe9g|H|20240607080910||ACK^A04^ACK|GW9|P|2.5\rMSA|AA|C1\r"
        )

    def test_unknown_charset_nak(self) -> None:
        """The NAK for an unknown MSH-18 is ASCII and does not claim that charset."""
        frame = b"MSH|^~\\&|A|B|C|D|2024||ADT^A04|C1|P|2.5||||||KLINGON\r"
        problem = _problem(frame)
        nak = _nak_for(problem)
        self.assertEqual(
            nak,
            b"MSH|^~\\&|C|D|A|B|20240607080910||ACK^A04^ACK|GW1|P|2.5\r"
            b"MSA|AR|C1\r"
            b"ERR||MSH^1^18|103^Table value not found^HL70357|E|||MSH-18 charset not supported\r",
        )

    def test_unencodable_text(self) -> None:
        """Text the ACK's charset can not encode becomes ?, never an exception."""
        ack = build_ack(
            _header(ADT_A04), "AE", control_id="GW10", timestamp=NOW, text="caf\u00e9 \u20ac"
        )
        self.assertIn(b"\rMSA|AE|MSG00001|caf? ?\r", ack)

    def test_hostile_header_values(self) -> None:
        """Echoed values with CR, LF, MLLP bytes or the field separator can not split the ACK."""
        header = Header(
            delimiters=Delimiters.DEFAULT,
            sending_application="A\rPID|1",
            sending_facility="B\x1c\r",
            receiving_application="C|D",
            receiving_facility="E\x0b\x7f",
            timestamp="",
            message_type="ADT^A04",
            message_code="ADT",
            trigger_event="A04",
            control_id="ID\n1",
            processing_id="P",
            version="2.5",
            accept_ack_type="",
            application_ack_type="",
            charset="",
            encoding="no-such-codec",
            fields=(),
        )
        ack = build_ack(header, "AA", control_id="GW11", timestamp=NOW)
        self.assertEqual(
            ack,
            b"MSH|^~\\&|C\\F\\D|E\\X0B\\\\X7F\\|A\\X0D\\PID\\F\\1|B\\X1C\\\\X0D\\|20240607080910||"
            b"ACK^A04^ACK|GW11|P|2.5\r"
            b"MSA|AA|ID\\X0A\\1\r",
        )

    def test_ack_parses_as_header(self) -> None:
        """Our ACK is itself a well-formed message whose MSH-10 is our control id."""
        ack = build_ack(_header(ADT_A04), "AA", control_id="GW12", timestamp=NOW)
        header = _header(ack)
        self.assertEqual((header.control_id, header.event_type), ("GW12", "ACK^A04"))
        self.assertEqual(header.sending_application, "UDSGW")


class TimestampTests(SynchronousTestCase):
    def test_utc(self) -> None:
        """hl7_timestamp writes YYYYMMDDHHMMSS in UTC, dropping fractions of a second."""
        self.assertEqual(hl7_timestamp(0), "19700101000000")
        self.assertEqual(hl7_timestamp(1717747750.9), "20240607080910")


class ControlIdSourceTests(SynchronousTestCase):
    def test_unique_and_short(self) -> None:
        """Control ids are unique, letters and digits only, and at most 20 characters."""
        source = ControlIdSource.for_boot(1717747750.0, random.Random(1))
        ids = [source.next() for _ in range(20000)]
        self.assertEqual(len(set(ids)), len(ids))
        for control_id in ids:
            self.assertTrue(control_id.isalnum() and control_id.isascii(), control_id)
            self.assertLessEqual(len(control_id), 20)

    def test_unique_across_restarts(self) -> None:
        """Sources started at different times, or in the same second, do not share ids."""
        sources = [
            ControlIdSource.for_boot(1717747750.0, random.Random(1)),
            ControlIdSource.for_boot(1717747751.0, random.Random(1)),
            ControlIdSource.for_boot(1717747750.0, random.Random(2)),
        ]
        seen: set[str] = set()
        for source in sources:
            ids = {source.next() for _ in range(2000)}
            self.assertEqual(ids & seen, set())
            seen |= ids

    def test_renumbered_for_each_boot(self) -> None:
        """Nodes started in the same second with consecutive boot numbers (from their
        shared database) get different prefixes, and the counter starts again."""
        first = ControlIdSource.for_boot(1717747750.0, random.Random(1))
        first.next()
        second = ControlIdSource.for_boot(1717747750.0, random.Random(1))
        first.renumber(1717747750.0, 7)
        second.renumber(1717747750.0, 8)
        self.assertNotEqual(first.prefix, second.prefix)
        self.assertEqual(first.prefix[:7], second.prefix[:7])
        self.assertEqual(first.next(), first.prefix + "1")
        self.assertEqual(len(first.prefix), 9)
        # 1296 boots later the two characters repeat; the time differs by then.
        later = ControlIdSource("X")
        later.renumber(1717747751.0, 7 + 1296)
        self.assertEqual(later.prefix[7:], first.prefix[7:])
        self.assertNotEqual(later.prefix, first.prefix)

    def test_longest_id(self) -> None:
        """The longest prefix with the largest counter still fits in 20 characters."""
        source = ControlIdSource("ABCDEFGHIJ")
        source._counter = 36**10 - 2
        self.assertEqual(source.next(), "ABCDEFGHIJ" + "Z" * 10)

    def test_far_future_boot(self) -> None:
        """A boot time beyond 36**7 seconds still gives a nine-character prefix."""
        source = ControlIdSource.for_boot(36.0**8, random.Random(3))
        self.assertEqual(len(source.prefix), 9)

    def test_prefix_validated(self) -> None:
        """A prefix that is empty, too long or not alphanumeric is refused."""
        for prefix in ("", "A" * 11, "AB|C", "\u00e9"):
            self.assertRaises(ValueError, ControlIdSource, prefix)


def _reply(*segments: bytes) -> Reply:
    return parse_reply(b"\r".join(segments) + b"\r")


MSH = b"MSH|^~\\&|DEST|DFAC|UDSGW|DEMO|20240102030405||ACK^A04^ACK|D77|P|2.5"


class ParseReplyTests(SynchronousTestCase):
    def test_accept(self) -> None:
        """An AA reply gives the code and MSA-2 with no problem."""
        self.assertEqual(_reply(MSH, b"MSA|AA|GW1"), Reply("AA", "GW1", "", None, ""))

    def test_enhanced_accept(self) -> None:
        """A CA commit accept is read like an AA."""
        self.assertEqual(_reply(MSH, b"MSA|CA|GW1"), Reply("CA", "GW1", "", None, ""))

    def test_error_with_err(self) -> None:
        """An AE reply gives MSA-3 text (unescaped) and the ERR-3.1 code."""
        reply = _reply(
            MSH,
            b"MSA|AE|GW1|Bad \\F\\ value",
            b"ERR||PID^1^7|102^Data type error^HL70357|E",
        )
        self.assertEqual(reply, Reply("AE", "GW1", "Bad | value", 102, ""))

    def test_reject(self) -> None:
        """An AR reply with an ERR-3 application code."""
        reply = _reply(MSH, b"MSA|AR|GW1|no", b"ERR||MSH^1^9|200^Unsupported^HL70357|E")
        self.assertEqual(reply, Reply("AR", "GW1", "no", 200, ""))

    def test_old_style_err(self) -> None:
        """A 2.3-style ERR-1 (segment^sequence^field^code&text) gives its code."""
        reply = _reply(MSH, b"MSA|AE|GW1", b"ERR|PID^1^7^102&Data type error&HL70357")
        self.assertEqual(reply.error_code, 102)

    def test_unreadable_err_code(self) -> None:
        """A non-numeric or absurdly long ERR code gives no error code."""
        for code in (b"X12", b"9" * 5000, b"\xb2"):
            reply = _reply(MSH, b"MSA|AE|GW1", b"ERR|||" + code + b"^x")
            self.assertEqual((reply.ack_code, reply.error_code), ("AE", None))

    def test_first_msa_counts(self) -> None:
        """When a reply carries two MSA segments, the first one is read."""
        reply = _reply(MSH, b"MSA|AA|GW1", b"MSA|AR|GW2")
        self.assertEqual((reply.ack_code, reply.control_id), ("AA", "GW1"))

    def test_separators_and_leading_blank_lines(self) -> None:
        """LF or CR LF separators and leading blank lines are accepted."""
        for separator in (b"\n", b"\r\n"):
            frame = b"\r\n" + MSH + separator + b"MSA|AA|GW1" + separator
            self.assertEqual(parse_reply(frame), Reply("AA", "GW1", "", None, ""))

    def test_non_default_delimiters(self) -> None:
        """A reply written with MSH#$%@! is read with those delimiters."""
        frame = b"MSH#$%@!#D#F#U#G#2024##ACK$A04#D1#P#2.3\rMSA#CE#GW1#a@F@b\rERR###207$x\r"
        self.assertEqual(parse_reply(frame), Reply("CE", "GW1", "a#b", 207, ""))

    def test_latin1_text(self) -> None:
        """MSA-3 is decoded with the reply's MSH-18."""
        frame = MSH + b"||||||8859/1\rMSA|AE|GW1|re\xe7u\r"
        self.assertEqual(parse_reply(frame).text, "re\u00e7u")

    def test_no_msa(self) -> None:
        """A message without MSA is not an ACK: no code, with a problem."""
        reply = _reply(MSH.replace(b"ACK^A04^ACK", b"ADT^A04"), b"PID|1||123456")
        self.assertEqual(reply, Reply(None, None, "", None, "reply has no MSA segment"))

    def test_garbage(self) -> None:
        """Bytes that are not HL7 give no code and a problem."""
        for frame in (b"", b"\r\n", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"\x00\xff\x06", b"MSH"):
            reply = parse_reply(frame)
            self.assertIsNone(reply.ack_code, frame)
            self.assertIsNone(reply.control_id, frame)
            self.assertNotEqual(reply.problem, "", frame)

    def test_garbled_msh2(self) -> None:
        """A reply with an unreadable MSH-2 gives no code."""
        reply = parse_reply(b"MSH|^^\\&|D|F|U|G|2024||ACK|D1|P|2.5\rMSA|AA|GW1\r")
        self.assertEqual(reply, Reply(None, None, "", None, "reply MSH-1 or MSH-2 invalid"))

    def test_invalid_ack_code(self) -> None:
        """An MSA-1 that is not an ACK code gives no code and a problem."""
        reply = _reply(MSH, b"MSA|OK|GW1")
        self.assertEqual(reply, Reply(None, "GW1", "", None, "reply MSA-1 is not an ACK code"))

    def test_empty_msa2(self) -> None:
        """An MSA without MSA-2 keeps the code but is flagged: it can not be matched."""
        for msa in (b"MSA|AA", b"MSA|AA|"):
            self.assertEqual(_reply(MSH, msa), Reply("AA", "", "", None, "reply MSA-2 empty"))


#: The versions issue 11 names.
VERSIONS: tuple[str, ...] = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1")
VERSIONS += ("2.6", "2.7", "2.7.1", "2.8", "2.8.1")
#: MSH-1 + MSH-2 of the delimiter sets senders use: the standard one, VA VistA's
#: (`^` as field separator), an all-odd one, and 2.7's five characters.
DELIMITER_SETS = ("|^~\\&", "^~|\\&", "#!@%*", "|^~\\&#")


def _sender_frame(version: str, msh12: str) -> bytes:
    """A synthetic ADT^A04 of this version written with the delimiters ``msh12``."""
    fs, component = msh12[0], msh12[1]
    fields = ["MSH" + msh12, "SND", "SF", "RCV", "RF", "20240101000000", ""]
    fields += [f"ADT{component}A04", "ID7", "P", version]
    return (fs.join(fields) + f"\rPID{fs}1{fs}{fs}12345\r").encode("ascii")


#: What a NAK may carry: a header location, no location, and a diagnostic with
#: every delimiter in it (each must come out escaped).
ERRORS = (
    None,
    AckError(204, "MSH^1^6", "unknown or disabled Flow ID"),
    AckError(207, "", "a|b^c~d\\e&f#g!h@i%j*k"),
)


class VersionLayoutTests(SynchronousTestCase):
    """The ACK follows the sender's HL7 version (MSH-12), checked by hl7apy where it can."""

    def test_every_version_and_delimiter_set_strictly_valid(self) -> None:
        """ACKs and NAKs for 2.1 to 2.8.1 and four delimiter sets pass hl7apy's strict check."""
        self.assertEqual(set(STRICT_VERSIONS) | set(NOT_STRICT_VERSIONS), set(VERSIONS))
        checked = 0
        for version in VERSIONS:
            for msh12 in DELIMITER_SETS:
                if len(msh12) == 6 and version < "2.7":
                    continue  # the truncation character exists from 2.7 on
                header = _header(_sender_frame(version, msh12))
                for error in ERRORS:
                    ack = build_ack(
                        header,
                        "AA" if error is None else "AR",
                        control_id="GW1",
                        timestamp=NOW,
                        error=error,
                        text="checked" if error is None else "",
                    )
                    reply = parse_reply(ack)
                    self.assertEqual((reply.problem, reply.control_id), ("", "ID7"), ack)
                    self.assertEqual(reply.error_code, None if error is None else error.code)
                    if version in STRICT_VERSIONS:
                        self.assertEqual(strictly_valid(ack), version, ack)
                        checked += 1
        self.assertEqual(checked, 10 * 3 * 3 + 3 * 3)

    def test_msh9_two_components_before_2_3_1(self) -> None:
        """MSH-9 is ACK^event for 2.1 to 2.3 and ACK^event^ACK from 2.3.1 on."""
        for version, expected in (
            ("2.1", b"|ACK^A04|"),
            ("2.2", b"|ACK^A04|"),
            ("2.3", b"|ACK^A04|"),
            ("2.3.1", b"|ACK^A04^ACK|"),
            ("2.8.1", b"|ACK^A04^ACK|"),
        ):
            header = _header(_sender_frame(version, "|^~\\&"))
            ack = build_ack(header, "AA", control_id="GW1", timestamp=NOW)
            self.assertIn(b"||" + expected[1:] + b"GW1|P|" + version.encode(), ack)

    def test_nak_before_2_5_has_err1_and_msa3(self) -> None:
        """2.1 to 2.4: ERR-1 holds segment^sequence^field^code&text&table; MSA-3 the reason."""
        header = _header(_sender_frame("2.4", "|^~\\&"))
        nak = build_ack(
            header,
            "AR",
            control_id="GW1",
            timestamp=NOW,
            error=AckError(204, "MSH^1^6", "unknown or disabled Flow ID"),
        )
        self.assertTrue(
            nak.endswith(
                b"\rMSA|AR|ID7|unknown or disabled Flow ID\r"
                b"ERR|MSH^1^6^204&Unknown key identifier&HL70357\r"
            ),
            nak,
        )
        self.assertEqual(strictly_valid(nak), "2.4")

    def test_nak_from_2_5_has_err2_to_err7(self) -> None:
        """2.5 on: ERR-2 location, ERR-3 code, ERR-4 severity, ERR-7 diagnostic; no MSA-3."""
        header = _header(_sender_frame("2.5", "|^~\\&"))
        nak = build_ack(
            header,
            "AR",
            control_id="GW1",
            timestamp=NOW,
            error=AckError(204, "MSH^1^6", "unknown or disabled Flow ID"),
        )
        self.assertTrue(
            nak.endswith(
                b"\rMSA|AR|ID7\r"
                b"ERR||MSH^1^6|204^Unknown key identifier^HL70357|E|||"
                b"unknown or disabled Flow ID\r"
            ),
            nak,
        )
        self.assertEqual(strictly_valid(nak), "2.5")

    def test_no_msa3_from_2_7(self) -> None:
        """MSA-3 is withdrawn in 2.7: the text is dropped there, written before."""
        for version, has_text in (("2.6", True), ("2.7", False), ("2.7.1", False), ("2.8", False)):
            header = _header(_sender_frame(version, "|^~\\&"))
            ack = build_ack(header, "AA", control_id="GW1", timestamp=NOW, text="received")
            self.assertEqual(ack.endswith(b"\rMSA|AA|ID7|received\r"), has_text, ack)
            self.assertTrue(ack.endswith(b"\rMSA|AA|ID7\r") != has_text, ack)

    def test_err2_with_caret_field_separator(self) -> None:
        """A sender whose field separator is ^ gets ERR-2 with its component separator ~."""
        header = _header(_sender_frame("2.5", "^~|\\&"))
        nak = build_ack(
            header, "AR", control_id="GW1", timestamp=NOW, error=AckError(204, "MSH^1^6", "x")
        )
        self.assertIn(b"\rERR^^MSH~1~6^204~Unknown key identifier~HL70357^E^^^x\r", nak)
        self.assertEqual(strictly_valid(nak), "2.5")

    def test_err1_with_caret_field_separator(self) -> None:
        """Before 2.5, the same sender gets ERR-1 written with ~ and &."""
        header = _header(_sender_frame("2.3", "^~|\\&"))
        nak = build_ack(
            header, "AR", control_id="GW1", timestamp=NOW, error=AckError(204, "MSH^1^6", "x")
        )
        self.assertTrue(
            nak.endswith(b"\rMSA^AR^ID7^x\rERR^MSH~1~6~204&Unknown key identifier&HL70357\r"),
            nak,
        )
        self.assertEqual(strictly_valid(nak), "2.3")

    def test_unreadable_version_gets_the_2_5_layout(self) -> None:
        """An MSH-12 that is not a version number gets the 2.5 layout."""
        for version in ("", "X", "2", "2.5.1.1"):
            self.assertEqual(ack_layout(version), ack_layout("2.5"), version)
