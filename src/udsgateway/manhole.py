"""The manhole: a Python console into the live process, for operators.

Off by default. SSH with authorized keys only (no passwords), bound to
loopback; telnet only when configured explicitly, only on loopback, and
only with a passwd file. The namespace holds the service and a few helpers,
documented in ``docs/operations.md``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.manhole_tap import _StupidRealm, chainedProtocolFactory, makeTelnetProtocol
from twisted.conch.ssh import keys
from twisted.conch.telnet import TelnetBootstrapProtocol
from twisted.cred import checkers, portal
from twisted.internet import protocol
from twisted.python import filepath
from zope.interface import implementer

from udsgateway.config import ManholeConfig


@implementer(IAuthorizedKeysDB)
class _KeysFile:
    """An authorized-keys database read from one file, for one operator name."""

    def __init__(self, path: str) -> None:
        self._path = filepath.FilePath(path)

    def getAuthorizedKeys(self, username: bytes) -> Any:
        try:
            lines = self._path.getContent().splitlines()
        except OSError:
            return iter(())
        parsed = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                parsed.append(keys.Key.fromString(line))
            except keys.BadKeyError:
                continue
        return iter(parsed)


def namespace(service: Any) -> dict[str, Any]:
    """What an operator finds in the console."""

    def stats() -> dict[str, Any]:
        """Counters of every listener and its inbound pipeline."""
        result: dict[str, Any] = service.stats()
        return result

    def flows() -> list[tuple[str, str, str, str, str]]:
        """(tenant, App ID, Flow ID, name, message type) of every routed flow."""
        rows = []
        for tenant, ingest in service.ingests.items():
            for (app_id, flow_id), route in sorted(ingest.routes.by_id.items()):
                rows.append((tenant, app_id, flow_id, route.name, route.message_type))
        return rows

    return {"service": service, "stats": stats, "flows": flows, "config": service.config}


def manhole_service(config: ManholeConfig, service: Any, reactor: Any) -> IService:
    """The manhole listeners for this configuration (SSH, and telnet if asked for)."""
    parent = MultiService()
    names = namespace(service)
    if config.ssh:
        realm: Any = manhole_ssh.TerminalRealm()
        realm.chainedProtocolFactory = chainedProtocolFactory(names)
        keys_db: Any = _KeysFile(config.authorized_keys)
        checker = SSHPublicKeyChecker(keys_db)
        factory = manhole_ssh.ConchFactory(portal.Portal(realm, [checker]))
        key_dir = config.host_key_dir or os.path.join(os.getcwd(), "var")
        os.makedirs(key_dir, mode=0o700, exist_ok=True)
        location = filepath.FilePath(key_dir).child("manhole_host_key")
        old_umask = os.umask(0o077)
        try:
            host_key = keys._getPersistentRSAKey(location, 2048)
        finally:
            os.umask(old_umask)
        os.chmod(location.path, 0o600)
        factory.publicKeys[b"ssh-rsa"] = host_key
        factory.privateKeys[b"ssh-rsa"] = host_key
        strports.service(config.ssh, factory, reactor=reactor).setServiceParent(parent)
    if config.telnet:
        telnet_realm = _StupidRealm(
            TelnetBootstrapProtocol, insults.ServerProtocol, manhole.ColoredManhole, names
        )
        telnet_checker = checkers.FilePasswordDB(config.telnet_passwd)
        telnet_factory = protocol.ServerFactory()
        telnet_factory.protocol = makeTelnetProtocol(portal.Portal(telnet_realm, [telnet_checker]))
        strports.service(config.telnet, telnet_factory, reactor=reactor).setServiceParent(parent)
    return parent
