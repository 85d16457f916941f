"""The admin API in memory: an HTTP client over a StringTransport, a clock, an inline database.

Requests go through twisted.web's real HTTP parser (the gate runs as the
headers end), so a test sees exactly what a client on the wire would, without
a socket. With an inline database and ``inline_offload`` every answer is
complete when ``request`` returns.
"""

from __future__ import annotations

import json
from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from udsgateway.admin import auth
from udsgateway.admin.api import AdminAPI
from udsgateway.admin.http import AdminSite
from udsgateway.store import users
from udsgateway.store.engine import Database, InlineRunner, ensure_schema, make_engine

#: scrypt cost for tests (the production default takes ~100 ms per hash).
TEST_SCRYPT_N = 2**10


def inline_offload(function: Any, *args: Any) -> Deferred[Any]:
    if function is auth.hash_password:
        return maybeDeferred(auth.hash_password, args[0], TEST_SCRYPT_N)
    return maybeDeferred(function, *args)


@define
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    closed: bool

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes, closed: bool) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    length = headers.get("content-length")
    if length:
        body = body[: int(length[0])]
    return Response(status, headers, body, closed)


def api_token(database_url: str, name: str, role: str, at: float = 1.7e9) -> str:
    """A user of ``role`` with an API token in the store at ``database_url`` (its schema
    made if new), as ``udsgateway users add`` and ``tokens create`` make them; the token.
    For tests and benches that start a real gateway on that store."""
    database = Database(make_engine(database_url), InlineRunner())
    try:
        database.transaction_now(ensure_schema)
        hashed = auth.hash_password(f"{name} password", TEST_SCRYPT_N)
        database.transaction_now(users.add_user, name, hashed, role, False, at)
        token = auth.new_token()
        digest = auth.token_digest(token)
        database.transaction_now(users.add_token, name, "", digest, token[:12], at)
    finally:
        database.close()
    return token


def make_database(url: str = "sqlite:///:memory:") -> Database:
    database = Database(make_engine(url), InlineRunner())
    database.transaction_now(ensure_schema)
    return database


@define
class AdminClient:
    """An admin API in memory, with helpers to add users and tokens."""

    database: Database = field(factory=make_database)
    clock: Clock = field(factory=Clock)
    gateway: Any = None
    operations: Any = None
    metrics: Any = None
    secure: bool = False
    max_body_size: int = 64 * 1024
    #: Give the API an operations facade over the same database (database only).
    with_operations: bool = False
    api: AdminAPI = field(init=False)
    site: AdminSite = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.clock.advance(1_700_000_000)
        if self.with_operations and self.operations is None:
            from udsgateway.admin.operations import Operations

            self.operations = Operations(self.database, self.clock, self.clock.seconds)
        self.api = AdminAPI(
            database=self.database,
            clock=self.clock,
            wall=self.clock.seconds,
            offload=inline_offload,
            gateway=self.gateway,
            operations=self.operations,
            metrics=self.metrics,
            secure=self.secure,
            max_body_size=self.max_body_size,
        )
        self.site = AdminSite(self.api.app(), reactor=self.clock)

    def add_user(
        self, name: str, role: str, password: str = "correct horse", view_content: bool = False
    ) -> str:
        """Add a user and an API token of theirs; return the token."""
        hashed = auth.hash_password(password, TEST_SCRYPT_N)
        now = self.clock.seconds()
        self.database.transaction_now(users.add_user, name, hashed, role, view_content, now)
        token = auth.new_token()
        self.database.transaction_now(
            users.add_token, name, "test", auth.token_digest(token), token[:12], now
        )
        self.api.tokens = self.database.transaction_now(users.token_principals)
        return token

    def send_raw(self, data: bytes, peer: str = "127.0.0.1") -> tuple[StringTransport, Any]:
        """Feed raw bytes to a new connection; return its transport and channel."""
        channel = self.site.buildProtocol(IPv4Address("TCP", peer, 50000))
        assert channel is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 50000))
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return transport, channel

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw_body: bytes | None = None,
        peer: str = "127.0.0.1",
    ) -> Response:
        all_headers = {"Host": "admin.test"}
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        payload = b""
        if raw_body is not None:
            payload = raw_body
        elif body is not None:
            payload = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        if payload or method in ("POST", "PUT", "PATCH"):
            all_headers["Content-Length"] = str(len(payload))
        all_headers.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in all_headers.items()
        )
        transport, _channel = self.send_raw(head.encode("latin-1") + b"\r\n" + payload, peer)
        return parse_response(transport.value(), bool(transport.disconnecting))
