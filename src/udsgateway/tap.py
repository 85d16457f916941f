"""``twistd udsgateway``: command-line options and the one place the object graph is built.

This is the only module that touches the global reactor.
"""

from __future__ import annotations

import sys
import time

from twisted.application.service import IService
from twisted.python import usage

from udsgateway.ack import ControlIdSource
from udsgateway.config import ConfigError, load_config
from udsgateway.db import Database, ThreadRunner, make_engine


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

    runner = ThreadRunner(reactor)
    runner.start()
    database = Database(make_engine(config.database), runner)
    control_ids = ControlIdSource.for_boot(time.time())
    service = GatewayService(config, reactor, database, control_ids, on_runner_stop=runner.stop)
    if config.manhole.enabled:
        manhole_service(config.manhole, service, reactor).setServiceParent(service)
    return service

