"""bench/stalls.py: which stall held each slow message."""

from __future__ import annotations

from bench.stalls import attribute, percentile, report, summary
from twisted.trial.unittest import SynchronousTestCase


class AttributeTests(SynchronousTestCase):
    STALLS = [
        ("database", 10.000, 20.0, "group commit: commit_inbound"),  # 10.000 - 10.020
        ("database", 10.005, 4.0, "_write"),  # 10.005 - 10.009
        ("reactor", 12.000, 5.0, "late timer"),  # 12.000 - 12.005
    ]

    def test_each_slow_message_gets_the_longest_overlapping_stall(self) -> None:
        sent = [
            (9.000, 1.0),  # fast: not listed
            (10.004, 6.0),  # waits 10.004 - 10.010: both database stalls overlap
            (12.004, 3.5),  # overlaps the reactor's late timer
            (15.000, 4.0),  # nothing overlaps
            (9.990, 9.0),  # ends at 9.999, before the stall begins
        ]
        slow = attribute(sent, self.STALLS, 3.0)
        self.assertEqual(
            [(at, stall[3] if stall else None) for at, _latency, stall in slow],
            [
                (10.004, "group commit: commit_inbound"),
                (12.004, "late timer"),
                (15.000, None),
                (9.990, None),
            ],
        )
        self.assertEqual(
            summary(slow),
            {
                "database: group commit: commit_inbound": 1,
                "reactor: late timer": 1,
                "no stall seen": 2,
            },
        )

    def test_percentile_and_report(self) -> None:
        values = [float(n) for n in range(1, 101)]
        self.assertEqual(percentile(values, 0.5), 51.0)
        self.assertEqual(percentile(values, 0.99), 100.0)
        slow = attribute([(10.004, 6.0)], self.STALLS, 3.0)
        text = report(
            {
                "tree": "T",
                "p50": 1.0,
                "p99": 2.0,
                "max": 6.0,
                "slow": slow,
                "begin": 10.0,
                "stalls": self.STALLS,
            },
            3.0,
            5,
        )
        self.assertIn("T: p50 1.00 ms, p99 2.00 ms, max 6.00 ms; 1 messages over 3 ms", text)
        self.assertIn("held by: database group commit: commit_inbound 20.0 ms at 0.000 s", text)
