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


def _port_free(port: int) -> bool:
    with contextlib.closing(socket.socket()) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def use_ports(gateway: int, receiver: int) -> None:
    """Run the scenarios on other ports (the smoke test in make test uses its own)."""
    global GATEWAY_PORT, RECEIVER_PORT
    GATEWAY_PORT, RECEIVER_PORT = gateway, receiver


VENV_BIN = Path(sys.executable).parent
# The pure-Python build (UDSGATEWAY_PURE=1; `make .venv-pure/.installed-stamp`).
PURE_VENV_BIN = Path(__file__).resolve().parent.parent / ".venv-pure" / "bin"
TENANT = "bench"


def use_venv(bin_dir: Path) -> None:
    """Run the gateway and the receiver from another environment (the pure build)."""
    global VENV_BIN
    VENV_BIN = bin_dir


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


def _start_receiver(folder: Path, count: int | None) -> subprocess.Popen[bytes]:
    """``udsgateway receive`` on RECEIVER_PORT, one line per message in receiver.log;
    it exits after ``count`` messages (never with None)."""
    log = open(folder / "receiver.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            str(VENV_BIN / "udsgateway"),
            "receive",
            "--port",
            str(RECEIVER_PORT),
            *(("--count", str(count)) if count is not None else ()),
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


def _relay_once(connections: int, per_connection: int) -> dict[str, Any]:
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
        "ingest_ok": result.ok,
        "ingest_errors": result.errors,
        "ingest_msgs_per_s": round(result.msgs_per_s, 1),
        "relay_msgs_per_s": round(total / delivered_after, 1),
        "all_delivered_after_s": round(delivered_after, 2),
        "ack_p99_ms": result.latency_p99_ms,
        "server_cpu_ms_per_msg": result.server_cpu_ms_per_msg_settled,
        "peak_rss_mib": round(rss / 1024, 1) if rss else None,
    }


def run_relay(quick: bool) -> dict[str, object]:
    """Ingest plus one mapped MLLP action per message, counted when the destination ACKed.

    Three runs (one with ``quick``), each on a fresh gateway, store and receiver; the
    figures are the runs' medians, and ``relay_runs`` lists every run's rate.
    """
    connections, per_connection = (2, 100) if quick else (8, 2000)
    runs = [_relay_once(connections, per_connection) for _ in range(1 if quick else 3)]
    errors: dict[str, int] = {}
    for run in runs:
        for kind, count in run["ingest_errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    return {
        "messages": connections * per_connection,
        "runs": len(runs),
        "ingest_ok": min(run["ingest_ok"] for run in runs),
        "ingest_errors": errors,
        **{
            key: _median([run[key] for run in runs])
            for key in (
                "ingest_msgs_per_s",
                "relay_msgs_per_s",
                "all_delivered_after_s",
                "ack_p99_ms",
                "server_cpu_ms_per_msg",
                "peak_rss_mib",
            )
        },
        "relay_runs": [run["relay_msgs_per_s"] for run in runs],
    }


def run_relay_ab(quick: bool) -> dict[str, object]:
    """The relay on the compiled build against the pure one, alternating (A B A B A B).

    Each run as in :func:`run_relay` (8 x 2,000; 2 x 100 with ``quick``), on a fresh gateway
    and receiver; three pairs (one with ``quick``). The figures are the medians of each
    build's runs and their ratios.
    """
    connections, per_connection = (2, 100) if quick else (8, 2000)
    builds = {"compiled": VENV_BIN, "pure": PURE_VENV_BIN}
    runs: dict[str, list[dict[str, Any]]] = {"compiled": [], "pure": []}
    try:
        for _ in range(1 if quick else 3):
            for build, bin_dir in builds.items():
                use_venv(bin_dir)
                runs[build].append(_relay_once(connections, per_connection))
    finally:
        use_venv(builds["compiled"])
    result: dict[str, object] = {"messages": connections * per_connection}
    medians: dict[str, float | None] = {}
    for build, build_runs in runs.items():
        rates = [run["relay_msgs_per_s"] for run in build_runs]
        cpu = [run["server_cpu_ms_per_msg"] for run in build_runs]
        medians[f"{build}_relay"], medians[f"{build}_cpu"] = _median(rates), _median(cpu)
        result[f"{build}_relay_runs"], result[f"{build}_cpu_runs"] = rates, cpu
        result[f"{build}_relay_msgs_per_s"] = medians[f"{build}_relay"]
        result[f"{build}_cpu_ms_per_msg"] = medians[f"{build}_cpu"]
    for key in ("relay", "cpu"):
        compiled, pure = medians[f"compiled_{key}"], medians[f"pure_{key}"]
        result[f"{key}_compiled_over_pure"] = (
            round(compiled / pure, 3) if compiled and pure else None
        )
    return result


CANNED_ACK = Path(__file__).resolve().parent / "refservers" / "canned_ack.py"


def _relay_to_canned(total: int, close_after_ack: bool) -> float:
    """Relay ``total`` messages to the canned-ACK receiver; messages/s until its last ACK."""
    with tempfile.TemporaryDirectory(prefix="bench-closing-") as name:
        folder = Path(name)
        flows = folder / "flows.toml"
        flows.write_text(relay_flows(RECEIVER_PORT))
        log = open(folder / "receiver.log", "wb")  # noqa: SIM115 - closed with the process
        receiver = subprocess.Popen(
            [
                sys.executable,
                str(CANNED_ACK),
                "--port",
                str(RECEIVER_PORT),
                "--count",
                str(total),
                *(("--close-after-ack",) if close_after_ack else ()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
        _wait_port(RECEIVER_PORT, receiver, 20)
        gateway = _start_gateway(folder, _config(folder, flows))
        try:
            _wait_port(GATEWAY_PORT, gateway, 30)
            started = time.monotonic()
            # No settle time: the clock stops at the receiver's last ACK.
            result = _load(gateway, 2, total // 2, timeout=30.0, settle=0.0)
            receiver.wait(600)
            elapsed = time.monotonic() - started
        finally:
            _stop(gateway)
            _stop(receiver)
            log.close()
    if result.ok != total:
        raise RuntimeError(f"only {result.ok} of {total} messages were accepted")
    return round(total / elapsed, 1)


def run_closing(quick: bool) -> dict[str, object]:
    """Issue 11 item 2: relay to a receiver that closes after every ACK vs one that keeps
    the connection (the canned-ACK server both times), in interleaved runs (A B A B A B).

    1,000 messages (200 with ``quick``) over two sender connections; each rate runs from
    the first message sent to the receiver's last ACK. ``closing_over_keeping`` is the
    ratio of the medians (the target: at least 0.5).
    """
    total = 200 if quick else 1000
    rates: dict[str, list[float]] = {"keeping": [], "closing": []}
    for _ in range(1 if quick else 3):
        rates["keeping"].append(_relay_to_canned(total, close_after_ack=False))
        rates["closing"].append(_relay_to_canned(total, close_after_ack=True))
    keeping = _median(rates["keeping"])
    closing = _median(rates["closing"])
    return {
        "messages": total,
        "relay_keeping_msgs_per_s": keeping,
        "relay_closing_msgs_per_s": closing,
        "closing_over_keeping": round(closing / keeping, 3) if keeping else None,
        "keeping_runs": rates["keeping"],
        "closing_runs": rates["closing"],
    }


def _median(values: list[Any]) -> Any:
    """The median of the values that were measured (None when none was)."""
    known = sorted(v for v in values if v is not None)
    return known[len(known) // 2] if known else None


def _fill_deliveries(database_url: str, count: int, port: int) -> None:
    """Put ``count`` queued deliveries in one lane, as a long outage would leave them."""
    from udsgateway.store import outbox
    from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine

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


def _wait_received(folder: Path, count: int, gateway: subprocess.Popen[bytes]) -> None:
    """Wait until the receiver has logged ``count`` messages (its first line is its banner)."""
    deadline = time.monotonic() + 120
    log = folder / "receiver.log"
    while log.read_bytes().count(b"\n") < count + 1:
        if gateway.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.returncode} before draining")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the receiver did not get {count} messages within 120 s")
        time.sleep(0.05)


def run_recovery(quick: bool, backlog: int | None = None) -> dict[str, object]:
    """Kill -9 a gateway draining a backlog of queued deliveries, then restart it: time
    from the restart until it is sending again, peak RSS of the restarted gateway.

    The backlog is written straight into the store (as a long outage leaves it); a first
    gateway starts draining it and is killed with SIGKILL after 100 deliveries, with its
    WAL and a delivery in flight, as in a crash.
    """
    count = backlog if backlog is not None else (2_000 if quick else 100_000)
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as name:
        folder = Path(name)
        flows = folder / "flows.toml"
        flows.write_text(relay_flows(RECEIVER_PORT))
        config = _config(folder, flows)
        filled = time.monotonic()
        _fill_deliveries(f"sqlite:///{folder / 'bench.db'}", count, RECEIVER_PORT)
        fill_s = time.monotonic() - filled
        first_receiver = _start_receiver(folder, None)
        first = _start_gateway(folder, config)
        try:
            _wait_received(folder, 100, first)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
        finally:
            _stop(first)
            _stop(first_receiver)
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

    from udsgateway.store import inbound
    from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine
    from udsgateway.store.records import InboundRecord

    database = Database(make_engine(database_url), InlineRunner())
    database.transaction_now(ensure_schema)
    chunk = 5_000
    for start in range(0, count, chunk):
        records = []
        for i in range(start, min(count, start + chunk)):
            raw = f"MSH|^~\\&|HIS|H|LSQ|L|20240101||ADT^A04|OLD{i:09d}|P|2.5\rPID|1\r".encode()
            records.append(
                InboundRecord(
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
        database.transaction_now(inbound.commit_inbound, records)
    database.close()


def run_store_size(quick: bool) -> dict[str, object]:
    """Ingest rate (8 x N stop-and-wait) with an empty store and with 1,000,000 stored.

    Rounds alternate empty and full (three rounds; one with ``quick``), each run on a
    fresh gateway process: an empty store is new for every run, the full one is filled
    once (each run adds its own 16,000 messages to it). The figures are medians;
    ``empty_runs`` and ``full_runs`` list every run.
    """
    from bench.messages import MessageFactory

    stored = 20_000 if quick else 1_000_000
    connections, per_connection = (8, 100) if quick else (8, 2000)
    flows_text = (
        RELAY_FLOWS.replace("APPBENCHRELAY1", "APPBENCHSTORE1")
        + '\n[[flows]]\nflow_id = "FLWINGEST"\nname = "Ingest"\n'
        '[flows.trigger]\nmessage_type = "ADT^A04"\n'
    )

    def measure(folder: Path) -> float:
        flows = folder / "flows.toml"
        flows.write_text(flows_text)
        gateway = _start_gateway(folder, _config(folder, flows))
        try:
            _wait_port(GATEWAY_PORT, gateway, 60)
            result = _load(
                gateway, connections, per_connection, factory=MessageFactory(types=("ADT^A04",))
            )
        finally:
            _stop(gateway)
        return round(result.msgs_per_s, 1)

    rates: dict[str, list[float]] = {"empty": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="bench-store-full-") as full_name:
        full = Path(full_name)
        _fill_messages(f"sqlite:///{full / 'bench.db'}", stored)
        for _round in range(1 if quick else 3):
            with tempfile.TemporaryDirectory(prefix="bench-store-empty-") as empty_name:
                rates["empty"].append(measure(Path(empty_name)))
            rates["full"].append(measure(full))
    empty, full_rate = _median(rates["empty"]), _median(rates["full"])
    return {
        "stored_messages": stored,
        "ingest_empty_msgs_per_s": empty,
        "ingest_full_msgs_per_s": full_rate,
        "full_over_empty": round(full_rate / empty, 3) if empty else None,
        "empty_runs": rates["empty"],
        "full_runs": rates["full"],
    }


ADMIN_PORT_OFFSET = 2


def _admin_token(database_url: str) -> str:
    """A viewer with an API token in a new store (as ``udsgateway tokens create`` makes it)."""
    from udsgateway.testing.admin import api_token

    return api_token(database_url, "bench", "viewer", time.time())


def _scraper(port: int, token: str, stop: Any, timings: list[float]) -> None:
    """GET /metrics and /api/v1/status once a second until ``stop`` is set."""
    import urllib.request

    while not stop.is_set():
        started = time.monotonic()
        for path in ("/metrics", "/api/v1/status"):
            request = urllib.request.Request(f"http://{HOST}:{port}{path}")
            request.add_header("Authorization", f"Bearer {token}")
            with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=5) as reply:
                reply.read()
                timings.append(time.monotonic() - started)
        stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))


def run_admin_scrape(quick: bool) -> dict[str, object]:
    """Ingest rate (8 x N stop-and-wait) with the admin API on, unscraped and scraped.

    Each run is a fresh gateway on a fresh store with ``[admin]`` enabled; in the
    scraped runs a thread fetches ``/metrics`` and ``/api/v1/status`` once a second
    for the whole load. Rounds alternate (three; one with ``quick``); medians.
    ``cost_percent`` is how much lower the scraped rate is (negative: noise).
    """
    import threading

    from bench.messages import MessageFactory

    connections, per_connection = (8, 100) if quick else (8, 2000)
    admin_port = GATEWAY_PORT + ADMIN_PORT_OFFSET
    flows_text = (
        RELAY_FLOWS.replace("APPBENCHRELAY1", "APPBENCHADMIN1")
        + '\n[[flows]]\nflow_id = "FLWINGEST"\nname = "Ingest"\n'
        '[flows.trigger]\nmessage_type = "ADT^A04"\n'
    )

    def measure(scraped: bool) -> tuple[float, list[float]]:
        with tempfile.TemporaryDirectory(prefix="bench-admin-") as name:
            folder = Path(name)
            flows = folder / "flows.toml"
            flows.write_text(flows_text)
            config = _config(folder, flows)
            with config.open("a") as file:
                file.write(
                    f'[admin]\nenabled = true\nlisten = "tcp:port={admin_port}:interface={HOST}"\n'
                )
            token = _admin_token(f"sqlite:///{folder / 'bench.db'}")
            gateway = _start_gateway(folder, config)
            stop = threading.Event()
            timings: list[float] = []
            scraper = threading.Thread(
                target=_scraper, args=(admin_port, token, stop, timings), daemon=True
            )
            try:
                _wait_port(GATEWAY_PORT, gateway, 60)
                _wait_port(admin_port, gateway, 60)
                if scraped:
                    scraper.start()
                result = _load(
                    gateway,
                    connections,
                    per_connection,
                    factory=MessageFactory(types=("ADT^A04",)),
                )
            finally:
                stop.set()
                if scraper.is_alive():
                    scraper.join(10)
                _stop(gateway)
        return round(result.msgs_per_s, 1), timings

    rates: dict[str, list[float]] = {"plain": [], "scraped": []}
    scrape_times: list[float] = []
    for _round in range(1 if quick else 3):
        rates["plain"].append(measure(False)[0])
        rate, timings = measure(True)
        rates["scraped"].append(rate)
        scrape_times += timings
    plain, scraped = _median(rates["plain"]), _median(rates["scraped"])
    return {
        "ingest_plain_msgs_per_s": plain,
        "ingest_scraped_msgs_per_s": scraped,
        "cost_percent": round(100 * (plain - scraped) / plain, 1) if plain else None,
        "scrapes": len(scrape_times) // 2,
        "scrape_ms_median": round(1000 * _median(sorted(scrape_times)), 1)
        if scrape_times
        else None,
        "plain_runs": rates["plain"],
        "scraped_runs": rates["scraped"],
    }


if __name__ == "__main__":  # pragma: no cover - manual runs
    which = sys.argv[1] if len(sys.argv) > 1 else "relay"
    quick = "--quick" in sys.argv
    if "--pure" in sys.argv:
        use_venv(PURE_VENV_BIN)
    if not (_port_free(GATEWAY_PORT) and _port_free(RECEIVER_PORT)):
        # Someone else's run holds the default ports: two free ones instead.
        use_ports(_free_port(), _free_port())
    runner = {
        "relay": run_relay,
        "relay-ab": run_relay_ab,
        "recovery": run_recovery,
        "backlog": run_backlog_memory,
        "store": run_store_size,
        "closing": run_closing,
        "admin": run_admin_scrape,
    }[which]
    print(runner(quick))
    os._exit(0)
