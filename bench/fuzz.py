"""A deterministic corpus of hostile inputs for an HL7 listener, from a seed.

Each case is the whole byte stream one connection sends: most are one MLLP
frame around a damaged message (truncations, control bytes, garbled MSH-2,
huge fields, bad charsets, bad escapes, random bytes), some are not MLLP at
all (an HTTP request, a TLS ClientHello, random bytes, unframed HL7). The
people in it are synthetic. Used by the listener's tests (in memory and
against a real process) and by the bench's attack scenario.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

START = b"\x0b"
END = b"\x1c\r"


@dataclass(frozen=True)
class FuzzCase:
    """One hostile input: ``name`` says what it is (never sent), ``data`` is the stream."""

    name: str
    data: bytes


def _message(control_id: str, *, msh2: bytes = b"^~\\&", charset: bytes = b"") -> bytes:
    msh = (
        b"MSH|"
        + msh2
        + b"|FUZZ|Lab|GW|Site|20240101120000||ADT^A04|"
        + control_id.encode()
        + b"|P|2.5"
    )
    if charset:
        msh += b"||||||" + charset
    return (
        msh
        + b"\rEVN|A04|20240101120000\rPID|1||FZ0001^^^H^MR||Testperson^Alex||19700101|U\r"
        + b"PV1|1|O\r"
    )


def mllp(payload: bytes) -> bytes:
    return START + payload + END


def fuzz_corpus(seed: int = 17, count: int = 400, huge: int = 200_000) -> list[FuzzCase]:
    """``count`` hostile cases, the same for the same seed; ``huge`` bounds the largest field."""
    rng = random.Random(seed)
    cases: list[FuzzCase] = []
    fixed = [
        ("empty frame", mllp(b"")),
        ("only MSH", mllp(b"MSH")),
        ("MSH and a bar", mllp(b"MSH|")),
        ("MSH-2 short", mllp(_message("F0002", msh2=b"^~"))),
        ("MSH-2 repeated characters", mllp(_message("F0003", msh2=b"^^^^"))),
        ("MSH-2 uses the field separator", mllp(_message("F0004", msh2=b"|~\\&"))),
        ("MSH-2 control bytes", mllp(_message("F0005", msh2=b"\x00\x01\x02\x03"))),
        ("MSH-10 empty", mllp(_message(""))),
        ("MSH-10 huge", mllp(_message("C" * 5000))),
        ("MSH-18 unknown", mllp(_message("F0008", charset=b"KLINGON"))),
        (
            "MSH-18 UTF-8, bytes invalid",
            mllp(_message("F0009", charset=b"UNICODE UTF-8") + b"\xff\xfe\xc3"),
        ),
        ("MSH-18 ASCII, high bytes", mllp(_message("F0010", charset=b"ASCII") + b"NTE|1||\xe9\r")),
        ("MSH-18 many repetitions", mllp(_message("F0011", charset=b"~".join([b"8859/1"] * 500)))),
        ("bad escape", mllp(_message("F0012") + b"NTE|1||\\X4G\\ \\Zzz \\E\r")),
        ("unterminated escape", mllp(_message("F0013") + b"NTE|1||\\X41")),
        ("huge field", mllp(_message("F0014") + b"NTE|1||" + b"A" * huge + b"\r")),
        ("many segments", mllp(_message("F0015") + b"NTE|1\r" * 5000)),
        ("many fields", mllp(_message("F0016") + b"NTE" + b"|" * 20000 + b"\r")),
        ("many components", mllp(_message("F0017") + b"NTE|1||" + b"^" * 20000 + b"\r")),
        ("FS without CR", mllp(_message("F0018") + b"\x1cNTE|1\r")),
        ("start byte inside", START + b"MSH|^~\\&|half" + mllp(_message("F0019"))),
        ("commit ACK block", b"\x0b\x06\x1c\r" + mllp(_message("F0020"))),
        ("NULs before a frame", b"\x00" * 64 + mllp(_message("F0021"))),
        ("LF separators", mllp(_message("F0022").replace(b"\r", b"\n"))),
        ("an ACK as message", mllp(b"MSH|^~\\&|A|B|C|D|20240101||ACK|F0023|P|2.5\rMSA|AA|X\r")),
        ("message type junk", mllp(_message("F0024").replace(b"ADT^A04", b"\xff^\x00"))),
        ("MSH-12 version junk", mllp(_message("F0025").replace(b"|P|2.5", b"|P|\xff\xff"))),
        ("MSH-11 junk", mllp(_message("F0026").replace(b"|P|2.5", b"|Q\x7f|2.5"))),
        ("enhanced mode junk", mllp(_message("F0027").replace(b"|P|2.5", b"|P|2.5||||ZZ|\xff"))),
        ("HTTP request", b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n"),
        ("HTTP POST", b"POST /hl7 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"),
        ("TLS ClientHello", b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(range(32))),
        ("SSH banner", b"SSH-2.0-OpenSSH_9.6\r\n"),
        ("unframed HL7", _message("F0033")),
        ("plain TCP then garbage", _message("F0034") + bytes(range(256))),
        ("no start byte", b"x" * 5000),
        (
            "a burst of frames answered at once",
            b"".join(mllp(_message(f"B{i}").replace(b"|P|2.5", b"|P|9.9")) for i in range(1500)),
        ),
    ]
    cases.extend(FuzzCase(name, data) for name, data in fixed)
    valid = _message("FZVALID")
    kinds = ["truncate", "control", "random frame", "random stream", "flip", "splice", "insert"]
    while len(cases) < count:
        n = len(cases)
        kind = rng.choice(kinds)
        base = _message(f"R{n:05}")
        if kind == "truncate":
            data = mllp(base[: rng.randrange(len(base))])
        elif kind == "control":
            body = bytearray(base)
            for _ in range(rng.randint(1, 5)):
                body.insert(rng.randrange(len(body)), rng.choice(b"\x00\x01\x07\x08\x0e\x1a\x7f"))
            data = mllp(bytes(body))
        elif kind == "random frame":
            data = mllp(rng.randbytes(rng.randint(1, 2000)).replace(b"\x1c\r", b"\x1c"))
        elif kind == "random stream":
            data = rng.randbytes(rng.randint(1, 4000))
        elif kind == "flip":
            body = bytearray(base)
            for _ in range(rng.randint(1, 8)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            data = mllp(bytes(body))
        elif kind == "splice":
            cut = rng.randrange(len(valid))
            data = mllp(valid[:cut] + rng.randbytes(rng.randint(1, 300)) + valid[cut:])
        else:
            at = rng.randrange(len(base))
            data = mllp(
                base[:at] + rng.choice([b"|", b"^", b"~", b"\\", b"&", b"\r"]) * 50 + base[at:]
            )
        cases.append(FuzzCase(f"{kind} #{n}", data))
    return cases
