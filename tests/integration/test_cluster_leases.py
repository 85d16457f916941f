"""Bucket leases across real processes: three lease nodes on a throwaway PostgreSQL.

Each node (``tests/integration/lease_node.py``) runs the LeaseManager and the
NOTIFY listener as a gateway node will: the real reactor on the monotonic
clock, the database thread, the shared advisory lock. With a lease time of
6 s (a round every 2 s) the test shows, against the database's lease table:

* three nodes share the 16 buckets evenly (6, 5, 5);
* SIGTERM: the node hands its buckets over and another takes them within a
  second, quicker than a round: the NOTIFY woke it;
* SIGSTOP longer than the lease: the other node takes the paused node's
  buckets after they expired; once resumed, the paused node's first word is
  that it lost them (it uses none after resuming);
* kill -9: the last node takes every bucket once the leases expired, within
  the lease time plus a round;
* a single gateway started on the database while a node runs is refused;
* the lease history shows no bucket with two owners at once, ever.

The measured times are printed (trial's test.log).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from sqlalchemy import create_engine
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import REPO, LoggedProcess, new_directory
from tests.integration.postgres import new_database
from udsgateway.store import leases as store
from udsgateway.store.engine import AdvisoryLock, DatabaseInUseError

LEASE = 6.0
BUCKETS = 16
DEADLINE = 30.0


class LeaseNodesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.url = new_database(self)
        self.directory = new_directory(self)
        self.engine = create_engine(self.url)
        self.addCleanup(self.engine.dispose)
        self.nodes: dict[str, LoggedProcess] = {}

    def start(self, name: str) -> LoggedProcess:
        node = LoggedProcess(self.directory / f"{name}.log")
        self.addCleanup(node.stop)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        argv = [sys.executable, "-m", "tests.integration.lease_node", self.url, name, str(LEASE)]
        node.spawn(argv, REPO, env)
        self.nodes[name] = node
        return node

    def held(self) -> dict[str, set[int]]:
        """Valid leases per owner, on the database clock."""
        with self.engine.begin() as connection:
            status = store.cluster_status(connection)
        return {} if status is None else status.holders()

    def wait_for(self, done: object, what: str) -> float:
        """Poll ``done(held)`` until true; the seconds it took."""
        started = time.monotonic()
        while True:
            held = self.held()
            if done(held):  # type: ignore[operator]
                return time.monotonic() - started
            if time.monotonic() - started > DEADLINE:
                logs = "\n".join(f"{n}:\n{p.log_text()}" for n, p in self.nodes.items())
                raise AssertionError(f"{what}: not within {DEADLINE} s: {held}\n{logs}")
            time.sleep(0.02)

    def test_three_nodes(self) -> None:
        for name in ("n1", "n2", "n3"):
            self.start(name)
        self.wait_for(
            lambda held: sorted(len(held.get(n, ())) for n in ("n1", "n2", "n3")) == [5, 5, 6],
            "an even share over three nodes",
        )

        # A single gateway is refused beside the nodes (their shared advisory lock).
        with self.assertRaises(DatabaseInUseError) as refused:
            AdvisoryLock.acquire(self.engine, time.time())
        self.assertIn("the nodes of a cluster", str(refused.exception))

        # SIGTERM: an immediate hand-over, woken by NOTIFY (quicker than a round, 2 s).
        self.nodes["n1"].stop(signal.SIGTERM)
        self.assertEqual(self.nodes["n1"].started().returncode, 0, self.nodes["n1"].log_text())
        handover = self.wait_for(
            lambda held: "n1" not in held and sum(map(len, held.values())) == BUCKETS,
            "n1's buckets taken over after its clean stop",
        )
        self.assertLess(handover, 1.0)

        # SIGSTOP n3 for longer than its lease: n2 takes its buckets once they expired.
        self.wait_for(lambda held: len(held.get("n3", ())) == 8, "8 buckets each")
        n3 = self.nodes["n3"].started()
        n3.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        takeover = self.wait_for(
            lambda held: len(held.get("n2", ())) == BUCKETS, "n3's buckets taken by n2"
        )
        self.assertGreater(takeover, LEASE - LEASE / 3 - 0.5)  # not before they expired
        before = self.nodes["n3"].log_text()
        n3.send_signal(signal.SIGCONT)
        self.wait_for(
            lambda _held: self.nodes["n3"].log_text() != before, "n3 reporting after SIGCONT"
        )
        after = self.nodes["n3"].log_text()[len(before) :].splitlines()
        self.assertTrue(after[0].startswith("lost "), after)
        resumed_at = float(after[0].rsplit(" at ", 1)[1])
        self.assertGreater(resumed_at, paused)

        # kill -9 n2: n3 (back) takes everything once n2's leases expired.
        self.wait_for(lambda held: len(held.get("n3", ())) == 8, "8 buckets each again")
        self.nodes["n2"].stop(signal.SIGKILL)
        failover = self.wait_for(
            lambda held: len(held.get("n3", ())) == BUCKETS, "n2's buckets taken by n3"
        )
        self.assertLess(failover, LEASE + LEASE / 3 + 1.0)

        with self.engine.begin() as connection:
            history = store.lease_history(connection)
        self.assertEqual(store.overlaps(history), [])
        epochs = {lease.bucket: lease.epoch for lease in history}
        self.assertTrue(all(epoch >= 2 for epoch in epochs.values()))
        print(
            f"lease {LEASE}s: clean hand-over {handover:.2f}s, takeover of a paused node "
            f"{takeover:.2f}s after SIGSTOP, of a killed node {failover:.2f}s after kill -9; "
            f"{len(history)} leases, no overlap"
        )
