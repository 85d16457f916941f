"""The composition root: the one place that builds the gateway's object graph.

``assemble`` takes the configuration's tenants, a database and a clock and
builds, once, what every running gateway has: the inbound group committer,
one ``Ingest`` and ``ListenerFactory`` per tenant, the executor and the
dispatcher, with their timings, plans and charsets. ``GatewayService`` uses
it, and so does every test harness (``udsgateway.testing``), so what a test
runs is what the service runs.

The seams are typed, never optional callables: ingest holds the executor as
its ``IFlowRunner``; the executor holds the dispatcher as its
``IDeliveryQueue``; the dispatcher holds the executor as its
``IDeliveryOutcomes``. That last link closes a cycle, so it is the one
attribute set after construction, and it is set here only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from attrs import define, field, frozen
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from udsgateway.clock import Wall
from udsgateway.config import DeliveryConfig, TenantConfig
from udsgateway.flows import App
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.hl7.header import codec_for
from udsgateway.inbound.ingest import Ingest
from udsgateway.inbound.listener import ListenerFactory
from udsgateway.inbound.routing import RoutingTable
from udsgateway.inbound.searchkeys import KeyWriter
from udsgateway.interfaces import IDeliveryOutcomes, IFlowRunner, ILaneFence
from udsgateway.outbound.dispatcher import Dispatcher
from udsgateway.outbound.executor import Executor
from udsgateway.outbound.policy import Timing
from udsgateway.store import inbound
from udsgateway.store.engine import Database, GroupCommitter, SharedCommits
from udsgateway.store.records import CommitResult, InboundRecord

#: The function every inbound group commit runs: the messages, their executions,
#: and the first actions rendered before the commit (the fold), in one transaction.
COMMIT_INBOUND = inbound.commit_inbound


@frozen
class Faults:
    """Fault-injection points (the crash tests' ``UDSGATEWAY_TEST_CRASH_AT``).

    Each is called at its moment, or never when None (always, in production):
    ``before_commit`` in the database thread before an inbound group commit;
    ``after_commit`` after an inbound commit, before its answer is written;
    ``after_enqueue`` once a delivery's enqueue committed, before its lane hears
    of it; ``after_send`` when a destination answered, before the outcome is
    recorded.
    """

    before_commit: Callable[[], None] | None = None
    after_commit: Callable[[], None] | None = None
    after_enqueue: Callable[[], None] | None = None
    after_send: Callable[[], None] | None = None


NO_FAULTS = Faults()


@define
class Timings:
    """Each action endpoint's timeouts and backoff, from the loaded flows.

    The dispatcher asks it for an endpoint's timing (``timings(endpoint)``);
    ``load`` replaces the table whole at each flow reload.
    """

    _by_endpoint: Mapping[str, Timing] = field(factory=dict)
    default: Timing = field(factory=Timing)

    def __call__(self, endpoint: str) -> Timing:
        return self._by_endpoint.get(endpoint, self.default)

    def load(self, apps: Sequence[App]) -> None:
        """Take the timings of every action of ``apps``."""
        self._by_endpoint = {
            action.endpoint: Timing(
                connect_timeout=action.connect_timeout,
                response_timeout=action.response_timeout,
                backoff_initial=action.backoff_initial,
                backoff_max=action.backoff_max,
            )
            for app in apps
            for flow in app.flows
            for action in flow.actions
        }


def tenant_charset(tenant: TenantConfig) -> str:
    """The codec for a tenant's messages without MSH-18 (its ``default_charset``)."""
    return codec_for(tenant.default_charset, "latin-1") or "latin-1"


def build_dispatcher(
    database: Database,
    clock: IReactorTime,
    reactor: Any,
    delivery: DeliveryConfig,
    *,
    timing: Callable[[str], Timing],
    wall: Wall | None = None,
    rng: random.Random | None = None,
    endpoint_factory: Callable[[Any, str], IStreamClientEndpoint] = clientFromString,
    faults: Faults = NO_FAULTS,
    outcomes: IDeliveryOutcomes | None = None,
    fence: ILaneFence | None = None,
) -> Dispatcher:
    """The delivery engine; ``assemble`` makes the executor its ``outcomes``."""
    return Dispatcher(
        database,
        clock,
        reactor,
        outcomes=outcomes,
        after_send=faults.after_send,
        timing=timing,
        page_size=delivery.page_size,
        max_active_lanes=delivery.max_active_lanes,
        held_poll=delivery.held_poll,
        max_queued_per_destination=delivery.max_queued_per_destination,
        rng=rng if rng is not None else random.Random(),
        wall=wall,
        endpoint_factory=endpoint_factory,
        fence=fence,
    )


def _the_executor(executor: Executor) -> IFlowRunner | None:
    return executor


@define(eq=False)
class Assembly:
    """The gateway's objects, built by ``assemble``; ``load`` takes new flows."""

    tenants: tuple[TenantConfig, ...]
    committer: GroupCommitter[InboundRecord, CommitResult]
    dispatcher: Dispatcher
    executor: Executor
    timings: Timings
    ingests: dict[str, Ingest]
    factories: dict[str, ListenerFactory]

    def load(self, apps: Sequence[App]) -> None:
        """Take the current flows (at start and after each reload): the executor's
        plans, the actions' timings and each tenant's routing table."""
        self.executor.load(apps)
        self.timings.load(apps)
        for tenant in self.tenants:
            self.ingests[tenant.name].routes = RoutingTable.build(
                [app for app in apps if app.tenant == tenant.name],
                tenant.app_id_field,
                tenant.flow_id_field,
            )


def assemble(
    tenants: Sequence[TenantConfig],
    database: Database,
    clock: IReactorTime,
    control_ids: ControlIdSource,
    *,
    reactor: Any = None,
    delivery: DeliveryConfig | None = None,
    commit_max_batch: int = 512,
    group_by_turn: bool = True,
    wall: Wall | None = None,
    faults: Faults = NO_FAULTS,
    guard: Callable[[], None] | None = None,
    on_damaged: Callable[[str], None] | None = None,
    dispatcher: Dispatcher | None = None,
    timings: Timings | None = None,
    outbound_control_ids: ControlIdSource | None = None,
    flow_runner: Callable[[Executor], IFlowRunner | None] = _the_executor,
    fold_while_idle: bool = False,
    fence: ILaneFence | None = None,
    key_writer: KeyWriter | None = None,
) -> Assembly:
    """Build the gateway's object graph for ``tenants`` on ``database`` and ``clock``.

    ``reactor`` (default: ``clock``) makes the dispatcher's connections.
    ``group_by_turn`` starts an idle group commit at the end of the clock's turn,
    as the service does (False: at once, for tests on an inline database).
    ``guard`` and ``on_damaged`` are the group committer's database-file checks.
    ``dispatcher`` and ``timings``, when given, are used instead of new ones (a
    test harness with in-memory destinations builds its dispatcher with
    ``build_dispatcher``). ``outbound_control_ids`` numbers the executor's
    messages (default: ``control_ids``). ``flow_runner`` chooses what ingest runs
    flows with (default: the executor; None: store only), and ``fold_while_idle``
    renders first actions before every commit (tests on an inline database).
    ``fence`` (a cluster node, ``udsgateway.cluster.fence.BucketFence``): the
    executor and the dispatcher run only this node's flow actions and lanes, and
    every commit that makes work announces it to the other nodes (NOTIFY).
    ``key_writer``: the search keys are written after each commit, in batches, by
    it (the service); None: in the commit itself.
    """
    tenants = tuple(tenants)
    timings = timings if timings is not None else Timings()
    if dispatcher is None:
        dispatcher = build_dispatcher(
            database,
            clock,
            reactor if reactor is not None else clock,
            delivery if delivery is not None else DeliveryConfig(),
            timing=timings,
            wall=wall,
            faults=faults,
            fence=fence,
        )
    executor = Executor(
        database,
        dispatcher,
        clock,
        outbound_control_ids if outbound_control_ids is not None else control_ids,
        charsets={tenant.name: tenant_charset(tenant) for tenant in tenants},
        after_enqueue=faults.after_enqueue,
        wall=wall,
        fence=fence,
        announce=fence is not None,
    )
    # The one assignment after construction: the dispatcher and the executor
    # need each other (outcomes go back to the executor that enqueued them).
    dispatcher.outcomes = executor
    committer: GroupCommitter[InboundRecord, CommitResult] = GroupCommitter(
        database,
        (
            COMMIT_INBOUND
            if fence is None and key_writer is None
            else partial(COMMIT_INBOUND, announce=fence is not None, write_keys=key_writer is None)
        ),
        commit_max_batch,
        clock=clock if group_by_turn else None,
        before_batch=faults.before_commit,
        guard=guard,
        on_damaged=on_damaged,
    )
    # Inbound groups and delivery outcomes share their transactions: one commit where
    # the relay paid for two (SharedCommits).
    shared = SharedCommits(database, clock=committer.clock)
    shared.join(committer)
    dispatcher.join_commits(shared)
    flows = flow_runner(executor)
    ingests = {
        tenant.name: Ingest(
            tenant,
            committer,
            clock,
            control_ids,
            flows=flows,
            fold_while_idle=fold_while_idle,
            after_commit=faults.after_commit,
            wall=wall,
            stored_keys=key_writer.stored if key_writer is not None else None,
        )
        for tenant in tenants
    }
    factories = {
        tenant.name: ListenerFactory(tenant, ingests[tenant.name], clock) for tenant in tenants
    }
    return Assembly(tenants, committer, dispatcher, executor, timings, ingests, factories)
