"""The configuration file and the TOML writer used for flow files."""

from __future__ import annotations

import random
import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from udsgateway.config import DEFAULT_VERSIONS, ConfigError, load_config, parse_config
from udsgateway.tomlwriter import dumps

REPO = Path(__file__).resolve().parent.parent


class ConfigTests(SynchronousTestCase):
    """Parsing etc/udsgateway.toml-style files into frozen values."""

    def test_example_configuration_loads(self) -> None:
        """The example configuration used by `make run` is valid, with the demo tenant."""
        config = load_config(str(REPO / "etc" / "udsgateway.toml"))
        [tenant] = config.tenants
        self.assertEqual(tenant.name, "demo")
        self.assertEqual(tenant.listen, "tcp:port=2575:interface=127.0.0.1")
        self.assertEqual(tenant.flow_files, (str(REPO / "etc" / "flows" / "demo.toml"),))
        self.assertEqual(config.database, f"sqlite:///{REPO / 'var' / 'udsgateway.db'}")
        self.assertFalse(config.manhole.enabled)

    def test_defaults_follow_reliability_limits(self) -> None:
        """Unset limits take the defaults of docs/guarantees.md's table."""
        config = parse_config('[[tenants]]\nname = "a"\nlisten = "tcp:1"\n', "/etc/gw.toml")
        limits = config.tenants[0].limits
        self.assertEqual(limits.max_frame_size, 10 * 1024 * 1024)
        self.assertEqual(limits.frame_timeout, 60)
        self.assertEqual(limits.idle_timeout, 600)
        self.assertEqual(limits.tls_handshake_timeout, 10)
        self.assertEqual((limits.max_connections, limits.max_connections_per_peer), (64, 8))
        self.assertEqual(config.tenants[0].versions, DEFAULT_VERSIONS)
        self.assertEqual(config.retention.days, 30)
        self.assertEqual(config.delivery.max_queued_per_destination, 100_000)

    def test_all_problems_reported_at_once_with_file_and_key(self) -> None:
        """Unknown keys and bad values are all reported together, each with file and key."""
        text = """
[gateway]
databse = "sqlite:///x.db"
commit_max_batch = "many"

[[tenants]]
name = "a"
listen = "tcp:1"
app_id_field = 40
default_charset = "KLINGON"
allow = ["not-an-address"]

[tenants.limits]
frame_timeout = -1
max_connections = true

[tenants.tcp]
end_bytes = "zz"

[delivery]
page_size = 0

[retention]
days = "forever"
"""
        with self.assertRaises(ConfigError) as raised:
            parse_config(text, "/etc/gw.toml")
        problems = raised.exception.problems
        expected = [
            "/etc/gw.toml: gateway.databse: unknown key",
            "/etc/gw.toml: gateway.commit_max_batch: expected int, got str",
            "/etc/gw.toml: tenants[0].app_id_field: must be an MSH field number from 3 to 21",
            "/etc/gw.toml: tenants[0].default_charset: unknown HL7 character set 'KLINGON'",
            "/etc/gw.toml: tenants[0].allow: not an address or network: 'not-an-address'",
            "/etc/gw.toml: tenants[0].limits.frame_timeout: must be greater than 0",
            "/etc/gw.toml: tenants[0].limits.max_connections: expected int, got bool",
            "/etc/gw.toml: tenants[0].tcp.end_bytes: expected hexadecimal bytes, e.g. '1c0d'",
            "/etc/gw.toml: delivery.page_size: must be greater than 0",
            "/etc/gw.toml: retention.days: expected int or float, got str",
        ]
        for line in expected:
            self.assertIn(line, problems)
        self.assertEqual(len(problems), len(expected))

    def test_required_and_duplicate_tenants(self) -> None:
        """A tenant needs a name and a listen endpoint; names are unique."""
        text = '[[tenants]]\nname = "a"\nlisten = "tcp:1"\n[[tenants]]\nname = "a"\n'
        with self.assertRaises(ConfigError) as raised:
            parse_config(text, "gw.toml")
        problems = "\n".join(raised.exception.problems)
        self.assertIn("tenants[1].listen: required", problems)
        self.assertIn("tenant name 'a' is used more than once", problems)

    def test_not_toml(self) -> None:
        """A file that is not TOML is one clear problem, with the file name."""
        with self.assertRaises(ConfigError) as raised:
            parse_config("[gateway\n", "gw.toml")
        self.assertTrue(raised.exception.problems[0].startswith("gw.toml: not valid TOML"))

    def test_missing_file(self) -> None:
        """A missing configuration file is reported, not a traceback."""
        with self.assertRaises(ConfigError) as raised:
            load_config("/nonexistent/udsgateway.toml")
        self.assertIn("cannot read", raised.exception.problems[0])

    def test_tls_requires_certificate_and_key(self) -> None:
        """Enabling TLS on a listener without its certificate and key is an error."""
        text = '[[tenants]]\nname = "a"\nlisten = "tcp:1"\n[tenants.tls]\nenabled = true\n'
        with self.assertRaises(ConfigError) as raised:
            parse_config(text, "/etc/gw.toml")
        problems = raised.exception.problems
        self.assertIn(
            "/etc/gw.toml: tenants[0].tls.certificate: required when TLS is enabled", problems
        )
        self.assertIn(
            "/etc/gw.toml: tenants[0].tls.private_key: required when TLS is enabled", problems
        )

    def test_plain_tcp_bytes_and_allowlist(self) -> None:
        """Plain TCP start/end bytes are hex; the allowlist takes addresses and networks."""
        text = """
[[tenants]]
name = "a"
listen = "tcp:1"
allow = ["10.1.2.3", "192.168.0.0/16"]
[tenants.tcp]
start_bytes = "0b"
end_bytes = "1c0d"
idle_gap = 0.5
"""
        tenant = parse_config(text, "/etc/gw.toml").tenants[0]
        self.assertEqual((tenant.tcp.start_bytes, tenant.tcp.end_bytes), (b"\x0b", b"\x1c\r"))
        self.assertEqual(tenant.tcp.idle_gap, 0.5)
        self.assertEqual([str(n) for n in tenant.allow], ["10.1.2.3/32", "192.168.0.0/16"])


class TomlWriterTests(SynchronousTestCase):
    """The TOML writer must round-trip every document a flow file can hold."""

    def test_round_trip_of_tricky_strings(self) -> None:
        """Strings with HL7 delimiters, quotes, control characters and CRs survive."""
        values = [
            "MSH|^~\\&|HIS|Hospital\nPID|1||12345\n",
            "ends with a quote'",
            "three quotes ''' inside\n",
            'double "quotes" and \\ backslashes',
            "carriage\rreturns\r\nand\ttabs",
            "\x00\x1f\x7f control",
            "naïve café ü",
            "",
        ]
        for value in values:
            document = {"key": value, "table": {"inner": value}, "rows": [{"v": value}]}
            self.assertEqual(tomllib.loads(dumps(document)), document, repr(value))

    def test_round_trip_of_random_documents(self) -> None:
        """Seeded random documents of tables, arrays of tables and scalars round-trip."""
        rng = random.Random(7)
        alphabet = "ab|^~\\&'\"\n\r\t\x01é "

        def scalar() -> object:
            kind = rng.randrange(4)
            if kind == 0:
                return "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
            if kind == 1:
                return rng.randrange(-1000, 1000)
            if kind == 2:
                return rng.random() * 100
            return rng.random() < 0.5

        for _ in range(300):
            document = (
                {f"k{i}": scalar() for i in range(rng.randrange(1, 5))}
                | {"sub": {"x": scalar(), "list": [scalar() for _ in range(3)]}}
                | {
                    "items": [
                        {"a": scalar(), "b": {"c": scalar()}} for _ in range(rng.randrange(1, 3))
                    ]
                }
            )
            self.assertEqual(tomllib.loads(dumps(document)), document)
