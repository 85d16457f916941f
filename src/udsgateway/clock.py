"""Two clocks: the reactor's, for timers, and the wall clock, for timestamps.

docs/guarantees.md: when the wall clock jumps (NTP stepping it, an operator, a
virtual machine resumed), timeouts and backoff must not fire early or late.
Twisted's reactor schedules ``callLater`` on ``time.time()``;
``monotonic_timers`` makes it schedule on ``time.monotonic()`` instead, so
every timeout, backoff, idle timer and periodic job of the gateway measures
real elapsed time. What is stored or sent as a point in time (ACK MSH-7,
``received_at``, ``next_attempt_at``, log times, the retention cut-off) keeps
reading the wall clock, which is passed separately as a ``Wall``.

In tests both are one ``task.Clock``: components take ``wall=None`` to mean
"the timer clock's ``seconds``", and a test that jumps the wall clock passes
a second clock's ``seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

#: A function returning the wall-clock time in seconds since the epoch.
Wall = Callable[[], float]


def wall_of(clock: IReactorTime, wall: Wall | None) -> Wall:
    """``wall`` when given, else the timer clock's own ``seconds`` (tests)."""
    return wall if wall is not None else clock.seconds


def monotonic_timers(reactor: Any, monotonic: Callable[[], float] = time.monotonic) -> None:
    """Make ``reactor`` schedule its timers on ``monotonic`` rather than the wall clock.

    Call it before anything schedules a timer (``tap.makeService`` does, first
    thing): a timer already scheduled would be on the old time base. Raises
    ``RuntimeError`` when there is one.
    """
    if reactor.getDelayedCalls():
        raise RuntimeError("timers are already scheduled on the wall clock")
    reactor.seconds = monotonic
