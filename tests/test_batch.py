"""Tests for batches (FHS/BHS ... BTS/FTS) in one frame: split, stored, one batch ACK.

The end-to-end tests drive the real inbound path (``udsgateway.testing.Gateway``)
over ``StringTransport``; every ACK inside a batch answer is checked by
hl7apy's strict validation (hl7apy has no batch parser: the batch segments
around the ACKs are checked byte for byte).
"""

from __future__ import annotations

from sqlalchemy.exc import OperationalError
from twisted.trial.unittest import SynchronousTestCase

from tests.strict_ack import strictly_valid
from tests.test_ingest import GatewayTestCase, Reply, hl7, read_reply
from udsgateway.config import Limits, TenantConfig
from udsgateway.hl7.batch import BatchFile, BatchProblem, split_batch
from udsgateway.testing import Connection, Gateway, ManualRunner, demo_app, mllp

FHS = b"FHS|^~\\&|HIS|Hospital|LSQ|LeadSquared|20240101123000||||FILE01\r"
BHS = b"BHS|^~\\&|HIS|Hospital|LSQ|LeadSquared|20240101123000||||BATCH01\r"


def batch(*messages: bytes, fhs: bool = True, count: int | None = None) -> bytes:
    """A batch file of ``messages``: [FHS] BHS ... BTS [FTS]."""
    body = BHS + b"".join(messages) + b"BTS|%d\r" % (len(messages) if count is None else count)
    return FHS + body + b"FTS|1\r" if fhs else body


class BatchAnswer:
    """A batch acknowledgment split into its batch segments and its ACK messages."""

    def __init__(self, raw: bytes) -> None:
        assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\r"), f"one MLLP frame: {raw!r}"
        assert raw.count(b"\x0b") == 1, f"more than one frame: {raw!r}"
        self.raw = raw[1:-2]
        self.envelope: list[str] = []
        self.acks: list[Reply] = []
        current: list[bytes] = []
        for segment in self.raw.split(b"\r")[:-1]:
            if segment[:3] in (b"FHS", b"BHS", b"BTS", b"FTS"):
                self._close(current)
                self.envelope.append(segment.decode("ascii"))
            elif segment.startswith(b"MSH"):
                self._close(current)
                current.append(segment)
            else:
                assert current, f"segment outside an ACK: {segment!r}"
                current.append(segment)
        self._close(current)

    def _close(self, current: list[bytes]) -> None:
        if current:
            ack = b"\r".join(current) + b"\r"
            self.acks.append(read_reply(ack))  # checked by hl7apy unless MSA-2 is empty
            current.clear()

    @property
    def codes(self) -> list[tuple[str, str]]:
        """MSA-1 and MSA-2 of each ACK, in order."""
        return [(ack.code, ack.control_id) for ack in self.acks]


class BatchTestCase(GatewayTestCase):
    def send_batch(self, gateway: Gateway, frame: bytes) -> BatchAnswer:
        """Send ``frame`` in one MLLP frame; return the one answer."""
        connection = gateway.connect()
        connection.send(mllp(frame))
        self.assertFalse(connection.closed)
        return BatchAnswer(connection.received())


class BatchOverMLLPTests(BatchTestCase):
    def test_three_messages_one_answer_three_acks(self) -> None:
        """FHS/BHS with 3 messages: 3 stored byte for byte, one answer: FHS BHS 3 ACKs BTS FTS."""
        gateway = Gateway()
        messages = [hl7("B1"), hl7("B2", "ADT^A08"), hl7("B3")]
        answer = self.send_batch(gateway, batch(*messages))
        self.assertEqual(answer.codes, [("AA", "B1"), ("AA", "B2"), ("AA", "B3")])
        fhs, bhs, bts, fts = answer.envelope
        self.assertRegex(
            fhs, r"^FHS\|\^~\\&\|LSQ\|LeadSquared\|HIS\|Hospital\|\d{14}\|\|\|\|\w+\|FILE01$"
        )
        self.assertRegex(
            bhs, r"^BHS\|\^~\\&\|LSQ\|LeadSquared\|HIS\|Hospital\|\d{14}\|\|\|\|\w+\|BATCH01$"
        )
        self.assertEqual((bts, fts), ("BTS|3", "FTS|1"))
        self.assertTrue(answer.raw.startswith(b"FHS|") and answer.raw.endswith(b"\rFTS|1\r"))
        stored = gateway.messages()
        self.assertEqual([m.control_id for m in stored], ["B1", "B2", "B3"])
        self.assertEqual([m.raw for m in stored], messages)
        self.assertTrue(all(m.accepted for m in stored))

    def test_bad_message_inside(self) -> None:
        """A message no flow takes and one without MSH-10 get their NAKs; the others AA."""
        gateway = Gateway()
        no_control_id = hl7("", "ADT^A04")
        frame = batch(hl7("C1"), hl7("C2", "ORU^R01"), no_control_id, hl7("C4"))
        answer = self.send_batch(gateway, frame)
        self.assertEqual(
            [(a.code, a.control_id, a.error_code) for a in answer.acks],
            [("AA", "C1", None), ("AR", "C2", 200), ("AR", "", 101), ("AA", "C4", None)],
        )
        self.assertEqual(answer.envelope[-2:], ["BTS|4", "FTS|1"])
        stored = gateway.messages()
        self.assertEqual(
            [(m.control_id, m.accepted) for m in stored],
            [("C1", True), ("C2", False), ("C4", True)],
        )

    def test_empty_batch(self) -> None:
        """An empty batch gets an empty batch ACK (BTS-1 0); nothing is stored."""
        gateway = Gateway()
        answer = self.send_batch(gateway, batch())
        self.assertEqual(answer.acks, [])
        self.assertEqual([s[:3] for s in answer.envelope], ["FHS", "BHS", "BTS", "FTS"])
        self.assertEqual(answer.envelope[2:], ["BTS|0", "FTS|1"])
        self.assertEqual(gateway.messages(), [])

    def test_bhs_without_fhs(self) -> None:
        """BHS without FHS: the answer is BHS, the ACKs, BTS (no FHS, no FTS)."""
        gateway = Gateway()
        answer = self.send_batch(gateway, batch(hl7("D1"), hl7("D2"), fhs=False))
        self.assertEqual(answer.codes, [("AA", "D1"), ("AA", "D2")])
        self.assertEqual([s[:3] for s in answer.envelope], ["BHS", "BTS"])
        self.assertTrue(answer.envelope[0].endswith("|BATCH01"))
        self.assertEqual(answer.envelope[1], "BTS|2")
        self.assertEqual(len(gateway.messages()), 2)

    def test_duplicates_in_a_batch_and_a_resent_batch(self) -> None:
        """The same message twice in a batch is stored once, both ACKs equal; a resent batch
        gets the stored ACKs and stores nothing."""
        gateway = Gateway()
        frame = batch(hl7("E1"), hl7("E2"), hl7("E1"))
        first = self.send_batch(gateway, frame)
        self.assertEqual(first.codes, [("AA", "E1"), ("AA", "E2"), ("AA", "E1")])
        self.assertEqual(first.acks[0].raw, first.acks[2].raw)
        self.assertEqual([m.control_id for m in gateway.messages()], ["E1", "E2"])
        again = self.send_batch(gateway, frame)
        self.assertEqual([a.raw for a in again.acks], [a.raw for a in first.acks])
        self.assertEqual(len(gateway.messages()), 2)
        self.assertEqual(gateway.ingest.stats.replayed, 1 + 3)

    def test_same_control_id_other_content_in_a_batch(self) -> None:
        """Two messages with one MSH-10 and different content: the second gets AR 205."""
        gateway = Gateway()
        answer = self.send_batch(gateway, batch(hl7("F1"), hl7("F1", patient=b"Roe^Ann")))
        self.assertEqual(
            [(a.code, a.error_code) for a in answer.acks], [("AA", None), ("AR", 205)]
        )

    def test_two_batches_in_one_file(self) -> None:
        """FHS with two batches: the answer has one BHS ... BTS per batch and FTS-1 2."""
        gateway = Gateway()
        second = BHS.replace(b"BATCH01", b"BATCH02")
        frame = (
            FHS + BHS + hl7("G1") + b"BTS|1\r" + second + hl7("G2") + hl7("G3") + b"BTS|2\rFTS|2\r"
        )
        answer = self.send_batch(gateway, frame)
        self.assertEqual(answer.codes, [("AA", "G1"), ("AA", "G2"), ("AA", "G3")])
        self.assertEqual(
            [s.split("|")[-1] if s[:3] in ("BHS", "FHS") else s for s in answer.envelope],
            ["FILE01", "BATCH01", "BTS|1", "BATCH02", "BTS|2", "FTS|2"],
        )
        self.assertEqual(len(gateway.messages()), 3)

    def test_answer_only_after_every_message_is_committed(self) -> None:
        """G4: nothing is written until the commits of all the batch's messages have returned."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        busy = gateway.connect()
        busy.send(mllp(hl7("H0")))  # holds the committer: the batch waits for the next group
        connection = gateway.connect()
        connection.send(mllp(batch(hl7("H1"), hl7("H2"))))
        runner.run_next()
        self.assertEqual(connection.received(), b"")
        runner.run_next()
        answer = BatchAnswer(connection.received())
        self.assertEqual(answer.codes, [("AA", "H1"), ("AA", "H2")])

    def test_commit_failure_inside_a_batch(self) -> None:
        """A failed commit NAKs its message (207); the batch answer waits for the other commits."""
        runner = ManualRunner()
        gateway = Gateway(runner=runner)
        connection = gateway.connect()
        connection.send(mllp(batch(hl7("K1"), hl7("K2"))))
        runner.fail_next(OperationalError("INSERT", {}, Exception("disk I/O error")))
        self.assertEqual(connection.received(), b"")  # K2 is not committed yet
        runner.run_next()
        answer = BatchAnswer(connection.received())
        self.assertEqual(
            [(a.code, a.control_id, a.error_code) for a in answer.acks],
            [("AR", "K1", 207), ("AA", "K2", None)],
        )
        self.assertEqual([m.control_id for m in gateway.messages()], ["K2"])

    def test_structure_error_one_ar_for_the_batch(self) -> None:
        """A segment outside any message: one AR 100 whose MSA-2 is FHS-11; nothing stored."""
        gateway = Gateway()
        frame = batch(hl7("J1")).replace(BHS, BHS + b"PID|1||12345\r")
        connection = gateway.connect()
        connection.send(mllp(frame))
        raw = connection.received()
        reply = read_reply(raw[1:-2])
        strictly_valid(raw[1:-2])
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "FILE01", 100))
        self.assertIn("outside a message", reply.diagnostic)
        self.assertEqual(gateway.messages(), [])
        self.assertFalse(connection.closed)
        self.assertEqual(len(self.gateway_events("batch refused")), 1)

    def test_oversized_batch_one_ar_104(self) -> None:
        """A batch frame over the size limit: one AR 104 for the batch, not a closed connection."""
        tenant = TenantConfig(
            name="test", listen="tcp:0", limits=Limits(max_frame_size=4096, frame_timeout=30.0)
        )
        gateway = Gateway(tenant=tenant)
        frame = batch(*(hl7(f"L{n}") for n in range(30)))
        self.assertGreater(len(frame), 4096)
        connection = gateway.connect()
        connection.send(mllp(frame))
        raw = connection.received()
        reply = read_reply(raw[1:-2])
        self.assertEqual((reply.code, reply.control_id, reply.error_code), ("AR", "FILE01", 104))
        self.assertEqual(gateway.messages(), [])

    def test_batch_of_acks_is_not_answered(self) -> None:
        """A batch of ACKs (a batch acknowledgment sent to us) is never answered."""
        gateway = Gateway()
        ack = b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|20240101123000||ACK|A1|P|2.5\rMSA|AA|X1\r"
        connection: Connection = gateway.connect()
        connection.send(mllp(batch(ack)))
        self.assertEqual(connection.received(), b"")
        self.assertFalse(connection.closed)
        self.assertEqual(gateway.messages(), [])


class BatchOverPlainTCPTests(BatchTestCase):
    """Over plain TCP a batch is one frame too (framing.py): the same batch answer."""

    def send_plain(self, gateway: Gateway, stream: bytes) -> bytes:
        """Send ``stream`` without MLLP, end it with a half-close; return what came back."""
        connection = gateway.connect()
        connection.send(stream)
        connection.protocol.readConnectionLost()
        return connection.received()

    def test_three_messages_one_answer_nothing_glued(self) -> None:
        """3 messages stored byte for byte (no BTS/FTS glued to the last), one batch answer."""
        gateway = Gateway(apps=(demo_app(connection="tcp"),))
        messages = [hl7("P1"), hl7("P2"), hl7("P3")]
        raw = self.send_plain(gateway, batch(*messages))
        answer = BatchAnswer(b"\x0b" + raw + b"\x1c\r")
        self.assertEqual(answer.codes, [("AA", "P1"), ("AA", "P2"), ("AA", "P3")])
        self.assertEqual(answer.envelope[-2:], ["BTS|3", "FTS|1"])
        self.assertEqual([m.raw for m in gateway.messages()], messages)
        self.assertEqual({m.connection for m in gateway.messages()}, {"tcp"})

    def test_empty_batch_is_answered(self) -> None:
        """An empty batch (no MSH at all) is detected as plain TCP and answered."""
        gateway = Gateway()
        raw = self.send_plain(gateway, batch(fhs=False))
        self.assertEqual(BatchAnswer(b"\x0b" + raw + b"\x1c\r").envelope[1:], ["BTS|0"])

    def test_message_then_batch_then_message(self) -> None:
        """A message, a batch and a message on one connection: three answers, in order."""
        gateway = Gateway(apps=(demo_app(connection="tcp"),))
        raw = self.send_plain(gateway, hl7("Q1") + batch(hl7("Q2"), fhs=False) + hl7("Q3"))
        first, rest = raw.split(b"\rBHS|", 1)
        self.assertEqual(read_reply(first + b"\r").control_id, "Q1")
        middle, last = (b"BHS|" + rest).split(b"BTS|1\r")
        self.assertEqual(BatchAnswer(b"\x0b" + middle + b"BTS|1\r\x1c\r").codes, [("AA", "Q2")])
        self.assertEqual(read_reply(last).control_id, "Q3")
        self.assertEqual([m.control_id for m in gateway.messages()], ["Q1", "Q2", "Q3"])


class SplitBatchTests(SynchronousTestCase):
    """``split_batch`` on bytes alone."""

    def test_messages_are_cut_byte_for_byte(self) -> None:
        """LF, CR LF and blank lines inside a message are kept: the bytes are the sender's."""
        one = b"MSH|^~\\&|A|B|C|D|2024||ADT^A04|M1|P|2.5\r\nPID|1\r\n\r\n"
        two = b"MSH|^~\\&|A|B|C|D|2024||ADT^A04|M2|P|2.5\nPID|2\n"
        parsed = split_batch(b"BHS|^~\\&\r\n" + one + two + b"BTS|2\r\n")
        assert isinstance(parsed, BatchFile)
        self.assertEqual(parsed.messages, (one, two))

    def test_fhs_without_bhs_is_one_batch(self) -> None:
        """Messages right under FHS form one batch without a header; FTS missing is fine."""
        parsed = split_batch(FHS + hl7("N1") + hl7("N2"))
        assert isinstance(parsed, BatchFile)
        self.assertEqual([len(b.messages) for b in parsed.batches], [2])
        self.assertIsNone(parsed.batches[0].header)
        self.assertEqual(parsed.first_header, parsed.file_header)

    def test_structure_errors(self) -> None:
        """Out-of-place batch segments are structure errors, named without field values."""
        cases = {
            BHS + b"BHS|^~\\&\r": "BHS inside a batch (BTS missing)",
            BHS + b"BTS|0\rBTS|0\r": "BTS without BHS",
            BHS + b"BTS|0\rFTS|1\r": "FTS without FHS",
            FHS + b"FTS|0\rBHS|^~\\&\r": "segment BHS after FTS",
            BHS + b"BTS|0\r" + hl7("P1"): "MSH after BTS",
            BHS + b"FHS|^~\\&\r": "FHS not at the start of the frame",
            b"BHS|^^\\&\r": "BHS-1 or BHS-2 invalid",
            BHS + b"ZZ\xe9|x\r": "segment (unreadable) outside a message",
        }
        for frame, diagnostic in cases.items():
            parsed = split_batch(frame)
            assert isinstance(parsed, BatchProblem), frame
            self.assertEqual(parsed.diagnostic, diagnostic, frame)
