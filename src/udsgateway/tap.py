"""``twistd udsgateway``: command-line options and the one place the object graph is built.

This is the only module that touches the global reactor.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from udsgateway.clock import monotonic_timers
from udsgateway.config import ConfigError, load_config
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.store.engine import (
    Checkpointer,
    Database,
    DatabaseInUseError,
    FileIdentity,
    ThreadRunner,
    damage_before_open,
    dead_peer_settings,
    lock_database,
    make_engine,
    quick_check,
    sqlite_path,
)

if TYPE_CHECKING:
    from udsgateway.assembly import Faults

log = Logger()


#: Seconds between GIL hand-offs (CPython's default is 0.005).
GIL_SWITCH_INTERVAL = 0.0005


class Options(usage.Options):
    """Options of ``twistd udsgateway``."""

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", "etc/udsgateway.toml", "The gateway's TOML configuration file."],
    ]
    optFlags = [
        [
            "accept-damaged-database",
            None,
            "Start on a database that fails the integrity checks at start, "
            "accepting the loss they report.",
        ],
    ]


def makeService(options: Options) -> IService:
    """Build the GatewayService from the configuration file named by the options."""
    from twisted.internet import reactor

    from udsgateway.manhole import manhole_service
    from udsgateway.service import GatewayService

    try:
        config = load_config(options["config"])
    except ConfigError as error:
        sys.stderr.write("udsgateway: invalid configuration:\n")
        for problem in error.problems:
            sys.stderr.write(f"  {problem}\n")
        raise SystemExit(2) from None

    # The reactor and the database thread hand work to each other for every
    # group commit; with CPython's default 5 ms GIL switch interval a waiting
    # thread can sit idle for that long. 0.5 ms keeps the hand-offs prompt.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # Timeouts, backoff and periodic jobs on the monotonic clock (docs/guarantees.md:
    # the wall clock jumps); timestamps on the wall clock, passed as `wall`.
    monotonic_timers(reactor)
    # A node of a cluster bounds how long a dead or frozen peer can hold it up
    # (lock waits, sessions left in a transaction, connections gone silent).
    path = sqlite_path(config.database)
    engine = make_engine(
        config.database,
        dead_peer_settings(config.cluster.lease_time) if config.cluster.enabled else None,
        background_checkpoints=path is not None,
    )
    # Before anything reads the database: the lock (one gateway per database),
    # then the integrity checks, all before twistd forks and before the reactor runs.
    try:
        lock = lock_database(config.database, engine, time.time(), shared=config.cluster.enabled)
    except DatabaseInUseError as error:
        sys.stderr.write(f"udsgateway: not started: {error}\n")
        raise SystemExit(2) from None
    _check_integrity(config.database, engine, bool(options.get("accept-damaged-database")))
    runner = ThreadRunner(reactor)  # type: ignore[arg-type]
    database = Database(engine, runner)
    control_ids = ControlIdSource.for_boot(time.time())
    # A cluster node renews its leases on a thread and connection of their own.
    lease_runner = None
    if config.cluster.enabled:
        lease_runner = ThreadRunner(reactor, name="udsgateway-leases")  # type: ignore[arg-type]
    service = GatewayService(
        config,
        reactor,
        database,
        control_ids,
        threads=runner,
        lease_database=Database(engine, lease_runner) if lease_runner is not None else None,
        lease_threads=lease_runner,
        checkpoints=Checkpointer(path) if path is not None else None,
        wall=time.time,
        identity=FileIdentity(path) if path is not None else None,
        lock=lock,
        faults=_crash_points(),
    )
    service.ready.addCallbacks(
        freeze_heap, _exit_status_after_failed_start, errbackArgs=(reactor,)
    )
    if config.manhole.enabled:
        manhole_service(config.manhole, service, reactor).setServiceParent(service)
    if config.admin.enabled:
        from udsgateway.admin.service import admin_service

        admin_service(config.admin, service, reactor).setServiceParent(service)
    return service


def _check_integrity(url: str, engine: Any, accept_damage: bool) -> None:
    """Refuse to start (exit 2) on a SQLite database that fails its integrity checks.

    The WAL is read before SQLite opens the database: opening it replays only
    the frames before a bad checksum, and the next checkpoint erases the rest.
    """
    if sqlite_path(url) is None:
        return
    problems = damage_before_open(url)
    if not problems or accept_damage:
        try:
            with engine.connect() as connection:
                problems += quick_check(connection)
        except SQLAlchemyError as error:
            problems.append(f"the database cannot be read: {getattr(error, 'orig', error)}")
        finally:
            engine.dispose()  # no connection crosses twistd's fork
    if not problems:
        return
    if accept_damage:
        for problem in problems:
            log.critical(
                "started on a damaged database (--accept-damaged-database): {problem}",
                problem=problem,
            )
        return
    sys.stderr.write("udsgateway: not started: the database cannot be trusted:\n")
    for problem in problems:
        sys.stderr.write(f"  {problem}\n")
    sys.stderr.write(
        "  Restore it from a backup, or start with --accept-damaged-database to run on "
        "what SQLite can read (what is listed above is then lost for good).\n"
    )
    raise SystemExit(2)


def freeze_heap(_ready: object = None) -> None:
    """Once started: collect, then leave every object alive now out of later collections.

    What the start built (modules, flows, templates, the schema, Twisted, SQLAlchemy:
    hundreds of thousands of objects) lives as long as the process. CPython's full
    collection walks every tracked object while it holds the GIL, so each one stopped
    the reactor and the database thread for 30 to 50 ms under load (the delivery path
    allocates enough to start one every few seconds): that was the ACK latency's
    maximum. ``gc.freeze`` moves these objects to a permanent generation that
    collections skip; they were going to live anyway.
    """
    gc.collect()
    gc.freeze()
    log.info(
        "start-up objects left out of garbage collection: {count}", count=gc.get_freeze_count()
    )


#: twistd's exit status when the gateway could not start (the reason is logged).
FAILED_START_STATUS = 1


def _exit_status_after_failed_start(_failure: object, reactor: Any) -> None:
    """Make a failed start visible to whoever runs twistd: a non-zero exit status.

    GatewayService logs why it could not start and stops the reactor; twistd
    then exits 0, as after a clean stop, which hides the failure from a
    supervisor or ``make run``. So exit with FAILED_START_STATUS once the
    shutdown (service stop, database thread stop) has run.
    """

    def exit_now() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(FAILED_START_STATUS)

    reactor.addSystemEventTrigger("after", "shutdown", exit_now)


#: Environment variable naming a point where the process kills itself with
#: SIGKILL. For the crash tests (tests/integration) only: it lets them prove
#: G1 and G3 at the exact moments of docs/guarantees.md's "Faults" table.
#: ``POINT`` crashes the first time the point is reached, ``POINT:N`` the Nth:
#:
#: * ``before_commit``: a group of inbound messages is about to be committed;
#: * ``after_commit``: an inbound message is committed, not yet answered;
#: * ``after_enqueue``: an action's delivery is committed (its execution is
#:   waiting), not yet handed to its lane;
#: * ``after_send``: a destination answered a delivery, its outcome not yet
#:   recorded (so it is sent again after the restart).
CRASH_AT_VARIABLE = "UDSGATEWAY_TEST_CRASH_AT"


def _crash_points() -> Faults:
    """The fault-injection points named by ``CRASH_AT_VARIABLE`` (none: no faults)."""
    from udsgateway.assembly import Faults

    value = os.environ.get(CRASH_AT_VARIABLE, "")
    if not value:
        return Faults()
    point, _, nth = value.partition(":")
    if not (nth or "1").isdigit() or int(nth or "1") < 1:
        raise SystemExit(f"{CRASH_AT_VARIABLE}: {value!r}: expected POINT or POINT:N (N >= 1)")
    if point not in ("before_commit", "after_commit", "after_enqueue", "after_send"):
        raise SystemExit(f"{CRASH_AT_VARIABLE}: unknown crash point {point!r}")
    reached = [0]

    def crash() -> None:
        reached[0] += 1
        if reached[0] >= int(nth or "1"):
            os.kill(os.getpid(), signal.SIGKILL)

    return Faults(**{point: crash})
