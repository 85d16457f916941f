"""Who may log in to the console, and what each role may do.

The console shares the admin service's sessions (``admin.sessions``): a
random id in an HttpOnly, SameSite=Strict cookie, with a form token that every
state-changing request must carry, from a page of this very service (its
Origin). Passwords are checked by an ``Accounts`` source: the admin service's
users in the database (``DatabaseAccounts``), or users in memory in tests.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, Protocol

from attrs import define, field
from twisted.internet.defer import Deferred, succeed

from udsgateway.admin import auth
from udsgateway.store import users
from udsgateway.store.engine import Database
from udsgateway.store.users import ADMIN, OPERATOR, ROLES, VIEWER, Principal

__all__ = ["ADMIN", "OPERATOR", "VIEWER", "Accounts", "DatabaseAccounts", "MemoryAccounts"]


class Accounts(Protocol):
    """Where the console checks passwords and reads users."""

    def authenticate(self, name: str, password: str) -> Deferred[Principal | None]:
        """The user's principal when the password is right, else None."""

    def current(self, name: str) -> Deferred[Principal | None]:
        """The user as they are now (None: disabled or removed)."""

    def users(self) -> Deferred[list[dict[str, Any]]]:
        """Every user, for the admin's users page (no password hashes)."""


@define
class DatabaseAccounts:
    """The admin service's users: scrypt checked off the reactor thread."""

    database: Database
    offload: Callable[..., Deferred[Any]]

    def authenticate(self, name: str, password: str) -> Deferred[Principal | None]:
        return Deferred.fromCoroutine(self._authenticate(name, password))

    async def _authenticate(self, name: str, password: str) -> Principal | None:
        record = await self.database.transaction(users.login_record, name)
        ok = await self.offload(
            auth.verify_password, password, record[0] if record is not None else None
        )
        return record[1] if ok and record is not None else None

    def current(self, name: str) -> Deferred[Principal | None]:
        return self.database.transaction(users.user_principal, name)

    def users(self) -> Deferred[list[dict[str, Any]]]:
        return self.database.transaction(users.list_users)


@define
class MemoryAccounts:
    """Users in memory with plain passwords: for tests only."""

    entries: dict[str, tuple[str, Principal]] = field(factory=dict)

    def add(self, name: str, password: str, role: str, view_content: bool = False) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self.entries[name] = (password, Principal(name, role, view_content))

    def authenticate(self, name: str, password: str) -> Deferred[Principal | None]:
        entry = self.entries.get(name)
        ok = entry is not None and hmac.compare_digest(entry[0].encode(), password.encode())
        return succeed(entry[1] if ok and entry is not None else None)

    def current(self, name: str) -> Deferred[Principal | None]:
        entry = self.entries.get(name)
        return succeed(entry[1] if entry is not None else None)

    def users(self) -> Deferred[list[dict[str, Any]]]:
        rows = [
            {"name": p.name, "role": p.role, "view_content": p.view_content, "disabled": False}
            for _, p in self.entries.values()
        ]
        return succeed(rows)
