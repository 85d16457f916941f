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

import json
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import evolve, frozen
from sqlalchemy import Connection, bindparam, select, update

from udsgateway.store import audit, outbox, schema
from udsgateway.store import messages as store
from udsgateway.store.engine import Prepared
from udsgateway.store.messages import CommitResult, InboundRecord, Origin, insert_logs, origins
from udsgateway.store.outbox import DELIVERED, HELD, NewDelivery, Settlement

PENDING = "pending"
WAITING = "waiting"
DONE = "done"
FAILED = "failed"
#: Cannot render its action: waits for an operator (the same word as a held delivery).
HELD_EXECUTION = HELD
FINISHED = (DONE, FAILED)


@frozen
class PendingWork:
    """A pending execution with what rendering its next action needs."""

    execution_id: int
    message_id: int
    flow_id: str
    step: int
    tenant: str
    raw: bytes
    control_id: str
    message_type: str
    #: Responses of the earlier actions of this execution, by step (None: no response).
    responses: tuple[bytes | None, ...]


@frozen
class Transition:
    """What the executor decided for one pending execution."""

    execution_id: int
    delivery: NewDelivery | None = None  # enqueue this and wait for it
    error: str = ""  # or fail (or hold) with this reason (no PHI)
    hold: bool = False  # hold for an operator instead of failing

    @property
    def state(self) -> str:
        """The execution's new state."""
        if self.delivery is not None:
            return WAITING
        return HELD_EXECUTION if self.hold else FAILED


@frozen
class Finished:
    """An execution that reached done or failed, for watchers ("after actions" ACKs)."""

    execution_id: int
    state: str
    reason: str = ""


@frozen
class Advanced:
    """What recording delivery outcomes changed in executions."""

    pending: bool  # some execution has a next action to render
    finished: tuple[Finished, ...]
    held: tuple[Finished, ...]


def pending(connection: Connection, limit: int) -> list[PendingWork]:
    """The oldest pending executions, in creation (= arrival) order."""
    d = schema.deliveries
    rows = [
        _PendingRow(*row)
        for row in _PENDING.execute(connection, [{"pending": PENDING, "limit": limit}])
    ]
    responses: dict[int, dict[int, bytes | None]] = {}
    wanting = [row.id for row in rows if row.step > 0]
    if wanting:
        for execution_id, step, response in connection.execute(
            select(d.c.execution_id, d.c.step, d.c.response).where(
                d.c.execution_id.in_(wanting), d.c.state == DELIVERED
            )
        ):
            responses.setdefault(execution_id, {})[step] = response
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


def commit_inbound(connection: Connection, records: list[InboundRecord]) -> list[CommitResult]:
    """The inbound group commit, with the first actions rendered before it enqueued in it.

    ``store.commit_inbound`` stores the messages and their executions; those it
    stored waiting on their first action (the fold: see ``Executor.first_actions``)
    get that delivery here, in the same transaction, in creation order. Each
    result's ``enqueued`` lists them for the dispatcher.
    """
    results = store.commit_inbound(connection, records)
    deliveries = [
        evolve(delivery, execution_id=execution_id)
        for result in results
        for execution_id, delivery in result.folded
    ]
    if not deliveries:
        return results
    ids = iter(outbox.enqueue(connection, deliveries, max(r.received_at for r in records)))
    made = iter(deliveries)
    return [
        evolve(result, enqueued=tuple((next(ids), next(made)) for _ in result.folded))
        if result.folded
        else result
        for result in results
    ]


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
            held.append(Finished(row.execution_id, HELD, row.last_error))
            continue
        if row.state != DELIVERED:
            continue
        total = steps.get(flows[row.execution_id], row.step + 1)
        if row.step + 1 < total:
            moves.append(_move(row.execution_id, PENDING, row.step + 1, now))
            pending_any = True
        else:
            moves.append(_move(row.execution_id, DONE, row.step, now))
            finished.append(Finished(row.execution_id, DONE))
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
    insert_logs(
        connection,
        [
            {
                "at": now,
                "tenant": found[execution_id].tenant,
                "flow_id": found[execution_id].flow_id,
                "message_id": found[execution_id].message_id,
                "execution_id": execution_id,
                "control_id": found[execution_id].control_id,
                "message_type": found[execution_id].message_type,
                "step": found[execution_id].step,
                "event": "execution",
                "outcome": outcome,
                "reason": reason[:255],
            }
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


@frozen
class ExecutionRow:
    """What an operator sees of an execution: never its message's content."""

    id: int
    message_id: int
    flow_id: str
    step: int
    state: str
    error: str
    control_id: str
    updated_at: float


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


def release(
    connection: Connection,
    execution_id: int,
    who: str,
    reason: str,
    now: float,
    via: str = "cli",
) -> ExecutionRow:
    """Make a held execution pending again: the executor renders its action anew
    (with the flow as it is now). Audited with who and why, never content."""
    e = schema.executions
    found = connection.execute(
        select(e.c.state).where(e.c.id == execution_id)
    ).scalar_one_or_none()
    if found is None:
        raise LookupError(f"no execution {execution_id}")
    if found != HELD_EXECUTION:
        raise ValueError(f"execution {execution_id} is {found}, not held")
    connection.execute(
        update(e)
        .where(e.c.id == execution_id, e.c.state == HELD_EXECUTION)
        .values(state=PENDING, error="", updated_at=now)
    )
    _log(connection, [(execution_id, "release", f"release by {who}: {reason}")], now)
    audit.append(
        connection, who, "execution.release", f"execution {execution_id}", now, reason, via=via
    )
    (row,) = list_executions(connection, execution_id=execution_id)
    return row


def replay_messages(
    connection: Connection,
    message_ids: Sequence[int],
    flow_id: str | None,
    who: str,
    reason: str,
    now: float,
) -> list[int]:
    """Run stored messages through a flow again: one new pending execution per message,
    through ``flow_id`` or, when None, through every flow each was routed to. Rejected
    messages are not replayed. Returns the new executions' ids; logged (no content)."""
    m, e = schema.messages, schema.executions
    rows = []
    for message_id, routed in connection.execute(
        select(m.c.id, m.c.flows)
        .where(m.c.id.in_(list(message_ids)), m.c.accepted.is_(True))
        .order_by(m.c.id)
    ):
        for flow in [flow_id] if flow_id is not None else json.loads(routed):
            rows.append(
                {
                    "message_id": message_id,
                    "flow_id": flow,
                    "state": PENDING,
                    "step": 0,
                    "created_at": now,
                    "updated_at": now,
                    "error": "",
                }
            )
    ids = []
    for row in rows:
        key = connection.execute(e.insert().values(**row)).inserted_primary_key
        assert key is not None
        ids.append(int(key[0]))
    _log(connection, [(i, "replay", f"replay by {who}: {reason}") for i in ids], now)
    return ids
