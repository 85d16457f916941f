"""The SQL of the operators' overview: counts per flow and destination, lane heads,
pages of deliveries. Read-only queries across tables, returning plain values.

(The tables belong to their own modules; these read them for the operations
facade's status and delivery views, never write them.)
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen
from sqlalchemy import Connection, func, select

from udsgateway.store import outbox, schema
from udsgateway.store.outbox import Delivery


@frozen
class FlowCounts:
    """A flow as stored, with its executions counted by state."""

    flow_id: str
    app_id: str
    tenant: str
    name: str
    enabled: bool
    executions: dict[str, int]


@frozen
class DestinationCounts:
    """Deliveries of one endpoint in one state: how many, their attempts, the oldest."""

    endpoint: str
    state: str
    count: int
    attempts: int
    oldest_created_at: float | None


def flow_counts(connection: Connection) -> list[FlowCounts]:
    """Every stored flow, and every flow that has executions, with counts by state."""
    e, f = schema.executions, schema.flows
    stored = {
        row.flow_id: row
        for row in connection.execute(
            select(f.c.flow_id, f.c.app_id, f.c.tenant, f.c.name, f.c.enabled)
        )
    }
    counts: dict[str, dict[str, int]] = {flow_id: {} for flow_id in stored}
    for flow_id, state, count in connection.execute(
        select(e.c.flow_id, e.c.state, func.count()).group_by(e.c.flow_id, e.c.state)
    ):
        counts.setdefault(flow_id, {})[state] = int(count)
    result = []
    for flow_id, by_state in counts.items():
        row = stored.get(flow_id)
        result.append(
            FlowCounts(
                flow_id,
                row.app_id if row is not None else "",
                row.tenant if row is not None else "",
                row.name if row is not None else "",
                bool(row.enabled) if row is not None else False,
                by_state,
            )
        )
    return result


def destination_counts(connection: Connection) -> list[DestinationCounts]:
    """Deliveries grouped by endpoint and state."""
    d = schema.deliveries
    return [
        DestinationCounts(endpoint, state, int(count), int(attempts or 0), oldest)
        for endpoint, state, count, attempts, oldest in connection.execute(
            select(d.c.destination, d.c.state, func.count(), func.sum(d.c.attempts))
            .add_columns(func.min(d.c.created_at))
            .group_by(d.c.destination, d.c.state)
        )
    ]


def lane_heads(connection: Connection, lanes: Sequence[str]) -> dict[str, int]:
    """The first open delivery of each lane (lanes without one are left out)."""
    d = schema.deliveries
    heads: dict[str, int] = {}
    wanted = sorted(set(lanes))
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        for lane, first in connection.execute(
            select(d.c.lane, func.min(d.c.id))
            .where(d.c.lane.in_(chunk), d.c.state.in_(outbox.OPEN_STATES))
            .group_by(d.c.lane)
        ):
            heads[lane] = int(first)
    return heads


def _endpoint_pattern(address: str) -> str:
    """A LIKE pattern for the endpoint strings of ``host:port`` (as address_of names
    them: an IPv6 host in brackets; its colons are escaped in endpoint strings)."""
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    escaped = host.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%:host={escaped.replace(':', chr(92) * 2 + ':')}:port={port}:%"


def deliveries_page(
    connection: Connection,
    states: Sequence[str] = (),
    address: str | None = None,
    lane: str | None = None,
    limit: int = 100,
) -> list[Delivery]:
    """Deliveries oldest first, by state, destination address (``host:port``) and lane."""
    d = schema.deliveries
    query = select(d.c.id).order_by(d.c.id).limit(max(1, limit))
    if states:
        query = query.where(d.c.state.in_(list(states)))
    if lane is not None:
        query = query.where(d.c.lane == lane)
    if address is not None:
        query = query.where(d.c.destination.like(_endpoint_pattern(address), escape="\\"))
    ids = [row[0] for row in connection.execute(query)]
    found = [outbox.get_delivery(connection, delivery_id) for delivery_id in ids]
    return [row for row in found if row is not None]


def flow_exists(connection: Connection, flow_id: str) -> bool:
    """A flow with this Flow ID is stored."""
    f = schema.flows
    return (
        connection.execute(select(f.c.flow_id).where(f.c.flow_id == flow_id)).first() is not None
    )
