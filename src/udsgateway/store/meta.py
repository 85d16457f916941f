"""The SQL of the table ``meta``: the schema version, the flows' generation, the
search keys' marks and the count of gateway starts."""

from __future__ import annotations

from sqlalchemy import Connection, Integer, String, cast, select, update
from sqlalchemy.dialects import postgresql, sqlite

from udsgateway.store import schema


def _get(connection: Connection, key: str) -> str | None:
    row = connection.execute(select(schema.meta.c.value).where(schema.meta.c.key == key)).first()
    return None if row is None else str(row[0])


def _set(connection: Connection, key: str, value: str) -> None:
    meta = schema.meta
    if _get(connection, key) is None:
        connection.execute(meta.insert().values(key=key, value=value))
    else:
        connection.execute(update(meta).where(meta.c.key == key).values(value=value))


def schema_version(connection: Connection) -> int | None:
    """The version of the schema the database holds; None for a new database."""
    value = _get(connection, "schema_version")
    return None if value is None else int(value)


def set_schema_version(connection: Connection, version: int) -> None:
    """Record the schema's version (after creating or migrating it)."""
    _set(connection, "schema_version", str(version))


def flows_generation(connection: Connection) -> int:
    """A counter that grows each time any flow changes."""
    value = _get(connection, "flows_generation")
    return int(value) if value else 0


def bump_generation(connection: Connection) -> None:
    """Note that flows changed, so running nodes reload their routing."""
    _set(connection, "flows_generation", str(flows_generation(connection) + 1))


def _keys_key(node: str) -> str:
    return f"keys_through:{node}"[:64]


def keys_through(connection: Connection, node: str) -> int | None:
    """The id up to which every message ``node`` stored has its search keys; None:
    never set (a store written before keys were written after the commit)."""
    value = _get(connection, _keys_key(node))
    return None if value is None else int(value)


def set_keys_through(connection: Connection, node: str, message_id: int) -> None:
    """Record that ``node``'s messages up to ``message_id`` have their search keys."""
    _set(connection, _keys_key(node), str(message_id))


def next_boot(connection: Connection) -> int:
    """Count one more start of a gateway on this database and return its number (1, 2...).

    One atomic upsert, so two nodes of a cluster starting at the same moment get
    two numbers (their outbound control ids' prefixes come from it).
    """
    meta = schema.meta
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    statement = (
        insert(meta)
        .values(key="boots", value="1")
        .on_conflict_do_update(
            index_elements=[meta.c.key],
            set_={"value": cast(cast(meta.c.value, Integer) + 1, String(255))},
        )
        .returning(meta.c.value)
    )
    return int(connection.execute(statement).scalar_one())
