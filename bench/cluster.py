"""Cluster figures: relay throughput with 1, 2, 3 nodes, and the long fault harness.

    .venv/bin/python -m bench.cluster --nodes 1,2,3 [--messages 6000] [--connections 12]
    .venv/bin/python -m bench.cluster --faults [--kills 6] [--lease 6]
    .venv/bin/python -m bench.cluster --quick          # both, small, ~2 minutes

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

Faults: the scenarios of ``tests/integration/test_cluster_faults.py`` at length:
``--kills`` kill -9 (each node in turn), SIGSTOP past the lease, PostgreSQL stopped
for longer than the lease, a node cut off from PostgreSQL in a network namespace.

Results go to standard output as JSON (and ``--json PATH``); the figures are
copied by hand into bench/RESULTS.md, section "Cluster".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.cluster_harness import (
    Cluster,
    Load,
    can_make_namespaces,
    can_run_private_postgres,
    process_cpu,
    scenario_cut,
    scenario_kills,
    scenario_pause,
    scenario_postgres_restart,
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


def medians(runs: list[dict[str, Any]], kinds: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Per kind (store, nodes): the median of each figure over the rounds."""
    table = []
    for store, count in kinds:
        mine = [run for run in runs if run["store"] == store and run["nodes"] == count]
        row: dict[str, Any] = {"store": store, "nodes": count, "runs": len(mine)}
        for key in (
            "ingest_msgs_per_s",
            "relay_msgs_per_s",
            "postgres_cores",
            "node_cpu_ms_per_msg",
        ):
            values = [run[key] for run in mine if run[key] is not None]
            row[key] = statistics.median(values) if values else None
        table.append(row)
    return table


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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--nodes", default="", help="node counts, e.g. 1,2,3")
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--connections", type=int, default=12)
    parser.add_argument("--patients", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--no-single", action="store_true", help="skip the single-gateway runs")
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
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    reason = can_run_private_postgres()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    if arguments.quick:
        arguments.nodes = arguments.nodes or "1,2"
        arguments.messages, arguments.kills, arguments.faults = 600, 2, True
    results: dict[str, Any] = {"loadavg_at_start": _loadavg(), "nproc": os.cpu_count()}
    if arguments.nodes:
        kinds = [("cluster", int(n)) for n in arguments.nodes.split(",")]
        if not arguments.no_single:
            kinds += [("postgres", 1), ("sqlite", 1)]
        runs = []
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
        results["throughput"] = runs
        results["medians"] = medians(runs, kinds)
    if arguments.faults:
        results["faults"] = faults(
            arguments.kills, arguments.lease, arguments.buckets, arguments.haproxy, arguments.only
        )
    text = json.dumps(results, indent=1)
    print(text)
    if arguments.json:
        arguments.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
