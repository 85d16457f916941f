"""Tests for udsgateway.wire.proxy: a tenant's listener behind the PROXY protocol.

The real listener of one tenant (``udsgateway.testing.Gateway``) behind
``ListenerFactory.behind_proxy()``, on ``StringTransport`` and ``task.Clock``:
the load balancer connects from its own address and names the sender in a
v1 or v2 header; the allowlist, the per-address caps, the stored message and
the logs must see the sender.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.test_ingest import GatewayTestCase, hl7, one_reply
from udsgateway.config import ConfigError, Limits, TenantConfig, parse_config
from udsgateway.testing import Gateway, mllp
from udsgateway.wire.proxy import (
    V2_PREFIX,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderProtocol,
    ProxyListenerFactory,
    read_header,
)

#: The load balancer's address, as the listener's socket sees it.
HAPROXY = "10.9.9.9"


def v1(source: str, port: int = 40000, family: str = "TCP4") -> bytes:
    destination = "10.0.0.1" if family == "TCP4" else "2001:db8::1"
    return f"PROXY {family} {source} {destination} {port} 2575\r\n".encode()


def v2(source: str, port: int = 40000, command: int = 1) -> bytes:
    """A v2 header (PROXY command, TCP over IPv4 or IPv6), or LOCAL with ``command=0``."""
    if command == 0:
        return V2_PREFIX + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if ":" in source:
        body = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(
            socket.AF_INET6, "2001:db8::1"
        )
        family = 0x21
    else:
        body = socket.inet_aton(source) + socket.inet_aton("10.0.0.1")
        family = 0x11
    body += struct.pack("!HH", port, 2575)
    return V2_PREFIX + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def tenant(**kwargs: object) -> TenantConfig:
    return TenantConfig(name="test", listen="haproxy:tcp:port=0", **kwargs)  # type: ignore[arg-type]


class Proxied:
    """One connection from the load balancer to a gateway's listener behind the PROXY protocol."""

    def __init__(self, factory: ProxyListenerFactory, proxy: str = HAPROXY, port: int = 50000):
        address = IPv4Address("TCP", proxy, port)
        protocol = factory.buildProtocol(address)
        self.refused_at_once = protocol is None
        self.transport = StringTransport(peerAddress=address)
        if protocol is not None:
            assert isinstance(protocol, ProxyHeaderProtocol)
            self.protocol = protocol
            protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting) or self.refused_at_once

    def hang_up(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


class _Conn:
    """Adapts Proxied to ``one_reply`` (which reads ``received()``)."""

    def __init__(self, proxied: Proxied) -> None:
        self._proxied = proxied

    def received(self) -> bytes:
        data = self._proxied.transport.value()
        self._proxied.transport.clear()
        return data


def reply_code(proxied: Proxied) -> str:
    return one_reply(_Conn(proxied)).code  # type: ignore[arg-type]


class HeaderTests(SynchronousTestCase):
    """read_header on its own: v1, v2, incomplete, refused."""

    def test_v1_and_rest(self) -> None:
        header, rest = read_header(v1("192.0.2.10", 41000) + b"\x0bMSH") or (None, b"")
        assert header is not None
        self.assertEqual(header.source, IPv4Address("TCP", "192.0.2.10", 41000))
        self.assertEqual(header.destination, IPv4Address("TCP", "10.0.0.1", 2575))
        self.assertEqual(rest, b"\x0bMSH")

    def test_v1_ipv6(self) -> None:
        parsed = read_header(v1("2001:db8::7", family="TCP6"))
        assert parsed is not None
        self.assertEqual(parsed[0].source, IPv6Address("TCP", "2001:db8::7", 40000))

    def test_v2_ipv4_and_ipv6(self) -> None:
        for source, kind in (("192.0.2.10", IPv4Address), ("2001:db8::7", IPv6Address)):
            parsed = read_header(v2(source, 41000) + b"rest")
            assert parsed is not None
            self.assertEqual(parsed[0].source, kind("TCP", source, 41000))
            self.assertEqual(parsed[1], b"rest")

    def test_local_and_unknown_name_no_sender(self) -> None:
        self.assertEqual(read_header(v2("", command=0)), (ProxyHeader(None, None), b""))
        self.assertEqual(read_header(b"PROXY UNKNOWN\r\nx"), (ProxyHeader(None, None), b"x"))

    def test_every_prefix_is_incomplete_not_bad(self) -> None:
        """Each proper prefix of a header asks for more bytes; none is refused."""
        for header in (v1("192.0.2.10"), v2("192.0.2.10"), v2("2001:db8::7")):
            for size in range(len(header)):
                self.assertIsNone(read_header(header[:size]), (header, size))

    def test_bad_headers(self) -> None:
        bad = [
            mllp(hl7("DIRECT")),  # a sender straight to the port, no header
            b"MSH|^~\\&|",
            b"GET / HTTP/1.1\r\n",
            b"PROXY TCP4 192.0.2.10 10.0.0.1 port 2575\r\n",  # a port that is no number
            b"PROXY TCP4 somehost 10.0.0.1 1 2575\r\n",  # not an address
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2575\r\n",  # the other family
            b"PROXY TCP5 192.0.2.10 10.0.0.1 1 2575\r\n",
            b"PROXY TCP4 192.0.2.10\r\n",
            b"PROXY " + b"1" * 120,  # no CRLF within 107 bytes
            V2_PREFIX + bytes([0x11, 0x11]) + struct.pack("!H", 12) + bytes(12),  # version 1
            V2_PREFIX + bytes([0x23, 0x11]) + struct.pack("!H", 12) + bytes(12),  # command 3
            V2_PREFIX + bytes([0x21, 0x12]) + struct.pack("!H", 12) + bytes(12),  # UDP
            V2_PREFIX + bytes([0x21, 0x31]) + struct.pack("!H", 216) + bytes(216),  # UNIX
            V2_PREFIX + bytes([0x21, 0x11]) + struct.pack("!H", 4) + bytes(4),  # too short
            V2_PREFIX + bytes([0x21, 0x11]) + struct.pack("!H", 60000),  # too long
            b"\r\n\r\nMSH",
        ]
        for data in bad:
            with self.assertRaises(ProxyHeaderError, msg=repr(data)):
                read_header(data)


class ProxiedListenerTests(GatewayTestCase):
    """The listener behind the PROXY protocol sees the sender named by the header."""

    def setUp(self) -> None:
        super().setUp()
        self.gateway = Gateway(tenant=tenant())
        self.proxy = self.gateway.factory.behind_proxy()

    def connect(self, proxy: str = HAPROXY, port: int = 50000) -> Proxied:
        return Proxied(self.proxy, proxy, port)

    def test_v1_sender_stored_and_acked(self) -> None:
        """v1 header then a frame in the same read: AA; the stored peer is the sender's."""
        connection = self.connect()
        connection.send(v1("192.0.2.10") + mllp(hl7("V1")))
        self.assertEqual(reply_code(connection), "AA")
        [stored] = self.gateway.messages()
        self.assertEqual(stored.peer, "192.0.2.10")
        self.assertEqual(self.gateway.factory.stats.proxy.proxied, 1)
        self.assertEqual(connection.protocol.getPeer(), IPv4Address("TCP", "192.0.2.10", 40000))
        self.assertEqual(connection.protocol.getHost(), IPv4Address("TCP", "10.0.0.1", 2575))

    def test_v2_ipv4_and_ipv6_senders(self) -> None:
        for source, control_id in (("192.0.2.11", "V2A"), ("2001:db8::7", "V2B")):
            connection = self.connect()
            connection.send(v2(source) + mllp(hl7(control_id)))
            self.assertEqual(reply_code(connection), "AA")
        self.assertEqual([m.peer for m in self.gateway.messages()], ["192.0.2.11", "2001:db8::7"])

    def test_header_split_across_reads(self) -> None:
        """One byte per read, header and frame: the same answer as in one read."""
        for header, control_id in ((v1("192.0.2.12"), "SPLIT1"), (v2("192.0.2.13"), "SPLIT2")):
            connection = self.connect()
            for byte in header + mllp(hl7(control_id)):
                connection.send(bytes([byte]))
            self.assertEqual(reply_code(connection), "AA")
            self.assertFalse(connection.closed)
        self.assertEqual([m.peer for m in self.gateway.messages()], ["192.0.2.12", "192.0.2.13"])

    def test_half_close_reaches_the_listener(self) -> None:
        """Plain TCP ended by the sender's half-close: the message gets its ACK, then close.
        A half-close before the header is complete closes the connection."""
        connection = self.connect()
        connection.send(v2("192.0.2.15") + hl7("HALF"))
        self.assertEqual(connection.transport.value(), b"")
        connection.protocol.readConnectionLost()
        self.assertIn(b"MSA|AA|HALF", connection.transport.value())
        self.assertTrue(connection.closed)
        self.assertEqual([m.peer for m in self.gateway.messages()], ["192.0.2.15"])
        early = self.connect(port=50001)
        early.send(v1("192.0.2.16")[:10])
        early.protocol.readConnectionLost()
        self.assertTrue(early.closed)

    def test_listener_not_built_before_header(self) -> None:
        """No connection counted by the listener until the header names the sender."""
        connection = self.connect()
        connection.send(v2("192.0.2.14")[:10])
        self.assertEqual(self.gateway.factory.stats.connections, 0)
        self.assertIsNone(connection.protocol.wrappedProtocol)
        connection.send(v2("192.0.2.14")[10:])
        self.assertEqual(self.gateway.factory.stats.connections, 1)
        connection.hang_up()
        self.assertEqual(self.gateway.factory.stats.open_connections, 0)

    def test_allowlist_judges_the_sender(self) -> None:
        """Allowed sender through a proxy outside the allowlist: served; a refused one: closed."""
        self.gateway = Gateway(tenant=tenant(allow=(ipaddress.ip_network("192.0.2.0/24"),)))
        self.proxy = self.gateway.factory.behind_proxy()
        allowed = self.connect()
        allowed.send(v2("192.0.2.20") + mllp(hl7("ALLOWED")))
        self.assertEqual(reply_code(allowed), "AA")
        refused = self.connect(port=50001)
        refused.send(v2("198.51.100.7") + mllp(hl7("REFUSED")))
        self.assertTrue(refused.closed)
        self.assertEqual(refused.transport.value(), b"")
        self.assertEqual(self.gateway.factory.stats.refused, 1)
        self.assertEqual([m.control_id for m in self.gateway.messages()], ["ALLOWED"])
        [line] = self.gateway_events("connection refused")
        self.assertEqual(line["peer"], "198.51.100.7")
        refused.hang_up()  # the reactor reports the close: nothing counted twice
        self.assertEqual(self.gateway.factory.stats.open_connections, 1)

    def test_local_header_judged_as_the_proxy(self) -> None:
        """LOCAL (the proxy's own connection): the proxy's address is the peer."""
        self.gateway = Gateway(tenant=tenant(allow=(ipaddress.ip_network("192.0.2.0/24"),)))
        self.proxy = self.gateway.factory.behind_proxy()
        local = self.connect()
        local.send(v2("", command=0))
        self.assertTrue(local.closed)  # the proxy's address is not in the allowlist
        self.assertEqual(self.gateway.factory.stats.proxy.local, 1)
        [line] = self.gateway_events("connection refused")
        self.assertEqual(line["peer"], HAPROXY)

    def test_per_peer_limit_counts_senders_not_the_proxy(self) -> None:
        """Two connections per sender: the third of one sender is closed, another sender's not."""
        self.gateway = Gateway(tenant=tenant(limits=Limits(max_connections_per_peer=2)))
        self.proxy = self.gateway.factory.behind_proxy()
        first, second, third, other = (self.connect(port=50000 + n) for n in range(4))
        first.send(v1("192.0.2.30", 1))
        second.send(v1("192.0.2.30", 2))
        third.send(v1("192.0.2.30", 3))
        other.send(v1("192.0.2.31", 1))
        self.assertEqual([c.closed for c in (first, second, third, other)], [0, 0, 1, 0])
        for connection in (first, second, other):
            connection.send(mllp(hl7("PEER")))
            self.assertEqual(reply_code(connection), "AA")
        second.hang_up()
        again = self.connect(port=50010)
        again.send(v1("192.0.2.30", 4))
        self.assertFalse(again.closed)

    def test_bad_header_closed_counted_logged(self) -> None:
        """A sender straight to the port (no header): closed, counted, one log line."""
        connection = self.connect(proxy="192.0.2.99")
        connection.send(mllp(hl7("DIRECT")))
        self.assertTrue(connection.transport.disconnecting)
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(self.gateway.factory.stats.proxy.bad_headers, 1)
        self.assertEqual(self.gateway.factory.stats.connections, 0)
        self.assertEqual(self.gateway.messages(), [])
        [line] = self.gateway_events("PROXY protocol")
        self.assertEqual((line["reason"], line["proxy"]), ("no PROXY header", "192.0.2.99"))
        connection.send(v1("192.0.2.10"))  # bytes after the close are ignored
        connection.hang_up()
        self.assertEqual(self.gateway.factory.stats.proxy.empty, 0)
        self.assertEqual(self.proxy.pending, 0)

    def test_bad_header_logs_rate_limited(self) -> None:
        """Hundreds of bad headers of one kind: one line; another kind still gets its line."""
        for port in range(500):
            self.connect(port=port).send(b"junk\r\n")
        self.connect(port=600)
        self.gateway.clock.advance(10)  # the one left waiting times out
        self.assertEqual(self.gateway.factory.stats.proxy.bad_headers, 500)
        self.assertEqual(
            [event["reason"] for event in self.gateway_events("PROXY protocol")],
            ["no PROXY header", "no PROXY header in time"],
        )
        self.gateway.clock.advance(10)
        self.connect(port=700).send(b"junk\r\n")
        [*_, last] = self.gateway_events("PROXY protocol")
        self.assertEqual((last["reason"], last["suppressed"]), ("no PROXY header", 499))

    def test_header_timeout(self) -> None:
        """No complete header within proxy_header_timeout: closed and counted; in time: fine."""
        slow = self.connect(port=1)
        slow.send(v2("192.0.2.40")[:20])
        on_time = self.connect(port=2)
        self.gateway.clock.advance(9.9)
        on_time.send(v1("192.0.2.41"))
        self.assertFalse(slow.closed)
        self.gateway.clock.advance(0.2)
        self.assertTrue(slow.closed)
        self.assertFalse(on_time.closed)
        self.assertEqual(self.gateway.factory.stats.proxy.header_timeouts, 1)
        self.gateway.clock.advance(100)
        self.assertFalse(on_time.closed)  # its timer was cancelled by the header
        self.assertEqual(self.gateway.clock.getDelayedCalls()[0:0], [])

    def test_empty_connection_counted_not_logged(self) -> None:
        """A TCP health check (connect, close): counted as empty, no log line, no timer left."""
        connection = self.connect()
        connection.hang_up()
        self.assertEqual(self.gateway.factory.stats.proxy.empty, 1)
        self.assertEqual(self.gateway_events("PROXY protocol"), [])
        self.assertEqual(self.proxy.pending, 0)
        self.assertFalse(any(call.active() for call in self.gateway.clock.getDelayedCalls()))

    def test_only_listed_proxies(self) -> None:
        """With ``proxies`` set, a connection from elsewhere is closed before any byte."""
        self.gateway = Gateway(tenant=tenant(proxies=(ipaddress.ip_network("10.9.9.0/24"),)))
        self.proxy = self.gateway.factory.behind_proxy()
        stranger = self.connect(proxy="192.0.2.50")
        self.assertTrue(stranger.refused_at_once)
        self.assertEqual(self.gateway.factory.stats.proxy.not_from_proxy, 1)
        listed = self.connect()
        listed.send(v1("192.0.2.51") + mllp(hl7("LISTED")))
        self.assertEqual(reply_code(listed), "AA")

    def test_connections_waiting_for_a_header_bounded(self) -> None:
        """At most max_connections wait for their header; the next is closed at once."""
        self.gateway = Gateway(tenant=tenant(limits=Limits(max_connections=3)))
        self.proxy = self.gateway.factory.behind_proxy()
        waiting = [self.connect(port=n) for n in range(3)]
        self.assertTrue(self.connect(port=10).refused_at_once)
        self.assertEqual(self.gateway.factory.stats.proxy.too_many_pending, 1)
        waiting[0].send(v1("192.0.2.60"))  # no longer waiting
        self.assertFalse(self.connect(port=11).refused_at_once)


class ProxyConfigTests(SynchronousTestCase):
    """The ``haproxy:`` listen form and ``proxies`` in the configuration file."""

    def parse(self, tenant_lines: str) -> TenantConfig:
        text = f'[[tenants]]\nname = "t"\n{tenant_lines}\n'
        return parse_config(text, "proxy.toml").tenants[0]

    def problems(self, tenant_lines: str) -> list[str]:
        with self.assertRaises(ConfigError) as raised:
            self.parse(tenant_lines)
        return raised.exception.problems

    def test_haproxy_listen_and_proxies(self) -> None:
        config = self.parse(
            'listen = "haproxy:tcp:port=2575:interface=127.0.0.1"\n'
            'proxies = ["10.0.0.5", "10.0.1.0/24"]\n'
            "limits.proxy_header_timeout = 3"
        )
        self.assertEqual(
            config.proxies,
            (ipaddress.ip_network("10.0.0.5/32"), ipaddress.ip_network("10.0.1.0/24")),
        )
        self.assertEqual(config.limits.proxy_header_timeout, 3.0)

    def test_refused_forms(self) -> None:
        self.assertEqual(
            self.problems('listen = "haproxy:ssl:port=2575"'),
            [
                "proxy.toml: tenants[0].listen: the endpoint after 'haproxy:' must be tcp, "
                "tcp6 or unix (e.g. 'haproxy:tcp:port=2575'), not 'ssl'; "
                "for TLS use [tenants.tls]"
            ],
        )
        for listen in ("haproxy:", "haproxy:haproxy:tcp:port=1"):
            [problem] = self.problems(f'listen = "{listen}"')
            self.assertIn("must be tcp, tcp6 or unix", problem)
        self.assertEqual(
            self.problems('listen = "tcp:port=2575"\nproxies = ["10.0.0.5"]'),
            [
                "proxy.toml: tenants[0].proxies: used only behind the PROXY protocol "
                "(listen = 'haproxy:...')"
            ],
        )
        [problem] = self.problems('listen = "haproxy:tcp:port=1"\nproxies = ["nohost"]')
        self.assertIn("proxies: not an address or network: 'nohost'", problem)
