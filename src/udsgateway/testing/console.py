"""The web console in memory: a browser-less client over ``StringTransport``.

With the store on the synchronous runner (``InlineRunner``) every request is
answered before ``request`` returns, so the tests need no reactor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from udsgateway.admin.console.security import MemoryAccounts
from udsgateway.admin.console.web import Console
from udsgateway.admin.operations import Operations
from udsgateway.config import TenantConfig

ORIGIN = "http://console.test"
HOST = "console.test"


@define
class Response:
    status: int
    headers: dict[str, list[str]]
    body: str

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get("transfer-encoding") == ["chunked"]:
        decoded = b""
        rest = body
        while rest:
            size_text, _, rest = rest.partition(b"\r\n")
            size = int(size_text, 16)
            if size == 0:
                break
            decoded += rest[:size]
            rest = rest[size + 2 :]
        body = decoded
    return Response(status, headers, body.decode("utf-8", "replace"))


def demo_accounts() -> MemoryAccounts:
    """admin (with content), operator, viewer: passwords are the names twice."""
    accounts = MemoryAccounts()
    accounts.add("admin", "adminadmin", "admin", view_content=True)
    accounts.add("operator", "operatoroperator", "operator")
    accounts.add("viewer", "viewerviewer", "viewer")
    return accounts


@define
class ConsoleClient:
    """One browser's cookies against a console served from memory."""

    console: Console
    cookies: dict[str, str] = field(factory=dict)
    csrf_token: str = ""

    @classmethod
    def over(
        cls,
        database: Any,
        clock: Any,
        *,
        tenant: TenantConfig | None = None,
        dispatcher: Any = None,
        executor: Any = None,
        accounts: MemoryAccounts | None = None,
        operations: Any = None,
    ) -> ConsoleClient:
        """The console over an operations facade of ``database`` on ``clock`` (a
        ``task.Clock``: its time is the wall time too)."""
        tenant = tenant or TenantConfig(name="test", listen="tcp:port=2575")
        if operations is None:
            operations = Operations(
                database,
                clock,
                clock.seconds,
                dispatcher=dispatcher,
                executor=executor,
                tenants={tenant.name: tenant},
            )
        console = Console(operations, accounts or demo_accounts(), clock=clock.seconds)
        return cls(console)

    def request(
        self,
        method: str,
        path: str,
        form: Mapping[str, str | list[str]] | None = None,
        headers: Mapping[str, str] | None = None,
        origin: str | None = ORIGIN,
    ) -> Response:
        site = Site(self.console)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        assert protocol is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        protocol.makeConnection(transport)
        body = urlencode(form or {}, doseq=True).encode() if form is not None else b""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
        if self.cookies:
            lines.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        if method == "POST":
            lines.append("Content-Type: application/x-www-form-urlencoded")
            lines.append(f"Content-Length: {len(body)}")
            if origin is not None:
                lines.append(f"Origin: {origin}")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        response = parse_response(transport.value())
        for cookie_text in response.headers.get("set-cookie", []):
            cookie: SimpleCookie = SimpleCookie()
            cookie.load(cookie_text)
            for name, morsel in cookie.items():
                if morsel.value:
                    self.cookies[name] = morsel.value
                else:
                    self.cookies.pop(name, None)
        found = re.search(r'name="csrf_token" value="([^"]+)"', response.body)
        if found:
            self.csrf_token = found.group(1)
        return response

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post(
        self, path: str, form: Mapping[str, str | list[str]] | None = None, **kwargs: Any
    ) -> Response:
        """A POST from a page of the console: with the session's form token."""
        fields: dict[str, str | list[str]] = {"csrf_token": self.csrf_token, **(form or {})}
        return self.request("POST", path, fields, **kwargs)

    def login(self, name: str, password: str | None = None) -> Response:
        self.get("/console/login")
        response = self.request(
            "POST", "/console/login", {"name": name, "password": password or name * 2}
        )
        self.get("/console/")
        return response
