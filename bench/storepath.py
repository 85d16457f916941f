"""Micro-benchmark of the database thread's work per relayed message, in CPU time.

What the database thread runs for every message the relay forwards, on a SQLite file
with the gateway's own settings (``make_engine``: WAL, ``synchronous=FULL``), each group
in one transaction as the gateway's group committers run them:

- the inbound commit of a group (duplicate check, the message, its execution, the
  "received" log line, the folded first action enqueued);
- the search keys of the stored messages, in slices of 64 messages after the commit
  (``inbound.searchkeys.KeyWriter``);
- the outcome record of the group's deliveries (the delivery updated, the execution
  advanced to done, the "delivery" and "execution" log lines).

CPU time is the process's (user and system: a commit's writes and flush are kernel
work on this thread). Run it on two trees and compare in the same sitting:

    .venv/bin/python -m bench.storepath [--group 8] [--statements]
    PYTHONPATH=/work/wt/base/src .venv/bin/python -m bench.storepath

Prints one JSON object: the build, the group size, and microseconds of CPU per message
for each kind of transaction (the best of ``--repeat`` runs of ``--messages``); with
``--statements``, the CPU per message of each SQL statement (and of COMMIT) inside them,
from a wrapped driver connection (which costs a little itself).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from bench.messages import MESSAGE_TYPES, MessageFactory


class _Timed:
    """CPU seconds and calls per SQL statement (its first words), COMMIT included."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def add(self, sql: str, seconds: float) -> None:
        key = " ".join(sql.split()[:4])
        self.seconds[key] += seconds
        self.calls[key] += 1


def _timed_connection(timed: _Timed) -> type[sqlite3.Connection]:
    class Cursor(sqlite3.Cursor):
        def execute(self, sql: str, *args: Any) -> Any:  # type: ignore[override]
            began = time.process_time()
            try:
                return super().execute(sql, *args)
            finally:
                timed.add(sql, time.process_time() - began)

        def executemany(self, sql: str, rows: Any) -> Any:  # type: ignore[override]
            began = time.process_time()
            try:
                return super().executemany(sql, rows)
            finally:
                timed.add(sql, time.process_time() - began)

    class Connection(sqlite3.Connection):
        def cursor(self, factory: Any = Cursor) -> Any:  # type: ignore[override]
            return super().cursor(factory)

        def commit(self) -> None:
            began = time.process_time()
            try:
                super().commit()
            finally:
                timed.add("COMMIT", time.process_time() - began)

    return Connection


def main() -> None:
    from sqlalchemy import event

    from udsgateway.compiled import variant
    from udsgateway.hl7.header import Header, parse_header
    from udsgateway.hl7.keys import search_keys
    from udsgateway.inbound.searchkeys import KeyWriter
    from udsgateway.store import inbound, outbox, search
    from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine
    from udsgateway.store.executions import advance
    from udsgateway.store.records import DELIVERED, InboundRecord, NewDelivery, Settlement

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--group", type=int, default=8, help="messages per transaction")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--combined",
        action="store_true",
        help="an experiment: each group's outcomes recorded in the next inbound commit",
    )
    parser.add_argument(
        "--statements", action="store_true", help="CPU per message of each SQL statement"
    )
    args = parser.parse_args()

    factory = MessageFactory(seed=1)
    payloads = [
        factory.make(MESSAGE_TYPES[i % len(MESSAGE_TYPES)]).payload
        for i in range(args.messages * args.repeat)
    ]

    def record(payload: bytes, number: int) -> InboundRecord:
        header = parse_header(payload)
        assert isinstance(header, Header)
        control_id = f"{header.control_id}-{number}"
        delivery = NewDelivery(
            "relay/0", "tcp:host=127.0.0.1:port=1", "mllp", control_id, payload, {}
        )
        return InboundRecord(
            tenant="t",
            sender="HIS|H",
            control_id=control_id,
            message_type=header.event_type,
            peer="127.0.0.1",
            connection="mllp",
            received_at=1000.0 + number,
            raw=payload,
            digest=hashlib.sha256(payload).hexdigest(),
            accepted=True,
            flows=("relay",),
            reason="",
            ack_code="AA",
            ack=b"MSH|ACK",
            run_flows=("relay",),
            first=(delivery,),
            keys=search_keys(payload, header),
        )

    records = [record(p, i) for i, p in enumerate(payloads)]
    key_slice = attrs.fields(KeyWriter).slice.default
    timed = _Timed()

    with tempfile.TemporaryDirectory(prefix="bench-storepath-") as folder:
        # The gateway checkpoints on a thread of its own (not measured here).
        engine = make_engine(
            f"sqlite:///{Path(folder) / 'store.db'}",
            background_checkpoints=True,
        )
        if args.statements:
            factory_class = _timed_connection(timed)

            @event.listens_for(engine, "do_connect")
            def _timed_driver(_dialect: Any, _record: Any, _args: Any, params: Any) -> None:
                params["factory"] = factory_class

        database = Database(engine, InlineRunner())
        database.transaction_now(ensure_schema)
        database.transaction_now(search.prepare_key_inserts)
        steps = {"relay": 1}

        def after(connection: Any, settled: list[Settlement], found: Any) -> Any:
            return advance(connection, settled, found, steps, 2000.0)

        pending_outcomes: list[list[Settlement]] = []

        def both(connection: Any, group: list[InboundRecord], outcomes: list[Settlement]) -> Any:
            if outcomes:
                outbox.record(connection, outcomes, 2000.0, after)
            return inbound.commit_inbound(connection, group, False, False)

        def run(part: list[InboundRecord]) -> tuple[float, float, float]:
            commit = keys = recorded = 0.0
            unwritten: list[tuple[tuple[tuple[str, str], ...], int]] = []
            for start in range(0, len(part), args.group):
                group = part[start : start + args.group]
                began = time.process_time()
                if args.combined:
                    outcomes = pending_outcomes[-1] if pending_outcomes else []
                    results = database.transaction_now(both, group, outcomes)
                else:
                    results = database.transaction_now(inbound.commit_inbound, group, False, False)
                commit += time.process_time() - began
                settlements = []
                for item, result in zip(group, results, strict=True):
                    assert result.message_id is not None and len(result.enqueued) == 1
                    unwritten.append((item.keys, result.message_id))
                    delivery_id, delivery = result.enqueued[0]
                    settlements.append(
                        Settlement(
                            delivery_id,
                            DELIVERED,
                            1,
                            0.0,
                            "",
                            b"MSH|ACK|AA",
                            "AA",
                            execution_id=delivery.execution_id,
                            step=delivery.step,
                            control_id=delivery.control_id,
                        )
                    )
                if len(unwritten) >= key_slice or start + args.group >= len(part):
                    began = time.process_time()
                    database.transaction_now(
                        search.insert_keys,
                        [k for k, _ in unwritten],
                        [i for _, i in unwritten],
                    )
                    keys += time.process_time() - began
                    unwritten = []
                if args.combined:
                    # An experiment: this group's outcomes ride in the next group's inbound
                    # transaction (measured there), one commit instead of two.
                    pending_outcomes.append(settlements)
                    continue
                began = time.process_time()
                database.transaction_now(outbox.record, settlements, 2000.0, after)
                recorded += time.process_time() - began
            return commit, keys, recorded

        best = (float("inf"),) * 3
        for round_ in range(args.repeat):
            if round_ == 1:
                timed.seconds.clear()
                timed.calls.clear()
            part = records[round_ * args.messages : (round_ + 1) * args.messages]
            measured = run(part)
            best = tuple(min(a, b) for a, b in zip(best, measured, strict=True))
        database.close()

    per = 1e6 / args.messages
    report: dict[str, Any] = {
        "build": variant(),
        "group": args.group,
        "inbound_commit_us": round(best[0] * per, 1),
        "search_keys_us": round(best[1] * per, 1),
        "outcome_record_us": round(best[2] * per, 1),
        "total_us": round(sum(best) * per, 1),
    }
    if args.statements:
        measured_messages = args.messages * max(1, args.repeat - 1)
        report["statements_us"] = {
            key: round(seconds * 1e6 / measured_messages, 1)
            for key, seconds in sorted(timed.seconds.items(), key=lambda kv: -kv[1])
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
