"""Cluster bookkeeping in the database: nodes, buckets and their leases (docs/cluster.md).

Several gateway nodes share one PostgreSQL. Each lane maps to one of a fixed
number of buckets (``bucket_of``); each bucket is leased to at most one node at
a time. A lease row holds its owner, an epoch (the fencing token, bumped by
every takeover) and an expiry on the **database's** clock, so that the nodes'
own clocks never decide who owns what. Every function here runs inside one
transaction (``Database.transaction``) and reads the database's time
(PostgreSQL's ``clock_timestamp()``, not ``now()``, which is the transaction's
start) at its start; a takeover reads it again once it holds the rows it takes,
so that a bucket released by a transaction that committed meanwhile is taken
at a time after its release.

Takeovers are serialised by the database: ``take`` locks the free rows it
picks (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) and its UPDATE re-checks that
each is still free, so two nodes racing for one bucket cannot both get it; and
``holds`` reads a lease ``FOR SHARE``, so a takeover waits for the fenced
transactions in flight and they see the new epoch once it committed.

The tables have a metadata of their own (``cluster_metadata``), created by
``ensure_cluster_schema`` when a node starts in cluster mode: the gateway's
schema version does not change for them, and a single gateway never has them.
``cluster_lease_history`` keeps one row per lease (bucket, epoch): who held it,
from when, until when it was valid; it is what proves that no bucket ever had
two owners at once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence

from attrs import frozen
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
)

cluster_metadata = MetaData()

Id = BigInteger().with_variant(Integer(), "sqlite")

#: The NOTIFY channel on which nodes announce joins and hand-overs (PostgreSQL).
CHANNEL = "udsgateway_cluster"

nodes = Table(
    "cluster_nodes",
    cluster_metadata,
    Column("name", String(64), primary_key=True, comment="the node's [gateway].node_name"),
    Column("instance", String(32), nullable=False, comment="random id of the running process"),
    Column("started_at", Float, nullable=False, comment="database time it joined, epoch s"),
    Column("seen_at", Float, nullable=False, comment="database time of its last heartbeat"),
    Column("stopped", Boolean, nullable=False, default=False, comment="left cleanly"),
    Column("lease_time", Float, nullable=False, default=0.0, comment="its lease time, s"),
)

buckets = Table(
    "cluster_buckets",
    cluster_metadata,
    Column("bucket", Integer, primary_key=True, autoincrement=False, comment="0 .. count-1"),
    Column("owner", String(64), nullable=True, comment="node holding the lease, or NULL"),
    Column("epoch", BigInteger, nullable=False, default=0, comment="fencing token"),
    Column("expires_at", Float, nullable=False, default=0.0, comment="database time, epoch s"),
    Column("acquired_at", Float, nullable=True, comment="database time of the takeover"),
)

history = Table(
    "cluster_lease_history",
    cluster_metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("bucket", Integer, nullable=False, comment="the bucket"),
    Column("epoch", BigInteger, nullable=False, comment="the lease's epoch"),
    Column("owner", String(64), nullable=False, comment="the node that held it"),
    Column("acquired_at", Float, nullable=False, comment="database time it was taken"),
    Column("valid_until", Float, nullable=False, comment="last expiry written, or release"),
    Column("released", Boolean, nullable=False, default=False, comment="handed over cleanly"),
    Index("cluster_lease_history_bucket_epoch", "bucket", "epoch", unique=True),
)

#: The advisory lock under which the cluster tables are created ("udsc").
SCHEMA_LOCK_KEY = 0x75647363

#: Buckets a new cluster database gets (``[cluster].buckets``); fixed afterwards.
DEFAULT_BUCKETS = 64


class NodeNameInUseError(Exception):
    """Another live process already runs under this node name."""


def bucket_of(lane: str, count: int) -> int:
    """The bucket of a lane key: a stable hash (CRC-32 of its UTF-8), the same on every
    node and every Python (``hash()`` is salted per process)."""
    return zlib.crc32(lane.encode("utf-8")) % count


def ensure_cluster_schema(connection: Connection, count: int = DEFAULT_BUCKETS) -> int:
    """Create the cluster tables and ``count`` buckets on first use; return the number
    of buckets the database has (the first node's ``count`` wins, for good).

    Nodes starting together would race to create the tables: on PostgreSQL a
    transaction-level advisory lock makes them take turns.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
    cluster_metadata.create_all(connection)
    existing = connection.execute(select(func.count()).select_from(buckets)).scalar_one()
    if existing:
        return int(existing)
    connection.execute(
        buckets.insert(), [{"bucket": n, "epoch": 0, "expires_at": 0.0} for n in range(count)]
    )
    return count


def database_now(connection: Connection) -> float:
    """The database's clock now, in epoch seconds (not the transaction's start)."""
    if connection.dialect.name == "postgresql":
        value = connection.exec_driver_sql(
            "SELECT CAST(extract(epoch FROM clock_timestamp()) AS double precision)"
        ).scalar_one()
    else:
        value = connection.exec_driver_sql(
            "SELECT (julianday('now') - 2440587.5) * 86400.0"
        ).scalar_one()
    return float(value)


def notify(connection: Connection, payload: str) -> None:
    """Announce a change to every listening node, at this transaction's commit."""
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload}
        )


#: The NOTIFY channel on which nodes announce new work (deliveries, pending executions).
WORK_CHANNEL = "udsgateway_work"

#: A NOTIFY payload must stay below 8000 bytes; a longer announcement says "*" (look at
#: everything) instead.
_MAX_PAYLOAD = 7900


@frozen
class Work:
    """New work announced by a node: the lanes that got deliveries (lane, destination,
    protocol) and the flow actions (Flow ID, step) with new pending executions; ``all``:
    too much to list, look at everything."""

    lanes: tuple[tuple[str, str, str], ...] = ()
    steps: tuple[tuple[str, int], ...] = ()
    all: bool = False
    #: Executions that finished (done, failed or held): a node whose inbound waits on
    #: them for an "after actions" ACK reads their state.
    finished: tuple[int, ...] = ()


def announce_work(
    connection: Connection,
    lanes: Iterable[tuple[str, str, str]] = (),
    steps: Iterable[tuple[str, int]] = (),
    finished: Iterable[int] = (),
) -> None:
    """PostgreSQL: tell every node, at this transaction's commit, of new deliveries in
    ``lanes`` (lane, destination, protocol) and new pending executions at ``steps``
    (Flow ID, step), so that the node holding their bucket runs them at once instead
    of at its next sweep, and of ``finished`` executions (by id), which another node's
    inbound may be waiting on. Lane names, endpoints, Flow IDs and ids carry no PHI."""
    if connection.dialect.name != "postgresql":
        return
    lines = sorted({"d\t" + "\t".join(lane) for lane in lanes})
    lines += sorted({f"e\t{flow_id}\t{step}" for flow_id, step in steps})
    lines += [f"x\t{execution_id}" for execution_id in sorted(set(finished))]
    if not lines:
        return
    payload = "\n".join(lines)
    if len(payload.encode("utf-8")) > _MAX_PAYLOAD:
        payload = "*"
    connection.execute(
        text("SELECT pg_notify(:channel, :payload)"),
        {"channel": WORK_CHANNEL, "payload": payload},
    )


def parse_work(payload: str) -> Work:
    """The announcement ``announce_work`` sent (anything unreadable: look at everything)."""
    if payload == "*":
        return Work(all=True)
    lanes: list[tuple[str, str, str]] = []
    steps: list[tuple[str, int]] = []
    finished: list[int] = []
    for line in payload.split("\n"):
        parts = line.split("\t")
        if parts[0] == "d" and len(parts) == 4:
            lanes.append((parts[1], parts[2], parts[3]))
        elif parts[0] == "e" and len(parts) == 3 and parts[2].isdigit():
            steps.append((parts[1], int(parts[2])))
        elif parts[0] == "x" and len(parts) == 2 and parts[1].isdigit():
            finished.append(int(parts[1]))
        else:
            return Work(all=True)
    return Work(tuple(lanes), tuple(steps), finished=tuple(finished))


@frozen
class Round:
    """What one heartbeat round found and did, on the database clock."""

    now: float
    #: Live nodes (heartbeat within the lease time, not stopped), sorted by name.
    nodes: tuple[str, ...]
    #: Buckets this node holds after the round: bucket -> epoch.
    owned: dict[int, int]
    taken: tuple[int, ...] = ()
    released: tuple[int, ...] = ()
    total: int = 0


#: (live nodes, this node, bucket count, buckets held per node) -> (buckets wanted, most
#: kept before giving some up).
SharePolicy = Callable[[Sequence[str], str, int, dict[str, int]], tuple[int, int]]


def heartbeat_round(
    connection: Connection,
    node: str,
    instance: str,
    lease: float,
    share: SharePolicy,
) -> Round:
    """One round of a node: heartbeat, renew its leases, give up buckets above its share,
    take free or expired ones up to it. Announces (NOTIFY) a join or a release."""
    now = database_now(connection)
    joined = _heartbeat(connection, node, instance, now, lease)
    live = tuple(
        connection.execute(
            select(nodes.c.name)
            .where(nodes.c.seen_at > now - lease, nodes.c.stopped.is_(False))
            .order_by(nodes.c.name)
        ).scalars()
    )
    total = int(connection.execute(select(func.count()).select_from(buckets)).scalar_one())
    owned = _renew(connection, node, now, lease)
    counts = {
        str(owner): int(held)
        for owner, held in connection.execute(
            select(buckets.c.owner, func.count())
            .where(buckets.c.owner.is_not(None), buckets.c.expires_at > now)
            .group_by(buckets.c.owner)
        )
    }
    wanted, keep = share(live, node, total, counts)
    released: list[int] = []
    if len(owned) > keep:
        released = sorted(owned)[wanted:]
        release(connection, node, now, released)
        for bucket in released:
            del owned[bucket]
    taken: dict[int, int] = {}
    if len(owned) < wanted:
        taken = _take(connection, node, now, lease, wanted - len(owned))
        owned.update(taken)
    if joined or released:
        notify(connection, f"{'joined' if joined else 'released'} {node}")
    return Round(now, live, owned, tuple(sorted(taken)), tuple(released), total)


def _heartbeat(connection: Connection, node: str, instance: str, now: float, lease: float) -> bool:
    """Record this node alive; True when it (re)joined. Refuse a name a live process uses."""
    row = connection.execute(
        select(nodes.c.instance, nodes.c.seen_at, nodes.c.stopped)
        .where(nodes.c.name == node)
        .with_for_update()
    ).first()
    if row is None:
        connection.execute(
            nodes.insert().values(
                name=node,
                instance=instance,
                started_at=now,
                seen_at=now,
                stopped=False,
                lease_time=lease,
            )
        )
        return True
    other, seen_at, stopped = row
    if other != instance and not stopped and seen_at > now - lease:
        raise NodeNameInUseError(
            f"node name {node!r} is in use by another running gateway "
            f"(last heartbeat {now - seen_at:.1f} s ago)"
        )
    values: dict[str, object] = {"seen_at": now, "lease_time": lease}
    if other != instance or stopped:
        values.update(instance=instance, started_at=now, stopped=False)
    connection.execute(nodes.update().where(nodes.c.name == node).values(**values))
    return other != instance or bool(stopped)


def _renew(connection: Connection, node: str, now: float, lease: float) -> dict[int, int]:
    """Extend every unexpired lease of this node; an expired one is not renewed (another
    node may have taken it, or will have to bump its epoch)."""
    rows = connection.execute(
        buckets.update()
        .where(buckets.c.owner == node, buckets.c.expires_at > now)
        .values(expires_at=now + lease)
        .returning(buckets.c.bucket, buckets.c.epoch)
    ).all()
    owned = {int(bucket): int(epoch) for bucket, epoch in rows}
    if owned:
        connection.execute(
            history.update()
            .where(
                history.c.bucket == bindparam("b_bucket"),
                history.c.epoch == bindparam("b_epoch"),
            )
            .values(valid_until=now + lease),
            [{"b_bucket": bucket, "b_epoch": epoch} for bucket, epoch in owned.items()],
        )
    return owned


def _take(
    connection: Connection, node: str, now: float, lease: float, count: int
) -> dict[int, int]:
    """Take up to ``count`` free or expired buckets, lowest first, bumping their epochs."""
    free = or_(buckets.c.owner.is_(None), buckets.c.expires_at <= now)
    query = select(buckets.c.bucket).where(free).order_by(buckets.c.bucket).limit(count)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    candidates = list(connection.execute(query).scalars())
    if not candidates:
        return {}
    # Now that the rows are locked: a release that committed while this transaction
    # ran must not look as if it ended after this takeover began.
    now = database_now(connection)
    free = or_(buckets.c.owner.is_(None), buckets.c.expires_at <= now)
    rows = connection.execute(
        buckets.update()
        .where(buckets.c.bucket.in_(candidates), free)
        .values(owner=node, epoch=buckets.c.epoch + 1, expires_at=now + lease, acquired_at=now)
        .returning(buckets.c.bucket, buckets.c.epoch)
    ).all()
    taken = {int(bucket): int(epoch) for bucket, epoch in rows}
    if taken:
        connection.execute(
            history.insert(),
            [
                {
                    "bucket": bucket,
                    "epoch": epoch,
                    "owner": node,
                    "acquired_at": now,
                    "valid_until": now + lease,
                    "released": False,
                }
                for bucket, epoch in taken.items()
            ],
        )
    return taken


def release(
    connection: Connection, node: str, now: float, which: Iterable[int] | None = None
) -> list[int]:
    """Hand buckets over at once: no owner, expired now; the next taker bumps the epoch."""
    condition = buckets.c.owner == node
    if which is not None:
        condition = and_(condition, buckets.c.bucket.in_(list(which)))
    rows = connection.execute(
        buckets.update()
        .where(condition)
        .values(owner=None, expires_at=now)
        .returning(buckets.c.bucket, buckets.c.epoch)
    ).all()
    if rows:
        connection.execute(
            history.update()
            .where(
                history.c.bucket == bindparam("b_bucket"),
                history.c.epoch == bindparam("b_epoch"),
                history.c.valid_until > now,
            )
            .values(valid_until=now, released=True),
            [{"b_bucket": bucket, "b_epoch": epoch} for bucket, epoch in rows],
        )
    return sorted(int(bucket) for bucket, _epoch in rows)


def leave(connection: Connection, node: str, instance: str) -> list[int]:
    """A clean stop: release every bucket, mark the node stopped, announce it."""
    now = database_now(connection)
    released = release(connection, node, now)
    connection.execute(
        nodes.update()
        .where(nodes.c.name == node, nodes.c.instance == instance)
        .values(stopped=True, seen_at=now)
    )
    notify(connection, f"left {node}")
    return released


def holds(connection: Connection, bucket: int, node: str, epoch: int) -> bool:
    """The fencing check, inside a claim's or an outcome's transaction: this node still
    holds ``bucket`` at ``epoch`` and the lease has not expired. The row is read
    ``FOR SHARE`` (PostgreSQL): a takeover waits until this transaction ends."""
    now = database_now(connection)
    query = select(buckets.c.bucket).where(
        buckets.c.bucket == bucket,
        buckets.c.owner == node,
        buckets.c.epoch == epoch,
        buckets.c.expires_at > now,
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    return connection.execute(query).first() is not None


@frozen
class NodeStatus:
    name: str
    started_at: float
    seen_at: float
    stopped: bool
    buckets: int
    lease_time: float

    def state(self, now: float) -> str:
        """live (heartbeat within its lease time), stopped (left cleanly), or silent."""
        if self.stopped:
            return "stopped"
        return "live" if self.seen_at > now - self.lease_time else "silent"


@frozen
class BucketStatus:
    bucket: int
    owner: str | None
    epoch: int
    expires_at: float
    acquired_at: float | None


@frozen
class ClusterStatus:
    """The cluster as the database sees it now (``udsgateway cluster status``)."""

    now: float
    nodes: tuple[NodeStatus, ...]
    buckets: tuple[BucketStatus, ...]

    def holders(self) -> dict[str, set[int]]:
        """owner -> the buckets it holds a valid lease on, on the database clock."""
        owners: dict[str, set[int]] = {}
        for lease in self.buckets:
            if lease.owner is not None and lease.expires_at > self.now:
                owners.setdefault(lease.owner, set()).add(lease.bucket)
        return owners


def cluster_status(connection: Connection) -> ClusterStatus | None:
    """Nodes and leases, or None when this database never ran in cluster mode."""
    from sqlalchemy import inspect

    if not inspect(connection).has_table(buckets.name):
        return None
    now = database_now(connection)
    leases = tuple(
        BucketStatus(int(b), o, int(e), float(x), None if a is None else float(a))
        for b, o, e, x, a in connection.execute(
            select(
                buckets.c.bucket,
                buckets.c.owner,
                buckets.c.epoch,
                buckets.c.expires_at,
                buckets.c.acquired_at,
            ).order_by(buckets.c.bucket)
        )
    )
    counts: dict[str, int] = {}
    for lease in leases:
        if lease.owner is not None and lease.expires_at > now:
            counts[lease.owner] = counts.get(lease.owner, 0) + 1
    members = tuple(
        NodeStatus(
            name, float(started), float(seen), bool(stopped), counts.get(name, 0), float(lease)
        )
        for name, started, seen, stopped, lease in connection.execute(
            select(
                nodes.c.name,
                nodes.c.started_at,
                nodes.c.seen_at,
                nodes.c.stopped,
                nodes.c.lease_time,
            ).order_by(nodes.c.name)
        )
    )
    return ClusterStatus(now, members, leases)


@frozen
class Lease:
    """One row of the lease history."""

    bucket: int
    epoch: int
    owner: str
    acquired_at: float
    valid_until: float
    released: bool


def lease_history(connection: Connection) -> list[Lease]:
    """Every lease ever granted, by bucket and epoch."""
    return [
        Lease(int(b), int(e), o, float(a), float(v), bool(r))
        for b, e, o, a, v, r in connection.execute(
            select(
                history.c.bucket,
                history.c.epoch,
                history.c.owner,
                history.c.acquired_at,
                history.c.valid_until,
                history.c.released,
            ).order_by(history.c.bucket, history.c.epoch)
        )
    ]


def overlaps(leases: Sequence[Lease]) -> list[str]:
    """Problems in a lease history: a bucket whose epochs do not go up by one, or a lease
    taken before the previous one of its bucket ended (two owners at once)."""
    problems = []
    previous: Lease | None = None
    for lease in sorted(leases, key=lambda lease: (lease.bucket, lease.epoch)):
        if previous is not None and previous.bucket == lease.bucket:
            if lease.epoch != previous.epoch + 1:
                problems.append(f"bucket {lease.bucket}: epoch {previous.epoch} -> {lease.epoch}")
            if lease.acquired_at < previous.valid_until:
                problems.append(
                    f"bucket {lease.bucket}: epoch {lease.epoch} ({lease.owner}) taken at "
                    f"{lease.acquired_at:.3f}, while epoch {previous.epoch} "
                    f"({previous.owner}) was valid until {previous.valid_until:.3f}"
                )
        previous = lease
    return problems
