"""Run the benchmark suite and rewrite ``bench/RESULTS.md``.

    python -m bench.run [--quick] [--rounds 3] [--scenario NAME ...] [--server NAME ...]

Installs the reference peers when missing, then runs interleaved rounds: in each round every
selected scenario runs against every available server in turn (A B C A B C), each measurement on
a fresh server process. Medians over the rounds go to RESULTS.md, with ratios against the peers,
the exact command, every version and the machine. ``--quick`` runs tiny sizes in one round as a
smoke check and writes ``bench/work/RESULTS-quick.md`` instead (unless ``--results`` is given),
so it never overwrites the real results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.install import ensure_peers
from bench.loadgen import CLK_TCK, machine_busy_ticks, run_load
from bench.messages import MessageFactory
from bench.report import Measurement, ReportInput, machine_info, render
from bench.scenarios import (
    HOOK_SCENARIOS,
    LOAD_SCENARIOS,
    SCENARIO_NAMES,
    LoadScenario,
    ScenarioUnavailableError,
)
from bench.servers import BENCH_DIR, HOST, SERVERS, WORK_DIR, ServerUnavailableError, running

ACK_TIMEOUT = 5.0
# A server that fails to start this many times in a row is skipped for the rest of the session.
MAX_START_FAILURES = 2
WARMUP = 200
QUICK_WARMUP = 20


QUIET_CORES = 0.3


def log(message: str) -> None:
    print(message, flush=True)


def wait_for_quiet(max_wait: float) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) until the machine uses under QUIET_CORES cores over one
    second, so a measurement does not start in the middle of someone else's test run. Returns
    (seconds waited, cores busy in the last sample)."""
    started = time.monotonic()
    cores = 0.0
    while True:
        before = machine_busy_ticks()
        time.sleep(1.0)
        cores = (machine_busy_ticks() - before) / CLK_TCK
        waited = time.monotonic() - started
        if cores < QUIET_CORES or waited >= max_wait:
            return waited, cores


def measure(
    server_name: str, scenario: LoadScenario, quick: bool, round_no: int
) -> tuple[Measurement, bool]:
    """One measurement on a fresh server. The flag says whether the server could start."""
    server = SERVERS[server_name]
    connections, messages = scenario.size(quick)
    measurement = Measurement(round=round_no, scenario=scenario.name, server=server_name)
    try:
        with running(server) as started:
            measurement.startup_s = started.startup_s
            result = asyncio.run(
                run_load(
                    HOST,
                    started.port,
                    connections=connections,
                    messages=messages,
                    pipeline=scenario.pipeline,
                    rate=scenario.rate,
                    pid=started.pid,
                    timeout=ACK_TIMEOUT,
                    warmup=QUICK_WARMUP if quick else WARMUP,
                    settle=30.0 if server.durable else 5.0,
                    factory=MessageFactory(seed=2575),
                )
            )
            measurement.result = result.to_dict()
            return measurement, True
    except ServerUnavailableError as exc:
        measurement.error = str(exc)
        return measurement, False
    except (OSError, RuntimeError) as exc:
        measurement.error = f"{type(exc).__name__}: {exc}"
        return measurement, True


def describe(measurement: Measurement) -> str:
    r = measurement.result
    if r is None:
        return f"FAILED: {(measurement.error or '').splitlines()[0]}"
    errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items() if v) or "no errors"
    p99 = r["latency_p99_ms"]
    cpu = r["server_cpu_ms_per_msg_settled"]
    return (
        f"{r['ok']:,}/{r['total']:,} verified, {r['msgs_per_s']:,.0f} msg/s, "
        f"p99 {'-' if p99 is None else f'{p99:.2f}'} ms, "
        f"CPU {'-' if cpu is None else f'{cpu:.3f}'} ms/msg, {errors}"
    )


def report_input(session: dict[str, Any], raw_path: Path) -> ReportInput:
    """The report of one session, from the dict that is also saved as raw JSON."""
    measurements = [Measurement(**m) for m in session["measurements"]]
    measured = [
        n
        for n in session["servers"]
        if any(m.server == n and m.result is not None for m in measurements)
    ]
    selected = set(session["scenarios"])
    return ReportInput(
        command=session["command"],
        started=session["started"],
        finished=session["finished"],
        rounds=session["rounds"],
        quick=session["quick"],
        scenarios=[s for s in LOAD_SCENARIOS if s.name in selected],
        hooks=[h for h in HOOK_SCENARIOS if h.name in session["hooks"]],
        hook_results=session["hooks"],
        servers=measured,
        skipped_servers={k: v for k, v in session["skipped"].items() if k not in measured},
        measurements=measurements,
        machine=session["machine"],
        versions=session["versions"],
        install_notes=session["install_notes"],
        raw_json=raw_path,
        warmup=QUICK_WARMUP if session["quick"] else WARMUP,
    )


#: Everything after this line of RESULTS.md is written by hand and kept by every run.
ANALYSIS_MARKER = "<!-- analysis: written by hand, kept by make bench -->"


def write_results(path: Path, generated: str) -> None:
    """Write the generated report, keeping the hand-written analysis of the old file."""
    kept = ""
    if path.exists():
        old = path.read_text()
        at = old.find(ANALYSIS_MARKER)
        if at != -1:
            kept = "\n" + old[at:]
    path.write_text(generated + kept)


def rerender(raw_path: Path, results: Path | None) -> int:
    session = json.loads(raw_path.read_text())
    default = WORK_DIR / "RESULTS-quick.md" if session["quick"] else BENCH_DIR / "RESULTS.md"
    target = results or default
    write_results(target, render(report_input(session, raw_path)))
    log(f"[done] wrote {target} from {raw_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIO_NAMES,
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--server",
        action="append",
        choices=tuple(SERVERS),
        help="run only this server (repeatable; default: all that are available)",
    )
    parser.add_argument("--no-install", action="store_true", help="do not install missing peers")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each measurement, wait up to this many seconds for the machine to be idle "
        f"(under {QUIET_CORES} cores busy); 0 disables (default 20)",
    )
    parser.add_argument("--results", type=Path, default=None, help="where to write the report")
    parser.add_argument(
        "--rerender",
        type=Path,
        default=None,
        metavar="RAW_JSON",
        help="measure nothing: rewrite the report from a saved bench/work/results-*.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rerender is not None:
        return rerender(args.rerender, args.results)
    command = "python -m bench.run" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        log("--rounds must be >= 1")
        return 2
    results_path = args.results or (
        WORK_DIR / "RESULTS-quick.md" if args.quick else BENCH_DIR / "RESULTS.md"
    )
    started = time.time()

    selected = set(args.scenario or SCENARIO_NAMES)
    scenarios = [s for s in LOAD_SCENARIOS if s.name in selected]
    hooks = [h for h in HOOK_SCENARIOS if h.name in selected]

    versions: dict[str, str] = {}
    notes: list[str] = []
    failures: dict[str, str] = {}
    if not args.no_install:
        install = ensure_peers(log)
        versions, notes, failures = install.versions, install.notes, install.failures

    log("[machine] probing")
    machine = machine_info()
    log(
        f"[machine] {machine['nproc']} cpu ({machine['cpu']}), {machine['kernel']}, Python "
        f"{machine['python']}, Node {machine['node']}, fsync {machine['fsync_ms']} ms"
    )

    wanted = args.server or list(SERVERS)
    servers: list[str] = []
    skipped: dict[str, str] = {}
    for name in wanted:
        reason = SERVERS[name].check()
        if reason is None and name == "medplum-hl7" and "@medplum/hl7" in failures:
            reason = failures["@medplum/hl7"]
        if reason is None and name == "simple-hl7" and "simple-hl7" in failures:
            reason = failures["simple-hl7"]
        if reason is None and name == "messagefoundry" and "messagefoundry" in failures:
            reason = failures["messagefoundry"]
        if reason is None:
            servers.append(name)
        else:
            skipped[name] = reason
            log(f"[skip] {name}: {reason}")
    if "canned-ack" not in servers and scenarios:
        log("[warn] canned-ack is not selected: no ceiling to compare against")

    hook_results: dict[str, str] = {}
    for hook in hooks:
        try:
            log(f"[hook] {hook.name}: {hook.title}")
            result = hook.run(args.quick)
            hook_results[hook.name] = json.dumps(result, sort_keys=True)
            log(f"[hook] {hook.name}: {hook_results[hook.name]}")
        except ScenarioUnavailableError as exc:
            hook_results[hook.name] = str(exc)
            log(f"[not run] {hook.name}: {exc}")

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    raw_path = WORK_DIR / time.strftime("results-%Y%m%d-%H%M%S.json", time.gmtime(started))
    measurements: list[Measurement] = []
    session: dict[str, Any] = {
        "command": command,
        "started": started,
        "finished": None,
        "rounds": rounds,
        "quick": args.quick,
        "scenarios": [s.name for s in scenarios],
        "hooks": hook_results,
        "servers": servers,
        "skipped": skipped,
        "machine": machine,
        "versions": versions,
        "install_notes": notes,
        "measurements": [],
    }

    def save() -> None:
        # Rewritten after every measurement, so an interrupted run can still be rendered
        # with --rerender.
        session["finished"] = time.time()
        session["measurements"] = [asdict(m) for m in measurements]
        raw_path.write_text(json.dumps(session, indent=2))

    total = rounds * len(scenarios) * len(servers)
    start_failures: dict[str, int] = {}
    done = 0
    for round_no in range(1, rounds + 1):
        for scenario in scenarios:
            for name in list(servers):
                if name in skipped:
                    continue
                done += 1
                prefix = (
                    f"[{done}/{total}] round {round_no}/{rounds} {scenario.name} "
                    f"({scenario.shape(args.quick)}) {name}:"
                )
                if args.quiet_wait > 0:
                    waited, cores = wait_for_quiet(args.quiet_wait)
                    if waited > 1.5:
                        quiet = f"waited {waited:.0f} s for a quiet machine ({cores:.2f} cores)"
                        log(f"{prefix} {quiet}")
                log(f"{prefix} starting")
                measurement, could_start = measure(name, scenario, args.quick, round_no)
                measurements.append(measurement)
                save()
                log(f"{prefix} {describe(measurement)}")
                if could_start:
                    start_failures[name] = 0
                    continue
                start_failures[name] = start_failures.get(name, 0) + 1
                if start_failures[name] >= MAX_START_FAILURES:
                    skipped[name] = measurement.error or "could not start"
                    log(f"[skip] {name}: failed to start {MAX_START_FAILURES} times in a row")
    finished = time.time()
    save()
    report = report_input(session, raw_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    write_results(results_path, render(report))
    log(f"[done] {len(measurements)} measurements in {(finished - started) / 60:.1f} min")
    log(f"[done] wrote {results_path} (raw: {raw_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
