"""The response policy and the timing of deliveries.

What a destination's reply means for a delivery (``judge``: delivered,
retried or held), and how long to wait for a connection, for a reply and
before the next attempt (``Timing``). The defaults are the flow model's
(``udsgateway.flows``): an action's values travel with each of its deliveries
in the delivery's stored policy, and fall back to those defaults.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from attrs import evolve, frozen

from udsgateway.flows import DEFAULT_DECISIONS, DEFAULT_MAX_RETRIES, DEFAULT_TIMING
from udsgateway.hl7.ack import parse_reply
from udsgateway.outbound.errors import DeliveryError
from udsgateway.store.records import DELIVERED, HELD, QUEUED, Delivery, Settlement

SUCCESS, RETRY, HOLD = "success", "retry", "hold"
#: What a delivery's stored policy falls back to: the defaults of flows.py.
DEFAULT_POLICY: dict[str, Any] = {**DEFAULT_DECISIONS, "max_retries": DEFAULT_MAX_RETRIES}

#: Policy keys that carry an action's timing with each of its deliveries.
TIMING_KEYS = tuple(DEFAULT_TIMING)


@frozen
class Timing:
    """Timeouts and backoff of a destination (docs/guarantees.md "Default limits")."""

    connect_timeout: float = DEFAULT_TIMING["connect_timeout"]
    response_timeout: float = DEFAULT_TIMING["response_timeout"]
    backoff_initial: float = DEFAULT_TIMING["backoff_initial"]
    backoff_max: float = DEFAULT_TIMING["backoff_max"]
    reply_gap: float = 0.1  # plain TCP: an idle gap ends the reply
    max_reply_size: int = 1024 * 1024

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failures`` failures in a row (exponential, capped)."""
        delay = min(self.backoff_initial * (2 ** min(failures - 1, 60)), self.backoff_max)
        return delay * (1 + 0.1 * rng.random()) if rng is not None else delay

    def with_policy(self, policy: Mapping[str, Any]) -> Timing:
        """This timing with a delivery's own values (its action's, stored in its policy)."""
        values = {key: float(policy[key]) for key in TIMING_KEYS if key in policy}
        # Every delivery asks, and nearly every policy repeats its endpoint's timing:
        # then this one serves (an evolve to an equal Timing costs microseconds).
        if all(getattr(self, key) == value for key, value in values.items()):
            return self
        return evolve(self, **values)  # type: ignore[arg-type]


def judge(delivery: Delivery, reply_bytes: bytes, now: float, nak_retries: int) -> Settlement:
    """Turn a destination's reply into the delivery's new state (the response policy).

    Raises DeliveryError for a reply that cannot be trusted (garbled, no MSA,
    or an MSA-2 other than the MSH-10 sent): the connection is then closed.
    """
    reply = parse_reply(reply_bytes)
    if reply.ack_code is None or reply.problem:
        raise DeliveryError(f"unusable reply: {reply.problem or 'no MSA'}")
    if reply.control_id != delivery.control_id:
        raise DeliveryError("reply MSA-2 does not match the MSH-10 sent")
    policy = {**DEFAULT_POLICY, **delivery.policy}
    decision = policy.get(reply.ack_code, HOLD)
    attempts = delivery.attempts + 1
    if decision == SUCCESS:
        return Settlement(delivery.id, DELIVERED, attempts, 0.0, "", reply_bytes, reply.ack_code)
    if decision == RETRY and nak_retries < int(policy["max_retries"]):
        return Settlement(
            delivery.id,
            QUEUED,
            attempts,
            now,
            f"{reply.ack_code} (retry {nak_retries + 1})",
            reply_bytes,
            reply.ack_code,
        )
    reason = f"{reply.ack_code} from destination" + (
        f" after {nak_retries} retries" if decision == RETRY else ""
    )
    if reply.error_code:
        reason += f", ERR {reply.error_code}"
    return Settlement(delivery.id, HELD, attempts, 0.0, reason, reply_bytes, reply.ack_code)
