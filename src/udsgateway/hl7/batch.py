"""HL7 v2 batches in one frame: split them into messages, answer with a batch of ACKs.

A batch file is ``[FHS] { BHS { MSH ... } BTS } [FTS]`` (HL7 v2 chapter 2,
"Batch protocol"). Each message is cut out of the frame byte for byte, as
the sender wrote it, and goes through the normal per-message path; the
answer is one batch acknowledgment: ``[FHS] { BHS { ACK } BTS } [FTS]``,
FHS/FTS only when the input had them, BHS-12 (FHS-12) naming the sender's
BHS-11 (FHS-11). A batch whose structure can not be read is not split: it
gets one AR for the whole batch and nothing of it is stored.

Lenient where nothing is lost: FHS without BHS (its messages form one
batch), a missing BTS or FTS at the end of the frame, blank lines, CR LF or
LF between segments. Everything else out of place is a structure error.
"""

from __future__ import annotations

import re

from attrs import frozen

from udsgateway.hl7.header import Delimiters, Header, HeaderProblem, parse_header, read_delimiters

__all__ = [
    "BATCH_STARTS",
    "MAX_BATCH_MESSAGES",
    "Batch",
    "BatchFile",
    "BatchHeader",
    "BatchProblem",
    "first_version",
    "is_batch",
    "read_batch_header",
    "split_batch",
]

BATCH_STARTS = (b"FHS", b"BHS")
"""The segments a batch frame starts with."""

MAX_BATCH_MESSAGES = 10_000
"""Most messages one batch frame may hold (bounds the work and the answer of one frame)."""

_SEGMENT = re.compile(rb"[^\r\n]+")


@frozen
class BatchHeader:
    """An FHS or BHS segment: its delimiters and fields, decoded as latin-1 (byte for byte).

    ``fields[0]`` is FHS-1/BHS-1 (the field separator), so ``field(n)`` is the
    n-th field as HL7 counts.
    """

    segment: str
    delimiters: Delimiters
    fields: tuple[str, ...]

    def field(self, n: int) -> str:
        """FHS-n or BHS-n, or "" when the segment has no such field."""
        if 1 <= n <= len(self.fields):
            return self.fields[n - 1]
        return ""

    @property
    def control_id(self) -> str:
        """FHS-11 or BHS-11: the sender's file or batch control ID."""
        return self.field(11).split(self.delimiters.component, 1)[0]

    def as_header(self, version: str) -> Header:
        """A message header with this segment's addresses, for an ACK to the whole batch.

        MSH-10 is the batch (file) control ID, so that MSA-2 names the batch;
        MSH-9 is empty (the ACK's MSH-9 is then just ``ACK``).
        """
        return Header(
            self.delimiters,
            self.field(3),
            self.field(4),
            self.field(5),
            self.field(6),
            self.field(7),
            "",
            "",
            "",
            self.control_id,
            "P",
            version,
            "",
            "",
            "",
            "latin-1",
            self.fields,
        )


@frozen
class Batch:
    """One BHS ... BTS: its header (None for messages under FHS without BHS) and messages."""

    header: BatchHeader | None
    messages: tuple[bytes, ...]


@frozen
class BatchFile:
    """A frame that holds a batch: the FHS (None without one) and its batches."""

    file_header: BatchHeader | None
    batches: tuple[Batch, ...]

    @property
    def messages(self) -> tuple[bytes, ...]:
        """Every message of every batch, in order."""
        return tuple(message for batch in self.batches for message in batch.messages)

    @property
    def first_header(self) -> BatchHeader | None:
        """The FHS, or the first BHS when there is no FHS."""
        if self.file_header is not None:
            return self.file_header
        return self.batches[0].header if self.batches else None


@frozen
class BatchProblem:
    """Why a batch frame is not split; ``header`` (the FHS or BHS) addresses the AR."""

    diagnostic: str
    header: BatchHeader | None


def is_batch(frame: bytes) -> bool:
    """True when the frame starts with FHS or BHS."""
    return frame[:3] in BATCH_STARTS


def read_batch_header(segment: bytes) -> BatchHeader | None:
    """An FHS or BHS segment's delimiters and fields, or None when FHS-1/FHS-2 are garbled."""
    delimiters = read_delimiters(b"MSH" + segment[3:])
    if delimiters is None:
        return None
    text = segment.decode("latin-1")
    separator = delimiters.field
    return BatchHeader(text[:3], delimiters, (separator, *text[4:].split(separator)))


def split_batch(frame: bytes) -> BatchFile | BatchProblem:
    """Cut a batch frame into its messages; never raises.

    A message runs from its MSH to the next MSH, BHS, BTS, FHS or FTS at a
    segment start, separators included, so its bytes are exactly the
    sender's.
    """
    segments = [(m.start(), frame[m.start() : m.start() + 3]) for m in _SEGMENT.finditer(frame)]
    first = segments[0][1] if segments else b""
    file_header: BatchHeader | None = None
    header: BatchHeader | None = None
    if first in BATCH_STARTS:
        end = _segment_end(frame, 0)
        header = read_batch_header(frame[:end])
        if header is None:
            return BatchProblem(f"{first.decode()}-1 or {first.decode()}-2 invalid", None)
    else:
        return BatchProblem("frame does not start with FHS or BHS", None)

    batches: list[Batch] = []
    messages: list[bytes] = []
    batch_header: BatchHeader | None = None
    in_batch = False
    message_start = -1
    ended_file = False
    count = 0

    def close_message(at: int) -> None:
        nonlocal message_start
        if message_start >= 0:
            messages.append(frame[message_start:at])
            message_start = -1

    def close_batch() -> None:
        nonlocal in_batch, messages
        batches.append(Batch(batch_header, tuple(messages)))
        messages = []
        in_batch = False

    for index, (offset, name) in enumerate(segments):
        if ended_file:
            return BatchProblem(f"segment {_name(name)} after FTS", header)
        if name == b"FHS":
            if index != 0:
                return BatchProblem("FHS not at the start of the frame", header)
            file_header = header
            continue
        if name == b"BHS":
            close_message(offset)
            if in_batch:
                return BatchProblem("BHS inside a batch (BTS missing)", header)
            if index == 0:
                batch_header = header
            else:
                batch_header = read_batch_header(frame[offset : _segment_end(frame, offset)])
                if batch_header is None:
                    return BatchProblem("BHS-1 or BHS-2 invalid", header)
            in_batch = True
            continue
        if name == b"MSH":
            close_message(offset)
            if not in_batch:
                if batches and file_header is None:
                    return BatchProblem("MSH after BTS", header)
                # Messages right under FHS (no BHS) form one batch.
                batch_header, in_batch = None, True
            count += 1
            if count > MAX_BATCH_MESSAGES:
                return BatchProblem(
                    f"more than {MAX_BATCH_MESSAGES} messages in one batch frame", header
                )
            message_start = offset
            continue
        if name == b"BTS":
            close_message(offset)
            if not in_batch:
                return BatchProblem("BTS without BHS", header)
            close_batch()
            continue
        if name == b"FTS":
            close_message(offset)
            if file_header is None:
                return BatchProblem("FTS without FHS", header)
            if in_batch:
                close_batch()
            ended_file = True
            continue
        if message_start < 0:
            return BatchProblem(f"segment {_name(name)} outside a message", header)
    close_message(len(frame))
    if in_batch:
        close_batch()  # BTS missing at the end of the frame: nothing is lost
    return BatchFile(file_header, tuple(batches))


def first_version(frame: bytes) -> str:
    """MSH-12 of the first message of a batch frame, or "" when there is none readable."""
    for match in _SEGMENT.finditer(frame):
        if frame.startswith(b"MSH", match.start()):
            parsed = parse_header(frame[match.start() : match.end()], default_charset="latin-1")
            header = parsed.header if isinstance(parsed, HeaderProblem) else parsed
            return header.version if header is not None else ""
    return ""


def _segment_end(frame: bytes, start: int) -> int:
    match = _SEGMENT.match(frame, start)
    return match.end() if match else start


def _name(segment: bytes) -> str:
    """A segment ID for a diagnostic: three letters or digits, or a placeholder (no PHI)."""
    text = segment.decode("latin-1")
    return text if text.isascii() and text.isalnum() else "(unreadable)"
