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
from typing import Any, TextIO

from sqlalchemy import Connection

from udsgateway.cli.common import CommandError, open_database, write_rows
from udsgateway.config import GatewayConfig
from udsgateway.hl7.header import HeaderProblem, parse_header
from udsgateway.store import executions, logs, operator, outbox
from udsgateway.store.records import Delivery, ExecutionRow, LogLine

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


def delivery_row(delivery: Delivery) -> dict[str, Any]:
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


def control_id_of(delivery_id: int, payload: bytes) -> str:
    """MSH-10 of a payload to send, read as it is encoded (MSH-18, else 8859/1)."""
    header = parse_header(payload, default_charset="latin-1")
    if isinstance(header, HeaderProblem):
        raise ValueError(
            f"the message of delivery {delivery_id} is not valid HL7: {header.diagnostic}"
        )
    if not header.control_id:
        raise ValueError(f"the message of delivery {delivery_id} has no MSH-10")
    return header.control_id


def delivery_action(
    connection: Connection,
    delivery_id: int,
    action: str,
    who: str,
    reason: str,
    now: float,
    payload: bytes | None = None,
) -> Delivery:
    """``store.operator.delivery_action``, with the MSH-10 it needs read here: of an
    edited payload, or of the stored one when the delivery has none (stored so by
    an older version). A payload that is not HL7 is refused (ValueError)."""
    control_id = None
    current = outbox.get_delivery(connection, delivery_id)
    if current is not None and operator.needs_control_id(current, action, payload):
        sent = payload if payload is not None else current.payload
        control_id = control_id_of(delivery_id, sent)
    return operator.delivery_action(
        connection, delivery_id, action, who, reason, now, payload, control_id
    )


def cmd_deliveries_list(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    states = tuple(args.state or ())
    rows = open_database(config).transaction_now(
        outbox.list_deliveries, states, args.lane, args.limit
    )
    table = [delivery_row(row) for row in rows]
    write_rows(table, out, args.json, DELIVERY_COLUMNS)
    return 0


def cmd_deliveries_act(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    payload = None
    if args.command_action == "replay" and args.payload:
        text = Path(args.payload).read_bytes()
        payload = b"\r".join(line.rstrip(b"\r") for line in text.splitlines() if line.strip())
        payload += b"\r"
    try:
        updated = open_database(config).transaction_now(
            delivery_action,
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


def check_status(text: str, known: set[str]) -> str:
    """A ``logs --status`` value as the outcome it selects; ValueError for any other word."""
    value = text.strip().lower()
    if value in STATUS_ALIASES:
        return STATUS_ALIASES[value]
    if value in known:
        return value
    words = ", ".join(sorted({*STATUS_ALIASES, *known}))
    raise ValueError(f"--status: unknown status {text!r} (one of: {words})")


def execution_row(row: ExecutionRow) -> dict[str, Any]:
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
    rows = open_database(config).transaction_now(
        executions.list_executions, tuple(args.state or ()), args.limit
    )
    write_rows([execution_row(row) for row in rows], out, args.json)
    return 0


def cmd_executions_release(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    try:
        row = open_database(config).transaction_now(
            operator.release_execution,
            args.execution_id,
            args.who or getpass.getuser(),
            args.reason,
            time.time(),
        )
    except (LookupError, ValueError) as error:
        raise CommandError(str(error)) from None
    out.write(f"execution {row.id}: released, now {row.state} (rendered again)\n")
    return 0


def log_row(line: LogLine) -> dict[str, Any]:
    """What an operator sees of a log line (LOG_COLUMNS)."""
    return {
        "id": line.id,
        "time": _time(line.at),
        "event": line.event,
        "outcome": line.outcome,
        "app_id": line.app_id,
        "flow_id": line.flow_id,
        "control_id": line.control_id,
        "type": line.message_type,
        # One type per field: a number, or null when the line has none.
        "action": line.step,
        "attempt": line.attempt,
        "ack": line.ack_code,
        "reason": line.reason,
    }


def cmd_logs(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    """Newest first, like a log viewer; ``--tail N`` (and ``--follow``): the newest N in
    the order they happened, then (``--follow``) new lines as they come."""
    database = open_database(config)
    status = None
    if args.status is not None:
        try:
            status = check_status(args.status, database.transaction_now(logs.known_outcomes))
        except ValueError as error:
            raise CommandError(str(error)) from None
    since = time.time() - args.since if args.since else None
    tail = args.tail if args.tail is not None else (10 if args.follow else None)
    count = tail if tail is not None else args.limit
    rows = [
        log_row(line)
        for line in database.transaction_now(
            logs.log_lines, args.flow, status, since, 0, count, True
        )
    ]
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
        rows = [
            log_row(line)
            for line in database.transaction_now(
                logs.log_lines, args.flow, status, since, after, 1000
            )
        ]
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
