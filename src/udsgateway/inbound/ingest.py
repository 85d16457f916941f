"""From a received frame to the answer for its sender: validate, route, commit, ACK.

This is the inbound hot path. It reads only the MSH header (no full parse),
routes in memory, hands the message to the group committer, and answers
only once the commit has returned (G4): AA/CA for a stored message, the
stored ACK for a resend (G3), a NAK with an ERR segment otherwise.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from udsgateway.clock import Wall, wall_of
from udsgateway.config import TenantConfig
from udsgateway.hl7.ack import (
    AckError,
    ControlIdSource,
    Outcome,
    ack_code,
    build_ack,
    build_batch_ack,
    hl7_timestamp,
)
from udsgateway.hl7.ack import application_ack_requested as _application_ack_requested
from udsgateway.hl7.ack import wants_accept_ack as _wants_accept_ack
from udsgateway.hl7.ack import wants_application_ack as _wants_application_ack
from udsgateway.hl7.batch import (
    BatchFile,
    BatchHeader,
    BatchProblem,
    first_version,
    is_batch,
    read_batch_header,
    split_batch,
)
from udsgateway.hl7.header import Delimiters, Header, HeaderProblem, codec_for, parse_header
from udsgateway.hl7.keys import search_keys
from udsgateway.inbound.routing import EMPTY, FlowRoute, Rejected, RoutingTable
from udsgateway.interfaces import IFlowRunner
from udsgateway.store import executions, logs, messages, search
from udsgateway.store.engine import GroupCommitter, is_locked
from udsgateway.store.records import (
    CommitOutcome,
    CommitResult,
    ExecutionState,
    Finished,
    InboundRecord,
    LogEntry,
    NewDelivery,
)

log = Logger()


@frozen
class ApplicationAck:
    """An enhanced-mode application ACK (AA/AE), decided after the accept ACK.

    ``data`` is empty when the sender's MSH-16 asks for none for this outcome.
    """

    data: bytes
    code: str
    #: The acknowledged message's MSH-10 (MSA-2) and its row in the store.
    control_id: str
    message_id: int | None


@frozen
class Answer:
    """What to do on the connection after a frame: write bytes, close, or both.

    ``then``, in enhanced mode, fires with the application ACK: it is written
    after ``data`` and before any answer to the connection's next frame.
    """

    data: bytes | None = None
    close: bool = False
    then: Deferred[ApplicationAck] | None = field(default=None, eq=False)


NO_ANSWER = Answer()
CLOSE = Answer(close=True)


@define
class IngestStats:
    """Counters for operators (manhole, admin API); never message content."""

    frames: int = 0
    stored: int = 0
    replayed: int = 0
    acks: Counter[str] = field(factory=Counter)
    errors: Counter[int] = field(factory=Counter)
    unreadable: int = 0
    inbound_acks: int = 0
    #: Application ACKs ready after their connection had closed (not sent).
    application_acks_lost: int = 0
    #: Messages stored as rejected (routing: no such flow, wrong type...), by error code.
    rejected: Counter[int] = field(factory=Counter)
    #: Accepted messages stored, per Flow ID they were routed to.
    routed: Counter[str] = field(factory=Counter)


@define
class Ingest:
    """The inbound pipeline of one tenant."""

    tenant: TenantConfig
    _committer: GroupCommitter[InboundRecord, CommitResult]
    _clock: IReactorTime
    _control_ids: ControlIdSource
    routes: RoutingTable = EMPTY
    #: The flows that run after a message is stored (the executor), or none (a
    #: gateway that only stores). It renders a message's first actions before its
    #: commit (the fold) only while a commit is running, when the message waits for
    #: the next one anyway: an idle gateway commits and answers at once, and the
    #: executor renders after the ACK. It also says when a destination's queue is
    #: full (backpressure: NAK 207) and watches executions ("after actions" ACKs).
    flows: IFlowRunner | None = None
    #: Fold for every message, also when no commit is running (tests on an inline
    #: database, whose commits never overlap a frame).
    fold_while_idle: bool = False
    #: Called after a commit, before its answer is written (fault injection in tests).
    after_commit: Callable[[], None] | None = None
    stats: IngestStats = field(factory=IngestStats)
    #: Told of each stored message's id and search keys after its commit, when the
    #: keys are written after the commit (``inbound.searchkeys.KeyWriter.stored``).
    stored_keys: Callable[[int, tuple[tuple[str, str], ...]], None] | None = None
    #: Wall clock for timestamps (received_at, ACK MSH-7); None: the timer clock's.
    wall: Wall | None = None
    _codec: str = field(init=False)
    _now: Wall = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._codec = codec_for(self.tenant.default_charset, "latin-1") or "latin-1"
        self._now = wall_of(self._clock, self.wall)

    def handle(self, payload: bytes, peer: str, connection: str) -> Deferred[Answer]:
        """Answer one complete frame; the Deferred fires once it is safe to answer.

        The hot path is plain callbacks, not a coroutine: one frame per call,
        and a coroutine's set-up cost as much as routing the frame.
        """
        if is_batch(payload):
            return Deferred.fromCoroutine(self._batch(payload, peer, connection))
        self.stats.frames += 1
        parsed = parse_header(payload, default_charset=self._codec)
        if isinstance(parsed, HeaderProblem):
            return succeed(self._header_problem(parsed, len(payload)))
        header = parsed
        if header.message_code == "ACK":
            return succeed(self._inbound_ack(header))
        if header.processing_id not in self.tenant.processing_ids:
            self._log_refused(header, 202)
            refused = AckError(202, "MSH^1^11", "not accepted")
            return succeed(self._nak(header, Outcome.REJECT, refused))
        if header.version not in self.tenant.versions:
            self._log_refused(header, 203)
            refused = AckError(203, "MSH^1^12", "not accepted")
            return succeed(self._nak(header, Outcome.REJECT, refused))

        routed = self.routes.route(header, connection)
        now = self._now()
        flows: tuple[FlowRoute, ...]
        error: AckError | None
        if isinstance(routed, Rejected):
            outcome, flows, error = Outcome.REJECT, (), routed.error
            reason = f"{error.code}: {error.diagnostic}"
        else:
            outcome, flows, error, reason = Outcome.ACCEPT, routed.flows, None, ""
        code, ack = self._ack(header, outcome, error, now)
        flow_ids = tuple(route.flow_id for route in flows)
        run_flows = (
            flow_ids
            if all(route.destinations for route in flows)
            else tuple(route.flow_id for route in flows if route.destinations)
        )
        # Backpressure: a new message for a full destination is refused, but
        # a resend of one already stored still gets its stored ACK (G3).
        refuse_new = self._full_destination(flows)
        # The flow runner's interface is typed in the base layer; the values are
        # the store's records (an IFlowRunner's first_actions returns these).
        first: tuple[NewDelivery | None, ...] = (
            self.flows.first_actions(self.tenant.name, run_flows, payload)
            if self.flows is not None
            and run_flows
            and not refuse_new
            and (self.fold_while_idle or self._committer.busy)
            else ()
        )
        record = InboundRecord(
            tenant=self.tenant.name,
            sender=_sender(header),
            control_id=header.control_id,
            message_type=header.event_type,
            peer=peer,
            connection=connection,
            received_at=now,
            raw=payload,
            digest=hashlib.sha256(payload).hexdigest(),
            accepted=error is None,
            flows=flow_ids,
            reason=reason,
            ack_code=code,
            ack=ack,
            run_flows=run_flows,
            refuse_new=refuse_new,
            keys=search_keys(payload, header),
            # Its ACK will reflect the actions: until then a resend must not be
            # given the provisional one (see _replay_pending).
            # In enhanced mode with an application ACK the accept ACK is final at commit.
            ack_pending=(
                error is None
                and self.flows is not None
                and bool(_waiting_flows(flows))
                and not _application_ack_requested(header)
            ),
            first=first,
        )
        committing = self._committer.submit(record)
        return committing.addCallbacks(
            self._committed,
            self._commit_failed,
            callbackArgs=(header, record, flows, error),
            errbackArgs=(header,),
        )

    def oversized(self, head: bytes, size: int) -> Answer:
        """A complete frame over the size limit: NAK 104 when its header is readable."""
        self.stats.frames += 1
        if is_batch(head):
            first = read_batch_header(head.split(b"\r", 1)[0].split(b"\n", 1)[0])
            problem = f"batch frame of {size} bytes is over the limit"
            return self._batch_reject(BatchProblem(problem, first), head, 104)
        parsed = parse_header(head, default_charset=self._codec)
        header = parsed.header if isinstance(parsed, HeaderProblem) else parsed
        log.warn("frame over the size limit", size=size, tenant=self.tenant.name)
        if header is None:
            self.stats.unreadable += 1
            return CLOSE
        if header.message_code == "ACK":
            return self._inbound_ack(header)
        error = AckError(104, "", f"frame of {size} bytes is over the limit")
        return self._nak(header, Outcome.ERROR, error)

    async def _batch(self, payload: bytes, peer: str, connection: str) -> Answer:
        """A batch frame: each message through ``handle``, then one batch acknowledgment.

        All messages are submitted before any is awaited, so they share group
        commits; the answer is written only once every one of them is committed
        (or answered otherwise), like a single message's.
        """
        parsed = split_batch(payload)
        if isinstance(parsed, BatchProblem):
            return self._batch_reject(parsed, payload, 100)
        answers = await gatherResults(
            [self.handle(message, peer, connection) for message in parsed.messages],
            consumeErrors=True,
        )
        acks: list[list[bytes]] = []
        position = 0
        for batch in parsed.batches:
            batch_acks: list[bytes] = []
            for answer in answers[position : position + len(batch.messages)]:
                if answer.data is not None:
                    batch_acks.append(answer.data)
                elif answer.close:
                    batch_acks.append(self._unreadable_in_batch(parsed, payload))
            position += len(batch.messages)
            acks.append(batch_acks)
        log.info(
            "batch of {messages} messages: {acks} ACKs",
            messages=len(answers),
            acks=sum(len(batch_acks) for batch_acks in acks),
            batches=len(parsed.batches),
            tenant=self.tenant.name,
        )
        if answers and not any(acks):
            return NO_ANSWER  # inbound ACKs only, or senders that asked for no ACK
        now = hl7_timestamp(self._now())
        return Answer(build_batch_ack(parsed, acks, next_id=self._control_ids.next, timestamp=now))

    def _batch_reject(self, problem: BatchProblem, payload: bytes, code: int) -> Answer:
        """One AR for a whole batch that is not split: MSA-2 names the batch control ID."""
        self.stats.frames += 1
        log.info(
            "batch refused: AR {code}: {reason}",
            code=code,
            reason=problem.diagnostic,
            size=len(payload),
            tenant=self.tenant.name,
        )
        # A garbled FHS-1/FHS-2 (BHS-1/BHS-2): still answered, with `|^~\&`.
        batch_header = problem.header or BatchHeader("BHS", Delimiters.DEFAULT, ("|",))
        header = batch_header.as_header(first_version(payload) or "2.5")
        return self._nak(header, Outcome.REJECT, AckError(code, "", problem.diagnostic))

    def _unreadable_in_batch(self, parsed: BatchFile, payload: bytes) -> bytes:
        """The NAK for a message of a batch whose MSH-1 can not be read (MSA-2 empty)."""
        first = parsed.first_header
        assert first is not None
        header = first.as_header(first_version(payload) or "2.5")
        header = evolve(header, control_id="")
        error = AckError(102, "MSH^1^1", "MSH-1 field separator missing or invalid")
        return self._ack(header, Outcome.REJECT, error, self._now())[1]

    def _header_problem(self, parsed: HeaderProblem, size: int) -> Answer:
        log.info(
            "bad header: {code} at {location}",
            code=parsed.code,
            location=parsed.location,
            size=size,
            tenant=self.tenant.name,
        )
        if parsed.header is None:
            self.stats.unreadable += 1
            return CLOSE
        if parsed.header.message_code == "ACK":
            return self._inbound_ack(parsed.header)
        problem = AckError(parsed.code, parsed.location, parsed.diagnostic)
        # docs/guarantees.md: AR for a header problem, AE for a content error
        # (control bytes or undecodable bytes in the body, located by offset).
        header_problem = parsed.location.startswith("MSH")
        outcome = Outcome.REJECT if header_problem else Outcome.ERROR
        return self._nak(parsed.header, outcome, problem)

    def _commit_failed(self, failure: Failure, header: Header) -> Answer:
        locked = failure.value is not None and is_locked(failure.value)
        log.warn(
            "commit failed; NAK {code} sent (control ID {control_id})",
            code=206 if locked else 207,
            control_id=header.control_id,
            tenant=self.tenant.name,
        )
        text = "database locked" if locked else "message could not be stored"
        return self._nak(header, Outcome.REJECT, AckError(206 if locked else 207, "", text))

    def _committed(
        self,
        result: CommitResult,
        header: Header,
        record: InboundRecord,
        flows: tuple[FlowRoute, ...],
        error: AckError | None,
    ) -> Answer | Deferred[Answer]:
        if self.after_commit is not None:
            self.after_commit()
        if result.outcome is CommitOutcome.STORED:
            self.stats.stored += 1
            if self.stored_keys is not None and result.message_id is not None:
                self.stored_keys(result.message_id, search.keys_of(record))
            for flow_id in record.flows:
                self.stats.routed[flow_id] += 1
            if error is not None:
                self.stats.rejected[error.code] += 1
                log.info(
                    "message rejected: {reason} (control ID {control_id})",
                    reason=record.reason,
                    control_id=header.control_id,
                    message_type=header.event_type,
                    tenant=self.tenant.name,
                )
            application = error is None and _application_ack_requested(header)
            watches: list[Deferred[Finished]] = []
            timeout = 0.0
            waiting = _application_waiting(flows) if application else _waiting_flows(flows)
            if self.flows is not None and waiting:
                timeout = _ack_timeout(waiting)
                # Only the flows that asked for it; watch before the executor hears
                # of the message, since it may finish at once.
                watches = [
                    self._watch(execution_id, timeout)
                    for flow_id, execution_id in zip(
                        record.run_flows, result.execution_ids, strict=True
                    )
                    if flow_id in waiting
                ]
            if self.flows is not None and result.execution_ids:
                self.flows.stored(result)
            if application:
                accept = self._answer(record.ack_code, record.ack)
                then = Deferred.fromCoroutine(
                    self._application_ack(header, result.message_id, watches, timeout)
                )
                return Answer(accept.data, then=then)
            if watches:
                return Deferred.fromCoroutine(
                    self._after_actions(header, result.message_id, watches, timeout)
                )
            return self._answer(record.ack_code, record.ack)
        if result.outcome is CommitOutcome.REFUSED:
            log.warn(
                "destination queue full: NAK 207 (control ID {control_id})",
                control_id=header.control_id,
                tenant=self.tenant.name,
            )
            return self._nak(
                header, Outcome.REJECT, AckError(207, "", "destination queue is full")
            )
        if result.outcome is CommitOutcome.REPLAY:
            self.stats.replayed += 1
            if result.ack_pending and result.message_id is not None:
                log.info(
                    "duplicate: waits for the actions' ACK (control ID {control_id})",
                    control_id=header.control_id,
                )
                return Deferred.fromCoroutine(
                    self._replay_pending(header, result.message_id, flows)
                )
            log.info(
                "duplicate: stored ACK replayed (control ID {control_id})",
                control_id=header.control_id,
            )
            replayed = self._answer("replay", result.ack)
            if error is None and _application_ack_requested(header):
                # The sender may resend because its application ACK never came:
                # decide it again from the executions (the message runs once).
                then = Deferred.fromCoroutine(
                    self._replay_application_ack(header, result.message_id, flows)
                )
                return Answer(replayed.data, then=then)
            return replayed
        log.warn(
            "same MSH-10 with different content (control ID {control_id})",
            control_id=header.control_id,
        )
        return self._nak(
            header, Outcome.REJECT, AckError(205, "MSH^1^10", "control id already used")
        )

    def _full_destination(self, flows: tuple[FlowRoute, ...]) -> bool:
        if self.flows is None:
            return False
        is_full = self.flows.is_full
        return any(is_full(d) for route in flows for d in route.destinations)

    def _watch(self, execution_id: int, timeout: float) -> Deferred[Finished]:
        """Fires with the execution's ``Finished`` state, or fails after ``timeout``."""
        assert self.flows is not None
        watching: Deferred[Finished] = self.flows.watch(execution_id, timeout)
        return watching

    def _execution_states(self, message_id: int) -> Deferred[list[ExecutionState]]:
        return self._committer.database.transaction(executions.execution_states, message_id)

    async def _replay_pending(
        self, header: Header, message_id: int, flows: tuple[FlowRoute, ...]
    ) -> Answer:
        """A resend of an "after actions" message whose ACK is not decided yet (G3).

        The provisional ACK was never sent, so it is not replayed: the resend gets
        the ACK the actions decide, like the original, within the same timeout.
        Executions already finished (the original's answer may be on its way, or
        the gateway restarted meanwhile) decide at once from the store.
        """
        waiting = _waiting_flows(flows)
        timeout = _ack_timeout(waiting)
        error: AckError | None = None
        watches: list[Deferred[Finished]] = []
        try:
            states = await self._execution_states(message_id)
        except Exception:
            # Answer this resend with an error, but store nothing: the outcome is
            # still to come, and the next resend may get it.
            log.failure("could not read the executions of a resent message")
            unread = AckError(207, "", "actions' outcome could not be read")
            return self._nak(header, Outcome.ERROR, unread)
        for state in states:
            if state.flow_id not in waiting or state.state == "done":
                continue
            if state.state in ("failed", "held"):
                # Held: its action could not be rendered; an operator must act.
                error = AckError(207, "", f"actions {state.state}: {state.error}"[:200])
                break
            watches.append(self._watch(state.id, timeout))
        return await self._after_actions(header, message_id, watches, timeout, error)

    async def _after_actions(
        self,
        header: Header,
        message_id: int | None,
        watches: list[Deferred[Finished]],
        timeout: float,
        error: AckError | None = None,
    ) -> Answer:
        """The ACK reflects the action chain's outcome, within the flows' timeout.

        ``error``, when given, is already decided: the watches are dropped.
        """
        assert message_id is not None
        error = await _settle(watches, timeout, error)
        outcome = Outcome.ACCEPT if error is None else Outcome.ERROR
        code, ack = self._ack(header, outcome, error, self._now())
        try:
            await self._committer.database.transaction(messages.update_ack, message_id, code, ack)
        except Exception:
            log.failure(
                "could not store the after-actions ACK (control ID {control_id})",
                control_id=header.control_id,
            )
        if error is not None:
            self.stats.errors[error.code] += 1
        return self._answer(code, ack)

    async def _application_ack(
        self,
        header: Header,
        message_id: int | None,
        watches: list[Deferred[Finished]],
        timeout: float,
        error: AckError | None = None,
    ) -> ApplicationAck:
        """Enhanced mode: the application ACK, once the waited-for actions settle.

        AA when they are done (or nothing is waited for), AE 207 when one failed,
        was held or did not finish within ``timeout``; none when MSH-16 says so.
        ``error``, when given, is already decided: the watches are dropped.
        """
        error = await _settle(watches, timeout, error)
        outcome = Outcome.ACCEPT if error is None else Outcome.ERROR
        code = "AA" if error is None else "AE"
        if error is not None:
            self.stats.errors[error.code] += 1
        if not _wants_application_ack(header, outcome):
            return ApplicationAck(b"", code, header.control_id, message_id)
        ack = build_ack(
            header,
            code,
            control_id=self._control_ids.next(),
            timestamp=hl7_timestamp(self._now()),
            error=error,
        )
        self.stats.acks[code] += 1
        return ApplicationAck(ack, code, header.control_id, message_id)

    async def _replay_application_ack(
        self, header: Header, message_id: int | None, flows: tuple[FlowRoute, ...]
    ) -> ApplicationAck:
        """A resend's application ACK, from its executions' states (see _replay_pending)."""
        waiting = _application_waiting(flows)
        timeout = _ack_timeout(waiting)
        error: AckError | None = None
        watches: list[Deferred[Finished]] = []
        try:
            states = (
                await self._execution_states(message_id)
                if message_id is not None and waiting
                else []
            )
        except Exception:
            log.failure("could not read the executions of a resent message")
            states = []
            error = AckError(207, "", "actions' outcome could not be read")
        for state in states:
            if state.flow_id not in waiting or state.state == "done":
                continue
            if state.state == "failed":
                error = AckError(207, "", f"actions failed: {state.error}"[:200])
                break
            watches.append(self._watch(state.id, timeout))
        return await self._application_ack(header, message_id, watches, timeout, error)

    def application_ack_lost(self, ack: ApplicationAck, peer: str) -> None:
        """An application ACK was ready after its connection had closed: log and record it."""
        self.stats.application_acks_lost += 1
        log.warn(
            "application ACK {ack_code} not sent: connection closed (control ID {control_id})",
            ack_code=ack.code,
            control_id=ack.control_id,
            peer=peer,
            tenant=self.tenant.name,
        )
        row = LogEntry(
            at=self._now(),
            tenant=self.tenant.name,
            message_id=ack.message_id,
            control_id=ack.control_id,
            event="application ack lost",
            outcome="not sent",
            ack_code=ack.code,
            reason="connection closed before the application ACK",
        )
        recording = self._committer.database.transaction(logs.insert_logs, [row])
        recording.addErrback(
            lambda failure: log.failure(
                "could not record a lost application ACK (control ID {control_id})",
                failure,
                control_id=ack.control_id,
            )
        )

    def _inbound_ack(self, header: Header) -> Answer:
        # An ACK is never acknowledged, not even a malformed one: that way
        # lies an endless loop between two gateways.
        self.stats.inbound_acks += 1
        log.info(
            "inbound ACK ignored (control ID {control_id})",
            control_id=header.control_id,
            tenant=self.tenant.name,
        )
        return NO_ANSWER

    def _log_refused(self, header: Header, code: int) -> None:
        """202/203: the tenant does not take this processing ID or version (no PHI)."""
        log.info(
            "message refused: AR {code} (control ID {control_id})",
            code=code,
            control_id=header.control_id,
            message_type=header.event_type,
            tenant=self.tenant.name,
        )

    def _answer(self, code: str, ack: bytes) -> Answer:
        if not ack:
            return NO_ANSWER
        self.stats.acks[code] += 1
        return Answer(ack)

    def _nak(self, header: Header, outcome: Outcome, error: AckError) -> Answer:
        self.stats.errors[error.code] += 1
        code, ack = self._ack(header, outcome, error, self._now())
        if not ack:
            return NO_ANSWER
        self.stats.acks[code] += 1
        return Answer(ack)

    def _ack(
        self, header: Header, outcome: Outcome, error: AckError | None, now: float
    ) -> tuple[str, bytes]:
        """The ACK code for ``outcome`` and the ACK to send (empty when the sender's
        MSH-15 asks for none), with a fresh control ID and MSH-7 from ``now``."""
        code = ack_code(header, outcome)
        if not _wants_accept_ack(header, outcome):
            if outcome is Outcome.ACCEPT or not _wants_application_ack(header, outcome):
                return code, b""
            # No accept ACK for a refusal (MSH-15 NE or SU), but the sender waits for
            # an application ACK that no later step will send: the refusal is it.
            code = "AE" if outcome is Outcome.ERROR else "AR"
        ack = build_ack(
            header,
            code,
            control_id=self._control_ids.next(),
            timestamp=hl7_timestamp(now),
            error=error,
        )
        return code, ack


async def _settle(
    watches: list[Deferred[Finished]], timeout: float, error: AckError | None = None
) -> AckError | None:
    """The error of the first watched execution not done (None: all done).

    ``error``, when given, is already decided: the watches are dropped.
    """
    for watching in watches if error is None else ():
        try:
            finished = await watching
        except Exception:
            error = AckError(207, "", f"actions did not finish within {timeout:g}s")
            break
        if finished.state != "done":
            error = AckError(207, "", f"actions {finished.state}: {finished.reason}"[:200])
            break
    for other in watches:
        # The answer is decided: stop the other waits, and consume their failures
        # (a timeout or the cancellation) so none is logged as unhandled.
        other.addErrback(lambda _failure: None)
        other.cancel()
    return error


def _application_waiting(flows: tuple[FlowRoute, ...]) -> dict[str, FlowRoute]:
    """The routed flows whose enhanced-mode application ACK waits for their actions."""
    return {r.flow_id: r for r in flows if r.application_ack == "after_actions" and r.destinations}


def _waiting_flows(flows: tuple[FlowRoute, ...]) -> dict[str, FlowRoute]:
    """The routed flows whose ACK waits for their actions."""
    return {r.flow_id: r for r in flows if r.ack == "after_actions" and r.destinations}


def _ack_timeout(waiting: dict[str, FlowRoute]) -> float:
    """How long an "after actions" ACK waits: the shortest timeout of its flows."""
    return min((route.ack_timeout for route in waiting.values()), default=0.0)


def _sender(header: Header) -> str:
    """The sender key of G3: MSH-3 and MSH-4 (a sender may reconnect from another port)."""
    return f"{header.sending_application}|{header.sending_facility}"[:255]
