"""The database schema: every table, with a comment per column, and its version.

SQLAlchemy Core only and dialect-neutral, so the same schema serves the
embedded SQLite default and a PostgreSQL shared by several nodes. Bump
SCHEMA_VERSION and add a step to MIGRATIONS for every change.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
)

SCHEMA_VERSION = 5

metadata = MetaData()

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (autoincrementing).
Id = BigInteger().with_variant(Integer(), "sqlite")

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True, comment="setting name, e.g. schema_version"),
    Column("value", String(255), nullable=False, comment="its value, as text"),
)

apps = Table(
    "apps",
    metadata,
    Column("app_id", String(32), primary_key=True, comment="App ID, generated when first saved"),
    Column("tenant", String(64), nullable=False, comment="owning tenant's name"),
    Column("name", String(255), nullable=False, comment="unique name within the tenant"),
    Column("description", Text, nullable=False, default="", comment="free text"),
    Column("variables", Text, nullable=False, default="{}", comment="app-wide variables, JSON"),
    Column("updated_at", Float, nullable=False, comment="last import, epoch seconds"),
    Index("apps_tenant_name", "tenant", "name", unique=True),
)

flows = Table(
    "flows",
    metadata,
    Column("flow_id", String(32), primary_key=True, comment="Flow ID, generated when saved"),
    Column("app_id", String(32), ForeignKey("apps.app_id"), nullable=False, comment="its app"),
    Column("tenant", String(64), nullable=False, comment="owning tenant (denormalised)"),
    Column("name", String(255), nullable=False, comment="unique name within the app"),
    Column("position", Integer, nullable=False, comment="order of the flow in its app file"),
    Column("enabled", Boolean, nullable=False, comment="disabled flows receive nothing"),
    Column("connection", String(8), nullable=False, comment="trigger framing: mllp or tcp"),
    Column("message_type", String(32), nullable=False, comment="trigger MSH-9, e.g. ADT^A04"),
    Column("ack", String(16), nullable=False, comment="ACK timing: on_commit, after_actions"),
    Column("ack_timeout", Float, nullable=False, comment="after_actions: seconds to wait"),
    Column("sample", Text, nullable=False, comment="sample payload (variable catalogue)"),
    Column("actions", Text, nullable=False, default="[]", comment="ordered actions, JSON"),
    Column("extra", Text, nullable=False, default="{}", comment="other flow settings, JSON"),
    Index("flows_app", "app_id"),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="arrival order"),
    Column("tenant", String(64), nullable=False, comment="tenant whose listener received it"),
    Column("sender", String(255), nullable=False, comment="MSH-3 and MSH-4, the sender key"),
    Column("control_id", String(199), nullable=False, comment="MSH-10"),
    Column("message_type", String(32), nullable=False, comment="MSH-9 code^event"),
    Column("peer", String(64), nullable=False, comment="peer address the bytes came from"),
    Column("connection", String(8), nullable=False, comment="framing it came in: mllp or tcp"),
    Column("received_at", Float, nullable=False, comment="epoch seconds"),
    Column("size", Integer, nullable=False, comment="bytes of the frame"),
    Column("digest", String(64), nullable=False, comment="SHA-256 of the raw bytes (G3)"),
    Column("raw", LargeBinary, nullable=False, comment="the message exactly as received"),
    Column("accepted", Boolean, nullable=False, comment="routed to flows (else rejected)"),
    Column("flows", Text, nullable=False, comment="Flow IDs it was routed to, JSON"),
    Column("reason", String(255), nullable=False, comment="rejection reason, no PHI"),
    Column(
        "ack_code",
        String(2),
        nullable=False,
        comment="MSA-1 we answered; empty while an after-actions ACK waits for its actions",
    ),
    Column("ack", LargeBinary, nullable=False, comment="the ACK we sent, replayed on resend"),
    Index("messages_received", "received_at"),
)

# G3: one accepted message per sender and control ID. The index is partial so
# that a rejected message can be corrected and sent again under the same MSH-10.
# It also serves the duplicate check, which looks a group's control IDs up among
# accepted messages: control_id leads.
Index(
    "messages_dedupe",
    messages.c.control_id,
    messages.c.tenant,
    messages.c.sender,
    unique=True,
    sqlite_where=messages.c.accepted.is_(True),
    postgresql_where=messages.c.accepted.is_(True),
)

executions = Table(
    "executions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="creation order"),
    Column("message_id", Id, ForeignKey("messages.id"), nullable=False, comment="trigger"),
    Column("flow_id", String(32), nullable=False, comment="the flow run"),
    Column("state", String(16), nullable=False, comment="pending, waiting, done, failed"),
    Column("step", Integer, nullable=False, default=0, comment="index of the current action"),
    Column("created_at", Float, nullable=False, comment="epoch seconds"),
    Column("updated_at", Float, nullable=False, comment="epoch seconds"),
    Column("error", String(255), nullable=False, default="", comment="failure reason, no PHI"),
    Index("executions_state", "state", "id"),
    Index("executions_message", "message_id"),
    # The operators' status counts executions by flow and state from this index alone.
    Index("executions_flow", "flow_id", "state"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="enqueue order (G2)"),
    Column("execution_id", Id, nullable=True, comment="execution that produced it"),
    Column("step", Integer, nullable=False, default=0, comment="action index in the flow"),
    Column("lane", String(255), nullable=False, comment="ordering unit: destination[+key]"),
    Column("destination", String(255), nullable=False, comment="client endpoint string"),
    Column("protocol", String(8), nullable=False, comment="mllp or tcp"),
    Column("control_id", String(199), nullable=False, comment="MSH-10 of the payload"),
    Column("payload", LargeBinary, nullable=False, comment="bytes to send"),
    Column("state", String(16), nullable=False, comment="queued, held, delivered, failed..."),
    Column("attempts", Integer, nullable=False, default=0, comment="sends so far"),
    Column("next_attempt_at", Float, nullable=False, default=0.0, comment="epoch seconds"),
    Column("last_error", String(255), nullable=False, default="", comment="no PHI"),
    Column("response", LargeBinary, nullable=True, comment="the destination's reply"),
    Column("response_code", String(2), nullable=False, default="", comment="its MSA-1"),
    Column("policy", Text, nullable=False, default="{}", comment="response policy, JSON"),
    Column("created_at", Float, nullable=False, comment="epoch seconds"),
    Column("updated_at", Float, nullable=False, comment="epoch seconds"),
    Column("lease_owner", String(64), nullable=False, default="", comment="node (multi-node)"),
    Index("deliveries_lane", "lane", "state", "id"),
    # Recovery, the sweep and the backpressure counters look at open rows only.
    Index("deliveries_open", "state", "lane", "destination"),
    Index("deliveries_execution", "execution_id"),
)

logs = Table(
    "logs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="order written"),
    Column("at", Float, nullable=False, comment="epoch seconds"),
    Column("tenant", String(64), nullable=False, default="", comment="tenant"),
    Column("app_id", String(32), nullable=False, default="", comment="App ID"),
    Column("flow_id", String(32), nullable=False, default="", comment="Flow ID"),
    Column("message_id", Id, nullable=True, comment="inbound message"),
    Column("execution_id", Id, nullable=True, comment="execution"),
    Column("control_id", String(199), nullable=False, default="", comment="MSH-10"),
    Column("message_type", String(32), nullable=False, default="", comment="MSH-9"),
    Column("step", Integer, nullable=True, comment="action index"),
    Column("attempt", Integer, nullable=True, comment="delivery attempt"),
    Column("event", String(32), nullable=False, comment="what happened, e.g. received"),
    Column("outcome", String(16), nullable=False, default="", comment="ok, failed, held..."),
    Column("ack_code", String(2), nullable=False, default="", comment="ACK code involved"),
    Column("reason", String(255), nullable=False, default="", comment="why, never PHI"),
    Index("logs_at", "at"),
    Index("logs_flow", "flow_id", "id"),
    # The dashboard's charts: one event's lines since a time, per flow, from this index
    # alone (a range of it, not every line since then).
    Index("logs_event", "event", "at", "flow_id"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="order written"),
    Column("at", Float, nullable=False, comment="epoch seconds"),
    Column("who", String(128), nullable=False, comment="operator (user, token, key)"),
    Column("action", String(64), nullable=False, comment="what they did"),
    Column("target", String(255), nullable=False, comment="what it was done to; no content"),
    Column("reason", String(255), nullable=False, default="", comment="why they said"),
    Column(
        "result",
        String(255),
        nullable=False,
        default="ok",
        server_default="ok",
        comment="ok, or why it was refused (no content)",
    ),
    Column(
        "via",
        String(16),
        nullable=False,
        default="cli",
        server_default="cli",
        comment="where it was done: api, cli or manhole",
    ),
    Index("audit_at", "at"),
)

destination_pauses = Table(
    "destination_pauses",
    metadata,
    Column("destination", String(255), primary_key=True, comment="host:port paused"),
    Column("paused_by", String(128), nullable=False, comment="operator who paused it"),
    Column("paused_at", Float, nullable=False, comment="epoch seconds"),
    Column("reason", String(255), nullable=False, default="", comment="why they said"),
)

# Keys of stored messages, for the message search: one row per key and message
# (PID-3's first identifier, SCH-1, SCH-2, the type, tenant and flows; "status" for
# rejected ones), written in the inbound commit. The primary key is the search index.
message_keys = Table(
    "message_keys",
    metadata,
    Column("name", String(16), primary_key=True, comment="pid3, sch1, sch2, msh9, flow..."),
    Column("value", String(199), primary_key=True, comment="the key's value"),
    Column("message_id", Id, primary_key=True, comment="messages.id"),
    sqlite_with_rowid=False,
)

# The admin service's users and API tokens. New tables need no migration step:
# ensure_schema's create_all makes them on an older database too.
users = Table(
    "users",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="creation order"),
    Column("name", String(64), nullable=False, unique=True, comment="login name"),
    Column("password_hash", String(255), nullable=False, comment="scrypt, never the password"),
    Column("role", String(16), nullable=False, comment="viewer, operator or admin"),
    Column("view_content", Boolean, nullable=False, comment="may view message content"),
    Column("disabled", Boolean, nullable=False, comment="disabled users cannot log in"),
    Column("created_at", Float, nullable=False, comment="epoch seconds"),
    Column("updated_at", Float, nullable=False, comment="epoch seconds"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True, comment="creation order"),
    Column("user_id", Id, ForeignKey("users.id"), nullable=False, comment="whose token"),
    Column("label", String(64), nullable=False, default="", comment="what it is for"),
    Column("digest", String(64), nullable=False, unique=True, comment="SHA-256 of the token"),
    Column("prefix", String(16), nullable=False, comment="its first characters, to tell apart"),
    Column("created_at", Float, nullable=False, comment="epoch seconds"),
    Column("revoked_at", Float, nullable=True, comment="epoch seconds; NULL while usable"),
)

# Failed logins of the admin API and console, per user name and per client
# address (the lockout): in the database, so a restart does not forget them and
# every node of a cluster counts the same failures.
login_failures = Table(
    "login_failures",
    metadata,
    Column("kind", String(8), primary_key=True, comment="name or address"),
    Column("key", String(255), primary_key=True, comment="the user name or client address"),
    Column("failures", Integer, nullable=False, comment="failed logins in a row"),
    Column("locked_until", Float, nullable=False, comment="epoch seconds; 0: not locked"),
    Column("updated_at", Float, nullable=False, comment="last failure, epoch seconds"),
    Index("login_failures_updated", "updated_at"),
)


def index(table: Table, name: str) -> Index:
    """One of a table's indexes, by name."""
    return next(i for i in table.indexes if i.name == name)


def _v1_to_v2(connection: Connection) -> None:
    """The duplicate check's index leads with control_id; open deliveries get an index.

    (Version 2 also had a second, non-unique ``messages_lookup`` index on the same
    columns; version 3 dropped it, so it is not rebuilt here.)
    """
    connection.exec_driver_sql("DROP INDEX IF EXISTS messages_lookup")
    index(messages, "messages_dedupe").drop(connection, checkfirst=True)
    index(messages, "messages_dedupe").create(connection)
    index(deliveries, "deliveries_open").create(connection, checkfirst=True)


def _v2_to_v3(connection: Connection) -> None:
    """Drop ``messages_lookup``: the partial unique index serves the duplicate check,
    and every index on messages is pages written by every inbound commit."""
    connection.exec_driver_sql("DROP INDEX IF EXISTS messages_lookup")


def _v3_to_v4(connection: Connection) -> None:
    """The audit trail records the result and where an action was done (api, cli,
    manhole); ``destination_pauses`` and ``message_keys`` are new tables (made by
    ``create_all``). Messages stored before have no search keys."""
    present = {column["name"] for column in inspect(connection).get_columns("audit")}
    for name, size, default in (("result", 255, "ok"), ("via", 16, "cli")):
        if name in present:
            continue
        connection.exec_driver_sql(
            f"ALTER TABLE audit ADD COLUMN {name} VARCHAR({size}) NOT NULL DEFAULT '{default}'"
        )
    index(audit, "audit_at").create(connection, checkfirst=True)
    # The keys stored columns give (MSH-9, tenant, flows, rejected); PID-3 and SCH
    # need the message parsed: older messages are not found by those.
    connection.exec_driver_sql(
        "INSERT INTO message_keys (name, value, message_id)"
        " SELECT DISTINCT 'msh9', message_type, id FROM messages"
        " UNION SELECT DISTINCT 'tenant', tenant, id FROM messages"
        " UNION SELECT DISTINCT 'status', 'rejected', id FROM messages WHERE NOT accepted"
        " UNION SELECT DISTINCT 'msh10', control_id, id FROM messages WHERE NOT accepted"
    )
    routed = connection.execute(
        select(messages.c.id, messages.c.flows).where(messages.c.flows != "[]")
    ).all()
    rows = [
        {"name": "flow", "value": flow_id, "message_id": message_id}
        for message_id, flows_json in routed
        for flow_id in dict.fromkeys(json.loads(flows_json))
    ]
    if rows:
        connection.execute(message_keys.insert(), rows)


#: The indexes version 5 added: the operators' status and the dashboard read them alone.
#: (Deliveries have none: an index by destination, state and attempts, rewritten at every
#: outcome, cost the relay about 12 % more CPU per message; bench/status.py, cpuab.)
STATUS_INDEXES = (
    (executions, "executions_flow"),
    (logs, "logs_event"),
)


def _v4_to_v5(connection: Connection) -> None:
    """Indexes for the operators' status and the dashboard: executions by flow and state,
    log lines by event and time. Built once, in the transaction that opens the database
    (a second or two per million rows)."""
    for table, name in STATUS_INDEXES:
        index(table, name).create(connection, checkfirst=True)


#: Steps from version N to N+1, each run in the transaction that opens the database.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
    4: _v4_to_v5,
}
