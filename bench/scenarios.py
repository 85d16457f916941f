"""The benchmark scenarios.

Load scenarios run against every server, one fresh server process per measurement. Hook
scenarios measure what only the gateway has (relay through a TCP action, recovery, backlog
memory, store size; see bench/gateway_scenarios.py); a hook that cannot run raises
:class:`ScenarioUnavailableError` with the reason, which the report records as "not run".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class ScenarioUnavailableError(Exception):
    """The scenario cannot run in this build; the message says why."""


@dataclass(frozen=True)
class LoadScenario:
    name: str
    title: str
    measures: str
    connections: int
    messages: int
    pipeline: int = 1
    rate: float | None = None
    quick_connections: int = 1
    quick_messages: int = 100

    def size(self, quick: bool) -> tuple[int, int]:
        if quick:
            return self.quick_connections, self.quick_messages
        return self.connections, self.messages

    def shape(self, quick: bool) -> str:
        connections, messages = self.size(quick)
        mode = "stop-and-wait" if self.pipeline == 1 else f"pipelined (W={self.pipeline})"
        text = f"{connections} x {messages:,} {mode}"
        if self.rate is not None:
            text += f" at {self.rate:g} msg/s"
        return text


@dataclass(frozen=True)
class HookScenario:
    name: str
    title: str
    measures: str
    run: Callable[[bool], dict[str, object]]


LOAD_SCENARIOS: tuple[LoadScenario, ...] = (
    LoadScenario(
        name="ingest-1x5000",
        title="Ingest, one sender",
        measures=(
            "Throughput and ACK round trip of a single stop-and-wait sender, the way one real "
            "HL7 interface talks: every message waits for the previous ACK, so this is bound by "
            "per-message latency (parse, commit, ACK)."
        ),
        connections=1,
        messages=5000,
        quick_connections=1,
        quick_messages=200,
    ),
    LoadScenario(
        name="ingest-8x2000",
        title="Ingest, eight senders",
        measures=(
            "Aggregate throughput with eight concurrent stop-and-wait senders: how well the "
            "server overlaps work across connections (group commit for durable servers)."
        ),
        connections=8,
        messages=2000,
        quick_connections=8,
        quick_messages=50,
    ),
    LoadScenario(
        name="ingest-8x2000-w8",
        title="Ingest, eight pipelined senders",
        measures=(
            "Peak ingest with eight connections each keeping eight messages unacknowledged: "
            "several frames arrive per read, so this also checks that a server splits frames "
            "correctly and answers each one, in order."
        ),
        connections=8,
        messages=2000,
        pipeline=8,
        quick_connections=8,
        quick_messages=50,
    ),
    LoadScenario(
        name="latency-200",
        title="Latency at a fixed 200 msg/s",
        measures=(
            "ACK latency (p50/p99/max) at a steady 200 msg/s (a busy interface) on one "
            "stop-and-wait connection. Latency is measured from the scheduled send time when the "
            "sender was held back, so a server that cannot sustain the rate on one connection "
            "shows it as queueing (growing latency, msgs/s below 200) instead of hiding it."
        ),
        connections=1,
        messages=2000,
        rate=200.0,
        quick_connections=1,
        quick_messages=100,
    ),
)


def run_relay(quick: bool) -> dict[str, object]:
    """Relay: sender -> gateway -> one mapped MLLP action -> ``udsgateway receive``."""
    from bench.gateway_scenarios import run_relay as relay

    return relay(quick)


def run_store_recovery(quick: bool) -> dict[str, object]:
    """Kill -9 with 100,000 queued deliveries, restart: time until sending again, peak RSS."""
    from bench.gateway_scenarios import run_recovery

    return run_recovery(quick)


def run_backlog_memory(quick: bool) -> dict[str, object]:
    """Peak RSS of a gateway started on 1,000,000 queued deliveries."""
    from bench.gateway_scenarios import run_backlog_memory as backlog

    return backlog(quick)


def run_store_size(quick: bool) -> dict[str, object]:
    """Ingest rate with an empty store and with 1,000,000 stored messages."""
    from bench.gateway_scenarios import run_store_size as store_size

    return store_size(quick)


def run_admin_scrape(quick: bool) -> dict[str, object]:
    """Ingest rate with the admin API scraped every second (metrics and status) or not."""
    from bench.gateway_scenarios import run_admin_scrape as admin_scrape

    return admin_scrape(quick)


HOOK_SCENARIOS: tuple[HookScenario, ...] = (
    HookScenario(
        name="relay",
        title="Relay to a destination",
        measures=(
            "End-to-end rate and latency from inbound ACK to destination ACK, in order "
            "(3 runs, medians)."
        ),
        run=run_relay,
    ),
    HookScenario(
        name="store-recovery",
        title="Recovery of 100,000 queued deliveries after a kill -9",
        measures=(
            "A gateway draining the backlog is killed with SIGKILL; time from its restart to "
            "sending again, peak RSS, database size."
        ),
        run=run_store_recovery,
    ),
    HookScenario(
        name="backlog-memory",
        title="1,000,000 queued deliveries",
        measures="Peak RSS of the gateway while it recovers and starts draining them.",
        run=run_backlog_memory,
    ),
    HookScenario(
        name="store-size",
        title="Ingest with 1,000,000 stored messages",
        measures=(
            "8 x 2,000 stop-and-wait ingest rate, empty store versus 1,000,000 stored "
            "(3 interleaved rounds, medians)."
        ),
        run=run_store_size,
    ),
    HookScenario(
        name="admin-scrape",
        title="Ingest while the admin API is scraped",
        measures=(
            "8 x 2,000 stop-and-wait ingest rate with the admin API on, unscraped versus "
            "/metrics and /api/v1/status fetched once a second (3 interleaved rounds, medians)"
        ),
        run=run_admin_scrape,
    ),
)

SCENARIO_NAMES: tuple[str, ...] = tuple(s.name for s in LOAD_SCENARIOS) + tuple(
    h.name for h in HOOK_SCENARIOS
)
