"""A tenant's listener: one port for MLLP and plain TCP senders alike.

The framing is detected per connection from the first meaningful byte: a
start byte (0x0B) means MLLP, ``MSH`` means plain TCP (framed.py, shared with
the test receiver). The protocol only frames and delegates: each complete
frame goes to the tenant's Ingest, one at a time, and the answers are written
back in order (G5). Every wait has a timeout (frame, idle, plain-TCP gap, TLS
handshake) and every buffer a bound.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from attrs import define, field
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from udsgateway.config import TenantConfig
from udsgateway.inbound.ingest import Answer, ApplicationAck, Ingest
from udsgateway.store.engine import Durations
from udsgateway.wire.framed import (
    ByteBudget,
    ConnectionLimits,
    FramedServerProtocol,
    failure_site,
    write_now,
)
from udsgateway.wire.framing import Frame, IFramer, MLLPFramer, OversizedFrame, PlainTCPFramer
from udsgateway.wire.proxy import ProxyListenerFactory, ProxyStats

log = Logger()

_NOT_HL7_PREFIXES = (
    b"GET ",
    b"POST",
    b"PUT ",
    b"HEAD",
    b"DELE",
    b"OPTI",
    b"PATC",
    b"CONN",
    b"TRAC",
    b"PRI ",
    b"SSH-",
)


def _not_hl7(data: bytes) -> bool:
    """HTTP, SSH or a TLS ClientHello on a plain port: close it at once."""
    if data[:1] == b"\x16" and data[1:2] == b"\x03":
        return True
    return data[:4] in _NOT_HL7_PREFIXES


@define
class RateLimit:
    """Let one event through per interval and count the rest (bounded log volume)."""

    _clock: IReactorTime
    interval: float = 10.0
    _last: float = -1e18
    suppressed: int = 0

    def allow(self) -> bool:
        now = self._clock.seconds()
        if now - self._last >= self.interval:
            self._last = now
            return True
        self.suppressed += 1
        return False


@define
class ListenerStats:
    """What an operator wants to know of a listener; counts only, never content."""

    open_connections: int = 0
    connections: int = 0
    refused: int = 0
    closed_not_hl7: int = 0
    frame_timeouts: int = 0
    idle_timeouts: int = 0
    handshake_timeouts: int = 0
    overflows: int = 0
    dropped_bytes: int = 0
    #: Times a connection stopped being read because its address was over its byte budget.
    budget_pauses: int = 0
    #: Times a connection yielded to the others after ``frames_per_turn`` answers.
    turn_yields: int = 0
    #: Input that made the listener's code fail; the connection was aborted.
    input_errors: int = 0
    mllp_connections: int = 0
    tcp_connections: int = 0
    #: Seconds from a frame taken for processing to its ACK written (commit included).
    ack_latency: Durations = field(factory=Durations)
    #: Behind the PROXY protocol: headers read, refused, timed out (``wire/proxy.py``).
    proxy: ProxyStats = field(factory=ProxyStats)


@implementer(IHandshakeListener)
class InboundProtocol(FramedServerProtocol):
    """One sender's connection: frames go to the tenant's Ingest one at a time, in order."""

    def __init__(self, factory: ListenerFactory, peer: str) -> None:
        super().__init__(factory.clock, factory.connection_limits)
        self._factory = factory
        self._tenant = factory.tenant
        self._peer = peer
        self._handshake_timer: IDelayedCall | None = None
        self._budget = factory.budget(peer)
        #: ``_pump`` is running (an answer that comes at once must not nest a second one).
        self._pumping = False
        self._next_turn: IDelayedCall | None = None
        #: When the frame being answered was taken for processing (its ACK latency).
        self._handling_since = 0.0

    # -- Twisted callbacks

    def connectionMade(self) -> None:
        # ACKs are small and answer a waiting sender: never let Nagle hold them back.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()
        if self._tenant.tls.enabled:
            self._handshake_timer = self._clock.callLater(
                self._tenant.limits.tls_handshake_timeout, self._handshake_timeout
            )

    def handshakeCompleted(self) -> None:
        """TLS is up (IHandshakeListener): the handshake timeout no longer applies."""
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _handshake_timeout(self) -> None:
        self._handshake_timer = None
        self._factory.stats.handshake_timeouts += 1
        log.info("TLS handshake timeout: closed", peer=self._peer, tenant=self._tenant.name)
        self._close(abort=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        for timer in (self._handshake_timer, self._next_turn):
            if timer is not None and timer.active():
                timer.cancel()
        if self._framer is not None:
            self._factory.stats.dropped_bytes += self._framer.stats.dropped_bytes
        self._factory.connection_closed(self._peer)

    # -- framing (FramedServerProtocol's hooks)

    def _refuse(self, first_bytes: bytes) -> bool:
        if not _not_hl7(first_bytes.lstrip(b"\r\n\x00 ")):
            return False
        self._factory.stats.closed_not_hl7 += 1
        if self._factory.not_hl7_log.allow():
            log.info(
                "not HL7 on an HL7 port: closed",
                peer=self._peer,
                tenant=self._tenant.name,
                suppressed=self._factory.not_hl7_log.suppressed,
            )
        return True

    def _make_framer(self, connection_type: str) -> IFramer:
        limits = self._tenant.limits
        if connection_type == "mllp":
            self._factory.stats.mllp_connections += 1
            return MLLPFramer(
                max_frame_size=limits.max_frame_size, lenient_fs=self._tenant.lenient_fs
            )
        self._factory.stats.tcp_connections += 1
        return PlainTCPFramer(
            max_frame_size=limits.max_frame_size,
            start_bytes=self._tenant.tcp.start_bytes,
            end_bytes=self._tenant.tcp.end_bytes,
        )

    def _on_overflow(self, size: int) -> None:
        self._factory.stats.overflows += 1
        log.warn(
            "frame grew past the size limit: closed",
            size=size,
            peer=self._peer,
            tenant=self._tenant.name,
        )

    def _on_queued(self) -> None:
        if len(self._queue) >= self._tenant.limits.max_pending_frames:
            self._pause_reading("backpressure")

    def _on_budget_exceeded(self) -> None:
        self._factory.stats.budget_pauses += 1

    def _on_error(self, error: Exception) -> None:
        self._factory.stats.input_errors += 1
        log.warn(
            "input handling failed ({error}, at {site}): connection aborted",
            error=type(error).__name__,
            site=failure_site(error),
            peer=self._peer,
            tenant=self._tenant.name,
        )

    def _on_frame_timeout(self) -> None:
        self._factory.stats.frame_timeouts += 1
        log.info("frame timeout: partial frame discarded", peer=self._peer)

    def _on_idle_timeout(self) -> None:
        self._factory.stats.idle_timeouts += 1

    # -- answering, in order

    def _pump(self) -> None:
        if self._pumping:
            return  # an answer came at once, inside the loop below: it goes on from there
        self._pumping = True
        try:
            self._pump_turn()
        except Exception as error:
            self._on_error(error)
            self._busy = False
            self._close(abort=True)
        finally:
            self._pumping = False
        if len(self._queue) < self._tenant.limits.max_pending_frames // 2 + 1:
            self._resume_reading("backpressure")
        if (self._closing or self._read_closed) and not self._busy and not self._queue:
            self._transport.loseConnection()

    def _pump_turn(self) -> None:
        """Answer queued frames in order; after ``frames_per_turn`` yield to the reactor.

        Frames answered at once (a NAK needs no database) would otherwise let
        one connection with a long queue keep the reactor from every other.
        """
        handled = 0
        while not self._busy and self._queue and self._next_turn is None:
            if handled >= self._tenant.limits.frames_per_turn:
                self._factory.stats.turn_yields += 1
                self._next_turn = self._clock.callLater(0, self._turn)
                return
            handled += 1
            event = self._queue.popleft()
            if isinstance(event, OversizedFrame):
                self._answer(self._factory.ingest.oversized(event.head, event.size))
                continue
            assert isinstance(event, Frame)
            self._busy = True
            self._handling_since = self._clock.seconds()
            done = self._factory.ingest.handle(event.payload, self._peer, self._connection_type)
            done.addCallbacks(self._answered, self._failed)

    def _turn(self) -> None:
        self._next_turn = None
        self._pump()

    def _answered(self, answer: Answer) -> None:
        self._answer(answer)
        self._factory.stats.ack_latency.observe(self._clock.seconds() - self._handling_since)
        if answer.then is not None:
            # Enhanced mode: the application ACK follows before the next frame's
            # answers (G5), so the connection stays busy until it is decided.
            answer.then.addCallbacks(self._application_answered, self._failed)
            return
        self._busy = False
        self._pump()

    def _application_answered(self, ack: ApplicationAck) -> None:
        self._busy = False
        if not ack.data:
            pass  # the sender's MSH-16 asks for none for this outcome
        elif self._closing or self._framer is None or self.transport is None:
            self._factory.ingest.application_ack_lost(ack, self._peer)
        else:
            write_now(self.transport, self._framer.encode(ack.data))
        self._pump()

    def _failed(self, failure: Failure) -> None:
        # Ingest answers every frame itself; reaching here is a bug. Close
        # rather than answer wrongly: the sender resends, G3 handles it. One
        # line with the error's type and place: its message may hold content.
        self._factory.stats.input_errors += 1
        error = failure.value
        log.error(
            "inbound pipeline failed ({error}, at {site}): connection closed",
            error=type(error).__name__,
            site=failure_site(error) if isinstance(error, BaseException) else "?",
            peer=self._peer,
            tenant=self._tenant.name,
        )
        self._busy = False
        self._close()
        self._pump()

    def _answer(self, answer: Answer) -> None:
        if self._framer is None or self.transport is None:
            return
        if answer.data is not None and not self._closing:
            write_now(self.transport, self._framer.encode(answer.data))
        if answer.close:
            self._close()


@define(eq=False, repr=False)
class ListenerFactory(Factory):
    """Builds one InboundProtocol per accepted connection, within the tenant's caps."""

    noisy = False  # one log line per start/stop of a port is enough (service.py logs it)

    tenant: TenantConfig
    ingest: Ingest
    clock: IReactorTime
    stats: ListenerStats = field(factory=ListenerStats)
    _per_peer: dict[str, int] = field(factory=dict)
    #: Byte budgets of peer addresses: kept while connected or not yet refilled.
    _budgets: dict[str, ByteBudget] = field(factory=dict)
    not_hl7_log: RateLimit = field(init=False)
    _refusal_log: RateLimit = field(init=False)
    #: One log rate limit per kind of PROXY-header refusal.
    _proxy_logs: dict[str, RateLimit] = field(init=False, factory=dict)
    connection_limits: ConnectionLimits = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.not_hl7_log = RateLimit(self.clock)
        self._refusal_log = RateLimit(self.clock)
        limits = self.tenant.limits
        self.connection_limits = ConnectionLimits(
            idle_timeout=limits.idle_timeout,
            frame_timeout=limits.frame_timeout,
            idle_gap=self.tenant.tcp.idle_gap,
            detect_limit=limits.detect_limit,
        )

    def buildProtocol(self, addr: IAddress | None) -> InboundProtocol | None:
        peer = peer_address(getattr(addr, "host", str(addr)))
        reason = self._refusal(peer)
        if reason:
            # Returning None closes the connection before any byte is read.
            self.stats.refused += 1
            if self._refusal_log.allow():
                log.info(
                    "connection refused: {reason}",
                    reason=reason,
                    peer=peer,
                    tenant=self.tenant.name,
                    suppressed=self._refusal_log.suppressed,
                )
            return None
        self.stats.open_connections += 1
        self.stats.connections += 1
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return InboundProtocol(self, peer)

    def behind_proxy(self, factory: Factory[Any] | None = None) -> ProxyListenerFactory:
        """This listener (or ``factory``, TLS around it) behind the PROXY protocol.

        The header is read before ``buildProtocol`` is called, with the sender's
        address: the allowlist, the caps and the logs see the sender.
        """
        return ProxyListenerFactory(
            factory if factory is not None else self,
            self.clock,
            header_timeout=self.tenant.limits.proxy_header_timeout,
            max_pending=self.tenant.limits.max_connections,
            proxies=self.tenant.proxies,
            on_refused=self._proxy_refused,
            stats=self.stats.proxy,
        )

    def _proxy_refused(self, reason: str, proxy: str) -> None:
        # One rate limit per kind of reason (a v1 or v2 detail after "(" is the same kind).
        kind = reason.split(" (")[0]
        limit = self._proxy_logs.get(kind)
        if limit is None:
            if len(self._proxy_logs) >= 32:
                return  # counted in stats.proxy; the kinds of reasons are few
            limit = self._proxy_logs[kind] = RateLimit(self.clock)
        if limit.allow():
            log.info(
                "PROXY protocol: connection closed: {reason}",
                reason=reason,
                proxy=proxy,
                tenant=self.tenant.name,
                suppressed=limit.suppressed,
            )

    def _refusal(self, peer: str) -> str:
        if self.tenant.allow and not _allowed(peer, self.tenant):
            return "peer not in the allowlist"
        if self.stats.open_connections >= self.tenant.limits.max_connections:
            return "too many connections"
        if self._per_peer.get(peer, 0) >= self.tenant.limits.max_connections_per_peer:
            return "too many connections from this peer"
        return ""

    def connection_closed(self, peer: str) -> None:
        self.stats.open_connections -= 1
        left = self._per_peer.get(peer, 1) - 1
        if left:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)

    def budget(self, peer: str) -> ByteBudget:
        """The byte budget of one peer address, shared by all its connections.

        It outlives the address's connections until it has refilled, so
        reconnecting does not buy a fresh budget; budgets that are full and
        unused are dropped, which bounds how many are kept.
        """
        budget = self._budgets.get(peer)
        if budget is None:
            bound = 2 * self.tenant.limits.max_connections
            if len(self._budgets) >= bound:
                idle = [p for p in self._budgets if p not in self._per_peer]
                for other in idle:
                    if self._budgets[other].full:
                        del self._budgets[other]
                for other in idle:  # still too many: forget the oldest unconnected ones
                    if len(self._budgets) < bound:
                        break
                    self._budgets.pop(other, None)
            limits = self.tenant.limits
            budget = ByteBudget(
                self.clock,
                rate=limits.peer_bytes_per_second,
                capacity=max(limits.peer_bytes_per_second, limits.max_frame_size),
            )
            self._budgets[peer] = budget
        return budget


def peer_address(host: str) -> str:
    """One key per peer address: an IPv4 peer on a dual-stack socket counts as itself."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _allowed(peer: str, tenant: TenantConfig) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)  # an IPv4 peer on a dual-stack IPv6 socket
    return any(candidate in network for candidate in candidates for network in tenant.allow)
