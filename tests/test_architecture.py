"""docs/architecture.md: the layers of the package and what each may import.

Reads every module's imports with ``ast`` (function-level imports included,
``TYPE_CHECKING`` ones too: a layer rule is about the design, not the run)
and checks them against the table below, which docs/architecture.md shows.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "udsgateway"

#: The layer of each module or subpackage (the first match of its dotted name).
LAYERS = {
    "udsgateway.clock": "base",
    "udsgateway.tomlreader": "base",
    "udsgateway.tomlwriter": "base",
    "udsgateway.interfaces": "base",
    "udsgateway.wire": "wire",
    "udsgateway.hl7": "hl7",
    "udsgateway.mapping": "mapping",
    "udsgateway.config": "model",
    "udsgateway.flows": "model",
    "udsgateway.store": "store",
    "udsgateway.cluster": "cluster",
    "udsgateway.inbound": "inbound",
    "udsgateway.outbound": "outbound",
    "udsgateway.assembly": "service",
    "udsgateway.flowstore": "service",
    "udsgateway.service": "service",
    "udsgateway.tap": "service",
    "udsgateway.manhole": "service",
    "udsgateway.admin": "service",
    "udsgateway.peers": "peers",
    "udsgateway.cli": "cli",
    "udsgateway.testing": "testing",
    "udsgateway.__main__": "cli",
    "udsgateway": "base",
}

#: What each layer may import besides itself.
ALLOWED = {
    "base": set(),
    "wire": {"base"},
    "hl7": {"base"},
    "mapping": {"model", "hl7", "base"},
    "model": {"hl7", "base"},
    "store": {"base"},
    "cluster": {"store", "model", "wire", "hl7", "base"},
    "inbound": {"wire", "hl7", "mapping", "model", "store", "base"},
    "outbound": {"wire", "hl7", "mapping", "model", "store", "base"},
    "service": {
        "cluster",
        "inbound",
        "outbound",
        "wire",
        "hl7",
        "mapping",
        "model",
        "store",
        "base",
    },
    "peers": {"wire", "hl7", "base"},
    "cli": {
        "service",
        "cluster",
        "inbound",
        "outbound",
        "peers",
        "wire",
        "hl7",
        "mapping",
        "model",
        "store",
        "base",
    },
    "testing": {
        "service",
        "cluster",
        "inbound",
        "outbound",
        "peers",
        "cli",
        "wire",
        "hl7",
        "mapping",
        "model",
        "store",
        "base",
    },
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> str | None:
    """The layer of a dotted module name of ours; None for other packages."""
    matches = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def imports_of(path: Path, package_root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, dotted name) of every import of ours in ``path``, at any depth."""
    name = module_name(path, package_root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from udsgateway import store`` names the subpackage store: judge
            # each name with its module, the longest match in LAYERS wins.
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, imported) for line, imported in found if imported.split(".")[0] == "udsgateway"]


def violations(package: Path = PACKAGE) -> list[str]:
    """One line per import that breaks the layer table, and per global reactor import."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        layer = layer_of(name)
        assert layer is not None, name
        for line, imported in imports_of(path, package):
            target = layer_of(imported)
            if target is None or target == layer or target in ALLOWED[layer]:
                continue
            where = path.relative_to(package.parent)
            problems.append(f"{where}:{line}: {layer} imports {target} ({imported})")
        if name != "udsgateway.tap":
            text = path.read_text()
            if re.search(
                r"^\s*(from twisted.internet import reactor|import twisted.internet.reactor)",
                text,
                re.M,
            ):
                problems.append(f"{path.relative_to(package.parent)}: imports the global reactor")
    return problems


def documented_layers() -> dict[str, set[str]]:
    """The "may import" column of docs/architecture.md's layer table."""
    text = (PACKAGE.parent.parent / "docs" / "architecture.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    table = {}
    for row in rows:
        layer, _modules, allowed = (cell.strip() for cell in row.strip("|").split("|"))
        table[layer] = set() if allowed == "nothing of ours" else set(allowed.split(", "))
    return table


class LayerTests(SynchronousTestCase):
    def test_the_document_shows_these_rules(self) -> None:
        """docs/architecture.md's table is the table this test enforces."""
        self.assertEqual(documented_layers(), ALLOWED)

    def test_every_module_has_a_layer(self) -> None:
        unknown = [
            module_name(path)
            for path in PACKAGE.rglob("*.py")
            if layer_of(module_name(path)) is None
        ]
        self.assertEqual(unknown, [])

    def test_no_module_imports_a_layer_it_must_not(self) -> None:
        self.assertEqual(violations(), [])

    def test_a_forbidden_import_is_noticed(self) -> None:
        """The check can fail: a store module importing HL7, a wire module importing
        the store through a relative import, the global reactor outside tap."""
        root = Path(self.mktemp()) / "udsgateway"
        files = {
            "__init__.py": "",
            "store/__init__.py": "",
            "store/bad.py": "from udsgateway.hl7.header import parse_header\n",
            "wire/__init__.py": "",
            "wire/worse.py": "def f():\n    from ..store import bad\n",
            "inbound/__init__.py": "",
            "inbound/loop.py": "from twisted.internet import reactor\n",
            "hl7/__init__.py": "",
            "hl7/header.py": "",
        }
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        self.assertEqual(
            violations(root),
            [
                "udsgateway/inbound/loop.py: imports the global reactor",
                "udsgateway/store/bad.py:1: store imports hl7"
                " (udsgateway.hl7.header.parse_header)",
                "udsgateway/wire/worse.py:2: wire imports store (udsgateway.store.bad)",
            ],
        )
