"""The sender and the receiver of the cluster harness, each run as a process of its own.

Standard library only (asyncio), so that they cost the machine as little as
possible and never share a GIL with the harness or the gateway nodes.

``python -m tests.integration.cluster_peers receive --host H --port 0 --out FILE
[--pids FILE] [--delay S]``
    An MLLP destination that answers AA to every message, after appending one
    line per arrival to ``FILE`` (tab-separated, flushed before the ACK)::

        time  node  peer  patient  sequence  inbound-MSH-10  outbound-MSH-10

    ``time`` is ``time.time()`` when the frame was read (the wall clock, so it
    compares with PostgreSQL's ``clock_timestamp()`` on the same machine);
    ``node`` names the gateway process that sent it: the connection's peer
    socket is looked up in ``/proc/net/tcp`` and its owner among the pids
    listed in the ``--pids`` file (``pid name`` lines, re-read when a pid is
    not found), or, for a peer outside this network namespace, the peer
    address's line in that file (``address name``). ``?`` when unknown.
    Prints ``listening on HOST:PORT`` once it listens.

``python -m tests.integration.cluster_peers send --targets FILE --out FILE
--connections C --patients P --run RUN [--rate R] [--limit N] [--timeout S]``
    Stop-and-wait MLLP senders. Patient ``RUN-p<k>`` belongs to connection
    ``k % C``; each connection sends its patients' messages in rounds, sequence
    1, 2, 3 ... per patient, and a patient's next message only after the
    previous one was acknowledged (AA or CA), so the acknowledged order of a
    patient's messages is its sequence order. A failure (no answer within
    ``--timeout``, a closed connection, AE/AR) closes the connection; the same
    message, with the same MSH-10, is sent again on a new connection to the next
    target of ``--targets`` (one ``host:port`` per line, re-read at every
    connect, so restarted nodes are found). Each answer appends a line to
    ``--out``::

        time  patient  sequence  MSH-10  code  target

    ``--rate`` caps the messages per second of all connections together;
    ``--limit`` stops after that many acknowledged messages. SIGTERM (or
    SIGINT) stops at the next message boundary.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import struct
import sys
import time
from pathlib import Path

START, END = b"\x0b", b"\x1c\r"


# -- receiver


def _hex_address(host: str, port: int) -> str:
    """``host:port`` as /proc/net/tcp writes it (IPv4)."""
    packed = socket.inet_aton(host)
    return f"{struct.unpack('<I', packed)[0]:08X}:{port:04X}"


def _socket_inode(local: tuple[str, int], remote: tuple[str, int]) -> str | None:
    """The inode of the socket ``local`` -> ``remote`` in this network namespace."""
    want_local, want_remote = _hex_address(*local), _hex_address(*remote)
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) > 9 and parts[1] == want_local and parts[2] == want_remote:
            return parts[9]
    return None


class Identities:
    """Which gateway node a connection comes from (see the module's docstring)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.names: dict[str, str] = {}

    def _reload(self) -> None:
        if self.path is None:
            return
        try:
            text = self.path.read_text()
        except OSError:
            return
        self.names = dict(line.split(None, 1) for line in text.splitlines() if " " in line)
        self.names = {key: value.strip() for key, value in self.names.items()}

    def of(self, peer: tuple[str, int], local: tuple[str, int]) -> str:
        self._reload()
        if peer[0] in self.names:
            return self.names[peer[0]]
        inode = _socket_inode(peer, local)
        if inode is None:
            return "?"
        target = f"socket:[{inode}]"
        for pid, name in self.names.items():
            if not pid.isdigit():
                continue
            try:
                descriptors = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for descriptor in descriptors:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{descriptor}") == target:
                        return name
                except OSError:
                    continue
        return "?"


def _fields(message: bytes) -> dict[str, list[str]]:
    segments: dict[str, list[str]] = {}
    for line in message.split(b"\r"):
        text = line.decode("latin-1")
        name = text[:3]
        if name and name not in segments:
            segments[name] = text.split("|")
    return segments


def _field(segments: dict[str, list[str]], name: str, index: int) -> str:
    values = segments.get(name, [])
    return values[index] if len(values) > index else ""


def _ack(control_id: str) -> bytes:
    stamp = time.strftime("%Y%m%d%H%M%S")
    return (
        START
        + (
            f"MSH|^~\\&|RECV|RECVFAC|UDSGATEWAY|HARNESS|{stamp}||ACK|A{control_id}|P|2.5\r"
            f"MSA|AA|{control_id}\r"
        ).encode("latin-1")
        + END
    )


async def receive(host: str, port: int, out: Path, pids: Path | None, delay: float) -> None:
    identities = Identities(pids)
    log = out.open("a", buffering=1, encoding="latin-1")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[:2]
        local = writer.get_extra_info("sockname")[:2]
        node = identities.of(peer, local)
        buffer = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
                while True:
                    start = buffer.find(START)
                    end = buffer.find(END, start + 1) if start >= 0 else -1
                    if end < 0:
                        break
                    message, buffer = buffer[start + 1 : end], buffer[end + len(END) :]
                    if node == "?":
                        node = identities.of(peer, local)
                    segments = _fields(message)
                    control_id = _field(segments, "MSH", 9)
                    patient = _field(segments, "PID", 3).split("^")[0]
                    log.write(
                        f"{time.time():.6f}\t{node}\t{peer[0]}\t{patient}\t"
                        f"{_field(segments, 'ZHS', 2)}\t{_field(segments, 'ZHS', 1)}\t"
                        f"{control_id}\n"
                    )
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(_ack(control_id))
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, host, port, reuse_address=True)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    log.close()


# -- sender


def message(run: str, patient: str, sequence: int, control_id: str) -> bytes:
    """One ADT^A08 of ``patient`` carrying ``sequence`` in PID-18 (synthetic person)."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    return (
        f"MSH|^~\\&|HIS|HARNESS|RECVAPP|RECVFAC|{stamp}||ADT^A08|{control_id}|P|2.5\r"
        f"EVN|A08|{stamp}\r"
        f"PID|1||{patient}^^^HARNESS||Test^Patient||19800101|U||||||||||{sequence}\r"
        "PV1|1|O\r"
    ).encode("ascii")


class Sender:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.targets_path = Path(arguments.targets)
        self.out = Path(arguments.out).open("a", buffering=1)  # noqa: SIM115 - closed in main
        self.connections = arguments.connections
        self.patients = arguments.patients
        self.run = arguments.run
        self.timeout = arguments.timeout
        self.limit = arguments.limit
        self.interval = arguments.connections / arguments.rate if arguments.rate else 0.0
        self.acked = 0
        self.stopping = False

    def targets(self) -> list[tuple[str, int]]:
        found = []
        for line in self.targets_path.read_text().split():
            host, _, port = line.rpartition(":")
            found.append((host, int(port)))
        return found

    async def connect(
        self, index: int, attempt: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        while True:
            targets = self.targets()
            if targets:
                host, port = targets[(index + attempt) % len(targets)]
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port), self.timeout
                    )
                    return reader, writer, f"{host}:{port}"
                except (TimeoutError, OSError):
                    pass
            attempt += 1
            await asyncio.sleep(0.1)

    async def exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frame: bytes
    ) -> str:
        writer.write(frame)
        await writer.drain()
        data = b""
        while END not in data:
            chunk = await reader.read(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        answer = data[data.find(START) + 1 : data.find(END)]
        for line in answer.split(b"\r"):
            if line.startswith(b"MSA|"):
                return line.split(b"|")[1].decode("latin-1")
        return "??"

    async def connection(self, index: int) -> None:
        mine = [f"{self.run}-p{k}" for k in range(index, self.patients, self.connections)]
        if not mine:
            return
        attempt = 0
        reader, writer, target = await self.connect(index, attempt)
        sequence = 0
        next_at = time.monotonic() + random.random() * self.interval
        while not self.stopping:
            sequence += 1
            for patient in mine:
                if self.stopping or (self.limit and self.acked >= self.limit):
                    self.stopping = True
                    break
                control_id = f"{patient}-{sequence}"
                frame = START + message(self.run, patient, sequence, control_id) + END
                while True:
                    if self.interval:
                        delay = next_at - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        next_at = max(next_at + self.interval, time.monotonic() - 1.0)
                    try:
                        code = await asyncio.wait_for(
                            self.exchange(reader, writer, frame), self.timeout
                        )
                    except (TimeoutError, OSError, ConnectionError):
                        code = "--"
                    self.out.write(
                        f"{time.time():.6f}\t{patient}\t{sequence}\t{control_id}\t{code}\t"
                        f"{target}\n"
                    )
                    if code in ("AA", "CA"):
                        self.acked += 1
                        break
                    writer.close()
                    attempt += 1
                    if code != "--":
                        await asyncio.sleep(0.2)
                    reader, writer, target = await self.connect(index, attempt)
        writer.close()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        print("sending", flush=True)
        await asyncio.gather(*(self.connection(index) for index in range(self.connections)))
        self.out.close()
        print(f"done {self.acked}", flush=True)

    def stop(self) -> None:
        self.stopping = True


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cluster_peers")
    commands = parser.add_subparsers(dest="command", required=True)
    receiver = commands.add_parser("receive")
    receiver.add_argument("--host", default="127.0.0.1")
    receiver.add_argument("--port", type=int, default=0)
    receiver.add_argument("--out", required=True)
    receiver.add_argument("--pids")
    receiver.add_argument("--delay", type=float, default=0.0)
    sender = commands.add_parser("send")
    sender.add_argument("--targets", required=True)
    sender.add_argument("--out", required=True)
    sender.add_argument("--connections", type=int, default=4)
    sender.add_argument("--patients", type=int, default=40)
    sender.add_argument("--run", required=True)
    sender.add_argument("--rate", type=float, default=0.0)
    sender.add_argument("--limit", type=int, default=0)
    sender.add_argument("--timeout", type=float, default=5.0)
    arguments = parser.parse_args(argv)
    if arguments.command == "receive":
        pids = Path(arguments.pids) if arguments.pids else None
        asyncio.run(
            receive(arguments.host, arguments.port, Path(arguments.out), pids, arguments.delay)
        )
    else:
        asyncio.run(Sender(arguments).main())


if __name__ == "__main__":
    main(sys.argv[1:])
