"""The few HL7 keys a stored message is found by: PID-3's first identifier, SCH-1, SCH-2.

Read from the raw bytes with the message's own separators, without parsing
the message: this runs for every message on the inbound path. Values are
the first component of the field's first repetition (the ID itself, without
its assigning authority), decoded in the message's charset, as on the wire
(escape sequences are not resolved). A value longer than ``MAX_VALUE`` is not
a key.

Compiled with mypyc (``udsgateway.compiled``): it runs for every message.
"""

from __future__ import annotations

from typing import Final

from udsgateway.hl7.header import Header

MAX_VALUE: Final = 199
#: Segment -> (field number, key name) read from it (the first such segment only).
_WANTED: Final[dict[bytes, tuple[tuple[int, str], ...]]] = {
    b"PID": ((3, "pid3"),),
    b"SCH": ((1, "sch1"), (2, "sch2")),
}


def search_keys(raw: bytes, header: Header) -> tuple[tuple[str, str], ...]:
    """(name, value) of the keys this message has; empty values are left out."""
    delimiters = header.delimiters
    field = delimiters.field.encode("latin-1")
    component = delimiters.component.encode("latin-1")
    repetition = delimiters.repetition.encode("latin-1")
    encoding = header.encoding or "latin-1"
    found: list[tuple[str, str]] = []
    seen: set[bytes] = set()
    for segment in raw.replace(b"\n", b"\r").split(b"\r"):
        name = segment[:3]
        if name not in _WANTED or name in seen or segment[3:4] != field:
            continue
        seen.add(name)
        fields = segment.split(field)
        for number, key in _WANTED[name]:
            if number >= len(fields):
                continue
            value = fields[number]
            if repetition:
                value = value.split(repetition, 1)[0]
            if component:
                value = value.split(component, 1)[0]
            value = value.strip()
            if not value or len(value) > MAX_VALUE:
                continue
            try:
                text = value.decode(encoding)
            except (UnicodeDecodeError, LookupError):
                text = value.decode("latin-1")
            found.append((key, text))
        if len(seen) == len(_WANTED):
            break
    return tuple(found)
