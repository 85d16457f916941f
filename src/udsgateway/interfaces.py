"""The seams between the inbound pipeline, the executor and the delivery engine.

A message travels ingest -> flow runner (the executor) -> delivery queue (the
dispatcher); an outcome travels back dispatcher -> delivery outcomes (the
executor). Each side holds the other only as one of these interfaces, checked
with ``zope.interface.verify.verifyObject`` in the tests, so the inbound and
outbound layers never import each other. The composition root
(``udsgateway.assembly``) connects them.

This module is the base layer: it names the store's records (``CommitResult``,
``NewDelivery``, ``Finished``, ``Settlement``, ``Origin``) in its docstrings
only, and types them ``Any``; each provider declares the concrete types.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface


class IFlowRunner(Interface):
    """What ingest asks of the flows that run after a message is stored."""

    def first_actions(tenant: str, flow_ids: Sequence[str], raw: bytes) -> tuple[Any, ...]:
        """Render the first action of each flow before the message's commit (the fold).

        One ``NewDelivery`` or None (not rendered) per flow, in order; or an empty
        tuple: none rendered, the executor renders them after the commit.
        """

    def stored(result: Any) -> None:
        """A message's commit finished (its ``CommitResult``): its executions may run."""

    def watch(execution_id: int, timeout: float) -> Deferred[Any]:
        """A Deferred that fires with the execution's ``Finished`` state, or fails
        after ``timeout`` seconds."""

    def is_full(destination: str) -> bool:
        """Backpressure: True when ``destination``'s queue is at its cap."""


class IDeliveryQueue(Interface):
    """What the executor asks of the delivery engine."""

    def enqueued(lane: str, destination: str, protocol: str, count: int = 1) -> None:
        """``count`` deliveries were committed to ``lane`` of ``destination``."""

    def is_full(destination: str) -> bool:
        """True when ``destination``'s queue is at its cap."""


class IDeliveryOutcomes(Interface):
    """What the delivery engine tells the executor about recorded outcomes."""

    def after_record(connection: Any, settled: list[Any], found: Any) -> Any:
        """In the database thread, inside the transaction that records outcomes.

        ``connection`` is that transaction, ``settled`` the ``Settlement`` rows
        recorded, ``found`` each delivery's ``Origin`` (execution, step) by id.
        What it returns reaches ``on_recorded`` after the commit.
        """

    def on_recorded(group: Any) -> None:
        """In the reactor, after the commit, with what ``after_record`` returned."""


class FencedError(Exception):
    """This node no longer holds a lane's bucket at the token's epoch: nothing is sent
    or recorded for the lane here any more (another node has it, or will)."""


class ILaneFence(Interface):
    """What the delivery engine asks before sending for a lane, when several nodes share
    the database (``udsgateway.cluster.fence``); a single gateway's fence always allows."""

    def token(lane: str) -> object | None:
        """The lane's fencing token now (its bucket and epoch), or None: not this node's."""

    def may_send(token: object) -> bool:
        """Checked before each frame on the monotonic clock: the token is still good."""

    def check(connection: object, token: object) -> None:
        """Inside a claim's or an outcome's transaction: raise ``FencedError`` when the token
        is no longer this node's on the database (a takeover bumped its epoch)."""
