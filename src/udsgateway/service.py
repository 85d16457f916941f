"""GatewayService: owns the start and stop order of everything in the process.

Start: open the database (schema, migrations), import the configured flow
files, recover unfinished work, load routing, and only then open one
listener per tenant. Stop: close the listeners first, let in-flight commits
finish, then stop the database thread.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from udsgateway.assembly import NO_FAULTS, Faults, assemble, tenant_charset
from udsgateway.clock import Wall, wall_of
from udsgateway.cluster.fence import BucketFence
from udsgateway.cluster.leases import LeaseManager
from udsgateway.cluster.notify import NotifyListener
from udsgateway.cluster.singleton import RETENTION, Singletons
from udsgateway.config import GatewayConfig, TenantConfig
from udsgateway.flows import FlowFileError, read_app_file
from udsgateway.flowstore import load_apps, save_app
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.inbound.listening import ListenerService
from udsgateway.inbound.searchkeys import KeyWriter
from udsgateway.interfaces import FencedError
from udsgateway.mapping.checks import template_problems
from udsgateway.store import apps as store_apps
from udsgateway.store import meta
from udsgateway.store.engine import (
    AdvisoryLock,
    Database,
    FileIdentity,
    FileLock,
    SchemaError,
    ensure_schema,
)
from udsgateway.store.leases import WORK_CHANNEL, ensure_cluster_schema, parse_work
from udsgateway.store.retention import prune

log = Logger()


class StartError(Exception):
    """The gateway cannot start for a reason the operator can fix (a flow file, a
    port in use): logged as one line, without a traceback."""


class Threads(Protocol):
    """The database thread (``ThreadRunner``): started at start, stopped last."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class GatewayService(MultiService):
    """The whole gateway process, as a tree of services.

    Its objects come from the composition root (``udsgateway.assembly``). Its
    children: one ``ListenerService`` per tenant, added once recovery finished,
    and whatever is added before start with ``setServiceParent`` (the manhole;
    any other service: it starts with the gateway, and stops after the
    listeners, the executor and the dispatcher, before the database thread).
    """

    def __init__(
        self,
        config: GatewayConfig,
        reactor: Any,
        database: Database,
        control_ids: ControlIdSource,
        threads: Threads | None = None,
        wall: Wall | None = None,
        identity: FileIdentity | None = None,
        lock: FileLock | AdvisoryLock | None = None,
        faults: Faults = NO_FAULTS,
        lease_database: Database | None = None,
        lease_threads: Threads | None = None,
        checkpoints: Threads | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._control_ids = control_ids
        self._reactor = reactor
        #: A cluster node's lease manager and fence (``[cluster].enabled``); None for
        #: a gateway alone on its database.
        self.leases: LeaseManager | None = None
        self.fence: BucketFence | None = None
        self._notify: NotifyListener | None = None
        # A node's lease rounds run on their own database thread and connection when
        # given (tap.py): a data path busy with commits or a lock wait never delays a
        # renewal into a lapse.
        self._lease_threads = lease_threads
        # A SQLite store's WAL is checkpointed on a thread of its own (store.engine's
        # Checkpointer), not inside the commit that happens to fill it.
        self._checkpoints = checkpoints
        if config.cluster.enabled:
            self.leases = LeaseManager(
                lease_database if lease_database is not None else database,
                reactor,
                config.node_name,
                lease_time=config.cluster.lease_time,
            )
            self.fence = BucketFence(self.leases)
        # Timers run on the reactor's clock (monotonic under twistd, see tap.py);
        # timestamps on the wall clock.
        self._wall = wall_of(reactor, wall)
        self.database = database
        # Started in startService, after twistd has forked into the background:
        # threads do not survive a fork.
        self._threads = threads
        # The object graph, built by the composition root (as every test harness
        # builds it): ingest per tenant, the executor, the dispatcher.
        #: Writes the search keys of stored messages after their ACK, in batches.
        self.key_writer = KeyWriter(
            database,
            reactor,
            node=config.node_name,
            charsets={tenant.name: tenant_charset(tenant) for tenant in config.tenants},
        )
        self.assembly = assemble(
            config.tenants,
            database,
            reactor,
            control_ids,
            key_writer=self.key_writer,
            delivery=config.delivery,
            commit_max_batch=config.commit_max_batch,
            wall=wall,
            faults=faults,
            guard=identity.ensure if identity is not None else None,
            on_damaged=self._database_damaged if identity is not None else None,
            fence=self.fence,
        )
        self.committer = self.assembly.committer
        self.dispatcher = self.assembly.dispatcher
        self.executor = self.assembly.executor
        self.ingests = self.assembly.ingests
        self.factories = self.assembly.factories
        #: One child service per tenant, added once recovery finished.
        self.listeners: dict[str, ListenerService] = {}
        self._generation = -1
        self._reload = LoopingCall(self._reload_flows)
        self._reload.clock = reactor
        self._retention = LoopingCall(self._prune)
        self._retention.clock = reactor
        self.pruned = 0
        #: The database-wide jobs this node may run (``cluster.singleton``): retention
        #: here, the gauges in the admin service. Empty on a single gateway.
        self.singletons = Singletons(self.leases)
        self.ready: Deferred[None] = Deferred()
        # The database file's identity, checked on a timer and before each group
        # commit (a database file deleted or replaced while running).
        self._identity = identity
        self._lock = lock
        self._identity_check = LoopingCall(self._check_database)
        self._identity_check.clock = reactor
        #: Why the database cannot be trusted any more (None: it can). Once set, every
        #: new message gets a NAK 207 until the gateway is restarted.
        self.database_damage: str | None = None
        self._listening = False
        #: Stopping: announcements and gained buckets start nothing any more.
        self._stopping = False

    def startService(self) -> None:
        if self._threads is not None:
            self._threads.start()
        if self._lease_threads is not None:
            self._lease_threads.start()
        if self._checkpoints is not None:
            self._checkpoints.start()
        super().startService()
        started = Deferred.fromCoroutine(self._start())
        started.addErrback(self._start_failed)

    async def _start(self) -> None:
        version = await self.database.transaction(ensure_schema)
        log.info("database ready, schema {version}", version=version)
        if self.leases is not None:
            # Nodes share the database and may start in the same second: each start
            # draws its own number, so no two nodes issue the same control ids.
            boot = await self.database.transaction(meta.next_boot)
            self._control_ids.renumber(self._wall(), boot)
        if isinstance(self._lock, FileLock):
            # After twistd's fork the holder is this process, not the one that took it.
            await self.database.runner.run(self._lock.rewrite, self._wall())
        if self._identity is not None:
            await self.database.runner.run(self._identity.watch)
            self._identity_check.start(self.config.database_check_interval, now=False)
        for tenant in self.config.tenants:
            await self._import_flow_files(tenant)
        await self._reload_flows()
        if self.leases is not None:
            await self._join_cluster(self.leases)
        # Recovery before any listener opens: the search keys a crash left unwritten,
        # then unfinished executions and queued deliveries resume, in their original
        # order, ahead of new traffic.
        await self.key_writer.catch_up()
        self.key_writer.start()
        await self.dispatcher.recover()
        self.executor.wake()
        self.executor.poll(self.config.delivery.held_poll)
        for tenant in self.config.tenants:
            listener = ListenerService(tenant, self.factories[tenant.name], self._reactor)
            self.listeners[tenant.name] = listener
            listener.setServiceParent(self)
            try:
                await listener.listening
            except CannotListenError as error:
                # "Couldn't listen on 127.0.0.1:2575: [Errno 98] Address already in use."
                raise StartError(f"tenant {tenant.name}: {error}") from None
        self._reload.start(self.config.flow_reload_interval, now=False).addErrback(
            lambda f: log.failure("flow reload loop stopped", f)
        )
        self._retention.start(self.config.retention.interval, now=False).addErrback(
            lambda f: log.failure("retention loop stopped", f)
        )
        self._listening = True
        self.ready.callback(None)

    async def _join_cluster(self, leases: LeaseManager) -> None:
        """Cluster mode: the cluster tables, the NOTIFY listener (lease announcements
        and new work), then the lease manager's first round, before recovery."""
        buckets = await self.database.transaction(
            ensure_cluster_schema, self.config.cluster.buckets
        )
        dispatcher, executor = self.dispatcher, self.executor

        def gained(_gained: object) -> None:
            if not self._stopping:
                dispatcher.fence_changed()
                executor.wake()

        leases.on_gained = gained
        leases.on_lost = lambda _lost: dispatcher.fence_changed()
        self._notify = NotifyListener(
            self.database.engine,
            self._reactor,
            leases.poke,
            others={WORK_CHANNEL: self._work_announced},
        )
        self._notify.start()
        leases.startService()
        await leases.first_round
        if leases.refused is not None:
            raise StartError(leases.refused)
        log.info(
            "cluster node {node}: {held} of {buckets} buckets, {nodes} live nodes",
            node=leases.node,
            held=len(leases.owned),
            buckets=buckets,
            nodes=len(leases.nodes),
        )

    def _work_announced(self, payload: str) -> None:
        """A node committed new work (NOTIFY): run what is this node's at once."""
        if self._stopping:
            return
        work = parse_work(payload)
        self.dispatcher.work_announced(work.lanes, work.all)
        self.executor.work_announced(work.steps, work.all)
        if work.finished or work.all:
            self.executor.finished_announced(work.finished, work.all)

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
            saved = await self.database.transaction(save_app, app, now)
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

    def reload_flows(self) -> Deferred[None]:
        """Load the flows now if they changed (after the admin API or the console
        saved one), instead of at the next ``flow_reload_interval``."""
        return Deferred.fromCoroutine(self._reload_flows())

    async def _reload_flows(self) -> None:
        """Reload routing when flows changed (flows import from the CLI, another node)."""
        try:
            generation = await self.database.transaction(store_apps.flows_generation)
            if generation == self._generation:
                return
            apps = await self.database.transaction(load_apps, None)
        except Exception:
            log.failure("could not reload flows; routing unchanged")
            return
        self.assembly.load(apps)
        self._generation = generation
        log.info("routing loaded, flows generation {generation}", generation=generation)
        if self.leases is not None and self._listening:
            # A flow another node saved: its executions waited for this node to know it.
            self.executor.wake()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _prune(self) -> None:
        """Delete what retention says is old, in small batches, yielding between them.

        On a cluster node only while it holds the retention singleton's lease
        (``cluster.singleton``): checked before each batch on the monotonic
        clock, and inside each batch's transaction (a batch after a takeover is
        rolled back and the pass ends)."""
        retention = self.config.retention
        before = self._wall() - retention.days * 86400
        singleton = self.singletons.get(RETENTION)
        try:
            while self.running:
                if singleton is None:
                    count = await self.database.transaction(prune, before, retention.batch)
                else:
                    token = singleton.token()
                    if token is None:
                        break  # another node's job (or no longer this one's)
                    count = await self.database.transaction(
                        singleton.fenced(prune), token, before, retention.batch
                    )
                self.pruned += count
                if count < retention.batch:
                    break
        except FencedError:
            log.info("retention moved to another node during a pass; this node stopped it")
        except Exception:
            log.failure("retention pass failed; it runs again at the next interval")

    async def _stop(self) -> None:
        self._stopping = True
        for loop in (self._reload, self._retention, self._identity_check):
            if loop.running:
                loop.stop()
        # Listeners first (no new connection), then the executor's polling and the
        # dispatcher, then the other children, and the database thread last.
        for listener in reversed(list(self.listeners.values())):
            if listener.parent is self:
                await _maybe(self.removeService(listener))
        self.listeners.clear()
        try:
            await self.key_writer.stop()
        except Exception:
            log.failure("search keys not written at stop; the next start catches up")
        self.executor.stop_polling()
        await self.dispatcher.stopService()
        if self.leases is not None and self.leases.running:
            # Nothing is sent any more: hand every bucket over at once (NOTIFY).
            await self.leases.stopService()
        if self._notify is not None:
            await deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), self._notify.stop
            )
            self._notify = None
        await _maybe(super().stopService())
        if self._checkpoints is not None:
            self._checkpoints.stop()
        if self._lease_threads is not None:
            self._lease_threads.stop()
        if self._threads is not None:
            self._threads.stop()
        if self._identity is not None:
            self._identity.close()

    def stats(self) -> dict[str, Any]:
        """A snapshot of every listener's counters, for the manhole and admin API."""
        return {
            name: {
                "listener": factory.stats,
                "ingest": self.ingests[name].stats,
                "port": _address(self.listeners.get(name)),
            }
            for name, factory in self.factories.items()
        }


def _address(listener: ListenerService | None) -> str | None:
    address = listener.address if listener is not None else None
    return str(address) if address is not None else None


async def _maybe(result: Deferred[None] | None) -> None:
    """Await what Service.stopService returned: a Deferred, or None."""
    if result is not None:
        await result
