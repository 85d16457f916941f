"""HL7 paths (``PID-5.1``, ``NK1[2]-2``, ``PID-3[2].1``): their syntax, without a message.

The flow model checks the paths a flow file names (an ordering key) with this module
alone, so loading flows (and the store, which reads them) never loads the message
parser. :mod:`udsgateway.hl7.message` reads the values a path selects.

Paths::

    PID-5          the whole field, all repetitions, with its separators
    PID-5.1        component 1 of the first repetition
    PID-5.1.2      subcomponent 2 of component 1
    PID-3[2].1     component 1 of the second repetition (1-based)
    NK1[2]-2       field 2 of the second NK1 segment
    NK1[2]         the whole second NK1 segment
    MSH-1, MSH-2   the field separator and the encoding characters
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final, Literal

ALL: Final = "*"
"""The ``[*]`` selector of a path: every occurrence instead of one."""

Selector = int | Literal["*"]

_PATH = re.compile(
    r"(?P<segment>[A-Z][A-Z0-9]{2})"
    r"(?:\[(?P<occurrence>[0-9]+|\*)\])?"
    r"(?:-(?P<field>[0-9]+)"
    r"(?:\[(?P<repetition>[0-9]+|\*)\])?"
    r"(?:\.(?P<component>[0-9]+)"
    r"(?:\.(?P<subcomponent>[0-9]+))?)?)?"
)


class PathSyntaxError(ValueError):
    """A string that is not an HL7 path (``PID-5.1``, ``NK1[2]-2``, ``PID-3[2].1``)."""


class Path:
    """A parsed HL7 path; ``str(path)`` gives its canonical spelling.

    ``field`` None selects the whole segment. ``repetition`` None means "not given": the
    whole field when no component is given, otherwise the first repetition.

    Immutable by convention, compared and hashed by its parts. A plain class (not attrs):
    compiled by mypyc, its attributes are C slots, read on every lookup of every render.
    """

    def __init__(
        self,
        segment: str,
        occurrence: Selector = 1,
        field: int | None = None,
        repetition: Selector | None = None,
        component: int | None = None,
        subcomponent: int | None = None,
    ) -> None:
        self.segment = segment
        self.occurrence = occurrence
        self.field = field
        self.repetition = repetition
        self.component = component
        self.subcomponent = subcomponent

    def _parts(self) -> tuple[object, ...]:
        return (
            self.segment,
            self.occurrence,
            self.field,
            self.repetition,
            self.component,
            self.subcomponent,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Path):
            return NotImplemented
        return self._parts() == other._parts()

    def __hash__(self) -> int:
        return hash(self._parts())

    def __repr__(self) -> str:
        return (
            f"Path(segment={self.segment!r}, occurrence={self.occurrence!r}, "
            f"field={self.field!r}, repetition={self.repetition!r}, "
            f"component={self.component!r}, subcomponent={self.subcomponent!r})"
        )

    @property
    def has_wildcard(self) -> bool:
        """True when the path selects several segments or repetitions (``[*]``)."""
        return self.occurrence == ALL or self.repetition == ALL

    def __str__(self) -> str:
        text = self.segment
        if self.occurrence != 1:
            text += f"[{self.occurrence}]"
        if self.field is None:
            return text
        text += f"-{self.field}"
        if self.repetition is not None:
            text += f"[{self.repetition}]"
        if self.component is not None:
            text += f".{self.component}"
            if self.subcomponent is not None:
                text += f".{self.subcomponent}"
        return text


@lru_cache(maxsize=1024)
def parse_path(text: str) -> Path:
    """Parse ``SEG[n]-F[r].C.S``: every part after SEG optional, indexes 1-based.

    ``[*]`` may replace a segment index when no field follows, or a repetition index
    when no component follows. Raises ``PathSyntaxError`` otherwise. Templates name
    the same few paths for every message: each spelling is parsed once.
    """
    match = _PATH.fullmatch(text)
    if match is None:
        raise PathSyntaxError(f"not an HL7 path: {text!r} (expected e.g. PID-5.1 or NK1[2]-3)")
    occurrence = _selector(match["occurrence"], text)
    repetition = _selector(match["repetition"], text) if match["repetition"] else None
    numbers = [_index(match[name], text) for name in ("field", "component", "subcomponent")]
    field_number, component, subcomponent = numbers
    if occurrence == ALL and field_number is not None:
        raise PathSyntaxError(f"{text!r}: [*] on a segment selects segments, not fields")
    if repetition == ALL and component is not None:
        raise PathSyntaxError(f"{text!r}: [*] on a field selects repetitions, not components")
    return Path(match["segment"], occurrence, field_number, repetition, component, subcomponent)


def _selector(group: str | None, text: str) -> Selector:
    if group is None:
        return 1
    if group == ALL:
        return ALL
    index = _index(group, text)
    assert index is not None
    return index


def _index(group: str | None, text: str) -> int | None:
    if group is None:
        return None
    value = int(group)
    if value < 1:
        raise PathSyntaxError(f"{text!r}: indexes start at 1")
    return value
