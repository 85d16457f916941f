"""Canned-ACK MLLP server: the loopback-plus-framing limit of this machine.

It does no HL7 work beyond finding MSH-10 in each frame and copying it into a canned AA. Frames are
split correctly (several frames in one read, a frame across reads), ACKs go back in order. Nothing
is parsed, validated or stored, so whatever rate it reaches is the ceiling for any server measured
with the same load generator on the same machine.

Standalone (standard library only), so tests can start it as ``python path/to/canned_ack.py``:

    python bench/refservers/canned_ack.py --port 27101 [--host 127.0.0.1]

``--close-after-ack`` makes it a receiver of the legacy kind that closes the connection after
every ACK; ``--count N`` makes it exit after N ACKs (a relay scenario waits for that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

VT = b"\x0b"
FS_CR = b"\x1c\x0d"
ACK_HEAD = b"\x0bMSH|^~\\&|CANNED|BENCH|||20250101000000||ACK|"
ACK_MID = b"|P|2.5.1\rMSA|AA|"
ACK_TAIL = b"\r\x1c\x0d"
MAX_FRAME = 10 * 1024 * 1024


def control_id(message: bytes) -> bytes:
    """MSH-10 of an unframed message (empty when there is none)."""
    end = len(message)
    for sep in (b"\r", b"\n"):
        pos = message.find(sep)
        if 0 <= pos < end:
            end = pos
    msh = message[:end]
    if not msh.startswith(b"MSH") or len(msh) < 4:
        return b""
    fields = msh.split(msh[3:4])
    return fields[9] if len(fields) > 9 else b""


class CannedAck(asyncio.Protocol):
    def __init__(self, close_after_ack: bool = False, acked: Counter | None = None) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.close_after_ack = close_after_ack
        self.acked = acked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        out: list[bytes] = []
        while True:
            start = buf.find(VT)
            if start < 0:
                buf.clear()
                break
            end = buf.find(FS_CR, start + 1)
            if end < 0:
                if start:
                    del buf[:start]
                if len(buf) > MAX_FRAME:
                    buf.clear()
                    assert self.transport is not None
                    self.transport.close()
                break
            cid = control_id(bytes(buf[start + 1 : end]))
            del buf[: end + 2]
            out.append(ACK_HEAD + cid + ACK_MID + cid + ACK_TAIL)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
            if self.close_after_ack:
                self.transport.close()  # after the ACK is written
            if self.acked is not None:
                self.acked.add(len(out))


class Counter:
    """ACKs sent over all connections; sets ``done`` once ``limit`` is reached."""

    def __init__(self, limit: int | None, done: asyncio.Future[None]) -> None:
        self.count = 0
        self.limit = limit
        self.done = done

    def add(self, count: int) -> None:
        self.count += count
        if self.limit is not None and self.count >= self.limit and not self.done.done():
            self.done.set_result(None)


async def serve(
    host: str, port: int, close_after_ack: bool = False, count: int | None = None
) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    acked = Counter(count, stop)
    server = await loop.create_server(
        lambda: CannedAck(close_after_ack, acked), host, port, reuse_address=True
    )

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    print(f"canned_ack listening on {host}:{port}", flush=True)
    async with server:
        await stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="canned-ACK MLLP reference server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--close-after-ack", action="store_true")
    parser.add_argument("--count", type=int, default=None)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.close_after_ack, args.count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
