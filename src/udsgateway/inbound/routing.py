"""Routing an inbound message to the flows that want it (docs/protocol.md "Routing").

1. The tenant's App ID header field (MSH-5 by default) names one of its
   apps: the message goes only to the flow its Flow ID field (MSH-6 by
   default) names, when that flow is enabled. A mistyped, unknown or
   disabled Flow ID is rejected with AR 204; it never falls back to the
   flows of the message type, which would send the message to destinations
   nobody chose.
2. Otherwise (the App ID field names no app of the tenant) every enabled
   flow whose trigger message type equals MSH-9 (type^event) runs for it.
3. Otherwise it is rejected: AR with ERR-3 200 (no flow takes the message
   type) or 201 (the type, but not the event).

A flow also checks what its trigger promised: a message over plain TCP for
an MLLP trigger (or the reverse), or with another event, is rejected with a
logged reason, never silently accepted.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen

from udsgateway.flows import App
from udsgateway.hl7.ack import AckError
from udsgateway.hl7.header import Header


@frozen
class FlowRoute:
    """What routing needs to know of a flow."""

    flow_id: str
    app_id: str
    name: str
    connection: str
    message_type: str
    ack: str
    ack_timeout: float
    #: Endpoints of its actions (empty: the flow only records messages).
    destinations: tuple[str, ...] = ()
    #: When an enhanced-mode application ACK is sent: "after_actions" or "on_commit".
    application_ack: str = "after_actions"


@frozen
class Routed:
    """The message goes to these flows, in their configured order."""

    flows: tuple[FlowRoute, ...]


@frozen
class Rejected:
    """No flow takes the message; ``error`` goes into the AR."""

    error: AckError


@frozen
class RoutingTable:
    """The enabled flows of one tenant, indexed for routing."""

    by_id: dict[tuple[str, str], FlowRoute]
    by_type: dict[str, tuple[FlowRoute, ...]]
    #: Every App ID of the tenant, also of apps whose flows are all disabled.
    app_ids: frozenset[str]
    message_codes: frozenset[str]
    app_id_field: int = 5
    flow_id_field: int = 6

    @classmethod
    def build(
        cls, apps: Iterable[App], app_id_field: int = 5, flow_id_field: int = 6
    ) -> RoutingTable:
        """Index the enabled flows of these apps."""
        apps = tuple(apps)
        routes = [
            FlowRoute(
                flow_id=flow.flow_id,
                app_id=app.app_id,
                name=flow.name,
                connection=flow.trigger.connection,
                message_type=flow.trigger.message_type,
                ack=flow.trigger.ack,
                ack_timeout=flow.trigger.ack_timeout,
                destinations=tuple(action.endpoint for action in flow.actions),
                application_ack=flow.trigger.application_ack,
            )
            for app in apps
            for flow in app.flows
            if flow.enabled
        ]
        by_type: dict[str, list[FlowRoute]] = {}
        for route in routes:
            by_type.setdefault(route.message_type, []).append(route)
        return cls(
            by_id={(r.app_id, r.flow_id): r for r in routes},
            by_type={k: tuple(v) for k, v in by_type.items()},
            app_ids=frozenset(app.app_id for app in apps if app.app_id),
            message_codes=frozenset(r.message_type.split("^")[0] for r in routes),
            app_id_field=app_id_field,
            flow_id_field=flow_id_field,
        )

    def route(self, header: Header, connection: str) -> Routed | Rejected:
        """Pick the flows for a message that arrived with this framing."""
        component = header.delimiters.component
        app_id = header.field(self.app_id_field).split(component, 1)[0]
        flow_id = header.field(self.flow_id_field).split(component, 1)[0]
        event_type = header.event_type

        named = self.by_id.get((app_id, flow_id))
        if named is not None:
            if named.message_type != event_type:
                return _reject(
                    201 if named.message_type.split("^")[0] == header.message_code else 200,
                    self.flow_id_field,
                    f"flow {named.flow_id} takes {named.message_type}",
                )
            if named.connection != connection:
                return _reject(
                    200, self.flow_id_field, f"flow {named.flow_id} takes {named.connection}"
                )
            return Routed((named,))
        if app_id in self.app_ids:
            # Explicit addressing never falls back to routing by message type.
            return _reject(204, self.flow_id_field, "unknown or disabled Flow ID")

        candidates = self.by_type.get(event_type, ())
        if candidates:
            matching = tuple(route for route in candidates if route.connection == connection)
            if matching:
                return Routed(matching)
            return _reject(
                200, 9, f"no flow takes {event_type} over {connection}, only over the other"
            )
        if header.message_code in self.message_codes:
            return _reject(201, 9, "no flow takes this event")
        return _reject(200, 9, "no flow takes this message type")


def _reject(code: int, field: int, diagnostic: str) -> Rejected:
    return Rejected(AckError(code=code, location=f"MSH^1^{field}", diagnostic=diagnostic))


EMPTY = RoutingTable.build(())
