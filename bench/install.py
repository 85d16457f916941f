"""Install the reference peers when they are missing, and report their versions.

- Node: ``npm install --prefix bench/peers/node --save-exact simple-hl7@3.3.0 @medplum/hl7@4.5.2``
  (each version checked with ``npm view`` first; a missing one is replaced by the closest
  published version, and the substitution recorded).
- MessageFoundry: ``python -m venv bench/peers/messagefoundry-venv`` then
  ``pip install messagefoundry==0.2.1`` in it.

``bench/peers/`` is gitignored. Run as ``python -m bench.install`` to install without measuring.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.servers import MF_VENV, NODE_MODULES, NODE_PREFIX, PEERS_DIR

NODE_PACKAGES: dict[str, str] = {"simple-hl7": "3.3.0", "@medplum/hl7": "4.5.2"}
MESSAGEFOUNDRY_VERSION = "0.2.1"

Progress = Callable[[str], None]


@dataclass
class InstallReport:
    """What was requested, what is installed, and what went wrong."""

    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def _print(message: str) -> None:
    print(message, flush=True)


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def installed_node_version(package: str) -> str | None:
    manifest = NODE_MODULES / package / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def installed_messagefoundry_version() -> str | None:
    python = MF_VENV / "bin" / "python"
    if not python.exists():
        return None
    proc = _run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('messagefoundry'))"],
        timeout=60,
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("-")[0])[:3])


def closest_version(wanted: str, published: list[str]) -> str:
    """The published version nearest to ``wanted``: same major first, then by distance."""
    stable = [v for v in published if "-" not in v] or published
    target = _version_key(wanted)

    def distance(version: str) -> tuple[int, int, int]:
        key = (*_version_key(version), 0, 0, 0)
        same_major = 0 if key[0] == target[0] else 1
        gap = sum(abs(a - b) * w for a, b, w in zip(key, target, (10**6, 10**3, 1), strict=False))
        return (same_major, gap, 0 if key >= target else 1)

    return min(stable, key=distance)


def _npm_resolve(npm: str, package: str, wanted: str, report: InstallReport) -> str | None:
    proc = _run([npm, "view", f"{package}@{wanted}", "version"], timeout=120)
    if proc.returncode == 0 and proc.stdout.strip() == wanted:
        return wanted
    listing = _run([npm, "view", package, "versions", "--json"], timeout=120)
    try:
        published = json.loads(listing.stdout)
    except ValueError:
        published = []
    if isinstance(published, str):
        published = [published]
    if not published:
        report.failures[package] = f"npm view {package} failed: {listing.stderr.strip()[-300:]}"
        return None
    chosen = closest_version(wanted, published)
    report.notes.append(f"{package}@{wanted} is not published; using the closest, {chosen}")
    return chosen


def ensure_node_peers(report: InstallReport, progress: Progress = _print) -> None:
    missing = {
        pkg: ver for pkg, ver in NODE_PACKAGES.items() if installed_node_version(pkg) != ver
    }
    if missing:
        npm = shutil.which("npm")
        if npm is None:
            for pkg in missing:
                report.failures[pkg] = "npm is not installed"
        else:
            specs: list[str] = []
            for pkg, wanted in NODE_PACKAGES.items():
                chosen = _npm_resolve(npm, pkg, wanted, report)
                if chosen is not None:
                    specs.append(f"{pkg}@{chosen}")
            if specs:
                progress(f"[install] npm install --prefix {NODE_PREFIX} {' '.join(specs)}")
                NODE_PREFIX.mkdir(parents=True, exist_ok=True)
                proc = _run(
                    [
                        npm,
                        "install",
                        "--prefix",
                        str(NODE_PREFIX),
                        "--save-exact",
                        "--no-audit",
                        "--no-fund",
                        *specs,
                    ]
                )
                if proc.returncode != 0:
                    for pkg in NODE_PACKAGES:
                        report.failures[pkg] = f"npm install failed: {proc.stderr.strip()[-500:]}"
    for pkg in NODE_PACKAGES:
        version = installed_node_version(pkg)
        if version is not None:
            report.versions[pkg] = version
            report.failures.pop(pkg, None)
    core = installed_node_version("@medplum/core")
    if core is not None:
        report.versions["@medplum/core"] = core


def ensure_messagefoundry(report: InstallReport, progress: Progress = _print) -> None:
    version = installed_messagefoundry_version()
    if version != MESSAGEFOUNDRY_VERSION:
        PEERS_DIR.mkdir(parents=True, exist_ok=True)
        if not (MF_VENV / "bin" / "python").exists():
            progress(f"[install] {sys.executable} -m venv {MF_VENV}")
            proc = _run([sys.executable, "-m", "venv", str(MF_VENV)], timeout=300)
            if proc.returncode != 0:
                report.failures["messagefoundry"] = f"venv failed: {proc.stderr.strip()[-500:]}"
                return
        progress(f"[install] {MF_VENV}/bin/pip install messagefoundry=={MESSAGEFOUNDRY_VERSION}")
        proc = _run(
            [
                str(MF_VENV / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"messagefoundry=={MESSAGEFOUNDRY_VERSION}",
            ],
            timeout=900,
        )
        if proc.returncode != 0:
            report.failures["messagefoundry"] = f"pip install failed: {proc.stderr.strip()[-800:]}"
            return
        version = installed_messagefoundry_version()
    if version is None:
        report.failures["messagefoundry"] = "installed, but its version cannot be read"
        return
    report.versions["messagefoundry"] = version


def ensure_peers(progress: Progress = _print) -> InstallReport:
    report = InstallReport()
    progress("[install] checking reference peers in bench/peers/")
    ensure_node_peers(report, progress)
    ensure_messagefoundry(report, progress)
    for name, version in sorted(report.versions.items()):
        progress(f"[install] {name} {version}")
    for name, reason in sorted(report.failures.items()):
        progress(f"[install] {name} NOT available: {reason}")
    return report


def main() -> int:
    report = ensure_peers()
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
