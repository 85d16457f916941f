"""Where an ACK's slow moments come from: the gateway's stalls, next to the messages they held up.

A p99 or a max ACK latency says that some messages waited, not why. This runs one gateway
(a tree's ``src``, the suite's ingest-only flows or with ``--actions`` the demo flows and a
local receiver, a fresh SQLite store on this disk), sends it
``--messages`` messages at ``--rate`` messages/s over one stop-and-wait connection, and
records, in the gateway (``bench/sitehook/sitecustomize.py`` with ``UDSGATEWAY_BENCH_STALLS``),
every database-thread job that ran longer than ``--threshold`` ms and every time the reactor
came back later than that. It prints the latency percentiles, then each message slower than
the threshold with the stall it overlapped, and a count of slow messages by what held them:

    .venv/bin/python -m bench.stalls [--tree DIR ...] [--runs 1] [--messages 3000]
        [--rate 200] [--threshold 3] [--actions]

With two or more ``--tree``, the runs alternate between the trees (A B A B ...). Latency runs
from the write of a message to its ACK (the sender is a plain blocking socket, sleeping until
each message's time).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import gateway_scenarios as gs
from bench.messages import MESSAGE_TYPES, MessageFactory
from bench.servers import gateway_action_flows, gateway_flows

HERE = Path(__file__).resolve().parent
SITEHOOK = HERE / "sitehook"
BIN = Path(sys.executable).parent

#: (kind, wall-clock start, milliseconds, what): as the site hook writes them.
Stall = tuple[str, float, float, str]


def attribute(
    sent: Sequence[tuple[float, float]], stalls: Sequence[Stall], threshold_ms: float
) -> list[tuple[float, float, Stall | None]]:
    """The messages slower than ``threshold_ms`` ((wall time sent, latency ms) each), each with
    the longest stall whose time overlaps its wait, or None."""
    found: list[tuple[float, float, Stall | None]] = []
    for at, latency in sent:
        if latency <= threshold_ms:
            continue
        end = at + latency / 1000
        best: Stall | None = None
        for stall in stalls:
            if stall[0] == "reactor stack":
                continue
            start, stop = stall[1], stall[1] + stall[2] / 1000
            if start < end and stop > at and (best is None or stall[2] > best[2]):
                best = stall
        found.append((at, latency, best))
    return found


def summary(slow: Sequence[tuple[float, float, Stall | None]]) -> Counter[str]:
    """Slow messages by what held them (``kind: what``), or ``no stall seen``."""
    return Counter(f"{s[0]}: {s[3]}" if s is not None else "no stall seen" for _a, _l, s in slow)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _send(port: int, messages: int, rate: float) -> list[tuple[float, float]]:
    factory = MessageFactory(control_prefix="STALL")
    frames = [
        b"\x0b" + factory.make(MESSAGE_TYPES[i % len(MESSAGE_TYPES)]).payload + b"\x1c\r"
        for i in range(messages)
    ]
    results: list[tuple[float, float]] = []
    with socket.create_connection((gs.HOST, port), timeout=30) as sender:
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        begin = time.perf_counter()
        for index, frame in enumerate(frames):
            wait = begin + index / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            wall, start = time.time(), time.perf_counter()
            sender.sendall(frame)
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = sender.recv(65536)
                if not chunk:
                    raise ConnectionError("the gateway closed the connection")
                answer += chunk
            if b"MSA|AA" not in answer and b"MSA|CA" not in answer:
                raise RuntimeError(f"message {index} was not accepted: {answer[:80]!r}")
            results.append((wall, (time.perf_counter() - start) * 1000))
    return results


def run_once(
    tree: Path, messages: int, rate: float, threshold_ms: float, actions: bool = False
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-stalls-") as name:
        folder = Path(name)
        flows = folder / "flows.toml"
        receiver = None
        if actions:
            flows.write_text(gateway_action_flows(gs.RECEIVER_PORT, gs.TENANT))
            receiver = gs._start_receiver(folder, None)
        else:
            flows.write_text(gateway_flows(gs.TENANT))
        stalls_file = folder / "stalls.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), str(SITEHOOK)])
        env["UDSGATEWAY_BENCH_STALLS"] = str(stalls_file)
        env["UDSGATEWAY_BENCH_STALL_MS"] = str(threshold_ms)
        command = [str(BIN / "python"), str(BIN / "twistd"), "-n", "--pidfile=", "udsgateway"]
        command += ["--config", str(gs._config(folder, flows))]
        with open(folder / "gateway.log", "wb") as log:
            gateway = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env
            )
            try:
                gs._wait_port(gs.GATEWAY_PORT, gateway, 60)
                sent = _send(gs.GATEWAY_PORT, messages, rate)
                os.kill(gateway.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 10
                while not stalls_file.exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError("the gateway wrote no stalls file")
                    time.sleep(0.05)
                stalls: list[Stall] = [
                    (str(kind), float(at), float(took), str(what))
                    for kind, at, took, what in json.loads(stalls_file.read_text())
                ]
            finally:
                gs._stop(gateway)
                if receiver is not None:
                    gs._stop(receiver)
    latencies = [latency for _at, latency in sent]
    slow = attribute(sent, stalls, threshold_ms)
    return {
        "tree": str(tree),
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "slow": slow,
        "begin": sent[0][0],
        "stalls": [s for s in stalls if s[1] >= sent[0][0]],
    }


def report(result: dict[str, Any], threshold_ms: float, show: int) -> str:
    begin = result["begin"]
    lines = [
        f"{result['tree']}: p50 {result['p50']:.2f} ms, p99 {result['p99']:.2f} ms, "
        f"max {result['max']:.2f} ms; {len(result['slow'])} messages over {threshold_ms:g} ms, "
        f"{len(result['stalls'])} stalls over {threshold_ms:g} ms"
    ]
    for reason, count in summary(result["slow"]).most_common():
        lines.append(f"  {count:5d}  {reason}")
    for stall in result["stalls"]:
        if stall[0] == "reactor stack":
            lines.append(f"    reactor at {stall[1] - begin:7.3f} s, late, was in: {stall[3]}")
    for at, latency, stall in result["slow"][:show]:
        held = (
            f"{stall[0]} {stall[3]} {stall[2]:.1f} ms at {stall[1] - begin:.3f} s"
            if stall
            else "-"
        )
        lines.append(f"    at {at - begin:7.3f} s  {latency:6.1f} ms  held by: {held}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stalls", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        help="a tree holding src/udsgateway (default: this one)",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per tree")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s")
    parser.add_argument("--threshold", type=float, default=3.0, help="ms")
    parser.add_argument("--show", type=int, default=20, help="slow messages listed per run")
    parser.add_argument(
        "--actions",
        action="store_true",
        help="the demo flows (one mapped MLLP action per message) to a local receiver",
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.rate <= 0 or args.runs < 1 or args.threshold <= 0:
        parser.error("--messages, --runs, --rate and --threshold must be positive")
    trees = [tree.resolve() for tree in (args.tree or [HERE.parent])]
    for tree in trees:
        if not (tree / "src" / "udsgateway").is_dir():
            parser.error(f"{tree} holds no src/udsgateway")
    gs.use_ports(gs._free_port(), gs._free_port())
    total = args.runs * len(trees)
    for number in range(total):
        tree = trees[number % len(trees)]
        print(
            f"[{number + 1}/{total}] {tree}: {args.messages} messages at {args.rate:g}/s",
            flush=True,
        )
        result = run_once(tree, args.messages, args.rate, args.threshold, args.actions)
        print(report(result, args.threshold, args.show), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
