"""udsgateway benchmark suite.

Everything here measures the gateway from the outside: the load generator speaks MLLP itself and
imports nothing from ``udsgateway``, and every number is reported as a ratio against reference
servers run in the same session on the same machine. See ``bench/README.md``.
"""

from __future__ import annotations
