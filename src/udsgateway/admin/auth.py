"""Passwords, API tokens and login throttling.

* Passwords are hashed with scrypt (``hashlib``), a memory-hard KDF:
  ``scrypt$N$r$p$salt$hash`` (salt and hash in base64). Hashing takes tens of
  milliseconds and 32 MiB by design: call it off the reactor thread.
* An API token is 32 random bytes (``udsgw_`` + URL-safe base64), shown once;
  the database keeps its SHA-256 digest, which is enough for a secret with
  that much entropy, and its first characters so a list tells them apart.
* ``LoginThrottle`` counts failed logins per user name and per client address
  and locks either out for a while after too many (in the database).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from attrs import define
from twisted.internet.defer import Deferred

from udsgateway.store import users
from udsgateway.store.engine import Database

SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
_MAXMEM = 64 * 1024 * 1024
TOKEN_PREFIX = "udsgw_"

#: Verified against when a user name is unknown, so a login takes as long for
#: an unknown name as for a wrong password (no user enumeration by timing).
_DUMMY_SALT = b"udsgateway-dummy"


def hash_password(password: str, n: int = SCRYPT_N) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM
    )
    return "$".join(
        [
            "scrypt",
            str(n),
            str(SCRYPT_R),
            str(SCRYPT_P),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        ]
    )


def verify_password(password: str, stored: str | None) -> bool:
    """True when ``password`` matches the stored hash; None (no such user) is
    checked against a dummy hash at the same cost, and is False."""
    try:
        kind, n, r, p, salt, digest = (stored or "").split("$")
        if kind != "scrypt":
            raise ValueError(kind)
        expected = base64.b64decode(digest)
        salt_bytes = base64.b64decode(salt)
        cost = (int(n), int(r), int(p))
    except ValueError:
        expected, salt_bytes, cost = b"", _DUMMY_SALT, (SCRYPT_N, SCRYPT_R, SCRYPT_P)
    actual = hashlib.scrypt(
        password.encode("utf-8"), salt=salt_bytes, n=cost[0], r=cost[1], p=cost[2], maxmem=_MAXMEM
    )
    return bool(expected) and hmac.compare_digest(actual, expected)


def new_token() -> str:
    """A fresh API token, to be shown once."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_shown_prefix(token: str) -> str:
    return token[: len(TOKEN_PREFIX) + 6]


@define
class LoginThrottle:
    """Failed logins per user name and per client address, with lockout.

    After ``max_failures`` failures in a row a name (or an address) is locked
    for ``lockout_seconds``: every login for it is refused, even with the right
    password, without checking it. A success clears the name's count. The counts
    are in the database (``store.users``): a restart does not forget them, and
    every node of a cluster on the same database counts the same failures.
    """

    database: Database
    max_failures: int = 5
    lockout_seconds: float = 900.0

    def locked(self, name: str, address: str, now: float) -> Deferred[bool]:
        return self.database.transaction(users.login_locked, name, address, now)

    def failed(self, name: str, address: str, now: float) -> Deferred[None]:
        return self.database.transaction(
            users.login_failed, name, address, now, self.max_failures, self.lockout_seconds
        )

    def succeeded(self, name: str, address: str) -> Deferred[None]:
        return self.database.transaction(users.login_succeeded, name, address)
