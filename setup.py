"""Build script: compiles the per-message hot path with mypyc (metadata is in setup.cfg).

The modules listed in ``src/udsgateway/compiled.py`` are compiled to C extensions from
their typed ``.py`` sources, which stay beside them as the one source of truth. With
``UDSGATEWAY_PURE=1`` in the environment nothing is compiled and the package is pure
Python (the fallback; the test suite runs on both).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _compiled_modules() -> list[str]:
    """COMPILED_MODULES from src/udsgateway/compiled.py, read without importing it."""
    tree = ast.parse((HERE / "src" / "udsgateway" / "compiled.py").read_text("utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "COMPILED_MODULES"
            and node.value is not None
        ):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("COMPILED_MODULES not found in src/udsgateway/compiled.py")


def _ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("UDSGATEWAY_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify

    modules = _compiled_modules()
    paths = ["src/" + name.replace(".", "/") + ".py" for name in modules]
    # What was compiled, so that an editable install can tell when a source changed
    # after its extension was built (udsgateway.compiled.stale_modules).
    digests = {
        name: hashlib.sha256((HERE / path).read_bytes()).hexdigest()
        for name, path in zip(modules, paths, strict=True)
    }
    (HERE / "src" / "udsgateway" / "compiled-sources.json").write_text(
        json.dumps(digests, indent=1, sort_keys=True) + "\n", "utf-8"
    )
    return mypycify(
        ["--config-file", "pyproject.toml", *paths],
        opt_level="3",
        group_name="udsgateway",
    )


setup(ext_modules=_ext_modules())
