"""One tenant's listening port, as a child service of the gateway.

``GatewayService`` adds a ``ListenerService`` per tenant once recovery has
finished, so no connection is accepted before unfinished work resumed;
stopping it closes the port (connections already open finish on their own).
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from udsgateway.config import TenantConfig, proxied_endpoint
from udsgateway.inbound.listener import ListenerFactory
from udsgateway.wire.tls import TLSListenerFactory, server_options

log = Logger()


@define(eq=False)
class ListenerService(Service):
    """Listens on the tenant's ``listen`` endpoint (with TLS when configured).

    ``haproxy:<endpoint>`` listens on ``<endpoint>`` behind the PROXY
    protocol (``wire/proxy.py``): the header is read first, then TLS if any.

    ``listening`` fires with the port once it is open, or fails with the
    endpoint's error (``CannotListenError`` for a port in use); ``address`` is
    the address listened on, None while not listening.
    """

    tenant: TenantConfig
    factory: ListenerFactory
    reactor: Any
    listening: Deferred[IListeningPort] = field(init=False, factory=Deferred)
    port: IListeningPort | None = field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.name = f"listener {self.tenant.name}"

    @property
    def address(self) -> IAddress | None:
        return self.port.getHost() if self.port is not None else None

    def startService(self) -> None:
        super().startService()
        if self.listening.called:
            self.listening = Deferred()
        factory: Any = self.factory
        if self.tenant.tls.enabled:
            factory = TLSListenerFactory(server_options(self.tenant.tls), False, factory)
        endpoint = self.tenant.listen
        inner = proxied_endpoint(endpoint)
        if inner:
            # The PROXY header is read before anything else, TLS included.
            endpoint = inner
            factory = self.factory.behind_proxy(factory)
        opening = maybeDeferred(serverFromString(self.reactor, endpoint).listen, factory)
        opening.addCallbacks(self._opened, self._not_opened)

    def _opened(self, port: IListeningPort) -> None:
        if not self.running:
            # Stopped while the port was opening: close it at once.
            port.stopListening()
            return
        self.port = port
        log.info(
            "tenant {tenant} listening on {address}",
            tenant=self.tenant.name,
            address=str(port.getHost()),
        )
        self.listening.callback(port)

    def _not_opened(self, failure: Failure) -> None:
        self.listening.errback(failure)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        closing: Deferred[Any] = maybeDeferred(port.stopListening)
        return closing.addCallback(lambda _: None)
