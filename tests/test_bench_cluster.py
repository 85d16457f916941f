"""bench.cluster's own code, without a cluster: the command line, the latency figures taken
from a load generator result, the receiver's log, the medians and the markdown table.
(The runs themselves: tests/integration/test_bench_cluster_smoke.py.)"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

from bench.cluster import (
    LATENCY_WARMUP,
    delivered_ids,
    kinds_of,
    latency_figures,
    markdown_table,
    medians,
    parse_arguments,
)
from bench.loadgen import LoadResult
from twisted.trial.unittest import SynchronousTestCase

KINDS = [("cluster", 1), ("cluster", 2), ("postgres", 1), ("sqlite", 1)]


def _result(**changes: Any) -> LoadResult:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 2580,
        "connections": 1,
        "messages_per_connection": 1000,
        "pipeline": 1,
        "rate": 200.0,
        "total": 1000,
        "sent": 1000,
        "ok": 1000,
        "errors": {"nak": 0, "mismatch": 0, "timeout": 0, "closed": 0, "aborted": 0},
        "elapsed_s": 5.01,
        "msgs_per_s": 199.6007984,
        "latency_p50_ms": 1.23456,
        "latency_p99_ms": 9.87654,
        "latency_max_ms": 31.005,
        "latency_from": "scheduled send time when held back",
        "loadgen_cpu_ms_per_msg": 0.1,
    }
    values.update(changes)
    return LoadResult(**values)


def _throughput(store: str, nodes: int, relay: float, cores: float | None) -> dict[str, Any]:
    return {
        "store": store,
        "nodes": nodes,
        "run": "throughput",
        "ingest_msgs_per_s": relay + 10,
        "relay_msgs_per_s": relay,
        "postgres_cores": cores,
        "node_cpu_ms_per_msg": 4.0,
    }


def _latency(store: str, nodes: int, p50: float | None, verified: bool = True) -> dict[str, Any]:
    return {
        "store": store,
        "nodes": nodes,
        "run": "latency",
        "ack_p50_ms": p50,
        "ack_p99_ms": None if p50 is None else p50 * 10,
        "ack_max_ms": None if p50 is None else p50 * 20,
        "latency_msgs_per_s": 200.0 if verified else 120.0,
        "latency_verified": verified,
    }


class KindsTests(SynchronousTestCase):
    def test_node_counts_then_the_single_gateways(self) -> None:
        self.assertEqual(kinds_of("1,2"), KINDS)
        self.assertEqual(kinds_of(" 3 , 1 ", single=False), [("cluster", 3), ("cluster", 1)])

    def test_no_node_counts_no_runs(self) -> None:
        self.assertEqual(kinds_of(""), [])

    def test_what_is_not_a_node_count_is_refused(self) -> None:
        for text in ("0", "1,x", "-1", "1.5"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, kinds_of, text)


class ArgumentsTests(SynchronousTestCase):
    def parse_error(self, argv: list[str]) -> str:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit):
            parse_arguments(argv)
        return stderr.getvalue()

    def test_latency_on_by_default_at_200_per_second(self) -> None:
        arguments = parse_arguments(["--nodes", "1,2"])
        self.assertEqual(arguments.latency_rate, 200.0)
        self.assertEqual(arguments.latency_messages, 2000)
        self.assertFalse(arguments.no_latency)
        self.assertEqual(arguments.kinds, KINDS)
        self.assertIsNone(arguments.markdown)

    def test_options(self) -> None:
        arguments = parse_arguments(
            [
                "--nodes",
                "2",
                "--no-single",
                "--latency-rate",
                "50",
                "--latency-messages",
                "300",
                "--no-latency",
                "--markdown",
                "/tmp/t.md",
            ]
        )
        self.assertEqual(arguments.latency_rate, 50.0)
        self.assertEqual(arguments.latency_messages, 300)
        self.assertTrue(arguments.no_latency)
        self.assertEqual(arguments.kinds, [("cluster", 2)])
        self.assertEqual(arguments.markdown, Path("/tmp/t.md"))

    def test_quick_is_small_for_latency_too(self) -> None:
        arguments = parse_arguments(["--quick"])
        self.assertEqual(arguments.kinds, KINDS)
        self.assertEqual(arguments.latency_messages, 400)
        self.assertEqual(
            parse_arguments(["--quick", "--latency-messages", "50"]).latency_messages, 50
        )

    def test_bad_values_are_refused(self) -> None:
        self.assertIn("--latency-rate", self.parse_error(["--latency-rate", "0"]))
        self.assertIn("--latency-messages", self.parse_error(["--latency-messages", "0"]))
        self.assertIn("'x' is not a node count", self.parse_error(["--nodes", "1,x"]))

    def test_help_names_the_latency_options(self) -> None:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), self.assertRaises(SystemExit):
            parse_arguments(["--help"])
        text = stdout.getvalue()
        for option in ("--latency-rate", "--latency-messages", "--no-latency", "--markdown"):
            self.assertIn(option, text)
        self.assertIn(f"after {LATENCY_WARMUP} unmeasured", text)


class LatencyFiguresTests(SynchronousTestCase):
    def test_figures_of_a_verified_run(self) -> None:
        self.assertEqual(
            latency_figures(_result()),
            {
                "latency_rate": 200.0,
                "latency_messages": 1000,
                "latency_ok": 1000,
                "latency_errors": {},
                "latency_verified": True,
                "latency_msgs_per_s": 199.6,
                "ack_p50_ms": 1.23,
                "ack_p99_ms": 9.88,
                "ack_max_ms": 31.0,
            },
        )

    def test_errors_are_kept_and_the_run_unverified(self) -> None:
        figures = latency_figures(
            _result(
                ok=990,
                errors={"nak": 0, "mismatch": 0, "timeout": 1, "closed": 0, "aborted": 9},
            )
        )
        self.assertFalse(figures["latency_verified"])
        self.assertEqual(figures["latency_errors"], {"timeout": 1, "aborted": 9})

    def test_no_ack_no_latency(self) -> None:
        figures = latency_figures(
            _result(
                ok=0,
                msgs_per_s=0.0,
                latency_p50_ms=None,
                latency_p99_ms=None,
                latency_max_ms=None,
                errors={"closed": 1000},
            )
        )
        self.assertEqual(
            (figures["ack_p50_ms"], figures["ack_p99_ms"], figures["ack_max_ms"]),
            (None, None, None),
        )
        self.assertFalse(figures["latency_verified"])


class DeliveredIdsTests(SynchronousTestCase):
    def test_distinct_inbound_ids_and_frames_per_node(self) -> None:
        path = Path(self.mktemp())
        path.write_text(
            "1.0\tn1\t127.0.0.1\tP1\t123^^^SYNTHHOSP^AN\tA1\tO1\n"
            "1.1\tn2\t127.0.0.1\tP2\t\tA2\tO2\n"
            "1.2\tn2\t127.0.0.1\tP1\t\tA1\tO1\n"  # a duplicate: one id, two frames
            "1.3\tn1\tshort line\n"
            "1.4\tn1\t127.0.0.1\tP3\t\tA3\tO3",  # still being written
            encoding="latin-1",
        )
        ids, per_node = delivered_ids(path)
        self.assertEqual(ids, {"A1", "A2"})
        self.assertEqual(per_node, {"n1": 1, "n2": 2})

    def test_no_log_yet(self) -> None:
        self.assertEqual(delivered_ids(Path(self.mktemp())), (set(), {}))


class MediansTests(SynchronousTestCase):
    def test_throughput_and_latency_medians_per_kind(self) -> None:
        runs = [
            _throughput("cluster", 1, 150.0, 0.2),
            _latency("cluster", 1, 2.0),
            _throughput("cluster", 1, 170.0, 0.4),
            _latency("cluster", 1, 4.0, verified=False),
            _throughput("sqlite", 1, 500.0, None),
            _latency("sqlite", 1, 1.0),
            _throughput("cluster", 1, 160.0, 0.3),
            _latency("cluster", 1, 3.0),
        ]
        cluster, sqlite = medians(runs, [("cluster", 1), ("sqlite", 1)])
        self.assertEqual(
            cluster,
            {
                "store": "cluster",
                "nodes": 1,
                "runs": 3,
                "latency_runs": 3,
                "ingest_msgs_per_s": 170.0,
                "relay_msgs_per_s": 160.0,
                "postgres_cores": 0.3,
                "node_cpu_ms_per_msg": 4.0,
                "ack_p50_ms": 3.0,
                "ack_p99_ms": 30.0,
                "ack_max_ms": 60.0,
                "latency_msgs_per_s": 200.0,
                "latency_unverified": 1,
            },
        )
        self.assertIsNone(sqlite["postgres_cores"])
        self.assertEqual((sqlite["runs"], sqlite["latency_runs"]), (1, 1))
        self.assertEqual(sqlite["ack_p50_ms"], 1.0)

    def test_without_latency_runs(self) -> None:
        (row,) = medians([_throughput("postgres", 1, 200.0, 0.3)], [("postgres", 1)])
        self.assertEqual(row["latency_runs"], 0)
        self.assertEqual(row["latency_unverified"], 0)
        for key in ("ack_p50_ms", "ack_p99_ms", "ack_max_ms", "latency_msgs_per_s"):
            self.assertIsNone(row[key], key)
        self.assertEqual(row["relay_msgs_per_s"], 200.0)

    def test_a_run_without_acks_is_left_out_of_the_latency_median(self) -> None:
        runs = [_latency("cluster", 2, 5.0), _latency("cluster", 2, None, verified=False)]
        (row,) = medians(runs, [("cluster", 2)])
        self.assertEqual(row["ack_p50_ms"], 5.0)
        self.assertEqual(row["latency_unverified"], 1)


class MarkdownTableTests(SynchronousTestCase):
    def rows(self) -> list[dict[str, Any]]:
        runs = [
            _throughput("cluster", 1, 1234.5, 0.25),
            _latency("cluster", 1, 2.5),
            _throughput("cluster", 2, 200.0, 0.5),
            _latency("cluster", 2, 7.25, verified=False),
            _throughput("postgres", 1, 180.0, 0.3),
            _throughput("sqlite", 1, 550.0, None),
            _latency("sqlite", 1, 1.0),
        ]
        return medians(runs, KINDS)

    def test_one_line_per_kind_with_the_latency_columns(self) -> None:
        lines = markdown_table(self.rows(), 200.0).splitlines()
        self.assertEqual(len(lines), 2 + 4)
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        self.assertEqual(
            header,
            [
                "run",
                "rounds",
                "ingest msg/s",
                "relay msg/s",
                "PostgreSQL cores",
                "nodes' CPU ms/msg",
                "ACK p50 ms at 200 msg/s",
                "ACK p99 ms",
                "ACK max ms",
                "latency run msg/s",
                "unverified latency runs",
            ],
        )
        self.assertEqual(lines[1].count("|---"), len(header))
        self.assertEqual(
            lines[2],
            "| cluster, 1 node | 1 | 1,244.5 | 1,234.5 | 0.25 | 4.00 | 2.50 | 25.00 | 50.00 "
            "| 200.0 | 0 |",
        )
        self.assertEqual(
            lines[3],
            "| cluster, 2 nodes | 1 | 210.0 | 200.0 | 0.50 | 4.00 | 7.25 | 72.50 | 145.00 "
            "| 120.0 | 1 |",
        )
        # No latency run of this kind: dashes, not zeros.
        self.assertEqual(
            lines[4],
            "| one gateway on PostgreSQL (not cluster mode) | 1 | 190.0 | 180.0 | 0.30 | 4.00 "
            "| - | - | - | - | 0 |",
        )
        self.assertTrue(lines[5].startswith("| one gateway on SQLite | 1 | 560.0 | 550.0 | - |"))

    def test_without_a_rate_the_header_names_none(self) -> None:
        header = markdown_table(self.rows(), None).splitlines()[0]
        self.assertIn("| ACK p50 ms |", header)
        self.assertNotIn("msg/s |", header.split("ACK p50")[1].split("|")[0])
