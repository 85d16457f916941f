"""Test doubles that ship with the package, so tests (ours and yours) share them.

``Gateway`` builds the real inbound path of one tenant (listener factory,
ingest, group committer, SQLite store) on an in-memory database, a
synchronous database runner and a ``task.Clock``, so a test can connect
``StringTransport``s and assert bytes on the wire and rows in the store
without threads, sockets or sleeps.

``Outbound`` does the same for the delivery engine: the real dispatcher,
lanes and destination protocol, talking through in-memory endpoints to
scripted ``DestinationPeer``s on the same clock.

The tests' one message builder (``hl7_message``), MLLP frame (``mllp``) and
ACK reader (``read_ack``) live here too. Doubles that can end up in a log
line (an endpoint, a peer) keep a short repr.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from udsgateway.assembly import Assembly, assemble, build_dispatcher
from udsgateway.config import DeliveryConfig, TenantConfig
from udsgateway.flows import App, Flow, Trigger
from udsgateway.flowstore import load_apps, save_app
from udsgateway.hl7.ack import ControlIdSource, parse_reply
from udsgateway.inbound.ingest import Ingest
from udsgateway.inbound.listener import InboundProtocol, ListenerFactory
from udsgateway.interfaces import IDeliveryOutcomes, IFlowRunner
from udsgateway.outbound.dispatcher import Dispatcher
from udsgateway.outbound.policy import Timing
from udsgateway.store import messages, outbox
from udsgateway.store.engine import (
    Database,
    IDatabaseRunner,
    InlineRunner,
    ensure_schema,
)
from udsgateway.store.engine import make_engine as _make_engine
from udsgateway.store.records import InboundRecord, StoredMessage
from udsgateway.wire.framing import Frame, IFramer, MLLPFramer

MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"


def mllp(payload: bytes) -> bytes:
    """Wrap a message in an MLLP frame."""
    return MLLP_START + payload + MLLP_END


# -- HL7 messages, MLLP frames and ACKs, as the tests write and read them

#: MSH-7 of the messages ``hl7_message`` builds, unless told otherwise.
SENT_AT = "20240101123000"


def hl7_message(
    control_id: str = "MSG00001",
    message_type: str = "ADT^A04",
    *,
    sending: str = "HIS|Hospital",
    receiving: str = "LSQ|LeadSquared",
    sent_at: str = SENT_AT,
    processing_id: str = "P",
    version: str = "2.5",
    accept_ack: str = "",
    application_ack: str = "",
    charset: str = "",
    segments: Sequence[str | bytes] | None = None,
    patient: bytes = b"Doe^John",
    separator: bytes = b"\r",
) -> bytes:
    """A synthetic HL7 v2 message (no real person) with the default delimiters.

    ``sending`` is MSH-3|MSH-4 and ``receiving`` MSH-5|MSH-6; MSH-15, MSH-16 and
    MSH-18 are written when one of them is given. The segments after MSH are
    ``segments`` (text encoded as Latin-1), by default an EVN and a PID naming
    ``patient``. Every segment, the last too, ends with ``separator``.
    """
    msh = (
        f"MSH|^~\\&|{sending}|{receiving}|{sent_at}||{message_type}|{control_id}"
        f"|{processing_id}|{version}"
    )
    if accept_ack or application_ack or charset:
        # MSH-13, MSH-14 empty; MSH-15, MSH-16; MSH-17 empty; MSH-18.
        msh += f"|||{accept_ack}|{application_ack}||{charset}"
    if segments is None:
        segments = (f"EVN|A04|{sent_at}", b"PID|1||12345^^^Hospital||" + patient + b"||19800101|M")
    lines = [msh.encode("latin-1")]
    lines += [line.encode("latin-1") if isinstance(line, str) else line for line in segments]
    return separator.join(lines) + separator


@frozen
class AckFields:
    """What tests assert on in an ACK: MSA-1, MSA-2, ERR-3.1 and ERR-7."""

    code: str
    control_id: str
    error_code: int | None
    diagnostic: str


def read_ack(ack: bytes) -> AckFields:
    """Read one unframed ACK (segments ended by CR, LF or CR LF).

    AssertionError when it is not a well-formed ACK (``udsgateway.hl7.ack.parse_reply``
    names the problem); ``error_code`` is ERR-3.1 (table 0357), or None
    without an ERR segment.
    """
    text = ack.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    reply = parse_reply(text)
    assert reply.problem == "" and reply.ack_code is not None, f"{reply.problem}: {ack!r}"
    err = next((line for line in text.split(b"\r") if line.startswith(b"ERR|")), b"")
    fields = err.decode("latin-1").split("|")
    return AckFields(
        code=reply.ack_code,
        control_id=reply.control_id or "",
        error_code=reply.error_code,
        diagnostic=fields[7] if len(fields) > 7 else "",
    )


def inbound_record(
    control_id: str, body: bytes = b"PID|1", flows: tuple[str, ...] = ()
) -> InboundRecord:
    """An accepted ADT^A04 from sender ``HIS|H`` of tenant ``t``, ready for
    ``store.inbound.commit_inbound``, running ``flows``; its ACK is ``ACK <control_id>``."""
    raw = b"MSH|^~\\&|HIS|H|LSQ|L|20240101||ADT^A04|" + control_id.encode() + b"|P|2.3\r" + body
    return InboundRecord(
        tenant="t",
        sender="HIS|H",
        control_id=control_id,
        message_type="ADT^A04",
        peer="127.0.0.1",
        connection="mllp",
        received_at=1000.0,
        raw=raw,
        digest=hashlib.sha256(raw).hexdigest(),
        accepted=True,
        flows=flows,
        reason="",
        ack_code="AA",
        ack=b"ACK " + control_id.encode(),
        run_flows=flows,
    )


@implementer(IDatabaseRunner)
@define
class ManualRunner:
    """A database runner whose calls wait until the test lets them run.

    Lets a test observe the gap between a frame read and its commit (nothing
    answered yet), and make a commit fail on purpose.
    """

    calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = field(factory=list)

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        deferred: Deferred[Any] = Deferred()
        self.calls.append((function, args, deferred))
        return deferred

    def run_next(self) -> None:
        """Run the oldest waiting call for real."""
        function, args, deferred = self.calls.pop(0)
        try:
            result = function(*args)
        except BaseException as error:
            deferred.errback(error)
        else:
            deferred.callback(result)

    def fail_next(self, error: BaseException) -> None:
        """Fail the oldest waiting call without running it."""
        _function, _args, deferred = self.calls.pop(0)
        deferred.errback(error)


def demo_app(tenant: str = "test", connection: str = "mllp") -> App:
    """An app with one flow per first-class message type, all over ``connection``."""
    return App(
        name=f"Test app {connection}",
        tenant=tenant,
        app_id=f"APPTEST{connection.upper()}",
        flows=tuple(
            Flow(
                name=f"{message_type} flow",
                flow_id=f"FLW{message_type.replace('^', '')}{connection.upper()}"[:14],
                trigger=Trigger(connection=connection, message_type=message_type),
            )
            for message_type in ("ADT^A04", "ADT^A08", "SIU^S12", "SIU^S14", "SIU^S15")
        ),
    )


@define
class Gateway:
    """The inbound path of one tenant, in memory and on a fake clock."""

    tenant: TenantConfig = field(
        factory=lambda: TenantConfig(name="test", listen="tcp:port=0:interface=127.0.0.1")
    )
    apps: tuple[App, ...] = field(factory=lambda: (demo_app(), demo_app(connection="tcp")))
    runner: Any = field(factory=InlineRunner)
    #: Start a group commit at the end of the clock's turn, as the service does.
    group_by_turn: bool = False
    clock: Clock = field(factory=Clock)
    #: A wall clock apart from the timer clock (a test that makes it jump); None: ``clock``.
    wall: Clock | None = None
    #: What runs the stored messages' flows (an ``IFlowRunner``); None: nothing runs
    #: them (their executions stay pending), and nothing is ever full.
    flows: IFlowRunner | None = None
    #: Ask ``flows`` for the first actions before every commit, not only while one runs.
    fold_while_idle: bool = False
    database: Database = field(init=False)
    assembly: Assembly = field(init=False)
    ingest: Ingest = field(init=False)
    factory: ListenerFactory = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.clock.advance(1_700_000_000)  # a plausible wall-clock time for ACK timestamps
        engine = _make_engine("sqlite:///:memory:")
        self.database = Database(engine, InlineRunner())
        self.database.transaction_now(ensure_schema)
        for app in self.apps:
            self.database.transaction_now(save_app, app, 0.0)
        loaded = self.database.transaction_now(load_apps, self.tenant.name)
        self.database = Database(engine, self.runner)
        # Built as the service builds it; only the flows differ (none run by default).
        self.assembly = assemble(
            [self.tenant],
            self.database,
            self.clock,
            ControlIdSource("TEST"),
            group_by_turn=self.group_by_turn,
            wall=self.wall.seconds if self.wall is not None else None,
            flow_runner=lambda _executor: self.flows,
            fold_while_idle=self.fold_while_idle,
        )
        self.assembly.load(loaded)
        self.ingest = self.assembly.ingests[self.tenant.name]
        self.factory = self.assembly.factories[self.tenant.name]

    def connect(self, host: str = "127.0.0.1", port: int = 40000) -> Connection:
        """A new sender connection (AssertionError when the listener refuses it)."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None, "connection refused"
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return Connection(protocol, transport)

    def messages(self) -> list[StoredMessage]:
        """Every stored message, oldest first."""
        return self.database.transaction_now(messages.find_messages, None, None, 100_000)


@define
class Connection:
    """A sender's end of an in-memory connection."""

    protocol: InboundProtocol
    transport: StringTransport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        """Everything written back so far, and forget it."""
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


# -- the outbound side: destination systems in memory


def outbound_message(control_id: str, body: str = "PID|1||12345") -> bytes:
    """A small HL7 message to deliver, whose MSH-10 is ``control_id``."""
    return hl7_message(
        control_id,
        sending="GATEWAY|FAC",
        receiving="DEST|FAC",
        sent_at="20240101000000",
        segments=[body],
    )


def control_id_of(message: bytes) -> str:
    """MSH-10 of a message built by ``outbound_message`` (or any with ``|`` fields)."""
    return message.split(b"\r", 1)[0].split(b"|")[9].decode()


def destination_ack(control_id: str, code: str = "AA", error: int | None = None) -> bytes:
    """The ACK a destination sends for the message ``control_id``."""
    reply = f"MSH|^~\\&|DEST|FAC|GATEWAY|FAC|20240101000001||ACK|R{control_id}|P|2.5\r"
    reply += f"MSA|{code}|{control_id}\r"
    if error is not None:
        reply += f"ERR|||{error}^Error^HL70357|E\r"
    return reply.encode()


class PeerTransport(StringTransport):
    """The gateway's end of an in-memory connection to a ``DestinationPeer``.

    Writes reach the peer at once; closing tells the gateway's protocol on the
    next turn of the clock (as a reactor does), and writes after a close are
    discarded, as a real transport discards them.
    """

    def __init__(self, connection: PeerConnection) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 50000 + len(connection.peer.connections)),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 2575),
        )
        self._connection = connection

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return
        super().write(data)
        self._connection.from_gateway(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self._connection.lost(ConnectionDone())

    def abortConnection(self) -> None:
        if not self.disconnecting:
            self.disconnected = True
            super().loseConnection()
            self._connection.lost(ConnectionAborted())


@define(eq=False)
class PeerConnection:
    """One connection as the destination sees it: what arrived, and a way to answer."""

    # Not in the repr: the peer and what arrived grow with the test (see PeerEndpoint).
    peer: DestinationPeer = field(repr=False)
    protocol: IProtocol = field(repr=False)
    transport: PeerTransport = field(init=False, repr=False)
    received: list[bytes] = field(factory=list, repr=False)
    #: True once the gateway's protocol was told the connection is gone.
    closed: bool = False
    _framer: IFramer | None = field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.transport = PeerTransport(self)
        if self.peer.protocol == "mllp":
            self._framer = MLLPFramer()

    def from_gateway(self, data: bytes) -> None:
        # Plain TCP: the gateway writes each message in one call, with no end
        # bytes, so one write is one message.
        payloads = (
            [data]
            if self._framer is None
            else [event.payload for event in self._framer.feed(data) if isinstance(event, Frame)]
        )
        for payload in payloads:
            self.received.append(payload)
            self.peer.received.append(payload)
            self.peer.answer(self, payload)

    def reply(self, message: bytes, delay: float | None = None) -> None:
        """Send ``message`` back, framed as the connection's protocol wants, after ``delay``."""
        framed = mllp(message) if self.peer.protocol == "mllp" else message
        self.send_raw(framed, self.peer.latency if delay is None else delay)

    def send_raw(self, data: bytes, delay: float = 0.0) -> None:
        """Send bytes as they are after ``delay``; lost if the connection closed meanwhile."""
        self.peer.clock.callLater(delay, self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if self.closed or self.transport.disconnecting:
            self.peer.undelivered.append(data)
            return
        self.peer.delivered.append(data)
        self.protocol.dataReceived(data)

    def hang_up(self) -> None:
        """The destination closes the connection."""
        self.transport.loseConnection()

    def lost(self, reason: Exception) -> None:
        self.peer.clock.callLater(0, self._lost, reason)

    def _lost(self, reason: Exception) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(reason))


def _answer_aa(connection: PeerConnection, payload: bytes) -> None:
    connection.reply(destination_ack(control_id_of(payload)))


@define(eq=False)
class DestinationPeer:
    """A destination system in memory for the delivery engine's tests.

    ``endpoint()`` gives an ``IStreamClientEndpoint`` whose connections reach
    this peer on the clock: a connection attempt completes (or is refused,
    while ``accepting`` is false or ``refuse_next`` is positive) on the next
    turn of the clock. Each message received is recorded and passed to
    ``script(connection, payload)``, which by default answers AA after
    ``latency`` seconds.
    """

    clock: Clock = field(repr=False)
    protocol: str = "mllp"
    accepting: bool = True
    refuse_next: int = 0
    latency: float = 0.0
    # The repr leaves out the clock, the script and what grows with the test: it
    # lands in log lines (ClientService logs its endpoint on every retry).
    script: Callable[[PeerConnection, bytes], None] = field(default=_answer_aa, repr=False)
    connections: list[PeerConnection] = field(factory=list, repr=False)
    #: Every message received, over every connection, in order.
    received: list[bytes] = field(factory=list, repr=False)
    #: Replies that reached the gateway's protocol, and replies lost to a closed connection.
    delivered: list[bytes] = field(factory=list, repr=False)
    undelivered: list[bytes] = field(factory=list, repr=False)
    attempts: int = 0
    refused: int = 0

    def endpoint(self) -> PeerEndpoint:
        """A client endpoint that connects to this peer."""
        return PeerEndpoint(self)

    def answer(self, connection: PeerConnection, payload: bytes) -> None:
        self.script(connection, payload)

    def received_ids(self) -> list[str]:
        """MSH-10 of every message received, in order."""
        return [control_id_of(payload) for payload in self.received]

    @property
    def current(self) -> PeerConnection:
        """The latest connection."""
        return self.connections[-1]

    def open_connections(self) -> list[PeerConnection]:
        """Connections the gateway has not been told are closed."""
        return [connection for connection in self.connections if not connection.closed]

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        call: IDelayedCall | None = None

        def cancel(_: Deferred[IProtocol]) -> None:
            if call is not None and call.active():
                call.cancel()

        connecting: Deferred[IProtocol] = Deferred(cancel)
        call = self.clock.callLater(0, self._connect, factory, connecting)
        return connecting

    def _connect(self, factory: IProtocolFactory, connecting: Deferred[IProtocol]) -> None:
        self.attempts += 1
        if not self.accepting or self.refuse_next > 0:
            self.refuse_next = max(0, self.refuse_next - 1)
            self.refused += 1
            connecting.errback(ConnectionRefusedError("refused by the test peer"))
            return
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2575))
        assert protocol is not None
        connection = PeerConnection(self, protocol)
        self.connections.append(connection)
        protocol.makeConnection(connection.transport)
        connecting.callback(protocol)


@implementer(IStreamClientEndpoint)
@define(eq=False)
class PeerEndpoint:
    """A client endpoint whose connections reach a ``DestinationPeer``.

    Its repr is short and does not grow: ``ClientService`` logs the endpoint on
    every connection retry, and a peer's full repr (every message received)
    once made one test write a log of hundreds of megabytes.
    """

    peer: DestinationPeer

    def __repr__(self) -> str:
        return f"<PeerEndpoint {self.peer.protocol} peer at 0x{id(self.peer):x}>"

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return self.peer.connect(factory)


def run_until(clock: Clock, done: Callable[[], bool], limit: float = 86_400.0) -> float:
    """Move the clock from one delayed call to the next until ``done()``; return the time.

    Raises AssertionError when nothing is scheduled any more, or ``limit``
    seconds of clock time went by, before ``done()`` is true.
    """
    deadline = clock.seconds() + limit
    while not done():
        calls = clock.getDelayedCalls()
        if not calls:
            raise AssertionError("nothing left to run, and not done")
        due = min(call.getTime() for call in calls)
        if due > deadline:
            raise AssertionError(f"not done within {limit:g}s of clock time")
        # Land on the due time exactly: floating-point sums may fall short of it.
        clock.advance(max(0.0, due - clock.seconds()))
        while clock.seconds() < due:
            clock.advance(due - clock.seconds() or 1e-9)
    return clock.seconds()


@define(eq=False)
class Outbound:
    """The delivery engine on an in-memory database, a ``task.Clock`` and in-memory peers.

    Endpoint strings name ``DestinationPeer``s (created on first use), so a
    test enqueues deliveries, moves the clock and asserts what each peer
    received and what the store says.
    """

    clock: Clock = field(factory=Clock)
    database: Database = field(factory=lambda: memory_database())
    timing: Timing = field(factory=Timing)
    page_size: int = 64
    max_active_lanes: int = 512
    held_poll: float = 5.0
    max_queued_per_destination: int = 100_000
    seed: int = 1
    #: A wall clock apart from the timer clock (a test that makes it jump); None: ``clock``.
    wall: Clock | None = None
    #: Each endpoint's timing; None: ``timing`` for every endpoint.
    timings: Callable[[str], Timing] | None = None
    #: Told of recorded outcomes (the executor, in ``FlowGateway``); None: nobody.
    outcomes: IDeliveryOutcomes | None = None
    peers: dict[str, DestinationPeer] = field(factory=dict)
    dispatcher: Dispatcher = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.dispatcher = build_dispatcher(
            self.database,
            self.clock,
            self.clock,
            DeliveryConfig(
                max_queued_per_destination=self.max_queued_per_destination,
                page_size=self.page_size,
                max_active_lanes=self.max_active_lanes,
                held_poll=self.held_poll,
            ),
            timing=self.timings if self.timings is not None else (lambda _e: self.timing),
            wall=self.wall.seconds if self.wall is not None else None,
            rng=random.Random(self.seed),
            endpoint_factory=self._endpoint,
            outcomes=self.outcomes,
        )

    def _endpoint(self, _reactor: Any, description: str) -> IStreamClientEndpoint:
        return self.peer(description).endpoint()

    def peer(self, endpoint: str, protocol: str = "mllp") -> DestinationPeer:
        """The destination behind ``endpoint``."""
        if endpoint not in self.peers:
            self.peers[endpoint] = DestinationPeer(self.clock, protocol)
        return self.peers[endpoint]

    def start(self) -> None:
        """Recover (counters and lanes from the store), as the service does at start."""
        recovering = Deferred.fromCoroutine(self.dispatcher.recover())
        assert recovering.called, "recovery waits on something"

    def enqueue(
        self,
        lane: str,
        endpoint: str,
        control_ids: Sequence[str],
        protocol: str = "mllp",
        policy: dict[str, Any] | None = None,
        notify: bool = True,
    ) -> list[int]:
        """Commit deliveries of ``outbound_message``s to a lane; tell the dispatcher."""
        ids = self.database.transaction_now(
            outbox.enqueue,
            [
                outbox.NewDelivery(
                    lane,
                    endpoint,
                    protocol,
                    control_id,
                    outbound_message(control_id),
                    policy or {},
                )
                for control_id in control_ids
            ],
            self.clock.seconds(),
        )
        if notify:
            self.dispatcher.enqueued(lane, endpoint, protocol, len(ids))
        return ids

    def deliveries(self, lane: str | None = None) -> list[outbox.Delivery]:
        """Every delivery (of ``lane``), oldest first."""
        return self.database.transaction_now(outbox.list_deliveries, (), lane, 1_000_000)

    def delivery(self, delivery_id: int) -> outbox.Delivery:
        """One delivery, as stored."""
        found = self.database.transaction_now(outbox.get_delivery, delivery_id)
        assert found is not None
        return found

    def run_until(self, done: Callable[[], bool], limit: float = 86_400.0) -> float:
        """Move the clock until ``done()`` (see ``run_until``)."""
        return run_until(self.clock, done, limit)

    def stop(self) -> None:
        """Stop the dispatcher and let the connections close."""
        stopping = self.dispatcher.stopService()
        self.clock.advance(0)
        assert stopping.called, "the dispatcher did not stop"


def memory_database() -> Database:
    """A fresh in-memory database with the schema, on the synchronous runner."""
    database = Database(_make_engine("sqlite:///:memory:"), InlineRunner())
    database.transaction_now(ensure_schema)
    return database
