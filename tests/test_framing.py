"""Tests for udsgateway.wire.framing: MLLP and plain TCP framers, bytes in, events out."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from udsgateway.testing import mllp
from udsgateway.wire.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    HEAD_SIZE,
    Frame,
    FrameEvent,
    FrameOverflow,
    FramerStats,
    IFramer,
    MLLPFramer,
    OversizedFrame,
    PlainTCPFramer,
)

ADT_A04 = (
    b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|202401011230||ADT^A04|MSG00001|P|2.3\r"
    b"EVN|A04|202401011230\r"
    b"PID|1||12345^^^Hospital||Doe^John||19800101|M\r"
)
ORU_R01 = (
    b"MSH|^~\\&|LAB|Hospital|LSQ|LeadSquared|202401011231||ORU^R01|MSG00002|P|2.5.1\r"
    b"PID|1||67890^^^Hospital||Roe^Jane||19750505|F\r"
    b"OBR|1|ORD123|FIL456|CBC^Complete blood count\r"
    b"OBX|1|NM|WBC^White cells||7.2|10*9/L|4.0-11.0|N|||F\r"
)
ADT_A08_LF = (
    b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|202401011232||ADT^A08|MSG00003|P|2.3\n"
    b"EVN|A08|202401011232\n"
    b"PID|1||12345^^^Hospital||Doe^John||19800101|M\n"
)
ADT_A01_CRLF = (
    b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|202401011233||ADT^A01|MSG00004|P|2.3\r\n"
    b"EVN|A01|202401011233\r\n"
    b"PID|1||12345^^^Hospital||Doe^John||19800101|M\r\n"
    b"PV1|1|I|W^389^1\r\n"
)
# "MSH" appears inside field values, never right after a segment separator.
ORU_MSH_IN_FIELDS = (
    b"MSH|^~\\&|LAB|Hospital|LSQ|LeadSquared|202401011234||ORU^R01|MSG00005|P|2.5.1\r"
    b"PID|1||67890^^^Hospital||Roe^Jane||19750505|F\r"
    b"OBX|1|TX|NOTE^Note||MSH|^~\\&|copied header||||F\r"
    b"NTE|1||MSHA result pending\r"
)
MSH_SEGMENT = ADT_A04.split(b"\r", 1)[0]


def run(framer: MLLPFramer | PlainTCPFramer, chunks: Iterable[bytes]) -> list[FrameEvent]:
    """Feed every chunk, then flush (end of stream); return all events in order."""
    events: list[FrameEvent] = []
    for chunk in chunks:
        events += framer.feed(chunk)
    events += framer.flush()
    return events


class SplitChecks(SynchronousTestCase):
    """Shared assertion: chunk boundaries never change what a framer produces."""

    def assertSplitInvariant(
        self,
        make: Callable[[], MLLPFramer | PlainTCPFramer],
        stream: bytes,
        expected: list[FrameEvent],
    ) -> FramerStats:
        """Check ``stream`` gives ``expected`` and the same stats however it is cut;
        return those stats."""
        whole = make()
        self.assertEqual(run(whole, [stream]), expected)
        for offset in range(len(stream) + 1):
            framer = make()
            events = run(framer, [stream[:offset], stream[offset:]])
            self.assertEqual(events, expected, f"split at offset {offset}")
            self.assertEqual(framer.stats, whole.stats, f"split at offset {offset}")
        framer = make()
        self.assertEqual(run(framer, [stream[i : i + 1] for i in range(len(stream))]), expected)
        self.assertEqual(framer.stats, whole.stats)
        return whole.stats


class MLLPFramerTests(SplitChecks):
    """MLLPFramer: 0x0B + message + FS CR, with resync, limits and commit blocks."""

    def test_provides_interface(self) -> None:
        """MLLPFramer fully implements IFramer."""
        self.assertTrue(verifyObject(IFramer, MLLPFramer()))

    def test_single_frame(self) -> None:
        """One block yields one Frame holding exactly the bytes between the delimiters."""
        framer = MLLPFramer()
        self.assertEqual(framer.feed(mllp(ADT_A04)), [Frame(ADT_A04)])
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.stats, FramerStats(frames=1))
        self.assertEqual(framer.buffered_bytes, 0)

    def test_several_frames_in_one_chunk(self) -> None:
        """Three blocks in one write yield three Frames, in order."""
        framer = MLLPFramer()
        events = framer.feed(mllp(ADT_A04) + mllp(ORU_R01) + mllp(ADT_A08_LF))
        self.assertEqual(events, [Frame(ADT_A04), Frame(ORU_R01), Frame(ADT_A08_LF)])
        self.assertEqual(framer.stats.frames, 3)

    def test_every_split_plain_stream(self) -> None:
        """Two frames give the same Frames cut at any offset or fed one byte at a time."""
        self.assertSplitInvariant(
            MLLPFramer,
            mllp(ADT_A04) + mllp(ORU_R01),
            [Frame(ADT_A04), Frame(ORU_R01)],
        )

    def test_every_split_busy_stream(self) -> None:
        """Junk, commit blocks, a resync, bare FS and CR, FS FS CR and an empty frame give
        the same frames and counters wherever the stream is cut."""
        stream = (
            b"\x00\r\n"
            + b"\x0b\x06\x1c\r"
            + mllp(ADT_A04)
            + b"\x0b"
            + ORU_R01[:50]
            + mllp(ORU_R01)
            + mllp(b"MSH|a\x1cb\rEVN|\x1c")
            + b"\r\n"
            + mllp(b"")
            + b"\x0b\x15\x1c\r"
            + b"junk"
        )
        stats = self.assertSplitInvariant(
            MLLPFramer,
            stream,
            [Frame(ADT_A04), Frame(ORU_R01), Frame(b"MSH|a\x1cb\rEVN|\x1c"), Frame(b"")],
        )
        self.assertEqual(
            stats, FramerStats(dropped_bytes=3 + 50 + 2 + 4, resyncs=1, commit_acks=2, frames=4)
        )

    def test_one_byte_per_packet_large_message(self) -> None:
        """A 256 KiB message arriving one byte per packet is reassembled into one Frame."""
        body = ADT_A04 + b"OBX|1|ED|PDF||" + b"A" * (256 * 1024) + b"\r"
        framer = MLLPFramer()
        events: list[FrameEvent] = []
        for byte in mllp(body):
            events += framer.feed(bytes((byte,)))
        self.assertEqual(events, [Frame(body)])

    def test_junk_before_start(self) -> None:
        """Junk, NULs and blank lines before a start byte are dropped and counted; the
        frame after them is emitted."""
        junk = b"\x00\x00\x00\r\n\r\n\n  GET / HTTP/1.0\r\n"
        framer = MLLPFramer()
        self.assertEqual(framer.feed(junk + mllp(ADT_A04)), [Frame(ADT_A04)])
        self.assertEqual(framer.stats.dropped_bytes, len(junk))

    def test_unframed_hl7_dropped(self) -> None:
        """HL7 without MLLP framing yields nothing; every byte is counted as dropped and
        no frame is open (so only the idle timeout applies)."""
        framer = MLLPFramer()
        self.assertEqual(framer.feed(ADT_A04), [])
        self.assertEqual(framer.feed(ORU_R01), [])
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.flush(), [])
        self.assertEqual(framer.stats, FramerStats(dropped_bytes=len(ADT_A04) + len(ORU_R01)))
        self.assertEqual(framer.buffered_bytes, 0)

    def test_fs_without_cr_is_data_when_strict(self) -> None:
        """Strict mode: a bare FS is message data and the frame stays open until FS CR."""
        framer = MLLPFramer()
        self.assertEqual(framer.feed(b"\x0b" + ADT_A04 + b"\x1c"), [])
        self.assertTrue(framer.frame_open)
        self.assertEqual(framer.feed(b"EVN|A04\x1c\r"), [Frame(ADT_A04 + b"\x1cEVN|A04")])

    def test_fs_without_cr_ends_frame_when_lenient(self) -> None:
        """Lenient mode: a bare FS ends the frame at once, and a CR that follows in the
        next chunk is taken as part of the end block, not junk."""
        framer = MLLPFramer(lenient_fs=True)
        self.assertEqual(framer.feed(b"\x0b" + ADT_A04 + b"\x1c"), [Frame(ADT_A04)])
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.feed(b"\r" + mllp(ORU_R01)), [Frame(ORU_R01)])
        self.assertEqual(framer.stats, FramerStats(frames=2))

    def test_every_split_lenient(self) -> None:
        """Lenient mode gives the same frames and counters for bare FS and FS CR endings
        wherever the stream is cut."""
        stream = b"\x0b" + ADT_A04 + b"\x1c" + mllp(ORU_R01) + b"\x0b" + ADT_A08_LF + b"\x1c\r\r"
        self.assertSplitInvariant(
            lambda: MLLPFramer(lenient_fs=True),
            stream,
            [Frame(ADT_A04), Frame(ORU_R01), Frame(ADT_A08_LF)],
        )

    def test_resync_on_new_start_byte(self) -> None:
        """A start byte inside an open frame discards the partial frame (counted as a
        resync and as dropped bytes) and the next good frame is emitted."""
        partial = ORU_R01[:60]
        framer = MLLPFramer()
        self.assertEqual(framer.feed(b"\x0b" + partial), [])
        self.assertEqual(framer.feed(mllp(ADT_A04)), [Frame(ADT_A04)])
        self.assertEqual(framer.stats, FramerStats(dropped_bytes=60, resyncs=1, frames=1))

    def test_commit_acks_ignored(self) -> None:
        """MLLP release 2 commit ACK and NAK blocks are counted, never emitted."""
        framer = MLLPFramer()
        events = framer.feed(b"\x0b\x06\x1c\r" + mllp(ADT_A04) + b"\x0b\x15\x1c\r")
        self.assertEqual(events, [Frame(ADT_A04)])
        self.assertEqual(framer.stats, FramerStats(commit_acks=2, frames=1))

    def test_empty_frame_emitted(self) -> None:
        """An empty block is emitted as Frame(b"") so the caller can NAK or close."""
        self.assertEqual(MLLPFramer().feed(b"\x0b\x1c\r"), [Frame(b"")])

    def test_frame_exactly_at_max_accepted(self) -> None:
        """A frame exactly max_frame_size long is a Frame, however it is cut (including
        between FS and CR)."""
        self.assertSplitInvariant(
            lambda: MLLPFramer(max_frame_size=len(ADT_A04)),
            mllp(ADT_A04) + mllp(ADT_A04),
            [Frame(ADT_A04), Frame(ADT_A04)],
        )

    def test_one_byte_over_max(self) -> None:
        """A complete frame one byte over the maximum is an OversizedFrame with its full
        size, however it is cut; the next frame is unaffected."""
        limit = len(ADT_A04) - 1
        self.assertSplitInvariant(
            lambda: MLLPFramer(max_frame_size=limit, drain_limit=10 * limit),
            mllp(ADT_A04) + mllp(ORU_R01[:limit]),
            [OversizedFrame(ADT_A04[:limit], len(ADT_A04)), Frame(ORU_R01[:limit])],
        )

    def test_oversized_frame_head_has_msh(self) -> None:
        """A complete frame over the maximum yields OversizedFrame whose head (64 KiB)
        starts with the MSH segment and whose size is the full message size; the
        frame is never buffered whole."""
        body = ADT_A04 + b"OBX|1|ED|PDF^Report||" + b"Q" * (300 * 1024) + b"\r"
        framer = MLLPFramer(max_frame_size=200 * 1024)
        wire = mllp(body)
        events: list[FrameEvent] = []
        peak = 0
        for start in range(0, len(wire), 4096):
            events += framer.feed(wire[start : start + 4096])
            peak = max(peak, framer.buffered_bytes)
        self.assertEqual(len(events), 1)
        event = events[0]
        assert isinstance(event, OversizedFrame)
        self.assertTrue(event.head.startswith(MSH_SEGMENT + b"\r"))
        self.assertEqual(event.head, body[:HEAD_SIZE])
        self.assertEqual(event.size, len(body))
        self.assertLessEqual(peak, 200 * 1024)
        self.assertEqual(framer.stats.oversized, 1)
        self.assertEqual(framer.feed(mllp(ADT_A04)), [Frame(ADT_A04)])

    def test_oversized_in_one_chunk(self) -> None:
        """A complete oversized frame arriving in a single chunk gives the same event."""
        body = ADT_A04 + b"Z" * 500
        framer = MLLPFramer(max_frame_size=300, drain_limit=1000)
        self.assertEqual(
            framer.feed(mllp(body) + mllp(ADT_A04)),
            [OversizedFrame(body[:300], len(body)), Frame(ADT_A04)],
        )

    def test_never_ending_frame_overflows_with_flat_memory(self) -> None:
        """A frame that never ends yields one FrameOverflow once past the drain limit
        (default twice the max), buffering never exceeds max_frame_size, and later
        input is ignored."""
        framer = MLLPFramer()
        chunk = b"OBX|1|ED|PDF||" + b"B" * (64 * 1024 - 15) + b"\r"
        events = framer.feed(b"\x0b" + ADT_A04)
        sent = len(ADT_A04)
        for _ in range(1000):
            events = framer.feed(chunk)
            sent += len(chunk)
            self.assertLessEqual(framer.buffered_bytes, DEFAULT_MAX_FRAME_SIZE)
            if events:
                break
        self.assertEqual(events, [FrameOverflow(sent)])
        self.assertGreater(sent, 2 * DEFAULT_MAX_FRAME_SIZE)
        self.assertLessEqual(sent, 2 * DEFAULT_MAX_FRAME_SIZE + len(chunk))
        self.assertEqual(framer.buffered_bytes, 0)
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.feed(mllp(ADT_A04)), [])
        self.assertEqual(framer.flush(), [])

    def test_buffer_shrinks_to_head_past_max(self) -> None:
        """Once a frame passes max_frame_size only the head stays buffered."""
        framer = MLLPFramer(max_frame_size=100 * 1024)
        framer.feed(b"\x0b" + ADT_A04 + b"C" * (100 * 1024))
        self.assertEqual(framer.buffered_bytes, HEAD_SIZE)
        self.assertTrue(framer.frame_open)

    def test_complete_frame_past_drain_limit(self) -> None:
        """A complete frame larger than the drain limit is a FrameOverflow, not an
        OversizedFrame, even when it arrives in one chunk."""
        body = ADT_A04 + b"D" * 1000
        framer = MLLPFramer(max_frame_size=200, drain_limit=400)
        self.assertEqual(framer.feed(mllp(body) + mllp(ADT_A04)), [FrameOverflow(len(body))])

    def test_partial_past_drain_limit_then_start_byte(self) -> None:
        """A partial frame that grew past the drain limit is an overflow even when a new
        start byte follows it in the same chunk, as it would be had it come alone."""
        framer = MLLPFramer(max_frame_size=100, drain_limit=200)
        events = framer.feed(b"\x0b" + ADT_A04 + b"G" * 200 + mllp(ADT_A04))
        self.assertEqual(events, [FrameOverflow(len(ADT_A04) + 200)])

    def test_fs_that_is_data_crosses_drain_limit(self) -> None:
        """An FS held back at the end of a chunk counts towards the limits once the next
        byte shows it is data."""
        framer = MLLPFramer(max_frame_size=10, drain_limit=10)
        self.assertEqual(framer.feed(b"\x0b" + b"H" * 10 + b"\x1c"), [])
        self.assertEqual(framer.feed(b"\x1c\r"), [FrameOverflow(11)])

    def test_frame_open_transitions(self) -> None:
        """frame_open is False between frames and True from the start byte until the
        frame ends, including while an FS waits for its CR."""
        framer = MLLPFramer()
        self.assertFalse(framer.frame_open)
        framer.feed(b"\r\n")
        self.assertFalse(framer.frame_open)
        framer.feed(b"\x0b")
        self.assertTrue(framer.frame_open)
        framer.feed(ADT_A04)
        self.assertTrue(framer.frame_open)
        framer.feed(b"\x1c")
        self.assertTrue(framer.frame_open)
        self.assertEqual(framer.feed(b"\r"), [Frame(ADT_A04)])
        self.assertFalse(framer.frame_open)

    def test_reset_discards_partial(self) -> None:
        """reset() drops the partial frame (counted), closes it, and the tail of the
        abandoned frame is then junk while a new frame works."""
        framer = MLLPFramer()
        framer.feed(b"\x0b" + ADT_A04[:30])
        framer.reset()
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.buffered_bytes, 0)
        tail = ADT_A04[30:] + b"\x1c\r"
        self.assertEqual(framer.feed(tail + mllp(ORU_R01)), [Frame(ORU_R01)])
        self.assertEqual(framer.stats, FramerStats(dropped_bytes=30 + len(tail), frames=1))

    def test_reset_drops_pending_fs(self) -> None:
        """A reset between FS and CR forgets the FS: the CR that follows ends nothing."""
        framer = MLLPFramer()
        framer.feed(b"\x0b" + ADT_A04 + b"\x1c")
        framer.reset()
        self.assertEqual(framer.feed(b"\r"), [])
        self.assertEqual(framer.stats.dropped_bytes, len(ADT_A04) + 2)

    def test_flush_discards_partial(self) -> None:
        """flush() (end of stream) discards an unfinished frame and returns nothing."""
        framer = MLLPFramer()
        framer.feed(b"\x0b" + ADT_A04)
        self.assertEqual(framer.flush(), [])
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.stats.dropped_bytes, len(ADT_A04))

    def test_encode_round_trip(self) -> None:
        """encode wraps a payload in VT ... FS CR, and a framer reads it back."""
        ack = b"MSH|^~\\&|LSQ|LeadSquared|HIS|Hospital|202401011230||ACK^A04|1|P|2.3\rMSA|AA|1\r"
        framer = MLLPFramer()
        self.assertEqual(framer.encode(ack), b"\x0b" + ack + b"\x1c\r")
        self.assertEqual(MLLPFramer().feed(framer.encode(ack)), [Frame(ack)])

    def test_empty_feed(self) -> None:
        """Feeding no bytes changes nothing, even between FS and CR."""
        framer = MLLPFramer()
        framer.feed(b"\x0b" + ADT_A04 + b"\x1c")
        self.assertEqual(framer.feed(b""), [])
        self.assertEqual(framer.feed(b"\r"), [Frame(ADT_A04)])

    def test_rejects_bad_limits(self) -> None:
        """A max size below 1 or a drain limit below the max size is refused."""
        self.assertRaises(ValueError, MLLPFramer, max_frame_size=0)
        self.assertRaises(ValueError, MLLPFramer, max_frame_size=100, drain_limit=99)


class PlainTCPFramerTests(SplitChecks):
    """PlainTCPFramer: messages from MSH (or start bytes) to the next MSH, end bytes or
    end of stream."""

    def test_provides_interface(self) -> None:
        """PlainTCPFramer fully implements IFramer."""
        self.assertTrue(verifyObject(IFramer, PlainTCPFramer()))

    def test_flush_emits_pending(self) -> None:
        """A message is held until the stream ends; flush() emits it byte-exact."""
        framer = PlainTCPFramer()
        self.assertEqual(framer.feed(ADT_A04), [])
        self.assertTrue(framer.frame_open)
        self.assertEqual(framer.flush(), [Frame(ADT_A04)])
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.flush(), [])
        self.assertEqual(framer.stats, FramerStats(frames=1))

    def test_next_msh_ends_message(self) -> None:
        """An MSH at a segment start ends the previous message; the separator stays with
        the previous message and the next one starts at MSH."""
        framer = PlainTCPFramer()
        self.assertEqual(
            framer.feed(ADT_A04 + ORU_R01 + ADT_A04), [Frame(ADT_A04), Frame(ORU_R01)]
        )
        self.assertEqual(framer.flush(), [Frame(ADT_A04)])

    def test_msh_split_across_chunks(self) -> None:
        """ "MSH" cut across feeds, and a separator cut from the MSH after it, still end
        the previous message."""
        framer = PlainTCPFramer()
        self.assertEqual(framer.feed(ADT_A04 + b"M"), [])
        self.assertEqual(framer.feed(b"S"), [])
        self.assertEqual(framer.feed(ORU_R01[2:-1]), [Frame(ADT_A04)])
        self.assertEqual(framer.feed(b"\r"), [])
        self.assertEqual(framer.feed(b"MS"), [])
        self.assertEqual(framer.feed(ADT_A04[2:]), [Frame(ORU_R01)])
        self.assertEqual(framer.flush(), [Frame(ADT_A04)])

    def test_first_msh_split_across_chunks(self) -> None:
        """The first MSH of a stream is found even when cut across feeds after junk."""
        framer = PlainTCPFramer()
        self.assertEqual(framer.feed(b"\r\nM"), [])
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.feed(b"S"), [])
        self.assertEqual(framer.feed(ADT_A04[2:]), [])
        self.assertEqual(framer.flush(), [Frame(ADT_A04)])
        self.assertEqual(framer.stats.dropped_bytes, 2)

    def test_every_split_mixed_separators(self) -> None:
        """Junk, CR, LF and CR LF separated messages give the same frames and counters
        cut at any offset or fed one byte at a time."""
        stream = b"\x00\r\nMS" + ADT_A04 + ADT_A08_LF + ADT_A01_CRLF + ORU_MSH_IN_FIELDS
        self.assertSplitInvariant(
            PlainTCPFramer,
            stream,
            [Frame(ADT_A04), Frame(ADT_A08_LF), Frame(ADT_A01_CRLF), Frame(ORU_MSH_IN_FIELDS)],
        )

    def test_every_split_batches(self) -> None:
        """A message, an FHS file of two batches, a BHS batch (LF) and a message: four
        frames, each batch whole, cut at any offset or fed one byte at a time."""
        fhs_file = (
            b"FHS|^~\\&|A|B\rBHS|^~\\&|A|B\r"
            + ADT_A04
            + ORU_R01
            + b"BTS|2\rBHS|^~\\&\r"
            + ADT_A04
            + b"BTS|1\rFTS|2\r"
        )
        bhs_batch = b"BHS|^~\\&|A|B\n" + ADT_A08_LF + ADT_A08_LF + b"BTS|2\n"
        self.assertSplitInvariant(
            PlainTCPFramer,
            ORU_R01 + fhs_file + bhs_batch + ADT_A04,
            [Frame(ORU_R01), Frame(fhs_file), Frame(bhs_batch), Frame(ADT_A04)],
        )

    def test_batch_starts_the_stream(self) -> None:
        """A stream that starts with BHS: the batch is one frame, nothing is dropped."""
        batch = b"BHS|^~\\&\r" + ADT_A04 + ORU_R01 + b"BTS|2\r"
        framer = PlainTCPFramer()
        self.assertEqual(run(framer, [batch]), [Frame(batch)])
        self.assertEqual(framer.stats, FramerStats(frames=1))

    def test_bhs_batch_without_bts_ends_at_the_next_bhs(self) -> None:
        """A BHS batch without BTS ends at the next BHS, an empty batch is a frame too."""
        first = b"BHS|^~\\&\r" + ADT_A04
        empty = b"BHS|^~\\&\rBTS|0\r"
        self.assertEqual(run(PlainTCPFramer(), [first + empty]), [Frame(first), Frame(empty)])

    def test_start_bytes_frame_holds_a_batch(self) -> None:
        """With start and end bytes the batch is what they enclose: BHS does not split."""
        batch = b"BHS|^~\\&\r" + ADT_A04 + b"BTS|1\r"
        framer = PlainTCPFramer(start_bytes=b"\x0b", end_bytes=b"\x1c\r")
        self.assertEqual(run(framer, [b"\x0b" + batch + b"\x1c\r"]), [Frame(batch)])

    def test_lf_and_crlf_separators(self) -> None:
        """LF and CR LF separated messages are split at MSH and kept byte-exact."""
        framer = PlainTCPFramer()
        events = run(framer, [ADT_A08_LF + ADT_A01_CRLF + ADT_A08_LF])
        self.assertEqual(events, [Frame(ADT_A08_LF), Frame(ADT_A01_CRLF), Frame(ADT_A08_LF)])

    def test_msh_inside_field_does_not_split(self) -> None:
        """ "MSH" inside a field value, not right after a separator, is data."""
        framer = PlainTCPFramer()
        self.assertEqual(run(framer, [ORU_MSH_IN_FIELDS]), [Frame(ORU_MSH_IN_FIELDS)])

    def test_junk_before_msh(self) -> None:
        """Bytes before the first MSH are dropped and counted."""
        junk = b"\x00\x00\r\n\r\nhello "
        framer = PlainTCPFramer()
        self.assertEqual(run(framer, [junk + ADT_A04]), [Frame(ADT_A04)])
        self.assertEqual(framer.stats.dropped_bytes, len(junk))

    def test_only_junk(self) -> None:
        """A stream without MSH (an HTTP probe) yields nothing and opens no frame."""
        framer = PlainTCPFramer()
        request = b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\nMS"
        self.assertEqual(framer.feed(request), [])
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.flush(), [])
        self.assertEqual(framer.stats, FramerStats(dropped_bytes=len(request)))

    def test_end_bytes(self) -> None:
        """With end bytes a message ends at them at once; they are not in the payload and
        bytes between the end bytes and the next MSH are dropped."""
        framer = PlainTCPFramer(end_bytes=b"\x1c\r")
        events = framer.feed(ADT_A04 + b"\x1c\r\n" + ORU_R01 + b"\x1c\r")
        self.assertEqual(events, [Frame(ADT_A04), Frame(ORU_R01)])
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.stats, FramerStats(dropped_bytes=1, frames=2))

    def test_end_bytes_split_across_chunks(self) -> None:
        """End bytes cut across feeds still end the message, and not before they are
        complete."""
        framer = PlainTCPFramer(end_bytes=b"\x1c\r")
        self.assertEqual(framer.feed(ADT_A04 + b"\x1c"), [])
        self.assertTrue(framer.frame_open)
        self.assertEqual(framer.feed(b"\r"), [Frame(ADT_A04)])

    def test_every_split_end_bytes(self) -> None:
        """With end bytes, frames and counters do not depend on where the stream is cut,
        including an FS that is data and an MSH split before the end bytes."""
        note = b"NTE|1||a\x1cb"
        stream = (
            ADT_A04 + b"\x1c\r\r\n" + ORU_R01 + note + b"\x1c\r" + ADT_A04 + ORU_R01 + b"\x1c\r"
        )
        stats = self.assertSplitInvariant(
            lambda: PlainTCPFramer(end_bytes=b"\x1c\r"),
            stream,
            [Frame(ADT_A04), Frame(ORU_R01 + note), Frame(ADT_A04), Frame(ORU_R01)],
        )
        self.assertEqual(stats, FramerStats(dropped_bytes=2, frames=4))

    def test_end_bytes_overlapping_separator(self) -> None:
        """End bytes that are a bare CR win over a following MSH: the CR is not part of
        the payload, whatever the cut."""
        stream = b"MSH|1\rPID|1\rMSH|2\rPID|2\r"
        self.assertSplitInvariant(
            lambda: PlainTCPFramer(end_bytes=b"\r"),
            stream,
            [Frame(b"MSH|1"), Frame(b"MSH|2")],
        )

    def test_start_and_end_bytes(self) -> None:
        """With start and end bytes (Mirth basic TCP) the payload is what lies between
        them, and MSH at a segment start does not split it."""
        framer = PlainTCPFramer(start_bytes=b"\x0b", end_bytes=b"\x1c\r")
        events = framer.feed(b"junk\x0b" + ADT_A04 + ORU_R01 + b"\x1c\r")
        self.assertEqual(events, [Frame(ADT_A04 + ORU_R01)])
        self.assertEqual(framer.stats.dropped_bytes, 4)

    def test_every_split_start_and_end_bytes(self) -> None:
        """Multi-byte start and end bytes work wherever they are cut, and start bytes
        inside an open message resync it."""
        stream = (
            b"\x02\x02"
            + ADT_A04
            + b"\x03\x03"
            + b"\x02\x02"
            + ORU_R01[:40]
            + b"\x02\x02"
            + ORU_R01
            + b"\x03\x03"
        )
        stats = self.assertSplitInvariant(
            lambda: PlainTCPFramer(start_bytes=b"\x02\x02", end_bytes=b"\x03\x03"),
            stream,
            [Frame(ADT_A04), Frame(ORU_R01)],
        )
        self.assertEqual(stats, FramerStats(dropped_bytes=40, resyncs=1, frames=2))

    def test_start_bytes_only(self) -> None:
        """With start bytes and no end bytes, each start ends the previous message and
        flush() emits the last one."""
        framer = PlainTCPFramer(start_bytes=b"\x0b")
        self.assertEqual(framer.feed(b"\x0b" + ADT_A04 + b"\x0b" + ORU_R01), [Frame(ADT_A04)])
        self.assertEqual(framer.flush(), [Frame(ORU_R01)])

    def test_flush_keeps_partial_end_bytes_as_data(self) -> None:
        """At end of stream, bytes that only began the end bytes are message data."""
        framer = PlainTCPFramer(end_bytes=b"\x1c\r")
        self.assertEqual(run(framer, [ADT_A04 + b"\x1c"]), [Frame(ADT_A04 + b"\x1c")])

    def test_frame_open_transitions(self) -> None:
        """frame_open is False until MSH, True while a message is pending, and False
        after flush()."""
        framer = PlainTCPFramer()
        framer.feed(b"\r\nMS")
        self.assertFalse(framer.frame_open)
        framer.feed(b"H|")
        self.assertTrue(framer.frame_open)
        framer.feed(ADT_A04[5:] + ORU_R01)
        self.assertTrue(framer.frame_open)
        framer.flush()
        self.assertFalse(framer.frame_open)

    def test_reset_discards_partial(self) -> None:
        """reset() drops the pending message (counted) and the next MSH starts afresh."""
        framer = PlainTCPFramer()
        framer.feed(ADT_A04 + b"M")
        framer.reset()
        self.assertFalse(framer.frame_open)
        self.assertEqual(framer.buffered_bytes, 0)
        self.assertEqual(run(framer, [ORU_R01]), [Frame(ORU_R01)])
        self.assertEqual(framer.stats, FramerStats(dropped_bytes=len(ADT_A04) + 1, frames=1))

    def test_exact_max_and_oversized(self) -> None:
        """A message exactly at the maximum is a Frame; one byte longer is an
        OversizedFrame with its head and full size; wherever the stream is cut."""
        limit = len(ADT_A04)
        longer = ADT_A04 + b"Z"
        self.assertSplitInvariant(
            lambda: PlainTCPFramer(max_frame_size=limit, end_bytes=b"\x1c\r"),
            ADT_A04 + b"\x1c\r" + longer + b"\x1c\r",
            [Frame(ADT_A04), OversizedFrame(longer[:limit], len(longer))],
        )

    def test_oversized_at_flush(self) -> None:
        """An oversized message completed by flush() is an OversizedFrame whose head
        starts with the MSH segment."""
        body = ADT_A04 + b"OBX|1|ED|PDF||" + b"E" * (200 * 1024) + b"\r"
        framer = PlainTCPFramer(max_frame_size=100 * 1024, drain_limit=400 * 1024)
        for start in range(0, len(body), 1000):
            self.assertEqual(framer.feed(body[start : start + 1000]), [])
        self.assertLessEqual(framer.buffered_bytes, HEAD_SIZE + 3)
        self.assertEqual(framer.flush(), [OversizedFrame(body[:HEAD_SIZE], len(body))])

    def test_never_ending_message_overflows(self) -> None:
        """A message that never ends yields FrameOverflow past the drain limit with
        buffering bounded by the max size; later input is ignored."""
        framer = PlainTCPFramer(max_frame_size=1000, drain_limit=5000)
        events = framer.feed(ADT_A04)
        for _ in range(1000):
            events = framer.feed(b"OBX|1|TX|||" + b"F" * 80 + b"\r")
            self.assertLessEqual(framer.buffered_bytes, 1000 + 3)
            if events:
                break
        self.assertEqual(len(events), 1)
        overflow = events[0]
        assert isinstance(overflow, FrameOverflow)
        self.assertGreater(overflow.size, 5000)
        self.assertEqual(framer.feed(ADT_A04 + ADT_A04), [])
        self.assertEqual(framer.flush(), [])

    def test_complete_message_past_drain_limit(self) -> None:
        """A complete message larger than the drain limit is a FrameOverflow, and the
        messages after it are ignored."""
        framer = PlainTCPFramer(max_frame_size=100, drain_limit=120, end_bytes=b"\x1c\r")
        events = framer.feed(ADT_A04 + b"\x1c\r" + ADT_A04[:100] + b"\x1c\r")
        self.assertEqual(events, [FrameOverflow(len(ADT_A04))])
        self.assertEqual(framer.flush(), [])

    def test_resynced_partial_past_drain_limit(self) -> None:
        """With start and end bytes, a partial that grew past the drain limit before new
        start bytes is an overflow, not a resync."""
        framer = PlainTCPFramer(
            max_frame_size=100, drain_limit=120, start_bytes=b"\x0b", end_bytes=b"\x1c\r"
        )
        events = framer.feed(b"\x0b" + ADT_A04 + b"\x0b" + ADT_A04[:50] + b"\x1c\r")
        self.assertEqual(events, [FrameOverflow(len(ADT_A04))])
        self.assertEqual(framer.stats.resyncs, 0)

    def test_many_messages_one_chunk(self) -> None:
        """A thousand messages in one write come out in order (one scan, no re-search)."""
        messages = [ADT_A04.replace(b"MSG00001", b"MSG%05d" % i) for i in range(1000)]
        events = run(PlainTCPFramer(), [b"".join(messages)])
        self.assertEqual(events, [Frame(message) for message in messages])

    def test_encode(self) -> None:
        """encode returns the ACK unframed by default, else wrapped in start and end bytes."""
        ack = b"MSH|^~\\&|LSQ|LeadSquared|HIS|Hospital|202401011230||ACK^A04|1|P|2.3\rMSA|AA|1\r"
        self.assertEqual(PlainTCPFramer().encode(ack), ack)
        wrapped = PlainTCPFramer(start_bytes=b"\x0b", end_bytes=b"\x1c\r").encode(ack)
        self.assertEqual(wrapped, b"\x0b" + ack + b"\x1c\r")

    def test_rejects_bad_limits(self) -> None:
        """A max size below 1 or a drain limit below the max size is refused."""
        self.assertRaises(ValueError, PlainTCPFramer, max_frame_size=0)
        self.assertRaises(ValueError, PlainTCPFramer, max_frame_size=100, drain_limit=99)
