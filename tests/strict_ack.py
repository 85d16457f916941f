"""Check the ACKs we write against hl7apy's strict validation for their version.

hl7apy reads HL7 2.1 to 2.8.2, but not 2.7.1, and its 2.1 tables require a
second component in every timestamp (TS.2, degree of precision), which the
2.1 standard does not: `STRICT_VERSIONS` are the versions it can judge.
"""

from __future__ import annotations

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import get_message_info, parse_message, parse_segments

from udsgateway.hl7.header import read_delimiters

STRICT_VERSIONS = ("2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1")
"""The versions of our test matrix that hl7apy validates strictly."""

NOT_STRICT_VERSIONS = ("2.1", "2.7.1")
"""Versions of our test matrix hl7apy can not judge (see the module docstring)."""


def strictly_valid(ack: bytes, codec: str = "latin-1") -> str:
    """Validate one unframed ACK strictly; return its MSH-12, raise when it is invalid.

    The ACK structure is named explicitly: hl7apy derives it from MSH-9.3,
    which versions before 2.3.1 do not have. From 2.3.1 on the message is
    also parsed as hl7apy finds it, from MSH-9. An ACK whose MSA-2 is empty
    (the answer to a message without MSH-10) can not be valid: callers skip it.
    """
    text = ack.decode(codec)
    assert text.startswith("MSH"), "ACK does not start with MSH"
    delimiters = read_delimiters(ack)
    assert delimiters is not None, "ACK MSH-1/MSH-2 unreadable"
    encoding_chars, structure, version = get_message_info(text)
    assert version in STRICT_VERSIONS, f"hl7apy can not validate version {version!r}"
    message = Message(
        "ACK",
        version=version,
        validation_level=VALIDATION_LEVEL.STRICT,
        encoding_chars=encoding_chars,
    )
    message.children = parse_segments(
        text, message.version, encoding_chars, VALIDATION_LEVEL.STRICT, message.reference, True
    )
    message.validate()
    # MSH-9 is ACK alone in the NAK to a message without an MSH-9 event: there
    # is no trigger event to echo, and hl7apy can not derive a structure from it.
    has_event = delimiters.component in text.split("\r", 1)[0].split(delimiters.field)[8]
    if has_event and version not in ("2.2", "2.3"):
        assert structure == "ACK", f"MSH-9 does not name the ACK structure: {structure!r}"
        found = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        found.validate()
    return str(version)
