"""The cluster's state as operators see it: one view for the CLI, the API and the console.

``store.leases.cluster_status`` reads the nodes and the leases in one
transaction; the functions here turn that into plain rows (numbers, seconds
on the database clock): ``udsgateway cluster status`` formats them as text,
``GET /api/v1/cluster`` returns them as JSON and the console shows them.
"""

from __future__ import annotations

from typing import Any

from udsgateway.cluster.leases import ranges
from udsgateway.cluster.singleton import JOBS, job_bucket
from udsgateway.store.leases import ClusterStatus


def _valid(owner: str | None, expires_at: float, now: float) -> bool:
    return owner is not None and expires_at > now


def node_views(status: ClusterStatus) -> list[dict[str, Any]]:
    """One row per node: state, buckets held (unexpired) and which, heartbeat age (s),
    when it joined (epoch s, database clock)."""
    held: dict[str, list[int]] = {}
    for lease in status.buckets:
        if lease.owner is not None and _valid(lease.owner, lease.expires_at, status.now):
            held.setdefault(lease.owner, []).append(lease.bucket)
    return [
        {
            "node": node.name,
            "state": node.state(status.now),
            "buckets": node.buckets,
            "held": ranges(held.get(node.name, [])),
            "heartbeat_age": round(status.now - node.seen_at, 3),
            "joined_at": node.started_at,
            "lease_time": node.lease_time,
        }
        for node in status.nodes
    ]


def bucket_views(status: ClusterStatus) -> list[dict[str, Any]]:
    """One row per bucket: owner (None when free or expired), epoch, how long the owner
    has held it and when its lease expires (s; None without a valid lease)."""
    rows = []
    for lease in status.buckets:
        valid = _valid(lease.owner, lease.expires_at, status.now)
        rows.append(
            {
                "bucket": lease.bucket,
                "owner": lease.owner if valid else None,
                "epoch": lease.epoch,
                "held_for": (
                    round(status.now - lease.acquired_at, 3)
                    if valid and lease.acquired_at is not None
                    else None
                ),
                "expires_in": round(lease.expires_at - status.now, 3) if valid else None,
            }
        )
    return rows


def singleton_owners(status: ClusterStatus) -> dict[str, str | None]:
    """job -> the node that runs it now (the owner of its bucket), or None."""
    count = len(status.buckets)
    owners = {
        lease.bucket: lease.owner
        for lease in status.buckets
        if _valid(lease.owner, lease.expires_at, status.now)
    }
    return {job: owners.get(job_bucket(job, count)) if count else None for job in JOBS}


def summary(status: ClusterStatus) -> dict[str, Any]:
    """Everything at once, JSON-able: the database time, nodes, buckets, singletons."""
    nodes = node_views(status)
    buckets = bucket_views(status)
    free = [row["bucket"] for row in buckets if row["owner"] is None]
    return {
        "database_time": status.now,
        "nodes_live": sum(1 for row in nodes if row["state"] == "live"),
        "bucket_count": len(buckets),
        "without_lease": ranges(free),
        "nodes": nodes,
        "buckets": buckets,
        "singletons": singleton_owners(status),
    }
