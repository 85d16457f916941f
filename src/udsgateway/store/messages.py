"""The SQL of the table ``messages``: inbound messages as received, with their ACKs.

Each function runs inside a transaction in the database thread (or the CLI's
own thread) and returns plain records (``store.records``), never live result
objects. The inbound group commit that stores messages with their executions
is ``store.inbound.commit_inbound``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from attrs import fields
from sqlalchemy import Connection, bindparam, delete, select, update

from udsgateway.store import schema
from udsgateway.store.engine import Prepared, insert_with_ids, prepared_insert
from udsgateway.store.records import (
    OPEN_STATES,
    UNFINISHED,
    InboundRecord,
    MessageSummary,
    Origin,
    StoredMessage,
)

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
#: How many control IDs (or executions) one lookup query takes.
LOOKUP_CHUNK = 64


def _lookup_statement(size: int) -> Any:
    m = schema.messages
    return select(
        m.c.id, m.c.tenant, m.c.sender, m.c.control_id, m.c.digest, m.c.ack, m.c.ack_code
    ).where(
        m.c.accepted.is_(True),
        m.c.control_id.in_([bindparam(f"c{i}") for i in range(size)]),
    )


_LOOKUPS = {
    size: Prepared(partial(_lookup_statement, size)) for size in range(1, LOOKUP_CHUNK + 1)
}
_INSERT_MESSAGE = prepared_insert(schema.messages, _MESSAGE_COLUMNS)

#: A stored accepted message as the duplicate check sees it: its id, digest, ACK,
#: and whether its ACK is still undecided (an "after actions" ACK).
Accepted = tuple[int, str, bytes, bool]


def accepted_with(
    connection: Connection, control_ids: Iterable[str]
) -> dict[tuple[str, str, str], Accepted]:
    """Accepted messages with any of these MSH-10s, by (tenant, sender, control ID)."""
    existing: dict[tuple[str, str, str], Accepted] = {}
    wanted = sorted(set(control_ids))
    for start in range(0, len(wanted), LOOKUP_CHUNK):
        chunk = wanted[start : start + LOOKUP_CHUNK]
        params = {f"c{i}": control_id for i, control_id in enumerate(chunk)}
        for row in _LOOKUPS[len(chunk)].execute(connection, [params]):
            message_id, tenant, sender, control_id, digest, ack, ack_code = row
            existing[(tenant, sender, control_id)] = (message_id, digest, ack, ack_code == "")
    return existing


def insert_messages(connection: Connection, records: Sequence[InboundRecord]) -> list[int]:
    """Store messages as received; return their ids, in order."""
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


def update_ack(connection: Connection, message_id: int, ack_code: str, ack: bytes) -> None:
    """Store the ACK finally sent (an "after actions" ACK reflects the chain's outcome)."""
    m = schema.messages
    connection.execute(update(m).where(m.c.id == message_id).values(ack_code=ack_code, ack=ack))


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
        StoredMessage(**_summary_values(row), raw=row.raw, ack=row.ack)
        for row in connection.execute(query)
    ]


_SUMMARY_FIELDS = tuple(field.name for field in fields(MessageSummary))
#: The columns of a ``MessageSummary`` (a stored message's metadata), in its fields' order.
SUMMARY_COLUMNS = tuple(schema.messages.c[name] for name in _SUMMARY_FIELDS)


def summary_of(row: Any) -> MessageSummary:
    """A row with the ``SUMMARY_COLUMNS`` (or more) as a ``MessageSummary``."""
    return MessageSummary(**_summary_values(row))


def _summary_values(row: Any) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in _SUMMARY_FIELDS}
    values["accepted"] = bool(row.accepted)
    values["flows"] = tuple(json.loads(row.flows))
    return values


def _origin_statement(size: int) -> Any:
    e, m = schema.executions, schema.messages
    return (
        select(e.c.id, e.c.flow_id, e.c.message_id, m.c.tenant, m.c.message_type)
        .add_columns(m.c.control_id, e.c.step)
        .join(m, m.c.id == e.c.message_id)
        .where(e.c.id.in_([bindparam(f"e{i}") for i in range(size)]))
    )


_ORIGINS = {
    size: Prepared(partial(_origin_statement, size)) for size in range(1, LOOKUP_CHUNK + 1)
}


def origins(connection: Connection, execution_ids: Iterable[int]) -> dict[int, Origin]:
    """The message (and flow) each execution comes from: one indexed query per 64
    executions. Reads ``executions`` for the link; writes nothing."""
    wanted = sorted(set(execution_ids))
    found = {}
    for start in range(0, len(wanted), LOOKUP_CHUNK):
        chunk = wanted[start : start + LOOKUP_CHUNK]
        params = {f"e{i}": execution_id for i, execution_id in enumerate(chunk)}
        for execution_id, *rest in _ORIGINS[len(chunk)].execute(connection, [params]):
            found[execution_id] = Origin(*rest)
    return found


def finished_before(connection: Connection, before: float, limit: int) -> list[int]:
    """Retention: up to ``limit`` messages received before ``before`` whose work is over.

    A message qualifies when none of its executions is unfinished and none of
    their deliveries is still open (reads ``executions`` and ``deliveries``).
    A finished execution may have an open delivery again (an operator replayed
    it): its message stays until that is delivered, and does not hold back the
    others.
    """
    m, e, d = schema.messages, schema.executions, schema.deliveries
    unfinished = select(e.c.message_id).where(e.c.state.in_(UNFINISHED)).scalar_subquery()
    open_delivery = (
        select(e.c.message_id)
        .join(d, d.c.execution_id == e.c.id)
        .where(d.c.state.in_(OPEN_STATES))
        .scalar_subquery()
    )
    return [
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


def delete_messages(connection: Connection, message_ids: Sequence[int]) -> None:
    """Retention: delete these messages (their executions and deliveries first)."""
    if message_ids:
        m = schema.messages
        connection.execute(delete(m).where(m.c.id.in_(list(message_ids))))
