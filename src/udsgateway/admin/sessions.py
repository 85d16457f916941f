"""Console sessions and their protection against cross-site requests.

Reusable by any HTML page of the admin service (the web console):

* ``SessionStore`` keeps sessions in memory: a random id (the cookie's value)
  maps to the user's name and a per-session form token. A session ends after
  ``timeout`` seconds without a request, at logout, or at a restart.
* ``session_cookie`` builds the ``Set-Cookie`` value: ``HttpOnly``,
  ``SameSite=Strict``, ``Path=/``, and ``Secure`` when the service runs TLS.
* ``cross_site_problem`` is the check every state-changing request made with
  the cookie must pass: an ``Origin`` (or, without one, a ``Referer``) naming
  this very service, and the session's form token in the ``X-CSRF-Token``
  header (or a ``csrf_token`` form field, which the caller passes in).

API clients use bearer tokens instead and need none of this: a browser never
adds an ``Authorization`` header on its own.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from attrs import define, field

COOKIE_NAME = "udsgw_session"
CSRF_HEADER = b"x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


@define
class Session:
    id: str
    user: str
    csrf_token: str
    last_seen: float


@define
class SessionStore:
    """Sessions in memory, each ending after ``timeout`` idle seconds."""

    timeout: float = 1800.0
    max_sessions: int = 1000
    _sessions: dict[str, Session] = field(factory=dict)

    def create(self, user: str, now: float) -> Session:
        if len(self._sessions) >= self.max_sessions:
            self.expire(now)
            if len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
                del self._sessions[oldest.id]
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str, now: float) -> Session | None:
        """The live session of a cookie value (touched), or None."""
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

    def end_user(self, user: str) -> None:
        """End every session of a user (disabled, password changed)."""
        for key in [k for k, s in self._sessions.items() if s.user == user]:
            del self._sessions[key]

    def ids(self) -> set[str]:
        return set(self._sessions)

    def expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now - s.last_seen > self.timeout]:
            del self._sessions[key]


def session_cookie(value: str, secure: bool, max_age: int | None = None) -> bytes:
    """A ``Set-Cookie`` header value for the session (empty value + max_age 0: clear it)."""
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
    method: bytes,
    origin: str | None,
    referer: str | None,
    host: str,
    secure: bool,
    session: Session,
    form_token: str | None,
) -> str | None:
    """Why a cookie-authenticated request must be refused as cross-site, or None.

    Safe methods pass. Others need an ``Origin`` (or ``Referer``) of this
    service, from its ``Host`` header, and the session's form token.
    """
    if method in SAFE_METHODS:
        return None
    source = origin if origin is not None else referer
    if source is None or not same_origin(source, host, secure):
        return "cross-site request refused: Origin is not this service"
    if form_token is None or not hmac.compare_digest(
        form_token.encode("utf-8", "replace"), session.csrf_token.encode()
    ):
        return "cross-site request refused: missing or wrong form token (X-CSRF-Token)"
    return None
