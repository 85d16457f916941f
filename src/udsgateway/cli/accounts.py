"""``udsgateway users`` and ``udsgateway tokens``: the admin service's accounts.

Passwords are read from the terminal (twice) or, with ``--password-stdin``,
from the first line of standard input; never from the command line, where
other users of the machine could see them. A new token is printed once.
Every change is written to the audit trail.
"""

from __future__ import annotations

import argparse
import getpass
import json
import secrets
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from udsgateway.admin import auth
from udsgateway.store import audit, users

if TYPE_CHECKING:
    from udsgateway.config import GatewayConfig


def _open(config: GatewayConfig) -> Any:
    from udsgateway.cli.main import open_database

    return open_database(config)


def _error(message: str) -> Exception:
    from udsgateway.cli.main import CommandError

    return CommandError(message)


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise _error("the passwords differ")
    if len(password) < 8:
        raise _error("a password has at least 8 characters")
    return password


def _who(args: argparse.Namespace) -> str:
    return str(args.who or getpass.getuser())


def cmd_users(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    database = _open(config)
    action = args.users_command
    now = time.time()
    try:
        if action == "list":
            rows = database.transaction_now(users.list_users)
            for row in rows:
                if args.json:
                    out.write(json.dumps(row) + "\n")
                else:
                    flags = ["view_content"] if row["view_content"] else []
                    flags += ["disabled"] if row["disabled"] else []
                    out.write(f"{row['name']}\t{row['role']}\t{','.join(flags)}\n")
            return 0
        if action == "add":
            if args.if_missing and any(
                row["name"] == args.name for row in database.transaction_now(users.list_users)
            ):
                return 0
            generated = secrets.token_urlsafe(12) if args.generate_password else None
            password = generated or read_password(args)
            hashed = auth.hash_password(password)
            database.transaction_now(
                users.add_user, args.name, hashed, args.role, args.view_content, now
            )
            detail = f"role {args.role}" + (", view_content" if args.view_content else "")
            database.transaction_now(
                audit.append, _who(args), "user.add", f"user {args.name}", now, detail, "ok", "cli"
            )
            out.write(f"user {args.name} added ({detail})\n")
            if args.generate_password:
                out.write(f"password of {args.name} (shown once): {password}\n")
            return 0
        values: dict[str, Any] = {}
        if action == "passwd":
            values["password_hash"] = auth.hash_password(read_password(args))
        elif action == "disable":
            values["disabled"] = True
        elif action == "enable":
            values["disabled"] = False
        elif action == "role":
            values["role"] = args.role
            if args.view_content is not None:
                values["view_content"] = args.view_content
        database.transaction_now(users.update_user, args.name, now, values)
        database.transaction_now(
            audit.append, _who(args), f"user.{action}", f"user {args.name}", now, "", "ok", "cli"
        )
        out.write(f"user {args.name}: {action} done\n")
        return 0
    except users.UserError as error:
        raise _error(str(error)) from None


def cmd_tokens(args: argparse.Namespace, config: GatewayConfig, out: TextIO) -> int:
    database = _open(config)
    action = args.tokens_command
    now = time.time()
    try:
        if action == "list":
            for row in database.transaction_now(users.list_tokens, args.user):
                if args.json:
                    out.write(json.dumps(row) + "\n")
                else:
                    state = "revoked" if row["revoked_at"] is not None else "active"
                    out.write(
                        f"{row['id']}\t{row['user']}\t{row['prefix']}...\t{state}\t{row['label']}\n"
                    )
            return 0
        if action == "create":
            token = auth.new_token()
            token_id = database.transaction_now(
                users.add_token,
                args.user,
                args.label,
                auth.token_digest(token),
                auth.token_shown_prefix(token),
                now,
            )
            database.transaction_now(
                audit.append,
                _who(args),
                "token.create",
                f"token {token_id} of user {args.user}",
                now,
                "",
                "ok",
                "cli",
            )
            sys.stderr.write(f"token {token_id} for {args.user} (shown once, keep it safe):\n")
            out.write(token + "\n")
            return 0
        database.transaction_now(users.revoke_token, args.token_id, now)
        database.transaction_now(
            audit.append,
            _who(args),
            "token.revoke",
            f"token {args.token_id}",
            now,
            "",
            "ok",
            "cli",
        )
        out.write(f"token {args.token_id} revoked\n")
        return 0
    except users.UserError as error:
        raise _error(str(error)) from None


def _flag(text: str) -> bool:
    if text not in ("yes", "no"):
        raise argparse.ArgumentTypeError("yes or no")
    return text == "yes"


def add_account_commands(commands: Any) -> None:
    """Register ``users`` and ``tokens`` on the CLI's subcommand parser."""
    parser = commands.add_parser("users", help="the admin service's users")
    actions = parser.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    p = actions.add_parser("list", help="users, their role and flags")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p = actions.add_parser("add", help="add a user (asks for the password)")
    p.add_argument("name")
    p.add_argument("--role", choices=users.ROLES, default=users.VIEWER)
    p.add_argument(
        "--view-content", action="store_true", help="may view message content (audited)"
    )
    p.add_argument(
        "--generate-password",
        action="store_true",
        help="make up a random password and print it once (the make run demo)",
    )
    p.add_argument(
        "--if-missing", action="store_true", help="do nothing when the user exists already"
    )
    for name, text in (
        ("passwd", "set a user's password (asks for it)"),
        ("disable", "disable a user: no login, their tokens stop working"),
        ("enable", "enable a disabled user"),
        ("role", "change a user's role or content permission"),
    ):
        p = actions.add_parser(name, help=text)
        p.add_argument("name")
        if name == "role":
            p.add_argument("--role", choices=users.ROLES, required=True)
            p.add_argument("--view-content", type=_flag, default=None, metavar="yes|no")
    for p in actions.choices.values():
        p.add_argument("--who", default=None, help="operator name for the audit trail")
        p.set_defaults(handler=cmd_users)
        if p.prog.split()[-1] in ("add", "passwd"):
            p.add_argument(
                "--password-stdin",
                action="store_true",
                help="read the password from the first line of standard input",
            )

    parser = commands.add_parser("tokens", help="API tokens of the admin service")
    actions = parser.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    p = actions.add_parser("create", help="create a token for a user; printed once")
    p.add_argument("user")
    p.add_argument("--label", default="", help="what it is for")
    p = actions.add_parser("revoke", help="revoke a token")
    p.add_argument("token_id", type=int, metavar="ID")
    p = actions.add_parser("list", help="tokens (never the token itself)")
    p.add_argument("--user", default=None)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    for p in actions.choices.values():
        p.add_argument("--who", default=None, help="operator name for the audit trail")
        p.set_defaults(handler=cmd_tokens)
