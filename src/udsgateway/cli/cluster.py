"""``udsgateway cluster status``: the nodes sharing this database and their bucket leases.

It reads the cluster tables (``store.leases``) in one short transaction, beside
the running nodes, and formats the rows of ``cluster.status`` (which the admin
API and the console show too); times are the database's, so that lease ages and expiries
mean the same whichever machine runs the command.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from udsgateway.cli.common import open_database, write_rows
from udsgateway.cluster.leases import ranges
from udsgateway.cluster.status import bucket_views, node_views, singleton_owners
from udsgateway.store import leases

if TYPE_CHECKING:
    from udsgateway.config import GatewayConfig

NODE_COLUMNS = ("node", "state", "buckets", "held", "heartbeat", "joined")
BUCKET_COLUMNS = ("bucket", "owner", "epoch", "held_for", "expires_in")


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float) -> str:
    return f"{value:.1f}s"


def node_rows(status: leases.ClusterStatus) -> list[dict[str, Any]]:
    """One row per node: its state, how many buckets it holds (unexpired) and which."""
    return [
        {
            "node": view["node"],
            "state": view["state"],
            "buckets": view["buckets"],
            "held": view["held"],
            "heartbeat": _seconds(view["heartbeat_age"]) + " ago",
            "joined": _time(view["joined_at"]),
        }
        for view in node_views(status)
    ]


def bucket_rows(status: leases.ClusterStatus) -> list[dict[str, Any]]:
    """One row per bucket: owner (empty when free or expired), epoch, lease age, expiry."""
    return [
        {
            **view,
            "held_for": None if view["held_for"] is None else _seconds(view["held_for"]),
            "expires_in": None if view["expires_in"] is None else _seconds(view["expires_in"]),
        }
        for view in bucket_views(status)
    ]


def cmd_cluster_status(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    status = open_database(config).transaction_now(leases.cluster_status)
    if status is None:
        out.write("not a cluster database: no node ever ran in cluster mode on it\n")
        return 0
    nodes = node_rows(status)
    buckets = bucket_rows(status)
    if args.json:
        write_rows(buckets if args.buckets else nodes, out, True)
        return 0
    live = sum(1 for row in nodes if row["state"] == "live")
    free = [row["bucket"] for row in buckets if row["owner"] is None]
    out.write(
        f"{live} of {len(nodes)} nodes live, {len(buckets)} buckets, "
        f"{len(free)} without a valid lease{' (' + ranges(free) + ')' if free else ''}; "
        f"database time {_time(status.now)} UTC\n\n"
    )
    write_rows(nodes, out, False, NODE_COLUMNS)
    jobs = singleton_owners(status)
    out.write(
        "\njobs: "
        + ", ".join(f"{job} on {owner or 'no node (lease free)'}" for job, owner in jobs.items())
        + "\n"
    )
    if args.buckets:
        out.write("\n")
        write_rows(buckets, out, False, BUCKET_COLUMNS)
    return 0


def add_cluster_commands(commands: Any) -> None:
    cluster = commands.add_parser("cluster", help="the nodes sharing this database")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    p = actions.add_parser("status", help="nodes, buckets per node, lease ages")
    p.add_argument("--buckets", action="store_true", help="also list every bucket's lease")
    p.add_argument("--json", action="store_true", help="JSON lines (nodes, or buckets)")
    p.set_defaults(handler=cmd_cluster_status)
