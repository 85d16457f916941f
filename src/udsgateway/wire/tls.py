"""TLS for listeners: TLS 1.2 or newer, with optional mutual authentication.

A tenant's listener keeps its plain ``tcp:`` endpoint string; when the
tenant has ``[tenants.tls]`` enabled, the listener's factory is wrapped in
TLS here, so the allowlist and connection caps still act before any byte
(even a handshake byte) is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from twisted.internet import ssl
from twisted.internet.interfaces import IAddress
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol


class TLSFiles(Protocol):
    """Where a listener's PEM files are (the configuration's ``[tenants.tls]`` has these)."""

    @property
    def certificate(self) -> str: ...

    @property
    def private_key(self) -> str: ...

    @property
    def client_ca(self) -> str | None: ...


def server_options(config: TLSFiles) -> ssl.CertificateOptions:
    """Certificate options of a listener: our certificate, and the client CAs for mTLS."""
    certificate = ssl.PrivateCertificate.loadPEM(
        Path(config.certificate).read_text() + Path(config.private_key).read_text()
    )
    extra: dict[str, Any] = {}
    if config.client_ca:
        authorities = [
            ssl.Certificate.loadPEM(pem.encode())
            for pem in _pem_blocks(Path(config.client_ca).read_text())
        ]
        extra = {
            "verify": True,
            "requireCertificate": True,
            "caCerts": [authority.original for authority in authorities],
        }
    return ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        **extra,
    )


def _pem_blocks(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [block + end for block in text.split(end) if "-----BEGIN CERTIFICATE-----" in block]


class TLSListenerFactory(TLSMemoryBIOFactory):
    """TLS around a listener factory that may refuse a connection (returns None)."""

    noisy = False

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        protocol: TLSMemoryBIOProtocol = self.protocol(self, inner)
        return protocol
