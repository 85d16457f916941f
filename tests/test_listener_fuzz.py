"""The fuzz corpus (bench/fuzz.py) replayed against the listener in memory.

Each hostile input goes to the real protocol, factory and inbound pipeline of
one tenant (``udsgateway.testing.Gateway``) on ``StringTransport`` and
``task.Clock``: whole, and split into one byte per packet. Whatever comes in,
nothing fails unhandled, every frame gets at most one answer and a frame
without one means the connection was closed, and memory stays bounded.
"""

from __future__ import annotations

from bench.fuzz import fuzz_corpus
from twisted.internet.defer import Deferred, fail

from tests.test_ingest import GatewayTestCase, hl7, mllp_replies, one_reply, plain_replies
from tests.test_listener import hang_up, tenant
from udsgateway.config import Limits
from udsgateway.inbound.ingest import Answer
from udsgateway.testing import Connection, Gateway, mllp
from udsgateway.wire.framing import FrameEvent, MLLPFramer

MAX_FRAME = 64 * 1024


class FuzzCorpusTests(GatewayTestCase):
    """No input produces an unhandled error; one answer per frame or a close."""

    def replay(self, gateway: Gateway, data: bytes, host: str, split: bool) -> Connection:
        connection = gateway.connect(host=host)
        chunks = [data[i : i + 1] for i in range(len(data))] if split else [data]
        for chunk in chunks:
            if connection.closed:
                break
            connection.send(chunk)
            framer = connection.protocol._framer
            if framer is not None:
                # Bounded: the size limit plus the 64 KiB head kept of an oversized frame.
                self.assertLessEqual(framer.buffered_bytes, MAX_FRAME + 65536 + len(chunk))
        limits = gateway.tenant.limits
        gateway.clock.advance(gateway.tenant.tcp.idle_gap + 0.001)
        gateway.clock.advance(0)
        gateway.clock.advance(limits.frame_timeout + 0.001)
        return connection

    def check(self, split: bool) -> None:
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=MAX_FRAME)))
        corpus = fuzz_corpus()
        self.assertGreaterEqual(len(corpus), 300)
        for n, case in enumerate(corpus):
            host = f"10.{n // 250}.{n % 250}.1"
            connection = self.replay(gateway, case.data, host, split)
            framer = connection.protocol._framer
            written = connection.received()
            if connection.protocol.connection_type == "tcp":
                replies = plain_replies(written, strict=False)
            else:
                replies = mllp_replies(written, strict=False)
            frames = 0 if framer is None else framer.stats.frames + framer.stats.oversized
            # In enhanced mode an accept ACK (CA/CE/CR) may be followed by the
            # application ACK of the same message: one answer of each kind per frame.
            accepted = {reply.msa[2] for reply in replies if reply.msa[1].startswith("C")}
            answers = [
                r for r in replies if not (r.msa[1].startswith("A") and r.msa[2] in accepted)
            ]
            self.assertLessEqual(len(answers), frames, case.name)
            if len(answers) < frames:
                self.assertTrue(
                    connection.closed or b"ACK" in case.data or b"MSA" in case.data,
                    f"{case.name}: {frames} frames, {len(answers)} answers, still open",
                )
            hang_up(connection)
        self.assertEqual(gateway.factory.stats.input_errors, 0)
        self.assertEqual(gateway.factory.stats.open_connections, 0)
        failures = [e for e in self.events if e.get("log_failure") or e.get("isError")]
        self.assertEqual(failures, [])
        critical = [e for e in self.events if str(e.get("log_level", "")) in ("error", "critical")]
        self.assertEqual(critical, [])

    def test_corpus_whole(self) -> None:
        """Each case sent in one write: handled, answered at most once per frame, or closed."""
        self.check(split=False)

    def test_corpus_one_byte_at_a_time(self) -> None:
        """Each case split into one byte per packet gives the same guarantees."""
        self.check(split=True)

    def test_corpus_on_one_connection(self) -> None:
        """The MLLP cases back to back on one connection: never an unhandled error."""
        gateway = Gateway(tenant=tenant(limits=Limits(max_frame_size=MAX_FRAME)))
        connection = gateway.connect(host="10.9.9.9")
        for case in fuzz_corpus():
            if not case.data.startswith(b"\x0b") or connection.closed:
                continue
            connection.send(case.data)
            gateway.clock.advance(0)
        mllp_replies(connection.received())
        self.assertEqual(gateway.factory.stats.input_errors, 0)
        self.assertEqual([e for e in self.events if e.get("log_failure")], [])


class InputFailureTests(GatewayTestCase):
    """A failure that input causes is handled on its connection and logged as one line."""

    def test_pipeline_failure_is_one_line_without_content(self) -> None:
        """A frame the pipeline fails on closes the connection; one line, no traceback, no PHI."""
        gateway = Gateway()

        class Broken:
            def handle(self, payload: bytes, peer: str, connection_type: str) -> Deferred[Answer]:
                return fail(ValueError(payload.decode("latin-1")))

        gateway.factory.ingest = Broken()  # type: ignore[assignment]
        connection = gateway.connect()
        connection.send(mllp(hl7("BROKEN", patient=b"Secretname^Pat")))
        self.assertTrue(connection.closed)
        self.assertEqual([e for e in self.events if e.get("log_failure")], [])
        [event] = self.gateway_events("inbound pipeline failed")
        self.assertEqual(event["error"], "ValueError")
        self.assertNotIn("Secretname", repr(event))
        self.assertEqual(gateway.factory.stats.input_errors, 1)

    def test_code_failing_on_input_aborts_only_that_connection(self) -> None:
        """An exception raised while reading a connection's bytes aborts it, logged once;
        other connections go on."""
        gateway = Gateway()
        connection = gateway.connect(host="10.0.0.1")
        other = gateway.connect(host="10.0.0.2")
        connection.send(b"\x0bMSH|")  # framing detected, framer built

        class Exploding(MLLPFramer):
            def feed(self, data: bytes) -> list[FrameEvent]:
                raise UnicodeDecodeError("utf-8", b"Secretname", 0, 1, "invalid")

        connection.protocol._framer = Exploding()
        connection.send(b"Secretname")
        self.assertTrue(connection.transport.disconnected)
        [event] = self.gateway_events("input handling failed")
        self.assertEqual(event["error"], "UnicodeDecodeError")
        self.assertIn("test_listener_fuzz.py:", event["site"])
        self.assertNotIn("Secretname", repr(event))
        self.assertEqual([e for e in self.events if e.get("log_failure")], [])
        other.send(mllp(hl7("OTHER")))
        self.assertEqual(one_reply(other).code, "AA")
