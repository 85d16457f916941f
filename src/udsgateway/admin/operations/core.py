"""What every part of the operations facade shares: its errors, its fields and plumbing.

``Core`` holds the live objects and the database, and the three ways a method
reaches the database: ``_run`` (the database thread), ``_read`` (read-only, off
that thread) and ``_audited`` (a change and its audit row in one transaction,
refusals audited too). The topics (status, queue, messages, flows, logs, audit,
cluster) are its subclasses; ``udsgateway.admin.operations.Operations`` joins
them into the one facade.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from attrs import define, field
from sqlalchemy import Connection
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime

from udsgateway.admin.operations.rates import Rates
from udsgateway.config import TenantConfig
from udsgateway.store import audit
from udsgateway.store.engine import Database

T = TypeVar("T")

VIA = audit.VIA


class OperationsError(Exception):
    """An operation refused; the message says why (no message content)."""


class NotFound(OperationsError):  # noqa: N818 - the names the API maps
    """The object does not exist (HTTP 404)."""


class Invalid(OperationsError):  # noqa: N818
    """The request is wrong: a bad filter, a missing reason (HTTP 400)."""


class Conflict(OperationsError):  # noqa: N818
    """The object is not in a state that allows it, or a count changed (HTTP 409)."""


def iso(epoch: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC to the hundredth; None for none (or 0)."""
    if epoch is None or epoch <= 0:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def as_text(data: bytes | None) -> str | None:
    """Content for JSON: HL7 segments on lines; bytes that are not UTF-8 as latin-1."""
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r", "\n")


@define(eq=False)
class Core:
    """The fields of the facade and the plumbing every topic uses (see the module)."""

    database: Database
    clock: IReactorTime
    wall: Callable[[], float] = time.time
    dispatcher: Any = None  # outbound Dispatcher
    executor: Any = None  # outbound Executor
    ingests: Mapping[str, Any] = field(factory=dict)  # tenant -> Ingest
    listeners: Mapping[str, Any] = field(factory=dict)  # tenant -> ListenerFactory
    #: tenant -> (host, port) a sender connects to, for ``flow_saved``.
    addresses: Callable[[], Mapping[str, tuple[str, int]]] = dict
    rates: Rates | None = None
    #: Runs read-only work (``read_now`` calls) away from the database thread; None:
    #: reads go through the database thread like everything else (CLI, tests).
    reads: Callable[..., Deferred[Any]] | None = None
    #: The configured tenants, by name (flows are imported for these only).
    tenants: Mapping[str, TenantConfig] = field(factory=dict)
    #: Loads changed flows into the running gateway at once (its ``reload_flows``),
    #: so a saved flow routes before the next reload interval; None: no gateway.
    reload_flows: Callable[[], Deferred[None]] | None = None
    #: This node's LeaseManager (cluster.leases), looked up at each call; None: not a
    #: node of a cluster.
    lease_manager: Callable[[], Any] = lambda: None

    def _run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return self.database.transaction(function, *args)

    def _read(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Read-only work: in a thread of its own, never holding up the inbound
        commits (store/reads.py); through the database thread without ``reads``."""
        if self.reads is None:
            return self.database.transaction(function, *args)
        return self.reads(function, *args)

    def _check(self, actor: str, via: str) -> None:
        if not actor:
            raise Invalid("an operator name is required")
        if via not in VIA:
            raise Invalid(f"via: expected one of {', '.join(VIA)}")

    def _audited(
        self,
        actor: str,
        via: str,
        action: str,
        target: str,
        reason: str,
        work: Callable[[Connection], T],
    ) -> Deferred[T]:
        """Run ``work`` and its audit row in one transaction; a refusal is audited too
        (in a transaction of its own, with the refusal as result)."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        now = self.wall()

        def both(connection: Connection) -> T:
            result = work(connection)
            audit.append(connection, actor, action, target, now, reason, "ok", via)
            return result

        def refused(failure: Any) -> Any:
            if failure.check(OperationsError):
                result = f"refused: {failure.getErrorMessage()}"
                written = self._run(audit.append, actor, action, target, now, reason, result, via)
                written.addCallback(lambda _: failure)
                return written
            return failure

        done = self._run(both)
        done.addErrback(refused)
        return done

    def _woke(self, result: T) -> T:
        """``result``, once the executor was told there is work (a release, a replay)."""
        if self.executor is not None:
            self.executor.wake()
        return result
