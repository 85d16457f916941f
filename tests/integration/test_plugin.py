"""``twistd`` finds the udsgateway plugin, from the editable install and from a wheel.

A namespace ``twisted/plugins`` folder (no ``__init__.py``) is what lets
Twisted's plugin system see our plugin wherever the package is installed;
an ``__init__.py`` there would shadow Twisted's own ``twisted.plugins``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
import zipfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.helpers import REPO, TWISTD, new_directory, run_command

PLUGIN = Path("twisted") / "plugins" / "udsgateway_plugin.py"
#: A plugin's line in ``twistd --help``: its name, indented, then its description.
_LISTED = re.compile(r"^\s+udsgateway\s+HL7", re.MULTILINE)

#: What a wheel of the repository is built from (the optional ones when present).
_SOURCES = ("setup.cfg", "pyproject.toml")
_OPTIONAL_SOURCES = ("setup.py", "MANIFEST.in", "README.md", "CHANGELOG.md", "LICENSE")


def _where(python_code: str) -> str:
    return f"import sys, udsgateway, twisted.plugins.udsgateway_plugin as p; {python_code}"


class PluginLayoutTests(SynchronousTestCase):
    """The source tree keeps ``twisted/plugins`` a namespace folder."""

    def test_no_init_files(self) -> None:
        """There is no ``__init__.py`` in src/twisted nor in src/twisted/plugins."""
        self.assertTrue((REPO / "src" / PLUGIN).is_file())
        self.assertFalse((REPO / "src" / "twisted" / "__init__.py").exists())
        self.assertFalse((REPO / "src" / "twisted" / "plugins" / "__init__.py").exists())


class EditableInstallTests(SynchronousTestCase):
    """The development install (editable, compat mode) exposes the plugin."""

    def test_twistd_lists_plugin(self) -> None:
        """``twistd --help`` lists udsgateway, found in the repository's src folder."""
        directory = new_directory(self)
        where = run_command(
            [sys.executable, "-c", _where("print(udsgateway.__file__); print(p.__file__)")],
            cwd=directory,
        )
        self.assertEqual(where.returncode, 0, where.stderr)
        self.assertEqual(
            [Path(line) for line in where.stdout.splitlines()],
            [REPO / "src" / "udsgateway" / "__init__.py", REPO / "src" / PLUGIN],
        )
        listed = run_command([TWISTD, "--help"], cwd=directory)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, _LISTED)

    def test_twistd_udsgateway_help(self) -> None:
        """``twistd udsgateway --help`` prints the plugin's options."""
        directory = new_directory(self)
        result = run_command([TWISTD, "udsgateway", "--help"], cwd=directory)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config=", result.stdout)
        self.assertIn("twistd [options] udsgateway", result.stdout)


class RegularInstallTests(SynchronousTestCase):
    """A wheel of the repository, installed normally, exposes the plugin."""

    def build_and_install(self, directory: Path) -> tuple[Path, Path]:
        """Build a wheel of the repository and install it into ``directory/site``.

        The build runs on a copy of the package sources, so it leaves no build
        folder or egg-info behind in the work tree. Returns the wheel and site.
        It is the pure build (``UDSGATEWAY_PURE=1``): what is tested here is where
        the plugin and the package are found, not the compiled hot path, whose
        build ``make install`` does (tests/test_compiled.py checks it loaded).
        """
        source = directory / "source"
        shutil.copytree(
            REPO / "src",
            source / "src",
            ignore=shutil.ignore_patterns(
                "__pycache__",
                "*.pyc",
                "*.egg-info",
                "dropin.cache",
                "*.so",
                "compiled-sources.json",
            ),
        )
        for name in _SOURCES:
            shutil.copy2(REPO / name, source / name)
        for name in _OPTIONAL_SOURCES:
            if (REPO / name).exists():
                shutil.copy2(REPO / name, source / name)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
        dist = directory / "dist"
        built = run_command(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source],
            cwd=directory,
            env={**os.environ, "UDSGATEWAY_PURE": "1"},
        )
        self.assertEqual(built.returncode, 0, built.stdout + built.stderr)
        (wheel,) = dist.glob("udsgateway-*.whl")
        site = directory / "site"
        installed = run_command(
            [*pip, "install", "--no-deps", "--no-index", "--target", site, wheel],
            cwd=directory,
        )
        self.assertEqual(installed.returncode, 0, installed.stdout + installed.stderr)
        return wheel, site

    def test_wheel_install(self) -> None:
        """The wheel holds the plugin module without any ``__init__.py`` under twisted/;
        with the installed copy first on the path, it is the copy that is imported
        and ``twistd`` lists and runs the plugin, and it does so even with the
        repository's src folder off the path entirely."""
        directory = new_directory(self)
        wheel, site = self.build_and_install(directory)

        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
        self.assertIn(PLUGIN.as_posix(), names)
        self.assertIn("udsgateway/tap.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([name for name in names if name.endswith("dropin.cache")])

        # PYTHONPATH prepended to the development environment: the installed
        # copy shadows the repository's src folder.
        prepended = dict(os.environ)
        prepended["PYTHONPATH"] = os.pathsep.join(
            [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        where = run_command(
            [sys.executable, "-c", _where("print(udsgateway.__file__); print(p.__file__)")],
            cwd=directory,
            env=prepended,
        )
        self.assertEqual(where.returncode, 0, where.stderr)
        self.assertEqual(
            [Path(line) for line in where.stdout.splitlines()],
            [site / "udsgateway" / "__init__.py", site / PLUGIN],
        )
        listed = run_command([TWISTD, "--help"], cwd=directory, env=prepended)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, _LISTED)

        # Only the installed copy and the dependencies: no site processing, so
        # the editable install's path entry for src is not there at all.
        isolated = dict(os.environ)
        isolated["PYTHONPATH"] = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
        where = run_command(
            [sys.executable, "-S", "-c", _where("print(*sys.path, sep='\\n')")],
            cwd=directory,
            env=isolated,
        )
        self.assertEqual(where.returncode, 0, where.stderr)
        self.assertNotIn(str(REPO / "src"), where.stdout.splitlines())
        listed = run_command([sys.executable, "-S", TWISTD, "--help"], cwd=directory, env=isolated)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertRegex(listed.stdout, _LISTED)
        helped = run_command(
            [sys.executable, "-S", TWISTD, "udsgateway", "--help"], cwd=directory, env=isolated
        )
        self.assertEqual(helped.returncode, 0, helped.stderr)
        self.assertIn("--config=", helped.stdout)
