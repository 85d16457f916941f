"""``udsgateway``: the command line for everything but running the service.

Each subcommand opens the same store the service uses (SQLite allows the CLI
beside a running gateway; the gateway notices flow changes within its
``flow_reload_interval``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from udsgateway import store
from udsgateway.ack import ControlIdSource
from udsgateway.catalogue import variable_catalogue
from udsgateway.config import ConfigError, GatewayConfig, load_config
from udsgateway.db import (
    Database,
    InlineRunner,
    SchemaError,
    damage_before_command,
    ensure_schema,
    make_engine,
)
from udsgateway.flows import (
    App,
    Flow,
    FlowFileError,
    read_app_file,
    template_problems,
    write_app,
)
from udsgateway.message import MessageParseError, parse_message
from udsgateway.operate import add_operator_commands
from udsgateway.peers import add_peer_commands
from udsgateway.templating import (
    ActionResponse,
    RenderError,
    TemplateData,
    TemplateError,
    compile_template,
    render_body,
)

DEFAULT_CONFIG = "etc/udsgateway.toml"


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def listen_address(endpoint: str) -> tuple[str, str]:
    """Host and port of a server endpoint string such as ``tcp:port=2575:interface=...``."""
    host, port = "0.0.0.0", ""
    parts = endpoint.split(":")
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith("port="):
            port = part[5:]
        elif part.startswith("interface="):
            host = part[10:].replace("\\", "")
        elif index == 1 and part.isdigit():
            port = part
    return host, port


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


def flow_table(config: GatewayConfig, apps: Sequence[App]) -> list[dict[str, str]]:
    """Host, Port, App ID, Flow ID (and more) of each flow: what a sender needs."""
    listeners = {tenant.name: listen_address(tenant.listen) for tenant in config.tenants}
    rows = []
    for app in apps:
        host, port = listeners.get(app.tenant, ("?", "?"))
        for flow in app.flows:
            rows.append(
                {
                    "host": host,
                    "port": port,
                    "app_id": app.app_id,
                    "flow_id": flow.flow_id,
                    "tenant": app.tenant,
                    "type": flow.trigger.message_type,
                    "connection": flow.trigger.connection.upper(),
                    "enabled": "yes" if flow.enabled else "no",
                    "name": flow.name,
                }
            )
    return rows


def write_rows(rows: Sequence[dict[str, Any]], out: TextIO, as_json: bool) -> None:
    """Rows as JSON lines (``--json``), else as a text table."""
    if as_json:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    else:
        print_table(rows, out)


def print_table(rows: Sequence[dict[str, Any]], out: TextIO) -> None:
    """Rows as an aligned text table with upper-case headings."""
    if not rows:
        out.write("(none)\n")
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    out.write("  ".join(c.upper().replace("_", " ").ljust(widths[c]) for c in columns).rstrip())
    out.write("\n")
    for row in rows:
        out.write("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip() + "\n")


def cmd_flows_import(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    problems: list[str] = []
    apps = []
    for path in args.files:
        try:
            app = read_app_file(path)
        except FlowFileError as error:
            problems.extend(error.problems)
            continue
        if app.tenant not in {t.name for t in config.tenants}:
            problems.append(f"{path}: tenant: {app.tenant!r} is not configured in {config.path}")
            continue
        problems.extend(template_problems(path, app))
        apps.append(app)
    if problems:
        raise CommandError("\n".join(problems))
    database = open_database(config)
    try:
        saved = [database.transaction_now(store.save_app, app, time.time()) for app in apps]
    except ValueError as error:
        raise CommandError(str(error)) from None
    print_table(flow_table(config, saved), out)
    return 0


def find_flow(config: GatewayConfig, flow_id: str) -> tuple[App, Flow]:
    """The app and flow of a Flow ID, from the store."""
    for app in open_database(config).transaction_now(store.load_apps, None):
        for flow in app.flows:
            if flow.flow_id == flow_id:
                return app, flow
    raise CommandError(f"no flow with Flow ID {flow_id!r} (see `udsgateway flows list`)")


def cmd_flows_variables(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    _app, flow = find_flow(config, args.flow_id)
    if not flow.trigger.sample.strip():
        raise CommandError(f"flow {args.flow_id} has no sample payload")
    rows = [
        {"path": v.path, "name": v.name, "sample": v.value, "template": v.expression}
        for v in variable_catalogue(flow.trigger.sample)
    ]
    write_rows(rows, out, args.json)
    return 0


def cmd_flows_render(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    app, flow = find_flow(config, args.flow_id)
    chosen = [
        (step, action)
        for step, action in enumerate(flow.actions)
        if action.name == args.action or str(step) == args.action
    ]
    if not chosen:
        names = ", ".join(a.name for a in flow.actions) or "none"
        raise CommandError(f"flow {args.flow_id} has no action {args.action!r} (actions: {names})")
    step, action = chosen[0]
    message = Path(args.message).read_bytes() if args.message else flow.trigger.sample.encode()
    try:
        template = compile_template(action.template)
        body = render_body(
            template,
            TemplateData(
                parse_message(message),
                tuple(ActionResponse(a.name, None) for a in flow.actions[:step]),
                dict(app.variables),
            ),
            message_type=action.message_type,
            now=lambda: datetime.now(UTC),
            new_control_id=ControlIdSource.for_boot(time.time()).next,
        )
    except (TemplateError, RenderError, MessageParseError) as error:
        raise CommandError(f"action {action.name}: {error}") from None
    out.write(body.decode("latin-1").replace("\r", "\n"))
    return 0


def cmd_flows_list(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    apps = open_database(config).transaction_now(store.load_apps, args.tenant)
    rows = flow_table(config, apps)
    write_rows(rows, out, args.json)
    return 0


def cmd_flows_export(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    apps = open_database(config).transaction_now(store.load_apps, None)
    chosen = [app for app in apps if app.app_id == args.app_id]
    if not chosen:
        raise CommandError(f"no app with App ID {args.app_id!r} (see `udsgateway flows list`)")
    text = write_app(chosen[0])
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        out.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udsgateway", description="Operate an udsgateway HL7 gateway."
    )
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    flows = commands.add_parser("flows", help="import, export and list apps and flows")
    flow_commands = flows.add_subparsers(dest="flows_command", required=True, metavar="ACTION")
    p = flow_commands.add_parser("import", help="load flow files (one app each) into the store")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(handler=cmd_flows_import)
    p = flow_commands.add_parser("list", help="print Host, Port, App ID, Flow ID of each flow")
    p.add_argument("--tenant", default=None)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(handler=cmd_flows_list)
    p = flow_commands.add_parser("export", help="write an app back as a flow file")
    p.add_argument("app_id", metavar="APP_ID")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    p.set_defaults(handler=cmd_flows_export)
    p = flow_commands.add_parser("variables", help="show a flow's variable catalogue")
    p.add_argument("flow_id", metavar="FLOW_ID")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(handler=cmd_flows_variables)
    p = flow_commands.add_parser(
        "render", help="render an action's body against the sample or a message file"
    )
    p.add_argument("flow_id", metavar="FLOW_ID")
    p.add_argument("action", metavar="ACTION", help="action name or position (0, 1, ...)")
    p.add_argument("--message", metavar="FILE", help="HL7 message to render from")
    p.set_defaults(handler=cmd_flows_render)
    add_operator_commands(commands)
    add_peer_commands(commands)
    return parser


Handler = Callable[[argparse.Namespace, GatewayConfig, TextIO], int]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command; return the exit status."""
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "needs_config", True):
            # send and receive (peers.py) talk to a gateway and read no configuration.
            return int(args.handler(args, None, out))
        config = load_config(args.config)
        handler: Handler = args.handler
        return handler(args, config, out)
    except ConfigError as error:
        sys.stderr.write("udsgateway: invalid configuration:\n")
        for problem in error.problems:
            sys.stderr.write(f"  {problem}\n")
        return 2
    except CommandError as error:
        sys.stderr.write(f"udsgateway: {error}\n")
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as Unix tools do
        # (and keep Python's exit-time flush of stdout from failing again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
