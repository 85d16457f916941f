"""``/metrics``: the gateway's counters in the Prometheus text format (``udsgw_*``).

The collector reads the counters the gateway keeps anyway (each listener's
``ListenerStats`` and ``IngestStats``, the executor's and the dispatcher's)
at scrape time: nothing is added to the path of a message. Gauges that need
the database (open deliveries per destination and state, the oldest pending
age, open executions per flow) come from a snapshot that the admin service's
timer takes in the database thread (``Metrics.refresh``); a scrape never
queries the database. On a cluster node only the holder of the ``gauges``
singleton job takes that snapshot (``cluster.singleton``), and the node adds
its lease metrics (``udsgw_cluster_*``, ``udsgw_lease_*``,
``udsgw_singleton_running``) from its LeaseManager.

Label values are only operator-named identifiers (listener = tenant name,
flow = Flow ID, destination = ``host:port`` of a destination configured in a
flow) and fixed enums (``LABEL_ENUMS``); a value from a message (a control
ID, a lane key, any field) never becomes a label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from udsgateway.cluster.singleton import GAUGES, JOBS, Singletons
from udsgateway.config import proxied_endpoint
from udsgateway.interfaces import FencedError
from udsgateway.outbound.errors import ATTEMPT_OUTCOMES
from udsgateway.store import gauges
from udsgateway.store.destinations import address_of
from udsgateway.store.engine import COMMIT_BUCKETS, DELIVERY_BUCKETS, Durations

#: ACK codes (MSA-1) counted ("replay": a duplicate answered with its stored ACK);
#: anything else is counted as "other".
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR", "replay")
#: HL7 table 0357 error codes the gateway answers with.
ERROR_CODES = (
    "0",
    "100",
    "101",
    "102",
    "103",
    "200",
    "201",
    "202",
    "203",
    "204",
    "205",
    "206",
    "207",
)
#: Lease transitions of a cluster node (``udsgw_lease_transitions_total``): gained (taken
#: or back after a lapse), released (handed over: share, clean stop), lost (found taken
#: or expired at a round), lapsed (dropped on its own clock: no renewal in time).
TRANSITIONS = ("gained", "released", "lost", "lapsed")
#: Outcomes of an execution of a flow (``udsgw_flow_executions_total``): routed (an
#: accepted message stored for the flow), then how it ended: done, failed, held.
EXECUTION_OUTCOMES = ("routed", "done", "failed", "held")
#: Outcomes of a flow's action (``udsgw_actions_total``).
ACTION_OUTCOMES = ("rendered", "failed", "held")
#: Every label whose values come from a fixed list, with that list.
#: Why a connection to a ``haproxy:`` listener was closed before the listener saw it
#: (the counters of ``wire.proxy.ProxyStats``).
PROXY_REASONS = ("bad_headers", "header_timeouts", "not_from_proxy", "too_many_pending")

LABEL_ENUMS: dict[str, tuple[str, ...]] = {
    "outcome": tuple(
        dict.fromkeys(
            (
                "stored",
                "duplicate",
                "unreadable",
                *EXECUTION_OUTCOMES,
                *ACTION_OUTCOMES,
                *ATTEMPT_OUTCOMES,
            )
        )
    ),
    "code": (*ACK_CODES, *ERROR_CODES, "other"),
    "state": ("queued", "held", "pending", "waiting"),
    "framing": ("mllp", "tcp"),
    "transition": TRANSITIONS,
    "job": JOBS,
    "reason": PROXY_REASONS,
    # Histogram buckets: fixed bounds.
    "le": (
        *sorted({repr(float(bound)) for bound in COMMIT_BUCKETS + DELIVERY_BUCKETS}, key=float),
        "+Inf",
    ),
}
#: Labels whose values are operator-named identifiers ([gateway].node_name for node).
IDENTIFIER_LABELS = ("listener", "flow", "destination", "node")


class GatewayCollector(Collector):
    """Reads the live counters of one GatewayService at each scrape."""

    def __init__(self, gateway: Any, snapshot: dict[str, Any]) -> None:
        self._gateway = gateway
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        gateway = self._gateway
        yield from self._inbound(gateway)
        committer = getattr(gateway, "committer", None)
        if committer is not None:
            yield _histogram(
                "udsgw_store_commit_seconds",
                "Group commits of inbound messages, from hand-over to the database thread "
                "to commit",
                committer.commit_times,
            )
        yield from self._outbound(gateway)
        yield from self._database(self._snapshot)
        leases = getattr(gateway, "leases", None)
        if leases is not None:
            yield from self._cluster(gateway, leases)

    def _inbound(self, gateway: Any) -> Iterable[Any]:
        open_now = GaugeMetricFamily(
            "udsgw_inbound_connections", "Open inbound connections", labels=["listener"]
        )
        connections = CounterMetricFamily(
            "udsgw_inbound_connections", "Inbound connections accepted", labels=["listener"]
        )
        refused = CounterMetricFamily(
            "udsgw_inbound_refused_connections",
            "Inbound connections refused (allowlist, limits)",
            labels=["listener"],
        )
        messages = CounterMetricFamily(
            "udsgw_inbound_messages",
            "Inbound messages by outcome (stored: accepted or rejected, see "
            "udsgw_rejections; duplicate: answered from the store; unreadable: not HL7)",
            labels=["listener", "outcome"],
        )
        acks = CounterMetricFamily(
            "udsgw_acks", "ACKs sent by MSA-1 code", labels=["listener", "code"]
        )
        rejects = CounterMetricFamily(
            "udsgw_rejections", "Messages rejected, by HL7 error code", labels=["listener", "code"]
        )
        proxy_refused = CounterMetricFamily(
            "udsgw_inbound_proxy_refused_connections",
            "Connections to a listener behind the PROXY protocol closed before the listener "
            "saw them, by reason",
            labels=["listener", "reason"],
        )
        for name, factory in gateway.factories.items():
            listener = factory.stats
            ingest = gateway.ingests[name].stats
            open_now.add_metric([name], listener.open_connections)
            connections.add_metric([name], listener.connections)
            refused.add_metric([name], listener.refused)
            if proxied_endpoint(factory.tenant.listen):
                for reason in PROXY_REASONS:
                    proxy_refused.add_metric([name, reason], getattr(listener.proxy, reason))
            messages.add_metric([name, "stored"], ingest.stored)
            messages.add_metric([name, "duplicate"], ingest.replayed)
            messages.add_metric([name, "unreadable"], ingest.unreadable)
            for code, count in _bucket(ingest.acks, ACK_CODES).items():
                acks.add_metric([name, code], count)
            by_code = ingest.errors + getattr(ingest, "rejected", Counter())
            for code, count in _bucket(by_code, ERROR_CODES).items():
                rejects.add_metric([name, code], count)
        latency = HistogramMetricFamily(
            "udsgw_ack_latency_seconds",
            "From an inbound frame taken for processing to its ACK written (commit included)",
            labels=["listener"],
        )
        for name, factory in gateway.factories.items():
            latency.add_metric([name], *_buckets(factory.stats.ack_latency))
        yield from (open_now, connections, refused, proxy_refused, messages, acks, rejects)
        yield latency

    def _outbound(self, gateway: Any) -> Iterable[Any]:
        executor = gateway.executor
        actions = CounterMetricFamily(
            "udsgw_actions",
            "Flow actions by outcome since start (rendered and handed to delivery, "
            "failed, held for an operator: could not be rendered)",
            labels=["flow", "outcome"],
        )
        for flow, counts in sorted(getattr(executor, "flow_actions", {}).items()):
            for outcome in ACTION_OUTCOMES:
                if outcome in counts:
                    actions.add_metric([flow, outcome], counts[outcome])
        executions = CounterMetricFamily(
            "udsgw_flow_executions",
            "Executions of each flow since start: routed (an accepted message stored for "
            "the flow), and how they ended: done, failed, held (for an operator)",
            labels=["flow", "outcome"],
        )
        flows: dict[str, dict[str, int]] = {}
        for ingest in gateway.ingests.values():
            for flow, count in getattr(ingest.stats, "routed", {}).items():
                of_flow = flows.setdefault(flow, {})
                of_flow["routed"] = of_flow.get("routed", 0) + count
        for flow, counts in getattr(executor, "flow_executions", {}).items():
            flows.setdefault(flow, {}).update(counts)
        for flow, counts in sorted(flows.items()):
            for outcome in EXECUTION_OUTCOMES:
                if outcome in counts:
                    executions.add_metric([flow, outcome], counts[outcome])
        dispatcher = gateway.dispatcher
        depth = GaugeMetricFamily(
            "udsgw_queue_depth",
            "Open (queued or held) deliveries per destination, as the dispatcher counts them",
            labels=["destination"],
        )
        for address, count in sorted(_by_address(dispatcher.queued.items()).items()):
            depth.add_metric([address], count)
        delivered = CounterMetricFamily(
            "udsgw_delivered", "Deliveries delivered since start", labels=["destination"]
        )
        for address, count in sorted(getattr(dispatcher, "sent", {}).items()):
            delivered.add_metric([address], count)
        paused = GaugeMetricFamily(
            "udsgw_destination_paused",
            "1 while an operator has the destination paused",
            labels=["destination"],
        )
        for address in sorted(getattr(dispatcher, "paused", {})):
            paused.add_metric([address], 1)
        attempts = CounterMetricFamily(
            "udsgw_outbound_attempts",
            "Delivery attempts recorded since start, by destination and outcome: the "
            "partner's ACK (accepted AA/CA, error AE/CE, rejected AR/CR, other_ack) or why "
            "there was none (timeout, connect_failed, connection_lost, stale_connection, "
            "protocol_error, stopped)",
            labels=["destination", "outcome"],
        )
        for address, counts in sorted(getattr(dispatcher, "attempts", {}).items()):
            for outcome in ATTEMPT_OUTCOMES:
                if outcome in counts:
                    attempts.add_metric([address, outcome], counts[outcome])
        sends = CounterMetricFamily(
            "udsgw_outbound_sends", "Messages sent to a destination", labels=["destination"]
        )
        connects = CounterMetricFamily(
            "udsgw_outbound_connects", "Connections made to a destination", labels=["destination"]
        )
        up = GaugeMetricFamily(
            "udsgw_destination_up",
            "1 while a connection to the destination is open",
            labels=["destination"],
        )
        totals: dict[str, list[int]] = {}
        for endpoint, destination in dispatcher.destinations.items():
            entry = totals.setdefault(address_of(endpoint), [0, 0, 0])
            entry[0] += destination.sent
            entry[1] += destination.connects
            entry[2] = max(entry[2], 1 if getattr(destination, "_current", None) else 0)
        for address, (sent_count, connect_count, is_up) in sorted(totals.items()):
            sends.add_metric([address], sent_count)
            connects.add_metric([address], connect_count)
            up.add_metric([address], is_up)
        waits = Durations()
        for destination in dispatcher.destinations.values():
            for index, count in enumerate(destination.ack_wait.counts):
                waits.counts[index] += count
            waits.total += destination.ack_wait.total
        yield _histogram(
            "udsgw_outbound_ack_wait_seconds",
            "From an outbound message written to the partner's reply read (all destinations)",
            waits,
        )
        yield _histogram(
            "udsgw_delivery_latency_seconds",
            "From a delivery's enqueue to the partner's positive ACK (wall clock)",
            dispatcher.delivery_latency,
        )
        yield from (actions, executions, depth, delivered, paused, attempts, sends, connects, up)

    def _database(self, snapshot: dict[str, Any]) -> Iterable[Any]:
        deliveries = GaugeMetricFamily(
            "udsgw_deliveries",
            "Open deliveries per destination and state (database, refreshed on a timer)",
            labels=["destination", "state"],
        )
        oldest = GaugeMetricFamily(
            "udsgw_oldest_pending_seconds",
            "Age of the oldest open delivery per destination (database, refreshed on a timer)",
            labels=["destination"],
        )
        at = snapshot.get("at", 0.0)
        ages: dict[str, float] = {}
        counts: dict[tuple[str, str], int] = {}
        for endpoint, state, count, first in snapshot.get("deliveries", ()):
            address = address_of(endpoint)
            counts[address, state] = counts.get((address, state), 0) + count
            if first:
                ages[address] = max(ages.get(address, 0.0), at - first)
        for (address, state), count in sorted(counts.items()):
            deliveries.add_metric([address, state], count)
        for destination, age in sorted(ages.items()):
            oldest.add_metric([destination], max(age, 0.0))
        executions = GaugeMetricFamily(
            "udsgw_open_executions",
            "Unfinished executions per flow and state (database, refreshed on a timer)",
            labels=["flow", "state"],
        )
        for flow, state, count in snapshot.get("executions", ()):
            executions.add_metric([flow, state], count)
        refreshed = GaugeMetricFamily(
            "udsgw_metrics_refreshed_timestamp_seconds",
            "When the database-derived gauges were last read",
        )
        refreshed.add_metric([], at)
        yield from (deliveries, oldest, executions, refreshed)

    def _cluster(self, gateway: Any, leases: Any) -> Iterable[Any]:
        """A cluster node's leases, from its LeaseManager and fence (no database)."""
        node = [str(leases.node)]
        fences = {
            id(fence): fence
            for fence in (
                getattr(gateway, "fence", None),
                getattr(gateway.dispatcher, "fence", None),
            )
            if fence is not None
        }
        rejected = sum(getattr(fence, "rejected", 0) for fence in fences.values())
        singletons = getattr(gateway, "singletons", None) or Singletons(None)
        rejected += singletons.rejected
        for kind, name, documentation, value in (
            (
                GaugeMetricFamily,
                "udsgw_cluster_buckets_owned",
                "Buckets this node holds a lease on now",
                len(leases.owned),
            ),
            (
                GaugeMetricFamily,
                "udsgw_cluster_buckets",
                "Buckets of the cluster (fixed)",
                leases.total,
            ),
            (
                GaugeMetricFamily,
                "udsgw_cluster_nodes_live",
                "Live nodes as this node's last round saw them",
                len(leases.nodes),
            ),
            (
                CounterMetricFamily,
                "udsgw_lease_failed_rounds",
                "Lease rounds that failed (database unreachable or in error)",
                leases.failed_rounds,
            ),
            (
                CounterMetricFamily,
                "udsgw_lease_fenced_rejections",
                "Transactions rolled back because this node no longer held the lease "
                "(claims, outcomes, singleton batches)",
                rejected,
            ),
        ):
            family = kind(name, documentation, labels=["node"])
            family.add_metric(node, value)
            yield family
        transitions = CounterMetricFamily(
            "udsgw_lease_transitions",
            "Bucket leases gained, released (handed over), lost (found taken or expired) "
            "and lapsed (not renewed in time: dropped on the node's own clock)",
            labels=["node", "transition"],
        )
        released, lapsed = leases.released_count, leases.lapsed_count
        for transition, count in (
            ("gained", leases.gained_count),
            ("released", released),
            ("lost", max(0, leases.lost_count - released - lapsed)),
            ("lapsed", lapsed),
        ):
            transitions.add_metric([*node, transition], count)
        yield transitions
        if leases.last_round_at is not None:
            age = GaugeMetricFamily(
                "udsgw_lease_round_age_seconds",
                "Seconds since the last successful lease round started (monotonic clock)",
                labels=["node"],
            )
            age.add_metric(node, max(0.0, leases.clock.seconds() - leases.last_round_at))
            yield age
        running = GaugeMetricFamily(
            "udsgw_singleton_running",
            "1 on the node that runs a database-wide job now (it holds the job's lease)",
            labels=["node", "job"],
        )
        for job, singleton in sorted(singletons.jobs.items()):
            running.add_metric([*node, job], 1 if singleton.token() else 0)
        yield running


def _buckets(durations: Any) -> tuple[list[tuple[str, int]], float]:
    """A Durations (store.engine) as cumulative Prometheus buckets and their sum."""
    counts = list(durations.counts)
    buckets = []
    running = 0
    for bound, count in zip(durations.bounds, counts, strict=False):
        running += count
        buckets.append((repr(float(bound)), running))
    running += counts[-1]
    buckets.append(("+Inf", running))
    return buckets, durations.total


def _histogram(name: str, documentation: str, durations: Any) -> HistogramMetricFamily:
    """A Durations (store.engine) as a Prometheus histogram without labels."""
    buckets, total = _buckets(durations)
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def _by_address(items: Iterable[tuple[str, int]]) -> dict[str, int]:
    result: dict[str, int] = {}
    for endpoint, count in items:
        address = address_of(endpoint)
        result[address] = result.get(address, 0) + count
    return result


def _bucket(counts: Any, known: tuple[str, ...]) -> dict[str, int]:
    result: dict[str, int] = {}
    for key, count in counts.items():
        label = str(key) if str(key) in known else "other"
        result[label] = result.get(label, 0) + count
    return result


class Metrics:
    """The registry behind ``/metrics`` for one gateway."""

    def __init__(self, gateway: Any) -> None:
        self.snapshot: dict[str, Any] = {}
        self._gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway, self.snapshot))

    async def refresh(self, database: Any) -> None:
        """Take the database snapshot (in the database thread). On a cluster only the
        node that holds the gauges' lease reads them (fenced); the others export
        none, so that a dashboard summing the nodes counts each delivery once."""
        singletons = getattr(self._gateway, "singletons", None) or Singletons(None)
        singleton = singletons.get(GAUGES)
        if singleton is None:
            found = await database.transaction(gauges.open_work)
        else:
            token = singleton.token()
            try:
                if token is None:
                    raise FencedError("not this node's job")
                found = await database.transaction(singleton.fenced(gauges.open_work), token)
            except FencedError:
                self.snapshot.clear()
                return
        self.snapshot.clear()
        self.snapshot.update(found)

    def exposition(self) -> tuple[bytes, bytes]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()
