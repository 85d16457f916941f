"""Fencing for the delivery engine: lanes mapped to buckets, tokens checked in time.

A lane belongs to bucket ``bucket_of(lane, buckets)``; the node that leases the
bucket sends for the lane. Before a lane claims its head the dispatcher takes
the lane's ``token`` (bucket and epoch); ``may_send(token)`` is checked before
each frame is written (the monotonic clock: the LeaseManager's ``safe_until``),
and ``check(connection, token)`` runs inside the claim's and the outcome's
transactions: the lease row is read ``FOR SHARE`` (``store.leases.holds``), so
a takeover waits for (skips) the bucket while such a transaction is in
flight, and a transaction that runs after a takeover sees the new epoch and
is refused (``udsgateway.interfaces.FencedError``): a node that lost a bucket
can neither claim nor record for its lanes.

``SingleNode`` is the fence of a gateway alone on its database (SQLite, or
PostgreSQL without cluster mode): every lane is its own, always.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import frozen
from sqlalchemy import Connection
from zope.interface import implementer

from udsgateway.cluster.leases import LeaseManager
from udsgateway.interfaces import FencedError, ILaneFence
from udsgateway.store.leases import bucket_of, holds


@frozen
class Token:
    bucket: int
    epoch: int


def lease_token(manager: LeaseManager, bucket: int | None) -> Token | None:
    """The bucket and the epoch this node holds it at, while it may still use the lease
    on its monotonic clock; None otherwise (or for no bucket)."""
    if bucket is None:
        return None
    epoch = manager.epoch(bucket)
    if epoch is None or not manager.may_send(bucket, epoch):
        return None
    return Token(bucket, epoch)


@implementer(ILaneFence)
class BucketFence:
    """The fence of a cluster node, over its LeaseManager."""

    def __init__(self, manager: LeaseManager) -> None:
        self.manager = manager
        #: Transactions rolled back by ``check`` (the fenced-rejections metric).
        self.rejected = 0

    def bucket(self, lane: str) -> int | None:
        """The lane's bucket, or None before the first round told the bucket count."""
        total = self.manager.total
        return bucket_of(lane, total) if total else None

    def token(self, lane: str) -> Token | None:
        return lease_token(self.manager, self.bucket(lane))

    def may_send(self, token: object) -> bool:
        return isinstance(token, Token) and self.manager.may_send(token.bucket, token.epoch)

    def check(self, connection: object, token: object) -> None:
        assert isinstance(connection, Connection) and isinstance(token, Token)
        if not holds(connection, token.bucket, self.manager.node, token.epoch):
            self.rejected += 1
            raise FencedError(f"bucket {token.bucket} epoch {token.epoch}: not this node's")

    def lanes_in(self, buckets: Iterable[int], lanes: Iterable[str]) -> list[str]:
        """Which of ``lanes`` fall in ``buckets`` (those to stop when the buckets are lost)."""
        wanted = set(buckets)
        return [lane for lane in lanes if self.bucket(lane) in wanted]


@implementer(ILaneFence)
class SingleNode:
    """A gateway alone on its database: every lane is its own, always."""

    def token(self, lane: str) -> object:
        return True

    def may_send(self, token: object) -> bool:
        return True

    def check(self, connection: object, token: object) -> None:
        return None
