"""The SQL of the audit trail (table ``audit``): who did what to which object, when, why.

Append-only: rows are inserted and read, never updated or deleted (retention
does not prune them). A row names its object (``delivery 12``, ``execution
40``) and never holds message content.
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from udsgateway.store import schema
from udsgateway.store.records import AuditEntry


def append(
    connection: Connection, who: str, action: str, target: str, now: float, reason: str = ""
) -> None:
    """Append one row. Long texts are cut to their column's size."""
    connection.execute(
        schema.audit.insert().values(
            at=now, who=who[:128], action=action[:64], target=target[:255], reason=reason[:255]
        )
    )


def entries(connection: Connection, limit: int = 100) -> list[AuditEntry]:
    """The newest ``limit`` rows, newest first."""
    a = schema.audit
    query = (
        select(a.c.id, a.c.at, a.c.who, a.c.action, a.c.target, a.c.reason)
        .order_by(a.c.id.desc())
        .limit(max(1, limit))
    )
    return [AuditEntry(*row) for row in connection.execute(query)]
