"""The SQL of the message browser: search keys written at commit, the search, the detail.

(A message's log lines, its timeline, are read by ``logs.log_lines``: the one
query of the execution log.)

The inbound commit writes a few HL7 keys of each stored message into
``message_keys`` (one multi-row insert per group): the first identifier of
PID-3 (``pid3``), SCH-1 and SCH-2 (``sch1``, ``sch2``),
the message type (``msh9``), each flow it was routed to (``flow``), its tenant
(``tenant``), and ``status=rejected`` for a rejected message. A search with a
key or a type, flow, tenant or rejected filter walks that table's primary key
for the most selective of them, newest first, and looks the others up by
primary key; the other filters (time range, status accepted) are checked on
the rows as they come, newest first by arrival (``id``). MSH-10 is looked up
in the duplicate check's index for accepted messages (a key row per message in
an index ordered by a random value costs a page written per commit, and that
index exists already), and is a key row for rejected ones only. A time range is
turned into a range of ids first (two probes of the ``received_at`` index),
so no search sorts.

Results are pages of at most ``limit`` rows; the next page starts below the
last id seen (keyset pagination: the cost of a page does not grow with its
depth).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from attrs import evolve, frozen
from sqlalchemy import Connection, delete, func, select

from udsgateway.store import schema
from udsgateway.store.engine import prepared_insert
from udsgateway.store.messages import SUMMARY_COLUMNS, summary_of
from udsgateway.store.records import InboundRecord, MessageSummary

#: Search keys, and what an operator calls them. MSH-10 is not written as a key row:
#: the duplicate check's index has it (see ``search``).
KEYS = {"msh10": "MSH-10", "pid3": "PID-3", "sch1": "SCH-1", "sch2": "SCH-2"}
CONTROL_ID_KEY = "msh10"
#: Keys the search uses for its filters: the status (written for rejected messages
#: only), the message type (MSH-9 as stored) and each flow a message was routed to.
STATUS_KEY = "status"
TYPE_KEY = "msh9"
FLOW_KEY = "flow"
TENANT_KEY = "tenant"
STATUSES = ("accepted", "rejected")
MAX_VALUE = 199

_KEY_COLUMNS = ("name", "value", "message_id")
_INSERT_KEYS = prepared_insert(schema.message_keys, _KEY_COLUMNS)
#: Rows per multi-row INSERT of keys on SQLite at most (3 parameters each): a power of 2.
_CHUNK = 256


def insert_keys(
    connection: Connection,
    keys: Sequence[Sequence[tuple[str, str]]],
    ids: Sequence[int],
    *,
    again: bool = False,
) -> None:
    """Write the search keys of stored messages: ``keys[i]`` belongs to ``ids[i]``.

    Flat parameter lists, multi-row statements of up to ``_CHUNK`` rows (SQLite and
    PostgreSQL alike), no per-row dicts. ``again``: some of these keys may be there
    already (a catch-up after a crash, another node's): those are left alone.
    """
    flat: list[Any] = []
    for message_keys, message_id in zip(keys, ids, strict=True):
        for name, value in dict.fromkeys(message_keys):
            if value:
                flat += (name, value[:MAX_VALUE], message_id)
    if not flat:
        return
    sqlite = connection.dialect.name == "sqlite"
    cursor = connection.connection.cursor()
    try:
        start, left = 0, len(flat) // 3
        while left:
            # Chunks of a power of two rows: a handful of statements, each prepared
            # once and kept in the driver's statement cache (a statement per size
            # would crowd the inbound commit's own statements out of it).
            size = min(_CHUNK, 1 << (left.bit_length() - 1))
            if sqlite:
                sql, columns = _INSERT_KEYS._multi_sql(connection, size)
                assert columns == _KEY_COLUMNS
                if again:
                    sql = sql.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)
            else:
                sql = _INSERT_KEYS._pg_sql(connection, size)
                if again:
                    sql += " ON CONFLICT DO NOTHING"
            cursor.execute(sql, flat[start : start + size * 3])
            start += size * 3
            left -= size
    finally:
        cursor.close()


def prepare_key_inserts(connection: Connection) -> None:
    """Compile ``insert_keys``' SQLite statements of every chunk size now (at start):
    the first compile of the larger ones takes tens of milliseconds of the database
    thread, which the inbound commits queued behind it would otherwise wait for."""
    if connection.dialect.name == "sqlite":
        size = 1
        while size <= _CHUNK:
            _INSERT_KEYS._multi_sql(connection, size)
            size *= 2


def keys_of(record: InboundRecord) -> tuple[tuple[str, str], ...]:
    """The search keys of a message about to be stored."""
    return keys_from(
        record.tenant,
        record.message_type,
        record.flows,
        record.accepted,
        record.control_id,
        record.keys,
    )


def keys_from(
    tenant: str,
    message_type: str,
    flows: Sequence[str],
    accepted: bool,
    control_id: str,
    hl7_keys: Sequence[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    """The search keys of a message from its stored columns and its HL7 keys
    (``hl7.keys.search_keys``: PID-3, SCH-1, SCH-2)."""
    keys = (
        (TYPE_KEY, message_type),
        (TENANT_KEY, tenant),
        *((FLOW_KEY, flow_id) for flow_id in flows),
        *hl7_keys,
    )
    if accepted:
        return keys
    # Rejected messages are not in the duplicate check's index: their MSH-10 is a key.
    return (*keys, (STATUS_KEY, "rejected"), (CONTROL_ID_KEY, control_id))


@frozen
class Unkeyed:
    """A stored message whose search keys a catch-up writes (after a crash)."""

    id: int
    tenant: str
    message_type: str
    flows: tuple[str, ...]
    accepted: bool
    control_id: str
    raw: bytes


def stored_after(connection: Connection, after_id: int, limit: int) -> list[Unkeyed]:
    """Messages with an id above ``after_id``, oldest first, at most ``limit``."""
    m = schema.messages.c
    rows = connection.execute(
        select(m.id, m.tenant, m.message_type, m.flows, m.accepted, m.control_id, m.raw)
        .where(m.id > after_id)
        .order_by(m.id)
        .limit(limit)
    )
    return [
        Unkeyed(
            row.id,
            row.tenant,
            row.message_type,
            tuple(json.loads(row.flows)),
            bool(row.accepted),
            row.control_id,
            bytes(row.raw),
        )
        for row in rows
    ]


def last_message_id(connection: Connection) -> int:
    """The id of the newest stored message (0: none)."""
    return int(connection.execute(select(func.max(schema.messages.c.id))).scalar() or 0)


def delete_keys(connection: Connection, message_ids: Sequence[int]) -> None:
    """Forget the keys of messages retention deletes."""
    if message_ids:
        k = schema.message_keys
        connection.execute(delete(k).where(k.c.message_id.in_(list(message_ids))))


@frozen
class Query:
    """A message search; every filter is optional, all given ones must match."""

    tenant: str | None = None
    message_type: str | None = None
    status: str | None = None  # accepted or rejected
    since: float | None = None  # received at or after (epoch seconds)
    until: float | None = None  # received before
    flow_id: str | None = None
    #: HL7 keys: name (a KEYS key) -> value, exact.
    keys: tuple[tuple[str, str], ...] = ()
    before_id: int | None = None  # keyset: messages older than this one
    limit: int = 50


def id_range(
    connection: Connection, since: float | None, until: float | None
) -> tuple[int, int] | None:
    """The ids of the first and last message received in [since, until); None: none."""
    m = schema.messages
    low_query = select(m.c.id).order_by(m.c.received_at, m.c.id).limit(1)
    high_query = select(m.c.id).order_by(m.c.received_at.desc(), m.c.id.desc()).limit(1)
    if since is not None:
        low_query = low_query.where(m.c.received_at >= since)
        high_query = high_query.where(m.c.received_at >= since)
    if until is not None:
        low_query = low_query.where(m.c.received_at < until)
        high_query = high_query.where(m.c.received_at < until)
    low = connection.execute(low_query).scalar()
    high = connection.execute(high_query).scalar()
    if low is None or high is None:
        return None
    return (min(low, high), max(low, high))


def search(connection: Connection, query: Query) -> list[MessageSummary]:
    """Messages matching ``query``, newest first, at most ``query.limit`` of them.

    MSH-10 has no key row: it is looked up in the duplicate check's index
    (``messages_dedupe``, accepted messages) and among the rejected messages.
    """
    control_ids = [value for name, value in query.keys if name == CONTROL_ID_KEY]
    if control_ids and query.status is None:
        # Accepted ones through the duplicate check's index, rejected ones through the
        # status key: two pages, merged newest first.
        found = _search(connection, evolve(query, status="accepted"))
        found += _search(connection, evolve(query, status="rejected"))
        found.sort(key=lambda row: row.id, reverse=True)
        return found[: max(1, min(query.limit, 1000))]
    return _search(connection, query)


def _search(connection: Connection, query: Query) -> list[MessageSummary]:
    bounds: tuple[int, int] | None = None
    if query.since is not None or query.until is not None:
        bounds = id_range(connection, query.since, query.until)
        if bounds is None:
            return []
    return [summary_of(row) for row in connection.execute(_statement(query, bounds))]


def _statement(query: Query, bounds: tuple[int, int] | None = None) -> Any:
    """The SELECT of one search; ``bounds``: the ids of its time range."""
    m, k = schema.messages, schema.message_keys
    statement = select(*SUMMARY_COLUMNS).limit(max(1, min(query.limit, 1000)))
    if bounds is not None:
        statement = statement.where(m.c.id.between(*bounds))
        if query.since is not None:
            statement = statement.where(m.c.received_at >= query.since)
        if query.until is not None:
            statement = statement.where(m.c.received_at < query.until)
    # The first key walks its index and the others are looked up: the most selective
    # first (an HL7 key, then the rejected ones, then a flow, then a message type).
    # MSH-10: a key row for rejected messages only; accepted ones through the duplicate
    # check's index (a condition on the column).
    rejected = query.status == "rejected"
    keys = [(n, v) for n, v in query.keys if n != CONTROL_ID_KEY or rejected]
    for name, value in query.keys:
        if name == CONTROL_ID_KEY:
            statement = statement.where(m.c.control_id == value)
    if query.status == "rejected":
        keys.append((STATUS_KEY, "rejected"))
    if query.flow_id is not None:
        keys.append((FLOW_KEY, query.flow_id))
    if query.message_type is not None:
        keys.append((TYPE_KEY, query.message_type))
    if query.tenant is not None:
        keys.append((TENANT_KEY, query.tenant))
    if query.status == "accepted":
        statement = statement.where(m.c.accepted.is_(True))
    elif query.status not in (None, "rejected"):
        raise ValueError(f"status: expected one of {', '.join(STATUSES)}")
    order = m.c.id.desc()
    for index, (name, value) in enumerate(keys):
        if name not in KEYS and name not in (STATUS_KEY, TYPE_KEY, FLOW_KEY, TENANT_KEY):
            raise ValueError(f"unknown search key {name!r} (one of: {', '.join(KEYS)})")
        alias = k.alias(f"k{index}")
        statement = statement.join(alias, alias.c.message_id == m.c.id).where(
            alias.c.name == name, alias.c.value == value[:MAX_VALUE]
        )
        if index == 0:
            # The first key's index walks newest first: no sort.
            order = alias.c.message_id.desc()
            if query.before_id is not None:
                statement = statement.where(alias.c.message_id < query.before_id)
            if bounds is not None:
                statement = statement.where(alias.c.message_id.between(*bounds))
    if query.before_id is not None:
        statement = statement.where(m.c.id < query.before_id)
    return statement.order_by(order)


def count(connection: Connection, query: Query) -> int:
    """How many messages match ``query`` (paging ignored): what a replay would touch."""
    ids = matching_ids(connection, query, None)
    return len(ids)


def matching_ids(connection: Connection, query: Query, limit: int | None) -> list[int]:
    """The ids of every message matching ``query`` (from ``before_id`` down), oldest
    first; at most the newest ``limit`` of them."""
    found: list[int] = []
    page = evolve(query, limit=1000)
    while True:
        rows = search(connection, page)
        found.extend(row.id for row in rows)
        if len(rows) < 1000 or (limit is not None and len(found) >= limit):
            break
        page = evolve(page, before_id=rows[-1].id)
    if limit is not None:
        found = found[:limit]
    found.reverse()
    return found


@frozen
class Attempted:
    """A delivery of a message, for its detail view (no payload, no response)."""

    id: int
    execution_id: int | None
    step: int
    lane: str
    destination: str
    protocol: str
    control_id: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str
    response_code: str
    created_at: float
    updated_at: float


@frozen
class ExecutionSummary:
    """An execution of a message, for its detail view."""

    id: int
    flow_id: str
    state: str
    step: int
    created_at: float
    updated_at: float
    error: str


@frozen
class MessageDetail:
    """A message's metadata, the ACK sent (code only), its executions and deliveries
    (its log lines, the attempts among them, are ``logs.log_lines(message_id=...)``)."""

    message: MessageSummary
    executions: tuple[ExecutionSummary, ...]
    deliveries: tuple[Attempted, ...]


def detail(connection: Connection, message_id: int) -> MessageDetail | None:
    """Everything about one message except its content and log; None when there is none."""
    m, e, d = schema.messages, schema.executions, schema.deliveries
    row = connection.execute(select(*SUMMARY_COLUMNS).where(m.c.id == message_id)).first()
    if row is None:
        return None
    runs = tuple(
        ExecutionSummary(*r)
        for r in connection.execute(
            select(e.c.id, e.c.flow_id, e.c.state, e.c.step, e.c.created_at)
            .add_columns(e.c.updated_at, e.c.error)
            .where(e.c.message_id == message_id)
            .order_by(e.c.id)
        )
    )
    sent: tuple[Attempted, ...] = ()
    if runs:
        sent = tuple(
            Attempted(*r)
            for r in connection.execute(
                select(
                    d.c.id,
                    d.c.execution_id,
                    d.c.step,
                    d.c.lane,
                    d.c.destination,
                    d.c.protocol,
                    d.c.control_id,
                )
                .add_columns(d.c.state, d.c.attempts, d.c.next_attempt_at, d.c.last_error)
                .add_columns(d.c.response_code, d.c.created_at, d.c.updated_at)
                .where(d.c.execution_id.in_([run.id for run in runs]))
                .order_by(d.c.id)
            )
        )
    return MessageDetail(summary_of(row), runs, sent)


def content(connection: Connection, message_id: int) -> tuple[bytes, bytes] | None:
    """A message's raw bytes and the ACK sent for it; None when there is none."""
    m = schema.messages
    row = connection.execute(select(m.c.raw, m.c.ack).where(m.c.id == message_id)).first()
    return (bytes(row[0]), bytes(row[1])) if row is not None else None


def delivery_content(
    connection: Connection, delivery_id: int
) -> tuple[int | None, bytes, bytes | None] | None:
    """A delivery's message id, rendered payload and the destination's response."""
    d, e = schema.deliveries, schema.executions
    row = connection.execute(
        select(e.c.message_id, d.c.payload, d.c.response)
        .select_from(d.outerjoin(e, e.c.id == d.c.execution_id))
        .where(d.c.id == delivery_id)
    ).first()
    if row is None:
        return None
    return (row[0], bytes(row[1]), bytes(row[2]) if row[2] is not None else None)


def flow_totals(connection: Connection) -> dict[str, int]:
    """How many stored messages (accepted or rejected) were routed to each flow: its
    key rows, counted on their index."""
    k = schema.message_keys
    return {
        str(value): int(count)
        for value, count in connection.execute(
            select(k.c.value, func.count()).where(k.c.name == FLOW_KEY).group_by(k.c.value)
        )
    }


def total(connection: Connection) -> int:
    """How many messages are stored."""
    return int(connection.execute(select(func.count()).select_from(schema.messages)).scalar() or 0)


def routed_flows(connection: Connection, message_ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
    """The flows each accepted message was routed to, by message id, in id order
    (rejected messages are left out)."""
    m = schema.messages
    found: dict[int, tuple[str, ...]] = {}
    wanted = sorted(set(message_ids))
    for start in range(0, len(wanted), 500):
        for message_id, flows in connection.execute(
            select(m.c.id, m.c.flows)
            .where(m.c.id.in_(wanted[start : start + 500]), m.c.accepted.is_(True))
            .order_by(m.c.id)
        ):
            found[message_id] = tuple(json.loads(flows))
    return found
