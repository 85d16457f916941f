"""``python -m udsgateway``: the same as the ``udsgateway`` command."""

from __future__ import annotations

import sys

from udsgateway.cli.main import main

sys.exit(main())
