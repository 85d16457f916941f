"""What the web console reads and does, over the gateway's store and engines.

Every query runs in the database thread (``Database.transaction``); the web
layer awaits the Deferreds. Content (raw messages, rendered payloads,
responses) is only returned by the functions named ``*content*``, and each of
those writes an audit row first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from attrs import evolve, frozen
from sqlalchemy import Connection, func, or_, select
from twisted.internet.defer import Deferred

from udsgateway import flowstore as store
from udsgateway.config import GatewayConfig
from udsgateway.flows import Action, App, Flow, Trigger, write_app
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.hl7.header import HeaderProblem, parse_header
from udsgateway.hl7.message import MessageParseError, parse_message
from udsgateway.mapping.catalogue import Variable, variable_catalogue
from udsgateway.mapping.templating import (
    ActionResponse,
    RenderError,
    TemplateData,
    TemplateError,
    TemplateProblem,
    check_template,
    compile_template,
    render_body,
)
from udsgateway.store import audit, destinations, operator, outbox, schema, search
from udsgateway.store.engine import Database
from udsgateway.store.records import Delivery

#: The trigger types offered first in the flow editor (any other may be typed).
FIRST_CLASS_TYPES = ("ADT^A04", "ADT^A08", "SIU^S12", "SIU^S14", "SIU^S15")

#: Search results per page.
PAGE = 50


def listen_address(endpoint: str) -> tuple[str, str]:
    """Host and port of a server endpoint string such as ``tcp:port=2575:interface=...``."""
    host, port = "0.0.0.0", ""
    parts = endpoint.split(":")
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith("port="):
            port = part[5:]
        elif part.startswith("interface="):
            host = part[10:].replace("\\", "")
        elif index == 1 and part.isdigit():
            port = part
    return host, port


@frozen
class FlowRow:
    """One flow with what a sender needs to reach it."""

    tenant: str
    app_id: str
    app_name: str
    flow_id: str
    name: str
    message_type: str
    connection: str
    enabled: bool
    host: str
    port: str
    actions: int


@frozen
class Problem:
    """A problem found when checking a flow: where, which template line, what."""

    where: str
    line: int | None
    message: str


@frozen
class SearchQuery:
    """The message browser's filters (all optional)."""

    since: float | None = None
    until: float | None = None
    status: str = ""  # accepted, rejected
    flow_id: str = ""
    message_type: str = ""
    control_id: str = ""
    pid3: str = ""  # PID-3 first identifier: PHI, only ever sent in a POST body
    sch1: str = ""  # SCH-1 placer appointment ID
    sch2: str = ""  # SCH-2 filler appointment ID
    before_id: int | None = None


def _time(epoch: float | None) -> str:
    if not epoch:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


# -- queries in the database thread ---------------------------------------------------


def _status(connection: Connection, now: float) -> dict[str, Any]:
    e, d, lg = schema.executions, schema.deliveries, schema.logs
    flows: dict[str, dict[str, Any]] = {}
    for flow_id, state, count in connection.execute(
        select(e.c.flow_id, e.c.state, func.count()).group_by(e.c.flow_id, e.c.state)
    ):
        row = flows.setdefault(flow_id, {})
        row[state] = int(count)
    for flow_id, count in connection.execute(
        select(lg.c.flow_id, func.count())
        .where(lg.c.event == "received", lg.c.flow_id != "")
        .group_by(lg.c.flow_id)
    ):
        flows.setdefault(flow_id, {})["received"] = int(count)
    for label, window in (("per_minute", 60.0), ("per_hour", 3600.0)):
        for flow_id, count in connection.execute(
            select(e.c.flow_id, func.count())
            .where(e.c.created_at >= now - window)
            .group_by(e.c.flow_id)
        ):
            flows.setdefault(flow_id, {})[label] = int(count)
    # Executions per flow and minute over the last hour, for the charts.
    series: dict[str, list[int]] = {}
    for flow_id, created in connection.execute(
        select(e.c.flow_id, e.c.created_at).where(e.c.created_at >= now - 3600.0)
    ):
        buckets = series.setdefault(flow_id, [0] * 60)
        index = min(59, max(0, int((created - (now - 3600.0)) // 60)))
        buckets[index] += 1
    found: dict[str, dict[str, Any]] = {}
    for destination, state, count in connection.execute(
        select(d.c.destination, d.c.state, func.count()).group_by(d.c.destination, d.c.state)
    ):
        found.setdefault(destination, {})[state] = int(count)
    for destination, oldest in connection.execute(
        select(d.c.destination, func.min(d.c.created_at))
        .where(d.c.state.in_(outbox.OPEN_STATES))
        .group_by(d.c.destination)
    ):
        found.setdefault(destination, {})["oldest"] = float(oldest)
    for label, window in (("per_minute", 60.0), ("per_hour", 3600.0)):
        for destination, count in connection.execute(
            select(d.c.destination, func.count())
            .where(d.c.state == outbox.DELIVERED, d.c.updated_at >= now - window)
            .group_by(d.c.destination)
        ):
            found.setdefault(destination, {})[label] = int(count)
    paused = {a: p.paused_by for a, p in destinations.pauses(connection).items()}
    return {"flows": flows, "series": series, "destinations": found, "paused": paused}


def _search(connection: Connection, query: SearchQuery) -> list[dict[str, Any]]:
    """The search of the message browser, on the HL7 keys indexed at commit."""
    keys = [
        (name, value.strip())
        for name, value in (
            ("msh10", query.control_id),
            ("pid3", query.pid3),
            ("sch1", query.sch1),
            ("sch2", query.sch2),
        )
        if value.strip()
    ]
    found = search.search(
        connection,
        search.Query(
            message_type=query.message_type or None,
            status=query.status or None,
            since=query.since,
            until=query.until,
            flow_id=query.flow_id or None,
            keys=tuple(keys),
            before_id=query.before_id,
            limit=PAGE,
        ),
    )
    return [
        {
            "id": row.id,
            "tenant": row.tenant,
            "control_id": row.control_id,
            "message_type": row.message_type,
            "received": _time(row.received_at),
            "status": "accepted" if row.accepted else "rejected",
            "flows": list(row.flows),
            "reason": row.reason,
            "ack_code": row.ack_code,
            "size": row.size,
        }
        for row in found
    ]


def _message(connection: Connection, message_id: int) -> dict[str, Any] | None:
    m, e, d, lg = schema.messages, schema.executions, schema.deliveries, schema.logs
    row = connection.execute(
        select(
            m.c.id,
            m.c.tenant,
            m.c.sender,
            m.c.control_id,
            m.c.message_type,
            m.c.peer,
            m.c.connection,
            m.c.received_at,
            m.c.size,
            m.c.accepted,
            m.c.flows,
            m.c.reason,
            m.c.ack_code,
        ).where(m.c.id == message_id)
    ).first()
    if row is None:
        return None
    executions = [
        {
            "id": x.id,
            "flow_id": x.flow_id,
            "state": x.state,
            "step": x.step,
            "error": x.error,
            "created": _time(x.created_at),
            "updated": _time(x.updated_at),
        }
        for x in connection.execute(select(e).where(e.c.message_id == message_id).order_by(e.c.id))
    ]
    execution_ids = [x["id"] for x in executions]
    deliveries = []
    if execution_ids:
        deliveries = [
            {
                "id": x.id,
                "execution_id": x.execution_id,
                "step": x.step,
                "destination": x.destination,
                "state": x.state,
                "attempts": x.attempts,
                "last_error": x.last_error,
                "response_code": x.response_code,
                "control_id": x.control_id,
                "created": _time(x.created_at),
                "updated": _time(x.updated_at),
            }
            for x in connection.execute(
                select(
                    d.c.id,
                    d.c.execution_id,
                    d.c.step,
                    d.c.destination,
                    d.c.state,
                    d.c.attempts,
                    d.c.last_error,
                    d.c.response_code,
                    d.c.control_id,
                    d.c.created_at,
                    d.c.updated_at,
                )
                .where(d.c.execution_id.in_(execution_ids))
                .order_by(d.c.id)
            )
        ]
    condition = lg.c.message_id == message_id
    if execution_ids:
        condition = or_(condition, lg.c.execution_id.in_(execution_ids))
    timeline = [
        {
            "time": _time(x.at),
            "event": x.event,
            "outcome": x.outcome,
            "flow_id": x.flow_id,
            "step": x.step,
            "attempt": x.attempt,
            "ack_code": x.ack_code,
            "reason": x.reason,
        }
        for x in connection.execute(select(lg).where(condition).order_by(lg.c.id))
    ]
    return {
        "id": row.id,
        "tenant": row.tenant,
        "sender": row.sender,
        "control_id": row.control_id,
        "message_type": row.message_type,
        "peer": row.peer,
        "connection": row.connection,
        "received": _time(row.received_at),
        "size": row.size,
        "status": "accepted" if row.accepted else "rejected",
        "flows": _json_list(row.flows),
        "reason": row.reason,
        "ack_code": row.ack_code,
        "executions": executions,
        "deliveries": deliveries,
        "timeline": timeline,
    }


#: The console is part of the admin service: its actions are audited as ``api``.
VIA = "api"


def _audit(
    connection: Connection, who: str, action: str, target: str, reason: str, now: float
) -> None:
    audit.append(connection, who, action, target, now, reason, "ok", VIA)


def _pause(connection: Connection, address: str, who: str, reason: str, now: float) -> bool:
    done = destinations.pause(connection, address, who, reason, now)
    if done:
        _audit(connection, who, "destination.pause", f"destination {address}", reason, now)
    return done


def _resume(connection: Connection, address: str, who: str, reason: str, now: float) -> bool:
    done = destinations.resume(connection, address)
    if done:
        _audit(connection, who, "destination.resume", f"destination {address}", reason, now)
    return done


def _message_content(
    connection: Connection, message_id: int, who: str, now: float
) -> dict[str, Any] | None:
    m, e, d = schema.messages, schema.executions, schema.deliveries
    row = connection.execute(select(m.c.raw, m.c.ack).where(m.c.id == message_id)).first()
    if row is None:
        return None
    _audit(connection, who, "message.content", f"message {message_id}", "console", now)
    outbound = [
        {"id": x.id, "step": x.step, "payload": x.payload, "response": x.response}
        for x in connection.execute(
            select(d.c.id, d.c.step, d.c.payload, d.c.response)
            .join(e, e.c.id == d.c.execution_id)
            .where(e.c.message_id == message_id)
            .order_by(d.c.id)
        )
    ]
    return {"raw": row.raw, "ack": row.ack, "deliveries": outbound}


def _queues(connection: Connection, now: float) -> list[dict[str, Any]]:
    d = schema.deliveries
    paused = destinations.pauses(connection)
    rows = connection.execute(
        select(
            d.c.id,
            d.c.lane,
            d.c.destination,
            d.c.state,
            d.c.attempts,
            d.c.next_attempt_at,
            d.c.last_error,
            d.c.response_code,
            d.c.control_id,
            d.c.created_at,
        )
        .where(d.c.state.in_(outbox.OPEN_STATES))
        .order_by(d.c.id)
        .limit(2000)
    ).all()
    heads: dict[str, int] = {}
    by_destination: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        head = heads.setdefault(row.lane, row.id)
        if row.state == outbox.HELD:
            why = f"held: {row.response_code or 'error'} from destination"
            if row.last_error:
                why += f" ({row.last_error})"
        elif row.id != head:
            why = f"waiting for the head of its lane (delivery {head})"
        elif destinations.address_of(row.destination) in paused:
            why = f"paused by {paused[destinations.address_of(row.destination)].paused_by}"
        elif row.next_attempt_at > now:
            why = f"backoff until {_time(row.next_attempt_at)}"
            if row.last_error:
                why += f" after {row.last_error}"
        elif row.attempts:
            why = f"retrying ({row.attempts} attempts): {row.last_error}"
        else:
            why = "queued, next to send"
        by_destination.setdefault(row.destination, []).append(
            {
                "id": row.id,
                "lane": row.lane,
                "state": row.state,
                "attempts": row.attempts,
                "control_id": row.control_id,
                "created": _time(row.created_at),
                "why": why,
            }
        )
    return [
        {"destination": name, "deliveries": items}
        for name, items in sorted(by_destination.items())
    ]


def _replay_candidates(connection: Connection, destination: str, state: str) -> list[int]:
    d = schema.deliveries
    return [
        int(x)
        for x in connection.execute(
            select(d.c.id)
            .where(d.c.destination == destination, d.c.state == state)
            .order_by(d.c.id)
        ).scalars()
    ]


def _delivery_action(
    connection: Connection, delivery_id: int, action: str, who: str, reason: str, now: float
) -> Delivery:
    """Release, skip or replay a delivery (``store.operator``), audited via api; the
    MSH-10 read from its payload when it was stored without one."""
    control_id = None
    current = outbox.get_delivery(connection, delivery_id)
    if current is not None and operator.needs_control_id(current, action, None):
        header = parse_header(current.payload, default_charset="latin-1")
        if isinstance(header, HeaderProblem) or not header.control_id:
            raise ValueError(f"the message of delivery {delivery_id} has no MSH-10")
        control_id = header.control_id
    return operator.delivery_action(
        connection, delivery_id, action, who, reason, now, None, control_id, VIA
    )


def _replay_many(
    connection: Connection, ids: Sequence[int], who: str, reason: str, now: float
) -> list[Delivery]:
    return [_delivery_action(connection, i, "replay", who, reason, now) for i in ids]


def _logs(
    connection: Connection,
    flow_id: str,
    outcome: str,
    event: str,
    after_id: int,
    limit: int,
) -> list[dict[str, Any]]:
    lg = schema.logs
    statement = select(lg).where(lg.c.id > after_id).order_by(lg.c.id.desc()).limit(limit)
    if flow_id:
        statement = statement.where(lg.c.flow_id == flow_id)
    if outcome:
        statement = statement.where(lg.c.outcome == outcome)
    if event:
        statement = statement.where(lg.c.event == event)
    return [
        {
            "id": x.id,
            "time": _time(x.at),
            "event": x.event,
            "outcome": x.outcome,
            "app_id": x.app_id,
            "flow_id": x.flow_id,
            "message_id": x.message_id,
            "control_id": x.control_id,
            "message_type": x.message_type,
            "step": x.step,
            "attempt": x.attempt,
            "ack_code": x.ack_code,
            "reason": x.reason,
        }
        for x in connection.execute(statement)
    ]


def _audit_rows(connection: Connection, limit: int) -> list[dict[str, Any]]:
    a = schema.audit
    return [
        {
            "id": x.id,
            "time": _time(x.at),
            "who": x.who,
            "action": x.action,
            "target": x.target,
            "reason": x.reason,
            "result": x.result,
            "via": x.via,
        }
        for x in connection.execute(select(a).order_by(a.c.id.desc()).limit(limit))
    ]


def _save_flow(
    connection: Connection, app: App, flow: Flow, who: str, now: float
) -> tuple[App, Flow]:
    """Add ``flow`` to ``app`` (replacing the flow of the same Flow ID), save, audit."""
    stored = {a.app_id: a for a in store.load_apps(connection, app.tenant)}
    base = stored.get(app.app_id, app)
    flows = [f for f in base.flows if not flow.flow_id or f.flow_id != flow.flow_id]
    if flow.flow_id:
        position = next(
            (i for i, f in enumerate(base.flows) if f.flow_id == flow.flow_id), len(flows)
        )
        flows.insert(position, flow)
    else:
        flows.append(flow)
    saved = store.save_app(connection, evolve(base, flows=tuple(flows)), now)
    saved_flow = next(
        f
        for f in saved.flows
        if (f.flow_id == flow.flow_id if flow.flow_id else f.name == flow.name)
    )
    _audit(connection, who, "flow.save", f"flow {saved_flow.flow_id} app {saved.app_id}", "", now)
    return saved, saved_flow


def _set_enabled(
    connection: Connection, flow_id: str, enabled: bool, who: str, reason: str, now: float
) -> bool:
    """Enable or disable a flow (a disabled flow receives nothing); False: so already."""
    for app in store.load_apps(connection, None):
        for flow in app.flows:
            if flow.flow_id != flow_id:
                continue
            if flow.enabled == enabled:
                return False
            flows = tuple(evolve(f, enabled=enabled) if f is flow else f for f in app.flows)
            store.save_app(connection, evolve(app, flows=flows), now)
            action = "flow.enable" if enabled else "flow.disable"
            _audit(connection, who, action, f"flow {flow_id}", reason, now)
            return True
    raise LookupError(f"no flow {flow_id}")


# -- the facade the web layer uses ----------------------------------------------------


class ConsoleBackend:
    """The console's view of a running gateway: its store, config and engines."""

    def __init__(
        self,
        database: Database,
        config: GatewayConfig,
        *,
        wall: Callable[[], float] = time.time,
        dispatcher: Any = None,
        gateway: Any = None,
    ) -> None:
        self.database = database
        #: The GatewayService, for the ports its listeners actually opened.
        self.gateway = gateway
        self.config = config
        self.wall = wall
        self.dispatcher = dispatcher
        #: The ports listened on, per tenant (a config's port 0: the one chosen).
        self.listening_ports: dict[str, str] = {}
        self._flow_actions: dict[str, tuple[Action, ...]] = {}

    # status

    async def status(self) -> dict[str, Any]:
        now = self.wall()
        found = await self.database.transaction(_status, now)
        flows = {f.flow_id: f for f in await self.flows()}
        flow_rows = []
        for flow_id in sorted(set(flows) | set(found["flows"])):
            counts = found["flows"].get(flow_id, {})
            info = flows.get(flow_id)
            routed = sum(
                counts.get(s, 0) for s in ("pending", "waiting", "done", "failed", "held")
            )
            row = {
                "flow_id": flow_id,
                "name": info.name if info else "(deleted flow)",
                "app_id": info.app_id if info else "",
                "enabled": info.enabled if info else False,
                "received": counts.get("received", 0),
                "routed": routed,
                "done": counts.get("done", 0),
                "failed": counts.get("failed", 0),
                "held": counts.get("held", 0),
                "pending": counts.get("pending", 0) + counts.get("waiting", 0),
                "per_minute": counts.get("per_minute", 0),
                "per_hour": counts.get("per_hour", 0),
                "series": found["series"].get(flow_id, [0] * 60),
            }
            row["problem"] = bool(row["failed"] or row["held"])
            flow_rows.append(row)
        destination_rows = []
        names = {
            a.endpoint: f"{a.host}:{a.port}" for f in flows.values() for a in self._actions(f)
        }
        paused = found["paused"]
        for endpoint in sorted(set(found["destinations"]) | set(names)):
            counts = found["destinations"].get(endpoint, {})
            address = destinations.address_of(endpoint)
            oldest = counts.get("oldest")
            age = int(now - oldest) if oldest else None
            connection = self._connection_state(endpoint)
            row = {
                "endpoint": endpoint,
                "name": names.get(endpoint, endpoint),
                "queued": counts.get(outbox.QUEUED, 0),
                "held": counts.get(outbox.HELD, 0),
                "delivered": counts.get(outbox.DELIVERED, 0),
                "failed": counts.get("failed", 0),
                "skipped": counts.get(outbox.SKIPPED, 0),
                "per_minute": counts.get("per_minute", 0),
                "per_hour": counts.get("per_hour", 0),
                "oldest_age": age,
                "connection": connection,
                "address": address,
                "paused": paused.get(address),
            }
            row["problem"] = bool(
                row["held"]
                or row["paused"]
                or connection == "down"
                or (age is not None and age > 300)
            )
            destination_rows.append(row)
        flow_rows.sort(key=lambda r: (not r["problem"], r["name"]))
        destination_rows.sort(key=lambda r: (not r["problem"], r["name"]))
        return {"flows": flow_rows, "destinations": destination_rows, "at": _time(now)}

    def _actions(self, flow: FlowRow) -> list[Action]:
        return list(self._flow_actions.get(flow.flow_id, ()))

    def _connection_state(self, endpoint: str) -> str:
        """up (a connection is open), down (connects fail), or idle (none needed now)."""
        if self.dispatcher is None:
            return "unknown"
        found = [
            d
            for d in getattr(self.dispatcher, "destinations", {}).values()
            if getattr(d, "endpoint", None) == endpoint
        ]
        if any(getattr(d, "connected", False) for d in found):
            return "up"
        if any(getattr(d, "_connect_failures", 0) for d in found):
            return "down"
        return "idle"

    # flows

    async def apps(self) -> list[App]:
        return await self.database.transaction(store.load_apps, None)

    async def flows(self) -> list[FlowRow]:
        apps = await self.apps()
        listeners = {t.name: listen_address(t.listen) for t in self.config.tenants}
        rows = []
        flow_actions: dict[str, tuple[Action, ...]] = {}
        for app in apps:
            host, port = listeners.get(app.tenant, ("?", "?"))
            port = self._listening_port(app.tenant) or port
            for flow in app.flows:
                flow_actions[flow.flow_id] = flow.actions
                rows.append(
                    FlowRow(
                        tenant=app.tenant,
                        app_id=app.app_id,
                        app_name=app.name,
                        flow_id=flow.flow_id,
                        name=flow.name,
                        message_type=flow.trigger.message_type,
                        connection=flow.trigger.connection,
                        enabled=flow.enabled,
                        host=host,
                        port=port,
                        actions=len(flow.actions),
                    )
                )
        self._flow_actions = flow_actions
        return rows

    def _listening_port(self, tenant: str) -> str:
        """The port a tenant's listener opened (a configured port 0: the one chosen)."""
        listener = (getattr(self.gateway, "listeners", None) or {}).get(tenant)
        address = getattr(listener, "address", None) if listener is not None else None
        if address is None:
            # An older GatewayService kept its listening ports in ``ports``.
            port = (getattr(self.gateway, "ports", None) or {}).get(tenant)
            address = port.getHost() if port is not None else None
        if address is None:
            return self.listening_ports.get(tenant, "")
        return str(getattr(address, "port", ""))

    async def flow(self, flow_id: str) -> tuple[App, Flow] | None:
        for app in await self.apps():
            for flow in app.flows:
                if flow.flow_id == flow_id:
                    return app, flow
        return None

    def catalogue(self, sample: str) -> tuple[list[Variable], str]:
        """The variables of a pasted sample, or why it cannot be read."""
        if not sample.strip():
            return [], ""
        try:
            return variable_catalogue(sample), ""
        except MessageParseError as error:
            return [], f"the sample is not an HL7 message: {error.reason}"

    def check(self, app_variables: dict[str, str], flow: Flow) -> list[Problem]:
        """The checks of ``flows import``, per action, with template lines."""
        problems: list[Problem] = []
        if not flow.name.strip():
            problems.append(Problem("flow name", None, "a flow needs a name"))
        if not flow.trigger.message_type.strip():
            problems.append(Problem("trigger", None, "pick the trigger's message type"))
        if flow.actions and not flow.trigger.sample.strip():
            problems.append(Problem("sample", None, "paste a sample to check the templates"))
            return problems
        names: list[str] = []
        for step, action in enumerate(flow.actions):
            where = f"action {step + 1} ({action.name})"
            if not action.name.strip():
                problems.append(Problem(where, None, "an action needs a name"))
            if not action.host.strip() or not 0 < action.port < 65536:
                problems.append(Problem(where, None, "host and a port from 1 to 65535"))
            if not action.message_type.strip():
                problems.append(Problem(where, None, "the outbound message type is required"))
                continue
            found: list[TemplateProblem] = check_template(
                action.template,
                flow.trigger.sample,
                action.message_type,
                app=app_variables,
                action_names=names,
            )
            problems.extend(Problem(where, p.line, p.message) for p in found)
            names.append(action.name)
        return problems

    def preview(
        self,
        app_variables: dict[str, str],
        flow: Flow,
        step: int,
        responses: dict[str, str],
    ) -> tuple[str, Problem | None]:
        """Render action ``step`` against the sample (and fake earlier responses)."""
        action = flow.actions[step]
        where = f"action {step + 1} ({action.name})"
        try:
            template = compile_template(action.template)
        except TemplateError as error:
            return "", Problem(where, error.problem.line, error.problem.message)
        try:
            trigger = parse_message(flow.trigger.sample)
            earlier = []
            for previous in flow.actions[:step]:
                text = responses.get(previous.name, "").strip()
                earlier.append(
                    ActionResponse(
                        previous.name,
                        parse_message(text.replace("\n", "\r")) if text else None,
                    )
                )
        except MessageParseError as error:
            return "", Problem(where, None, f"not an HL7 message: {error.reason}")
        try:
            body = render_body(
                template,
                TemplateData(trigger, tuple(earlier), app_variables),
                message_type=action.message_type,
                now=lambda: datetime.fromtimestamp(self.wall(), UTC),
                new_control_id=ControlIdSource.for_boot(self.wall()).next,
            )
        except RenderError as error:
            return "", Problem(where, error.line, error.reason)
        return body.decode("utf-8", "replace").replace("\r", "\n"), None

    async def save_flow(self, app: App, flow: Flow, who: str) -> tuple[App, Flow]:
        saved = await self.database.transaction(_save_flow, app, flow, who, self.wall())
        await self._reload_flows()
        return saved

    async def set_enabled(self, flow_id: str, enabled: bool, who: str, reason: str) -> bool:
        changed = await self.database.transaction(
            _set_enabled, flow_id, enabled, who, reason, self.wall()
        )
        await self._reload_flows()
        return changed

    async def _reload_flows(self) -> None:
        """The running gateway routes by the saved flows before the page answers (the
        Host, Port, App ID and Flow ID it shows work at once)."""
        reload_flows = getattr(self.gateway, "reload_flows", None)
        if reload_flows is not None:
            await reload_flows()

    async def export(self, app_id: str) -> tuple[str, str] | None:
        for app in await self.apps():
            if app.app_id == app_id:
                return app.name, write_app(app)
        return None

    # messages

    async def search(self, query: SearchQuery) -> list[dict[str, Any]]:
        return await self.database.transaction(_search, query)

    async def message(self, message_id: int) -> dict[str, Any] | None:
        return await self.database.transaction(_message, message_id)

    async def message_content(self, message_id: int, who: str) -> dict[str, Any] | None:
        """The stored bytes of a message and its deliveries: audited as ``who``."""
        return await self.database.transaction(_message_content, message_id, who, self.wall())

    # queues

    async def queues(self) -> list[dict[str, Any]]:
        return await self.database.transaction(_queues, self.wall())

    async def act(self, delivery_id: int, action: str, who: str, reason: str) -> Delivery:
        """release, skip or replay one delivery (``retry`` is a release of a queued one)."""
        verb = "release" if action == "retry" else action
        updated = await self.database.transaction(
            _delivery_action, delivery_id, verb, who, reason, self.wall()
        )
        self._wake(updated.lane)
        return updated

    async def replay_candidates(self, destination: str, state: str) -> list[int]:
        return await self.database.transaction(_replay_candidates, destination, state)

    async def replay(self, ids: Sequence[int], who: str, reason: str) -> int:
        updated = await self.database.transaction(_replay_many, ids, who, reason, self.wall())
        for delivery in updated:
            self._wake(delivery.lane)
        return len(updated)

    async def pause(self, address: str, who: str, reason: str) -> bool:
        """Pause a destination (``host:port``): it keeps queueing, nothing is sent."""
        done = await self.database.transaction(_pause, address, who, reason, self.wall())
        await self._pauses_changed()
        return done

    async def resume(self, address: str, who: str, reason: str) -> bool:
        done = await self.database.transaction(_resume, address, who, reason, self.wall())
        await self._pauses_changed()
        return done

    async def _pauses_changed(self) -> None:
        if self.dispatcher is not None and hasattr(self.dispatcher, "set_pauses"):
            found = await self.database.transaction(destinations.pauses)
            self.dispatcher.set_pauses({a: p.paused_by for a, p in found.items()})

    def _wake(self, lane: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.operator_acted(lane)

    # logs and audit

    async def logs(
        self, flow_id: str = "", outcome: str = "", event: str = "", after_id: int = 0
    ) -> list[dict[str, Any]]:
        return await self.database.transaction(_logs, flow_id, outcome, event, after_id, 200)

    async def audit(self, limit: int = 200) -> list[dict[str, Any]]:
        return await self.database.transaction(_audit_rows, limit)

    async def record(self, who: str, action: str, target: str, reason: str = "") -> None:
        await self.database.transaction(_audit, who, action, target, reason, self.wall())


def new_flow(message_type: str = "SIU^S12") -> Flow:
    """An empty flow for the editor."""
    return Flow(name="", trigger=Trigger(message_type=message_type))


def as_deferred(coroutine: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)
