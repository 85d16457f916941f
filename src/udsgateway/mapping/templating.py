"""Request-body templates: Liquid (python-liquid 2) that renders HL7 v2, escaped by default.

A TCP action's body is a Liquid template. ``docs/templates.md`` is the user's guide; in
short, a template sees::

    msg["PID-5.1"]                 the trigger message, by HL7 path (``udsgateway.hl7.message``)
    msg.NK1 / msg["NK1[*]"]        every NK1 segment, as a list of segment mappings
    seg["2.1"], seg[2]             a field path relative to one segment
    msg["PID-3[*]"]                every repetition of PID-3, as a list of mappings
    rep["1"], rep["4.2"]           a component path relative to one repetition
    responses[0]["MSA-2"]          the response (ACK) of the first earlier action
    actions.lookup["MSA-1"]        the response of the earlier action named "lookup"
    app.facility                   an app-wide variable
    now                            the time of rendering (HL7 timestamp when output)
    control_id                     a fresh message control ID (the same within a render)

**Escaping.** Like HTML autoescaping: every value written by ``{{ }}`` is HL7-escaped
with the destination's delimiters (``\\`` -> ``\\E\\``, ``|`` -> ``\\F\\``, ``^`` ->
``\\S\\``, ``&`` -> ``\\T\\``, ``~`` -> ``\\R\\``, CR/LF -> ``\\X0D\\``/``\\X0A\\``) unless it
is already in wire form. Values taken from HL7 messages are ``WireText``, a marked-safe
``str`` like markupsafe's ``Markup``: they are written byte-for-byte and never
double-escaped (a malformed ``\\X4`` passes unchanged). ``| raw`` marks any value as wire
form; ``| hl7_escape`` escapes any value, even wire text.

python-liquid's own ``autoescape`` is hard-wired to HTML (``markupsafe.escape``), so we do
not turn it on. Instead the environment replaces the output statement (``{{ }}`` and
``echo``) with one that stringifies through ``_wire_text``, makes ``capture`` produce
``WireText``, and makes the string filters that rebuild text (``join``, ``truncate``...)
keep wire text wire text. ``WireText`` itself, like ``Markup``, escapes plain operands of
``+``, ``replace``, ``split``... so ``append``, ``prepend``, ``replace``, ``remove`` and
``slice`` need no change. Tags without a use here (``cycle``, ``tablerow``, ``include``,
``render``) and the HTML filters are removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, datetime
from io import StringIO
from typing import TYPE_CHECKING, Any, Final, SupportsIndex, TextIO, cast

from attrs import field, frozen
from liquid import Environment, RenderContext
from liquid.builtin.content import ContentNode
from liquid.builtin.expressions.filtered import FilteredExpression
from liquid.builtin.expressions.path import Path as LiquidPath
from liquid.builtin.filters.misc import date as liquid_date
from liquid.builtin.filters.string import squish as liquid_squish
from liquid.builtin.output import Output, OutputNode
from liquid.builtin.tags.capture_tag import CaptureNode, CaptureTag
from liquid.builtin.tags.echo_tag import EchoNode, EchoTag
from liquid.exceptions import (
    FilterArgumentError,
    LiquidError,
    LiquidSyntaxError,
    ResourceLimitError,
    UnknownFilterError,
)
from liquid.filter import with_context
from liquid.limits import to_int
from liquid.undefined import is_undefined

from udsgateway.hl7.header import Delimiters, HeaderProblem, parse_header
from udsgateway.hl7.message import (
    ALL,
    Message,
    MessageParseError,
    Path,
    PathSyntaxError,
    Segment,
    delimiters_from_header,
    is_segment_id,
    parse_message,
    parse_path,
    python_codec,
    split,
    value_in_segment,
)
from udsgateway.mapping.lookups import (
    MAX_BODY_CHARS,
    TIMESTAMP_FORMAT,
    LookupPlan,
    Once,
    RenderError,
    body_segments,
    chars,
    encode,
    escape_value,
    plan_lookups,
    render_lookups,
    translate,
)

if TYPE_CHECKING:
    from liquid import BoundTemplate

__all__ = [
    "ActionResponse",
    "DelimiterSet",
    "RenderError",
    "Template",
    "TemplateData",
    "TemplateError",
    "TemplateProblem",
    "WireText",
    "check_template",
    "compile_template",
    "escape_value",
    "render_body",
]

MAX_LOOP_ITERATIONS: Final = 100_000

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_MESSAGE_KEY = re.compile(r"[A-Z][A-Z0-9]{2}[-\[]")
_RELATIVE_FIELD = re.compile(r"[0-9]")
_COMPONENT_KEY = re.compile(r"(?P<component>[1-9][0-9]*)(?:\.(?P<sub>[1-9][0-9]*))?")
_HL7_DATE = re.compile(
    r"(?P<year>\d{4})(?:(?P<month>\d{2})(?:(?P<day>\d{2})(?:(?P<hour>\d{2})"
    r"(?:(?P<minute>\d{2})(?:(?P<second>\d{2})(?:\.(?P<fraction>\d{1,4}))?)?)?)?)?)?"
    r"(?P<offset>[+-]\d{4})?"
)
_DATE_FORMATS: Final = {
    "year": "%Y",
    "month": "%Y%m",
    "day": "%Y%m%d",
    "hour": "%Y%m%d%H",
    "minute": "%Y%m%d%H%M",
    "second": "%Y%m%d%H%M%S",
}
_TIMESTAMP_FORMAT: Final = TIMESTAMP_FORMAT
_CONTEXT_NAMES: Final = ("msg", "responses", "actions", "app", "now", "control_id")
_CHECK_TIME: Final = datetime(2000, 1, 1)
_CHECK_CONTROL_ID: Final = "CHECK"


#: The delimiters of a message: the header layer's class serves the whole gateway.
DelimiterSet = Delimiters


_chars = chars
_translate = translate


class WireText(str):
    """Text already in HL7 wire form for ``delimiters``: written out as it is.

    The HL7 counterpart of markupsafe's ``Markup``. Operations that combine it with plain
    strings escape those first, and return ``WireText`` again.
    """

    delimiters: DelimiterSet

    def __new__(cls, text: str, delimiters: DelimiterSet) -> WireText:
        """Mark ``text`` (already wire form for ``delimiters``) as safe."""
        obj = super().__new__(cls, text)
        obj.delimiters = delimiters
        return obj

    def __hl7__(self) -> str:
        """The wire form (a plain ``str``)."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"WireText({str.__repr__(self)})"

    def _wire(self, text: str) -> WireText:
        return WireText(text, self.delimiters)

    def _coerce(self, other: object) -> str:
        if isinstance(other, WireText):
            return str.__str__(other)
        return escape_value(other if isinstance(other, str) else str(other), self.delimiters)

    def __add__(self, other: str) -> WireText:
        if not isinstance(other, str):
            return NotImplemented
        return self._wire(str.__str__(self) + self._coerce(other))

    def __radd__(self, other: str) -> WireText:
        if not isinstance(other, str):
            return NotImplemented
        return self._wire(self._coerce(other) + str.__str__(self))

    def __mul__(self, count: SupportsIndex) -> WireText:
        return self._wire(str.__mul__(self, count))

    def __getitem__(self, key: SupportsIndex | slice) -> WireText:
        return self._wire(str.__getitem__(self, key))

    def upper(self) -> WireText:
        return self._wire(str.upper(self))

    def lower(self) -> WireText:
        return self._wire(str.lower(self))

    def capitalize(self) -> WireText:
        return self._wire(str.capitalize(self))

    def title(self) -> WireText:
        return self._wire(str.title(self))

    def swapcase(self) -> WireText:
        return self._wire(str.swapcase(self))

    def strip(self, chars: str | None = None) -> WireText:
        return self._wire(str.strip(self, chars))

    def lstrip(self, chars: str | None = None) -> WireText:
        return self._wire(str.lstrip(self, chars))

    def rstrip(self, chars: str | None = None) -> WireText:
        return self._wire(str.rstrip(self, chars))

    def replace(self, old: str, new: str, count: SupportsIndex = -1) -> WireText:
        return self._wire(str.replace(self, self._coerce(old), self._coerce(new), count))

    def split(self, sep: str | None = None, maxsplit: SupportsIndex = -1) -> list[str]:
        parts = str.split(self, None if sep is None else self._coerce(sep), maxsplit)
        return [self._wire(part) for part in parts]

    def rsplit(self, sep: str | None = None, maxsplit: SupportsIndex = -1) -> list[str]:
        parts = str.rsplit(self, None if sep is None else self._coerce(sep), maxsplit)
        return [self._wire(part) for part in parts]

    def partition(self, sep: str) -> tuple[str, str, str]:
        head, middle, tail = str.partition(self, self._coerce(sep))
        return self._wire(head), self._wire(middle), self._wire(tail)

    def rpartition(self, sep: str) -> tuple[str, str, str]:
        head, middle, tail = str.rpartition(self, self._coerce(sep))
        return self._wire(head), self._wire(middle), self._wire(tail)

    def join(self, iterable: Iterable[str]) -> WireText:
        return self._wire(str.join(self, (self._coerce(item) for item in iterable)))


# -- views of messages, as Liquid sees them ------------------------------------------


class _TemplatePathError(LiquidError):
    """A key that looks like an HL7 path but is not one (``msg["PID-5..1"]``).

    The message names only template text, never message content.
    """


class MessageView(Mapping[str, object]):
    """A message as a Liquid mapping: HL7 paths and segment IDs are its keys.

    ``view["PID-5.1"]`` is ``WireText``; ``view["NK1"]`` (``view.NK1``) and
    ``view["NK1[*]"]`` are lists of ``SegmentView``; ``view["NK1[2]"]`` is one;
    ``view["PID-3[*]"]`` is a list of ``RepetitionView``. Unpopulated paths give ``""``.
    """

    def __init__(self, message: Message | None, target: DelimiterSet) -> None:
        """Wrap ``message`` (None: a message with no segments) for ``target``."""
        self._message = message
        self._target = target

    def __getitem__(self, key: str) -> object:
        message = self._message
        if not isinstance(key, str):
            raise KeyError(key)
        if is_segment_id(key):
            key += "[*]"
        elif not _MESSAGE_KEY.match(key):
            raise KeyError(key)  # "size", "first": let Liquid handle them
        path = _liquid_path(key)
        if message is None:
            return [] if path.has_wildcard else WireText("", self._target)
        if path.occurrence == ALL:
            return [self._segment_view(s) for s in message.segments_named(path.segment)]
        assert isinstance(path.occurrence, int)
        segment = message.segment(path.segment, path.occurrence)
        if path.field is None:
            if segment is None:
                raise KeyError(key)
            return self._segment_view(segment)
        if segment is None:
            return [] if path.repetition == ALL else WireText("", self._target)
        return _field_value(segment, path, message.delimiters, self._target)

    def _segment_view(self, segment: Segment) -> SegmentView:
        assert self._message is not None
        return SegmentView(segment, self._message.delimiters, self._target)

    def __iter__(self) -> Iterator[str]:
        if self._message is None:
            return iter(())
        return iter(dict.fromkeys(segment.name for segment in self._message.segments))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __hl7__(self) -> str:
        """The whole message in wire form, segments separated by CR."""
        if self._message is None:
            return ""
        source = self._message.delimiters
        return "\r".join(_segment_text(s, source, self._target) for s in self._message.segments)


class SegmentView(Mapping[str, object]):
    """One segment as a Liquid mapping keyed by field paths relative to it.

    ``seg["5"]`` or ``seg[5]`` (field 5), ``seg["5.1"]``, ``seg["5[2].1"]``,
    ``seg["3[*]"]`` (a list of ``RepetitionView``).
    """

    def __init__(self, segment: Segment, source: Delimiters, target: DelimiterSet) -> None:
        """Wrap ``segment`` of a message with ``source`` delimiters, for ``target``."""
        self._segment = segment
        self._source = source
        self._target = target

    def __getitem__(self, key: str | int) -> object:
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or not _RELATIVE_FIELD.match(key):
            raise KeyError(key)
        path = _liquid_path(f"{_segment_key(self._segment)}-{key}")
        return _field_value(self._segment, path, self._source, self._target)

    def __iter__(self) -> Iterator[str]:
        return iter(str(number) for number in range(1, len(self._segment.fields)))

    def __len__(self) -> int:
        return len(self._segment.fields) - 1

    def __hl7__(self) -> str:
        """The segment in wire form."""
        return _segment_text(self._segment, self._source, self._target)


class RepetitionView(Mapping[str, object]):
    """One repetition of a field, keyed by component paths: ``rep["1"]``, ``rep["4.2"]``."""

    def __init__(self, value: str, source: Delimiters, target: DelimiterSet) -> None:
        """Wrap one repetition (wire form with ``source`` delimiters) for ``target``."""
        self._value = value
        self._source = source
        self._target = target

    def __getitem__(self, key: str | int) -> object:
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or not _RELATIVE_FIELD.match(key):
            raise KeyError(key)
        match = _COMPONENT_KEY.fullmatch(key)
        if match is None:
            raise _TemplatePathError(
                f'not a component path: {key!r} (expected e.g. "1" or "4.2")', token=None
            )
        components = split(self._value, self._source.component)
        index = int(match["component"])
        value = components[index - 1] if index <= len(components) else ""
        if match["sub"] is not None:
            subcomponents = split(value, self._source.subcomponent)
            index = int(match["sub"])
            value = subcomponents[index - 1] if index <= len(subcomponents) else ""
        return WireText(_translate(value, self._source, self._target), self._target)

    def __iter__(self) -> Iterator[str]:
        count = len(split(self._value, self._source.component))
        return iter(str(number) for number in range(1, count + 1))

    def __len__(self) -> int:
        return len(split(self._value, self._source.component))

    def __hl7__(self) -> str:
        """The repetition in wire form."""
        return _translate(self._value, self._source, self._target)


def _liquid_path(text: str) -> Path:
    try:
        return parse_path(text)
    except PathSyntaxError as err:
        raise _TemplatePathError(str(err), token=None) from None


def _segment_key(segment: Segment) -> str:
    # A relative key is parsed as a path of this segment; a malformed line's name
    # cannot be parsed, but any valid ID does as well since the segment is given.
    return segment.name if is_segment_id(segment.name) else "ZZZ"


def _segment_text(segment: Segment, source: Delimiters, target: DelimiterSet) -> str:
    if segment.name == "MSH":
        return segment.text
    return _translate(segment.text, source, target)


def _field_value(segment: Segment, path: Path, source: Delimiters, target: DelimiterSet) -> object:
    assert path.field is not None
    if path.repetition == ALL:
        value = segment.field(path.field)
        if not value:
            return []
        if segment.is_atomic(path.field):
            return [WireText(value, target)]  # MSH-1/MSH-2 never repeat
        return [RepetitionView(rep, source, target) for rep in split(value, source.repetition)]
    value = value_in_segment(segment, path, source)
    if segment.is_atomic(path.field):
        return WireText(value, target)  # the delimiters themselves: never translated
    return WireText(_translate(value, source, target), target)


# -- the Liquid environment ----------------------------------------------------------


class _Hl7RenderContext(RenderContext):
    """A render context that knows the destination's delimiters."""

    def __init__(
        self,
        template: BoundTemplate,
        *,
        globals: Mapping[str, object] | None = None,
        delimiters: DelimiterSet | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(template, globals=globals, **kwargs)
        self.hl7_delimiters: DelimiterSet = delimiters or Delimiters.DEFAULT


def _target(context: RenderContext) -> DelimiterSet:
    if isinstance(context, _Hl7RenderContext):
        return context.hl7_delimiters
    return Delimiters.DEFAULT


def _wire_text(value: object, target: DelimiterSet) -> str:
    """Stringify a value for output: wire text as it is, everything else escaped."""
    if isinstance(value, WireText) or callable(getattr(value, "__hl7__", None)):
        return _plain_text(value)
    if isinstance(value, (list, tuple)):
        return "".join(_wire_text(item, target) for item in value)
    return escape_value(_plain_text(value), target)


def _plain_text(value: object) -> str:
    """Liquid's stringification, plus wire text of views and HL7 dates; no escaping."""
    if isinstance(value, str):
        return str.__str__(value)
    hl7 = getattr(value, "__hl7__", None)
    if callable(hl7):
        return str(hl7())
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime(_TIMESTAMP_FORMAT)
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    if isinstance(value, (list, tuple)):
        return "".join(_plain_text(item) for item in value)
    if isinstance(value, range):
        return f"{value.start}..{value.stop - 1}"
    return str(value)  # Undefined gives ""


class _OutputNode(OutputNode):
    """``{{ expression }}``: HL7-escaped unless the value is wire text."""

    def render_to_output(self, context: RenderContext, buffer: TextIO) -> int:
        """Write the escaped value; errors point at this output statement's line."""
        try:
            value = self.expression.evaluate(context)
        except LiquidError as err:
            if not err.token:
                err.token = self.token
            raise
        return buffer.write(_wire_text(value, _target(context)))

    async def render_to_output_async(self, context: RenderContext, buffer: TextIO) -> int:
        """As ``render_to_output`` (nothing here waits)."""
        return self.render_to_output(context, buffer)


class _Output(Output):
    node_class = _OutputNode


class _EchoNode(_OutputNode, EchoNode):
    """``{% echo expression %}``: as ``{{ expression }}``."""


class _EchoTag(EchoTag):
    node_class = _EchoNode


class _CaptureNode(CaptureNode):
    """``capture`` keeps what it captured as wire text: it is already escaped output."""

    def _assign(self, context: RenderContext, buf: StringIO) -> None:
        context.assign(self.name, WireText(buf.getvalue(), _target(context)))


class _CaptureTag(CaptureTag):
    node_class = _CaptureNode


class _SafeFilterError(FilterArgumentError):
    """A filter error whose message names no values (safe for execution logs)."""


def _raw(value: object, *, context: RenderContext) -> WireText:
    """``| raw``: insert the value as it is, unescaped."""
    if isinstance(value, WireText):
        return value
    return WireText(_plain_text(value), _target(context))


def _hl7_escape(value: object, *, context: RenderContext) -> WireText:
    """``| hl7_escape``: escape the value, even wire text (which then becomes data)."""
    target = _target(context)
    return WireText(escape_value(_plain_text(value), target), target)


def _hl7_date(value: object, fmt: object = None) -> str:
    """``| hl7_date`` and ``| hl7_date: "%d.%m.%Y"``: parse and format a date.

    Input: a datetime (``now``), an HL7 DTM/TS (``20240501``, ``202405011230+0200``,
    ``20240501123000^S``) or ISO 8601 (``2024-05-01``). Without a format the output is
    HL7 with the input's precision (and its offset, when it has one); a datetime gives
    ``YYYYMMDDHHMMSS``. Empty or missing input gives ``""``.
    """
    if value is None or is_undefined(value):
        return ""
    if is_undefined(fmt):
        fmt = None
    if fmt is not None and not isinstance(fmt, str):
        raise _SafeFilterError("hl7_date: the format must be a string", token=None)
    if isinstance(value, datetime):
        moment, default_format = value, _TIMESTAMP_FORMAT
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
        default_format = "%Y%m%d"
    elif isinstance(value, str):
        text = str.__str__(value).strip()
        if isinstance(value, WireText) and value.delimiters.component:
            text = text.split(value.delimiters.component)[0]  # TS: time^degree of precision
        if not text:
            return ""
        moment, default_format = _parse_date(text)
    else:
        raise _SafeFilterError("hl7_date: the value is not a date", token=None)
    try:
        return moment.strftime(fmt if fmt is not None else default_format)
    except ValueError:
        raise _SafeFilterError("hl7_date: the format is not valid", token=None) from None


def _parse_date(text: str) -> tuple[datetime, str]:
    match = _HL7_DATE.fullmatch(text)
    if match is None:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise _SafeFilterError("hl7_date: the value is not a date", token=None) from None
        default = "%Y%m%d" if len(text) == 10 else _TIMESTAMP_FORMAT
        return moment, default + ("%z" if moment.tzinfo else "")
    parts = {name: match[name] for name in _DATE_FORMATS}
    precision = [name for name, part in parts.items() if part is not None][-1]
    offset = match["offset"]
    text_moment = (
        parts["year"]
        + (parts["month"] or "01")
        + (parts["day"] or "01")
        + (parts["hour"] or "00")
        + (parts["minute"] or "00")
        + (parts["second"] or "00")
        + (offset or "")
    )
    try:
        moment = datetime.strptime(text_moment, _TIMESTAMP_FORMAT + ("%z" if offset else ""))
    except ValueError:
        raise _SafeFilterError("hl7_date: the value is not a date", token=None) from None
    return moment, _DATE_FORMATS[precision] + ("%z" if offset else "")


def _date(value: object, fmt: object, *, context: RenderContext) -> object:
    """Liquid's ``date``, with ``"now"``/``"today"`` read from the injected clock."""
    if value in ("now", "today"):
        now = context.resolve("now", default=None)
        value = now if isinstance(now, datetime) else value
    result = liquid_date(value, fmt, environment=context.env)
    if isinstance(value, WireText) and result == str.__str__(value):
        return value  # returned unchanged (not a date): still wire text
    return result


def _join(values: object, separator: object = " ", *, context: RenderContext) -> WireText:
    """``join``: items and separator escaped unless wire text; the result is wire text."""
    if not isinstance(values, (list, tuple)):
        raise _SafeFilterError(
            f"join expected an array, found {type(values).__name__}", token=None
        )
    target = _target(context)
    items = [_wire_text(item, target) for item in values]
    return WireText(_wire_text(separator, target).join(items), target)


def _truncate(value: object, num: object = 50, end: object = "...") -> str:
    """``truncate``: as Liquid's, cutting wire text as wire text."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if is_undefined(num):
        raise _SafeFilterError("truncate expected an integer, found Undefined", token=None)
    try:
        length = to_int(num)
    except (ValueError, TypeError):
        raise _SafeFilterError("truncate expected an integer", token=None) from None
    ending = str(end)
    if len(text) < length:
        return text
    head = text[: max(length - len(ending), 0)]
    if isinstance(text, WireText) and text.delimiters.escape:
        escape = text.delimiters.escape
        if head.count(escape) % 2:
            head = head[: head.rindex(escape)]  # never cut an escape sequence in two
    return head + ending


def _truncatewords(value: object, num: object = 15, end: object = "...") -> str:
    """``truncatewords``: as Liquid's, keeping wire text wire text."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if is_undefined(num):
        raise _SafeFilterError("truncatewords expected an integer, found Undefined", token=None)
    try:
        count = max(to_int(num), 1)
    except (ValueError, TypeError):
        raise _SafeFilterError("truncatewords expected an integer", token=None) from None
    words = text.split()
    space = WireText(" ", text.delimiters) if isinstance(text, WireText) else " "
    if len(words) <= count:
        return space.join(words)
    return space.join(words[:count]) + str(end)


def _keep_wire(
    liquid_filter: Callable[[object], object],
) -> Callable[[object], object]:
    """Wrap a filter that only removes or collapses characters, so wire text stays wire."""

    def wrapper(value: object) -> object:
        result = liquid_filter(value)
        if isinstance(value, WireText) and isinstance(result, str):
            return WireText(result, value.delimiters)
        return result

    wrapper.__doc__ = liquid_filter.__doc__
    return wrapper


class _Hl7Environment(Environment):
    """Liquid for HL7 bodies: HL7 autoescaping, bounded output and loops."""

    output_stream_limit = MAX_BODY_CHARS
    loop_iteration_limit = MAX_LOOP_ITERATIONS

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        """Liquid's built-ins, less HTML and partials, with HL7-aware output."""
        super().setup_tags_and_filters(extra=False)
        for tag in ("cycle", "tablerow", "include", "render"):
            self.tags.pop(tag, None)
        for name in ("escape", "escape_once", "newline_to_br", "strip_html", "safe", "escapejs"):
            self.filters.pop(name, None)
        self.add_tag(_Output)
        self.add_tag(_EchoTag)
        self.add_tag(_CaptureTag)
        self.add_filter("raw", with_context(_raw))
        self.add_filter("hl7_escape", with_context(_hl7_escape))
        self.add_filter("hl7_date", _hl7_date)
        self.add_filter("date", with_context(_date))
        self.add_filter("join", with_context(_join))
        self.add_filter("truncate", _truncate)
        self.add_filter("truncatewords", _truncatewords)
        self.add_filter("squish", _keep_wire(liquid_squish))
        self.add_filter("strip_newlines", _keep_wire(_strip_newlines))


def _strip_newlines(value: object) -> object:
    """``strip_newlines``: remove CR and LF."""
    text = "" if value is None else value if isinstance(value, str) else str(value)
    return _LINE_BREAK.sub("", text)


_ENVIRONMENT: Final = _Hl7Environment()


# -- the public API ------------------------------------------------------------------


@frozen
class TemplateProblem:
    """One problem found in a template, at a 1-based line of its source."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class TemplateError(Exception):
    """A template that does not compile."""

    def __init__(self, problem: TemplateProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@frozen
class Template:
    """A compiled request-body template.

    ``delimiters`` are those its literal MSH line declares (``MSH|^~\\&|``), or the HL7
    defaults when the template does not start with a literal header; such a template
    (``{{ msg }}``, say) is rendered with the trigger's own delimiters.
    """

    source: str
    delimiters: Delimiters
    _bound: BoundTemplate = field(repr=False, eq=False)
    #: The template as text and lookups, when it is nothing more (see ``_lookups``).
    _lookups: LookupPlan | None = field(default=None, repr=False, eq=False)
    #: The template starts with a literal MSH line of its own.
    declares_header: bool = True
    #: The template is ``{{ msg }}`` alone: the trigger's stored bytes are forwarded
    #: exactly as received (see ``render_body``).
    passthrough: bool = False


@frozen
class ActionResponse:
    """The response of an earlier action in the chain (None when it had none)."""

    name: str
    message: Message | None


@frozen
class TemplateData:
    """What a template renders from: the trigger, earlier responses, app variables."""

    trigger: Message
    responses: tuple[ActionResponse, ...] = ()
    app: Mapping[str, object] = field(factory=dict, hash=False)


def compile_template(source: str) -> Template:
    """Compile a body template; raises ``TemplateError`` with the line of the problem."""
    try:
        bound = _ENVIRONMENT.from_string(source)
    except LiquidError as err:
        raise TemplateError(_problem(err, source, detailed=True)) from None
    declared = _declared_delimiters(source)
    return Template(
        source,
        declared if declared is not None else Delimiters.DEFAULT,
        bound,
        _lookups(bound),
        declares_header=declared is not None,
        passthrough=_PASSTHROUGH.fullmatch(source) is not None,
    )


#: ``{{ msg }}`` alone (blank space around it allowed): forward the trigger byte-exact.
_PASSTHROUGH: Final = re.compile(r"\s*\{\{-?\s*msg\s*-?\}\}\s*")


def render_body(
    template: Template,
    data: TemplateData,
    *,
    message_type: str,
    now: Callable[[], datetime],
    new_control_id: Callable[[], str],
    delimiters: DelimiterSet | None = None,
    default_charset: str = "utf-8",
    raw: bytes | None = None,
) -> bytes:
    """Render an outbound message and check it; returns the encoded bytes.

    A pass-through template (``{{ msg }}`` alone) given the trigger's stored bytes
    ``raw`` returns them unchanged: same delimiters, segment separators (CR, LF or
    CRLF), blank lines, trailing bytes and charset as received. Its MSH-9 must still
    be ``message_type`` and its MSH-10 non-empty.

    Any other template: lines are joined with CR (template text from TOML uses LF),
    blank lines dropped and leading spaces/tabs removed (templates may be indented),
    and a CR ends the last segment. The result must start with an MSH declaring
    ``delimiters`` (default: the template's own; the trigger's when the template has
    no literal MSH line), carry MSH-9 type^event equal to ``message_type``
    (``ADT^A04``) and a non-empty MSH-10. It is encoded by its MSH-18
    (``default_charset`` when empty). ``now`` and ``new_control_id`` are called at most
    once each, and only if the template uses them. Raises ``RenderError``.
    """
    if template.passthrough and raw is not None:
        return _passthrough(raw, message_type, default_charset)
    if delimiters is not None:
        target = delimiters
    elif template.declares_header:
        target = template.delimiters
    else:
        target = data.trigger.delimiters
    text = _render(template, data, target, now, new_control_id, detailed=False)
    segments, charset = _body_segments(text, message_type, target, detailed=False)
    return _encode(segments, python_codec(charset) if charset else default_charset)


def check_template(
    source: str,
    sample: str | bytes,
    message_type: str,
    *,
    app: Mapping[str, object] | None = None,
    action_names: Sequence[str] | None = None,
) -> list[TemplateProblem]:
    """Validate a template against its trigger's sample, for ``flows import``.

    Checks that it compiles, that every path it names is an HL7 path, that it uses known
    variables and filters (app variables and earlier action names too, when given), and
    that rendering it from the sample gives a valid ``message_type`` message. Returns
    the problems found, by line; an empty list means the template is fine.
    """
    try:
        template = compile_template(source)
    except TemplateError as err:
        return [err.problem]
    try:
        trigger = parse_message(sample)
    except MessageParseError as err:
        return [TemplateProblem(1, f"the trigger's sample is not an HL7 message: {err.reason}")]
    problems = _static_problems(template, app, action_names)
    if problems:
        return problems
    data = TemplateData(
        trigger,
        tuple(ActionResponse(name, None) for name in action_names or ()),
        app if app is not None else {},
    )
    target = template.delimiters if template.declares_header else trigger.delimiters
    try:
        text = _render(
            template,
            data,
            target,
            lambda: _CHECK_TIME,
            lambda: _CHECK_CONTROL_ID,
            detailed=True,
        )
        segments, charset = _body_segments(text, message_type, target, detailed=True)
        _encode(segments, python_codec(charset) if charset else "utf-8")
    except RenderError as err:
        line = err.line if err.line is not None else _header_line(source)
        return [TemplateProblem(line, err.reason)]
    return []


# -- rendering and checking ----------------------------------------------------------


class _RenderGlobals(Mapping[str, object]):
    """The names a template sees; ``now`` and ``control_id`` computed on first use."""

    def __init__(
        self,
        data: TemplateData,
        target: DelimiterSet,
        now: Callable[[], object],
        new_control_id: Callable[[], object],
    ) -> None:
        responses = [MessageView(r.message, target) for r in data.responses]
        actions: dict[str, MessageView] = {}
        for response, view in zip(data.responses, responses, strict=True):
            actions.setdefault(response.name, view)
        self._values: dict[str, object] = {
            "msg": MessageView(data.trigger, target),
            "responses": responses,
            "actions": actions,
            "app": data.app,
        }
        self._lazy: dict[str, Callable[[], object]] = {
            "now": now,
            "control_id": new_control_id,
        }

    def __getitem__(self, key: str) -> object:
        if key not in self._values:
            self._values[key] = self._lazy[key]()  # KeyError for unknown names
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(_CONTEXT_NAMES)

    def __len__(self) -> int:
        return len(_CONTEXT_NAMES)


#: A template that is only text and ``{{ name.key["key"] }}`` outputs: each item is
#: literal text or the names of one lookup.
_Lookups = tuple[str | tuple[str, ...], ...]

#: Keys that Liquid's item getter treats specially (``.size`` of a list, say).
_SPECIAL_KEYS: Final = frozenset({"size", "first", "last"})


def _lookups(bound: BoundTemplate) -> LookupPlan | None:
    """The template as text and plain lookups, or None when it uses anything else.

    Most request bodies are a fixed layout with values picked from the trigger
    (``{{ msg["PID-5.1"] }}``, ``{{ app.partner }}``, ``{{ control_id }}``).
    Liquid renders those through a render context, a scope chain and an output
    stream per value, which costs more than the rest of an action's work; such
    templates become a plan that ``udsgateway.mapping.lookups`` renders directly
    (compiled). Tags, filters, variables from tags, non-string keys and the keys
    Liquid treats specially (size, first, last) all keep the full Liquid render.
    """
    lookups: list[str | tuple[str, ...]] = []
    for node in bound.nodes:
        if type(node) is ContentNode:
            lookups.append(node.text)
            continue
        if type(node) is not _OutputNode:
            return None
        expression = node.expression
        if type(expression) is not FilteredExpression or expression.filters:
            return None
        path = expression.left
        if type(path) is not LiquidPath:
            return None
        names = path.path
        if not all(type(name) is str for name in names) or names[0] not in _CONTEXT_NAMES:
            return None
        if any(name in _SPECIAL_KEYS for name in names[1:]):
            return None
        # A cast, not an ignore: the build's type check (mypyc, without python-liquid
        # installed) sees Any here, and an unused ignore fails it.
        lookups.append(cast(tuple[str, ...], tuple(names)))
    return plan_lookups(lookups)


class _OtherLookups:
    """The lookups a plan leaves to Python (responses, segments, non-string values).

    Each is ``names[0][names[1]]...`` on the render's globals, built on first use,
    written exactly as ``_OutputNode`` writes it; None when the lookup fails, and the
    full Liquid render then produces Liquid's own result or error for it.
    """

    def __init__(
        self, data: TemplateData, target: DelimiterSet, now: Once, new_control_id: Once
    ) -> None:
        self._data = data
        self._target = target
        self._now = now
        self._new_control_id = new_control_id
        self._names: _RenderGlobals | None = None

    def names(self) -> _RenderGlobals:
        """The render's globals (the same object on every call)."""
        if self._names is None:
            self._names = _RenderGlobals(self._data, self._target, self._now, self._new_control_id)
        return self._names

    def __call__(self, item: tuple[str, ...]) -> str | None:
        try:
            value = self.names()[item[0]]
            for key in item[1:]:
                value = value[key]  # type: ignore[index]
            if is_undefined(value):
                return None
            return _wire_text(value, self._target)
        except Exception:
            return None


def _render(
    template: Template,
    data: TemplateData,
    target: DelimiterSet,
    now: Callable[[], datetime],
    new_control_id: Callable[[], str],
    *,
    detailed: bool,
) -> str:
    # Whichever way the template is rendered (or both), each helper is called at most once.
    once_now, once_id = Once(now), Once(new_control_id)
    other = _OtherLookups(data, target, once_now, once_id)
    if template._lookups is not None:
        text = render_lookups(
            template._lookups, data.trigger, data.app, target, once_now, once_id, other
        )
        if text is not None:
            return text
    bound = template._bound
    context = _Hl7RenderContext(bound, globals=other.names(), delimiters=target)
    buffer = context.get_buffer()
    try:
        bound.render_with_context(context, buffer)
    except LiquidError as err:
        problem = _problem(err, template.source, detailed=detailed)
        raise RenderError(problem.message, problem.line) from None
    except Exception as err:  # a template must never crash the executor
        raise RenderError(f"the template failed ({type(err).__name__})") from None
    return buffer.getvalue()


def _problem(err: LiquidError, source: str, *, detailed: bool) -> TemplateProblem:
    context = err.context()
    if context is not None:
        line = context[0]
    elif isinstance(err, LiquidSyntaxError):
        line = max(len(_LINE_BREAK.split(source.rstrip("\r\n"))), 1)  # "found end of ..."
    else:
        line = 1
    safe = isinstance(err, (_SafeFilterError, _TemplatePathError)) or not _is_render_time(err)
    if detailed or safe:
        message = str(err.message)
    else:
        # Liquid's render-time messages may quote values ("could not cast 'Smith'").
        message = f"the template failed ({type(err).__name__})"
    return TemplateProblem(line, message)


def _is_render_time(err: LiquidError) -> bool:
    return not isinstance(err, (LiquidSyntaxError, ResourceLimitError, UnknownFilterError))


def _declared_delimiters(source: str) -> Delimiters | None:
    """The delimiters of the template's literal MSH line; None when it has none."""
    for line in _LINE_BREAK.split(source):
        stripped = line.lstrip(" \t")
        if not stripped:
            continue
        if stripped.startswith("MSH"):
            try:
                return delimiters_from_header(stripped)
            except MessageParseError:
                return Delimiters.DEFAULT
        break
    return None


def _passthrough(raw: bytes, message_type: str, default_charset: str) -> bytes:
    """The trigger's stored bytes, checked as any rendered body is, and unchanged."""
    header = parse_header(raw, default_charset=default_charset)
    if isinstance(header, HeaderProblem):
        raise RenderError(f"the trigger's header is unreadable: {header.diagnostic}")
    expected = message_type.split("^")[:2]
    # A v2.1-style MSH-9 without an event still forwards as the action's type.
    event = expected[1] if len(expected) > 1 else ""
    if header.message_code != expected[0] or header.trigger_event not in (event, ""):
        raise RenderError(f"MSH-9 is not {'^'.join(expected)}, the action's message type")
    if not header.control_id:
        raise RenderError("MSH-10 (message control ID) is empty")
    return raw


def _header_line(source: str) -> int:
    for number, line in enumerate(_LINE_BREAK.split(source), start=1):
        if line.lstrip(" \t").startswith("MSH"):
            return number
    return 1


_body_segments = body_segments
_encode = encode


# -- static checks -------------------------------------------------------------------


def _static_problems(
    template: Template,
    app: Mapping[str, object] | None,
    action_names: Sequence[str] | None,
) -> list[TemplateProblem]:
    analysis = template._bound.analyze(include_partials=False)
    problems: list[TemplateProblem] = []
    for name, spans in analysis.filters.items():
        if name not in _ENVIRONMENT.filters:
            for span in spans:
                line = span.line_col(template.source)[0]
                problems.append(TemplateProblem(line, f"unknown filter {name!r}"))
    for root, variables in analysis.globals.items():
        for variable in variables:
            message = _variable_problem(root, variable.segments[1:], app, action_names)
            if message is not None:
                line = variable.span.line_col(template.source)[0]
                problems.append(TemplateProblem(line, message))
    return sorted(set(problems), key=lambda p: (p.line, p.message))


def _variable_problem(
    root: str,
    keys: Sequence[object],
    app: Mapping[str, object] | None,
    action_names: Sequence[str] | None,
) -> str | None:
    if root not in _CONTEXT_NAMES:
        return f"unknown variable {root!r} (known: {', '.join(_CONTEXT_NAMES)})"
    if not keys or isinstance(keys[0], list):
        return None
    first = keys[0]
    if root == "msg":
        return _chain_problem("message", keys)
    if root == "responses":
        if isinstance(first, int) or first in ("first", "last"):
            return _chain_problem("message", keys[1:])
        if first == "size":
            return None
        return "responses is a list: use responses[0], responses.first or responses.last"
    if root == "actions":
        if action_names is not None and first not in action_names:
            return f"no earlier action is named {first!r}"
        return _chain_problem("message", keys[1:])
    if root == "app" and app is not None and first not in app:
        return f"unknown app variable {first!r}"
    return None


def _chain_problem(kind: str, keys: Sequence[object]) -> str | None:
    """Check keys below a message view; ``kind`` is what the previous key gave."""
    for key in keys:
        if isinstance(key, list) or kind == "value":
            return None  # a computed key is checked when rendering
        if key == "size":
            return None
        if kind in ("segments", "repetitions"):
            if isinstance(key, int) or key in ("first", "last"):
                kind = kind[:-1]
                continue
            return f"{key!r} on a list: use an index, .first, .last or .size"
        text = str(key)
        try:
            if kind == "message":
                if is_segment_id(text):
                    kind = "segments"
                    continue
                kind = _kind(parse_path(text))
            elif kind == "segment":
                if not _RELATIVE_FIELD.match(text):
                    raise PathSyntaxError(f"not a field path: {text!r}")
                kind = _kind(parse_path(f"ZZZ-{text}"))
            elif _COMPONENT_KEY.fullmatch(text) is None:
                return f'not a component path: {text!r} (expected e.g. "1" or "4.2")'
            else:
                kind = "value"
        except PathSyntaxError as err:
            return str(err).replace("ZZZ-", "")
    return None


def _kind(path: Path) -> str:
    if path.field is None:
        return "segments" if path.occurrence == ALL else "segment"
    return "repetitions" if path.repetition == ALL else "value"
