"""Status: what the gateway counts since start, what the database holds, and rates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection
from twisted.internet.defer import Deferred, fail

from udsgateway import flowstore
from udsgateway.admin.operations.core import Core, OperationsError
from udsgateway.store import destinations, logs, outbox, overview, search

#: What the status counts per flow since start (and its rates): executions routed
#: (an accepted message stored for the flow) and ended done, failed or held.
FLOW_OUTCOMES = ("routed", "done", "failed", "held")


class StatusOps(Core):
    """Status and the destinations' list (a view of it)."""

    __slots__ = ()

    def counters(self) -> dict[str, int]:
        """Cumulative in-memory counters since start, for the rates (name -> count)."""
        found: dict[str, int] = {}
        for tenant, ingest in self.ingests.items():
            stats = ingest.stats
            found[f"tenant.{tenant}.received"] = stats.frames
            rejected = sum(stats.rejected.values())
            found[f"tenant.{tenant}.accepted"] = stats.stored - rejected
            found[f"tenant.{tenant}.duplicates"] = stats.replayed
            found[f"tenant.{tenant}.rejected"] = rejected + sum(stats.errors.values())
        if self.dispatcher is not None:
            for address, count in getattr(self.dispatcher, "sent", {}).items():
                found[f"destination.{address}.delivered"] = count
            for address, counts in getattr(self.dispatcher, "attempts", {}).items():
                found[f"destination.{address}.attempts"] = sum(counts.values())
        if self.executor is not None:
            found["executions.rendered"] = self.executor.rendered
            found["executions.failed"] = self.executor.failed
            found["executions.held"] = self.executor.held
        for flow, counts in self._flow_counters().items():
            for outcome, count in counts.items():
                found[f"flow.{flow}.{outcome}"] = count
        return found

    def _flow_counters(self) -> dict[str, dict[str, int]]:
        """Per Flow ID since start: routed (from the ingests), done, failed, held
        (executions ended so, from the executor)."""
        flows: dict[str, dict[str, int]] = {}
        for ingest in self.ingests.values():
            for flow, count in getattr(ingest.stats, "routed", {}).items():
                entry = flows.setdefault(flow, dict.fromkeys(FLOW_OUTCOMES, 0))
                entry["routed"] += count
        if self.executor is not None:
            for flow, counts in getattr(self.executor, "flow_executions", {}).items():
                entry = flows.setdefault(flow, dict.fromkeys(FLOW_OUTCOMES, 0))
                for outcome in FLOW_OUTCOMES[1:]:
                    entry[outcome] += counts.get(outcome, 0)
        return flows

    def status(self, actor: str, via: str, history: bool = False) -> Deferred[dict[str, Any]]:
        """Per tenant (connections, received, accepted, duplicates, rejected by code), per
        flow (routed, executions by state), per destination (queued, held, delivered,
        attempts, oldest pending age, connection up/down/idle, paused), and rates over the
        last minute and hour. Counts in ``tenants`` are since the process started; flow and
        destination counts are from the database. ``history`` (the console's dashboard)
        adds per flow ``received`` (messages routed to it) and ``last_hour`` (executions
        finished in each of the last 60 minutes, oldest first), and the destinations of
        every stored flow (also those without deliveries yet)."""
        try:
            self._check(actor, via)
        except OperationsError:
            return fail()
        done = self._read(status_rows, self.wall(), history)
        done.addCallback(self._status)
        return done

    def _status(self, stored: dict[str, Any]) -> dict[str, Any]:
        tenants = {}
        for name, ingest in self.ingests.items():
            stats = ingest.stats
            listener = self.listeners.get(name)
            rejected = stats.rejected + stats.errors
            tenants[name] = {
                "open_connections": listener.stats.open_connections if listener else 0,
                "connections": listener.stats.connections if listener else 0,
                "received": stats.frames,
                "accepted": stats.stored - sum(stats.rejected.values()),
                "duplicates": stats.replayed,
                "rejected": sum(rejected.values()),
                "rejected_by_code": {str(code): n for code, n in sorted(rejected.items())},
                "acks": dict(sorted(stats.acks.items())),
            }
        live: dict[str, dict[str, Any]] = {}
        if self.dispatcher is not None:
            for destination in self.dispatcher.destinations.values():
                address = destinations.address_of(destination.endpoint)
                entry = live.setdefault(
                    address, {"connected": False, "down": False, "last_error": ""}
                )
                entry["connected"] = entry["connected"] or destination.connected
                entry["down"] = entry["down"] or bool(getattr(destination, "down", False))
                entry["last_error"] = entry["last_error"] or destination.last_error
        sent = dict(getattr(self.dispatcher, "sent", {}) or {})
        tried = dict(getattr(self.dispatcher, "attempts", {}) or {})
        for address, entry in stored["destinations"].items():
            state = live.get(address, {})
            entry["connected"] = state.get("connected", False)
            entry["connection"] = _connection(state, self.dispatcher is not None)
            entry["last_error"] = state.get("last_error", "")
            entry["delivered_since_start"] = sent.get(address, 0)
            entry["attempts_since_start"] = dict(sorted(tried.get(address, {}).items()))
        rates: dict[str, Any] = {"minute": {}, "hour": {}}
        if self.rates is not None:
            rates = {"minute": self.rates.rates(60), "hour": self.rates.rates(3600)}
        for address, entry in stored["destinations"].items():
            entry["rates"] = _rates_of(rates, f"destination.{address}.")
        flows = stored["flows"]
        for flow, counts in self._flow_counters().items():
            entry = flows.get(flow)
            if entry is None:
                continue  # a flow deleted since: its counts stay in the metrics
            entry["since_start"] = counts
        for flow, entry in flows.items():
            entry.setdefault("since_start", dict.fromkeys(FLOW_OUTCOMES, 0))
            entry["rates"] = _rates_of(rates, f"flow.{flow}.")
        return {
            "tenants": tenants,
            "flows": flows,
            "destinations": stored["destinations"],
            "rates": rates,
        }

    def destinations(self, actor: str, via: str) -> Deferred[list[dict[str, Any]]]:
        """Every destination with work or a pause: queued, held, oldest pending, paused."""
        done: Deferred[Any] = self.status(actor, via)
        done.addCallback(
            lambda status: [
                {"destination": address, **entry}
                for address, entry in sorted(status["destinations"].items())
            ]
        )
        return done


def _connection(state: Mapping[str, Any], live: bool) -> str:
    """up (a connection is open), down (its connects fail), idle (none needed now),
    unknown (no running dispatcher: the command line)."""
    if not live:
        return "unknown"
    if state.get("connected"):
        return "up"
    return "down" if state.get("down") else "idle"


def _rates_of(rates: Mapping[str, Mapping[str, float]], prefix: str) -> dict[str, Any]:
    """The minute and hour rates of the counters named ``prefix...``, by the rest of
    their name (a flow's or a destination's own rates, for its status entry)."""
    return {
        window: {
            name[len(prefix) :]: rate for name, rate in found.items() if name.startswith(prefix)
        }
        for window, found in rates.items()
    }


def status_rows(connection: Connection, now: float, history: bool = False) -> dict[str, Any]:
    """Flow and destination counts from the database (a read, off the database thread)."""
    flows: dict[str, dict[str, Any]] = {
        row.flow_id: {
            "app_id": row.app_id,
            "tenant": row.tenant,
            "name": row.name,
            "enabled": row.enabled,
            "routed": sum(row.executions.values()),
            "executions": dict(sorted(row.executions.items())),
        }
        for row in overview.flow_counts(connection)
    }
    if history:
        received = search.flow_totals(connection)
        series = logs.per_minute(connection, "execution", now - 3600.0, 60)
        for flow_id in set(received) | set(series):
            entry = flows.setdefault(
                flow_id,
                {"app_id": "", "tenant": "", "name": "", "enabled": False, "routed": 0},
            )
            entry.setdefault("executions", {})
        for flow_id, entry in flows.items():
            entry["received"] = received.get(flow_id, 0)
            entry["last_hour"] = series.get(flow_id, [0] * 60)
    found: dict[str, dict[str, Any]] = {}
    pauses = destinations.pauses(connection)

    def entry_of(address: str) -> dict[str, Any]:
        return found.setdefault(
            address,
            {
                "queued": 0,
                "held": 0,
                "delivered": 0,
                "skipped": 0,
                "attempts": 0,
                "oldest_pending_age": None,
                "paused": address in pauses,
                "paused_by": pauses[address].paused_by if address in pauses else None,
            },
        )

    for row in overview.destination_counts(connection):
        entry = entry_of(destinations.address_of(row.endpoint))
        if row.state in entry:
            entry[row.state] += row.count
        entry["attempts"] += row.attempts
        if row.state in outbox.OPEN_STATES and row.oldest_created_at is not None:
            age = round(max(0.0, now - row.oldest_created_at), 3)
            if entry["oldest_pending_age"] is None or age > entry["oldest_pending_age"]:
                entry["oldest_pending_age"] = age
    for address in pauses:
        entry_of(address)
    if history:
        # Every destination of a stored flow, also before its first delivery.
        for app in flowstore.load_apps(connection, None):
            for flow in app.flows:
                for action in flow.actions:
                    entry_of(destinations.address_of(action.endpoint))
    return {"flows": flows, "destinations": found}
