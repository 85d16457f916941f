"""A process that only holds bucket leases, for the cluster integration test.

``python -m tests.integration.lease_node URL NAME LEASE_TIME`` runs a
LeaseManager and a NotifyListener the way a gateway node will (the real
reactor on the monotonic clock, the database thread, the shared advisory
lock), and prints one line per change on standard output::

    ready
    gained 0,1,2 at 1234.5
    lost 3,4 at 1240.1

(times on the monotonic clock). SIGTERM stops it cleanly: the buckets are
handed over before it exits.
"""

from __future__ import annotations

import sys
import time


def main(url: str, name: str, lease_time: float) -> None:
    from twisted.internet import reactor

    from udsgateway.clock import monotonic_timers
    from udsgateway.cluster.leases import LeaseManager, ranges
    from udsgateway.cluster.notify import NotifyListener
    from udsgateway.store.engine import AdvisoryLock, Database, ThreadRunner, make_engine
    from udsgateway.store.leases import ensure_cluster_schema

    monotonic_timers(reactor)
    engine = make_engine(url)
    lock = AdvisoryLock.acquire(engine, time.time(), shared=True)
    runner = ThreadRunner(reactor)  # type: ignore[arg-type]
    runner.start()
    database = Database(engine, runner)
    database.transaction_now(ensure_cluster_schema, 16)
    manager = LeaseManager(database, reactor, name, lease_time)

    def say(text: str) -> None:
        sys.stdout.write(f"{text} at {time.monotonic():.3f}\n")
        sys.stdout.flush()

    manager.on_gained = lambda gained: say(f"gained {ranges(sorted(gained))}")
    manager.on_lost = lambda lost: say(f"lost {ranges(sorted(lost))}")
    listener = NotifyListener(engine, reactor, manager.poke)  # type: ignore[arg-type]
    listener.start()
    manager.startService()
    reactor.addSystemEventTrigger("before", "shutdown", manager.stopService)
    reactor.addSystemEventTrigger("after", "shutdown", listener.stop)
    reactor.addSystemEventTrigger("after", "shutdown", runner.stop)
    reactor.addSystemEventTrigger("after", "shutdown", lock.release)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
