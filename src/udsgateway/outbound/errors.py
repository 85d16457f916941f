"""Why a delivery attempt got no usable answer (the message is sent again later)."""

from __future__ import annotations


class DeliveryError(Exception):
    """An attempt that did not get a usable answer; the message is sent again later."""


class ConnectError(DeliveryError):
    """No connection to the destination (refused, timed out, or in its reconnect backoff)."""


class StaleConnectionError(DeliveryError):
    """The destination had closed a reused connection before reading the message.

    Not a failure of the message or the destination (many receivers close
    after every ACK): it is sent again at once on a new connection.
    """
