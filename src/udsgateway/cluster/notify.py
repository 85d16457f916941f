"""Wake-ups from PostgreSQL's LISTEN/NOTIFY, on a dedicated connection.

Nodes announce a join or a hand-over with ``pg_notify`` in the transaction
that makes it (``store.leases.CHANNEL``); a listener hands each payload to the
reactor (``callFromThread``), where the LeaseManager runs a round at once
instead of at its next timer. The timer stays the backup; and once the
listener listens again after a failure, every handler hears ``MISSED``, since
what was announced while the connection was down is lost.

The connection is the driver's own (psycopg), in autocommit, kept out of the
pool, in a thread of its own that waits on it with a short timeout (so that
``stop`` is noticed) and reconnects after a failure.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Engine
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from udsgateway.store.leases import CHANNEL

log = Logger()

#: Seconds each wait on the connection lasts (how soon ``stop`` is noticed).
WAIT = 0.5
#: Seconds between reconnection attempts.
RETRY = 1.0
#: The payload handed to every handler once the listener listens again after a
#: failure: announcements may have been missed meanwhile (``store.leases.parse_work``
#: reads it as "look at everything"; the LeaseManager runs a round).
MISSED = "*"


class NotifyListener:
    """LISTEN on ``channel`` (and ``others``) in a thread; call ``on_notify(payload)`` (or
    the other channel's handler) in the reactor."""

    def __init__(
        self,
        engine: Engine,
        reactor: IReactorFromThreads,
        on_notify: Callable[[str], None],
        channel: str = CHANNEL,
        others: Mapping[str, Callable[[str], None]] | None = None,
    ) -> None:
        self.engine = engine
        self.reactor = reactor
        self.on_notify = on_notify
        self.channel = channel
        #: Every channel listened on, with what its payloads go to (``others``: more
        #: channels, such as ``store.leases.WORK_CHANNEL``).
        self.handlers: dict[str, Callable[[str], None]] = {channel: on_notify, **(others or {})}
        #: Set once the first LISTEN is in place (tests wait on it).
        self.listening = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._work, name="udsgateway-listen", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """End the thread (waits for it: at most ``WAIT`` seconds)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def _work(self) -> None:
        while not self._stop.is_set():
            connection: Any = None
            try:
                pooled = self.engine.raw_connection()
                connection = pooled.driver_connection
                pooled.detach()  # its session is this listener's alone, never pooled
                connection.autocommit = True
                for channel in self.handlers:
                    connection.execute(f'LISTEN "{channel}"')
                if self.listening.is_set():
                    # Listening again after a failure: what was announced meanwhile
                    # is lost; every handler hears MISSED and looks for itself.
                    for each in self.handlers.values():
                        self.reactor.callFromThread(each, MISSED)
                self.listening.set()
                while not self._stop.is_set():
                    for notice in connection.notifies(timeout=WAIT):
                        handler = self.handlers.get(notice.channel)
                        if handler is not None:
                            self.reactor.callFromThread(handler, notice.payload)
            except Exception as error:
                log.warn("cluster listener: {error}; reconnecting", error=error)
                self._stop.wait(RETRY)
            finally:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        connection.close()
