"""Users, roles and API tokens of the admin service, in the database.

Passwords arrive here already hashed (a memory-hard KDF, ``admin.auth``) and
tokens as their SHA-256 digest: neither a password nor a token is ever stored.
Every function runs in the database thread on an open connection.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import IntegrityError

from udsgateway.store import schema

VIEWER = "viewer"
OPERATOR = "operator"
ADMIN = "admin"
#: Lowest to highest: each role may do what the roles before it may.
ROLES = (VIEWER, OPERATOR, ADMIN)


class UserError(Exception):
    """A user or token operation that cannot be done (unknown name, name taken...)."""


@frozen
class Principal:
    """Who is calling: a user's name, role and content permission."""

    name: str
    role: str
    view_content: bool = False

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def add_user(
    connection: Connection,
    name: str,
    password_hash: str,
    role: str,
    view_content: bool,
    now: float,
) -> int:
    """Create a user; raise UserError when the name is taken."""
    _check_role(role)
    if not name or len(name) > 64:
        raise UserError("a user name has 1 to 64 characters")
    try:
        with connection.begin_nested():
            result = connection.execute(
                schema.users.insert().values(
                    name=name,
                    password_hash=password_hash,
                    role=role,
                    view_content=view_content,
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                )
            )
    except IntegrityError:
        raise UserError(f"user {name!r} exists already") from None
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _user_id(connection: Connection, name: str) -> int:
    row = connection.execute(select(schema.users.c.id).where(schema.users.c.name == name)).first()
    if row is None:
        raise UserError(f"no user {name!r}")
    return int(row[0])


def update_user(connection: Connection, name: str, now: float, values: dict[str, Any]) -> None:
    """Change a user's password_hash, role, view_content or disabled."""
    allowed = {"password_hash", "role", "view_content", "disabled"}
    if set(values) - allowed:
        raise UserError(f"cannot change {sorted(set(values) - allowed)}")
    if "role" in values:
        _check_role(values["role"])
    user_id = _user_id(connection, name)
    connection.execute(
        update(schema.users).where(schema.users.c.id == user_id).values(updated_at=now, **values)
    )


def list_users(connection: Connection) -> list[dict[str, Any]]:
    """Every user, without their password hash."""
    u = schema.users.c
    rows = connection.execute(
        select(u.name, u.role, u.view_content, u.disabled, u.created_at, u.updated_at).order_by(
            u.name
        )
    )
    return [
        {
            "name": row.name,
            "role": row.role,
            "view_content": bool(row.view_content),
            "disabled": bool(row.disabled),
            "created_at": row.created_at,
            "updated_at": row.updated_at,
        }
        for row in rows
    ]


def login_record(connection: Connection, name: str) -> tuple[str, Principal] | None:
    """The password hash and principal of an enabled user, or None."""
    u = schema.users.c
    row = connection.execute(
        select(u.password_hash, u.role, u.view_content).where(
            u.name == name, u.disabled.is_(False)
        )
    ).first()
    if row is None:
        return None
    return row.password_hash, Principal(name, row.role, bool(row.view_content))


def count_users(connection: Connection) -> int:
    return len(connection.execute(select(schema.users.c.id)).all())


def add_token(
    connection: Connection, user: str, label: str, digest: str, prefix: str, now: float
) -> int:
    """Store a new token (its digest only) for an existing user; return its id."""
    user_id = _user_id(connection, user)
    result = connection.execute(
        schema.api_tokens.insert().values(
            user_id=user_id,
            label=label,
            digest=digest,
            prefix=prefix,
            created_at=now,
            revoked_at=None,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def revoke_token(connection: Connection, token_id: int, now: float) -> None:
    t = schema.api_tokens.c
    result = connection.execute(
        update(schema.api_tokens)
        .where(t.id == token_id, t.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    if result.rowcount == 0:
        raise UserError(f"no active token {token_id}")


def list_tokens(connection: Connection, user: str | None = None) -> list[dict[str, Any]]:
    """Tokens with their owner, label and first characters; never the digest."""
    t, u = schema.api_tokens.c, schema.users.c
    query = (
        select(t.id, u.name, t.label, t.prefix, t.created_at, t.revoked_at)
        .join_from(schema.api_tokens, schema.users, t.user_id == u.id)
        .order_by(t.id)
    )
    if user is not None:
        query = query.where(u.name == user)
    return [
        {
            "id": row.id,
            "user": row.name,
            "label": row.label,
            "prefix": row.prefix,
            "created_at": row.created_at,
            "revoked_at": row.revoked_at,
        }
        for row in connection.execute(query)
    ]


def token_principals(connection: Connection) -> dict[str, Principal]:
    """Every usable token's digest and its user (active tokens of enabled users)."""
    t, u = schema.api_tokens.c, schema.users.c
    rows = connection.execute(
        select(t.digest, u.name, u.role, u.view_content)
        .join_from(schema.api_tokens, schema.users, t.user_id == u.id)
        .where(t.revoked_at.is_(None), u.disabled.is_(False))
    )
    return {row.digest: Principal(row.name, row.role, bool(row.view_content)) for row in rows}


def token_principal(connection: Connection, digest: str) -> Principal | None:
    """The user of one usable token, or None (revoked, unknown, user disabled)."""
    t, u = schema.api_tokens.c, schema.users.c
    row = connection.execute(
        select(u.name, u.role, u.view_content)
        .join_from(schema.api_tokens, schema.users, t.user_id == u.id)
        .where(t.digest == digest, t.revoked_at.is_(None), u.disabled.is_(False))
    ).first()
    return None if row is None else Principal(row.name, row.role, bool(row.view_content))


def user_principal(connection: Connection, name: str) -> Principal | None:
    """An enabled user's current principal (a session re-reads it on every request)."""
    record = login_record(connection, name)
    return None if record is None else record[1]


# -- failed logins (the lockout), shared by restarts and nodes

#: The two things a failed login is counted against.
LOGIN_KINDS = ("name", "address")


def login_locked(connection: Connection, name: str, address: str, now: float) -> bool:
    """Whether the user name or the client address is locked out at ``now``."""
    f = schema.login_failures.c
    row = connection.execute(
        select(f.kind)
        .where(
            ((f.kind == "name") & (f.key == name[:255]))
            | ((f.kind == "address") & (f.key == address[:255])),
            f.locked_until > now,
        )
        .limit(1)
    ).first()
    return row is not None


def login_failed(
    connection: Connection,
    name: str,
    address: str,
    now: float,
    max_failures: int,
    lockout_seconds: float,
) -> None:
    """Count a failed login against the name and the address; lock either out for
    ``lockout_seconds`` at its ``max_failures``-th failure in a row. A run of failures
    whose last is older than ``lockout_seconds`` (and is not locked) is forgotten."""
    table = schema.login_failures
    f = table.c
    connection.execute(
        delete(table).where(f.updated_at < now - lockout_seconds, f.locked_until <= now)
    )
    for kind, key in (("name", name[:255]), ("address", address[:255])):
        row = connection.execute(
            select(f.failures, f.locked_until).where(f.kind == kind, f.key == key)
        ).first()
        failures = 1
        if row is not None and not (row.locked_until and row.locked_until <= now):
            failures = row.failures + 1
        locked_until = now + lockout_seconds if failures >= max_failures else 0.0
        values = {"failures": failures, "locked_until": locked_until, "updated_at": now}
        if row is not None:
            connection.execute(update(table).where(f.kind == kind, f.key == key).values(values))
            continue
        try:
            with connection.begin_nested():
                connection.execute(table.insert().values(kind=kind, key=key, **values))
        except IntegrityError:
            # Another node counted a failure for it at the same moment: add ours.
            connection.execute(
                update(table)
                .where(f.kind == kind, f.key == key)
                .values(failures=f.failures + 1, updated_at=now)
            )


def login_succeeded(connection: Connection, name: str, address: str) -> None:
    """A good login clears the name's failures, and the address's unless it is locked."""
    table = schema.login_failures
    f = table.c
    connection.execute(delete(table).where(f.kind == "name", f.key == name[:255]))
    connection.execute(
        delete(table).where(f.kind == "address", f.key == address[:255], f.locked_until == 0)
    )
