"""The SQL of destination pauses, and how a destination is named to operators.

A destination is named by its address, ``host:port`` (the endpoint string a
delivery stores carries timeouts and TLS files too). A paused destination
keeps queueing; nothing is sent to it until it is resumed. The pause is a
row in ``destination_pauses``, so it survives a restart.
"""

from __future__ import annotations

import re
from functools import lru_cache

from attrs import frozen
from sqlalchemy import Connection, delete, select

from udsgateway.store import schema

_ENDPOINT_PART = re.compile(r"(?:[^:\\]|\\.)+")


@lru_cache(maxsize=1024)
def address_of(endpoint: str) -> str:
    """``host:port`` of a Twisted client endpoint string (``[host]:port`` for IPv6);
    the string itself when it names no host and port."""
    parts = [p.replace("\\:", ":") for p in _ENDPOINT_PART.findall(endpoint)]
    fields = dict(p.partition("=")[::2] for p in parts[1:] if "=" in p)
    host, port = fields.get("host"), fields.get("port")
    if host is None or port is None:
        return endpoint
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


@frozen
class Pause:
    """A paused destination."""

    destination: str
    paused_by: str
    paused_at: float
    reason: str


def pauses(connection: Connection) -> dict[str, Pause]:
    """Every paused destination, by address."""
    p = schema.destination_pauses
    return {
        row.destination: Pause(row.destination, row.paused_by, row.paused_at, row.reason)
        for row in connection.execute(select(p))
    }


def pause(connection: Connection, destination: str, who: str, reason: str, now: float) -> bool:
    """Pause a destination; False when it was paused already (the first pause stands)."""
    p = schema.destination_pauses
    found = connection.execute(
        select(p.c.destination).where(p.c.destination == destination)
    ).first()
    if found is not None:
        return False
    connection.execute(
        p.insert().values(
            destination=destination[:255], paused_by=who[:128], paused_at=now, reason=reason[:255]
        )
    )
    return True


def resume(connection: Connection, destination: str) -> bool:
    """Resume a destination; False when it was not paused."""
    p = schema.destination_pauses
    result = connection.execute(delete(p).where(p.c.destination == destination))
    return bool(result.rowcount)
