"""The per-message part of a body render, as plain typed code that mypyc compiles.

Most request bodies are a fixed layout with values picked from the trigger
(``{{ msg["PID-5.1"] }}``, ``{{ app.partner }}``, ``{{ now }}``, ``{{ control_id }}``).
:mod:`udsgateway.mapping.templating` compiles such a template (text and plain lookups,
nothing else) into a :class:`LookupPlan`, and :func:`render_lookups` renders it without
Liquid: the message paths are parsed once, when the template is compiled, and each
render reads the trigger's segments directly. The result is exactly what Liquid writes
for the same template (``tests/test_templating.py`` renders every case both ways).

Also here, because every render runs them: HL7 escaping of plain values
(:func:`escape_value`), re-expressing wire text in another delimiter set
(:func:`translate`), and the checks of a rendered body (:func:`body_segments`,
:func:`encode`). This module knows nothing of Liquid; lookups it does not handle itself
are handed to a function of the caller (``other``).

Listed in ``udsgateway.compiled.COMPILED_MODULES``: plain classes only (no attrs, no
decorators mypyc does not know), so that their attributes are C slots.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Final

from udsgateway.hl7.header import Delimiters, hl7_escape
from udsgateway.hl7.message import (
    Message,
    MessageParseError,
    Segment,
    delimiters_from_header,
    is_segment_id,
    split_lines,
    value_in_segment,
)
from udsgateway.hl7.paths import Path, PathSyntaxError, parse_path

__all__ = [
    "MAX_BODY_CHARS",
    "Lookup",
    "LookupPlan",
    "Once",
    "RenderError",
    "body_segments",
    "chars",
    "encode",
    "escape_value",
    "plan_lookups",
    "render_lookups",
    "translate",
]

MAX_BODY_CHARS: Final = 10 * 1024 * 1024
"""Largest body a template may render (the default max frame size)."""

TIMESTAMP_FORMAT: Final = "%Y%m%d%H%M%S"
"""How a datetime (``now``) is written into a body."""

_MESSAGE_KEY: Final = re.compile(r"[A-Z][A-Z0-9]{2}[-\[]")

# What one item of a plan is.
TEXT: Final = 0
"""Literal template text."""
MESSAGE: Final = 1
"""``msg["PID-5.1"]``: one value of the trigger, by a path parsed when compiling."""
APP: Final = 2
"""``app.name``: an app variable."""
NOW: Final = 3
"""``now``: the time of rendering."""
CONTROL_ID: Final = 4
"""``control_id``: a fresh message control ID."""
OTHER: Final = 5
"""Any other lookup (``responses[0]["MSA-2"]``, ``msg.NK1``): the caller's ``other``."""

# MSH-9.1, MSH-9.2, MSH-10 and the first repetition of MSH-18, as Message.get reads them.
_MSH_9_1: Final = Path("MSH", 1, 9, None, 1, None)
_MSH_9_2: Final = Path("MSH", 1, 9, None, 2, None)
_MSH_10: Final = Path("MSH", 1, 10, None, None, None)
_MSH_18_1: Final = Path("MSH", 1, 18, 1, None, None)


class RenderError(Exception):
    """A body that could not be rendered or is not a valid message for the action.

    ``reason`` never contains message content (it goes into execution logs); ``line`` is
    the template line when known.
    """

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason if line is None else f"{reason} (template line {line})")
        self.reason = reason
        self.line = line


def chars(delimiters: Delimiters) -> tuple[str, str, str, str, str]:
    """The five delimiter characters (field, component, repetition, escape, subcomponent)."""
    return (
        delimiters.field,
        delimiters.component,
        delimiters.repetition,
        delimiters.escape,
        delimiters.subcomponent,
    )


def escape_value(text: str, delimiters: Delimiters) -> str:
    """HL7-escape plain text for a message with ``delimiters``.

    ``\\`` -> ``\\E\\``, ``|`` -> ``\\F\\``, ``^`` -> ``\\S\\``, ``&`` -> ``\\T\\``,
    ``~`` -> ``\\R\\``, CR -> ``\\X0D\\``, LF -> ``\\X0A\\`` (with the message's own
    characters in place of these defaults).

    Other control characters become ``\\Xhh\\`` too: the header layer's
    ``hl7_escape`` does the work, so listener and templates escape alike.
    """
    if not delimiters.escape:
        raise ValueError("the delimiters declare no escape character")
    return hl7_escape(text, delimiters)


def translate(text: str, source: Delimiters, target: Delimiters) -> str:
    """Re-express wire text written with ``source`` delimiters in ``target`` ones.

    The identity (byte-for-byte) when both are the same, which is nearly always the case.
    Separators keep their role, escape sequences keep their letters, and characters that
    are data in the source but delimiters in the target are escaped.
    """
    if chars(source) == chars(target):
        return text
    roles = {
        source.field: target.field,
        source.component: target.component,
        source.repetition: target.repetition,
        source.subcomponent: target.subcomponent,
    }
    roles.pop("", None)
    special = {ch for ch in chars(target) if ch} | {"\r", "\n"}
    out: list[str] = []
    index = 0
    while index < len(text):
        ch = text[index]
        end = text.find(ch, index + 1) if ch == source.escape else -1
        if end != -1:
            out.append(target.escape + text[index + 1 : end] + target.escape)
            index = end + 1
            continue
        if ch in roles:
            out.append(roles[ch])
        elif ch in special:
            out.append(escape_value(ch, target))
        else:
            out.append(ch)
        index += 1
    return "".join(out)


class Once:
    """``make()``, called on first use only; later calls give the same value.

    A template's ``now`` and ``control_id`` are computed at most once per render,
    however many times it names them and whichever way it is rendered.
    """

    def __init__(self, make: Callable[[], object]) -> None:
        self._make = make
        self._made = False
        self._value: object = None

    def __call__(self) -> object:
        if not self._made:
            self._value = self._make()
            self._made = True
        return self._value


class Lookup:
    """One item of a plan: literal ``text``, or a lookup of ``names`` of kind ``kind``."""

    def __init__(
        self, kind: int, text: str, names: tuple[str, ...], path: Path | None = None
    ) -> None:
        self.kind = kind
        self.text = text
        self.names = names
        self.path = path

    def __repr__(self) -> str:
        return f"Lookup({self.kind}, {self.text!r}, {self.names!r})"


class LookupPlan:
    """A template that is text and plain lookups only, ready to render without Liquid."""

    def __init__(self, items: tuple[Lookup, ...]) -> None:
        self.items = items

    def __repr__(self) -> str:
        return f"LookupPlan({self.items!r})"


def _message_path(key: str) -> Path | None:
    """The path of ``msg[key]`` when it selects one value of a segment, else None.

    Segment IDs (``msg.NK1``), whole segments (``msg["NK1[2]"]``), ``[*]`` and keys
    that are not paths stay with the caller's lookup (and its errors).
    """
    if is_segment_id(key) or _MESSAGE_KEY.match(key) is None:
        return None
    try:
        path = parse_path(key)
    except PathSyntaxError:
        return None
    if path.field is None or path.has_wildcard:
        return None
    return path


def _item(names: tuple[str, ...]) -> Lookup:
    root = names[0]
    if len(names) == 1 and root == "now":
        return Lookup(NOW, "", names)
    if len(names) == 1 and root == "control_id":
        return Lookup(CONTROL_ID, "", names)
    if len(names) == 2 and root == "app":
        return Lookup(APP, names[1], names)
    if len(names) == 2 and root == "msg":
        path = _message_path(names[1])
        if path is not None:
            return Lookup(MESSAGE, "", names, path)
    return Lookup(OTHER, "", names)


def plan_lookups(parts: Sequence[str | tuple[str, ...]]) -> LookupPlan:
    """A plan from the template's parts: literal text, or the names of one lookup each."""
    items = []
    for part in parts:
        if isinstance(part, str):
            items.append(Lookup(TEXT, part, ()))
        else:
            items.append(_item(part))
    return LookupPlan(tuple(items))


def _message_value(trigger: Message, path: Path, target: Delimiters, same: bool) -> str:
    """What ``{{ msg[path] }}`` writes: the value in wire form, in ``target``'s delimiters."""
    occurrence = path.occurrence
    assert isinstance(occurrence, int)
    segment: Segment | None = trigger.segment(path.segment, occurrence)
    if segment is None:
        return ""
    value = value_in_segment(segment, path, trigger.delimiters)
    field = path.field
    assert field is not None
    if same or segment.is_atomic(field):
        return value  # the delimiters themselves (MSH-1, MSH-2) are never translated
    return translate(value, trigger.delimiters, target)


def render_lookups(
    plan: LookupPlan,
    trigger: Message,
    app: Mapping[str, object],
    target: Delimiters,
    now: Once,
    control_id: Once,
    other: Callable[[tuple[str, ...]], str | None],
) -> str | None:
    """Render ``plan`` as Liquid would; None when Liquid must (for its result or error).

    Message values are written as they are (wire text, translated to ``target``'s
    delimiters when the trigger's differ); plain strings (app variables, the control
    ID) and the time are HL7-escaped. Any other value, and any lookup of kind
    ``OTHER``, is ``other(names)``'s text (None: the lookup failed). A lookup that
    fails (a missing app variable) or a body over the size limit gives None.
    """
    parts: list[str] = []
    size = 0
    source = trigger.delimiters
    same = source is target or chars(source) == chars(target)
    try:
        for item in plan.items:
            kind = item.kind
            text: str | None
            if kind == TEXT:
                text = item.text
            elif kind == MESSAGE:
                path = item.path
                assert path is not None
                text = _message_value(trigger, path, target, same)
            elif kind == APP:
                value = app[item.text]
                text = escape_value(value, target) if type(value) is str else other(item.names)
            elif kind == NOW:
                moment = now()
                if isinstance(moment, datetime):
                    text = escape_value(moment.strftime(TIMESTAMP_FORMAT), target)
                else:
                    text = other(item.names)
            elif kind == CONTROL_ID:
                value = control_id()
                text = escape_value(value, target) if type(value) is str else other(item.names)
            else:
                text = other(item.names)
            if text is None:
                return None
            parts.append(text)
            size += len(text)
    except Exception:
        return None
    body = "".join(parts)
    # Liquid's limit counts UTF-8 bytes: up to four per character.
    if size * 4 > MAX_BODY_CHARS and len(body.encode("utf-8")) > MAX_BODY_CHARS:
        return None
    return body


def body_segments(
    text: str, message_type: str, target: Delimiters, *, detailed: bool
) -> tuple[list[str], str]:
    """Normalise and check a rendered body; return its segments and its MSH-18.

    ``detailed`` (``flows import``, rendering the sample) may quote rendered values;
    otherwise reasons go into execution logs and must not (the values may be PHI).
    """
    lines = [line.lstrip(" \t") for line in split_lines(text)]
    segments = [line for line in lines if line.strip()]
    if not segments:
        raise RenderError("the body is empty")
    header = segments[0]
    if not header.startswith("MSH"):
        raise RenderError("the body does not start with an MSH segment")
    try:
        declared = delimiters_from_header(header)
    except MessageParseError as err:
        raise RenderError(err.reason) from None
    if chars(declared) != chars(target) or not all(chars(target)):
        raise RenderError(
            "MSH-1/MSH-2 do not declare the destination's delimiters "
            f"{target.field}{target.component}{target.repetition}{target.escape}"
            f"{target.subcomponent}"
        )
    for number, segment in enumerate(segments[1:], start=2):
        if not (is_segment_id(segment[:3]) and segment[3:4] in ("", target.field)):
            raise RenderError(f"segment {number} of the body does not start with a segment ID")
    # The header as parse_message reads it: MSH-1 is the separator, MSH-2 what follows.
    separator = declared.field
    msh = Segment(header, ("MSH", separator, *header[4:].split(separator)))
    expected = message_type.split("^")[:2]
    actual = [
        value_in_segment(msh, _MSH_9_1, declared),
        value_in_segment(msh, _MSH_9_2, declared),
    ]
    if actual != expected:
        if detailed:
            raise RenderError(
                f"MSH-9 is {'^'.join(actual)!r} but the action sends {'^'.join(expected)}"
            )
        raise RenderError(f"MSH-9 is not {'^'.join(expected)}, the action's message type")
    if not value_in_segment(msh, _MSH_10, declared):
        raise RenderError("MSH-10 (message control ID) is empty")
    return segments, value_in_segment(msh, _MSH_18_1, declared).strip()


def encode(segments: list[str], codec: str | None) -> bytes:
    """The body's bytes: each segment ended by CR, encoded with ``codec``."""
    if codec is None:
        raise RenderError("MSH-18 names a character set we do not know")
    try:
        return "".join(segment + "\r" for segment in segments).encode(codec)
    except UnicodeEncodeError:
        raise RenderError(f"the body has characters that {codec} cannot encode") from None
    except LookupError:
        raise RenderError(f"unknown character set {codec!r}") from None
