"""MessageFoundry reference config for the udsgateway benchmark: one inbound MLLP listener.

The listener commits every message durably (the ingress stage: message row + queue row + event
row in one SQLite transaction) and only then answers AA (MessageFoundry's ACK-on-receipt). The
router sends every message nowhere (``[]`` = UNROUTED), so the engine stores and routes but
delivers nothing. The port comes from ``MEFOR_VALUE_BENCH_MLLP_PORT``, set by
``bench/servers.py``.
"""

from messagefoundry import MLLP, env, inbound, router

inbound(
    "IB_BENCH_ALL",
    MLLP(port=env("bench_mllp_port", cast=int), max_connections=64),
    router="bench_router",
)


@router("bench_router")
def route(msg):  # type: ignore[no-untyped-def]
    return []
