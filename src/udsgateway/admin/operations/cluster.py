"""The cluster: the nodes sharing the database, their leases, and this node's view."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from udsgateway.admin.operations.core import Core, OperationsError, iso
from udsgateway.cluster import status as cluster_status
from udsgateway.cluster.leases import ranges
from udsgateway.store import leases


class ClusterOps(Core):
    """``cluster``: the data of ``udsgateway cluster status``."""

    __slots__ = ()

    def cluster(self, actor: str, via: str) -> Deferred[dict[str, Any]]:
        """The nodes sharing this database, their state, buckets and lease ages, which
        node runs each database-wide job, and this node's own view of its leases (the
        data of ``udsgateway cluster status``; times on the database clock). On a
        single gateway: ``{"cluster": false, ...}``, without a database read."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        manager = self.lease_manager()
        if manager is None:
            return succeed(
                {
                    "cluster": False,
                    "message": "this gateway is not a node of a cluster: it runs every "
                    "lane and every periodic job itself",
                }
            )
        done: Deferred[Any] = self._read(leases.cluster_status)
        done.addCallback(lambda status: _cluster_view(manager, status))
        return done


def _cluster_view(manager: Any, status: leases.ClusterStatus | None) -> dict[str, Any]:
    """``cluster.status.summary`` with ISO times, plus what this node's LeaseManager holds."""
    last = manager.last_round_at
    this_node = {
        "node": manager.node,
        "buckets_held": len(manager.owned),
        "held": ranges(sorted(manager.owned)),
        "last_round_age": None if last is None else round(manager.clock.seconds() - last, 3),
        "failed_rounds": manager.failed_rounds,
        "refused": manager.refused,
    }
    if status is None:  # before this node's first round made the tables
        return {"cluster": True, "this_node": this_node, "nodes": [], "buckets": []}
    found = cluster_status.summary(status)
    found["database_time"] = iso(status.now)
    for node in found["nodes"]:
        node["joined_at"] = iso(node["joined_at"])
    return {"cluster": True, "this_node": this_node, **found}
