"""The timer clock and the wall clock (docs/guarantees.md: "the wall clock jumps")."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import cast

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.clock import monotonic_timers, wall_of
from udsgateway.service import GatewayService


class MonotonicTimersTests(SynchronousTestCase):
    """The reactor's timers move to the monotonic clock before anything is scheduled."""

    def test_timers_follow_the_monotonic_clock(self) -> None:
        """A timer set for 10 s fires after 10 s of monotonic time, whatever the wall
        clock does meanwhile."""
        reactor = Clock()
        reactor.advance(1_800_000_000)  # the "wall" time the reactor started with
        ticks = [100.0]
        monotonic_timers(reactor, lambda: ticks[0])
        fired: list[float] = []
        reactor.callLater(10, lambda: fired.append(ticks[0]))
        [call] = reactor.getDelayedCalls()
        self.assertEqual(call.getTime(), 110.0)
        ticks[0] = 109.0
        reactor.advance(0)
        self.assertEqual(fired, [])
        ticks[0] = 110.0
        reactor.advance(0)
        self.assertEqual(fired, [110.0])

    def test_default_is_time_monotonic(self) -> None:
        reactor = Clock()
        monotonic_timers(reactor)
        self.assertIs(reactor.seconds, time.monotonic)

    def test_refused_once_timers_are_scheduled(self) -> None:
        """A timer already on the wall-clock base would fire at the wrong time."""
        reactor = Clock()
        reactor.callLater(5, lambda: None)
        self.assertRaises(RuntimeError, monotonic_timers, reactor)

    def test_wall_of(self) -> None:
        clock = Clock()
        clock.advance(7)
        self.assertEqual(wall_of(clock, None)(), 7)
        self.assertEqual(wall_of(clock, lambda: 42.0)(), 42.0)


class MakeServiceTests(SynchronousTestCase):
    """``twistd udsgateway`` puts the reactor's timers on the monotonic clock and gives
    the gateway the wall clock for its timestamps."""

    def test_timers_monotonic_timestamps_wall(self) -> None:
        from twisted.internet import reactor

        from tests.integration.helpers import write_config
        from udsgateway import tap

        directory = Path(self.mktemp())
        directory.mkdir()
        config = write_config(directory, {"clocks": 26999})
        moved: list[object] = []
        self.patch(tap, "monotonic_timers", moved.append)  # not the test run's own reactor
        self.patch(sys, "setswitchinterval", lambda _interval: None)

        service = tap.makeService({"config": str(config)})  # type: ignore[arg-type]

        self.assertEqual(moved, [reactor])
        gateway = cast(GatewayService, service)
        self.assertIs(gateway.ingests["clocks"].wall, time.time)
        self.assertIs(gateway.dispatcher.wall, time.time)
        self.assertIs(gateway.executor.wall, time.time)
        gateway.database.engine.dispose()

    def test_the_start_up_heap_is_frozen_once_ready(self) -> None:
        """Once the gateway is ready, what the start built is left out of the garbage
        collector's full collections (each one stopped every thread for 30 to 50 ms)."""
        from tests.integration.helpers import write_config
        from udsgateway import tap

        directory = Path(self.mktemp())
        directory.mkdir()
        config = write_config(directory, {"clocks": 26998})
        self.patch(tap, "monotonic_timers", lambda _reactor: None)
        self.patch(sys, "setswitchinterval", lambda _interval: None)
        frozen: list[object] = []
        self.patch(tap, "freeze_heap", frozen.append)
        gateway = cast(GatewayService, tap.makeService({"config": str(config)}))  # type: ignore[arg-type]
        self.addCleanup(gateway.database.engine.dispose)
        self.assertEqual(frozen, [])
        gateway.ready.callback(None)  # what a finished start does
        self.assertEqual(frozen, [None])

    def test_freeze_heap_freezes_what_lives(self) -> None:
        from udsgateway import tap

        self.addCleanup(gc.unfreeze)
        kept = [object() for _ in range(10)]
        tap.freeze_heap()
        self.assertGreater(gc.get_freeze_count(), len(kept))
