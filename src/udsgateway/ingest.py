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

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from udsgateway.ack import AckError, ControlIdSource, Outcome, ack_code, build_ack, hl7_timestamp
from udsgateway.ack import wants_accept_ack as _wants_accept_ack
from udsgateway.clock import Wall, wall_of
from udsgateway.config import TenantConfig
from udsgateway.db import GroupCommitter, is_locked
from udsgateway.executions import Finished
from udsgateway.header import Header, HeaderProblem, codec_for, parse_header
from udsgateway.routing import EMPTY, FlowRoute, Rejected, RoutingTable
from udsgateway.store import CommitOutcome, CommitResult, ExecutionState, InboundRecord

log = Logger()


@frozen
class Answer:
    """What to do on the connection after a frame: write bytes, close, or both."""

    data: bytes | None = None
    close: bool = False


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


@define
class Ingest:
    """The inbound pipeline of one tenant."""

    tenant: TenantConfig
    _committer: GroupCommitter[InboundRecord, CommitResult]
    _clock: IReactorTime
    _control_ids: ControlIdSource
    routes: RoutingTable = EMPTY
    #: Called with each stored message's CommitResult (the executor listens here).
    on_stored: Callable[[CommitResult], None] | None = None
    #: Renders the first action of each of a message's flows before its commit (the
    #: executor's fold: ``Executor.first_actions``), or nothing. Used only while a
    #: commit is running, when the message waits for the next one anyway: an idle
    #: gateway commits and answers at once, and the executor renders after the ACK.
    first_actions: Callable[[str, tuple[str, ...], bytes], tuple[object, ...]] | None = None
    #: Use ``first_actions`` for every message, also when no commit is running (tests
    #: on an inline database, whose commits never overlap a frame).
    fold_while_idle: bool = False
    #: Called after a commit, before its answer is written (fault injection in tests).
    after_commit: Callable[[], None] | None = None
    #: Backpressure: True when a destination's queue is at its cap (NAK 207).
    is_full: Callable[[str], bool] | None = None
    #: "after actions" ACK timing: waits for an execution to finish, within a timeout.
    watch: Callable[[int, float], Deferred[Finished]] | None = None
    #: Stores the ACK finally sent for an "after actions" message (for replays).
    save_ack: Callable[[int, str, bytes], Deferred[None]] | None = None
    #: The executions of a stored message (a resend while its "after actions" ACK
    #: is not decided yet waits for them).
    execution_states: Callable[[int], Deferred[list[ExecutionState]]] | None = None
    stats: IngestStats = field(factory=IngestStats)
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
        first = (
            self.first_actions(self.tenant.name, run_flows, payload)
            if self.first_actions is not None
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
            # Its ACK will reflect the actions: until then a resend must not be
            # given the provisional one (see _replay_pending).
            ack_pending=(error is None and self.watch is not None and bool(_waiting_flows(flows))),
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
        # RELIABILITY.md: AR for a header problem, AE for a content error
        # (control bytes or undecodable bytes in the body, located by offset).
        header_problem = parsed.location.startswith("MSH")
        outcome = Outcome.REJECT if header_problem else Outcome.ERROR
        return self._nak(parsed.header, outcome, problem)

    def _commit_failed(self, failure: Failure, header: Header) -> Answer:
        locked = failure.value is not None and is_locked(failure.value)
        log.warn(
            "commit failed; NAK {code} sent",
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
            if error is not None:
                log.info(
                    "message rejected: {reason}",
                    reason=record.reason,
                    control_id=header.control_id,
                    message_type=header.event_type,
                    tenant=self.tenant.name,
                )
            watches: list[Deferred[Finished]] = []
            timeout = 0.0
            if self.watch is not None and any(r.ack == "after_actions" for r in flows):
                waiting = _waiting_flows(flows)
                timeout = _ack_timeout(waiting)
                # Only the flows that asked for it; watch before the executor hears
                # of the message, since it may finish at once.
                watches = [
                    self.watch(execution_id, timeout)
                    for flow_id, execution_id in zip(
                        record.run_flows, result.execution_ids, strict=True
                    )
                    if flow_id in waiting
                ]
            if self.on_stored is not None and result.execution_ids:
                self.on_stored(result)
            if watches:
                return Deferred.fromCoroutine(
                    self._after_actions(header, result.message_id, watches, timeout)
                )
            return self._answer(record.ack_code, record.ack)
        if result.outcome is CommitOutcome.REFUSED:
            log.warn(
                "destination queue full: NAK 207",
                control_id=header.control_id,
                tenant=self.tenant.name,
            )
            return self._nak(
                header, Outcome.REJECT, AckError(207, "", "destination queue is full")
            )
        if result.outcome is CommitOutcome.REPLAY:
            self.stats.replayed += 1
            if result.ack_pending and result.message_id is not None:
                log.info("duplicate: waits for the actions' ACK", control_id=header.control_id)
                return Deferred.fromCoroutine(
                    self._replay_pending(header, result.message_id, flows)
                )
            log.info("duplicate: stored ACK replayed", control_id=header.control_id)
            return self._answer("replay", result.ack)
        log.warn("same MSH-10 with different content", control_id=header.control_id)
        return self._nak(
            header, Outcome.REJECT, AckError(205, "MSH^1^10", "control id already used")
        )

    def _full_destination(self, flows: tuple[FlowRoute, ...]) -> bool:
        if self.is_full is None:
            return False
        return any(self.is_full(d) for route in flows for d in route.destinations)

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
            states = await self.execution_states(message_id) if self.execution_states else []
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
            if self.watch is not None:
                watches.append(self.watch(state.id, timeout))
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
        outcome = Outcome.ACCEPT if error is None else Outcome.ERROR
        code, ack = self._ack(header, outcome, error, self._now())
        if self.save_ack is not None:
            try:
                await self.save_ack(message_id, code, ack)
            except Exception:
                log.failure("could not store the after-actions ACK", control_id=header.control_id)
        if error is not None:
            self.stats.errors[error.code] += 1
        return self._answer(code, ack)

    def _inbound_ack(self, header: Header) -> Answer:
        # An ACK is never acknowledged, not even a malformed one: that way
        # lies an endless loop between two gateways.
        self.stats.inbound_acks += 1
        log.info("inbound ACK ignored", control_id=header.control_id, tenant=self.tenant.name)
        return NO_ANSWER

    def _log_refused(self, header: Header, code: int) -> None:
        """202/203: the tenant does not take this processing ID or version (no PHI)."""
        log.info(
            "message refused: AR {code}",
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
            return code, b""
        ack = build_ack(
            header,
            code,
            control_id=self._control_ids.next(),
            timestamp=hl7_timestamp(now),
            error=error,
        )
        return code, ack


def _waiting_flows(flows: tuple[FlowRoute, ...]) -> dict[str, FlowRoute]:
    """The routed flows whose ACK waits for their actions."""
    return {r.flow_id: r for r in flows if r.ack == "after_actions" and r.destinations}


def _ack_timeout(waiting: dict[str, FlowRoute]) -> float:
    """How long an "after actions" ACK waits: the shortest timeout of its flows."""
    return min((route.ack_timeout for route in waiting.values()), default=0.0)


def _sender(header: Header) -> str:
    """The sender key of G3: MSH-3 and MSH-4 (a sender may reconnect from another port)."""
    return f"{header.sending_application}|{header.sending_facility}"[:255]
