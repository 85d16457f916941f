"""The manhole: key-only SSH authentication, loopback only, and its namespace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.conch.interfaces import ISession
from twisted.conch.ssh import keys
from twisted.cred.credentials import ISSHPrivateKey, SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.admin.operations import Operations
from udsgateway.config import ConfigError, loopback_endpoint_problem, parse_config
from udsgateway.inbound.routing import RoutingTable
from udsgateway.manhole import _OperatorRealm, manhole_service, namespace
from udsgateway.testing import Gateway, demo_app, hl7_message, mllp


def _key() -> keys.Key:
    from cryptography.hazmat.primitives.asymmetric import ec

    return keys.Key(ec.generate_private_key(ec.SECP256R1()))


class _Service:
    """The parts of GatewayService the manhole namespace uses."""

    def __init__(self) -> None:
        self.gateway = Gateway()
        self.ingests = {"test": self.gateway.ingest}
        self.config = "the config"

    def stats(self) -> dict[str, Any]:
        return {"test": {"listener": self.gateway.factory.stats}}


class ManholeTests(SynchronousTestCase):
    """SSH manhole: only authorized keys get in; the namespace is documented."""

    def _config(self, authorized: keys.Key) -> Any:
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        keys_file = folder / "authorized_keys"
        keys_file.write_bytes(authorized.public().toString("openssh") + b" operator\n")
        text = f"""
[manhole]
enabled = true
ssh = "tcp:port=2222:interface=127.0.0.1"
authorized_keys = "{keys_file}"
host_key_dir = "{folder / "hostkey"}"
"""
        return parse_config(text, str(folder / "gateway.toml")).manhole

    def _checker(self, config: Any) -> Any:
        reactor = MemoryReactorClock()
        service: Any = manhole_service(config, _Service(), reactor)
        [ssh] = list(service)
        assert isinstance(ssh, StreamServerEndpointService)
        portal = ssh.factory.portal
        return portal.checkers[ISSHPrivateKey]

    def _credentials(self, key: keys.Key) -> SSHPrivateKey:
        data = b"session data to sign"
        return SSHPrivateKey(
            b"operator", b"ecdsa-sha2-nistp256", key.public().blob(), data, key.sign(data)
        )

    def test_authorized_key_gets_in(self) -> None:
        """A key listed in authorized_keys is accepted."""
        key = _key()
        checker = self._checker(self._config(key))
        avatar = self.successResultOf(checker.requestAvatarId(self._credentials(key)))
        self.assertEqual(avatar, b"operator")

    def test_other_key_is_refused(self) -> None:
        """A key not listed is refused; there are no passwords to try."""
        checker = self._checker(self._config(_key()))
        failure = self.failureResultOf(checker.requestAvatarId(self._credentials(_key())))
        failure.trap(UnauthorizedLogin)

    def test_host_key_file_is_private(self) -> None:
        """The generated host key is readable by its owner only (0600)."""
        config = self._config(_key())
        self._checker(config)
        host_key = Path(config.host_key_dir) / "manhole_host_key"
        self.assertEqual(host_key.stat().st_mode & 0o777, 0o600)

    def test_non_loopback_is_refused_by_config(self) -> None:
        """The configuration refuses a manhole endpoint that is not on loopback."""
        text = """
[manhole]
enabled = true
ssh = "tcp:port=2222:interface=0.0.0.0"
authorized_keys = "keys"
"""
        with self.assertRaises(ConfigError) as raised:
            parse_config(text, "/tmp/gateway.toml")
        self.assertIn("loopback", str(raised.exception))

    def test_telnet_needs_a_passwd_file(self) -> None:
        """Telnet is only on explicit request, and then a passwd file is required."""
        text = """
[manhole]
enabled = true
ssh = ""
telnet = "tcp:port=2223:interface=127.0.0.1"
"""
        with self.assertRaises(ConfigError) as raised:
            parse_config(text, "/tmp/gateway.toml")
        self.assertIn("telnet_passwd", str(raised.exception))

    def test_namespace_helpers(self) -> None:
        """The namespace offers the service, stats() and flows() as documented."""
        service = _Service()
        service.gateway.ingest.routes = RoutingTable.build([demo_app()])
        names = namespace(service)
        self.assertIs(names["service"], service)
        self.assertIn("test", names["stats"]())
        flows = names["flows"]()
        self.assertEqual(
            sorted(row[4] for row in flows),
            ["ADT^A04", "ADT^A08", "SIU^S12", "SIU^S14", "SIU^S15"],
        )

    def test_operator_helpers_are_audited_as_the_ssh_user(self) -> None:
        """Each SSH session's helpers act as the user who logged in, via manhole."""
        service = _Service()
        gateway = service.gateway
        sender = gateway.connect()
        sender.send(mllp(hl7_message("M1", receiving="APPTESTMLLP|FLWADTA04MLLP")))
        operations = Operations(gateway.database, gateway.clock, gateway.clock.seconds)
        realm = _OperatorRealm(service, operations)
        user = realm._getAvatar(b"carol")
        session = user.original.getComponent(ISession)
        names = session.chainedProtocolFactory.namespace
        self.assertEqual(names["operator"], "carol")
        found = self.successResultOf(names["messages"](msh10="M1"))
        [row] = found["messages"]
        shown = self.successResultOf(names["content"](row["id"]))
        self.assertIn("MSH|", shown["text"])
        self.successResultOf(names["pause"]("partner.example:6661", "maintenance"))
        trail = self.successResultOf(names["audit"]())
        self.assertEqual(
            [(e["who"], e["action"], e["via"]) for e in trail["entries"]],
            [
                ("carol", "destination.pause", "manhole"),
                ("carol", "content.inbound", "manhole"),
            ],
        )

    def test_a_gateway_service_gets_one_shared_facade(self) -> None:
        """The manhole over a GatewayService: its helpers use the service's one facade
        (``service.operations``, shared with the admin API), rates sampled."""
        from udsgateway.hl7.ack import ControlIdSource
        from udsgateway.service import GatewayService
        from udsgateway.testing import memory_database

        authorized = _key()
        config = self._config(authorized)
        gateway_config = parse_config(
            '[gateway]\ndatabase = "sqlite:///:memory:"\n'
            '[[tenants]]\nname = "t"\nlisten = "tcp:port=0:interface=127.0.0.1"\n',
            "/tmp/gateway.toml",
        )
        reactor = MemoryReactorClock()
        service = GatewayService(gateway_config, reactor, memory_database(), ControlIdSource("T"))
        manhole_service(config, service, reactor)
        operations = service.operations  # type: ignore[attr-defined]
        self.assertIs(Operations.shared(service, reactor), operations)
        self.assertEqual(set(operations.tenants), {"t"})
        status = self.successResultOf(operations.status("carol", "manhole"))
        self.assertEqual(status["tenants"]["t"]["received"], 0)
        assert operations.rates is not None
        operations.rates.stop()


class LoopbackEndpointTests(SynchronousTestCase):
    """The manhole's bind check reads an endpoint string as Twisted does."""

    def assert_refused(self, endpoint: str) -> None:
        self.assertNotEqual(loopback_endpoint_problem(endpoint), "", endpoint)

    def test_loopback_forms_are_accepted(self) -> None:
        """Loopback binds in every spelling Twisted accepts, and unix sockets, pass."""
        for endpoint in [
            "tcp:port=2222:interface=127.0.0.1",
            "tcp:2222:interface=127.0.0.1",
            "tcp:2222:127.0.0.1",
            "tcp:interface=127.0.0.5:port=2222",
            "tcp:port=2222:interface=0.0.0.0:interface=127.0.0.1",
            r"tcp6:port=2222:interface=\:\:1",
            r"tcp6:2222:interface=\:\:1",
            "ssl:port=2222:privateKey=k.pem:interface=127.0.0.1",
            "unix:/run/udsgateway/manhole.sock",
            "unix:address=/run/manhole.sock:mode=600",
        ]:
            self.assertEqual(loopback_endpoint_problem(endpoint), "", endpoint)

    def test_bypass_shapes_are_refused(self) -> None:
        """Every string that would bind beyond loopback, or that Twisted would not parse, fails."""
        for endpoint in [
            # the last repeated key wins in Twisted
            "tcp:port=2222:interface=127.0.0.1:interface=0.0.0.0",
            "tcp:port=2222:interface=127.0.0.1:interface=",
            # a positional interface
            "tcp:2222:0.0.0.0",
            "tcp:2222:interface=0.0.0.0",
            # no interface: all interfaces
            "tcp:port=2222",
            "tcp:2222",
            "2222",
            "tcp6:port=2222",
            r"tcp6:port=2222:interface=\:\:",
            "tcp6:port=2222:interface=::1",  # unescaped: the value is "" (all interfaces)
            r"tcp6:port=2222:interface=\:\:ffff\:0.0.0.0",
            # escapes that hide the key or the value
            r"tcp:port=2222:interface\=127.0.0.1",
            r"tcp:port=2222:interface=127.0.0.1\:0.0.0.0",
            r"tcp:port=2222:interface=127.0.0.1\\",
            "tcp:port=2222:interface=127.0.0.1\\",
            # names and lookalikes the resolver or inet_aton would widen
            "tcp:port=2222:interface=localhost",
            "tcp:port=2222:interface=127.1",
            "tcp:port=2222:interface= 127.0.0.1",
            "tcp:port=2222:interface=10.0.0.1",
            # ssl: keyword and positional
            "ssl:port=2222:privateKey=k.pem:interface=0.0.0.0",
            "ssl:port=2222:privateKey=k.pem",
            "ssl:2222:k.pem:c.pem:SSLv23_METHOD:0.0.0.0",
            # types we cannot check
            "TCP:port=2222:interface=127.0.0.1",
            "systemd:domain=INET:index=0",
            "tor:port=2222",
            "",
            # what Twisted itself refuses
            "tcp:port=2222:interface=127.0.0.1:bogus=1",
            "tcp:2222:port=2222:interface=127.0.0.1",
        ]:
            self.assert_refused(endpoint)

    def test_repeated_interface_is_refused_by_config(self) -> None:
        """The configuration applies the same check: a later interface=0.0.0.0 is refused."""
        text = """
[manhole]
enabled = true
ssh = "tcp:port=2222:interface=127.0.0.1:interface=0.0.0.0"
authorized_keys = "keys"
"""
        with self.assertRaises(ConfigError) as raised:
            parse_config(text, "/tmp/gateway.toml")
        self.assertIn("'0.0.0.0'", str(raised.exception))

    def test_check_agrees_with_twisted(self) -> None:
        """The interface the check reads is the one Twisted's own parser would bind."""
        for endpoint, expected in [
            ("tcp:port=2222:interface=127.0.0.1:interface=0.0.0.0", "0.0.0.0"),
            ("tcp:2222:127.0.0.1", "127.0.0.1"),
        ]:
            parsed: Any = endpoints._parseServer(endpoint, None)
            self.assertEqual(parsed[2]["interface"], expected)
            self.assertEqual(loopback_endpoint_problem(endpoint) == "", expected == "127.0.0.1")
