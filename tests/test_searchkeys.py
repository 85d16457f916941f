"""Search keys written after the ACK, in batches; caught up at start after a crash."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.config import GatewayConfig, TenantConfig
from udsgateway.hl7.ack import ControlIdSource
from udsgateway.inbound.searchkeys import KeyWriter
from udsgateway.service import GatewayService
from udsgateway.store import meta, search
from udsgateway.store.engine import Database
from udsgateway.testing import ManualRunner, hl7_message, memory_database, mllp

TENANT = TenantConfig(name="north", listen="tcp:port=2575:interface=127.0.0.1")
CONFIG = GatewayConfig(path="test.toml", database="sqlite:///:memory:", tenants=(TENANT,))


def pid3(database: Database, value: str) -> list[str]:
    """Control IDs of the messages a search by PID-3 finds."""
    found = database.transaction_now(
        search.search, search.Query(keys=(("pid3", value),), limit=100)
    )
    return [row.control_id for row in found]


def key_rows(database: Database) -> int:
    return int(
        database.transaction_now(
            lambda c: c.exec_driver_sql("SELECT count(*) FROM message_keys").scalar()
        )
    )


class KeyWriterTests(SynchronousTestCase):
    def start(self, database: Database) -> tuple[GatewayService, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        service = GatewayService(
            CONFIG, reactor, database, ControlIdSource("T"), wall=lambda: 1_700_000_000.0
        )
        service.startService()
        self.successResultOf(service.ready)
        return service, reactor

    def send(self, service: GatewayService, reactor: MemoryReactorClock, *ids: str) -> bytes:
        protocol = service.factories["north"].buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        for control_id in ids:
            message = hl7_message(control_id, segments=[f"PID|1||MRN-{control_id}^^^H||Doe^Jo"])
            protocol.dataReceived(mllp(message))
            reactor.advance(0)  # the group commit starts at the end of the turn
        return transport.value()

    def test_keys_are_written_within_the_interval_after_the_ack(self) -> None:
        database = memory_database()
        service, reactor = self.start(database)
        self.addCleanup(service.stopService)
        acks = self.send(service, reactor, "K1", "K2")
        self.assertEqual(acks.count(b"MSA|"), 2, "both answered")
        # Answered, stored, not yet searchable by its keys: the commit did not write them.
        self.assertEqual(database.transaction_now(search.last_message_id), 2)
        self.assertEqual(key_rows(database), 0)
        self.assertEqual(service.key_writer.waiting, 2)
        reactor.advance(1.0)
        self.assertEqual(pid3(database, "MRN-K1"), ["K1"])
        self.assertEqual(pid3(database, "MRN-K2"), ["K2"])
        self.assertEqual(service.key_writer.waiting, 0)
        self.assertEqual(database.transaction_now(meta.keys_through, "node1"), 2)

    def test_a_full_batch_is_written_at_once(self) -> None:
        database = memory_database()
        service, reactor = self.start(database)
        self.addCleanup(service.stopService)
        service.key_writer.batch = 3
        self.send(service, reactor, "B1", "B2")
        self.assertEqual(pid3(database, "MRN-B1"), [])
        self.send(service, reactor, "B3")
        self.assertEqual(pid3(database, "MRN-B1"), ["B1"])
        self.assertEqual(pid3(database, "MRN-B3"), ["B3"])

    def test_stop_writes_what_waits(self) -> None:
        database = memory_database()
        service, reactor = self.start(database)
        self.send(service, reactor, "S1")
        self.assertEqual(pid3(database, "MRN-S1"), [])
        self.successResultOf(service.stopService())
        self.assertEqual(pid3(database, "MRN-S1"), ["S1"])

    def test_a_flush_writes_in_slices_between_other_work(self) -> None:
        """A second's worth of keys goes in transactions of ``slice`` messages, one
        after the other, each queued behind the work queued meanwhile (an inbound
        commit waits for one slice, not for all of them)."""
        database = memory_database()
        runner = ManualRunner()
        queued = Database(database.engine, runner)
        writer = KeyWriter(queued, MemoryReactorClock(), slice=2)
        for number in range(1, 6):
            writer.stored(number, (("pid3", f"MRN-{number}"),))
        flushed = writer.flush()
        self.assertIs(writer.flush(), flushed, "one flush at a time")
        self.assertEqual(len(runner.calls), 1)
        runner.run(lambda: "an inbound commit")  # queued while the first slice runs
        order: list[str] = []
        while runner.calls:
            _function, args, _done = runner.calls[0]
            order.append("keys" if args else "other")  # transaction_now(_write, ...)
            runner.run_next()
        self.assertEqual(order, ["keys", "other", "keys", "keys"])
        self.successResultOf(flushed)
        self.assertEqual((writer.written, writer.waiting), (5, 0))
        self.assertEqual(key_rows(database), 5)
        self.assertEqual(database.transaction_now(meta.keys_through, "node1"), 5)

    def test_a_failed_slice_keeps_its_keys_and_the_rest(self) -> None:
        database = memory_database()
        runner = ManualRunner()
        writer = KeyWriter(Database(database.engine, runner), MemoryReactorClock(), slice=2)
        for number in range(1, 6):
            writer.stored(number, (("pid3", f"MRN-{number}"),))
        flushed = writer.flush()
        runner.run_next()  # slice 1 written
        runner.fail_next(RuntimeError("database refused"))  # slice 2 fails
        self.successResultOf(flushed)
        self.assertEqual((writer.written, writer.waiting), (2, 3))
        self.assertEqual(runner.calls, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(writer._ids, [3, 4, 5], "kept in order for the next tick")

    def test_a_crash_loses_nothing_the_next_start_catches_up(self) -> None:
        """The keys waiting at a crash are written at the next start, from the stored
        messages (PID-3 read again from the raw bytes), before it listens."""
        database = memory_database()
        crashed, reactor = self.start(database)
        reactor.advance(1.0)  # the first start sets the node's mark
        self.send(crashed, reactor, "C1", "C2")
        self.assertEqual(crashed.key_writer.waiting, 2)
        # The process dies: no stop, the waiting keys are gone with it.
        crashed.key_writer._ids.clear()
        crashed.key_writer._keys.clear()
        self.assertEqual(pid3(database, "MRN-C1"), [])
        restarted, _reactor = self.start(database)
        self.addCleanup(restarted.stopService)
        self.assertEqual(restarted.key_writer.caught_up, 2)
        self.assertEqual(pid3(database, "MRN-C1"), ["C1"])
        self.assertEqual(pid3(database, "MRN-C2"), ["C2"])
        found = database.transaction_now(
            search.search, search.Query(message_type="ADT^A04", tenant="north")
        )
        self.assertEqual([row.control_id for row in found], ["C2", "C1"])

    def test_the_key_statements_are_compiled_before_listening(self) -> None:
        """The catch-up at start compiles every chunk size of the keys' INSERT, so
        the first batches after the listeners open wait for no compile."""
        database = memory_database()
        prepared = search._INSERT_KEYS._multi
        prepared.clear()
        self.successResultOf(_run(KeyWriter(database, MemoryReactorClock()).catch_up()))
        self.assertEqual(sorted(prepared), [1, 2, 4, 8, 16, 32, 64, 128, 256])

    def test_an_older_store_is_not_scanned(self) -> None:
        """A store whose messages got their keys in the commit (before this version)
        has no mark: the first start sets it to the newest message, reading nothing."""
        database = memory_database()
        writer = KeyWriter(database, MemoryReactorClock())
        self.assertEqual(self.successResultOf(_run(writer.catch_up())), 0)
        self.assertEqual(database.transaction_now(meta.keys_through, "node1"), 0)

    def test_catch_up_leaves_existing_keys_alone(self) -> None:
        """Keys written already (another node's batch) are no conflict."""
        database = memory_database()
        service, reactor = self.start(database)
        self.send(service, reactor, "D1")
        self.successResultOf(service.stopService())
        written = key_rows(database)
        # msh9, tenant, pid3 and, for this message rejected (no flows), status and MSH-10.
        self.assertEqual(written, 5)
        database.transaction_now(meta.set_keys_through, "node1", 0)
        writer = KeyWriter(database, MemoryReactorClock())
        self.assertEqual(self.successResultOf(_run(writer.catch_up())), 1)
        self.assertEqual(pid3(database, "MRN-D1"), ["D1"])
        self.assertEqual(key_rows(database), written)

    def test_each_node_has_its_own_mark(self) -> None:
        database = memory_database()
        database.transaction_now(meta.set_keys_through, "node1", 5)
        database.transaction_now(meta.set_keys_through, "node2", 9)
        self.assertEqual(database.transaction_now(meta.keys_through, "node1"), 5)
        self.assertEqual(database.transaction_now(meta.keys_through, "node2"), 9)
        self.assertIsNone(database.transaction_now(meta.keys_through, "node3"))


def _run(coroutine: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coroutine)
