"""Test doubles that ship with the package, so tests (ours and yours) share them.

``Gateway`` builds the real inbound path of one tenant (listener factory,
ingest, group committer, SQLite store) on an in-memory database, a
synchronous database runner and a ``task.Clock``, so a test can connect
``StringTransport``s and assert bytes on the wire and rows in the store
without threads, sockets or sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from udsgateway import store
from udsgateway.ack import ControlIdSource
from udsgateway.config import TenantConfig
from udsgateway.db import Database, GroupCommitter, IDatabaseRunner, InlineRunner, ensure_schema
from udsgateway.db import make_engine as _make_engine
from udsgateway.flows import App, Flow, Trigger
from udsgateway.ingest import Ingest
from udsgateway.listener import InboundProtocol, ListenerFactory
from udsgateway.routing import RoutingTable

MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"


def mllp(payload: bytes) -> bytes:
    """Wrap a message in an MLLP frame."""
    return MLLP_START + payload + MLLP_END


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
    clock: Clock = field(factory=Clock)
    database: Database = field(init=False)
    ingest: Ingest = field(init=False)
    factory: ListenerFactory = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.clock.advance(1_700_000_000)  # a plausible wall-clock time for ACK timestamps
        engine = _make_engine("sqlite:///:memory:")
        self.database = Database(engine, InlineRunner())
        self.database.transaction_now(ensure_schema)
        for app in self.apps:
            self.database.transaction_now(store.save_app, app, 0.0)
        loaded = self.database.transaction_now(store.load_apps, self.tenant.name)
        self.database = Database(engine, self.runner)
        committer: GroupCommitter[store.InboundRecord, store.CommitResult] = GroupCommitter(
            self.database, store.commit_inbound
        )
        self.ingest = Ingest(
            self.tenant,
            committer,
            self.clock,
            ControlIdSource("TEST"),
            routes=RoutingTable.build(loaded, self.tenant.app_id_field, self.tenant.flow_id_field),
        )
        self.factory = ListenerFactory(self.tenant, self.ingest, self.clock)

    def connect(self, host: str = "127.0.0.1", port: int = 40000) -> Connection:
        """A new sender connection (AssertionError when the listener refuses it)."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None, "connection refused"
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return Connection(protocol, transport)

    def messages(self) -> list[store.StoredMessage]:
        """Every stored message, oldest first."""
        return self.database.transaction_now(store.find_messages, None, None, 100_000)


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
