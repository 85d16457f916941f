"""A throwaway PostgreSQL database per test, for gateways run as real processes.

The server is the one the store contract uses (``UDSGATEWAY_TEST_POSTGRES``);
each test gets a database of its own, named after that one with a random
suffix, dropped in the test's cleanup. A gateway holds its database (an
advisory lock, or the cluster's leases), so tests running in parallel must not
share one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.test_store_contract import POSTGRES_URL


def new_database(testcase: SynchronousTestCase) -> str:
    """Create an empty database for ``testcase`` and return its URL (dropped in cleanup)."""
    base = make_url(POSTGRES_URL)
    name = f"{base.database or 'test'}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:
        admin.dispose()
        if os.environ.get("CI"):
            raise
        raise SkipTest(f"cannot create a database at {POSTGRES_URL}: {error}") from None

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    testcase.addCleanup(drop)
    url: str = base.set(database=name).render_as_string(hide_password=False)
    return url


def use_database(config: Path, url: str, extra: str = "") -> None:
    """Point a configuration written by ``helpers.write_config`` at ``url``; append
    ``extra`` (more TOML sections) to it."""
    lines = config.read_text(encoding="utf-8").splitlines()
    lines = [
        f"database = {_string(url)}" if line.startswith("database = ") else line for line in lines
    ]
    config.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")


def rows(url: str, sql: str, **parameters: Any) -> list[dict[str, Any]]:
    """Rows of a query on the database at ``url``, as dicts."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(text(sql), parameters)]
    finally:
        engine.dispose()


def scalar(url: str, sql: str, **parameters: Any) -> Any:
    """The single value of a query on the database at ``url``."""
    (row,) = rows(url, sql, **parameters)
    (value,) = row.values()
    return value


def _string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
