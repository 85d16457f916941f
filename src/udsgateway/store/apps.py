"""The SQL of the tables ``apps`` and ``flows``: the flows as imported by operators.

The store keeps a flow's trigger settings in columns and its actions as the
JSON text the flows module writes; it neither reads nor checks them (that is
the flows module's work, before anything is saved).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from attrs import evolve
from sqlalchemy import Connection, and_, delete, select, update

from udsgateway.store import meta, schema
from udsgateway.store.records import StoredApp, StoredFlow


def save_app(
    connection: Connection, app: StoredApp, now: float, new_id: Callable[[str], str]
) -> StoredApp:
    """Insert or update an app and its flows; return it with its IDs.

    An app without an App ID that has the same tenant and name as a stored
    one is the same app, and a flow without a Flow ID that has the name of
    one of its stored flows is that flow, so importing a file twice is safe.
    IDs still missing are made with ``new_id("APP")`` and ``new_id("FLW")``.
    """
    a, f = schema.apps, schema.flows
    if not app.app_id:
        row = connection.execute(
            select(a.c.app_id).where(a.c.tenant == app.tenant, a.c.name == app.name)
        ).first()
        if row is not None:
            app = evolve(app, app_id=row[0])
    stored_flows: dict[str, str] = {}
    if app.app_id:
        stored_flows = dict(
            connection.execute(select(f.c.name, f.c.flow_id).where(f.c.app_id == app.app_id))
            .tuples()
            .all()
        )
    app = evolve(
        app,
        app_id=app.app_id or new_id("APP"),
        flows=tuple(
            evolve(flow, flow_id=flow.flow_id or stored_flows.get(flow.name) or new_id("FLW"))
            for flow in app.flows
        ),
    )

    values = {
        "tenant": app.tenant,
        "name": app.name,
        "description": app.description,
        "variables": json.dumps(dict(app.variables), sort_keys=True),
        "updated_at": now,
    }
    exists = connection.execute(select(a.c.app_id).where(a.c.app_id == app.app_id)).first()
    if exists:
        connection.execute(update(a).where(a.c.app_id == app.app_id).values(**values))
    else:
        connection.execute(a.insert().values(app_id=app.app_id, **values))
    keep = [flow.flow_id for flow in app.flows]
    connection.execute(delete(f).where(and_(f.c.app_id == app.app_id, f.c.flow_id.not_in(keep))))
    for position, flow in enumerate(app.flows):
        values_of_flow: dict[str, Any] = {
            "app_id": app.app_id,
            "tenant": app.tenant,
            "name": flow.name,
            "position": position,
            "enabled": flow.enabled,
            "connection": flow.connection,
            "message_type": flow.message_type,
            "ack": flow.ack,
            "ack_timeout": flow.ack_timeout,
            "sample": flow.sample,
            "actions": flow.actions,
            # application_ack in ``extra``: a trigger key without a column of its own.
            "extra": json.dumps(
                {"description": flow.description, "application_ack": flow.application_ack}
            ),
        }
        owner = connection.execute(select(f.c.app_id).where(f.c.flow_id == flow.flow_id)).first()
        if owner is None:
            connection.execute(f.insert().values(flow_id=flow.flow_id, **values_of_flow))
        elif owner[0] != app.app_id:
            raise ValueError(f"Flow ID {flow.flow_id} belongs to another app ({owner[0]})")
        else:
            connection.execute(
                update(f).where(f.c.flow_id == flow.flow_id).values(**values_of_flow)
            )
    meta.bump_generation(connection)
    return app


def load_apps(connection: Connection, tenant: str | None = None) -> list[StoredApp]:
    """Every stored app with its flows, in a stable order."""
    a, f = schema.apps, schema.flows
    query = select(a).order_by(a.c.tenant, a.c.name)
    if tenant is not None:
        query = query.where(a.c.tenant == tenant)
    apps = list(connection.execute(query))
    flows_by_app: dict[str, list[StoredFlow]] = {}
    flow_query = select(f).order_by(f.c.app_id, f.c.position)
    if tenant is not None:
        flow_query = flow_query.where(f.c.tenant == tenant)
    for row in connection.execute(flow_query):
        extra = json.loads(row.extra)
        flows_by_app.setdefault(row.app_id, []).append(
            StoredFlow(
                flow_id=row.flow_id,
                name=row.name,
                enabled=row.enabled,
                description=extra.get("description", ""),
                connection=row.connection,
                message_type=row.message_type,
                sample=row.sample,
                ack=row.ack,
                ack_timeout=row.ack_timeout,
                application_ack=extra.get("application_ack", "after_actions"),
                actions=row.actions,
            )
        )
    return [
        StoredApp(
            app_id=row.app_id,
            tenant=row.tenant,
            name=row.name,
            description=row.description,
            variables=json.loads(row.variables),
            flows=tuple(flows_by_app.get(row.app_id, ())),
        )
        for row in apps
    ]


def flows_generation(connection: Connection) -> int:
    """A counter that grows each time any flow changes (``meta``)."""
    return meta.flows_generation(connection)


def action_counts(connection: Connection, flow_ids: Iterable[str]) -> dict[str, int]:
    """How many actions each of these stored flows has now (flows not stored: absent).

    A cluster node that has not reloaded a flow saved on another node yet asks the
    store, so that an execution of that flow is never finished early."""
    wanted = sorted(set(flow_ids))
    if not wanted:
        return {}
    f = schema.flows
    rows = connection.execute(select(f.c.flow_id, f.c.actions).where(f.c.flow_id.in_(wanted)))
    return {str(flow_id): len(json.loads(actions)) for flow_id, actions in rows}
