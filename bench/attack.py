"""Attack scenario: one address floods while a legitimate sender measures its ACK latency.

A fresh gateway (default per-listener limits) listens on 127.0.0.1. The
legitimate sender connects from 127.0.0.2, so the per-address limits of the
attacker (127.0.0.1) do not apply to it, and sends one message at a time,
timing each ACK: first alone (baseline), then while 127.0.0.1 runs, all at
once and bounded in count and time,

- fuzz: ``--fuzzers`` connections replaying the seeded fuzz corpus
  (bench/fuzz.py) back to back, reconnecting when the gateway closes them;
- slowloris: ``--slowloris`` connections, half inside a frame and half between
  frames, one byte every 0.5 s;
- connect flood: connections opened and closed at once, at most
  ``--flood-rate`` per second.

Loopback only. Prints p50 / p99 / max ACK latency of both phases and what
the attacker achieved; run it on a quiet machine and read the ratio.

    .venv/bin/python -m bench.attack --duration 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.fuzz import fuzz_corpus
from bench.loadgen import frame, parse_ack, percentile
from bench.messages import MessageFactory
from bench.servers import (
    GATEWAY_READY_TIMEOUT,
    GATEWAY_TENANT,
    HOST,
    PORTS,
    VENV_BIN,
    Launch,
    ServerDef,
    _check_gateway,
    _toml_str,
    gateway_flows,
    running,
)

LEGIT_HOST = "127.0.0.2"
IO_TIMEOUT = 10.0


def _build(workdir: Path, port: int) -> Launch:
    """The gateway with its default limits (8 connections per address, budgets, turns)."""
    flows = workdir / "bench-flows.toml"
    flows.write_text(gateway_flows())
    database = "sqlite:///" + str((workdir / "bench.db").resolve())
    config = workdir / "udsgateway.toml"
    config.write_text(
        "[gateway]\n"
        f"database = {_toml_str(database)}\n\n"
        "[[tenants]]\n"
        f"name = {_toml_str(GATEWAY_TENANT)}\n"
        f'listen = "tcp:port={port}:interface={HOST}"\n'
        f"flow_files = [{_toml_str(str(flows.resolve()))}]\n"
    )
    argv = [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "udsgateway", "--config", str(config)]
    return Launch(argv=argv, cwd=workdir)


SERVER = ServerDef(
    "udsgateway-attack",
    "udsgateway with its default limits",
    PORTS["udsgateway"] + 5,
    _build,
    _check_gateway,
    ready_timeout=GATEWAY_READY_TIMEOUT,
)


async def _legit(port: int, seconds: float, factory: MessageFactory) -> list[int]:
    """Latencies (µs) of one message at a time from LEGIT_HOST for ``seconds``."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, port, local_addr=(LEGIT_HOST, 0)), IO_TIMEOUT
    )
    latencies: list[int] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            message = factory.make("ADT^A04")
            started = time.perf_counter_ns()
            writer.write(frame(message.payload))
            data = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), IO_TIMEOUT)
            latencies.append((time.perf_counter_ns() - started) // 1000)
            code, control = parse_ack(data.strip(b"\x0b\x1c\r"))
            if code != "AA" or control != message.control_id:
                raise RuntimeError(f"legitimate sender got {code} for {control}")
            await asyncio.sleep(0.002)  # a steady sender, not a flood of its own
    finally:
        writer.close()
    return latencies


class _Attack:
    def __init__(self, port: int, end: float, max_connections: int) -> None:
        self.port = port
        self.end = end
        self.budget = max_connections
        self.connections = 0
        self.refused = 0
        self.sent_cases = 0
        self.sent_bytes = 0

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        if self.connections >= self.budget or time.monotonic() >= self.end:
            return None
        self.connections += 1
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(HOST, self.port, local_addr=(HOST, 0)), IO_TIMEOUT
            )
        except (OSError, TimeoutError):
            self.refused += 1
            return None

    async def _drain_replies(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass

    async def fuzz(self) -> None:
        cases = [case.data for case in fuzz_corpus()]
        index = 0
        while time.monotonic() < self.end:
            opened = await self._open()
            if opened is None:
                await asyncio.sleep(0.05)
                continue
            reader, writer = opened
            drain = asyncio.ensure_future(self._drain_replies(reader))
            try:
                while time.monotonic() < self.end and not reader.at_eof():
                    data = cases[index % len(cases)]
                    index += 1
                    writer.write(data)
                    self.sent_cases += 1
                    self.sent_bytes += len(data)
                    await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
                    if not data.startswith(b"\x0b"):
                        break  # not MLLP: the gateway closes it; a new connection
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()
                drain.cancel()

    async def slowloris(self, inside_frame: bool) -> None:
        while time.monotonic() < self.end:
            opened = await self._open()
            if opened is None:
                await asyncio.sleep(0.5)
                continue
            reader, writer = opened
            try:
                writer.write(b"\x0bMSH|^~\\&|SLOW" if inside_frame else b"\r")
                while time.monotonic() < self.end and not reader.at_eof():
                    await asyncio.sleep(0.5)
                    writer.write(b"x" if inside_frame else b"\r")
                    await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()

    async def flood(self, rate: float) -> None:
        while time.monotonic() < self.end:
            opened = await self._open()
            if opened is not None:
                opened[1].close()
            await asyncio.sleep(1.0 / rate)


def _summary(name: str, latencies: Sequence[int]) -> str:
    ordered = sorted(latencies)
    if not ordered:
        return f"{name}: no ACK"
    return (
        f"{name}: {len(ordered)} ACKs, p50 {percentile(ordered, 0.5) / 1000:.2f} ms, "
        f"p99 {percentile(ordered, 0.99) / 1000:.2f} ms, max {ordered[-1] / 1000:.2f} ms"
    )


async def _run(port: int, args: argparse.Namespace) -> dict[str, object]:
    factory = MessageFactory(seed=17)
    baseline = await _legit(port, args.duration, factory)
    attack = _Attack(port, time.monotonic() + args.duration + 1.0, args.max_connections)
    tasks = [asyncio.ensure_future(attack.fuzz()) for _ in range(args.fuzzers)]
    tasks += [
        asyncio.ensure_future(attack.slowloris(inside_frame=n % 2 == 0))
        for n in range(args.slowloris)
    ]
    tasks.append(asyncio.ensure_future(attack.flood(args.flood_rate)))
    await asyncio.sleep(1.0)  # let the attack reach its full strength first
    under_attack = await _legit(port, args.duration, factory)
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"baseline": baseline, "attack": under_attack, "attacker": attack}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--fuzzers", type=int, default=4)
    parser.add_argument("--slowloris", type=int, default=4)
    parser.add_argument("--flood-rate", type=float, default=200.0, help="connects per second")
    parser.add_argument(
        "--max-connections", type=int, default=20000, help="attacker's connection attempts, max"
    )
    args = parser.parse_args(argv)
    problem = _check_gateway()
    if problem:
        print(f"gateway unavailable: {problem}", file=sys.stderr)
        return 2
    with running(SERVER) as started:
        result = asyncio.run(_run(started.port, args))
        log = started.log_path.read_text(errors="replace")
    attacker = result["attacker"]
    assert isinstance(attacker, _Attack)
    baseline, under_attack = result["baseline"], result["attack"]
    assert isinstance(baseline, list) and isinstance(under_attack, list)
    print(_summary("baseline (no attack)", baseline))
    print(_summary("under attack", under_attack))
    print(
        f"attacker 127.0.0.1: {attacker.connections} connection attempts "
        f"({attacker.refused} failed to connect), {attacker.sent_cases} fuzz cases, "
        f"{attacker.sent_bytes / 1e6:.1f} MB"
    )
    print(
        "gateway log: "
        + ", ".join(
            f"{marker!r} x{log.count(marker)}"
            for marker in (
                "Unhandled",
                "Traceback",
                "connection refused",
                "input handling failed",
                "frame timeout",
            )
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
