"""A small TOML writer for the documents udsgateway exports (flow files).

The standard library reads TOML but does not write it. Flow files hold only
tables, arrays of tables, strings, numbers, booleans and arrays of those, so
this writer covers exactly that, and ``tomllib.loads(dumps(d)) == d`` holds
for every such document (a test checks it). Multi-line strings, such as HL7
samples and templates, are written as readable multi-line strings.
"""

from __future__ import annotations

import math
import re
from typing import Any

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\f": "\\f", "\r": "\\r"}


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _escape_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    return f"\\u{ord(char):04x}"


def _string(value: str) -> str:
    escaped = re.sub(r'[\\"\x00-\x1f\x7f]', lambda m: _escape_char(m.group()), value)
    return f'"{escaped}"'


def _multiline(value: str) -> str:
    # A literal string keeps HL7's backslashes readable; it cannot hold control
    # characters other than tab and newline, nor three quotes in a row.
    literal_ok = "'''" not in value and not value.endswith("'")
    if literal_ok and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", value):
        return "'''\n" + value + "'''"
    escaped = re.sub(
        r'[\\"\x00-\x09\x0b-\x1f\x7f]', lambda m: _escape_char(m.group()), value
    ).replace('"""', '""\\"')
    return '"""\n' + escaped + '"""'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("TOML cannot hold NaN or infinity here")
        return repr(value)
    if isinstance(value, str):
        return _multiline(value) if "\n" in value else _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, dict) for i in value)


def _table(lines: list[str], path: list[str], table: dict[str, Any]) -> None:
    simple = [(k, v) for k, v in table.items() if not isinstance(v, dict | list) or not _nested(v)]
    nested = [(k, v) for k, v in table.items() if isinstance(v, dict | list) and _nested(v)]
    for key, value in simple:
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in nested:
        sub = [*path, _key(key)]
        if isinstance(value, dict):
            lines.extend(["", "[" + ".".join(sub) + "]"])
            _table(lines, sub, value)
        else:
            for item in value:
                lines.extend(["", "[[" + ".".join(sub) + "]]"])
                _table(lines, sub, item)


def _nested(value: dict[str, Any] | list[Any]) -> bool:
    """Write as a [table] / [[array]] rather than inline."""
    return isinstance(value, dict) or _is_table_array(value)


def dumps(document: dict[str, Any]) -> str:
    """Write a document of tables, arrays of tables and plain values as TOML text."""
    lines: list[str] = []
    _table(lines, [], document)
    return "\n".join(lines).lstrip("\n") + "\n"
