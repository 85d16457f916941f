"""The admin service as a child of the gateway: its listener and its refresh timer.

It listens as soon as it starts (``/healthz`` answers while the gateway
recovers; ``/readyz`` says when it is ready). Once the gateway is ready, a
timer reloads the usable API tokens and the database-derived metrics every
``refresh_interval`` seconds, in the database thread, never during a request.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from udsgateway.admin.api import AdminAPI
from udsgateway.admin.auth import LoginThrottle
from udsgateway.admin.http import AdminSite
from udsgateway.admin.metrics import Metrics
from udsgateway.admin.operations import Operations
from udsgateway.admin.sessions import SessionStore
from udsgateway.config import AdminConfig
from udsgateway.wire.tls import server_options

log = Logger()


class AdminService(Service):
    """Listens for the admin API; refreshes tokens and metrics on a timer."""

    def __init__(self, config: AdminConfig, api: AdminAPI, reactor: Any) -> None:
        self.config = config
        self.api = api
        self._reactor = reactor
        self.port: IListeningPort | None = None
        self._refresh = LoopingCall(self.refresh)
        self._refresh.clock = reactor

    def site(self) -> AdminSite:
        # The web console (docs/console.md) is served beside the API, under /console.
        from udsgateway.admin.console.mount import console_site

        return console_site(self.api, self._reactor)

    def startService(self) -> None:
        super().startService()
        rates = getattr(self.api.operations, "rates", None)
        if rates is not None:
            rates.start()
        Deferred.fromCoroutine(self._start()).addErrback(
            lambda f: log.failure("the admin service could not start", f)
        )

    async def _start(self) -> None:
        factory: Any = self.site()
        if self.config.tls.enabled:
            factory = TLSMemoryBIOFactory(server_options(self.config.tls), False, factory)
        self.port = await serverFromString(self._reactor, self.config.listen).listen(factory)
        log.info("admin API listening on {address}", address=str(self.port.getHost()))
        ready = getattr(self.api.gateway, "ready", None)
        if ready is None:
            self._start_refresh(None)
        else:
            # After the gateway's start (schema made, recovery done); a callback
            # leaves its result, a failed start, to the others that wait for it.
            ready.addCallback(self._start_refresh)

    def _start_refresh(self, result: object) -> object:
        if self.running and not self._refresh.running:
            self._refresh.start(self.config.refresh_interval, now=True).addErrback(
                lambda f: log.failure("admin refresh loop stopped", f)
            )
        return result

    async def refresh(self) -> None:
        try:
            await self.api.refresh_tokens()
            if self.api.metrics is not None:
                await self.api.metrics.refresh(self.api.database)
        except Exception:
            log.failure("admin refresh failed; tried again at the next interval")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        rates = getattr(self.api.operations, "rates", None)
        if rates is not None:
            rates.stop()
        if self._refresh.running:
            self._refresh.stop()
        port, self.port = self.port, None
        if port is None:
            return Deferred.fromCoroutine(_nothing())
        result: Deferred[None] = Deferred.fromCoroutine(_stop(port))
        return result


async def _nothing() -> None:
    return None


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


def admin_service(config: AdminConfig, gateway: Any, reactor: Any) -> AdminService:
    """The admin service over a GatewayService (tap.py adds it as a child service)."""

    def offload(function: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)

    operations = Operations.shared(gateway, reactor, time.time)
    api = AdminAPI(
        database=gateway.database,
        clock=reactor,
        wall=time.time,
        offload=offload,
        gateway=gateway,
        operations=operations,
        metrics=Metrics(gateway),
        secure=config.tls.enabled,
        max_body_size=config.max_body_size,
        sessions=SessionStore(timeout=config.session_timeout),
        throttle=LoginThrottle(gateway.database, config.lockout_failures, config.lockout_seconds),
    )
    return AdminService(config, api, reactor)
