"""Read-only work beside the database thread: operators' searches and status counts.

The database thread runs every write, and on SQLite each of its transactions
takes the write lock up front (``BEGIN IMMEDIATE``). A search or a count over
millions of rows run there would hold up every inbound commit behind it. A
read runs instead in a thread of its own, on a connection of its own, in a
deferred transaction that only reads (``query_only``): under WAL it sees a
consistent snapshot and never blocks the writer (nor waits for it). On
PostgreSQL it is a REPEATABLE READ, READ ONLY transaction (one snapshot),
rolled back at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

R = TypeVar("R")

_held = threading.local()


def read_now(engine: Engine, function: Callable[..., R], *args: Any) -> R:
    """Run ``function(connection, *args)`` in a read-only transaction in this thread.

    The thread keeps its connection between reads (one per thread and engine); a
    connection that failed is dropped and the next read opens a fresh one.
    """
    connections: dict[int, Connection] = getattr(_held, "connections", None) or {}
    _held.connections = connections
    connection = connections.get(id(engine))
    if connection is None or connection.closed or connection.invalidated:
        connection = engine.connect()
        connections[id(engine)] = connection
    sqlite = connection.dialect.name == "sqlite"
    try:
        if sqlite:
            driver = connection.connection.dbapi_connection
            assert driver is not None
            driver.execute("PRAGMA query_only = 1")
            # Deferred: a read lock only, taken at the first read (the engine's begin
            # hook sees the transaction open and adds no BEGIN IMMEDIATE).
            driver.execute("BEGIN")
        elif connection.dialect.name == "postgresql":
            # One snapshot for the whole read, and no writes.
            connection.exec_driver_sql(
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
            )
        try:
            return function(connection, *args)
        finally:
            if connection.in_transaction():
                connection.rollback()
            if sqlite:
                driver = connection.connection.dbapi_connection
                assert driver is not None
                if driver.in_transaction:
                    driver.rollback()
                driver.execute("PRAGMA query_only = 0")
    except (SQLAlchemyError, connection.dialect.loaded_dbapi.Error):
        connections.pop(id(engine), None)
        connection.invalidate()
        connection.close()
        raise
