"""The operations facade: what an operator sees and does in a running gateway.

One object, ``Operations``, used alike by the admin HTTP API, the manhole and
the command line. Every method takes the operator (``actor``) and where the
request came from (``via``: ``api``, ``cli`` or ``manhole``), returns a
Deferred of plain JSON-able data (dicts and lists of str, int, float, bool,
None) and raises ``NotFound``, ``Invalid`` or ``Conflict`` (through the
Deferred). Every change and every view of message content writes a row of
the audit trail (store/audit.py), refused attempts included. The methods are
documented in docs/operations.md, "The operations facade".
"""

from __future__ import annotations

import base64
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from attrs import define, evolve, field
from sqlalchemy import Connection
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool

from udsgateway import flowstore
from udsgateway.assembly import tenant_charset
from udsgateway.cluster import status as cluster_status
from udsgateway.cluster.leases import ranges
from udsgateway.config import TenantConfig
from udsgateway.flows import App, Flow, FlowFileError, app_document, parse_app, write_app
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.hl7.header import HeaderProblem, parse_header
from udsgateway.hl7.message import MessageParseError
from udsgateway.mapping.catalogue import variable_catalogue
from udsgateway.mapping.checks import template_problems
from udsgateway.mapping.templating import RenderError, TemplateError, compile_template
from udsgateway.outbound.render import read_trigger, render_action, sender_bytes
from udsgateway.store import (
    audit,
    destinations,
    executions,
    leases,
    logs,
    operator,
    outbox,
    overview,
    search,
)
from udsgateway.store.engine import Database
from udsgateway.store.reads import read_now
from udsgateway.store.records import LogLine

T = TypeVar("T")

VIA = audit.VIA
#: Parts of a message's content that ``content`` shows.
CONTENT_PARTS = ("inbound", "ack", "outbound", "response")


class OperationsError(Exception):
    """An operation refused; the message says why (no message content)."""


class NotFound(OperationsError):  # noqa: N818 - the names the API maps
    """The object does not exist (HTTP 404)."""


class Invalid(OperationsError):  # noqa: N818
    """The request is wrong: a bad filter, a missing reason (HTTP 400)."""


class Conflict(OperationsError):  # noqa: N818
    """The object is not in a state that allows it, or a count changed (HTTP 409)."""


def _iso(epoch: float | None) -> str | None:
    if epoch is None or epoch <= 0:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _text(data: bytes | None) -> str | None:
    """Content for JSON: HL7 segments on lines; bytes that are not UTF-8 as latin-1."""
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r", "\n")


# -- rates over the last minute and hour

#: What the status counts per flow since start (and its rates): executions routed
#: (an accepted message stored for the flow) and ended done, failed or held.
FLOW_OUTCOMES = ("routed", "done", "failed", "held")


@define
class Rates:
    """Per-second rates over the last minute and hour, from cumulative counters.

    Every ``step`` seconds (10) on the reactor, ``sample`` reads the counters
    (``read``: name -> cumulative count) and keeps the reading in a ring of
    ``3600 / step + 1`` entries: memory is bounded whatever the traffic. A rate
    is the difference between the newest reading and the one a minute (an hour)
    before, divided by the time between them; before a minute has passed, the
    oldest reading is used.
    """

    read: Callable[[], Mapping[str, int]]
    clock: IReactorTime
    step: float = 10.0
    _ring: deque[tuple[float, dict[str, int]]] = field(init=False)
    _loop: LoopingCall | None = None

    def __attrs_post_init__(self) -> None:
        self._ring = deque(maxlen=int(3600 / self.step) + 1)

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self.sample)
            self._loop.clock = self.clock
            self._loop.start(self.step, now=True)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def sample(self) -> None:
        self._ring.append((self.clock.seconds(), dict(self.read())))

    def rates(self, window: float) -> dict[str, float]:
        """name -> per-second rate over the last ``window`` seconds (up to the ring)."""
        if len(self._ring) < 2:
            return {}
        now, newest = self._ring[-1]
        then, oldest = self._ring[0]
        for at, reading in self._ring:
            if at >= now - window - self.step / 2:
                then, oldest = at, reading
                break
        elapsed = now - then
        if elapsed <= 0:
            return {}
        return {
            name: round(max(0, count - oldest.get(name, 0)) / elapsed, 3)
            for name, count in newest.items()
        }


def listening_addresses(service: Any) -> dict[str, tuple[str, int]]:
    """tenant -> (host, port) its listener opened (a configured port 0: the one chosen)."""
    found = {}
    for name, listener in (getattr(service, "listeners", None) or {}).items():
        host = getattr(listener, "address", None)
        if host is not None:
            found[name] = (str(getattr(host, "host", "")), int(getattr(host, "port", 0)))
    return found


# -- the facade


@define(eq=False)
class Operations:
    """The operations of a running gateway (or of a database alone: the CLI).

    ``dispatcher``, ``executor``, ``ingests`` and ``listeners`` are the live
    objects (None or empty for the CLI, which works on the database only:
    its changes reach a running gateway within the delivery ``held_poll``).
    """

    database: Database
    clock: IReactorTime
    wall: Callable[[], float] = time.time
    dispatcher: Any = None  # outbound Dispatcher
    executor: Any = None  # outbound Executor
    ingests: Mapping[str, Any] = field(factory=dict)  # tenant -> Ingest
    listeners: Mapping[str, Any] = field(factory=dict)  # tenant -> ListenerFactory
    #: tenant -> (host, port) a sender connects to, for ``flow_saved``.
    addresses: Callable[[], Mapping[str, tuple[str, int]]] = dict
    rates: Rates | None = None
    #: Runs read-only work (``read_now`` calls) away from the database thread; None:
    #: reads go through the database thread like everything else (CLI, tests).
    reads: Callable[..., Deferred[Any]] | None = None
    #: The configured tenants, by name (flows are imported for these only).
    tenants: Mapping[str, TenantConfig] = field(factory=dict)
    #: Loads changed flows into the running gateway at once (its ``reload_flows``),
    #: so a saved flow routes before the next reload interval; None: no gateway.
    reload_flows: Callable[[], Deferred[None]] | None = None
    #: This node's LeaseManager (cluster.leases), looked up at each call; None: not a
    #: node of a cluster.
    lease_manager: Callable[[], Any] = lambda: None

    @classmethod
    def for_service(cls, service: Any, reactor: Any, wall: Callable[[], float]) -> Operations:
        """The facade over a GatewayService (its database, dispatcher, executor, ingests)."""
        operations = cls(
            service.database,
            reactor,
            wall,
            dispatcher=service.dispatcher,
            executor=service.executor,
            ingests=service.ingests,
            listeners=getattr(service, "factories", {}),
            addresses=lambda: listening_addresses(service),
            tenants={tenant.name: tenant for tenant in service.config.tenants},
            reload_flows=getattr(service, "reload_flows", None),
            lease_manager=lambda: getattr(service, "leases", None),
        )
        operations.rates = Rates(operations.counters, reactor)
        engine = service.database.engine
        in_memory = engine.dialect.name == "sqlite" and engine.url.database in (
            None,
            "",
            ":memory:",
        )
        if hasattr(reactor, "getThreadPool") and not in_memory:

            def reads(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
                return deferToThreadPool(
                    reactor, reactor.getThreadPool(), read_now, engine, function, *args
                )

            operations.reads = reads
        return operations

    @classmethod
    def shared(
        cls, service: Any, reactor: Any, wall: Callable[[], float] = time.time
    ) -> Operations:
        """The one facade of a GatewayService, made on first use and kept as
        ``service.operations`` (the admin API and the manhole share it, and its rates)."""
        found: Operations | None = getattr(service, "operations", None)
        if found is None:
            found = cls.for_service(service, reactor, wall)
            service.operations = found
        return found

    # -- plumbing

    def _run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return self.database.transaction(function, *args)

    def _read(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Read-only work: in a thread of its own, never holding up the inbound
        commits (store/reads.py); through the database thread without ``reads``."""
        if self.reads is None:
            return self.database.transaction(function, *args)
        return self.reads(function, *args)

    def _check(self, actor: str, via: str) -> None:
        if not actor:
            raise Invalid("an operator name is required")
        if via not in VIA:
            raise Invalid(f"via: expected one of {', '.join(VIA)}")

    def _audited(
        self,
        actor: str,
        via: str,
        action: str,
        target: str,
        reason: str,
        work: Callable[[Connection], T],
    ) -> Deferred[T]:
        """Run ``work`` and its audit row in one transaction; a refusal is audited too
        (in a transaction of its own, with the refusal as result)."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        now = self.wall()

        def both(connection: Connection) -> T:
            result = work(connection)
            audit.append(connection, actor, action, target, now, reason, "ok", via)
            return result

        def refused(failure: Any) -> Any:
            if failure.check(OperationsError):
                result = f"refused: {failure.getErrorMessage()}"
                written = self._run(audit.append, actor, action, target, now, reason, result, via)
                written.addCallback(lambda _: failure)
                return written
            return failure

        done = self._run(both)
        done.addErrback(refused)
        return done

    # -- status

    def counters(self) -> dict[str, int]:
        """Cumulative in-memory counters since start, for the rates (name -> count)."""
        found: dict[str, int] = {}
        for tenant, ingest in self.ingests.items():
            stats = ingest.stats
            found[f"tenant.{tenant}.received"] = stats.frames
            rejected = sum(stats.rejected.values())
            found[f"tenant.{tenant}.accepted"] = stats.stored - rejected
            found[f"tenant.{tenant}.duplicates"] = stats.replayed
            found[f"tenant.{tenant}.rejected"] = rejected + sum(stats.errors.values())
        if self.dispatcher is not None:
            for address, count in getattr(self.dispatcher, "sent", {}).items():
                found[f"destination.{address}.delivered"] = count
            for address, counts in getattr(self.dispatcher, "attempts", {}).items():
                found[f"destination.{address}.attempts"] = sum(counts.values())
        if self.executor is not None:
            found["executions.rendered"] = self.executor.rendered
            found["executions.failed"] = self.executor.failed
            found["executions.held"] = self.executor.held
        for flow, counts in self._flow_counters().items():
            for outcome, count in counts.items():
                found[f"flow.{flow}.{outcome}"] = count
        return found

    def _flow_counters(self) -> dict[str, dict[str, int]]:
        """Per Flow ID since start: routed (from the ingests), done, failed, held
        (executions ended so, from the executor)."""
        flows: dict[str, dict[str, int]] = {}
        for ingest in self.ingests.values():
            for flow, count in getattr(ingest.stats, "routed", {}).items():
                entry = flows.setdefault(flow, dict.fromkeys(FLOW_OUTCOMES, 0))
                entry["routed"] += count
        if self.executor is not None:
            for flow, counts in getattr(self.executor, "flow_executions", {}).items():
                entry = flows.setdefault(flow, dict.fromkeys(FLOW_OUTCOMES, 0))
                for outcome in FLOW_OUTCOMES[1:]:
                    entry[outcome] += counts.get(outcome, 0)
        return flows

    def status(self, actor: str, via: str, history: bool = False) -> Deferred[dict[str, Any]]:
        """Per tenant (connections, received, accepted, duplicates, rejected by code), per
        flow (routed, executions by state), per destination (queued, held, delivered,
        attempts, oldest pending age, connection up/down/idle, paused), and rates over the
        last minute and hour. Counts in ``tenants`` are since the process started; flow and
        destination counts are from the database. ``history`` (the console's dashboard)
        adds per flow ``received`` (messages routed to it) and ``last_hour`` (executions
        finished in each of the last 60 minutes, oldest first), and the destinations of
        every stored flow (also those without deliveries yet)."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        done = self._read(_status_rows, self.wall(), history)
        done.addCallback(self._status)
        return done

    def _status(self, stored: dict[str, Any]) -> dict[str, Any]:
        tenants = {}
        for name, ingest in self.ingests.items():
            stats = ingest.stats
            listener = self.listeners.get(name)
            rejected = stats.rejected + stats.errors
            tenants[name] = {
                "open_connections": listener.stats.open_connections if listener else 0,
                "connections": listener.stats.connections if listener else 0,
                "received": stats.frames,
                "accepted": stats.stored - sum(stats.rejected.values()),
                "duplicates": stats.replayed,
                "rejected": sum(rejected.values()),
                "rejected_by_code": {str(code): n for code, n in sorted(rejected.items())},
                "acks": dict(sorted(stats.acks.items())),
            }
        live: dict[str, dict[str, Any]] = {}
        if self.dispatcher is not None:
            for destination in self.dispatcher.destinations.values():
                address = destinations.address_of(destination.endpoint)
                entry = live.setdefault(
                    address, {"connected": False, "down": False, "last_error": ""}
                )
                entry["connected"] = entry["connected"] or destination.connected
                entry["down"] = entry["down"] or bool(getattr(destination, "down", False))
                entry["last_error"] = entry["last_error"] or destination.last_error
        sent = dict(getattr(self.dispatcher, "sent", {}) or {})
        tried = dict(getattr(self.dispatcher, "attempts", {}) or {})
        for address, entry in stored["destinations"].items():
            state = live.get(address, {})
            entry["connected"] = state.get("connected", False)
            entry["connection"] = _connection(state, self.dispatcher is not None)
            entry["last_error"] = state.get("last_error", "")
            entry["delivered_since_start"] = sent.get(address, 0)
            entry["attempts_since_start"] = dict(sorted(tried.get(address, {}).items()))
        rates: dict[str, Any] = {"minute": {}, "hour": {}}
        if self.rates is not None:
            rates = {"minute": self.rates.rates(60), "hour": self.rates.rates(3600)}
        for address, entry in stored["destinations"].items():
            entry["rates"] = _rates_of(rates, f"destination.{address}.")
        flows = stored["flows"]
        for flow, counts in self._flow_counters().items():
            entry = flows.get(flow)
            if entry is None:
                continue  # a flow deleted since: its counts stay in the metrics
            entry["since_start"] = counts
        for flow, entry in flows.items():
            entry.setdefault("since_start", dict.fromkeys(FLOW_OUTCOMES, 0))
            entry["rates"] = _rates_of(rates, f"flow.{flow}.")
        return {
            "tenants": tenants,
            "flows": flows,
            "destinations": stored["destinations"],
            "rates": rates,
        }

    # -- destinations and queue control

    def destinations(self, actor: str, via: str) -> Deferred[list[dict[str, Any]]]:
        """Every destination with work or a pause: queued, held, oldest pending, paused."""
        done: Deferred[Any] = self.status(actor, via)
        done.addCallback(
            lambda status: [
                {"destination": address, **entry}
                for address, entry in sorted(status["destinations"].items())
            ]
        )
        return done

    def pause(
        self, actor: str, via: str, destination: str, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Pause a destination (``host:port``): it keeps queueing, nothing is sent to it
        until it is resumed. Persisted: survives a restart. Conflict when paused already."""
        address = destination.strip()

        def work(connection: Connection) -> dict[str, Any]:
            if not address:
                raise Invalid("destination: required (host:port)")
            if not destinations.pause(connection, address, actor, reason, self.wall()):
                raise Conflict(f"destination {address} is paused already")
            return {"destination": address, "paused": True, "paused_by": actor}

        done = self._audited(
            actor, via, "destination.pause", f"destination {address}", reason, work
        )
        done.addCallback(self._pauses_changed)
        return done

    def resume(
        self, actor: str, via: str, destination: str, reason: str = ""
    ) -> Deferred[dict[str, Any]]:
        """Resume a paused destination: its lanes send again at once. Conflict when it was
        not paused."""
        address = destination.strip()

        def work(connection: Connection) -> dict[str, Any]:
            if not destinations.resume(connection, address):
                raise Conflict(f"destination {address} is not paused")
            return {"destination": address, "paused": False, "paused_by": None}

        done = self._audited(
            actor, via, "destination.resume", f"destination {address}", reason, work
        )
        done.addCallback(self._pauses_changed)
        return done

    def _pauses_changed(self, result: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if self.dispatcher is None:
            return Deferred.fromCoroutine(_value(result))
        done = self._run(destinations.pauses)

        def apply(found: dict[str, destinations.Pause]) -> dict[str, Any]:
            self.dispatcher.set_pauses({a: p.paused_by for a, p in found.items()})
            return result

        done.addCallback(apply)
        return done

    def deliveries(
        self,
        actor: str,
        via: str,
        states: Sequence[str] = (),
        destination: str | None = None,
        lane: str | None = None,
        limit: int = 100,
    ) -> Deferred[list[dict[str, Any]]]:
        """Deliveries oldest first (never their payload), each with why it waits."""
        try:
            self._check(actor, via)
            for state in states:
                if state not in (outbox.QUEUED, outbox.HELD, outbox.DELIVERED, outbox.SKIPPED):
                    raise Invalid(f"state: unknown state {state!r}")
        except OperationsError:
            return fail()
        return self._read(self._deliveries, tuple(states), destination, lane, limit)

    def _deliveries(
        self,
        connection: Connection,
        states: tuple[str, ...],
        destination: str | None,
        lane: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        rows = overview.deliveries_page(
            connection, states, destination, lane, max(1, min(limit, 1000))
        )
        if destination is not None:  # the LIKE may match more (a host that is a prefix)
            rows = [r for r in rows if destinations.address_of(r.destination) == destination]
        return self._described(connection, rows)

    def _described(
        self, connection: Connection, rows: Sequence[outbox.Delivery]
    ) -> list[dict[str, Any]]:
        heads = overview.lane_heads(
            connection, [row.lane for row in rows if row.state in outbox.OPEN_STATES]
        )
        pauses = destinations.pauses(connection)
        now = self.wall()
        return [_delivery_view(row, heads.get(row.lane), pauses, now) for row in rows]

    def delivery(self, actor: str, via: str, delivery_id: int) -> Deferred[dict[str, Any]]:
        """One delivery (no payload), with why it waits."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            row = outbox.get_delivery(connection, delivery_id)
            if row is None:
                raise NotFound(f"no delivery {delivery_id}")
            return self._described(connection, [row])[0]

        return self._read(work)

    def release(
        self, actor: str, via: str, delivery_id: int, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Send a held (or queued, retrying) delivery again now. Requires a reason."""
        return self._delivery_action(actor, via, delivery_id, "release", reason)

    def retry_now(
        self, actor: str, via: str, delivery_id: int, reason: str = "retry now"
    ) -> Deferred[dict[str, Any]]:
        """A queued delivery waiting for its backoff is sent now (its attempts restart)."""
        return self._delivery_action(actor, via, delivery_id, "release", reason, "retry")

    def skip(
        self, actor: str, via: str, delivery_id: int, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Give up on a held or queued delivery: its lane moves on; its execution fails."""
        return self._delivery_action(actor, via, delivery_id, "skip", reason)

    def replay_delivery(
        self, actor: str, via: str, delivery_id: int, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Send a delivery again (also a delivered or skipped one), before what is queued
        after it in its lane."""
        return self._delivery_action(actor, via, delivery_id, "replay", reason)

    def _delivery_action(
        self,
        actor: str,
        via: str,
        delivery_id: int,
        action: str,
        reason: str,
        name: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        label = name or action

        def work(connection: Connection) -> outbox.Delivery:
            if not reason.strip():
                raise Invalid("reason: required")
            current = outbox.get_delivery(connection, delivery_id)
            if current is None:
                raise NotFound(f"no delivery {delivery_id}")
            if label == "retry" and current.state != outbox.QUEUED:
                raise Conflict(f"delivery {delivery_id} is {current.state}, not queued")
            return self._act(connection, current, action, actor, via, reason)

        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def refused(failure: Any) -> Any:
            if failure.check(OperationsError):
                written = self._run(
                    audit.append,
                    actor,
                    f"delivery.{label}",
                    f"delivery {delivery_id}",
                    self.wall(),
                    reason,
                    f"refused: {failure.getErrorMessage()}",
                    via,
                )
                written.addCallback(lambda _: failure)
                return written
            return failure

        done: Deferred[Any] = self._run(work)
        done.addErrback(refused)

        def acted(row: outbox.Delivery) -> Deferred[dict[str, Any]]:
            if self.dispatcher is not None:
                self.dispatcher.operator_acted(row.lane)
            return self._read(lambda connection: self._described(connection, [row])[0])

        done.addCallback(acted)
        return done

    def _act(
        self,
        connection: Connection,
        current: outbox.Delivery,
        action: str,
        actor: str,
        via: str,
        reason: str,
    ) -> outbox.Delivery:
        """``store.operator.delivery_action`` on a delivery (audited there); the MSH-10
        read from its payload when it was stored without one (an older version)."""
        control_id = None
        if operator.needs_control_id(current, action, None):
            header = parse_header(current.payload, default_charset="latin-1")
            if isinstance(header, HeaderProblem) or not header.control_id:
                raise Conflict(f"the message of delivery {current.id} has no MSH-10")
            control_id = header.control_id
        try:
            return operator.delivery_action(
                connection, current.id, action, actor, reason, self.wall(), None, control_id, via
            )
        except LookupError as error:
            raise NotFound(str(error)) from None
        except ValueError as error:
            raise Conflict(str(error)) from None

    #: The states ``replay_deliveries`` sends again.
    REPLAYABLE: ClassVar[tuple[str, ...]] = (outbox.SKIPPED, outbox.DELIVERED)

    def replay_deliveries(
        self,
        actor: str,
        via: str,
        destination: str,
        state: str,
        reason: str,
        confirm_count: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Send again every ``state`` (skipped or delivered) delivery of a destination
        (``host:port``), oldest first, each before what is queued after it in its lane.

        Without ``confirm_count`` nothing runs: the answer is ``{"count": n}``. With
        ``confirm_count=n``: Conflict (nothing runs) if the set no longer has n
        deliveries, else they are replayed. At most 10,000 at a time."""
        address = destination.strip()

        def matching(connection: Connection) -> list[outbox.Delivery]:
            if not address:
                raise Invalid("destination: required (host:port)")
            if state not in self.REPLAYABLE:
                raise Invalid(f"state: expected one of {', '.join(self.REPLAYABLE)}")
            rows = overview.deliveries_page(connection, (state,), address, None, 10_001)
            rows = [r for r in rows if destinations.address_of(r.destination) == address]
            if len(rows) > 10_000:
                raise Invalid("more than 10,000 deliveries match: replay them in parts")
            return rows

        if confirm_count is None:
            try:
                self._check(actor, via)
            except OperationsError:
                return fail()
            counted: Deferred[Any] = self._read(matching)
            counted.addCallback(lambda rows: {"count": len(rows), "replayed": 0})
            return counted

        def work(connection: Connection) -> dict[str, Any]:
            if not reason.strip():
                raise Invalid("reason: required")
            rows = matching(connection)
            if len(rows) != confirm_count:
                raise Conflict(f"{len(rows)} deliveries match now, not {confirm_count}")
            lanes = [self._act(connection, row, "replay", actor, via, reason).lane for row in rows]
            return {"count": len(rows), "replayed": len(rows), "lanes": lanes}

        target = f"destination {address} {state}"
        done = self._audited(actor, via, "deliveries.replay", target, reason, work)

        def woken(result: dict[str, Any]) -> dict[str, Any]:
            lanes = result.pop("lanes")
            if self.dispatcher is not None:
                for lane in dict.fromkeys(lanes):
                    self.dispatcher.operator_acted(lane)
            return result

        done.addCallback(woken)
        return done

    def release_execution(
        self, actor: str, via: str, execution_id: int, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Render a held execution's action again (after its flow was fixed)."""

        def work(connection: Connection) -> dict[str, Any]:
            if not reason.strip():
                raise Invalid("reason: required")
            try:
                row = operator.release_execution(
                    connection, execution_id, actor, reason, self.wall(), via
                )
            except LookupError as error:
                raise NotFound(str(error)) from None
            except ValueError as error:
                raise Conflict(str(error)) from None
            return {"id": row.id, "state": row.state, "flow_id": row.flow_id, "step": row.step}

        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        done = self._run(work)

        def woken(result: dict[str, Any]) -> dict[str, Any]:
            if self.executor is not None:
                self.executor.wake()
            return result

        done.addCallback(woken)
        return done

    # -- replay of messages through a flow

    def replay_messages(
        self,
        actor: str,
        via: str,
        query: search.Query,
        reason: str,
        flow_id: str | None = None,
        confirm_count: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Replay the accepted messages matching ``query`` through ``flow_id`` (or each
        through the flows it was routed to): new executions, sent again.

        Without ``confirm_count`` nothing runs: the answer is ``{"count": n}``. Run again
        with ``confirm_count=n``: if the set no longer has n messages, Conflict (and
        nothing runs); else they are replayed, oldest first. At most 10,000 at a time.
        """
        matching = search.Query(**{**_query_fields(query), "status": "accepted"})
        if confirm_count is None:
            try:
                self._check(actor, via)
            except OperationsError:
                return fail()
            counted: Deferred[Any] = self._read(self._checked_count, matching, flow_id)
            counted.addCallback(lambda n: {"count": n, "replayed": 0})
            return counted

        def work(connection: Connection) -> dict[str, Any]:
            if not reason.strip():
                raise Invalid("reason: required")
            ids = search.matching_ids(connection, matching, 10_001)
            if len(ids) > 10_000:
                raise Invalid("more than 10,000 messages match: narrow the search")
            if len(ids) != confirm_count:
                raise Conflict(f"{len(ids)} messages match now, not {confirm_count}")
            self._known_flow(connection, flow_id)
            made = executions.replay(
                connection, _targets(connection, ids, flow_id), actor, reason, self.wall()
            )
            return {"count": len(ids), "replayed": len(ids), "executions": len(made)}

        target = f"messages {_describe(matching)}"[:255] + (f" flow {flow_id}" if flow_id else "")
        done = self._audited(actor, via, "message.replay", target, reason, work)
        done.addCallback(self._woke)
        return done

    def replay_message(
        self, actor: str, via: str, message_id: int, reason: str, flow_id: str | None = None
    ) -> Deferred[dict[str, Any]]:
        """Replay one accepted message through ``flow_id`` (or its own flows)."""

        def work(connection: Connection) -> dict[str, Any]:
            if not reason.strip():
                raise Invalid("reason: required")
            found = search.detail(connection, message_id)
            if found is None:
                raise NotFound(f"no message {message_id}")
            if not found.message.accepted:
                raise Conflict(f"message {message_id} was rejected: nothing to replay")
            self._known_flow(connection, flow_id)
            made = executions.replay(
                connection, _targets(connection, [message_id], flow_id), actor, reason, self.wall()
            )
            return {"count": 1, "replayed": 1, "executions": len(made)}

        target = f"message {message_id}" + (f" flow {flow_id}" if flow_id else "")
        done = self._audited(actor, via, "message.replay", target, reason, work)
        done.addCallback(self._woke)
        return done

    def _checked_count(
        self, connection: Connection, query: search.Query, flow_id: str | None
    ) -> int:
        self._known_flow(connection, flow_id)
        return len(search.matching_ids(connection, query, 10_001))

    @staticmethod
    def _known_flow(connection: Connection, flow_id: str | None) -> None:
        if flow_id is None:
            return
        if not overview.flow_exists(connection, flow_id):
            raise NotFound(f"no flow {flow_id}")

    def _woke(self, result: dict[str, Any]) -> dict[str, Any]:
        if self.executor is not None:
            self.executor.wake()
        return result

    # -- messages

    def messages(self, actor: str, via: str, query: search.Query) -> Deferred[dict[str, Any]]:
        """Search stored messages, newest first (metadata only). The answer has the
        page (``messages``) and ``next`` (pass it as ``before_id`` for the next page;
        None on the last page)."""
        try:
            self._check(actor, via)
            _validate(query)
            known = set(self.tenants) | set(self.ingests)
            if query.tenant is not None and known and query.tenant not in known:
                raise Invalid(f"tenant: no tenant {query.tenant!r}")
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            try:
                rows = search.search(connection, query)
            except ValueError as error:
                raise Invalid(str(error)) from None
            return {
                "messages": [_message_view(row) for row in rows],
                "next": rows[-1].id if len(rows) == query.limit and rows else None,
            }

        return self._read(work)

    def message(self, actor: str, via: str, message_id: int) -> Deferred[dict[str, Any]]:
        """A message's metadata, the ACK code sent, its executions, its deliveries (with
        why each waits) and their attempts, and its ``timeline``: its lines of the
        execution log, oldest first (received, each step, each attempt, operators'
        actions). No content: see ``content``."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            found = search.detail(connection, message_id)
            if found is None:
                raise NotFound(f"no message {message_id}")
            rows = [outbox.get_delivery(connection, a.id) for a in found.deliveries]
            views = self._described(connection, [r for r in rows if r is not None])
            lines = logs.log_lines(
                connection,
                limit=10_000,
                message_id=message_id,
                execution_ids=[e.id for e in found.executions],
            )
            attempts: dict[tuple[int, int], list[dict[str, Any]]] = {}
            for line in lines:
                if line.event != "delivery" or line.execution_id is None:
                    continue
                attempts.setdefault((line.execution_id, line.step or 0), []).append(
                    {
                        "attempt": line.attempt or 0,
                        "outcome": line.outcome,
                        "ack": line.ack_code,
                        "reason": line.reason,
                        "at": _iso(line.at),
                    }
                )
            for view, item in zip(views, found.deliveries, strict=True):
                view["attempt_log"] = attempts.get((item.execution_id or 0, item.step), [])
            return {
                **_message_view(found.message),
                "executions": [
                    {
                        "id": e.id,
                        "flow_id": e.flow_id,
                        "state": e.state,
                        "step": e.step,
                        "created_at": _iso(e.created_at),
                        "updated_at": _iso(e.updated_at),
                        "error": e.error,
                    }
                    for e in found.executions
                ],
                "deliveries": views,
                "timeline": [_log_view(line) for line in lines],
            }

        return self._read(work)

    def content(
        self,
        actor: str,
        via: str,
        message_id: int | None = None,
        part: str = "inbound",
        delivery_id: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Message content, audited: ``inbound`` (the raw message) or ``ack`` (the ACK
        sent) of ``message_id``; ``outbound`` (the rendered message) or ``response``
        (the destination's reply) of ``delivery_id``. Text with segments on lines;
        ``base64`` has the exact bytes."""
        if part not in CONTENT_PARTS:
            return fail(Invalid(f"part: expected one of {', '.join(CONTENT_PARTS)}"))
        if part in ("inbound", "ack"):
            target = f"message {message_id}"
        else:
            target = f"delivery {delivery_id}"

        def work(connection: Connection) -> dict[str, Any]:
            data: bytes | None
            if part in ("inbound", "ack"):
                if message_id is None:
                    raise Invalid("message_id: required")
                found = search.content(connection, message_id)
                if found is None:
                    raise NotFound(f"no message {message_id}")
                data = found[0] if part == "inbound" else found[1]
                owner: int | None = message_id
            else:
                if delivery_id is None:
                    raise Invalid("delivery_id: required")
                sent = search.delivery_content(connection, delivery_id)
                if sent is None:
                    raise NotFound(f"no delivery {delivery_id}")
                owner, payload, response = sent
                data = payload if part == "outbound" else response
            return {
                "message_id": owner,
                "delivery_id": delivery_id,
                "part": part,
                "text": _text(data),
                "base64": base64.b64encode(data).decode("ascii") if data is not None else None,
            }

        return self._audited(actor, via, f"content.{part}", target, "", work)

    def message_content(self, actor: str, via: str, message_id: int) -> Deferred[dict[str, Any]]:
        """All the content of a message at once, audited as one view
        (``message.content``): ``inbound`` (as received), ``ack`` (as sent), and per
        delivery its ``outbound`` message and the destination's ``response`` (text,
        segments on lines; None where there is none)."""

        def work(connection: Connection) -> dict[str, Any]:
            found = search.content(connection, message_id)
            detail = search.detail(connection, message_id)
            if found is None or detail is None:
                raise NotFound(f"no message {message_id}")
            deliveries = []
            for item in detail.deliveries:
                sent = search.delivery_content(connection, item.id)
                if sent is not None:
                    deliveries.append(
                        {
                            "id": item.id,
                            "step": item.step,
                            "outbound": _text(sent[1]),
                            "response": _text(sent[2]),
                        }
                    )
            return {
                "message_id": message_id,
                "inbound": _text(found[0]),
                "ack": _text(found[1]),
                "deliveries": deliveries,
            }

        return self._audited(actor, via, "message.content", f"message {message_id}", "", work)

    # -- flows

    def _address(self, tenant: str) -> tuple[str, int]:
        live = self.addresses().get(tenant)
        if live is not None:
            return live
        config = self.tenants.get(tenant)
        return _listen_address(config.listen) if config is not None else ("", 0)

    def _flow_rows(self, apps: Sequence[App]) -> list[dict[str, Any]]:
        rows = []
        for app in apps:
            host, port = self._address(app.tenant)
            for flow in app.flows:
                rows.append(
                    {
                        "host": host,
                        "port": port,
                        "app_id": app.app_id,
                        "flow_id": flow.flow_id,
                        "tenant": app.tenant,
                        "app": app.name,
                        "name": flow.name,
                        "message_type": flow.trigger.message_type,
                        "connection": flow.trigger.connection,
                        "enabled": flow.enabled,
                        "actions": len(flow.actions),
                    }
                )
        return rows

    def flows(
        self, actor: str, via: str, tenant: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """Every flow: Host, Port (where a sender connects), App ID, Flow ID, tenant, name,
        message type, connection, enabled, number of actions."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        done: Deferred[Any] = self._read(flowstore.load_apps, tenant)
        done.addCallback(self._flow_rows)
        return done

    def _find_flow(self, connection: Connection, flow_id: str) -> tuple[App, Flow]:
        for app in flowstore.load_apps(connection, None):
            for flow in app.flows:
                if flow.flow_id == flow_id:
                    return app, flow
        raise NotFound(f"no flow {flow_id}")

    def flow(self, actor: str, via: str, flow_id: str) -> Deferred[dict[str, Any]]:
        """One flow as its flow file has it (trigger, actions with templates), with its
        app's ID, name and tenant, and Host and Port."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            app, flow = self._find_flow(connection, flow_id)
            [document] = [f for f in app_document(app)["flows"] if f["flow_id"] == flow.flow_id]
            host, port = self._address(app.tenant)
            return {
                **document,
                "app_id": app.app_id,
                "app": app.name,
                "tenant": app.tenant,
                "host": host,
                "port": port,
            }

        return self._read(work)

    def _checked_app(self, text: str, name: str) -> tuple[App | None, list[str]]:
        """The app of a flow document and every problem ``flows import`` would find."""
        try:
            app = parse_app(text, name)
        except FlowFileError as error:
            return None, list(error.problems)
        if self.tenants and app.tenant not in self.tenants:
            return app, [f"{name}: tenant: {app.tenant!r} is not configured"]
        return app, template_problems(name, app)

    def validate_flows(self, actor: str, via: str, text: str) -> Deferred[dict[str, Any]]:
        """Check a flow document (the TOML of a flow file) as ``flows import`` does,
        without saving: ``{"valid": bool, "problems": [...]}``."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        _app, problems = self._checked_app(text, "<document>")
        return Deferred.fromCoroutine(_value({"valid": not problems, "problems": problems}))

    def import_flows(self, actor: str, via: str, text: str) -> Deferred[list[dict[str, Any]]]:
        """Save a flow document (the same checks as ``flows import``; Invalid with every
        problem). Returns what a sender needs per flow: Host, Port, App ID, Flow ID.
        The running gateway routes by it as soon as this answers."""
        app, problems = self._checked_app(text, "<document>")
        target = f"app {app.app_id or app.name}" if app is not None else "app (unreadable)"

        def work(connection: Connection) -> list[App]:
            if problems or app is None:
                raise Invalid("; ".join(problems))
            try:
                return [flowstore.save_app(connection, app, self.wall())]
            except ValueError as error:
                raise Conflict(str(error)) from None

        done: Deferred[Any] = self._audited(actor, via, "flows.import", target, "", work)
        done.addCallback(self._reloaded)
        done.addCallback(self._flow_rows)
        return done

    def _reloaded(self, result: Any) -> Deferred[Any]:
        """``result`` once the running gateway took the changed flows."""
        if self.reload_flows is None:
            return succeed(result)
        reloading = self.reload_flows()
        reloading.addCallback(lambda _: result)
        return reloading

    def export_flows(self, actor: str, via: str, app_id: str) -> Deferred[dict[str, Any]]:
        """An app as the text of its flow file: ``{"app_id", "text"}``."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            for app in flowstore.load_apps(connection, None):
                if app.app_id == app_id:
                    return {"app_id": app_id, "text": write_app(app)}
            raise NotFound(f"no app {app_id}")

        return self._read(work)

    def apps(
        self, actor: str, via: str, tenant: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """Every app as its flow file has it (its flows with trigger, sample and actions),
        with the Host and Port its senders connect to."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        done: Deferred[Any] = self._read(flowstore.load_apps, tenant)
        done.addCallback(lambda apps: [self._app_view(app) for app in apps])
        return done

    def _app_view(self, app: App) -> dict[str, Any]:
        host, port = self._address(app.tenant)
        return {**app_document(app), "host": host, "port": port}

    def save_flow(self, actor: str, via: str, app: App, flow: Flow) -> Deferred[dict[str, Any]]:
        """Save one flow (the console's editor): into the stored app ``app.app_id`` (its
        other flows kept), or a new app (no App ID); the flow replaces the one of its
        Flow ID, or is added (none). The checks of ``flows import`` (Invalid with every
        problem). Answers Host, Port, App ID, Flow ID and the saved ``app``; the
        running gateway routes by it as soon as this answers."""

        def work(connection: Connection) -> tuple[App, Flow]:
            stored = {a.app_id: a for a in flowstore.load_apps(connection, None)}
            base = stored.get(app.app_id, evolve(app, flows=())) if app.app_id else app
            if base.tenant != app.tenant and app.app_id:
                raise Conflict(f"app {app.app_id} belongs to tenant {base.tenant}")
            flows = list(base.flows) if app.app_id else []
            places = [i for i, f in enumerate(flows) if flow.flow_id and f.flow_id == flow.flow_id]
            if places:
                flows[places[0]] = flow
            else:
                flows.append(flow)
            merged = evolve(base, flows=tuple(flows))
            if self.tenants and merged.tenant not in self.tenants:
                raise Invalid(f"tenant: {merged.tenant!r} is not configured")
            problems = template_problems(f"app {merged.app_id or merged.name}", merged)
            if problems:
                raise Invalid("; ".join(problems))
            try:
                saved = flowstore.save_app(connection, merged, self.wall())
            except ValueError as error:
                raise Conflict(str(error)) from None
            index = places[0] if places else len(flows) - 1
            return saved, saved.flows[index]

        target = f"flow {flow.flow_id or '(new)'} app {app.app_id or '(new)'}"
        done: Deferred[Any] = self._audited(actor, via, "flow.save", target, "", work)
        done.addCallback(self._reloaded)

        def answer(found: tuple[App, Flow]) -> dict[str, Any]:
            saved, saved_flow = found
            view = self._app_view(saved)
            return {
                "host": view["host"],
                "port": view["port"],
                "app_id": saved.app_id,
                "flow_id": saved_flow.flow_id,
                "app": view,
            }

        done.addCallback(answer)
        return done

    def preview(
        self,
        actor: str,
        via: str,
        app: App,
        flow: Flow,
        step: int,
        responses: Mapping[str, str] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Render action ``step`` of a flow that is not saved (the editor's preview)
        against its sample, with fake ``responses`` of earlier actions, exactly as
        ``render`` renders a saved one. Invalid with the reason."""
        try:
            self._check(actor, via)
            return succeed(self._render(app, flow, str(step), None, responses or {}))
        except OperationsError:
            return fail()

    def note(
        self, actor: str, via: str, action: str, target: str, reason: str = "", result: str = "ok"
    ) -> Deferred[int]:
        """Write one row of the audit trail for what happened outside the facade (a
        login, an export handed to a browser); its id."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        return self._run(audit.append, actor, action, target, self.wall(), reason, result, via)

    def set_flow_enabled(
        self, actor: str, via: str, flow_id: str, enabled: bool, reason: str = ""
    ) -> Deferred[dict[str, Any]]:
        """Enable or disable a flow (a disabled flow receives nothing: its messages are
        rejected). Conflict when it is so already."""

        def work(connection: Connection) -> list[App]:
            app, flow = self._find_flow(connection, flow_id)
            if flow.enabled == enabled:
                state = "enabled" if enabled else "disabled"
                raise Conflict(f"flow {flow_id} is {state} already")
            flows = tuple(
                evolve(f, enabled=enabled) if f.flow_id == flow_id else f for f in app.flows
            )
            return [flowstore.save_app(connection, evolve(app, flows=flows), self.wall())]

        action = "flow.enable" if enabled else "flow.disable"
        done: Deferred[Any] = self._audited(actor, via, action, f"flow {flow_id}", reason, work)
        done.addCallback(self._reloaded)
        done.addCallback(
            lambda apps: next(r for r in self._flow_rows(apps) if r["flow_id"] == flow_id)
        )
        return done

    def variables(
        self, actor: str, via: str, flow_id: str | None = None, sample: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """The variable catalogue (path, name, sample value, template expression) of a
        flow's sample, or of a pasted ``sample`` message."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def catalogue(text: str) -> list[dict[str, Any]]:
            if not text.strip():
                raise Invalid("the sample is empty")
            try:
                found = variable_catalogue(text)
            except MessageParseError as error:
                raise Invalid(f"the sample is not an HL7 message: {error}") from None
            return [
                {"path": v.path, "name": v.name, "sample": v.value, "template": v.expression}
                for v in found
            ]

        if sample is not None:
            try:
                return Deferred.fromCoroutine(_value(catalogue(sample)))
            except OperationsError:
                return fail()
        if flow_id is None:
            return fail(Invalid("give a flow_id or a sample"))
        done: Deferred[Any] = self._read(lambda c: self._find_flow(c, flow_id)[1].trigger.sample)
        done.addCallback(catalogue)
        return done

    def render(
        self,
        actor: str,
        via: str,
        flow_id: str,
        action: str,
        message: str | None = None,
        responses: Mapping[str, str] | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Render an action (by name or position) of a flow against its sample, or a
        pasted ``message``, with fake ``responses`` of earlier actions (action name ->
        message text), as ``udsgateway flows render`` does: ``{"text", "base64"}``.
        Invalid with the reason when it cannot be rendered."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> tuple[App, Flow]:
            return self._find_flow(connection, flow_id)

        done: Deferred[Any] = self._read(work)
        done.addCallback(
            lambda found: self._render(found[0], found[1], action, message, responses or {})
        )
        return done

    def _render(
        self,
        app: App,
        flow: Flow,
        name: str,
        message: str | None,
        fakes: Mapping[str, str],
    ) -> dict[str, Any]:
        chosen = [
            step for step, one in enumerate(flow.actions) if one.name == name or str(step) == name
        ]
        if not chosen:
            names = ", ".join(a.name for a in flow.actions) or "none"
            raise NotFound(f"flow {flow.flow_id} has no action {name!r} (actions: {names})")
        step = chosen[0]
        earlier = [a.name for a in flow.actions[:step]]
        unknown = sorted(set(fakes) - set(earlier))
        if unknown:
            raise Invalid(
                f"responses: {', '.join(unknown)} is not an earlier action "
                f"(earlier: {', '.join(earlier) or 'none'})"
            )
        tenant = self.tenants.get(app.tenant)
        charset = tenant_charset(tenant) if tenant is not None else "latin-1"
        try:
            # A pasted message or the sample is text: encoded as a sender would send it,
            # then read exactly as the gateway reads what it receives (outbound/render).
            raw = sender_bytes(message if message is not None else flow.trigger.sample, charset)
            if not raw.strip():
                raise Invalid("no message to render from (the flow has no sample)")
            body = render_action(
                app,
                flow,
                step,
                compile_template(flow.actions[step].template),
                read_trigger(raw, charset),
                raw,
                [sender_bytes(fakes[one], "latin-1") if one in fakes else None for one in earlier],
                charset=charset,
                now=lambda: datetime.fromtimestamp(self.wall(), UTC),
                new_control_id=ControlIdSource.for_boot(self.wall()).next,
            )
        except (TemplateError, RenderError) as error:
            raise Invalid(f"action {flow.actions[step].name}: {error}") from None
        return {
            "flow_id": flow.flow_id,
            "action": flow.actions[step].name,
            "text": _text(body),
            "base64": base64.b64encode(body).decode("ascii"),
        }

    # -- the execution log

    #: ``logs`` status words for common questions, and the outcomes they select.
    STATUS_ALIASES: ClassVar[dict[str, str]] = {
        "failed": "failed",
        "held": "held",
        "ok": "delivered",
    }

    def logs(
        self,
        actor: str,
        via: str,
        flow_id: str | None = None,
        status: str | None = None,
        since: float | None = None,
        before_id: int | None = None,
        limit: int = 100,
        event: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """The execution log, newest first, with the filters of ``udsgateway logs``:
        flow, status (failed, held, ok = delivered, or any outcome), since (epoch
        seconds), event (received, delivery, execution, operator); ``next`` pages on
        (``before_id``). No message content."""
        try:
            self._check(actor, via)
            outcome = self._outcome(status)
            if not 1 <= limit <= 1000:
                raise Invalid("limit: between 1 and 1000")
        except OperationsError:
            return fail()
        done: Deferred[Any] = self._read(
            _log_lines, flow_id, outcome, since, 0, limit, True, before_id, event or None
        )
        done.addCallback(
            lambda rows: {
                "lines": [_log_view(row) for row in rows],
                "next": rows[-1].id if len(rows) == limit else None,
            }
        )
        return done

    def _outcome(self, status: str | None) -> str | None:
        if status is None:
            return None
        value = status.strip().lower()
        if not value:
            raise Invalid("status: empty")
        return self.STATUS_ALIASES.get(value, value)

    def tail(
        self,
        actor: str,
        via: str,
        after_id: int | None = None,
        flow_id: str | None = None,
        status: str | None = None,
        timeout: float = 25.0,
        poll: float = 1.0,
        event: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """A long poll for the live tail: the log lines after ``after_id`` (oldest first,
        at most 500), as soon as there are any, else an empty list after ``timeout``
        seconds. ``after_id`` None: starts from the newest line (the answer is empty,
        with ``last`` to pass next time). The database is read every ``poll`` seconds
        (on the reactor's clock, off its thread); ``timeout`` 0 answers at once."""
        try:
            self._check(actor, via)
            outcome = self._outcome(status)
            if not 0 <= timeout <= 120:
                raise Invalid("timeout: between 0 and 120 seconds")
        except OperationsError:
            return fail()
        if after_id is None:
            done: Deferred[Any] = self._read(logs.last_log_id)
            done.addCallback(lambda last: {"lines": [], "last": last})
            return done
        return Deferred.fromCoroutine(
            self._tail(after_id, flow_id, outcome, event or None, timeout, poll)
        )

    async def _tail(
        self,
        after_id: int,
        flow_id: str | None,
        outcome: str | None,
        event: str | None,
        timeout: float,
        poll: float,
    ) -> dict[str, Any]:
        deadline = self.clock.seconds() + timeout
        while True:
            rows = await self._read(
                _log_lines, flow_id, outcome, None, after_id, 500, False, None, event
            )
            if rows or self.clock.seconds() >= deadline:
                last = rows[-1].id if rows else after_id
                return {"lines": [_log_view(row) for row in rows], "last": last}
            await deferLater(self.clock, min(poll, deadline - self.clock.seconds()))

    # -- the audit trail

    def audit_trail(
        self,
        actor: str,
        via: str,
        who: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> Deferred[dict[str, Any]]:
        """The audit trail, newest first, filtered; ``next`` pages on (``before_id``)."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        limit = max(1, min(limit, 1000))
        done: Deferred[Any] = self._read(
            audit.entries, who, action, target, since, until, before_id, limit
        )
        done.addCallback(
            lambda rows: {
                "entries": [audit_view(row) for row in rows],
                "next": rows[-1].id if len(rows) == limit else None,
            }
        )
        return done

    # -- the cluster

    def cluster(self, actor: str, via: str) -> Deferred[dict[str, Any]]:
        """The nodes sharing this database, their state, buckets and lease ages, which
        node runs each database-wide job, and this node's own view of its leases (the
        data of ``udsgateway cluster status``; times on the database clock). On a
        single gateway: ``{"cluster": false, ...}``, without a database read."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        manager = self.lease_manager()
        if manager is None:
            return succeed(
                {
                    "cluster": False,
                    "message": "this gateway is not a node of a cluster: it runs every "
                    "lane and every periodic job itself",
                }
            )
        done: Deferred[Any] = self._read(leases.cluster_status)
        done.addCallback(lambda status: _cluster_view(manager, status))
        return done


def _cluster_view(manager: Any, status: leases.ClusterStatus | None) -> dict[str, Any]:
    """``cluster.status.summary`` with ISO times, plus what this node's LeaseManager holds."""
    last = manager.last_round_at
    this_node = {
        "node": manager.node,
        "buckets_held": len(manager.owned),
        "held": ranges(sorted(manager.owned)),
        "last_round_age": None if last is None else round(manager.clock.seconds() - last, 3),
        "failed_rounds": manager.failed_rounds,
        "refused": manager.refused,
    }
    if status is None:  # before this node's first round made the tables
        return {"cluster": True, "this_node": this_node, "nodes": [], "buckets": []}
    found = cluster_status.summary(status)
    found["database_time"] = _iso(status.now)
    for node in found["nodes"]:
        node["joined_at"] = _iso(node["joined_at"])
    return {"cluster": True, "this_node": this_node, **found}


async def _value(result: T) -> T:
    return result


def _log_lines(
    connection: Connection,
    flow_id: str | None,
    outcome: str | None,
    since: float | None,
    after_id: int,
    limit: int,
    newest_first: bool,
    before_id: int | None,
    event: str | None,
) -> list[LogLine]:
    return logs.log_lines(
        connection,
        flow_id,
        outcome,
        since,
        after_id,
        limit,
        newest_first,
        before_id=before_id,
        event=event,
    )


def _connection(state: Mapping[str, Any], live: bool) -> str:
    """up (a connection is open), down (its connects fail), idle (none needed now),
    unknown (no running dispatcher: the command line)."""
    if not live:
        return "unknown"
    if state.get("connected"):
        return "up"
    return "down" if state.get("down") else "idle"


def _log_view(row: LogLine) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": _iso(row.at),
        "event": row.event,
        "outcome": row.outcome,
        "tenant": row.tenant,
        "app_id": row.app_id,
        "flow_id": row.flow_id,
        "message_id": row.message_id,
        "execution_id": row.execution_id,
        "control_id": row.control_id,
        "message_type": row.message_type,
        "action": row.step,
        "attempt": row.attempt,
        "ack": row.ack_code,
        "reason": row.reason,
    }


def audit_view(row: audit.AuditEntry) -> dict[str, Any]:
    """An audit row as plain data."""
    return {
        "id": row.id,
        "at": _iso(row.at),
        "who": row.who,
        "action": row.action,
        "target": row.target,
        "reason": row.reason,
        "result": row.result,
        "via": row.via,
    }


def _message_view(row: search.MessageSummary) -> dict[str, Any]:
    return {
        "id": row.id,
        "tenant": row.tenant,
        "sender": row.sender,
        "control_id": row.control_id,
        "message_type": row.message_type,
        "peer": row.peer,
        "connection": row.connection,
        "received_at": _iso(row.received_at),
        "size": row.size,
        "status": "accepted" if row.accepted else "rejected",
        "flows": list(row.flows),
        "reason": row.reason,
        "ack_code": row.ack_code,
    }


def wait_reason(
    row: outbox.Delivery, head: int | None, pauses: Mapping[str, destinations.Pause], now: float
) -> str:
    """Why a delivery waits, in an operator's words; "" when it does not wait."""
    if row.state == outbox.HELD:
        return f"held: {row.last_error}" if row.last_error else "held"
    if row.state != outbox.QUEUED:
        return ""
    if head is not None and head < row.id:
        return f"waiting for the head of its lane (delivery {head})"
    pause = pauses.get(destinations.address_of(row.destination))
    if pause is not None:
        return f"paused by {pause.paused_by}"
    if row.next_attempt_at > now:
        why = f"backoff until {_iso(row.next_attempt_at)}"
        return why + (f" after: {row.last_error}" if row.last_error else "")
    return "next to send"


def _delivery_view(
    row: outbox.Delivery, head: int | None, pauses: Mapping[str, destinations.Pause], now: float
) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "lane": row.lane,
        "destination": destinations.address_of(row.destination),
        "protocol": row.protocol,
        "control_id": row.control_id,
        "execution_id": row.execution_id,
        "step": row.step,
        "attempts": row.attempts,
        "ack": row.response_code,
        "last_error": row.last_error,
        "next_attempt_at": _iso(row.next_attempt_at),
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "waiting": wait_reason(row, head, pauses, now),
    }


def _rates_of(rates: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, Any]:
    """The minute and hour rates of the counters named ``prefix...``, by the rest of
    their name (a flow's or a destination's own rates, for its status entry)."""
    return {
        window: {
            name[len(prefix) :]: rate for name, rate in found.items() if name.startswith(prefix)
        }
        for window, found in rates.items()
    }


def _status_rows(connection: Connection, now: float, history: bool = False) -> dict[str, Any]:
    """Flow and destination counts from the database (a read, off the database thread)."""
    flows: dict[str, dict[str, Any]] = {
        row.flow_id: {
            "app_id": row.app_id,
            "tenant": row.tenant,
            "name": row.name,
            "enabled": row.enabled,
            "routed": sum(row.executions.values()),
            "executions": dict(sorted(row.executions.items())),
        }
        for row in overview.flow_counts(connection)
    }
    if history:
        received = search.flow_totals(connection)
        series = logs.per_minute(connection, "execution", now - 3600.0, 60)
        for flow_id in set(received) | set(series):
            entry = flows.setdefault(
                flow_id,
                {"app_id": "", "tenant": "", "name": "", "enabled": False, "routed": 0},
            )
            entry.setdefault("executions", {})
        for flow_id, entry in flows.items():
            entry["received"] = received.get(flow_id, 0)
            entry["last_hour"] = series.get(flow_id, [0] * 60)
    found: dict[str, dict[str, Any]] = {}
    pauses = destinations.pauses(connection)

    def entry_of(address: str) -> dict[str, Any]:
        return found.setdefault(
            address,
            {
                "queued": 0,
                "held": 0,
                "delivered": 0,
                "skipped": 0,
                "attempts": 0,
                "oldest_pending_age": None,
                "paused": address in pauses,
                "paused_by": pauses[address].paused_by if address in pauses else None,
            },
        )

    for row in overview.destination_counts(connection):
        entry = entry_of(destinations.address_of(row.endpoint))
        if row.state in entry:
            entry[row.state] += row.count
        entry["attempts"] += row.attempts
        if row.state in outbox.OPEN_STATES and row.oldest_created_at is not None:
            age = round(max(0.0, now - row.oldest_created_at), 3)
            if entry["oldest_pending_age"] is None or age > entry["oldest_pending_age"]:
                entry["oldest_pending_age"] = age
    for address in pauses:
        entry_of(address)
    if history:
        # Every destination of a stored flow, also before its first delivery.
        for app in flowstore.load_apps(connection, None):
            for flow in app.flows:
                for action in flow.actions:
                    entry_of(destinations.address_of(action.endpoint))
    return {"flows": flows, "destinations": found}


def _query_fields(query: search.Query) -> dict[str, Any]:
    return {
        "tenant": query.tenant,
        "message_type": query.message_type,
        "status": query.status,
        "since": query.since,
        "until": query.until,
        "flow_id": query.flow_id,
        "keys": query.keys,
        "before_id": query.before_id,
        "limit": query.limit,
    }


def _describe(query: search.Query) -> str:
    """A search as an audit target: the filters' names and values (keys by name only:
    a patient identifier is not written into the trail)."""
    parts = []
    for name in ("tenant", "message_type", "status", "flow_id"):
        value = getattr(query, name)
        if value is not None:
            parts.append(f"{name}={value}")
    if query.since is not None:
        parts.append(f"since={_iso(query.since)}")
    if query.until is not None:
        parts.append(f"until={_iso(query.until)}")
    for name, _given in query.keys:
        parts.append(f"{name}=(given)")
    return " ".join(parts) or "all"


def _validate(query: search.Query) -> None:
    if not 1 <= query.limit <= 1000:
        raise Invalid("limit: between 1 and 1000")
    if query.status is not None and query.status not in search.STATUSES:
        raise Invalid(f"status: expected one of {', '.join(search.STATUSES)}")
    for name, value in query.keys:
        if name not in search.KEYS:
            raise Invalid(f"unknown search key {name!r} (one of: {', '.join(search.KEYS)})")
        if not value:
            raise Invalid(f"{name}: empty value")


# -- flows


def _targets(
    connection: Connection, message_ids: Sequence[int], flow_id: str | None
) -> list[tuple[int, str]]:
    """(message, flow) pairs a replay runs: through ``flow_id``, or each accepted
    message through the flows it was routed to."""
    routed = search.routed_flows(connection, message_ids)
    if flow_id is None:
        return [(message_id, flow) for message_id, flows in routed.items() for flow in flows]
    return [(message_id, flow_id) for message_id in routed]


def _listen_address(endpoint: str) -> tuple[str, int]:
    """Host and port of a server endpoint string (``tcp:port=2575:interface=...``)."""
    host, port = "0.0.0.0", 0
    for index, part in enumerate(endpoint.split(":")[1:], start=1):
        if part.startswith("port=") and part[5:].isdigit():
            port = int(part[5:])
        elif part.startswith("interface="):
            host = part[10:].replace("\\", "")
        elif index == 1 and part.isdigit():
            port = int(part)
    return host, port
