"""GatewayService: owns the start and stop order of everything in the process.

Start: open the database (schema, migrations), import the configured flow
files, recover unfinished work, load routing, and only then open one
listener per tenant. Stop: close the listeners first, let in-flight commits
finish, then stop the database thread.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from udsgateway.clock import Wall, wall_of
from udsgateway.config import GatewayConfig, TenantConfig
from udsgateway.flows import FlowFileError, read_app_file
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.hl7.header import codec_for
from udsgateway.inbound.ingest import Ingest
from udsgateway.inbound.listener import ListenerFactory
from udsgateway.inbound.routing import RoutingTable
from udsgateway.mapping.checks import template_problems
from udsgateway.outbound.dispatcher import Dispatcher
from udsgateway.outbound.executor import Executor
from udsgateway.outbound.policy import Timing
from udsgateway.store import executions
from udsgateway.store import messages as store
from udsgateway.store.engine import (
    AdvisoryLock,
    Database,
    FileIdentity,
    FileLock,
    GroupCommitter,
    SchemaError,
    ThreadRunner,
    ensure_schema,
)
from udsgateway.store.messages import CommitResult, InboundRecord
from udsgateway.wire.tls import TLSListenerFactory, server_options

log = Logger()


class StartError(Exception):
    """The gateway cannot start for a reason the operator can fix (a flow file, a
    port in use): logged as one line, without a traceback."""


class GatewayService(MultiService):
    """The whole gateway process, as a tree of services."""

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        database: Database,
        control_ids: ControlIdSource,
        threads: ThreadRunner | None = None,
        wall: Wall | None = None,
        identity: FileIdentity | None = None,
        lock: FileLock | AdvisoryLock | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        # Timers run on the reactor's clock (monotonic under twistd, see tap.py);
        # timestamps on the wall clock.
        self._wall = wall_of(reactor, wall)
        self.database = database
        # Started in startService, after twistd has forked into the background:
        # threads do not survive a fork.
        self._threads = threads
        self.committer: GroupCommitter[InboundRecord, CommitResult] = GroupCommitter(
            database, executions.commit_inbound, config.commit_max_batch, clock=reactor
        )
        self._timings: dict[str, Timing] = {}
        self.dispatcher = Dispatcher(
            database,
            reactor,
            reactor,
            timing=lambda endpoint: self._timings.get(endpoint, Timing()),
            page_size=config.delivery.page_size,
            max_active_lanes=config.delivery.max_active_lanes,
            held_poll=config.delivery.held_poll,
            max_queued_per_destination=config.delivery.max_queued_per_destination,
            wall=wall,
        )
        self.executor = Executor(
            database,
            self.dispatcher,
            reactor,
            control_ids,
            charsets={
                tenant.name: codec_for(tenant.default_charset, "latin-1") or "latin-1"
                for tenant in config.tenants
            },
            wall=wall,
        )
        self.dispatcher.outcomes = self.executor
        self.ingests: dict[str, Ingest] = {
            tenant.name: Ingest(
                tenant,
                self.committer,
                reactor,
                control_ids,
                on_stored=self.executor.stored,
                first_actions=self.executor.first_actions,
                is_full=self.dispatcher.is_full,
                watch=self.executor.watch,
                save_ack=self._save_ack,
                execution_states=self._execution_states,
                record_logs=self._record_logs,
                wall=wall,
            )
            for tenant in config.tenants
        }
        self.factories: dict[str, ListenerFactory] = {
            tenant.name: ListenerFactory(tenant, self.ingests[tenant.name], reactor)
            for tenant in config.tenants
        }
        self.ports: dict[str, IListeningPort] = {}
        self._generation = -1
        self._reload = LoopingCall(self._reload_flows)
        self._reload.clock = reactor
        self._retention = LoopingCall(self._prune)
        self._retention.clock = reactor
        self.pruned = 0
        self.ready: Deferred[None] = Deferred()
        # The database file's identity, checked on a timer and before each group
        # commit (a database file deleted or replaced while running).
        self._identity = identity
        self._lock = lock
        if identity is not None:
            self.committer.guard = identity.ensure
            self.committer.on_damaged = self._database_damaged
        self._identity_check = LoopingCall(self._check_database)
        self._identity_check.clock = reactor
        #: Why the database cannot be trusted any more (None: it can). Once set, every
        #: new message gets a NAK 207 until the gateway is restarted.
        self.database_damage: str | None = None
        self._listening = False

    def startService(self) -> None:
        if self._threads is not None:
            self._threads.start()
        super().startService()
        started = Deferred.fromCoroutine(self._start())
        started.addErrback(self._start_failed)

    async def _start(self) -> None:
        version = await self.database.transaction(ensure_schema)
        log.info("database ready, schema {version}", version=version)
        if isinstance(self._lock, FileLock):
            # After twistd's fork the holder is this process, not the one that took it.
            await self.database.runner.run(self._lock.rewrite, self._wall())
        if self._identity is not None:
            await self.database.runner.run(self._identity.watch)
            self._identity_check.start(self.config.database_check_interval, now=False)
        for tenant in self.config.tenants:
            await self._import_flow_files(tenant)
        await self._reload_flows()
        # Recovery before any listener opens: unfinished executions and queued
        # deliveries resume, in their original order, ahead of new traffic.
        await self.dispatcher.recover()
        self.executor.wake()
        self.executor.poll(self.config.delivery.held_poll)
        for tenant in self.config.tenants:
            endpoint = serverFromString(self._reactor, tenant.listen)
            factory: Any = self.factories[tenant.name]
            if tenant.tls.enabled:
                factory = TLSListenerFactory(server_options(tenant.tls), False, factory)
            try:
                port = await endpoint.listen(factory)
            except CannotListenError as error:
                # "Couldn't listen on 127.0.0.1:2575: [Errno 98] Address already in use."
                raise StartError(f"tenant {tenant.name}: {error}") from None
            self.ports[tenant.name] = port
            log.info(
                "tenant {tenant} listening on {address}",
                tenant=tenant.name,
                address=str(port.getHost()),
            )
        self._reload.start(self.config.flow_reload_interval, now=False).addErrback(
            lambda f: log.failure("flow reload loop stopped", f)
        )
        self._retention.start(self.config.retention.interval, now=False).addErrback(
            lambda f: log.failure("retention loop stopped", f)
        )
        self._listening = True
        self.ready.callback(None)

    @property
    def accepting(self) -> bool:
        """Readiness: listening, and the database is still the one opened at start."""
        return self._listening and self.database_damage is None

    async def _check_database(self) -> None:
        """The identity timer: notice a database file deleted or replaced while running."""
        if self._identity is None or self.database_damage is not None:
            return
        try:
            problem = await self.database.runner.run(self._identity.check)
        except Exception:
            log.failure("could not check the database file; checked again at the next interval")
            return
        if problem is not None:
            self._database_damaged(problem)

    def _database_damaged(self, problem: str) -> None:
        """Stop accepting: log once, loudly; readiness false; NAK from now on."""
        if self.database_damage is not None:
            return
        self.database_damage = problem
        log.critical(
            "database damaged: {problem}; every new message gets a NAK 207 until the "
            "gateway is restarted on a database it can trust",
            problem=problem,
        )
        if self._identity_check.running:
            self._identity_check.stop()

    def _start_failed(self, failure: Any) -> None:
        if failure.check(StartError, SchemaError):
            # An operator's mistake (a flow file, a port in use): one clear line.
            log.error("udsgateway could not start: {reason}", reason=failure.getErrorMessage())
        else:
            log.failure("udsgateway could not start", failure)
        self.ready.errback(failure)
        if IReactorCore.providedBy(self._reactor) and self._reactor.running:
            self._reactor.stop()

    async def _import_flow_files(self, tenant: TenantConfig) -> None:
        now = self._wall()
        for path in tenant.flow_files:
            try:
                app = read_app_file(path)
            except FlowFileError as error:
                raise StartError(f"tenant {tenant.name}: " + "; ".join(error.problems)) from None
            if app.tenant != tenant.name:
                raise StartError(f"{path}: tenant {app.tenant!r} is not {tenant.name!r}")
            problems = template_problems(path, app)
            if problems:
                # The same checks as `udsgateway flows import`: a broken template
                # stops the whole start (every tenant), it is not found later on
                # live traffic.
                raise StartError(f"tenant {tenant.name}: " + "; ".join(problems))
            saved = await self.database.transaction(store.save_app, app, now)
            log.info(
                "flow file {path} imported: App ID {app_id}, {count} flows",
                path=path,
                app_id=saved.app_id,
                count=len(saved.flows),
            )

    @property
    def _clock(self) -> IReactorTime:
        clock: IReactorTime = self._reactor
        return clock

    async def _reload_flows(self) -> None:
        """Reload routing when flows changed (flows import from the CLI, another node)."""
        try:
            generation = await self.database.transaction(store.flows_generation)
            if generation == self._generation:
                return
            apps = await self.database.transaction(store.load_apps, None)
        except Exception:
            log.failure("could not reload flows; routing unchanged")
            return
        self.executor.load(apps)
        self._timings = {
            action.endpoint: Timing(
                connect_timeout=action.connect_timeout,
                response_timeout=action.response_timeout,
                backoff_initial=action.backoff_initial,
                backoff_max=action.backoff_max,
            )
            for app in apps
            for flow in app.flows
            for action in flow.actions
        }
        for tenant in self.config.tenants:
            self.ingests[tenant.name].routes = RoutingTable.build(
                [app for app in apps if app.tenant == tenant.name],
                tenant.app_id_field,
                tenant.flow_id_field,
            )
        self._generation = generation
        log.info("routing loaded, flows generation {generation}", generation=generation)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _prune(self) -> None:
        """Delete what retention says is old, in small batches, yielding between them."""
        retention = self.config.retention
        before = self._wall() - retention.days * 86400
        try:
            while self.running:
                count = await self.database.transaction(store.prune, before, retention.batch)
                self.pruned += count
                if count < retention.batch:
                    break
        except Exception:
            log.failure("retention pass failed; it runs again at the next interval")

    async def _stop(self) -> None:
        for loop in (self._reload, self._retention, self._identity_check):
            if loop.running:
                loop.stop()
        for port in self.ports.values():
            await _maybe(port.stopListening())
        self.ports.clear()
        self.executor.stop_polling()
        await self.dispatcher.stopService()
        await _maybe(super().stopService())
        if self._threads is not None:
            self._threads.stop()
        if self._identity is not None:
            self._identity.close()

    def _save_ack(self, message_id: int, code: str, ack: bytes) -> Deferred[None]:
        return self.database.transaction(store.update_ack, message_id, code, ack)

    def _record_logs(self, rows: list[dict[str, Any]]) -> Deferred[None]:
        return self.database.transaction(store.insert_logs, rows)

    def _execution_states(self, message_id: int) -> Deferred[list[store.ExecutionState]]:
        return self.database.transaction(store.execution_states, message_id)

    def stats(self) -> dict[str, Any]:
        """A snapshot of every listener's counters, for the manhole and admin API."""
        return {
            name: {
                "listener": factory.stats,
                "ingest": self.ingests[name].stats,
                "port": str(self.ports[name].getHost()) if name in self.ports else None,
            }
            for name, factory in self.factories.items()
        }


async def _maybe(result: Deferred[None] | None) -> None:
    """Await what Service.stopService returned: a Deferred, or None."""
    if result is not None:
        await result
