"""What every ``udsgateway`` command shares: its error, the store, rows on the terminal.

Both ``cli.main`` and ``cli.operate`` import this module; neither imports the other's
functions at call time (``main`` only registers ``operate``'s commands).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, TextIO

from udsgateway.config import GatewayConfig
from udsgateway.store.engine import (
    Database,
    InlineRunner,
    SchemaError,
    damage_before_command,
    ensure_schema,
    make_engine,
)


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def open_database(config: GatewayConfig) -> Database:
    """The store, in this thread, schema checked; refused when its WAL is damaged.

    Opening a database replays only the WAL frames before a bad checksum and
    erases the rest at the next checkpoint: the evidence is kept for the
    gateway's start, which reports it (``--accept-damaged-database``).
    """
    problems = damage_before_command(config.database, time.time())
    if problems:
        raise CommandError(
            "the database cannot be trusted: "
            + "; ".join(problems)
            + " (see the gateway's --accept-damaged-database)"
        )
    database = Database(make_engine(config.database), InlineRunner())
    try:
        database.transaction_now(ensure_schema)
    except SchemaError as error:
        raise CommandError(str(error)) from None
    return database


def write_rows(
    rows: Sequence[dict[str, Any]],
    out: TextIO,
    as_json: bool,
    columns: Sequence[str] = (),
) -> None:
    """Rows as JSON lines (``--json``), else as a text table (see `print_table`)."""
    if as_json:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    else:
        print_table(rows, out, columns)


def print_table(rows: Sequence[dict[str, Any]], out: TextIO, columns: Sequence[str] = ()) -> None:
    """Rows as an aligned text table with upper-case headings; None shows as "".

    Without rows it prints the headings of ``columns`` (when given) and "(none)".
    """
    columns = list(rows[0]) if rows else list(columns)
    if columns:
        cells = [{c: "" if r[c] is None else str(r[c]) for c in columns} for r in rows]
        widths = {c: max([len(c), *(len(r[c]) for r in cells)]) for c in columns}
        heading = "  ".join(c.upper().replace("_", " ").ljust(widths[c]) for c in columns)
        out.write(heading.rstrip() + "\n")
    if not rows:
        out.write("(none)\n")
        return
    for row in cells:
        out.write("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() + "\n")
