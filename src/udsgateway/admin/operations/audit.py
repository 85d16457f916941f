"""The audit trail: reading it, and a row for what happened outside the facade."""

from __future__ import annotations

from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, fail

from udsgateway.admin.operations.core import VIA, Core, Invalid, OperationsError, iso
from udsgateway.store import audit


class AuditOps(Core):
    """``audit_trail`` and ``note``."""

    __slots__ = ()

    def audit_trail(
        self, actor: str, via: str, query: audit.AuditQuery | None = None
    ) -> Deferred[dict[str, Any]]:
        """The audit trail matching ``query`` (None: all of it), newest first, at most
        1,000 rows a page; ``next`` pages on (``before_id``)."""
        query = query or audit.AuditQuery()
        try:
            self._check(actor, via)
            for where in query.vias:
                if where not in VIA:
                    raise Invalid(f"via: expected one of {', '.join(VIA)}")
        except OperationsError:
            return fail()
        limit = max(1, min(query.limit, 1000))
        done: Deferred[Any] = self._read(audit.entries, evolve(query, limit=limit))
        done.addCallback(
            lambda rows: {
                "entries": [audit_view(row) for row in rows],
                "next": rows[-1].id if len(rows) == limit else None,
            }
        )
        return done

    def note(
        self, actor: str, via: str, action: str, target: str, reason: str = "", result: str = "ok"
    ) -> Deferred[int]:
        """Write one row of the audit trail for what happened outside the facade (a
        login, an export handed to a browser); its id."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        return self._run(audit.append, actor, action, target, self.wall(), reason, result, via)


def audit_view(row: audit.AuditEntry) -> dict[str, Any]:
    """An audit row as plain data."""
    return {
        "id": row.id,
        "at": iso(row.at),
        "who": row.who,
        "action": row.action,
        "target": row.target,
        "reason": row.reason,
        "result": row.result,
        "via": row.via,
    }
