"""Operators' actions on stuck work: release, skip or replay a delivery; release a
held execution. Each is recorded in the execution log (with the state the row
was in) and in the audit log with who and why, never content.

No SQL of its own (each table's statements are in that table's module), and
no HL7: a caller that sends new bytes parses them and passes their MSH-10.
"""

from __future__ import annotations

from sqlalchemy import Connection

from udsgateway.store import audit, executions, logs, outbox
from udsgateway.store.records import (
    HELD_EXECUTION,
    OPEN_STATES,
    Delivery,
    ExecutionRow,
    LogEntry,
)

#: What an operator can do to a delivery.
DELIVERY_ACTIONS = ("release", "skip", "replay")


def needs_control_id(current: Delivery, action: str, payload: bytes | None) -> bool:
    """Whether ``delivery_action`` needs the MSH-10 of the bytes it will send: an
    edited payload, or a delivery stored without one (by an older version)."""
    return action in ("release", "replay") and (payload is not None or not current.control_id)


def delivery_action(
    connection: Connection,
    delivery_id: int,
    action: str,
    who: str,
    reason: str,
    now: float,
    payload: bytes | None = None,
    control_id: str | None = None,
    via: str = "cli",
) -> Delivery:
    """Release (send again now), skip, or replay (optionally with an edited payload)
    a delivery that is stuck: held, or queued and retrying (its head keeps failing).

    Release and skip work on held and queued deliveries; replay on any (a delivered
    or skipped one goes back to its place in its lane: before everything queued
    after it). A delivery is never left queued without a control ID: when
    ``needs_control_id`` says so, ``control_id`` must be the MSH-10 of the bytes to
    send (``payload``, else the stored ones), read by the caller.
    """
    current = outbox.get_delivery(connection, delivery_id)
    if current is None:
        raise LookupError(f"no delivery {delivery_id}")
    if action not in DELIVERY_ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if action in ("release", "skip") and current.state not in OPEN_STATES:
        raise ValueError(f"delivery {delivery_id} is {current.state}, not held or queued")
    if action == "skip":
        outbox.skip(connection, delivery_id, who, now)
        if current.execution_id is not None:
            # The chain cannot go on without this action's response.
            executions.fail_waiting(
                connection,
                current.execution_id,
                f"step {current.step} skipped by an operator",
                now,
            )
    elif needs_control_id(current, action, payload):
        if not control_id:
            raise ValueError(f"the message of delivery {delivery_id} has no MSH-10")
        # The destination's ACK must echo the MSH-10 that is actually sent.
        sent = payload if payload is not None else current.payload
        outbox.requeue(connection, delivery_id, now, sent, control_id)
    else:
        outbox.requeue(connection, delivery_id, now)
    logs.insert_logs(
        connection,
        [
            LogEntry(
                at=now,
                event="operator",
                outcome=action,
                execution_id=current.execution_id,
                control_id=current.control_id,
                step=current.step,
                reason=f"{action} of a {current.state} delivery by {who}: {reason}",
            )
        ],
    )
    audit.append(
        connection,
        who,
        f"delivery.{action}",
        f"delivery {delivery_id} lane {current.lane}",
        now,
        reason,
        via=via,
    )
    updated = outbox.get_delivery(connection, delivery_id)
    assert updated is not None
    return updated


def release_execution(
    connection: Connection,
    execution_id: int,
    who: str,
    reason: str,
    now: float,
    via: str = "cli",
) -> ExecutionRow:
    """Make a held execution pending again: the executor renders its action anew
    (with the flow as it is now). Audited with who and why, never content."""
    found = executions.state_of(connection, execution_id)
    if found is None:
        raise LookupError(f"no execution {execution_id}")
    if found != HELD_EXECUTION:
        raise ValueError(f"execution {execution_id} is {found}, not held")
    executions.release_held(connection, execution_id, f"release by {who}: {reason}", now)
    audit.append(
        connection, who, "execution.release", f"execution {execution_id}", now, reason, via=via
    )
    (row,) = executions.list_executions(connection, execution_id=execution_id)
    return row
