"""The PROXY protocol (v1 and v2) in front of a listener, for HAProxy in TCP mode.

A tenant whose ``listen`` is ``haproxy:<endpoint>`` (``haproxy:tcp:port=2575``)
sits behind a load balancer that opens every connection with a PROXY header
naming the real sender. ``ProxyListenerFactory`` reads that header **before**
asking the listener's factory for a protocol, and asks it with the sender's
address: so the allowlist, the connection caps per address, the byte budgets
and every log line see the sender, not the load balancer, and the listener's
own code needs no special case.

Twisted's ``haproxy:`` endpoint (``twisted.protocols.haproxy``) parses the
same headers (its parsers are used here) but builds the inner protocol, and
calls its ``connectionMade``, before the header is read, with the load
balancer's address; it also closes a connection whose first read is shorter
than the header's fixed part, and says nothing when it closes one. Here the
header may arrive in any number of reads, it must arrive within a timeout,
and a connection closed for its header is reported to ``on_refused``.

A ``LOCAL`` header (v2) or ``UNKNOWN`` (v1) is the load balancer's own
connection (a health check sent with ``check-send-proxy``): the listener sees
the load balancer's address, as the PROXY protocol's specification says.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from typing import Any, cast

from attrs import define, frozen
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

V1_PREFIX = b"PROXY "
V2_PREFIX = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v1 header line, CRLF included (the specification's bound).
V1_MAX = 107
#: The longest v2 header accepted: the fixed part, addresses and TLVs.
V2_MAX = 16 + 2048

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(Exception):
    """The bytes at the start of a connection are not a PROXY header we accept."""


@frozen
class ProxyHeader:
    """A parsed header: the sender and the address it connected to.

    Both None for ``LOCAL`` / ``UNKNOWN``: the connection is the proxy's own.
    """

    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None


def read_header(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    """Parse the PROXY header at the start of ``data``.

    Returns the header and the bytes after it, or None while the header is
    incomplete (more bytes may make it whole); raises ``ProxyHeaderError`` as
    soon as the bytes cannot begin a header, or are one we refuse.
    """
    if not data:
        return None
    if data[:1] == V2_PREFIX[:1]:
        if not V2_PREFIX.startswith(data[:12]):
            raise ProxyHeaderError("no PROXY header")
        return _read_v2(data)
    if V1_PREFIX.startswith(data[:6]):
        return _read_v1(data)
    raise ProxyHeaderError("no PROXY header")


def _read_v1(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("v1 header longer than 107 bytes")
        return None
    line, rest = data[:end], data[end + 2 :]
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(None, None), rest  # Twisted's parser wants more words
    try:
        info = V1Parser.parse(line)
    except Exception as error:  # its own errors, and ValueError of a bad port
        raise ProxyHeaderError(f"bad v1 header ({type(error).__name__})") from None
    return _checked(info.source, info.destination, "v1"), rest


def _read_v2(data: bytes) -> tuple[ProxyHeader, bytes] | None:
    if len(data) < 16:
        return None
    if data[12] >> 4 != 2:
        raise ProxyHeaderError(f"v2 header of version {data[12] >> 4}")
    (length,) = struct.unpack("!H", data[14:16])
    if 16 + length > V2_MAX:
        raise ProxyHeaderError(f"v2 header of {16 + length} bytes")
    if len(data) < 16 + length:
        return None
    header, rest = data[: 16 + length], data[16 + length :]
    family = header[13]
    if header[12] & 0x0F == 1 and family not in (0x00, 0x11, 0x21):
        # Only TCP over IPv4 or IPv6 names a sender an allowlist can judge.
        raise ProxyHeaderError(f"v2 header for address family and protocol 0x{family:02x}")
    try:
        info = V2Parser.parse(header)
    except Exception as error:
        raise ProxyHeaderError(f"bad v2 header ({type(error).__name__})") from None
    return _checked(info.source, info.destination, "v2"), rest


def _checked(source: object, destination: object, version: str) -> ProxyHeader:
    if source is None:
        return ProxyHeader(None, None)
    if not isinstance(source, IPv4Address | IPv6Address) or not isinstance(
        destination, IPv4Address | IPv6Address
    ):
        raise ProxyHeaderError(f"{version} header without IP addresses")
    source, destination = _normal(source, version), _normal(destination, version)
    return ProxyHeader(source, destination)


def _normal(address: IPv4Address | IPv6Address, version: str) -> IPv4Address | IPv6Address:
    """The address checked, its host in the usual notation (``2001:db8::7``)."""
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise ProxyHeaderError(f"{version} header with a malformed address") from None
    if ip.version != (4 if isinstance(address, IPv4Address) else 6):
        raise ProxyHeaderError(f"{version} header with an address of the other family")
    if not 0 <= address.port <= 65535:
        raise ProxyHeaderError(f"{version} header with a malformed port")
    return type(address)("TCP", str(ip), address.port)


def in_networks(address: IAddress | None, networks: Sequence[Network]) -> bool:
    """Whether an address (an IPv4 peer on a dual-stack socket counts as itself) is listed."""
    try:
        ip = ipaddress.ip_address(getattr(address, "host", ""))
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    return any(candidate in network for candidate in candidates for network in networks)


@define
class ProxyStats:
    """Counts of a listener's PROXY-protocol connections; never an address."""

    #: Connections whose header named a sender.
    proxied: int = 0
    #: Connections whose header was LOCAL / UNKNOWN (the proxy's own, e.g. a health check).
    local: int = 0
    #: Connections closed for a header that is missing, malformed or refused.
    bad_headers: int = 0
    #: Connections closed because no complete header came within the timeout.
    header_timeouts: int = 0
    #: Connections closed at once: not from one of the listener's ``proxies``.
    not_from_proxy: int = 0
    #: Connections closed at once: too many were already waiting for their header.
    too_many_pending: int = 0
    #: Connections closed by their peer before sending a byte (a TCP health check).
    empty: int = 0


#: ``on_refused(reason, proxy_address)``: a connection was closed for its header;
#: ``proxy_address`` is the address it came from (the proxy's, not a sender's).
RefusalObserver = Callable[[str, str], None]


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads one PROXY header, then builds and serves the listener's protocol.

    Until the header is read, nothing of the listener exists for this
    connection. Afterwards it relays both ways, and ``getPeer`` / ``getHost``
    answer the addresses of the header.
    """

    factory: ProxyListenerFactory
    wrappedProtocol: IProtocol | None  # type: ignore[assignment]  # None until the header

    def __init__(self, factory: ProxyListenerFactory, proxy: IAddress | None) -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]  # built after the header
        self._proxy = proxy
        self._buffer = b""
        self._header: ProxyHeader | None = None
        self._timer: IDelayedCall | None = None
        self._pending = True
        self._refused = False

    def logPrefix(self) -> str:
        inner = self.wrappedProtocol
        name = inner.__class__.__name__ if inner is not None else "waiting for header"
        return f"{name} (PROXY)"

    # -- the transport side: the header's addresses once it is read

    @property
    def _real(self) -> Any:
        """The TCP transport under this wrapper (more than ITransport promises)."""
        assert self.transport is not None
        return self.transport

    def getPeer(self) -> IAddress:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self._real.getPeer()

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self._real.getHost()

    # -- the protocol side

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.clock.callLater(self.factory.header_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            parsed = read_header(self._buffer)
        except ProxyHeaderError as error:
            self.factory.stats.bad_headers += 1
            self._refuse(str(error))
            return
        if parsed is None:
            return
        header, rest = parsed
        self._buffer = b""
        self._header = header
        self._stop_waiting()
        if header.source is None:
            self.factory.stats.local += 1
        else:
            self.factory.stats.proxied += 1
        inner = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if inner is None:  # refused by the listener (allowlist, caps): it counted and logged
            self._refused = True
            self._real.loseConnection()
            return
        self.wrappedProtocol = inner
        # This wrapper is the inner protocol's transport (it provides what the real one does).
        inner.makeConnection(cast(ITransport, self))
        if rest and self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(rest)

    def _timed_out(self) -> None:
        self._timer = None
        self.factory.stats.header_timeouts += 1
        self._refuse("no PROXY header in time")

    def _refuse(self, reason: str) -> None:
        self._refused = True
        self._buffer = b""
        self._stop_waiting()
        self.factory.on_refused(reason, _host(self._proxy))
        self._real.abortConnection()

    def _stop_waiting(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pending:
            self._pending = False
            self.factory.pending -= 1

    def readConnectionLost(self) -> None:
        """The peer half-closed: passed on (a plain TCP message ends there), else closed."""
        inner = self.wrappedProtocol
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()
        else:
            self._real.loseConnection()

    def writeConnectionLost(self) -> None:
        inner = self.wrappedProtocol
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()
        else:
            self._real.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._pending and not self._buffer and self._header is None:
            self.factory.stats.empty += 1
        self._stop_waiting()
        self.factory.unregisterProtocol(self)
        inner, self.wrappedProtocol = self.wrappedProtocol, None
        if inner is not None:
            inner.connectionLost(reason)


class ProxyListenerFactory(Factory):
    """Wraps a listener's factory (which may refuse with None) behind the PROXY protocol.

    ``proxies``: when not empty, only connections from these networks are
    served (anyone else could claim any sender). ``max_pending``: connections
    waiting for their header at once; more are closed at once.
    """

    noisy = False

    def __init__(
        self,
        wrapped: Factory[Any],
        clock: IReactorTime,
        *,
        header_timeout: float,
        max_pending: int,
        proxies: Sequence[Network] = (),
        on_refused: RefusalObserver = lambda reason, proxy: None,
        stats: ProxyStats | None = None,
    ) -> None:
        self.wrappedFactory = wrapped
        self.clock = clock
        self.header_timeout = header_timeout
        self.max_pending = max_pending
        self.proxies = tuple(proxies)
        self.on_refused = on_refused
        self.stats = stats if stats is not None else ProxyStats()
        self.pending = 0
        self.protocols: dict[ProxyHeaderProtocol, int] = {}

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def logPrefix(self) -> str:
        return f"{self.wrappedFactory.logPrefix()} (PROXY)"

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol | None:  # type: ignore[override]
        if self.proxies and not in_networks(addr, self.proxies):
            self.stats.not_from_proxy += 1
            self.on_refused("not from a listed proxy", _host(addr))
            return None
        if self.pending >= self.max_pending:
            self.stats.too_many_pending += 1
            self.on_refused("too many connections waiting for a PROXY header", _host(addr))
            return None
        self.pending += 1
        return ProxyHeaderProtocol(self, addr)

    def registerProtocol(self, protocol: ProxyHeaderProtocol) -> None:
        self.protocols[protocol] = 1

    def unregisterProtocol(self, protocol: ProxyHeaderProtocol) -> None:
        self.protocols.pop(protocol, None)


def _host(address: IAddress | None) -> str:
    return str(getattr(address, "host", address))
