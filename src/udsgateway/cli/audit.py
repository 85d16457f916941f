"""``udsgateway audit``: the audit trail, newest first (who, when, what, why, result, via).

Read from the store beside a running gateway. Every operator action and every
view of message content is in it, whether done through the admin API, the
command line or the manhole; it never holds message content.
"""

from __future__ import annotations

import argparse
import getpass
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from udsgateway.store import audit

if TYPE_CHECKING:
    from udsgateway.config import GatewayConfig

AUDIT_COLUMNS = ("id", "time", "who", "via", "action", "target", "result", "reason")


def audit_row(entry: audit.AuditEntry) -> dict[str, Any]:
    """What ``udsgateway audit`` prints of a row."""
    return {
        "id": entry.id,
        "time": datetime.fromtimestamp(entry.at, tz=UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "who": entry.who,
        "via": entry.via,
        "action": entry.action,
        "target": entry.target,
        "result": entry.result,
        "reason": entry.reason,
    }


def cmd_audit(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    from udsgateway.cli.common import open_database, write_rows

    query = audit.AuditQuery(
        who=args.who,
        action=args.action,
        target=args.target,
        since=time.time() - args.since if args.since else None,
        vias=tuple(args.via or ()),
        limit=args.limit,
    )
    rows = open_database(config).transaction_now(audit.entries, query)
    write_rows([audit_row(row) for row in rows], out, args.json, AUDIT_COLUMNS)
    return 0


def add_audit_command(commands: Any) -> None:
    """Register ``audit`` on the CLI's subcommand parser."""
    from udsgateway.cli.operate import parse_duration

    p = commands.add_parser("audit", help="the audit trail, newest first (never content)")
    p.add_argument("--who", default=None, help="only this operator")
    p.add_argument(
        "--action",
        default=None,
        help="an action (delivery.skip) or a family ending in a dot (delivery.)",
    )
    p.add_argument("--target", default=None, help="an object, e.g. 'message 12'")
    p.add_argument("--via", action="append", choices=list(audit.VIA), help="repeatable")
    p.add_argument("--since", type=parse_duration, default=None, help="e.g. 30m, 1h, 2d")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(handler=cmd_audit)


def _facade(config: GatewayConfig) -> Any:
    from twisted.internet.task import Clock

    from udsgateway.admin.operations import Operations
    from udsgateway.cli.common import open_database

    return Operations(open_database(config), Clock())


def _now(deferred: Any) -> Any:
    """The result of a facade call on the inline database (it has fired already)."""
    from udsgateway.admin.operations import OperationsError
    from udsgateway.cli.common import CommandError

    found: list[Any] = []
    deferred.addBoth(found.append)
    [result] = found
    if hasattr(result, "check"):  # a Failure
        if result.check(OperationsError):
            raise CommandError(result.getErrorMessage())
        result.raiseException()
    return result


def cmd_destinations_list(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    from udsgateway.cli.common import write_rows

    rows = _now(_facade(config).destinations(args.who or getpass.getuser(), "cli"))
    columns = ("destination", "paused", "paused_by", "queued", "held", "delivered")
    shown = [{c: row.get(c) for c in (*columns, "oldest_pending_age")} for row in rows]
    if not args.json:
        for row in shown:
            row["paused"] = "yes" if row["paused"] else "no"
    write_rows(shown, out, args.json, (*columns, "oldest_pending_age"))
    return 0


def cmd_destinations_act(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    facade = _facade(config)
    who = args.who or getpass.getuser()
    if args.command_action == "pause":
        _now(facade.pause(who, "cli", args.destination, args.reason))
        out.write(f"destination {args.destination}: paused (it keeps queueing)\n")
    else:
        _now(facade.resume(who, "cli", args.destination, args.reason or ""))
        out.write(f"destination {args.destination}: resumed\n")
    return 0


def add_destination_commands(commands: Any) -> None:
    """Register ``destinations list|pause|resume``."""
    parser = commands.add_parser("destinations", help="list, pause or resume destinations")
    actions = parser.add_subparsers(dest="destinations_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="destinations with work or a pause")
    p.add_argument("--who", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(handler=cmd_destinations_list)
    for name, text in (
        ("pause", "stop sending to a destination (host:port); it keeps queueing"),
        ("resume", "send to a paused destination again"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("destination", metavar="HOST:PORT")
        p.add_argument(
            "--reason", required=name == "pause", help="why (recorded in the audit log)"
        )
        p.add_argument("--who", default=None, help="operator name (default: your login)")
        p.set_defaults(handler=cmd_destinations_act, command_action=name)
