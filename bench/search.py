"""The message browser's search over a large store: fill it, time the searches.

    .venv/bin/python -m bench.search                  # 1,000,000 messages
    .venv/bin/python -m bench.search --messages 20000  # a quick check

Fills a SQLite file (bench/work/search.sqlite) through the inbound commit
(``commit_inbound``, groups of 512, search keys included), then times each
search of the facade's store query (``store.search.search``, a page of 50)
five times and prints the median and the slowest in milliseconds. It also
times the commit of the same 50,000 messages with and without the search
keys, on fresh files, to show what writing the keys costs the inbound path.
Synthetic messages only (no real person).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from udsgateway.store import inbound, search
from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine
from udsgateway.store.records import InboundRecord
from udsgateway.store.search import Query

START = 1_700_000_000.0
STEP = 0.05  # 20 messages a second: 1,000,000 messages span about 14 hours
TYPES = ("ADT^A04", "ADT^A08", "SIU^S12", "ORM^O01")


def record(number: int) -> InboundRecord:
    message_type = TYPES[number % len(TYPES)]
    control_id = f"C{number:09d}"
    patient = f"P{number % 200_000:06d}"
    segments = [f"PID|1||{patient}^^^HOSP||Doe^Jane||19800101|F"]
    keys: list[tuple[str, str]] = [("pid3", patient)]
    if message_type == "SIU^S12":
        segments.insert(0, f"SCH|PL{number:08d}|FL{number:08d}")
        keys += [("sch1", f"PL{number:08d}"), ("sch2", f"FL{number:08d}")]
    raw = (
        f"MSH|^~\\&|HIS|HOSP|APP|FLOW|20240101||{message_type}|{control_id}|P|2.5\r"
        + "\r".join(segments)
        + "\r"
    ).encode()
    accepted = number % 100 != 7
    return InboundRecord(
        tenant=f"tenant{number % 3}",
        sender="HIS|HOSP",
        control_id=control_id,
        message_type=message_type,
        peer="127.0.0.1",
        connection="mllp",
        received_at=START + number * STEP,
        raw=raw,
        digest=hashlib.sha256(raw).hexdigest(),
        accepted=accepted,
        flows=("FLWBENCH",) if accepted else (),
        reason="" if accepted else "201: no such flow",
        ack_code="AA" if accepted else "AR",
        ack=b"MSH|^~\\&|APP|FLOW|HIS|HOSP|20240101||ACK|A1|P|2.5\rMSA|AA|" + control_id.encode(),
        keys=tuple(keys),
    )


def open_fresh(path: str) -> Database:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    database = Database(make_engine(f"sqlite:///{path}"), InlineRunner())
    database.transaction_now(ensure_schema)
    return database


def fill(database: Database, count: int, first: int = 0) -> float:
    """Commit ``count`` messages in groups of 512; return the seconds it took."""
    started = time.perf_counter()
    for start in range(first, first + count, 512):
        group = [record(n) for n in range(start, min(start + 512, first + count))]
        database.transaction_now(inbound.commit_inbound, group)
    return time.perf_counter() - started


def timed(function: Callable[[], Any], repeat: int = 5) -> tuple[float, float, int]:
    times = []
    found = 0
    for _ in range(repeat):
        started = time.perf_counter()
        found = len(function())
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--commit-sample", type=int, default=50_000)
    parser.add_argument("--work", default=os.path.join("bench", "work"))
    parser.add_argument(
        "--reuse", action="store_true", help="search the store filled by an earlier run"
    )
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)

    # What the keys cost the inbound commit: the same messages, with and without them.
    costs = {}
    for label, keep in () if args.reuse else (("without keys", False), ("with keys", True)):
        database = open_fresh(os.path.join(args.work, "search-commit.sqlite"))
        original = search.insert_keys
        if not keep:
            search.insert_keys = lambda *_args: None  # type: ignore[assignment]
        try:
            seconds = fill(database, args.commit_sample)
        finally:
            search.insert_keys = original  # type: ignore[assignment]
        database.close()
        costs[label] = seconds
        print(
            f"commit {args.commit_sample} messages {label}: {seconds:.2f} s"
            f" ({args.commit_sample / seconds:,.0f} msg/s)"
        )

    path = os.path.join(args.work, "search.sqlite")
    if args.reuse and os.path.exists(path):
        database = Database(make_engine(f"sqlite:///{path}"), InlineRunner())
        database.transaction_now(ensure_schema)
    else:
        database = open_fresh(path)
        seconds = fill(database, args.messages)
        size = os.path.getsize(path) / 1e6
        print(f"filled {args.messages:,} messages in {seconds:.1f} s; file {size:,.0f} MB")

    middle = args.messages // 2
    hour_start = START + middle * STEP
    queries = {
        "newest page, no filter": Query(),
        "PID-3 (5 messages)": Query(keys=(("pid3", f"P{middle % 200_000:06d}"),)),
        "MSH-10": Query(keys=(("msh10", f"C{middle:09d}"),)),
        "SCH-1": Query(keys=(("sch1", f"PL{(middle // 4) * 4 + 2:08d}"),)),
        "message type SIU^S12": Query(message_type="SIU^S12"),
        "status rejected": Query(status="rejected"),
        "tenant + type": Query(tenant="tenant1", message_type="ADT^A08"),
        "one hour in the middle": Query(since=hour_start, until=hour_start + 3600),
        "one hour, type ORM^O01": Query(
            since=hour_start, until=hour_start + 3600, message_type="ORM^O01"
        ),
        "deep page (before the middle id)": Query(before_id=middle),
        "PID-3 + one hour": Query(
            keys=(("pid3", f"P{middle % 200_000:06d}"),),
            since=hour_start - 86400,
            until=hour_start + 3600,
        ),
        "control ID that is not there": Query(keys=(("msh10", "NOPE"),)),
        "message type that is not there": Query(message_type="ZZZ^Z99"),
        "flow (every accepted message)": Query(flow_id="FLWBENCH"),
        "rejected + type ADT^A04 + tenant": Query(
            status="rejected", message_type="ADT^A04", tenant="tenant2"
        ),
        "tenant that has no messages": Query(tenant="tenant9"),
    }
    print(f"\n| search (page of 50) over {args.messages:,} messages | median ms | max ms | rows |")
    print("|---|---:|---:|---:|")
    for name, query in queries.items():
        median, slowest, rows = timed(
            lambda q=query: database.transaction_now(search.search, q)  # type: ignore[misc]
        )
        print(f"| {name} | {median:.1f} | {slowest:.1f} | {rows} |")
    database.close()


if __name__ == "__main__":
    main()
