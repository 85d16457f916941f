"""Real processes, real sockets and the real SQLite file, for the integration tests.

Everything here blocks, and every wait has a deadline: a gateway that does
not come up, a peer that does not answer or a process that does not exit
fails the test instead of hanging it. Polling loops pause by waiting on the
process itself (``Popen.wait`` with a short timeout), so they also notice at
once a gateway that died.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing, suppress
from pathlib import Path
from typing import IO, Any

from attrs import define, field
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.tap import CRASH_AT_VARIABLE
from udsgateway.testing import MLLP_END, MLLP_START, mllp, read_ack

REPO = Path(__file__).resolve().parents[2]
DEMO_FLOWS = REPO / "etc" / "flows" / "demo.toml"
#: The tenant that DEMO_FLOWS belongs to.
DEMO_TENANT = "demo"

#: The console scripts of the environment running the tests.
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
UDSGATEWAY = BIN / "udsgateway"

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
IO_TIMEOUT = 10.0
EXIT_TIMEOUT = 20.0
COMMAND_TIMEOUT = 120.0
_POLL = 0.05


#: The spec's sample message (etc/flows/demo.toml), segments separated by CR.
SAMPLE_SEGMENTS = (
    "MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|202401011230||ADT^A04|{control_id}|P|2.3",
    "EVN|A04|202401011230",
    "PID|1||12345^^^Hospital||Doe^John||19800101|M|||123 Main St^^City^State^12345||9876543210",
    "NK1|1|Doe^Jane|SPOUSE||9876543211",
)


def sample_message(control_id: str = "MSG00001") -> bytes:
    """The spec's ADT^A04 sample with this MSH-10."""
    return "\r".join(SAMPLE_SEGMENTS).format(control_id=control_id).encode("ascii")


def _toml_string(value: str) -> str:
    # A JSON string of printable text is a valid TOML basic string.
    return json.dumps(value)


def write_config(
    directory: Path,
    tenants: Mapping[str, int],
    flow_files: Mapping[str, Sequence[Path]] | None = None,
) -> Path:
    """Write ``gateway.toml`` in ``directory``: a SQLite store there, one listener per tenant.

    ``tenants`` maps each tenant's name to its port on 127.0.0.1: 0 lets the
    system choose a free one, which ``GatewayProcess.wait_ready`` reads back
    from the gateway's log; ``flow_files`` names the flow files imported at
    start, per tenant.
    """
    flow_files = flow_files or {}
    lines = [
        "[gateway]",
        f"database = {_toml_string('sqlite:///' + str(database_path(directory)))}",
        'node_name = "integration"',
    ]
    for name, port in tenants.items():
        files = ", ".join(_toml_string(str(path)) for path in flow_files.get(name, ()))
        lines += [
            "",
            "[[tenants]]",
            f"name = {_toml_string(name)}",
            f'listen = "tcp:port={port}:interface={HOST}"',
            f"flow_files = [{files}]",
        ]
    config = directory / "gateway.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def database_path(directory: Path) -> Path:
    """The SQLite file of the configuration written by ``write_config`` in ``directory``."""
    return directory / "gateway.db"


def new_directory(testcase: SynchronousTestCase) -> Path:
    """A fresh, empty, absolute temporary directory for one test."""
    directory = Path(testcase.mktemp()).resolve()
    directory.mkdir(parents=True)
    return directory


def assert_port_free(port: int) -> None:
    """Fail unless nothing listens on ``port`` (a stray process would answer for us)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        # The same option Twisted sets, so TIME_WAIT leftovers do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as error:
            raise AssertionError(f"port {port} is already in use: {error}") from None


def refusing_port() -> socket.socket:
    """A socket bound to a free port of 127.0.0.1 and not listening: connections to
    ``getsockname()[1]`` are refused until a listener takes the port over.

    Made with SO_REUSEADDR, as Twisted's listeners are, so a process can listen on
    the port while this socket still holds it (no other process can take it in
    between); close it then. A destination that is down, on a port of its own.
    """
    placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    placeholder.bind((HOST, 0))
    return placeholder


def accepts_connections(port: int) -> bool:
    """True when something accepts a TCP connection on 127.0.0.1:``port`` right now."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


@define
class LoggedProcess:
    """A child process whose stdout and stderr go to a log file (appended to)."""

    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def spawn(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` if the process still runs (SIGKILL if it outlives
        EXIT_TIMEOUT), reap it, close the log: always safe to call."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=EXIT_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def started(self) -> subprocess.Popen[bytes]:
        assert self.process is not None, "not started"
        return self.process

    def pause(self) -> None:
        """Wait a poll interval on the process: it ends early if the process exits."""
        with suppress(subprocess.TimeoutExpired):
            self.started().wait(timeout=_POLL)


#: The line the gateway logs for each listener it opened, with the address it bound.
_LISTENING = re.compile(r"tenant (\S+) listening on .*?port=(\d+)")


def tenant_names(config: Path) -> list[str]:
    """The tenants of a configuration file, in order."""
    document = tomllib.loads(config.read_text(encoding="utf-8"))
    return [str(tenant["name"]) for tenant in document.get("tenants", [])]


@define
class GatewayProcess:
    """One ``twistd -n --pidfile= udsgateway --config FILE`` process and its log file.

    ``port`` is the first tenant's listening port: 0 until ``wait_ready`` reads
    the bound ports back from the log (a configuration listening on port 0), or
    a fixed port given by the test; ``ports`` has every tenant's.
    """

    config: Path
    port: int
    log_path: Path
    crash_at: str = ""
    #: More ``udsgateway`` options, after ``--config FILE``.
    options: tuple[str, ...] = ()
    ports: dict[str, int] = field(factory=dict)
    _child: LoggedProcess = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._child = LoggedProcess(self.log_path)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._child.process

    def start(self) -> None:
        """Start the process; stdout and stderr go to the log file."""
        assert self.process is None, "already started"
        env = dict(os.environ)
        env.pop(CRASH_AT_VARIABLE, None)
        if self.crash_at:
            env[CRASH_AT_VARIABLE] = self.crash_at
        argv = [str(TWISTD), "-n", "--pidfile=", "udsgateway", "--config", str(self.config)]
        argv += self.options
        self._child.spawn(argv, self.config.parent, env)

    @property
    def running(self) -> bool:
        return self._child.running

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until every listener is open (its port read back from the log, or
        the fixed port accepting connections); fail if the process dies first."""
        process = self._child.started()
        deadline = time.monotonic() + timeout
        tenants = tenant_names(self.config)
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"gateway exited with status {process.returncode} before listening; "
                    f"log:\n{self.log_text()}"
                )
            if self._listening(tenants):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"gateway not listening after {timeout} s; log:\n{self.log_text()}"
                )
            self._child.pause()

    def _listening(self, tenants: Sequence[str]) -> bool:
        if self.port:
            return accepts_connections(self.port)
        bound = {name: int(port) for name, port in _LISTENING.findall(self.log_text())}
        if not tenants or not all(name in bound for name in tenants):
            return False
        self.ports = {name: bound[name] for name in tenants}
        self.port = self.ports[tenants[0]]
        return True

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit status (negative: killed by that signal); fail after ``timeout`` s."""
        process = self._child.started()
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"gateway still running {timeout} s later; log:\n{self.log_text()}"
            ) from None

    def send_signal(self, signum: int) -> None:
        self._child.started().send_signal(signum)

    def stop(self) -> None:
        """Kill the process if it still runs, reap it, close the log: always safe to call."""
        self._child.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self._child.log_text()


def start_gateway(
    testcase: SynchronousTestCase,
    config: Path,
    port: int = 0,
    crash_at: str = "",
    wait: bool = True,
    options: tuple[str, ...] = (),
) -> GatewayProcess:
    """Start a gateway for ``testcase``, killed in its cleanup whatever happens.

    ``port`` 0 (the configuration listens on port 0): ``wait_ready`` reads the
    bound ports back into the returned process's ``port`` and ``ports``.
    """
    if port:
        assert_port_free(port)
    count = len(list(config.parent.glob("twistd-*.log")))
    gateway = GatewayProcess(
        config,
        port,
        config.parent / f"twistd-{count + 1}.log",
        crash_at=crash_at,
        options=options,
    )
    testcase.addCleanup(gateway.stop)
    gateway.start()
    if wait:
        gateway.wait_ready()
    return gateway


# -- senders


def _receive_until(
    connection: socket.socket, complete: Callable[[bytes], int], deadline: float
) -> tuple[bytes, bool]:
    """Read until ``complete(data)`` returns a length > 0 or the peer closes.

    Returns the bytes read and whether the peer closed (or reset) the
    connection; an AssertionError at the deadline.
    """
    data = b""
    while not complete(data):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no complete answer within the deadline; got {data!r}")
        connection.settimeout(remaining)
        try:
            chunk = connection.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no complete answer within the deadline; got {data!r}") from None
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _mllp_frame_end(data: bytes) -> int:
    start = data.find(MLLP_START)
    end = data.find(MLLP_END, start + 1) if start >= 0 else -1
    return end + len(MLLP_END) if end >= 0 else 0


_MSA_SEGMENT = re.compile(rb"(?:^|[\r\n])MSA[^\r\n]*\r")


def _plain_ack_end(data: bytes) -> int:
    match = _MSA_SEGMENT.search(data)
    return match.end() if match else 0


def send_mllp(port: int, payload: bytes, timeout: float = IO_TIMEOUT) -> bytes | None:
    """Send one MLLP frame on a new connection; return the answer's payload (unframed).

    None means the gateway closed the connection without a complete answer.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as connection:
        connection.sendall(mllp(payload))
        data, closed = _receive_until(connection, _mllp_frame_end, deadline)
    if closed and not _mllp_frame_end(data):
        return None
    start = data.index(MLLP_START)
    return data[start + 1 : data.index(MLLP_END, start + 1)]


def send_plain(
    port: int, payload: bytes, timeout: float = IO_TIMEOUT, half_close: bool = False
) -> bytes | None:
    """Send one message over plain TCP (no framing) on a new connection; return the answer.

    The message ends at the gateway's idle gap, or at end of stream with
    ``half_close`` (the sender shuts down its side for writing); the ACK comes
    back unframed and is read up to the end of its MSA segment. None means the
    gateway closed the connection without a complete answer.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as connection:
        connection.sendall(payload)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        data, closed = _receive_until(connection, _plain_ack_end, deadline)
    if closed and not _plain_ack_end(data):
        return None
    return data


def closed_by_peer(connection: socket.socket, timeout: float = IO_TIMEOUT) -> bool:
    """True when the peer closes (or resets) the connection within ``timeout`` s.

    False when it sends bytes instead; an AssertionError when it does neither.
    """
    connection.settimeout(timeout)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        raise AssertionError(f"connection still open after {timeout} s") from None


def segment(message: bytes, name: str) -> list[str]:
    """The fields of the first ``name`` segment of a message (index 0 is the name)."""
    for line in re.split(r"\r\n|\r|\n", message.decode("latin-1")):
        if line.startswith(name + "|"):
            return line.split("|")
    raise AssertionError(f"no {name} segment in {message!r}")


def msa(ack: bytes) -> tuple[str, str]:
    """MSA-1 (the ACK code) and MSA-2 (the acknowledged MSH-10) of an ACK."""
    reply = read_ack(ack)
    return reply.code, reply.control_id


# -- the store


def query(database: Path, sql: str, *parameters: Any) -> list[dict[str, Any]]:
    """Rows of a read-only query on the SQLite file, as dicts."""
    if not database.exists():
        raise AssertionError(f"no database at {database}")
    uri = database.as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=IO_TIMEOUT)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql, parameters)]


def count(database: Path, sql: str, *parameters: Any) -> int:
    """The single integer a ``SELECT count(*) ...`` query returns."""
    (row,) = query(database, sql, *parameters)
    (value,) = row.values()
    return int(value)


# -- commands


def run_command(
    arguments: Sequence[str | Path],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its text output."""
    return subprocess.run(
        [str(argument) for argument in arguments],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def udsgateway(config: Path, *arguments: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the ``udsgateway`` command line with this configuration file."""
    return run_command([UDSGATEWAY, "--config", config, *arguments], cwd=config.parent)
