"""MLLP load generator: K connections x N messages, every ACK verified.

Independent of the gateway on purpose: it imports nothing from ``udsgateway`` and does its own
MLLP framing and ACK reading, so it measures the gateway rather than mirroring it.

Modes:

- stop-and-wait (``pipeline=1``): one outstanding message per connection, like real HL7 senders;
- pipelined (``pipeline=W``): up to W unacknowledged messages per connection;
- fixed rate (``rate=R`` messages/s over all connections): message j of connection i is due at
  ``t0 + (j * K + i) / R``. Latency is then measured from the *scheduled* time, so a server that
  falls behind shows it in the latency instead of silently slowing the sender (no coordinated
  omission). Without a rate, latency runs from the write to the ACK.

Every ACK is checked, in order per connection: MSA-1 must be AA or CA and MSA-2 must equal the
MSH-10 of the oldest unanswered message on that connection. Each message ends in exactly one
bucket: ``ok``, or an error kind: ``nak`` (answered in order, MSA-1 not AA/CA), ``mismatch`` (MSA-2
not the expected MSH-10, or no readable MSA), ``timeout`` (no ACK within the timeout), ``closed``
(connection refused or closed by the server with the message unanswered), ``aborted`` (never
answered because its connection was abandoned after an earlier mismatch or timeout: once the
stream is out of step, nothing later on it can be verified).

With ``pid`` it also estimates how busy the rest of the machine was during the run
(``other_cpu_cores``: machine-wide busy time from ``/proc/stat`` less the server's and the load
generator's own, in cores), so a run disturbed by other work can be told apart. It also reads the
server's CPU time (utime + stime of the process and its
descendants, from ``/proc/<pid>/stat``, in ticks of ``os.sysconf("SC_CLK_TCK")``) over the
measured run, and its peak RSS (``VmHWM`` from ``/proc/<pid>/status``; that is the peak since the
process started, so the suite starts a fresh server for every measurement). After the last ACK it
keeps reading the CPU time until the server goes idle (at most ``settle`` seconds), so work a
server defers past the ACK is charged too: ``server_cpu_ms_per_msg`` stops at the last ACK,
``server_cpu_ms_per_msg_settled`` includes the deferred work.

CLI: ``python -m bench.loadgen --host 127.0.0.1 --port P --connections 8 --messages 2000
[--pipeline 8] [--rate 200] [--pid PID] [--json]``; exit status 0 only when every message was
verified.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.messages import MESSAGE_TYPES, BenchMessage, MessageFactory

VT = b"\x0b"
FS_CR = b"\x1c\x0d"

ERROR_KINDS: tuple[str, ...] = ("nak", "mismatch", "timeout", "closed", "aborted")
POSITIVE_CODES = frozenset({"AA", "CA"})


# -- ACK reading ------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """Wrap one message in an MLLP block."""
    return VT + payload + FS_CR


def parse_ack(message: bytes) -> tuple[str | None, str | None]:
    """(MSA-1, MSA-2) of an unframed ACK, or None where missing. Field separator from MSH-1."""
    segments = message.replace(b"\n", b"\r").split(b"\r")
    sep = b"|"
    for seg in segments:
        if seg.startswith(b"MSH") and len(seg) > 3:
            sep = seg[3:4]
            break
    for seg in segments:
        if seg[:3] == b"MSA" and seg[3:4] == sep:
            fields = seg.split(sep)
            code = fields[1].decode("latin-1").strip() if len(fields) > 1 else None
            control = fields[2].decode("latin-1").strip() if len(fields) > 2 else None
            return code or None, control or None
    return None, None


class _Client(asyncio.Protocol):
    """One MLLP connection, driven from its own callbacks: it writes while the window has room
    (and the rate schedule allows), frames ACKs out of the byte stream and checks them in order.
    """

    def __init__(
        self,
        frames: Sequence[bytes],
        control_ids: Sequence[str],
        window: int,
        timeout_ns: int,
        latencies_ns: list[int],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.frames = frames
        self.control_ids = control_ids
        self.window = window
        self.timeout_ns = timeout_ns
        self.schedule_ns: Sequence[int] | None = None
        self.latencies_ns = latencies_ns
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        # (MSH-10, reference time for latency, actual send time), oldest first
        self.outstanding: deque[tuple[str, int, int]] = deque()
        self.next = 0
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.failed: str | None = None
        self.closed = False
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_for = -1
        self._woke_for = -1
        self._watchdog: asyncio.TimerHandle | None = None

    # -- driving --------------------------------------------------------------------------------

    def start(self, schedule_ns: Sequence[int] | None = None) -> None:
        self.schedule_ns = schedule_ns
        self._watch()
        self.pump()

    def pump(self) -> None:
        if self.failed or self.closed or self.transport is None:
            return
        outstanding = self.outstanding
        frames = self.frames
        total = len(frames)
        schedule = self.schedule_ns
        write = self.transport.write
        while self.next < total and len(outstanding) < self.window:
            index = self.next
            now = time.perf_counter_ns()
            if schedule is None:
                t_ref = now
            else:
                due = schedule[index]
                if due > now:
                    if self._timer is None:
                        self._timer_for = index
                        self._timer = self.loop.call_later((due - now) / 1e9, self._on_timer)
                    return
                # Sent as soon as our own timer fired: any lateness is the load generator's, so
                # latency runs from the write. Otherwise the window held it back: the server's
                # delay, so latency runs from the scheduled time (no coordinated omission).
                t_ref = now if self._woke_for == index else due
            outstanding.append((self.control_ids[index], t_ref, now))
            write(frames[index])
            self.next = index + 1
        self._check_done()

    def _on_timer(self) -> None:
        self._timer = None
        self._woke_for = self._timer_for
        self.pump()
        self._woke_for = -1

    def _watch(self) -> None:
        self._watchdog = None
        if self.done.done():
            return
        head = self.outstanding[0] if self.outstanding else None
        if head is not None and time.perf_counter_ns() - head[2] > self.timeout_ns:
            self.fail("timeout")
            return
        self._watchdog = self.loop.call_later(0.2, self._watch)

    def _check_done(self) -> None:
        if self.done.done():
            return
        finished = self.next >= len(self.frames) and not self.outstanding
        if finished or self.failed or self.closed:
            unsent = len(self.frames) - self.next
            if unsent:
                self.errors["aborted"] += unsent
            for handle in (self._timer, self._watchdog):
                if handle is not None:
                    handle.cancel()
            self.done.set_result(None)

    # -- protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        buf = self.buffer
        buf += data
        while not self.failed:
            start = buf.find(VT)
            if start < 0:
                buf.clear()
                break
            end = buf.find(FS_CR, start + 1)
            if end < 0:
                if start:
                    del buf[:start]
                break
            message = bytes(buf[start + 1 : end])
            del buf[: end + 2]
            self._on_ack(message, now)
        self.pump()

    def _on_ack(self, message: bytes, now: int) -> None:
        if not self.outstanding:
            # An answer nobody asked for: the stream is out of step (counted as one mismatch).
            self.errors["mismatch"] += 1
            self.fail("mismatch", count_head=False)
            return
        code, control = parse_ack(message)
        expected, t_ref, _sent = self.outstanding[0]
        if control != expected:
            self.fail("mismatch")
            return
        self.outstanding.popleft()
        if code in POSITIVE_CODES:
            self.ok += 1
            self.latencies_ns.append(now - t_ref)
        else:
            self.errors["nak"] += 1

    def fail(self, kind: str, *, count_head: bool = True) -> None:
        """Abandon the connection: the head message gets ``kind``; the others are aborted."""
        if self.failed:
            return
        self.failed = kind
        if count_head and self.outstanding:
            self.outstanding.popleft()
            self.errors[kind] += 1
        self.errors["aborted"] += len(self.outstanding)
        self.outstanding.clear()
        if self.transport is not None:
            self.transport.abort()
        self._check_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.failed and self.outstanding:
            self.errors["closed"] += len(self.outstanding)
            self.outstanding.clear()
        self._check_done()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


async def _run_clients(
    host: str,
    port: int,
    batches: Sequence[Sequence[BenchMessage]],
    window: int,
    rate: float | None,
    timeout: float,
    latencies: list[int],
    on_start: Callable[[], None] = lambda: None,
) -> tuple[list[_Client | None], float]:
    """Connect one client per batch, start them together, wait for all; (clients, elapsed s)."""
    loop = asyncio.get_running_loop()
    timeout_ns = int(timeout * 1e9)
    clients: list[_Client | None] = []
    for batch in batches:
        frames = [frame(m.payload) for m in batch]
        controls = [m.control_id for m in batch]

        def make_client(f: list[bytes] = frames, c: list[str] = controls) -> _Client:
            return _Client(f, c, window, timeout_ns, latencies)

        try:
            _transport, connected = await asyncio.wait_for(
                loop.create_connection(make_client, host, port), timeout
            )
            clients.append(connected)
        except (TimeoutError, OSError):
            clients.append(None)
    on_start()
    start = time.perf_counter_ns()
    t0 = start + 1_000_000
    count = len(batches)
    for index, maybe in enumerate(clients):
        if maybe is None:
            continue
        schedule = None
        if rate is not None:
            step = 1e9 / rate
            schedule = [t0 + int((j * count + index) * step) for j in range(len(batches[index]))]
        maybe.start(schedule)
    await asyncio.gather(*(c.done for c in clients if c is not None))
    elapsed = (time.perf_counter_ns() - start) / 1e9
    for maybe in clients:
        if maybe is not None:
            maybe.close()
    return clients, elapsed


# -- server process statistics -----------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that exist now."""
    tree = [pid]
    index = 0
    while index < len(tree):
        tree.extend(_children(tree[index]))
        index += 1
    return tree


def cpu_ticks(pids: Sequence[int]) -> int:
    """utime + stime, in clock ticks, summed over ``pids`` (threads included)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # after "pid (comm) ": state is index 0, utime (field 14) index 11, stime index 12
        total += int(fields[11]) + int(fields[12])
    return total


def peak_rss_kib(pids: Sequence[int]) -> int:
    """Sum of VmHWM (peak resident set since process start), in KiB, over ``pids``."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_ticks() -> int:
    """Clock ticks the whole machine spent running tasks, all CPUs (``/proc/stat``: user, nice
    and system). Interrupt and softirq time is left out: much of it is the kernel carrying the
    benchmark's own loopback traffic, which no process is charged for. Steal is left out too."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:4]]
    except (OSError, ValueError):
        return 0
    return sum(fields)


async def _settle(pids: Sequence[int], max_wait: float, interval: float = 0.25) -> int:
    """Read CPU ticks until the server is idle (under 4% of a core over ``interval``)."""
    deadline = time.monotonic() + max_wait
    last = cpu_ticks(pids)
    idle_ticks = max(1, int(CLK_TCK * interval * 0.04))
    while time.monotonic() < deadline:
        await asyncio.sleep(interval)
        now = cpu_ticks(pids)
        if now - last <= idle_ticks:
            return now
        last = now
    return last


# -- the run -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """Outcome of one load run. Times in ms, rates in messages/s, sizes in KiB."""

    host: str
    port: int
    connections: int
    messages_per_connection: int
    pipeline: int
    rate: float | None
    total: int
    sent: int
    ok: int
    errors: dict[str, int]
    elapsed_s: float
    msgs_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    latency_from: str
    loadgen_cpu_ms_per_msg: float | None
    server_pids: list[int] = field(default_factory=list)
    server_cpu_ms_per_msg: float | None = None
    server_cpu_ms_per_msg_settled: float | None = None
    server_peak_rss_kib: int | None = None
    other_cpu_cores: float | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def verified(self) -> bool:
        return self.error_count == 0 and self.ok == self.total

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["error_count"] = self.error_count
        data["verified"] = self.verified
        return data

    def summary(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}"

        errors = ", ".join(f"{k}={v}" for k, v in self.errors.items() if v) or "none"
        text = (
            f"{self.ok}/{self.total} verified in {self.elapsed_s:.2f}s = {self.msgs_per_s:,.0f} "
            f"msg/s; latency p50 {ms(self.latency_p50_ms)} p99 {ms(self.latency_p99_ms)} max "
            f"{ms(self.latency_max_ms)} ms; errors: {errors}"
        )
        if self.server_cpu_ms_per_msg_settled is not None:
            text += (
                f"; server CPU {ms(self.server_cpu_ms_per_msg)} ms/msg to last ACK, "
                f"{ms(self.server_cpu_ms_per_msg_settled)} settled; peak RSS "
                f"{(self.server_peak_rss_kib or 0) / 1024:.1f} MiB"
            )
        return text


def percentile(sorted_values: Sequence[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(round(fraction * len(sorted_values), 9)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


async def _warm_up(
    host: str, port: int, factory: MessageFactory, count: int, timeout: float
) -> None:
    if count <= 0:
        return
    clients, _elapsed = await _run_clients(
        host, port, [factory.batch(count)], 1, None, timeout, []
    )
    client = clients[0]
    if client is None or client.ok != count:
        errors = dict(client.errors) if client is not None else {"closed": count}
        raise RuntimeError(f"warm-up failed: errors {errors}")


async def run_load(
    host: str,
    port: int,
    *,
    connections: int = 1,
    messages: int = 1000,
    pipeline: int = 1,
    rate: float | None = None,
    pid: int | None = None,
    timeout: float = 10.0,
    warmup: int = 0,
    settle: float = 5.0,
    factory: MessageFactory | None = None,
) -> LoadResult:
    """Run one measurement against ``host:port``; see the module docstring."""
    if connections < 1 or messages < 1 or pipeline < 1:
        raise ValueError("connections, messages and pipeline must be >= 1")
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0")
    factory = factory or MessageFactory()
    await _warm_up(host, port, factory, warmup, timeout)

    # Everything is built before the clock starts.
    batches = [factory.batch(messages) for _ in range(connections)]
    latencies: list[int] = []
    pids = process_tree(pid) if pid is not None else []
    marks: dict[str, float] = {}

    def on_start() -> None:
        marks["cpu"] = cpu_ticks(pids) if pids else 0
        marks["own"] = time.process_time()
        marks["machine"] = machine_busy_ticks()

    # The collector would add its pauses to our latencies: freeze what exists, pause it.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        clients, elapsed_s = await _run_clients(
            host, port, batches, pipeline, rate, timeout, latencies, on_start
        )
    finally:
        gc.enable()
        gc.unfreeze()
    own_cpu = time.process_time() - marks["own"]
    machine_busy = machine_busy_ticks() - int(marks["machine"])
    cpu_before = int(marks["cpu"])
    cpu_at_last_ack = cpu_ticks(pids) if pids else 0
    other_cores = None
    if pids and elapsed_s > 0:
        other = machine_busy - (cpu_at_last_ack - cpu_before) - own_cpu * CLK_TCK
        other_cores = max(0.0, other / CLK_TCK / elapsed_s)
    cpu_settled = await _settle(pids, settle) if pids and settle > 0 else cpu_at_last_ack
    peak = peak_rss_kib(process_tree(pid)) if pid is not None else None

    errors: Counter[str] = Counter({kind: 0 for kind in ERROR_KINDS})
    ok = sent = 0
    for client in clients:
        if client is None:
            errors["closed"] += messages
            continue
        ok += client.ok
        sent += client.next
        errors.update(client.errors)
    total = connections * messages
    lat = sorted(latencies)

    def lat_ms(fraction: float) -> float | None:
        return percentile(lat, fraction) / 1e6 if lat else None

    def per_msg_ms(ticks: int) -> float | None:
        if not pids or not ok:
            return None
        return ticks / CLK_TCK * 1000 / ok

    return LoadResult(
        host=host,
        port=port,
        connections=connections,
        messages_per_connection=messages,
        pipeline=pipeline,
        rate=rate,
        total=total,
        sent=sent,
        ok=ok,
        errors=dict(errors),
        elapsed_s=elapsed_s,
        msgs_per_s=ok / elapsed_s if elapsed_s > 0 else 0.0,
        latency_p50_ms=lat_ms(0.50),
        latency_p99_ms=lat_ms(0.99),
        latency_max_ms=lat[-1] / 1e6 if lat else None,
        latency_from="scheduled send time when held back" if rate is not None else "write",
        loadgen_cpu_ms_per_msg=own_cpu * 1000 / ok if ok else None,
        server_pids=pids,
        server_cpu_ms_per_msg=per_msg_ms(cpu_at_last_ack - cpu_before),
        server_cpu_ms_per_msg_settled=per_msg_ms(cpu_settled - cpu_before),
        server_peak_rss_kib=peak,
        other_cpu_cores=other_cores,
    )


def run_load_sync(host: str, port: int, **kwargs: Any) -> LoadResult:
    """:func:`run_load` in a fresh event loop."""
    return asyncio.run(run_load(host, port, **kwargs))


# -- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1, help="K connections")
    parser.add_argument("--messages", type=int, default=1000, help="N messages per connection")
    parser.add_argument(
        "--pipeline",
        type=int,
        default=1,
        help="W unacknowledged per connection (1 = stop-and-wait)",
    )
    parser.add_argument("--rate", type=float, default=None, help="messages/s over all connections")
    parser.add_argument("--pid", type=int, default=None, help="server pid for CPU time and RSS")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an ACK")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured messages sent first")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="max seconds to wait for the server to go idle"
    )
    parser.add_argument("--seed", type=int, default=2575)
    parser.add_argument("--receiving-app", default="RECVAPP", help="MSH-5")
    parser.add_argument("--receiving-facility", default="RECVFAC", help="MSH-6")
    parser.add_argument(
        "--types", default=",".join(MESSAGE_TYPES), help="comma-separated MSH-9 types to rotate"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    factory = MessageFactory(
        seed=args.seed,
        receiving_app=args.receiving_app,
        receiving_facility=args.receiving_facility,
        types=[t.strip() for t in args.types.split(",") if t.strip()],
    )
    try:
        result = run_load_sync(
            args.host,
            args.port,
            connections=args.connections,
            messages=args.messages,
            pipeline=args.pipeline,
            rate=args.rate,
            pid=args.pid,
            timeout=args.timeout,
            warmup=args.warmup,
            settle=args.settle if args.pid is not None else 0.0,
            factory=factory,
        )
    except (OSError, RuntimeError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(result.summary())
    return 0 if result.verified else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
