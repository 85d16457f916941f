"""The execution log: its pages, newest first, and the long poll of the live tail."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import Connection
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import deferLater

from udsgateway.admin.operations.core import Core, Invalid, OperationsError, iso
from udsgateway.store import logs
from udsgateway.store.records import LogLine


class LogsOps(Core):
    """``logs`` and ``tail``, with the filters of ``udsgateway logs``."""

    __slots__ = ()

    #: ``logs`` status words for common questions, and the outcomes they select.
    STATUS_ALIASES: ClassVar[dict[str, str]] = {
        "failed": "failed",
        "held": "held",
        "ok": "delivered",
    }

    def logs(
        self,
        actor: str,
        via: str,
        flow_id: str | None = None,
        status: str | None = None,
        since: float | None = None,
        before_id: int | None = None,
        limit: int = 100,
        event: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """The execution log, newest first, with the filters of ``udsgateway logs``:
        flow, status (failed, held, ok = delivered, or any outcome), since (epoch
        seconds), event (received, delivery, execution, operator); ``next`` pages on
        (``before_id``). No message content."""
        try:
            self._check(actor, via)
            outcome = self._outcome(status)
            if not 1 <= limit <= 1000:
                raise Invalid("limit: between 1 and 1000")
        except OperationsError:
            return fail()
        done: Deferred[Any] = self._read(
            _log_lines, flow_id, outcome, since, 0, limit, True, before_id, event or None
        )
        done.addCallback(
            lambda rows: {
                "lines": [log_view(row) for row in rows],
                "next": rows[-1].id if len(rows) == limit else None,
            }
        )
        return done

    def _outcome(self, status: str | None) -> str | None:
        if status is None:
            return None
        value = status.strip().lower()
        if not value:
            raise Invalid("status: empty")
        return self.STATUS_ALIASES.get(value, value)

    def tail(
        self,
        actor: str,
        via: str,
        after_id: int | None = None,
        flow_id: str | None = None,
        status: str | None = None,
        timeout: float = 25.0,
        poll: float = 1.0,
        event: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """A long poll for the live tail: the log lines after ``after_id`` (oldest first,
        at most 500), as soon as there are any, else an empty list after ``timeout``
        seconds. ``after_id`` None: starts from the newest line (the answer is empty,
        with ``last`` to pass next time). The database is read every ``poll`` seconds
        (on the reactor's clock, off its thread); ``timeout`` 0 answers at once."""
        try:
            self._check(actor, via)
            outcome = self._outcome(status)
            if not 0 <= timeout <= 120:
                raise Invalid("timeout: between 0 and 120 seconds")
        except OperationsError:
            return fail()
        if after_id is None:
            done: Deferred[Any] = self._read(logs.last_log_id)
            done.addCallback(lambda last: {"lines": [], "last": last})
            return done
        return Deferred.fromCoroutine(
            self._tail(after_id, flow_id, outcome, event or None, timeout, poll)
        )

    async def _tail(
        self,
        after_id: int,
        flow_id: str | None,
        outcome: str | None,
        event: str | None,
        timeout: float,
        poll: float,
    ) -> dict[str, Any]:
        deadline = self.clock.seconds() + timeout
        while True:
            rows = await self._read(
                _log_lines, flow_id, outcome, None, after_id, 500, False, None, event
            )
            if rows or self.clock.seconds() >= deadline:
                last = rows[-1].id if rows else after_id
                return {"lines": [log_view(row) for row in rows], "last": last}
            await deferLater(self.clock, min(poll, deadline - self.clock.seconds()))


def _log_lines(
    connection: Connection,
    flow_id: str | None,
    outcome: str | None,
    since: float | None,
    after_id: int,
    limit: int,
    newest_first: bool,
    before_id: int | None,
    event: str | None,
) -> list[LogLine]:
    return logs.log_lines(
        connection,
        flow_id,
        outcome,
        since,
        after_id,
        limit,
        newest_first,
        before_id=before_id,
        event=event,
    )


def log_view(row: LogLine) -> dict[str, Any]:
    """A line of the execution log as plain data (no message content)."""
    return {
        "id": row.id,
        "at": iso(row.at),
        "event": row.event,
        "outcome": row.outcome,
        "tenant": row.tenant,
        "app_id": row.app_id,
        "flow_id": row.flow_id,
        "message_id": row.message_id,
        "execution_id": row.execution_id,
        "control_id": row.control_id,
        "message_type": row.message_type,
        "action": row.step,
        "attempt": row.attempt,
        "ack": row.ack_code,
        "reason": row.reason,
    }
