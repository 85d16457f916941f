"""Read the MSH segment of an HL7 v2 message straight from its bytes.

This is the gateway's hot path: every inbound frame passes through
`parse_header` before it is routed, stored and acknowledged, so it reads only
the delimiters (MSH-1, MSH-2) and the MSH fields and never runs a full HL7
parse. It never raises on malformed input: a frame gives either a `Header` or
a `HeaderProblem` that carries an HL7 table 0357 code, an ERR-2 location, a
diagnostic without field values (no PHI) and whatever of the header could be
read, so that the caller can still send a NAK that echoes MSA-2 with the
sender's delimiters.

The checks of processing id, version and routing are not here: the caller
compares those against the tenant's configuration.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from attrs import frozen

# Delimiters lives in a module of its own, not compiled: mypyc cannot build a class whose
# body names the class itself (its DEFAULT). Re-exported here, where it always was.
from udsgateway.hl7.delimiters import Delimiters

__all__ = [
    "SUPPORTED_CODECS",
    "Delimiters",
    "Header",
    "HeaderProblem",
    "codec_for",
    "hl7_escape",
    "hl7_unescape",
    "parse_header",
    "read_delimiters",
    "segments",
]

# Characters allowed as MSH-1 and in MSH-2: printable ASCII that is neither a
# letter, a digit nor a space.
_SEPARATOR_CHARS = frozenset(string.punctuation)

# 0x00-0x08 and 0x0E-0x1A never belong in a message (TAB, LF, VT, FF, CR and
# ESC, which ISO 2022 charsets use, are allowed). bytes.translate with a delete
# set runs at ~1 µs per KB where a regex search runs at ~10 µs, so the check
# deletes and compares lengths, and the regex only locates the offset once a
# control byte is known to be there.
_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x1B)])
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0e-\x1a]")

_SEGMENT_BREAK = re.compile(rb"[\r\n]+")
_DEFAULT_PREFIX = b"MSH|^~\\&|"

# MSH-18 (HL7 table 0211, plus the aliases senders write in practice) -> the
# Python codec. Only charsets in which every byte below 0x80 is the ASCII
# character are supported, because the delimiters are found in the bytes
# before decoding. Multi-byte charsets whose trail bytes can equal `|`, `^` or
# `\` (BIG-5, GB 18030, Shift JIS) and UTF-16/UTF-32 are refused (103), as is
# the bare "UNICODE" of old versions, which does not name an encoding.
_LATIN = {
    1: ("latin-1", "100"),
    2: ("iso8859-2", "101"),
    3: ("iso8859-3", "109"),
    4: ("iso8859-4", "110"),
    5: ("iso8859-5", "144"),
    6: ("iso8859-6", "127"),
    7: ("iso8859-7", "126"),
    8: ("iso8859-8", "138"),
    9: ("iso8859-9", "148"),
    15: ("iso8859-15", "203"),
}


def _charset_table() -> dict[str, str]:
    table = {
        "ASCII": "ascii",
        "USASCII": "ascii",
        "ISOIR6": "ascii",
        "ANSIX3.4": "ascii",
        "UNICODEUTF8": "utf-8",
        "UTF8": "utf-8",
        "ISOIR192": "utf-8",
        "CP1252": "cp1252",
        "WINDOWS1252": "cp1252",
        "LATIN1": "latin-1",
        "LATIN2": "iso8859-2",
        "LATIN9": "iso8859-15",
    }
    for part, (codec, ir) in _LATIN.items():
        for name in (f"8859/{part}", f"ISO8859/{part}", f"ISO8859{part}", f"ISOIR{ir}"):
            table[name] = codec
    return table


# Keys are normalised by _normalise_charset: upper case, without spaces,
# hyphens and underscores.
_CHARSETS = _charset_table()
# Every codec parse_header can choose, and the names a tenant may configure as
# its default charset besides the MSH-18 names.
SUPPORTED_CODECS = frozenset(_CHARSETS.values())


def _normalise_charset(name: str) -> str:
    return name.upper().replace(" ", "").replace("-", "").replace("_", "")


@lru_cache(maxsize=256)
def _lookup_charset(name: str) -> str | None:
    if name in SUPPORTED_CODECS:
        return name
    return _CHARSETS.get(_normalise_charset(name))


def codec_for(charset: str, default: str) -> str | None:
    """Return the Python codec for an MSH-18 value, or None when unsupported.

    An empty `charset` means the sender did not declare one: `default` (the
    tenant's setting, an MSH-18 name or a codec name) is used then.
    """
    name = charset.strip()
    if not name:
        name = default.strip()
    if len(name) > 40:  # no charset name is this long; keeps the cache small
        return None
    return _lookup_charset(name)


@frozen
class Header:
    """The MSH fields the gateway needs, decoded, as they are on the wire.

    Values are not unescaped. `fields[0]` is MSH-1 (the field separator), so
    `field(n)` returns MSH-n.
    """

    delimiters: Delimiters
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    timestamp: str
    message_type: str
    message_code: str
    trigger_event: str
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str
    application_ack_type: str
    charset: str
    encoding: str
    fields: tuple[str, ...]

    def field(self, n: int) -> str:
        """MSH-n (1-based, as HL7 counts), or "" when the message has no such field."""
        if 1 <= n <= len(self.fields):
            return self.fields[n - 1]
        return ""

    @property
    def event_type(self) -> str:
        """Message code and trigger event joined by `^`, e.g. "ADT^A04"."""
        if self.trigger_event:
            return f"{self.message_code}^{self.trigger_event}"
        return self.message_code


@frozen
class HeaderProblem:
    """Why a frame can not be accepted, in the terms of an HL7 ERR segment.

    `code` is from HL7 table 0357, `location` is an ERR-2 location written
    with `^` ("MSH^1^10"), and `diagnostic` never contains a field value.
    `header` holds whatever of the header could be read, for the NAK; it is
    None when not even MSH-1 could be read, and the caller then closes the
    connection.
    """

    code: int
    location: str
    diagnostic: str
    header: Header | None


def segments(frame: bytes) -> list[bytes]:
    """Split a message into segments on CR, LF or CR LF, dropping blank lines."""
    return [segment for segment in _SEGMENT_BREAK.split(frame) if segment]


def _segment_end(data: bytes) -> int:
    """Offset of the first CR or LF in `data`, or its length."""
    cr = data.find(b"\r")
    lf = data.find(b"\n", 0, cr if cr >= 0 else len(data))
    if lf >= 0:
        return lf
    return cr if cr >= 0 else len(data)


def _encoding_characters(field_separator: str, value: bytes) -> Delimiters | None:
    """Delimiters from MSH-1 and the raw MSH-2, or None when MSH-2 is garbled."""
    if len(value) not in (4, 5) or not value.isascii():
        return None
    chars = value.decode("ascii")
    if field_separator in chars or len(set(chars)) != len(chars):
        return None
    if not all(char in _SEPARATOR_CHARS for char in chars):
        return None
    return Delimiters(field_separator, *chars)


def read_delimiters(frame: bytes) -> Delimiters | None:
    """The delimiters a message declares in MSH-1 and MSH-2, or None when unreadable."""
    if frame.startswith(_DEFAULT_PREFIX):
        return Delimiters.DEFAULT
    if len(frame) < 4 or not frame.startswith(b"MSH") or chr(frame[3]) not in _SEPARATOR_CHARS:
        return None
    field_separator = chr(frame[3])
    end = _segment_end(frame)
    return _encoding_characters(field_separator, frame[4:end].split(frame[3:4], 1)[0])


def _fallback_delimiters(field_separator: str) -> Delimiters:
    """Delimiters for reading a message whose MSH-2 is garbled."""
    default = Delimiters.DEFAULT
    if field_separator in default.encoding_characters():
        return default
    return Delimiters(
        field_separator,
        default.component,
        default.repetition,
        default.escape,
        default.subcomponent,
    )


def _make_header(fields: tuple[str, ...], delimiters: Delimiters, encoding: str) -> Header:
    # Padded so that every MSH-n up to MSH-18 can be indexed: f[n - 1] is MSH-n.
    f = fields if len(fields) >= 18 else fields + ("",) * (18 - len(fields))
    component = delimiters.component
    type_parts = f[8].split(component, 2)
    return Header(
        delimiters,
        f[2],
        f[3],
        f[4],
        f[5],
        f[6],
        f[8],
        type_parts[0],
        type_parts[1] if len(type_parts) > 1 else "",
        f[9],
        f[10].split(component, 1)[0],
        f[11].split(component, 1)[0],
        f[14],
        f[15],
        f[17].split(delimiters.repetition, 1)[0],
        encoding,
        fields,
    )


def _salvage_header(
    field_separator: str, parts: list[bytes], delimiters: Delimiters, codec: str
) -> Header:
    """Read what can be read, field by field, for a NAK.

    A field that does not decode strictly is left empty rather than decoded
    lossily.
    """
    decoded = [field_separator]
    for part in parts:
        try:
            decoded.append(part.decode(codec))
        except UnicodeDecodeError:
            decoded.append("")
    return _make_header(tuple(decoded), delimiters, codec)


def _describe_byte(frame: bytes, offset: int) -> str:
    return f"byte 0x{frame[offset]:02X} at offset {offset}"


def parse_header(frame: bytes, *, default_charset: str = "ascii") -> Header | HeaderProblem:
    """Read the MSH segment of `frame`; never raises.

    `default_charset` (the tenant's setting) decodes a frame whose MSH-18 is
    empty and that holds bytes above 0x7F. The checks, in order: MSH first
    (100), MSH-1 (102), MSH-2 (102), MSH-18 (103), the bytes against the
    charset (102), control bytes (102), MSH-9 (101), MSH-10 (101).
    """
    declared_default = frame.startswith(_DEFAULT_PREFIX)
    if declared_default:
        field_separator = "|"
    elif not frame:
        return HeaderProblem(100, "MSH^1", "empty frame", None)
    elif not frame.startswith(b"MSH"):
        return HeaderProblem(100, "MSH^1", "frame does not start with MSH", None)
    elif len(frame) < 4 or chr(frame[3]) not in _SEPARATOR_CHARS:
        return HeaderProblem(102, "MSH^1^1", "MSH-1 field separator missing or invalid", None)
    else:
        field_separator = chr(frame[3])

    msh = frame[4 : _segment_end(frame)]
    separator_byte = field_separator.encode("ascii")
    parts = msh.split(separator_byte)
    if declared_default:
        delimiters: Delimiters | None = Delimiters.DEFAULT
    else:
        delimiters = _encoding_characters(field_separator, parts[0])

    is_ascii = frame.isascii()
    repetition = (delimiters or _fallback_delimiters(field_separator)).repetition
    raw_charset = parts[16] if len(parts) > 16 else b""
    raw_charset = raw_charset.split(repetition.encode("ascii"), 1)[0].strip()
    if not raw_charset.isascii():
        codec = None
    elif not raw_charset and is_ascii:
        codec = "ascii"
    else:
        codec = codec_for(raw_charset.decode("ascii"), default_charset)

    if delimiters is None:
        fallback = _fallback_delimiters(field_separator)
        header = _salvage_header(field_separator, parts, fallback, codec or "ascii")
        return HeaderProblem(102, "MSH^1^2", "MSH-2 encoding characters invalid", header)
    if codec is None:
        header = _salvage_header(field_separator, parts, delimiters, "ascii")
        if raw_charset:
            return HeaderProblem(103, "MSH^1^18", "MSH-18 charset not supported", header)
        return HeaderProblem(103, "MSH^1^18", "default charset not supported", header)
    if not is_ascii:
        try:
            frame.decode(codec)
        except UnicodeDecodeError as error:
            header = _salvage_header(field_separator, parts, delimiters, codec)
            return HeaderProblem(
                102,
                "MSH^1^18" if raw_charset else "",
                f"{_describe_byte(frame, error.start)} not valid {codec}",
                header,
            )

    # The whole frame decodes strictly and the segment ends at an ASCII byte,
    # so this slice decodes too.
    header = _make_header(
        (field_separator, *msh.decode(codec).split(field_separator)), delimiters, codec
    )
    if len(frame.translate(None, _CONTROL_BYTES)) != len(frame):
        match = _CONTROL_BYTE.search(frame)
        offset = match.start() if match else 0
        return HeaderProblem(102, "", f"control {_describe_byte(frame, offset)}", header)
    if not header.message_code:
        return HeaderProblem(101, "MSH^1^9", "MSH-9 message type missing", header)
    if not header.control_id:
        return HeaderProblem(101, "MSH^1^10", "MSH-10 message control id empty", header)
    return header


@lru_cache(maxsize=64)
def _escape_table(delimiters: Delimiters) -> dict[int, str]:
    escape = delimiters.escape
    table: dict[int, str] = {
        code: f"{escape}X{code:02X}{escape}" for code in [*range(0x00, 0x09), *range(0x0A, 0x20)]
    }
    table[0x7F] = f"{escape}X7F{escape}"
    for char, letter in (
        (delimiters.field, "F"),
        (delimiters.component, "S"),
        (delimiters.subcomponent, "T"),
        (delimiters.repetition, "R"),
        (delimiters.escape, "E"),
        (delimiters.truncation, "P"),
    ):
        if char:
            table[ord(char)] = f"{escape}{letter}{escape}"
    return table


def hl7_escape(text: str, delimiters: Delimiters) -> str:
    """Escape `text` so that it is one HL7 value that can not break the structure.

    The delimiters become `\\F\\ \\S\\ \\T\\ \\R\\ \\E\\` (and `\\P\\` for the
    2.7 truncation character), written with the message's escape character;
    control characters, CR and LF included, become `\\Xhh\\`. TAB is kept.
    """
    return text.translate(_escape_table(delimiters))


@lru_cache(maxsize=64)
def _unescape_pattern(delimiters: Delimiters) -> tuple[re.Pattern[str], dict[str, str]]:
    escape = re.escape(delimiters.escape)
    pattern = re.compile(f"{escape}([FSTREP]|X(?:[0-9A-Fa-f]{{2}})+){escape}")
    names = {
        "F": delimiters.field,
        "S": delimiters.component,
        "T": delimiters.subcomponent,
        "R": delimiters.repetition,
        "E": delimiters.escape,
        "P": delimiters.truncation,
    }
    return pattern, names


def hl7_unescape(text: str, delimiters: Delimiters) -> str:
    """Undo `hl7_escape`: the delimiter escapes and `\\Xhh\\` of ASCII bytes.

    Any other escape sequence (formatting such as `\\.br\\`, hex data above
    0x7F, malformed sequences) is left as written.
    """
    if delimiters.escape not in text:
        return text
    pattern, names = _unescape_pattern(delimiters)

    def replace(match: re.Match[str]) -> str:
        body = match.group(1)
        if body[0] != "X":
            return names[body] or match.group(0)
        data = bytes.fromhex(body[1:])
        return data.decode("ascii") if data.isascii() else match.group(0)

    return pattern.sub(replace, text)
