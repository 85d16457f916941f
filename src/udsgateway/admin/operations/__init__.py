"""The operations facade: what an operator sees and does in a running gateway.

One object, ``Operations``, used alike by the admin HTTP API, the manhole and
the command line. Every method takes the operator (``actor``) and where the
request came from (``via``: ``api``, ``cli`` or ``manhole``), returns a
Deferred of plain JSON-able data (dicts and lists of str, int, float, bool,
None) and raises ``NotFound``, ``Invalid`` or ``Conflict`` (through the
Deferred). Every change and every view of message content writes a row of
the audit trail (store/audit.py), refused attempts included. The methods are
documented in docs/operations.md, "The operations facade".

The facade is split by topic, one module each, joined here into ``Operations``:
``core`` (its fields, errors and plumbing), ``status`` (with ``rates``),
``queue`` (destinations, deliveries, operators' actions on them), ``messages``
(search, detail, content, replays), ``flows``, ``logs``, ``audit`` and
``cluster``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from udsgateway.admin.operations.audit import AuditOps, audit_view
from udsgateway.admin.operations.cluster import ClusterOps
from udsgateway.admin.operations.core import VIA, Conflict, Invalid, NotFound, OperationsError
from udsgateway.admin.operations.flows import FlowsOps
from udsgateway.admin.operations.logs import LogsOps
from udsgateway.admin.operations.messages import CONTENT_PARTS, MessagesOps
from udsgateway.admin.operations.queue import QueueOps, wait_reason
from udsgateway.admin.operations.rates import Rates
from udsgateway.admin.operations.status import FLOW_OUTCOMES, StatusOps
from udsgateway.store.reads import read_now

__all__ = [
    "CONTENT_PARTS",
    "FLOW_OUTCOMES",
    "VIA",
    "Conflict",
    "Invalid",
    "NotFound",
    "Operations",
    "OperationsError",
    "Rates",
    "audit_view",
    "listening_addresses",
    "wait_reason",
]


def listening_addresses(service: Any) -> dict[str, tuple[str, int]]:
    """tenant -> (host, port) its listener opened (a configured port 0: the one chosen)."""
    found = {}
    for name, listener in (getattr(service, "listeners", None) or {}).items():
        host = getattr(listener, "address", None)
        if host is not None:
            found[name] = (str(getattr(host, "host", "")), int(getattr(host, "port", 0)))
    return found


@define(eq=False)
class Operations(StatusOps, QueueOps, MessagesOps, FlowsOps, LogsOps, AuditOps, ClusterOps):
    """The operations of a running gateway (or of a database alone: the CLI).

    ``dispatcher``, ``executor``, ``ingests`` and ``listeners`` are the live
    objects (None or empty for the CLI, which works on the database only:
    its changes reach a running gateway within the delivery ``held_poll``).
    Its fields are those of ``core.Core``; its methods those of the topics.
    """

    @classmethod
    def for_service(cls, service: Any, reactor: Any, wall: Callable[[], float]) -> Operations:
        """The facade over a GatewayService (its database, dispatcher, executor, ingests)."""
        operations = cls(
            service.database,
            reactor,
            wall,
            dispatcher=service.dispatcher,
            executor=service.executor,
            ingests=service.ingests,
            listeners=getattr(service, "factories", {}),
            addresses=lambda: listening_addresses(service),
            tenants={tenant.name: tenant for tenant in service.config.tenants},
            reload_flows=getattr(service, "reload_flows", None),
            lease_manager=lambda: getattr(service, "leases", None),
        )
        operations.rates = Rates(operations.counters, reactor)
        engine = service.database.engine
        in_memory = engine.dialect.name == "sqlite" and engine.url.database in (
            None,
            "",
            ":memory:",
        )
        if hasattr(reactor, "getThreadPool") and not in_memory:

            def reads(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
                return deferToThreadPool(
                    reactor, reactor.getThreadPool(), read_now, engine, function, *args
                )

            operations.reads = reads
        return operations

    @classmethod
    def shared(
        cls, service: Any, reactor: Any, wall: Callable[[], float] = time.time
    ) -> Operations:
        """The one facade of a GatewayService, made on first use and kept as
        ``service.operations`` (the admin API and the manhole share it, and its rates)."""
        found: Operations | None = getattr(service, "operations", None)
        if found is None:
            found = cls.for_service(service, reactor, wall)
            service.operations = found
        return found
