"""The SQL of executions: one run of one flow for one inbound message.

An execution is a durable state machine::

    pending(step n) --render, enqueue--> waiting(step n) --delivered--> pending(n+1) | done
         |       ^                             |
         |       +--operator release--+        +--held--> (stays waiting: the lane is blocked)
         |                            |
         +--cannot render-----------> held (the reason recorded; nothing enqueued)
         +--the flow is gone--> failed

An execution whose action cannot be rendered (a template error, a trigger the
template cannot handle) is held, never failed quietly: its message was
acknowledged, so an operator sees it (``executions list``), fixes the flow and
releases it (``executions release``), which renders it again.

Every transition commits in one transaction with what caused it: the
enqueue of the delivery, or the recording of the delivery's outcome. So a
kill -9 at any point resumes exactly where the store says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

from attrs import frozen
from sqlalchemy import Connection, bindparam, delete, select, tuple_, update

from udsgateway.store import logs, outbox, schema
from udsgateway.store.engine import Prepared, insert_with_ids, prepared_insert
from udsgateway.store.messages import origins
from udsgateway.store.records import (
    DELIVERED,
    DONE,
    FAILED,
    FINISHED,
    HELD,
    HELD_EXECUTION,
    PENDING,
    WAITING,
    Advanced,
    ExecutionRow,
    ExecutionState,
    Finished,
    InboundRecord,
    LogEntry,
    NewDelivery,
    Origin,
    PendingWork,
    Settlement,
    Transition,
)

__all__ = [
    "DONE",
    "FAILED",
    "FINISHED",
    "HELD_EXECUTION",
    "PENDING",
    "WAITING",
    "Advanced",
    "ExecutionRow",
    "ExecutionState",
    "Finished",
    "PendingWork",
    "Transition",
]


def pending(
    connection: Connection, limit: int, steps: Sequence[tuple[str, int]] | None = None
) -> list[PendingWork]:
    """The oldest pending executions, in creation (= arrival) order; with ``steps``,
    only those at these (Flow ID, step) pairs (a cluster node's own flow actions)."""
    found: Sequence[Any]
    if steps is None:
        found = _PENDING.execute(connection, [{"pending": PENDING, "limit": limit}])
    elif not steps:
        return []
    else:
        e = schema.executions
        found = connection.execute(
            _pending_statement().where(tuple_(e.c.flow_id, e.c.step).in_(sorted(set(steps)))),
            {"pending": PENDING, "limit": limit},
        ).all()
    rows = [_PendingRow(*row) for row in found]
    responses = outbox.responses_of(connection, [row.id for row in rows if row.step > 0])
    return [
        PendingWork(
            execution_id=row.id,
            message_id=row.message_id,
            flow_id=row.flow_id,
            step=row.step,
            tenant=row.tenant,
            raw=row.raw,
            control_id=row.control_id,
            message_type=row.message_type,
            responses=tuple(responses.get(row.id, {}).get(step) for step in range(row.step)),
        )
        for row in rows
    ]


@frozen
class _PendingRow:
    id: int
    message_id: int
    flow_id: str
    step: int
    tenant: str
    raw: bytes
    control_id: str
    message_type: str


def _pending_statement() -> Any:
    e, m = schema.executions, schema.messages
    return (
        select(
            e.c.id,
            e.c.message_id,
            e.c.flow_id,
            e.c.step,
            m.c.tenant,
            m.c.raw,
            m.c.control_id,
            m.c.message_type,
        )
        .join(m, m.c.id == e.c.message_id)
        .where(e.c.state == bindparam("pending"))
        .order_by(e.c.id)
        .limit(bindparam("limit"))
    )


_PENDING = Prepared(_pending_statement)


class _NewExecution(TypedDict):
    message_id: int
    flow_id: str
    state: str
    step: int
    created_at: float
    updated_at: float
    error: str


def create(
    connection: Connection, records: Sequence[InboundRecord], ids: Sequence[int]
) -> dict[int, tuple[tuple[int, ...], tuple[tuple[int, NewDelivery], ...]]]:
    """Each accepted message's executions: by message id, their ids and the folded
    ones with their first action (the others are stored pending).

    An execution whose first action was rendered before the commit is stored
    waiting on it, so the caller can enqueue that action in this transaction,
    unless an older execution of its flow is still pending at step 0: the
    executor enqueues those in creation order, and a newer message's action must
    not overtake them in the lane (G2). Within the group, the first execution of
    a flow stored pending makes the flow's later ones pending too.
    """
    rows: list[_NewExecution] = []
    firsts: list[NewDelivery | None] = []
    for record, message_id in zip(records, ids, strict=True):
        if not record.accepted:
            continue
        for index, flow_id in enumerate(record.run_flows):
            rows.append(
                {
                    "message_id": message_id,
                    "flow_id": flow_id,
                    "state": PENDING,
                    "step": 0,
                    "created_at": record.received_at,
                    "updated_at": record.received_at,
                    "error": "",
                }
            )
            firsts.append(record.first[index] if index < len(record.first) else None)
    if not rows:
        return {}
    if any(first is not None for first in firsts):
        blocked = {flow_id for (flow_id,) in _PENDING_FIRST.execute(connection, [{}])}
        for row, first in zip(rows, firsts, strict=True):
            if first is not None and row["flow_id"] not in blocked:
                row["state"] = WAITING
            else:
                blocked.add(row["flow_id"])
    execution_ids = insert_with_ids(connection, schema.executions, _INSERT_EXECUTION, rows)
    made: dict[int, tuple[list[int], list[tuple[int, NewDelivery]]]] = {}
    for execution_id, row, first in zip(execution_ids, rows, firsts, strict=True):
        ids_of_message, folded = made.setdefault(row["message_id"], ([], []))
        ids_of_message.append(execution_id)
        if row["state"] == WAITING and first is not None:
            folded.append((execution_id, first))
    return {k: (tuple(e), tuple(f)) for k, (e, f) in made.items()}


_INSERT_EXECUTION = prepared_insert(
    schema.executions,
    ("message_id", "flow_id", "state", "step", "created_at", "updated_at", "error"),
)


def _pending_first_statement() -> Any:
    e = schema.executions
    return (
        select(e.c.flow_id)
        .where(e.c.state == bindparam("pending", PENDING), e.c.step == bindparam("step", 0))
        .distinct()
    )


#: Flows with executions pending at step 0 (few: the executor drains them).
_PENDING_FIRST = Prepared(_pending_first_statement)


def apply(
    connection: Connection, transitions: Sequence[Transition], now: float
) -> list[tuple[int, NewDelivery]]:
    """Enqueue the deliveries and move executions to waiting, or fail them; one commit."""
    deliveries = [t.delivery for t in transitions if t.delivery is not None]
    ids = outbox.enqueue(connection, deliveries, now)
    _SET_STATE.execute(
        connection,
        [
            {
                "id": t.execution_id,
                "new_state": t.state,
                "error": "" if t.delivery is not None else t.error[:255],
                "now": now,
            }
            for t in transitions
        ],
    )
    failed = [t for t in transitions if t.delivery is None]
    if failed:
        _log(connection, [(t.execution_id, t.state, t.error) for t in failed], now)
    return list(zip(ids, deliveries, strict=True))


def advance(
    connection: Connection,
    settled: Sequence[Settlement],
    found: Mapping[int, Origin],
    steps: Mapping[str, int],
    now: float,
) -> Advanced:
    """After deliveries settled: the next step, or done. Runs in their commit.

    ``found`` holds the origins of their executions (``outbox.record`` read
    them); ``steps`` gives each flow's number of actions.
    """
    if not any(row.execution_id is not None for row in settled):
        return Advanced(False, (), ())
    flows = {key: origin.flow_id for key, origin in found.items()}
    pending_any = False
    finished: list[Finished] = []
    held: list[Finished] = []
    moves: list[dict[str, object]] = []
    for row in settled:
        if row.execution_id is None or row.execution_id not in flows:
            continue
        if row.state == HELD:
            held.append(Finished(row.execution_id, HELD, row.last_error, flows[row.execution_id]))
            continue
        if row.state != DELIVERED:
            continue
        total = steps.get(flows[row.execution_id], row.step + 1)
        if row.step + 1 < total:
            moves.append(_move(row.execution_id, PENDING, row.step + 1, now))
            pending_any = True
        else:
            moves.append(_move(row.execution_id, DONE, row.step, now))
            finished.append(Finished(row.execution_id, DONE, "", flows[row.execution_id]))
    if moves:
        _ADVANCE.execute(connection, moves)
    if finished:
        _log(connection, [(f.execution_id, "done", "") for f in finished], now, found)
    return Advanced(pending_any, tuple(finished), tuple(held))


def _move(execution_id: int, state: str, step: int, now: float) -> dict[str, object]:
    return {"id": execution_id, "new_state": state, "new_step": step, "now": now, "from": WAITING}


def _advance_statement() -> Any:
    e = schema.executions
    return (
        update(e)
        .where(e.c.id == bindparam("id"), e.c.state == bindparam("from"))
        .values(
            state=bindparam("new_state"), step=bindparam("new_step"), updated_at=bindparam("now")
        )
    )


_ADVANCE = Prepared(_advance_statement)


def _log(
    connection: Connection,
    items: list[tuple[int, str, str]],
    now: float,
    found: Mapping[int, Origin] | None = None,
) -> None:
    """Log lines of executions; ``found``: their origins when the caller has them."""
    if found is None:
        found = origins(connection, [item[0] for item in items])
    logs.insert_logs(
        connection,
        [
            LogEntry(
                at=now,
                event="execution",
                outcome=outcome,
                tenant=found[execution_id].tenant,
                flow_id=found[execution_id].flow_id,
                message_id=found[execution_id].message_id,
                execution_id=execution_id,
                control_id=found[execution_id].control_id,
                message_type=found[execution_id].message_type,
                step=found[execution_id].step,
                reason=reason,
            )
            for execution_id, outcome, reason in items
            if execution_id in found
        ],
    )


def _set_state_statement() -> Any:
    e = schema.executions
    return (
        update(e)
        .where(e.c.id == bindparam("id"))
        .values(
            state=bindparam("new_state"), error=bindparam("error"), updated_at=bindparam("now")
        )
    )


_SET_STATE = Prepared(_set_state_statement)


def list_executions(
    connection: Connection,
    states: Sequence[str] = (),
    limit: int = 100,
    execution_id: int | None = None,
) -> list[ExecutionRow]:
    """Executions for operators, oldest first (or the one ``execution_id``)."""
    e, m = schema.executions, schema.messages
    query = (
        select(
            e.c.id,
            e.c.message_id,
            e.c.flow_id,
            e.c.step,
            e.c.state,
            e.c.error,
            m.c.control_id,
            e.c.updated_at,
        )
        .join(m, m.c.id == e.c.message_id)
        .order_by(e.c.id)
        .limit(limit)
    )
    if states:
        query = query.where(e.c.state.in_(states))
    if execution_id is not None:
        query = query.where(e.c.id == execution_id)
    return [ExecutionRow(*row) for row in connection.execute(query)]


def state_of(connection: Connection, execution_id: int) -> str | None:
    """An execution's state; None when there is no such execution."""
    e = schema.executions
    query = select(e.c.state).where(e.c.id == execution_id)
    found = connection.execute(query).scalar_one_or_none()
    return None if found is None else str(found)


def release_held(connection: Connection, execution_id: int, reason: str, now: float) -> None:
    """Make a held execution pending again (the executor renders its action anew),
    with a log line giving ``reason``."""
    e = schema.executions
    connection.execute(
        update(e)
        .where(e.c.id == execution_id, e.c.state == HELD_EXECUTION)
        .values(state=PENDING, error="", updated_at=now)
    )
    _log(connection, [(execution_id, "release", reason)], now)


def fail_waiting(connection: Connection, execution_id: int, error: str, now: float) -> None:
    """Fail an execution waiting on a delivery that will never be made (skipped)."""
    e = schema.executions
    connection.execute(
        update(e)
        .where(e.c.id == execution_id, e.c.state == WAITING)
        .values(state=FAILED, error=error[:255], updated_at=now)
    )


def finished_of(
    connection: Connection, execution_ids: Sequence[int], held: Mapping[int, str]
) -> list[Finished]:
    """Which of these executions are finished as a watcher sees it ("after actions"):
    done, failed or held (their render), or waiting on a held delivery (``held``: the
    executions whose delivery is held, with its error, ``outbox.held_of``)."""
    if not execution_ids:
        return []
    e = schema.executions
    rows = connection.execute(
        select(e.c.id, e.c.state, e.c.error).where(e.c.id.in_(sorted(set(execution_ids))))
    )
    found = []
    for execution_id, state, error in rows:
        if state in (DONE, FAILED, HELD_EXECUTION):
            found.append(Finished(execution_id, state, error))
        elif state == WAITING and execution_id in held:
            found.append(Finished(execution_id, HELD, held[execution_id]))
    return found


def execution_states(connection: Connection, message_id: int) -> list[ExecutionState]:
    """The executions of a stored message, in creation order."""
    e = schema.executions
    rows = connection.execute(
        select(e.c.id, e.c.flow_id, e.c.state, e.c.error)
        .where(e.c.message_id == message_id)
        .order_by(e.c.id)
    )
    return [ExecutionState(*row) for row in rows]


def of_messages(connection: Connection, message_ids: Iterable[int]) -> list[int]:
    """Retention: the executions of these messages."""
    wanted = list(message_ids)
    if not wanted:
        return []
    e = schema.executions
    return [row[0] for row in connection.execute(select(e.c.id).where(e.c.message_id.in_(wanted)))]


def delete_executions(connection: Connection, execution_ids: Sequence[int]) -> None:
    """Retention: delete these executions (their deliveries first)."""
    if execution_ids:
        e = schema.executions
        connection.execute(delete(e).where(e.c.id.in_(list(execution_ids))))


def replay(
    connection: Connection,
    targets: Sequence[tuple[int, str]],
    who: str,
    reason: str,
    now: float,
) -> list[int]:
    """Run stored messages through flows again: one new pending execution per
    (message id, Flow ID); the executor runs them like any other. Returns their ids;
    each is logged (``replay by <who>: <reason>``, never content)."""
    rows: list[_NewExecution] = [
        {
            "message_id": message_id,
            "flow_id": flow_id,
            "state": PENDING,
            "step": 0,
            "created_at": now,
            "updated_at": now,
            "error": "",
        }
        for message_id, flow_id in targets
    ]
    if not rows:
        return []
    ids = insert_with_ids(connection, schema.executions, _INSERT_EXECUTION, rows)
    _log(connection, [(i, "replay", f"replay by {who}: {reason}"[:255]) for i in ids], now)
    return ids
