"""Singletons: periodic database-wide jobs that run on one node of a cluster.

Retention pruning and the database-derived gauges read or change the whole
database; with several nodes on one PostgreSQL each would run them once per
node (twice the work, and a gauge exported by every node, summed twice by a
dashboard). A singleton job runs on the node that holds the lease of the
job's **bucket**: ``bucket_of("singleton:" + job, buckets)``, the bucket a
lane of that name would have. So the job is chosen by the same lease code as
the lanes, with everything that code already guarantees:

- one owner at a time, on the database clock, proven by the lease history
  (``store.leases.lease_history``), and an epoch bumped at every takeover;
- it moves at a clean stop at once (hand-over, NOTIFY), after a crash once
  the lease expired, and not at all while the cluster is settled (the
  share's hysteresis);
- a node that cannot renew stops before anyone can take it over:
  ``token`` asks ``may_send`` (the monotonic ``safe_until`` of the
  LeaseManager) before each batch, and every batch runs ``check`` in its own
  transaction: the lease row is read ``FOR SHARE``, so a takeover waits for a
  batch in flight, and a batch that runs after a takeover is rolled back
  (``FencedError``).

Different jobs hash to different buckets, so they may run on different nodes.
A separate singleton lease (a table of named leases) would have repeated the
renewal, expiry, fencing and hand-over of the bucket leases for the same
guarantee.

A node keeps its jobs in ``Singletons`` (``GatewayService.singletons``). On a
single gateway (SQLite, or PostgreSQL without cluster mode) there is no
LeaseManager: ``Singletons(None).get(job)`` is None and the job runs as it
always did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection

from udsgateway.cluster.fence import Token, lease_token
from udsgateway.cluster.leases import LeaseManager
from udsgateway.interfaces import FencedError
from udsgateway.store.leases import bucket_of, holds

R = TypeVar("R")

#: The periodic database-wide jobs (a fixed list: the ``job`` label of the metrics).
RETENTION = "retention"
GAUGES = "gauges"
JOBS = (RETENTION, GAUGES)


def job_bucket(job: str, buckets: int) -> int:
    """The bucket whose owner runs ``job``: that of a lane named ``singleton:<job>``."""
    return bucket_of(f"singleton:{job}", buckets)


class Singleton:
    """One job of one node: may it run now, and a fenced transaction for it."""

    def __init__(self, manager: LeaseManager, job: str) -> None:
        self.manager = manager
        self.job = job
        #: Batches of this job rolled back by ``check`` (the lease moved meanwhile).
        self.rejected = 0

    @property
    def bucket(self) -> int | None:
        """The job's bucket, or None before the first round told the bucket count."""
        total = self.manager.total
        return job_bucket(self.job, total) if total else None

    def token(self) -> Token | None:
        """The lease to run under now, or None: not this node's job (or not any more,
        on its monotonic clock)."""
        return lease_token(self.manager, self.bucket)

    def check(self, connection: Connection, token: Token) -> None:
        """Inside the job's transaction: this node still holds the lease (FOR SHARE)."""
        if not holds(connection, token.bucket, self.manager.node, token.epoch):
            self.rejected += 1
            raise FencedError(f"{self.job}: bucket {token.bucket} epoch {token.epoch} moved")

    def fenced(self, work: Callable[..., R]) -> Callable[..., R]:
        """``work(connection, *args)`` preceded by ``check`` in the same transaction:
        call the result as ``fenced(work)(connection, token, *args)``."""

        def run(connection: Connection, token: Token, *args: Any) -> R:
            self.check(connection, token)
            return work(connection, *args)

        return run


class Singletons:
    """A node's singleton jobs, one ``Singleton`` per job for the node's life (their
    counters add up in the metrics); empty on a single gateway."""

    def __init__(self, manager: LeaseManager | None) -> None:
        self.manager = manager
        self.jobs = {} if manager is None else {job: Singleton(manager, job) for job in JOBS}

    def get(self, job: str) -> Singleton | None:
        """The job's singleton on a cluster node; None on a single gateway."""
        return self.jobs.get(job)

    @property
    def rejected(self) -> int:
        """Batches of every job rolled back by the fencing check."""
        return sum(singleton.rejected for singleton in self.jobs.values())
