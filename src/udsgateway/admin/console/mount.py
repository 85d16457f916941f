"""The console mounted in the admin service's site, beside the JSON API.

The API judges each request before its body is read (``AdminRequest``):
bearer token or session, JSON only. The console's pages are HTML forms under
``/console`` and authenticate with the session cookie themselves, so their
requests skip the API's gate but keep a cap on the body size.
"""

from __future__ import annotations

from typing import Any

from twisted.web import server

from udsgateway.admin.console.security import DatabaseAccounts
from udsgateway.admin.console.web import MAX_BODY, PREFIX, Console
from udsgateway.admin.http import AdminRequest, AdminSite, HTTPError
from udsgateway.admin.operations import Operations, listening_addresses


def is_console_path(path: bytes) -> bool:
    prefix = PREFIX.encode()
    return path in (b"", b"/", prefix) or path.startswith(prefix + b"/")


class ConsoleOrAPIRequest(AdminRequest):
    """A request answered by the console under ``/console``, by the API elsewhere."""

    for_console = False

    def gotLength(self, length: int | None) -> None:
        target = getattr(self.channel, "_path", b"")
        if not is_console_path(target.split(b"?", 1)[0]):
            super().gotLength(length)
            return
        self.for_console = True
        if length is not None and length > MAX_BODY:
            self.refuse(HTTPError(413, "the request body is too large"))
            return
        server.Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if not self.for_console:
            super().handleContentChunk(data)
            return
        if self.refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self.refuse(HTTPError(413, "the request body is too large"))
            return
        server.Request.handleContentChunk(self, data)

    def process(self) -> None:
        if self.for_console:
            server.Request.process(self)
        else:
            super().process()


class ConsoleSite(AdminSite):
    """The admin API plus the console (``/console``)."""

    requestFactory = ConsoleOrAPIRequest

    def __init__(self, app: Any, console: Console, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.resource = console


def console_for(api: Any, gateway: Any) -> Console:
    """The console over the admin API's operations facade, sessions and login throttle
    (a facade of its own over the API's database when the API has none)."""
    operations = api.operations
    if operations is None:
        operations = Operations(
            api.database,
            api.clock,
            api.wall,
            dispatcher=getattr(gateway, "dispatcher", None),
            addresses=lambda: listening_addresses(gateway),
            tenants={tenant.name: tenant for tenant in gateway.config.tenants},
            reload_flows=getattr(gateway, "reload_flows", None),
        )

    def on_login(session: Any, principal: Any) -> None:
        # The same session works for the JSON API (a script run from the browser).
        api.session_users[session.id] = principal

    return Console(
        operations,
        DatabaseAccounts(api.database, api.offload),
        secure=api.secure,
        clock=api.clock.seconds,
        sessions=api.sessions,
        throttle=api.throttle,
        on_login=on_login,
    )


def console_site(api: Any, reactor: Any) -> ConsoleSite:
    """The admin service's site with the console mounted."""
    return ConsoleSite(api.app(), console_for(api, api.gateway), reactor=reactor)
