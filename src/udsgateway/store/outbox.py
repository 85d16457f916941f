"""The SQL of outbound deliveries: the durable, ordered queue behind every TCP action.

A delivery belongs to a lane, the unit of ordering (G2): deliveries of a lane
are sent strictly in ``id`` order, one at a time, and a held head blocks its
lane until an operator releases, skips or replays it. Every function runs in
one transaction in the database thread and returns plain attrs values.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

from sqlalchemy import Connection, bindparam, delete, func, select, update

from udsgateway.store import logs, schema
from udsgateway.store.engine import Prepared, insert_with_ids, prepared_insert
from udsgateway.store.messages import origins
from udsgateway.store.records import (
    DELIVERED,
    HELD,
    OPEN_STATES,
    QUEUED,
    SKIPPED,
    Delivery,
    LaneWork,
    LogEntry,
    NewDelivery,
    Origin,
    Settlement,
)

__all__ = [
    "DELIVERED",
    "HELD",
    "OPEN_STATES",
    "QUEUED",
    "SKIPPED",
    "Delivery",
    "LaneWork",
    "NewDelivery",
    "Settlement",
]

After = TypeVar("After")


@functools.lru_cache(maxsize=256)
def _policy(stored: str) -> Mapping[str, Any]:
    """A stored policy; an action's deliveries all carry the same few, parsed once."""
    return MappingProxyType(json.loads(stored))


def _delivery(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        lane=row.lane,
        destination=row.destination,
        protocol=row.protocol,
        control_id=row.control_id,
        payload=row.payload,
        state=row.state,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        response=row.response,
        response_code=row.response_code,
        policy=_policy(row.policy),
        execution_id=row.execution_id,
        step=row.step,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def enqueue(connection: Connection, deliveries: Sequence[NewDelivery], now: float) -> list[int]:
    """Add deliveries at the tail of their lanes; return their ids, in order.

    On PostgreSQL each lane's ids are assigned under that lane's lock
    (``lock_lanes``), held until the commit: the ids of a lane are committed in
    increasing order, whichever node or connection enqueues, so a lane read
    ``id > after`` never misses a delivery committed after a later one.
    """
    if not deliveries:
        return []
    lock_lanes(connection, {item.lane for item in deliveries})
    # An action's deliveries share one policy mapping (see Executor.load).
    stored: dict[int, str] = {}
    for item in deliveries:
        if id(item.policy) not in stored:
            stored[id(item.policy)] = json.dumps(item.policy, sort_keys=True)
    return insert_with_ids(
        connection,
        schema.deliveries,
        _ENQUEUE,
        [
            {
                "execution_id": item.execution_id,
                "step": item.step,
                "lane": item.lane,
                "destination": item.destination,
                "protocol": item.protocol,
                "control_id": item.control_id,
                "payload": item.payload,
                "state": QUEUED,
                "attempts": 0,
                "next_attempt_at": 0.0,
                "last_error": "",
                "response": None,
                "response_code": "",
                "policy": stored[id(item.policy)],
                "created_at": now,
                "updated_at": now,
                "lease_owner": "",
            }
            for item in deliveries
        ],
    )


#: The advisory lock class of lanes ("udsl"): ``pg_advisory_xact_lock(LANE_LOCK, key)``.
LANE_LOCK = 0x7564736C


def lane_lock_key(lane: str) -> int:
    """The lane's advisory lock key: its CRC-32 as a signed 32-bit integer."""
    key = zlib.crc32(lane.encode("utf-8"))
    return key - (1 << 32) if key >= 1 << 31 else key


def lock_lanes(connection: Connection, lanes: Iterable[str]) -> None:
    """PostgreSQL: take each lane's transaction-level advisory lock, in key order (two
    transactions locking overlapping lanes cannot deadlock). A no-op on SQLite,
    whose writers take turns for the whole database anyway."""
    if connection.dialect.name != "postgresql":
        return
    keys = sorted({lane_lock_key(lane) for lane in lanes})
    if keys:
        connection.exec_driver_sql(
            "SELECT count(pg_advisory_xact_lock(%(class)s, s.k))"
            " FROM (SELECT k FROM unnest(CAST(%(keys)s AS integer[])) AS k ORDER BY k) AS s",
            {"class": LANE_LOCK, "keys": keys},
        )


_ENQUEUE = prepared_insert(
    schema.deliveries,
    (
        "execution_id",
        "step",
        "lane",
        "destination",
        "protocol",
        "control_id",
        "payload",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
        "response",
        "response_code",
        "policy",
        "created_at",
        "updated_at",
        "lease_owner",
    ),
)


def held_of(connection: Connection, execution_ids: Sequence[int]) -> dict[int, str]:
    """The executions among these whose delivery is held, with its error."""
    if not execution_ids:
        return {}
    d = schema.deliveries
    rows = connection.execute(
        select(d.c.execution_id, d.c.last_error).where(
            d.c.execution_id.in_(sorted(set(execution_ids))), d.c.state == HELD
        )
    )
    return {int(execution_id): str(error) for execution_id, error in rows}


def lanes_with_work(connection: Connection) -> list[LaneWork]:
    """Every lane with open deliveries, oldest work first (recovery order)."""
    d = schema.deliveries
    rows = connection.execute(
        select(
            d.c.lane,
            func.min(d.c.destination),
            func.min(d.c.protocol),
            func.min(d.c.id),
            func.count(),
        )
        .where(d.c.state.in_(OPEN_STATES))
        .group_by(d.c.lane)
        .order_by(func.min(d.c.id))
    )
    return [LaneWork(lane, dest, proto, first, count) for lane, dest, proto, first, count in rows]


def _lane_page_statement() -> Any:
    d = schema.deliveries
    return (
        select(d)
        .where(
            d.c.lane == bindparam("lane"),
            d.c.state.in_([bindparam("queued"), bindparam("held")]),
            d.c.id > bindparam("after_id"),
        )
        .order_by(d.c.id)
        .limit(bindparam("limit"))
    )


_LANE_PAGE = Prepared(_lane_page_statement)
_COLUMNS = tuple(column.name for column in schema.deliveries.columns)


def lane_page(connection: Connection, lane: str, after_id: int, limit: int) -> list[Delivery]:
    """The next open deliveries of a lane after ``after_id``, in order."""
    rows = _LANE_PAGE.execute(
        connection,
        [{"lane": lane, "queued": QUEUED, "held": HELD, "after_id": after_id, "limit": limit}],
    )
    return [_delivery(_Row(dict(zip(_COLUMNS, row, strict=True)))) for row in rows]


class _Row:
    """Attribute access to a raw row, as ``_delivery`` reads it."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


def attempts_of(connection: Connection, delivery_ids: Sequence[int]) -> dict[int, int]:
    """The stored attempt counts of open deliveries (a lane's retrying heads).

    An operator's release or replay resets the count to 0: a running lane whose head
    shows fewer attempts in the store than it made reads its lane again.
    """
    if not delivery_ids:
        return {}
    d = schema.deliveries
    rows = connection.execute(
        select(d.c.id, d.c.attempts).where(
            d.c.id.in_(list(delivery_ids)), d.c.state.in_(OPEN_STATES)
        )
    )
    return {delivery_id: attempts for delivery_id, attempts in rows}


def get_delivery(connection: Connection, delivery_id: int) -> Delivery | None:
    """One delivery by id."""
    row = connection.execute(
        select(schema.deliveries).where(schema.deliveries.c.id == delivery_id)
    ).first()
    return _delivery(row) if row is not None else None


def record(
    connection: Connection,
    settlements: Sequence[Settlement],
    now: float,
    after: Callable[[Connection, list[Settlement], Mapping[int, Origin]], After] | None = None,
) -> After | None:
    """Write the outcome of attempts; ``after`` sees the settled rows in the same transaction.

    ``after`` is how an execution advances atomically with its delivery (the
    next action is enqueued in the same commit that marks this one done). It
    gets the attempts' origins too, read once here for the log lines.
    """
    _RECORD.execute(
        connection,
        [
            {
                "delivery_id": item.delivery_id,
                "new_state": item.state,
                "attempts": item.attempts,
                "next_attempt_at": item.next_attempt_at,
                "last_error": item.last_error[:255],
                "response": item.response,
                "response_code": item.response_code,
                "updated_at": now,
                "skipped": SKIPPED,
                "previous_attempts": item.attempts - 1,
            }
            for item in settlements
        ],
    )
    found = origins(
        connection, [r.execution_id for r in settlements if r.execution_id is not None]
    )
    # Every attempt is logged, retries included; only settled ones move executions.
    _log_settled(connection, settlements, now, found)
    settled = [item for item in settlements if item.state != QUEUED]
    return after(connection, settled, found) if after is not None else None


def _record_statement() -> Any:
    d = schema.deliveries
    return (
        update(d)
        # An operator's skip, release or replay while an attempt was out stands (the
        # skip sets its state, the others reset its attempts): that outcome is dropped,
        # and the lane, finding the head changed, reads its lane again.
        .where(
            d.c.id == bindparam("delivery_id"),
            d.c.state != bindparam("skipped"),
            d.c.attempts == bindparam("previous_attempts"),
        )
        .values(
            state=bindparam("new_state"),
            attempts=bindparam("attempts"),
            next_attempt_at=bindparam("next_attempt_at"),
            last_error=bindparam("last_error"),
            response=bindparam("response"),
            response_code=bindparam("response_code"),
            updated_at=bindparam("updated_at"),
        )
    )


_RECORD = Prepared(_record_statement)


def _log_settled(
    connection: Connection, rows: Sequence[Settlement], now: float, origin: Mapping[int, Origin]
) -> None:
    lines = []
    for row in rows:
        found = origin.get(row.execution_id) if row.execution_id is not None else None
        lines.append(
            LogEntry(
                at=now,
                event="delivery",
                outcome="retry" if row.state == QUEUED else row.state,
                tenant=found.tenant if found else "",
                flow_id=found.flow_id if found else "",
                message_id=found.message_id if found else None,
                message_type=found.message_type if found else "",
                execution_id=row.execution_id,
                control_id=row.control_id,
                step=row.step,
                attempt=row.attempts,
                ack_code=row.response_code,
                reason=row.last_error,
            )
        )
    logs.insert_logs(connection, lines)


def queued_per_destination(connection: Connection) -> dict[str, int]:
    """Open deliveries per destination (the backpressure counters at start)."""
    d = schema.deliveries
    rows = connection.execute(
        select(d.c.destination, func.count())
        .where(d.c.state.in_(OPEN_STATES))
        .group_by(d.c.destination)
    )
    return {destination: count for destination, count in rows}


def list_deliveries(
    connection: Connection,
    states: Sequence[str] = (),
    lane: str | None = None,
    limit: int = 100,
) -> list[Delivery]:
    """Deliveries for operators, oldest first."""
    d = schema.deliveries
    query = select(d).order_by(d.c.id).limit(limit)
    if states:
        query = query.where(d.c.state.in_(states))
    if lane is not None:
        query = query.where(d.c.lane == lane)
    return [_delivery(row) for row in connection.execute(query)]


def responses_of(
    connection: Connection, execution_ids: Sequence[int]
) -> dict[int, dict[int, bytes | None]]:
    """The responses of the delivered actions of these executions: by execution, by step."""
    d = schema.deliveries
    responses: dict[int, dict[int, bytes | None]] = {}
    if execution_ids:
        for execution_id, step, response in connection.execute(
            select(d.c.execution_id, d.c.step, d.c.response).where(
                d.c.execution_id.in_(list(execution_ids)), d.c.state == DELIVERED
            )
        ):
            responses.setdefault(execution_id, {})[step] = response
    return responses


def requeue(
    connection: Connection,
    delivery_id: int,
    now: float,
    payload: bytes | None = None,
    control_id: str | None = None,
) -> None:
    """Queue a delivery again, at its place in its lane, with no attempts so far;
    with ``payload`` (and its MSH-10 ``control_id``) as the bytes to send."""
    d = schema.deliveries
    values: dict[str, Any] = {
        "updated_at": now,
        "last_error": "",
        "state": QUEUED,
        "attempts": 0,
        "next_attempt_at": 0.0,
    }
    if payload is not None:
        values["payload"] = payload
    if control_id is not None:
        values["control_id"] = control_id
    connection.execute(update(d).where(d.c.id == delivery_id).values(**values))


def skip(connection: Connection, delivery_id: int, who: str, now: float) -> None:
    """Give up on a delivery: its lane moves on."""
    d = schema.deliveries
    connection.execute(
        update(d)
        .where(d.c.id == delivery_id)
        .values(state=SKIPPED, last_error=f"skipped by {who}"[:255], updated_at=now)
    )


def delete_of_executions(connection: Connection, execution_ids: Iterable[int]) -> None:
    """Retention: delete the deliveries of these executions."""
    wanted = list(execution_ids)
    if wanted:
        d = schema.deliveries
        connection.execute(delete(d).where(d.c.execution_id.in_(wanted)))
