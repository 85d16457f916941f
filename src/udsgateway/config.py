"""The gateway's configuration: one TOML file parsed into frozen attrs values.

Unknown keys and bad values are errors, and all of them are reported at once,
each with the file and the dotted key, so an operator fixes a file in one pass.
Every setting is documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attrs import field, frozen

from udsgateway.hl7.header import codec_for
from udsgateway.tomlreader import TableReader

MIB = 1024 * 1024

#: HL7 versions accepted by default (MSH-12).
DEFAULT_VERSIONS = (
    "2.1",
    "2.2",
    "2.3",
    "2.3.1",
    "2.4",
    "2.5",
    "2.5.1",
    "2.6",
    "2.7",
    "2.7.1",
    "2.8",
    "2.8.1",
    "2.8.2",
)


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every error found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@frozen
class Limits:
    """Per-listener limits of docs/guarantees.md "Default limits"."""

    max_frame_size: int = 10 * MIB
    frame_timeout: float = 60.0
    idle_timeout: float = 600.0
    tls_handshake_timeout: float = 10.0
    max_connections: int = 64
    max_connections_per_peer: int = 8
    max_pending_frames: int = 32
    detect_limit: int = 4096
    #: Bytes per second one peer address may send that are not (yet) part of a
    #: complete frame: junk, partial frames, drained oversized frames. Past it
    #: the address's connections stop being read until the budget refills.
    peer_bytes_per_second: int = 1 * MIB
    #: Frames one connection gets answered in one reactor turn before it
    #: yields to the others.
    frames_per_turn: int = 16
    #: Seconds a connection to a ``haproxy:`` listener has to send its PROXY header.
    proxy_header_timeout: float = 10.0


@frozen
class PlainTCP:
    """How a plain TCP (non-MLLP) message ends, besides the next ``MSH``."""

    idle_gap: float = 0.2
    start_bytes: bytes = b""
    end_bytes: bytes = b""


@frozen
class ListenerTLS:
    """TLS on a tenant's listener; ``client_ca`` set means clients must present a certificate."""

    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    client_ca: str = ""


@frozen
class TenantConfig:
    """One tenant: one listener shared by all of its TCP triggers."""

    name: str
    listen: str
    flow_files: tuple[str, ...] = ()
    app_id_field: int = 5
    flow_id_field: int = 6
    processing_ids: tuple[str, ...] = ("P", "T", "D")
    versions: tuple[str, ...] = DEFAULT_VERSIONS
    default_charset: str = "8859/1"
    lenient_fs: bool = False
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Behind the PROXY protocol (``listen = "haproxy:..."``): the load balancers'
    #: addresses; a connection from anywhere else is closed. Empty: any.
    proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    limits: Limits = field(factory=Limits)
    tcp: PlainTCP = field(factory=PlainTCP)
    tls: ListenerTLS = field(factory=ListenerTLS)


@frozen
class ManholeConfig:
    """The operator console into the live process; off by default."""

    enabled: bool = False
    ssh: str = "tcp:port=2222:interface=127.0.0.1"
    authorized_keys: str = ""
    host_key_dir: str = ""
    telnet: str = ""
    telnet_passwd: str = ""


@frozen
class AdminConfig:
    """The admin HTTP service (docs/api.md); off by default."""

    enabled: bool = False
    listen: str = "tcp:port=8080:interface=127.0.0.1"
    tls: ListenerTLS = field(factory=ListenerTLS)
    #: Largest request body read, in bytes (413 past it).
    max_body_size: int = 1 * MIB
    #: Seconds a console session lives without a request.
    session_timeout: float = 1800.0
    #: Failed logins of one user name, or from one address, before a lockout.
    lockout_failures: int = 5
    #: Seconds a locked-out user name or address waits.
    lockout_seconds: float = 900.0
    #: Seconds between refreshes of the database-derived metrics and of the
    #: token list used to refuse unknown callers before their body is read.
    refresh_interval: float = 5.0


@frozen
class DeliveryConfig:
    """The outbound delivery engine (docs/delivery.md)."""

    max_queued_per_destination: int = 100_000
    page_size: int = 64
    max_active_lanes: int = 512
    held_poll: float = 5.0


@frozen
class RetentionConfig:
    """How long finished messages, executions and logs are kept (docs/configuration.md)."""

    days: float = 30.0
    interval: float = 300.0
    batch: int = 500


@frozen
class ClusterConfig:
    """This process as one node of a cluster on one PostgreSQL (docs/cluster.md)."""

    enabled: bool = False
    #: Buckets the lanes are spread over; used when the first node creates the
    #: cluster tables, fixed afterwards.
    buckets: int = 64
    #: Seconds a bucket's lease lasts on the database clock.
    lease_time: float = 15.0


def _buckets(value: int) -> str | None:
    return None if 1 <= value <= 4096 else "must be from 1 to 4096"


def _lease_time(value: float) -> str | None:
    return None if value >= 3 else "must be at least 3 (seconds)"


@frozen
class GatewayConfig:
    """The whole configuration file."""

    path: str
    database: str
    node_name: str = "node1"
    commit_max_batch: int = 512
    flow_reload_interval: float = 5.0
    #: Seconds between checks that the SQLite file is still the one opened at start.
    database_check_interval: float = 2.0
    tenants: tuple[TenantConfig, ...] = ()
    manhole: ManholeConfig = field(factory=ManholeConfig)
    admin: AdminConfig = field(factory=AdminConfig)
    delivery: DeliveryConfig = field(factory=DeliveryConfig)
    retention: RetentionConfig = field(factory=RetentionConfig)
    cluster: ClusterConfig = field(factory=ClusterConfig)


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _field_number(value: int) -> str | None:
    return None if 3 <= value <= 21 else "must be an MSH field number from 3 to 21"


def _hex_bytes(reader: TableReader, table: dict[str, Any], key: str) -> bytes:
    text = reader.get(table, key, str, "")
    try:
        return bytes.fromhex(text)
    except ValueError:
        reader.problem(key, "expected hexadecimal bytes, e.g. '1c0d'")
        return b""


def _read_limits(reader: TableReader, table: dict[str, Any]) -> Limits:
    base = Limits()
    known = {a.name for a in Limits.__attrs_attrs__}
    reader.unknown(table, known)
    values: dict[str, Any] = {}
    for name in known:
        default = getattr(base, name)
        kind: type | tuple[type, ...] = int if isinstance(default, int) else (int, float)
        values[name] = reader.get(table, name, kind, default, _positive)
    return Limits(**values)


def _read_tcp(reader: TableReader, table: dict[str, Any]) -> PlainTCP:
    reader.unknown(table, {"idle_gap", "start_bytes", "end_bytes"})
    return PlainTCP(
        idle_gap=float(reader.get(table, "idle_gap", (int, float), 0.2, _positive)),
        start_bytes=_hex_bytes(reader, table, "start_bytes"),
        end_bytes=_hex_bytes(reader, table, "end_bytes"),
    )


def _read_networks(
    reader: TableReader, table: dict[str, Any], key: str = "allow"
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for text in reader.strings(table, key, ()):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            reader.problem(key, f"not an address or network: {text!r}")
    return tuple(networks)


#: The endpoint-string prefix of a listener behind the PROXY protocol (HAProxy).
PROXY_PREFIX = "haproxy:"


def proxied_endpoint(listen: str) -> str:
    """The endpoint under ``haproxy:`` of a listener behind the PROXY protocol, else ""."""
    return listen[len(PROXY_PREFIX) :] if listen.startswith(PROXY_PREFIX) else ""


def proxy_endpoint_problem(listen: str) -> str:
    """Why a ``haproxy:`` listen string is refused; "" when it is usable (or not haproxy)."""
    if not listen.startswith(PROXY_PREFIX):
        return ""
    from twisted.internet.endpoints import _parse

    inner = proxied_endpoint(listen)
    try:
        args, _ = _parse(inner)
    except Exception:  # a trailing backslash ends the tokenizer with RuntimeError
        return "the endpoint after 'haproxy:' cannot be parsed"
    kind = args[0] if args and args[0] else ""
    if kind not in ("tcp", "tcp6", "unix"):
        return (
            "the endpoint after 'haproxy:' must be tcp, tcp6 or unix "
            f"(e.g. 'haproxy:tcp:port=2575'), not {kind!r}; for TLS use [tenants.tls]"
        )
    return ""


def _read_tls(reader: TableReader, table: dict[str, Any], base_dir: Path) -> ListenerTLS:
    reader.unknown(table, {"enabled", "certificate", "private_key", "client_ca"})

    def path(key: str) -> str:
        value = reader.get(table, key, str, "")
        if not value:
            return ""
        resolved = (base_dir / value).resolve()
        if not resolved.is_file():
            reader.problem(key, f"no such file: {resolved}")
        return str(resolved)

    tls = ListenerTLS(
        enabled=reader.get(table, "enabled", bool, False),
        certificate=path("certificate"),
        private_key=path("private_key"),
        client_ca=path("client_ca"),
    )
    if tls.enabled:
        for key in ("certificate", "private_key"):
            if not getattr(tls, key):
                reader.problem(key, "required when TLS is enabled")
    return tls


_TENANT_KEYS = {
    "name",
    "listen",
    "flow_files",
    "app_id_field",
    "flow_id_field",
    "processing_ids",
    "versions",
    "default_charset",
    "lenient_fs",
    "allow",
    "proxies",
    "limits",
    "tcp",
    "tls",
}


def _read_tenant(reader: TableReader, table: dict[str, Any], base_dir: Path) -> TenantConfig:
    reader.unknown(table, _TENANT_KEYS)
    name = reader.get(table, "name", str, "")
    if not name:
        reader.problem("name", "required")
    listen = reader.get(table, "listen", str, "")
    if not listen:
        reader.problem("listen", "required, e.g. 'tcp:port=2575:interface=127.0.0.1'")
    problem = proxy_endpoint_problem(listen)
    if problem:
        reader.problem("listen", problem)
    proxies = _read_networks(reader, table, "proxies")
    if proxies and not proxied_endpoint(listen):
        reader.problem("proxies", "used only behind the PROXY protocol (listen = 'haproxy:...')")
    charset = reader.get(table, "default_charset", str, "8859/1")
    if codec_for(charset, "") is None:
        reader.problem("default_charset", f"unknown HL7 character set {charset!r}")
    flow_files = tuple(
        str((base_dir / path).resolve()) for path in reader.strings(table, "flow_files", ())
    )
    with reader.section("limits"):
        limits = _read_limits(reader, reader.get(table, "limits", dict, {}))
    with reader.section("tcp"):
        tcp = _read_tcp(reader, reader.get(table, "tcp", dict, {}))
    with reader.section("tls"):
        tls = _read_tls(reader, reader.get(table, "tls", dict, {}), base_dir)
    return TenantConfig(
        name=name,
        listen=listen,
        flow_files=flow_files,
        app_id_field=reader.get(table, "app_id_field", int, 5, _field_number),
        flow_id_field=reader.get(table, "flow_id_field", int, 6, _field_number),
        processing_ids=reader.strings(table, "processing_ids", ("P", "T", "D")),
        versions=reader.strings(table, "versions", DEFAULT_VERSIONS),
        default_charset=charset,
        lenient_fs=reader.get(table, "lenient_fs", bool, False),
        allow=_read_networks(reader, table),
        proxies=proxies,
        limits=limits,
        tcp=tcp,
        tls=tls,
    )


def _read_manhole(reader: TableReader, table: dict[str, Any], base_dir: Path) -> ManholeConfig:
    reader.unknown(
        table,
        {"enabled", "ssh", "authorized_keys", "host_key_dir", "telnet", "telnet_passwd"},
    )

    def resolve(key: str) -> str:
        value = reader.get(table, key, str, "")
        return str((base_dir / value).resolve()) if value else ""

    config = ManholeConfig(
        enabled=reader.get(table, "enabled", bool, False),
        ssh=reader.get(table, "ssh", str, ManholeConfig.ssh),
        authorized_keys=resolve("authorized_keys"),
        host_key_dir=resolve("host_key_dir"),
        telnet=reader.get(table, "telnet", str, ""),
        telnet_passwd=resolve("telnet_passwd"),
    )
    if config.enabled and config.ssh and not config.authorized_keys:
        reader.problem("authorized_keys", "required when the manhole is enabled over SSH")
    if config.enabled and config.telnet and not config.telnet_passwd:
        reader.problem("telnet_passwd", "required when the telnet manhole is enabled")
    for key in ("ssh", "telnet"):
        endpoint = getattr(config, key)
        problem = loopback_endpoint_problem(endpoint) if config.enabled and endpoint else ""
        if problem:
            reader.problem(
                key, f"the manhole listens on loopback only (interface=127.0.0.1): {problem}"
            )
    return config


_ADMIN_KEYS = {a.name for a in AdminConfig.__attrs_attrs__}


def _read_admin(reader: TableReader, table: dict[str, Any], base_dir: Path) -> AdminConfig:
    reader.unknown(table, _ADMIN_KEYS)
    base = AdminConfig()
    with reader.section("tls"):
        tls = _read_tls(reader, reader.get(table, "tls", dict, {}), base_dir)
        if tls.client_ca:
            reader.problem("client_ca", "not used by the admin service (users log in)")
    config = AdminConfig(
        enabled=reader.get(table, "enabled", bool, False),
        listen=reader.get(table, "listen", str, base.listen),
        tls=tls,
        max_body_size=reader.get(table, "max_body_size", int, base.max_body_size, _positive),
        session_timeout=float(
            reader.get(table, "session_timeout", (int, float), base.session_timeout, _positive)
        ),
        lockout_failures=reader.get(
            table, "lockout_failures", int, base.lockout_failures, _positive
        ),
        lockout_seconds=float(
            reader.get(table, "lockout_seconds", (int, float), base.lockout_seconds, _positive)
        ),
        refresh_interval=float(
            reader.get(table, "refresh_interval", (int, float), base.refresh_interval, _positive)
        ),
    )
    if config.enabled and not config.tls.enabled:
        problem = loopback_endpoint_problem(config.listen)
        if problem:
            reader.problem(
                "listen",
                "the admin service listens beyond loopback only with TLS "
                f"([admin.tls] enabled): {problem}",
            )
    return config


def _tcp_bind(port: str, interface: str = "", backlog: str = "50") -> str:
    return interface


def _tcp6_bind(port: str, backlog: str = "50", interface: str = "::") -> str:
    return interface


def _ssl_bind(
    port: str,
    privateKey: str = "",  # noqa: N803 (Twisted's parameter names: a keyword binds by name)
    certKey: str = "",  # noqa: N803
    sslmethod: str = "",
    interface: str = "",
    backlog: str = "50",
    extraCertChain: str = "",  # noqa: N803
    dhParameters: str = "",  # noqa: N803
) -> str:
    return interface


def _unix_bind(address: str, mode: str = "666", backlog: str = "50", lockfile: str = "1") -> str:
    return ""


# The signatures of Twisted's own server parsers (endpoints._parseTCP, _parseSSL,
# _parseUNIX, _TCP6ServerParser._parseServer): binding a parsed string to them
# finds the interface exactly as Twisted does, positional or keyword.
_BIND_PARSERS: dict[str, Callable[..., str]] = {
    "tcp": _tcp_bind,
    "tcp6": _tcp6_bind,
    "ssl": _ssl_bind,
    "unix": _unix_bind,
}


def loopback_endpoint_problem(endpoint: str) -> str:
    """Why a server endpoint string would listen beyond loopback; "" when it stays local.

    The string is split by Twisted's own tokenizer (backslash escapes, the
    last of a repeated key wins, as ``serverFromString`` does), then bound to
    the signature of the endpoint type's parser, so a positional interface
    (``tcp:2222:0.0.0.0``) is read too. Accepted: ``tcp``, ``tcp6`` and ``ssl``
    on a loopback address, and ``unix`` sockets (not reachable from the
    network). Everything else (no interface, a host name, another endpoint
    type, a string Twisted cannot parse) is refused.
    """
    from twisted.internet.endpoints import _parse

    try:
        args, kwargs = _parse(endpoint)
    except Exception:  # a trailing backslash ends the tokenizer with RuntimeError
        return "cannot be parsed as an endpoint string"
    kind = args[0] if args else ""
    parser = _BIND_PARSERS.get(kind)
    if parser is None:
        return f"endpoint type {kind!r} is not one of tcp, tcp6, ssl, unix"
    try:
        interface = parser(*args[1:], **kwargs)
    except TypeError:
        return "cannot be parsed as a listening endpoint"
    if kind == "unix":
        return ""
    try:
        local = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        local = False
    if not local:
        return f"binds interface {interface!r}, not a loopback address"
    return ""


def parse_config(text: str, filename: str = "<config>") -> GatewayConfig:
    """Parse the TOML text of a configuration file; raise ConfigError listing every problem."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{filename}: not valid TOML: {error}"]) from None
    reader = TableReader(filename)
    base_dir = Path(filename).resolve().parent
    reader.unknown(
        document, {"gateway", "tenants", "manhole", "admin", "delivery", "retention", "cluster"}
    )

    with reader.section("gateway"):
        gateway = reader.get(document, "gateway", dict, {})
        reader.unknown(
            gateway,
            {
                "database",
                "node_name",
                "commit_max_batch",
                "flow_reload_interval",
                "database_check_interval",
            },
        )
        database = reader.get(gateway, "database", str, "sqlite:///var/udsgateway.db")
        database = _resolve_sqlite(database, base_dir)
        node_name = reader.get(gateway, "node_name", str, "node1")
        commit_max_batch = reader.get(gateway, "commit_max_batch", int, 512, _positive)
        reload_interval = reader.get(gateway, "flow_reload_interval", (int, float), 5.0, _positive)
        check_interval = reader.get(
            gateway, "database_check_interval", (int, float), 2.0, _positive
        )

    tenants = []
    raw_tenants = reader.get(document, "tenants", list, [])
    for index, table in enumerate(raw_tenants):
        with reader.section(f"tenants[{index}]"):
            if not isinstance(table, dict):
                reader.problem("", "expected a table ([[tenants]])")
                continue
            tenants.append(_read_tenant(reader, table, base_dir))
    names = [tenant.name for tenant in tenants]
    for name in sorted({n for n in names if names.count(n) > 1}):
        reader.problem("tenants", f"tenant name {name!r} is used more than once")

    with reader.section("manhole"):
        manhole = _read_manhole(reader, reader.get(document, "manhole", dict, {}), base_dir)

    with reader.section("admin"):
        admin = _read_admin(reader, reader.get(document, "admin", dict, {}), base_dir)

    with reader.section("delivery"):
        delivery_table = reader.get(document, "delivery", dict, {})
        base = DeliveryConfig()
        reader.unknown(delivery_table, {a.name for a in DeliveryConfig.__attrs_attrs__})
        delivery = DeliveryConfig(
            max_queued_per_destination=reader.get(
                delivery_table,
                "max_queued_per_destination",
                int,
                base.max_queued_per_destination,
                _positive,
            ),
            page_size=reader.get(delivery_table, "page_size", int, base.page_size, _positive),
            max_active_lanes=reader.get(
                delivery_table, "max_active_lanes", int, base.max_active_lanes, _positive
            ),
            held_poll=float(
                reader.get(delivery_table, "held_poll", (int, float), base.held_poll, _positive)
            ),
        )

    with reader.section("retention"):
        table = reader.get(document, "retention", dict, {})
        reader.unknown(table, {"days", "interval", "batch"})
        retention = RetentionConfig(
            days=float(reader.get(table, "days", (int, float), 30.0, _positive)),
            interval=float(reader.get(table, "interval", (int, float), 300.0, _positive)),
            batch=reader.get(table, "batch", int, 500, _positive),
        )

    with reader.section("cluster"):
        table = reader.get(document, "cluster", dict, {})
        reader.unknown(table, {"enabled", "buckets", "lease_time"})
        cluster = ClusterConfig(
            enabled=reader.get(table, "enabled", bool, False),
            buckets=reader.get(table, "buckets", int, 64, _buckets),
            lease_time=float(reader.get(table, "lease_time", (int, float), 15.0, _lease_time)),
        )
        if cluster.enabled and not database.startswith(("postgresql:", "postgresql+")):
            reader.problem(
                "enabled",
                "a cluster needs a PostgreSQL database: set [gateway].database to a "
                "postgresql+psycopg:// URL, or set [cluster].enabled = false",
            )

    if reader.problems:
        raise ConfigError(reader.problems)
    return GatewayConfig(
        cluster=cluster,
        retention=retention,
        delivery=delivery,
        path=filename,
        database=database,
        node_name=node_name,
        commit_max_batch=commit_max_batch,
        flow_reload_interval=float(reload_interval),
        database_check_interval=float(check_interval),
        tenants=tuple(tenants),
        manhole=manhole,
        admin=admin,
    )


def _resolve_sqlite(url: str, base_dir: Path) -> str:
    """Resolve a relative SQLite path against the configuration file's folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str((base_dir / url[len(prefix) :]).resolve())
    return url


def load_config(path: str) -> GatewayConfig:
    """Read and parse a configuration file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    return parse_config(text, path)
