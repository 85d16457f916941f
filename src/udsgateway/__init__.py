"""udsgateway: an HL7 v2 gateway over MLLP and plain TCP, built on Twisted."""

from __future__ import annotations

__version__ = "0.1.0"
