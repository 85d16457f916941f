"""Tests for udsgateway.mapping.templating: Liquid request bodies with HL7 autoescaping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from attrs import evolve
from twisted.trial.unittest import SynchronousTestCase

from udsgateway.hl7.message import Delimiters, Message, parse_message
from udsgateway.mapping.templating import (
    MAX_BODY_CHARS,
    ActionResponse,
    RenderError,
    TemplateData,
    TemplateError,
    TemplateProblem,
    WireText,
    check_template,
    compile_template,
    escape_value,
    render_body,
)

FIXTURES = Path(__file__).parent / "fixtures"
NOW = datetime(2024, 5, 1, 12, 30, 5)
HEADER = "MSH|^~\\&|GW|FAC|RCV|RFAC|{{ now }}||ADT^A04|{{ control_id }}|P|2.5\n"


def fixture(name: str) -> str:
    """A file under tests/fixtures, as text, line endings untouched."""
    return (FIXTURES / name).read_bytes().decode("utf-8")


ADT = parse_message(fixture("adt_a04.hl7"))
ACK = parse_message("MSH|^~\\&|PARTNER|P|GW|G|20240501||ACK^A04|P77|P|2.5\rMSA|AA|UDS1|Stored\r")


class Clock:
    """An injected time source that counts its calls."""

    def __init__(self, now: datetime = NOW) -> None:
        self.now = now
        self.calls = 0

    def __call__(self) -> datetime:
        self.calls += 1
        return self.now


class ControlIds:
    """An injected control ID source: ID1, ID2, ..."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"ID{self.calls}"


def render(
    source: str,
    trigger: Message = ADT,
    *,
    message_type: str = "ADT^A04",
    app: Mapping[str, object] | None = None,
    responses: Sequence[ActionResponse] = (),
    clock: Clock | None = None,
    ids: ControlIds | None = None,
    delimiters: Delimiters | None = None,
) -> bytes:
    """Render a whole body with deterministic helpers."""
    return render_body(
        compile_template(source),
        TemplateData(trigger, tuple(responses), app or {}),
        message_type=message_type,
        now=clock or Clock(),
        new_control_id=ids or ControlIds(),
        delimiters=delimiters,
    )


def render_line(expression: str, trigger: Message = ADT, **kwargs: object) -> str:
    """Render ``NTE|1||<expression>`` after a valid header; return what the NTE holds."""
    body = render(HEADER + "NTE|1||" + expression, trigger, **kwargs)  # type: ignore[arg-type]
    segments = body.decode("utf-8").split("\r")
    assert segments[1].startswith("NTE|1||"), segments
    return segments[1][len("NTE|1||") :]


class EscapeValueTests(SynchronousTestCase):
    """escape_value, the HL7 escaping used for every plain value."""

    def test_every_special_character(self) -> None:
        """Delimiters, the escape character, CR and LF become escape sequences."""
        self.assertEqual(
            escape_value("a|b^c~d\\e&f\rg\nh", Delimiters.DEFAULT),
            "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f\\X0D\\g\\X0A\\h",
        )

    def test_plain_text_is_unchanged(self) -> None:
        """Text without special characters comes back as it is."""
        self.assertEqual(escape_value("Maria Luisa 12-B", Delimiters.DEFAULT), "Maria Luisa 12-B")

    def test_other_delimiters(self) -> None:
        """The message's own delimiters are escaped, with its own escape character."""
        delimiters = Delimiters("#", "$", "%", "@", "!")
        self.assertEqual(escape_value("a#b$c%d@e!f|g^", delimiters), "a@F@b@S@c@R@d@E@e@T@f|g^")

    def test_no_escape_character(self) -> None:
        """Escaping needs an escape character; without one it is an error."""
        self.assertRaises(ValueError, escape_value, "a|b", Delimiters("|", "^", "~", "", "&"))


class AutoescapeTests(SynchronousTestCase):
    """Values are HL7-escaped on output unless they are wire text."""

    def test_app_variable_is_escaped(self) -> None:
        """An app variable holding |^~\\& cannot break the message's structure."""
        self.assertEqual(
            render_line("{{ app.name }}", app={"name": "O'Hara|Smith^Jr~X\\Y&Z"}),
            "O'Hara\\F\\Smith\\S\\Jr\\R\\X\\E\\Y\\T\\Z",
        )

    def test_message_value_is_not_escaped_again(self) -> None:
        """A value from the message (D\\F\\Angelo) is written byte-for-byte."""
        self.assertEqual(render_line('{{ msg["PID-5.1"] }}'), "D\\F\\Angelo")
        self.assertEqual(render_line('{{ msg["PID-5"] }}'), "D\\F\\Angelo^Maria^Luisa^^^^L")

    def test_malformed_escape_passes_unchanged(self) -> None:
        """A malformed escape (\\X4 without its end) is forwarded as received."""
        trigger = parse_message(fixture("siu_s15.hl7"))
        self.assertEqual(
            render_line('{{ msg["NTE-3"] }}', trigger),
            "Patient called to cancel \\X4 see desk.",
        )

    def test_raw_filter(self) -> None:
        """| raw inserts a plain value without escaping."""
        self.assertEqual(
            render_line("{{ app.fragment | raw }}", app={"fragment": "A^B~C"}), "A^B~C"
        )

    def test_hl7_escape_filter(self) -> None:
        """| hl7_escape escapes any value, even one taken from the message."""
        self.assertEqual(
            render_line(
                '{{ msg["PID-5.1"] | hl7_escape }}|{{ app.x | hl7_escape }}', app={"x": "^"}
            ),
            "D\\E\\F\\E\\Angelo|\\S\\",
        )

    def test_literals_and_template_text(self) -> None:
        """Output literals are escaped; the template's own text is HL7 as written."""
        self.assertEqual(render_line('{{ "A^B" }}^C~D'), "A\\S\\B^C~D")

    def test_echo_is_escaped(self) -> None:
        """{% echo %} and {% liquid echo %} escape like {{ }}."""
        self.assertEqual(
            render_line("{% echo app.x %}/{% liquid echo app.x %}", app={"x": "a|b"}),
            "a\\F\\b/a\\F\\b",
        )

    def test_other_types(self) -> None:
        """Numbers, booleans and missing values are written as Liquid writes them."""
        self.assertEqual(
            render_line("{{ 3 }}|{{ 2.5 }}|{{ true }}|{{ app.missing }}|{{ nil }}"), "3|2.5|true||"
        )

    def test_filters_keep_wire_text(self) -> None:
        """String filters on a message value keep it wire text and escape their arguments."""
        self.assertEqual(render_line('{{ msg["PID-5.1"] | upcase }}'), "D\\F\\ANGELO")
        self.assertEqual(render_line('{{ msg["PID-5.1"] | append: "^x" }}'), "D\\F\\Angelo\\S\\x")
        self.assertEqual(render_line('{{ msg["PID-5.1"] | prepend: "&" }}'), "\\T\\D\\F\\Angelo")
        self.assertEqual(
            render_line('{{ msg["PID-5.1"] | replace: "Angelo", "A|B" }}'), "D\\F\\A\\F\\B"
        )
        self.assertEqual(render_line('{{ msg["PID-5.1"] | remove: "\\F\\" }}'), "D\\F\\Angelo")
        self.assertEqual(render_line('{{ msg["PID-5.1"] | default: "none" }}'), "D\\F\\Angelo")
        self.assertEqual(render_line('{{ msg["PID-4"] | default: "n/a^" }}'), "n/a\\S\\")

    def test_truncate_never_cuts_an_escape(self) -> None:
        """truncate drops a half escape sequence rather than leave a broken one."""
        self.assertEqual(render_line('{{ msg["PID-5.1"] | truncate: 6 }}'), "D...")
        self.assertEqual(render_line('{{ msg["PID-5.1"] | truncate: 7 }}'), "D\\F\\...")
        self.assertEqual(render_line("{{ app.x | truncate: 4 }}", app={"x": "A^BCDE"}), "A...")

    def test_capture_and_assign_do_not_double_escape(self) -> None:
        """Captured output and assigned message values are written once, unchanged."""
        self.assertEqual(
            render_line(
                '{% capture n %}{{ msg["PID-5.1"] }}^{{ app.x }}{% endcapture %}'
                '{% assign f = msg["PID-5.2"] %}{{ n }}|{{ f }}',
                app={"x": "a^b"},
            ),
            "D\\F\\Angelo^a\\S\\b|Maria",
        )

    def test_join_escapes_its_separator(self) -> None:
        """join treats its separator as text; message items stay wire text."""
        self.assertEqual(
            render_line('{{ msg["PID-3[*]"] | map: "1" | join: "~" }}'), "MRN100234\\R\\INS-77120"
        )
        self.assertEqual(
            render_line('{{ msg["NK1[*]"] | map: "2.1" | join: ", " }}'),
            "D\\F\\Angelo, Bianchi",
        )

    def test_split_and_squish_keep_wire_text(self) -> None:
        """split pieces and squished values of wire text are still written unescaped."""
        self.assertEqual(render_line('{{ msg["PID-11.1"] | split: " " | first }}'), "12")
        self.assertEqual(render_line('{{ msg["PID-5.1"] | squish }}'), "D\\F\\Angelo")

    def test_wire_text_operations(self) -> None:
        """WireText, like Markup, escapes plain operands and stays WireText."""
        wire = WireText("D\\F\\Angelo", Delimiters.DEFAULT)
        self.assertEqual(wire + "^", "D\\F\\Angelo\\S\\")
        self.assertEqual("&" + wire, "\\T\\D\\F\\Angelo")
        self.assertIsInstance("&" + wire, WireText)
        self.assertIsInstance(wire[0:3], WireText)
        self.assertEqual(
            WireText("^", Delimiters.DEFAULT).join(["a|", wire]), "a\\F\\^D\\F\\Angelo"
        )


class FilterEdgeTests(SynchronousTestCase):
    """Less common filters and values, still escaped exactly once."""

    def test_wire_text_string_methods(self) -> None:
        """Case, strip, split, partition and repeat keep WireText and escape plain operands."""
        wire = WireText(" D\\F\\Angelo^Maria ", Delimiters.DEFAULT)
        for result, expected in (
            (wire.lower(), " d\\f\\angelo^maria "),
            (wire.upper(), " D\\F\\ANGELO^MARIA "),
            (wire.strip().capitalize(), "D\\f\\angelo^maria"),
            (wire.title(), " D\\F\\Angelo^Maria "),
            (wire.swapcase(), " d\\f\\aNGELO^mARIA "),
            (wire.lstrip(), "D\\F\\Angelo^Maria "),
            (wire.rstrip(), " D\\F\\Angelo^Maria"),
            (wire * 2, " D\\F\\Angelo^Maria  D\\F\\Angelo^Maria "),
        ):
            self.assertIsInstance(result, WireText)
            self.assertEqual(result, expected)
        self.assertEqual(wire.rsplit("^"), [wire])
        self.assertEqual(wire.partition("Angelo"), (" D\\F\\", "Angelo", "^Maria "))
        # A "|" in the data is "\\F\\" on the wire: that is what the plain "|" matches.
        self.assertEqual(wire.rpartition("|"), (" D", "\\F\\", "Angelo^Maria "))
        self.assertTrue(all(isinstance(part, WireText) for part in wire.partition("^")))
        self.assertEqual(repr(WireText("a", Delimiters.DEFAULT)), "WireText('a')")

    def test_truncatewords_and_strip_newlines(self) -> None:
        """truncatewords and strip_newlines keep wire text and escape their own text."""
        self.assertEqual(
            render_line(
                '{{ msg["NTE-3"] | truncatewords: 2, "~" }}', parse_message(fixture("siu_s12.hl7"))
            ),
            "Patient prefers\\R\\",
        )
        self.assertEqual(render_line('{{ msg["PID-5.1"] | truncatewords: 3 }}'), "D\\F\\Angelo")
        self.assertEqual(render_line('{{ msg["PID-5.1"] | strip_newlines }}'), "D\\F\\Angelo")
        self.assertEqual(
            render_line("{{ app.x | strip_newlines }}", app={"x": "a\r\nb|"}), "ab\\F\\"
        )

    def test_filter_argument_errors(self) -> None:
        """Bad filter arguments fail the render with a reason naming the filter only."""
        for expression, reason in (
            ('{{ msg["PID-5.1"] | truncate: "x" }}', "truncate expected an integer"),
            (
                '{{ msg["PID-5.1"] | truncatewords: app.none }}',
                "truncatewords expected an integer, found Undefined",
            ),
            ('{{ msg["PID-7"] | hl7_date: 5 }}', "hl7_date: the format must be a string"),
            ("{{ app.x | hl7_date }}", "hl7_date: the value is not a date"),
            ('{{ "2024-13-45" | hl7_date }}', "hl7_date: the value is not a date"),
            ('{{ "20241345" | hl7_date }}', "hl7_date: the value is not a date"),
            ('{{ msg["PID-3"] | join: "," }}', "join expected an array, found WireText"),
        ):
            error = self.assertRaises(
                RenderError, render, HEADER + "NTE|1||" + expression, app={"x": 5}
            )
            self.assertEqual(error.reason, reason, expression)

    def test_dates_of_other_kinds(self) -> None:
        """hl7_date takes date objects and timezone-aware ISO text; date leaves non-dates."""
        self.assertEqual(
            render_line("{{ app.d | hl7_date }}", app={"d": datetime(2024, 5, 1).date()}),
            "20240501",
        )
        self.assertEqual(
            render_line('{{ "2024-05-01T08:15:00+02:00" | hl7_date }}'), "20240501081500+0200"
        )
        self.assertEqual(render_line('{{ msg["PID-5.1"] | date: "%Y" }}'), "D\\F\\Angelo")
        self.assertEqual(
            render_line("{{ app.when }}", app={"when": datetime(2024, 5, 1).date()}), "20240501"
        )

    def test_raw_of_other_values(self) -> None:
        """raw leaves wire text alone and writes views and lists without escaping."""
        self.assertEqual(
            render_line(
                '{{ msg["PID-5.1"] | raw }}|{{ app.list | raw }}|{{ (1..3) | raw }}',
                app={"list": ["a^", 1]},
            ),
            "D\\F\\Angelo|a^1|1..3",
        )


class ViewTests(SynchronousTestCase):
    """The message, segment and repetition mappings as Python sees them."""

    def test_whole_message_pass_through(self) -> None:
        """{{ msg }} writes the trigger as received: a template can forward it unchanged."""
        self.assertEqual(render("{{ msg }}"), fixture("adt_a04.hl7").encode("utf-8"))

    def test_mapping_protocol(self) -> None:
        """Views list their keys: segment IDs, field numbers, component numbers."""
        from udsgateway.mapping.templating import MessageView

        view = MessageView(ADT, Delimiters.DEFAULT)
        self.assertEqual(list(view), ["MSH", "EVN", "PID", "PV1", "NK1"])
        self.assertEqual(len(view), 5)
        nk1 = view["NK1[2]"]
        assert isinstance(nk1, Mapping)
        self.assertEqual(list(nk1), ["1", "2", "3", "4", "5"])
        self.assertEqual(len(nk1), 5)
        reps = view["PID-3[*]"]
        assert isinstance(reps, list)
        self.assertEqual((list(reps[0]), len(reps[0])), (["1", "2", "3", "4", "5"], 5))
        self.assertEqual(reps[0]["4.1"], "SYNTHHOSP")
        self.assertEqual(reps[0][9], "")
        self.assertRaises(KeyError, view.__getitem__, "NK1[3]")
        self.assertRaises(KeyError, view.__getitem__, 3)
        self.assertRaises(KeyError, nk1.__getitem__, "x")
        self.assertEqual(view["MSH-2[*]"], ["^~\\&"])

    def test_no_message(self) -> None:
        """A view of a missing response has no keys and only empty values."""
        from udsgateway.mapping.templating import MessageView

        view = MessageView(None, Delimiters.DEFAULT)
        self.assertEqual((list(view), len(view), view.__hl7__()), ([], 0, ""))
        self.assertEqual((view["MSA-1"], view["NK1"], view["PID-3[*]"]), ("", [], []))

    def test_bad_component_key(self) -> None:
        """A bad component path on a repetition fails the render at its line."""
        error = self.assertRaises(
            RenderError,
            render,
            HEADER + '\n{% for id in msg["PID-3[*]"] %}{{ id["1..2"] }}{% endfor %}',
        )
        self.assertEqual(error.line, 3)
        self.assertIn("1..2", error.reason)


class PathsInTemplatesTests(SynchronousTestCase):
    """The trigger message in the template: paths, repetitions, segments."""

    def test_repetitions(self) -> None:
        """msg["PID-3[*]"] iterates repetitions, each keyed by component path."""
        self.assertEqual(
            render_line(
                '{% for id in msg["PID-3[*]"] %}{{ id["1"] }}/{{ id[5] }}/[{{ id }}];{% endfor %}'
            ),
            "MRN100234/MR/[MRN100234^^^SYNTHHOSP^MR];INS-77120/MB/[INS-77120^^^SYNTHINS^MB];",
        )

    def test_repetition_index(self) -> None:
        """A repetition index and .size work on field paths."""
        self.assertEqual(
            render_line(
                '{{ msg["PID-3[2].1"] }}|{{ msg["PID-3[*]"].size }}|{{ msg["PID-13[2].4"] }}'
            ),
            "INS-77120|2|maria.dangelo@example.org",
        )

    def test_segments(self) -> None:
        """msg.NK1 and msg["NK1[*]"] list the NK1 segments, keyed by relative paths."""
        self.assertEqual(
            render_line(
                '{% for nk in msg.NK1 %}{{ forloop.index }}:{{ nk["2.1"] }},{{ nk[3] }};'
                '{% endfor %}{{ msg["NK1[*]"] | size }}|{{ msg.NK1.size }}|'
                '{{ msg["NK1[2]"]["2.2"] }}|{{ msg.NK1.last["3[1].2"] }}'
            ),
            "1:D\\F\\Angelo,SPO^Spouse^HL70063;2:Bianchi,SIS^Sister^HL70063;2|2|Giulia|Sister",
        )

    def test_missing_fields_are_empty(self) -> None:
        """Missing segments, fields, repetitions and components render as nothing."""
        self.assertEqual(
            render_line(
                '{{ msg["PV2-3"] }}|{{ msg["PID-3[5].1"] }}|{{ msg["PID-5.1.2"] }}|'
                '{% for x in msg["PID-4[*]"] %}x{% endfor %}|{% for s in msg.AL1 %}y{% endfor %}|'
                '{{ msg["NK1[7]"]["2"] }}|{{ msg.NK1.first["40"] }}'
            ),
            "||||||",
        )

    def test_lists_are_written_item_by_item(self) -> None:
        """A list is written as its items: message values raw, plain values escaped."""
        self.assertEqual(
            render_line('{{ msg.NK1 | map: "2.1" }}|{{ app.codes }}', app={"codes": ["a^", "b"]}),
            "D\\F\\AngeloBianchi|a\\S\\b",
        )

    def test_segments_copied_verbatim(self) -> None:
        """A segment written whole is copied as received, e.g. to forward every NK1."""
        body = render(HEADER + "{% for nk in msg.NK1 %}\n{{ nk }}\n{% endfor %}")
        self.assertEqual(
            body.decode("utf-8").split("\r")[1:],
            [ADT.segments[4].text, ADT.segments[5].text, ""],
        )

    def test_conditions(self) -> None:
        """Message values compare as strings in conditions."""
        self.assertEqual(
            render_line('{% if msg["PID-8"] == "F" %}female{% else %}other{% endif %}'), "female"
        )

    def test_other_source_delimiters_are_translated(self) -> None:
        """Values from a #$%@! message are re-expressed in the destination's delimiters."""
        trigger = parse_message(
            "MSH#$%@!#A#B#C#D#2024##ADT$A04#1#P#2.5\rPID#1##7##Doe$Jo!Ann@F@x^y\r"
        )
        self.assertEqual(render_line('{{ msg["PID-5"] }}', trigger), "Doe^Jo&Ann\\F\\x\\S\\y")
        self.assertEqual(render_line('{{ msg["PID-5.2.2"] }}', trigger), "Ann\\F\\x\\S\\y")

    def test_invalid_path_fails_the_render(self) -> None:
        """A key that looks like a path but is not one fails with its template line."""
        error = self.assertRaises(RenderError, render, HEADER + 'NTE|1||{{ msg["PID-5..1"] }}')
        self.assertEqual(error.line, 2)
        self.assertIn("PID-5..1", error.reason)
        error = self.assertRaises(
            RenderError,
            render,
            HEADER + '{% for nk in msg.NK1 %}\nNK1|{{ nk["2..1"] }}\n{% endfor %}',
        )
        self.assertEqual(error.line, 3)


class ResponseTests(SynchronousTestCase):
    """Responses of earlier actions in the chain."""

    def test_by_position_and_by_name(self) -> None:
        """responses[i] and actions.<name> give the response messages' fields."""
        lookup = parse_message(
            "MSH|^~\\&|EMPI|E|GW|G|20240501||ADR^A19|Q1|P|2.5\rMSA|AA|UDS0\rPID|1||E-991^^^EMPI\r"
        )
        responses = [ActionResponse("look up", lookup), ActionResponse("register", ACK)]
        self.assertEqual(
            render_line(
                '{{ responses[0]["PID-3.1"] }}|{{ actions["look up"]["MSA-2"] }}|'
                '{{ actions.register["MSA-1"] }}|{{ responses.last["MSA-3"] }}|'
                '{{ responses[1]["MSH-10"] }}|{{ responses.size }}',
                responses=responses,
            ),
            "E-991|UDS0|AA|Stored|P77|2",
        )

    def test_missing_responses_are_empty(self) -> None:
        """No response, an unknown position or an unknown name render as nothing."""
        self.assertEqual(
            render_line(
                '{{ actions.notify["MSA-1"] }}|{{ responses[5]["MSA-1"] }}|'
                '{{ actions.nobody["MSA-1"] }}',
                responses=[ActionResponse("notify", None)],
            ),
            "||",
        )


class HelperTests(SynchronousTestCase):
    """now, control_id and the date filters, with injected sources."""

    def test_now_and_control_id(self) -> None:
        """now is an HL7 timestamp; control_id a fresh ID; each source is called once."""
        clock, ids = Clock(), ControlIds()
        body = render(
            HEADER + "NTE|1||{{ now }}|{{ control_id }}|{{ control_id }}", clock=clock, ids=ids
        )
        self.assertEqual(
            body,
            b"MSH|^~\\&|GW|FAC|RCV|RFAC|20240501123005||ADT^A04|ID1|P|2.5\r"
            b"NTE|1||20240501123005|ID1|ID1\r",
        )
        self.assertEqual((clock.calls, ids.calls), (1, 1))

    def test_sources_not_called_when_unused(self) -> None:
        """A template without now and control_id does not consume a time or an ID."""
        clock, ids = Clock(), ControlIds()
        render("MSH|^~\\&|GW||||20240501||ADT^A04|X1|P|2.5", clock=clock, ids=ids)
        self.assertEqual((clock.calls, ids.calls), (0, 0))

    def test_each_render_gets_a_fresh_id(self) -> None:
        """Two renders with the same ID source get two control IDs."""
        ids = ControlIds()
        render(HEADER, ids=ids)
        body = render(HEADER, ids=ids)
        self.assertIn(b"|ID2|", body)

    def test_hl7_date_formats(self) -> None:
        """hl7_date reads HL7 and ISO dates and writes a format or HL7 at their precision."""
        self.assertEqual(render_line('{{ msg["PID-7"] | hl7_date: "%d.%m.%Y" }}'), "14.03.1985")
        self.assertEqual(render_line('{{ msg["PID-7"] | hl7_date }}'), "19850314")
        self.assertEqual(render_line('{{ "198503141230" | hl7_date }}'), "198503141230")
        self.assertEqual(render_line('{{ "202405011230+0200" | hl7_date }}'), "202405011230+0200")
        self.assertEqual(
            render_line('{{ "20240501123000.123-0500" | hl7_date: "%H:%M %z" }}'), "12:30 -0500"
        )
        self.assertEqual(render_line('{{ "2024-05-01" | hl7_date }}'), "20240501")
        self.assertEqual(render_line('{{ "2024-05-01T08:15:00" | hl7_date }}'), "20240501081500")
        self.assertEqual(
            render_line(
                '{{ msg["SCH-11.4"] | hl7_date: "%H:%M" }}',
                parse_message(fixture("siu_s12.hl7")),
                message_type="ADT^A04",
            ),
            "14:00",
        )

    def test_hl7_date_of_now(self) -> None:
        """hl7_date formats now, including its UTC offset when asked."""
        clock = Clock(datetime(2024, 5, 1, 8, 0, tzinfo=timezone(timedelta(hours=2))))
        self.assertEqual(render_line("{{ now | hl7_date }}", clock=clock), "20240501080000")
        self.assertEqual(
            render_line('{{ now | hl7_date: "%Y%m%d%H%M%S%z" }}', clock=clock),
            "20240501080000+0200",
        )

    def test_hl7_date_of_nothing(self) -> None:
        """An empty or missing date gives an empty string, not an error."""
        self.assertEqual(render_line('{{ msg["PID-29"] | hl7_date }}|{{ app.x | hl7_date }}'), "|")

    def test_hl7_date_of_a_non_date(self) -> None:
        """A value that is not a date fails the render with a reason that omits the value."""
        error = self.assertRaises(
            RenderError, render, HEADER + 'NTE|1||{{ msg["PID-5.1"] | hl7_date }}'
        )
        self.assertEqual(error.reason, "hl7_date: the value is not a date")
        self.assertEqual(error.line, 2)

    def test_liquid_date_now_uses_the_clock(self) -> None:
        """Liquid's date filter reads "now" from the injected clock, not the wall clock."""
        clock = Clock(datetime(1999, 12, 31, 23, 59))
        self.assertEqual(render_line('{{ "now" | date: "%Y-%m-%d" }}', clock=clock), "1999-12-31")


class CompileTests(SynchronousTestCase):
    """compile_template and its errors."""

    def test_syntax_error_line(self) -> None:
        """A syntax error reports its line; a block left open, the template's last line."""
        for source, line in (
            ('MSH|^~\\&|\nPID|{{ msg["PID-5"] \n', 2),
            ("MSH|^~\\&|\nPID|1\n{% if %}\n{% endif %}", 3),
            ("MSH|^~\\&|\n{% for x in msg.NK1 %}\nNK1|1\n", 3),  # unclosed: at the end
            ("MSH|^~\\&|\n\n\n{% endfor %}", 4),
        ):
            error = self.assertRaises(TemplateError, compile_template, source)
            self.assertEqual(error.problem.line, line, source)
            self.assertTrue(error.problem.message)

    def test_removed_tags(self) -> None:
        """Tags with no use in HL7 bodies (include, render, cycle, tablerow) are unknown."""
        for tag in ('{% include "x" %}', '{% render "x" %}', '{% cycle "a", "b" %}'):
            self.assertRaises(TemplateError, compile_template, "MSH|^~\\&|\n" + tag)

    def test_delimiters_from_the_literal_header(self) -> None:
        """The template's literal MSH declares its delimiters; otherwise HL7's defaults."""
        self.assertEqual(
            compile_template("  MSH#$%@!#GW").delimiters, Delimiters("#", "$", "%", "@", "!")
        )
        self.assertEqual(compile_template("{{ app.header }}").delimiters, Delimiters.DEFAULT)


class RenderValidationTests(SynchronousTestCase):
    """render_body checks and normalises what it renders."""

    def test_line_endings_and_blank_lines(self) -> None:
        """LF/CRLF become CR, blank lines and indentation go, every segment ends in CR."""
        body = render(
            "\n  MSH|^~\\&|GW||||20240501||ADT^A04|X1|P|2.5\r\n\n"
            "{% for nk in msg.NK1 %}\n    NK1|{{ nk[1] }}\n{% endfor %}\n\n"
        )
        self.assertEqual(body, b"MSH|^~\\&|GW||||20240501||ADT^A04|X1|P|2.5\rNK1|1\rNK1|2\r")

    def test_must_start_with_msh(self) -> None:
        """A body whose first segment is not MSH is refused."""
        error = self.assertRaises(RenderError, render, "PID|1\n" + HEADER)
        self.assertEqual(error.reason, "the body does not start with an MSH segment")

    def test_empty_body(self) -> None:
        """A body that renders to nothing is refused."""
        error = self.assertRaises(RenderError, render, "{% if false %}MSH{% endif %}\n\n")
        self.assertEqual(error.reason, "the body is empty")

    def test_wrong_message_type(self) -> None:
        """MSH-9 type^event must equal the action's message type."""
        error = self.assertRaises(RenderError, render, HEADER, message_type="ADT^A08")
        self.assertEqual(error.reason, "MSH-9 is not ADT^A08, the action's message type")
        error = self.assertRaises(RenderError, render, HEADER.replace("ADT^A04", "ADT"))
        self.assertEqual(error.reason, "MSH-9 is not ADT^A04, the action's message type")

    def test_message_structure_component_is_allowed(self) -> None:
        """MSH-9 may carry the message structure after type^event."""
        body = render(HEADER.replace("ADT^A04", "ADT^A04^ADT_A01"))
        self.assertIn(b"|ADT^A04^ADT_A01|ID1|", body)

    def test_control_id_required(self) -> None:
        """An empty MSH-10 is refused: the response could not be matched to the message."""
        error = self.assertRaises(RenderError, render, HEADER.replace("{{ control_id }}", ""))
        self.assertEqual(error.reason, "MSH-10 (message control ID) is empty")

    def test_not_a_segment(self) -> None:
        """A line that is not a segment is refused, named by its position only."""
        error = self.assertRaises(RenderError, render, HEADER + "PID|1\nMaria was here\n")
        self.assertEqual(error.reason, "segment 3 of the body does not start with a segment ID")

    def test_destination_delimiters(self) -> None:
        """The header must declare the delimiters values were escaped for."""
        error = self.assertRaises(
            RenderError, render, HEADER, delimiters=Delimiters("#", "$", "%", "@", "!")
        )
        self.assertTrue(error.reason.startswith("MSH-1/MSH-2 do not declare"))
        body = render(
            "MSH#$%@!#GW######ADT$A04#X1\nNTE#1##{{ app.x }}",
            app={"x": "a#b$c^"},
            delimiters=Delimiters("#", "$", "%", "@", "!"),
        )
        self.assertEqual(body, b"MSH#$%@!#GW######ADT$A04#X1\rNTE#1##a@F@b@S@c^\r")

    def test_encoded_by_msh_18(self) -> None:
        """The body is encoded with the charset MSH-18 declares."""
        header = "MSH|^~\\&|GW||||20240501||ADT^A04|X1|P|2.5||||||8859/1\n"
        body = render(header + "NTE|1||{{ app.x }}", app={"x": "Müller"})
        self.assertTrue(body.endswith("NTE|1||Müller\r".encode("iso8859-1")))

    def test_charset_problems(self) -> None:
        """An unknown MSH-18, or text the charset cannot encode, fails the render."""
        header = "MSH|^~\\&|GW||||20240501||ADT^A04|X1|P|2.5||||||"
        error = self.assertRaises(RenderError, render, header + "KLINGON")
        self.assertEqual(error.reason, "MSH-18 names a character set we do not know")
        error = self.assertRaises(
            RenderError, render, header + "ASCII\nNTE|1||{{ app.x }}", app={"x": "Müller"}
        )
        self.assertEqual(error.reason, "the body has characters that ascii cannot encode")

    def test_reasons_carry_no_message_content(self) -> None:
        """Liquid's render-time messages may quote values: the reason names the error only."""
        source = HEADER + 'NTE|1||{{ msg["PID-5"] | split: "~" | uniq: "x" }}'
        error = self.assertRaises(RenderError, render, source)
        self.assertNotIn("Angelo", str(error))
        self.assertEqual(error.reason, "the template failed (FilterArgumentError)")
        self.assertEqual(error.line, 2)

    def test_unexpected_exceptions_become_render_errors(self) -> None:
        """Any exception while rendering is a RenderError, never a crash."""

        class Broken:
            def __str__(self) -> str:
                raise RuntimeError("boom")

        error = self.assertRaises(
            RenderError, render, HEADER + "NTE|1||{{ app.x }}", app={"x": Broken()}
        )
        self.assertEqual(error.reason, "the template failed (RuntimeError)")

    def test_loops_are_bounded(self) -> None:
        """A runaway loop stops at the iteration limit with a RenderError."""
        error = self.assertRaises(
            RenderError, render, HEADER + "{% for i in (1..200000) %}NTE|{{ i }}\n{% endfor %}"
        )
        self.assertIn("limit", error.reason)


KNOWN = "msg, responses, actions, app, now, control_id"


class CheckTemplateTests(SynchronousTestCase):
    """check_template, run by `flows import` against the trigger's sample."""

    def test_valid_templates(self) -> None:
        """The documented examples have no problems."""
        app = {"facility": "UDS", "partner_app": "P", "partner_facility": "F"}
        for template, sample, message_type in (
            ("adt_a04_to_partner.liquid", "adt_a04.hl7", "ADT^A04"),
            ("siu_s12_to_partner.liquid", "siu_s12.hl7", "SIU^S12"),
        ):
            self.assertEqual(
                check_template(fixture(template), fixture(sample), message_type, app=app), []
            )

    def test_bad_paths(self) -> None:
        """Keys that are not HL7 paths are reported on their lines."""
        source = (
            HEADER
            + 'PID|{{ msg["PID5"] }}\n'
            + 'NK1|{{ msg["NK1"]["x"] }}|{{ msg["NK1[2]"]["5..1"] }}\n'
            + 'NTE|{{ msg["PID-3[*]"][0]["1.2.3"] }}|{{ responses["x"] }}\n'
            + 'NTE|{{ msg["PID-3[2].1"] }}|{{ msg.NK1.first["2.1"] }}|{{ msg.NK1.size }}\n'
        )
        problems = check_template(source, fixture("adt_a04.hl7"), "ADT^A04")
        self.assertEqual([p.line for p in problems], [2, 3, 3, 4, 4])
        self.assertIn("PID5", problems[0].message)
        self.assertTrue(all(p.message for p in problems))

    def test_unknown_names(self) -> None:
        """Unknown variables, filters, app variables and action names are reported."""
        source = (
            HEADER
            + "NTE|{{ mgs.x }}|{{ app.nope }}|{{ app.facility }}\n"
            + '\nNTE|{{ actions.lookup["MSA-2"] }}|{{ actions.notify["MSA-1"] }}|{{ 1 | nope }}\n'
        )
        problems = check_template(
            source,
            fixture("adt_a04.hl7"),
            "ADT^A04",
            app={"facility": "F"},
            action_names=["lookup"],
        )
        self.assertEqual(
            problems,
            [
                TemplateProblem(2, "unknown app variable 'nope'"),
                TemplateProblem(2, f"unknown variable 'mgs' (known: {KNOWN})"),
                TemplateProblem(4, "no earlier action is named 'notify'"),
                TemplateProblem(4, "unknown filter 'nope'"),
            ],
        )

    def test_wrong_message_type_points_at_the_header(self) -> None:
        """A rendered MSH-9 that does not match is reported on the template's MSH line."""
        source = "{% comment %} partner feed {% endcomment %}\n" + HEADER
        self.assertEqual(
            check_template(source, fixture("adt_a04.hl7"), "SIU^S12"),
            [TemplateProblem(2, "MSH-9 is 'ADT^A04' but the action sends SIU^S12")],
        )

    def test_syntax_error(self) -> None:
        """A template that does not compile gives one problem at its line."""
        problems = check_template(HEADER + "{% if %}", fixture("adt_a04.hl7"), "ADT^A04")
        self.assertEqual([p.line for p in problems], [2])

    def test_render_time_problem_with_detail(self) -> None:
        """Problems found by rendering the sample name the line, with Liquid's detail."""
        source = HEADER + "\n" + 'NTE|1||{{ msg["PID-5"] | split: "~" | uniq: "x" }}'
        [problem] = check_template(source, fixture("adt_a04.hl7"), "ADT^A04")
        self.assertEqual(problem.line, 3)
        self.assertIn("can't read property 'x' of D\\F\\Angelo", problem.message)

    def test_relative_paths_checked_by_rendering(self) -> None:
        """A bad relative path inside a loop over the sample's segments is reported."""
        source = HEADER + '{% for nk in msg.NK1 %}\nNK1|{{ nk["2..1"] }}\n{% endfor %}'
        [problem] = check_template(source, fixture("adt_a04.hl7"), "ADT^A04")
        self.assertEqual(problem.line, 3)

    def test_unknown_charset(self) -> None:
        """An MSH-18 the body cannot be encoded with is reported on the MSH line."""
        source = "MSH|^~\\&|GW||||{{ now }}||ADT^A04|1|P|2.5||||||KLINGON"
        self.assertEqual(
            check_template(source, fixture("adt_a04.hl7"), "ADT^A04"),
            [TemplateProblem(1, "MSH-18 names a character set we do not know")],
        )

    def test_bad_sample(self) -> None:
        """A sample that is not HL7 is reported instead of a crash."""
        [problem] = check_template(HEADER, "not hl7", "ADT^A04")
        self.assertIn("sample", problem.message)


class DocumentedExampleTests(SynchronousTestCase):
    """The examples of docs/templates.md, rendered from the first-class samples."""

    APP = {"facility": "UDS&CO", "partner_app": "PARTNER", "partner_facility": "MAIN"}

    def test_docs_show_the_fixtures(self) -> None:
        """docs/templates.md shows the example templates exactly as tested here."""
        docs = (Path(__file__).parent.parent / "docs" / "templates.md").read_text("utf-8")
        for name in ("adt_a04_to_partner.liquid", "siu_s12_to_partner.liquid"):
            self.assertIn("```liquid\n" + fixture(name) + "```", docs)

    def test_adt_a04_to_partner(self) -> None:
        """ADT^A04: MRN re-issued, name forwarded unchanged, one NK1 per next of kin."""
        body = render(
            fixture("adt_a04_to_partner.liquid"),
            parse_message(fixture("adt_a04.hl7")),
            app=self.APP,
            ids=ControlIds(),
        )
        self.assertEqual(
            body.decode("utf-8").split("\r"),
            [
                "MSH|^~\\&|UDSGW|UDS\\T\\CO|PARTNER|MAIN|20240501123005||ADT^A04^ADT_A01|ID1|P|2.5.1",
                "EVN|A04|20240501093000",
                "PID|1||MRN100234^^^UDS\\T\\CO^MR||D\\F\\Angelo^Maria^Luisa^^^^L||19850314|F|||"
                "12 Example Street^Apt 4^Springfield^IL^62701^USA^H",
                "PV1|1|O|CLINIC1^101^A^SYNTHHOSP",
                "NK1|1|D\\F\\Angelo^Paolo|SPO",
                "NK1|2|Bianchi^Giulia|SIS",
                "",
            ],
        )

    def test_siu_s12_to_partner(self) -> None:
        """SIU^S12: appointment, note, patient and resources mapped from the sample."""
        body = render(
            fixture("siu_s12_to_partner.liquid"),
            parse_message(fixture("siu_s12.hl7")),
            message_type="SIU^S12",
            app=self.APP,
        )
        out = parse_message(body)
        self.assertEqual(out.get("MSH-9"), "SIU^S12^SIU_S12")
        self.assertEqual(out.get("SCH-1"), "APT1001^SCHEDSYS")
        self.assertEqual(out.get("SCH-11.4"), "20240510140000")
        self.assertEqual(out.get("NTE-3"), "Patient prefers afternoon appointments.")
        self.assertEqual(out.get("PID-3"), "MRN100234^^^UDS\\T\\CO^MR")
        self.assertEqual(out.get("PID-5.1"), "D\\F\\Angelo")
        self.assertEqual(out.get("AIS-4"), "20240510140000")
        self.assertEqual(out.get("AIL-3"), "CLINIC1^101")
        self.assertEqual(out.get("AIP-3"), "1234^Careful^Carl")
        self.assertEqual(
            [s.name for s in out.segments],
            ["MSH", "SCH", "NTE", "PID", "RGS", "AIS", "AIL", "AIP"],
        )


class LookupRenderTests(SynchronousTestCase):
    """Templates of text and plain lookups skip Liquid's render machinery, with the same result.

    Each case renders once through the direct lookups and once through Liquid (the same
    template with its lookups removed); bodies, errors and helper calls must match.
    """

    TRIGGER = parse_message(
        "MSH|^~\\&|HIS|H|GW|G|20240501||ADT^A04|M1|P|2.5\r"
        "PID|1||X-1^^^H~X-2^^^H||O\\T\\Brien^Ann||19800101|F\r"
        "NK1|1|Roe^Jo|SPO\r"
    )
    RESPONSES = (ActionResponse("lookup", ACK), ActionResponse("notify", None))
    APP = {"partner": "P|A^R~T\\N&R", "nested": {"key": "v^1"}, "number": 7}

    def both(self, source: str) -> tuple[object, object]:
        """(lookups, liquid): each a body or a RenderError's reason, with its helper calls."""
        template = compile_template(source)
        results = []
        for candidate in (template, evolve(template, lookups=None)):
            clock, ids = Clock(), ControlIds()
            try:
                outcome: object = render_body(
                    candidate,
                    TemplateData(self.TRIGGER, self.RESPONSES, self.APP),
                    message_type="ADT^A04",
                    now=clock,
                    new_control_id=ids,
                )
            except RenderError as error:
                outcome = ("error", error.reason, error.line)
            results.append((outcome, clock.calls, ids.calls))
        return results[0], results[1]

    def assertSame(self, source: str, *, direct: bool = True) -> None:
        template = compile_template(source)
        self.assertEqual(template._lookups is not None, direct, source)
        fast, liquid = self.both(source)
        self.assertEqual(fast, liquid, source)

    def test_plain_lookups(self) -> None:
        """Fields, components, repetitions, segments, app variables, responses and helpers."""
        for line in (
            '{{ msg["PID-3.1"] }}|{{ msg["PID-5.1"] }}^{{ msg["PID-5.2"] }}',
            '{{ msg["PID-3"] }}|{{ msg["PID-3[2].1"] }}|{{ msg["NK1-2"] }}',
            "{{ msg.PID }}",
            '{{ msg["MSH-2"] }}|{{ msg["MSH-9"] }}',
            "{{ app.partner }}|{{ app.nested.key }}|{{ app.number }}",
            '{{ actions.lookup["MSA-1"] }}|{{ actions.notify["MSA-1"] }}',
            "{{ control_id }}|{{ control_id }}|{{ now }}",
            "plain text only",
            "{% raw %}{{ kept }}{% endraw %}",
        ):
            self.assertSame(HEADER + "NTE|1||" + line)

    def test_lookups_that_fail_fall_back_to_liquid(self) -> None:
        """Missing keys and lookups into text give Liquid's own result, helpers called once."""
        for line in (
            "{{ control_id }}{{ app.missing }}{{ control_id }}",
            '{{ msg["ZZZ-1"] }}|{{ msg["PID-99"] }}',
            "{{ app.partner.key }}|{{ app.number.key }}",
            '{{ actions.nobody["MSA-1"] }}',
            '{{ msg["not a path"] }}',
        ):
            self.assertSame(HEADER + "NTE|1||" + line)

    def test_other_templates_keep_liquid(self) -> None:
        """Filters, tags, indexes and Liquid's special keys are never taken directly."""
        for line in (
            '{{ msg["PID-5.1"] | upcase }}',
            "{% if app.partner %}yes{% endif %}",
            '{{ responses[0]["MSA-1"] }}',
            "{{ responses.size }}|{{ app.first }}",
            '{% assign x = msg["PID-3.1"] %}{{ x }}',
            "{{ nope }}|{{ template }}",
            "{{ msg[app.partner] }}",
        ):
            self.assertSame(HEADER + "NTE|1||" + line, direct=False)

    def test_output_limit(self) -> None:
        """A body over Liquid's output limit (counted in UTF-8 bytes) fails the same way."""
        self.APP = {"partner": "\U0001f600" * (MAX_BODY_CHARS // 4 + 1)}
        self.assertSame(HEADER + "NTE|1||{{ app.partner }}")
        fast, _ = self.both(HEADER + "NTE|1||{{ app.partner }}")
        self.assertEqual(fast[0][0], "error")  # type: ignore[index]

    def test_rendered_without_liquid(self) -> None:
        """The direct lookups really are used: a Liquid render context is never built."""
        import udsgateway.mapping.templating as templating

        built = []
        original = templating._Hl7RenderContext.__init__

        def spy(self: object, *args: object, **kwargs: object) -> None:
            built.append(1)
            original(self, *args, **kwargs)  # type: ignore[arg-type]

        self.patch(templating._Hl7RenderContext, "__init__", spy)
        self.both(HEADER + 'NTE|1||{{ msg["PID-3.1"] }}')
        self.assertEqual(len(built), 1)  # the Liquid half of both() only


class TriggerDelimiterTests(SynchronousTestCase):
    """A template without a literal MSH line renders with the trigger's delimiters, so
    forwarding a trigger works whatever delimiters it uses (issue 11 item 1)."""

    VISTA = b"MSH^~|\\&^VISTA^500^LSQ^FAC^20240101^^ADT~A04^V1^P^2.4\rPID^1^^P1~~~H~MR^^Doe~Ann\n"

    def render(self, source: str, raw: bytes | None = None) -> bytes:
        return render_body(
            compile_template(source),
            TemplateData(parse_message(self.VISTA)),
            message_type="ADT^A04",
            now=lambda: datetime(2024, 1, 1),
            new_control_id=lambda: "OUT1",
            default_charset="latin-1",
            raw=raw,
        )

    def test_msg_alone_without_the_stored_bytes_is_normalised(self) -> None:
        """``{{ msg }}`` rendered (no stored bytes given, as ``flows render`` does): the
        VistA delimiters kept, segments ended by CR."""
        self.assertEqual(self.render("{{ msg }}"), self.VISTA.replace(b"\n", b"\r"))

    def test_msg_alone_with_the_stored_bytes_is_exact(self) -> None:
        """``{{ msg }}`` given the stored bytes returns them unchanged (the LF kept)."""
        self.assertEqual(self.render("{{ msg }}\n", raw=self.VISTA), self.VISTA)

    def test_header_less_template_adds_segments_in_the_trigger_delimiters(self) -> None:
        """``{{ msg.MSH }}`` then a segment written with the trigger's delimiters."""
        self.assertEqual(
            self.render('{{ msg.MSH }}\nZPN^{{ msg["PID-5.1"] }}~{{ msg["PID-5.2"] }}\n'),
            b"MSH^~|\\&^VISTA^500^LSQ^FAC^20240101^^ADT~A04^V1^P^2.4\rZPN^Doe~Ann\r",
        )

    def test_a_literal_header_still_declares_the_destination_delimiters(self) -> None:
        """A template with its own MSH line converts the VistA values to its delimiters."""
        self.assertEqual(
            self.render(
                "MSH|^~\\&|GW|F|R|F|20240101||ADT^A04|{{ control_id }}|P|2.5\n"
                'PID|1||{{ msg["PID-3"] }}||{{ msg["PID-5"] }}\n'
            ),
            b"MSH|^~\\&|GW|F|R|F|20240101||ADT^A04|OUT1|P|2.5\rPID|1||P1^^^H^MR||Doe^Ann\r",
        )
