"""Smoke test of the benchmark's load generator against the canned-ACK reference server.

It proves correctness, never speed: every message gets a verified ACK (MSA-1 AA, MSA-2 equal
to its MSH-10, in order per connection) in stop-and-wait and pipelined mode, and the verifier is
not vacuous (a wrong MSA-2, a NAK and a refused connection are all counted as errors).

The canned-ACK server runs as a subprocess on a port reserved for it (``refusing_port``:
bound on port 0, handed over to the server); the load generator runs through its CLI
(``python -m bench.loadgen --json``) from the repository root.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.integration.helpers import refusing_port

REPO = Path(__file__).resolve().parents[2]
CANNED_ACK = REPO / "bench" / "refservers" / "canned_ack.py"
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
ERROR_KINDS = ("nak", "mismatch", "timeout", "closed", "aborted")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _control_id(message: bytes) -> bytes:
    return message.split(b"\r", 1)[0].split(b"|")[9]


class _ScriptedAck(Protocol):
    """Answers every MLLP frame with ``reply(message)``."""

    def __init__(self, reply: Callable[[bytes], bytes]) -> None:
        self.reply = reply
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            start = self.buffer.find(b"\x0b")
            end = self.buffer.find(b"\x1c\r", start + 1)
            if start < 0 or end < 0:
                return
            message = self.buffer[start + 1 : end]
            self.buffer = self.buffer[end + 2 :]
            assert self.transport is not None
            self.transport.write(b"\x0b" + self.reply(message) + b"\x1c\r")


class _ScriptedAckFactory(ServerFactory):
    def __init__(self, reply: Callable[[bytes], bytes]) -> None:
        self.reply = reply

    def buildProtocol(self, addr: object) -> _ScriptedAck:
        protocol = _ScriptedAck(self.reply)
        protocol.factory = self
        return protocol


class BenchSmokeTests(TestCase):
    timeout = 60

    def reserve_port(self) -> int:
        """A port of 127.0.0.1 that refuses connections until a server listens on it;
        held (no other process can take it) until the test's cleanup."""
        placeholder = refusing_port()
        self.addCleanup(placeholder.close)
        port: int = placeholder.getsockname()[1]
        return port

    def start_canned_ack(self) -> tuple[int, int]:
        """Start the canned-ACK server; (port, pid). Stopped by the test's cleanup."""
        port = self.reserve_port()
        with open(f"canned_ack-{port}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(CANNED_ACK), "--host", HOST, "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.addCleanup(self._stop, proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(port):
            if proc.poll() is not None:
                self.fail(f"canned_ack exited with {proc.returncode} before accepting")
            if time.monotonic() > deadline:
                self.fail(f"canned_ack did not accept on port {port} in {START_TIMEOUT} s")
            time.sleep(0.05)
        return port, proc.pid

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def loadgen(self, *args: str) -> Deferred[tuple[int, dict[str, Any]]]:
        """Run ``python -m bench.loadgen --json ARGS``; fires with (exit status, result)."""
        argv = ["-m", "bench.loadgen", "--host", HOST, "--timeout", "5", "--json", *args]
        running: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
            sys.executable, argv, env=dict(os.environ), path=str(REPO)
        )

        def parse(output: tuple[bytes, bytes, int]) -> tuple[int, dict[str, Any]]:
            out, err, code = output
            try:
                return code, json.loads(out)
            except ValueError:
                self.fail(f"loadgen printed no JSON (exit {code}): {err.decode()[-2000:]}")

        return running.addCallback(parse)

    def assert_all_verified(self, code: int, result: dict[str, Any], total: int) -> None:
        self.assertEqual(result["errors"], dict.fromkeys(ERROR_KINDS, 0))
        self.assertEqual((result["total"], result["sent"], result["ok"]), (total, total, total))
        self.assertTrue(result["verified"])
        self.assertEqual(code, 0)
        self.assertIsNotNone(result["latency_p99_ms"])

    async def test_stop_and_wait(self) -> None:
        port, pid = self.start_canned_ack()
        code, result = await self.loadgen(
            "--port", str(port), "--connections", "4", "--messages", "100", "--pid", str(pid)
        )
        self.assert_all_verified(code, result, 400)
        self.assertEqual(result["pipeline"], 1)
        self.assertEqual(result["server_pids"], [pid])
        self.assertGreater(result["server_peak_rss_kib"], 0)
        self.assertIsNotNone(result["server_cpu_ms_per_msg"])

    async def test_pipelined(self) -> None:
        port, _pid = self.start_canned_ack()
        code, result = await self.loadgen(
            "--port", str(port), "--connections", "4", "--messages", "100", "--pipeline", "8"
        )
        self.assert_all_verified(code, result, 400)
        self.assertEqual(result["pipeline"], 8)

    async def test_fixed_rate(self) -> None:
        port, _pid = self.start_canned_ack()
        code, result = await self.loadgen(
            "--port", str(port), "--messages", "50", "--rate", "500", "--warmup", "5"
        )
        self.assert_all_verified(code, result, 50)
        self.assertEqual(result["rate"], 500)

    def listen_scripted(self, reply: Callable[[bytes], bytes]) -> int:
        port = cast(IReactorTCP, _reactor).listenTCP(0, _ScriptedAckFactory(reply), interface=HOST)
        self.addCleanup(port.stopListening)
        return cast(IPv4Address, port.getHost()).port

    async def test_wrong_control_id_is_a_mismatch(self) -> None:
        port = self.listen_scripted(lambda _message: b"MSH|^~\\&|X|Y\rMSA|AA|NOT-IT")
        code, result = await self.loadgen("--port", str(port), "--messages", "20")
        self.assertEqual(code, 1)
        self.assertFalse(result["verified"])
        self.assertEqual(result["ok"], 0)
        self.assertEqual(result["errors"]["mismatch"], 1)
        self.assertEqual(result["errors"]["aborted"], 19)

    async def test_negative_ack_is_a_nak(self) -> None:
        port = self.listen_scripted(lambda m: b"MSH|^~\\&|X|Y\rMSA|AE|" + _control_id(m))
        code, result = await self.loadgen("--port", str(port), "--messages", "20")
        self.assertEqual(code, 1)
        self.assertEqual(result["ok"], 0)
        self.assertEqual(result["errors"]["nak"], 20)

    async def test_refused_connection_is_closed(self) -> None:
        port = self.reserve_port()
        code, result = await self.loadgen("--port", str(port), "--connections", "2")
        self.assertEqual(code, 1)
        self.assertEqual(result["ok"], 0)
        self.assertEqual(result["errors"]["closed"], result["total"])
