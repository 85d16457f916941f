"""The gateway's log lines as twistd prints them: the text carries the IDs an operator
searches for (docs/operations.md, "No PHI in logs")."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import udsgateway

#: Fields that identify what a line is about, never PHI: each must be in the text.
IDENTIFYING = ("control_id", "lane", "delivery")
LEVELS = {"debug", "info", "warn", "error", "critical", "failure"}


def log_calls(path: Path) -> list[tuple[int, str, set[str]]]:
    """(line, format string, keyword names) of every ``log.<level>("...", ...)`` call."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        target = node.func.value
        if not (isinstance(target, ast.Name) and target.id == "log"):
            continue
        if node.func.attr not in LEVELS or not node.args:
            continue
        text = node.args[0]
        if isinstance(text, ast.Constant) and isinstance(text.value, str):
            names = {k.arg for k in node.keywords if k.arg is not None}
            calls.append((node.lineno, text.value, names))
    return calls


class LogTextTests(SynchronousTestCase):
    """Every log call's format string."""

    def test_identifying_fields_in_the_text(self) -> None:
        """A control ID, lane or delivery ID given to a log call appears in its text
        (twistd prints the text, not the structured fields)."""
        package = Path(udsgateway.__file__).parent
        missing = []
        checked = 0
        for path in sorted(package.rglob("*.py")):
            for line, text, names in log_calls(path):
                for name in IDENTIFYING:
                    if name in names:
                        checked += 1
                        if "{" + name + "}" not in text:
                            missing.append(
                                f"{path.relative_to(package)}:{line}: {text!r} lacks {{{name}}}"
                            )
        self.assertGreater(checked, 10)
        self.assertEqual(missing, [])
