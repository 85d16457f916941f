"""The executor: runs each flow's action chain for each stored message.

Pending executions are taken in arrival order; for each, the next action's
body is rendered from the trigger message (parsed here, once, only because a
flow needs its fields), the earlier actions' responses and the app's
variables, then enqueued to the delivery engine in the same commit that
moves the execution on. An action that cannot be rendered holds that
execution with the reason (its message was acknowledged: an operator sees it,
fixes the flow and releases it, which renders it again); other executions and
flows go on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from attrs import define, field
from sqlalchemy import Connection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from udsgateway.clock import Wall, wall_of
from udsgateway.flows import App, Flow
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.hl7.header import HeaderProblem, parse_header
from udsgateway.hl7.message import Message, PathSyntaxError
from udsgateway.interfaces import (
    FencedError,
    IDeliveryOutcomes,
    IDeliveryQueue,
    IFlowRunner,
    ILaneFence,
)
from udsgateway.mapping.templating import (
    RenderError,
    Template,
    TemplateError,
    compile_template,
)
from udsgateway.outbound.render import read_trigger, render_action
from udsgateway.store import apps, executions, leases, outbox
from udsgateway.store.engine import Database
from udsgateway.store.records import (
    DELIVERED,
    Advanced,
    CommitResult,
    Finished,
    NewDelivery,
    Origin,
    PendingWork,
    Settlement,
    Transition,
)

log = Logger()


def _finished_of(connection: Connection, execution_ids: Sequence[int]) -> list[Finished]:
    """The finished ones among these executions, as their watchers see them."""
    return executions.finished_of(
        connection, execution_ids, outbox.held_of(connection, execution_ids)
    )


def _count(table: dict[str, dict[str, int]], flow_id: str, outcome: str) -> None:
    counts = table.get(flow_id)
    if counts is None:
        counts = table[flow_id] = {}
    counts[outcome] = counts.get(outcome, 0) + 1


def flow_of_lane(lane: str) -> str:
    """The Flow ID of a lane named by ``lane_name``."""
    return lane.split("/", 1)[0]


def _checks(
    tokens: Mapping[tuple[str, int], object] | None, work: Sequence[PendingWork]
) -> list[object]:
    """The distinct tokens of the flow actions of ``work`` (none without a fence)."""
    if tokens is None:
        return []
    found: list[object] = []
    for item in work:
        token = tokens.get((item.flow_id, item.step))
        if token is not None and token not in found:
            found.append(token)
    return found


def lane_name(flow_id: str, step: int, key_value: str | None = None) -> str:
    """The lane of a flow action; with an ordering key, one lane per key value.

    The key value (a patient identifier, say) is hashed: lane names appear in
    logs and must carry no PHI (G6).
    """
    lane = f"{flow_id}/{step}"
    if key_value is not None:
        lane += "#" + hashlib.sha256(key_value.encode("utf-8")).hexdigest()[:16]
    return lane


@define
class _FlowPlan:
    app: App
    flow: Flow
    templates: tuple[Template | TemplateError, ...]
    #: Each action's endpoint and delivery policy, built once: every delivery carries them.
    targets: tuple[tuple[str, dict[str, Any]], ...]


@implementer(IFlowRunner, IDeliveryOutcomes)
@define(eq=False)
class Executor:
    """Turns pending executions into deliveries, in arrival order.

    Ingest holds it as its ``IFlowRunner``; the delivery engine tells it of
    recorded outcomes as its ``IDeliveryOutcomes``; it hands committed
    deliveries to ``queue`` (the dispatcher, an ``IDeliveryQueue``).
    """

    database: Database
    queue: IDeliveryQueue
    clock: IReactorTime
    control_ids: ControlIdSource
    batch_size: int = 64
    #: Each tenant's codec for messages without MSH-18 (its default_charset).
    charsets: dict[str, str] = field(factory=dict)
    _plans: dict[str, _FlowPlan] = field(factory=dict)
    _steps: dict[str, int] = field(factory=dict)
    _running: bool = False
    _dirty: bool = False
    _watchers: dict[int, list[Deferred[Finished]]] = field(factory=dict)
    #: Called for each delivery once its enqueue committed, before the dispatcher
    #: hears of it (fault injection in tests: tap.py's crash points).
    after_enqueue: Callable[[], None] | None = None
    rendered: int = 0
    failed: int = 0
    #: Executions held because their action could not be rendered.
    held: int = 0
    #: Since start, per Flow ID: actions by outcome (``rendered``, ``failed``,
    #: ``held``: could not be rendered) and executions that ended by outcome
    #: (``done``, ``failed``, ``held``: held by an action or a destination's answer).
    #: Counted from events in memory (the metrics and the status endpoint read them).
    flow_actions: dict[str, dict[str, int]] = field(factory=dict)
    flow_executions: dict[str, dict[str, int]] = field(factory=dict)
    _poller: LoopingCall | None = None
    #: The last look at pending executions filled a whole batch: the executor is
    #: behind, and new messages' first actions are not rendered before their commit
    #: (the store could not fold them). True until the first look, at start.
    _behind: bool = True
    #: Wall clock for timestamps (log lines, a template's ``now``); None: ``clock``'s.
    wall: Wall | None = None
    #: Several nodes on one database: which flow actions are this node's to render
    #: (None: all, always). A pending execution at step ``n`` of flow ``F`` belongs to
    #: the lane ``F/n`` (without its ordering key: one node renders all of a flow
    #: action's executions, in arrival order); the executor takes only those whose
    #: token it holds, and checks the tokens in the transaction that enqueues.
    fence: ILaneFence | None = None
    #: Tell the other nodes of new deliveries and pending executions at each commit
    #: (PostgreSQL NOTIFY, ``store.leases.announce_work``): a cluster node.
    announce: bool = False
    #: Transactions of this executor refused by the fence (a bucket taken over).
    fenced: int = 0

    def _wall(self) -> float:
        return wall_of(self.clock, self.wall)()

    def load(self, apps: Sequence[App]) -> None:
        """Take the current flows (at start and after every reload)."""
        plans = {}
        for app in apps:
            for flow in app.flows:
                templates: list[Template | TemplateError] = []
                for action in flow.actions:
                    try:
                        templates.append(compile_template(action.template))
                    except TemplateError as error:
                        templates.append(error)
                targets = tuple((a.endpoint, a.delivery_policy) for a in flow.actions)
                plans[flow.flow_id] = _FlowPlan(app, flow, tuple(templates), targets)
        self._plans = plans
        # Replaced whole, never mutated: the database thread reads it.
        self._steps = {flow_id: len(plan.flow.actions) for flow_id, plan in plans.items()}

    # -- hooks for the delivery engine (after_record runs in the database thread)

    def after_record(
        self, connection: Connection, settled: list[Settlement], found: Mapping[int, Origin]
    ) -> Advanced:
        steps = self._steps
        if self.fence is not None:
            # Another node may have saved a flow this one has not loaded yet: its
            # executions must not end early for want of its later actions.
            unknown = {origin.flow_id for origin in found.values()} - steps.keys()
            if unknown:
                steps = {**steps, **apps.action_counts(connection, unknown)}
        advanced = executions.advance(connection, settled, found, steps, self._wall())
        if self.announce and (advanced.pending or advanced.finished or advanced.held):
            # The next actions' executions are pending: their flow action may be
            # another node's. Finished ones may be awaited by another node's inbound.
            leases.announce_work(
                connection,
                steps=(
                    (found[row.execution_id].flow_id, row.step + 1)
                    for row in settled
                    if advanced.pending
                    and row.execution_id is not None
                    and row.execution_id in found
                    and row.state == DELIVERED
                ),
                finished=(item.execution_id for item in advanced.finished + advanced.held),
            )
        return advanced

    def on_recorded(self, advanced: Any) -> None:
        if not isinstance(advanced, Advanced):
            return
        for item in advanced.finished + advanced.held:
            if item.flow_id:
                _count(self.flow_executions, item.flow_id, item.state)
            self._finished(item)
        if advanced.pending:
            self.wake()

    # -- the fold: a new message's first actions, rendered before its commit

    def first_actions(
        self, tenant: str, flow_ids: Sequence[str], raw: bytes
    ) -> tuple[NewDelivery | None, ...]:
        """Render the first action of each flow for a message about to be committed.

        The inbound commit then stores each execution already waiting on its
        action and enqueues that action in the same transaction
        (``executions.commit_inbound``), which saves the executor a read, a
        transaction and a parse of the message. Whether an execution is folded is
        decided in that transaction: not while older executions of its flow are
        pending at step 0, whose actions must reach the lane first (G2); then this
        render is simply not used. None for a flow whose action did not render (the
        executor takes that execution, and reports why, as for any other); nothing
        at all while the executor is behind.
        """
        if self._behind:
            return ()
        try:
            trigger = self._trigger(tenant, raw)
        except Exception:
            # Unreadable, or a bug: the executor meets it again, and reports it.
            return ()
        return tuple(self._first_action(tenant, flow_id, trigger, raw) for flow_id in flow_ids)

    def _first_action(
        self, tenant: str, flow_id: str, trigger: Message, raw: bytes
    ) -> NewDelivery | None:
        plan = self._plans.get(flow_id)
        if plan is None or not plan.flow.actions:
            return None
        template = plan.templates[0]
        if isinstance(template, TemplateError):
            return None
        try:
            return self._delivery(plan, 0, template, tenant, trigger, (), None, raw)
        except Exception:
            # A render error, or a bug: the executor meets it again, and reports it.
            return None

    def stored(self, result: CommitResult) -> None:
        """A message and its executions are committed: the folded ones' deliveries go
        to the dispatcher, and the executor runs the ones stored pending."""
        self.rendered += len(result.enqueued)
        for _delivery_id, delivery in result.enqueued:
            _count(self.flow_actions, flow_of_lane(delivery.lane), "rendered")
        self._hand_over(result.enqueued)
        if result.pending:
            self.wake()

    def _hand_over(self, enqueued: Sequence[tuple[int, NewDelivery]]) -> None:
        """Committed deliveries: the dispatcher runs their lanes."""
        for _delivery_id, delivery in enqueued:
            if self.after_enqueue is not None:
                self.after_enqueue()
            self.queue.enqueued(delivery.lane, delivery.destination, delivery.protocol)

    def is_full(self, destination: str) -> bool:
        """Backpressure: the delivery queue of ``destination`` is at its cap."""
        return self.queue.is_full(destination)

    # -- watchers: the "after actions" ACK timing

    def watch(self, execution_id: int, timeout: float) -> Deferred[Finished]:
        """Fire when the execution is done, failed or held; fail after ``timeout``."""
        waiting: Deferred[Finished] = Deferred()
        self._watchers.setdefault(execution_id, []).append(waiting)

        def forget(result: Any) -> Any:
            watchers = self._watchers.get(execution_id, [])
            if waiting in watchers:
                watchers.remove(waiting)
            if not watchers:
                self._watchers.pop(execution_id, None)
            return result

        waiting.addTimeout(timeout, self.clock)
        waiting.addBoth(forget)
        return waiting

    def _finished(self, item: Finished) -> None:
        for waiting in self._watchers.pop(item.execution_id, []):
            waiting.callback(item)

    # -- running

    def poll(self, interval: float) -> None:
        """Look for pending executions every ``interval`` seconds too: an operator's
        ``executions release`` from the command line is picked up by this."""
        if self._poller is not None:
            return
        self._poller = LoopingCall(self._poll)
        self._poller.clock = self.clock
        self._poller.start(interval, now=False).addErrback(
            lambda failure: log.failure("executor poll stopped", failure)
        )

    def _all_finished(self, found: Sequence[Finished]) -> None:
        for item in found:
            self._finished(item)

    def _poll(self) -> None:
        self.wake()
        if self.announce:
            # A cluster node: an execution awaited here may have finished on another
            # node while this one's listener was not told (the poll is the backup).
            self.finished_announced((), everything=True)

    def stop_polling(self) -> None:
        """Stop ``poll`` (the service stopping)."""
        poller, self._poller = self._poller, None
        if poller is not None and poller.running:
            poller.stop()

    def wake(self) -> None:
        """There may be pending executions: run them (at most one loop at a time)."""
        if self._running:
            self._dirty = True
            return
        done = Deferred.fromCoroutine(self._run())
        done.addErrback(lambda failure: log.failure("executor loop failed", failure))

    async def _run(self) -> None:
        self._running = True
        try:
            while True:
                self._dirty = False
                tokens = self._tokens()
                if tokens is not None and not tokens:
                    # No flow action is this node's now: nothing of its own to be
                    # behind on (the fold's check in the store keeps the order).
                    self._behind = False
                    return
                steps = None if tokens is None else list(tokens)
                work = await self.database.transaction(executions.pending, self.batch_size, steps)
                self._behind = len(work) >= self.batch_size
                if not work:
                    if self._dirty:
                        continue
                    return
                transitions = [self._transition(item) for item in work]
                try:
                    enqueued = await self.database.transaction(
                        self._apply,
                        transitions,
                        self._wall(),
                        _checks(tokens, work),
                    )
                except FencedError as error:
                    # A bucket was taken over since the read: its new owner renders
                    # these executions (nothing of this transaction was committed).
                    self.fenced += 1
                    log.info("executor: {error}; the new owner renders them", error=error)
                    return  # woken again when this node gains buckets, or by its poll
                self._hand_over(enqueued)
                for item, transition in zip(work, transitions, strict=True):
                    if transition.delivery is None:
                        outcome = "held" if transition.hold else "failed"
                        if transition.hold:
                            self.held += 1
                        else:
                            self.failed += 1
                        _count(self.flow_actions, item.flow_id, outcome)
                        _count(self.flow_executions, item.flow_id, outcome)
                        self._finished(
                            Finished(
                                transition.execution_id,
                                transition.state,
                                transition.error,
                                item.flow_id,
                            )
                        )
                    else:
                        _count(self.flow_actions, item.flow_id, "rendered")
                if len(work) < self.batch_size and not self._dirty:
                    return
        finally:
            self._running = False

    def _tokens(self) -> dict[tuple[str, int], object] | None:
        """The flow actions (Flow ID, step) this node renders now, with their tokens;
        None: all of them (no fence)."""
        if self.fence is None:
            return None
        tokens = {}
        for flow_id, count in self._steps.items():
            for step in range(count):
                token = self.fence.token(lane_name(flow_id, step))
                if token is not None:
                    tokens[(flow_id, step)] = token
        return tokens

    def _apply(
        self,
        connection: Connection,
        transitions: Sequence[Transition],
        now: float,
        checks: Sequence[object],
    ) -> list[tuple[int, NewDelivery]]:
        """The claim: enqueue and move the executions on, if every token still holds
        (``FencedError`` rolls the whole transaction back)."""
        if self.fence is not None:
            for token in checks:
                self.fence.check(connection, token)
        enqueued = executions.apply(connection, transitions, now)
        ended = [t.execution_id for t in transitions if t.delivery is None]
        if self.announce and (enqueued or ended):
            leases.announce_work(
                connection,
                ((d.lane, d.destination, d.protocol) for _id, d in enqueued),
                finished=ended,
            )
        return enqueued

    def finished_announced(self, execution_ids: Sequence[int], everything: bool = False) -> None:
        """Executions finished on some node (NOTIFY): the watchers of those this node's
        inbound waits on ("after actions" ACKs) get their state from the store.
        ``everything``: look at every watched execution."""
        watched = [
            execution_id
            for execution_id in (list(self._watchers) if everything else execution_ids)
            if execution_id in self._watchers
        ]
        if not watched:
            return
        reading = self.database.transaction(_finished_of, watched)
        reading.addCallback(self._all_finished)
        reading.addErrback(
            lambda failure: log.failure("reading finished executions failed", failure)
        )

    def work_announced(self, steps: Sequence[tuple[str, int]], everything: bool = False) -> None:
        """Another node (or this one) committed pending executions at ``steps``: run
        them now if any of those flow actions is this node's."""
        if everything or self.fence is None:
            self.wake()
            return
        for flow_id, step in steps:
            if self.fence.token(lane_name(flow_id, step)) is not None:
                self.wake()
                return

    def _transition(self, work: PendingWork) -> Transition:
        try:
            return self._plan_transition(work)
        except Exception as error:
            # A bug here must fail this execution, never stop every flow's actions.
            log.failure(
                "action {step} of flow {flow_id} failed unexpectedly (control ID {control_id})",
                step=work.step,
                flow_id=work.flow_id,
                control_id=work.control_id,
            )
            return Transition(
                work.execution_id, error=f"internal error ({type(error).__name__})", hold=True
            )

    def _plan_transition(self, work: PendingWork) -> Transition:
        plan = self._plans.get(work.flow_id)
        if plan is None:
            return Transition(work.execution_id, error="the flow no longer exists")
        if work.step >= len(plan.flow.actions):
            return Transition(work.execution_id, error="the flow no longer has this action")
        action = plan.flow.actions[work.step]
        template = plan.templates[work.step]
        if isinstance(template, TemplateError):
            return Transition(work.execution_id, error=f"template: {template.problem}", hold=True)
        try:
            trigger = self._trigger(work.tenant, work.raw)
            delivery = self._delivery(
                plan,
                work.step,
                template,
                work.tenant,
                trigger,
                work.responses,
                work.execution_id,
                work.raw,
            )
        except RenderError as error:
            log.warn(
                "action {step} of flow {flow_id} cannot be rendered, execution held: {reason}"
                " (control ID {control_id})",
                step=work.step,
                flow_id=work.flow_id,
                reason=error.reason,
                control_id=work.control_id,
            )
            return Transition(work.execution_id, error=f"action {action.name}: {error}", hold=True)
        self.rendered += 1
        return Transition(work.execution_id, delivery)

    def _trigger(self, tenant: str, raw: bytes) -> Message:
        """The trigger message, parsed whole (templates read any of its fields)."""
        return read_trigger(raw, self.charsets.get(tenant, "latin-1"))

    def _delivery(
        self,
        plan: _FlowPlan,
        step: int,
        template: Template,
        tenant: str,
        trigger: Message,
        responses: Sequence[bytes | None],
        execution_id: int | None,
        raw: bytes,
    ) -> NewDelivery:
        """Action ``step`` of the flow, rendered for ``trigger``; RenderError if it cannot be."""
        action = plan.flow.actions[step]
        body = render_action(
            plan.app,
            plan.flow,
            step,
            template,
            trigger,
            raw,
            responses,
            charset=self.charsets.get(tenant, "latin-1"),
            now=self._now,
            new_control_id=self.control_ids.next,
        )
        try:
            key_value = trigger.get(action.ordering_key) if action.ordering_key else None
        except PathSyntaxError:
            raise RenderError("ordering_key is not an HL7 path") from None
        # The destination's ACK echoes the MSH-10 of the bytes it gets: read it from
        # those bytes, decoded as they were encoded (their MSH-18, else the tenant's
        # charset), never from the template's text or with another default.
        header = parse_header(body, default_charset=self.charsets.get(tenant, "latin-1"))
        if isinstance(header, HeaderProblem) or not header.control_id:
            problem = header.diagnostic if isinstance(header, HeaderProblem) else "MSH-10 empty"
            raise RenderError(f"the rendered message's control ID is unreadable: {problem}")
        endpoint, policy = plan.targets[step]
        return NewDelivery(
            lane=lane_name(plan.flow.flow_id, step, key_value),
            destination=endpoint,
            protocol=action.protocol,
            control_id=header.control_id,
            payload=body,
            policy=policy,
            execution_id=execution_id,
            step=step,
        )

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._wall(), tz=UTC)
