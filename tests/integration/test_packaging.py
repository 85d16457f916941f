"""The package as built for installing: a wheel of the source tree, built offline."""

from __future__ import annotations

import os
import shutil
import sys
import zipfile

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import REPO, new_directory, run_command


class WheelTests(SynchronousTestCase):
    """``pip wheel`` of the project."""

    def test_wheel_builds_without_warnings_about_packages(self) -> None:
        """The wheel holds the segment catalogue (udsgateway/data) and the build does
        not warn that a data folder is absent from the packages. Built pure
        (``UDSGATEWAY_PURE=1``, the fallback): no extension in it, every compiled
        module's source is; the compiled build is what ``make install`` tests."""
        directory = new_directory(self)
        source = directory / "source"
        shutil.copytree(
            REPO / "src",
            source / "src",
            ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", "dropin.cache", "*.so", "compiled-sources.json"
            ),
        )
        for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
            shutil.copy(REPO / name, source / name)
        result = run_command(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--verbose",
                "--wheel-dir",
                directory / "dist",
                source,
            ],
            cwd=directory,
            env={**os.environ, "UDSGATEWAY_PURE": "1"},
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertNotIn("absent from the `packages` configuration", output)
        (wheel,) = (directory / "dist").glob("udsgateway-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        self.assertIn("udsgateway/data/segments.json", names)
        self.assertIn("udsgateway/py.typed", names)
        self.assertIn("twisted/plugins/udsgateway_plugin.py", names)
        self.assertIn("udsgateway/wire/framing.py", names)
        self.assertIn("udsgateway/compiled.py", names)
        self.assertEqual([name for name in names if name.endswith(".so")], [])
        # Every package of the source tree is listed in setup.cfg (none left out).
        packages = sorted(
            path.parent.relative_to(REPO / "src").as_posix()
            for path in (REPO / "src" / "udsgateway").rglob("__init__.py")
        )
        self.assertEqual([p for p in packages if f"{p}/__init__.py" not in names], [])
