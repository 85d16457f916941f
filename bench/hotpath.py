"""Micro-benchmark of the per-message functions that the install compiles.

Times, per message, what the gateway does with every frame (MLLP framing, the MSH read, the
ACK) and with every message a flow maps (the full parse and a few path lookups), on the
benchmark's five message types. Run it with each build's interpreter and compare the two
in the same sitting (the machine's load moves absolute numbers; the ratio is the result):

    .venv/bin/python -m bench.hotpath          # compiled (make install)
    .venv-pure/bin/python -m bench.hotpath     # pure (UDSGATEWAY_PURE=1)

Prints one JSON object: the build, and microseconds per message for each step (the best
of ``--repeat`` runs of ``--messages`` messages, in CPU time).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from bench.messages import MESSAGE_TYPES, MessageFactory


def main() -> None:
    from udsgateway.compiled import variant
    from udsgateway.hl7.ack import build_ack
    from udsgateway.hl7.header import Header, parse_header
    from udsgateway.hl7.message import parse_message
    from udsgateway.wire.framing import MLLPFramer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    factory = MessageFactory(seed=1)
    payloads = [
        factory.make(MESSAGE_TYPES[i % len(MESSAGE_TYPES)]).payload for i in range(args.messages)
    ]
    stream = b"".join(b"\x0b" + p + b"\x1c\r" for p in payloads)
    headers = [parse_header(p) for p in payloads]
    assert all(isinstance(h, Header) for h in headers)
    texts = [p.decode("ascii") for p in payloads]
    paths = ["PID-3.1", "PID-3.4", "PID-5.1", "PID-5.2", "PID-7", "PID-8", "MSH-10"]

    def framing() -> None:
        framer = MLLPFramer()
        for offset in range(0, len(stream), 4096):  # reads of 4 KiB, as a socket gives
            framer.feed(stream[offset : offset + 4096])

    def header() -> None:
        for payload in payloads:
            parse_header(payload)

    def ack() -> None:
        for h in headers:
            assert isinstance(h, Header)
            build_ack(h, "AA", control_id="ACK1", timestamp="20240101120000")

    def message() -> None:
        for text in texts:
            parsed = parse_message(text)
            for path in paths:
                parsed.get(path)

    steps: dict[str, Callable[[], None]] = {
        "framing": framing,
        "parse_header": header,
        "build_ack": ack,
        "parse_message+7 lookups": message,
    }
    result: dict[str, object] = {"build": variant(), "messages": args.messages}
    for name, step in steps.items():
        best = min(_timed(step) for _ in range(args.repeat))
        result[f"{name} us/msg"] = round(best / args.messages * 1e6, 2)
    print(json.dumps(result))


def _timed(step: Callable[[], None]) -> float:
    # CPU time of this process, not wall time: on a shared machine other work would
    # otherwise show up in the numbers.
    started = time.process_time()
    step()
    return time.process_time() - started


if __name__ == "__main__":
    main()
