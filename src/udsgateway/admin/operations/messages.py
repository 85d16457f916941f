"""Messages: the search, a message's detail and timeline, its content (audited), and
replays of stored messages through their flows."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from attrs import evolve
from sqlalchemy import Connection
from twisted.internet.defer import Deferred, fail

from udsgateway.admin.operations.core import (
    Conflict,
    Core,
    Invalid,
    NotFound,
    OperationsError,
    as_text,
    iso,
)
from udsgateway.admin.operations.logs import log_view
from udsgateway.admin.operations.queue import described
from udsgateway.store import executions, logs, outbox, overview, search

#: Parts of a message's content that ``content`` shows.
CONTENT_PARTS = ("inbound", "ack", "outbound", "response")


class MessagesOps(Core):
    """The message browser and the replay of messages."""

    __slots__ = ()

    def replay_messages(
        self,
        actor: str,
        via: str,
        query: search.Query,
        reason: str,
        flow_id: str | None = None,
        confirm_count: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Replay the accepted messages matching ``query`` through ``flow_id`` (or each
        through the flows it was routed to): new executions, sent again.

        Without ``confirm_count`` nothing runs: the answer is ``{"count": n}``. Run again
        with ``confirm_count=n``: if the set no longer has n messages, Conflict (and
        nothing runs); else they are replayed, oldest first. At most 10,000 at a time.
        """
        matching = evolve(query, status="accepted")
        if confirm_count is None:
            try:
                self._check(actor, via)
            except OperationsError:
                return fail()
            counted: Deferred[Any] = self._read(self._checked_count, matching, flow_id)
            counted.addCallback(lambda n: {"count": n, "replayed": 0})
            return counted

        def work(connection: Connection) -> dict[str, Any]:
            if not reason.strip():
                raise Invalid("reason: required")
            ids = search.matching_ids(connection, matching, 10_001)
            if len(ids) > 10_000:
                raise Invalid("more than 10,000 messages match: narrow the search")
            if len(ids) != confirm_count:
                raise Conflict(f"{len(ids)} messages match now, not {confirm_count}")
            self._known_flow(connection, flow_id)
            made = executions.replay(
                connection, _targets(connection, ids, flow_id), actor, reason, self.wall()
            )
            return {"count": len(ids), "replayed": len(ids), "executions": len(made)}

        target = f"messages {_describe(matching)}"[:255] + (f" flow {flow_id}" if flow_id else "")
        done = self._audited(actor, via, "message.replay", target, reason, work)
        done.addCallback(self._woke)
        return done

    def replay_message(
        self, actor: str, via: str, message_id: int, reason: str, flow_id: str | None = None
    ) -> Deferred[dict[str, Any]]:
        """Replay one accepted message through ``flow_id`` (or its own flows)."""

        def work(connection: Connection) -> dict[str, Any]:
            if not reason.strip():
                raise Invalid("reason: required")
            found = search.detail(connection, message_id)
            if found is None:
                raise NotFound(f"no message {message_id}")
            if not found.message.accepted:
                raise Conflict(f"message {message_id} was rejected: nothing to replay")
            self._known_flow(connection, flow_id)
            made = executions.replay(
                connection, _targets(connection, [message_id], flow_id), actor, reason, self.wall()
            )
            return {"count": 1, "replayed": 1, "executions": len(made)}

        target = f"message {message_id}" + (f" flow {flow_id}" if flow_id else "")
        done = self._audited(actor, via, "message.replay", target, reason, work)
        done.addCallback(self._woke)
        return done

    def _checked_count(
        self, connection: Connection, query: search.Query, flow_id: str | None
    ) -> int:
        self._known_flow(connection, flow_id)
        return len(search.matching_ids(connection, query, 10_001))

    @staticmethod
    def _known_flow(connection: Connection, flow_id: str | None) -> None:
        if flow_id is None:
            return
        if not overview.flow_exists(connection, flow_id):
            raise NotFound(f"no flow {flow_id}")

    def messages(self, actor: str, via: str, query: search.Query) -> Deferred[dict[str, Any]]:
        """Search stored messages, newest first (metadata only). The answer has the
        page (``messages``) and ``next`` (pass it as ``before_id`` for the next page;
        None on the last page)."""
        try:
            self._check(actor, via)
            _validate(query)
            known = set(self.tenants) | set(self.ingests)
            if query.tenant is not None and known and query.tenant not in known:
                raise Invalid(f"tenant: no tenant {query.tenant!r}")
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            try:
                rows = search.search(connection, query)
            except ValueError as error:
                raise Invalid(str(error)) from None
            return {
                "messages": [_message_view(row) for row in rows],
                "next": rows[-1].id if len(rows) == query.limit and rows else None,
            }

        return self._read(work)

    def message(self, actor: str, via: str, message_id: int) -> Deferred[dict[str, Any]]:
        """A message's metadata, the ACK code sent, its executions, its deliveries (with
        why each waits) and their attempts, and its ``timeline``: its lines of the
        execution log, oldest first (received, each step, each attempt, operators'
        actions). No content: see ``content``."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()

        def work(connection: Connection) -> dict[str, Any]:
            found = search.detail(connection, message_id)
            if found is None:
                raise NotFound(f"no message {message_id}")
            rows = [outbox.get_delivery(connection, a.id) for a in found.deliveries]
            views = described(connection, [r for r in rows if r is not None], self.wall())
            lines = logs.log_lines(
                connection,
                limit=10_000,
                message_id=message_id,
                execution_ids=[e.id for e in found.executions],
            )
            attempts: dict[tuple[int, int], list[dict[str, Any]]] = {}
            for line in lines:
                if line.event != "delivery" or line.execution_id is None:
                    continue
                attempts.setdefault((line.execution_id, line.step or 0), []).append(
                    {
                        "attempt": line.attempt or 0,
                        "outcome": line.outcome,
                        "ack": line.ack_code,
                        "reason": line.reason,
                        "at": iso(line.at),
                    }
                )
            for view, item in zip(views, found.deliveries, strict=True):
                view["attempt_log"] = attempts.get((item.execution_id or 0, item.step), [])
            return {
                **_message_view(found.message),
                "executions": [
                    {
                        "id": e.id,
                        "flow_id": e.flow_id,
                        "state": e.state,
                        "step": e.step,
                        "created_at": iso(e.created_at),
                        "updated_at": iso(e.updated_at),
                        "error": e.error,
                    }
                    for e in found.executions
                ],
                "deliveries": views,
                "timeline": [log_view(line) for line in lines],
            }

        return self._read(work)

    def content(
        self,
        actor: str,
        via: str,
        message_id: int | None = None,
        part: str = "inbound",
        delivery_id: int | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Message content, audited: ``inbound`` (the raw message) or ``ack`` (the ACK
        sent) of ``message_id``; ``outbound`` (the rendered message) or ``response``
        (the destination's reply) of ``delivery_id``. Text with segments on lines;
        ``base64`` has the exact bytes."""
        if part not in CONTENT_PARTS:
            return fail(Invalid(f"part: expected one of {', '.join(CONTENT_PARTS)}"))
        if part in ("inbound", "ack"):
            target = f"message {message_id}"
        else:
            target = f"delivery {delivery_id}"

        def work(connection: Connection) -> dict[str, Any]:
            data: bytes | None
            if part in ("inbound", "ack"):
                if message_id is None:
                    raise Invalid("message_id: required")
                found = search.content(connection, message_id)
                if found is None:
                    raise NotFound(f"no message {message_id}")
                data = found[0] if part == "inbound" else found[1]
                owner: int | None = message_id
            else:
                if delivery_id is None:
                    raise Invalid("delivery_id: required")
                sent = search.delivery_content(connection, delivery_id)
                if sent is None:
                    raise NotFound(f"no delivery {delivery_id}")
                owner, payload, response = sent
                data = payload if part == "outbound" else response
            return {
                "message_id": owner,
                "delivery_id": delivery_id,
                "part": part,
                "text": as_text(data),
                "base64": base64.b64encode(data).decode("ascii") if data is not None else None,
            }

        return self._audited(actor, via, f"content.{part}", target, "", work)

    def message_content(self, actor: str, via: str, message_id: int) -> Deferred[dict[str, Any]]:
        """All the content of a message at once, audited as one view
        (``message.content``): ``inbound`` (as received), ``ack`` (as sent), and per
        delivery its ``outbound`` message and the destination's ``response`` (text,
        segments on lines; None where there is none)."""

        def work(connection: Connection) -> dict[str, Any]:
            found = search.content(connection, message_id)
            detail = search.detail(connection, message_id)
            if found is None or detail is None:
                raise NotFound(f"no message {message_id}")
            deliveries = []
            for item in detail.deliveries:
                sent = search.delivery_content(connection, item.id)
                if sent is not None:
                    deliveries.append(
                        {
                            "id": item.id,
                            "step": item.step,
                            "outbound": as_text(sent[1]),
                            "response": as_text(sent[2]),
                        }
                    )
            return {
                "message_id": message_id,
                "inbound": as_text(found[0]),
                "ack": as_text(found[1]),
                "deliveries": deliveries,
            }

        return self._audited(actor, via, "message.content", f"message {message_id}", "", work)


def _message_view(row: search.MessageSummary) -> dict[str, Any]:
    return {
        "id": row.id,
        "tenant": row.tenant,
        "sender": row.sender,
        "control_id": row.control_id,
        "message_type": row.message_type,
        "peer": row.peer,
        "connection": row.connection,
        "received_at": iso(row.received_at),
        "size": row.size,
        "status": "accepted" if row.accepted else "rejected",
        "flows": list(row.flows),
        "reason": row.reason,
        "ack_code": row.ack_code,
    }


def _describe(query: search.Query) -> str:
    """A search as an audit target: the filters' names and values (keys by name only:
    a patient identifier is not written into the trail)."""
    parts = []
    for name in ("tenant", "message_type", "status", "flow_id"):
        value = getattr(query, name)
        if value is not None:
            parts.append(f"{name}={value}")
    if query.since is not None:
        parts.append(f"since={iso(query.since)}")
    if query.until is not None:
        parts.append(f"until={iso(query.until)}")
    for name, _given in query.keys:
        parts.append(f"{name}=(given)")
    return " ".join(parts) or "all"


def _validate(query: search.Query) -> None:
    if not 1 <= query.limit <= 1000:
        raise Invalid("limit: between 1 and 1000")
    if query.status is not None and query.status not in search.STATUSES:
        raise Invalid(f"status: expected one of {', '.join(search.STATUSES)}")
    for name, value in query.keys:
        if name not in search.KEYS:
            raise Invalid(f"unknown search key {name!r} (one of: {', '.join(search.KEYS)})")
        if not value:
            raise Invalid(f"{name}: empty value")


def _targets(
    connection: Connection, message_ids: Sequence[int], flow_id: str | None
) -> list[tuple[int, str]]:
    """(message, flow) pairs a replay runs: through ``flow_id``, or each accepted
    message through the flows it was routed to."""
    routed = search.routed_flows(connection, message_ids)
    if flow_id is None:
        return [(message_id, flow) for message_id, flows in routed.items() for flow in flows]
    return [(message_id, flow_id) for message_id in routed]
