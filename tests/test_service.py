"""GatewayService and the composition root, in memory: no thread, socket or sleep.

The service runs on a ``MemoryReactorClock`` and an inline database runner that
records what it runs, so a test reads the order of start and stop from one list
of events: recovery before any port opens, ports closed before the database
thread stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from udsgateway.assembly import COMMIT_INBOUND, Timings, assemble
from udsgateway.config import GatewayConfig, TenantConfig
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.inbound.listening import ListenerService
from udsgateway.interfaces import IDeliveryOutcomes, IDeliveryQueue, IFlowRunner
from udsgateway.outbound.policy import Timing
from udsgateway.service import GatewayService, StartError
from udsgateway.store.engine import Database, IDatabaseRunner, InlineRunner, make_engine
from udsgateway.testing import Gateway, memory_database
from udsgateway.testing.flows import FlowGateway, action, app, flow

TENANTS = (
    TenantConfig(name="north", listen="tcp:port=2575:interface=127.0.0.1"),
    TenantConfig(name="south", listen="tcp:port=2576:interface=127.0.0.1"),
)


@implementer(IDatabaseRunner)
@define
class RecordingRunner:
    """Runs database functions inline, and records each one's name in ``events``."""

    events: list[str]

    def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.events.append(f"db {_name(function, args)}")
        return InlineRunner().run(function, *args)


def _name(function: Callable[..., Any], args: tuple[Any, ...]) -> str:
    """The name of the store function a database call runs (inside a transaction)."""
    if function.__name__ == "transaction_now" and args:
        return str(args[0].__name__)
    return function.__name__


@implementer(IListeningPort)
@define(eq=False)
class RecordingPort:
    """A port that records when it is closed."""

    address: IPv4Address
    events: list[str]

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.events.append(f"close {self.address.port}")

    def getHost(self) -> IPv4Address:
        return self.address


class RecordingReactor(MemoryReactorClock):
    """A memory reactor that records each listen, or refuses ports in ``in_use``."""

    def __init__(self, events: list[str], in_use: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.events = events
        self.in_use = in_use

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> RecordingPort:
        self.events.append(f"listen {port}")
        if port in self.in_use:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return RecordingPort(IPv4Address("TCP", interface, port), self.events)


@define
class RecordingThreads:
    """The database thread's start and stop, with what was still running at the stop."""

    events: list[str]
    service: GatewayService | None = None
    seen_at_stop: dict[str, Any] = field(factory=dict)

    def start(self) -> None:
        self.events.append("threads start")

    def stop(self) -> None:
        self.events.append("threads stop")
        service = self.service
        assert service is not None
        self.seen_at_stop = {
            "listeners": len(service.listeners),
            "executor polling": service.executor._poller is not None,
            "dispatcher started": service.dispatcher._started,
        }


@define
class RecordingCheckpoints:
    """The checkpoint thread: records when it is started and stopped."""

    events: list[str]

    def start(self) -> None:
        self.events.append("checkpoints start")

    def stop(self) -> None:
        self.events.append("checkpoints stop")


class ServiceOrderTests(SynchronousTestCase):
    """GatewayService starts and stops in the order docs/architecture.md gives."""

    def start(
        self, in_use: tuple[int, ...] = (), checkpoints: bool = False
    ) -> tuple[GatewayService, list[str]]:
        events: list[str] = []
        reactor = RecordingReactor(events, in_use)
        database = Database(make_engine("sqlite:///:memory:"), RecordingRunner(events))
        self.addCleanup(database.engine.dispose)
        config = GatewayConfig(path="test.toml", database="sqlite:///:memory:", tenants=TENANTS)
        threads = RecordingThreads(events)
        service = GatewayService(
            config,
            reactor,
            database,
            ControlIdSource(prefix="T"),
            threads=threads,
            wall=lambda: 1_700_000_000.0,
            checkpoints=RecordingCheckpoints(events) if checkpoints else None,
        )
        threads.service = service
        service.startService()
        return service, events

    def test_recovery_before_listening_and_listeners_before_the_database(self) -> None:
        """Start: the database thread, the schema, the dispatcher's recovery and the
        executor's first look at pending work, and only then one port per tenant.
        Stop: the ports close first (the last opened first), then the executor's
        polling and the dispatcher stop, and the database thread stops last."""
        service, events = self.start()
        self.successResultOf(service.ready)
        self.assertTrue(service.accepting)
        self.assertEqual(events[0], "threads start")
        listen = events.index("listen 2575")
        self.assertLess(events.index("db queued_per_destination"), listen)  # recovery
        self.assertLess(events.index("db pending"), listen)  # the executor's first look
        self.assertLess(events.index("db _start_mark"), listen)  # search keys caught up
        self.assertEqual(events[listen:], ["listen 2575", "listen 2576"])

        north = service.listeners["north"]
        self.assertTrue(verifyObject(IService, north))
        self.assertIs(north.parent, service)
        self.assertEqual(self.successResultOf(north.listening).getHost(), north.address)
        self.assertEqual(north.address, IPv4Address("TCP", "127.0.0.1", 2575))
        self.assertIn("2576", service.stats()["south"]["port"])

        del events[:]
        self.successResultOf(service.stopService())
        self.assertEqual(events[:2], ["close 2576", "close 2575"])
        self.assertEqual(events[-1], "threads stop")
        self.assertEqual(service.executor._poller, None, "the executor still polls after the stop")
        self.assertEqual(
            service._threads.seen_at_stop,  # type: ignore[union-attr]
            {"listeners": 0, "executor polling": False, "dispatcher started": False},
        )
        self.assertEqual([child for child in service if isinstance(child, ListenerService)], [])

    def test_the_checkpoint_thread_runs_while_the_database_thread_does(self) -> None:
        """A SQLite store's checkpoint thread starts right after the database thread,
        before any SQL, and stops after everything else, just before it."""
        service, events = self.start(checkpoints=True)
        self.successResultOf(service.ready)
        self.assertEqual(events[:2], ["threads start", "checkpoints start"])
        self.successResultOf(service.stopService())
        self.assertEqual(events[-2:], ["checkpoints stop", "threads stop"])

    def test_nothing_listens_while_recovery_waits(self) -> None:
        """Recovery that has not finished (the database is slow) keeps every port
        closed; the ports open once it finished."""
        events: list[str] = []
        waiting: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

        @implementer(IDatabaseRunner)
        class SlowRecovery:
            def run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
                if _name(function, args) == "queued_per_destination":
                    deferred: Deferred[Any] = Deferred()
                    waiting.append((function, args, deferred))
                    return deferred
                return InlineRunner().run(function, *args)

        reactor = RecordingReactor(events)
        database = Database(make_engine("sqlite:///:memory:"), SlowRecovery())
        self.addCleanup(database.engine.dispose)
        config = GatewayConfig(path="t.toml", database="sqlite:///:memory:", tenants=TENANTS)
        service = GatewayService(config, reactor, database, ControlIdSource(prefix="T"))
        service.startService()
        reactor.advance(3600)
        self.assertEqual(events, [])
        self.assertNoResult(service.ready)
        [(function, args, deferred)] = waiting
        deferred.callback(function(*args))
        self.successResultOf(service.ready)
        self.assertEqual(events, ["listen 2575", "listen 2576"])
        self.successResultOf(service.stopService())
        self.assertEqual(events[2:], ["close 2576", "close 2575"])

    def test_port_in_use_is_one_line(self) -> None:
        """A port in use: the start fails with one error line naming the tenant and
        the address, no traceback; the port already opened is closed at the stop."""
        logged: list[LogEvent] = []
        observer: ILogObserver = logged.append  # type: ignore[assignment]
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        service, events = self.start(in_use=(2576,))
        failure = self.failureResultOf(service.ready, StartError)
        self.assertEqual(
            failure.getErrorMessage(),
            "tenant south: Couldn't listen on 127.0.0.1:2576: [Errno 98] Address already in use.",
        )
        errors = [formatEvent(e) for e in logged if e["log_level"].name in ("error", "critical")]
        self.assertEqual(
            errors,
            [
                "udsgateway could not start: tenant south: Couldn't listen on "
                "127.0.0.1:2576: [Errno 98] Address already in use."
            ],
        )
        self.assertFalse(service.accepting)
        self.successResultOf(service.stopService())
        self.assertIn("close 2575", events)
        self.assertEqual(events[-1], "threads stop")

    def test_restart_listens_again(self) -> None:
        """Stopped and started again, the service recovers and listens again, with
        new listener services."""
        service, events = self.start()
        first = service.listeners["north"]
        self.successResultOf(service.stopService())
        del events[:]
        service.ready = Deferred()
        service.startService()
        self.successResultOf(service.ready)
        self.assertIsNot(service.listeners["north"], first)
        self.assertEqual(
            [e for e in events if e.startswith("listen")], ["listen 2575", "listen 2576"]
        )
        self.successResultOf(service.stopService())


class AssemblyTests(SynchronousTestCase):
    """The composition root: typed seams, and the same graph for the service and tests."""

    def test_seams_are_interfaces(self) -> None:
        """The executor is ingest's flow runner and the dispatcher's outcomes; the
        dispatcher is the executor's queue; each provides its interface."""
        database = memory_database()
        built = assemble(TENANTS, database, MemoryReactorClock(), ControlIdSource("T"))
        self.assertTrue(verifyObject(IFlowRunner, built.executor))
        self.assertTrue(verifyObject(IDeliveryOutcomes, built.executor))
        self.assertTrue(verifyObject(IDeliveryQueue, built.dispatcher))
        self.assertIs(built.executor.queue, built.dispatcher)
        self.assertIs(built.dispatcher.outcomes, built.executor)
        for tenant in TENANTS:
            self.assertIs(built.ingests[tenant.name].flows, built.executor)
            self.assertIs(built.factories[tenant.name].ingest, built.ingests[tenant.name])
        self.assertEqual(built.executor.charsets, {"north": "latin-1", "south": "latin-1"})

    def test_one_commit_function_everywhere(self) -> None:
        """The service and both in-memory harnesses commit inbound messages through
        the same function (they once differed). The service leaves the search keys
        to its KeyWriter (written after the ACK, in batches); the harnesses write
        them in the commit, so a test searches right after the ACK."""
        config = GatewayConfig(path="t.toml", database="sqlite:///:memory:", tenants=TENANTS)
        service = GatewayService(
            config, MemoryReactorClock(), memory_database(), ControlIdSource("T")
        )
        inbound = Gateway()
        flows = FlowGateway(apps=())
        self.addCleanup(flows.stop)
        for committer in (inbound.assembly.committer, flows.assembly.committer):
            self.assertIs(committer._batch, COMMIT_INBOUND)
        commit = service.committer._batch
        self.assertIs(commit.func, COMMIT_INBOUND)  # type: ignore[attr-defined]
        self.assertEqual(
            commit.keywords,  # type: ignore[attr-defined]
            {"announce": False, "write_keys": False},
        )
        for ingest in service.ingests.values():
            self.assertEqual(ingest.stored_keys, service.key_writer.stored)
        self.assertEqual(service.key_writer.node, config.node_name)
        self.assertEqual((service.key_writer.interval, service.key_writer.batch), (1.0, 4096))

    def test_load_takes_routes_plans_and_timings(self) -> None:
        """``load`` gives each tenant its own routes, the executor its plans and the
        dispatcher each action's timing."""
        relay = app(
            flow(
                "relay", "ADT^A04", [action("send", 2601, "ADT^A04", "MSH", connect_timeout=7.0)]
            ),
            tenant="north",
        )
        timings = Timings()
        built = assemble(
            TENANTS, memory_database(), MemoryReactorClock(), ControlIdSource("T"), timings=timings
        )
        built.load([relay])
        endpoint = relay.flows[0].actions[0].endpoint
        self.assertEqual(built.dispatcher.timing(endpoint).connect_timeout, 7.0)
        self.assertEqual(timings("tcp:host=elsewhere:port=1"), Timing())
        self.assertIn(relay.flows[0].flow_id, built.executor._plans)
        self.assertEqual(built.ingests["north"].routes.app_ids, {relay.app_id})
        self.assertEqual(built.ingests["south"].routes.app_ids, frozenset())
