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
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from udsgateway import executions, store
from udsgateway.ack import ControlIdSource
from udsgateway.clock import Wall, wall_of
from udsgateway.config import GatewayConfig, TenantConfig
from udsgateway.db import Database, GroupCommitter, ThreadRunner, ensure_schema
from udsgateway.delivery import Dispatcher, Timing
from udsgateway.executor import Executor
from udsgateway.flows import FlowFileError, read_app_file, template_problems
from udsgateway.header import codec_for
from udsgateway.ingest import Ingest
from udsgateway.listener import ListenerFactory
from udsgateway.routing import RoutingTable
from udsgateway.store import CommitResult, InboundRecord
from udsgateway.tls import TLSListenerFactory, server_options

log = Logger()


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
        self.dispatcher.after_record = self.executor.after_record
        self.dispatcher.on_recorded = self.executor.on_recorded
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

    def startService(self) -> None:
        if self._threads is not None:
            self._threads.start()
        super().startService()
        started = Deferred.fromCoroutine(self._start())
        started.addErrback(self._start_failed)

    async def _start(self) -> None:
        version = await self.database.transaction(ensure_schema)
        log.info("database ready, schema {version}", version=version)
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
            port = await endpoint.listen(factory)
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
        self.ready.callback(None)

    def _start_failed(self, failure: Any) -> None:
        log.failure("udsgateway could not start", failure)
        self.ready.errback(failure)
        if IReactorCore.providedBy(self._reactor) and self._reactor.running:
            self._reactor.stop()

    async def _import_flow_files(self, tenant: TenantConfig) -> None:
        now = self._wall()
        for path in tenant.flow_files:
            app = read_app_file(path)
            if app.tenant != tenant.name:
                raise ValueError(f"{path}: tenant {app.tenant!r} is not {tenant.name!r}")
            problems = template_problems(path, app)
            if problems:
                # The same checks as `udsgateway flows import`: a broken template
                # stops the start, it is not found later on live traffic.
                raise FlowFileError(problems)
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
        for loop in (self._reload, self._retention):
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

    def _save_ack(self, message_id: int, code: str, ack: bytes) -> Deferred[None]:
        return self.database.transaction(store.update_ack, message_id, code, ack)

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
