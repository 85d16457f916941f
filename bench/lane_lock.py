"""What the per-lane lock costs an enqueue on PostgreSQL (docs/cluster.md, "Order
across inbound nodes").

Runs ``outbox.enqueue`` transactions (each ``--per`` deliveries over as many lanes,
committed one by one, as the executor's or a group commit's) on a throwaway
schema of the database at ``UDSGATEWAY_TEST_POSTGRES`` (default the tests'),
alternating runs with the lock and without it (``outbox.lock_lanes`` replaced by
a no-op), and prints the median microseconds per transaction of each::

    .venv/bin/python -m bench.lane_lock [--transactions N] [--per K] [--pairs P]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

from sqlalchemy import create_engine, text

from udsgateway.store import outbox
from udsgateway.store.engine import Database, InlineRunner, ensure_schema
from udsgateway.store.outbox import NewDelivery

URL = os.environ.get(
    "UDSGATEWAY_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def run(database: Database, transactions: int, per: int, locked: bool) -> float:
    """Microseconds per enqueue transaction."""
    original = outbox.lock_lanes
    if not locked:
        outbox.lock_lanes = lambda _connection, _lanes: None  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        for number in range(transactions):
            database.transaction_now(
                outbox.enqueue,
                [
                    NewDelivery(
                        f"FLWBENCH/0#{(number * per + lane) % 512:016x}",
                        "tcp:host=127.0.0.1:port=9",
                        "mllp",
                        f"C{number}-{lane}",
                        b"MSH|^~\\&|A|B|C|D|20240101||ADT^A04|X|P|2.5\r",
                        {},
                    )
                    for lane in range(per)
                ],
                1.0,
            )
        return (time.perf_counter() - started) / transactions * 1e6
    finally:
        outbox.lock_lanes = original  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--per", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=5)
    options = parser.parse_args()
    schema = f"udsgw_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(URL)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    engine = create_engine(URL, connect_args={"options": f"-c search_path={schema}"})
    database = Database(engine, InlineRunner())
    try:
        database.transaction_now(ensure_schema)
        results: dict[bool, list[float]] = {True: [], False: []}
        for _pair in range(options.pairs):
            for locked in (False, True):
                results[locked].append(run(database, options.transactions, options.per, locked))
        for locked in (False, True):
            values = ", ".join(f"{v:.0f}" for v in results[locked])
            print(
                f"{'with' if locked else 'without'} the lane lock: median "
                f"{statistics.median(results[locked]):.0f} us per transaction of "
                f"{options.per} deliveries ({values})"
            )
    finally:
        database.close()
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
