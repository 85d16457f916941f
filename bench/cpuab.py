"""A/B of two source trees by the gateway's CPU per message, for a loaded machine.

Wall-clock rates say little on a machine shared with other work; the CPU time the gateway
process spends per message moves much less. This runs the same scenario on the gateway of
tree A and of tree B alternately (A B A B ...), each run on a fresh gateway, store (SQLite,
this disk) and receiver, and reports per message, as medians per tree and their ratio:

- ``cpu_ms``: user + system CPU of the gateway process (every thread), from the first
  message sent until it is idle again (so the delivery, the outcome and the rest are in);
- ``reactor_ms`` / ``threads_ms``: the same split between the reactor thread and the other
  threads (the database thread, essentially);
- ``db_switches``: context switches of the database thread (voluntary + involuntary, from
  ``/proc/<pid>/task/<tid>/status``), the hand-offs the issue counts;
- with ``--count``, ``crossings``: hand-offs to the database thread per message, by what
  they ran (``bench/sitehook/sitecustomize.py`` counts them; it costs a little CPU, so the
  CPU figures of a ``--count`` run are not compared with those of a run without it);
- with ``--instructions``: instructions per message of the whole gateway process under
  ``valgrind --tool=callgrind`` (collection switched on for the measured messages only;
  deterministic whatever the machine's load, but the gateway runs about 50 times slower,
  so use small sizes, e.g. ``--connections 2 --messages 100``).

A tree is a directory holding ``src/udsgateway`` (a git worktree; its compiled modules must
have been built there: ``make install`` in it, or ``python setup.py build_ext --inplace``).
The gateway runs with this interpreter (``.venv/bin/python``) and ``PYTHONPATH=<tree>/src``.

    .venv/bin/python -m bench.cpuab --a /work/wt/base --b . [--scenario relay|actions|ingest]
        [--pairs 3] [--connections 8] [--messages 1000] [--count] [--instructions [--dumps D]]

Scenarios: ``relay`` (five flows, each one mapped MLLP action to a local ``udsgateway
receive``, as ``bench.gateway_scenarios relay``), ``actions`` (the demo flows of
``etc/flows/demo.toml``, as the ``udsgateway-actions`` server of ``bench.run``),
``ingest`` (flows without actions, as the ``udsgateway`` server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import gateway_scenarios as gs
from bench.loadgen import run_load
from bench.servers import gateway_action_flows, gateway_flows

HERE = Path(__file__).resolve().parent
SITEHOOK = HERE / "sitehook"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BIN = Path(sys.executable).parent


def _threads(pid: int) -> dict[int, tuple[int, int, int]]:
    """tid -> (CPU ticks, context switches, system CPU ticks) of every thread of ``pid``."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        switches = sum(
            int(line.split()[1])
            for line in status.splitlines()
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"))
        )
        found[int(task.name)] = (ticks, switches, int(fields[12]))
    return found


def _settled(pid: int, quiet: float = 1.0, limit: float = 120.0, idle_share: float = 0.0) -> None:
    """Wait until the process used at most ``idle_share`` of a core for ``quiet`` seconds
    (at most ``limit``). Under callgrind the gateway's timers (the checkpoint thread's
    tick) never leave it at exactly zero: a share of 0.2 there tells idle from busy."""
    deadline = time.monotonic() + limit
    samples = [(time.monotonic(), sum(t[0] for t in _threads(pid).values()))]
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = time.monotonic()
        samples.append((now, sum(t[0] for t in _threads(pid).values())))
        window = [s for s in samples if s[0] >= now - quiet - 0.1]
        if now - samples[0][0] < quiet:
            continue
        first = window[0]
        used = (samples[-1][1] - first[1]) / CLK_TCK
        if used <= idle_share * (now - first[0]):
            return
        samples = window


def _flows(scenario: str, receiver_port: int) -> str:
    if scenario == "relay":
        return gs.relay_flows(receiver_port)
    if scenario == "actions":
        return gateway_action_flows(receiver_port, tenant=gs.TENANT)
    return gateway_flows(tenant=gs.TENANT)


def _callgrind(pid: int, *command: str) -> None:
    subprocess.run(["callgrind_control", *command, str(pid)], check=True, capture_output=True)


def _instructions(folder: Path) -> int:
    """The ``totals:`` (instructions) of the callgrind dumps written in ``folder``, summed."""
    total = 0
    for dump in folder.glob("callgrind.out*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def run_once(
    tree: Path,
    scenario: str,
    connections: int,
    messages: int,
    count: bool,
    instructions: bool,
    profile: Path | None = None,
    dumps: Path | None = None,
) -> dict[str, Any]:
    total = connections * messages
    with tempfile.TemporaryDirectory(prefix="bench-cpuab-") as name:
        folder = Path(name)
        flows = folder / "flows.toml"
        flows.write_text(_flows(scenario, gs.RECEIVER_PORT))
        env = dict(os.environ)
        paths = [str(tree / "src")]
        counts_file = folder / "counts.json"
        if count:
            paths.append(str(SITEHOOK))
            env["UDSGATEWAY_BENCH_COUNTS"] = str(counts_file)
        env["PYTHONPATH"] = os.pathsep.join(paths)
        receiver = None
        if scenario != "ingest":
            receiver = subprocess.Popen(
                [str(BIN / "udsgateway"), "receive", "--port", str(gs.RECEIVER_PORT)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=folder,
            )
            gs._wait_port(gs.RECEIVER_PORT, receiver, 30)
        command = [str(BIN / "python"), str(BIN / "twistd"), "-n", "--pidfile=", "udsgateway"]
        command += ["--config", str(gs._config(folder, flows))]
        if instructions:
            command = [
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={folder}/callgrind.out.%p",
                *command,
            ]
        log = open(folder / "gateway.log", "wb")  # noqa: SIM115 - closed below
        gateway = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env
        )
        try:
            gs._wait_port(gs.GATEWAY_PORT, gateway, 600 if instructions else 60)
            _settled(gateway.pid, idle_share=0.2 if instructions else 0.0)
            if count:
                os.kill(gateway.pid, signal.SIGUSR2)
                time.sleep(0.5)
                counted_before = json.loads(counts_file.read_text())
            if instructions:
                _callgrind(gateway.pid, "--zero")
                _callgrind(gateway.pid, "--instr=on")
            spy = None
            if profile is not None:
                # py-spy (not a dependency: pip install py-spy anywhere) samples the measured
                # messages only, in py-spy's "raw" format (collapsed stacks, one per line).
                spy = subprocess.Popen(
                    [
                        os.environ.get("PY_SPY", "py-spy"),
                        "record",
                        "--pid",
                        str(gateway.pid),
                        "--rate",
                        "250",
                        "--threads",
                        "--gil",
                        "--format",
                        "raw",
                        "--output",
                        str(profile),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(2)
            before = _threads(gateway.pid)
            result = asyncio.run(
                run_load(
                    gs.HOST,
                    gs.GATEWAY_PORT,
                    connections=connections,
                    messages=messages,
                    timeout=300.0 if instructions else 30.0,
                    settle=0,
                )
            )
            _settled(
                gateway.pid,
                quiet=3.0 if instructions else 1.0,
                limit=900,
                idle_share=0.2 if instructions else 0.0,
            )
            after = _threads(gateway.pid)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            if instructions:
                _callgrind(gateway.pid, "--instr=off")
                _callgrind(gateway.pid, "--dump")
            if count:
                os.kill(gateway.pid, signal.SIGUSR2)
                time.sleep(0.5)
        finally:
            gs._stop(gateway)
            log.close()
            if receiver is not None:
                gs._stop(receiver)
        if result.ok != total:
            raise RuntimeError(
                f"{tree}: {result.ok} of {total} messages verified: {result.errors}"
            )
        pid = gateway.pid
        zero = (0, 0, 0)
        reactor = after[pid][0] - before.get(pid, zero)[0]
        reactor_sys = after[pid][2] - before.get(pid, zero)[2]
        others = {
            tid: tuple(now - then for now, then in zip(counts, before.get(tid, zero), strict=True))
            for tid, counts in after.items()
            if tid != pid
        }
        threads = sum(counts[0] for counts in others.values())
        threads_sys = sum(counts[2] for counts in others.values())
        db = max(others.values(), default=zero)  # the busiest other thread: the database's
        per = 1000 / CLK_TCK / total
        run: dict[str, Any] = {
            "cpu_ms": round((reactor + threads) * per, 4),
            "reactor_ms": round(reactor * per, 4),
            "threads_ms": round(threads * per, 4),
            "reactor_sys_ms": round(reactor_sys * per, 4),
            "threads_sys_ms": round(threads_sys * per, 4),
            "db_switches": round(db[1] / total, 2),
            "msgs_per_s": round(result.msgs_per_s, 1),
        }
        if count:
            counted = json.loads(counts_file.read_text())
            for key, value in counted_before.items():
                counted[key] -= value
            counted = {key: value for key, value in counted.items() if value}
            run["crossings"] = round(
                sum(v for k, v in counted.items() if not k.startswith("sql: ")) / total, 3
            )
            run["statements"] = round(
                sum(v for k, v in counted.items() if k.startswith("sql: ")) / total, 3
            )
            run["crossings_by_function"] = {
                k: round(v / total, 3) for k, v in sorted(counted.items(), key=lambda kv: -kv[1])
            }
        if instructions:
            run["instructions_per_msg"] = _instructions(folder) // total
            if dumps is not None:
                # For ``callgrind_annotate``: which functions (Python's eval loop, SQLite,
                # the compiled modules) the instructions went to.
                dumps.mkdir(parents=True, exist_ok=True)
                for dump in folder.glob("callgrind.out*"):
                    shutil.copy(dump, dumps / dump.name)
        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="tree A (holds src/udsgateway)")
    parser.add_argument("--b", type=Path, required=True, help="tree B")
    parser.add_argument("--scenario", choices=("relay", "actions", "ingest"), default="relay")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--count", action="store_true", help="count database-thread crossings")
    parser.add_argument("--instructions", action="store_true", help="under valgrind's callgrind")
    parser.add_argument(
        "--profile", type=Path, help="py-spy's collapsed stacks of each run: PROFILE-a1.txt..."
    )
    parser.add_argument(
        "--dumps",
        type=Path,
        help="with --instructions: keep each run's callgrind dumps in DUMPS-a1/, DUMPS-b1/...",
    )
    args = parser.parse_args()
    # Ports of its own, never the fixed defaults: two A/Bs started at the same moment
    # (engineers sharing a machine) would otherwise both find them free and collide.
    gs.use_ports(gs._free_port(), gs._free_port())
    trees = {"a": args.a.resolve(), "b": args.b.resolve()}
    runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    load = []
    for _ in range(args.pairs):
        for key, tree in trees.items():
            load.append(os.getloadavg()[0])
            profile = None
            if args.profile is not None:
                profile = args.profile.with_name(
                    f"{args.profile.name}-{key}{len(runs[key]) + 1}.txt"
                )
            run = run_once(
                tree,
                args.scenario,
                args.connections,
                args.messages,
                args.count,
                args.instructions,
                profile,
                None
                if args.dumps is None
                else args.dumps.with_name(f"{args.dumps.name}-{key}{len(runs[key]) + 1}"),
            )
            runs[key].append(run)
            print(key, json.dumps(run), file=sys.stderr, flush=True)
    report: dict[str, Any] = {
        "scenario": args.scenario,
        "messages": args.connections * args.messages,
        "pairs": args.pairs,
        "load_average": [round(x, 1) for x in load],
        "a": str(trees["a"]),
        "b": str(trees["b"]),
    }
    keys = [k for k, v in runs["a"][0].items() if isinstance(v, int | float)]
    for key in keys:
        a = statistics.median(run[key] for run in runs["a"])
        b = statistics.median(run[key] for run in runs["b"])
        report[key] = {
            "a": a,
            "b": b,
            "b_over_a": round(b / a, 3) if a else None,
            "a_runs": [run[key] for run in runs["a"]],
            "b_runs": [run[key] for run in runs["b"]],
        }
    if args.count:
        report["crossings_by_function"] = {
            k: runs[k][-1]["crossings_by_function"] for k in ("a", "b")
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":  # pragma: no cover - manual runs
    main()
