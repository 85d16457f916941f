"""A full, lightweight parse of an HL7 v2 message, for the mapping layer.

Templates and the variable catalogue need every field of a message; the ACK hot path
needs only the header and never comes here. Every value stays in its **wire form**:
still HL7-escaped, exactly as received (``D\\F\\Angelo`` stays ``D\\F\\Angelo``, a
malformed ``\\X4`` stays ``\\X4``), so that a value copied into an outbound message is
forwarded byte-for-byte and never double-escaped.

We use a small parser of our own rather than python-hl7's ``hl7.parse``: values are plain
slices of the received text (so wire-form preservation is evident), splitting below the
field is done only when a path asks for it, segments may be separated by ``\\r``, ``\\n``
or ``\\r\\n`` (pasted samples), and MSH-1/MSH-2 follow HL7's numbering without special
cases in every caller.

Paths (see ``parse_path``)::

    PID-5          the whole field, all repetitions, with its separators
    PID-5.1        component 1 of the first repetition
    PID-5.1.2      subcomponent 2 of component 1
    PID-3[2].1     component 1 of the second repetition (1-based)
    NK1[2]-2       field 2 of the second NK1 segment
    NK1[2]         the whole second NK1 segment
    MSH-1, MSH-2   the field separator and the encoding characters

``Message.get`` returns ``""`` for any path that is not populated; only a path that is
not a path raises ``PathSyntaxError``. ``[*]`` (all segments, all repetitions) is part of
the syntax for the template layer, which expands it; ``Message.get`` refuses it.
"""

from __future__ import annotations

import re
from functools import lru_cache

from udsgateway.hl7.header import Delimiters, codec_for
from udsgateway.hl7.paths import ALL, Path, PathSyntaxError, parse_path

_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")


class MessageParseError(ValueError):
    """The input is not an HL7 v2 message. ``reason`` never contains field values."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def delimiters_from_header(line: str) -> Delimiters:
    """Read the delimiters from an MSH segment line (``MSH|^~\\&|...``).

    MSH-2 may carry a fifth character (the v2.7 truncation character), which is ignored.
    Raises ``MessageParseError`` when the line is not an MSH header or its delimiters are
    unusable (empty, repeated, letters or digits).
    """
    if not line.startswith("MSH") or len(line) < 5:
        raise MessageParseError("the message does not start with an MSH segment")
    end = line.find(line[3], 4)
    if end == -1:
        return _delimiters(line[3:])
    # MSH-1 and MSH-2 only: the same few characters in every message of a sender.
    return _delimiters(line[3:end])


@lru_cache(maxsize=64)
def _delimiters(declared: str) -> Delimiters:
    """Delimiters from MSH-1 followed by MSH-2 (``|^~\\&``)."""
    separator, encoding = declared[0], declared[1:]
    chars = [separator, *encoding[:4]]
    if len(encoding) < 1:
        raise MessageParseError("MSH-2 (encoding characters) is empty")
    if len(set(chars)) != len(chars) or any(ch.isalnum() or ch in "\r\n " for ch in chars):
        raise MessageParseError("MSH-1/MSH-2 do not declare distinct delimiter characters")
    padded = encoding[:4].ljust(4, "\0")
    component, repetition, escape, subcomponent = (ch if ch != "\0" else "" for ch in padded)
    return Delimiters(separator, component, repetition, escape, subcomponent)


def python_codec(charset: str) -> str | None:
    """Return the Python codec for an MSH-18 value (HL7 table 0211), or None if unknown.

    The one table of MSH-18 names is the header layer's, so the listener and
    the templates always agree on what a message's bytes mean.
    """
    return codec_for(charset, "") if charset.strip() else None


def split_lines(text: str) -> list[str]:
    """Split ``text`` at every CR LF, lone CR and lone LF, as ``re.split`` on them would.

    Plain string splits, faster than the regular expression: a received message
    (segments ended by CR alone) takes one.
    """
    if "\n" not in text:
        return text.split("\r")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def split(value: str, delimiter: str) -> list[str]:
    """Split wire text on one delimiter; an undeclared (empty) delimiter splits nothing."""
    return value.split(delimiter) if delimiter else [value]


class Segment:
    """One segment: its wire text and its fields, ``fields[n]`` being field n.

    ``fields[0]`` is the segment ID. For MSH, ``fields[1]`` is the field separator and
    ``fields[2]`` the encoding characters, as HL7 numbers them.

    Immutable by convention, compared and hashed by its text and fields. A plain class
    (not attrs): compiled by mypyc, its attributes are C slots.
    """

    def __init__(self, text: str, fields: tuple[str, ...]) -> None:
        self.text = text
        self.fields = fields

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        return self.text == other.text and self.fields == other.fields

    def __hash__(self) -> int:
        return hash((self.text, self.fields))

    def __repr__(self) -> str:
        return f"Segment(text={self.text!r}, fields={self.fields!r})"

    @property
    def name(self) -> str:
        """The segment ID (``PID``)."""
        return self.fields[0]

    def field(self, number: int) -> str:
        """Field ``number`` in wire form, ``""`` when absent."""
        return self.fields[number] if 0 <= number < len(self.fields) else ""

    def is_atomic(self, number: int) -> bool:
        """MSH-1 and MSH-2 hold delimiters themselves and are never split."""
        return self.name == "MSH" and number in (1, 2)


class Message:
    """A parsed HL7 v2 message: delimiters and segments, all values in wire form.

    Immutable by convention, compared and hashed by its delimiters and segments. A plain
    class (not attrs): compiled by mypyc, its attributes are C slots.
    """

    def __init__(self, delimiters: Delimiters, segments: tuple[Segment, ...]) -> None:
        self.delimiters = delimiters
        self.segments = segments
        by_name: dict[str, list[Segment]] = {}
        for segment in segments:
            by_name.setdefault(segment.name, []).append(segment)
        self._by_name = {k: tuple(v) for k, v in by_name.items()}

    def __repr__(self) -> str:
        return f"Message(delimiters={self.delimiters!r}, segments={self.segments!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self.delimiters == other.delimiters and self.segments == other.segments

    def __hash__(self) -> int:
        return hash((self.delimiters, self.segments))

    @property
    def text(self) -> str:
        """The message in wire form with ``\\r`` after every segment."""
        return "".join(segment.text + "\r" for segment in self.segments)

    def segments_named(self, name: str) -> tuple[Segment, ...]:
        """All segments with this ID, in message order."""
        return self._by_name.get(name, ())

    def segment(self, name: str, occurrence: int = 1) -> Segment | None:
        """The ``occurrence``-th (1-based) segment with this ID, or None."""
        found = self.segments_named(name)
        return found[occurrence - 1] if 0 < occurrence <= len(found) else None

    def get(self, path: str | Path) -> str:
        """The wire-form value at ``path``; ``""`` when not populated.

        Raises ``PathSyntaxError`` for an invalid path or one with ``[*]``.
        """
        parsed = parse_path(path) if isinstance(path, str) else path
        if parsed.has_wildcard:
            raise PathSyntaxError(f"{parsed}: [*] selects several values; use one index")
        assert isinstance(parsed.occurrence, int)
        segment = self.segment(parsed.segment, parsed.occurrence)
        if segment is None:
            return ""
        if parsed.field is None:
            return segment.text
        return value_in_segment(segment, parsed, self.delimiters)


def value_in_segment(segment: Segment, path: Path, delimiters: Delimiters) -> str:
    """The value of ``path`` (its field part; the segment part is ignored) in ``segment``."""
    field, repetition = path.field, path.repetition
    assert field is not None and repetition != ALL
    value = segment.field(field)
    component, subcomponent = path.component, path.subcomponent
    if repetition is None and component is None:
        return value
    # Each level is cut on its own, no zip() over the levels: compiled, a zip with a
    # keyword argument is a call into Python, the dearest part of a lookup that every
    # render and every body check makes several times.
    first = repetition if isinstance(repetition, int) else 1
    if segment.is_atomic(field):
        whole = first == 1 and (component or 1) == 1 and (subcomponent or 1) == 1
        return value if whole else ""
    value = _nth(value, delimiters.repetition, first)
    if component is None:
        return value  # a repetition alone
    value = _nth(value, delimiters.component, component)
    if subcomponent is None:
        return value
    return _nth(value, delimiters.subcomponent, subcomponent)


def _nth(value: str, delimiter: str, index: int) -> str:
    """Part ``index`` (1-based) of ``value`` split on ``delimiter``; "" past the last part."""
    parts = split(value, delimiter)
    return parts[index - 1] if index <= len(parts) else ""


def is_segment_id(text: str) -> bool:
    """True when ``text`` is a segment ID (three characters, ``PID``, ``ZPD``)."""
    return _SEGMENT_ID.fullmatch(text) is not None


def decode(data: bytes, default_charset: str = "utf-8") -> str:
    """Decode raw message bytes by their MSH-18, strictly (never lossily).

    An empty MSH-18 uses ``default_charset`` (the tenant's default). Raises
    ``MessageParseError`` for an unknown MSH-18 or bytes invalid in the charset.
    """
    head = data[:4096]
    end = len(head)
    for line_break in (b"\r", b"\n"):
        found = head.find(line_break)
        if 0 <= found < end:
            end = found
    header = head[:end].decode("latin-1")  # up to the first line break
    charset = ""
    if header.startswith("MSH") and len(header) > 3:
        fields = header.split(header[3])
        if len(fields) > 17:
            charset = fields[17]
            encoding = fields[1] if len(fields) > 1 else ""
            if len(encoding) > 1:
                charset = charset.split(encoding[1])[0]  # first repetition
    codec = codec_for(charset, default_charset)
    if codec is None:
        raise MessageParseError("MSH-18 names a character set we do not know")
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        raise MessageParseError(f"the bytes are not valid {codec}") from None


def parse_message(data: str | bytes, *, default_charset: str = "utf-8") -> Message:
    """Parse a whole message. Segments may be separated by ``\\r``, ``\\n`` or ``\\r\\n``.

    Blank lines are skipped. Bytes are decoded by MSH-18 (see ``decode``). Raises
    ``MessageParseError`` when the input does not start with a usable MSH header. Later
    lines are taken as they are (the listener has validated the message already): one
    that does not start with a segment ID is kept but no path reaches it.
    """
    text = decode(data, default_charset) if isinstance(data, bytes) else data
    text = text.lstrip("\ufeff")
    lines = [line for line in split_lines(text) if line.strip()]
    if not lines:
        raise MessageParseError("the message is empty")
    delimiters = delimiters_from_header(lines[0])
    segments = []
    for number, line in enumerate(lines, start=1):
        if number == 1:
            rest = line[4:].split(delimiters.field)
            fields = ("MSH", delimiters.field, *rest)
        else:
            fields = tuple(line.split(delimiters.field))
        segments.append(Segment(line, fields))
    return Message(delimiters, tuple(segments))
