"""The admin service: its configuration, its listener, the users and tokens commands."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from udsgateway.admin import auth
from udsgateway.admin.http import AdminSite
from udsgateway.admin.service import AdminService
from udsgateway.cli.main import main, open_database
from udsgateway.config import AdminConfig, ConfigError, load_config, parse_config
from udsgateway.store import users
from udsgateway.testing.admin import AdminClient, make_database

REPO = Path(__file__).resolve().parents[1]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key (PEM files) in ``folder``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "admin.pem", folder / "admin.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class AdminConfigTests(SynchronousTestCase):
    def parse(self, text: str) -> AdminConfig:
        return parse_config(text, str(Path(self.mktemp()).resolve() / "g.toml")).admin

    def problems(self, text: str) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            self.parse(text)
        return caught.exception.problems

    def test_defaults_off_and_on_loopback(self) -> None:
        admin = self.parse("")
        self.assertFalse(admin.enabled)
        self.assertEqual(admin.listen, "tcp:port=8080:interface=127.0.0.1")
        self.assertEqual(admin.max_body_size, 1024 * 1024)

    def test_settings(self) -> None:
        admin = self.parse(
            "[admin]\nenabled = true\nlisten = 'tcp:port=9090:interface=127.0.0.2'\n"
            "max_body_size = 2048\nsession_timeout = 60\nlockout_failures = 3\n"
            "lockout_seconds = 30\nrefresh_interval = 1\n"
        )
        self.assertEqual(
            (admin.listen, admin.max_body_size, admin.session_timeout, admin.lockout_failures),
            ("tcp:port=9090:interface=127.0.0.2", 2048, 60.0, 3),
        )

    def test_refuses_a_non_loopback_bind_without_tls(self) -> None:
        for listen in ("tcp:port=8080", "tcp:8080:0.0.0.0", "tcp:port=8080:interface=10.0.0.1"):
            problems = self.problems(f"[admin]\nenabled = true\nlisten = '{listen}'\n")
            self.assertEqual(len(problems), 1, listen)
            self.assertIn(
                "admin.listen: the admin service listens beyond loopback only", problems[0]
            )
        # Off: not checked (nothing listens).
        self.parse("[admin]\nenabled = false\nlisten = 'tcp:port=8080'\n")

    def test_tls_files_are_required_and_allow_any_interface(self) -> None:
        problems = self.problems(
            "[admin]\nenabled = true\nlisten = 'tcp:port=8443'\n[admin.tls]\nenabled = true\n"
        )
        self.assertEqual(
            sorted(problem.split(": ", 1)[1] for problem in problems),
            [
                "admin.tls.certificate: required when TLS is enabled",
                "admin.tls.private_key: required when TLS is enabled",
            ],
        )

    def test_unknown_keys(self) -> None:
        problems = self.problems("[admin]\nenable = true\n")
        self.assertIn("admin", problems[0])
        self.assertIn("enable", problems[0])

    def test_the_demo_configuration_enables_it_on_loopback(self) -> None:
        config = load_config(str(REPO / "etc" / "udsgateway.toml"))
        self.assertTrue(config.admin.enabled)
        self.assertIn("interface=127.0.0.1", config.admin.listen)


class _Gateway:
    def __init__(self) -> None:
        self.database = make_database()
        self.ready: Deferred[None] = Deferred()
        self.accepting = False
        self.dispatcher = None
        self.executor = None
        self.ingests: dict[str, Any] = {}
        self.config = parse_config("")


class AdminServiceTests(TestCase):
    def make(self, tls: bool = False) -> tuple[AdminService, MemoryReactorClock, _Gateway]:
        from udsgateway.admin.service import admin_service
        from udsgateway.config import ListenerTLS

        reactor = MemoryReactorClock()
        gateway = _Gateway()
        files = self_signed(Path(self.mktemp()).resolve()) if tls else None
        config = AdminConfig(
            enabled=True,
            listen="tcp:port=0:interface=127.0.0.1",
            tls=ListenerTLS(
                enabled=tls,
                certificate=str(files[0]) if files else "",
                private_key=str(files[1]) if files else "",
            ),
        )
        service = admin_service(config, gateway, reactor)
        return service, reactor, gateway

    def test_listens_and_refreshes_after_the_gateway_is_ready(self) -> None:
        service, reactor, gateway = self.make()
        service.startService()
        [(port, factory, _backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertIsInstance(factory, AdminSite)
        digest = auth.token_digest("udsgw_x")
        gateway.database.transaction_now(
            users.add_user, "vera", auth.hash_password("password1", 2**10), "viewer", False, 0.0
        )
        gateway.database.transaction_now(users.add_token, "vera", "", digest, "udsgw_x", 0.0)
        self.assertEqual(service.api.tokens, {})
        gateway.ready.callback(None)
        self.assertIn(digest, service.api.tokens)
        # Revoked from the command line: gone at the next refresh.
        gateway.database.transaction_now(users.revoke_token, 1, 1.0)
        reactor.advance(service.config.refresh_interval)
        self.assertEqual(service.api.tokens, {})
        self.successResultOf(service.stopService())

    def test_a_failed_gateway_start_is_left_to_the_others(self) -> None:
        service, _reactor, gateway = self.make()
        service.startService()
        failures: list[Any] = []
        gateway.ready.addErrback(failures.append)
        gateway.ready.errback(RuntimeError("port in use"))
        self.assertEqual(len(failures), 1)
        self.successResultOf(service.stopService())

    def test_tls_wraps_the_site(self) -> None:
        service, reactor, _ = self.make(tls=True)
        service.startService()
        [(_port, factory, _backlog, _interface)] = reactor.tcpServers
        self.assertIsInstance(factory, TLSMemoryBIOFactory)
        self.assertTrue(service.api.secure)
        self.successResultOf(service.stopService())


class TokenRefreshTests(TestCase):
    def test_a_token_made_since_the_refresh(self) -> None:
        """Known only to the database: a request without a body is checked there; one with a
        body is refused before it, until the next refresh."""
        client = AdminClient()
        client.add_user("vera", "viewer")
        token = auth.new_token()
        client.database.transaction_now(
            users.add_token, "vera", "cli", auth.token_digest(token), token[:12], 0.0
        )
        self.assertEqual(client.request("GET", "/api/v1/me", token=token).json["user"], "vera")
        other = auth.new_token()
        client.database.transaction_now(
            users.add_token, "vera", "cli", auth.token_digest(other), other[:12], 0.0
        )
        with_body = client.request("POST", "/api/v1/tokens", {"label": "x"}, token=other)
        self.assertEqual(with_body.status, 401)
        # That miss reloaded the list (at most once a second): the next one passes.
        client.clock.advance(1)
        self.assertEqual(client.request("GET", "/api/v1/me", token="udsgw_nope").status, 401)
        again = client.request("POST", "/api/v1/tokens", {"label": "x"}, token=other)
        self.assertEqual(again.status, 201)
        # An unknown token gets nothing either way, and an admin route stays closed.
        self.assertEqual(client.request("GET", "/api/v1/me", token="udsgw_nope").status, 401)
        self.assertEqual(client.request("GET", "/api/v1/users", token=token).status, 403)


class AccountCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        self.config = folder / "gateway.toml"
        self.config.write_text(f"[gateway]\ndatabase = 'sqlite:///{folder / 'g.db'}'\n")

    def run_cli(self, *arguments: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        saved = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                status = main(["--config", str(self.config), *arguments], out=out)
        finally:
            sys.stdin = saved
        return status, out.getvalue(), err.getvalue()

    def test_users_add_list_passwd_disable(self) -> None:
        status, out, _ = self.run_cli(
            "users", "add", "ada", "--role", "admin", "--password-stdin", stdin="first password\n"
        )
        self.assertEqual((status, out), (0, "user ada added (role admin)\n"))
        self.assertEqual(self.run_cli("users", "list")[1], "ada\tadmin\t\n")
        status, _, err = self.run_cli(
            "users", "add", "ada", "--password-stdin", stdin="first password\n"
        )
        self.assertEqual(status, 2)
        self.assertIn("exists already", err)
        self.run_cli("users", "passwd", "ada", "--password-stdin", stdin="second password\n")
        database = open_database(load_config(str(self.config)))
        record = database.transaction_now(users.login_record, "ada")
        assert record is not None
        self.assertTrue(auth.verify_password("second password", record[0]))
        self.run_cli("users", "disable", "ada")
        self.assertIsNone(database.transaction_now(users.login_record, "ada"))
        self.assertEqual(self.run_cli("users", "list")[1], "ada\tadmin\tdisabled\n")
        short = self.run_cli("users", "add", "bo", "--password-stdin", stdin="short\n")
        self.assertEqual(short[0], 2)

    def test_generated_password_if_missing(self) -> None:
        status, out, _ = self.run_cli(
            "users", "add", "demo", "--role", "admin", "--generate-password", "--if-missing"
        )
        self.assertEqual(status, 0)
        password = out.splitlines()[-1].split(": ", 1)[1]
        database = open_database(load_config(str(self.config)))
        record = database.transaction_now(users.login_record, "demo")
        assert record is not None
        self.assertTrue(auth.verify_password(password, record[0]))
        again = self.run_cli("users", "add", "demo", "--generate-password", "--if-missing")
        self.assertEqual(again[:2], (0, ""))

    def test_tokens_create_list_revoke(self) -> None:
        self.run_cli("users", "add", "vera", "--password-stdin", stdin="a password\n")
        status, token, err = self.run_cli("tokens", "create", "vera", "--label", "prometheus")
        token = token.strip()
        self.assertEqual(status, 0)
        self.assertTrue(token.startswith("udsgw_"))
        self.assertIn("shown once", err)
        listed = self.run_cli("tokens", "list")[1]
        self.assertIn("vera", listed)
        self.assertIn("prometheus", listed)
        self.assertNotIn(token, listed)
        database = open_database(load_config(str(self.config)))
        principal = database.transaction_now(users.token_principal, auth.token_digest(token))
        self.assertEqual(principal, users.Principal("vera", "viewer", False))
        self.assertEqual(self.run_cli("tokens", "revoke", "1")[0], 0)
        self.assertIsNone(
            database.transaction_now(users.token_principal, auth.token_digest(token))
        )
        self.assertEqual(self.run_cli("tokens", "revoke", "1")[0], 2)
        self.assertEqual(self.run_cli("tokens", "create", "nobody")[0], 2)
        audit = self.run_cli("audit", "--json")
        self.assertIn("token.revoke", audit[1])
