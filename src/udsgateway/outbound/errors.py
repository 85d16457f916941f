"""Why a delivery attempt got no usable answer (the message is sent again later).

Each error carries ``outcome``: the attempt's outcome for the counters
(``udsgw_outbound_attempts_total``, the status endpoint), one of the fixed
``ATTEMPT_OUTCOMES``: never text from a message or a reply.
"""

from __future__ import annotations

#: The outcome of a delivery attempt that got an ACK, by its MSA-1 code.
ACK_OUTCOMES = {
    "AA": "accepted",
    "CA": "accepted",
    "AE": "error",
    "CE": "error",
    "AR": "rejected",
    "CR": "rejected",
}
#: Every outcome an attempt is counted under (a fixed enum: metric label values).
ATTEMPT_OUTCOMES = (
    "accepted",  # AA or CA
    "error",  # AE or CE: an application error
    "rejected",  # AR or CR
    "other_ack",  # an MSA-1 code outside HL7 table 0008
    "timeout",  # no reply within the response timeout
    "connect_failed",  # refused, timed out, or in the reconnect backoff
    "connection_lost",  # closed before the reply
    "stale_connection",  # a reused connection the destination had closed: sent again at once
    "protocol_error",  # a reply that cannot be trusted (garbled, no MSA, wrong MSA-2, too large)
    "stopped",  # the gateway stopping
)


def ack_outcome(code: str) -> str:
    """The attempt outcome of a reply with MSA-1 ``code``."""
    return ACK_OUTCOMES.get(code, "other_ack")


class DeliveryError(Exception):
    """An attempt that did not get a usable answer; the message is sent again later."""

    outcome = "protocol_error"


class ConnectError(DeliveryError):
    """No connection to the destination (refused, timed out, or in its reconnect backoff)."""

    outcome = "connect_failed"


class ReplyTimeoutError(DeliveryError):
    """No reply within the response timeout (the connection is closed)."""

    outcome = "timeout"


class ConnectionLostError(DeliveryError):
    """The connection closed before the reply."""

    outcome = "connection_lost"


class StoppedError(DeliveryError):
    """The destination stopped (the gateway stopping) before the exchange."""

    outcome = "stopped"


class StaleConnectionError(DeliveryError):
    """The destination had closed a reused connection before reading the message.

    Not a failure of the message or the destination (many receivers close
    after every ACK): it is sent again at once on a new connection.
    """

    outcome = "stale_connection"
