"""The admin service's HTTP machinery: a gate before the body, routes, JSON in and out.

twisted.web reads a whole request body before it hands the request to any
resource. The lesson of Mirth's CVE-2023-37679 and CVE-2023-43208 (code run
by an unauthenticated request body) is to decide before that. So
``AdminRequest.gotLength``, which the HTTP channel calls once the headers are
in and before the first body byte, runs ``App.gate``: an unknown caller gets
401, a caller below the route's role 403, a body over the cap 413 and a body
that is not JSON 415, each answered at once with ``Connection: close``; the
body is never read. Only then is the body buffered (up to the cap, which a
chunked body cannot pass either), and at the end the route's handler runs with
the caller checked again against the database, and the JSON body parsed into
plain data and checked against the route's schema (400 with a clear message).

Every response carries the security headers of ``SECURITY_HEADERS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web import http, server

from udsgateway.store.users import Principal

log = Logger()

#: Sent with every response: no framing, no type sniffing, no scripts or
#: styles from anywhere but this service, no caching, no referrer leaks.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (
        b"Content-Security-Policy",
        b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Cache-Control", b"no-store"),
    (b"Cross-Origin-Opener-Policy", b"same-origin"),
)

#: Largest body of a route that needs no credentials (the login).
PUBLIC_BODY_SIZE = 4096

JSON_TYPE = b"application/json"


class HTTPError(Exception):
    """Answer with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@frozen
class Caller:
    """Who made a request, and how: ``token`` (bearer) or ``session`` (cookie)."""

    principal: Principal
    via: str
    credential: str


@define
class Call:
    """What a handler gets: the caller, path parameters, query and the checked body."""

    request: AdminRequest
    caller: Caller | None
    params: dict[str, str]
    query: dict[str, str]
    body: Any

    @property
    def actor(self) -> str:
        return self.caller.principal.name if self.caller is not None else ""


@define
class Reply:
    """A handler's answer: JSON data, or raw bytes with a content type."""

    data: Any = None
    status: int = 200
    content_type: bytes = JSON_TYPE
    raw: bytes | None = None
    headers: dict[bytes, bytes] = field(factory=dict)


Handler = Callable[[Call], Awaitable[Any]]


@frozen
class Route:
    """One endpoint. ``role`` None: public (no credentials needed, small body)."""

    method: str
    path: str
    handler: Handler
    role: str | None
    summary: str
    schema: dict[str, Any] | None = None
    content: bool = False
    tag: str = "api"
    #: The JSON schema of a 200 answer, for the OpenAPI document (None: not described).
    response: dict[str, Any] | None = None

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compile(self.path)


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compile(path: str) -> re.Pattern[str]:
    pattern = _PATTERNS.get(path)
    if pattern is None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path))
        pattern = _PATTERNS[path] = re.compile(f"^{regex}$")
    return pattern


# -- JSON schema (the subset the routes use)


def check_schema(value: Any, schema: dict[str, Any], where: str = "body") -> None:
    """Raise HTTPError 400 naming the first place ``value`` breaks ``schema``.

    Supported: type (object, array, string, integer, number, boolean), properties,
    required, additionalProperties (false, or a schema), items, enum, minLength, maxLength,
    minimum, maximum, maxItems.
    """
    kind = schema.get("type")
    checks: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind is not None and not checks[kind](value):
        raise HTTPError(400, f"{where}: expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(json.dumps(v) for v in schema["enum"])
        raise HTTPError(400, f"{where}: must be one of {choices}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise HTTPError(400, f"{where}: at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise HTTPError(400, f"{where}: at most {schema['maxLength']} characters")
    if kind in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise HTTPError(400, f"{where}: at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise HTTPError(400, f"{where}: at most {schema['maximum']}")
    if kind == "array":
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise HTTPError(400, f"{where}: at most {schema['maxItems']} items")
        for index, item in enumerate(value):
            check_schema(item, schema.get("items", {}), f"{where}[{index}]")
    if kind == "object":
        properties = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise HTTPError(400, f"{where}: {name!r} is required")
        if schema.get("additionalProperties", True) is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                raise HTTPError(400, f"{where}: unknown field {extra[0]!r}")
        others = schema.get("additionalProperties")
        for name, item in value.items():
            if name in properties:
                check_schema(item, properties[name], f"{where}.{name}")
            elif isinstance(others, dict):
                check_schema(item, others, f"{where}.{name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes) -> Any:
    """Plain data (dict, list, str, int, float, bool, None) or HTTPError 400."""
    try:
        text = body.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise HTTPError(400, "the body is not UTF-8") from None
    except RecursionError:
        raise HTTPError(400, "the body nests too deeply") from None
    except ValueError as error:
        raise HTTPError(400, f"the body is not valid JSON: {error}") from None


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- the request


def _header(request: http.Request, name: bytes) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def bearer_token(request: http.Request) -> str | None:
    value = _header(request, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class AdminRequest(server.Request):
    """A request that is judged by ``App.gate`` before its body is read."""

    refused = False
    #: No body follows the headers (Content-Length 0 or absent, not chunked).
    bodyless = False
    gated: Caller | None = None
    route: Route | None = None
    _received = 0

    @property
    def app(self) -> App:
        site: AdminSite = self.channel.site  # type: ignore[attr-defined]
        return site.app

    def gotLength(self, length: int | None) -> None:
        app = self.app
        # The channel keeps the request line to itself until the body is in.
        method = getattr(self.channel, "_command", b"")
        target = getattr(self.channel, "_path", b"")
        path = target.split(b"?", 1)[0].decode("latin-1")
        self.bodyless = length == 0
        try:
            self.route, self.gated = app.gate(self, method.decode("latin-1"), path, length)
        except HTTPError as error:
            self.refuse(error)
            return
        super().gotLength(length)

    def refuse(self, error: HTTPError) -> None:
        """Answer now, on the raw connection, and close it: the body is never read."""
        self.refused = True
        # The channel would otherwise send "100 Continue" after our answer.
        self.requestHeaders.removeHeader(b"expect")
        body = _json_bytes({"error": error.message})
        lines = [
            f"HTTP/1.1 {error.status} {http.RESPONSES.get(error.status, b'').decode()}".encode(),
            b"Content-Type: " + JSON_TYPE,
            b"Content-Length: " + str(len(body)).encode(),
            b"Connection: close",
            *[name + b": " + value for name, value in SECURITY_HEADERS],
            *[name + b": " + value for name, value in error.headers.items()],
        ]
        transport = self.channel.transport
        assert transport is not None
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.channel.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self._received += len(data)
        if self._received > self.app.body_limit(self.route):
            self.refuse(HTTPError(413, "the request body is too large"))
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.app.handle(self)


class AdminSite(server.Site):
    """The HTTP factory: every request is an AdminRequest answered by ``app``."""

    requestFactory = AdminRequest
    displayTracebacks = False

    def __init__(self, app: App, **kwargs: Any) -> None:
        from twisted.web.resource import Resource

        super().__init__(Resource(), **kwargs)
        self.app = app

    def log(self, request: Any) -> None:
        # No access log: URLs may carry search terms (control IDs, patient IDs).
        pass


Gate = Callable[[AdminRequest, Route | None], Caller | None]


@define
class App:
    """Routes, and the checks that run before and after a request's body."""

    routes: list[Route]
    max_body_size: int
    #: The synchronous credential check of the gate (from in-memory state).
    identify: Gate
    #: The authoritative check before the handler runs (reads the database).
    confirm: Callable[[AdminRequest, Caller], Awaitable[Caller]]

    def find(self, method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
        """The route, its path parameters, and whether the path exists at all."""
        known = False
        for route in self.routes:
            match = route.pattern.match(path)
            if match:
                known = True
                if route.method == method or (method == "HEAD" and route.method == "GET"):
                    return route, match.groupdict(), True
        return None, {}, known

    def body_limit(self, route: Route | None) -> int:
        if route is None or route.role is None:
            return PUBLIC_BODY_SIZE
        return self.max_body_size

    def gate(
        self, request: AdminRequest, method: str, path: str, length: int | None
    ) -> tuple[Route | None, Caller | None]:
        """Before the body: who calls, may they, how large, what type."""
        route, _params, _known = self.find(method, path)
        caller = None
        if route is None or route.role is not None:
            caller = self.identify(request, route)
            if caller is None:
                raise HTTPError(
                    401,
                    "authentication required: a bearer token or a session",
                    {b"WWW-Authenticate": b'Bearer realm="udsgateway"'},
                )
            if route is not None and route.role is not None:
                self.authorize(caller, route)
        if length is not None and length > self.body_limit(route):
            raise HTTPError(413, "the request body is too large")
        if length != 0 and method not in ("GET", "HEAD", "DELETE"):
            content_type = (_header(request, b"content-type") or "").split(";")[0].strip()
            if content_type.lower() != "application/json":
                raise HTTPError(415, "the body must be JSON (Content-Type: application/json)")
        return route, caller

    @staticmethod
    def authorize(caller: Caller, route: Route) -> None:
        assert route.role is not None
        if not caller.principal.at_least(route.role):
            raise HTTPError(403, f"this needs the {route.role} role")
        if route.content and not caller.principal.view_content:
            raise HTTPError(403, "this needs the view_content permission")

    def handle(self, request: AdminRequest) -> Deferred[None]:
        handled = Deferred.fromCoroutine(self._handle(request))
        # The client went away (a long poll it gave up on): stop waiting for it.
        request.notifyFinish().addErrback(lambda _: handled.cancel())
        return handled

    async def _handle(self, request: AdminRequest) -> None:
        try:
            reply = await self._answer(request)
        except CancelledError:
            return
        except HTTPError as error:
            reply = Reply({"error": error.message}, error.status, headers=error.headers)
        except Exception:
            log.failure("admin request failed")
            reply = Reply({"error": "internal error (see the gateway's log)"}, 500)
        if request.channel is None:
            return
        request.setResponseCode(reply.status)
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        body = reply.raw if reply.raw is not None else _json_bytes(reply.data)
        request.setHeader(b"Content-Type", reply.content_type)
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    async def _answer(self, request: AdminRequest) -> Reply:
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        route, params, known = self.find(method, path)
        if route is None:
            if known:
                raise HTTPError(405, "method not allowed")
            raise HTTPError(404, "not found")
        caller = request.gated
        if route.role is not None:
            assert caller is not None
            caller = await self.confirm(request, caller)
            self.authorize(caller, route)
        body: Any = None
        if route.schema is not None:
            content = request.content
            assert content is not None
            content.seek(0)
            body = parse_json(content.read())
            check_schema(body, route.schema)
        query = {
            key.decode("utf-8", "replace"): values[-1].decode("utf-8", "replace")
            for key, values in parse_qs(
                request.uri.partition(b"?")[2], keep_blank_values=True
            ).items()
        }
        result = await route.handler(Call(request, caller, params, query, body))
        return result if isinstance(result, Reply) else Reply(result)
