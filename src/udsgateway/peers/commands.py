"""Peers for operators and tests: ``udsgateway send`` and ``udsgateway receive``.

``send`` plays an upstream system: it reads messages from files and sends them
one at a time (stop-and-wait) over MLLP or plain TCP, optionally over TLS,
and prints one line per message with the ACK it got. ``receive`` plays a
destination: a small server that ACKs every message, with deterministic
faults (NAKs, delays, drops, wrong MSA-2, garbage, silence) for testing the
gateway's outbound side.

Framing and ACKs come from `udsgateway.wire.framing` and `udsgateway.hl7.ack`; this
module only moves bytes and decides what to answer. Neither tool prints a
message body (PHI) unless ``receive --show-body`` asks for it.

The reusable parts take a reactor or clock, so tests drive them in memory:
`split_messages`, `send_messages` (with `SendResult`), `ReceiverFactory`
(with `ReceiverOptions` and `ReceivedMessage`), and `run_send` /
`run_receive`, the bodies of the two commands.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO

from attrs import define, evolve, field, frozen
from OpenSSL.crypto import Error as CryptoError
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import (
    clientFromString,
    quoteStringArgument,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.error import CannotListenError, ConnectingCancelledError, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.internet.task import react
from twisted.python.failure import Failure

from udsgateway.clock import Wall, monotonic_timers, wall_of
from udsgateway.hl7.ack import (
    AckError,
    ControlIdSource,
    Outcome,
    Reply,
    ack_code,
    application_ack_requested,
    build_ack,
    hl7_timestamp,
    is_enhanced,
    parse_reply,
    wants_accept_ack,
)
from udsgateway.hl7.header import Header, HeaderProblem, parse_header, segments
from udsgateway.wire.framed import ConnectionLimits, FramedServerProtocol
from udsgateway.wire.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    Frame,
    FrameEvent,
    IFramer,
    MLLPFramer,
    OversizedFrame,
    PlainTCPFramer,
)

__all__ = [
    "GARBAGE",
    "NAK_CODES",
    "ConnectError",
    "ReceivedMessage",
    "ReceiverFactory",
    "ReceiverOptions",
    "ReceiverProtocol",
    "SendResult",
    "add_peer_commands",
    "client_endpoint",
    "client_tls_options",
    "exit_status",
    "output_record",
    "parse_address",
    "read_message_files",
    "run_receive",
    "run_send",
    "send_messages",
    "split_messages",
    "with_control_id",
]

Framing = Literal["mllp", "tcp"]

NAK_CODES = ("AE", "AR", "CE", "CR")
"""The codes ``receive --nak`` can answer with."""

GARBAGE = b"THIS IS NOT AN HL7 ACK\r"
"""What ``receive --garbage-every`` answers (framed as the connection is)."""

REPLY_GAP = 0.2
"""Plain TCP: seconds of silence that end a reply (send) or a message (receive)."""

MAX_REPLY_SIZE = 1024 * 1024
"""The largest reply ``send`` reads; a larger one ends the run."""

CLOSE_GRACE = 5.0
"""Seconds to wait for a connection to close cleanly before aborting it."""

_SUCCESS = frozenset({"AA", "CA"})
_UTF8_BOM = b"\xef\xbb\xbf"
_DETECT_LIMIT = 4096
_MAX_PENDING = 32


# -- splitting message files


def split_messages(data: bytes) -> list[bytes]:
    """Split the content of a message file into messages, ready to send.

    Segments may be separated by CR, LF or CR LF; a message starts at every
    line that begins with ``MSH``. Blank lines (and lines of only spaces or
    tabs) are ignored, a UTF-8 byte order mark at the very start is dropped,
    and each segment is sent as it is, ended by CR. Raises ValueError when
    anything but blank lines comes before the first ``MSH``.
    """
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    messages: list[list[bytes]] = []
    for number, line in enumerate(data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")):
        if not line.strip(b" \t"):
            continue
        if line.startswith(b"MSH"):
            messages.append([])
        elif not messages:
            raise ValueError(f"line {number + 1} comes before the first MSH segment")
        messages[-1].append(line)
    return [b"".join(line + b"\r" for line in lines) for lines in messages]


def read_message_files(paths: Sequence[str]) -> list[bytes]:
    """Read and split every file, in order; ValueError names the file that failed.

    Files are read before the reactor runs, so the reads block nothing.
    """
    messages: list[bytes] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
        try:
            found = split_messages(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if not found:
            raise ValueError(f"{path}: no message (no line starts with MSH)")
        messages.extend(found)
    return messages


def with_control_id(message: bytes, control_id: str) -> bytes:
    """``message`` with MSH-10 replaced by ``control_id`` (added when MSH is shorter).

    Only the MSH segment changes; the field separator is the message's own
    (MSH-1). Raises ValueError when the message does not start with MSH and a
    separator.
    """
    if len(message) < 4 or not message.startswith(b"MSH"):
        raise ValueError("message does not start with MSH")
    separator = message[3:4]
    end = message.find(b"\r")
    end = len(message) if end < 0 else end
    fields = message[:end].split(separator)
    # fields[0] is "MSH" and fields[1] MSH-2: MSH-n is fields[n - 1].
    fields += [b""] * (10 - len(fields))
    fields[9] = control_id.encode("ascii")
    return separator.join(fields) + message[end:]


# -- small formatting helpers


def _token(value: str | None) -> str:
    """A value as one whitespace-free word for a result line; "-" when empty."""
    if not value:
        return "-"
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in value)


def _quoted(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _iso_time(seconds: float) -> str:
    millis = int(seconds * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _control_id(message: bytes) -> str:
    """MSH-10 of a message we are about to send, or "" when it can not be read."""
    parsed = parse_header(message, default_charset="latin-1")
    header = parsed.header if isinstance(parsed, HeaderProblem) else parsed
    return header.control_id if header is not None else ""


# -- send


@frozen
class SendResult:
    """What became of one sent message.

    ``number`` counts from 1 in sending order; ``control_id`` is the MSH-10
    sent; ``ack_code``, ``ack_control_id``, ``text`` and ``error_code`` are
    MSA-1, MSA-2, MSA-3 and ERR-3 of the reply (None or "" when absent).
    ``problem`` is "" when the reply is a well-formed ACK of this message,
    else why it is not (no reply, garbage, MSA-2 mismatch). ``replied`` is
    False when no reply came at all, which ends the run. ``application``
    is MSA-1 of the application ACK that followed an accept ACK (enhanced
    mode, MSH-16 = AL), or None when none was waited for.
    """

    number: int
    control_id: str
    ack_code: str | None
    ack_control_id: str | None
    error_code: int | None
    text: str
    problem: str
    replied: bool = True
    application: str | None = None

    @property
    def ok(self) -> bool:
        """AA or CA (and then AA when an application ACK was waited for), with
        MSA-2 equal to the MSH-10 sent."""
        if self.application is not None and self.application != "AA":
            return False
        return self.ack_code in _SUCCESS and not self.problem

    def line(self) -> str:
        """``<n> <MSH-10 sent> <ACK code> <MSA-2>`` and, when present, ERR-3, MSA-3, problem."""
        words = [
            str(self.number),
            _token(self.control_id),
            _token(self.ack_code),
            _token(self.ack_control_id),
        ]
        if self.application is not None:
            words.append(f"app={_token(self.application)}")
        if self.error_code is not None:
            words.append(f"err={self.error_code}")
        if self.text:
            words.append(f"text={_quoted(self.text)}")
        if self.problem:
            words.append(f"problem={_quoted(self.problem)}")
        return " ".join(words)

    @classmethod
    def from_reply(cls, number: int, control_id: str, reply: Reply) -> SendResult:
        """Judge a reply against the MSH-10 that was sent."""
        problem = reply.problem
        if not problem and reply.control_id != control_id:
            problem = "MSA-2 does not match MSH-10"
        return cls(
            number,
            control_id,
            reply.ack_code,
            reply.control_id,
            reply.error_code,
            reply.text,
            problem,
        )


class ConnectError(Exception):
    """The connection to the receiver could not be made; nothing was sent."""


class _NoReplyError(Exception):
    """A message got no reply: timeout, closed connection or an unusable stream."""


class _SenderProtocol(Protocol):
    """The sending side of one connection: one message out, one reply back."""

    def __init__(self, framer: IFramer, clock: IReactorTime, reply_gap: float) -> None:
        self._framer = framer
        self._plain = isinstance(framer, PlainTCPFramer)
        self._clock = clock
        self._reply_gap = reply_gap
        self._waiting: Deferred[bytes] | None = None
        self._gap: IDelayedCall | None = None
        self._dropped_mark = 0
        self._closed = False
        self._close_waiters: list[Deferred[None]] = []
        self.unusable = ""
        #: Replies that came while none was waited for, kept while allowed.
        self._early: deque[bytes] = deque()
        #: True while an application ACK may come unasked (enhanced mode): such
        #: a reply is kept for ``next_reply`` instead of ending the connection.
        self.late_replies_allowed = False

    def exchange(self, payload: bytes, timeout: float) -> Deferred[bytes]:
        """Send one message; fire with the next reply's bytes or fail with _NoReplyError.

        The next reply is one that came early (see ``late_replies_allowed``),
        if any, else the first one to come within ``timeout`` seconds.
        """
        if self._closed or self.unusable or self.transport is None:
            return fail(_NoReplyError(self.unusable or "connection closed before sending"))
        self.transport.write(self._framer.encode(payload))
        return self.next_reply(timeout)

    def next_reply(self, timeout: float) -> Deferred[bytes]:
        """Fire with the next reply (an early one first), within ``timeout`` seconds."""
        if self._early:
            return succeed(self._early.popleft())
        waiting: Deferred[bytes] = Deferred()
        if self._closed or self.unusable or self.transport is None:
            waiting.errback(_NoReplyError(self.unusable or "connection closed before the reply"))
            return waiting
        self._waiting = waiting
        self._dropped_mark = self._framer.stats.dropped_bytes

        def timed_out(result: Any, seconds: float) -> Any:
            if isinstance(result, Failure) and result.check(CancelledError):
                self._waiting = None
                self.abort(f"connection dropped after a reply timeout of {seconds:g}s")
                raise _NoReplyError(f"no reply within {seconds:g}s")
            return result

        waiting.addTimeout(timeout, self._clock, timed_out)
        return waiting

    def dataReceived(self, data: bytes) -> None:
        self._deliver(self._framer.feed(data))
        if self._plain and not self._closed:
            if self._gap is not None and self._gap.active():
                self._gap.cancel()
            self._gap = self._clock.callLater(self._reply_gap, self._end_of_reply)

    def _end_of_reply(self) -> None:
        """Plain TCP: the idle gap ends the reply, or shows that non-HL7 bytes came."""
        self._gap = None
        events = self._framer.flush()
        if events:
            self._deliver(events)
        elif self._framer.stats.dropped_bytes > self._dropped_mark and self._waiting is not None:
            # Bytes came but no MSH: parse_reply reports "does not start with MSH".
            self._deliver([Frame(b"")])

    def _deliver(self, events: list[FrameEvent]) -> None:
        replies = [event.payload for event in events if isinstance(event, Frame)]
        if len(replies) < len(events):
            self._fail(f"reply larger than {MAX_REPLY_SIZE} bytes")
            return
        if not replies:
            return
        waiting, self._waiting = self._waiting, None
        unasked = replies[1:] if waiting is not None else replies
        for reply in unasked:
            if self.late_replies_allowed and len(self._early) < _MAX_PENDING:
                # An application ACK may follow an accept ACK (enhanced mode):
                # kept, in order, for the sender to read.
                self._early.append(reply)
            else:
                # A reply no message waits for: the stream is out of step, and a
                # later reply could be taken for the next message's. Stop here.
                self.abort("connection dropped after an unexpected extra reply")
                break
        if waiting is not None:
            waiting.callback(replies[0])

    def _fail(self, reason: str) -> None:
        self.abort(reason)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(_NoReplyError(reason))

    def abort(self, reason: str) -> None:
        """Mark the connection unusable and close it at once."""
        self.unusable = self.unusable or reason
        if self.transport is not None and not self._closed:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Closed first, so that a message sent from a reply's callback fails at once.
        self._closed = True
        if self._gap is not None and self._gap.active():
            self._gap.cancel()
            # Plain TCP: a reply also ends when the connection closes.
            self._deliver(self._framer.flush())
        self._gap = None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            lost = "connection closed before the reply"
            if not reason.check(ConnectionDone):
                # A reset, or a TLS handshake that failed (certificate not trusted).
                lost = f"connection lost before the reply: {reason.getErrorMessage()}"
            waiting.errback(_NoReplyError(self.unusable or lost))
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def close(self, grace: float) -> None:
        """Close cleanly; abort when the peer does not finish within ``grace`` seconds."""
        if self._closed:
            return
        closed: Deferred[None] = Deferred()
        self._close_waiters.append(closed)
        assert self.transport is not None
        self.transport.loseConnection()
        closed.addTimeout(grace, self._clock)
        try:
            await closed
        except TimeoutError:
            self.abort("close timed out")


class _SenderFactory(Factory):
    noisy = False

    def __init__(self, framing: Framing, clock: IReactorTime, reply_gap: float) -> None:
        self._framing = framing
        self._clock = clock
        self._reply_gap = reply_gap

    def buildProtocol(self, addr: IAddress | None) -> _SenderProtocol:
        framer: IFramer
        if self._framing == "mllp":
            framer = MLLPFramer(max_frame_size=MAX_REPLY_SIZE)
        else:
            framer = PlainTCPFramer(max_frame_size=MAX_REPLY_SIZE)
        return _SenderProtocol(framer, self._clock, self._reply_gap)


async def send_messages(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    messages: Sequence[bytes],
    framing: Framing,
    timeout: float,
    *,
    connect_timeout: float = 10.0,
    reply_gap: float = REPLY_GAP,
    on_result: Callable[[SendResult], None] | None = None,
) -> list[SendResult]:
    """Send ``messages`` over one connection, stop-and-wait; return one result each.

    A NAK, a garbled reply or an MSA-2 mismatch is recorded and the next
    message follows. A message that gets no reply within ``timeout`` seconds
    (or whose connection closes first) ends the run: its result is the last,
    and the messages after it are not sent. ``on_result`` sees each result
    as soon as it is known. Raises ConnectError when the connection can not
    be made within ``connect_timeout`` seconds.
    """
    connecting = endpoint.connect(_SenderFactory(framing, reactor, reply_gap))
    connecting.addTimeout(connect_timeout, reactor)
    try:
        protocol = await connecting
    except (TimeoutError, CancelledError, ConnectingCancelledError):
        raise ConnectError(f"could not connect within {connect_timeout:g}s") from None
    except Exception as error:
        raise ConnectError(f"could not connect: {error}") from None
    assert isinstance(protocol, _SenderProtocol)
    results: list[SendResult] = []
    # Accepted (CA) messages whose MSH-16 is ER or SU: an application ACK may
    # still come for them, unasked, while later messages are exchanged.
    maybe_later: dict[str, SendResult] = {}

    def report(result: SendResult) -> None:
        if on_result is not None:
            on_result(result)

    async def reply_for(control_id: str, getting: Deferred[bytes]) -> Reply:
        """The reply to ``control_id``; late application ACKs of earlier messages
        that come first are recorded with their message and reported again."""
        while True:
            parsed = parse_reply(await getting)
            earlier = maybe_later.pop(parsed.control_id or "", None)
            if earlier is None or parsed.control_id == control_id:
                return parsed
            late = evolve(earlier, application=parsed.ack_code)
            results[late.number - 1] = late
            report(late)
            getting = protocol.next_reply(timeout)

    try:
        for number, message in enumerate(messages, start=1):
            control_id = _control_id(message)
            condition = _application_ack_condition(message)
            protocol.late_replies_allowed = bool(maybe_later) or condition == "AL"
            try:
                reply = await reply_for(control_id, protocol.exchange(message, timeout))
            except _NoReplyError as error:
                result = SendResult(number, control_id, None, None, None, "", str(error), False)
            else:
                result = SendResult.from_reply(number, control_id, reply)
                if result.ok and result.ack_code == "CA" and condition == "AL":
                    result = await _application_ack(result, reply_for, protocol, timeout)
                elif result.ok and result.ack_code == "CA" and condition:
                    maybe_later[control_id] = result
            results.append(result)
            report(result)
            if not result.replied:
                break
    finally:
        await protocol.close(CLOSE_GRACE)
    return results


async def _application_ack(
    accepted: SendResult,
    reply_for: Callable[[str, Deferred[bytes]], Any],
    protocol: _SenderProtocol,
    timeout: float,
) -> SendResult:
    """Wait for the application ACK that follows ``accepted``'s CA (MSH-16 = AL)."""
    control_id = accepted.control_id
    try:
        reply = await reply_for(control_id, protocol.next_reply(timeout))
    except _NoReplyError as error:
        return evolve(
            accepted, application="", problem=f"no application ACK: {error}", replied=False
        )
    problem = reply.problem
    if not problem and reply.control_id != control_id:
        problem = "application ACK MSA-2 does not match MSH-10"
    return evolve(
        accepted,
        application=reply.ack_code or "",
        error_code=reply.error_code if reply.error_code is not None else accepted.error_code,
        text=reply.text or accepted.text,
        problem=problem,
    )


def _application_ack_condition(message: bytes) -> str:
    """What application ACK a message asks for in enhanced mode (MSH-16).

    "" none (original mode, MSH-16 empty or NE); "ER" or "SU" one that may
    come; "AL" (also for an unknown value, as the receiver answers it) one
    that must come.
    """
    parsed = parse_header(message, default_charset="latin-1")
    header = parsed.header if isinstance(parsed, HeaderProblem) else parsed
    if header is None or not is_enhanced(header) or not application_ack_requested(header):
        return ""
    condition = header.application_ack_type.strip().upper()
    return condition if condition in ("ER", "SU") else "AL"


def exit_status(results: Sequence[SendResult], count: int) -> int:
    """0 when all ``count`` messages got AA/CA with the right MSA-2, else 1."""
    return 0 if len(results) == count and all(r.ok for r in results) else 1


async def run_send(
    reactor: IReactorTime,
    endpoint: IStreamClientEndpoint,
    messages: Sequence[bytes],
    framing: Framing,
    timeout: float,
    connect_timeout: float,
    out: TextIO,
    err: TextIO,
) -> int:
    """The body of ``udsgateway send``: send, print a line per message, return the status."""

    def show(result: SendResult) -> None:
        out.write(result.line() + "\n")
        out.flush()

    try:
        results = await send_messages(
            reactor,
            endpoint,
            messages,
            framing,
            timeout,
            connect_timeout=connect_timeout,
            on_result=show,
        )
    except ConnectError as error:
        err.write(f"udsgateway send: {error}\n")
        return 1
    if len(results) < len(messages):
        err.write(
            f"udsgateway send: stopped at message {len(results)}: "
            f"{len(messages) - len(results)} of {len(messages)} not sent\n"
        )
    return exit_status(results, len(messages))


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a host and a port; ValueError otherwise."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--to {text!r}: expected HOST:PORT")
    return host, int(port)


def _certificates(pem: bytes) -> list[Certificate]:
    marker = b"-----BEGIN CERTIFICATE-----"
    return [Certificate.loadPEM(marker + block) for block in pem.split(marker)[1:]]


def client_tls_options(
    host: str, ca: str | None, cert: str | None, key: str | None
) -> IOpenSSLClientConnectionCreator:
    """TLS client options: verify ``host`` against ``ca`` (a PEM file or a directory
    of ``.pem`` files; the system's roots when None), with an optional client
    certificate (``key`` may be omitted when ``cert`` holds both).

    Reads the files, so call it before the reactor runs. Raises ValueError.
    """
    try:
        trust = None
        if ca is not None:
            path = Path(ca)
            files = sorted(path.glob("*.pem")) if path.is_dir() else [path]
            roots = [c for file in files for c in _certificates(file.read_bytes())]
            if not roots:
                raise ValueError(f"--ca {ca}: no PEM certificate found")
            trust = trustRootFromCertificates(roots)
        client = None
        if cert is not None:
            cert_pem = Path(cert).read_bytes()
            if key is None:
                client = PrivateCertificate.loadPEM(cert_pem)
            else:
                client = PrivateCertificate.fromCertificateAndKeyPair(
                    Certificate.loadPEM(cert_pem), KeyPair.load(Path(key).read_bytes(), 1)
                )
    except OSError as error:
        raise ValueError(f"cannot read {error.filename}: {error.strerror or error}") from None
    except CryptoError as error:
        raise ValueError(f"invalid certificate or key: {error}") from None
    return optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)


def client_endpoint(
    reactor: Any,
    host: str,
    port: int,
    connect_timeout: float,
    tls: IOpenSSLClientConnectionCreator | None = None,
) -> IStreamClientEndpoint:
    """A ``tcp:`` endpoint to ``host:port``, wrapped in TLS when ``tls`` is given.

    The ``tls:`` endpoint string takes only a directory of CA files, so TLS
    is applied with `wrapClientTLS` to accept a single CA file too.
    """
    description = (
        f"tcp:host={quoteStringArgument(host)}:port={port}"
        f":timeout={max(1, math.ceil(connect_timeout))}"
    )
    endpoint = clientFromString(reactor, description)
    return endpoint if tls is None else wrapClientTLS(tls, endpoint)


# -- receive


def _hits(every: int, number: int) -> bool:
    return every > 0 and number % every == 0


def _non_negative(instance: Any, attribute: Any, value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative")


def _positive(instance: Any, attribute: Any, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1")


def _nak_code(instance: Any, attribute: Any, value: str | None) -> None:
    if value is not None and value not in NAK_CODES:
        raise ValueError(f"nak must be one of {', '.join(NAK_CODES)}")


@frozen
class ReceiverOptions:
    """What the test receiver answers. Every fault is deterministic.

    Messages are numbered from 1 across all connections; "every N" means
    messages N, 2N, 3N... When several faults pick the same message the
    first of these wins: ``no_ack``, ``drop_every``, ``garbage_every``,
    then an ACK that may be a NAK (``nak``, ``nak_every``) and may carry a
    wrong MSA-2 (``wrong_msa2_every``). ``delay`` applies to every answer,
    drops and garbage included. ``count`` stops the receiver after that many
    messages.
    """

    nak: str | None = field(default=None, validator=_nak_code)
    nak_every: int = field(default=1, validator=_positive)
    nak_error: int = 207
    delay: float = field(default=0.0, validator=_non_negative)
    drop_every: int = field(default=0, validator=_non_negative)
    wrong_msa2_every: int = field(default=0, validator=_non_negative)
    no_ack: bool = False
    garbage_every: int = field(default=0, validator=_non_negative)
    count: int | None = None
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    frame_timeout: float = 60.0
    idle_timeout: float = 600.0
    idle_gap: float = REPLY_GAP


@frozen
class ReceivedMessage:
    """One message the receiver got and what it answered.

    ``answer`` is the ACK code sent, or "none" (nothing sent), "closed" (the
    connection was closed instead) or "garbage". ``notes`` say why, without
    field values. ``payload`` is the message as received (only the head of
    an oversized one); ``size`` its full length.
    """

    number: int
    received_at: float
    peer: str
    framing: str
    message_type: str
    control_id: str
    size: int
    answer: str
    notes: tuple[str, ...]
    payload: bytes

    def line(self) -> str:
        """``<time> <peer> <MSH-9> <MSH-10> <size> <answer>`` then framing and notes."""
        words = [
            _iso_time(self.received_at),
            self.peer,
            _token(self.message_type),
            _token(self.control_id),
            str(self.size),
            self.answer,
            self.framing,
            *self.notes,
        ]
        return " ".join(words)


def output_record(payload: bytes) -> bytes:
    """A message as ``receive --output`` appends it: CR turned to LF, ending with LF.

    The file can be sent again with ``udsgateway send``.
    """
    record = payload.replace(b"\r", b"\n")
    return record if record.endswith(b"\n") else record + b"\n"


@frozen
class _Answer:
    """What to do for one message once its delay has passed."""

    answer: str
    data: bytes | None = None
    close: bool = False
    notes: tuple[str, ...] = ()


class ReceiverProtocol(FramedServerProtocol):
    """One connection to the test receiver: detect framing, answer each message in order."""

    def __init__(self, factory: ReceiverFactory) -> None:
        options = factory.options
        super().__init__(
            factory.clock,
            ConnectionLimits(
                idle_timeout=options.idle_timeout,
                frame_timeout=options.frame_timeout,
                idle_gap=options.idle_gap,
                detect_limit=_DETECT_LIMIT,
            ),
        )
        self._factory = factory
        self._options = options
        self._peer = "?"
        self._answer_timer: IDelayedCall | None = None
        self._close_waiters: list[Deferred[None]] = []
        self.closed = False

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self._peer = f"{host}:{port}" if host is not None else str(peer)
        super().connectionMade()

    def _make_framer(self, connection_type: str) -> IFramer:
        size = self._options.max_frame_size
        if connection_type == "mllp":
            return MLLPFramer(max_frame_size=size)
        return PlainTCPFramer(max_frame_size=size)

    def _on_queued(self) -> None:
        if len(self._queue) > _MAX_PENDING:
            self._close()

    def _pump(self) -> None:
        while not self._busy and self._queue and not self._closing:
            event = self._queue.popleft()
            if not self._factory.accepting:
                self._close()
                return
            answer = self._factory.receive(self, event)
            if self._options.delay > 0 and (answer.data is not None or answer.close):
                self._busy = True
                self._answer_timer = self._clock.callLater(
                    self._options.delay, self._carry_out, answer
                )
            else:
                self._carry_out(answer)
                return
        finished = self._closing or (self._read_closed and not self._queue)
        if finished and not self._busy and not self.closed and self.transport is not None:
            self.transport.loseConnection()

    def _carry_out(self, answer: _Answer) -> None:
        self._answer_timer = None
        self._busy = False
        if answer.data is not None and self._framer is not None and not self.closed:
            self.transport.write(self._framer.encode(answer.data))  # type: ignore[union-attr]
        if answer.close:
            self._close()
        self._factory.answered()
        self._pump()

    @property
    def peer(self) -> str:
        """``host:port`` of the sender."""
        return self._peer

    @property
    def framing(self) -> str:
        """The framing detected: "mllp" or "tcp" ("" before the first message)."""
        return self.connection_type

    def close_when_done(self) -> Deferred[None]:
        """Close after any pending answer; fire once the connection is gone."""
        waiter: Deferred[None] = Deferred()
        if self.closed:
            waiter.callback(None)
            return waiter
        self._close_waiters.append(waiter)
        self._closing = True
        self._queue.clear()
        if not self._busy and self.transport is not None:
            self.transport.loseConnection()
        return waiter

    def abort(self) -> None:
        """Close at once, dropping anything unsent."""
        self._close(abort=True)

    def _close(self, abort: bool = False) -> None:
        if not self.closed:  # once lost, connectionLost has done the rest
            super()._close(abort)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        super().connectionLost(reason)
        if self._answer_timer is not None and self._answer_timer.active():
            self._answer_timer.cancel()
        if self._answer_timer is not None:
            # The delayed answer will never go out; it still counts as handled.
            self._answer_timer = None
            self._factory.answered()
        self._factory.connection_lost(self)
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)


@define(eq=False, repr=False)
class ReceiverFactory(Factory):
    """The test receiver: ACKs what it gets, with the faults ``options`` ask for.

    ``on_message`` is called for each message as soon as its answer is
    decided (before a delayed answer goes out), so a record of it exists by
    the time the sender has its ACK. ``finished`` fires once ``options.count``
    messages have been answered.
    """

    noisy = False

    clock: IReactorTime
    options: ReceiverOptions = field(factory=ReceiverOptions)
    on_message: Callable[[ReceivedMessage], None] | None = None
    control_ids: ControlIdSource | None = None
    #: Wall clock for what is printed and sent (received_at, the ACK's MSH-7);
    #: None: ``clock``'s. Timeouts and delays run on ``clock``.
    wall: Wall | None = None
    received: int = field(default=0, init=False)
    finished: Deferred[None] = field(factory=Deferred, init=False)
    _answered: int = field(default=0, init=False)
    _connections: set[ReceiverProtocol] = field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        if self.control_ids is None:
            self.control_ids = ControlIdSource.for_boot(wall_of(self.clock, self.wall)())

    def buildProtocol(self, addr: IAddress | None) -> ReceiverProtocol:
        protocol = ReceiverProtocol(self)
        self._connections.add(protocol)
        return protocol

    @property
    def accepting(self) -> bool:
        """False once ``count`` messages have arrived."""
        count = self.options.count
        return count is None or self.received < count

    def receive(self, protocol: ReceiverProtocol, event: Frame | OversizedFrame) -> _Answer:
        """Number a message, decide its answer, report it; the protocol carries it out."""
        self.received += 1
        number = self.received
        if isinstance(event, Frame):
            payload, size, oversized = event.payload, len(event.payload), False
        else:
            payload, size, oversized = event.head, event.size, True
        parsed = parse_header(payload, default_charset="latin-1")
        header = parsed.header if isinstance(parsed, HeaderProblem) else parsed
        problem: AckError | None = None
        if isinstance(parsed, HeaderProblem):
            problem = AckError(parsed.code, parsed.location, parsed.diagnostic)
        if oversized:
            problem = AckError(104, "", f"frame of {size} bytes is over the limit")
        answer = self._decide(number, header, problem)
        if self.on_message is not None:
            self.on_message(
                ReceivedMessage(
                    number,
                    wall_of(self.clock, self.wall)(),
                    protocol.peer,
                    protocol.framing,
                    header.message_type if header is not None else "",
                    header.control_id if header is not None else "",
                    size,
                    answer.answer,
                    answer.notes,
                    payload,
                )
            )
        return answer

    def _decide(self, number: int, header: Header | None, problem: AckError | None) -> _Answer:
        options = self.options
        if header is None:
            return _Answer("closed", close=True, notes=("unreadable-header",))
        if header.message_code == "ACK":
            return _Answer("none", notes=("inbound-ack",))
        if options.no_ack:
            return _Answer("none", notes=("no-ack",))
        if _hits(options.drop_every, number):
            return _Answer("closed", close=True, notes=("drop",))
        if _hits(options.garbage_every, number):
            return _Answer("garbage", GARBAGE)
        notes: list[str] = []
        text = ""
        if problem is not None:
            outcome, code, error = Outcome.ERROR, "", problem
            notes.append(f"err={problem.code}")
        elif options.nak is not None and _hits(options.nak_every, number):
            code = options.nak
            outcome = Outcome.ERROR if code in ("AE", "CE") else Outcome.REJECT
            text = f"test receiver: --nak {code}"
            error = AckError(options.nak_error, "", text)
        else:
            outcome, code, error = Outcome.ACCEPT, "", None
        code = code or ack_code(header, outcome)
        if not wants_accept_ack(header, outcome):
            return _Answer("none", notes=(f"msh-15={_token(header.accept_ack_type)}",))
        if _hits(options.wrong_msa2_every, number):
            header = evolve(header, control_id="WRONG" + header.control_id)
            notes.append("wrong-msa2")
        assert self.control_ids is not None
        ack = build_ack(
            header,
            code,
            control_id=self.control_ids.next(),
            timestamp=hl7_timestamp(wall_of(self.clock, self.wall)()),
            error=error,
            text=text,
        )
        return _Answer(code, ack, notes=tuple(notes))

    def answered(self) -> None:
        """A message's answer was carried out; fire ``finished`` at the count."""
        self._answered += 1
        count = self.options.count
        if count is not None and self._answered >= count and not self.finished.called:
            self.finished.callback(None)

    def connection_lost(self, protocol: ReceiverProtocol) -> None:
        self._connections.discard(protocol)

    async def close_connections(self, grace: float = CLOSE_GRACE) -> None:
        """Close every connection after its pending answer; abort stragglers after ``grace``."""
        protocols = list(self._connections)
        closing = DeferredList([p.close_when_done() for p in protocols])
        closing.addTimeout(grace, self.clock)
        try:
            await closing
        except TimeoutError:
            for protocol in protocols:
                protocol.abort()


async def run_receive(
    reactor: Any,
    factory: ReceiverFactory,
    description: str,
    err: TextIO,
) -> int:
    """The body of ``udsgateway receive``: listen, answer, stop after ``count`` messages.

    Without a count it runs until the reactor stops (Ctrl-C, SIGTERM).
    """
    try:
        port = await serverFromString(reactor, description).listen(factory)
    except CannotListenError as error:
        err.write(f"udsgateway receive: cannot listen: {error}\n")
        return 1
    address = port.getHost()
    err.write(
        f"udsgateway receive: listening on {getattr(address, 'host', '?')}"
        f":{getattr(address, 'port', '?')}\n"
    )
    err.flush()
    try:
        await factory.finished
    finally:
        await maybeDeferred(port.stopListening)
        await factory.close_connections()
    return 0


# -- the command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0 to 65535): {text!r}")
    return int(text)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("must be zero or more seconds")
    return value


def _run_reactor(
    main: Callable[[Any], Deferred[int]], interrupted: int, _reactor: Any = None
) -> int:
    """Run ``main`` under `react`; return its status, or ``interrupted`` when the
    reactor stopped first (Ctrl-C, SIGTERM).

    The reactor's timers run on the monotonic clock (clock.py), as the
    service's do: a wall clock set back or forward does not stretch or cut a
    timeout. ``_reactor`` is for tests, as `react`'s own.
    """
    status: list[int] = []

    def run(reactor: Any) -> Deferred[None]:
        monotonic_timers(reactor)
        return main(reactor).addCallback(status.append)

    try:
        react(run, _reactor=_reactor)
    except SystemExit as exit:
        # react always exits; its code is non-zero only if main raised (react logs it).
        if exit.code not in (0, None):
            return 1
    return status[0] if status else interrupted


def cmd_send(args: argparse.Namespace, config: object, out: TextIO) -> int:
    """``udsgateway send``: see docs/tools.md."""
    err = sys.stderr
    try:
        if (args.ca or args.cert or args.key) and not args.tls:
            raise ValueError("--ca, --cert and --key need --tls")
        if args.key and not args.cert:
            raise ValueError("--key needs --cert")
        host, port = parse_address(args.to)
        messages = read_message_files(args.files)
        if args.new_control_id:
            # Unique per run as the gateway's own ACK IDs are (boot time + random).
            source = ControlIdSource.for_boot(time.time())
            messages = [with_control_id(m, source.next()) for m in messages]
        tls = client_tls_options(host, args.ca, args.cert, args.key) if args.tls else None
    except ValueError as error:
        err.write(f"udsgateway send: {error}\n")
        return 2
    framing: Framing = "tcp" if args.tcp else "mllp"

    def main(reactor: Any) -> Deferred[int]:
        endpoint = client_endpoint(reactor, host, port, args.connect_timeout, tls)
        return Deferred.fromCoroutine(
            run_send(
                reactor,
                endpoint,
                messages,
                framing,
                args.timeout,
                args.connect_timeout,
                out,
                err,
            )
        )

    return _run_reactor(main, interrupted=1)


def _message_printer(
    out: TextIO, show_body: bool, output: BinaryIO | None
) -> Callable[[ReceivedMessage], None]:
    def on_message(message: ReceivedMessage) -> None:
        if output is not None:
            # Written before the ACK goes out, so a test that has its ACK
            # finds the message in the file. Small appends to a local file.
            output.write(output_record(message.payload))
            output.flush()
        out.write(message.line() + "\n")
        if show_body:
            for segment in segments(message.payload):
                out.write("    " + segment.decode("utf-8", "backslashreplace") + "\n")
        out.flush()

    return on_message


def cmd_receive(args: argparse.Namespace, config: object, out: TextIO) -> int:
    """``udsgateway receive``: see docs/tools.md."""
    err = sys.stderr
    nak = args.nak
    if args.nak_every is not None and nak is None:
        nak = "AE"
    options = ReceiverOptions(
        nak=nak,
        nak_every=args.nak_every or 1,
        nak_error=args.nak_error,
        delay=args.delay,
        drop_every=args.drop_every or 0,
        wrong_msa2_every=args.wrong_msa2_every or 0,
        no_ack=args.no_ack,
        garbage_every=args.garbage_every or 0,
        count=args.count,
    )
    description = f"tcp:port={args.port}:interface={quoteStringArgument(args.host)}"
    with ExitStack() as stack:
        output: BinaryIO | None = None
        if args.output:
            try:
                output = stack.enter_context(open(args.output, "ab"))
            except OSError as error:
                err.write(f"udsgateway receive: cannot open {args.output}: {error.strerror}\n")
                return 2
        printer = _message_printer(out, args.show_body, output)

        def main(reactor: Any) -> Deferred[int]:
            factory = ReceiverFactory(reactor, options, on_message=printer, wall=time.time)
            return Deferred.fromCoroutine(run_receive(reactor, factory, description, err))

        return _run_reactor(main, interrupted=0)


def add_peer_commands(commands: Any) -> None:
    """Register ``send`` and ``receive`` on the CLI's subparsers.

    Both set ``needs_config=False``: they talk to a gateway, not its store.
    """
    p = commands.add_parser(
        "send",
        help="send HL7 messages from files to a receiver, print each ACK",
        description="Send the messages in FILE(s) one at a time (stop-and-wait) and print "
        "'<n> <MSH-10> <ACK code> <MSA-2>' per message. Message bodies are never printed. "
        "Exit status: 0 all AA/CA with matching MSA-2, 1 any NAK, mismatch, timeout or "
        "connection failure, 2 usage or file errors. A resend of a message the gateway "
        "already stored (same MSH-10 and bytes) gets the stored ACK again, byte for byte: "
        "send can not tell it from a first ACK (see --new-control-id).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="message files (one or many each)")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="where to send")
    p.add_argument("--tcp", action="store_true", help="plain TCP instead of MLLP")
    p.add_argument(
        "--new-control-id",
        action="store_true",
        help="replace each message's MSH-10 with a fresh unique value before sending, so a "
        "gateway takes a resent file as new messages instead of duplicates",
    )
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca", metavar="FILE", help="CA certificate(s), PEM file or directory")
    p.add_argument("--cert", metavar="FILE", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--key", metavar="FILE", help="client private key (PEM)")
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="wait this long for each ACK (default 30)",
    )
    p.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for the connection (default 10)",
    )
    p.set_defaults(handler=cmd_send, needs_config=False)

    p = commands.add_parser(
        "receive",
        help="a test receiver that ACKs messages, with optional faults",
        description="Listen for MLLP and plain TCP (detected per connection) and ACK each "
        "message, printing time, peer, MSH-9, MSH-10, size and the answer. Faults pick "
        "messages by number (1, 2, ... across connections); precedence: --no-ack, "
        "--drop-every, --garbage-every, then --nak/--nak-every and --wrong-msa2-every.",
    )
    p.add_argument("--port", type=_port, required=True, help="port to listen on (0: any)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--nak",
        type=str.upper,
        choices=NAK_CODES,
        help="answer with this code instead of AA/CA (every message, or see --nak-every)",
    )
    p.add_argument(
        "--nak-every",
        type=_positive_int,
        metavar="N",
        help="NAK only every Nth message (AE unless --nak says otherwise)",
    )
    p.add_argument(
        "--nak-error",
        type=int,
        default=207,
        metavar="CODE",
        help="HL7 table 0357 code in the NAK's ERR-3 (default 207)",
    )
    p.add_argument("--delay", type=_delay, default=0.0, metavar="SECONDS", help="answer this late")
    p.add_argument(
        "--drop-every",
        type=_positive_int,
        metavar="N",
        help="close the connection instead of answering every Nth message",
    )
    p.add_argument(
        "--wrong-msa2-every",
        type=_positive_int,
        metavar="N",
        help="answer every Nth message with a wrong MSA-2",
    )
    p.add_argument("--no-ack", action="store_true", help="never answer")
    p.add_argument(
        "--garbage-every",
        type=_positive_int,
        metavar="N",
        help="answer every Nth message with non-HL7 bytes",
    )
    p.add_argument(
        "--count", type=_positive_int, metavar="N", help="exit after N messages are answered"
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="append each message's bytes to FILE (CR written as LF; contains PHI)",
    )
    p.add_argument(
        "--show-body",
        action="store_true",
        help="also print each message body (shows PHI: test data only)",
    )
    p.set_defaults(handler=cmd_receive, needs_config=False)
