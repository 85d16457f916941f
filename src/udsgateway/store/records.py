"""The values that cross the store's boundary: plain attrs records and state names.

Every store function takes and returns these (or ints, strings and bytes),
never live result rows and never objects of the layers above (flows, HL7
messages, templates): the store imports nothing of the gateway but its own
modules. The table modules (``messages``, ``executions``, ``outbox``,
``logs``, ``apps``, ``meta``) and the transactions that span them
(``inbound``, ``operator``, ``retention``) all speak in these records.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

# -- states of a delivery (table ``deliveries``)

QUEUED = "queued"
HELD = "held"
DELIVERED = "delivered"
SKIPPED = "skipped"
#: States a lane still has to deal with, in id order.
OPEN_STATES = (QUEUED, HELD)

# -- states of an execution (table ``executions``)

PENDING = "pending"
WAITING = "waiting"
DONE = "done"
FAILED = "failed"
#: Cannot render its action: waits for an operator (the same word as a held delivery).
HELD_EXECUTION = HELD
FINISHED = (DONE, FAILED)
#: States of an execution that is not finished (retention keeps its message).
UNFINISHED = (PENDING, WAITING, HELD_EXECUTION)


# -- outbound deliveries


@frozen
class NewDelivery:
    """An outbound message to enqueue."""

    lane: str
    destination: str
    protocol: str
    control_id: str
    payload: bytes
    policy: dict[str, object]
    execution_id: int | None = None
    step: int = 0


@frozen
class Delivery:
    """A stored delivery."""

    id: int
    lane: str
    destination: str
    protocol: str
    control_id: str
    payload: bytes
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str
    response: bytes | None
    response_code: str
    #: Read-only: deliveries with the same policy share one mapping.
    policy: Mapping[str, Any]
    execution_id: int | None
    step: int
    created_at: float
    updated_at: float


@frozen
class LaneWork:
    """A lane with open deliveries, for recovery."""

    lane: str
    destination: str
    protocol: str
    first_id: int
    open: int


@frozen
class Settlement:
    """The result of one attempt at a delivery, to record.

    ``execution_id``, ``step`` and ``control_id`` repeat the delivery's own
    values, so recording needs no read back of the row.
    """

    delivery_id: int
    state: str  # QUEUED (retry later), HELD or DELIVERED
    attempts: int
    next_attempt_at: float
    last_error: str = ""
    response: bytes | None = None
    response_code: str = ""
    execution_id: int | None = None
    step: int = 0
    control_id: str = ""


# -- inbound messages and their commit


class CommitOutcome(enum.Enum):
    """What happened to one inbound message in a group commit."""

    STORED = "stored"  # new message, committed with its executions
    REPLAY = "replay"  # same sender, MSH-10 and bytes as a stored message (G3)
    CONFLICT = "conflict"  # same sender and MSH-10, different bytes (NAK 205)
    REFUSED = "refused"  # new, but a destination's queue is full (NAK 207); not stored


@frozen
class InboundRecord:
    """An inbound message ready to commit, with the ACK we will send."""

    tenant: str
    sender: str
    control_id: str
    message_type: str
    peer: str
    connection: str
    received_at: float
    raw: bytes
    digest: str
    accepted: bool
    flows: tuple[str, ...]
    reason: str
    ack_code: str
    ack: bytes
    #: The routed flows that have actions: each gets an execution.
    run_flows: tuple[str, ...] = ()
    #: Store it only if it is a resend of a stored message (backpressure).
    refuse_new: bool = False
    #: Its ACK waits for the actions ("after actions"): stored with an empty ACK
    #: code until ``messages.update_ack`` stores the one finally sent.
    ack_pending: bool = False
    #: The first action of each run flow, rendered before the commit (the executor's
    #: fold), aligned with ``run_flows``; None where it was not rendered. An execution
    #: whose first action is given is stored waiting on it, and the delivery enqueued
    #: in the same transaction, unless its flow has older executions still pending at
    #: that step (see ``inbound.commit_inbound``).
    first: tuple[NewDelivery | None, ...] = ()
    #: HL7 keys for the message search, (name, value): pid3, sch1, sch2 (store/search.py).
    keys: tuple[tuple[str, str], ...] = ()


@frozen
class CommitResult:
    """The result of committing one InboundRecord."""

    outcome: CommitOutcome
    message_id: int | None = None
    ack: bytes = b""  # for REPLAY: the ACK stored with the original
    execution_ids: tuple[int, ...] = ()
    #: REPLAY of a message whose "after actions" ACK is not decided yet.
    ack_pending: bool = False
    #: STORED: executions stored waiting on their first action, with that action as
    #: given in ``InboundRecord.first``, in creation order.
    folded: tuple[tuple[int, NewDelivery], ...] = ()
    #: STORED: some execution was stored pending (the executor has work).
    pending: bool = False
    #: STORED: the folded executions' deliveries as enqueued, (delivery id, delivery).
    enqueued: tuple[tuple[int, NewDelivery], ...] = ()


@frozen
class MessageSummary:
    """A stored inbound message's metadata, never its content: a row of the message
    browser (``search``)."""

    id: int
    tenant: str
    sender: str
    control_id: str
    message_type: str
    peer: str
    connection: str
    received_at: float
    size: int
    accepted: bool
    flows: tuple[str, ...]
    reason: str
    ack_code: str


@frozen
class StoredMessage(MessageSummary):
    """A stored inbound message with its content (the bytes received, the ACK sent), for
    operators and tests."""

    raw: bytes
    ack: bytes


@frozen
class Origin:
    """Where an execution comes from: its flow and inbound message (for log lines)."""

    flow_id: str
    message_id: int
    tenant: str
    message_type: str
    control_id: str
    step: int


# -- executions


@frozen
class ExecutionState:
    """Where one execution of a message stands (for a resend of an "after actions" message)."""

    id: int
    flow_id: str
    state: str
    error: str


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
    #: Its flow (the per-flow counters); "" when not known.
    flow_id: str = ""


@frozen
class Advanced:
    """What recording delivery outcomes changed in executions."""

    pending: bool  # some execution has a next action to render
    finished: tuple[Finished, ...]
    held: tuple[Finished, ...]


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


# -- the execution log and the audit log


@frozen
class LogEntry:
    """A line to append to the execution log; never message content (no PHI)."""

    at: float
    event: str
    outcome: str = ""
    tenant: str = ""
    app_id: str = ""
    flow_id: str = ""
    message_id: int | None = None
    execution_id: int | None = None
    control_id: str = ""
    message_type: str = ""
    step: int | None = None
    attempt: int | None = None
    ack_code: str = ""
    reason: str = ""


@frozen
class LogLine:
    """A stored line of the execution log, as operators read it."""

    id: int
    at: float
    event: str
    outcome: str
    tenant: str
    #: The line's App ID, else that of its flow as stored now ("" when neither).
    app_id: str
    flow_id: str
    message_id: int | None
    execution_id: int | None
    control_id: str
    message_type: str
    step: int | None
    attempt: int | None
    ack_code: str
    reason: str


@frozen
class AuditEntry:
    """One row of the audit trail: who did what to what, why, with what result, where
    (api, cli, manhole); never content."""

    id: int
    at: float
    who: str
    action: str
    target: str
    reason: str = ""
    result: str = "ok"
    via: str = "cli"


# -- apps and flows, as stored


@frozen
class StoredFlow:
    """A flow as the store keeps it: its trigger's settings and its actions as JSON."""

    flow_id: str
    name: str
    enabled: bool
    description: str
    connection: str
    message_type: str
    sample: str
    ack: str
    ack_timeout: float
    application_ack: str
    #: The ordered actions, a JSON list (the flows module writes and reads it).
    actions: str


@frozen
class StoredApp:
    """An app as the store keeps it, with its flows in file order."""

    app_id: str
    tenant: str
    name: str
    description: str
    variables: Mapping[str, str] = field(factory=dict)
    flows: tuple[StoredFlow, ...] = ()
