"""Per-second rates over the last minute and hour, from the facade's cumulative counters."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


@define
class Rates:
    """Per-second rates over the last minute and hour, from cumulative counters.

    Every ``step`` seconds (10) on the reactor, ``sample`` reads the counters
    (``read``: name -> cumulative count) and keeps the reading in a ring of
    ``3600 / step + 1`` entries: memory is bounded whatever the traffic. A rate
    is the difference between the newest reading and the one a minute (an hour)
    before, divided by the time between them; before a minute has passed, the
    oldest reading is used.
    """

    read: Callable[[], Mapping[str, int]]
    clock: IReactorTime
    step: float = 10.0
    _ring: deque[tuple[float, dict[str, int]]] = field(init=False)
    _loop: LoopingCall | None = None

    def __attrs_post_init__(self) -> None:
        self._ring = deque(maxlen=int(3600 / self.step) + 1)

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self.sample)
            self._loop.clock = self.clock
            self._loop.start(self.step, now=True)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def sample(self) -> None:
        self._ring.append((self.clock.seconds(), dict(self.read())))

    def rates(self, window: float) -> dict[str, float]:
        """name -> per-second rate over the last ``window`` seconds (up to the ring)."""
        if len(self._ring) < 2:
            return {}
        now, newest = self._ring[-1]
        then, oldest = self._ring[0]
        for at, reading in self._ring:
            if at >= now - window - self.step / 2:
                then, oldest = at, reading
                break
        elapsed = now - then
        if elapsed <= 0:
            return {}
        return {
            name: round(max(0, count - oldest.get(name, 0)) / elapsed, 3)
            for name, count in newest.items()
        }
