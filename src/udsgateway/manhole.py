"""The manhole: a Python console into the live process, for operators.

Off by default. SSH with authorized keys only (no passwords), bound to
loopback; telnet only when configured explicitly, only on loopback, and
only with a passwd file. The namespace holds the service and a few helpers,
documented in ``docs/operations.md``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.interfaces import ISession
from twisted.conch.manhole_tap import _StupidRealm, chainedProtocolFactory, makeTelnetProtocol
from twisted.conch.ssh import keys
from twisted.conch.telnet import TelnetBootstrapProtocol
from twisted.cred import checkers, portal
from twisted.internet import protocol
from twisted.python import filepath
from zope.interface import implementer

from udsgateway.admin.operations import Operations
from udsgateway.config import ManholeConfig
from udsgateway.store import search
from udsgateway.store.audit import AuditQuery


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


def operations_of(service: Any, reactor: Any) -> Operations:
    """The service's operations facade (``Operations.shared``), its rates sampled."""
    found = Operations.shared(service, reactor, getattr(service, "_wall", None) or time.time)
    if found.rates is not None:
        found.rates.start()
    return found


def namespace(
    service: Any, operator: str = "manhole", operations: Operations | None = None
) -> dict[str, Any]:
    """What an operator finds in the console: the service, and helpers that call the
    operations facade as ``operator`` (the SSH user), audited with via ``manhole``.

    Each helper returns a Deferred; the console prints its result when it fires.
    """
    via = "manhole"

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

    names: dict[str, Any] = {
        "service": service,
        "stats": stats,
        "flows": flows,
        "config": service.config,
    }
    if operations is None:
        return names
    ops = operations

    def status() -> Any:
        """Per tenant, flow and destination counts, and rates (minute, hour)."""
        return ops.status(operator, via)

    def messages(**filters: Any) -> Any:
        """Search messages, newest first: tenant=, message_type=, status=, since=, until=,
        flow_id=, pid3=, msh10=, sch1=, sch2=, before_id=, limit=."""
        keys = tuple((name, filters.pop(name)) for name in search.KEYS if name in filters)
        return ops.messages(operator, via, search.Query(keys=keys, **filters))

    def message(message_id: int) -> Any:
        """A message's metadata, executions and deliveries (no content)."""
        return ops.message(operator, via, message_id)

    def content(
        message_id: int | None = None, part: str = "inbound", delivery_id: int | None = None
    ) -> Any:
        """Message content (audited): inbound, ack (of message_id); outbound, response
        (of delivery_id)."""
        return ops.content(operator, via, message_id, part, delivery_id)

    def deliveries(state: str | None = None, destination: str | None = None) -> Any:
        """Deliveries oldest first, each with why it waits."""
        return ops.deliveries(operator, via, (state,) if state else (), destination)

    def pause(destination: str, reason: str) -> Any:
        """Pause a destination (host:port): it queues, nothing is sent."""
        return ops.pause(operator, via, destination, reason)

    def resume(destination: str, reason: str = "") -> Any:
        """Resume a paused destination."""
        return ops.resume(operator, via, destination, reason)

    def release(delivery_id: int, reason: str) -> Any:
        """Send a held delivery again now."""
        return ops.release(operator, via, delivery_id, reason)

    def skip(delivery_id: int, reason: str) -> Any:
        """Give up on a held delivery; its lane moves on."""
        return ops.skip(operator, via, delivery_id, reason)

    def retry(delivery_id: int, reason: str = "retry now") -> Any:
        """Send a queued delivery waiting for its backoff now."""
        return ops.retry_now(operator, via, delivery_id, reason)

    def replay(message_id: int, reason: str, flow_id: str | None = None) -> Any:
        """Run a message through its flows (or flow_id) again."""
        return ops.replay_message(operator, via, message_id, reason, flow_id)

    def replay_search(
        reason: str, confirm_count: int | None = None, flow_id: str | None = None, **filters: Any
    ) -> Any:
        """Replay the messages a search finds: first without confirm_count (the count),
        then with confirm_count= that count."""
        keys = tuple((name, filters.pop(name)) for name in search.KEYS if name in filters)
        query = search.Query(keys=keys, **filters)
        return ops.replay_messages(operator, via, query, reason, flow_id, confirm_count)

    def audit(**filters: Any) -> Any:
        """The audit trail, newest first: who=, action=, target=, since=, until=, vias=,
        before_id=, limit= (the fields of ``store.audit.AuditQuery``)."""
        return ops.audit_trail(operator, via, AuditQuery(**filters))

    def cluster() -> Any:
        """The nodes sharing the database, their buckets and leases, who runs each job."""
        return ops.cluster(operator, via)

    names.update(
        {
            "operations": ops,
            "operator": operator,
            "status": status,
            "messages": messages,
            "message": message,
            "content": content,
            "deliveries": deliveries,
            "pause": pause,
            "resume": resume,
            "release": release,
            "skip": skip,
            "retry": retry,
            "replay": replay,
            "replay_search": replay_search,
            "audit": audit,
            "cluster": cluster,
        }
    )
    return names


class _OperatorRealm(manhole_ssh.TerminalRealm):
    """Each SSH session gets a namespace whose helpers act as the user who logged in."""

    def __init__(self, service: Any, operations: Operations | None) -> None:
        super().__init__()
        self._service = service
        self._operations = operations

    def _getAvatar(self, avatarId: bytes) -> Any:  # noqa: N803 - Twisted's names
        user = super()._getAvatar(avatarId)
        operator = avatarId.decode("utf-8", "replace")
        session = user.original.getComponent(ISession)
        session.chainedProtocolFactory = chainedProtocolFactory(
            namespace(self._service, operator, self._operations)
        )
        return user


def manhole_service(config: ManholeConfig, service: Any, reactor: Any) -> IService:
    """The manhole listeners for this configuration (SSH, and telnet if asked for)."""
    parent = MultiService()
    operations = operations_of(service, reactor) if hasattr(service, "database") else None
    names = namespace(service, "telnet", operations)
    if config.ssh:
        realm: Any = _OperatorRealm(service, operations)
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
