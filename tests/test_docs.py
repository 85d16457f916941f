"""The documentation's promises that name tests: each named test exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

DOCS = Path(__file__).resolve().parent.parent / "docs"


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under ``heading``, as lists of cells."""
    section = markdown.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def resolve(name: str) -> object:
    """``module.Class.test`` under the ``tests`` package, or raise."""
    module_name, class_name, method_name = name.rsplit(".", 2)
    module = importlib.import_module(f"tests.{module_name}")
    return getattr(getattr(module, class_name), method_name)


class FaultMatrixTests(SynchronousTestCase):
    """docs/guarantees.md: every fault row names the tests that prove it."""

    def test_every_fault_row_names_existing_tests(self) -> None:
        rows = table_rows((DOCS / "guarantees.md").read_text(), "## Faults")
        self.assertGreaterEqual(len(rows), 18)
        for fault, _expected, tests in rows:
            names = re.findall(r"`([\w.]+)`", tests)
            self.assertTrue(names, f"no test named for: {fault}")
            for name in names:
                try:
                    found = resolve(name)
                except (ImportError, AttributeError, ValueError) as error:
                    self.fail(f"{fault}: {name} does not exist ({error})")
                self.assertTrue(callable(found), name)

    def test_a_missing_test_is_noticed(self) -> None:
        """The check can fail: a name that does not exist is reported."""
        self.assertRaises(AttributeError, resolve, "test_docs.FaultMatrixTests.test_nothing")
        self.assertRaises(ImportError, resolve, "test_nowhere.Tests.test_nothing")
