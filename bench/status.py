"""The operators' status over a large store: fill it, time the status reads.

    .venv/bin/python -m bench.status                    # 100,000 messages in the last hour
    .venv/bin/python -m bench.status --messages 20000   # a quick check
    .venv/bin/python -m bench.status --reuse            # time the store of an earlier run
    .venv/bin/python -m bench.status --without-indexes  # the store as schema 4 had it
    .venv/bin/python -m bench.status --database postgresql+psycopg://postgres@127.0.0.1/x

Fills a store (default a SQLite file, bench/work/status.sqlite) through the inbound
commit (``commit_inbound``, groups of 512): every message routed to one of five flows,
its execution stored waiting on its first delivery (the fold), then most of them settled
as a running gateway leaves them: the delivery delivered after one attempt, the
execution done, with their log lines (received, delivery, execution: three a message).
The messages arrive evenly over the last ``--span`` seconds (default an hour, the
dashboard's chart), the newest ``--open`` of them (default 1 %) left queued.

Then times, five times each, what the facade's ``status`` reads (in a read-only
transaction, as ``store/reads.py`` runs it): each query alone, and the whole read
without and with ``history`` (the console's dashboard); prints the median and the
slowest in milliseconds. ``--without-indexes`` drops the indexes schema 5 added for
the status (``schema.STATUS_INDEXES``) before filling: the A/B of what they save the
reads and cost the fill (the inbound commit and the settling). Synthetic messages only
(no real person).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import update

from udsgateway.admin.operations.status import status_rows
from udsgateway.store import destinations, inbound, logs, overview, schema, search
from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine
from udsgateway.store.reads import read_now
from udsgateway.store.records import InboundRecord, LogEntry, NewDelivery

FLOWS = tuple(f"FLWSTATUS{n:05d}" for n in range(5))
DESTINATIONS = tuple(f"tcp:host=127.0.0.1:port={27000 + n}:timeout=5" for n in range(5))
GROUP = 512


def record(number: int, at: float) -> InboundRecord:
    """Message ``number``, received at ``at``, routed to one flow whose first action is
    rendered (an execution waiting on its delivery)."""
    flow = FLOWS[number % len(FLOWS)]
    control_id = f"S{number:09d}"
    patient = f"P{number % 20_000:06d}"
    raw = (
        f"MSH|^~\\&|HIS|HOSP|APP|FLOW|20240101||ADT^A04|{control_id}|P|2.5\r"
        f"PID|1||{patient}^^^HOSP||Doe^Jane||19800101|F\r"
    ).encode()
    delivery = NewDelivery(
        lane=DESTINATIONS[number % len(DESTINATIONS)],
        destination=DESTINATIONS[number % len(DESTINATIONS)],
        protocol="mllp",
        control_id=control_id,
        payload=raw.replace(b"HIS|HOSP|APP|FLOW", b"GW|HOSP|LAB|LAB"),
        policy={},
    )
    return InboundRecord(
        tenant="default",
        sender="HIS|HOSP",
        control_id=control_id,
        message_type="ADT^A04",
        peer="127.0.0.1",
        connection="mllp",
        received_at=at,
        raw=raw,
        digest=hashlib.sha256(raw).hexdigest(),
        accepted=True,
        flows=(flow,),
        reason="",
        ack_code="AA",
        ack=b"MSH|^~\\&|APP|FLOW|HIS|HOSP|20240101||ACK|A1|P|2.5\rMSA|AA|" + control_id.encode(),
        run_flows=(flow,),
        first=(delivery,),
        keys=(("pid3", patient),),
    )


def settle(connection: Any, first: int, last: int, at: float) -> None:
    """Deliveries and executions ``first..last`` (ids) delivered and done, with their
    log lines, as the dispatcher and the executor record them."""
    d, e = schema.deliveries, schema.executions
    connection.execute(
        update(d)
        .where(d.c.id.between(first, last))
        .values(state="delivered", attempts=1, response_code="AA", updated_at=at)
    )
    connection.execute(
        update(e).where(e.c.id.between(first, last)).values(state="done", updated_at=at)
    )
    lines = []
    for number in range(first, last + 1):
        flow = FLOWS[(number - 1) % len(FLOWS)]
        for event, outcome, attempt in (("delivery", "delivered", 1), ("execution", "done", None)):
            lines.append(
                LogEntry(
                    at=at,
                    event=event,
                    outcome=outcome,
                    tenant="default",
                    flow_id=flow,
                    message_id=number,
                    attempt=attempt,
                )
            )
    logs.insert_logs(connection, lines)


def fill(
    database: Database, count: int, span: float, now: float, open_count: int
) -> tuple[float, float]:
    """Commit and settle ``count`` messages over ``span`` seconds before ``now``; the
    seconds the inbound commits took, and the settling."""
    committing = settling = 0.0
    step = span / count
    for start in range(0, count, GROUP):
        numbers = range(start, min(start + GROUP, count))
        group = [record(n, now - span + n * step) for n in numbers]
        started = time.perf_counter()
        results = database.transaction_now(inbound.commit_inbound, group)
        committing += time.perf_counter() - started
        ids = [r.execution_ids[0] for r in results]
        settled = [i for i, n in zip(ids, numbers, strict=True) if n < count - open_count]
        if settled:
            at = now - span + numbers[len(settled) - 1] * step
            started = time.perf_counter()
            database.transaction_now(settle, min(settled), max(settled), at)
            settling += time.perf_counter() - started
    return committing, settling


def timed(function: Callable[[], Any], repeat: int = 5) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--span", type=float, default=3600.0, help="seconds (default 3600)")
    parser.add_argument("--open", type=float, default=0.01, help="share left queued")
    parser.add_argument("--database", default=None, help="a SQLAlchemy URL (default SQLite)")
    parser.add_argument("--work", default=os.path.join("bench", "work"))
    parser.add_argument("--reuse", action="store_true", help="the store of an earlier run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--without-indexes", action="store_true", help="drop schema 5's status indexes first"
    )
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)

    path = os.path.join(args.work, "status.sqlite")
    url = args.database or f"sqlite:///{path}"
    if not args.reuse and args.database is None:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
    engine = make_engine(url)
    database = Database(engine, InlineRunner())
    database.transaction_now(ensure_schema)
    if args.without_indexes:
        for table, name in schema.STATUS_INDEXES:
            database.transaction_now(schema.index(table, name).drop, True)
    if not args.reuse:
        if args.database is not None and database.transaction_now(search.total):
            raise SystemExit(f"{url} has messages already: give an empty database or --reuse")
        now = time.time()
        committing, settling = fill(
            database, args.messages, args.span, now, int(args.messages * args.open)
        )
        print(
            f"filled {args.messages:,} messages: inbound commits {committing:.2f} s,"
            f" settling {settling:.2f} s"
        )
    now = database.transaction_now(
        lambda c: (
            c.execute(schema.logs.select().order_by(schema.logs.c.id.desc()).limit(1)).one().at
        )
    )
    total = database.transaction_now(search.total)

    reads: dict[str, Callable[..., Any]] = {
        "flow_counts (executions by flow, state)": overview.flow_counts,
        "destination_counts (deliveries by endpoint, state)": overview.destination_counts,
        "pauses": destinations.pauses,
        "flow_totals (messages per flow: keys)": search.flow_totals,
        "per_minute (execution lines, last hour)": lambda c: logs.per_minute(
            c, "execution", now - 3600.0, 60
        ),
        "status (the whole read)": lambda c: status_rows(c, now, False),
        "status with history (the dashboard's read)": lambda c: status_rows(c, now, True),
    }
    variant = "without" if args.without_indexes else "with"
    print(
        f"\n| {engine.dialect.name}, {total:,} messages, {variant} the status indexes"
        " | median ms | max ms |"
    )
    print("|---|---:|---:|")
    for name, function in reads.items():
        median, slowest = timed(
            lambda f=function: read_now(engine, f),  # type: ignore[misc]
            args.repeat,
        )
        print(f"| {name} | {median:.1f} | {slowest:.1f} |")
    database.close()


if __name__ == "__main__":
    main()
