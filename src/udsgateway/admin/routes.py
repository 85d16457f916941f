"""The endpoints over the operations facade (``admin.operations.Operations``).

Each one checks its input (path, query, JSON body), calls the facade with the
caller's name and ``via="api"``, and maps its errors: ``NotFound`` 404,
``Invalid`` 400, ``Conflict`` 409. The facade writes the audit rows.

Message searches take their filters in a JSON body (``POST
/api/v1/messages/search``), not in the URL: a patient identifier or a control
ID does not belong in a URL, which proxies and browsers keep.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from udsgateway.admin import operations as ops
from udsgateway.admin.http import Call, HTTPError, Route
from udsgateway.store import audit, search
from udsgateway.store.users import ADMIN, OPERATOR, VIEWER

_REASON = {"type": "string", "minLength": 1, "maxLength": 255}

REASON_SCHEMA = {
    "type": "object",
    "properties": {"reason": _REASON},
    "required": ["reason"],
    "additionalProperties": False,
}
OPTIONAL_REASON_SCHEMA = {
    "type": "object",
    "properties": {"reason": {"type": "string", "maxLength": 255}},
    "additionalProperties": False,
}
_QUERY_PROPERTIES: dict[str, Any] = {
    "tenant": {"type": "string", "maxLength": 64},
    "message_type": {"type": "string", "maxLength": 32},
    "status": {"type": "string", "enum": list(search.STATUSES)},
    "since": {"type": "number", "description": "epoch seconds"},
    "until": {"type": "number", "description": "epoch seconds"},
    "flow_id": {"type": "string", "maxLength": 32},
    **{name: {"type": "string", "minLength": 1, "maxLength": 199} for name in search.KEYS},
}
SEARCH_SCHEMA = {
    "type": "object",
    "properties": {
        **_QUERY_PROPERTIES,
        "before_id": {"type": "integer", "minimum": 1},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
    },
    "additionalProperties": False,
}
REPLAY_SET_SCHEMA = {
    "type": "object",
    "properties": {
        "query": {
            "type": "object",
            "properties": _QUERY_PROPERTIES,
            "additionalProperties": False,
        },
        "reason": {"type": "string", "maxLength": 255},
        "target_flow": {"type": "string", "maxLength": 32},
        "confirm_count": {"type": "integer", "minimum": 0},
    },
    "required": ["query"],
    "additionalProperties": False,
}
REPLAY_ONE_SCHEMA = {
    "type": "object",
    "properties": {"reason": _REASON, "target_flow": {"type": "string", "maxLength": 32}},
    "required": ["reason"],
    "additionalProperties": False,
}


FLOW_TEXT_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 1_000_000}},
    "required": ["text"],
    "additionalProperties": False,
}
SAMPLE_SCHEMA = {
    "type": "object",
    "properties": {"sample": {"type": "string", "minLength": 1, "maxLength": 1_000_000}},
    "required": ["sample"],
    "additionalProperties": False,
}
RENDER_SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "minLength": 1, "maxLength": 255},
        "message": {"type": "string", "minLength": 1, "maxLength": 1_000_000},
        "responses": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "required": ["action"],
    "additionalProperties": False,
}
#: Longest wait of one long poll of the log tail, in seconds.
MAX_TAIL_WAIT = 55.0


async def _facade(result: Any) -> Any:
    """Await a facade Deferred, mapping its errors to HTTP answers."""
    try:
        return await result
    except ops.NotFound as error:
        raise HTTPError(404, str(error)) from None
    except ops.Invalid as error:
        raise HTTPError(400, str(error)) from None
    except ops.Conflict as error:
        raise HTTPError(409, str(error)) from None


def _int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HTTPError(400 if name != "id" else 404, f"{name}: expected an integer") from None
    return value


def _time(text: str, name: str) -> float:
    """Epoch seconds, or an ISO 8601 date and time (UTC when it has no offset)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPError(400, f"{name}: expected epoch seconds or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def make_query(body: dict[str, Any]) -> search.Query:
    keys = tuple((name, body[name]) for name in search.KEYS if name in body)
    return search.Query(
        tenant=body.get("tenant"),
        message_type=body.get("message_type"),
        status=body.get("status"),
        since=float(body["since"]) if "since" in body else None,
        until=float(body["until"]) if "until" in body else None,
        flow_id=body.get("flow_id"),
        keys=keys,
        before_id=body.get("before_id"),
        limit=body.get("limit", 50),
    )


def make_audit_query(query: Mapping[str, str]) -> audit.AuditQuery:
    """The audit trail's filters from a URL's query (no content there: names, actions)."""
    return audit.AuditQuery(
        who=query.get("who") or None,
        action=query.get("action") or None,
        target=query.get("target") or None,
        since=_time(query["since"], "since") if query.get("since") else None,
        until=_time(query["until"], "until") if query.get("until") else None,
        before_id=_int(query["before_id"], "before_id") if query.get("before_id") else None,
        limit=_int(query.get("limit", "100"), "limit"),
    )


def operation_routes(facade: Any) -> list[Route]:
    """The routes over ``facade`` (an Operations)."""

    def handler(work: Callable[[Call], Any]) -> Callable[[Call], Awaitable[Any]]:
        async def run(call: Call) -> Any:
            return await _facade(work(call))

        return run

    def delivery_action(name: str) -> Callable[[Call], Awaitable[Any]]:
        method = getattr(facade, name)
        return handler(
            lambda call: method(
                call.actor, "api", _int(call.params["id"], "id"), call.body["reason"]
            )
        )

    def deliveries(call: Call) -> Any:
        states = [s for s in call.query.get("state", "").split(",") if s]
        limit = _int(call.query.get("limit", "100"), "limit")
        return facade.deliveries(
            call.actor,
            "api",
            states,
            call.query.get("destination") or None,
            call.query.get("lane") or None,
            limit,
        )

    def content(kind: str) -> Callable[[Call], Any]:
        def work(call: Call) -> Any:
            number = _int(call.params["id"], "id")
            default = "inbound" if kind == "message" else "outbound"
            part = call.query.get("part", default)
            allowed = ("inbound", "ack") if kind == "message" else ("outbound", "response")
            if part not in allowed:
                raise HTTPError(400, f"part: expected one of {', '.join(allowed)}")
            if kind == "message":
                return facade.content(call.actor, "api", message_id=number, part=part)
            return facade.content(call.actor, "api", part=part, delivery_id=number)

        return work

    def replay_set(call: Call) -> Any:
        body = call.body
        return facade.replay_messages(
            call.actor,
            "api",
            make_query(body["query"]),
            body.get("reason", ""),
            body.get("target_flow"),
            body.get("confirm_count"),
        )

    def audit_trail(call: Call) -> Any:
        return facade.audit_trail(call.actor, "api", make_audit_query(call.query))

    def logs(call: Call) -> Any:
        query = call.query
        return facade.logs(
            call.actor,
            "api",
            flow_id=query.get("flow_id") or None,
            status=query.get("status") or None,
            since=_time(query["since"], "since") if query.get("since") else None,
            before_id=_int(query["before_id"], "before_id") if query.get("before_id") else None,
            limit=_int(query.get("limit", "100"), "limit"),
        )

    def tail(call: Call) -> Any:
        query = call.query
        try:
            timeout = float(query.get("timeout", "25"))
        except ValueError:
            raise HTTPError(400, "timeout: expected seconds") from None
        return facade.tail(
            call.actor,
            "api",
            after_id=_int(query["after_id"], "after_id") if query.get("after_id") else None,
            flow_id=query.get("flow_id") or None,
            status=query.get("status") or None,
            timeout=min(max(timeout, 0.0), MAX_TAIL_WAIT),
        )

    def enable(enabled: bool) -> Callable[[Call], Any]:
        return lambda call: facade.set_flow_enabled(
            call.actor, "api", call.params["flow_id"], enabled, call.body.get("reason", "")
        )

    v1 = "/api/v1"
    flow_routes = [
        Route(
            "GET",
            f"{v1}/flows",
            handler(
                lambda call: facade.flows(call.actor, "api", call.query.get("tenant") or None)
            ),
            VIEWER,
            "every flow: Host, Port, App ID, Flow ID, type, enabled (query: tenant)",
            tag="flows",
        ),
        Route(
            "GET",
            f"{v1}/flows/{{flow_id}}",
            handler(lambda call: facade.flow(call.actor, "api", call.params["flow_id"])),
            VIEWER,
            "one flow as its flow file has it",
            tag="flows",
        ),
        Route(
            "POST",
            f"{v1}/flows/validate",
            handler(lambda call: facade.validate_flows(call.actor, "api", call.body["text"])),
            OPERATOR,
            "check a flow document (TOML) as flows import does, without saving",
            FLOW_TEXT_SCHEMA,
            tag="flows",
        ),
        Route(
            "POST",
            f"{v1}/flows/import",
            handler(lambda call: facade.import_flows(call.actor, "api", call.body["text"])),
            ADMIN,
            "save a flow document; answers Host, Port, App ID, Flow ID of each flow",
            FLOW_TEXT_SCHEMA,
            tag="flows",
        ),
        Route(
            "GET",
            f"{v1}/apps/{{app_id}}/export",
            handler(lambda call: facade.export_flows(call.actor, "api", call.params["app_id"])),
            OPERATOR,
            "an app as the text of its flow file",
            tag="flows",
        ),
        Route(
            "POST",
            f"{v1}/flows/{{flow_id}}/enable",
            handler(enable(True)),
            OPERATOR,
            "enable a flow",
            OPTIONAL_REASON_SCHEMA,
            tag="flows",
        ),
        Route(
            "POST",
            f"{v1}/flows/{{flow_id}}/disable",
            handler(enable(False)),
            OPERATOR,
            "disable a flow (its messages are rejected)",
            OPTIONAL_REASON_SCHEMA,
            tag="flows",
        ),
        Route(
            "POST",
            f"{v1}/flows/{{flow_id}}/render",
            handler(
                lambda call: facade.render(
                    call.actor,
                    "api",
                    call.params["flow_id"],
                    call.body["action"],
                    call.body.get("message"),
                    call.body.get("responses"),
                )
            ),
            OPERATOR,
            "render an action against the flow's sample or a pasted message, with fake "
            "responses of earlier actions",
            RENDER_SCHEMA,
            tag="flows",
        ),
        Route(
            "GET",
            f"{v1}/flows/{{flow_id}}/variables",
            handler(
                lambda call: facade.variables(call.actor, "api", flow_id=call.params["flow_id"])
            ),
            VIEWER,
            "the variable catalogue of a flow's sample",
            tag="flows",
        ),
        Route(
            "POST",
            f"{v1}/variables",
            handler(lambda call: facade.variables(call.actor, "api", sample=call.body["sample"])),
            VIEWER,
            "the variable catalogue of a pasted sample message",
            SAMPLE_SCHEMA,
            tag="flows",
        ),
        Route(
            "GET",
            f"{v1}/logs",
            handler(logs),
            VIEWER,
            "the execution log, newest first (query: flow_id, status, since, before_id, limit)",
            tag="logs",
        ),
        Route(
            "GET",
            f"{v1}/logs/tail",
            handler(tail),
            VIEWER,
            "long poll: the log lines after after_id, oldest first, or none after timeout "
            "seconds (query: after_id, flow_id, status, timeout)",
            tag="logs",
        ),
    ]
    return [
        *flow_routes,
        Route(
            "GET",
            f"{v1}/destinations",
            handler(lambda call: facade.destinations(call.actor, "api")),
            VIEWER,
            "destinations: queued, held, oldest pending, connection, paused",
            tag="queues",
        ),
        Route(
            "POST",
            f"{v1}/destinations/{{destination}}/pause",
            handler(
                lambda call: facade.pause(
                    call.actor, "api", call.params["destination"], call.body["reason"]
                )
            ),
            OPERATOR,
            "pause a destination (host:port): it keeps queueing, nothing is sent",
            REASON_SCHEMA,
            tag="queues",
        ),
        Route(
            "POST",
            f"{v1}/destinations/{{destination}}/resume",
            handler(
                lambda call: facade.resume(
                    call.actor, "api", call.params["destination"], call.body.get("reason", "")
                )
            ),
            OPERATOR,
            "resume a paused destination",
            OPTIONAL_REASON_SCHEMA,
            tag="queues",
        ),
        Route(
            "GET",
            f"{v1}/deliveries",
            handler(deliveries),
            VIEWER,
            "deliveries, oldest first, each with why it waits (query: state, destination, "
            "lane, limit)",
            tag="queues",
        ),
        Route(
            "GET",
            f"{v1}/deliveries/{{id}}",
            handler(
                lambda call: facade.delivery(call.actor, "api", _int(call.params["id"], "id"))
            ),
            VIEWER,
            "one delivery (no content), with why it waits",
            tag="queues",
        ),
        Route(
            "GET",
            f"{v1}/deliveries/{{id}}/content",
            handler(content("delivery")),
            VIEWER,
            "the rendered outbound message (part=outbound) or the destination's response "
            "(part=response)",
            content=True,
            tag="queues",
        ),
        *[
            Route(
                "POST",
                f"{v1}/deliveries/{{id}}/{name}",
                delivery_action(method),
                OPERATOR,
                text,
                REASON_SCHEMA,
                tag="queues",
            )
            for name, method, text in (
                ("release", "release", "send a held delivery again now"),
                ("retry", "retry_now", "send a delivery waiting for its backoff now"),
                ("skip", "skip", "give up on a held or queued delivery"),
                ("replay", "replay_delivery", "send a delivery again, before its lane's queue"),
            )
        ],
        Route(
            "POST",
            f"{v1}/executions/{{id}}/release",
            delivery_action("release_execution"),
            OPERATOR,
            "render a held execution's action again",
            REASON_SCHEMA,
            tag="queues",
        ),
        Route(
            "POST",
            f"{v1}/messages/search",
            handler(lambda call: facade.messages(call.actor, "api", make_query(call.body))),
            VIEWER,
            "search stored messages, newest first (filters in the body, not the URL)",
            SEARCH_SCHEMA,
            tag="messages",
        ),
        Route(
            "GET",
            f"{v1}/messages/{{id}}",
            handler(lambda call: facade.message(call.actor, "api", _int(call.params["id"], "id"))),
            VIEWER,
            "a message's metadata, ACK, executions, deliveries and attempts (no content)",
            tag="messages",
        ),
        Route(
            "GET",
            f"{v1}/messages/{{id}}/content",
            handler(content("message")),
            VIEWER,
            "the raw inbound message (part=inbound) or the ACK sent (part=ack)",
            content=True,
            tag="messages",
        ),
        Route(
            "POST",
            f"{v1}/messages/{{id}}/replay",
            handler(
                lambda call: facade.replay_message(
                    call.actor,
                    "api",
                    _int(call.params["id"], "id"),
                    call.body["reason"],
                    call.body.get("target_flow"),
                )
            ),
            OPERATOR,
            "replay one accepted message through its flows (or target_flow)",
            REPLAY_ONE_SCHEMA,
            tag="messages",
        ),
        Route(
            "POST",
            f"{v1}/replays",
            handler(replay_set),
            OPERATOR,
            "replay the accepted messages of a search: without confirm_count it only "
            "counts; with the count it runs (409 if the set changed)",
            REPLAY_SET_SCHEMA,
            tag="messages",
        ),
        Route(
            "GET",
            f"{v1}/audit",
            handler(audit_trail),
            ADMIN,
            "the audit trail, newest first (query: who, action, target, since, until, "
            "before_id, limit)",
            tag="audit",
        ),
        Route(
            "GET",
            f"{v1}/cluster",
            handler(lambda call: facade.cluster(call.actor, "api")),
            VIEWER,
            "the nodes sharing the database: state, buckets per node, lease ages, database "
            "time, who runs each singleton job; on a single gateway, that it is not a cluster",
            tag="cluster",
        ),
    ]
