"""The search keys of stored messages, written after the ACK, in batches.

The inbound commit stores a message and answers; its search keys (the message
browser's index: type, tenant, flows, PID-3, SCH-1/2, see ``store.search``)
are not in that commit. Ingest hands each stored message's keys to the
``KeyWriter``, which writes what has gathered every ``interval`` seconds (1 s;
at once when ``batch`` keys wait), in transactions of up to ``slice`` messages,
each with the id up to which this node's messages have their keys
(``meta.keys_through``). A message
is found by a search of its keys within about ``interval`` seconds of its ACK.

After a crash the keys that were waiting are gone: at start, before the
listeners open, ``catch_up`` reads the messages stored after that id and writes
their keys from the stored message (PID-3 and SCH read again from the raw
bytes). Keys already there (another node's, written meanwhile) are left alone,
so a catch-up and a batch never conflict. Each node keeps its own id: a node's
messages get increasing ids (its commits are one after the other).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from attrs import define, field
from sqlalchemy import Connection
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from udsgateway.hl7.header import HeaderProblem, parse_header
from udsgateway.hl7.keys import search_keys
from udsgateway.store import meta, search
from udsgateway.store.engine import Database

log = Logger()

Keys = tuple[tuple[str, str], ...]


def _write(
    connection: Connection, node: str, keys: Sequence[Keys], ids: Sequence[int], through: int
) -> None:
    search.insert_keys(connection, keys, ids, again=True)
    meta.set_keys_through(connection, node, through)


def _start_mark(connection: Connection, node: str) -> int | None:
    """This node's id, or None after setting it to the newest message (a store that
    wrote every key in its commits until now: nothing to catch up)."""
    search.prepare_key_inserts(connection)
    through = meta.keys_through(connection, node)
    if through is None:
        meta.set_keys_through(connection, node, search.last_message_id(connection))
    return through


@define(eq=False)
class KeyWriter:
    """Writes the search keys of stored messages in batches (see the module)."""

    database: Database
    clock: IReactorTime
    node: str = "node1"
    interval: float = 1.0
    batch: int = 4096
    #: Messages whose keys one transaction writes (a flush writes several in turn).
    slice: int = 64
    #: Each tenant's codec for messages without MSH-18 (the catch-up reads PID-3 again).
    charsets: Mapping[str, str] = field(factory=dict)
    _ids: list[int] = field(factory=list)
    _keys: list[Keys] = field(factory=list)
    _loop: LoopingCall | None = None
    _writing: Deferred[None] | None = None
    #: Messages whose keys were written, by a batch or a catch-up (since start).
    written: int = 0
    caught_up: int = 0

    def stored(self, message_id: int, keys: Keys) -> None:
        """A message was committed with these keys (ingest, in commit order)."""
        self._ids.append(message_id)
        self._keys.append(keys)
        if len(self._ids) >= self.batch and self._writing is None:
            self.flush()

    @property
    def waiting(self) -> int:
        return len(self._ids)

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self.flush)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda failure: log.failure("search keys loop stopped", failure)
            )

    async def stop(self) -> None:
        """Stop the timer and write what waits (the service stopping)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        if self._writing is not None:
            await self._writing
        await self.flush()

    def flush(self) -> Deferred[None]:
        """Write the keys gathered so far (one flush at a time), in transactions of
        up to ``slice`` messages one after the other: the database thread runs the
        inbound commits queued meanwhile between two of them, so an ACK waits for
        at most one slice, not for a second's worth of keys."""
        if self._writing is not None:
            return self._writing
        if not self._ids:
            return succeed(None)
        writing = Deferred.fromCoroutine(self._drain(len(self._ids)))
        if not writing.called:
            self._writing = writing
        return writing

    async def _drain(self, count: int) -> None:
        try:
            while count > 0 and self._ids:
                size = min(count, self.slice)
                ids, keys = self._ids[:size], self._keys[:size]
                del self._ids[:size], self._keys[:size]
                try:
                    await self.database.transaction(_write, self.node, keys, ids, max(ids))
                except Exception:
                    # Kept for the next tick (the database refused: the inbound
                    # commits fail too).
                    self._ids[:0], self._keys[:0] = ids, keys
                    log.failure(
                        "search keys not written; again in {interval}s", interval=self.interval
                    )
                    return
                self.written += size
                count -= size
        finally:
            self._writing = None

    async def catch_up(self, page: int = 2048) -> int:
        """Write the keys of this node's messages a crash left without them (at start,
        before any new message); the number of messages read."""
        through = await self.database.transaction(_start_mark, self.node)
        if through is None:
            return 0
        read = 0
        while True:
            rows = await self.database.transaction(search.stored_after, through, page)
            if not rows:
                break
            keys = [self._keys_of(row) for row in rows]
            ids = [row.id for row in rows]
            await self.database.transaction(_write, self.node, keys, ids, ids[-1])
            through = ids[-1]
            read += len(rows)
        self.caught_up += read
        if read:
            log.info("search keys caught up: {count} messages", count=read)
        return read

    def _keys_of(self, row: search.Unkeyed) -> Keys:
        header = parse_header(row.raw, default_charset=self.charsets.get(row.tenant, "latin-1"))
        hl7 = () if isinstance(header, HeaderProblem) else search_keys(row.raw, header)
        return search.keys_from(
            row.tenant, row.message_type, row.flows, row.accepted, row.control_id, hl7
        )


#: What ingest calls for each stored message: (message id, its search keys).
StoredKeys = Callable[[int, Keys], None]
