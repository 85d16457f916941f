"""The SQL of the execution log (table ``logs``).

Every statement on this table is here: the lines each transaction
appends, the query operators read them with (``udsgateway logs``), and what
retention deletes. A line never holds message content (no PHI).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Integer, cast, delete, func, or_, select

from udsgateway.store import schema
from udsgateway.store.engine import prepared_insert
from udsgateway.store.records import LogEntry, LogLine

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
_INSERT_LOG = prepared_insert(schema.logs, _LOG_COLUMNS)

#: Every outcome a log line can have (received, delivery, execution, operator).
LOG_OUTCOMES = (
    "accepted",
    "rejected",
    "retry",
    "delivered",
    "held",
    "skipped",
    "done",
    "failed",
    "release",
    "skip",
    "replay",
    "not sent",
)


def _row(entry: LogEntry) -> dict[str, Any]:
    return {
        "at": entry.at,
        "tenant": entry.tenant,
        "app_id": entry.app_id,
        "execution_id": entry.execution_id,
        "step": entry.step,
        "attempt": entry.attempt,
        "flow_id": entry.flow_id,
        "message_id": entry.message_id,
        "control_id": entry.control_id,
        "message_type": entry.message_type,
        "event": entry.event,
        "outcome": entry.outcome,
        "ack_code": entry.ack_code,
        "reason": entry.reason[:255],
    }


def insert_logs(connection: Connection, entries: Sequence[LogEntry]) -> None:
    """Append lines to the execution log, in order."""
    if entries:
        _INSERT_LOG.execute(connection, [_row(entry) for entry in entries])


def known_outcomes(connection: Connection) -> set[str]:
    """LOG_OUTCOMES and every outcome the log holds (a newer gateway may write others)."""
    found = connection.execute(select(schema.logs.c.outcome).distinct()).scalars()
    return {*LOG_OUTCOMES, *(outcome for outcome in found if outcome)}


def log_lines(
    connection: Connection,
    flow_id: str | None = None,
    outcome: str | None = None,
    since: float | None = None,
    after_id: int = 0,
    limit: int = 1000,
    newest_first: bool = False,
    *,
    before_id: int | None = None,
    event: str | None = None,
    message_id: int | None = None,
    execution_ids: Sequence[int] = (),
) -> list[LogLine]:
    """Lines after ``after_id`` (and before ``before_id``): the oldest ``limit`` of
    them, or the newest. The one query of the execution log: ``udsgateway logs``, the
    operations facade (API, console, manhole) and a message's timeline read it.

    ``message_id``: the lines of that message, and (``execution_ids``) of its
    executions (an operator's line names the execution only). A line without an
    App ID of its own shows its flow's, when the flow is still stored (the table
    ``flows`` is only read here).
    """
    logs, flows = schema.logs, schema.flows
    query = (
        select(
            logs.c.id,
            logs.c.at,
            logs.c.event,
            logs.c.outcome,
            logs.c.tenant,
            logs.c.app_id,
            flows.c.app_id.label("flow_app_id"),
            logs.c.flow_id,
            logs.c.message_id,
            logs.c.execution_id,
            logs.c.control_id,
            logs.c.message_type,
            logs.c.step,
            logs.c.attempt,
            logs.c.ack_code,
            logs.c.reason,
        )
        .outerjoin(flows, flows.c.flow_id == logs.c.flow_id)
        .where(logs.c.id > after_id)
        .order_by(logs.c.id.desc() if newest_first else logs.c.id)
        .limit(max(1, limit))
    )
    if before_id is not None:
        query = query.where(logs.c.id < before_id)
    if flow_id:
        query = query.where(logs.c.flow_id == flow_id)
    if outcome:
        query = query.where(logs.c.outcome == outcome)
    if event:
        query = query.where(logs.c.event == event)
    if since is not None:
        query = query.where(logs.c.at >= since)
    if message_id is not None:
        mine = logs.c.message_id == message_id
        if execution_ids:
            mine = or_(mine, logs.c.execution_id.in_(list(execution_ids)))
        query = query.where(mine)
    return [
        LogLine(
            id=row.id,
            at=row.at,
            event=row.event,
            outcome=row.outcome,
            tenant=row.tenant,
            app_id=row.app_id or row.flow_app_id or "",
            flow_id=row.flow_id,
            message_id=row.message_id,
            execution_id=row.execution_id,
            control_id=row.control_id,
            message_type=row.message_type,
            step=row.step,
            attempt=row.attempt,
            ack_code=row.ack_code,
            reason=row.reason,
        )
        for row in connection.execute(query)
    ]


def last_log_id(connection: Connection) -> int:
    """The id of the newest log line (0: none): where a live tail starts."""
    return int(connection.execute(select(func.max(schema.logs.c.id))).scalar() or 0)


def per_minute(
    connection: Connection, event: str, since: float, minutes: int
) -> dict[str, list[int]]:
    """Lines of ``event`` per flow and minute from ``since`` on (``minutes`` counts each,
    oldest first): the dashboard's charts. A range of the ``at`` index, counted in SQL."""
    logs = schema.logs
    # Whole seconds since ``since``, divided as integers: the minute of each line.
    minute = cast(logs.c.at - since, Integer) / 60
    found: dict[str, list[int]] = {}
    for flow_id, index, count in connection.execute(
        select(logs.c.flow_id, minute, func.count())
        .where(logs.c.at >= since, logs.c.event == event, logs.c.flow_id != "")
        .group_by(logs.c.flow_id, minute)
    ):
        counts = found.setdefault(flow_id, [0] * minutes)
        counts[min(minutes - 1, max(0, int(index)))] += int(count)
    return found


def delete_logs(connection: Connection, message_ids: Iterable[int], before: float) -> None:
    """Retention: the lines of these messages, and lines of no message older than ``before``."""
    logs = schema.logs
    wanted = list(message_ids)
    if wanted:
        connection.execute(delete(logs).where(logs.c.message_id.in_(wanted)))
    connection.execute(delete(logs).where(logs.c.at < before, logs.c.message_id.is_(None)))
