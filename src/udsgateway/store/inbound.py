"""The inbound group commit: messages, their executions, their log lines and the
deliveries rendered before the commit (the fold), in one transaction.

It holds no SQL of its own: each table's statements are in that table's
module (``messages``, ``executions``, ``logs``, ``outbox``).
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import evolve
from sqlalchemy import Connection

from udsgateway.store import executions, leases, logs, messages, outbox, search
from udsgateway.store.records import (
    CommitOutcome,
    CommitResult,
    InboundRecord,
    LogEntry,
)


def commit_inbound(
    connection: Connection,
    records: list[InboundRecord],
    announce: bool = False,
    write_keys: bool = True,
) -> list[CommitResult]:
    """Store a group of inbound messages: duplicate check, insert, executions, log
    lines, and the folded first actions (see ``Executor.first_actions``).

    ``write_keys``: the search keys too (``store.search``); False when the gateway
    writes them after the commit, in batches (``inbound.searchkeys.KeyWriter``).

    An execution stored waiting on its first action gets that delivery here, in
    the same transaction, in creation order; each result's ``enqueued`` lists
    them for the dispatcher. ``announce`` (a cluster node): the other nodes hear
    of the new deliveries and pending executions at the commit
    (``leases.announce_work``), as the lane or the flow action may be theirs.
    """
    existing = messages.accepted_with(connection, (r.control_id for r in records))

    results: list[CommitResult | None] = []
    to_insert: list[InboundRecord] = []
    positions: list[int] = []
    in_batch: dict[tuple[str, str, str], int] = {}  # key -> its index in to_insert
    resent: list[tuple[int, int, InboundRecord]] = []  # position, original's index, record
    for index, record in enumerate(records):
        key = (record.tenant, record.sender, record.control_id)
        if key in existing:
            _id, digest, ack, pending = existing[key]
            results.append(_duplicate(record, digest, ack, _id, pending))
            continue
        first = in_batch.get(key)
        if first is not None:
            # Resent on another connection while the original waits in this group:
            # answered once the original's id is known.
            results.append(None)
            resent.append((index, first, record))
            continue
        if record.refuse_new:
            results.append(CommitResult(CommitOutcome.REFUSED))
            continue
        if record.accepted:
            in_batch[key] = len(to_insert)
        results.append(None)
        to_insert.append(record)
        positions.append(index)

    if to_insert:
        ids = messages.insert_messages(connection, to_insert)
        made = executions.create(connection, to_insert, ids)
        logs.insert_logs(connection, _receipts(to_insert, ids))
        if write_keys:
            search.insert_keys(connection, [search.keys_of(r) for r in to_insert], ids)
        for position, record, message_id in zip(positions, to_insert, ids, strict=True):
            execution_ids, folded = made.get(message_id, ((), ()))
            results[position] = CommitResult(
                CommitOutcome.STORED,
                message_id,
                record.ack,
                execution_ids,
                folded=folded,
                pending=len(folded) < len(execution_ids),
            )
        for position, first, record in resent:
            original = to_insert[first]
            results[position] = _duplicate(
                record, original.digest, original.ack, ids[first], original.ack_pending
            )
    stored = _enqueue_folded(connection, [r for r in results if r is not None], records)
    if announce:
        leases.announce_work(
            connection,
            (
                (delivery.lane, delivery.destination, delivery.protocol)
                for result in stored
                for _id, delivery in result.enqueued
            ),
            (
                (flow_id, 0)
                for record, result in zip(to_insert, (results[p] for p in positions), strict=True)
                if result is not None and result.pending
                for flow_id in record.run_flows
            ),
        )
    return stored


def _duplicate(
    record: InboundRecord, digest: str, ack: bytes, message_id: int | None, pending: bool
) -> CommitResult:
    if record.digest == digest:
        return CommitResult(CommitOutcome.REPLAY, message_id, ack, ack_pending=pending)
    return CommitResult(CommitOutcome.CONFLICT, message_id)


def _receipts(records: Sequence[InboundRecord], ids: Sequence[int]) -> list[LogEntry]:
    return [
        LogEntry(
            at=r.received_at,
            event="received",
            outcome="accepted" if r.accepted else "rejected",
            tenant=r.tenant,
            flow_id=r.flows[0][:32] if len(r.flows) == 1 else "",
            message_id=message_id,
            control_id=r.control_id,
            message_type=r.message_type,
            ack_code="" if r.ack_pending else r.ack_code,
            reason=r.reason,
        )
        for r, message_id in zip(records, ids, strict=True)
    ]


def _enqueue_folded(
    connection: Connection, results: list[CommitResult], records: Sequence[InboundRecord]
) -> list[CommitResult]:
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
