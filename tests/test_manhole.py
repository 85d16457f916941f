"""The manhole: key-only SSH authentication, loopback only, and its namespace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.conch.ssh import keys
from twisted.cred.credentials import ISSHPrivateKey, SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.config import ConfigError, parse_config
from udsgateway.inbound.routing import RoutingTable
from udsgateway.manhole import manhole_service, namespace
from udsgateway.testing import Gateway, demo_app


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
