"""The delivery engine against real sockets, a real SQLite file and a real disk.

A real ``Dispatcher`` (reactor, database thread, SQLite file) sends to a real
MLLP receiver on 127.0.0.1 (port 0, read back) whose behaviour the test
switches: accept and close at once (an outage), or ACK each message and count
the copies it got. Each test takes a few seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from udsgateway.outbound.dispatcher import Dispatcher
from udsgateway.outbound.policy import Timing
from udsgateway.store import outbox
from udsgateway.store.engine import Database, ThreadRunner, ensure_schema, make_engine
from udsgateway.store.outbox import DELIVERED, NewDelivery
from udsgateway.testing import control_id_of, destination_ack, mllp, outbound_message
from udsgateway.wire.framing import Frame, MLLPFramer

reactor: Any = _reactor
#: Short timeouts and backoff, so that a test takes seconds.
TIMING = Timing(connect_timeout=2.0, response_timeout=2.0, backoff_initial=0.1, backoff_max=1.0)
DEADLINE = 30.0


@define(eq=False)
class Receiver:
    """A real MLLP receiver: ``close`` (accept, then close at once) or ``ack`` every message."""

    mode: str = "ack"
    received: list[str] = field(factory=list)
    connections: int = 0


class _ReceiverProtocol(Protocol):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self._framer = MLLPFramer()

    def connectionMade(self) -> None:
        self._receiver.connections += 1
        if self._receiver.mode == "close":
            assert self.transport is not None
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._receiver.mode == "close":
            return
        assert self.transport is not None
        for event in self._framer.feed(data):
            if isinstance(event, Frame):
                control_id = control_id_of(event.payload)
                self._receiver.received.append(control_id)
                self.transport.write(mllp(destination_ack(control_id)))


class DeliveryFaultTests(TestCase):
    """Outages and a full disk with real sockets, a real database file and real threads."""

    timeout = 60

    def listen(self, receiver: Receiver) -> str:
        """Start the receiver on a free port; its endpoint string."""
        factory = Factory.forProtocol(lambda: _ReceiverProtocol(receiver))
        port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"tcp:host=127.0.0.1:port={port.getHost().port}:timeout=2"  # type: ignore[attr-defined]

    def database(self, directory: Path) -> Database:
        """A SQLite file in ``directory`` with the schema, on a database thread."""
        runner = ThreadRunner(reactor)
        runner.start()
        self.addCleanup(runner.stop)
        database = Database(make_engine(f"sqlite:///{directory / 'gateway.db'}"), runner)
        database.transaction_now(ensure_schema)
        return database

    def dispatcher(self, database: Database) -> Dispatcher:
        dispatcher = Dispatcher(
            database, reactor, reactor, timing=lambda _endpoint: TIMING, held_poll=1.0
        )
        self.addCleanup(dispatcher.stopService)
        return dispatcher

    async def wait_for(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {DEADLINE:g}s: {what}")
            await deferLater(reactor, 0.05, lambda: None)

    async def wait_delivered(self, database: Database, total: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while True:
            rows = await database.transaction(outbox.list_deliveries, (), None, 1_000_000)
            delivered = sum(1 for row in rows if row.state == DELIVERED)
            if delivered == total:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{delivered} of {total} delivered in {DEADLINE:g}s")
            await deferLater(reactor, 0.1, lambda: None)

    def test_outage_of_accept_and_close_then_all_lanes_drain(self) -> None:
        """300 lanes with two messages each, while the receiver accepts and
        closes every connection for 3 s, then ACKs: every lane drains, every
        message arrives in order per lane, and nothing is logged as an error
        (issue 17: a RecursionError left lanes stopped until a restart)."""
        return Deferred.fromCoroutine(self._outage())  # type: ignore[return-value]

    async def _outage(self) -> None:
        receiver = Receiver(mode="close")
        endpoint = self.listen(receiver)
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        database = self.database(directory)
        dispatcher = self.dispatcher(database)
        await Deferred.fromCoroutine(dispatcher.recover())
        lanes = [f"outage-{n:03d}" for n in range(300)]
        expected = {lane: [f"{lane[-3:]}A", f"{lane[-3:]}B"] for lane in lanes}
        for lane in lanes:
            await database.transaction(
                outbox.enqueue,
                [
                    NewDelivery(lane, endpoint, "mllp", c, outbound_message(c), {})
                    for c in expected[lane]
                ],
                time.time(),
            )
            dispatcher.enqueued(lane, endpoint, "mllp", 2)
        await deferLater(reactor, 3.0, lambda: None)
        self.assertGreater(receiver.connections, 0)
        receiver.mode = "ack"
        await self.wait_delivered(database, 2 * len(lanes))
        for lane in lanes:
            arrived = [c for c in receiver.received if c[:3] == lane[-3:]]
            collapsed = [c for i, c in enumerate(arrived) if i == 0 or arrived[i - 1] != c]
            self.assertEqual(collapsed, expected[lane], lane)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_disk_full_sends_each_message_once(self) -> None:
        """A real full disk (a 2 MiB tmpfs): the receiver ACKs the head, its
        outcome cannot be committed (SQLITE_FULL), the lane stops sending and
        retries the commit; once space is freed the lane goes on. The receiver
        got exactly one copy of each message (issue 17: up to 11 before)."""
        return Deferred.fromCoroutine(self._disk_full())  # type: ignore[return-value]

    async def _disk_full(self) -> None:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise SkipTest("mounting a tmpfs needs root")
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(directory)],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace')}")
        self.addCleanup(subprocess.run, ["umount", "-l", str(directory)], check=False)
        receiver = Receiver()
        endpoint = self.listen(receiver)
        database = self.database(directory)
        self.addCleanup(database.engine.dispose)
        control_ids = [f"FULL{n:02d}" for n in range(5)]
        await database.transaction(
            outbox.enqueue,
            [
                NewDelivery("lane-full", endpoint, "mllp", c, outbound_message(c), {})
                for c in control_ids
            ],
            time.time(),
        )
        filler = directory / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass  # the disk is full
        finally:
            os.close(fd)
        dispatcher = self.dispatcher(database)
        await Deferred.fromCoroutine(dispatcher.recover())
        await self.wait_for(lambda: receiver.received != [], "the head is sent")
        # Several commit retries (after 1 s and 2 s): nothing more is sent meanwhile.
        await deferLater(reactor, 3.5, lambda: None)
        self.assertEqual(receiver.received, control_ids[:1])
        self.assertEqual(dispatcher.lanes["lane-full"].state, "recording")
        filler.unlink()
        await self.wait_delivered(database, len(control_ids))
        self.assertEqual(receiver.received, control_ids, "exactly one copy of each")
        self.assertEqual(self.flushLoggedErrors(), [])
