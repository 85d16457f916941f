"""Which modules the install compiles with mypyc, and which variant this process runs.

The per-message work (framing, the MSH read, the ACK, HL7 escaping, the message parse,
the routing, the search keys, the render of templates that are text and plain lookups and
the checks of a rendered body, an action's render and a delivery's timing and response
policy) is plain typed Python, compiled to C extensions by ``pip install``
(``setup.py`` reads the list below). The ``.py`` files stay the one source of truth and
the fallback: an install with ``UDSGATEWAY_PURE=1`` in the environment compiles nothing,
and Python then imports the same modules as source. Behaviour is the same either way;
only the speed differs.

This module imports nothing of the gateway when loaded: :func:`variant` imports the
listed modules by name when asked.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

__all__ = ["COMPILED_MODULES", "PURE_ENV", "module_variant", "stale_modules", "variant"]

PURE_ENV = "UDSGATEWAY_PURE"
"""Set to a non-empty value other than ``0`` at install time to build without compiling."""

COMPILED_MODULES: tuple[str, ...] = (
    "udsgateway.wire.framing",
    "udsgateway.hl7.header",
    "udsgateway.hl7.keys",
    "udsgateway.hl7.paths",
    "udsgateway.hl7.batch",
    "udsgateway.hl7.ack",
    "udsgateway.hl7.message",
    "udsgateway.inbound.routing",
    "udsgateway.mapping.lookups",
    "udsgateway.outbound.policy",
    "udsgateway.outbound.render",
)
"""The modules ``setup.py`` compiles, in dependency order."""


def _source_path(name: str) -> Path:
    """Where the ``.py`` file of module ``name`` lives in this source tree or install."""
    package = Path(__file__).resolve().parent
    return package.joinpath(*name.split(".")[1:]).with_suffix(".py")


def module_variant(name: str) -> str:
    """``compiled`` when module ``name`` was loaded from an extension, else ``pure``."""
    module = importlib.import_module(name)
    loaded = getattr(module, "__file__", None) or ""
    return "pure" if loaded.endswith(".py") else "compiled"


def variant() -> str:
    """``compiled``, ``pure`` or ``mixed`` (some modules compiled, some not) for this process."""
    kinds = {module_variant(name) for name in COMPILED_MODULES}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def stale_modules(record: Path | None = None) -> list[str]:
    """Compiled modules whose ``.py`` source changed since their extension was built.

    An editable install keeps the extensions beside their sources: after editing a
    compiled module, ``make install`` (or ``pip install -e .``) builds it again. Until
    then Python keeps loading the old extension, and this names it. The build records
    each source's SHA-256 in ``compiled-sources.json``; without that record (a wheel
    install, or a pure build) nothing is reported. ``record`` is for tests.
    """
    if record is None:
        record = Path(__file__).resolve().parent / "compiled-sources.json"
    try:
        built = json.loads(record.read_text("utf-8"))
    except (OSError, ValueError):
        return []
    stale = []
    for name in COMPILED_MODULES:
        if module_variant(name) != "compiled":
            continue
        source = _source_path(name)
        try:
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            continue
        if built.get(name) != digest:
            stale.append(name)
    return stale
