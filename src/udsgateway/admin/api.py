"""The endpoints of the admin service (``/api/v1``, ``/healthz``, ``/readyz``, ``/metrics``).

``AdminAPI`` holds what the endpoints need (the database, the gateway, the
sessions, the token list) and builds the ``App`` of ``admin.http``. The
endpoints of the operations facade (``admin.operations``) are added by
``operation_routes`` when the gateway has one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from udsgateway.admin import auth
from udsgateway.admin.http import (
    AdminRequest,
    App,
    Call,
    Caller,
    HTTPError,
    Reply,
    Route,
    bearer_token,
)
from udsgateway.admin.sessions import (
    COOKIE_NAME,
    CSRF_HEADER,
    SessionStore,
    cross_site_problem,
    session_cookie,
)
from udsgateway.store import audit, users
from udsgateway.store.engine import Database
from udsgateway.store.users import ADMIN, OPERATOR, ROLES, VIEWER, Principal, UserError

log = Logger()

#: Who a bearer token not (yet) in memory stands for until the database says.
UNCONFIRMED = Principal("", ADMIN)

#: Runs a blocking function (a password hash) away from the reactor thread.
Offload = Callable[..., Deferred[Any]]

_NAME = {"type": "string", "minLength": 1, "maxLength": 64}
_PASSWORD = {"type": "string", "minLength": 8, "maxLength": 1024}

LOGIN_SCHEMA = {
    "type": "object",
    "properties": {"user": _NAME, "password": {"type": "string", "maxLength": 1024}},
    "required": ["user", "password"],
    "additionalProperties": False,
}
USER_SCHEMA = {
    "type": "object",
    "properties": {
        "name": _NAME,
        "password": _PASSWORD,
        "role": {"type": "string", "enum": list(ROLES)},
        "view_content": {"type": "boolean"},
    },
    "required": ["name", "password", "role"],
    "additionalProperties": False,
}
USER_CHANGE_SCHEMA = {
    "type": "object",
    "properties": {
        "password": _PASSWORD,
        "role": {"type": "string", "enum": list(ROLES)},
        "view_content": {"type": "boolean"},
        "disabled": {"type": "boolean"},
    },
    "additionalProperties": False,
}
TOKEN_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "maxLength": 64}, "user": _NAME},
    "additionalProperties": False,
}
PASSWORD_SCHEMA = {
    "type": "object",
    "properties": {"password": _PASSWORD},
    "required": ["password"],
    "additionalProperties": False,
}


def _counts(description: str, names: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object of counts (or per-second rates), by name."""
    found: dict[str, Any] = {
        "type": "object",
        "description": description,
        "additionalProperties": {"type": "number"},
    }
    if names:
        found["properties"] = {name: {"type": "number"} for name in names}
        found["required"] = list(names)
    return found


def _rates(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "properties": {
            "minute": _counts("per second over the last minute"),
            "hour": _counts("per second over the last hour"),
        },
        "required": ["minute", "hour"],
    }


_FLOW_STATUS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "app_id": {"type": "string"},
        "tenant": {"type": "string"},
        "name": {"type": "string"},
        "enabled": {"type": "boolean"},
        "routed": {"type": "integer", "description": "executions in the database"},
        "executions": _counts("executions in the database by state"),
        "since_start": _counts(
            "since the process started: accepted messages routed to the flow, and "
            "executions done, failed, held",
            ("routed", "done", "failed", "held"),
        ),
        "rates": _rates("routed, done, failed, held per second"),
    },
    "required": ["routed", "executions", "since_start", "rates"],
}
_DESTINATION_STATUS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "queued": {"type": "integer"},
        "held": {"type": "integer"},
        "delivered": {"type": "integer"},
        "skipped": {"type": "integer"},
        "attempts": {"type": "integer", "description": "sum over its deliveries (database)"},
        "oldest_pending_age": {
            "nullable": True,
            "description": "seconds since the oldest open delivery was queued; null: none",
        },
        "paused": {"type": "boolean"},
        "paused_by": {"nullable": True, "description": "who paused it; null: not paused"},
        "connected": {"type": "boolean"},
        "connection": {
            "type": "string",
            "description": "up (a connection is open), down (the last connect failed), "
            "idle (none needed now), unknown (no running gateway)",
        },
        "last_error": {"type": "string"},
        "delivered_since_start": {"type": "integer"},
        "attempts_since_start": _counts(
            "attempts since start by outcome: accepted, error, rejected, other_ack, timeout, "
            "connect_failed, connection_lost, stale_connection, protocol_error, stopped"
        ),
        "rates": _rates("delivered and attempts per second"),
    },
    "required": [
        "queued",
        "held",
        "paused",
        "connected",
        "connection",
        "attempts_since_start",
        "rates",
    ],
}
#: The answer of GET /api/v1/status (the OpenAPI document; a test checks answers by it).
STATUS_RESPONSE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tenants": {
            "type": "object",
            "description": "per tenant, since the process started",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "open_connections": {"type": "integer"},
                    "connections": {"type": "integer"},
                    "received": {"type": "integer"},
                    "accepted": {"type": "integer"},
                    "duplicates": {"type": "integer"},
                    "rejected": {"type": "integer"},
                    "rejected_by_code": _counts("by ERR-3 code"),
                    "acks": _counts("ACKs sent by MSA-1 code"),
                },
            },
        },
        "flows": {
            "type": "object",
            "description": "per Flow ID",
            "additionalProperties": _FLOW_STATUS,
        },
        "destinations": {
            "type": "object",
            "description": "per destination address (host:port)",
            "additionalProperties": _DESTINATION_STATUS,
        },
        "rates": _rates("every counter's rate, by name (flow.ID.done, tenant.NAME.received...)"),
    },
    "required": ["tenants", "flows", "destinations", "rates"],
}


@define
class AdminAPI:
    """The admin endpoints, over one gateway process."""

    database: Database
    clock: IReactorTime
    #: Epoch seconds, for what is stored (users, tokens, audit).
    wall: Callable[[], float]
    offload: Offload
    #: The GatewayService (stats, readiness); None in tests of the API alone.
    gateway: Any = None
    #: The operations facade (admin.operations.Operations), when present.
    operations: Any = None
    #: The metrics (admin.metrics.Metrics): rendered at /metrics.
    metrics: Any = None
    secure: bool = False
    max_body_size: int = 1024 * 1024
    sessions: SessionStore = field(factory=SessionStore)
    #: The login lockout (in the database); None: the defaults over ``database``.
    throttle: auth.LoginThrottle = field(default=None)
    #: Digest of each usable API token -> its user, refreshed from the database.
    tokens: dict[str, Principal] = field(factory=dict)
    #: Session id -> its user as last read from the database.
    session_users: dict[str, Principal] = field(factory=dict)
    _refreshing: bool = False
    _last_kick: float = float("-inf")

    def __attrs_post_init__(self) -> None:
        if self.throttle is None:
            self.throttle = auth.LoginThrottle(self.database)

    # -- credentials

    def identify(self, request: AdminRequest, route: Route | None) -> Caller | None:
        """The gate's check, from memory: a known bearer token or a live session."""
        token = bearer_token(request)
        if token is not None:
            digest = auth.token_digest(token)
            principal = self.tokens.get(digest)
            if principal is None:
                # Perhaps a token made since the last refresh (by the command
                # line): reload the list soon, so that the next request with a
                # body passes; a request without one is let on to the database
                # check (confirm), which decides, as there is no body to hold back.
                self._refresh_soon()
                if request.bodyless:
                    return Caller(UNCONFIRMED, "token", digest)
            return None if principal is None else Caller(principal, "token", digest)
        cookie = request.received_cookies.get(COOKIE_NAME.encode())
        if cookie is not None:
            session = self.sessions.get(cookie.decode("latin-1"), self.clock.seconds())
            if session is not None:
                principal = self.session_users.get(session.id)
                if principal is not None:
                    return Caller(principal, "session", session.id)
        return None

    async def confirm(self, request: AdminRequest, caller: Caller) -> Caller:
        """The database's word: the token not revoked, the user still enabled, their role now.

        A session's state-changing request must also pass the cross-site checks.
        """
        if caller.via == "token":
            principal = await self.database.transaction(users.token_principal, caller.credential)
        else:
            principal = await self.database.transaction(
                users.user_principal, caller.principal.name
            )
        if principal is None:
            if caller.via == "token":
                self.tokens.pop(caller.credential, None)
            else:
                self._end_session(caller.credential)
            raise HTTPError(401, "authentication required: a bearer token or a session")
        if caller.via == "session":
            session = self.sessions.get(caller.credential, self.clock.seconds())
            if session is None:
                raise HTTPError(401, "the session has ended")
            self.session_users[session.id] = principal
            host = request.getHeader(b"host") or ""
            problem = cross_site_problem(
                request.method,
                _header(request, b"origin"),
                _header(request, b"referer"),
                host.decode("latin-1") if isinstance(host, bytes) else host,
                self.secure,
                session,
                _header(request, CSRF_HEADER),
            )
            if problem is not None:
                raise HTTPError(403, problem)
        return Caller(principal, caller.via, caller.credential)

    async def refresh_tokens(self) -> None:
        """Reload the usable tokens (the CLI creates and revokes them too)."""
        self.tokens = await self.database.transaction(users.token_principals)
        self.sessions.expire(self.clock.seconds())
        alive = self.sessions.ids()
        self.session_users = {k: v for k, v in self.session_users.items() if k in alive}

    def _refresh_soon(self) -> None:
        """Reload the tokens now, at most once a second (unknown tokens trigger it)."""
        now = self.clock.seconds()
        if self._refreshing or now - self._last_kick < 1.0:
            return
        self._last_kick = now
        self._refreshing = True

        def done(result: object) -> None:
            self._refreshing = False

        refreshed = Deferred.fromCoroutine(self.refresh_tokens())
        refreshed.addErrback(lambda f: log.failure("token refresh failed", f))
        refreshed.addBoth(done)

    def _end_session(self, session_id: str) -> None:
        self.sessions.end(session_id)
        self.session_users.pop(session_id, None)

    # -- the app

    def app(self) -> App:
        return App(self.routes(), self.max_body_size, self.identify, self.confirm)

    def routes(self) -> list[Route]:
        routes = [
            Route("GET", "/healthz", self.healthz, None, "the process is alive", tag="health"),
            Route("GET", "/readyz", self.readyz, None, "ready for traffic", tag="health"),
            Route(
                "GET", "/metrics", self.metrics_text, VIEWER, "Prometheus metrics", tag="health"
            ),
            Route("GET", "/api/v1/openapi.json", self.openapi, None, "this API's description"),
            Route("POST", "/api/v1/session", self.login, None, "log in (console)", LOGIN_SCHEMA),
            Route("DELETE", "/api/v1/session", self.logout, VIEWER, "log out (console)"),
            Route("GET", "/api/v1/me", self.me, VIEWER, "who is calling"),
            Route(
                "GET",
                "/api/v1/status",
                self.status,
                VIEWER,
                "per tenant, flow and destination counters, and rates",
                response=STATUS_RESPONSE,
            ),
            Route("GET", "/api/v1/users", self.list_users, ADMIN, "list users"),
            Route("POST", "/api/v1/users", self.add_user, ADMIN, "add a user", USER_SCHEMA),
            Route(
                "PATCH",
                "/api/v1/users/{name}",
                self.change_user,
                ADMIN,
                "change a user's password, role, content permission or disable them",
                USER_CHANGE_SCHEMA,
            ),
            Route(
                "PUT",
                "/api/v1/me/password",
                self.change_own_password,
                VIEWER,
                "change your own password",
                PASSWORD_SCHEMA,
            ),
            Route("GET", "/api/v1/tokens", self.list_tokens, VIEWER, "list API tokens"),
            Route(
                "POST",
                "/api/v1/tokens",
                self.create_token,
                VIEWER,
                "create an API token (shown once)",
                TOKEN_SCHEMA,
            ),
            Route("DELETE", "/api/v1/tokens/{id}", self.revoke_token, VIEWER, "revoke a token"),
        ]
        if self.operations is not None:
            from udsgateway.admin.routes import operation_routes

            routes += operation_routes(self.operations)
        return routes

    # -- health

    async def healthz(self, call: Call) -> Any:
        return {"status": "alive"}

    async def readyz(self, call: Call) -> Reply:
        problems = []
        gateway = self.gateway
        if gateway is not None and not gateway.accepting:
            problems.append("not accepting")
        try:
            await self.database.transaction(users.count_users)
        except Exception:
            problems.append("database")
        if problems:
            # Which check failed stays in the gateway's log, not in the answer.
            return Reply({"status": "not ready"}, 503)
        return Reply({"status": "ready"})

    async def metrics_text(self, call: Call) -> Reply:
        if self.metrics is None:
            raise HTTPError(404, "no metrics")
        body, content_type = self.metrics.exposition()
        return Reply(raw=body, content_type=content_type)

    async def openapi(self, call: Call) -> Any:
        from udsgateway.admin.openapi import openapi_document

        return openapi_document(self.routes())

    # -- sessions

    async def login(self, call: Call) -> Reply:
        name, password = call.body["user"], call.body["password"]
        address = _address(call.request)
        if await self.throttle.locked(name, address, self.wall()):
            raise HTTPError(429, "too many failed logins: try again later")
        record = await self.database.transaction(users.login_record, name)
        ok = await self.offload(
            auth.verify_password, password, record[0] if record is not None else None
        )
        if not ok or record is None:
            await self.throttle.failed(name, address, self.wall())
            await self._audit("session.login", f"user {name}", name, result="refused")
            raise HTTPError(401, "wrong user name or password")
        await self.throttle.succeeded(name, address)
        session = self.sessions.create(name, self.clock.seconds())
        self.session_users[session.id] = record[1]
        await self._audit("session.login", f"user {name}", name)
        return Reply(
            {
                "user": name,
                "role": record[1].role,
                "view_content": record[1].view_content,
                "csrf_token": session.csrf_token,
            },
            headers={b"Set-Cookie": session_cookie(session.id, self.secure)},
        )

    async def logout(self, call: Call) -> Reply:
        assert call.caller is not None
        if call.caller.via == "session":
            self._end_session(call.caller.credential)
        return Reply({"ok": True}, headers={b"Set-Cookie": session_cookie("", self.secure, 0)})

    async def me(self, call: Call) -> Any:
        assert call.caller is not None
        principal = call.caller.principal
        return {
            "user": principal.name,
            "role": principal.role,
            "view_content": principal.view_content,
            "via": call.caller.via,
        }

    # -- status

    async def status(self, call: Call) -> Any:
        if self.operations is not None and hasattr(self.operations, "status"):
            return await self.operations.status(actor=call.actor, via="api")
        gateway = self.gateway
        if gateway is None:
            return {"tenants": {}, "destinations": {}}
        tenants = {
            name: {
                "port": entry["port"],
                "listener": _counters(entry["listener"]),
                "ingest": _counters(entry["ingest"]),
            }
            for name, entry in gateway.stats().items()
        }
        return {
            "ready": bool(gateway.accepting),
            "tenants": tenants,
            "destinations": {
                name: {"open": count} for name, count in gateway.dispatcher.queued.items()
            },
        }

    # -- users and tokens

    async def list_users(self, call: Call) -> Any:
        return {"users": await self.database.transaction(users.list_users)}

    async def add_user(self, call: Call) -> Reply:
        body = call.body
        hashed = await self.offload(auth.hash_password, body["password"])
        try:
            await self.database.transaction(
                users.add_user,
                body["name"],
                hashed,
                body["role"],
                bool(body.get("view_content", False)),
                self.wall(),
            )
        except UserError as error:
            raise HTTPError(409, str(error)) from None
        await self._audit(
            "user.add", f"user {body['name']}", call.actor, reason=f"role {body['role']}"
        )
        return Reply({"name": body["name"], "role": body["role"]}, 201)

    async def change_user(self, call: Call) -> Any:
        name = call.params["name"]
        values: dict[str, Any] = {
            key: call.body[key] for key in ("role", "view_content", "disabled") if key in call.body
        }
        if "password" in call.body:
            values["password_hash"] = await self.offload(auth.hash_password, call.body["password"])
        if not values:
            raise HTTPError(400, "body: nothing to change")
        try:
            await self.database.transaction(users.update_user, name, self.wall(), values)
        except UserError as error:
            raise HTTPError(404, str(error)) from None
        if values.get("disabled") or "password_hash" in values:
            self.sessions.end_user(name)
        await self.refresh_tokens()
        changed = ", ".join(sorted(k if k != "password_hash" else "password" for k in values))
        await self._audit("user.change", f"user {name}", call.actor, reason=changed)
        return {"name": name, "changed": changed.split(", ")}

    async def change_own_password(self, call: Call) -> Any:
        hashed = await self.offload(auth.hash_password, call.body["password"])
        await self.database.transaction(
            users.update_user, call.actor, self.wall(), {"password_hash": hashed}
        )
        await self._audit("user.password", f"user {call.actor}", call.actor)
        return {"ok": True}

    async def list_tokens(self, call: Call) -> Any:
        assert call.caller is not None
        mine = None if call.caller.principal.at_least(ADMIN) else call.actor
        return {"tokens": await self.database.transaction(users.list_tokens, mine)}

    async def create_token(self, call: Call) -> Reply:
        assert call.caller is not None
        owner = call.body.get("user", call.actor)
        if owner != call.actor and not call.caller.principal.at_least(ADMIN):
            raise HTTPError(403, "only an admin creates tokens for others")
        token = auth.new_token()
        try:
            token_id = await self.database.transaction(
                users.add_token,
                owner,
                call.body.get("label", ""),
                auth.token_digest(token),
                auth.token_shown_prefix(token),
                self.wall(),
            )
        except UserError as error:
            raise HTTPError(404, str(error)) from None
        await self.refresh_tokens()
        await self._audit("token.create", f"token {token_id} of user {owner}", call.actor)
        return Reply({"id": token_id, "user": owner, "token": token}, 201)

    async def revoke_token(self, call: Call) -> Any:
        assert call.caller is not None
        try:
            token_id = int(call.params["id"])
        except ValueError:
            raise HTTPError(404, "no such token") from None
        listed = await self.database.transaction(users.list_tokens, None)
        found = [t for t in listed if t["id"] == token_id]
        if not found:
            raise HTTPError(404, "no such token")
        if found[0]["user"] != call.actor and not call.caller.principal.at_least(ADMIN):
            raise HTTPError(403, "only an admin revokes the tokens of others")
        try:
            await self.database.transaction(users.revoke_token, token_id, self.wall())
        except UserError as error:
            raise HTTPError(409, str(error)) from None
        await self.refresh_tokens()
        await self._audit(
            "token.revoke", f"token {token_id} of user {found[0]['user']}", call.actor
        )
        return {"id": token_id, "revoked": True}

    async def _audit(
        self, action: str, target: str, who: str, reason: str = "", result: str = "ok"
    ) -> None:
        await self.database.transaction(
            audit.append, who, action, target, self.wall(), reason, result, "api"
        )


def _header(request: AdminRequest, name: bytes) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _address(request: AdminRequest) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "") or "")


def _counters(stats: Any) -> dict[str, Any]:
    from attrs import asdict

    data = asdict(stats)
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}


__all__ = ["OPERATOR", "AdminAPI"]
