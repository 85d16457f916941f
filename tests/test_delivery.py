"""Tests for udsgateway.outbound: policy, destinations, lanes and the dispatcher.

The real dispatcher, lanes, destinations and destination protocol run on
an in-memory SQLite store, a synchronous database runner and a ``task.Clock``;
endpoints are in-memory ``DestinationPeer``s scripted per test
(``udsgateway.testing.Outbound``). No sockets, no threads, no sleeps. Each
outbound row of docs/guarantees.md "Faults" has a test here, as has "a destination
stalled while others keep flowing".
"""

from __future__ import annotations

import gc
import itertools
import random
import sys
import tracemalloc
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

from attrs import evolve
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from twisted.application.service import IService
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from udsgateway.cli.operate import delivery_action
from udsgateway.flows import Action
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.interfaces import IDeliveryOutcomes, IDeliveryQueue
from udsgateway.outbound.destination import Destination, _DestinationFactory
from udsgateway.outbound.dispatcher import Dispatcher
from udsgateway.outbound.errors import ConnectError, DeliveryError, ReplyTimeoutError
from udsgateway.outbound.executor import Executor
from udsgateway.outbound.lanes import Lane, LaneContext
from udsgateway.outbound.policy import DEFAULT_POLICY, TIMING_KEYS, Timing
from udsgateway.store import destinations, outbox, schema
from udsgateway.store.engine import IDatabaseRunner
from udsgateway.store.outbox import DELIVERED, HELD, QUEUED, SKIPPED, Delivery, Settlement
from udsgateway.testing import (
    DestinationPeer,
    Outbound,
    PeerConnection,
    control_id_of,
    destination_ack,
    memory_database,
    mllp,
    outbound_message,
    run_until,
)
from udsgateway.wire.framing import IFramer, MLLPFramer

DEST = "tcp:lab.example:2575"
OTHER = "tcp:billing.example:2575"
PER_LANE = 500
#: What the chaotic destination of the ordering test does with a message, and how often.
FAULTS = {
    "lost": 4,
    "dropped": 4,
    "silent": 2,
    "late": 2,
    "garbage": 3,
    "wrong-id": 3,
    "AE": 4,
    "AA-then-refuse": 3,
    "AA": 75,
}
#: Timers are compared in floating point; allow this much rounding.
TICK = 1e-6


def ids(prefix: str, count: int) -> list[str]:
    """``count`` control IDs that sort in the order they are made."""
    return [f"{prefix}{index:05d}" for index in range(count)]


def silent(_connection: PeerConnection, _payload: bytes) -> None:
    """A destination that reads every message and never answers."""


def answer(code: str, error: int | None = None) -> Callable[[PeerConnection, bytes], None]:
    """A destination that answers every message with ``code``."""

    def script(connection: PeerConnection, payload: bytes) -> None:
        connection.reply(destination_ack(control_id_of(payload), code, error))

    return script


def states(outbound: Outbound, lane: str | None = None) -> list[tuple[str, str]]:
    """(control ID, state) of every delivery (of ``lane``), oldest first."""
    return [(d.control_id, d.state) for d in outbound.deliveries(lane)]


def all_delivered(outbound: Outbound) -> Callable[[], bool]:
    """A condition: every delivery in the store is delivered."""
    return lambda: all(d.state == DELIVERED for d in outbound.deliveries())


def schedule_log(clock: Clock) -> list[tuple[float, float, str]]:
    """Record every ``callLater`` made on ``clock`` from now on: (at, delay, what)."""
    log: list[tuple[float, float, str]] = []
    original = clock.callLater

    def call_later(
        delay: float, function: Callable[..., object], *args: object, **kwargs: object
    ) -> IDelayedCall:
        log.append((clock.seconds(), delay, getattr(function, "__qualname__", repr(function))))
        return original(delay, function, *args, **kwargs)

    clock.callLater = call_later  # type: ignore[method-assign, assignment]
    return log


def audit_rows(outbound: Outbound) -> list[Any]:
    """Every audit row, oldest first."""
    return outbound.database.transaction_now(
        lambda connection: connection.execute(
            select(schema.audit).order_by(schema.audit.c.id)
        ).all()
    )


class DeliveryTestCase(SynchronousTestCase):
    """Builds ``Outbound`` rigs that are stopped when the test ends."""

    def outbound(self, **kwargs: Any) -> Outbound:
        rig = Outbound(**kwargs)
        self.addCleanup(rig.stop)
        return rig


class InterfaceTests(DeliveryTestCase):
    """The seams provide their interfaces, and the default endpoint comes from config."""

    def test_interfaces(self) -> None:
        """The fake endpoint, the destination protocol, its factory and framer, the
        dispatcher and the database runner provide their interfaces."""
        rig = self.outbound()
        self.assertTrue(verifyObject(IStreamClientEndpoint, rig.peer(DEST).endpoint()))
        self.assertTrue(verifyObject(IDatabaseRunner, rig.database.runner))
        self.assertTrue(verifyObject(IService, rig.dispatcher))
        self.assertTrue(verifyObject(IDeliveryQueue, rig.dispatcher))
        self.assertTrue(verifyObject(IDeliveryOutcomes, RecordedOutcomes()))
        executor = Executor(rig.database, rig.dispatcher, rig.clock, ControlIdSource("OUT"))
        self.assertTrue(verifyObject(IDeliveryOutcomes, executor))
        factory = _DestinationFactory("mllp", rig.clock, Timing())
        self.assertTrue(verifyObject(IProtocolFactory, factory))
        protocol = factory.buildProtocol(None)
        self.assertTrue(verifyObject(IProtocol, protocol))
        self.assertTrue(verifyObject(IFramer, protocol._framer))
        self.assertIsInstance(protocol._framer, MLLPFramer)

    def test_default_endpoint_from_config_string(self) -> None:
        """Without an injected factory, the endpoint string is parsed with
        clientFromString against the reactor: a TCP connection to its host and
        port, made only once there is a message to send."""
        reactor = MemoryReactorClock()
        dispatcher = Dispatcher(memory_database(), reactor, reactor)
        destination = dispatcher.destination("tcp:host=lab.example:port=2575", "mllp")
        self.addCleanup(destination.stop)
        reactor.advance(600)
        self.assertEqual(reactor.tcpClients, [], "no connection without work")
        sending = Deferred.fromCoroutine(destination.exchange(b"MSH|^~\\&|", bytes))
        sending.addErrback(lambda _failure: None)  # stopped at cleanup
        [(host, port, _factory, timeout, _bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("lab.example", 2575, 30))
        self.assertIs(
            dispatcher.destination("tcp:host=lab.example:port=2575", "mllp"), destination
        )


class HappyPathTests(DeliveryTestCase):
    """Deliveries that succeed: order, the stored response, plain TCP."""

    def test_delivers_in_order_and_stores_the_response(self) -> None:
        """Each delivery is sent once, in order, and its row keeps the response
        bytes and code; a log row records each attempt."""
        rig = self.outbound()
        rig.start()
        rig.enqueue("lane-1", DEST, ["A1", "A2", "A3"])
        peer = rig.peer(DEST)
        rig.run_until(all_delivered(rig))
        self.assertEqual(peer.received_ids(), ["A1", "A2", "A3"])
        self.assertEqual(peer.received, [outbound_message(c) for c in ("A1", "A2", "A3")])
        for delivery in rig.deliveries():
            self.assertEqual(delivery.state, DELIVERED)
            self.assertEqual(delivery.response, destination_ack(delivery.control_id))
            self.assertEqual((delivery.response_code, delivery.attempts), ("AA", 1))
        logs = rig.database.transaction_now(
            lambda c: c.execute(select(schema.logs.c.control_id, schema.logs.c.outcome)).all()
        )
        self.assertEqual(
            [tuple(row) for row in logs],
            [("A1", DELIVERED), ("A2", DELIVERED), ("A3", DELIVERED)],
        )
        self.assertEqual(len(peer.connections), 1, "one connection reused")

    def test_counters_parse_an_endpoint_once(self) -> None:
        """The attempt and delivery counters of every delivery are kept by address,
        each endpoint's parsed once however many deliveries go to it (the cache of
        ``destinations.address_of``)."""
        parsed: list[str] = []
        pattern = destinations._ENDPOINT_PART

        class Counted:
            def findall(self, endpoint: str) -> list[str]:
                parsed.append(endpoint)
                return pattern.findall(endpoint)

        parse = destinations.address_of
        parse.cache_clear()
        self.addCleanup(parse.cache_clear)
        self.patch(destinations, "_ENDPOINT_PART", Counted())
        rig = self.outbound()
        rig.start()
        rig.enqueue("lane-1", DEST, ids("P", 10))
        rig.enqueue("lane-2", OTHER, ids("Q", 5))
        rig.run_until(all_delivered(rig))
        self.assertEqual(sorted(parsed), sorted([DEST, OTHER]))
        dispatcher = rig.dispatcher
        self.assertEqual(dispatcher.sent, {parse(DEST): 10, parse(OTHER): 5})
        self.assertEqual(
            dispatcher.attempts, {parse(DEST): {"accepted": 10}, parse(OTHER): {"accepted": 5}}
        )

    def test_plain_tcp_reply_ends_at_idle_gap(self) -> None:
        """Over plain TCP the reply is unframed: it ends after the reply gap,
        then counts like an MLLP one."""
        rig = self.outbound()
        peer = rig.peer(DEST, protocol="tcp")
        rig.start()
        rig.enqueue("lane-tcp", DEST, ["T1", "T2"], protocol="tcp")
        rig.clock.advance(0)
        self.assertEqual(peer.received_ids(), ["T1"])
        self.assertEqual(peer.connections[0].transport.value(), outbound_message("T1"))
        self.assertEqual(states(rig)[0], ("T1", QUEUED))
        rig.clock.advance(rig.timing.reply_gap)
        rig.clock.advance(0)
        self.assertEqual(states(rig), [("T1", DELIVERED), ("T2", QUEUED)])
        rig.run_until(all_delivered(rig))
        self.assertEqual(peer.received_ids(), ["T1", "T2"])


class WallClockJumpTests(DeliveryTestCase):
    """docs/guarantees.md: the wall clock jumps; timeouts and backoff use the timer
    (monotonic) clock. Stored times (next_attempt_at) are wall-clock times."""

    WALL = 1_800_000_000.0

    def rig_with_wall(self) -> tuple[Outbound, Clock]:
        wall = Clock()
        wall.advance(self.WALL)
        rig = self.outbound(wall=wall)
        return rig, wall

    def failing(self, control_id: str, refusals: int) -> tuple[Outbound, Clock, float]:
        """A rig whose destination refuses ``refusals`` connections; run until the
        delivery's last failed attempt; return the rig, its wall clock and that time."""
        rig, wall = self.rig_with_wall()
        rig.peer(DEST).refuse_next = refusals
        rig.start()
        rig.enqueue("lane-jump", DEST, [control_id])
        rig.run_until(lambda: rig.deliveries()[0].attempts == refusals)
        return rig, wall, rig.clock.seconds()

    def test_wall_clock_set_back_does_not_hold_a_backoff(self) -> None:
        """Set back an hour during a 1 s backoff, the retry still comes after about 1 s."""
        rig, wall, failed_at = self.failing("J1", 1)
        stored = rig.deliveries()[0].next_attempt_at
        self.assertTrue(self.WALL + 1.0 <= stored <= self.WALL + 1.1 + TICK, stored)
        wall.advance(-3600)
        done = rig.run_until(all_delivered(rig), limit=60)
        # A backoff of about a second plus the reconnect: seconds, not the hour set back.
        self.assertLess(done - failed_at, 5)
        self.assertEqual(rig.peer(DEST).received_ids(), ["J1"])

    def test_wall_clock_set_forward_does_not_cut_a_backoff(self) -> None:
        """Set forward a day during a backoff, the lane still waits out its delay."""
        rig, wall, failed_at = self.failing("J2", 3)
        wall.advance(86_400)
        done = rig.run_until(all_delivered(rig), limit=60)
        self.assertGreaterEqual(done - failed_at, rig.timing.backoff(3) - TICK)
        self.assertEqual(rig.peer(DEST).received_ids(), ["J2"])

    def test_stored_retry_time_is_trusted_at_most_one_backoff(self) -> None:
        """After a restart the stored next_attempt_at (written while the wall clock was
        far ahead, say) holds the lane for at most the longest backoff."""
        rig, _wall = self.rig_with_wall()
        [delivery_id] = rig.enqueue("lane-late", DEST, ["J3"], notify=False)
        far = outbox.Settlement(delivery_id, QUEUED, 1, self.WALL + 30 * 86_400, "before")
        rig.database.transaction_now(outbox.record, [far], self.WALL)
        rig.start()
        start = rig.clock.seconds()
        done = rig.run_until(all_delivered(rig))
        self.assertLessEqual(done - start, rig.timing.backoff_max + 1)
        self.assertEqual(rig.peer(DEST).received_ids(), ["J3"])


class ConnectionRefusedTests(DeliveryTestCase):
    """docs/guarantees.md: a destination refuses connections for an hour, then returns."""

    def test_refused_for_an_hour_backs_off_capped_then_drains_in_order(self) -> None:
        """While refused, nothing is sent and every delivery stays queued; the
        lane's waits between attempts double up to the cap (plus at most 10 %
        jitter), and so do the reconnect attempts. Once the destination
        accepts again the lane drains, in order, within two capped waits."""
        rig = self.outbound()
        timing = rig.timing
        log = schedule_log(rig.clock)
        peer = rig.peer(DEST)
        peer.accepting = False
        rig.start()
        rig.enqueue("lane-refused", DEST, ids("R", 5))
        rig.run_until(lambda: rig.clock.seconds() >= 3600)

        self.assertEqual(peer.received, [])
        self.assertGreater(peer.refused, 10)
        rows = rig.deliveries()
        self.assertEqual({d.state for d in rows}, {QUEUED})
        self.assertGreater(rows[0].attempts, 10)
        self.assertEqual([d.attempts for d in rows[1:]], [0, 0, 0, 0], "only the head is tried")
        self.assertEqual(rows[0].last_error, "connect failed: ConnectionRefusedError")

        # The lane's backoff sleeps (Deferred.callback), and the connect
        # attempts (the peer's _connect, one clock turn after each connect).
        sleeps = [delay for _at, delay, what in log if what == "Deferred.callback" and delay > 0]
        connects = [at for at, _delay, what in log if what.endswith("DestinationPeer._connect")]
        self.assertGreater(len(sleeps), 10)
        for failures, delay in enumerate(sleeps, start=1):
            expected = min(timing.backoff_initial * 2 ** (failures - 1), timing.backoff_max)
            self.assertTrue(expected <= delay <= expected * 1.1 + TICK, (failures, delay))
        self.assertGreaterEqual(sleeps[-1], timing.backoff_max)
        self.assertTrue(all(delay <= timing.backoff_max * 1.1 for delay in sleeps))
        # Reconnects follow the same documented policy: backoff_initial x 2^(n-1)
        # plus 0-10 %, capped (not Twisted's default of twice that plus 0-1 s).
        gaps = [later - earlier for earlier, later in itertools.pairwise(connects)]
        self.assertEqual(len(connects), peer.attempts)
        for failures, gap in enumerate(gaps, start=1):
            expected = min(timing.backoff_initial * 2 ** (failures - 1), timing.backoff_max)
            self.assertTrue(expected - TICK <= gap <= expected * 1.1 + TICK, (failures, gap))

        back = rig.clock.seconds()
        peer.accepting = True
        done = rig.run_until(all_delivered(rig))
        self.assertEqual(peer.received_ids(), ids("R", 5))
        self.assertLessEqual(done - back, timing.backoff_max * 1.1 + TICK)
        self.assertEqual(rig.dispatcher.lanes, {}, "the drained lane went idle")

    def test_refused_with_lanes_waiting_their_turn(self) -> None:
        """Lanes to one refusing destination take turns: a failed connect hands
        the turn to the next lane without re-entering anything, so no lane dies
        on a re-entrant call; each keeps backing off and retrying."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        peer.accepting = False
        rig.start()
        for n in range(3):
            rig.enqueue(f"lane-turn-{n}", DEST, [f"W{n}"])
        running = dict(rig.dispatcher.lanes)
        rig.run_until(lambda: rig.clock.seconds() > 120)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(rig.dispatcher.lanes, running, "the same lanes, none restarted")
        for delivery in rig.deliveries():
            self.assertEqual(delivery.state, QUEUED)
            self.assertGreater(delivery.attempts, 3)
        peer.accepting = True
        rig.run_until(all_delivered(rig))
        self.assertEqual(sorted(peer.received_ids()), ["W0", "W1", "W2"])


class ReconnectTests(DeliveryTestCase):
    """docs/guarantees.md: the partner closes the connection after every ACK; connect on demand."""

    def test_close_after_every_ack_reconnects_at_once(self) -> None:
        """A receiver that closes the connection after each ACK is not failing:
        the next message goes on a new connection at once (no backoff), one
        connection per message. (The close reaches the gateway only after it
        wrote the next message on the old connection: that copy is never
        answered and goes again at once, see the next test.)"""
        rig = self.outbound()
        peer = rig.peer(DEST)

        def ack_and_close(connection: PeerConnection, payload: bytes) -> None:
            connection.reply(destination_ack(control_id_of(payload)), delay=0.0)
            rig.clock.callLater(0, connection.hang_up)

        peer.script = ack_and_close
        log = schedule_log(rig.clock)
        rig.start()
        rig.enqueue("lane-close", DEST, ids("C", 20))
        done = rig.run_until(all_delivered(rig))
        self.assertEqual(done, 0.0, "no wait between the connections")
        sleeps = [delay for _at, delay, what in log if what == "Deferred.callback"]
        self.assertEqual(sleeps, [], "no lane backed off")
        acked = [ack.split(b"\rMSA|AA|")[1].split(b"\r")[0].decode() for ack in peer.delivered]
        self.assertEqual(acked, ids("C", 20), "one ACK per message reached the gateway")
        self.assertEqual(len(peer.connections), 20)

    def test_close_seen_only_after_the_next_message_resends_at_once(self) -> None:
        """When the receiver's close after an ACK reaches the gateway only after
        it wrote the next message on that connection (unread), the message is
        sent again at once on a new connection: no backoff, nothing lost."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        firsts: list[str] = []

        def ack_then_close_late(connection: PeerConnection, payload: bytes) -> None:
            if len(connection.received) > 1:
                return  # it stopped reading after its ACK
            firsts.append(control_id_of(payload))
            connection.reply(destination_ack(control_id_of(payload)), delay=0.0)
            rig.clock.callLater(0.05, connection.hang_up)

        peer.script = ack_then_close_late
        rig.start()
        rig.enqueue("lane-late-close", DEST, ids("L", 10))
        done = rig.run_until(all_delivered(rig))
        self.assertEqual(firsts, ids("L", 10))
        self.assertLessEqual(done, 10 * 0.05 + TICK, "no backoff anywhere")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_idle_destination_is_not_reconnected(self) -> None:
        """After the last message, a destination that closes the connection is
        left alone: no connect while nothing is queued, one as soon as work comes."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        rig.start()
        rig.enqueue("lane-idle", DEST, ["I1"])
        rig.run_until(all_delivered(rig))
        peer.current.hang_up()
        rig.clock.advance(0)
        attempts = peer.attempts
        for _ in range(10):
            rig.clock.advance(3_600)
        self.assertEqual(peer.attempts, attempts)
        rig.enqueue("lane-idle", DEST, ["I2"])
        rig.run_until(all_delivered(rig))
        self.assertEqual(peer.attempts, attempts + 1)

    def test_partner_back_after_an_outage_drains_at_once(self) -> None:
        """Lanes waiting for a destination that refused connections go as soon
        as one of them connects again, not each at the end of its own backoff:
        three lanes to a destination down for ten minutes all drain within one
        reconnect backoff after it is back."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        peer.accepting = False
        rig.start()
        for n in range(3):
            rig.enqueue(f"lane-back-{n}", DEST, [f"B{n}"])
        rig.run_until(lambda: rig.clock.seconds() >= 600)
        back = rig.clock.seconds()
        peer.accepting = True
        first = rig.run_until(lambda: len(peer.received) >= 1)
        done = rig.run_until(all_delivered(rig))
        self.assertEqual(done, first, "the others went with the first good connect")
        self.assertLessEqual(first - back, rig.timing.backoff_max * 1.1)
        self.assertEqual(sorted(peer.received_ids()), ["B0", "B1", "B2"])


class NoReplyTests(DeliveryTestCase):
    """docs/guarantees.md: a destination accepts but never ACKs."""

    def test_response_timeout_closes_and_resends_the_same_message(self) -> None:
        """At the response timeout the connection is closed; after a reconnect
        the same message (same bytes) is sent again; the next one waits."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        peer.script = silent
        rig.start()
        rig.enqueue("lane-silent", DEST, ["S1", "S2"])
        rig.clock.advance(0)
        first = peer.connections[0]
        self.assertEqual(first.received, [outbound_message("S1")])

        rig.clock.advance(rig.timing.response_timeout - 0.01)
        self.assertFalse(first.transport.disconnecting)
        rig.clock.advance(0.01 + TICK)
        self.assertTrue(first.transport.disconnecting)
        self.assertTrue(first.closed)
        [head, second] = rig.deliveries()
        self.assertEqual((head.state, head.attempts), (QUEUED, 1))
        self.assertEqual(head.last_error, "no reply within 30s")
        self.assertEqual((second.state, second.attempts), (QUEUED, 0))

        rig.run_until(lambda: len(peer.connections) == 2 and bool(peer.current.received))
        self.assertEqual(peer.current.received, [outbound_message("S1")])
        self.assertEqual(peer.received_ids(), ["S1", "S1"])

    def test_late_ack_is_never_matched(self) -> None:
        """An ACK that comes after the response timeout is never matched: sent on
        the closed connection it is lost with it, and bytes reaching the timed-out
        protocol settle nothing; only the ACK on the new connection counts, and the
        next message gets its own."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        slow = rig.timing.response_timeout + 1

        def late(connection: PeerConnection, payload: bytes) -> None:
            connection.reply(destination_ack(control_id_of(payload)), delay=slow)

        peer.script = late
        rig.start()
        rig.enqueue("lane-late", DEST, ["L1", "L2"])
        rig.clock.advance(0)
        first = peer.connections[0]
        old_protocol = first.protocol
        rig.clock.advance(rig.timing.response_timeout + TICK)
        self.assertTrue(first.closed)

        # The slow ACK was written after the close: it never reaches the gateway.
        rig.clock.advance(1)
        self.assertEqual(peer.undelivered, [mllp(destination_ack("L1"))])
        self.assertEqual(peer.delivered, [])
        # Bytes that do reach the timed-out protocol are out of step: ignored.
        old_protocol.dataReceived(mllp(destination_ack("L1")))
        self.assertEqual(states(rig), [("L1", QUEUED), ("L2", QUEUED)])

        peer.script = answer("AA")
        rig.run_until(all_delivered(rig))
        self.assertEqual(peer.received_ids(), ["L1", "L1", "L2"])
        self.assertEqual(peer.connections[1].received[0], outbound_message("L1"))
        [l1, l2] = rig.deliveries()
        self.assertEqual((l1.attempts, l1.response), (2, destination_ack("L1")))
        self.assertEqual((l2.attempts, l2.response), (1, destination_ack("L2")))

    def test_unsolicited_reply_drops_the_connection(self) -> None:
        """A reply while nothing is in flight puts the connection out of step:
        it is closed, and the next message goes over a new one."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        rig.start()
        rig.enqueue("lane-u", DEST, ["U1"])
        rig.run_until(all_delivered(rig))
        first = peer.connections[0]
        first.reply(destination_ack("U1"))
        rig.clock.advance(0)
        self.assertTrue(first.closed)
        rig.enqueue("lane-u", DEST, ["U2"])
        rig.run_until(all_delivered(rig))
        self.assertEqual(len(peer.connections), 2)
        self.assertEqual(peer.current.received, [outbound_message("U2")])


class BadReplyTests(DeliveryTestCase):
    """docs/guarantees.md: a destination ACK with the wrong MSA-2, garbage, or no MSA."""

    def bad_then_good(self, bad: bytes, reason: str) -> None:
        """The first reply is ``bad``: not success, connection closed, retried."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        replies = [bad]

        def script(connection: PeerConnection, payload: bytes) -> None:
            if replies:
                connection.reply(replies.pop())
            else:
                connection.reply(destination_ack(control_id_of(payload)))

        peer.script = script
        rig.start()
        rig.enqueue("lane-bad", DEST, ["B1", "B2"])
        rig.clock.advance(0)
        first = peer.connections[0]
        self.assertTrue(first.transport.disconnecting, "closed on the bad reply")
        [head, second] = rig.deliveries()
        self.assertEqual((head.state, head.attempts, head.last_error), (QUEUED, 1, reason))
        self.assertEqual((head.response, head.response_code), (None, ""))
        self.assertEqual(second.attempts, 0)
        rig.run_until(all_delivered(rig))
        self.assertEqual(peer.received_ids(), ["B1", "B1", "B2"])
        self.assertEqual(len(peer.connections), 2)
        self.assertEqual(rig.delivery(head.id).response, destination_ack("B1"))

    def test_wrong_msa2(self) -> None:
        """An AA whose MSA-2 is not the MSH-10 sent is not success: closed, retried."""
        self.bad_then_good(
            destination_ack("SOMETHING-ELSE"), "reply MSA-2 does not match the MSH-10 sent"
        )

    def test_garbage(self) -> None:
        """A framed reply that is not HL7 is not success: closed, retried."""
        self.bad_then_good(
            b"\x00\xffnot hl7 at all", "unusable reply: reply does not start with MSH"
        )

    def test_no_msa(self) -> None:
        """A reply without an MSA segment is not success: closed, retried."""
        reply = destination_ack("B1").split(b"MSA")[0]
        self.bad_then_good(reply, "unusable reply: reply has no MSA segment")

    def test_bad_reply_does_not_disturb_another_lane(self) -> None:
        """Lanes to one destination take turns on its connection. A bad reply to
        one lane closes the connection before the next lane's message is written
        to it, so the other lane's message reaches the destination once, on a
        fresh connection (not also on the one about to be closed)."""
        rig = self.outbound()
        peer = rig.peer(DEST)

        def script(connection: PeerConnection, payload: bytes) -> None:
            control_id = control_id_of(payload)
            if control_id == "X1" and peer.received_ids().count("X1") == 1:
                connection.reply(destination_ack("NOT-X1"))
            else:
                connection.reply(destination_ack(control_id))

        peer.script = script
        rig.start()
        rig.enqueue("lane-x", DEST, ["X1"])
        rig.enqueue("lane-y", DEST, ["Y1"])
        rig.run_until(all_delivered(rig))
        self.assertEqual(peer.connections[0].received, [outbound_message("X1")])
        self.assertEqual(sorted(peer.received_ids()), ["X1", "X1", "Y1"])
        self.assertEqual(rig.deliveries()[0].attempts, 2)


class AttemptOutcomeTests(DeliveryTestCase):
    """Each recorded attempt is counted by destination and a fixed outcome (the
    metrics' ``udsgw_outbound_attempts_total``, the status endpoint)."""

    def counts(self, rig: Outbound) -> dict[str, int]:
        from udsgateway.store.destinations import address_of

        self.assertEqual(set(rig.dispatcher.attempts), {address_of(DEST)})
        return rig.dispatcher.attempts[address_of(DEST)]

    def scripted(self, replies: list[Callable[[PeerConnection, bytes], None]]) -> Outbound:
        """The peer answers each message with the next script of ``replies``, then AA."""
        rig = self.outbound()
        peer = rig.peer(DEST)

        def script(connection: PeerConnection, payload: bytes) -> None:
            if replies:
                replies.pop(0)(connection, payload)
            else:
                connection.reply(destination_ack(control_id_of(payload)))

        peer.script = script
        rig.start()
        rig.enqueue("lane-o", DEST, ["O1"])
        rig.run_until(all_delivered(rig))
        return rig

    def test_accepted(self) -> None:
        rig = self.scripted([])
        self.assertEqual(self.counts(rig), {"accepted": 1})

    def test_ae_is_an_error_then_accepted(self) -> None:
        rig = self.scripted([answer("AE", 207), answer("CE", 207)])
        self.assertEqual(self.counts(rig), {"error": 2, "accepted": 1})

    def test_ar_is_rejected(self) -> None:
        rig = self.outbound()
        rig.peer(DEST).script = answer("AR", 207)
        rig.start()
        rig.enqueue("lane-o", DEST, ["O1"])
        rig.run_until(lambda: rig.deliveries()[0].state == HELD)
        self.assertEqual(self.counts(rig), {"rejected": 1})

    def test_timeout(self) -> None:
        rig = self.scripted([silent])
        self.assertEqual(self.counts(rig), {"timeout": 1, "accepted": 1})

    def test_protocol_error(self) -> None:
        def wrong(connection: PeerConnection, _payload: bytes) -> None:
            connection.reply(destination_ack("SOMETHING-ELSE"))

        rig = self.scripted([wrong])
        self.assertEqual(self.counts(rig), {"protocol_error": 1, "accepted": 1})

    def test_connection_lost(self) -> None:
        def hang_up(connection: PeerConnection, _payload: bytes) -> None:
            connection.hang_up()

        rig = self.scripted([hang_up])
        self.assertEqual(self.counts(rig), {"connection_lost": 1, "accepted": 1})

    def test_connect_failed(self) -> None:
        rig = self.outbound()
        peer = rig.peer(DEST)
        peer.accepting = False
        rig.start()
        rig.enqueue("lane-o", DEST, ["O1"])
        rig.run_until(lambda: rig.deliveries()[0].attempts >= 2)
        peer.accepting = True
        rig.run_until(all_delivered(rig))
        counts = self.counts(rig)
        self.assertEqual(set(counts), {"connect_failed", "accepted"})
        self.assertGreaterEqual(counts["connect_failed"], 2)
        self.assertEqual(counts["accepted"], 1)

    def test_every_outcome_is_in_the_enum(self) -> None:
        from udsgateway.outbound import errors

        for error in (
            errors.DeliveryError,
            errors.ConnectError,
            errors.ReplyTimeoutError,
            errors.ConnectionLostError,
            errors.StoppedError,
            errors.StaleConnectionError,
        ):
            self.assertIn(error.outcome, errors.ATTEMPT_OUTCOMES)
        for code in ("AA", "AE", "AR", "CA", "CE", "CR", "ZZ"):
            self.assertIn(errors.ack_outcome(code), errors.ATTEMPT_OUTCOMES)


class NegativeAckTests(DeliveryTestCase):
    """docs/guarantees.md: a destination answers AE / AR / CE / CR; operators act on holds."""

    def held_after(self, code: str, sends: int) -> tuple[Outbound, DestinationPeer]:
        """``code`` to everything: the head is held after ``sends`` sends; nothing
        behind it is sent, however long we wait."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        peer.script = answer(code, 207)
        rig.start()
        rig.enqueue("lane-nak", DEST, ["N1", "N2", "N3"])
        rig.run_until(lambda: rig.deliveries()[0].state == HELD)
        rig.run_until(lambda: rig.clock.seconds() > 600)
        self.assertEqual(peer.received_ids(), ["N1"] * sends)
        self.assertEqual(states(rig), [("N1", HELD), ("N2", QUEUED), ("N3", QUEUED)])
        head = rig.deliveries()[0]
        self.assertEqual((head.attempts, head.response_code), (sends, code))
        self.assertEqual(head.response, destination_ack("N1", code, 207))
        self.assertEqual(rig.dispatcher.lanes["lane-nak"].state, "held")
        return rig, peer

    def test_ae_retried_then_held(self) -> None:
        """AE is retried max_retries (3) times, with backoff, then held with the reason."""
        rig, _peer = self.held_after("AE", 1 + DEFAULT_POLICY["max_retries"])
        head = rig.deliveries()[0]
        self.assertEqual(head.last_error, "AE from destination after 3 retries, ERR 207")

    def test_ce_retried_then_held(self) -> None:
        """CE (enhanced mode) is retried like AE, then held."""
        self.held_after("CE", 1 + DEFAULT_POLICY["max_retries"])

    def test_ar_held_at_once(self) -> None:
        """AR is held at once, with the reason and the ERR code."""
        rig, _peer = self.held_after("AR", 1)
        self.assertEqual(rig.deliveries()[0].last_error, "AR from destination, ERR 207")

    def test_cr_held_at_once(self) -> None:
        """CR is held at once."""
        self.held_after("CR", 1)

    def test_nak_retries_back_off(self) -> None:
        """Between AE retries the lane waits like after any failure: 1, 2, 4 s."""
        rig = self.outbound()
        log = schedule_log(rig.clock)
        rig.peer(DEST).script = answer("AE")
        rig.start()
        rig.enqueue("lane-ae", DEST, ["E1"])
        rig.run_until(lambda: rig.deliveries()[0].state == HELD)
        sleeps = [delay for _at, delay, what in log if what == "Deferred.callback" and delay > 0]
        for expected, delay in zip((1, 2, 4), sleeps[:3], strict=True):
            self.assertTrue(expected <= delay <= expected * 1.1, sleeps)
        self.assertEqual(sleeps[3:], [rig.held_poll], "then held: polls the store")

    def test_action_policy_overrides_default(self) -> None:
        """A per-action policy can hold AE at once, or retry AR."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        peer.script = answer("AE")
        rig.start()
        rig.enqueue("lane-p", DEST, ["P1"], policy={"max_retries": 0})
        rig.run_until(lambda: rig.deliveries()[0].state == HELD)
        self.assertEqual(peer.received_ids(), ["P1"])

    def test_release_sends_again(self) -> None:
        """After a release the held head is sent again (at once when the
        dispatcher is told), then the lane moves on; the audit log says who and why."""
        rig, peer = self.held_after("AR", 1)
        peer.script = answer("AA")
        head = rig.deliveries()[0]
        released = rig.database.transaction_now(
            delivery_action, head.id, "release", "alice", "mapping fixed", 700.0
        )
        self.assertEqual((released.state, released.attempts), (QUEUED, 0))
        rig.dispatcher.operator_acted("lane-nak")
        rig.clock.advance(0)
        self.assertEqual(peer.received_ids(), ["N1", "N1", "N2", "N3"])
        self.assertEqual([d.state for d in rig.deliveries()], [DELIVERED, DELIVERED, DELIVERED])
        [row] = audit_rows(rig)
        self.assertEqual(
            (row.who, row.action, row.reason, row.target),
            ("alice", "delivery.release", "mapping fixed", f"delivery {head.id} lane lane-nak"),
        )

    def test_skip_moves_on(self) -> None:
        """A skip done in the store alone (the CLI runs in another process) is
        seen at the next held poll: the skipped head is never sent again, the
        lane moves on, and the audit log says who and why."""
        rig, peer = self.held_after("AR", 1)
        peer.script = answer("AA")
        head = rig.deliveries()[0]
        rig.database.transaction_now(
            delivery_action, head.id, "skip", "bob", "duplicate order", 700.0
        )
        acted = rig.clock.seconds()
        done = rig.run_until(lambda: states(rig)[-1][1] == DELIVERED)
        self.assertLessEqual(done - acted, rig.held_poll + TICK)
        self.assertEqual(peer.received_ids(), ["N1", "N2", "N3"])
        self.assertEqual(states(rig), [("N1", SKIPPED), ("N2", DELIVERED), ("N3", DELIVERED)])
        self.assertEqual(rig.deliveries()[0].last_error, "skipped by bob")
        [row] = audit_rows(rig)
        self.assertEqual(
            (row.who, row.action, row.reason, row.target),
            ("bob", "delivery.skip", "duplicate order", f"delivery {head.id} lane lane-nak"),
        )

    def test_replay_sends_the_edited_payload(self) -> None:
        """A replay with an edited payload sends exactly the edited bytes, in the
        head's place, then the lane moves on."""
        rig, peer = self.held_after("AR", 1)
        peer.script = answer("AA")
        head = rig.deliveries()[0]
        edited = outbound_message("N1", body="PID|1||99999^^^HOSP")
        rig.database.transaction_now(
            delivery_action, head.id, "replay", "carol", "fixed PID-3", 700.0, edited
        )
        rig.dispatcher.operator_acted("lane-nak")
        rig.run_until(all_delivered(rig))
        self.assertEqual(
            peer.received[1:], [edited, outbound_message("N2"), outbound_message("N3")]
        )
        self.assertEqual(rig.deliveries()[0].payload, edited)
        [row] = audit_rows(rig)
        self.assertEqual((row.who, row.action), ("carol", "delivery.replay"))

    def test_replay_with_a_new_control_id(self) -> None:
        """A replay whose edited payload carries a new MSH-10 (destinations that
        deduplicate on it need one) is matched against the new MSH-10."""
        rig, peer = self.held_after("AR", 1)
        peer.script = answer("AA")
        head = rig.deliveries()[0]
        edited = outbound_message("N1-R1")
        rig.database.transaction_now(
            delivery_action, head.id, "replay", "carol", "new MSH-10", 700.0, edited
        )
        rig.dispatcher.operator_acted("lane-nak")
        rig.run_until(all_delivered(rig), limit=600)
        self.assertEqual(peer.received_ids(), ["N1", "N1-R1", "N2", "N3"])
        self.assertEqual(rig.deliveries()[0].control_id, "N1-R1")

    def test_held_lane_does_not_stop_others(self) -> None:
        """A destination stalled while others keep flowing: only its lane waits.
        A held lane blocks itself only: another lane to the same destination and a
        lane to another destination deliver everything meanwhile."""
        rig = self.outbound()
        dest = rig.peer(DEST)

        def reject_lane_a(connection: PeerConnection, payload: bytes) -> None:
            control_id = control_id_of(payload)
            code = "AR" if control_id.startswith("A") else "AA"
            connection.reply(destination_ack(control_id, code))

        dest.script = reject_lane_a
        other = rig.peer(OTHER)
        other.script = silent  # stalled: never answers
        rig.start()
        rig.enqueue("lane-a", DEST, ids("A", 3))
        rig.enqueue("lane-stalled", OTHER, ids("S", 3))
        rig.enqueue("lane-b", DEST, ids("B", 20))
        rig.enqueue("lane-c", "tcp:third.example:2575", ids("C", 20))
        rig.run_until(
            lambda: all(
                d.state == DELIVERED for lane in ("lane-b", "lane-c") for d in rig.deliveries(lane)
            )
        )
        self.assertEqual(dest.received_ids(), ["A00000", *ids("B", 20)])
        self.assertEqual(rig.peer("tcp:third.example:2575").received_ids(), ids("C", 20))
        self.assertEqual(states(rig, "lane-a")[0], ("A00000", HELD))
        self.assertEqual({s for _c, s in states(rig, "lane-stalled")}, {QUEUED})
        self.assertEqual(set(other.received_ids()), {"S00000"})


class StuckDeliveryTests(DeliveryTestCase):
    """An operator can act on any stuck delivery, held or queued (issue 17 item 0), and a
    replayed delivery goes before everything queued after it (issue 17 item 2)."""

    def wrong_ids_forever(self) -> tuple[Outbound, DestinationPeer]:
        """A head whose every reply has the wrong MSA-2: queued, resent forever."""
        rig = self.outbound()
        peer = rig.peer(DEST)

        def wrong_for_w1(connection: PeerConnection, payload: bytes) -> None:
            control_id = control_id_of(payload)
            connection.reply(
                destination_ack(control_id + "X" if control_id == "W1" else control_id)
            )

        peer.script = wrong_for_w1
        rig.start()
        rig.enqueue("lane-w", DEST, ["W1", "W2", "W3"])
        rig.run_until(lambda: len(peer.received) >= 4)
        self.assertEqual(set(peer.received_ids()), {"W1"})
        self.assertEqual(states(rig)[0], ("W1", QUEUED))
        return rig, peer

    def test_skip_a_queued_head_from_the_store(self) -> None:
        """A queued head that keeps failing is skipped from the store alone (the CLI):
        the running lane sees it at the next held poll, never sends it again, moves
        on; the reason is recorded with the state it was in."""
        rig, peer = self.wrong_ids_forever()
        head = rig.deliveries()[0]
        skipped = rig.database.transaction_now(
            delivery_action, head.id, "skip", "bob", "receiver mismatch", 700.0
        )
        self.assertEqual(skipped.state, SKIPPED)
        sent = len(peer.received)
        rig.run_until(lambda: states(rig)[-1][1] == DELIVERED, limit=60)
        self.assertEqual(peer.received_ids()[sent:], ["W2", "W3"])
        self.assertEqual(states(rig), [("W1", SKIPPED), ("W2", DELIVERED), ("W3", DELIVERED)])
        reasons = rig.database.transaction_now(
            lambda connection: (
                connection.execute(
                    select(schema.logs.c.reason).where(schema.logs.c.event == "operator")
                )
                .scalars()
                .all()
            )
        )
        self.assertEqual(reasons, ["skip of a queued delivery by bob: receiver mismatch"])

    def test_skip_while_an_attempt_is_out_stands(self) -> None:
        """An attempt's outcome recorded after an operator skipped its delivery does
        not make it queued again."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        peer.script = silent
        rig.start()
        rig.enqueue("lane-s", DEST, ["S1", "S2"])
        rig.run_until(lambda: len(peer.received) == 1)
        head = rig.deliveries()[0]
        rig.database.transaction_now(delivery_action, head.id, "skip", "bob", "x", 1.0)
        peer.script = answer("AA")
        rig.run_until(lambda: states(rig)[-1][1] == DELIVERED, limit=600)
        self.assertEqual(states(rig), [("S1", SKIPPED), ("S2", DELIVERED)])

    def test_release_a_queued_head_without_control_id(self) -> None:
        """A delivery queued with an empty control ID (by an older version) is released:
        its control ID is read from its payload, and it is delivered once."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        rig.enqueue("lane-e", DEST, ["E1", "E2"])
        rig.database.transaction_now(
            lambda connection: connection.execute(
                schema.deliveries.update()
                .where(schema.deliveries.c.control_id == "E1")
                .values(control_id="")
            )
        )
        rig.start()
        rig.run_until(lambda: len(peer.received) >= 3)
        self.assertEqual(states(rig)[0], ("", QUEUED))
        head = rig.deliveries()[0]
        released = rig.database.transaction_now(
            delivery_action, head.id, "release", "alice", "empty id", 700.0
        )
        self.assertEqual((released.control_id, released.state), ("E1", QUEUED))
        rig.run_until(all_delivered(rig), limit=600)
        self.assertEqual(states(rig), [("E1", DELIVERED), ("E2", DELIVERED)])

    def backlog(self) -> tuple[Outbound, DestinationPeer, Delivery]:
        """A lane whose first delivery R0 was delivered, then 300 queued after it that
        the destination takes one a second."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        rig.start()
        rig.enqueue("lane-r", DEST, ["R0"])
        rig.run_until(all_delivered(rig))
        peer.latency = 1.0
        rig.enqueue("lane-r", DEST, ids("B", 300))
        rig.run_until(lambda: len(peer.received) == 11)
        first = rig.deliveries()[0]
        self.assertEqual((first.control_id, first.state), ("R0", DELIVERED))
        return rig, peer, first

    def test_replay_from_the_store_goes_before_the_backlog(self) -> None:
        """A replay done in the store alone (the CLI) while 290 messages are queued
        after it: the running lane sends it next after the held poll finds it, long
        before the backlog drains; then the backlog continues in order."""
        rig, peer, first = self.backlog()
        rig.database.transaction_now(
            delivery_action, first.id, "replay", "carol", "partner lost it", 700.0
        )
        sent = len(peer.received)
        rig.run_until(all_delivered(rig), limit=3600)
        after = peer.received_ids()[sent:]
        # At most what goes out before the next sweep (held_poll at one a second) and
        # the message in flight then.
        self.assertLessEqual(after.index("R0"), int(rig.held_poll) + 1)
        self.assertEqual([c for c in after if c != "R0"], ids("B", 300)[sent - 1 :])
        self.assertEqual(after.count("R0"), 1)

    def test_replay_told_to_the_dispatcher_goes_next(self) -> None:
        """A replay the dispatcher is told of (in-process): the replayed delivery is the
        next message sent after the one in flight."""
        rig, peer, first = self.backlog()
        rig.database.transaction_now(
            delivery_action, first.id, "replay", "carol", "partner lost it", 700.0
        )
        rig.dispatcher.operator_acted("lane-r")
        sent = len(peer.received)
        rig.run_until(all_delivered(rig), limit=3600)
        after = peer.received_ids()[sent:]
        # B00009 was in flight (answered a second after it was sent).
        self.assertEqual(after[0], "R0")
        self.assertEqual(after[1:], ids("B", 300)[10:])


class RecoveryTests(DeliveryTestCase):
    """docs/guarantees.md: kill -9 with outbound messages not ACKed; restart with 100,000."""

    def test_left_queued_sent_first_in_order(self) -> None:
        """Rows left queued by a killed process, the one in flight included, are
        sent first after recover(), in order, before deliveries enqueued later;
        recovered lanes start in the order of their oldest row."""
        first = self.outbound()
        first.peer(DEST).script = silent
        first.peer(OTHER).script = silent
        first.start()
        first.enqueue("lane-k", DEST, ids("K", 4))
        first.enqueue("lane-j", OTHER, ids("J", 2))
        first.clock.advance(0)
        self.assertEqual(first.peer(DEST).received_ids(), ["K00000"], "in flight at the kill")
        self.assertEqual(first.peer(OTHER).received_ids(), ["J00000"], "in flight at the kill")
        # kill -9: the first process is gone without a word; a new one starts.
        clock = Clock()
        clock.advance(first.clock.seconds() + 60)
        second = self.outbound(database=first.database, clock=clock, max_active_lanes=1)
        log = second.peer(DEST)
        second.peers[OTHER] = log
        self.assertEqual(second.dispatcher.lanes, {})
        second.start()
        self.assertEqual(second.dispatcher.queued, {DEST: 4, OTHER: 2})
        second.enqueue("lane-k", DEST, ["NEW-K"])
        second.enqueue("lane-n", OTHER, ["NEW-N"])
        second.run_until(all_delivered(second))
        self.assertEqual(log.received_ids(), [*ids("K", 4), "NEW-K", *ids("J", 2), "NEW-N"])

    def test_hundred_thousand_queued_memory_bounded(self) -> None:
        """Restart with 100,000 queued deliveries: recovery loads counters and
        lanes, not rows; while draining, the lanes hold at most page_size
        deliveries each and at most max_active_lanes lanes run, so the Delivery
        objects alive in the process never exceed page_size * max_active_lanes;
        order is kept across pages and across lanes taking turns."""
        page_size, active = 64, 2
        database = memory_database()
        # Two short lanes first (oldest rows), then two long ones, interleaved.
        short = [("mem-a", f"A{i:06d}") for i in range(300)] + [
            ("mem-b", f"B{i:06d}") for i in range(300)
        ]
        long_rows = [
            ("mem-c" if i % 2 == 0 else "mem-d", f"{'C' if i % 2 == 0 else 'D'}{i:06d}")
            for i in range(100_000 - len(short))
        ]
        rows = [
            {
                "execution_id": None,
                "step": 0,
                "lane": lane,
                "destination": DEST,
                "protocol": "mllp",
                "control_id": control_id,
                "payload": outbound_message(control_id),
                "state": QUEUED,
                "attempts": 0,
                "next_attempt_at": 0.0,
                "last_error": "",
                "response": None,
                "response_code": "",
                "policy": "{}",
                "created_at": 0.0,
                "updated_at": 0.0,
                "lease_owner": "",
            }
            for lane, control_id in short + long_rows
        ]
        database.transaction_now(lambda c, r: c.execute(schema.deliveries.insert(), r), rows)
        del rows
        lanes = {"mem-a", "mem-b", "mem-c", "mem-d"}
        bound = page_size * active

        rig = self.outbound(database=database, page_size=page_size, max_active_lanes=active)
        peer = rig.peer(DEST)
        held: list[int] = []

        def in_lanes() -> int:
            running = rig.dispatcher.lanes.values()
            self.assertLessEqual(len(running), active)
            return sum(len(lane._page) for lane in running)

        def alive() -> int:
            gc.collect()
            return sum(1 for o in gc.get_objects() if isinstance(o, Delivery) and o.lane in lanes)

        def script(connection: PeerConnection, payload: bytes) -> None:
            held.append(in_lanes())
            if len(peer.received) % 250 == 1:
                self.assertLessEqual(alive(), bound)
            connection.reply(destination_ack(control_id_of(payload)))

        peer.script = script
        # Each reply takes a moment of clock time, so the drain can be watched
        # (and stopped) step by step rather than run to the end at once.
        peer.latency = 0.001
        tracemalloc.start()
        try:
            rig.start()
            _size, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Measured: about 0.5 MB (two pages of 64, and the SQL compiled for
        # them). One page of 25,000 of these rows takes 17 MB, so loading the
        # backlog, or even a large part of it, would break this 4 MB bound.
        self.assertLess(peak, 4 * 1024 * 1024)
        self.assertEqual(rig.dispatcher.queued, {DEST: 100_000})
        self.assertEqual(set(rig.dispatcher.lanes), {"mem-a", "mem-b"})
        self.assertLessEqual(alive(), bound)

        drained = 600 + 4 * page_size
        rig.run_until(lambda: len(peer.received) >= drained)
        self.assertLessEqual(max(held), bound)
        self.assertLessEqual(alive(), bound)
        received = peer.received_ids()
        for prefix, count in (("A", 300), ("B", 300)):
            self.assertEqual(
                [c for c in received if c.startswith(prefix)],
                [f"{prefix}{i:06d}" for i in range(count)],
            )
        self.assertEqual(received[-1][0] in "CD", True)
        c_sent = [c for c in received if c.startswith("C")]
        d_sent = [c for c in received if c.startswith("D")]
        self.assertEqual(c_sent, [f"C{i:06d}" for i in range(0, 2 * len(c_sent), 2)])
        self.assertEqual(d_sent, [f"D{i:06d}" for i in range(1, 2 * len(d_sent), 2)])
        self.assertGreater(len(c_sent), page_size)
        self.assertGreater(len(d_sent), page_size)
        self.assertEqual(set(rig.dispatcher.lanes), {"mem-c", "mem-d"})

    def test_outcome_not_recorded_pauses_the_lane_and_sends_once(self) -> None:
        """docs/guarantees.md: the partner ACKed but the outcome cannot be committed
        (the database fails, for a minute). The lane sends nothing more: the
        outcome is kept in memory and committed again after 1, 2, 4 ... s (at
        most 30 s); once the store works it is recorded, and the lane goes on.
        The partner gets exactly one copy of each message; the lane is never
        restarted and logs no traceback."""
        rig = self.outbound()
        peer = rig.peer(DEST)
        peer.latency = 0.01
        failing = [True]
        refused = [0]

        def broken_disk() -> None:
            if failing[0]:
                refused[0] += 1
                raise OperationalError("UPDATE deliveries", {}, Exception("disk I/O error"))

        rig.dispatcher._committer.before_batch = broken_disk
        log = schedule_log(rig.clock)
        rig.start()
        rig.enqueue("lane-disk", DEST, ["D1", "D2"])
        lane = rig.dispatcher.lanes["lane-disk"]
        rig.run_until(lambda: rig.clock.seconds() >= 60)
        self.assertEqual(peer.received_ids(), ["D1"])
        self.assertEqual(lane.state, "recording")
        self.assertIs(rig.dispatcher.lanes["lane-disk"], lane, "never restarted")
        retries = [delay for _at, delay, what in log if what == "Deferred.callback"]
        self.assertEqual(retries[:6], [1, 2, 4, 8, 16, 30])
        self.assertEqual(refused[0], len(retries))
        failing[0] = False
        rig.run_until(all_delivered(rig))
        self.assertEqual(peer.received_ids(), ["D1", "D2"])
        self.assertEqual(states(rig), [("D1", DELIVERED), ("D2", DELIVERED)])
        self.assertEqual(self.flushLoggedErrors(), [])


class BackpressureTests(DeliveryTestCase):
    """is_full: the per-destination queue cap that makes ingest NAK (207)."""

    def test_full_at_the_cap_then_not_after_draining(self) -> None:
        """is_full is true once a destination holds its cap of open deliveries,
        for that destination only, and false again once they are delivered."""
        rig = self.outbound(max_queued_per_destination=3)
        peer = rig.peer(DEST)
        peer.script = silent
        rig.start()
        rig.enqueue("lane-bp", DEST, ["P1", "P2"])
        self.assertFalse(rig.dispatcher.is_full(DEST))
        rig.enqueue("lane-bp2", DEST, ["P3"])
        self.assertTrue(rig.dispatcher.is_full(DEST))
        self.assertFalse(rig.dispatcher.is_full(OTHER))
        rig.clock.advance(0)
        peer.script = answer("AA")
        peer.current.reply(destination_ack("P1"))
        rig.clock.advance(0)
        self.assertEqual(states(rig)[0], ("P1", DELIVERED))
        self.assertFalse(rig.dispatcher.is_full(DEST))
        rig.run_until(all_delivered(rig), limit=600)
        self.assertEqual(rig.dispatcher.queued[DEST], 0)

    def test_counters_recovered_from_the_store(self) -> None:
        """At start the counters come from the store: open rows, held ones included."""
        database = memory_database()
        before = Outbound(database=database)
        before.enqueue("lane-r", DEST, ["R1", "R2"], notify=False)
        rig = self.outbound(database=database, max_queued_per_destination=2)
        self.assertFalse(rig.dispatcher.is_full(DEST))
        rig.start()
        self.assertTrue(rig.dispatcher.is_full(DEST))
        rig.run_until(all_delivered(rig))
        self.assertFalse(rig.dispatcher.is_full(DEST))

    def test_held_counts_until_skipped(self) -> None:
        """A held delivery keeps its place under the cap; skipping it frees it."""
        rig = self.outbound(max_queued_per_destination=1)
        rig.peer(DEST).script = answer("AR")
        rig.start()
        [held] = rig.enqueue("lane-s", DEST, ["H1"])
        rig.run_until(lambda: rig.delivery(held).state == HELD)
        self.assertTrue(rig.dispatcher.is_full(DEST))
        rig.database.transaction_now(delivery_action, held, "skip", "dan", "bad", 1.0)
        rig.run_until(lambda: "lane-s" not in rig.dispatcher.lanes)
        self.assertFalse(rig.dispatcher.is_full(DEST))


class OrderingTests(DeliveryTestCase):
    """G2 under faults: in order per lane, duplicates only where at-least-once allows."""

    def test_random_faults_keep_order(self) -> None:
        """3,000 messages over six lanes (some named by ordering key) to two
        destinations that fail at random (seeded): refused connects, connections
        dropped before or after reading, no reply, a reply after the timeout,
        garbage, wrong MSA-2, AE. Every message is delivered; per lane the
        arrivals are the enqueue order with repeats only back to back, and a
        message is sent again only while no AA for it has reached the gateway."""
        timing = Timing(
            connect_timeout=2.0, response_timeout=3.0, backoff_initial=0.25, backoff_max=4.0
        )
        rig = self.outbound(timing=timing, seed=7)
        rng = random.Random(20240601)
        lanes = {
            "lab-flow-1": DEST,
            "lab-flow-1#patient-0001": DEST,
            "lab-flow-1#patient-0002": DEST,
            "billing-flow": OTHER,
            "billing-flow#account-77": OTHER,
            "billing-flow#account-78": OTHER,
        }
        expected = {lane: ids(f"{n}-", PER_LANE) for n, lane in enumerate(lanes)}
        lane_of = {c: lane for lane, cs in expected.items() for c in cs}
        arrivals: dict[str, list[str]] = {lane: [] for lane in lanes}
        faults: dict[str, int] = {}

        acks: list[str] = []  # MSA-2 of every AA that reached the gateway, for a message sent
        done: set[str] = set()
        read = {DEST: 0, OTHER: 0}

        def acked() -> list[str]:
            for endpoint, count in read.items():
                replies = rig.peer(endpoint).delivered
                for reply in replies[count:]:
                    if b"\rMSA|AA|" in reply:
                        control_id = reply.split(b"\rMSA|AA|")[1].split(b"\r")[0].decode()
                        if control_id in lane_of:
                            acks.append(control_id)
                            done.add(control_id)
                read[endpoint] = len(replies)
            return acks

        def chaos_for(peer: DestinationPeer) -> Callable[[PeerConnection, bytes], None]:
            def chaos(connection: PeerConnection, payload: bytes) -> None:
                control_id = control_id_of(payload)
                acked()
                self.assertNotIn(control_id, done, "sent again after its AA arrived")
                fault = rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
                faults[fault] = faults.get(fault, 0) + 1
                if fault == "lost":  # the connection broke before the destination read it
                    connection.hang_up()
                    return
                arrivals[lane_of[control_id]].append(control_id)
                if fault == "dropped":  # read, then the connection broke
                    connection.hang_up()
                elif fault == "late":
                    connection.reply(destination_ack(control_id), delay=timing.response_timeout)
                elif fault == "garbage":
                    connection.reply(b"\x00\x01garbage\xff")
                elif fault == "wrong-id":
                    connection.reply(destination_ack(control_id + "X"))
                elif fault == "AE":
                    connection.reply(destination_ack(control_id, "AE"))
                elif fault in ("AA", "AA-then-refuse"):
                    if fault == "AA-then-refuse":
                        peer.refuse_next = rng.randint(1, 3)
                    connection.reply(
                        destination_ack(control_id), delay=rng.choice((0.0, 0.01, 0.5))
                    )

            return chaos

        for endpoint in (DEST, OTHER):
            rig.peer(endpoint).script = chaos_for(rig.peer(endpoint))
        rig.start()
        policy = {"max_retries": 1_000}  # AE is retried here, never held
        for lane, control_ids in expected.items():
            rig.enqueue(lane, lanes[lane], control_ids[: PER_LANE // 2], policy=policy)
        rig.clock.advance(1)
        # The rest arrives while the first half is being sent.
        for lane, control_ids in expected.items():
            rig.enqueue(lane, lanes[lane], control_ids[PER_LANE // 2 :], policy=policy)
        # Cheap to test at every step: a lane goes idle only when nothing is open in it.
        rig.run_until(lambda: not rig.dispatcher.lanes, limit=30 * 86_400)

        self.assertEqual({d.state for d in rig.deliveries()}, {DELIVERED})
        for lane, control_ids in expected.items():
            # In order, every message, repeats only back to back.
            collapsed = [
                c for i, c in enumerate(arrivals[lane]) if i == 0 or arrivals[lane][i - 1] != c
            ]
            self.assertEqual(collapsed, control_ids, lane)
        # Exactly one AA per message reached the gateway: none was sent again after it.
        self.assertEqual(sorted(acked()), sorted(lane_of))
        for fault in FAULTS:
            self.assertGreater(faults.get(fault, 0), PER_LANE // 25, (fault, faults))
        self.assertGreater(rig.peer(DEST).refused + rig.peer(OTHER).refused, PER_LANE // 25)
        duplicates = sum(len(a) for a in arrivals.values()) - len(lane_of)
        self.assertGreater(duplicates, len(lane_of) // 20)


class ManyLanesTests(DeliveryTestCase):
    """Issue 17 item 3: hundreds of lanes through outages; none is ever left behind."""

    def test_hundreds_of_lanes_through_outages_all_delivered_in_order(self) -> None:
        """400 lanes over two destinations (seeded, randomized): messages are
        enqueued at every moment while each destination switches between
        answering AA, closing after each ACK, accepting and closing at once,
        refusing, and answering garbage. Turns are handed over in a loop, so no
        chain of calls grows with the number of lanes: no RecursionError, no
        error logged at all. In the end every message is delivered, in order
        per lane (repeats only back to back), and every lane goes idle."""
        timing = Timing(
            connect_timeout=2.0, response_timeout=3.0, backoff_initial=0.25, backoff_max=4.0
        )
        rig = self.outbound(timing=timing, seed=17)
        rng = random.Random(20261207)
        lanes = [f"many-{n:03d}" for n in range(400)]
        endpoint_of = {lane: (DEST if n % 4 else OTHER) for n, lane in enumerate(lanes)}
        modes = ("ack", "ack", "close-after-ack", "accept-close", "refuse", "garbage")
        # All lanes start at once behind a destination whose replies are garbage:
        # each bad reply closes the connection with every other lane waiting its turn.
        mode = {DEST: "garbage", OTHER: "accept-close"}
        expected: dict[str, list[str]] = {lane: [] for lane in lanes}
        arrivals: dict[str, list[str]] = {lane: [] for lane in lanes}
        lane_of: dict[str, str] = {}
        seen_modes: set[str] = set()

        def script_for(endpoint: str) -> Callable[[PeerConnection, bytes], None]:
            def script(connection: PeerConnection, payload: bytes) -> None:
                control_id = control_id_of(payload)
                now = mode[endpoint]
                if now == "accept-close":  # closed before the message was read
                    connection.hang_up()
                    return
                arrivals[lane_of[control_id]].append(control_id)
                if now == "garbage":
                    connection.reply(b"\x00garbage")
                    return
                connection.reply(destination_ack(control_id), delay=0.0)
                if now == "close-after-ack":
                    rig.clock.callLater(0, connection.hang_up)

            return script

        def switch(endpoint: str, new: str) -> None:
            seen_modes.add(new)
            mode[endpoint] = new
            peer = rig.peer(endpoint)
            peer.accepting = new != "refuse"
            if new in ("accept-close", "refuse"):
                for connection in peer.open_connections():
                    connection.hang_up()

        def enqueue(lane: str, count: int) -> None:
            start = len(expected[lane])
            control_ids = [f"{lane[-3:]}M{start + k:04d}" for k in range(count)]
            for control_id in control_ids:
                lane_of[control_id] = lane
            expected[lane].extend(control_ids)
            rig.enqueue(lane, endpoint_of[lane], control_ids)

        for endpoint in (DEST, OTHER):
            rig.peer(endpoint).script = script_for(endpoint)
        rig.start()
        for lane in lanes:
            enqueue(lane, 2)
        at = 0.0
        while at < 120.0:
            at += rng.expovariate(4.0)
            if rng.random() < 0.15:
                endpoint = rng.choice((DEST, OTHER))
                rig.clock.callLater(at, switch, endpoint, rng.choice(modes))
            else:
                rig.clock.callLater(at, enqueue, rng.choice(lanes), rng.randint(1, 3))
        rig.run_until(lambda: rig.clock.seconds() >= 121.0)
        for endpoint in (DEST, OTHER):
            switch(endpoint, "ack")
        rig.run_until(lambda: not rig.dispatcher.lanes, limit=3_600)

        gc.collect()  # an unhandled error in a Deferred is logged when it is collected
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(set(modes), seen_modes)
        self.assertGreater(rig.peer(DEST).refused + rig.peer(OTHER).refused, 0)
        self.assertEqual({d.state for d in rig.deliveries()}, {DELIVERED})
        self.assertEqual(len(rig.deliveries()), len(lane_of))
        for lane in lanes:
            collapsed = [
                c for i, c in enumerate(arrivals[lane]) if i == 0 or arrivals[lane][i - 1] != c
            ]
            self.assertEqual(collapsed, expected[lane], lane)

    def test_lane_that_fails_to_start_is_retried(self) -> None:
        """A lane whose start raises (its endpoint cannot be made, say) is
        logged and started again held_poll seconds later, not forgotten, even
        with no sweep to find it again; once it starts it delivers."""
        rig = self.outbound(held_poll=60.0)
        peer = rig.peer(DEST)
        broken = [2]
        make_endpoint = rig.dispatcher.endpoint_factory

        def flaky(reactor: Any, description: str) -> IStreamClientEndpoint:
            if broken[0] > 0:
                broken[0] -= 1
                raise ValueError("endpoint not ready")
            return make_endpoint(reactor, description)

        rig.dispatcher.endpoint_factory = flaky
        rig.start()
        sweeper = rig.dispatcher._sweeper
        assert sweeper is not None
        sweeper.stop()  # the periodic rescan would find the lane too: not here
        rig.enqueue("lane-flaky", DEST, ["F1", "F2"])
        self.assertEqual(rig.dispatcher.lanes, {})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        rig.clock.advance(rig.held_poll)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        done = rig.run_until(all_delivered(rig), limit=3 * rig.held_poll)
        self.assertEqual(done, 2 * rig.held_poll)
        self.assertEqual(rig.dispatcher.lanes, {})
        self.assertEqual(peer.received_ids(), ["F1", "F2"])


class StopTests(DeliveryTestCase):
    """stopService leaves nothing behind."""

    def test_stop_leaves_no_delayed_calls(self) -> None:
        """After stopService no delayed call is left on the clock and no lane runs,
        whatever the lanes were doing: backing off, connecting, waiting for a reply,
        waiting for their turn, or held; connections are closed and the row in
        flight is not counted as an attempt."""
        rig = Outbound()
        refused = rig.peer("tcp:refused:1")
        refused.accepting = False
        rig.peer("tcp:silent:1").script = silent
        rig.peer("tcp:held:1").script = answer("AR")
        rig.start()
        rig.enqueue("lane-backoff", "tcp:refused:1", ["Z1"])
        rig.enqueue("lane-reply", "tcp:silent:1", ["Z2"])
        rig.enqueue("lane-turn", "tcp:silent:1", ["Z3"])
        rig.enqueue("lane-held", "tcp:held:1", ["Z4"])
        rig.clock.advance(0)
        rig.clock.advance(2.5)
        rig.enqueue("lane-connect", "tcp:late:1", ["Z5"])
        lanes = rig.dispatcher.lanes
        self.assertEqual(
            {name: lane.state for name, lane in lanes.items()},
            {
                "lane-backoff": "backoff",
                "lane-reply": "sending",
                "lane-turn": "sending",
                "lane-held": "held",
                "lane-connect": "sending",
            },
        )
        self.assertNotEqual(rig.clock.getDelayedCalls(), [])
        rig.stop()
        self.assertEqual(rig.clock.getDelayedCalls(), [])
        self.assertEqual(rig.dispatcher.lanes, {})
        for peer in rig.peers.values():
            self.assertEqual(peer.open_connections(), [])
        self.assertEqual(rig.deliveries("lane-reply")[0].attempts, 0)
        self.assertEqual(rig.deliveries("lane-turn")[0].attempts, 0)

    def test_stop_before_recover(self) -> None:
        """Stopping a dispatcher that never started is harmless."""
        rig = Outbound()
        rig.stop()
        self.assertEqual(rig.clock.getDelayedCalls(), [])


@implementer(IDeliveryOutcomes)
class RecordedOutcomes:
    """An ``IDeliveryOutcomes`` that records what it is told (or fails, as told)."""

    def __init__(self, broken: bool = False) -> None:
        self.settled: list[list[str | None]] = []
        self.unlocked: list[Any] = []
        self.broken = broken

    def after_record(self, connection: Any, settled: list[Any], found: Any) -> Any:
        self.settled.append([item.control_id for item in settled])
        return ("advanced", len(settled))

    def on_recorded(self, group: Any) -> None:
        if self.broken:
            raise RuntimeError("bug")
        self.unlocked.append(group)


class RecordTests(DeliveryTestCase):
    """Outcomes committed in one group: each lane gets its own."""

    def test_every_lane_of_a_group_gets_its_own_outcome(self) -> None:
        """Three outcomes committed in one group: each record() fires with its own
        settlement (the group's result is no longer carried by the first one
        only), and what the commit unlocked goes to on_recorded exactly once,
        even when the first and last lanes stopped waiting for it."""
        rig = self.outbound()
        outcomes = RecordedOutcomes()
        rig.dispatcher.outcomes = outcomes
        rig.dispatcher._committer.clock = rig.clock  # group what arrives in one turn
        ids = rig.enqueue("lane-g1", DEST, ["G1", "G2", "G3"], notify=False)
        settlements = [
            Settlement(ids[0], DELIVERED, 1, 0.0, "", b"MSH|", "AA", control_id="G1"),
            Settlement(ids[1], HELD, 1, 0.0, "AR", b"MSH|", "AR", control_id="G2"),
            Settlement(ids[2], DELIVERED, 1, 0.0, "", b"MSH|", "CA", control_id="G3"),
        ]
        waiting = [rig.dispatcher.record(settlement) for settlement in settlements]
        waiting[0].cancel()  # its lane was stopped meanwhile
        waiting[2].cancel()
        self.failureResultOf(waiting[0], CancelledError)
        self.failureResultOf(waiting[2], CancelledError)
        rig.clock.advance(0)
        self.assertEqual(rig.dispatcher._committer.groups, 1)
        self.assertEqual(self.successResultOf(waiting[1]), settlements[1])
        self.assertEqual(outcomes.settled, [["G1", "G2", "G3"]])
        self.assertEqual(outcomes.unlocked, [("advanced", 3)])
        self.assertEqual(states(rig), [("G1", DELIVERED), ("G2", HELD), ("G3", DELIVERED)])

    def test_each_outcome_of_a_group_reaches_its_own_lane(self) -> None:
        """Nothing cancelled: every record() of a group fires with its own
        settlement, in any order, and on_recorded runs once for the group."""
        rig = self.outbound()
        outcomes = RecordedOutcomes()
        rig.dispatcher.outcomes = outcomes
        rig.dispatcher._committer.clock = rig.clock
        ids = rig.enqueue("lane-g3", DEST, ["K1", "K2", "K3", "K4"], notify=False)
        settlements = [
            Settlement(delivery_id, DELIVERED, 1, 0.0, "", b"MSH|", "AA", control_id=f"K{n}")
            for n, delivery_id in enumerate(ids, 1)
        ]
        waiting = [rig.dispatcher.record(settlement) for settlement in settlements]
        rig.clock.advance(0)
        self.assertEqual(rig.dispatcher._committer.groups, 1)
        self.assertEqual([self.successResultOf(each) for each in waiting], settlements)
        self.assertEqual(outcomes.unlocked, [("advanced", 4)])

    def test_lanes_recorded_in_one_group_all_move_on(self) -> None:
        """Lanes to three destinations whose outcomes share group commits: every
        lane learns its own outcome and goes on to its next message; the
        executor-side hook hears of every settled delivery once."""
        rig = self.outbound()
        outcomes = RecordedOutcomes()
        rig.dispatcher.outcomes = outcomes
        rig.dispatcher._committer.clock = rig.clock
        endpoints = [DEST, OTHER, "tcp:pharmacy.example:2575"]
        rig.start()
        for n, endpoint in enumerate(endpoints):
            rig.enqueue(f"lane-m{n}", endpoint, [f"M{n}A", f"M{n}B", f"M{n}C"])
        rig.run_until(all_delivered(rig))
        committer = rig.dispatcher._committer
        self.assertEqual(committer.committed, 9)
        self.assertLess(committer.groups, committer.committed, "some outcomes shared a group")
        for n, endpoint in enumerate(endpoints):
            self.assertEqual(rig.peer(endpoint).received_ids(), [f"M{n}A", f"M{n}B", f"M{n}C"])
        settled = sorted(c for group in outcomes.settled for c in group if c is not None)
        self.assertEqual(settled, sorted(f"M{n}{x}" for n in range(3) for x in "ABC"))
        self.assertEqual(len(outcomes.unlocked), committer.groups)

    def test_a_failing_on_recorded_does_not_record_again(self) -> None:
        """When handling a committed group fails (a bug in on_recorded), the error
        is logged and the lane still gets its outcome: it never commits it again."""
        rig = self.outbound()
        rig.dispatcher.outcomes = RecordedOutcomes(broken=True)
        [delivery_id] = rig.enqueue("lane-g2", DEST, ["G3"], notify=False)
        settlement = Settlement(delivery_id, DELIVERED, 1, 0.0, "", b"MSH|", "AA")
        self.assertEqual(self.successResultOf(rig.dispatcher.record(settlement)), settlement)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(rig.dispatcher._committer.committed, 1)

    def test_one_source_of_policy_defaults(self) -> None:
        """The policy a delivery falls back to is the one an action gets by default."""
        action = Action("a", "lab.example", 2575, "ADT^A04", "{{ msg }}")
        self.assertEqual(DEFAULT_POLICY, {**action.policy, "max_retries": action.max_retries})

    def test_one_source_of_timing_defaults(self) -> None:
        """A destination's default timing is the one an action gets by default, and
        what an action stores with its deliveries is read back as its timing."""
        action = Action("a", "lab.example", 2575, "ADT^A04", "{{ msg }}")
        timing = Timing()
        for key in TIMING_KEYS:
            self.assertEqual(getattr(timing, key), getattr(action, key), key)
        custom = evolve(action, connect_timeout=3.0, backoff_max=9.0)
        self.assertEqual(
            timing.with_policy(custom.delivery_policy),
            Timing(connect_timeout=3.0, backoff_max=9.0),
        )
        # The common case, a policy that repeats the timing: the same Timing serves.
        self.assertIs(timing.with_policy(action.delivery_policy), timing)
        self.assertIs(timing.with_policy({}), timing)
        self.assertEqual(timing.with_policy({"backoff_max": "9"}), Timing(backoff_max=9.0))


class TimingTests(SynchronousTestCase):
    """Timing.backoff: exponential, capped, jitter bounded."""

    def test_backoff(self) -> None:
        """Without jitter the waits double from backoff_initial up to backoff_max;
        jitter adds at most 10 %."""
        timing = Timing(backoff_initial=1.0, backoff_max=60.0)
        self.assertEqual([timing.backoff(n) for n in range(1, 9)], [1, 2, 4, 8, 16, 32, 60, 60])
        self.assertEqual(timing.backoff(10_000), 60.0)
        rng = random.Random(3)
        for n in range(1, 12):
            delay = timing.backoff(n, rng)
            self.assertTrue(timing.backoff(n) <= delay <= timing.backoff(n) * 1.1)


class TurnTests(SynchronousTestCase):
    """Lanes take turns on a destination's connection (a DeferredLock), without recursion."""

    def pending_destination(self) -> tuple[Destination, list[Deferred[Any]]]:
        """A destination whose connects wait until the test fires them."""
        connects: list[Deferred[Any]] = []

        @implementer(IStreamClientEndpoint)
        class PendingEndpoint:
            def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
                connecting: Deferred[Any] = Deferred()
                connects.append(connecting)
                return connecting

        destination = Destination(
            DEST, "mllp", Clock(), Timing(), endpoint_factory=lambda _r, _e: PendingEndpoint()
        )
        destination.start(None)
        return destination, connects

    def test_thousands_of_turns_handed_over_at_a_constant_depth(self) -> None:
        """3,000 exchanges wait for their turn behind a connect that then fails:
        each one after it fails at once (the reconnect backoff) and hands the
        turn on. The hand-overs run in a loop: every exchange fails at the same
        stack depth, where a chain of releases would grow by several frames per
        exchange (and overflow the recursion limit long before the last one)."""
        destination, connects = self.pending_destination()
        depths: list[int] = []

        def failed(failure: Failure) -> None:
            failure.trap(ConnectError)
            frame: FrameType | None = sys._getframe()
            depth = 0
            while frame is not None:
                depth += 1
                frame = frame.f_back
            depths.append(depth)

        for _ in range(3_000):
            Deferred.fromCoroutine(destination.exchange(b"MSH|", bytes)).addErrback(failed)
        self.assertEqual((len(connects), destination.waiting), (1, 2_999))
        connects[0].errback(ConnectionRefusedError("refused"))
        self.assertEqual(len(depths), 3_000)
        # The first exchange fails last: it hands over the turn before it returns.
        [(_depth, count)] = Counter(depths).most_common(1)
        self.assertEqual(count, 2_999, "every hand-over at the same depth")
        self.assertLess(max(depths) - min(depths), 10)
        self.assertEqual(destination.waiting, 0)
        self.assertEqual(len(connects), 1, "no connect during the reconnect backoff")
        # The turn is free again: the next exchange takes it at once.
        later = Deferred.fromCoroutine(destination.exchange(b"MSH|", bytes))
        self.failureResultOf(later, ConnectError)

    def test_an_uncontended_turn_is_taken_without_the_lock_deferreds(self) -> None:
        """With nobody holding the turn, an exchange takes it without
        ``DeferredLock.acquire``; exchanges that find it held wait in it, in
        order, and each gets the turn when the one before is answered."""
        clock = Clock()
        peer = DestinationPeer(clock, latency=1.0)
        destination = Destination(
            DEST, "mllp", clock, Timing(), endpoint_factory=lambda _r, _e: peer.endpoint()
        )
        destination.start(None)
        acquired: list[int] = []
        acquire = DeferredLock.acquire

        def counted(lock: DeferredLock) -> Deferred[DeferredLock]:
            acquired.append(len(lock.waiting))
            return acquire(lock)

        self.patch(DeferredLock, "acquire", counted)
        first = Deferred.fromCoroutine(destination.exchange(outbound_message("T1"), bytes))
        self.assertEqual(acquired, [])
        others = [
            Deferred.fromCoroutine(destination.exchange(outbound_message(f"T{n}"), bytes))
            for n in (2, 3)
        ]
        self.assertEqual((acquired, destination.waiting), ([0, 1], 2))
        run_until(clock, lambda: all(each.called for each in [first, *others]))
        self.assertEqual(peer.received_ids(), ["T1", "T2", "T3"])
        self.assertEqual(
            [self.successResultOf(each) for each in [first, *others]],
            [destination_ack(f"T{n}") for n in (1, 2, 3)],
        )
        # Free again: the next exchange takes the turn without the lock's Deferreds.
        last = Deferred.fromCoroutine(destination.exchange(outbound_message("T4"), bytes))
        clock.advance(1)
        self.assertEqual(self.successResultOf(last), destination_ack("T4"))
        self.assertEqual(acquired, [0, 1])
        self.assertEqual(len(peer.connections), 1)

    def test_stop_cancels_the_lanes_waiting_their_turn(self) -> None:
        """Stopping a destination ends the waits for its turn (CancelledError),
        and the exchange in flight fails as stopped."""
        destination, connects = self.pending_destination()
        first = Deferred.fromCoroutine(destination.exchange(b"MSH|", bytes))
        waiting = [Deferred.fromCoroutine(destination.exchange(b"MSH|", bytes)) for _ in range(3)]
        self.assertEqual(destination.waiting, 3)
        destination.stop()
        for each in waiting:
            self.failureResultOf(each, CancelledError)
        self.assertEqual(destination.waiting, 0)
        self.assertEqual(
            self.failureResultOf(first, DeliveryError).value.args, ("destination stopped",)
        )
        self.assertEqual(len(connects), 1)


class ResponseDeadlineTests(SynchronousTestCase):
    """One response deadline per connection, moved by each exchange (no timer per exchange)."""

    TIMEOUT = 30.0

    def connection(self) -> tuple[Any, Clock, StringTransport, list[tuple[float, float, str]]]:
        """A destination protocol on a StringTransport, its clock and the log of its timers."""
        clock = Clock()
        timers = schedule_log(clock)
        factory = _DestinationFactory("mllp", clock, Timing(response_timeout=self.TIMEOUT))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, clock, transport, timers

    def deadlines(self, timers: list[tuple[float, float, str]]) -> list[tuple[float, float]]:
        """(made at, delay) of every response deadline the connection scheduled."""
        return [(at, delay) for at, delay, what in timers if "deadline" in what]

    def test_back_to_back_exchanges_share_one_timer(self) -> None:
        """A hundred answered exchanges schedule one deadline timer between them."""
        protocol, clock, transport, timers = self.connection()
        for index in range(100):
            sent = protocol.exchange(outbound_message(f"B{index}"))
            clock.advance(0.25)
            protocol.dataReceived(mllp(destination_ack(f"B{index}")))
            self.assertEqual(self.successResultOf(sent), destination_ack(f"B{index}"))
        self.assertEqual(self.deadlines(timers), [(0.0, self.TIMEOUT)])
        self.assertFalse(transport.disconnecting)

    def test_a_reply_just_before_the_deadline_counts(self) -> None:
        """A reply a moment before the deadline settles the exchange; the deadline
        then passes on an idle connection, which stays open."""
        protocol, clock, transport, _timers = self.connection()
        sent = protocol.exchange(outbound_message("J1"))
        clock.advance(self.TIMEOUT - 0.001)
        protocol.dataReceived(mllp(destination_ack("J1")))
        self.assertEqual(self.successResultOf(sent), destination_ack("J1"))
        clock.advance(0.001 + TICK)
        self.assertFalse(transport.disconnecting)
        self.assertTrue(protocol.connected_ok)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_second_exchange_gets_a_full_timeout(self) -> None:
        """An exchange made late in the previous one's timeout is not cut short by the
        deadline the previous one had: it times out a full response timeout after it
        was sent, with the usual error, and the connection is closed."""
        protocol, clock, transport, _timers = self.connection()
        first = protocol.exchange(outbound_message("F1"))
        clock.advance(self.TIMEOUT - 1)
        protocol.dataReceived(mllp(destination_ack("F1")))
        self.successResultOf(first)
        second = protocol.exchange(outbound_message("F2"))
        clock.advance(1 + TICK)
        self.assertNoResult(second)
        clock.advance(self.TIMEOUT - 1 - 2 * TICK)
        self.assertNoResult(second)
        self.assertFalse(transport.disconnecting)
        clock.advance(2 * TICK)
        failure = self.failureResultOf(second, ReplyTimeoutError)
        self.assertEqual(str(failure.value), "no reply within 30s")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(protocol.connected_ok)

    def test_timeout_after_the_timer_fired_idle(self) -> None:
        """After the deadline passed on an idle connection, the next exchange gets a
        timer of its own, and times out on it."""
        protocol, clock, transport, timers = self.connection()
        first = protocol.exchange(outbound_message("I1"))
        protocol.dataReceived(mllp(destination_ack("I1")))
        self.successResultOf(first)
        clock.advance(self.TIMEOUT + 5)
        second = protocol.exchange(outbound_message("I2"))
        clock.advance(self.TIMEOUT - TICK)
        self.assertNoResult(second)
        clock.advance(2 * TICK)
        self.failureResultOf(second, ReplyTimeoutError)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(
            self.deadlines(timers), [(0.0, self.TIMEOUT), (self.TIMEOUT + 5, self.TIMEOUT)]
        )

    def test_a_late_reply_after_the_timeout_drops_the_connection(self) -> None:
        """A reply after the timeout settles nothing more (the exchange failed once)."""
        protocol, clock, _transport, _timers = self.connection()
        sent = protocol.exchange(outbound_message("L1"))
        clock.advance(self.TIMEOUT + TICK)
        self.failureResultOf(sent, ReplyTimeoutError)
        protocol.connected_ok = True  # as if the close had not happened yet
        protocol.dataReceived(mllp(destination_ack("L1")))
        self.assertFalse(protocol.connected_ok)
        self.assertEqual(protocol.exchanges, 0)

    def test_connection_lost_cancels_the_deadline(self) -> None:
        """A connection closed while idle leaves no timer behind; one closed while
        waiting fails the exchange as lost, not later as timed out."""
        protocol, clock, _transport, _timers = self.connection()
        answered = protocol.exchange(outbound_message("C1"))
        protocol.dataReceived(mllp(destination_ack("C1")))
        self.successResultOf(answered)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        waiting = protocol.exchange(outbound_message("C2"))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(waiting, DeliveryError)
        self.assertEqual(clock.getDelayedCalls(), [])


def stored(delivery_id: int, lane: str, control_id: str) -> Delivery:
    """A queued delivery of ``lane`` to ``DEST`` as the store returns it, made in memory."""
    payload = outbound_message(control_id)
    return Delivery(
        delivery_id, lane, DEST, "mllp", control_id, payload, QUEUED, 0, 0.0, "", None, "",
        {}, None, 0, 0.0, 0.0,
    )  # fmt: skip


class LaneContextTests(SynchronousTestCase):
    """A lane needs its LaneContext only: no dispatcher, no database."""

    def test_a_lane_runs_on_its_context_alone(self) -> None:
        """A lane on a hand-made context pages through its deliveries (pages of
        two), sends each, in order, to the destination the context names, waits
        as that destination's timing says after a negative ACK (the only road
        timing reaches a lane by), and hands every outcome to the context."""
        clock = Clock()
        peer = DestinationPeer(clock)
        answers = iter(["AE", "AA", "AA", "AA", "AA", "AA"])
        sent_at: list[tuple[str, float]] = []

        def script(connection: PeerConnection, payload: bytes) -> None:
            sent_at.append((control_id_of(payload), clock.seconds()))
            connection.reply(destination_ack(control_id_of(payload), next(answers)))

        peer.script = script
        timing = Timing(backoff_initial=7.0, backoff_max=7.0)
        destination = Destination(
            DEST, "mllp", clock, timing, endpoint_factory=lambda _r, _e: peer.endpoint()
        )
        destination.start(None)
        backlog = [stored(n, "lane-c", f"C{n}") for n in range(1, 6)]
        pages: list[tuple[int, int]] = []
        recorded: list[Settlement] = []
        delivered: list[str] = []
        answered: list[None] = []

        def read_page(lane: str, after: int, limit: int) -> Deferred[list[Delivery]]:
            self.assertEqual(lane, "lane-c")
            pages.append((after, limit))
            return succeed([d for d in backlog if d.id > after][:limit])

        def record(settlement: Settlement) -> Deferred[Settlement]:
            recorded.append(settlement)
            return succeed(settlement)

        context = LaneContext(
            clock=clock,
            now=clock.seconds,
            read_page=read_page,
            page_size=2,
            held_poll=5.0,
            destination_for=lambda delivery: destination,
            record=record,
            answered=lambda: answered.append(None),
            delivered=lambda endpoint, _seconds: delivered.append(endpoint),
        )
        lane = Lane("lane-c", context, destination)
        running = Deferred.fromCoroutine(lane.run())
        run_until(clock, lambda: running.called, limit=60)
        self.successResultOf(running)
        self.assertEqual(lane.state, "idle")
        self.assertEqual([c for c, _ in sent_at], ["C1", "C1", "C2", "C3", "C4", "C5"])
        retry_after = sent_at[1][1] - sent_at[0][1]
        self.assertGreaterEqual(retry_after, 7.0)
        self.assertLessEqual(retry_after, 7.0 * 1.1)
        self.assertEqual(pages, [(0, 2), (2, 2), (4, 2)])
        self.assertEqual(
            [(s.control_id, s.state) for s in recorded],
            [("C1", QUEUED)] + [(f"C{n}", DELIVERED) for n in range(1, 6)],
        )
        self.assertEqual(delivered, [DEST] * 5)
        self.assertEqual(len(answered), 6)
        destination.stop()
        clock.advance(0)

    def test_timing_of_a_delivery_reaches_its_lane_through_its_destination(self) -> None:
        """A delivery whose stored policy carries its action's backoff gets a
        destination with that timing (not the dispatcher's default), and its
        lane backs off as that timing says: the reconnect after a refused
        connect waits 40 s, not the default 1 s."""
        rig = Outbound()
        self.addCleanup(rig.stop)
        peer = rig.peer(DEST)
        peer.accepting = False
        rig.start()
        policy = {"backoff_initial": 40.0, "backoff_max": 40.0}
        rig.enqueue("lane-t", DEST, ["T1"], policy=policy)
        run_until(rig.clock, lambda: peer.attempts == 1, limit=10)
        first = rig.clock.seconds()
        lane = rig.dispatcher.lanes["lane-t"]
        self.assertEqual(lane.destination.timing, Timing(backoff_initial=40.0, backoff_max=40.0))
        self.assertIsNot(lane.destination, rig.dispatcher.destination(DEST, "mllp"))
        run_until(rig.clock, lambda: peer.attempts == 2, limit=100)
        self.assertGreaterEqual(rig.clock.seconds() - first, 40.0)
        self.assertLessEqual(rig.clock.seconds() - first, 40.0 * 1.1 + TICK)


class SweepAtStopTests(SynchronousTestCase):
    """A sweep caught by the dispatcher's stop ends there."""

    def test_sweep_waiting_at_stop_asks_the_database_nothing_more(self) -> None:
        """A sweep waiting for its first transaction when the dispatcher stops does not
        go on to scan the lanes: the service stops the database thread right after
        the dispatcher (its scan failed with "the database thread is not running")."""
        rig = Outbound()
        rig.start()
        held: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

        class Holding:
            def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
                waiting: Deferred[Any] = Deferred()
                held.append((function, args, waiting))
                return waiting

        rig.database.runner = Holding()
        rig.clock.advance(rig.held_poll)  # the sweep starts; its transaction waits
        self.assertEqual(len(held), 1)
        stopping = rig.dispatcher.stopService()
        rig.clock.advance(0)
        self.assertTrue(stopping.called)
        function, args, waiting = held.pop()
        waiting.callback(function(*args))
        self.assertEqual(held, [])
        self.assertEqual(self.flushLoggedErrors(), [])
