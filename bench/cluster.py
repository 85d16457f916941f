"""Cluster figures: relay throughput and ACK latency with 1, 2, 3 nodes, and the long
fault harness.

    .venv/bin/python -m bench.cluster --nodes 1,2,3 [--messages 6000] [--connections 12]
        [--latency-rate 200] [--latency-messages 2000] [--no-latency] [--markdown PATH]
    .venv/bin/python -m bench.cluster --faults [--kills 6] [--lease 6]
    .venv/bin/python -m bench.cluster --quick          # both, small, a few minutes

Throughput: for each node count, a fresh private PostgreSQL (initdb under a
temporary directory, run as the user postgres: ``tests/integration/cluster_harness.py``),
the nodes in cluster mode, one ``cluster_peers`` receiver (the partner, answering
AA) and one sender process with ``--connections`` stop-and-wait connections spread
over the nodes, ``--messages`` messages of ``--patients`` synthetic patients (one
lane each, ordered per patient). Ingest is the ACK rate; relay is messages over
the time from the first send to the last arrival at the receiver. Then, for the
same load, one gateway (not in cluster mode) on PostgreSQL and one on SQLite: the
relay of one node on each store. CPU seconds of PostgreSQL (the postmaster and its
backends), of the nodes and the load average are recorded with each run.

Latency: after each throughput run, the same kind again on a fresh setup, this time
behind HAProxy (mode tcp, PROXY protocol v2 into each node's ``haproxy:`` listener,
health-checked on ``/readyz``, as ``make cluster`` and docs/cluster.md run it; the
single gateways behind it too, so every kind pays the same hop), and
``bench.loadgen``'s fixed-rate mode through it: one stop-and-wait connection,
``--latency-messages`` messages at ``--latency-rate`` msg/s after
``LATENCY_WARMUP`` unmeasured ones, latency from the scheduled send time when the
sender was held back (no coordinated omission), every ACK verified. It reports
p50 / p99 / max ACK latency and the rate achieved, then waits for the deliveries
(``delivered``: distinct messages at the receiver, warm-up included). The throughput
runs' sender (``tests/integration/cluster_peers.py``) records no send times, so they
give no latency.

Faults: the scenarios of ``tests/integration/test_cluster_faults.py`` at length:
``--kills`` kill -9 (each node in turn), SIGSTOP past the lease, PostgreSQL stopped
for longer than the lease, a node cut off from PostgreSQL in a network namespace.

Results go to standard output as JSON lines, one per run as it ends, then the whole
as JSON (and ``--json PATH``), then the medians per kind as a markdown table (and
``--markdown PATH``); the figures are copied by hand into bench/RESULTS.md, section
"Cluster".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.cluster_harness import (
    HOST,
    Cluster,
    Load,
    can_make_namespaces,
    can_run_haproxy,
    can_run_private_postgres,
    process_cpu,
    scenario_cut,
    scenario_kills,
    scenario_pause,
    scenario_postgres_restart,
)

from bench.loadgen import LoadResult, run_load_sync
from bench.messages import MessageFactory

#: Unmeasured messages sent before each latency run (its own connection, through HAProxy).
LATENCY_WARMUP = 100
#: How long a latency run waits for its deliveries after the last ACK.
LATENCY_DRAIN = 120.0
#: The figures whose median over the rounds the table gives, per kind.
MEDIAN_KEYS = (
    "ingest_msgs_per_s",
    "relay_msgs_per_s",
    "postgres_cores",
    "node_cpu_ms_per_msg",
    "ack_p50_ms",
    "ack_p99_ms",
    "ack_max_ms",
    "latency_msgs_per_s",
)


def _loadavg() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def throughput(
    nodes: int,
    messages: int,
    connections: int,
    patients: int,
    store: str = "cluster",
) -> dict[str, Any]:
    """One run: ``store`` is ``cluster`` (``nodes`` nodes, cluster mode, PostgreSQL),
    ``postgres`` (one gateway on PostgreSQL, not in cluster mode) or ``sqlite``."""
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as name:
        directory = Path(name)
        names = tuple(f"n{k}" for k in range(1, nodes + 1))
        database = f"sqlite:///{directory / 'gateway.db'}" if store == "sqlite" else None
        cluster = Cluster(
            directory, names, clustered=store == "cluster", database_url=database, admin=False
        )
        try:
            cluster.setup()
            if store == "cluster":
                cluster.wait_balanced(120.0)
            pg_before = cluster.postgres.cpu_seconds() if cluster.postgres else 0.0
            node_before = {n: process_cpu(node.pid) for n, node in cluster.members.items()}
            load_before = _loadavg()
            cluster.start_sender(connections, patients, limit=messages)
            cluster.wait_sender(3600)
            acked = [a for a in cluster.answers() if a.code in ("AA", "CA")]
            # From the first ACK (the sender's start-up is not the gateway's time).
            started = min(a.time for a in acked)
            ingest_end = max(a.time for a in acked)
            cluster.wait_drained(600)
            arrivals = cluster.arrivals()
            relay_end = max(a.time for a in arrivals)
            pg_cpu = (cluster.postgres.cpu_seconds() - pg_before) if cluster.postgres else None
            node_cpu = {
                n: round(process_cpu(node.pid) - node_before[n], 2)
                for n, node in cluster.members.items()
            }
            report = cluster.report()
        finally:
            cluster.cleanup()
    relay_seconds = relay_end - started
    return {
        "store": store,
        "nodes": nodes,
        "run": "throughput",
        "messages": len(acked),
        "ingest_msgs_per_s": round((len(acked) - 1) / (ingest_end - started), 1),
        "relay_msgs_per_s": round((report.delivered - 1) / relay_seconds, 1),
        "relay_seconds": round(relay_seconds, 2),
        "postgres_cpu_s": None if pg_cpu is None else round(pg_cpu, 2),
        "postgres_cores": None if pg_cpu is None else round(pg_cpu / relay_seconds, 2),
        "node_cpu_s": node_cpu,
        "node_cpu_ms_per_msg": round(1000 * sum(node_cpu.values()) / max(1, report.delivered), 3),
        "per_node_deliveries": report.per_node,
        "lost": len(report.lost),
        "inversions": len(report.inversions),
        "duplicates": report.duplicates,
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }


def kinds_of(nodes: str, single: bool = True) -> list[tuple[str, int]]:
    """The runs of ``--nodes`` ("1,2,3"): (store, node count), the cluster's first, then
    the single gateways on PostgreSQL and SQLite unless ``single`` is false."""
    counts = [part.strip() for part in nodes.split(",") if part.strip()]
    kinds = []
    for part in counts:
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"--nodes: {part!r} is not a node count (1, 2, 3 ...)")
        kinds.append(("cluster", int(part)))
    if single and kinds:
        kinds += [("postgres", 1), ("sqlite", 1)]
    return kinds


def delivered_ids(path: Path) -> tuple[set[str], dict[str, int]]:
    """The receiver's log (``cluster_peers receive``: time, node, peer, patient, sequence,
    inbound MSH-10, outbound MSH-10): the distinct inbound MSH-10s, and the frames per
    node. The harness's ``read_arrivals`` wants its sender's sequence numbers, which the
    load generator's messages do not carry; a line not yet complete is left for later."""
    ids: set[str] = set()
    per_node: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError), path.open(encoding="latin-1") as lines:
        for line in lines:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 7 or not line.endswith("\n"):
                continue
            ids.add(parts[5])
            per_node[parts[1]] = per_node.get(parts[1], 0) + 1
    return ids, per_node


def latency_figures(result: LoadResult) -> dict[str, Any]:
    """What a latency run reports of the load generator's result (ms, msg/s)."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {
        "latency_rate": result.rate,
        "latency_messages": result.total,
        "latency_ok": result.ok,
        "latency_errors": {kind: count for kind, count in result.errors.items() if count},
        "latency_verified": result.verified,
        "latency_msgs_per_s": round(result.msgs_per_s, 1),
        "ack_p50_ms": ms(result.latency_p50_ms),
        "ack_p99_ms": ms(result.latency_p99_ms),
        "ack_max_ms": ms(result.latency_max_ms),
    }


def latency(nodes: int, rate: float, messages: int, store: str = "cluster") -> dict[str, Any]:
    """One latency run of ``store`` (as in :func:`throughput`) behind HAProxy."""
    with tempfile.TemporaryDirectory(prefix="bench-cluster-latency-") as name:
        directory = Path(name)
        names = tuple(f"n{k}" for k in range(1, nodes + 1))
        database = f"sqlite:///{directory / 'gateway.db'}" if store == "sqlite" else None
        cluster = Cluster(
            directory,
            names,
            clustered=store == "cluster",
            database_url=database,
            admin=True,
            haproxy="proxy-v2",
        )
        try:
            cluster.setup()
            if store == "cluster":
                cluster.wait_balanced(120.0)
            node_before = {n: process_cpu(node.pid) for n, node in cluster.members.items()}
            load_before = _loadavg()
            # The harness's flow takes ADT^A08 (routed by MSH-9) and orders by PID-3.1:
            # every message a synthetic patient of its own, so lanes in every bucket.
            factory = MessageFactory(types=["ADT^A08"])
            result = run_load_sync(
                HOST,
                cluster.haproxy_port,
                connections=1,
                messages=messages,
                pipeline=1,
                rate=rate,
                warmup=LATENCY_WARMUP,
                settle=0.0,
                factory=factory,
            )
            load_after = _loadavg()
            node_cpu = sum(
                process_cpu(node.pid) - node_before[n] for n, node in cluster.members.items()
            )
            expected = result.ok + LATENCY_WARMUP
            deadline = time.monotonic() + LATENCY_DRAIN
            while True:
                delivered, per_node = delivered_ids(cluster.arrivals_path)
                if len(delivered) >= expected or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            cluster.cleanup()
    return {
        "store": store,
        "nodes": nodes,
        "run": "latency",
        **latency_figures(result),
        "delivered": len(delivered),
        "undelivered": max(0, expected - len(delivered)),
        # The nodes' CPU from before the warm-up to the last ACK (what they delivered by
        # then included), per ACK, warm-up included.
        "node_cpu_ms_per_ack": round(1000 * node_cpu / max(1, expected), 3),
        "per_node_deliveries": per_node,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def medians(runs: list[dict[str, Any]], kinds: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Per kind (store, nodes): the median of each figure over the rounds (None when no
    run of the kind has it: ``--no-latency``, or a run that got no ACK)."""
    table = []
    for store, count in kinds:
        mine = [run for run in runs if run["store"] == store and run["nodes"] == count]
        row: dict[str, Any] = {
            "store": store,
            "nodes": count,
            "runs": sum(1 for run in mine if run.get("run", "throughput") == "throughput"),
            "latency_runs": sum(1 for run in mine if run.get("run") == "latency"),
        }
        for key in MEDIAN_KEYS:
            values = [run[key] for run in mine if run.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        row["latency_unverified"] = sum(
            1 for run in mine if run.get("run") == "latency" and not run["latency_verified"]
        )
        table.append(row)
    return table


KIND_TITLES = {
    "cluster": "cluster, {nodes} node{s}",
    "postgres": "one gateway on PostgreSQL (not cluster mode)",
    "sqlite": "one gateway on SQLite",
}


def markdown_table(rows: list[dict[str, Any]], rate: float | None) -> str:
    """The medians as a markdown table (RESULTS.md's style); "-" where a figure is missing."""

    def cell(value: Any, digits: int) -> str:
        if value is None:
            return "-"
        return f"{value:,.{digits}f}"

    at = f" at {rate:g} msg/s" if rate else ""
    lines = [
        "| run | rounds | ingest msg/s | relay msg/s | PostgreSQL cores | nodes' CPU ms/msg "
        f"| ACK p50 ms{at} | ACK p99 ms | ACK max ms | latency run msg/s "
        "| unverified latency runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        title = KIND_TITLES[row["store"]].format(
            nodes=row["nodes"], s="" if row["nodes"] == 1 else "s"
        )
        lines.append(
            f"| {title} | {row['runs']} | {cell(row['ingest_msgs_per_s'], 1)} | "
            f"{cell(row['relay_msgs_per_s'], 1)} | {cell(row['postgres_cores'], 2)} | "
            f"{cell(row['node_cpu_ms_per_msg'], 2)} | {cell(row['ack_p50_ms'], 2)} | "
            f"{cell(row['ack_p99_ms'], 2)} | {cell(row['ack_max_ms'], 2)} | "
            f"{cell(row['latency_msgs_per_s'], 1)} | {row['latency_unverified']} |"
        )
    return "\n".join(lines) + "\n"


def faults(
    kills: int, lease: float, buckets: int, haproxy: str = "", only: str = ""
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    load = Load()
    runs = {
        "kill -9": lambda c: scenario_kills(c, kills, load),
        "SIGSTOP": lambda c: scenario_pause(c, "n2", load),
        "PostgreSQL restart": lambda c: scenario_postgres_restart(c, lease + 4.0, load),
    }
    reason = can_make_namespaces()
    if reason is None:
        runs["cut from PostgreSQL"] = lambda c: scenario_cut(c, load)
    else:
        results["cut from PostgreSQL"] = f"skipped: {reason}"
    for title, run in runs.items():
        if only and only.lower() not in title.lower():
            continue
        directory = Path(tempfile.mkdtemp(prefix="bench-cluster-faults-"))
        cluster = Cluster(
            directory,
            buckets=buckets,
            lease_time=lease,
            namespaced="n3" if title == "cut from PostgreSQL" else None,
            haproxy="" if title == "cut from PostgreSQL" else haproxy,
        )
        try:
            cluster.setup()
            started = time.monotonic()
            report = run(cluster)
        except AssertionError as error:
            # A scenario that did not complete: say why, keep its logs, go on.
            results[title] = {"failed": str(error)[:3000], "directory": str(directory)}
        else:
            summary = report.summary()
            summary["problems"] = report.problems()
            summary["fault_notes"] = [fault.notes for fault in report.faults]
            summary["seconds"] = round(time.monotonic() - started, 1)
            summary["loadavg"] = _loadavg()
            results[title] = summary
            if not summary["problems"]:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                summary["directory"] = str(directory)
        finally:
            cluster.cleanup()
        print(json.dumps({title: results[title]}), flush=True)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", default="", help="node counts, e.g. 1,2,3")
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--connections", type=int, default=12)
    parser.add_argument("--patients", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--no-single", action="store_true", help="skip the single-gateway runs")
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=200.0,
        help="latency runs: messages per second of the one stop-and-wait connection through "
        "HAProxy (default 200, as the latency-200 scenario of bench.run)",
    )
    parser.add_argument(
        "--latency-messages",
        type=int,
        default=2000,
        help=f"latency runs: measured messages per run (default 2000), after "
        f"{LATENCY_WARMUP} unmeasured ones",
    )
    parser.add_argument(
        "--no-latency",
        action="store_true",
        help="skip the latency runs (throughput only, as before)",
    )
    parser.add_argument("--faults", action="store_true")
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--lease", type=float, default=6.0)
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument(
        "--haproxy",
        default="",
        choices=["", "tcp", "proxy-v2"],
        help="faults: the senders through HAProxy (proxy-v2: with the PROXY protocol)",
    )
    parser.add_argument("--only", default="", help="faults: the scenarios whose title has this")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results' JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the medians' table here")
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.nodes = arguments.nodes or "1,2"
        arguments.messages, arguments.kills, arguments.faults = 600, 2, True
        arguments.latency_messages = min(arguments.latency_messages, 400)
    if arguments.latency_rate <= 0 or arguments.latency_messages < 1:
        parser.error("--latency-rate must be > 0 and --latency-messages >= 1")
    try:
        arguments.kinds = kinds_of(arguments.nodes, not arguments.no_single)
    except ValueError as error:
        parser.error(str(error))
    return arguments


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    reason = can_run_private_postgres()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    if arguments.kinds and not arguments.no_latency:
        reason = can_run_haproxy()
        if reason:
            raise SystemExit(f"cannot run the latency runs: {reason} (or --no-latency)")
    results: dict[str, Any] = {"loadavg_at_start": _loadavg(), "nproc": os.cpu_count()}
    table = ""
    if arguments.kinds:
        kinds = arguments.kinds
        runs: list[dict[str, Any]] = []
        # Rounds interleave the kinds (A B C A B C), so that a change in the machine's
        # load touches every kind alike; the medians are reported per kind.
        for _round in range(arguments.rounds):
            for store, count in kinds:
                runs.append(
                    throughput(
                        count, arguments.messages, arguments.connections, arguments.patients, store
                    )
                )
                print(json.dumps(runs[-1]), flush=True)
                if not arguments.no_latency:
                    runs.append(
                        latency(count, arguments.latency_rate, arguments.latency_messages, store)
                    )
                    print(json.dumps(runs[-1]), flush=True)
        results["throughput"] = [run for run in runs if run["run"] == "throughput"]
        results["latency"] = [run for run in runs if run["run"] == "latency"]
        results["medians"] = medians(runs, kinds)
        table = markdown_table(
            results["medians"], None if arguments.no_latency else arguments.latency_rate
        )
    if arguments.faults:
        results["faults"] = faults(
            arguments.kills, arguments.lease, arguments.buckets, arguments.haproxy, arguments.only
        )
    text = json.dumps(results, indent=1)
    print(text)
    if arguments.json:
        arguments.json.write_text(text + "\n")
    if table:
        print(table, end="", flush=True)
        if arguments.markdown:
            arguments.markdown.write_text(table)


if __name__ == "__main__":
    main()
