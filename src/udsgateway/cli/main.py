"""``udsgateway``: the command line for everything but running the service.

Each subcommand opens the same store the service uses (SQLite allows the CLI
beside a running gateway; the gateway notices flow changes within its
``flow_reload_interval``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from udsgateway import __version__
from udsgateway.assembly import tenant_charset
from udsgateway.cli.accounts import add_account_commands
from udsgateway.cli.audit import add_audit_command, add_destination_commands
from udsgateway.cli.cluster import add_cluster_commands
from udsgateway.cli.common import (
    CommandError,
    open_database,
    print_table,
    write_rows,
)
from udsgateway.cli.operate import add_operator_commands
from udsgateway.config import ConfigError, GatewayConfig, load_config
from udsgateway.flows import (
    App,
    Flow,
    FlowFileError,
    read_app_file,
    write_app,
)
from udsgateway.flowstore import load_apps, save_app
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.hl7.header import HeaderProblem, codec_for, parse_header
from udsgateway.mapping.catalogue import variable_catalogue
from udsgateway.mapping.checks import template_problems
from udsgateway.mapping.templating import (
    RenderError,
    TemplateError,
    compile_template,
)
from udsgateway.outbound.render import read_trigger, render_action, sender_bytes
from udsgateway.peers.commands import add_peer_commands

DEFAULT_CONFIG = "etc/udsgateway.toml"


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
        saved = [database.transaction_now(save_app, app, time.time()) for app in apps]
    except ValueError as error:
        raise CommandError(str(error)) from None
    print_table(flow_table(config, saved), out)
    return 0


def find_flow(config: GatewayConfig, flow_id: str) -> tuple[App, Flow]:
    """The app and flow of a Flow ID, from the store."""
    for app in open_database(config).transaction_now(load_apps, None):
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


def read_responses(specs: Sequence[str], flow: Flow, step: int) -> dict[str, bytes]:
    """``NAME=FILE`` pairs as the fake responses of earlier actions, by action name."""
    earlier = [a.name for a in flow.actions[:step]]
    responses: dict[str, bytes] = {}
    for spec in specs:
        name, equals, path = spec.partition("=")
        if not equals or not name or not path:
            raise CommandError(f"--response {spec!r}: expected NAME=FILE")
        if name not in earlier:
            names = ", ".join(earlier) or "none"
            raise CommandError(
                f"--response {name}: not an earlier action of this one (earlier: {names})"
            )
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise CommandError(f"cannot read {path}: {error.strerror or error}") from None
        # A file written by hand ends segments with LF; the gateway stores CR.
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        responses[name] = b"".join(line + b"\r" for line in lines if line.strip())
    return responses


def cmd_flows_render(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    body, charset = render_flow_action(
        config, args.flow_id, args.action, args.message, args.response or ()
    )
    out.write(rendered_text(body, charset).replace("\r", "\n"))
    return 0


def render_flow_action(
    config: GatewayConfig,
    flow_id: str,
    action_name: str,
    message_path: str | None,
    response_specs: Sequence[str],
) -> tuple[bytes, str]:
    """What ``flows render`` renders: the action's bytes, as the gateway would send
    them, and the tenant's charset (to print them). CommandError when it cannot."""
    app, flow = find_flow(config, flow_id)
    chosen = [
        (step, action)
        for step, action in enumerate(flow.actions)
        if action.name == action_name or str(step) == action_name
    ]
    if not chosen:
        names = ", ".join(a.name for a in flow.actions) or "none"
        raise CommandError(f"flow {flow_id} has no action {action_name!r} (actions: {names})")
    step, action = chosen[0]
    fakes = read_responses(response_specs, flow, step)
    tenant = next((t for t in config.tenants if t.name == app.tenant), None)
    # The tenant's codec for messages without MSH-18, as the running gateway uses.
    charset = tenant_charset(tenant) if tenant is not None else "latin-1"
    try:
        # A message file is the bytes a sender sends; the sample is text (TOML),
        # encoded as a sender would send it (its MSH-18, else the tenant's charset).
        # Either is then read exactly as the gateway reads what it receives.
        if message_path:
            raw = Path(message_path).read_bytes()
        else:
            raw = sender_bytes(flow.trigger.sample, charset)
    except OSError as error:
        raise CommandError(f"cannot read {message_path}: {error.strerror or error}") from None
    except RenderError as error:
        raise CommandError(f"the flow's sample: {error}") from None
    try:
        body = render_action(
            app,
            flow,
            step,
            compile_template(action.template),
            read_trigger(raw, charset),
            raw,
            [fakes.get(earlier.name) for earlier in flow.actions[:step]],
            charset=charset,
            now=lambda: datetime.now(UTC),
            new_control_id=ControlIdSource.for_boot(time.time()).next,
        )
    except (TemplateError, RenderError) as error:
        raise CommandError(f"action {action.name}: {error}") from None
    return body, charset


def rendered_text(body: bytes, charset: str) -> str:
    """A rendered body as text, decoded as it was encoded (its MSH-18, else ``charset``)."""
    parsed = parse_header(body, default_charset=charset)
    header = parsed.header if isinstance(parsed, HeaderProblem) else parsed
    body_charset = codec_for(header.charset, charset) if header is not None else None
    return body.decode(body_charset or charset, "backslashreplace")


def cmd_flows_list(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    apps = open_database(config).transaction_now(load_apps, args.tenant)
    rows = flow_table(config, apps)
    write_rows(rows, out, args.json)
    return 0


def cmd_flows_export(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    apps = open_database(config).transaction_now(load_apps, None)
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
    parser.add_argument("--version", action="version", version=f"udsgateway {__version__}")
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
    p.add_argument(
        "--response",
        action="append",
        metavar="NAME=FILE",
        help="fake response of the earlier action NAME, read from FILE (repeatable)",
    )
    p.set_defaults(handler=cmd_flows_render)
    add_operator_commands(commands)
    add_account_commands(commands)
    add_audit_command(commands)
    add_destination_commands(commands)
    add_cluster_commands(commands)
    add_peer_commands(commands)
    _accept_config_anywhere(parser)
    return parser


def _accept_config_anywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--config`` come after the subcommand too (``udsgateway logs --config F``).

    Each command's parser gets the option without a default, so a value given
    before the subcommand is kept when none comes after it.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                if not any(isinstance(a, argparse._SubParsersAction) for a in subparser._actions):
                    subparser.add_argument(
                        "--config",
                        default=argparse.SUPPRESS,
                        help=f"configuration file (default {DEFAULT_CONFIG})",
                    )
                _accept_config_anywhere(subparser)


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
