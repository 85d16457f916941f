"""Retention: delete finished messages with everything recorded about them.

No SQL of its own: each table's statements are in that table's module.
"""

from __future__ import annotations

from sqlalchemy import Connection

from udsgateway.store import executions, logs, messages, outbox, search


def prune(connection: Connection, before: float, limit: int) -> int:
    """Delete up to ``limit`` finished messages older than ``before``, with their records.

    A message goes only when none of its executions is unfinished and none
    of its deliveries is still open, so retention never loses work (G1).
    Small batches keep each transaction short: traffic is never stalled.
    Log lines of no message older than ``before`` go too.
    """
    candidates = messages.finished_before(connection, before, limit)
    if candidates:
        execution_ids = executions.of_messages(connection, candidates)
        outbox.delete_of_executions(connection, execution_ids)
        executions.delete_executions(connection, execution_ids)
    logs.delete_logs(connection, candidates, before)
    search.delete_keys(connection, candidates)
    messages.delete_messages(connection, candidates)
    return len(candidates)
