"""The twistd plugin: ``twistd udsgateway`` builds the service in :mod:`udsgateway.tap`."""

from __future__ import annotations

from twisted.application.service import ServiceMaker

udsgateway = ServiceMaker(
    "udsgateway",
    "udsgateway.tap",
    "HL7 v2 gateway: MLLP and plain TCP triggers, durable TCP actions",
    "udsgateway",
)
