"""The variable catalogue: every populated path of a trigger's sample, named and ready to paste.

A user builds a request-body template by picking variables from the catalogue that the
CLI, the admin API and the UI show for a flow's trigger. Each entry carries the HL7 path
(``PID-5.1``), the standard's name for it ("Patient Name / Family Name"), the sample's
value (wire form) and the Liquid expression that inserts it (``{{ msg["PID-5.1"] }}``).

Names come from ``data/segments.json``, generated from hl7apy's tables by
``tools/gen_segments.py`` (segments MSH, EVN, PID, PD1, PV1, PV2, NK1, AL1, DG1, IN1,
SCH, TQ1, NTE, RGS, AIS, AIG, AIL, AIP, MSA, ERR; versions 2.3 to 2.5.1). Paths of other
segments (Z-segments...) are listed with an empty name.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

from attrs import frozen

from udsgateway.hl7.message import Message, Segment, parse_message, parse_path, split

__all__ = ["Variable", "path_name", "variable_catalogue"]

_DEFAULT_VERSION = "2.5.1"


@frozen
class Variable:
    """One populated path of a sample message."""

    path: str
    """The HL7 path, e.g. ``PID-5.1``, ``PID-3[2].1``, ``NK1[2]-2``."""
    name: str
    """The standard's name, components joined by " / "; empty when unknown."""
    value: str
    """The sample's value at the path, in wire form (still HL7-escaped)."""
    expression: str
    """The Liquid expression that inserts the value into a template."""


def variable_catalogue(sample: str | bytes, version: str | None = None) -> list[Variable]:
    """List every populated field and leaf path of ``sample``, in message order.

    For each populated field: the field (``PID-3``, every repetition with its
    separators); when it repeats, each repetition (``PID-3[1]``, ``PID-3[2]``); when a
    repetition has components, each populated component (``PID-3.1``, ``PID-3[2].1``);
    when a component has subcomponents, each populated subcomponent (``PID-3.4.1``).
    Second and later segments of a kind are addressed as ``NK1[2]-2``.

    ``version`` picks the HL7 tables for the names (default: the sample's MSH-12).
    The sample may use ``\\r``, ``\\n`` or ``\\r\\n`` between segments. Raises
    ``udsgateway.hl7.message.MessageParseError`` when the sample is not an HL7 message.
    """
    message = parse_message(sample)
    tables = _Tables(_definitions(), version or message.get("MSH-12.1"))
    return list(_variables(message, tables))


def path_name(path: str, version: str | None = None) -> str:
    """The standard's name for an HL7 path (``PID-5.1`` -> "Patient Name / Family Name").

    Empty when the segment or field is unknown. Raises ``PathSyntaxError`` for a string
    that is not a path.
    """
    parsed = parse_path(path)
    if parsed.field is None:
        return ""
    tables = _Tables(_definitions(), version)
    return tables.name(parsed.segment, parsed.field, parsed.component, parsed.subcomponent)


def _variables(message: Message, tables: _Tables) -> Iterator[Variable]:
    seen: dict[str, int] = {}
    for segment in message.segments:
        seen[segment.name] = occurrence = seen.get(segment.name, 0) + 1
        prefix = segment.name if occurrence == 1 else f"{segment.name}[{occurrence}]"
        yield from _segment_variables(segment, prefix, message, tables)


def _segment_variables(
    segment: Segment, prefix: str, message: Message, tables: _Tables
) -> Iterator[Variable]:
    delimiters = message.delimiters
    for number in range(1, len(segment.fields)):
        value = segment.field(number)
        if not value:
            continue
        field_path = f"{prefix}-{number}"
        names = functools.partial(tables.name, segment.name, number)
        yield _variable(field_path, names(None, None), value)
        if segment.is_atomic(number):
            continue
        repetitions = split(value, delimiters.repetition)
        for index, repetition in enumerate(repetitions, start=1):
            if not repetition:
                continue
            base = field_path if index == 1 else f"{field_path}[{index}]"
            if len(repetitions) > 1:
                yield _variable(f"{field_path}[{index}]", names(None, None), repetition)
            components = split(repetition, delimiters.component)
            for component_number, component in enumerate(components, start=1):
                if not component:
                    continue
                component_path = f"{base}.{component_number}"
                if len(components) > 1:
                    yield _variable(component_path, names(component_number, None), component)
                subcomponents = split(component, delimiters.subcomponent)
                if len(subcomponents) < 2:
                    continue
                for sub_number, subcomponent in enumerate(subcomponents, start=1):
                    if subcomponent:
                        path = f"{component_path}.{sub_number}"
                        yield _variable(path, names(component_number, sub_number), subcomponent)


def _variable(path: str, name: str, value: str) -> Variable:
    return Variable(path, name, value, f'{{{{ msg["{path}"] }}}}')


@functools.cache
def _definitions() -> Mapping[str, Any]:
    # Read once (about 50 KB, shipped in the package) and kept for the process.
    text = resources.files("udsgateway").joinpath("data/segments.json").read_text("utf-8")
    definitions: Mapping[str, Any] = json.loads(text)
    return definitions


def _version_key(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in version.strip().split("."))
    except ValueError:
        return None


class _Tables:
    """Name lookups for one HL7 version, falling back to the nearest known version."""

    def __init__(self, definitions: Mapping[str, Any], version: str | None) -> None:
        self._segments: Mapping[str, Mapping[str, list[list[str]]]] = definitions["segments"]
        self._datatypes: Mapping[str, Mapping[str, list[list[str]]]] = definitions["datatypes"]
        self._versions: list[str] = list(definitions["versions"])
        self._version = self._known_version(version)

    def _known_version(self, version: str | None) -> str:
        """The requested version, else the latest known one before it (2.6 -> 2.5.1)."""
        if version in self._versions:
            return version
        wanted = _version_key(version or "")
        if wanted is None:
            return _DEFAULT_VERSION
        earlier = [v for v in self._versions if (_version_key(v) or ()) <= wanted]
        return earlier[-1] if earlier else self._versions[0]

    def _entries(self, table: Mapping[str, list[list[str]]]) -> list[list[str]]:
        """The list for our version: stored per version only where it changed."""
        position = self._versions.index(self._version)
        for version in reversed(self._versions[: position + 1]):
            if version in table:
                return table[version]
        return next(iter(table.values()))  # defined only in later versions (TQ1 in 2.3)

    def _lookup(self, table: Mapping[str, list[list[str]]] | None, number: int) -> list[str]:
        if table is None:
            return []
        entries = self._entries(table)
        return entries[number - 1] if 0 < number <= len(entries) else []

    def name(self, segment: str, field: int, component: int | None, sub: int | None) -> str:
        """Names of the field, component and subcomponent joined by " / "."""
        field_entry = self._lookup(self._segments.get(segment), field)
        if not field_entry:
            return ""
        parts = [field_entry[0]]
        datatype = field_entry[1]
        for number, label in ((component, "Component"), (sub, "Subcomponent")):
            if number is None:
                break
            entry = self._lookup(self._datatypes.get(datatype), number)
            parts.append(entry[0] if entry else f"{label} {number}")
            datatype = entry[1] if entry else ""
        return " / ".join(parts)
