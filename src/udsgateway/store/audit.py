"""The SQL of the audit trail: who did what to which object, when, why, with what result.

Append-only: rows are inserted, read, and never updated or deleted (retention
does not prune them). Every operator action and every view of message
content writes one row, whether through the admin API, the command line or
the manhole (``via``). A row names its object (``delivery 12``, ``message
40``, ``destination host:port``) and never holds message content.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import field, frozen
from sqlalchemy import Connection, select

from udsgateway.store import schema
from udsgateway.store.records import AuditEntry

#: Where an action can be done.
VIA = ("api", "cli", "manhole")

__all__ = ["VIA", "AuditEntry", "AuditQuery", "append", "entries"]


def append(
    connection: Connection,
    who: str,
    action: str,
    target: str,
    now: float,
    reason: str = "",
    result: str = "ok",
    via: str = "cli",
) -> int:
    """Append one row; return its id. Long texts are cut to their column's size."""
    inserted = connection.execute(
        schema.audit.insert().values(
            at=now,
            who=who[:128],
            action=action[:64],
            target=target[:255],
            reason=reason[:255],
            result=result[:255],
            via=via[:16],
        )
    )
    key = inserted.inserted_primary_key
    return int(key[0]) if key is not None and key[0] is not None else 0


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@frozen
class AuditQuery:
    """A search of the audit trail; every filter is optional, all given ones must match.

    The one set of filters of ``udsgateway audit``, the admin API's ``/audit``, the
    console and the manhole (through ``Operations.audit_trail``)."""

    who: str | None = None
    #: A whole action (``delivery.skip``) or a family by its prefix with a dot
    #: (``delivery.``).
    action: str | None = None
    target: str | None = None  # the object, exactly (``message 12``)
    since: float | None = None  # at or after (epoch seconds)
    until: float | None = None  # before
    #: Where it was done (``VIA``): any of these; empty: anywhere.
    vias: tuple[str, ...] = field(default=(), converter=_strings)
    before_id: int | None = None  # keyset: rows older than this one
    limit: int = 100


def entries(connection: Connection, query: AuditQuery | None = None) -> list[AuditEntry]:
    """Rows matching ``query`` (None: every row, up to the default limit), newest first;
    ``before_id`` pages on (keyset: rows older than it)."""
    query = query or AuditQuery()
    a = schema.audit
    statement = select(a).order_by(a.c.id.desc()).limit(max(1, query.limit))
    if query.who is not None:
        statement = statement.where(a.c.who == query.who)
    if query.action is not None:
        if query.action.endswith("."):
            statement = statement.where(a.c.action.startswith(query.action, autoescape=True))
        else:
            statement = statement.where(a.c.action == query.action)
    if query.target is not None:
        statement = statement.where(a.c.target == query.target)
    if query.since is not None:
        statement = statement.where(a.c.at >= query.since)
    if query.until is not None:
        statement = statement.where(a.c.at < query.until)
    if query.before_id is not None:
        statement = statement.where(a.c.id < query.before_id)
    if query.vias:
        statement = statement.where(a.c.via.in_(list(query.vias)))
    return [
        AuditEntry(
            id=row.id,
            at=row.at,
            who=row.who,
            action=row.action,
            target=row.target,
            reason=row.reason,
            result=row.result,
            via=row.via,
        )
        for row in connection.execute(statement)
    ]
