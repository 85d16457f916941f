"""The cluster fault harness: gateway nodes in cluster mode on a private PostgreSQL,
senders with per-patient sequence numbers, a receiver that records every arrival,
faults, and the checks that prove nothing was lost or reordered (docs/cluster.md,
"The fault harness").

Used by ``tests/integration/test_cluster_faults.py`` (the short version, in ``make
test``) and by ``bench/cluster.py`` (the long version and the throughput figures).

Everything runs as real processes on this machine:

* ``PrivatePostgres``: a PostgreSQL of the harness's own (``initdb`` and ``pg_ctl``
  from ``/usr/lib/postgresql/*/bin`` under a temporary directory, run as the user
  ``postgres``, on a free port), so that a scenario may stop and restart it: the
  machine's PostgreSQL is never touched.
* ``Namespace``: a network namespace with two veth pairs, one towards the partner
  and the senders, one towards PostgreSQL, so that a node can be cut off from
  PostgreSQL alone (``ip link set ... down``). Always deleted at the end.
* ``Cluster``: the nodes (``twistd udsgateway`` with ``[cluster] enabled = true``),
  the receiver and the sender (``tests/integration/cluster_peers.py``), the faults
  (``kill``, ``pause``/``resume``, ``restart_postgres``, ``cut_database``) and
  ``report()``, which reads the sender's and the receiver's logs and the lease
  history and returns a ``Report``.

Every frame the receiver gets is attributed to the node that wrote it (by the
owner of the connection's socket, or by the namespace's address), so the report
can say, for every frame, whether its node held the lane's bucket at that moment
(the lease history, on the database clock, which is this machine's wall clock).
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

from attrs import define, field

from tests.integration.helpers import (
    REPO,
    STARTUP_TIMEOUT,
    TWISTD,
    LoggedProcess,
)

HOST = "127.0.0.1"
TENANT = "harness"
APP_ID = "APPHARNESS001"
FLOW_ID = "FLWHARNESS01"
#: How long a scenario waits for every acknowledged message to reach the receiver.
DRAIN_TIMEOUT = 120.0
#: Frames may reach the receiver this long after the lease they were sent under ended
#: (loopback transit and the receiver's read; the node stops at lease time less a margin).
TRANSIT = 0.25
#: A frame sent this long before a fault may still have its outcome unrecorded at
#: the fault (outcomes are committed in groups, after the ACK).
IN_FLIGHT = 2.0
#: What a cluster's PostgreSQL needs so that a node cut off from it, or frozen, cannot
#: stall the others (docs/cluster.md, "PostgreSQL settings a cluster needs"): the session
#: of a node that vanished or froze in the middle of a transaction keeps its locks (a
#: message's unique key, a lane's lock) until the server ends it, and the other nodes'
#: transactions wait on them, their lease rounds behind them. Idle in a transaction for
#: 2 s: rolled back; a silent peer: dropped after 2 + 2 x 1 s of keepalives, or 3 s of
#: unacknowledged data. A frozen process (SIGSTOP, a paused VM) in the middle of a
#: pipeline (psycopg's executemany) escapes all of these (its kernel still answers, and
#: the server is not "idle in transaction" before the pipeline's Sync): a lock wait of
#: more than 1 s fails instead (the inbound commit is answered with a NAK and resent).
DEAD_CLIENT_SETTINGS = {
    "idle_in_transaction_session_timeout": "'2s'",
    "tcp_keepalives_idle": "2",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "2",
    "tcp_user_timeout": "3000",
    "lock_timeout": "'1s'",
}
#: Longest wait for a faulted node's buckets to be held by the others.
TAKEOVER_WAIT = 60.0


def _free_port(host: str = HOST) -> int:
    with closing(socket.socket()) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _run(argv: Sequence[str], timeout: float = 120.0, check: bool = True) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: status {done.returncode}\n{done.stderr}")
    return done.stdout


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb and pg_ctl, if any."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda path: int(Path(path).parent.parent.name),
    )
    return Path(found[-1]).parent if found else None


def can_run_private_postgres() -> str | None:
    """None when this machine can run a private PostgreSQL; else the reason it cannot."""
    if postgres_bin() is None:
        return "no /usr/lib/postgresql/*/bin/pg_ctl"
    if os.geteuid() != 0:
        return "not root: cannot run PostgreSQL as the user postgres"
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        return "no user postgres"
    return None


def can_make_namespaces() -> str | None:
    """None when ``ip netns`` works here (root, iproute2); else the reason."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2"
    name = f"udsgprobe{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", name], timeout=20)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return f"ip netns add failed: {error}"
    _run(["ip", "netns", "del", name], timeout=20, check=False)
    return None


# -- PostgreSQL


@define
class PrivatePostgres:
    """A PostgreSQL server of the harness's own: initdb, pg_ctl, as the user postgres.

    ``listen`` are the addresses it listens on (127.0.0.1, and a namespace's
    PostgreSQL side when one exists); any client address in ``trust`` may connect
    without a password (only loopback otherwise). Call ``cleanup`` in every case.
    """

    listen: tuple[str, ...] = (HOST,)
    trust: tuple[str, ...] = ()
    settings: dict[str, str] = field(factory=dict)
    directory: Path = field(init=False)
    port: int = field(init=False, default=0)
    postmaster: int = field(init=False, default=0)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def _as_postgres(self, *argv: str, timeout: float = 120.0) -> str:
        return _run(["runuser", "-u", "postgres", "--", *argv], timeout=timeout)

    def _bin(self, name: str) -> str:
        found = postgres_bin()
        assert found is not None, "no PostgreSQL binaries"
        return str(found / name)

    def initialise(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="udsg-pg-"))
        shutil.chown(self.directory, "postgres", "postgres")
        self.port = _free_port()
        self._as_postgres(
            self._bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        options = {
            "port": str(self.port),
            "listen_addresses": "'" + ",".join(self.listen) + "'",
            "unix_socket_directories": f"'{self.directory}'",
            "max_connections": "200",
            "shared_buffers": "'64MB'",
            "logging_collector": "off",
            "log_min_messages": "warning",
            **self.settings,
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in options.items())
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.writelines(f"host all all {address}/32 trust\n" for address in self.trust)

    def start(self) -> None:
        self._as_postgres(
            self._bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "server.log"),
            "-w",
            "-t",
            "120",
            "start",
        )
        self.postmaster = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown; ``immediate``: as a crash (recovery at the next start)."""
        self._as_postgres(self._bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.postmaster = 0

    def url(self, database: str = "udsgateway", host: str = HOST) -> str:
        return f"postgresql+psycopg://postgres@{host}:{self.port}/{database}"

    def create_database(self, name: str = "udsgateway") -> str:
        self._as_postgres(
            self._bin("psql"),
            "-h",
            HOST,
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-c",
            f'CREATE DATABASE "{name}"',
        )
        return self.url(name)

    def cpu_seconds(self) -> float:
        """utime + stime of the postmaster and its live children, and of the children it
        reaped (``cutime`` + ``cstime``), in seconds."""
        if not self.postmaster:
            return 0.0
        return _tree_cpu(self.postmaster)

    def cleanup(self) -> None:
        if self.postmaster or (self.data / "postmaster.pid").exists():
            with suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _tree_cpu(root: int) -> float:
    """CPU seconds of ``root`` and its direct children (and what they reaped)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None:
            continue
        # fields[1] is the ppid (field 4 of stat); utime..cstime are fields 14-17.
        if int(entry) == root or int(fields[1]) == root:
            total += sum(int(value) for value in fields[11:15])
    return total / ticks


def process_cpu(pid: int) -> float:
    """utime + stime of one process (and its reaped children), in seconds."""
    fields = _stat(pid)
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK") if fields else 0.0


# -- network namespaces


@define
class Namespace:
    """A network namespace with a veth pair towards the partner/senders (``a``) and one
    towards PostgreSQL (``b``), on a random 10.x.y.0/29 not used on this machine.

    Root side: ``partner_side`` (10.x.y.1) and ``database_side`` (10.x.y.5);
    namespace side: ``address`` (10.x.y.2, its listener and the source of its
    deliveries) and 10.x.y.6 (its PostgreSQL connections).
    """

    name: str = field(init=False)
    prefix: str = field(init=False)
    _links: list[str] = field(init=False, factory=list)

    @property
    def partner_side(self) -> str:
        return f"{self.prefix}.1"

    @property
    def address(self) -> str:
        return f"{self.prefix}.2"

    @property
    def database_side(self) -> str:
        return f"{self.prefix}.5"

    @property
    def database_client(self) -> str:
        return f"{self.prefix}.6"

    @property
    def database_link(self) -> str:
        return self._links[1]

    def create(self) -> None:
        tag = secrets.token_hex(3)
        used = _run(["ip", "-o", "-4", "addr"], check=False)
        while True:
            self.prefix = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(256)}"
            if f" {self.prefix}." not in used:
                break
        self.name = f"udsg{tag}"
        _run(["ip", "netns", "add", self.name])
        ns = ["ip", "netns", "exec", self.name]
        _run([*ns, "ip", "link", "set", "lo", "up"])
        for letter, (root_ip, inner_ip) in zip(
            "ab",
            ((self.partner_side, self.address), (self.database_side, self.database_client)),
            strict=True,
        ):
            outer, inner = f"ug{letter}{tag}", f"un{letter}{tag}"
            _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
            self._links.append(outer)
            _run(["ip", "link", "set", inner, "netns", self.name])
            _run(["ip", "addr", "add", f"{root_ip}/30", "dev", outer])
            _run(["ip", "link", "set", outer, "up"])
            _run([*ns, "ip", "addr", "add", f"{inner_ip}/30", "dev", inner])
            _run([*ns, "ip", "link", "set", inner, "up"])

    def wrap(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def set_database_link(self, up: bool) -> None:
        _run(["ip", "link", "set", self.database_link, "up" if up else "down"])

    def cleanup(self) -> None:
        """Delete the links and the namespace (whatever was created; safe to repeat)."""
        for link in self._links:
            _run(["ip", "link", "del", link], check=False)
        self._links = []
        if getattr(self, "name", None):
            # Processes still inside keep it alive; the caller stops them first.
            _run(["ip", "netns", "del", self.name], check=False)


# -- the gateway nodes

_LISTENING = re.compile(r"tenant (\S+) listening on .*?port=(\d+)")
_ADMIN = re.compile(r"admin API listening on .*?port=(\d+)")

FLOWS = """app_id = "{app_id}"
name = "Cluster harness"
tenant = "{tenant}"

[[flows]]
flow_id = "{flow_id}"
name = "Harness relay"
[flows.trigger]
connection = "mllp"
message_type = "ADT^A08"
sample = '''
MSH|^~\\&|HIS|HARNESS|RECVAPP|RECVFAC|20240101||ADT^A08|S1|P|2.5
PID|1||P1^^^HARNESS||Test^Patient||19800101|U||||||||||1
'''
[[flows.actions]]
name = "to_partner"
host = "{host}"
port = {port}
message_type = "ADT^A08"
ordering_key = "PID-3.1"
connect_timeout = 2
backoff_initial = 0.2
backoff_max = 1
template = '''
MSH|^~\\&|UDSGATEWAY|HARNESS|RECV|RECVFAC|{{{{ now }}}}||ADT^A08|{{{{ control_id }}}}|P|2.5
PID|1||{{{{ msg["PID-3.1"] }}}}^^^HARNESS||{{{{ msg["PID-5.1"] }}}}^{{{{ msg["PID-5.2"] }}}}
ZHS|{{{{ msg["MSH-10"] }}}}|{{{{ msg["PID-18"] }}}}
'''
"""


def lane_of(patient: str) -> str:
    from udsgateway.outbound.executor import lane_name

    return lane_name(FLOW_ID, 0, patient)


@define
class Node:
    """One gateway node: its configuration, process and log (appended across restarts)."""

    name: str
    directory: Path
    database: str
    listen_host: str = HOST
    namespace: Namespace | None = None
    port: int = 0
    admin_port: int = 0
    #: Fixed ports (0: any free one at each start), so that HAProxy finds a restarted node.
    listen_port: int = 0
    admin_listen_port: int = 0
    #: Behind HAProxy with the PROXY protocol: the addresses HAProxy connects from.
    proxies: tuple[str, ...] = ()
    child: LoggedProcess = field(init=False)
    log_offset: int = 0

    def __attrs_post_init__(self) -> None:
        self.child = LoggedProcess(self.directory / f"{self.name}.log")

    @property
    def pid(self) -> int:
        process = self.child.process
        assert process is not None
        return process.pid

    @property
    def running(self) -> bool:
        return self.child.running

    def write_config(
        self, cluster: dict[str, Any] | None, flows: Path | None, admin: bool = True
    ) -> Path:
        lines = [
            "[gateway]",
            f"database = {json.dumps(self.database)}",
            f"node_name = {json.dumps(self.name)}",
            "",
            "[[tenants]]",
            f"name = {json.dumps(TENANT)}",
            f'listen = "{self.endpoint()}"',
            f"flow_files = [{json.dumps(str(flows)) if flows else ''}]",
            *([f"proxies = {json.dumps(list(self.proxies))}"] if self.proxies else []),
            "[tenants.limits]",
            "max_connections = 512",
            "max_connections_per_peer = 512",
            "",
            "[delivery]",
            "held_poll = 1.0",
            "max_queued_per_destination = 2000000",
        ]
        if admin:
            lines += [
                "",
                "[admin]",
                "enabled = true",
                f'listen = "tcp:port={self.admin_listen_port}:interface={self.admin_host}"',
                "refresh_interval = 1",
            ]
        if cluster is not None:
            lines += ["", "[cluster]", "enabled = true"]
            lines += [f"{key} = {json.dumps(value)}" for key, value in cluster.items()]
        config = self.directory / f"{self.name}.toml"
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return config

    @property
    def admin_host(self) -> str:
        """The admin API listens on loopback (beyond it only with TLS): the namespace's own
        loopback for a node in a namespace."""
        return HOST

    def endpoint(self) -> str:
        endpoint = f"tcp:port={self.listen_port}:interface={self.listen_host}"
        return f"haproxy:{endpoint}" if self.proxies else endpoint

    def start(self, config: Path) -> None:
        argv = [str(TWISTD), "-n", "--pidfile=", "udsgateway", "--config", str(config)]
        if self.namespace is not None:
            argv = self.namespace.wrap(argv)
        self.log_offset = len(self.child.log_text().encode("utf-8", "replace"))
        self.port = 0
        self.child.spawn(argv, self.directory, dict(os.environ))

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            process = self.child.started()
            if process.poll() is not None:
                raise AssertionError(
                    f"node {self.name} exited with {process.returncode}:\n{self.recent_log()}"
                )
            log = self.recent_log()
            found = _LISTENING.findall(log)
            admin = _ADMIN.findall(log)
            if found and (admin or "[admin]" not in self.config_text()):
                self.port = int(found[-1][1])
                self.admin_port = int(admin[-1]) if admin else 0
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"node {self.name} not listening:\n{self.recent_log()}")
            self.child.pause()

    def config_text(self) -> str:
        return (self.directory / f"{self.name}.toml").read_text(encoding="utf-8")

    def metrics(self, token: str) -> dict[str, float]:
        """The node's ``udsgw_lease_*`` and ``udsgw_cluster_*`` samples from ``/metrics``
        (``name{labels}`` -> value); {} when it does not answer."""

        if not self.admin_port or not self.running:
            return {}
        url = f"http://{self.admin_host}:{self.admin_port}/metrics"
        fetch = (
            "import sys, urllib.request as u; sys.stdout.write(u.urlopen(u.Request("
            f"{url!r}, headers={{'Authorization': 'Bearer ' + sys.argv[1]}}), timeout=10)"
            ".read().decode())"
        )
        argv = [sys.executable, "-c", fetch, token]
        if self.namespace is not None:
            argv = self.namespace.wrap(argv)
        try:
            text = _run(argv, timeout=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            return {}
        samples = {}
        for line in text.splitlines():
            if line.startswith(("udsgw_lease_", "udsgw_cluster_")):
                name, _, value = line.rpartition(" ")
                with suppress(ValueError):
                    samples[name] = float(value)
        return samples

    def recent_log(self) -> str:
        """The log since the last start."""
        return (
            self.child.log_text()
            .encode("utf-8", "replace")[self.log_offset :]
            .decode("utf-8", "replace")
        )

    def send(self, signum: int) -> None:
        self.child.started().send_signal(signum)

    def stop(self, signum: int = signal.SIGKILL) -> None:
        self.child.stop(signum)


# -- arrivals and answers


@define(frozen=True)
class Arrival:
    time: float
    node: str
    peer: str
    patient: str
    sequence: int
    inbound_id: str
    outbound_id: str


@define(frozen=True)
class Answer:
    time: float
    patient: str
    sequence: int
    control_id: str
    code: str
    target: str


def read_arrivals(path: Path) -> list[Arrival]:
    arrivals = []
    with suppress(FileNotFoundError), path.open(encoding="latin-1") as lines:
        for line in lines:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 7 or not line.endswith("\n"):
                continue
            when, node, peer, patient, sequence, inbound, outbound = parts
            arrivals.append(
                Arrival(float(when), node, peer, patient, int(sequence or 0), inbound, outbound)
            )
    return arrivals


def read_answers(path: Path) -> list[Answer]:
    answers = []
    with suppress(FileNotFoundError), path.open() as lines:
        for line in lines:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 6 or not line.endswith("\n"):
                continue
            when, patient, sequence, control_id, code, target = parts
            answers.append(Answer(float(when), patient, int(sequence), control_id, code, target))
    return answers


@define
class Fault:
    """One fault: what, which node, when (wall clock) and the buckets it held then."""

    kind: str
    node: str
    at: float
    held: frozenset[int]
    until: float | None = None
    notes: dict[str, Any] = field(factory=dict)


@define
class Report:
    """What a scenario proved; ``problems()`` lists what must be zero and is not."""

    acked: int
    delivered: int
    lost: list[str]
    duplicates: int
    duplicates_new_id: int
    #: Duplicates whose first copy was written by a faulted node around its fault (in
    #: flight then: sent, its outcome not recorded); the others, with details.
    duplicates_at_faults: int
    duplicates_elsewhere: list[str]
    inversions: list[str]
    foreign_frames: list[str]
    unattributed: int
    overlaps: list[str]
    takeovers: list[float]
    faults: list[Fault]
    per_node: dict[str, int]
    leases: int
    fenced: dict[str, int]
    notes: list[str] = field(factory=list)

    def problems(self) -> list[str]:
        problems = []
        if self.lost:
            problems.append(f"{len(self.lost)} ACKed but never delivered: {self.lost[:5]}")
        if self.inversions:
            problems.append(f"{len(self.inversions)} order inversions: {self.inversions[:5]}")
        if self.foreign_frames:
            problems.append(
                f"{len(self.foreign_frames)} frames by a node not holding the lane's bucket: "
                f"{self.foreign_frames[:5]}"
            )
        if self.overlaps:
            problems.append(f"lease history: {self.overlaps[:5]}")
        if self.duplicates_new_id:
            problems.append(f"{self.duplicates_new_id} duplicates under a new MSH-10")
        return problems

    def percentile(self, q: float) -> float | None:
        if not self.takeovers:
            return None
        ordered = sorted(self.takeovers)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> dict[str, Any]:
        return {
            "acked": self.acked,
            "delivered": self.delivered,
            "lost": len(self.lost),
            "inversions": len(self.inversions),
            "duplicates": self.duplicates,
            "duplicates_new_id": self.duplicates_new_id,
            "duplicates_at_faults": self.duplicates_at_faults,
            "duplicates_elsewhere": len(self.duplicates_elsewhere),
            "duplicates_elsewhere_first": self.duplicates_elsewhere[:5],
            "foreign_frames": len(self.foreign_frames),
            "unattributed_frames": self.unattributed,
            "overlaps": len(self.overlaps),
            "leases": self.leases,
            "faults": [f"{fault.kind} {fault.node}" for fault in self.faults],
            "moved_buckets_measured": len(self.takeovers),
            "takeover_p50_s": _round(self.percentile(0.5)),
            "takeover_p99_s": _round(self.percentile(0.99)),
            "takeover_max_s": _round(max(self.takeovers) if self.takeovers else None),
            "per_node": self.per_node,
            "fenced": self.fenced,
            "notes": self.notes,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def inversions(arrivals: Iterable[Arrival]) -> list[str]:
    """Per patient (lane), the first arrivals of each sequence number must come in
    increasing order; each one that comes after a higher one is an inversion."""
    seen: dict[str, set[int]] = {}
    highest: dict[str, int] = {}
    found = []
    for arrival in arrivals:
        first = seen.setdefault(arrival.patient, set())
        if arrival.sequence in first:
            continue
        first.add(arrival.sequence)
        if arrival.sequence < highest.get(arrival.patient, 0):
            found.append(f"{arrival.patient}: {arrival.sequence} after {highest[arrival.patient]}")
        highest[arrival.patient] = max(highest.get(arrival.patient, 0), arrival.sequence)
    return found


# -- the cluster


@define
class Cluster:
    """Nodes, receiver and sender around one private PostgreSQL; see the module docstring.

    ``nodes`` names the nodes; ``namespaced`` the one (at most) that runs in a network
    namespace. ``cluster`` is the ``[cluster]`` section (None: a single gateway, not
    in cluster mode, for comparisons).
    """

    directory: Path
    nodes: Sequence[str] = ("n1", "n2", "n3")
    buckets: int = 16
    lease_time: float = 6.0
    namespaced: str | None = None
    clustered: bool = True
    database_url: str | None = None
    receiver_delay: float = 0.0
    #: More postgresql.conf settings of the private PostgreSQL.
    # PostgreSQL's defaults: the nodes set what they need on their own sessions
    # (store.engine.dead_peer_settings); DEAD_CLIENT_SETTINGS is what a database
    # shared with other clients may add for them.
    postgres_settings: dict[str, str] = field(factory=dict)
    postgres: PrivatePostgres | None = None
    namespace: Namespace | None = None
    members: dict[str, Node] = field(factory=dict)
    receiver: LoggedProcess | None = None
    sender: LoggedProcess | None = None
    faults: list[Fault] = field(factory=list)
    receiver_host: str = HOST
    receiver_port: int = 0
    #: Each node's admin API (for its lease metrics), with a viewer's token.
    admin: bool = True
    token: str = ""
    #: The senders' way in: "" straight to each node's listener; "tcp" through HAProxy
    #: (mode tcp); "proxy-v2" through HAProxy with the PROXY protocol into each node's
    #: ``haproxy:`` listener (its ``proxies`` the address HAProxy connects from).
    haproxy: str = ""
    haproxy_port: int = 0
    balancer: LoggedProcess | None = None
    _cleanups: list[Callable[[], None]] = field(factory=list)
    _engine: Any = None

    # paths
    @property
    def arrivals_path(self) -> Path:
        return self.directory / "arrivals.tsv"

    @property
    def answers_path(self) -> Path:
        return self.directory / "answers.tsv"

    @property
    def targets_path(self) -> Path:
        return self.directory / "targets"

    @property
    def identities_path(self) -> Path:
        return self.directory / "identities"

    def setup(self) -> None:
        """Namespace, PostgreSQL, database, receiver, flows; then every node, started
        together and waited for. Call ``cleanup`` whatever happens."""
        # HAProxy checks each node's /readyz, which a namespaced node serves on its
        # namespace's loopback only: the cut scenario sends to the nodes directly.
        assert not (self.haproxy and self.namespaced), "HAProxy with a namespaced node"
        if self.namespaced:
            self.namespace = Namespace()
            self._cleanups.append(self.namespace.cleanup)
            self.namespace.create()
            self.receiver_host = self.namespace.partner_side
        if self.database_url is None:
            listen: tuple[str, ...] = (HOST,)
            trust: tuple[str, ...] = ()
            if self.namespace is not None:
                listen += (self.namespace.database_side,)
                trust = (self.namespace.database_client,)
            self.postgres = PrivatePostgres(listen, trust, dict(self.postgres_settings))
            self._cleanups.append(self.postgres.cleanup)
            self.postgres.initialise()
            self.postgres.start()
            self.database_url = self.postgres.create_database()
        self.start_receiver()
        flows = self.directory / "flows.toml"
        flows.write_text(
            FLOWS.format(
                app_id=APP_ID,
                tenant=TENANT,
                flow_id=FLOW_ID,
                host=self.receiver_host,
                port=self.receiver_port,
            ),
            encoding="utf-8",
        )
        for index, name in enumerate(self.nodes):
            database = self.database_url
            listen_host = HOST
            namespace = None
            if name == self.namespaced:
                assert self.namespace is not None and self.postgres is not None
                namespace = self.namespace
                database = self.postgres.url(host=self.namespace.database_side)
                listen_host = self.namespace.address
            node = Node(name, self.directory, database, listen_host, namespace)
            if self.haproxy:
                # Fixed ports: HAProxy's configuration names them, across restarts.
                node.listen_port, node.admin_listen_port = _free_port(), _free_port()
                if self.haproxy == "proxy-v2":
                    node.proxies = (namespace.partner_side if namespace else HOST,)
            self.members[name] = node
            self._cleanups.append(node.stop)
            # The first node imports the flows and creates the schema; the others follow.
            self.start_node(name, flows if index == 0 else None)
            if index == 0:
                node.wait_ready()
                if self.admin:
                    self.token = viewer_token(self.database_url)
        for node in self.members.values():
            node.wait_ready()
        if self.haproxy:
            self.start_haproxy()
        self.publish()

    def cluster_settings(self) -> dict[str, Any] | None:
        if not self.clustered:
            return None
        return {"buckets": self.buckets, "lease_time": self.lease_time}

    def start_node(self, name: str, flows: Path | None = None) -> None:
        node = self.members[name]
        node.start(node.write_config(self.cluster_settings(), flows, self.admin))
        self.publish()

    def restart_node(self, name: str) -> None:
        self.start_node(name)
        self.members[name].wait_ready()
        self.publish()

    def publish(self) -> None:
        """Write the senders' targets and the receiver's identities of the running nodes."""
        targets, identities = [], []
        for node in self.members.values():
            if not node.running:
                continue
            identities.append(f"{node.pid} {node.name}")
            if node.port:
                targets.append(f"{node.listen_host}:{node.port}")
            if node.namespace is not None:
                identities.append(f"{node.namespace.address} {node.name}")
        if self.haproxy_port:
            targets = [f"{HOST}:{self.haproxy_port}"]
        _replace(self.targets_path, "\n".join(targets) + "\n")
        _replace(self.identities_path, "\n".join(identities) + "\n")

    def haproxy_config(self) -> str:
        """HAProxy in TCP mode in front of every node; a node is in service while its
        ``/readyz`` answers 200 (checked every 0.5 s; out after 2 failures)."""
        send_proxy = "send-proxy-v2" if self.haproxy == "proxy-v2" else ""
        lines = [
            "global",
            "    maxconn 4096",
            "defaults",
            "    mode tcp",
            "    timeout connect 2s",
            "    timeout client 11m",
            "    timeout server 11m",
            "    timeout check 2s",
            "    retries 2",
            "    option redispatch",
            "frontend hl7",
            f"    bind {HOST}:{self.haproxy_port}",
            "    default_backend nodes",
            "backend nodes",
            "    balance leastconn",
            "    option httpchk GET /readyz",
            "    http-check expect status 200",
            f"    default-server inter 500ms fall 2 rise 1 {send_proxy}",
        ]
        lines += [
            f"    server {node.name} {node.listen_host}:{node.listen_port}"
            f" check port {node.admin_listen_port}"
            for node in self.members.values()
        ]
        return "\n".join(lines) + "\n"

    def start_haproxy(self) -> None:
        binary = shutil.which("haproxy")
        assert binary is not None, "no haproxy"
        assert self.admin, "HAProxy checks the nodes' /readyz: the admin API must be on"
        self.haproxy_port = _free_port()
        config = self.directory / "haproxy.cfg"
        config.write_text(self.haproxy_config())
        self.balancer = LoggedProcess(self.directory / "haproxy.log")
        self._cleanups.append(
            lambda: self.balancer.stop(signal.SIGKILL) if self.balancer else None
        )
        self.balancer.spawn([binary, "-db", "-f", str(config)], self.directory, dict(os.environ))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _accepts(HOST, self.haproxy_port):
            if not self.balancer.running or time.monotonic() > deadline:
                raise AssertionError(f"haproxy did not start:\n{self.balancer.log_text()}")
            self.balancer.pause()

    def start_receiver(self) -> None:
        self.receiver = LoggedProcess(self.directory / "receiver.log")
        self._cleanups.append(
            lambda: self.receiver.stop(signal.SIGTERM) if self.receiver else None
        )
        argv = [
            sys.executable,
            "-m",
            "tests.integration.cluster_peers",
            "receive",
            "--host",
            self.receiver_host,
            "--port",
            "0",
            "--out",
            str(self.arrivals_path),
            "--pids",
            str(self.identities_path),
            "--delay",
            str(self.receiver_delay),
        ]
        self.receiver.spawn(argv, REPO, dict(os.environ, PYTHONPATH=str(REPO)))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            found = re.search(r"listening on \S+:(\d+)", self.receiver.log_text())
            if found:
                self.receiver_port = int(found.group(1))
                return
            if not self.receiver.running or time.monotonic() > deadline:
                raise AssertionError(f"receiver did not start:\n{self.receiver.log_text()}")
            self.receiver.pause()

    def start_sender(
        self,
        connections: int = 4,
        patients: int = 40,
        rate: float = 0.0,
        limit: int = 0,
        run: str | None = None,
    ) -> None:
        """Start the senders (one process, ``connections`` stop-and-wait connections)."""
        self.sender = LoggedProcess(self.directory / "sender.log")
        self._cleanups.append(lambda: self.sender.stop(signal.SIGKILL) if self.sender else None)
        argv = [
            sys.executable,
            "-m",
            "tests.integration.cluster_peers",
            "send",
            "--targets",
            str(self.targets_path),
            "--out",
            str(self.answers_path),
            "--connections",
            str(connections),
            "--patients",
            str(patients),
            "--run",
            run or f"H{secrets.token_hex(3).upper()}",
            "--rate",
            str(rate),
            "--limit",
            str(limit),
        ]
        self.sender.spawn(argv, REPO, dict(os.environ, PYTHONPATH=str(REPO)))

    def stop_sender(self, timeout: float = 60.0) -> None:
        """Let the senders finish their message in hand (SIGTERM) and exit."""
        assert self.sender is not None
        process = self.sender.started()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.sender.stop()

    def wait_sender(self, timeout: float) -> None:
        """Wait for a sender started with ``limit`` to finish."""
        assert self.sender is not None
        self.sender.started().wait(timeout)
        self.sender.stop()

    # -- the database

    def engine(self) -> Any:
        if self._engine is None:
            from sqlalchemy import create_engine

            assert self.database_url is not None
            self._engine = create_engine(
                self.database_url, pool_pre_ping=True, connect_args={"connect_timeout": 5}
            )
            self._cleanups.append(self._engine.dispose)
        return self._engine

    def held(self) -> dict[str, set[int]]:
        """Valid leases per owner, on the database clock ({} when unreachable)."""
        from udsgateway.store import leases as store

        try:
            with self.engine().begin() as connection:
                status = store.cluster_status(connection)
        except Exception:
            return {}
        return {} if status is None else status.holders()

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float = 60.0) -> float:
        started = time.monotonic()
        while not done():
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"{what}: not within {timeout} s\n{self.sessions()}\n{self.logs()}"
                )
            time.sleep(0.05)
        return time.monotonic() - started

    def wait_balanced(self, timeout: float = 60.0) -> None:
        """Until every running node holds a share of the buckets (and all are held)."""
        running = [name for name, node in self.members.items() if node.running]

        def balanced() -> bool:
            held = self.held()
            counts = [len(held.get(name, ())) for name in running]
            return sum(counts) == self.buckets and max(counts) - min(counts) <= 1

        self.wait_for(balanced, f"buckets shared by {running}", timeout)

    def sessions(self) -> str:
        """PostgreSQL's sessions and the locks they wait for (a diagnosis)."""
        from sqlalchemy import text

        try:
            with self.engine().connect() as connection:
                rows = connection.execute(
                    text(
                        "SELECT pid, client_addr, state, wait_event_type, wait_event,"
                        " pg_blocking_pids(pid) AS blocked_by,"
                        " now() - xact_start AS in_transaction, left(query, 80) AS query"
                        " FROM pg_stat_activity WHERE datname = current_database()"
                    )
                ).all()
        except Exception as error:
            return f"sessions: {error}"
        return "sessions:\n" + "\n".join(str(tuple(row)) for row in rows)

    def arrivals(self) -> list[Arrival]:
        return read_arrivals(self.arrivals_path)

    def answers(self) -> list[Answer]:
        return read_answers(self.answers_path)

    def wait_arrivals(self, count: int, timeout: float = 60.0) -> None:
        self.wait_for(lambda: len(self.arrivals()) >= count, f"{count} arrivals", timeout)

    # -- faults

    def kill(self, name: str) -> Fault:
        """kill -9 a node; the fault's time is when the process is gone."""
        held = frozenset(self.held().get(name, ()))
        node = self.members[name]
        node.send(signal.SIGKILL)
        node.child.started().wait(30)
        fault = Fault("kill -9", name, time.time(), held)
        node.stop()
        self.faults.append(fault)
        self.publish()
        return fault

    def pause(self, name: str) -> Fault:
        held = frozenset(self.held().get(name, ()))
        self.members[name].send(signal.SIGSTOP)
        fault = Fault("SIGSTOP", name, time.time(), held)
        self.faults.append(fault)
        return fault

    def resume(self, fault: Fault) -> None:
        self.members[fault.node].send(signal.SIGCONT)
        fault.until = time.time()

    def stop_postgres(self) -> Fault:
        """Stop the private PostgreSQL as a crash would (``-m immediate``)."""
        assert self.postgres is not None
        held = frozenset(range(self.buckets))
        self.postgres.stop("immediate")
        fault = Fault("PostgreSQL stopped", "postgres", time.time(), held)
        self.faults.append(fault)
        return fault

    def start_postgres(self, fault: Fault) -> None:
        assert self.postgres is not None
        self.postgres.start()
        fault.until = time.time()

    def cut_database(self) -> Fault:
        """Take the namespaced node's link to PostgreSQL down (its partner link stays)."""
        assert self.namespace is not None and self.namespaced is not None
        held = frozenset(self.held().get(self.namespaced, ()))
        self.namespace.set_database_link(False)
        fault = Fault("cut from PostgreSQL", self.namespaced, time.time(), held)
        self.faults.append(fault)
        return fault

    def restore_database(self, fault: Fault) -> None:
        assert self.namespace is not None
        self.namespace.set_database_link(True)
        fault.until = time.time()

    # -- the report

    def wait_drained(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Until every acknowledged message has arrived (or the timeout: the report
        then counts the missing ones as lost)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            acked = {a.control_id for a in self.answers() if a.code in ("AA", "CA")}
            arrived = {a.inbound_id for a in self.arrivals()}
            if acked <= arrived:
                return
            time.sleep(0.2)

    def lease_history(self) -> list[Any]:
        from udsgateway.store import leases as store

        if not self.clustered:
            return []
        with self.engine().begin() as connection:
            return store.lease_history(connection)

    def report(self) -> Report:
        from udsgateway.store import leases as store

        answers = self.answers()
        arrivals = self.arrivals()
        acked = {a.control_id for a in answers if a.code in ("AA", "CA")}
        arrived: dict[str, Arrival] = {}
        duplicates = duplicates_new_id = at_faults = 0
        elsewhere = []
        for arrival in arrivals:
            first = arrived.get(arrival.inbound_id)
            if first is None:
                arrived[arrival.inbound_id] = arrival
                continue
            duplicates += 1
            if first.outbound_id != arrival.outbound_id:
                duplicates_new_id += 1
            if any(self._in_flight_at(fault, first) for fault in self.faults):
                at_faults += 1
            else:
                elsewhere.append(
                    f"{first.inbound_id}: by {first.node} at {first.time:.3f}, again by "
                    f"{arrival.node} at {arrival.time:.3f}"
                )
        history = self.lease_history()
        self._dump(history)
        per_node: dict[str, int] = {}
        for arrival in arrivals:
            per_node[arrival.node] = per_node.get(arrival.node, 0) + 1
        foreign, unattributed = self._foreign_frames(arrivals, history)
        return Report(
            acked=len(acked),
            delivered=len(arrived),
            lost=sorted(acked - set(arrived)),
            duplicates=duplicates,
            duplicates_new_id=duplicates_new_id,
            duplicates_at_faults=at_faults,
            duplicates_elsewhere=elsewhere,
            inversions=inversions(arrivals),
            foreign_frames=foreign,
            unattributed=unattributed,
            overlaps=store.overlaps(history) if history else [],
            takeovers=self._takeovers(arrivals),
            faults=list(self.faults),
            per_node=per_node,
            leases=len(history),
            fenced=self.fenced_counts(),
        )

    def _in_flight_at(self, fault: Fault, first: Arrival) -> bool:
        """Whether ``first`` (a frame sent again later) was in flight at ``fault``:
        written by the faulted node (any node when PostgreSQL failed) shortly before
        the fault, or while the node could still send without recording (until its
        lease ran out, when the fault cut it off from the database)."""
        if fault.node in self.members and first.node != fault.node:
            return False
        after = TRANSIT
        if fault.kind in ("PostgreSQL stopped", "cut from PostgreSQL"):
            after += self.lease_time
        return fault.at - IN_FLIGHT <= first.time <= fault.at + after

    def _dump(self, history: Sequence[Any]) -> None:
        """The lease history and the faults, beside the logs (for a post-mortem)."""
        with suppress(OSError):
            (self.directory / "leases.json").write_text(
                json.dumps(
                    {
                        "faults": [
                            {
                                "kind": f.kind,
                                "node": f.node,
                                "at": f.at,
                                "until": f.until,
                                "held": sorted(f.held),
                                "notes": f.notes,
                            }
                            for f in self.faults
                        ],
                        "history": [
                            {
                                "bucket": h.bucket,
                                "epoch": h.epoch,
                                "owner": h.owner,
                                "acquired_at": h.acquired_at,
                                "valid_until": h.valid_until,
                                "released": h.released,
                            }
                            for h in history
                        ],
                    },
                    indent=1,
                )
            )

    def bucket(self, patient: str) -> int:
        from udsgateway.store.leases import bucket_of

        return bucket_of(lane_of(patient), self.buckets)

    def _foreign_frames(
        self, arrivals: Sequence[Arrival], history: Sequence[Any]
    ) -> tuple[list[str], int]:
        """Frames whose node did not hold the lane's bucket when the frame arrived
        (by the lease history; a lease ends at its last written expiry, plus TRANSIT)."""
        if not history:
            return [], 0
        by_bucket: dict[int, list[Any]] = {}
        for lease in history:
            by_bucket.setdefault(lease.bucket, []).append(lease)
        for leases in by_bucket.values():
            leases.sort(key=lambda lease: lease.acquired_at)
        found, unattributed = [], 0
        buckets: dict[str, int] = {}
        for arrival in arrivals:
            if arrival.node == "?":
                unattributed += 1
                continue
            bucket = buckets.get(arrival.patient)
            if bucket is None:
                bucket = buckets[arrival.patient] = self.bucket(arrival.patient)
            current = None
            for lease in by_bucket.get(bucket, ()):
                if lease.acquired_at <= arrival.time:
                    current = lease
            if current is not None and current.owner != arrival.node:
                # Sent under this node's own lease just before it ended (a hand-over),
                # read by the receiver after the next owner took the bucket: the same
                # allowance as for a lease's end below.
                mine = [
                    lease
                    for lease in by_bucket.get(bucket, ())
                    if lease.owner == arrival.node and lease.acquired_at <= arrival.time
                ]
                if mine and arrival.time <= mine[-1].valid_until + TRANSIT:
                    continue
            if current is None or current.owner != arrival.node:
                owner = current.owner if current else "nobody"
                found.append(
                    f"{arrival.inbound_id} by {arrival.node} at {arrival.time:.3f}, "
                    f"bucket {bucket} held by {owner}"
                )
            elif arrival.time > current.valid_until + TRANSIT:
                found.append(
                    f"{arrival.inbound_id} by {arrival.node} at {arrival.time:.3f}, its lease "
                    f"of bucket {bucket} ended at {current.valid_until:.3f}"
                )
        return found, unattributed

    def _takeovers(self, arrivals: Sequence[Arrival]) -> list[float]:
        """For each fault of one node and each bucket it held: seconds from the fault to
        the first frame of that bucket's lanes written by another node."""
        times: list[float] = []
        for fault in self.faults:
            if fault.node not in self.members or not fault.held:
                continue
            firsts: dict[int, float] = {}
            for arrival in arrivals:
                if arrival.time < fault.at or arrival.node in (fault.node, "?"):
                    continue
                bucket = self.bucket(arrival.patient)
                if bucket in fault.held and bucket not in firsts:
                    firsts[bucket] = arrival.time - fault.at
            fault.notes["moved_buckets_with_traffic"] = len(firsts)
            times.extend(firsts.values())
        return times

    def fenced_counts(self) -> dict[str, int]:
        """Per node: fenced rejections (``udsgw_lease_fenced_rejections``, counted since
        its last start) and the lapses it logged over all its runs (``lapses``: "leases
        not renewed in time"). Read at the end of a scenario, from the running nodes."""
        counts: dict[str, int] = {}
        for name, node in self.members.items():
            samples = node.metrics(self.token) if self.token else {}
            for sample, value in samples.items():
                if sample.startswith("udsgw_lease_fenced_rejections"):
                    counts[f"{name} fenced"] = counts.get(f"{name} fenced", 0) + int(value)
            lapses = node.child.log_text().count("leases not renewed in time")
            counts[f"{name} lapses"] = lapses
        return counts

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for name, node in self.members.items():
            parts.append(f"--- {name}:\n{node.child.log_text()[-tail:]}")
        if self.receiver is not None:
            parts.append(f"--- receiver:\n{self.receiver.log_text()[-tail:]}")
        if self.sender is not None:
            parts.append(f"--- sender:\n{self.sender.log_text()[-tail:]}")
        if self.balancer is not None:
            parts.append(f"--- haproxy:\n{self.balancer.log_text()[-tail:]}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        """Stop everything the harness started, delete the namespace and PostgreSQL."""
        for action in reversed(self._cleanups):
            with suppress(Exception):
                action()
        self._cleanups = []
        # The node in the namespace was stopped above; now the namespace can go.
        if self.namespace is not None:
            self.namespace.cleanup()


def viewer_token(database_url: str) -> str:
    """A viewer with an API token in the cluster's store (as ``udsgateway tokens
    create`` makes it), for the nodes' ``/metrics``."""
    from udsgateway.admin import auth
    from udsgateway.store import users
    from udsgateway.store.engine import Database, InlineRunner, make_engine

    database = Database(make_engine(database_url), InlineRunner())
    try:
        hashed = auth.hash_password(secrets.token_hex(8), 2**10)
        database.transaction_now(users.add_user, "harness", hashed, "viewer", False, time.time())
        token = auth.new_token()
        digest = auth.token_digest(token)
        database.transaction_now(users.add_token, "harness", "", digest, token[:12], time.time())
    finally:
        database.close()
    return token


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def can_run_haproxy() -> str | None:
    """None when Debian's ``haproxy`` is installed; else the reason."""
    return None if shutil.which("haproxy") else "no haproxy (apt-get install haproxy)"


def balancer_mode() -> str:
    """How the senders reach the nodes when HAProxy is installed: with the PROXY protocol
    v2 into ``haproxy:`` listeners when this gateway has them (a tenant's ``proxies``),
    else HAProxy in plain TCP mode; "" (straight to the nodes) without HAProxy."""
    import attrs

    from udsgateway.config import TenantConfig

    if can_run_haproxy() is not None:
        return ""
    names = {attribute.name for attribute in attrs.fields(TenantConfig)}
    return "proxy-v2" if "proxies" in names else "tcp"


def _replace(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# -- scenarios (shared by the short test and bench/cluster.py)


@define
class Load:
    """The senders' shape during a fault scenario."""

    connections: int = 6
    patients: int = 60
    rate: float = 60.0


def _all_held_by_others(cluster: Cluster, fault: Fault) -> Callable[[], bool]:
    def done() -> bool:
        held = cluster.held()
        others = set().union(*(b for n, b in held.items() if n != fault.node)) if held else set()
        return fault.held <= others

    return done


def _started(cluster: Cluster, load: Load, warmup: int = 30) -> None:
    cluster.wait_balanced()
    cluster.start_sender(load.connections, load.patients, load.rate)
    cluster.wait_arrivals(warmup)


def _finish(cluster: Cluster) -> Report:
    cluster.stop_sender()
    cluster.wait_drained()
    return cluster.report()


def scenario_kills(cluster: Cluster, kills: int, load: Load | None = None) -> Report:
    """kill -9 a node under load, ``kills`` times (each node in turn); after each,
    wait until its buckets are held by the others and delivering, then restart it
    and wait for an even share again."""
    _started(cluster, load or Load())
    names = list(cluster.members)
    for number in range(kills):
        victim = names[number % len(names)]
        fault = cluster.kill(victim)
        fault.notes["buckets_taken_after_s"] = round(
            cluster.wait_for(_all_held_by_others(cluster, fault), "takeover", TAKEOVER_WAIT), 2
        )
        time.sleep(1.0)
        cluster.restart_node(victim)
        cluster.wait_balanced(120.0)
    return _finish(cluster)


def scenario_pause(cluster: Cluster, name: str, load: Load | None = None) -> Report:
    """SIGSTOP ``name`` under load until the others hold its buckets (longer than its
    lease), then SIGCONT; run on until it holds a share again."""
    _started(cluster, load or Load())
    fault = cluster.pause(name)
    fault.notes["buckets_taken_after_s"] = round(
        cluster.wait_for(_all_held_by_others(cluster, fault), "takeover", TAKEOVER_WAIT), 2
    )
    time.sleep(1.0)
    cluster.resume(fault)
    cluster.wait_balanced(120.0)
    time.sleep(2.0)
    report = _finish(cluster)
    assert fault.until is not None
    after = [a for a in cluster.arrivals() if a.node == name and a.time > fault.until]
    fault.notes["frames_after_resume"] = len(after)
    first_lease = min(
        (
            lease.acquired_at
            for lease in cluster.lease_history()
            if lease.owner == name and lease.acquired_at > fault.at
        ),
        default=None,
    )
    fault.notes["first_new_lease_after_resume_s"] = (
        round(first_lease - fault.until, 2) if first_lease is not None else None
    )
    fault.notes["frames_before_its_first_new_lease"] = len(
        [a for a in after if first_lease is None or a.time < first_lease]
    )
    return report


def scenario_postgres_restart(cluster: Cluster, down: float, load: Load | None = None) -> Report:
    """Stop PostgreSQL (``-m immediate``, as a crash) under load for ``down`` seconds
    (longer than the lease: every node must stop sending), start it again, and run on
    until every node delivers again."""
    _started(cluster, load or Load())
    fault = cluster.stop_postgres()
    time.sleep(down)
    cluster.start_postgres(fault)
    up = fault.until
    assert up is not None
    fault.notes["frames_while_down_after_lease"] = len(
        [a for a in cluster.arrivals() if fault.at + cluster.lease_time + TRANSIT < a.time < up]
    )
    resumed: dict[str, float] = {}

    def everyone_delivers() -> bool:
        for arrival in cluster.arrivals():
            if arrival.time > up and arrival.node not in resumed:
                resumed[arrival.node] = arrival.time - up
        return all(name in resumed for name in cluster.members)

    cluster.wait_for(everyone_delivers, "every node delivering after the restart", 120.0)
    fault.notes["first_frame_after_restart_s"] = {n: round(t, 2) for n, t in resumed.items()}
    time.sleep(3.0)
    report = _finish(cluster)
    # Nothing can be leased while the database is down: a lease taken after the stop
    # was taken after the restart (pg_ctl may return a little after the first one).
    fault.notes["buckets_re_leased_after_restart"] = len(
        {lease.bucket for lease in cluster.lease_history() if lease.acquired_at > fault.at}
    )
    return report


def scenario_cut(cluster: Cluster, load: Load | None = None) -> Report:
    """Cut the namespaced node's link to PostgreSQL under load (its partner and sender
    links stay up): it must stop sending within its lease time, and the others take
    its buckets. Then restore the link and run on until it holds a share again."""
    assert cluster.namespaced is not None
    name = cluster.namespaced
    _started(cluster, load or Load())
    fault = cluster.cut_database()
    fault.notes["buckets_taken_after_s"] = round(
        cluster.wait_for(_all_held_by_others(cluster, fault), "takeover", TAKEOVER_WAIT), 2
    )
    time.sleep(2.0)
    last = max((a.time for a in cluster.arrivals() if a.node == name), default=fault.at)
    fault.notes["last_frame_after_cut_s"] = round(last - fault.at, 2)
    cluster.restore_database(fault)
    cluster.wait_balanced(120.0)
    time.sleep(2.0)
    return _finish(cluster)
