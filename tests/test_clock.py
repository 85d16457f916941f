"""The timer clock and the wall clock (RELIABILITY.md: "the wall clock jumps")."""

from __future__ import annotations

import time

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.clock import monotonic_timers, wall_of


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
