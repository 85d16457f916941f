"""Sans-I/O framers: split an inbound byte stream into HL7 v2 messages.

A framer takes the bytes of one connection as they arrive (``feed``) and
returns events: complete frames, complete frames that were too large, or a
fatal overflow. It does no I/O and knows nothing about Twisted, so the MLLP
and plain TCP listeners differ only in the framer they inject, and the
framers are tested on bytes alone.

Wire rules (docs/guarantees.md, "Wire facts"):

* MLLP: a frame is ``0x0B`` + message + ``0x1C 0x0D``. Only the pair FS CR
  ends a frame (a bare FS ends it too when ``lenient_fs`` is on); a bare CR
  inside is a segment separator. Bytes before a start byte are dropped and
  counted. A start byte inside an open frame discards the partial frame and
  starts a new one (a resync). MLLP release 2 commit ACK/NAK blocks
  (``0x0B 0x06 0x1C 0x0D``, ``0x0B 0x15 0x1C 0x0D``) are counted and ignored.
* Plain TCP: a message starts at ``MSH`` (or after the configured start
  bytes) and ends at the next ``MSH`` at a segment start, at the configured
  end bytes, or when the caller calls ``flush`` (end of stream or idle gap).
  Without start bytes a batch (``FHS`` or ``BHS`` ... ``BTS`` or ``FTS``) is
  one frame: ``FHS`` and ``BHS`` start a frame as ``MSH`` does, and inside a
  batch ``MSH`` does not split until its ``BTS`` (``FTS`` after an ``FHS``).

Limits: a frame larger than ``max_frame_size`` is not buffered; only its
first bytes (the head, enough to read MSH and answer NAK 104) are kept while
the framer scans on for its end. If the frame ends, an ``OversizedFrame`` is
emitted; if it grows past ``drain_limit`` first, ``FrameOverflow`` is emitted,
the framer stops, and the caller must close the connection. Memory therefore
never exceeds ``max_frame_size`` plus a few bytes per connection.

Every byte is examined a bounded number of times: searches use
``bytes.find`` on new data only, and a delimiter split across two reads is
handled by holding back the few trailing bytes that could start one, so one
byte per packet costs linear time, not quadratic.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define
from mypy_extensions import mypyc_attr
from zope.interface import classImplements

# IFramer lives in a module of its own, not compiled: mypyc cannot build a zope
# Interface class. It is re-exported here, where it always was.
from udsgateway.wire.frames import Frame, FrameEvent, FrameOverflow, OversizedFrame
from udsgateway.wire.iframer import IFramer

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEAD_SIZE",
    "MLLP_END",
    "MLLP_START",
    "Frame",
    "FrameEvent",
    "FrameOverflow",
    "FramerStats",
    "IFramer",
    "MLLPFramer",
    "OversizedFrame",
    "PlainTCPFramer",
]

DEFAULT_MAX_FRAME_SIZE = 10 * 1024 * 1024
"""Default largest accepted message, in bytes (docs/guarantees.md "Default limits")."""

HEAD_SIZE = 64 * 1024
"""How many leading bytes of an oversized frame are kept, enough to read MSH."""

MLLP_START = b"\x0b"
"""MLLP start block byte (VT)."""

MLLP_END = b"\x1c\x0d"
"""MLLP end block: FS followed by CR."""

_FS = 0x1C
_CR = 0x0D
_FS_BYTES = b"\x1c"
_COMMIT_BLOCKS = (b"\x06", b"\x15")
_MSH = b"MSH"
_FHS = b"FHS"
_BHS = b"BHS"
# What can start a plain TCP frame without start bytes, in priority order.
_STARTS = (_MSH, _FHS, _BHS)


@define
class FramerStats:
    """Counters for one framer (one connection). Counts only, never content.

    ``dropped_bytes`` counts bytes discarded without producing an event:
    bytes outside any frame and the content of partial frames thrown away by a
    resync, ``reset`` or (for MLLP) ``flush``.
    """

    dropped_bytes: int = 0
    resyncs: int = 0
    commit_acks: int = 0
    frames: int = 0
    oversized: int = 0


def _drain_limit(max_frame_size: int, drain_limit: int | None) -> int:
    """Check the size limits and resolve the default drain limit."""
    if max_frame_size < 1:
        raise ValueError(f"max_frame_size must be at least 1, not {max_frame_size}")
    if drain_limit is None:
        return 2 * max_frame_size
    if drain_limit < max_frame_size:
        raise ValueError(
            f"drain_limit ({drain_limit}) must not be below max_frame_size ({max_frame_size})"
        )
    return drain_limit


class _FrameBuffer:
    """The content of the frame being received, with the size limits applied.

    Below the maximum size every byte is kept. Past it, only the head is
    kept and the rest is counted, so memory stays bounded while the framer
    looks for the end of the frame.

    A plain class (not attrs): compiled by mypyc, its attributes are C slots.
    """

    def __init__(self, max_frame_size: int, drain_limit: int) -> None:
        self.max_frame_size = max_frame_size
        self.drain_limit = drain_limit
        self._buf = bytearray()
        self.size = 0
        self._oversized = False

    @property
    def buffered(self) -> int:
        """Bytes held in memory."""
        return len(self._buf)

    @property
    def _head_size(self) -> int:
        return min(HEAD_SIZE, self.max_frame_size)

    def add(self, chunk: bytes | memoryview) -> FrameOverflow | None:
        """Append part of the frame; return FrameOverflow past the drain limit."""
        size = self.size + len(chunk)
        if size > self.max_frame_size:
            if size > self.drain_limit:
                self.clear()
                return FrameOverflow(size)
            if not self._oversized:
                self._oversized = True
                head = self._head_size
                if len(self._buf) < head:
                    self._buf += chunk[: head - len(self._buf)]
                else:
                    del self._buf[head:]
        else:
            self._buf += chunk
        self.size = size
        return None

    def finish(self, tail: bytes | memoryview) -> FrameEvent:
        """Append the last part of the frame and return its event; start afresh."""
        size = self.size + len(tail)
        event: FrameEvent
        if size <= self.max_frame_size:
            if self._buf:
                self._buf += tail
                event = Frame(bytes(self._buf))
            else:
                event = Frame(bytes(tail))
        elif size > self.drain_limit:
            event = FrameOverflow(size)
        elif self._oversized:
            event = OversizedFrame(bytes(self._buf), size)
        else:
            head = self._head_size
            missing = max(0, head - len(self._buf))
            event = OversizedFrame(bytes(self._buf[:head]) + bytes(tail[:missing]), size)
        self.clear()
        return event

    def clear(self) -> int:
        """Discard the frame; return how many bytes of it had arrived."""
        size = self.size
        if self._buf:
            # A new object, so the memory of a large frame is released.
            self._buf = bytearray()
        self.size = 0
        self._oversized = False
        return size


def _tail_prefix_start(
    window: bytes, pos: int, patterns: tuple[bytes, ...]
) -> tuple[int, int] | None:
    """Find where a delimiter may begin in the last bytes of ``window[pos:]``.

    Returns ``(offset, index)`` of the earliest suffix that is a proper
    prefix of one of ``patterns`` (lowest index first at equal offsets),
    or None. Such bytes cannot be judged until more data arrives.
    """
    n = len(window)
    best: tuple[int, int] | None = None
    for index, pattern in enumerate(patterns):
        for length in range(min(len(pattern) - 1, n - pos), 0, -1):
            if window.endswith(pattern[:length]):
                found = (n - length, index)
                if best is None or found < best:
                    best = found
                break
    return best


def _first_of(window: bytes, pos: int, markers: tuple[bytes, ...]) -> tuple[int, bytes]:
    """The earliest of ``markers`` in ``window`` from ``pos``: (offset, marker), or (-1, b"").

    Once one is found, the others are searched only before it, so the window
    is scanned about once.
    """
    best, found = -1, b""
    for marker in markers:
        end = best + len(marker) - 1 if best >= 0 else len(window)
        at = window.find(marker, pos, end)
        if at >= 0:
            best, found = at, marker
    return best, found


def _earliest(
    window: bytes, pos: int, patterns: tuple[bytes, ...], upcoming: list[int], first: int
) -> tuple[int, int]:
    """The earliest of ``patterns[first:]`` at or after ``pos``: (offset, index), or (-1, 0).

    ``upcoming`` caches each pattern's next offset as in ``PlainTCPFramer._scan``.
    """
    best, which = -1, 0
    for index in range(first, len(patterns)):
        at = upcoming[index]
        if at == -2 or 0 <= at < pos:
            at = upcoming[index] = window.find(patterns[index], pos)
        if at >= 0 and (best < 0 or at < best):
            best, which = at, index
    return best, which


def _resync(
    frame: _FrameBuffer,
    stats: FramerStats,
    tail: memoryview,
    events: list[FrameEvent],
    record: Callable[[FrameEvent, list[FrameEvent]], None],
) -> bool:
    """Drop the partial frame ending with ``tail`` because a new one starts.

    A partial that had already grown past the drain limit is still an
    overflow, whatever follows it, so the outcome does not depend on how the
    stream was cut. Returns True in that case.
    """
    overflow = frame.add(tail)
    if overflow is not None:
        record(overflow, events)
        return True
    stats.resyncs += 1
    stats.dropped_bytes += frame.clear()
    return False


# Python code may subclass it (a test wraps feed), which a compiled class must allow.
@mypyc_attr(allow_interpreted_subclasses=True)
class MLLPFramer:
    """Frames MLLP: ``0x0B`` + message + ``0x1C 0x0D``.

    ``lenient_fs`` also accepts a bare FS as the end of a frame (a per-tenant
    switch for senders that omit the CR). ``drain_limit`` (default twice
    ``max_frame_size``) is how far an oversized frame is read, looking for
    its end so it can be answered with a NAK, before the framer gives up.
    """

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        lenient_fs: bool = False,
        drain_limit: int | None = None,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.lenient_fs = lenient_fs
        self.drain_limit = drain_limit
        self.stats = FramerStats()
        self._frame = _FrameBuffer(max_frame_size, _drain_limit(max_frame_size, drain_limit))
        self._open = False
        # Strict mode: the last chunk ended with an FS inside an open frame; it
        # is data unless the next byte is CR, so it is not counted until then.
        self._pending_fs = False
        # Lenient mode: a bare FS at the end of the last chunk ended a frame; a
        # CR that follows belongs to that end block, not to the gap.
        self._skip_cr = False
        self._stopped = False

    def __repr__(self) -> str:
        return (
            f"MLLPFramer(max_frame_size={self.max_frame_size!r}, "
            f"lenient_fs={self.lenient_fs!r}, drain_limit={self.drain_limit!r})"
        )

    @property
    def frame_open(self) -> bool:
        """True while a partial frame is pending (a start byte was seen)."""
        return self._open

    @property
    def buffered_bytes(self) -> int:
        """How many bytes the framer currently holds in memory."""
        return self._frame.buffered + self._pending_fs

    def feed(self, data: bytes) -> list[FrameEvent]:
        """Take the next bytes of the stream; return the events they complete, in order."""
        if self._stopped or not data:
            return []
        events: list[FrameEvent] = []
        view = memoryview(data)
        n = len(data)
        pos = 0
        if self._skip_cr:
            self._skip_cr = False
            if data[0] == _CR:
                pos = 1
        elif self._pending_fs:
            self._pending_fs = False
            if data[0] == _CR:
                self._open = False
                self._record(self._frame.finish(b""), events)
                pos = 1
            else:
                overflow = self._frame.add(_FS_BYTES)
                if overflow is not None:
                    self._record(overflow, events)
                    return events
        end_block = _FS_BYTES if self.lenient_fs else MLLP_END
        while pos < n:
            if not self._open:
                start = data.find(MLLP_START, pos)
                if start < 0:
                    self.stats.dropped_bytes += n - pos
                    break
                self.stats.dropped_bytes += start - pos
                self._open = True
                pos = start + 1
                continue
            end = data.find(end_block, pos)
            restart = data.find(MLLP_START, pos, n if end < 0 else end)
            if restart >= 0:
                if _resync(self._frame, self.stats, view[pos:restart], events, self._record):
                    break
                pos = restart + 1
                continue
            if end >= 0:
                self._open = False
                self._record(self._frame.finish(view[pos:end]), events)
                if self._stopped:
                    break
                pos = end + len(end_block)
                if self.lenient_fs:
                    if pos == n:
                        self._skip_cr = True
                    elif data[pos] == _CR:
                        pos += 1
                continue
            stop = n
            if not self.lenient_fs and data[n - 1] == _FS:
                stop = n - 1
                self._pending_fs = True
            overflow = self._frame.add(view[pos:stop])
            if overflow is not None:
                self._record(overflow, events)
            break
        return events

    def flush(self) -> list[FrameEvent]:
        """End of stream or idle gap: discard any partial frame (it never ended)."""
        self.reset()
        return []

    def reset(self) -> None:
        """Discard any partial frame (after a frame timeout); wait for a start byte."""
        self.stats.dropped_bytes += self._frame.clear() + self._pending_fs
        self._open = False
        self._pending_fs = False
        self._skip_cr = False

    def encode(self, payload: bytes) -> bytes:
        """Wrap an outgoing message in an MLLP block."""
        return MLLP_START + payload + MLLP_END

    def _record(self, event: FrameEvent, events: list[FrameEvent]) -> None:
        if isinstance(event, Frame):
            if event.payload in _COMMIT_BLOCKS:
                self.stats.commit_acks += 1
                return
            self.stats.frames += 1
        elif isinstance(event, OversizedFrame):
            self.stats.oversized += 1
        else:
            self._stopped = True
            self._open = False
            self._pending_fs = False
        events.append(event)


# What a delimiter found inside an open plain TCP message does.
_END = 0  # end bytes: the message ends before them
_SPLIT = 1  # CR/LF + MSH: the message ends after the separator, the next starts at MSH
_RESTART = 2  # start bytes: a new message starts after them
_TRAILER = 3  # CR/LF + BTS or FTS: may close the open batch, does not split

# The batch state of an open plain TCP frame (no start bytes).
_MESSAGE = ""  # a single message (or a batch already closed by its BTS/FTS)
_BATCH_SPLITS = frozenset({b"\r" + _FHS, b"\n" + _FHS, b"\r" + _BHS, b"\n" + _BHS})
_BATCH_NAMES = frozenset({_FHS, _BHS, b"BTS", b"FTS"})


# Python code may subclass it (a test wraps feed), which a compiled class must allow.
@mypyc_attr(allow_interpreted_subclasses=True)
class PlainTCPFramer:
    """Frames HL7 sent over TCP without MLLP.

    With no ``start_bytes`` a message starts at ``MSH`` and ends at the next
    ``MSH`` at a segment start (right after a CR or LF), at ``end_bytes`` if
    configured, or at ``flush``. A batch starts at ``FHS`` or ``BHS`` and is
    one frame: ``MSH`` (and ``BHS`` after an ``FHS``) does not split it before
    its ``BTS`` (its ``FTS`` after an ``FHS``); the frame then ends at the
    next ``MSH``, ``FHS`` or ``BHS`` at a segment start, like a message.
    With ``start_bytes`` a message starts after them, and ``MSH`` does not
    split messages; start bytes inside an open message end it when there are
    no ``end_bytes``, and discard it (a resync, as in MLLP) when there are.
    Start and end bytes are not part of the payload; everything else is kept
    exactly as received.
    """

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        start_bytes: bytes = b"",
        end_bytes: bytes = b"",
        drain_limit: int | None = None,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.start_bytes = start_bytes
        self.end_bytes = end_bytes
        self.drain_limit = drain_limit
        self.stats = FramerStats()
        self._open = False
        # Trailing bytes of the last chunk that may begin a delimiter; they are
        # judged together with the next chunk.
        self._held = b""
        self._stopped = False
        # "FHS" or "BHS" while the open frame is a batch not yet closed, else "".
        self._batch = _MESSAGE
        self._frame = _FrameBuffer(max_frame_size, _drain_limit(max_frame_size, drain_limit))
        # Priority order: at equal offsets the first listed delimiter wins.
        found: list[tuple[bytes, int]] = []
        if self.end_bytes:
            found.append((self.end_bytes, _END))
        if self.start_bytes:
            found.append((self.start_bytes, _RESTART))
        else:
            found += [(b"\r" + _MSH, _SPLIT), (b"\n" + _MSH, _SPLIT)]
        # Patterns from this index on are the batch delimiters (see _scan).
        self._base = len(found)
        if not self.start_bytes:
            found += [(pattern, _SPLIT) for pattern in sorted(_BATCH_SPLITS)]
            found += [
                (sep + name, _TRAILER) for name in (b"BTS", b"FTS") for sep in (b"\r", b"\n")
            ]
        self._patterns = tuple(pattern for pattern, _ in found)
        self._kinds = tuple(kind for _, kind in found)
        # The segment each CR/LF + name pattern announces ("" for MSH and the rest).
        self._opens = tuple(
            pattern[1:].decode("ascii") if pattern[1:] in _BATCH_NAMES else _MESSAGE
            for pattern in self._patterns
        )
        self._longest = max(len(pattern) for pattern in self._patterns)
        # Bytes that can occur in a delimiter before its last byte: a chunk that
        # ends with any other byte cannot end with the start of a delimiter.
        self._prefix_bytes = frozenset(b"".join(pattern[:-1] for pattern in self._patterns))

    def __repr__(self) -> str:
        return (
            f"PlainTCPFramer(max_frame_size={self.max_frame_size!r}, "
            f"start_bytes={self.start_bytes!r}, end_bytes={self.end_bytes!r}, "
            f"drain_limit={self.drain_limit!r})"
        )

    @property
    def frame_open(self) -> bool:
        """True while a message has started and not yet been emitted."""
        return self._open

    @property
    def buffered_bytes(self) -> int:
        """How many bytes the framer currently holds in memory."""
        return self._frame.buffered + len(self._held)

    def feed(self, data: bytes) -> list[FrameEvent]:
        """Take the next bytes of the stream; return the messages they complete, in order."""
        if self._stopped or not data:
            return []
        if self._held:
            data = self._held + data
            self._held = b""
        return self._scan(data, final=False)

    def flush(self) -> list[FrameEvent]:
        """End of stream or idle gap: emit the pending message, if any."""
        if self._stopped:
            return []
        held = self._held
        self._held = b""
        events = self._scan(held, final=True)
        if self._open and not self._stopped:
            self._open = False
            self._record(self._frame.finish(b""), events)
        return events

    def reset(self) -> None:
        """Discard any partial message; wait for the next start."""
        self.stats.dropped_bytes += self._frame.clear() + len(self._held)
        self._held = b""
        self._open = False
        self._batch = _MESSAGE

    def encode(self, payload: bytes) -> bytes:
        """Wrap an outgoing message in the configured start and end bytes (often none)."""
        return self.start_bytes + payload + self.end_bytes

    def _scan(self, window: bytes, final: bool) -> list[FrameEvent]:
        """Process ``window``; unless ``final``, hold back a possible delimiter start."""
        events: list[FrameEvent] = []
        view = memoryview(window)
        n = len(window)
        pos = 0
        patterns = self._patterns
        markers = (self.start_bytes,) if self.start_bytes else _STARTS
        include_marker = not self.start_bytes
        # Next offset of each delimiter at or after pos (-1: none left, -2: not
        # searched yet), so many messages in one chunk cost one pass each.
        upcoming = [-2] * len(patterns)
        base = self._base
        rare = (-2, 0)
        while pos < n:
            if not self._open:
                start, marker = _first_of(window, pos, markers)
                if start < 0:
                    partial = None if final else _tail_prefix_start(window, pos, markers)
                    cut = partial[0] if partial else n
                    self.stats.dropped_bytes += cut - pos
                    self._held = window[cut:]
                    break
                self.stats.dropped_bytes += start - pos
                self._open = True
                self._batch = marker.decode("ascii") if marker in (_FHS, _BHS) else _MESSAGE
                pos = start if include_marker else start + len(marker)
                continue
            best = -1
            which = 0
            for index in range(base):
                at = upcoming[index]
                if at == -2 or 0 <= at < pos:
                    at = upcoming[index] = window.find(patterns[index], pos)
                if at >= 0 and (best < 0 or at < best):
                    best, which = at, index
            if base < len(patterns):
                # The batch delimiters are rare: their earliest is kept apart, so a
                # stream of single messages does not pay a loop over them per message.
                if rare[0] == -2 or 0 <= rare[0] < pos:
                    rare = _earliest(window, pos, patterns, upcoming, base)
                if rare[0] >= 0 and (best < 0 or rare[0] < best):
                    best, which = rare
            partial = None
            if (
                not final
                and (best < 0 or best > n - self._longest)
                and window[-1] in self._prefix_bytes
            ):
                # A delimiter may be starting in the last bytes; if it would
                # come first, wait for the rest of it.
                partial = _tail_prefix_start(window, pos, patterns)
            if best >= 0 and (partial is None or (best, which) < partial):
                pos = self._on_delimiter(view, pos, best, which, events)
                if self._stopped:
                    break
                continue
            hold = partial[0] if partial else n
            overflow = self._frame.add(view[pos:hold])
            if overflow is not None:
                self._record(overflow, events)
                break
            self._held = window[hold:]
            break
        return events

    def _on_delimiter(
        self,
        view: memoryview,
        pos: int,
        at: int,
        index: int,
        events: list[FrameEvent],
    ) -> int:
        """Act on delimiter ``index`` found at ``at``; return where scanning resumes."""
        kind = self._kinds[index]
        after = at + len(self._patterns[index])
        if kind == _END:
            self._open = False
            self._record(self._frame.finish(view[pos:at]), events)
            return after
        if kind == _SPLIT and (not self._batch or self._splits(index)):
            # The separator belongs to this message; the next one starts at MSH (FHS, BHS).
            self._record(self._frame.finish(view[pos : at + 1]), events)
            self._batch = self._opens[index]
            return at + 1
        if kind in (_SPLIT, _TRAILER):
            # Inside the frame: a batch's own message, or its BTS/FTS, which may close it.
            if (self._batch, self._opens[index]) in (("BHS", "BTS"), ("FHS", "FTS")):
                self._batch = _MESSAGE
            overflow = self._frame.add(view[pos:after])
            if overflow is not None:
                self._record(overflow, events)
            return after
        if self.end_bytes:
            _resync(self._frame, self.stats, view[pos:at], events, self._record)
        else:
            self._record(self._frame.finish(view[pos:at]), events)
        return after

    def _splits(self, index: int) -> bool:
        """Whether CR/LF + FHS or BHS (pattern ``index``) ends the open batch.

        MSH never does; an FHS file holds several batches, so BHS does not end
        it; a BHS batch without its BTS ends at the next FHS or BHS.
        """
        name = self._opens[index]
        return name == "FHS" or (name == "BHS" and self._batch == "BHS")

    def _record(self, event: FrameEvent, events: list[FrameEvent]) -> None:
        if isinstance(event, Frame):
            self.stats.frames += 1
        elif isinstance(event, OversizedFrame):
            self.stats.oversized += 1
        else:
            self._stopped = True
            self._open = False
            self._held = b""
        events.append(event)


# Declared here rather than with @implementer: a decorator other than mypyc's own would
# keep the compiled framers from being native classes.
classImplements(MLLPFramer, IFramer)
classImplements(PlainTCPFramer, IFramer)
