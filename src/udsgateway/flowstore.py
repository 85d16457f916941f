"""Apps and flows to and from the store: ``flows.App`` <-> ``store.records.StoredApp``.

The store keeps plain records and never imports the flows model (which knows
templates and HL7 paths); this module, above both, converts. Its functions
take a Connection and run inside a store transaction, like the store's own.
"""

from __future__ import annotations

import json

from attrs import evolve
from sqlalchemy import Connection

from udsgateway.flows import App, Flow, Trigger, action_from_document, actions_json, new_id
from udsgateway.store import apps
from udsgateway.store.records import StoredApp, StoredFlow


def stored_app(app: App) -> StoredApp:
    """An app as the store keeps it."""
    return StoredApp(
        app_id=app.app_id,
        tenant=app.tenant,
        name=app.name,
        description=app.description,
        variables=dict(app.variables),
        flows=tuple(
            StoredFlow(
                flow_id=flow.flow_id,
                name=flow.name,
                enabled=flow.enabled,
                description=flow.description,
                connection=flow.trigger.connection,
                message_type=flow.trigger.message_type,
                sample=flow.trigger.sample,
                ack=flow.trigger.ack,
                ack_timeout=flow.trigger.ack_timeout,
                application_ack=flow.trigger.application_ack,
                actions=actions_json(flow),
            )
            for flow in app.flows
        ),
    )


def app_of(stored: StoredApp) -> App:
    """The app a stored record describes."""
    return App(
        name=stored.name,
        tenant=stored.tenant,
        app_id=stored.app_id,
        description=stored.description,
        variables=dict(stored.variables),
        flows=tuple(
            Flow(
                name=flow.name,
                flow_id=flow.flow_id,
                enabled=flow.enabled,
                description=flow.description,
                trigger=Trigger(
                    connection=flow.connection,
                    message_type=flow.message_type,
                    sample=flow.sample,
                    ack=flow.ack,
                    ack_timeout=flow.ack_timeout,
                    application_ack=flow.application_ack,
                ),
                actions=tuple(action_from_document(a) for a in json.loads(flow.actions)),
            )
            for flow in stored.flows
        ),
    )


def save_app(connection: Connection, app: App, now: float) -> App:
    """Insert or update an app and its flows (``store.apps.save_app``); return it with
    its IDs (new ones made by ``flows.new_id``)."""
    saved = apps.save_app(connection, stored_app(app), now, new_id)
    return evolve(
        app,
        app_id=saved.app_id,
        flows=tuple(
            evolve(flow, flow_id=stored.flow_id)
            for flow, stored in zip(app.flows, saved.flows, strict=True)
        ),
    )


def load_apps(connection: Connection, tenant: str | None = None) -> list[App]:
    """Every stored app with its flows, in a stable order."""
    return [app_of(stored) for stored in apps.load_apps(connection, tenant)]
