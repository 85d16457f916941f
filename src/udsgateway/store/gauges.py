"""The metrics' database reads: open deliveries and executions, counted.

Read-only; the admin service's timer runs it in the database thread, never
during a scrape. It reads ``open`` rows only, through the indexes on state.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, func, select

from udsgateway.store import schema


def open_work(connection: Connection) -> dict[str, Any]:
    """Open deliveries and executions, counted in the database (the timer's query)."""
    d = schema.deliveries.c
    deliveries = [
        (row[0], row[1], int(row[2]), float(row[3] or 0.0))
        for row in connection.execute(
            select(
                d.destination,
                d.state,
                func.count().label("count"),
                func.min(d.created_at).label("oldest"),
            )
            .where(d.state.in_(("queued", "held")))
            .group_by(d.destination, d.state)
        )
    ]
    e = schema.executions.c
    executions = [
        (row[0], row[1], int(row[2]))
        for row in connection.execute(
            select(e.flow_id, e.state, func.count().label("count"))
            .where(e.state.in_(("pending", "waiting", "held")))
            .group_by(e.flow_id, e.state)
        )
    ]
    return {"deliveries": deliveries, "executions": executions, "at": time.time()}
