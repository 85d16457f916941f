"""Operator commands: the delivery queue (``deliveries``), executions held because
their action could not be rendered (``executions``) and the execution logs (``logs``).

They work on the store directly, beside a running gateway: a released,
skipped or replayed delivery is picked up by the gateway within its
``held_poll`` interval. Every such action is audited (who, what, when, why;
never content).
"""

from __future__ import annotations

import argparse
import getpass
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy import Connection, select

from udsgateway.store import executions, outbox, schema

if TYPE_CHECKING:
    from udsgateway.config import GatewayConfig

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``2d`` in seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30m, 1h, 2d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


_ENDPOINT_PART = re.compile(r"(?:[^:\\]|\\.)+")


def destination_address(endpoint: str, protocol: str) -> str:
    """``mllp://host:port`` or ``tcp://host:port`` (``mllp+tls://`` with TLS) of a
    destination's Twisted endpoint string, as an operator writes it."""
    parts = [p.replace("\\:", ":") for p in _ENDPOINT_PART.findall(endpoint)]
    if not parts:
        return endpoint
    fields = dict(p.partition("=")[::2] for p in parts[1:] if "=" in p)
    host, port = fields.get("host"), fields.get("port")
    if host is None or port is None:
        return endpoint
    if ":" in host:
        host = f"[{host}]"
    scheme = protocol + ("+tls" if parts[0] == "tls" else "")
    return f"{scheme}://{host}:{port}"


DELIVERY_COLUMNS = (
    "id",
    "state",
    "lane",
    "destination",
    "control_id",
    "attempts",
    "ack",
    "updated",
    "last_error",
)


def delivery_row(delivery: outbox.Delivery) -> dict[str, Any]:
    """What an operator sees of a delivery: never its payload."""
    return {
        "id": delivery.id,
        "state": delivery.state,
        "lane": delivery.lane,
        "destination": destination_address(delivery.destination, delivery.protocol),
        "control_id": delivery.control_id,
        "attempts": delivery.attempts,
        "ack": delivery.response_code,
        "updated": _time(delivery.updated_at),
        "last_error": delivery.last_error,
    }


def cmd_deliveries_list(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    from udsgateway.cli.main import open_database, write_rows

    states = tuple(args.state or ())
    rows = open_database(config).transaction_now(
        outbox.list_deliveries, states, args.lane, args.limit
    )
    table = [delivery_row(row) for row in rows]
    write_rows(table, out, args.json, DELIVERY_COLUMNS)
    return 0


def cmd_deliveries_act(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    from udsgateway.cli.main import CommandError, open_database

    payload = None
    if args.command_action == "replay" and args.payload:
        text = Path(args.payload).read_bytes()
        payload = b"\r".join(line.rstrip(b"\r") for line in text.splitlines() if line.strip())
        payload += b"\r"
    try:
        updated = open_database(config).transaction_now(
            outbox.operator_action,
            args.delivery_id,
            args.command_action,
            args.who or getpass.getuser(),
            args.reason,
            time.time(),
            payload,
        )
    except (LookupError, ValueError) as error:
        raise CommandError(str(error)) from None
    done = {"release": "released", "skip": "skipped", "replay": "replayed"}[args.command_action]
    out.write(f"delivery {updated.id}: {done}, now {updated.state}\n")
    return 0


LOG_COLUMNS = (
    "id",
    "time",
    "event",
    "outcome",
    "app_id",
    "flow_id",
    "control_id",
    "type",
    "action",
    "attempt",
    "ack",
    "reason",
)

#: ``logs --status`` words for common questions, and the outcomes they mean.
STATUS_ALIASES = {"failed": "failed", "held": "held", "ok": "delivered"}

#: Every outcome a log line can have (received, delivery, execution, operator).
LOG_OUTCOMES = (
    "accepted",
    "rejected",
    "retry",
    "delivered",
    "held",
    "skipped",
    "done",
    "failed",
    "release",
    "skip",
    "replay",
    "not sent",
)


def _known_outcomes(connection: Connection) -> set[str]:
    """LOG_OUTCOMES and every outcome the logs hold (a newer gateway may write others)."""
    found = connection.execute(select(schema.logs.c.outcome).distinct()).scalars()
    return {*LOG_OUTCOMES, *(outcome for outcome in found if outcome)}


def check_status(text: str, known: set[str]) -> str:
    """A ``logs --status`` value as the outcome it selects; ValueError for any other word."""
    value = text.strip().lower()
    if value in STATUS_ALIASES:
        return STATUS_ALIASES[value]
    if value in known:
        return value
    words = ", ".join(sorted({*STATUS_ALIASES, *known}))
    raise ValueError(f"--status: unknown status {text!r} (one of: {words})")


def execution_row(row: executions.ExecutionRow) -> dict[str, Any]:
    """What an operator sees of an execution: never its message's content."""
    return {
        "id": row.id,
        "state": row.state,
        "flow_id": row.flow_id,
        "action": row.step,
        "control_id": row.control_id,
        "updated": _time(row.updated_at),
        "reason": row.error,
    }


def cmd_executions_list(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    from udsgateway.cli.main import open_database, write_rows

    rows = open_database(config).transaction_now(
        executions.list_executions, tuple(args.state or ()), args.limit
    )
    write_rows([execution_row(row) for row in rows], out, args.json)
    return 0


def cmd_executions_release(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    from udsgateway.cli.main import CommandError, open_database

    try:
        row = open_database(config).transaction_now(
            executions.release,
            args.execution_id,
            args.who or getpass.getuser(),
            args.reason,
            time.time(),
        )
    except (LookupError, ValueError) as error:
        raise CommandError(str(error)) from None
    out.write(f"execution {row.id}: released, now {row.state} (rendered again)\n")
    return 0


def _log_rows(
    connection: Connection,
    flow_id: str | None,
    status: str | None,
    since: float | None,
    after_id: int,
    limit: int,
    newest_first: bool = False,
) -> list[dict[str, Any]]:
    """Log lines after ``after_id``: the oldest ``limit`` of them, or the newest."""
    logs, flows = schema.logs, schema.flows
    query = (
        select(logs, flows.c.app_id.label("flow_app_id"))
        .outerjoin(flows, flows.c.flow_id == logs.c.flow_id)
        .where(logs.c.id > after_id)
        .order_by(logs.c.id.desc() if newest_first else logs.c.id)
        .limit(limit)
    )
    if flow_id:
        query = query.where(logs.c.flow_id == flow_id)
    if status:
        query = query.where(logs.c.outcome == status)
    if since is not None:
        query = query.where(logs.c.at >= since)
    return [
        {
            "id": row.id,
            "time": _time(row.at),
            "event": row.event,
            "outcome": row.outcome,
            "app_id": row.app_id or row.flow_app_id or "",
            "flow_id": row.flow_id,
            "control_id": row.control_id,
            "type": row.message_type,
            # One type per field: a number, or null when the line has none.
            "action": row.step,
            "attempt": row.attempt,
            "ack": row.ack_code,
            "reason": row.reason,
        }
        for row in connection.execute(query)
    ]


def cmd_logs(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    """Newest first, like a log viewer; ``--tail N`` (and ``--follow``): the newest N in
    the order they happened, then (``--follow``) new lines as they come."""
    from udsgateway.cli.main import CommandError, open_database, write_rows

    database = open_database(config)
    status = None
    if args.status is not None:
        try:
            status = check_status(args.status, database.transaction_now(_known_outcomes))
        except ValueError as error:
            raise CommandError(str(error)) from None
    since = time.time() - args.since if args.since else None
    tail = args.tail if args.tail is not None else (10 if args.follow else None)
    count = tail if tail is not None else args.limit
    rows = database.transaction_now(_log_rows, args.flow, status, since, 0, count, True)
    if tail is not None:
        rows.reverse()
    write_rows(rows, out, args.json, LOG_COLUMNS)
    out.flush()
    if not args.follow:
        return 0
    after = max((row["id"] for row in rows), default=0)
    sleep: Callable[[float], None] = time.sleep
    while True:
        sleep(args.poll)
        rows = database.transaction_now(_log_rows, args.flow, status, since, after, 1000)
        if rows:
            after = rows[-1]["id"]
            write_rows(rows, out, args.json)
            out.flush()


def add_operator_commands(commands: Any) -> None:
    """Register ``deliveries`` and ``logs`` on the CLI's subcommand parser."""
    deliveries = commands.add_parser("deliveries", help="list, release, skip or replay")
    actions = deliveries.add_subparsers(dest="deliveries_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="deliveries, oldest first (never their content)")
    p.add_argument(
        "--state",
        action="append",
        choices=[outbox.QUEUED, outbox.HELD, outbox.DELIVERED, outbox.SKIPPED],
        help="only these states (repeatable)",
    )
    p.add_argument("--lane", default=None)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(handler=cmd_deliveries_list)
    for name, text in (
        ("release", "send a held or queued (retrying) delivery again now"),
        ("skip", "give up on a held or queued delivery (its lane moves on)"),
        ("replay", "send a delivery again before what is queued after it, optionally edited"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("delivery_id", type=int, metavar="ID")
        p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
        p.add_argument("--who", default=None, help="operator name (default: your login)")
        if name == "replay":
            p.add_argument("--payload", metavar="FILE", help="the edited message to send")
        p.set_defaults(handler=cmd_deliveries_act, command_action=name)

    held = commands.add_parser("executions", help="list executions, release held ones")
    actions = held.add_subparsers(dest="executions_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="executions, oldest first (never their content)")
    p.add_argument(
        "--state",
        action="append",
        choices=[
            executions.PENDING,
            executions.WAITING,
            executions.HELD_EXECUTION,
            executions.DONE,
            executions.FAILED,
        ],
        help="only these states (repeatable)",
    )
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(handler=cmd_executions_list)
    p = actions.add_parser(
        "release", help="render a held execution's action again (after fixing its flow)"
    )
    p.add_argument("execution_id", type=int, metavar="ID")
    p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    p.add_argument("--who", default=None, help="operator name (default: your login)")
    p.set_defaults(handler=cmd_executions_release)

    p = commands.add_parser("logs", help="execution logs, newest first (no message content)")
    p.add_argument("--flow", default=None, metavar="FLOW_ID")
    p.add_argument(
        "--status",
        default=None,
        help="failed, held, ok (= delivered), or any outcome (accepted, rejected, retry, ...)",
    )
    p.add_argument("--since", type=parse_duration, default=None, help="e.g. 30m, 1h, 2d")
    p.add_argument("--follow", action="store_true", help="keep printing new entries")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls (--follow)")
    p.add_argument("--limit", type=int, default=1000, help="at most this many lines, newest first")
    p.add_argument(
        "--tail",
        type=int,
        default=None,
        metavar="N",
        help="the newest N lines, oldest of them first (--follow: 10 unless given)",
    )
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(handler=cmd_logs)
