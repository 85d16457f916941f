"""Tests for udsgateway.mapping.lookups: the compiled render of text-and-lookup templates.

``make test`` runs these on the compiled build and again on the pure one (PURE_TESTS).
Each render is compared with Liquid's for the same template (the plan removed), and the
body checks with the message parser's reading of the same header.
"""

from __future__ import annotations

import random
import re
from datetime import datetime

from attrs import evolve
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.hl7.message import Delimiters, parse_message, split_lines
from udsgateway.mapping.lookups import (
    APP,
    CONTROL_ID,
    MESSAGE,
    OTHER,
    TEXT,
    LookupPlan,
    Once,
    RenderError,
    body_segments,
    encode,
    plan_lookups,
    render_lookups,
)
from udsgateway.mapping.lookups import NOW as NOW_KIND
from udsgateway.mapping.templating import (
    ActionResponse,
    TemplateData,
    compile_template,
    render_body,
)

HEADER = "MSH|^~\\&|GW|FAC|RCV|RFAC|{{ now }}||ADT^A04|{{ control_id }}|P|2.5\n"
NOW = datetime(2024, 5, 1, 12, 30, 5)


class Counter:
    """A helper (``now`` or ``control_id``) that counts its calls."""

    def __init__(self, value: object) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        return self.value


class PlanTests(SynchronousTestCase):
    """Which lookups the compiled render takes itself, and which it leaves to its caller."""

    def kinds(self, source: str) -> list[int]:
        template = compile_template(source)
        assert template._lookups is not None
        return [item.kind for item in template._lookups.items]

    def test_kinds(self) -> None:
        self.assertEqual(
            self.kinds(
                'a{{ msg["PID-5.1"] }}b{{ app.partner }}{{ now }}{{ control_id }}'
                '{{ msg["NK1[2]-2[3].1.2"] }}'
            ),
            [TEXT, MESSAGE, TEXT, APP, NOW_KIND, CONTROL_ID, MESSAGE],
        )

    def test_other_lookups(self) -> None:
        """Segments, whole segments, [*], keys that are not paths, responses, deeper
        app keys and lookups into the helpers are left to the caller (and Liquid)."""
        for expression in (
            "msg.PID",
            'msg["NK1[2]"]',
            'msg["PID-3[*]"]',
            'msg["NK1[*]"]',
            'msg["PID-5..1"]',
            'msg["not a path"]',
            "msg",
            'actions.lookup["MSA-1"]',
            "app.nested.key",
            "app",
            "now.year",
            "control_id.x",
        ):
            self.assertEqual(self.kinds("{{ " + expression + " }}"), [OTHER], expression)

    def test_plan_paths_are_parsed_once(self) -> None:
        plan = plan_lookups(("x", ("msg", "PID-3[2].1")))
        path = plan.items[1].path
        assert path is not None
        self.assertEqual(
            (path.segment, path.field, path.repetition, path.component), ("PID", 3, 2, 1)
        )
        self.assertIsInstance(plan, LookupPlan)


class OnceTests(SynchronousTestCase):
    def test_called_once(self) -> None:
        make = Counter("v")
        once = Once(make)
        self.assertEqual((once(), once(), make.calls), ("v", "v", 1))

    def test_an_error_is_not_remembered(self) -> None:
        calls = []

        def make() -> object:
            calls.append(1)
            if len(calls) == 1:
                raise ValueError("first")
            return "second"

        once = Once(make)
        self.assertRaises(ValueError, once)
        self.assertEqual((once(), once(), len(calls)), ("second", "second", 2))


class RenderAgainstLiquidTests(SynchronousTestCase):
    """The compiled render gives Liquid's body, error and helper calls, whatever the
    trigger's delimiters and the values."""

    STANDARD = parse_message(
        "MSH|^~\\&|HIS|H|GW|G|20240501||ADT^A04|M1|P|2.5\r"
        "PID|1||X-1^^^H~X-2^^^H||O\\T\\Brien^Ann&B||19800101|F\r"
        "NK1|1|Roe^Jo|SPO\rNK1|2|Poe^Al|BRO\r"
    )
    #: Other delimiters: values are translated into the template's.
    VISTA = parse_message(
        "MSH^~|\\&^VISTA^500^LSQ^FAC^20240101^^ADT~A04^V1^P^2.4\r"
        "PID^1^^P1~~~H~MR|P2^^Doe~Ann&B|C^^19800101^F\r"
        "NK1^1^Roe~Jo|Rae^a|b\r"
    )
    APP = {"partner": "P|A^R~T\\N&R\r", "number": 7, "flag": True, "nested": {"k": "v"}}
    LINES = (
        '{{ msg["PID-3.1"] }}|{{ msg["PID-5.1"] }}^{{ msg["PID-5.2"] }}',
        '{{ msg["PID-3"] }}|{{ msg["PID-3[2].1"] }}|{{ msg["PID-5"] }}|{{ msg["PID-5.2.2"] }}',
        '{{ msg["NK1[2]-2"] }}|{{ msg["NK1-3"] }}|{{ msg["NK1[3]-2"] }}|{{ msg["ZZZ-1"] }}',
        '{{ msg["MSH-1"] }}|{{ msg["MSH-2"] }}|{{ msg["MSH-9"] }}|{{ msg["MSH-9.2"] }}',
        '{{ msg["PID-99"] }}|{{ msg["PID-3[9].1"] }}|{{ msg["PID[2]-1"] }}',
        "{{ app.partner }}|{{ app.number }}|{{ app.flag }}|{{ app.nested }}",
        "{{ app.missing }}{{ control_id }}",
        "{{ control_id }}|{{ control_id }}|{{ now }}|{{ now }}",
        "{{ msg.NK1 }}|{{ app.nested.k }}|{{ actions.lookup.MSA }}",
        'x{{ msg["PID-5.1"] }}{{ msg["not a path"] }}',
    )

    def both(
        self, source: str, trigger: object, now: object = NOW, control_id: object = "ID|1"
    ) -> tuple[object, object]:
        template = compile_template(source)
        self.assertIsNotNone(template._lookups, source)
        results = []
        for candidate in (template, evolve(template, lookups=None)):
            clock, ids = Counter(now), Counter(control_id)
            try:
                outcome: object = render_body(
                    candidate,
                    TemplateData(trigger, (ActionResponse("lookup", None),), self.APP),  # type: ignore[arg-type]
                    message_type="ADT^A04",
                    now=clock,  # type: ignore[arg-type]
                    new_control_id=ids,  # type: ignore[arg-type]
                )
            except RenderError as error:
                outcome = ("error", error.reason, error.line)
            results.append((outcome, clock.calls, ids.calls))
        return results[0], results[1]

    def test_same_delimiters(self) -> None:
        for line in self.LINES:
            fast, liquid = self.both(HEADER + "NTE|1||" + line, self.STANDARD)
            self.assertEqual(fast, liquid, line)

    def test_other_delimiters_are_translated(self) -> None:
        for line in self.LINES:
            fast, liquid = self.both(HEADER + "NTE|1||" + line, self.VISTA)
            self.assertEqual(fast, liquid, line)

    def test_without_a_header_the_trigger_delimiters_are_kept(self) -> None:
        source = '{{ msg.MSH }}\nZPN^{{ msg["PID-5.1"] }}~{{ msg["PID-5.2"] }}^{{ control_id }}\n'
        fast, liquid = self.both(source, self.VISTA, control_id="A^B")
        self.assertEqual(fast, liquid)

    def test_helpers_of_other_types(self) -> None:
        """A clock or an ID source giving something else is written as Liquid writes it."""
        for now, control_id in ((None, 5), ("20240101", None), (NOW.date(), "x")):
            fast, liquid = self.both(HEADER + "NTE|1||{{ now }}", self.STANDARD, now, control_id)
            self.assertEqual(fast, liquid, (now, control_id))

    def test_a_failing_helper(self) -> None:
        def broken() -> str:
            raise ZeroDivisionError

        template = compile_template(HEADER)
        for candidate in (template, evolve(template, lookups=None)):
            error = self.assertRaises(
                RenderError,
                render_body,
                candidate,
                TemplateData(self.STANDARD),
                message_type="ADT^A04",
                now=lambda: NOW,
                new_control_id=broken,
            )
            self.assertEqual(error.reason, "the template failed (ZeroDivisionError)")

    def test_direct_call(self) -> None:
        """The function itself: ``other`` is asked for what the plan does not take."""
        plan = plan_lookups(("A", ("msg", "PID-5.1"), ("app", "partner"), ("msg", "NK1")))
        asked: list[tuple[str, ...]] = []

        def other(names: tuple[str, ...]) -> str | None:
            asked.append(names)
            return "<other>"

        text = render_lookups(
            plan,
            self.STANDARD,
            {"partner": "a|b"},
            Delimiters.DEFAULT,
            Once(lambda: NOW),
            Once(lambda: "ID"),
            other,
        )
        self.assertEqual(text, "AO\\T\\Briena\\F\\b<other>")
        self.assertEqual(asked, [("msg", "NK1")])
        self.assertIsNone(
            render_lookups(
                plan,
                self.STANDARD,
                {},
                Delimiters.DEFAULT,
                Once(lambda: NOW),
                Once(lambda: "ID"),
                other,
            )
        )


class BodyCheckTests(SynchronousTestCase):
    """``body_segments`` reads MSH-9, MSH-10 and MSH-18 as the message parser does."""

    HEADERS = (
        "MSH|^~\\&|A|B|C|D|20240101||ADT^A04|X1|P|2.5",
        "MSH|^~\\&|A|B|C|D|20240101||ADT^A04^ADT_A01|X1|P|2.5||||||8859/1~UNICODE UTF-8",
        "MSH|^~\\&|A|B|C|D|20240101||ADT^A04|X1|P|2.5||||||  UNICODE UTF-8  ",
        "MSH|^~\\&|A|B|C|D|20240101||ADT^A08|X1|P|2.5",
        "MSH|^~\\&|A|B|C|D|20240101||ADT|X1|P|2.5",
        "MSH|^~\\&|A|B|C|D|20240101||ADT^A04||P|2.5",
        "MSH|^~\\&|A|B|C|D|20240101||ADT~X^A04|X1",
        "MSH|^~\\&|A|B|C|D|20240101||ADT^A04&Z|X1",
        "MSH|^~\\&#|A|B|C|D|20240101||ADT^A04|X1|P|2.7",
        "MSH|^~\\&",
        "MSH|",
        "MSH^~|\\&^A^B^C^D^20240101^^ADT~A04^X1",
        " \tMSH|^~\\&|A|B|C|D|20240101||ADT^A04|X1|P|2.5",
    )

    def reference(self, text: str, message_type: str, target: Delimiters) -> object:
        """What the checks must find, read with ``parse_message`` (the earlier code)."""
        lines = [line.lstrip(" \t") for line in re.split(r"\r\n|\r|\n", text)]
        segments = [line for line in lines if line.strip()]
        message = parse_message(segments[0])
        actual = [message.get("MSH-9.1"), message.get("MSH-9.2")]
        if actual != message_type.split("^")[:2]:
            return "MSH-9"
        if not message.get("MSH-10"):
            return "MSH-10"
        return segments, message.get("MSH-18[1]").strip()

    def test_headers(self) -> None:
        for header in self.HEADERS:
            for target in (Delimiters.DEFAULT, Delimiters("^", "~", "|", "\\", "&")):
                for body in (header, header + "\nPID|1\r\n\r\n  NTE|1\r", header + "\r"):
                    try:
                        found: object = body_segments(body, "ADT^A04", target, detailed=False)
                    except RenderError as error:
                        found = error.reason
                    if isinstance(found, str) and found.startswith("MSH-9"):
                        found = "MSH-9"
                    elif isinstance(found, str) and found.startswith("MSH-10"):
                        found = "MSH-10"
                    if isinstance(found, str) and found not in ("MSH-9", "MSH-10"):
                        continue  # refused before the header's fields were read
                    self.assertEqual(found, self.reference(body, "ADT^A04", target), body)

    def test_detailed_reasons(self) -> None:
        body = "MSH|^~\\&|A|B|C|D|20240101||ADT^A08|X1|P|2.5"
        error = self.assertRaises(
            RenderError, body_segments, body, "ADT^A04", Delimiters.DEFAULT, detailed=True
        )
        self.assertEqual(error.reason, "MSH-9 is 'ADT^A08' but the action sends ADT^A04")
        error = self.assertRaises(
            RenderError, body_segments, body, "ADT^A04", Delimiters.DEFAULT, detailed=False
        )
        self.assertEqual(error.reason, "MSH-9 is not ADT^A04, the action's message type")

    def test_refusals(self) -> None:
        for body, reason in (
            ("\n \n", "the body is empty"),
            ("PID|1\nMSH|^~\\&|", "the body does not start with an MSH segment"),
            ("MSH|^~\\&|A\n1PD|x", "segment 2 of the body does not start with a segment ID"),
            ("MSH|^~\\&|A\nPIDx", "segment 2 of the body does not start with a segment ID"),
        ):
            error = self.assertRaises(
                RenderError, body_segments, body, "ADT^A04", Delimiters.DEFAULT, detailed=False
            )
            self.assertEqual(error.reason, reason)

    def test_encode(self) -> None:
        self.assertEqual(encode(["MSH|a", "PID|é"], "latin-1"), b"MSH|a\rPID|\xe9\r")
        self.assertRaises(RenderError, encode, ["PID|é"], "ascii")
        self.assertRaises(RenderError, encode, ["PID"], "no-such-codec")
        self.assertRaises(RenderError, encode, ["PID"], None)


class SplitLinesTests(SynchronousTestCase):
    def test_as_the_regular_expression(self) -> None:
        """CR LF, lone CR and lone LF, in any mix, split as ``re.split`` splits them."""
        rng = random.Random(16)
        for _ in range(3000):
            text = "".join(rng.choice("ab\r\n") for _ in range(rng.randint(0, 12)))
            self.assertEqual(split_lines(text), re.split(r"\r\n|\r|\n", text), repr(text))
