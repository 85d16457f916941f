"""Machine facts, aggregation (medians over rounds) and the RESULTS.md writer."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scenarios import HookScenario, LoadScenario
from bench.servers import PURE_VENV_BIN, REPO_DIR, WORK_DIR, gateway_variant

# -- machine ----------------------------------------------------------------------------------


def _command_output(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def fsync_probe(directory: Path, count: int = 200) -> float:
    """Median ms of a 1 KiB append + fsync in ``directory`` (what a durable commit pays)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"fsync-probe-{os.getpid()}"
    samples: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            start = time.perf_counter()
            os.write(fd, b"x" * 1024)
            os.fsync(fd)
            samples.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(samples)


def machine_info() -> dict[str, str]:
    commit = _command_output(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "-C", str(REPO_DIR), "status", "--porcelain"])
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _cpu_model(),
        "memory": _mem_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "node": _command_output(["node", "--version"]) or "not installed",
        "npm": _command_output(["npm", "--version"]) or "not installed",
        "fsync_ms": f"{fsync_probe(WORK_DIR):.2f}",
        "loadavg": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "repo_commit": (commit or "unknown") + (" (work tree modified)" if dirty else ""),
        "gateway_build": gateway_variant(),
        "pure_build": gateway_variant(PURE_VENV_BIN) if PURE_VENV_BIN.exists() else "absent",
    }


# -- aggregation ------------------------------------------------------------------------------


@dataclass
class Measurement:
    round: int
    scenario: str
    server: str
    result: dict[str, Any] | None = None
    error: str | None = None
    startup_s: float | None = None


@dataclass
class Summary:
    scenario: str
    server: str
    runs: int
    verified_runs: int
    medians: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


METRICS: tuple[str, ...] = (
    "msgs_per_s",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "server_cpu_ms_per_msg",
    "server_cpu_ms_per_msg_settled",
    "server_peak_rss_kib",
    "loadgen_cpu_ms_per_msg",
    "other_cpu_cores",
)


def summarize(measurements: Sequence[Measurement], scenario: str, server: str) -> Summary:
    runs = [m for m in measurements if m.scenario == scenario and m.server == server]
    good = [m.result for m in runs if m.result is not None and m.result.get("verified")]
    summary = Summary(scenario, server, runs=len(runs), verified_runs=len(good))
    for metric in METRICS:
        values = [r[metric] for r in good if r.get(metric) is not None]
        summary.medians[metric] = statistics.median(values) if values else None
    for m in runs:
        if m.error:
            summary.failures.append(m.error)
        if m.result is not None:
            for kind, count in m.result.get("errors", {}).items():
                if count:
                    summary.errors[kind] = summary.errors.get(kind, 0) + count
    return summary


PEER_NOTES: tuple[str, ...] = (
    "simple-hl7 3.3.0 (`lib/server/tcp-server.js`) and @medplum/hl7 4.5.2 (`Hl7Connection`) "
    "both buffer socket reads until a read *ends* with FS CR and then parse the whole buffer as "
    "one message. When a sender pipelines, several frames arrive in one read and get a single "
    "ACK (for the first MSH-10): the load generator sees the next ACK answer the wrong message "
    "(`mismatch`) and abandons the connection (`aborted`). Their pipelined results are therefore "
    "failures by design of those libraries, not of the benchmark; with one message in flight "
    "(every real HL7 sender) they are correct.",
    "MessageFoundry commits each message (message, ingress-queue and event rows, one SQLite "
    'transaction) before its AA, like the gateway; the benchmark sets `synchronous = "full"` '
    "(its default is `normal`) so both pay an fsync per commit. Its router then runs after the "
    "ACK (the bench config routes everything nowhere), which is why its 'settled' CPU exceeds "
    "its 'to ACK' CPU. Its admin API listens on 127.0.0.1:27402 with auth disabled (loopback "
    "only, unused).",
    "canned-ack and the two Node servers store nothing: they are ceilings, not competitors, for "
    "a server that must commit before it ACKs.",
)


# -- formatting -------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.3g}x"


def _errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(errors.items())) or "none"


@dataclass
class ReportInput:
    command: str
    started: float
    finished: float
    rounds: int
    quick: bool
    scenarios: Sequence[LoadScenario]
    hooks: Sequence[HookScenario]
    hook_results: dict[str, str]
    servers: Sequence[str]
    skipped_servers: dict[str, str]
    measurements: Sequence[Measurement]
    machine: dict[str, str]
    versions: dict[str, str]
    install_notes: Sequence[str]
    raw_json: Path | None
    warmup: int = 200


def _versions_table(data: ReportInput) -> list[str]:
    v = data.versions
    rows = [
        "| server | version | started as |",
        "|---|---|---|",
        "| canned-ack | bench/refservers/canned_ack.py (this repo) | "
        "`.venv/bin/python bench/refservers/canned_ack.py --host 127.0.0.1 --port 27101` |",
        f"| simple-hl7 | simple-hl7 {v.get('simple-hl7', 'not installed')} (npm), "
        f"Node {data.machine['node']} | `NODE_PATH=bench/peers/node/node_modules node "
        "bench/refservers/simple_hl7_server.js 27201` |",
        f"| medplum-hl7 | @medplum/hl7 {v.get('@medplum/hl7', 'not installed')} "
        f"(+ @medplum/core {v.get('@medplum/core', '?')}) (npm), Node {data.machine['node']} | "
        "`NODE_PATH=bench/peers/node/node_modules node bench/refservers/medplum_server.js "
        "27301` |",
        f"| messagefoundry | messagefoundry {v.get('messagefoundry', 'not installed')} (PyPI), "
        "in bench/peers/messagefoundry-venv, SQLite synchronous=FULL | "
        "`MEFOR_VALUE_BENCH_MLLP_PORT=27401 bench/peers/messagefoundry-venv/bin/messagefoundry "
        "serve --config bench/refservers/messagefoundry/config --service-config "
        "bench/refservers/messagefoundry/messagefoundry.toml --db <tmp>/messagefoundry.db "
        "--port 27402 --env dev` |",
        f"| udsgateway | this repo at {data.machine['repo_commit']} | "
        "`.venv/bin/twistd -n --pidfile= udsgateway --config <tmp>/udsgateway.toml` "
        "(config from `bench.servers.gateway_config`; flows from `bench.servers.gateway_flows`: "
        "one MLLP flow per first-class type, no actions, ACK on commit); hot path: "
        f"{data.machine.get('gateway_build', '?')} |",
        "| udsgateway-actions | the same | the same, with the demo flows "
        "(`bench.servers.gateway_action_flows`: `etc/flows/demo.toml` for the bench tenant): "
        "every message runs one mapped MLLP action to a live `udsgateway receive` on the "
        "server's port + 1 (its CPU is not counted) |",
        "| udsgateway-pure, udsgateway-actions-pure | the same | the same from `.venv-pure` "
        "(`UDSGATEWAY_PURE=1`: nothing compiled; build: "
        f"{data.machine.get('pure_build', '?')}) |",
    ]
    return rows


def render(data: ReportInput) -> str:
    m = data.machine
    duration = data.finished - data.started
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(data.started))
    lines: list[str] = [
        "# Benchmark results",
        "",
        f"Generated by `{data.command}` on {when}; the run took {duration / 60:.1f} min.",
        "Rewritten by every full run of `make bench`; see bench/README.md for what each "
        "scenario measures.",
        "",
    ]
    completed = max((m.round for m in data.measurements), default=0)
    if completed < data.rounds:
        lines += [
            f"**Interrupted: {completed} of {data.rounds} rounds were run (the last one may be "
            "partial); the medians are over the measurements that exist.**",
            "",
        ]
    if data.quick:
        lines += [
            "**`--quick` smoke run: tiny sizes, one round. These numbers only show that the "
            "suite works; do not compare them.**",
            "",
        ]
    lines += [
        "## How to read this",
        "",
        f"- Every cell is the **median over {data.rounds} interleaved round(s)**: each round runs "
        "every scenario against every server in turn (A B C A B C), each measurement on a "
        "**fresh server process** with an empty store. Only rounds where every ACK was verified "
        "count toward a median; the others are listed under errors.",
        "- The load generator (`bench/loadgen.py`) shares this machine with the server. On "
        f"{m['nproc']} cores it takes up to one core itself; its own CPU per message is shown "
        "so you can tell when it, not the server, is the limit (that is the case for "
        "canned-ack, which is why canned-ack *is* the ceiling).",
        "- Latency is from the write of a message to its verified ACK (for the fixed-rate "
        "scenario, from the scheduled send time when the sender was held back).",
        "- CPU ms/msg: server utime+stime over the measured messages (`/proc/<pid>/stat`), "
        "'to ACK' up to the last ACK, 'settled' once the server is idle again (includes work "
        "done after the ACK, e.g. routing). Peak RSS is VmHWM of the fresh process (it includes "
        f"start-up and a {data.warmup}-message warm-up, which is not measured otherwise).",
        "- Compare servers by the ratios, never by absolute numbers from another machine or "
        "session.",
        f"- Other load: during the measured runs the rest of the machine (neither the server nor "
        f"the load generator) used {_load_text(data.measurements)}; per run in the last "
        "table. Runs disturbed by other work show up there.",
        "",
        "## Machine",
        "",
        "| nproc | CPU | memory | kernel | Python | Node | npm | fsync (1 KiB append) | "
        "load at start (1/5/15 min) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {m['nproc']} | {m['cpu']} | {m['memory']} | {m['kernel']} | {m['python']} | "
        f"{m['node']} | {m['npm']} | {m['fsync_ms']} ms median | {m.get('loadavg', '?')} |",
        "",
        "## Servers and versions",
        "",
        *_versions_table(data),
        "",
    ]
    if data.install_notes:
        lines += ["Install notes:", ""]
        lines += [f"- {note}" for note in data.install_notes]
        lines.append("")
    if data.skipped_servers:
        lines += ["Servers **not run** in this session:", ""]
        for name, reason in data.skipped_servers.items():
            lines.append(f"- **{name}**: {_one_line(reason)}")
        lines.append("")

    summaries: dict[tuple[str, str], Summary] = {}
    for scenario in data.scenarios:
        for server in data.servers:
            summaries[scenario.name, server] = summarize(data.measurements, scenario.name, server)

    lines += ["## Results (medians)", ""]
    for scenario in data.scenarios:
        lines += [
            f"### {scenario.name}: {scenario.title}, {scenario.shape(data.quick)}",
            "",
            scenario.measures,
            "",
            "| server | verified runs | msgs/s | p50 ms | p99 ms | max ms | CPU ms/msg to ACK | "
            "CPU ms/msg settled | peak RSS MiB | loadgen CPU ms/msg | other load (cores) | "
            "errors (all runs) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for server in data.servers:
            s = summaries[scenario.name, server]
            md = s.medians
            lines.append(
                f"| {server} | {s.verified_runs}/{s.runs} | {_num(md['msgs_per_s'])} | "
                f"{_num(md['latency_p50_ms'])} | {_num(md['latency_p99_ms'])} | "
                f"{_num(md['latency_max_ms'])} | {_num(md['server_cpu_ms_per_msg'], 3)} | "
                f"{_num(md['server_cpu_ms_per_msg_settled'], 3)} | "
                f"{_mib(md['server_peak_rss_kib'])} | {_num(md['loadgen_cpu_ms_per_msg'], 3)} | "
                f"{_num(md['other_cpu_cores'])} | {_errors_text(s.errors)} |"
            )
        failures = [
            f"{server}: {_one_line(f)}"
            for server in data.servers
            for f in summaries[scenario.name, server].failures
        ]
        if failures:
            lines += ["", "Failed measurements:", ""]
            lines += [f"- {f}" for f in dict.fromkeys(failures)]
        lines.append("")

    lines += _targets(data, summaries)
    lines += _ratios(data, summaries)
    lines += ["## Known limits of the peers", ""]
    lines += [f"- {note}" for note in PEER_NOTES]
    lines.append("")
    lines += ["## Gateway-only scenarios", ""]
    for hook in data.hooks:
        outcome = data.hook_results.get(hook.name, "not selected")
        if outcome.startswith("{"):
            values = ", ".join(f"{k} = {v}" for k, v in json.loads(outcome).items())
            lines.append(f"- **{hook.name}**, {hook.title.lower()} ({hook.measures}): {values}.")
        else:
            lines.append(
                f"- **{hook.name}**, {hook.title.lower()} ({hook.measures}) "
                f"Not run: {_one_line(outcome)}."
            )
    lines.append("")
    lines += _all_runs(data)
    if data.raw_json is not None:
        lines += ["", f"Raw results (JSON, not committed): `{_rel(data.raw_json)}`."]
    return "\n".join(lines) + "\n"


NODE_PEERS = ("simple-hl7", "medplum-hl7")


def _targets(data: ReportInput, summaries: dict[tuple[str, str], Summary]) -> list[str]:
    """Issue 5's targets, each with what this run measured and whether it is met."""

    def median(scenario: str, server: str, key: str) -> float | None:
        found = summaries.get((scenario, server))
        return found.medians.get(key) if found is not None else None

    def hook(name: str) -> dict[str, Any]:
        outcome = data.hook_results.get(name, "")
        return json.loads(outcome) if outcome.startswith("{") else {}

    def status(value: float | None, limit: float, above: bool) -> str:
        if value is None:
            return "not measured"
        return "met" if (value >= limit if above else value <= limit) else "**not met**"

    gateway = median("ingest-8x2000", "udsgateway", "msgs_per_s")
    node = {p: median("ingest-8x2000", p, "msgs_per_s") for p in NODE_PEERS}
    node_rates = {p: v for p, v in node.items() if v}
    fastest = max(node_rates, key=lambda p: node_rates[p]) if node_rates else None
    node_best = node_rates[fastest] if fastest else None
    foundry = median("ingest-8x2000", "messagefoundry", "msgs_per_s")
    p99 = median("latency-200", "udsgateway", "latency_p99_ms")
    relay = hook("relay").get("relay_msgs_per_s")
    store = hook("store-size")
    backlog = hook("backlog-memory").get("peak_rss_mib")
    recovery = hook("store-recovery").get("sending_again_after_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    ingest_ratio = ratio(gateway, node_best)
    foundry_ratio = ratio(gateway, foundry)
    relay_ratio = ratio(relay, node_best)
    store_ratio = store.get("full_over_empty")
    rows = [
        (
            "durable ingest, 8 x 2,000 stop-and-wait",
            f">= 1.0x the faster Node peer ({fastest or '-'}, {_num(node_best)} msg/s)",
            f"{_num(gateway)} msg/s = {_times(ingest_ratio)}",
            status(ingest_ratio, 1.0, above=True),
        ),
        (
            "durable ingest vs MessageFoundry 0.2.1",
            f">= 30x ({_num(foundry)} msg/s)",
            _times(foundry_ratio),
            status(foundry_ratio, 30.0, above=True),
        ),
        (
            "relay, one mapped action, downstream ACKed",
            ">= 0.5x the faster Node peer's ingest",
            f"{_num(relay)} msg/s = {_times(relay_ratio)}",
            status(relay_ratio, 0.5, above=True),
        ),
        (
            "p99 ACK latency, 1 connection, 200 msg/s",
            "<= 5 ms",
            f"{_num(p99)} ms",
            status(p99, 5.0, above=False),
        ),
        (
            "ingest with 1,000,000 stored messages",
            "within 10% of the empty store (>= 0.9x)",
            f"{_num(store.get('ingest_full_msgs_per_s'))} vs "
            f"{_num(store.get('ingest_empty_msgs_per_s'))} msg/s = {_times(store_ratio)}",
            status(store_ratio, 0.9, above=True),
        ),
        (
            "1,000,000 queued deliveries",
            "peak RSS < 250 MB",
            f"{_num(backlog)} MiB",
            status(backlog * 1.048576 if backlog else None, 250.0, above=False),
        ),
        (
            "recovery of 100,000 queued deliveries after kill -9",
            "sending again within 10 s",
            f"{_num(recovery)} s",
            status(recovery, 10.0, above=False),
        ),
    ]
    lines = [
        "## Targets (issue 5)",
        "",
        "Computed from the medians above and the gateway-only scenarios below (relay and store "
        "size: medians of 3 runs; recovery and backlog memory: one run each).",
        "",
        "| scenario | target | measured | status |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append("")
    return lines + _targets_16(data, summaries)


def _targets_16(data: ReportInput, summaries: dict[tuple[str, str], Summary]) -> list[str]:
    """Issue 16's targets (the compiled hot path, the users' configuration)."""

    def median(scenario: str, server: str, key: str) -> float | None:
        found = summaries.get((scenario, server))
        return found.medians.get(key) if found is not None else None

    outcome = data.hook_results.get("relay", "")
    relay = json.loads(outcome) if outcome.startswith("{") else {}
    simple = median("ingest-8x2000", "simple-hl7", "msgs_per_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def status(value: float | None, limit: float, above: bool) -> str:
        if value is None:
            return "not measured"
        return "met" if (value >= limit if above else value <= limit) else "**not met**"

    relay_rate = relay.get("relay_msgs_per_s")
    relay_cpu = relay.get("server_cpu_ms_per_msg")
    actions = median("ingest-8x2000", "udsgateway-actions", "msgs_per_s")
    actions_cpu = median("ingest-8x2000", "udsgateway-actions", "server_cpu_ms_per_msg_settled")
    ingest = median("ingest-8x2000", "udsgateway", "msgs_per_s")
    ingest_cpu = median("ingest-8x2000", "udsgateway", "server_cpu_ms_per_msg_settled")
    p99 = median("latency-200", "udsgateway", "latency_p99_ms")
    rows = [
        (
            "relay, one mapped action, receiver ACKs (8 x 2,000) vs simple-hl7's ingest",
            ">= 0.25x (goal 0.5x)",
            f"{_num(relay_rate)} msg/s = {_times(ratio(relay_rate, simple))}",
            status(ratio(relay_rate, simple), 0.25, above=True),
        ),
        (
            "gateway CPU per relayed message",
            "<= 0.35 ms (goal 0.2 ms)",
            f"{_num(relay_cpu, 3)} ms",
            status(relay_cpu, 0.35, above=False),
        ),
        (
            "ingest with actions (demo flows, `udsgateway-actions`), 8 x 2,000, vs simple-hl7",
            ">= 0.5x (goal 1.0x)",
            f"{_num(actions)} msg/s = {_times(ratio(actions, simple))}, "
            f"{_num(actions_cpu, 3)} ms CPU/msg settled",
            status(ratio(actions, simple), 0.5, above=True),
        ),
        (
            "ingest-only flows vs simple-hl7",
            ">= 0.8x (goal 1.0x)",
            f"{_num(ingest)} msg/s = {_times(ratio(ingest, simple))}, "
            f"{_num(ingest_cpu, 3)} ms CPU/msg settled",
            status(ratio(ingest, simple), 0.8, above=True),
        ),
        (
            "p99 ACK latency at 200 msg/s, 1 connection",
            "<= 2 ms (goal 1 ms)",
            f"{_num(p99)} ms",
            status(p99, 2.0, above=False),
        ),
    ]
    lines = [
        "## Targets (issue 16)",
        "",
        "| scenario | target | measured | status |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
        "",
    ]
    pairs = [
        (compiled, compiled + "-pure")
        for compiled in ("udsgateway", "udsgateway-actions")
        if compiled in data.servers and compiled + "-pure" in data.servers
    ]
    if pairs:
        lines += [
            "Compiled ÷ pure build, same session, interleaved (throughput: higher is better; "
            "CPU ms/msg settled: lower is better):",
            "",
            "| scenario | servers | msgs/s | p99 latency | CPU ms/msg settled |",
            "|---|---|---|---|---|",
        ]
        cpu = "server_cpu_ms_per_msg_settled"
        for scenario in data.scenarios:
            for compiled, pure in pairs:
                a = summaries[scenario.name, compiled].medians
                b = summaries[scenario.name, pure].medians
                lines.append(
                    f"| {scenario.name} | {compiled} ÷ {pure} | "
                    f"{_ratio(a['msgs_per_s'], b['msgs_per_s'])} | "
                    f"{_ratio(a['latency_p99_ms'], b['latency_p99_ms'])} | "
                    f"{_ratio(a[cpu], b[cpu])} |"
                )
        lines.append("")
    return lines


def _ratios(data: ReportInput, summaries: dict[tuple[str, str], Summary]) -> list[str]:
    lines = [
        "## Ratios",
        "",
        "Throughput of each server as a fraction of canned-ack (the loopback + framing "
        "ceiling measured by the same load generator), medians:",
        "",
        "| scenario | " + " | ".join(data.servers) + " |",
        "|---|" + "---|" * len(data.servers),
    ]
    for scenario in data.scenarios:
        if scenario.rate is not None:
            continue
        canned = summaries.get((scenario.name, "canned-ack"))
        ceiling = canned.medians.get("msgs_per_s") if canned is not None else None
        cells = []
        for server in data.servers:
            value = summaries[scenario.name, server].medians.get("msgs_per_s")
            cells.append("-" if value is None or not ceiling else f"{100 * value / ceiling:.1f}%")
        lines.append(f"| {scenario.name} | " + " | ".join(cells) + " |")
    lines.append("")
    if "udsgateway" not in data.servers:
        reason = data.skipped_servers.get("udsgateway", "not selected")
        lines += [
            "udsgateway against its peers: **not measured in this session** "
            f"({_one_line(reason)}). Once it runs, this section gives gateway ÷ peer for "
            "throughput (higher is better), p99 latency and CPU per message (lower is better).",
            "",
        ]
        return lines
    lines += [
        "udsgateway ÷ peer (throughput: higher is better; p99 and CPU ms/msg settled: lower is "
        "better):",
        "",
        "| scenario | peer | msgs/s | p99 latency | CPU ms/msg settled |",
        "|---|---|---|---|---|",
    ]
    for scenario in data.scenarios:
        gw = summaries[scenario.name, "udsgateway"].medians
        for peer in data.servers:
            if peer == "udsgateway":
                continue
            pm = summaries[scenario.name, peer].medians
            cpu = "server_cpu_ms_per_msg_settled"
            lines.append(
                f"| {scenario.name} | {peer} | {_ratio(gw['msgs_per_s'], pm['msgs_per_s'])} | "
                f"{_ratio(gw['latency_p99_ms'], pm['latency_p99_ms'])} | "
                f"{_ratio(gw[cpu], pm[cpu])} |"
            )
    lines.append("")
    return lines


def _all_runs(data: ReportInput) -> list[str]:
    lines = [
        "## All measurements",
        "",
        "| round | scenario | server | verified | msgs/s | p50 ms | p99 ms | max ms | "
        "CPU ms/msg settled | peak RSS MiB | other load (cores) | start-up s | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in data.measurements:
        r = m.result
        startup = _num(m.startup_s) if m.startup_s is not None else "-"
        if r is None:
            lines.append(
                f"| {m.round} | {m.scenario} | {m.server} | no | - | - | - | - | - | - | - | "
                f"{startup} | {_one_line(m.error or 'failed')[:160]} |"
            )
            continue
        errors = {k: v for k, v in r.get("errors", {}).items() if v}
        lines.append(
            f"| {m.round} | {m.scenario} | {m.server} | "
            f"{'yes' if r.get('verified') else 'no'} ({r['ok']:,}/{r['total']:,}) | "
            f"{_num(r['msgs_per_s'])} | {_num(r['latency_p50_ms'])} | "
            f"{_num(r['latency_p99_ms'])} | {_num(r['latency_max_ms'])} | "
            f"{_num(r['server_cpu_ms_per_msg_settled'], 3)} | {_mib(r['server_peak_rss_kib'])} | "
            f"{_num(r.get('other_cpu_cores'))} | {startup} | {_errors_text(errors)} |"
        )
    return lines


def _load_text(measurements: Sequence[Measurement]) -> str:
    values = sorted(
        m.result["other_cpu_cores"]
        for m in measurements
        if m.result is not None and m.result.get("other_cpu_cores") is not None
    )
    if not values:
        return "an unknown amount of CPU"
    return (
        f"a median of {statistics.median(values):.2f} cores (max {values[-1]:.2f}) "
        f"of {len(os.sched_getaffinity(0))}"
    )


def _one_line(text: str) -> str:
    return " ".join(text.replace("|", "/").split())


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(path)
