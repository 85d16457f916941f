"""Who is logged in to the console, and what each role may do.

The console's sessions live in memory (a restart logs everyone out). A
session is a random id in an HttpOnly, SameSite=Strict cookie, with a form
token that every state-changing request must carry, from a page of this very
service (its Origin). Users and their passwords come from an ``Accounts``
source (the admin service's users in the database; an in-memory one in tests).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.internet.defer import Deferred

VIEWER = "viewer"
OPERATOR = "operator"
ADMIN = "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)

COOKIE_NAME = "udsgw_console"
CSRF_FIELD = "csrf_token"


@frozen
class User:
    """A logged-in user: name, role and whether they may see message content."""

    name: str
    role: str
    view_content: bool = False

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


class Accounts(Protocol):
    """Where the console checks passwords and reads users."""

    def authenticate(self, name: str, password: str) -> Deferred[Any]:
        """The user (something with name, role, view_content) or None."""

    def current(self, name: str) -> Deferred[Any]:
        """The user as they are now (None: disabled or removed)."""

    def users(self) -> Deferred[list[dict[str, Any]]]:
        """Every user, for the admin's users page (no password hashes)."""


@define
class MemoryAccounts:
    """Users in memory with plain passwords: for tests and demos only."""

    entries: dict[str, tuple[str, User]] = field(factory=dict)

    def add(self, name: str, password: str, role: str, view_content: bool = False) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self.entries[name] = (password, User(name, role, view_content))

    def authenticate(self, name: str, password: str) -> Deferred[Any]:
        entry = self.entries.get(name)
        ok = entry is not None and hmac.compare_digest(entry[0].encode(), password.encode())
        return Deferred.fromCoroutine(_value(entry[1] if ok and entry else None))

    def current(self, name: str) -> Deferred[Any]:
        entry = self.entries.get(name)
        return Deferred.fromCoroutine(_value(entry[1] if entry else None))

    def users(self) -> Deferred[list[dict[str, Any]]]:
        rows = [
            {"name": u.name, "role": u.role, "view_content": u.view_content, "disabled": False}
            for _, u in self.entries.values()
        ]
        return Deferred.fromCoroutine(_value(rows))


async def _value(value: Any) -> Any:
    return value


@define
class Session:
    id: str
    user: str
    csrf_token: str
    last_seen: float


@define
class Sessions:
    """Console sessions in memory, each ending after ``timeout`` idle seconds."""

    clock: Callable[[], float]
    timeout: float = 1800.0
    max_sessions: int = 1000
    _sessions: dict[str, Session] = field(factory=dict)

    def create(self, user: str) -> Session:
        now = self.clock()
        if len(self._sessions) >= self.max_sessions:
            self._expire(now)
            if len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
                del self._sessions[oldest.id]
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        now = self.clock()
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if now - session.last_seen > self.timeout:
            del self._sessions[session_id]
            return None
        session.last_seen = now
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now - s.last_seen > self.timeout]:
            del self._sessions[key]


@define
class LoginThrottle:
    """Failed logins per user name and per address; locked out after too many."""

    clock: Callable[[], float]
    max_failures: int = 5
    lockout_seconds: float = 900.0
    _failures: dict[str, tuple[int, float]] = field(factory=dict)

    def locked(self, *keys: str) -> bool:
        now = self.clock()
        return any(self._failures.get(k, (0, 0.0))[1] > now for k in keys)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for key in keys:
            count, until = self._failures.get(key, (0, 0.0))
            if until and until <= now:
                count, until = 0, 0.0
            count += 1
            if count >= self.max_failures:
                until = now + self.lockout_seconds
            self._failures[key] = (count, until)
        if len(self._failures) > 10_000:
            for key in [k for k, (_, u) in self._failures.items() if u <= now]:
                del self._failures[key]

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


def session_cookie(value: str, secure: bool, max_age: int | None = None) -> bytes:
    """The ``Set-Cookie`` value of a session (empty value and max_age 0: clear it)."""
    parts = [f"{COOKIE_NAME}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts).encode("ascii")


def same_origin(origin: str, host: str, secure: bool) -> bool:
    """True when an Origin or Referer URL names this service (scheme, host and port)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    scheme = "https" if secure else "http"
    return parts.scheme == scheme and bool(host) and parts.netloc.lower() == host.lower()


def cross_site_problem(
    origin: str | None,
    referer: str | None,
    host: str,
    secure: bool,
    form_token: str | None,
    session: Session | None,
) -> str | None:
    """Why a state-changing request must be refused as cross-site, or None.

    It needs an ``Origin`` (or, without one, a ``Referer``) of this service and,
    once logged in, the session's form token.
    """
    source = origin if origin is not None else referer
    if source is None or not same_origin(source, host, secure):
        return "cross-site request refused: it does not come from a page of this console"
    if session is not None and (
        form_token is None
        or not hmac.compare_digest(
            form_token.encode("utf-8", "replace"), session.csrf_token.encode()
        )
    ):
        return "cross-site request refused: missing or wrong form token"
    return None
