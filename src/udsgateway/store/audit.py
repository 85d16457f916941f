"""The SQL of the audit trail: who did what to which object, when, why, with what result.

Append-only: rows are inserted, read, and never updated or deleted (retention
does not prune them). Every operator action and every view of message
content writes one row, whether through the admin API, the command line or
the manhole (``via``). A row names its object (``delivery 12``, ``message
40``, ``destination host:port``) and never holds message content.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Connection, select

from udsgateway.store import schema
from udsgateway.store.records import AuditEntry

#: Where an action can be done.
VIA = ("api", "cli", "manhole")

__all__ = ["VIA", "AuditEntry", "append", "entries"]


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


def entries(
    connection: Connection,
    who: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: float | None = None,
    until: float | None = None,
    before_id: int | None = None,
    limit: int = 100,
    vias: Sequence[str] = (),
) -> list[AuditEntry]:
    """Rows newest first, filtered; ``before_id`` pages on (keyset: rows older than it).

    ``action`` matches a whole action (``delivery.skip``) or a family by its prefix
    with a dot (``delivery.``); ``target`` matches the object exactly.
    """
    a = schema.audit
    query = select(a).order_by(a.c.id.desc()).limit(max(1, limit))
    if who is not None:
        query = query.where(a.c.who == who)
    if action is not None:
        if action.endswith("."):
            query = query.where(a.c.action.startswith(action, autoescape=True))
        else:
            query = query.where(a.c.action == action)
    if target is not None:
        query = query.where(a.c.target == target)
    if since is not None:
        query = query.where(a.c.at >= since)
    if until is not None:
        query = query.where(a.c.at < until)
    if before_id is not None:
        query = query.where(a.c.id < before_id)
    if vias:
        query = query.where(a.c.via.in_(list(vias)))
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
        for row in connection.execute(query)
    ]
