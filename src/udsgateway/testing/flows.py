"""Test doubles for flows end to end: a whole gateway in memory, on one ``task.Clock``.

``FlowGateway`` wires what ``GatewayService`` wires (listener factory, ingest,
group commit, the SQLite store, the executor and the dispatcher) on a
synchronous database runner, with every action's destination a scripted
``udsgateway.testing.DestinationPeer``. A test sends frames over
``StringTransport``, moves the clock with ``run_until`` and asserts the bytes
each destination received, the sender's ACKs and the rows in the store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from attrs import define, field
from sqlalchemy import select
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from udsgateway.assembly import Assembly, Timings, assemble
from udsgateway.config import TenantConfig
from udsgateway.flows import Action, App, Flow, Trigger
from udsgateway.flowstore import load_apps, save_app
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.inbound.ingest import Ingest
from udsgateway.inbound.listener import ListenerFactory
from udsgateway.interfaces import IFlowRunner
from udsgateway.outbound.executor import Executor
from udsgateway.store import messages, schema
from udsgateway.store.engine import (
    Database,
    InlineRunner,
    ensure_schema,
    make_engine,
)
from udsgateway.store.records import CommitResult, Finished, NewDelivery, StoredMessage
from udsgateway.testing import (
    Connection,
    DestinationPeer,
    Outbound,
    PeerConnection,
    control_id_of,
    destination_ack,
    mllp,
    run_until,
)

#: The clock's start: a plausible wall-clock time (2023-11-14 22:13:20 UTC).
START = 1_700_000_000.0
HOST = "127.0.0.1"


def action(
    name: str,
    port: int,
    message_type: str,
    template: str,
    **options: Any,
) -> Action:
    """A TCP action to a destination on 127.0.0.1:``port``."""
    return Action(
        name=name, host=HOST, port=port, message_type=message_type, template=template, **options
    )


def flow(
    name: str,
    message_type: str,
    actions: Sequence[Action],
    *,
    ack: str = "on_commit",
    ack_timeout: float = 30.0,
    connection: str = "mllp",
    application_ack: str = "after_actions",
) -> Flow:
    """A flow with a stable Flow ID made from its name (at most 20 characters)."""
    flow_id = "FLW" + "".join(ch for ch in name.upper() if ch.isalnum())[:17]
    return Flow(
        name=name,
        flow_id=flow_id,
        trigger=Trigger(
            connection=connection,
            message_type=message_type,
            ack=ack,
            ack_timeout=ack_timeout,
            application_ack=application_ack,
        ),
        actions=tuple(actions),
    )


def app(*flows: Flow, tenant: str = "test", app_id: str = "APPFLOWTEST", **variables: str) -> App:
    """An app of these flows."""
    return App(
        name="Flow tests", tenant=tenant, app_id=app_id, variables=variables, flows=tuple(flows)
    )


def answer_with(code: str, error: int | None = None) -> Callable[[PeerConnection, bytes], None]:
    """A peer script: answer every message with ``code`` (AA, AE, AR...)."""

    def script(connection: PeerConnection, payload: bytes) -> None:
        connection.reply(destination_ack(control_id_of(payload), code, error))

    return script


def never_answer(_connection: PeerConnection, _payload: bytes) -> None:
    """A peer script: take the message, never answer."""


@define(eq=False)
class FlowGateway:
    """One tenant's whole gateway in memory; destinations are ``DestinationPeer``s.

    ``database`` is an SQLAlchemy URL: in-memory by default, or a file for a
    test that also runs the command line on the same store.
    """

    apps: tuple[App, ...]
    tenant: TenantConfig = field(
        factory=lambda: TenantConfig(name="test", listen="tcp:port=0:interface=127.0.0.1")
    )
    database_url: str = "sqlite:///:memory:"
    clock: Clock = field(factory=Clock)
    #: False: stored messages do not wake the executor (a test calls ``executor.wake``).
    autorun: bool = True
    #: Render a new message's first actions before its commit (``Executor.first_actions``),
    #: as the service does while a commit is running, which on this inline database is
    #: never: so here before every commit. Never while ``autorun`` is False.
    fold: bool = True
    database: Database = field(init=False)
    outbound: Outbound = field(init=False)
    executor: Executor = field(init=False)
    ingest: Ingest = field(init=False)
    factory: ListenerFactory = field(init=False)
    assembly: Assembly = field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.clock.seconds() == 0:
            self.clock.advance(START)
        self.database = Database(make_engine(self.database_url), InlineRunner())
        self.database.transaction_now(ensure_schema)
        for each in self.apps:
            self.database.transaction_now(save_app, each, self.clock.seconds())
        loaded = self.database.transaction_now(load_apps, None)

        # Built as the service builds it, but the dispatcher's destinations are
        # the peers of ``outbound`` and ingest's flow runner is ``_Switch``.
        timings = Timings()
        self.outbound = Outbound(clock=self.clock, database=self.database, timings=timings)
        self.assembly = assemble(
            [self.tenant],
            self.database,
            self.clock,
            ControlIdSource("ACK"),
            group_by_turn=False,
            dispatcher=self.outbound.dispatcher,
            timings=timings,
            outbound_control_ids=ControlIdSource("OUT"),
            flow_runner=lambda executor: _Switch(self, executor),
            fold_while_idle=True,
        )
        self.assembly.load(loaded)
        for each in loaded:
            for one in each.flows:
                for step in one.actions:
                    self.outbound.peer(step.endpoint, step.protocol)
        self.executor = self.assembly.executor
        self.ingest = self.assembly.ingests[self.tenant.name]
        self.factory = self.assembly.factories[self.tenant.name]
        self.outbound.start()
        self.executor.wake()

    # -- the sender's side

    def connect(self, port: int = 40000) -> Connection:
        """A new sender connection to the tenant's listener."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", HOST, port))
        assert protocol is not None, "connection refused"
        transport = StringTransport(peerAddress=IPv4Address("TCP", HOST, port))
        protocol.makeConnection(transport)
        return Connection(protocol, transport)

    def send(self, message: bytes) -> bytes:
        """Send one MLLP frame on a new connection; return what was answered at once
        (unframed, or b""), then close the connection."""
        connection = self.connect()
        connection.send(mllp(message))
        answer = unframe(connection.received())
        connection.transport.loseConnection()
        connection.protocol.connectionLost(Failure(ConnectionDone()))
        return answer

    # -- destinations

    def peer(self, port: int) -> DestinationPeer:
        """The destination of the actions to 127.0.0.1:``port``."""
        found = [
            peer for endpoint, peer in self.outbound.peers.items() if f":port={port}:" in endpoint
        ]
        assert len(found) == 1, f"no single destination on port {port}"
        return found[0]

    def run_until(self, done: Callable[[], bool], limit: float = 3600.0) -> float:
        """Move the clock from one delayed call to the next until ``done()``."""
        return run_until(self.clock, done, limit)

    def settle(self, limit: float = 3600.0) -> float:
        """Run until no execution is pending or waiting."""
        return self.run_until(
            lambda: (
                not any(
                    row["state"] in ("pending", "waiting") for row in self.rows(schema.executions)
                )
            ),
            limit,
        )

    # -- the store

    def rows(self, table: Any) -> list[dict[str, Any]]:
        """Every row of a table (``udsgateway.store.schema``), in id order, as dicts."""
        order = table.c.id if "id" in table.c else next(iter(table.c))

        def read(connection: Any) -> list[dict[str, Any]]:
            return [
                dict(row._mapping) for row in connection.execute(select(table).order_by(order))
            ]

        return self.database.transaction_now(read)

    def messages(self) -> list[StoredMessage]:
        """Every stored inbound message, oldest first."""
        return self.database.transaction_now(messages.find_messages, None, None, 1_000_000)

    def stop(self) -> None:
        """Stop the dispatcher (a test's cleanup)."""
        self.outbound.stop()


@implementer(IFlowRunner)
@define(eq=False)
class _Switch:
    """The executor as ingest's flow runner, but off while ``gateway.autorun`` is
    False (stored messages do not wake it) and folding only while ``gateway.fold``."""

    gateway: FlowGateway
    executor: Executor

    def first_actions(
        self, tenant: str, flow_ids: Sequence[str], raw: bytes
    ) -> tuple[NewDelivery | None, ...]:
        if not (self.gateway.fold and self.gateway.autorun):
            return ()
        return self.executor.first_actions(tenant, flow_ids, raw)

    def stored(self, result: CommitResult) -> None:
        if self.gateway.autorun:
            self.executor.stored(result)

    def watch(self, execution_id: int, timeout: float) -> Deferred[Finished]:
        return self.executor.watch(execution_id, timeout)

    def is_full(self, destination: str) -> bool:
        return self.executor.is_full(destination)


def unframe(data: bytes) -> bytes:
    """The payload of one MLLP frame (b"" for no data)."""
    if not data:
        return b""
    assert data.startswith(b"\x0b") and data.endswith(b"\x1c\r"), f"not one frame: {data!r}"
    return data[1:-2]
