"""Which build of the hot path this run tests: compiled with mypyc, or pure Python.

``make test`` runs the suite on the compiled build (``UDSGATEWAY_EXPECT_VARIANT=compiled``)
and the tests of the compiled modules again on the pure build (``=pure``); each run checks
here that it really got the variant it meant to test. Run directly, without the variable,
the build must at least be one or the other, never a mix, and not out of date.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from udsgateway import compiled

EXPECT = os.environ.get("UDSGATEWAY_EXPECT_VARIANT", "")


class VariantTests(SynchronousTestCase):
    def test_the_expected_variant_is_loaded(self) -> None:
        """Every listed module comes from an extension (``.so``) in the compiled build and
        from its ``.py`` source in the pure one."""
        variant = compiled.variant()
        if EXPECT:
            self.assertEqual(variant, EXPECT)
        self.assertIn(variant, ("compiled", "pure"))
        suffix = ".so" if variant == "compiled" else ".py"
        for name in compiled.COMPILED_MODULES:
            path = importlib.import_module(name).__file__ or ""
            self.assertTrue(path.endswith(suffix), f"{name} loaded from {path}")

    def test_the_framer_is_from_the_expected_build(self) -> None:
        """The check the issue names, spelled out for the framer."""
        from udsgateway.wire import framing

        path = framing.__file__ or ""
        if EXPECT == "compiled":
            self.assertTrue(path.endswith(".so"), path)
        elif EXPECT == "pure":
            self.assertTrue(path.endswith("framing.py"), path)
        else:
            self.assertTrue(path.endswith((".so", ".py")), path)

    def test_no_extension_is_out_of_date(self) -> None:
        """An edited compiled module must be built again (``make install``) before its
        tests mean anything: the old extension would still be the one loaded."""
        self.assertEqual(compiled.stale_modules(), [])


class StaleTests(SynchronousTestCase):
    def record(self, digests: dict[str, str]) -> Path:
        path = Path(self.mktemp())
        path.write_text(json.dumps(digests), "utf-8")
        return path

    def test_a_changed_source_is_named(self) -> None:
        """A record whose digest no longer matches the source names the module, in the
        compiled build (in the pure build the source is what runs: nothing is stale)."""
        sources = {
            name: hashlib.sha256(compiled._source_path(name).read_bytes()).hexdigest()
            for name in compiled.COMPILED_MODULES
        }
        changed = dict(sources, **{"udsgateway.hl7.header": "0" * 64})
        expected = ["udsgateway.hl7.header"] if compiled.variant() == "compiled" else []
        self.assertEqual(compiled.stale_modules(self.record(changed)), expected)
        self.assertEqual(compiled.stale_modules(self.record(sources)), [])

    def test_no_record_reports_nothing(self) -> None:
        self.assertEqual(compiled.stale_modules(Path(self.mktemp())), [])

    def test_the_list_names_modules_that_exist(self) -> None:
        for name in compiled.COMPILED_MODULES:
            self.assertTrue(compiled._source_path(name).is_file(), name)
