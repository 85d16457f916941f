"""The SQL of the gateway: every query, as functions of a Connection.

Each function runs inside a transaction in the database thread (or the CLI's
own thread) and returns plain attrs values, never live result objects.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from functools import partial
from typing import Any

from attrs import evolve, frozen
from sqlalchemy import Connection, and_, bindparam, delete, select, update

from udsgateway.flows import App, Flow, Trigger, action_from_document, actions_json
from udsgateway.store import schema, search
from udsgateway.store.engine import Prepared, insert_with_ids, prepared_insert


class CommitOutcome(enum.Enum):
    """What happened to one inbound message in a group commit."""

    STORED = "stored"  # new message, committed with its executions
    REPLAY = "replay"  # same sender, MSH-10 and bytes as a stored message (G3)
    CONFLICT = "conflict"  # same sender and MSH-10, different bytes (NAK 205)
    REFUSED = "refused"  # new, but a destination's queue is full (NAK 207); not stored


@frozen
class InboundRecord:
    """An inbound message ready to commit, with the ACK we will send."""

    tenant: str
    sender: str
    control_id: str
    message_type: str
    peer: str
    connection: str
    received_at: float
    raw: bytes
    digest: str
    accepted: bool
    flows: tuple[str, ...]
    reason: str
    ack_code: str
    ack: bytes
    #: The routed flows that have actions: each gets an execution.
    run_flows: tuple[str, ...] = ()
    #: Store it only if it is a resend of a stored message (backpressure).
    refuse_new: bool = False
    #: Its ACK waits for the actions ("after actions"): stored with an empty ACK
    #: code until ``update_ack`` stores the one finally sent.
    ack_pending: bool = False
    #: The first action of each run flow, rendered before the commit (the executor's
    #: fold), aligned with ``run_flows``; None where it was not rendered. Opaque here:
    #: an execution whose first action is given is stored waiting on it, unless its
    #: flow has older executions still pending at that step (see ``commit_inbound``).
    first: tuple[Any, ...] = ()
    #: HL7 keys for the message search, (name, value): pid3, sch1, sch2 (store/search.py).
    keys: tuple[tuple[str, str], ...] = ()


@frozen
class CommitResult:
    """The result of committing one InboundRecord."""

    outcome: CommitOutcome
    message_id: int | None = None
    ack: bytes = b""  # for REPLAY: the ACK stored with the original
    execution_ids: tuple[int, ...] = ()
    #: REPLAY of a message whose "after actions" ACK is not decided yet.
    ack_pending: bool = False
    #: STORED: executions stored waiting on their first action, with that action as
    #: given in ``InboundRecord.first``, in creation order: the caller enqueues them.
    folded: tuple[tuple[int, Any], ...] = ()
    #: STORED: some execution was stored pending (the executor has work).
    pending: bool = False
    #: STORED: the folded executions' deliveries as enqueued, (delivery id, delivery).
    enqueued: tuple[tuple[int, Any], ...] = ()


@frozen
class StoredMessage:
    """A stored inbound message, for operators and tests."""

    id: int
    tenant: str
    sender: str
    control_id: str
    message_type: str
    peer: str
    connection: str
    received_at: float
    size: int
    raw: bytes
    accepted: bool
    flows: tuple[str, ...]
    reason: str
    ack_code: str
    ack: bytes


_MESSAGE_COLUMNS = (
    "tenant",
    "sender",
    "control_id",
    "message_type",
    "peer",
    "connection",
    "received_at",
    "size",
    "digest",
    "raw",
    "accepted",
    "flows",
    "reason",
    "ack_code",
    "ack",
)
_LOG_COLUMNS = (
    "at",
    "tenant",
    "app_id",
    "execution_id",
    "step",
    "attempt",
    "flow_id",
    "message_id",
    "control_id",
    "message_type",
    "event",
    "outcome",
    "ack_code",
    "reason",
)
#: How many control IDs one duplicate-check query looks up.
_LOOKUP_CHUNK = 64


def _lookup_statement(size: int) -> Any:
    m = schema.messages
    return select(
        m.c.id, m.c.tenant, m.c.sender, m.c.control_id, m.c.digest, m.c.ack, m.c.ack_code
    ).where(
        m.c.accepted.is_(True),
        m.c.control_id.in_([bindparam(f"c{i}") for i in range(size)]),
    )


_LOOKUPS = {
    size: Prepared(partial(_lookup_statement, size)) for size in range(1, _LOOKUP_CHUNK + 1)
}
_INSERT_MESSAGE = prepared_insert(schema.messages, _MESSAGE_COLUMNS)
_INSERT_EXECUTION = prepared_insert(
    schema.executions,
    ("message_id", "flow_id", "state", "step", "created_at", "updated_at", "error"),
)
_INSERT_LOG = prepared_insert(schema.logs, _LOG_COLUMNS)


def commit_inbound(connection: Connection, records: list[InboundRecord]) -> list[CommitResult]:
    """Store a group of inbound messages: duplicate check, insert, executions, log lines."""
    existing: dict[tuple[str, str, str], tuple[int, str, bytes, bool]] = {}
    control_ids = sorted({r.control_id for r in records})
    for start in range(0, len(control_ids), _LOOKUP_CHUNK):
        chunk = control_ids[start : start + _LOOKUP_CHUNK]
        params = {f"c{i}": control_id for i, control_id in enumerate(chunk)}
        for row in _LOOKUPS[len(chunk)].execute(connection, [params]):
            message_id, tenant, sender, control_id, digest, ack, ack_code = row
            existing[(tenant, sender, control_id)] = (message_id, digest, ack, ack_code == "")

    results: list[CommitResult | None] = []
    to_insert: list[InboundRecord] = []
    positions: list[int] = []
    in_batch: dict[tuple[str, str, str], int] = {}  # key -> its index in to_insert
    resent: list[tuple[int, int, InboundRecord]] = []  # position, original's index, record
    for index, record in enumerate(records):
        key = (record.tenant, record.sender, record.control_id)
        if key in existing:
            _id, digest, ack, pending = existing[key]
            results.append(_duplicate(record, digest, ack, _id, pending))
            continue
        first = in_batch.get(key)
        if first is not None:
            # Resent on another connection while the original waits in this group:
            # answered once the original's id is known.
            results.append(None)
            resent.append((index, first, record))
            continue
        if record.refuse_new:
            results.append(CommitResult(CommitOutcome.REFUSED))
            continue
        if record.accepted:
            in_batch[key] = len(to_insert)
        results.append(None)
        to_insert.append(record)
        positions.append(index)

    if to_insert:
        ids = _insert_messages(connection, to_insert)
        made = _insert_executions(connection, to_insert, ids)
        _insert_receipt_logs(connection, to_insert, ids)
        search.insert_keys(connection, [_search_keys(r) for r in to_insert], ids)
        for position, record, message_id in zip(positions, to_insert, ids, strict=True):
            execution_ids, folded = made.get(message_id, ((), ()))
            results[position] = CommitResult(
                CommitOutcome.STORED,
                message_id,
                record.ack,
                execution_ids,
                folded=folded,
                pending=len(folded) < len(execution_ids),
            )
        for position, first, record in resent:
            original = to_insert[first]
            results[position] = _duplicate(
                record, original.digest, original.ack, ids[first], original.ack_pending
            )
    return [r for r in results if r is not None]


def _search_keys(record: InboundRecord) -> tuple[tuple[str, str], ...]:
    """The message browser's keys of a message (see store/search.py)."""
    keys = (
        ("msh10", record.control_id),
        ("msh9", record.message_type),
        (search.TENANT_KEY, record.tenant),
        *((search.FLOW_KEY, flow_id) for flow_id in record.flows),
        *record.keys,
    )
    return keys if record.accepted else (*keys, (search.STATUS_KEY, "rejected"))


def _duplicate(
    record: InboundRecord, digest: str, ack: bytes, message_id: int | None, pending: bool
) -> CommitResult:
    if record.digest == digest:
        return CommitResult(CommitOutcome.REPLAY, message_id, ack, ack_pending=pending)
    return CommitResult(CommitOutcome.CONFLICT, message_id)


def _insert_messages(connection: Connection, records: list[InboundRecord]) -> list[int]:
    rows = [
        {
            "tenant": r.tenant,
            "sender": r.sender,
            "control_id": r.control_id,
            "message_type": r.message_type,
            "peer": r.peer,
            "connection": r.connection,
            "received_at": r.received_at,
            "size": len(r.raw),
            "digest": r.digest,
            "raw": r.raw,
            "accepted": r.accepted,
            "flows": json.dumps(list(r.flows)),
            "reason": r.reason,
            "ack_code": "" if r.ack_pending else r.ack_code,
            "ack": b"" if r.ack_pending else r.ack,
        }
        for r in records
    ]
    return insert_with_ids(connection, schema.messages, _INSERT_MESSAGE, rows)


def _insert_executions(
    connection: Connection, records: list[InboundRecord], ids: list[int]
) -> dict[int, tuple[tuple[int, ...], tuple[tuple[int, Any], ...]]]:
    """Each accepted message's executions: by message id, their ids and the folded
    ones with their first action (the others are stored pending).

    An execution whose first action was rendered before the commit is stored
    waiting on it, so the caller can enqueue that action in this transaction,
    unless an older execution of its flow is still pending at step 0: the
    executor enqueues those in creation order, and a newer message's action must
    not overtake them in the lane (G2). Within the group, the first execution of
    a flow stored pending makes the flow's later ones pending too.
    """
    rows: list[dict[str, Any]] = []
    firsts: list[Any] = []
    for record, message_id in zip(records, ids, strict=True):
        if not record.accepted:
            continue
        for index, flow_id in enumerate(record.run_flows):
            rows.append(
                {
                    "message_id": message_id,
                    "flow_id": flow_id,
                    "state": "pending",
                    "step": 0,
                    "created_at": record.received_at,
                    "updated_at": record.received_at,
                    "error": "",
                }
            )
            firsts.append(record.first[index] if index < len(record.first) else None)
    if not rows:
        return {}
    if any(first is not None for first in firsts):
        blocked = {flow_id for (flow_id,) in _PENDING_FIRST.execute(connection, [{}])}
        for row, first in zip(rows, firsts, strict=True):
            if first is not None and row["flow_id"] not in blocked:
                row["state"] = "waiting"
            else:
                blocked.add(row["flow_id"])
    execution_ids = insert_with_ids(connection, schema.executions, _INSERT_EXECUTION, rows)
    made: dict[int, tuple[list[int], list[tuple[int, Any]]]] = {}
    for execution_id, row, first in zip(execution_ids, rows, firsts, strict=True):
        ids_of_message, folded = made.setdefault(row["message_id"], ([], []))
        ids_of_message.append(execution_id)
        if row["state"] == "waiting":
            folded.append((execution_id, first))
    return {k: (tuple(e), tuple(f)) for k, (e, f) in made.items()}


def _pending_first_statement() -> Any:
    e = schema.executions
    return (
        select(e.c.flow_id)
        .where(e.c.state == bindparam("pending", "pending"), e.c.step == bindparam("step", 0))
        .distinct()
    )


#: Flows with executions pending at step 0 (few: the executor drains them).
_PENDING_FIRST = Prepared(_pending_first_statement)


def insert_logs(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Append log lines; columns not given are empty."""
    if rows:
        _INSERT_LOG.execute(connection, [{**_LOG_DEFAULTS, **row} for row in rows])


_LOG_DEFAULTS: dict[str, Any] = {
    "tenant": "",
    "app_id": "",
    "flow_id": "",
    "message_id": None,
    "execution_id": None,
    "control_id": "",
    "message_type": "",
    "step": None,
    "attempt": None,
    "outcome": "",
    "ack_code": "",
    "reason": "",
}


@frozen
class Origin:
    """Where an execution comes from: its flow and inbound message (for log lines)."""

    flow_id: str
    message_id: int
    tenant: str
    message_type: str
    control_id: str
    step: int


def _origin_statement(size: int) -> Any:
    e, m = schema.executions, schema.messages
    return (
        select(e.c.id, e.c.flow_id, e.c.message_id, m.c.tenant, m.c.message_type)
        .add_columns(m.c.control_id, e.c.step)
        .join(m, m.c.id == e.c.message_id)
        .where(e.c.id.in_([bindparam(f"e{i}") for i in range(size)]))
    )


_ORIGINS = {
    size: Prepared(partial(_origin_statement, size)) for size in range(1, _LOOKUP_CHUNK + 1)
}


def origins(connection: Connection, execution_ids: Iterable[int]) -> dict[int, Origin]:
    """Flow and message of each execution: one indexed query per 64 executions."""
    wanted = sorted(set(execution_ids))
    found = {}
    for start in range(0, len(wanted), _LOOKUP_CHUNK):
        chunk = wanted[start : start + _LOOKUP_CHUNK]
        params = {f"e{i}": execution_id for i, execution_id in enumerate(chunk)}
        for execution_id, *rest in _ORIGINS[len(chunk)].execute(connection, [params]):
            found[execution_id] = Origin(*rest)
    return found


def _insert_receipt_logs(
    connection: Connection, records: list[InboundRecord], ids: list[int]
) -> None:
    _INSERT_LOG.execute(
        connection,
        [
            {
                "at": r.received_at,
                "tenant": r.tenant,
                "app_id": "",
                "execution_id": None,
                "step": None,
                "attempt": None,
                "flow_id": ",".join(r.flows)[:32] if len(r.flows) == 1 else "",
                "message_id": message_id,
                "control_id": r.control_id,
                "message_type": r.message_type,
                "event": "received",
                "outcome": "accepted" if r.accepted else "rejected",
                "ack_code": "" if r.ack_pending else r.ack_code,
                "reason": r.reason,
            }
            for r, message_id in zip(records, ids, strict=True)
        ],
    )


def find_messages(
    connection: Connection,
    tenant: str | None = None,
    control_id: str | None = None,
    limit: int = 100,
) -> list[StoredMessage]:
    """Stored messages, oldest first, optionally filtered."""
    m = schema.messages
    query = select(m).order_by(m.c.id).limit(limit)
    if tenant is not None:
        query = query.where(m.c.tenant == tenant)
    if control_id is not None:
        query = query.where(m.c.control_id == control_id)
    return [
        StoredMessage(
            id=row.id,
            tenant=row.tenant,
            sender=row.sender,
            control_id=row.control_id,
            message_type=row.message_type,
            peer=row.peer,
            connection=row.connection,
            received_at=row.received_at,
            size=row.size,
            raw=row.raw,
            accepted=row.accepted,
            flows=tuple(json.loads(row.flows)),
            reason=row.reason,
            ack_code=row.ack_code,
            ack=row.ack,
        )
        for row in connection.execute(query)
    ]


def save_app(connection: Connection, app: App, now: float) -> App:
    """Insert or update an app and its flows; return it with its IDs.

    An app without an App ID that has the same tenant and name as a stored
    one is the same app, and a flow without a Flow ID that has the name of
    one of its stored flows is that flow, so importing a file twice is safe.
    """
    a, f = schema.apps, schema.flows
    if not app.app_id:
        row = connection.execute(
            select(a.c.app_id).where(a.c.tenant == app.tenant, a.c.name == app.name)
        ).first()
        if row is not None:
            app = evolve(app, app_id=row[0])
    stored_flows = {}
    if app.app_id:
        stored_flows = dict(
            connection.execute(select(f.c.name, f.c.flow_id).where(f.c.app_id == app.app_id))
            .tuples()
            .all()
        )
    app = evolve(
        app,
        flows=tuple(
            flow if flow.flow_id else evolve(flow, flow_id=stored_flows.get(flow.name, ""))
            for flow in app.flows
        ),
    ).with_ids()

    values = {
        "tenant": app.tenant,
        "name": app.name,
        "description": app.description,
        "variables": json.dumps(app.variables, sort_keys=True),
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
            "connection": flow.trigger.connection,
            "message_type": flow.trigger.message_type,
            "ack": flow.trigger.ack,
            "ack_timeout": flow.trigger.ack_timeout,
            "sample": flow.trigger.sample,
            "actions": actions_json(flow),
            # application_ack in ``extra``: a trigger key without a column of its own.
            "extra": json.dumps(
                {"description": flow.description, "application_ack": flow.trigger.application_ack}
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
    bump_generation(connection)
    return app


def load_apps(connection: Connection, tenant: str | None = None) -> list[App]:
    """Every stored app with its flows, in a stable order."""
    a, f = schema.apps, schema.flows
    query = select(a).order_by(a.c.tenant, a.c.name)
    if tenant is not None:
        query = query.where(a.c.tenant == tenant)
    apps = list(connection.execute(query))
    flows_by_app: dict[str, list[Flow]] = {}
    flow_query = select(f).order_by(f.c.app_id, f.c.position)
    if tenant is not None:
        flow_query = flow_query.where(f.c.tenant == tenant)
    for row in connection.execute(flow_query):
        extra = json.loads(row.extra)
        flows_by_app.setdefault(row.app_id, []).append(
            Flow(
                name=row.name,
                flow_id=row.flow_id,
                enabled=row.enabled,
                description=extra.get("description", ""),
                trigger=Trigger(
                    connection=row.connection,
                    message_type=row.message_type,
                    sample=row.sample,
                    ack=row.ack,
                    ack_timeout=row.ack_timeout,
                    application_ack=extra.get("application_ack", "after_actions"),
                ),
                actions=tuple(action_from_document(a) for a in json.loads(row.actions)),
            )
        )
    return [
        App(
            name=row.name,
            tenant=row.tenant,
            app_id=row.app_id,
            description=row.description,
            variables=json.loads(row.variables),
            flows=tuple(flows_by_app.get(row.app_id, ())),
        )
        for row in apps
    ]


def bump_generation(connection: Connection) -> None:
    """Note that flows changed, so running nodes reload their routing."""
    meta = schema.meta
    current = flows_generation(connection)
    if current == 0:
        connection.execute(meta.insert().values(key="flows_generation", value="1"))
    else:
        connection.execute(
            update(meta).where(meta.c.key == "flows_generation").values(value=str(current + 1))
        )


def flows_generation(connection: Connection) -> int:
    """A counter that grows each time any flow changes."""
    row = connection.execute(
        select(schema.meta.c.value).where(schema.meta.c.key == "flows_generation")
    ).first()
    return int(row[0]) if row else 0


@frozen
class ExecutionState:
    """Where one execution of a message stands (for a resend of an "after actions" message)."""

    id: int
    flow_id: str
    state: str
    error: str


def execution_states(connection: Connection, message_id: int) -> list[ExecutionState]:
    """The executions of a stored message, in creation order."""
    e = schema.executions
    rows = connection.execute(
        select(e.c.id, e.c.flow_id, e.c.state, e.c.error)
        .where(e.c.message_id == message_id)
        .order_by(e.c.id)
    )
    return [ExecutionState(*row) for row in rows]


def update_ack(connection: Connection, message_id: int, ack_code: str, ack: bytes) -> None:
    """Store the ACK finally sent (an "after actions" ACK reflects the chain's outcome)."""
    m = schema.messages
    connection.execute(update(m).where(m.c.id == message_id).values(ack_code=ack_code, ack=ack))


def prune(connection: Connection, before: float, limit: int) -> int:
    """Delete up to ``limit`` finished messages older than ``before``, with their records.

    A message goes only when none of its executions is unfinished and none
    of its deliveries is still open, so retention never loses work (G1).
    Small batches keep each transaction short: traffic is never stalled.
    """
    m, e, d, logs = schema.messages, schema.executions, schema.deliveries, schema.logs
    unfinished = (
        select(e.c.message_id)
        .where(e.c.state.in_(("pending", "waiting", "held")))
        .scalar_subquery()
    )
    # A finished execution may have an open delivery again (an operator replayed it):
    # its message stays until that is delivered, and does not hold back the others.
    open_delivery = (
        select(e.c.message_id)
        .join(d, d.c.execution_id == e.c.id)
        .where(d.c.state.in_(("queued", "held")))
        .scalar_subquery()
    )
    candidates = [
        row[0]
        for row in connection.execute(
            select(m.c.id)
            .where(
                m.c.received_at < before,
                m.c.id.not_in(unfinished),
                m.c.id.not_in(open_delivery),
            )
            .order_by(m.c.id)
            .limit(limit)
        )
    ]
    if not candidates:
        connection.execute(delete(logs).where(logs.c.at < before, logs.c.message_id.is_(None)))
        return 0
    execution_ids = [
        row[0] for row in connection.execute(select(e.c.id).where(e.c.message_id.in_(candidates)))
    ]
    if execution_ids:
        connection.execute(delete(d).where(d.c.execution_id.in_(execution_ids)))
        connection.execute(delete(e).where(e.c.id.in_(execution_ids)))
    connection.execute(delete(logs).where(logs.c.message_id.in_(candidates)))
    connection.execute(delete(logs).where(logs.c.at < before, logs.c.message_id.is_(None)))
    search.delete_keys(connection, candidates)
    connection.execute(delete(m).where(m.c.id.in_(candidates)))
    return len(candidates)
