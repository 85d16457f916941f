"""The benchmark scenarios.

Load scenarios run against every server, one fresh server process per measurement. Hook
scenarios need parts of the gateway that this build does not have yet; each is a function that
raises :class:`ScenarioUnavailableError` with the reason, which the report records as "not run".
They never produce numbers until they are implemented.
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
    """Relay: sender -> gateway -> flow TCP action -> destination (a canned-ACK server).

    Would measure end-to-end delivery rate and latency, in order per destination lane.
    """
    raise ScenarioUnavailableError(
        "not available in this build: needs the gateway's TCP actions (a flow whose action "
        "sends to a destination) and a way to read delivery completion; the lead adds it"
    )


def run_store_recovery(quick: bool) -> dict[str, object]:
    """Store size and recovery: bytes on disk per stored message, and restart time with a
    backlog of undelivered deliveries (order kept, memory bounded)."""
    raise ScenarioUnavailableError(
        "not available in this build: needs the gateway's durable delivery queue and restart "
        "recovery; the lead adds it"
    )


HOOK_SCENARIOS: tuple[HookScenario, ...] = (
    HookScenario(
        name="relay",
        title="Relay to a destination",
        measures="End-to-end rate and latency from inbound ACK to destination ACK, in order.",
        run=run_relay,
    ),
    HookScenario(
        name="store-recovery",
        title="Store size and recovery",
        measures="Bytes on disk per message; restart and drain time with a queued backlog.",
        run=run_store_recovery,
    ),
)

SCENARIO_NAMES: tuple[str, ...] = tuple(s.name for s in LOAD_SCENARIOS) + tuple(
    h.name for h in HOOK_SCENARIOS
)
