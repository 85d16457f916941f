"""Apps and flows: their definitions, and the TOML flow file format.

One app per file. ``udsgateway flows import`` reads a file into the store,
generating App ID and Flow ID when absent; ``udsgateway flows export``
writes it back losslessly (``read_app_file(write_app(app)) == app``).
See ``docs/flows.md`` for the format.
"""

from __future__ import annotations

import json
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from attrs import evolve, field, frozen

from udsgateway.hl7.paths import PathSyntaxError, parse_path
from udsgateway.tomlreader import TableReader
from udsgateway.tomlwriter import dumps

CONNECTIONS = ("mllp", "tcp")
ACK_TIMINGS = ("on_commit", "after_actions")
#: When an enhanced-mode sender's application ACK (MSH-16) is sent.
APPLICATION_ACK_TIMINGS = ("after_actions", "on_commit")
_ID_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


class FlowFileError(Exception):
    """A flow file is invalid; ``problems`` lists every error found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def new_id(prefix: str) -> str:
    """A fresh App ID or Flow ID: short enough for an HL7 HD field (20 characters)."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


@frozen
class Trigger:
    """What starts a flow: the framing, the message type, a sample, and ACK timing."""

    connection: str = "mllp"
    message_type: str = ""
    sample: str = ""
    ack: str = "on_commit"
    ack_timeout: float = 30.0
    #: Enhanced mode (MSH-16): the application ACK once the actions settle, or at commit.
    application_ack: str = "after_actions"


RESPONSE_DECISIONS = ("success", "retry", "hold")
#: The response policy's defaults, the one definition: an action without a
#: ``[policy]`` table gets them, and the delivery engine falls back to them
#: (``outbound.policy.DEFAULT_POLICY`` is these plus ``max_retries``).
DEFAULT_DECISIONS = {"AA": "success", "CA": "success", "AE": "retry", "CE": "retry"}
DEFAULT_DECISIONS |= {"AR": "hold", "CR": "hold"}
DEFAULT_MAX_RETRIES = 3
#: An action's timeouts and backoff in seconds when its flow file leaves them
#: out, the one definition: stored with each delivery under these keys
#: (``Action.delivery_policy``), and ``outbound.policy.Timing``'s defaults.
DEFAULT_TIMING: Mapping[str, float] = MappingProxyType(
    {
        "connect_timeout": 10.0,
        "response_timeout": 30.0,
        "backoff_initial": 1.0,
        "backoff_max": 300.0,
    }
)


@frozen
class ActionTLS:
    """TLS towards a destination; the server certificate is always verified."""

    enabled: bool = False
    ca: str = ""  # folder of PEM CA certificates; empty: the system's trust store
    certificate: str = ""  # client certificate (PEM) for mutual TLS
    private_key: str = ""  # its private key (PEM)


@frozen
class Action:
    """A TCP action: send a message built from a template to a destination."""

    name: str
    host: str
    port: int
    message_type: str
    template: str
    protocol: str = "mllp"
    ordering_key: str = ""  # an HL7 path of the trigger, e.g. PID-3.1: one lane per value
    tls: ActionTLS = field(factory=ActionTLS)
    policy: dict[str, str] = field(factory=lambda: dict(DEFAULT_DECISIONS))
    max_retries: int = DEFAULT_MAX_RETRIES
    connect_timeout: float = DEFAULT_TIMING["connect_timeout"]
    response_timeout: float = DEFAULT_TIMING["response_timeout"]
    backoff_initial: float = DEFAULT_TIMING["backoff_initial"]
    backoff_max: float = DEFAULT_TIMING["backoff_max"]

    @property
    def endpoint(self) -> str:
        """The Twisted client endpoint string of the destination."""
        host = self.host.replace(":", "\\:")
        timeout = f"timeout={self.connect_timeout:g}"
        if not self.tls.enabled:
            return f"tcp:host={host}:port={self.port}:{timeout}"
        parts = [f"tls:host={host}:port={self.port}:{timeout}"]
        if self.tls.ca:
            parts.append(f"trustRoots={self.tls.ca}")
        if self.tls.certificate:
            parts.append(f"certificate={self.tls.certificate}")
        if self.tls.private_key:
            parts.append(f"privateKey={self.tls.private_key}")
        return ":".join(parts)

    @property
    def delivery_policy(self) -> dict[str, Any]:
        """The response policy as the delivery engine stores it with each delivery."""
        return {
            **self.policy,
            "max_retries": self.max_retries,
            "connect_timeout": self.connect_timeout,
            "response_timeout": self.response_timeout,
            "backoff_initial": self.backoff_initial,
            "backoff_max": self.backoff_max,
        }


@frozen
class Flow:
    """One trigger plus an ordered chain of actions."""

    name: str
    trigger: Trigger
    flow_id: str = ""
    enabled: bool = True
    description: str = ""
    actions: tuple[Action, ...] = ()


@frozen
class App:
    """A group of flows for one partner system, with app-wide variables."""

    name: str
    tenant: str
    app_id: str = ""
    description: str = ""
    variables: dict[str, str] = field(factory=dict)
    flows: tuple[Flow, ...] = ()

    def with_ids(self) -> App:
        """This app with an App ID and Flow IDs generated where absent."""
        return evolve(
            self,
            app_id=self.app_id or new_id("APP"),
            flows=tuple(evolve(f, flow_id=f.flow_id or new_id("FLW")) for f in self.flows),
        )


def _event_type(value: str) -> str | None:
    parts = value.split("^")
    if len(parts) != 2 or not all(p.isalnum() and p.isupper() for p in parts):
        return "expected TYPE^EVENT, e.g. ADT^A04"
    return None


def _read_trigger(reader: TableReader, table: dict[str, Any]) -> Trigger:
    reader.unknown(
        table, {"connection", "message_type", "sample", "ack", "ack_timeout", "application_ack"}
    )

    def one_of(choices: tuple[str, ...]) -> Any:
        return lambda value: None if value in choices else "expected " + " or ".join(choices)

    message_type = reader.get(table, "message_type", str, "", _event_type)
    if "message_type" not in table:
        reader.problem("message_type", "required, e.g. ADT^A04")
    timeout = reader.get(
        table, "ack_timeout", (int, float), 30.0, lambda v: None if v > 0 else "must be > 0"
    )
    return Trigger(
        # Case-insensitive: `flows list` prints MLLP and TCP, and either spelling is read back.
        connection=reader.get(
            table, "connection", str, "mllp", lambda v: one_of(CONNECTIONS)(v.lower())
        ).lower(),
        message_type=message_type,
        sample=reader.get(table, "sample", str, ""),
        ack=reader.get(table, "ack", str, "on_commit", one_of(ACK_TIMINGS)),
        ack_timeout=float(timeout),
        application_ack=reader.get(
            table, "application_ack", str, "after_actions", one_of(APPLICATION_ACK_TIMINGS)
        ),
    )


_ACTION_KEYS = {
    "name",
    "host",
    "port",
    "protocol",
    "message_type",
    "template",
    "ordering_key",
    "tls",
    "policy",
    "max_retries",
    "connect_timeout",
    "response_timeout",
    "backoff_initial",
    "backoff_max",
}


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _hl7_path(value: str) -> str | None:
    if not value:
        return None
    try:
        path = parse_path(value)
    except PathSyntaxError as error:
        return f"not an HL7 path: {error}"
    if path.has_wildcard or path.field is None:
        return "must name one field or component, e.g. PID-3.1"
    return None


def _read_action(reader: TableReader, table: dict[str, Any]) -> Action:
    reader.unknown(table, _ACTION_KEYS)
    for key in ("name", "host", "port", "message_type", "template"):
        if key not in table:
            reader.problem(key, "required")
    with reader.section("tls"):
        tls_table = reader.get(table, "tls", dict, {})
        reader.unknown(tls_table, {"enabled", "ca", "certificate", "private_key"})
        tls = ActionTLS(
            enabled=reader.get(tls_table, "enabled", bool, False),
            ca=reader.get(tls_table, "ca", str, ""),
            certificate=reader.get(tls_table, "certificate", str, ""),
            private_key=reader.get(tls_table, "private_key", str, ""),
        )
        if bool(tls.certificate) != bool(tls.private_key):
            reader.problem("", "certificate and private_key go together")
    with reader.section("policy"):
        policy_table = reader.get(table, "policy", dict, {})
        reader.unknown(policy_table, set(DEFAULT_DECISIONS))
        policy = dict(DEFAULT_DECISIONS)
        for code in DEFAULT_DECISIONS:
            policy[code] = reader.get(
                policy_table,
                code,
                str,
                DEFAULT_DECISIONS[code],
                lambda v: None if v in RESPONSE_DECISIONS else "expected success, retry or hold",
            )
    return Action(
        name=reader.get(table, "name", str, ""),
        host=reader.get(table, "host", str, ""),
        port=reader.get(
            table, "port", int, 0, lambda v: None if 0 < v < 65536 else "not a TCP port"
        ),
        message_type=reader.get(table, "message_type", str, "", _event_type),
        template=reader.get(table, "template", str, ""),
        protocol=reader.get(
            table,
            "protocol",
            str,
            "mllp",
            lambda v: None if v.lower() in CONNECTIONS else "expected mllp or tcp",
        ).lower(),
        ordering_key=reader.get(table, "ordering_key", str, "", _hl7_path),
        tls=tls,
        policy=policy,
        max_retries=reader.get(
            table,
            "max_retries",
            int,
            DEFAULT_MAX_RETRIES,
            lambda v: None if v >= 0 else "must be >= 0",
        ),
        connect_timeout=_seconds(reader, table, "connect_timeout"),
        response_timeout=_seconds(reader, table, "response_timeout"),
        backoff_initial=_seconds(reader, table, "backoff_initial"),
        backoff_max=_seconds(reader, table, "backoff_max"),
    )


def _seconds(reader: TableReader, table: dict[str, Any], key: str) -> float:
    """One of an action's timeouts or backoffs, ``DEFAULT_TIMING`` when left out."""
    return float(reader.get(table, key, (int, float), DEFAULT_TIMING[key], _positive))


def action_document(action: Action) -> dict[str, Any]:
    """An action as a TOML table (and as stored, JSON), with every field."""
    return {
        "name": action.name,
        "host": action.host,
        "port": action.port,
        "protocol": action.protocol,
        "message_type": action.message_type,
        "ordering_key": action.ordering_key,
        "max_retries": action.max_retries,
        "connect_timeout": action.connect_timeout,
        "response_timeout": action.response_timeout,
        "backoff_initial": action.backoff_initial,
        "backoff_max": action.backoff_max,
        "template": action.template,
        "tls": {
            "enabled": action.tls.enabled,
            "ca": action.tls.ca,
            "certificate": action.tls.certificate,
            "private_key": action.tls.private_key,
        },
        "policy": dict(action.policy),
    }


def action_from_document(document: dict[str, Any]) -> Action:
    """The inverse of action_document (for actions read back from the store)."""
    reader = TableReader("<stored action>")
    action = _read_action(reader, document)
    if reader.problems:
        raise FlowFileError(reader.problems)
    return action


def _read_flow(reader: TableReader, table: dict[str, Any]) -> Flow:
    reader.unknown(table, {"flow_id", "name", "enabled", "description", "trigger", "actions"})
    name = reader.get(table, "name", str, "")
    if not name:
        reader.problem("name", "required")
    with reader.section("trigger"):
        if "trigger" not in table:
            reader.problem("", "required")
        trigger = _read_trigger(reader, reader.get(table, "trigger", dict, {}))
    actions = []
    for index, action_table in enumerate(reader.get(table, "actions", list, [])):
        with reader.section(f"actions[{index}]"):
            if not isinstance(action_table, dict):
                reader.problem("", "expected a table ([[flows.actions]])")
                continue
            actions.append(_read_action(reader, action_table))
    names = [action.name for action in actions]
    for name in sorted({n for n in names if names.count(n) > 1}):
        reader.problem("actions", f"action name {name!r} is used more than once")
    return Flow(
        name=name,
        trigger=trigger,
        flow_id=reader.get(table, "flow_id", str, ""),
        enabled=reader.get(table, "enabled", bool, True),
        description=reader.get(table, "description", str, ""),
        actions=tuple(actions),
    )


def parse_app(text: str, filename: str = "<flows>") -> App:
    """Parse the TOML text of a flow file; raise FlowFileError listing every problem."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise FlowFileError([f"{filename}: not valid TOML: {error}"]) from None
    reader = TableReader(filename)
    reader.unknown(document, {"app_id", "name", "tenant", "description", "variables", "flows"})
    name = reader.get(document, "name", str, "")
    if not name:
        reader.problem("name", "required")
    tenant = reader.get(document, "tenant", str, "")
    if not tenant:
        reader.problem("tenant", "required: the tenant whose listener receives these flows")
    variables = reader.get(document, "variables", dict, {})
    for key, value in variables.items():
        if not isinstance(value, str):
            reader.problem(f"variables.{key}", "expected a string")
    flows = []
    for index, table in enumerate(reader.get(document, "flows", list, [])):
        with reader.section(f"flows[{index}]"):
            if not isinstance(table, dict):
                reader.problem("", "expected a table ([[flows]])")
                continue
            flows.append(_read_flow(reader, table))
    seen: set[str] = set()
    for flow in flows:
        if flow.name in seen:
            reader.problem("flows", f"flow name {flow.name!r} is used more than once")
        seen.add(flow.name)
    if reader.problems:
        raise FlowFileError(reader.problems)
    return App(
        name=name,
        tenant=tenant,
        app_id=reader.get(document, "app_id", str, ""),
        description=reader.get(document, "description", str, ""),
        variables={k: v for k, v in variables.items() if isinstance(v, str)},
        flows=tuple(flows),
    )


def read_app_file(path: str) -> App:
    """Read and parse one flow file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise FlowFileError([f"{path}: cannot read: {error.strerror}"]) from None
    return parse_app(text, path)


def app_document(app: App) -> dict[str, Any]:
    """The TOML document of an app, with every field, so export is lossless."""
    document: dict[str, Any] = {"app_id": app.app_id, "name": app.name, "tenant": app.tenant}
    document["description"] = app.description
    document["variables"] = dict(app.variables)
    document["flows"] = [
        {
            "flow_id": flow.flow_id,
            "name": flow.name,
            "enabled": flow.enabled,
            "description": flow.description,
            "trigger": {
                "connection": flow.trigger.connection,
                "message_type": flow.trigger.message_type,
                "ack": flow.trigger.ack,
                "ack_timeout": flow.trigger.ack_timeout,
                "application_ack": flow.trigger.application_ack,
                "sample": flow.trigger.sample,
            },
            "actions": [action_document(action) for action in flow.actions],
        }
        for flow in app.flows
    ]
    return document


def write_app(app: App) -> str:
    """The flow file text of an app."""
    return dumps(app_document(app))


def actions_json(flow: Flow) -> str:
    """A flow's actions as stored in the database."""
    return json.dumps([action_document(action) for action in flow.actions], sort_keys=True)
