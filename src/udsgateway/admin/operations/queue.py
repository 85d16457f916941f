"""Queue control: pausing destinations, the deliveries and why each waits, operators'
actions on deliveries (release, retry, skip, replay) and on held executions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from sqlalchemy import Connection
from twisted.internet.defer import Deferred, fail, succeed

from udsgateway.admin.operations.core import (
    Conflict,
    Core,
    Invalid,
    NotFound,
    OperationsError,
    iso,
)
from udsgateway.hl7.header import HeaderProblem, parse_header
from udsgateway.store import audit, destinations, operator, outbox, overview


class QueueOps(Core):
    """Destinations' pauses, deliveries, and the operators' actions on them."""

    __slots__ = ()

    def pause(
        self, actor: str, via: str, destination: str, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Pause a destination (``host:port``): it keeps queueing, nothing is sent to it
        until it is resumed. Persisted: survives a restart. Conflict when paused already."""
        address = destination.strip()

        def work(connection: Connection) -> dict[str, Any]:
            if not address:
                raise Invalid("destination: required (host:port)")
            if not destinations.pause(connection, address, actor, reason, self.wall()):
                raise Conflict(f"destination {address} is paused already")
            return {"destination": address, "paused": True, "paused_by": actor}

        done = self._audited(
            actor, via, "destination.pause", f"destination {address}", reason, work
        )
        done.addCallback(self._pauses_changed)
        return done

    def resume(
        self, actor: str, via: str, destination: str, reason: str = ""
    ) -> Deferred[dict[str, Any]]:
        """Resume a paused destination: its lanes send again at once. Conflict when it was
        not paused."""
        address = destination.strip()

        def work(connection: Connection) -> dict[str, Any]:
            if not destinations.resume(connection, address):
                raise Conflict(f"destination {address} is not paused")
            return {"destination": address, "paused": False, "paused_by": None}

        done = self._audited(
            actor, via, "destination.resume", f"destination {address}", reason, work
        )
        done.addCallback(self._pauses_changed)
        return done

    def _pauses_changed(self, result: dict[str, Any]) -> Deferred[dict[str, Any]]:
        if self.dispatcher is None:
            return succeed(result)
        done = self._run(destinations.pauses)

        def apply(found: dict[str, destinations.Pause]) -> dict[str, Any]:
            self.dispatcher.set_pauses({a: p.paused_by for a, p in found.items()})
            return result

        done.addCallback(apply)
        return done

    def deliveries(
        self,
        actor: str,
        via: str,
        states: Sequence[str] = (),
        destination: str | None = None,
        lane: str | None = None,
        limit: int = 100,
    ) -> Deferred[list[dict[str, Any]]]:
        """Deliveries oldest first (never their payload), each with why it waits."""
        try:
            self._check(actor, via)
            for state in states:
                if state not in (outbox.QUEUED, outbox.HELD, outbox.DELIVERED, outbox.SKIPPED):
                    raise Invalid(f"state: unknown state {state!r}")
        except OperationsError:
            return fail()
        return self._read(self._deliveries, tuple(states), destination, lane, limit)

    def _deliveries(
        self,
        connection: Connection,
        states: tuple[str, ...],
        destination: str | None,
        lane: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        rows = overview.deliveries_page(
            connection, states, destination, lane, max(1, min(limit, 1000))
        )
        if destination is not None:  # the LIKE may match more (a host that is a prefix)
            rows = [r for r in rows if destinations.address_of(r.destination) == destination]
        return described(connection, rows, self.wall())

    def delivery(self, actor: str, via: str, delivery_id: int) -> Deferred[dict[str, Any]]:
        """One delivery (no payload), with why it waits."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            row = outbox.get_delivery(connection, delivery_id)
            if row is None:
                raise NotFound(f"no delivery {delivery_id}")
            return described(connection, [row], self.wall())[0]

        return self._read(work)

    def release(
        self, actor: str, via: str, delivery_id: int, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Send a held (or queued, retrying) delivery again now. Requires a reason."""
        return self._delivery_action(actor, via, delivery_id, "release", reason)

    def retry_now(
        self, actor: str, via: str, delivery_id: int, reason: str = "retry now"
    ) -> Deferred[dict[str, Any]]:
        """A queued delivery waiting for its backoff is sent now (its attempts restart)."""
        return self._delivery_action(actor, via, delivery_id, "release", reason, "retry")

    def skip(
        self, actor: str, via: str, delivery_id: int, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Give up on a held or queued delivery: its lane moves on; its execution fails."""
        return self._delivery_action(actor, via, delivery_id, "skip", reason)

    def replay_delivery(
        self, actor: str, via: str, delivery_id: int, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Send a delivery again (also a delivered or skipped one), before what is queued
        after it in its lane."""
        return self._delivery_action(actor, via, delivery_id, "replay", reason)

    def _delivery_action(
        self,
        actor: str,
        via: str,
        delivery_id: int,
        action: str,
        reason: str,
        name: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        label = name or action

        def work(connection: Connection) -> outbox.Delivery:
            if not reason.strip():
                raise Invalid("reason: required")
            current = outbox.get_delivery(connection, delivery_id)
            if current is None:
                raise NotFound(f"no delivery {delivery_id}")
            if label == "retry" and current.state != outbox.QUEUED:
                raise Conflict(f"delivery {delivery_id} is {current.state}, not queued")
            return self._act(connection, current, action, actor, via, reason)

        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def refused(failure: Any) -> Any:
            if failure.check(OperationsError):
                written = self._run(
                    audit.append,
                    actor,
                    f"delivery.{label}",
                    f"delivery {delivery_id}",
                    self.wall(),
                    reason,
                    f"refused: {failure.getErrorMessage()}",
                    via,
                )
                written.addCallback(lambda _: failure)
                return written
            return failure

        done: Deferred[Any] = self._run(work)
        done.addErrback(refused)

        def acted(row: outbox.Delivery) -> Deferred[dict[str, Any]]:
            if self.dispatcher is not None:
                self.dispatcher.operator_acted(row.lane)
            return self._read(lambda connection: described(connection, [row], self.wall())[0])

        done.addCallback(acted)
        return done

    def _act(
        self,
        connection: Connection,
        current: outbox.Delivery,
        action: str,
        actor: str,
        via: str,
        reason: str,
    ) -> outbox.Delivery:
        """``store.operator.delivery_action`` on a delivery (audited there); the MSH-10
        read from its payload when it was stored without one (an older version)."""
        control_id = None
        if operator.needs_control_id(current, action, None):
            header = parse_header(current.payload, default_charset="latin-1")
            if isinstance(header, HeaderProblem) or not header.control_id:
                raise Conflict(f"the message of delivery {current.id} has no MSH-10")
            control_id = header.control_id
        try:
            return operator.delivery_action(
                connection, current.id, action, actor, reason, self.wall(), None, control_id, via
            )
        except LookupError as error:
            raise NotFound(str(error)) from None
        except ValueError as error:
            raise Conflict(str(error)) from None

    #: The states ``replay_deliveries`` sends again.
    REPLAYABLE: ClassVar[tuple[str, ...]] = (outbox.SKIPPED, outbox.DELIVERED)

    def replay_deliveries(
        self,
        actor: str,
        via: str,
        destination: str,
        state: str,
        reason: str,
        confirm_count: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Send again every ``state`` (skipped or delivered) delivery of a destination
        (``host:port``), oldest first, each before what is queued after it in its lane.

        Without ``confirm_count`` nothing runs: the answer is ``{"count": n}``. With
        ``confirm_count=n``: Conflict (nothing runs) if the set no longer has n
        deliveries, else they are replayed. At most 10,000 at a time."""
        address = destination.strip()

        def matching(connection: Connection) -> list[outbox.Delivery]:
            if not address:
                raise Invalid("destination: required (host:port)")
            if state not in self.REPLAYABLE:
                raise Invalid(f"state: expected one of {', '.join(self.REPLAYABLE)}")
            rows = overview.deliveries_page(connection, (state,), address, None, 10_001)
            rows = [r for r in rows if destinations.address_of(r.destination) == address]
            if len(rows) > 10_000:
                raise Invalid("more than 10,000 deliveries match: replay them in parts")
            return rows

        if confirm_count is None:
            try:
                self._check(actor, via)
            except OperationsError:
                return fail()
            counted: Deferred[Any] = self._read(matching)
            counted.addCallback(lambda rows: {"count": len(rows), "replayed": 0})
            return counted

        def work(connection: Connection) -> dict[str, Any]:
            if not reason.strip():
                raise Invalid("reason: required")
            rows = matching(connection)
            if len(rows) != confirm_count:
                raise Conflict(f"{len(rows)} deliveries match now, not {confirm_count}")
            lanes = [self._act(connection, row, "replay", actor, via, reason).lane for row in rows]
            return {"count": len(rows), "replayed": len(rows), "lanes": lanes}

        target = f"destination {address} {state}"
        done = self._audited(actor, via, "deliveries.replay", target, reason, work)

        def woken(result: dict[str, Any]) -> dict[str, Any]:
            lanes = result.pop("lanes")
            if self.dispatcher is not None:
                for lane in dict.fromkeys(lanes):
                    self.dispatcher.operator_acted(lane)
            return result

        done.addCallback(woken)
        return done

    def release_execution(
        self, actor: str, via: str, execution_id: int, reason: str
    ) -> Deferred[dict[str, Any]]:
        """Render a held execution's action again (after its flow was fixed)."""

        def work(connection: Connection) -> dict[str, Any]:
            if not reason.strip():
                raise Invalid("reason: required")
            try:
                row = operator.release_execution(
                    connection, execution_id, actor, reason, self.wall(), via
                )
            except LookupError as error:
                raise NotFound(str(error)) from None
            except ValueError as error:
                raise Conflict(str(error)) from None
            return {"id": row.id, "state": row.state, "flow_id": row.flow_id, "step": row.step}

        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        done = self._run(work)
        done.addCallback(self._woke)
        return done


def wait_reason(
    row: outbox.Delivery, head: int | None, pauses: Mapping[str, destinations.Pause], now: float
) -> str:
    """Why a delivery waits, in an operator's words; "" when it does not wait."""
    if row.state == outbox.HELD:
        return f"held: {row.last_error}" if row.last_error else "held"
    if row.state != outbox.QUEUED:
        return ""
    if head is not None and head < row.id:
        return f"waiting for the head of its lane (delivery {head})"
    pause = pauses.get(destinations.address_of(row.destination))
    if pause is not None:
        return f"paused by {pause.paused_by}"
    if row.next_attempt_at > now:
        why = f"backoff until {iso(row.next_attempt_at)}"
        return why + (f" after: {row.last_error}" if row.last_error else "")
    return "next to send"


def _delivery_view(
    row: outbox.Delivery, head: int | None, pauses: Mapping[str, destinations.Pause], now: float
) -> dict[str, Any]:
    return {
        "id": row.id,
        "state": row.state,
        "lane": row.lane,
        "destination": destinations.address_of(row.destination),
        "protocol": row.protocol,
        "control_id": row.control_id,
        "execution_id": row.execution_id,
        "step": row.step,
        "attempts": row.attempts,
        "ack": row.response_code,
        "last_error": row.last_error,
        "next_attempt_at": iso(row.next_attempt_at),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "waiting": wait_reason(row, head, pauses, now),
    }


def described(
    connection: Connection, rows: Sequence[outbox.Delivery], now: float
) -> list[dict[str, Any]]:
    """Deliveries as plain data (no payload), each with why it waits at ``now``."""
    heads = overview.lane_heads(
        connection, [row.lane for row in rows if row.state in outbox.OPEN_STATES]
    )
    pauses = destinations.pauses(connection)
    return [_delivery_view(row, heads.get(row.lane), pauses, now) for row in rows]
