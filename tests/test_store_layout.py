"""The store is only SQL, and every table has one module that writes it.

- Importing any store module loads nothing of the gateway outside the store:
  neither the HL7 parser nor Liquid (nor the flows model, which imports both).
- Every INSERT, UPDATE and DELETE on a table is in that table's module (OWNERS);
  a module reads another module's table only where READS says so (a join).
- The command line's modules do not import each other at call time.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import udsgateway.store
from udsgateway.store import schema

STORE = Path(udsgateway.store.__file__).parent

#: Each table, and the one module whose statements write it.
OWNERS = {
    "messages": "messages",
    "executions": "executions",
    "deliveries": "outbox",
    "logs": "logs",
    "audit": "audit",
    "apps": "apps",
    "flows": "apps",
    "meta": "meta",
    "destination_pauses": "destinations",
    "message_keys": "search",
    "users": "users",
    "api_tokens": "users",
    "login_failures": "users",
}

#: Tables a module reads (joins, subqueries) without owning them.
READS = {
    "messages": {"executions", "deliveries"},  # origins; retention's finished messages
    "executions": {"messages"},  # pending work and the operators' list show the message
    "logs": {"flows"},  # a log line shows its flow's App ID
    # The message browser: a message with its executions and deliveries (its log
    # lines are read by ``logs.log_lines``, the one query of the execution log).
    "search": {"messages", "executions", "deliveries"},
    # The operators' status: counts of executions and deliveries per flow, destination.
    "overview": {"executions", "deliveries", "flows"},
    "gauges": {"deliveries", "executions"},  # the metrics' open work
}

#: Modules that define tables and their DDL (no rows written).
SCHEMA_MODULES = {"schema"}

_WRITES = {"insert", "update", "delete"}


def store_modules() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules([str(STORE)]))


class _Tables(ast.NodeVisitor):
    """The tables a module's source names, and those its statements write."""

    def __init__(self) -> None:
        self.referenced: set[str] = set()
        self.written: set[str] = set()
        self._aliases: list[dict[str, str]] = [{}]

    def table(self, node: ast.expr) -> str | None:
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "schema"
            and node.attr in schema.metadata.tables
        ):
            return node.attr
        if isinstance(node, ast.Name):
            for scope in reversed(self._aliases):
                if node.id in scope:
                    return scope[node.id]
        return None

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._aliases.append({})
        self.generic_visit(node)
        self._aliases.pop()

    def visit_Assign(self, node: ast.Assign) -> None:
        targets: list[ast.expr] = []
        values: list[ast.expr] = []
        for target in node.targets:
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                targets += target.elts
                values += node.value.elts
            else:
                targets.append(target)
                values.append(node.value)
        for target, value in zip(targets, values, strict=False):
            found = self.table(value)
            if found is not None and isinstance(target, ast.Name):
                self._aliases[-1][target.id] = found
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        found = self.table(node)
        if found is not None:
            self.referenced.add(found)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        target: ast.expr | None = None
        if isinstance(function, ast.Name) and function.id in _WRITES and node.args:
            target = node.args[0]  # update(table), delete(table), insert(table)
        elif isinstance(function, ast.Attribute) and function.attr in _WRITES:
            target = function.value  # table.insert(), table.update(), table.delete()
        elif isinstance(function, ast.Name) and function.id == "prepared_insert" and node.args:
            target = node.args[0]
        elif isinstance(function, ast.Name) and function.id == "insert_with_ids":
            target = node.args[1] if len(node.args) > 1 else None
        if target is not None:
            found = self.table(target)
            if found is not None:
                self.written.add(found)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # Raw SQL: "INSERT INTO x", "UPDATE x", "DELETE FROM x".
        if isinstance(node.value, str):
            words = node.value.replace("(", " ").split()
            for index, word in enumerate(words[:-1]):
                upper = word.upper()
                name = words[index + 1]
                if name not in schema.metadata.tables:
                    continue
                before = words[index - 1].upper() if index else ""
                if (before, upper) in (("INSERT", "INTO"), ("DELETE", "FROM")) or word == "UPDATE":
                    self.written.add(name)


def tables_of(source: str) -> _Tables:
    found = _Tables()
    found.visit(ast.parse(source))
    return found


def problems(module: str, source: str) -> list[str]:
    """How a store module's source breaks the ownership rules."""
    if module in SCHEMA_MODULES:
        return []
    found = tables_of(source)
    wrong = [
        f"{module} writes {table}, owned by {OWNERS.get(table, 'nobody')}"
        for table in sorted(found.written)
        if OWNERS.get(table) != module
    ]
    owned = {table for table, owner in OWNERS.items() if owner == module}
    wrong += [
        f"{module} reads {table} (owned by {OWNERS[table]}): not declared in READS"
        for table in sorted(found.referenced - owned - READS.get(module, set()))
    ]
    return wrong


class TableOwnershipTests(SynchronousTestCase):
    def test_every_table_has_one_owner(self) -> None:
        """OWNERS names every table of the schema, and only modules that exist."""
        self.assertEqual(set(OWNERS), set(schema.metadata.tables))
        self.assertLessEqual(set(OWNERS.values()), set(store_modules()))

    def test_statements_live_in_their_tables_module(self) -> None:
        """No store module writes a table it does not own, or reads one undeclared."""
        found = {
            module: problems(module, (STORE / f"{module}.py").read_text())
            for module in store_modules()
        }
        self.assertEqual({m: p for m, p in found.items() if p}, {})

    def test_each_owner_writes_its_tables(self) -> None:
        """The checker sees the owners' own statements (it is not blind)."""
        written: dict[str, set[str]] = {}
        for module in store_modules():
            if module not in SCHEMA_MODULES:
                source = (STORE / f"{module}.py").read_text()
                written[module] = tables_of(source).written
        for table, owner in OWNERS.items():
            self.assertIn(table, written[owner], f"{owner} should write {table}")

    def test_the_checker_fails_on_a_stranger(self) -> None:
        """Writes by another module, through an alias, a method or raw SQL, are caught."""
        sources = {
            "update(schema.executions).values(state='failed')": "executions",
            "e = schema.executions\nconnection.execute(update(e))": "executions",
            "def f():\n    a, d = schema.audit, schema.deliveries\n    d.delete()": "deliveries",
            "schema.audit.insert().values(who='x')": "audit",
            "prepared_insert(schema.logs, ('at',))": "logs",
            "insert_with_ids(connection, schema.messages, INSERT, rows)": "messages",
            "connection.exec_driver_sql('DELETE FROM meta WHERE 1')": "meta",
        }
        for source, table in sources.items():
            self.assertIn(table, tables_of(source).written, source)
            self.assertTrue(problems("retention", source), source)
        self.assertEqual(
            problems("outbox", "select(schema.apps.c.name)"),
            ["outbox reads apps (owned by apps): not declared in READS"],
        )


def _imports_in_subprocess(*modules: str) -> list[str]:
    """The gateway modules outside the store, and Liquid, that importing ``modules`` loads.

    One process for all of them: what importing one module loads is part of what
    importing them all loads, so an empty answer holds for each.
    """
    code = (
        f"import sys, {', '.join(modules)}\n"
        "print('\\n'.join(sorted(n for n in sys.modules if n == 'liquid'"
        " or n.startswith('liquid.')"
        " or (n.startswith('udsgateway.') and not n.startswith('udsgateway.store')))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.split()


class StoreImportTests(SynchronousTestCase):
    def test_store_modules_load_neither_hl7_nor_liquid(self) -> None:
        """The store's modules load no gateway module outside the store: not the HL7
        parser, not the flows model, not Liquid."""
        modules = ["udsgateway.store", *(f"udsgateway.store.{m}" for m in store_modules())]
        self.assertIn("udsgateway.store.outbox", modules)
        self.assertEqual(_imports_in_subprocess(*modules), [])

    def test_the_probe_sees_what_a_module_loads(self) -> None:
        """The probe reports what a module outside the store loads (it can fail)."""
        loaded = _imports_in_subprocess(
            "udsgateway.store.records", "udsgateway.mapping.templating"
        )
        self.assertIn("liquid", loaded)
        self.assertIn("udsgateway.mapping.templating", loaded)
        self.assertNotIn("udsgateway.store.records", loaded)


class CommandLineImportTests(SynchronousTestCase):
    def test_operate_does_not_import_main(self) -> None:
        """``cli.operate`` imports what it shares with ``cli.main`` from ``cli.common``, at
        module level: no import hidden in a function, no cycle."""
        path = Path(udsgateway.store.__file__).parent.parent / "cli" / "operate.py"
        tree = ast.parse(path.read_text())
        hidden = [
            node.lineno
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef)
            for node in ast.walk(function)
            if isinstance(node, ast.Import | ast.ImportFrom)
        ]
        self.assertEqual(hidden, [])
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module is not None
        }
        self.assertNotIn("udsgateway.cli.main", imported)
        self.assertIn("udsgateway.cli.common", imported)
