"""The SQL of the table ``meta``: the schema version and the flows' generation."""

from __future__ import annotations

from sqlalchemy import Connection, select, update

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
