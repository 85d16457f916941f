"""Tests for udsgateway.hl7.header: reading MSH straight from the bytes."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from udsgateway.hl7.ack import AckError, build_ack, parse_reply
from udsgateway.hl7.header import (
    Delimiters,
    Header,
    HeaderProblem,
    codec_for,
    hl7_escape,
    hl7_unescape,
    parse_header,
    read_delimiters,
    segments,
)

# Synthetic people and systems only.
ADT_A04 = (
    b"MSH|^~\\&|REGSYS|GENHOSP|UDSGW|DEMO|20240102030405||ADT^A04^ADT_A01|MSG00001|P|2.5\r"
    b"EVN|A04|20240102030405\r"
    b"PID|1||123456^^^GENHOSP^MR||TESTPERSON^ALEX||19800101|F\r"
    b"PV1|1|O\r"
)


def _msh(**fields: bytes) -> bytes:
    """An ADT^A08 MSH with MSH-n replaced by fields["f<n>"], followed by a PID."""
    values = {
        3: b"REGSYS",
        4: b"GENHOSP",
        5: b"UDSGW",
        6: b"DEMO",
        7: b"20240102030405",
        9: b"ADT^A08^ADT_A01",
        10: b"CTRL42",
        11: b"P",
        12: b"2.5",
    }
    for key, value in fields.items():
        values[int(key[1:])] = value
    last = max(values)
    body = b"|".join(values.get(n, b"") for n in range(3, last + 1))
    return b"MSH|^~\\&|" + body + b"\rPID|1||123456||TESTPERSON^ALEX\r"


def _header(frame: bytes, **kwargs: str) -> Header:
    result = parse_header(frame, **kwargs)
    assert isinstance(result, Header), result
    return result


def _problem(frame: bytes, **kwargs: str) -> HeaderProblem:
    result = parse_header(frame, **kwargs)
    assert isinstance(result, HeaderProblem), result
    return result


class DelimitersTests(SynchronousTestCase):
    def test_default(self) -> None:
        """The default delimiters are | ^ ~ \\ & and MSH-2 reads ^~\\&."""
        default = Delimiters.DEFAULT
        self.assertEqual(
            (default.field, default.component, default.repetition),
            ("|", "^", "~"),
        )
        self.assertEqual((default.escape, default.subcomponent), ("\\", "&"))
        self.assertEqual(default.encoding_characters(), "^~\\&")

    def test_read_delimiters(self) -> None:
        """read_delimiters returns the declared set, or None when MSH-1/MSH-2 are unreadable."""
        self.assertEqual(read_delimiters(ADT_A04), Delimiters.DEFAULT)
        self.assertEqual(read_delimiters(b"MSH#$%@!#A\r"), Delimiters("#", "$", "%", "@", "!"))
        self.assertIsNone(read_delimiters(b"MSH|^~|A"))
        self.assertIsNone(read_delimiters(b"PID|^~\\&|"))
        self.assertIsNone(read_delimiters(b"MSH"))


class ParseHeaderTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """A well-formed header gives every MSH field the gateway uses, as on the wire."""
        frame = _msh(f11=b"P^T", f12=b"2.5^USA", f15=b"AL", f16=b"NE", f18=b"8859/1")
        header = _header(frame)
        self.assertEqual(header.delimiters, Delimiters.DEFAULT)
        self.assertEqual(
            (
                header.sending_application,
                header.sending_facility,
                header.receiving_application,
                header.receiving_facility,
                header.timestamp,
            ),
            ("REGSYS", "GENHOSP", "UDSGW", "DEMO", "20240102030405"),
        )
        self.assertEqual(
            (header.message_type, header.message_code, header.trigger_event),
            ("ADT^A08^ADT_A01", "ADT", "A08"),
        )
        self.assertEqual(header.event_type, "ADT^A08")
        self.assertEqual(header.control_id, "CTRL42")
        self.assertEqual((header.processing_id, header.version), ("P", "2.5"))
        self.assertEqual((header.accept_ack_type, header.application_ack_type), ("AL", "NE"))
        self.assertEqual((header.charset, header.encoding), ("8859/1", "latin-1"))

    def test_field_access(self) -> None:
        """field(n) is MSH-n counted as HL7 does; absent or out-of-range fields are ""."""
        header = _header(ADT_A04)
        self.assertEqual(header.field(1), "|")
        self.assertEqual(header.field(2), "^~\\&")
        self.assertEqual(header.field(3), "REGSYS")
        self.assertEqual(header.field(10), "MSG00001")
        self.assertEqual(header.field(12), "2.5")
        self.assertEqual(header.field(13), "")
        self.assertEqual(header.field(0), "")
        self.assertEqual(header.field(-1), "")
        self.assertEqual(len(header.fields), 12)

    def test_event_type_without_event(self) -> None:
        """A message type without a trigger event has that type alone as event type."""
        header = _header(_msh(f9=b"ACK"))
        self.assertEqual((header.message_code, header.trigger_event), ("ACK", ""))
        self.assertEqual(header.event_type, "ACK")

    def test_ascii_without_msh18(self) -> None:
        """An all-ASCII frame without MSH-18 is decoded as ASCII whatever the default."""
        header = _header(ADT_A04, default_charset="8859/1")
        self.assertEqual((header.charset, header.encoding), ("", "ascii"))

    def test_non_default_delimiters(self) -> None:
        """MSH#$%@! is honoured: fields split on #, components on $."""
        frame = b"MSH#$%@!#SND#SFAC#RCV#RFAC#20240102##SIU$S12$SIU_S12#ID7#T$A#2.3\rSCH#1\r"
        header = _header(frame)
        self.assertEqual(header.delimiters, Delimiters("#", "$", "%", "@", "!"))
        self.assertEqual(header.sending_application, "SND")
        self.assertEqual(header.message_type, "SIU$S12$SIU_S12")
        self.assertEqual((header.message_code, header.trigger_event), ("SIU", "S12"))
        self.assertEqual(header.event_type, "SIU^S12")
        self.assertEqual((header.control_id, header.processing_id), ("ID7", "T"))
        self.assertEqual(header.version, "2.3")

    def test_truncation_character(self) -> None:
        """An HL7 2.7 MSH-2 with the fifth (truncation) character is accepted and kept."""
        frame = b"MSH|^~\\&#|A|B|C|D|2024||ADT^A04|ID1|P|2.7\r"
        header = _header(frame)
        self.assertEqual(header.delimiters.truncation, "#")
        self.assertEqual(header.delimiters.encoding_characters(), "^~\\&#")
        self.assertEqual(header.control_id, "ID1")

    def test_segment_separators(self) -> None:
        """CR, LF and CR LF between segments give the same header."""
        expected = _header(ADT_A04)
        for separator in (b"\n", b"\r\n", b"\n\r"):
            frame = ADT_A04.replace(b"\r", separator)
            self.assertEqual(_header(frame), expected, separator)

    def test_message_without_segment_separator(self) -> None:
        """A frame that is the MSH segment alone, with no separator at all, is read."""
        header = _header(ADT_A04.split(b"\r")[0])
        self.assertEqual(header.version, "2.5")

    def test_malformed_escapes(self) -> None:
        """Malformed escapes (\\X4, a lone \\) are no problem and stay as written."""
        frame = _msh(f3=b"REG\\X4", f4=b"GEN\\HOSP").replace(b"ALEX", b"AL\\X4EX\\")
        header = _header(frame)
        self.assertEqual(header.sending_application, "REG\\X4")
        self.assertEqual(header.sending_facility, "GEN\\HOSP")

    def test_latin1_declared(self) -> None:
        """MSH-18 8859/1 decodes the header with latin-1."""
        frame = _msh(f3=b"R\xe9gSys", f18=b"8859/1")
        header = _header(frame)
        self.assertEqual(header.sending_application, "R\u00e9gSys")
        self.assertEqual(header.encoding, "latin-1")

    def test_utf8_declared(self) -> None:
        """MSH-18 UNICODE UTF-8 decodes the header with utf-8."""
        frame = _msh(f3="R\u00e9gSys".encode(), f18=b"UNICODE UTF-8")
        header = _header(frame)
        self.assertEqual(header.sending_application, "R\u00e9gSys")
        self.assertEqual(header.encoding, "utf-8")

    def test_charset_first_repetition(self) -> None:
        """Only the first repetition of MSH-18 chooses the charset."""
        header = _header(_msh(f18=b"UNICODE UTF-8~8859/1"))
        self.assertEqual((header.charset, header.encoding), ("UNICODE UTF-8", "utf-8"))

    def test_empty_charset_high_bytes_default(self) -> None:
        """MSH-18 empty with bytes above 0x7F decodes with the tenant's default charset."""
        frame = _msh(f3=b"R\xe9gSys")
        for default in ("8859/1", "latin-1", "ISO-8859-1"):
            header = _header(frame, default_charset=default)
            self.assertEqual(header.sending_application, "R\u00e9gSys")
            self.assertEqual((header.charset, header.encoding), ("", "latin-1"))

    def test_empty_charset_high_bytes_invalid_for_default(self) -> None:
        """MSH-18 empty, bytes invalid for the default: 102 naming the offset, no lossy read."""
        frame = _msh(f3=b"R\xe9gSys")
        problem = _problem(frame, default_charset="UTF-8")
        self.assertEqual(problem.code, 102)
        self.assertEqual(problem.diagnostic, "byte 0xE9 at offset 10 not valid utf-8")
        assert problem.header is not None
        self.assertEqual(problem.header.sending_application, "")
        self.assertEqual(problem.header.control_id, "CTRL42")

    def test_empty_charset_high_bytes_ascii_default(self) -> None:
        """With the ASCII default, a byte above 0x7F and no MSH-18 is a 102 at its offset."""
        frame = ADT_A04.replace(b"ALEX", b"AL\xc9X")
        problem = _problem(frame)
        self.assertEqual(problem.code, 102)
        offset = frame.index(b"\xc9")
        self.assertEqual(problem.diagnostic, f"byte 0xC9 at offset {offset} not valid ascii")
        assert problem.header is not None
        self.assertEqual(problem.header.control_id, "MSG00001")

    def test_empty_charset_unsupported_default(self) -> None:
        """High bytes, no MSH-18 and an unsupported default charset: 103, never a guess."""
        problem = _problem(_msh(f3=b"R\xe9g"), default_charset="UTF-16")
        self.assertEqual((problem.code, problem.location), (103, "MSH^1^18"))
        self.assertEqual(problem.diagnostic, "default charset not supported")

    def test_unknown_charset(self) -> None:
        """An unknown MSH-18 is 103 at MSH-18, with the header readable for the NAK."""
        for charset in (b"KLINGON", b"UNICODE UTF-16", b"UNICODE UTF-32", b"BIG-5", b"\xff"):
            problem = _problem(_msh(f18=charset))
            self.assertEqual((problem.code, problem.location), (103, "MSH^1^18"), charset)
            self.assertEqual(problem.diagnostic, "MSH-18 charset not supported")
            assert problem.header is not None
            self.assertEqual(problem.header.control_id, "CTRL42")
            self.assertEqual(problem.header.encoding, "ascii")

    def test_bytes_invalid_for_declared_charset(self) -> None:
        """Bytes that are not valid UTF-8 under MSH-18 UTF-8: 102 at MSH-18 with the offset."""
        frame = _msh(f18=b"UNICODE UTF-8").replace(b"ALEX", b"AL\xc3\x28X")
        problem = _problem(frame)
        self.assertEqual((problem.code, problem.location), (102, "MSH^1^18"))
        offset = frame.index(b"\xc3")
        self.assertEqual(problem.diagnostic, f"byte 0xC3 at offset {offset} not valid utf-8")
        assert problem.header is not None
        self.assertEqual(problem.header.control_id, "CTRL42")
        self.assertEqual(problem.header.encoding, "utf-8")

    def test_bytes_undefined_in_8859(self) -> None:
        """A byte undefined in ISO 8859-7 is a 102 under MSH-18 8859/7."""
        problem = _problem(_msh(f18=b"8859/7").replace(b"ALEX", b"AL\xaeX"))
        self.assertEqual(problem.code, 102)
        self.assertIn("not valid iso8859-7", problem.diagnostic)

    def test_control_bytes(self) -> None:
        """Control bytes 0x00-0x08 and 0x0E-0x1A are 102 and the diagnostic names the offset."""
        offset = ADT_A04.index(b"ALEX") + 2
        for byte in (0x00, 0x01, 0x08, 0x0E, 0x13, 0x1A):
            frame = ADT_A04[:offset] + bytes([byte]) + ADT_A04[offset:]
            problem = _problem(frame)
            self.assertEqual(problem.code, 102)
            self.assertEqual(problem.diagnostic, f"control byte 0x{byte:02X} at offset {offset}")
            assert problem.header is not None
            self.assertEqual(problem.header.control_id, "MSG00001")

    def test_control_bytes_first_offset(self) -> None:
        """With several control bytes the first one's offset is reported."""
        frame = ADT_A04.replace(b"TESTPERSON", b"TEST\x02PER\x01SON")
        problem = _problem(frame)
        offset = frame.index(b"\x02")
        self.assertEqual(problem.diagnostic, f"control byte 0x02 at offset {offset}")

    def test_allowed_low_bytes(self) -> None:
        """TAB, VT, FF, ESC (ISO 2022) and FS are not control bytes for this check."""
        for byte in (0x09, 0x0B, 0x0C, 0x1B, 0x1C, 0x1F):
            frame = ADT_A04.replace(b"ALEX", b"AL" + bytes([byte]) + b"EX")
            self.assertIsInstance(parse_header(frame), Header, hex(byte))

    def test_empty_frame(self) -> None:
        """An empty frame is a 100 with no header: the caller closes the connection."""
        self.assertEqual(parse_header(b""), HeaderProblem(100, "MSH^1", "empty frame", None))

    def test_not_msh(self) -> None:
        """A frame that does not start with MSH is a 100 with no header."""
        for frame in (b"PID|1||X\r", b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00", b"\rMSH|"):
            self.assertEqual(
                parse_header(frame),
                HeaderProblem(100, "MSH^1", "frame does not start with MSH", None),
            )

    def test_msh1_unreadable(self) -> None:
        """MSH without a usable field separator has no header at all."""
        for frame in (b"MSH", b"MSH\r", b"MSHA^~\\&", b"MSH ^~\\&", b"MSH\xff^~\\&"):
            problem = _problem(frame)
            self.assertEqual((problem.code, problem.location), (102, "MSH^1^1"), frame)
            self.assertIsNone(problem.header)

    def test_msh2_garbled(self) -> None:
        """MSH-2 not four distinct non-alphanumeric characters is 102 at MSH-2, MSH-10 kept."""
        for encoding in (
            b"^~\\",
            b"^^\\&",
            b"^~\\A",
            b"^~\\1",
            b"^~ &",
            b"",
            b"^~\\&#!",
            b"^~\\&&",
            b"^~\\\xe9",
        ):
            frame = b"MSH|" + encoding + b"|REGSYS|GENHOSP|UDSGW|DEMO|2024||ADT^A04|CTRL9|P|2.5\r"
            problem = _problem(frame)
            self.assertEqual((problem.code, problem.location), (102, "MSH^1^2"), encoding)
            self.assertEqual(problem.diagnostic, "MSH-2 encoding characters invalid")
            header = problem.header
            assert header is not None
            self.assertEqual(header.delimiters, Delimiters.DEFAULT)
            self.assertEqual(header.control_id, "CTRL9")
            self.assertEqual(header.sending_application, "REGSYS")
            self.assertEqual(header.message_code, "ADT")

    def test_msh2_with_field_separator(self) -> None:
        """An MSH-2 holding the field separator is 102 at MSH-2 (the fields after it shift)."""
        problem = _problem(b"MSH|^~|&|REGSYS|GENHOSP|UDSGW|DEMO|2024||ADT^A04|CTRL9|P\r")
        self.assertEqual((problem.code, problem.location), (102, "MSH^1^2"))
        self.assertIsNotNone(problem.header)

    def test_msh2_garbled_keeps_field_separator(self) -> None:
        """A garbled MSH-2 keeps the sender's field separator when it is not a default one."""
        problem = _problem(b"MSH#$$@!#SND#SF#RCV#RF#2024##ADT$A04#C5#P#2.5\r")
        self.assertEqual(problem.code, 102)
        assert problem.header is not None
        self.assertEqual(problem.header.delimiters, Delimiters("#", "^", "~", "\\", "&"))
        self.assertEqual(problem.header.control_id, "C5")

    def test_msh2_garbled_separator_collision(self) -> None:
        """A field separator that is a default encoding character falls back to all defaults."""
        problem = _problem(b"MSH^^SND^SF^RCV^RF^2024^^ADT^C6^P\r")
        self.assertEqual(problem.code, 102)
        assert problem.header is not None
        self.assertEqual(problem.header.delimiters, Delimiters.DEFAULT)
        self.assertEqual(problem.header.control_id, "C6")

    def test_msh9_missing(self) -> None:
        """MSH-9 empty, without a message code, or beyond a short MSH is 101 at MSH-9."""
        frames = (
            _msh(f9=b""),
            _msh(f9=b"^A04"),
            b"MSH|^~\\&|REGSYS|GENHOSP|UDSGW|DEMO|2024\r",
        )
        for frame in frames:
            problem = _problem(frame)
            self.assertEqual((problem.code, problem.location), (101, "MSH^1^9"), frame)
            self.assertEqual(problem.diagnostic, "MSH-9 message type missing")
            assert problem.header is not None
            self.assertEqual(problem.header.sending_application, "REGSYS")

    def test_msh10_empty(self) -> None:
        """MSH-10 empty or absent is 101 at MSH-10, with an empty control id in the header."""
        for frame in (_msh(f10=b""), b"MSH|^~\\&|A|B|C|D|2024||ADT^A04\r"):
            problem = _problem(frame)
            self.assertEqual((problem.code, problem.location), (101, "MSH^1^10"), frame)
            self.assertEqual(problem.diagnostic, "MSH-10 message control id empty")
            assert problem.header is not None
            self.assertEqual(problem.header.control_id, "")
            self.assertEqual(problem.header.message_code, "ADT")

    def test_processing_and_version_not_checked(self) -> None:
        """Unusual processing id and version are read, not judged: the caller checks them."""
        header = _header(_msh(f11=b"X", f12=b"9.9"))
        self.assertEqual((header.processing_id, header.version), ("X", "9.9"))

    def test_diagnostics_carry_no_field_values(self) -> None:
        """No diagnostic contains a value from the message (no PHI in ERR-7 or logs)."""
        marker = b"ZQXMARKERZQX"
        frames = [
            _msh(f3=marker, f9=b"").replace(b"TESTPERSON", marker),
            _msh(f3=marker, f10=b""),
            _msh(f3=marker, f18=marker),
            _msh(f3=marker + b"\x01"),
            _msh(f3=marker + b"\xe9", f18=b"UNICODE UTF-8"),
            b"MSH|" + marker + b"|" + marker + b"|X\r",
            marker,
        ]
        for frame in frames:
            problem = _problem(frame)
            self.assertNotIn(marker.decode(), problem.diagnostic)
            self.assertNotIn(marker.decode(), problem.location)


class CodecForTests(SynchronousTestCase):
    def test_table_0211_names(self) -> None:
        """The HL7 table 0211 names of ASCII-compatible charsets map to their codecs."""
        expected = {
            "ASCII": "ascii",
            "8859/1": "latin-1",
            "8859/2": "iso8859-2",
            "8859/5": "iso8859-5",
            "8859/9": "iso8859-9",
            "8859/15": "iso8859-15",
            "UNICODE UTF-8": "utf-8",
        }
        for name, codec in expected.items():
            self.assertEqual(codec_for(name, "ascii"), codec, name)

    def test_aliases(self) -> None:
        """Common spellings senders use are accepted, in any case."""
        expected = {
            "UTF-8": "utf-8",
            "utf8": "utf-8",
            "ISO IR100": "latin-1",
            "ISO_IR 100": "latin-1",
            "ISO-8859-1": "latin-1",
            "iso8859-15": "iso8859-15",
            "ISO IR192": "utf-8",
            "ISO IR6": "ascii",
            "US-ASCII": "ascii",
            "Windows-1252": "cp1252",
            " 8859/1 ": "latin-1",
        }
        for name, codec in expected.items():
            self.assertEqual(codec_for(name, "ascii"), codec, name)

    def test_unsupported(self) -> None:
        """UTF-16/32, the bare UNICODE, multi-byte charsets and junk are unsupported."""
        for name in (
            "UNICODE UTF-16",
            "UNICODE UTF-32",
            "UNICODE",
            "BIG-5",
            "GB 18030-2000",
            "ISO IR87",
            "utf-16",
            "rot13",
            "KLINGON",
            "x" * 100,
        ):
            self.assertIsNone(codec_for(name, "ascii"), name)

    def test_empty_uses_default(self) -> None:
        """An empty MSH-18 resolves to the default, itself an HL7 name or a codec name."""
        self.assertEqual(codec_for("", "ascii"), "ascii")
        self.assertEqual(codec_for("  ", "8859/1"), "latin-1")
        self.assertEqual(codec_for("", "latin-1"), "latin-1")
        self.assertIsNone(codec_for("", "UNICODE UTF-16"))


class SegmentsTests(SynchronousTestCase):
    def test_separators(self) -> None:
        """Segments split on CR, LF or CR LF alike; blank lines and the trailing break vanish."""
        expected = [b"MSH|^~\\&|A", b"PID|1", b"PV1|1"]
        for separator in (b"\r", b"\n", b"\r\n"):
            frame = separator.join(expected) + separator
            self.assertEqual(segments(frame), expected, separator)
        self.assertEqual(segments(b"MSH|a\r\r\n\nPID|1\r\n"), [b"MSH|a", b"PID|1"])
        self.assertEqual(segments(b""), [])


class EscapeTests(SynchronousTestCase):
    def test_escape_default(self) -> None:
        """Every delimiter, CR and LF are escaped; other text is untouched."""
        self.assertEqual(
            hl7_escape("a\\b|c^d&e~f\rg\nh\ti \u00e9", Delimiters.DEFAULT),
            "a\\E\\b\\F\\c\\S\\d\\T\\e\\R\\f\\X0D\\g\\X0A\\h\ti \u00e9",
        )

    def test_escape_other_controls(self) -> None:
        """MLLP bytes and other control characters are escaped as \\Xhh\\."""
        self.assertEqual(
            hl7_escape("\x0b\x1c\x00\x7f", Delimiters.DEFAULT), "\\X0B\\\\X1C\\\\X00\\\\X7F\\"
        )

    def test_escape_non_default(self) -> None:
        """The message's own delimiters and escape character are used."""
        delimiters = Delimiters("#", "$", "%", "@", "!", "*")
        self.assertEqual(hl7_escape("#$%@!*|^", delimiters), "@F@@S@@R@@E@@T@@P@|^")

    def test_unescape(self) -> None:
        """hl7_unescape undoes delimiter and ASCII hex escapes and keeps anything else."""
        self.assertEqual(
            hl7_unescape("a\\F\\b\\S\\\\T\\\\R\\\\E\\\\X0D0A\\", Delimiters.DEFAULT),
            "a|b^&~\\\r\n",
        )
        for kept in ("\\X4", "\\.br\\", "\\XE9\\", "x\\", "\\P\\", "\\Q\\"):
            self.assertEqual(hl7_unescape(kept, Delimiters.DEFAULT), kept)

    def test_round_trip(self) -> None:
        """Unescaping an escaped string gives it back, for random text and delimiters."""
        rng = random.Random(20240102)
        alphabet = "ab \u00e9\u20ac|^~\\&#$%@!*\r\n\t\x00\x0b\x1c\x7fXE"
        delimiter_sets = [
            Delimiters.DEFAULT,
            Delimiters("#", "$", "%", "@", "!"),
            Delimiters("|", "^", "~", "\\", "&", "#"),
        ]
        for _ in range(2000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
            delimiters = rng.choice(delimiter_sets)
            escaped = hl7_escape(text, delimiters)
            self.assertNotIn(delimiters.field, escaped)
            self.assertNotIn("\r", escaped)
            self.assertEqual(hl7_unescape(escaped, delimiters), text)


# Pieces the mutation fuzzer splices in: delimiters, separators, charset names,
# control bytes, high bytes and header fragments.
_FUZZ_PIECES = [
    b"|",
    b"^",
    b"~",
    b"\\",
    b"&",
    b"#",
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b"\x01",
    b"\x0b",
    b"\x1c",
    b"\x1a",
    b"\xe9",
    b"\xc3\xa9",
    b"\xc3",
    b"\xff",
    b"MSH",
    b"MSH|^~\\&|",
    b"MSA|AA|",
    b"ERR||",
    b"8859/1",
    b"UNICODE UTF-8",
    b"UNICODE UTF-16",
    b"\\X4",
    b"ACK",
    b"NE",
]
_FUZZ_SEEDS = [
    ADT_A04,
    _msh(f15=b"AL", f16=b"NE", f18=b"UNICODE UTF-8"),
    _msh(f18=b"8859/1").replace(b"ALEX", b"AL\xe9X"),
    b"MSH#$%@!#SND#SF#RCV#RF#2024##ADT$A04#C5#P#2.5\nPID#1\n",
    b"MSH|^~\\&#|A|B|C|D|2024||ACK^A04^ACK|C9|P|2.7\rMSA|AE|C1|x\rERR||PID^1|102^x^HL70357|E\r",
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        choice = rng.randrange(5)
        position = rng.randrange(len(buffer) + 1)
        if choice == 0 and buffer:
            buffer[min(position, len(buffer) - 1)] = rng.randrange(256)
        elif choice == 1:
            buffer[position:position] = rng.choice(_FUZZ_PIECES)
        elif choice == 2:
            del buffer[position : position + rng.randrange(1, 8)]
        elif choice == 3:
            del buffer[position:]
        else:
            buffer[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
    return bytes(buffer)


def _fuzz_inputs(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    inputs = []
    for index in range(count):
        if index % 4 == 0:
            inputs.append(bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
        elif index % 4 == 1:
            inputs.append(b"MSH" + bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
        else:
            inputs.append(_mutate(rng, rng.choice(_FUZZ_SEEDS)))
    return inputs


class FuzzTests(SynchronousTestCase):
    def test_never_raises(self) -> None:
        """For random and mutated frames, parse_header, build_ack and parse_reply never raise.

        Every frame gets a deliberate result, and the ACK built from whatever
        header was read is itself a well-formed ACK: parse_header reads it and
        parse_reply finds its MSA-1.
        """
        results: dict[str, int] = {}
        for frame in _fuzz_inputs(seed=57, count=4000):
            for default in ("ascii", "8859/1"):
                result = parse_header(frame, default_charset=default)
                if isinstance(result, Header):
                    header: Header | None = result
                    results["header"] = results.get("header", 0) + 1
                else:
                    self.assertIsInstance(result, HeaderProblem)
                    self.assertIn(result.code, (100, 101, 102, 103))
                    header = result.header
                    results[str(result.code)] = results.get(str(result.code), 0) + 1
                if header is None:
                    continue
                ack = build_ack(
                    header,
                    "AE",
                    control_id="OURID1",
                    timestamp="20240102030405",
                    error=AckError(102, "PID^1^5", "diagnostic \u00e9 |x|"),
                    text="text",
                )
                ack_header = parse_header(ack, default_charset=header.encoding)
                assert isinstance(ack_header, Header), (frame, ack, ack_header)
                self.assertEqual(ack_header.control_id, "OURID1")
                reply = parse_reply(ack)
                self.assertEqual(reply.ack_code, "AE")
                self.assertEqual(reply.error_code, 102)
                control_id = header.control_id
                readable = control_id.isascii() and control_id.isprintable()
                if readable and header.delimiters.field not in control_id:
                    self.assertEqual(reply.control_id, control_id)
            parse_reply(frame)
        # The corpus exercises every outcome, so the assertions above were reached.
        for outcome in ("header", "100", "101", "102", "103"):
            self.assertGreater(results.get(outcome, 0), 10, results)
