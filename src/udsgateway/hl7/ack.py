"""Build the ACKs we send and read the ACKs destinations send us.

`build_ack` writes the sender's delimiters and MSH-18, MSH-3/4 swapped with
MSH-5/6, a fresh MSH-10 of our own, MSA-2 echoing the message's MSH-10, and
for a NAK an ERR segment with the location, the table 0357 code, the
severity and a diagnostic without PHI. The layout follows the sender's
version (MSH-12), so that a strict parser of that version reads it:

- MSH-9 is ``ACK^event`` for 2.1 to 2.3, ``ACK^event^ACK`` from 2.3.1 on;
- ERR is ERR-1 alone (``segment^sequence^field^code&text&table``) for 2.1 to
  2.4, with the diagnostic in MSA-3, since those versions have no ERR-7;
  from 2.5 on ERR-2 location, ERR-3 code, ERR-4 severity and ERR-7;
- MSA-3 (withdrawn in 2.7) is written only before 2.7.

It works from the partial header of a `HeaderProblem` too. Nothing here reads
the clock: callers pass timestamps in.
"""

from __future__ import annotations

import enum
import re
import string
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from random import Random, SystemRandom

from attrs import frozen

from udsgateway.hl7.batch import BatchFile, BatchHeader
from udsgateway.hl7.header import (
    SUPPORTED_CODECS,
    Delimiters,
    Header,
    codec_for,
    hl7_escape,
    hl7_unescape,
    read_delimiters,
    segments,
)

__all__ = [
    "ACK_CODES",
    "TABLE_0357",
    "AckError",
    "AckLayout",
    "ControlIdSource",
    "Outcome",
    "Reply",
    "ack_code",
    "ack_layout",
    "application_ack_requested",
    "build_ack",
    "build_batch_ack",
    "hl7_timestamp",
    "is_enhanced",
    "parse_reply",
    "wants_accept_ack",
    "wants_application_ack",
]

TABLE_0357: dict[int, str] = {
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    104: "Value too long",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


@frozen
class AckError:
    """The content of an ERR segment.

    `location` is an ERR-2 location written with `^` ("MSH^1^10"); the ACK
    uses the sender's component separator. `diagnostic` (ERR-7) must not
    contain field values.
    """

    code: int
    location: str = ""
    diagnostic: str = ""
    severity: str = "E"


class Outcome(enum.Enum):
    """What the receiver decided: AA/AE/AR in original mode, CA/CE/CR in enhanced mode."""

    ACCEPT = "accept"
    ERROR = "error"
    REJECT = "reject"


@frozen
class AckLayout:
    """Which fields the ACK of one HL7 version has (see the module docstring)."""

    #: MSH-9 has the message structure as its third component (2.3.1 on).
    message_structure: bool
    #: ERR-1 holds location and code; no ERR-2 to ERR-7 (2.1 to 2.4).
    legacy_err: bool
    #: MSA-3 text message exists (before 2.7).
    text_message: bool


def _version_key(version: str) -> tuple[int, ...] | None:
    parts = version.strip().split(".")
    if not 2 <= len(parts) <= 3 or not all(part.isdigit() for part in parts):
        return None
    return tuple(int(part) for part in parts)


@lru_cache(maxsize=32)
def ack_layout(version: str) -> AckLayout:
    """The ACK layout for a sender's MSH-12; an unreadable version gets the 2.5 one."""
    key = _version_key(version) or (2, 5)
    return AckLayout(
        message_structure=key >= (2, 3, 1),
        legacy_err=key < (2, 5),
        text_message=key < (2, 7),
    )


_ORIGINAL = {Outcome.ACCEPT: "AA", Outcome.ERROR: "AE", Outcome.REJECT: "AR"}
_ENHANCED = {Outcome.ACCEPT: "CA", Outcome.ERROR: "CE", Outcome.REJECT: "CR"}


def is_enhanced(header: Header) -> bool:
    """True when the sender asked for enhanced mode (MSH-15 or MSH-16 present)."""
    return bool(header.accept_ack_type.strip() or header.application_ack_type.strip())


def ack_code(header: Header, outcome: Outcome) -> str:
    """MSA-1 for `outcome`, in the sender's acknowledgment mode."""
    return (_ENHANCED if is_enhanced(header) else _ORIGINAL)[outcome]


def wants_accept_ack(header: Header, outcome: Outcome) -> bool:
    """Whether the sender wants an accept ACK for `outcome`.

    Original mode: always. Enhanced mode, by MSH-15: NE never, ER only on
    error or reject, SU only on success, AL, empty or any other value always
    (an unknown value is answered, since a sender that waits for an ACK it
    never gets stalls its whole queue).
    """
    if not is_enhanced(header):
        return True
    condition = header.accept_ack_type.strip().upper()
    if condition == "NE":
        return False
    if condition == "ER":
        return outcome is not Outcome.ACCEPT
    if condition == "SU":
        return outcome is Outcome.ACCEPT
    return True


def application_ack_requested(header: Header) -> bool:
    """True when the sender may wait for an application ACK (MSH-16 set and not NE).

    An empty MSH-16 in enhanced mode (MSH-15 alone) asks for none: such a
    sender expects only the accept ACK.
    """
    condition = header.application_ack_type.strip().upper()
    return condition not in ("", "NE")


def wants_application_ack(header: Header, outcome: Outcome) -> bool:
    """Whether the sender wants an application ACK (AA/AE/AR) for `outcome`.

    By MSH-16: empty or NE never, ER only on error or reject, SU only on
    success, AL or any other value always (as for MSH-15, an unknown value
    is answered rather than leaving the sender waiting).
    """
    if not application_ack_requested(header):
        return False
    condition = header.application_ack_type.strip().upper()
    if condition == "ER":
        return outcome is not Outcome.ACCEPT
    if condition == "SU":
        return outcome is Outcome.ACCEPT
    return True


def hl7_timestamp(epoch_seconds: float) -> str:
    """`epoch_seconds` as an HL7 timestamp "YYYYMMDDHHMMSS", in UTC.

    UTC so that a clock change or daylight saving time never makes the
    timestamps of one gateway go backwards; no offset is written because
    the format asked of us has none.
    """
    return _utc_stamp(int(epoch_seconds))


@lru_cache(maxsize=4)
def _utc_stamp(second: int) -> str:
    # Every ACK of the same second has the same MSH-7: format it once.
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(second))


@lru_cache(maxsize=64)
def _wire_safe_table(delimiters: Delimiters) -> dict[int, str]:
    """Translation for echoed values: control characters and the field separator escaped.

    Values echoed from the sender's header are already in wire form and are
    copied as they are; this only stops a value that could not have come
    from a well-formed header (CR, LF, MLLP bytes, a field separator) from
    breaking the ACK's structure.
    """
    escape = delimiters.escape
    table: dict[int, str] = {code: f"{escape}X{code:02X}{escape}" for code in range(0x20)}
    table[0x7F] = f"{escape}X7F{escape}"
    table[ord(delimiters.field)] = f"{escape}F{escape}"
    return table


@lru_cache(maxsize=256)
def _msh_frame(
    delimiters: Delimiters,
    receiving_application: str,
    receiving_facility: str,
    sending_application: str,
    sending_facility: str,
    event: str,
    processing_id: str,
    version: str,
    charset: str,
    encoding: str,
) -> tuple[str, str, str, str]:
    """The ACK's MSH around its two fresh fields, and the codec to encode it with.

    Everything but MSH-7 (the timestamp) and MSH-10 (our control id) comes
    from the message's header, which is the same for every message of one
    sender and type: the segment is built once per such header as
    ``head + MSH-7 + middle + MSH-10 + tail``.
    """
    field_separator = delimiters.field
    component = delimiters.component
    safe = _wire_safe_table(delimiters)

    def echo(value: str) -> str:
        return value.translate(safe)

    if not event:
        message_type = "ACK"
    elif ack_layout(version).message_structure:
        message_type = f"ACK{component}{echo(event)}{component}ACK"
    else:
        message_type = f"ACK{component}{echo(event)}"
    head = [
        "MSH",
        delimiters.encoding_characters(),
        echo(receiving_application),
        echo(receiving_facility),
        echo(sending_application),
        echo(sending_facility),
        "",
    ]
    middle = ["", "", message_type, ""]
    tail = ["", echo(processing_id) or "P", echo(version) or "2.5"]
    codec = encoding if encoding in SUPPORTED_CODECS else "ascii"
    charset = charset.strip()
    if charset and codec_for(charset, "ascii") is not None:
        tail += ["", "", "", "", "", echo(charset)]
    return (
        field_separator.join(head),
        field_separator.join(middle),
        field_separator.join(tail),
        codec,
    )


def build_ack(
    header: Header,
    code: str,
    *,
    control_id: str,
    timestamp: str,
    error: AckError | None = None,
    text: str = "",
) -> bytes:
    """Encode the ACK (or NAK, with `error`) of the message whose header is `header`.

    `code` is MSA-1, `control_id` our fresh MSH-10, `timestamp` MSH-7 and
    `text` MSA-3 (dropped from 2.7 on, where MSA-3 is withdrawn; a NAK to a
    2.1 to 2.4 sender carries the diagnostic there). MSH-11 and MSH-12 echo
    the sender's ("P" and "2.5" when unreadable); the layout follows MSH-12.
    MSH-18 is echoed when it names a charset we support; the ACK is encoded
    with the message's codec. Characters the codec can not encode (only
    possible in `text` or the diagnostic) become "?".
    """
    delimiters = header.delimiters
    field_separator = delimiters.field
    component = delimiters.component
    safe = _wire_safe_table(delimiters)

    def echo(value: str) -> str:
        return value.translate(safe)

    head, middle, tail, codec = _msh_frame(
        delimiters,
        header.receiving_application,
        header.receiving_facility,
        header.sending_application,
        header.sending_facility,
        header.trigger_event,
        header.processing_id,
        header.version,
        header.charset,
        header.encoding,
    )
    msh = head + echo(timestamp) + middle + echo(control_id) + tail
    layout = ack_layout(header.version)
    if error is not None and layout.legacy_err and not text:
        # No ERR-7 before 2.5: the diagnostic goes where those senders read text.
        text = error.diagnostic

    msa = ["MSA", echo(code), echo(header.control_id)]
    if text and layout.text_message:
        msa.append(hl7_escape(text, delimiters))
    lines = [msh, field_separator.join(msa)]

    if error is not None:
        # The location is written with `^` in AckError; each part is echoed on
        # its own, so that a sender whose field separator is `^` gets its own
        # component separator here, not an escaped field separator.
        location = [echo(part) for part in error.location.split("^")] if error.location else []
        code_text = hl7_escape(TABLE_0357.get(error.code, ""), delimiters)
        if layout.legacy_err:
            # ERR-1 (CM_ELD): segment^sequence^field^code&text&table.
            location = [*location, "", "", ""][:3]
            identifier = delimiters.subcomponent.join((str(error.code), code_text, "HL70357"))
            err = ["ERR", component.join((*location, identifier))]
        else:
            err = [
                "ERR",
                "",
                component.join(location),
                component.join((str(error.code), code_text, "HL70357")),
                hl7_escape(error.severity, delimiters),
                "",
                "",
                hl7_escape(error.diagnostic, delimiters),
            ]
        while err[-1] == "":
            err.pop()
        lines.append(field_separator.join(err))

    message = "\r".join(lines) + "\r"
    try:
        return message.encode(codec)
    except UnicodeEncodeError:
        return message.encode(codec, "replace")


def _batch_segment(
    name: str, source: BatchHeader, control_id: str, timestamp: str, reference: str
) -> str:
    """Our FHS or BHS answering ``source``: addresses swapped, BHS-12/FHS-12 = its control ID."""
    delimiters = source.delimiters
    safe = _wire_safe_table(delimiters)

    def echo(value: str) -> str:
        return value.translate(safe)

    fields = [
        name,
        delimiters.encoding_characters(),
        echo(source.field(5)),
        echo(source.field(6)),
        echo(source.field(3)),
        echo(source.field(4)),
        echo(timestamp),
        "",
        "",
        "",
        echo(control_id),
        echo(reference),
    ]
    return delimiters.field.join(fields).rstrip(delimiters.field)


def build_batch_ack(
    batch_file: BatchFile,
    acks: Sequence[Sequence[bytes]],
    *,
    next_id: Callable[[], str],
    timestamp: str,
) -> bytes:
    """One batch acknowledgment: ``[FHS] {BHS {ACK} BTS} [FTS]``, one BHS per input batch.

    ``acks[i]`` are the encoded ACKs of batch ``i``, in order (a message whose
    sender asked for no ACK, or an inbound ACK, has none). FHS/FTS are written
    when the input had an FHS. Our FHS-11/BHS-11 are fresh control IDs from
    ``next_id``; FHS-12/BHS-12 name the sender's FHS-11/BHS-11; BTS-1 counts
    the ACK messages of the batch, FTS-1 the batches. The batch segments echo
    the sender's bytes (latin-1 keeps them as they are); each ACK keeps the
    encoding of the message it answers.
    """
    file_header = batch_file.file_header
    parts: list[bytes] = []
    if file_header is not None:
        fhs = _batch_segment("FHS", file_header, next_id(), timestamp, file_header.control_id)
        parts.append(fhs.encode("latin-1") + b"\r")
    fallback = batch_file.first_header
    assert fallback is not None, "a batch file has an FHS or a BHS"
    for batch, batch_acks in zip(batch_file.batches, acks, strict=True):
        source = batch.header or fallback
        reference = batch.header.control_id if batch.header is not None else ""
        bhs = _batch_segment("BHS", source, next_id(), timestamp, reference)
        parts.append(bhs.encode("latin-1") + b"\r")
        parts.extend(batch_acks)
        parts.append(f"BTS{source.delimiters.field}{len(batch_acks)}\r".encode("latin-1"))
    if file_header is not None:
        separator = file_header.delimiters.field
        parts.append(f"FTS{separator}{len(batch_file.batches)}\r".encode("latin-1"))
    return b"".join(parts)


_ID_ALPHABET = string.digits + string.ascii_uppercase
_PREFIX = re.compile(r"[A-Za-z0-9]{1,10}")


def _base36(number: int) -> str:
    digits = []
    while True:
        number, digit = divmod(number, 36)
        digits.append(_ID_ALPHABET[digit])
        if not number:
            return "".join(reversed(digits))


def _check_prefix(value: str) -> None:
    if not _PREFIX.fullmatch(value):
        raise ValueError("control id prefix must be 1 to 10 letters or digits")


class ControlIdSource:
    """Fresh MSH-10 values for the ACKs and messages we send.

    Each value is the prefix and a base-36 counter, at most 20 characters
    (the HL7 2.3 limit), letters and digits only so that no delimiter set
    needs them escaped. The prefix differs on every start (see `for_boot`),
    which keeps values unique across restarts without storing the counter.
    36**10 values per prefix: more than a century at a million a second.
    """

    def __init__(self, prefix: str) -> None:
        _check_prefix(prefix)
        self.prefix = prefix
        self._counter = 0

    def __repr__(self) -> str:
        return f"ControlIdSource(prefix={self.prefix!r}, counter={self._counter!r})"

    def next(self) -> str:
        """A control id never returned before by this source."""
        self._counter += 1
        return self.prefix + _base36(self._counter)

    @classmethod
    def for_boot(cls, boot_epoch: float, rng: Random | None = None) -> ControlIdSource:
        """A source whose prefix is the boot time in seconds and two random characters.

        Two starts would have to happen in the same second and draw the same
        two characters (1 in 1296) to share a prefix. `rng` is for tests.
        """
        rng = rng or SystemRandom()
        seconds = _base36(max(0, int(boot_epoch))).rjust(7, "0")[-7:]
        entropy = "".join(rng.choice(_ID_ALPHABET) for _ in range(2))
        return cls(seconds + entropy)

    def renumber(self, boot_epoch: float, boot: int) -> None:
        """Take the prefix of the database's ``boot``-th start (before any id is drawn).

        The boot time in seconds and the boot number modulo 1296, so that two
        gateways sharing one database (the nodes of a cluster, started in the
        same second) never share a prefix: the database hands each start its own
        number. The time keeps a database restored from a backup, whose counter
        went back, from reusing the prefixes it issued since.
        """
        seconds = _base36(max(0, int(boot_epoch))).rjust(7, "0")[-7:]
        prefix = seconds + _base36(boot % 1296).rjust(2, "0")
        _check_prefix(prefix)
        self.prefix = prefix
        self._counter = 0


@frozen
class Reply:
    """What a destination answered, read from its ACK.

    `problem` is "" for a well-formed ACK; otherwise it says, without field
    values, why the reply can not count as one. `text` is MSA-3, unescaped.
    """

    ack_code: str | None
    control_id: str | None
    text: str
    error_code: int | None
    problem: str


def _decode(value: bytes, codec: str) -> str:
    # Informational fields of a reply: a byte that does not decode becomes
    # U+FFFD. Our control ids are ASCII, so MSA-2 can never match by accident.
    return value.decode(codec, "replace")


def _error_code(err: list[bytes], delimiters: Delimiters) -> int | None:
    """ERR-3.1, or ERR-1.4.1 as HL7 2.3 and 2.4 write it."""
    component = delimiters.component.encode("ascii")
    candidates = []
    if len(err) > 3:
        candidates.append(err[3].split(component, 1)[0])
    if len(err) > 1:
        parts = err[1].split(component)
        if len(parts) > 3:
            candidates.append(parts[3].split(delimiters.subcomponent.encode("ascii"), 1)[0])
    for candidate in candidates:
        value = candidate.strip()
        if value.isdigit() and len(value) <= 9:
            return int(value)
    return None


def parse_reply(frame: bytes) -> Reply:
    """Read a destination's ACK: MSA-1, MSA-2, MSA-3 and the ERR code; never raises.

    Leading blank lines are skipped. Garbage, a garbled MSH or a message
    without MSA gives `ack_code` None and a `problem`.
    """
    frame = frame.lstrip(b"\r\n\t ")
    if not frame.startswith(b"MSH"):
        return Reply(None, None, "", None, "reply does not start with MSH")
    delimiters = read_delimiters(frame)
    if delimiters is None:
        return Reply(None, None, "", None, "reply MSH-1 or MSH-2 invalid")
    separator = delimiters.field.encode("ascii")
    lines = segments(frame)
    msh = lines[0].split(separator)
    # msh[0] is "MSH", so msh[n] is MSH-(n+1).
    raw_charset = msh[17] if len(msh) > 17 else b""
    raw_charset = raw_charset.split(delimiters.repetition.encode("ascii"), 1)[0]
    codec = codec_for(raw_charset.decode("latin-1"), "utf-8") or "latin-1"

    msa: list[bytes] | None = None
    err: list[bytes] | None = None
    for line in lines[1:]:
        if msa is None and line.startswith(b"MSA" + separator):
            msa = line.split(separator)
        elif err is None and line.startswith(b"ERR" + separator):
            err = line.split(separator)
    error_code = _error_code(err, delimiters) if err is not None else None
    if msa is None:
        return Reply(None, None, "", error_code, "reply has no MSA segment")

    def at(n: int) -> str:
        return _decode(msa[n], codec) if len(msa) > n else ""

    code = at(1).strip()
    control_id = at(2)
    text = hl7_unescape(at(3), delimiters)
    if code not in ACK_CODES:
        return Reply(None, control_id, text, error_code, "reply MSA-1 is not an ACK code")
    if not control_id:
        return Reply(code, control_id, text, error_code, "reply MSA-2 empty")
    return Reply(code, control_id, text, error_code, "")
