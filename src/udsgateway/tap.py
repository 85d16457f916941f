"""``twistd udsgateway``: command-line options and the one place the object graph is built.

This is the only module that touches the global reactor.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from twisted.application.service import IService
from twisted.python import usage

from udsgateway.ack import ControlIdSource
from udsgateway.config import ConfigError, load_config
from udsgateway.db import Database, ThreadRunner, make_engine

if TYPE_CHECKING:
    from udsgateway.service import GatewayService


class Options(usage.Options):
    """Options of ``twistd udsgateway``."""

    synopsis = "[--config FILE]"
    optParameters = [
        ["config", "c", "etc/udsgateway.toml", "The gateway's TOML configuration file."],
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

    runner = ThreadRunner(reactor)  # type: ignore[arg-type]
    runner.start()
    database = Database(make_engine(config.database), runner)
    control_ids = ControlIdSource.for_boot(time.time())
    service = GatewayService(config, reactor, database, control_ids, on_runner_stop=runner.stop)
    _install_crash_points(service)
    if config.manhole.enabled:
        manhole_service(config.manhole, service, reactor).setServiceParent(service)
    return service


#: Environment variable naming a point where the process kills itself with
#: SIGKILL. For the crash tests (tests/integration) only: it lets them prove
#: G1 and G3 at the exact moments of RELIABILITY.md's "Faults" table.
CRASH_AT_VARIABLE = "UDSGATEWAY_TEST_CRASH_AT"


def _install_crash_points(service: GatewayService) -> None:
    point = os.environ.get(CRASH_AT_VARIABLE, "")
    if not point:
        return

    def crash() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "before_commit":
        service.committer.before_batch = crash
    elif point == "after_commit":
        for ingest in service.ingests.values():
            ingest.after_commit = crash
    else:
        raise SystemExit(f"{CRASH_AT_VARIABLE}: unknown crash point {point!r}")
