"""Gateway-only scenarios: relay through a TCP action, recovery and backlog memory, store size.

These need the gateway's own delivery engine, so they have no reference-server counterpart;
each returns a dict that the report prints. The load generator stays independent of the
gateway (it only speaks MLLP); setting up a large store before a measurement uses the
gateway's own store functions, which is setup, not measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, run_load

HOST = "127.0.0.1"
GATEWAY_PORT = 27675
RECEIVER_PORT = 27676


def use_ports(gateway: int, receiver: int) -> None:
    """Run the scenarios on other ports (the smoke test in make test uses its own)."""
    global GATEWAY_PORT, RECEIVER_PORT
    GATEWAY_PORT, RECEIVER_PORT = gateway, receiver


VENV_BIN = Path(sys.executable).parent
TENANT = "bench"

RELAY_FLOWS = """app_id = "APPBENCHRELAY1"
name = "Bench relay"
tenant = "bench"
[variables]
partner = "PARTNER"
"""

_ACTION = """
[[flows]]
flow_id = "FLWRELAY{code}"
name = "Relay {mt}"
[flows.trigger]
connection = "mllp"
message_type = "{mt}"
sample = '''
MSH|^~\\&|HIS|H|LSQ|L|20240101||{mt}|S1|P|2.5
PID|1||12345^^^H||Doe^John||19800101|M
'''
[[flows.actions]]
name = "to_partner"
host = "127.0.0.1"
port = {port}
message_type = "{mt}"
template = '''
MSH|^~\\&|UDSGATEWAY|BENCH|{{{{ app.partner }}}}|P|{{{{ now }}}}||{mt}|{{{{ control_id }}}}|P|2.5
PID|1||{{{{ msg["PID-3.1"] }}}}||{{{{ msg["PID-5.1"] }}}}^{{{{ msg["PID-5.2"] }}}}
'''
"""


def relay_flows(port: int) -> str:
    """One flow per first-class type, each with one mapped MLLP action to ``port``."""
    types = ("ADT^A04", "ADT^A08", "SIU^S12", "SIU^S14", "SIU^S15")
    return RELAY_FLOWS + "".join(
        _ACTION.format(code=mt.replace("^", ""), mt=mt, port=port) for mt in types
    )


def _config(folder: Path, flows: Path) -> Path:
    config = folder / "gateway.toml"
    config.write_text(
        "[gateway]\n"
        f'database = "sqlite:///{folder / "bench.db"}"\n'
        "[[tenants]]\n"
        f'name = "{TENANT}"\n'
        f'listen = "tcp:port={GATEWAY_PORT}:interface={HOST}"\n'
        f'flow_files = ["{flows}"]\n'
        "[tenants.limits]\n"
        "max_connections_per_peer = 32\n"
        "[delivery]\n"
        "max_queued_per_destination = 2000000\n"
    )
    return config


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            process_wait(process, 0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout:g}s")


def process_wait(process: subprocess.Popen[bytes], seconds: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(seconds)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_gateway(folder: Path, config: Path) -> subprocess.Popen[bytes]:
    log = open(folder / "gateway.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "udsgateway", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )


def _start_receiver(folder: Path, count: int) -> subprocess.Popen[bytes]:
    log = open(folder / "receiver.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            str(VENV_BIN / "udsgateway"),
            "receive",
            "--port",
            str(RECEIVER_PORT),
            "--count",
            str(count),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    _wait_port(RECEIVER_PORT, process, 20)
    return process


def _load(
    gateway: subprocess.Popen[bytes], connections: int, per_connection: int, **options: Any
) -> LoadResult:
    """The load generator against the gateway on GATEWAY_PORT, measuring its process."""
    return asyncio.run(
        run_load(
            HOST,
            GATEWAY_PORT,
            connections=connections,
            messages=per_connection,
            pid=gateway.pid,
            **options,
        )
    )


def _peak_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_relay(quick: bool) -> dict[str, object]:
    """Ingest plus one mapped MLLP action per message, counted when the destination ACKed."""
    connections, per_connection = (2, 100) if quick else (8, 2000)
    total = connections * per_connection
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as name:
        folder = Path(name)
        flows = folder / "flows.toml"
        flows.write_text(relay_flows(RECEIVER_PORT))
        receiver = _start_receiver(folder, total)
        gateway = _start_gateway(folder, _config(folder, flows))
        try:
            _wait_port(GATEWAY_PORT, gateway, 30)
            started = time.monotonic()
            result = _load(gateway, connections, per_connection, timeout=30.0)
            receiver.wait(600)
            delivered_after = time.monotonic() - started
            rss = _peak_rss_kib(gateway.pid)
        finally:
            _stop(gateway)
            _stop(receiver)
    return {
        "messages": total,
        "ingest_ok": result.ok,
        "ingest_errors": result.errors,
        "ingest_msgs_per_s": round(result.msgs_per_s, 1),
        "relay_msgs_per_s": round(total / delivered_after, 1),
        "all_delivered_after_s": round(delivered_after, 2),
        "ack_p99_ms": result.latency_p99_ms,
        "server_cpu_ms_per_msg": result.server_cpu_ms_per_msg_settled,
        "peak_rss_mib": round(rss / 1024, 1) if rss else None,
    }


def _fill_deliveries(database_url: str, count: int, port: int) -> None:
    """Put ``count`` queued deliveries in one lane, as a long outage would leave them."""
    from udsgateway import outbox
    from udsgateway.db import Database, InlineRunner, ensure_schema, make_engine

    database = Database(make_engine(database_url), InlineRunner())
    database.transaction_now(ensure_schema)
    endpoint = f"tcp:host=127.0.0.1:port={port}:timeout=10"
    chunk = 20_000
    for start in range(0, count, chunk):
        items = [
            outbox.NewDelivery(
                lane="FLWBACKLOG/0",
                destination=endpoint,
                protocol="mllp",
                control_id=f"B{i:09d}",
                payload=(
                    f"MSH|^~\\&|UDSGATEWAY|BENCH|P|P|20240101||ADT^A04|B{i:09d}|P|2.5\r"
                    f"PID|1||{i}^^^H||Doe^John\r"
                ).encode(),
                policy={},
            )
            for i in range(start, min(count, start + chunk))
        ]
        database.transaction_now(outbox.enqueue, items, 1.0)
    database.close()


def run_recovery(quick: bool, backlog: int | None = None) -> dict[str, object]:
    """Restart with a backlog of queued deliveries: time until sending again, peak RSS."""
    count = backlog if backlog is not None else (2_000 if quick else 100_000)
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as name:
        folder = Path(name)
        flows = folder / "flows.toml"
        flows.write_text(relay_flows(RECEIVER_PORT))
        config = _config(folder, flows)
        filled = time.monotonic()
        _fill_deliveries(f"sqlite:///{folder / 'bench.db'}", count, RECEIVER_PORT)
        fill_s = time.monotonic() - filled
        receiver = _start_receiver(folder, 1)
        started = time.monotonic()
        gateway = _start_gateway(folder, config)
        try:
            receiver.wait(600)
            first_send_s = time.monotonic() - started
            # Let it drain a little to see memory under load, then read the peak.
            process_wait(gateway, 3.0)
            rss = _peak_rss_kib(gateway.pid)
        finally:
            _stop(gateway)
            _stop(receiver)
        size = sum(path.stat().st_size for path in folder.glob("bench.db*") if path.is_file())
    return {
        "queued_deliveries": count,
        "fill_s": round(fill_s, 1),
        "sending_again_after_s": round(first_send_s, 2),
        "peak_rss_mib": round(rss / 1024, 1) if rss else None,
        "database_mib": round(size / 2**20, 1),
    }


def run_backlog_memory(quick: bool) -> dict[str, object]:
    """Peak RSS with 1,000,000 queued deliveries (10,000 with --quick)."""
    return run_recovery(quick, backlog=10_000 if quick else 1_000_000)


def _fill_messages(database_url: str, count: int) -> None:
    """Store ``count`` accepted messages, as months of traffic would."""
    import hashlib

    from udsgateway import store
    from udsgateway.db import Database, InlineRunner, ensure_schema, make_engine

    database = Database(make_engine(database_url), InlineRunner())
    database.transaction_now(ensure_schema)
    chunk = 5_000
    for start in range(0, count, chunk):
        records = []
        for i in range(start, min(count, start + chunk)):
            raw = f"MSH|^~\\&|HIS|H|LSQ|L|20240101||ADT^A04|OLD{i:09d}|P|2.5\rPID|1\r".encode()
            records.append(
                store.InboundRecord(
                    tenant=TENANT,
                    sender="HIS|H",
                    control_id=f"OLD{i:09d}",
                    message_type="ADT^A04",
                    peer="127.0.0.1",
                    connection="mllp",
                    received_at=time.time(),
                    raw=raw,
                    digest=hashlib.sha256(raw).hexdigest(),
                    accepted=True,
                    flows=("FLWINGEST",),
                    reason="",
                    ack_code="AA",
                    ack=b"MSH|^~\\&|ACK\rMSA|AA|x\r",
                )
            )
        database.transaction_now(store.commit_inbound, records)
    database.close()


def run_store_size(quick: bool) -> dict[str, object]:
    """Ingest rate (8 x N stop-and-wait) with an empty store and with 1,000,000 stored."""
    stored = 20_000 if quick else 1_000_000
    connections, per_connection = (8, 100) if quick else (8, 2000)
    rates = {}
    for label, prefill in (("empty", 0), ("full", stored)):
        with tempfile.TemporaryDirectory(prefix="bench-store-") as name:
            folder = Path(name)
            flows = folder / "flows.toml"
            flows.write_text(
                RELAY_FLOWS.replace("APPBENCHRELAY1", "APPBENCHSTORE1")
                + '\n[[flows]]\nflow_id = "FLWINGEST"\nname = "Ingest"\n'
                '[flows.trigger]\nmessage_type = "ADT^A04"\n'
            )
            config = _config(folder, flows)
            if prefill:
                _fill_messages(f"sqlite:///{folder / 'bench.db'}", prefill)
            gateway = _start_gateway(folder, config)
            try:
                _wait_port(GATEWAY_PORT, gateway, 60)
                from bench.messages import MessageFactory

                result = _load(
                    gateway,
                    connections,
                    per_connection,
                    factory=MessageFactory(types=("ADT^A04",)),
                )
            finally:
                _stop(gateway)
            rates[label] = round(result.msgs_per_s, 1)
    return {
        "stored_messages": stored,
        "ingest_empty_msgs_per_s": rates["empty"],
        "ingest_full_msgs_per_s": rates["full"],
        "full_over_empty": round(rates["full"] / rates["empty"], 3) if rates["empty"] else None,
    }


if __name__ == "__main__":  # pragma: no cover - manual runs
    which = sys.argv[1] if len(sys.argv) > 1 else "relay"
    quick = "--quick" in sys.argv
    runner = {
        "relay": run_relay,
        "recovery": run_recovery,
        "backlog": run_backlog_memory,
        "store": run_store_size,
    }[which]
    print(runner(quick))
    os._exit(0)
