"""RESULTS.md: the generated report is replaced, the hand-written analysis is kept."""

from __future__ import annotations

from pathlib import Path

from bench.run import ANALYSIS_MARKER, write_results
from twisted.trial.unittest import SynchronousTestCase


class WriteResultsTests(SynchronousTestCase):
    def test_new_file_is_the_generated_report(self) -> None:
        path = Path(self.mktemp())
        write_results(path, "# Benchmark results\nrun 1\n")
        self.assertEqual(path.read_text(), "# Benchmark results\nrun 1\n")

    def test_the_analysis_after_the_marker_survives_a_new_run(self) -> None:
        path = Path(self.mktemp())
        analysis = f"{ANALYSIS_MARKER}\n## Analysis\nwhy the numbers are what they are\n"
        path.write_text("# Benchmark results\nrun 1\n\n" + analysis)
        write_results(path, "# Benchmark results\nrun 2\n")
        self.assertEqual(path.read_text(), "# Benchmark results\nrun 2\n\n" + analysis)
