"""TLS on a listener: TLS 1.2+, mutual authentication, handshake timeout.

Real loopback sockets (the listener on port 0, its port read back), certificates
made by the test.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from udsgateway.config import Limits, ListenerTLS, TenantConfig
from udsgateway.hl7.ack import parse_reply
from udsgateway.testing import Gateway, mllp
from udsgateway.wire.tls import TLSListenerFactory, server_options

MESSAGE = (
    b"MSH|^~\\&|HIS|Hospital|LSQ|LeadSquared|202401011230||ADT^A04|TLS00001|P|2.3\r"
    b"EVN|A04|202401011230\rPID|1||12345^^^Hospital||Doe^John||19800101|M\r"
)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    ca: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256()), key


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"\x1c\r") and not self.done.called:
            self.done.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        if not self.done.called:
            self.done.callback(self.data)
        self.lost.callback(None)


class MutualTLSTests(TestCase):
    """A TLS listener with client certificates required (mutual authentication)."""

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.ca, self.ca_key = _certificate("udsgateway test CA", None, ca=True)
        server, server_key = _certificate("localhost", (self.ca, self.ca_key))
        self.client, self.client_key = _certificate("sender", (self.ca, self.ca_key))
        (folder / "server.pem").write_bytes(_pem(server))
        (folder / "server.key").write_bytes(_key_pem(server_key))
        (folder / "ca.pem").write_bytes(_pem(self.ca))
        tls = ListenerTLS(
            enabled=True,
            certificate=str(folder / "server.pem"),
            private_key=str(folder / "server.key"),
            client_ca=str(folder / "ca.pem"),
        )
        tenant = TenantConfig(name="test", listen="tcp:0", tls=tls)
        # Timers run on the harness's fake clock; the bytes go over real TLS sockets.
        self.gateway = Gateway(tenant=tenant)
        factory = self._factory(
            TLSListenerFactory(server_options(tls), False, self.gateway.factory)
        )
        listening = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        return listening.addCallback(self._listening)

    def _factory(self, tls: TLSListenerFactory) -> Any:
        return tls

    def _listening(self, port: Any) -> None:
        self.addCleanup(port.stopListening)
        self.port: int = port.getHost().port

    def _options(self, with_certificate: bool) -> Any:
        authority = ssl.Certificate.loadPEM(_pem(self.ca))
        client = (
            ssl.PrivateCertificate.loadPEM(_pem(self.client) + _key_pem(self.client_key))
            if with_certificate
            else None
        )
        return ssl.optionsForClientTLS("localhost", authority, client)

    def _connect(self, with_certificate: bool) -> Deferred[bytes]:
        options = self._options(with_certificate)
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", self.port, options, timeout=5)
        collect = _Collect()
        self.collect = collect

        def connected(protocol: Any) -> Deferred[bytes]:
            protocol.transport.write(mllp(MESSAGE))
            collect.done.addTimeout(10, reactor)
            return collect.done

        return endpoint.connect(Factory.forProtocol(lambda: collect)).addCallback(connected)

    def test_client_with_certificate_gets_aa(self) -> Deferred[None]:
        """A sender presenting a certificate from the configured CA gets its AA over TLS."""

        def check(data: bytes) -> Deferred[None]:
            reply = parse_reply(data.strip(b"\x0b\x1c\r"))
            self.assertEqual((reply.ack_code, reply.control_id), ("AA", "TLS00001"))
            self.assertEqual(len(self.gateway.messages()), 1)
            self.collect.transport.loseConnection()  # type: ignore[union-attr]
            return self.collect.lost

        return self._connect(with_certificate=True).addCallback(check)

    def test_client_without_certificate_is_refused(self) -> Deferred[None]:
        """Without a client certificate the TCP connection opens, then the server
        ends the handshake with the TLS alert for a missing certificate: the sender
        loses the connection with that SSL error, gets no byte, nothing is stored."""

        def check(data: bytes) -> None:
            self.assertEqual(data, b"")
            reason = self.collect.reason
            assert reason is not None
            self.assertIsInstance(reason.value, SSL.Error, reason)
            # TLS 1.3 names the alert; a TLS 1.2 server answers a generic handshake failure.
            self.assertRegex(str(reason.value), "certificate required|handshake failure")
            self.assertEqual(self.gateway.messages(), [])

        return self._connect(with_certificate=False).addCallback(check)


class _ProxiedCollect(_Collect):
    """A sender through a load balancer: the PROXY header in clear, then TLS."""

    def __init__(self, options: Any) -> None:
        super().__init__()
        self.options = options

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"PROXY TCP4 192.0.2.77 10.0.0.1 41000 2575\r\n")
        self.transport.startTLS(self.options)  # type: ignore[attr-defined]


class ProxiedMutualTLSTests(MutualTLSTests):
    """The same TLS listener behind the PROXY protocol (``haproxy:`` in front of
    [tenants.tls]): the header is read first, then the handshake; the stored
    peer is the sender named by the header."""

    def _factory(self, tls: TLSListenerFactory) -> Any:
        return self.gateway.factory.behind_proxy(tls)

    def _connect(self, with_certificate: bool) -> Deferred[bytes]:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=5)
        collect = _ProxiedCollect(self._options(with_certificate))
        self.collect = collect

        def connected(protocol: Any) -> Deferred[bytes]:
            protocol.transport.write(mllp(MESSAGE))
            collect.done.addTimeout(10, reactor)
            return collect.done

        return endpoint.connect(Factory.forProtocol(lambda: collect)).addCallback(connected)

    def test_sender_address_from_the_header(self) -> Deferred[None]:
        def check(data: bytes) -> Deferred[None]:
            self.assertIn(b"MSA|AA|TLS00001", data)
            [stored] = self.gateway.messages()
            self.assertEqual(stored.peer, "192.0.2.77")
            self.collect.transport.loseConnection()  # type: ignore[union-attr]
            return self.collect.lost

        return self._connect(with_certificate=True).addCallback(check)


class HandshakeTimeoutTests(SynchronousTestCase):
    """The TLS handshake must finish within tls_handshake_timeout."""

    def _gateway(self) -> Gateway:
        tls = ListenerTLS(enabled=True, certificate="c", private_key="k")
        limits = Limits(tls_handshake_timeout=10.0)
        return Gateway(tenant=TenantConfig(name="test", listen="tcp:0", tls=tls, limits=limits))

    def test_stalled_handshake_is_closed(self) -> None:
        """A connection whose handshake never completes is closed at the timeout."""
        gateway = self._gateway()
        connection = gateway.connect()
        gateway.clock.advance(9.9)
        self.assertFalse(connection.closed)
        gateway.clock.advance(0.2)
        self.assertTrue(connection.closed)
        self.assertEqual(gateway.factory.stats.handshake_timeouts, 1)

    def test_completed_handshake_cancels_the_timer(self) -> None:
        """Once the handshake completed, the handshake timeout no longer closes anything."""
        gateway = self._gateway()
        connection = gateway.connect()
        connection.protocol.handshakeCompleted()
        gateway.clock.advance(60)
        self.assertFalse(connection.closed)
