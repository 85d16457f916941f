"""Generate ``src/udsgateway/data/segments.json`` from the tables shipped with hl7apy.

The variable catalogue (``udsgateway.mapping.catalogue``) names every field path of a sample
message (``PID-5.1`` is "Patient Name / Family Name"). The names come from the HL7 v2
tables that hl7apy (MIT licence, https://github.com/crs4/hl7apy) ships as Python
modules. hl7apy is a build-time source only, never a runtime dependency: this script
reads its tables and writes plain JSON data into the package.

Regenerate (from the repository root; hl7apy goes into a throwaway virtualenv, never
into the project's)::

    python3 -m venv /tmp/genvenv
    /tmp/genvenv/bin/pip install hl7apy
    /tmp/genvenv/bin/python tools/gen_segments.py

Options: ``--output PATH`` (default ``src/udsgateway/data/segments.json``) and
``--check`` (exit 1 when the file on disk differs from what would be written; for CI).

Layout of the JSON (data, not code)::

    {
      "source": "hl7apy <version>",
      "versions": ["2.3", ...],
      "segments": {"PID": {"2.5": [["Set ID - PID", "SI"], ["Patient ID", "CX"], ...]}},
      "datatypes": {"XPN": {"2.5": [["Family Name", "FN"], ...]}}
    }

``segments[SEG]`` maps a version to the list of fields (index 0 is field 1) as
``[name, data type]``; ``datatypes[TYPE]`` maps a version to the components of a
composite data type in the same form. Only composite types reachable from the listed
segments are kept. hl7apy's ``UPPER_SNAKE`` names are turned into the standard's titles
(``MOTHER_S_MAIDEN_NAME`` -> "Mother's Maiden Name", ``SET_ID_PID`` -> "Set ID - PID").

To keep the file small (about 50 KB), a version whose list equals that of the previous
version in ``versions`` is omitted: a reader takes the nearest earlier version present,
and for a version before the first one present (TQ1 is new in 2.5), the first one.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

SEGMENTS = [
    "MSH",
    "EVN",
    "PID",
    "PD1",
    "PV1",
    "PV2",
    "NK1",
    "AL1",
    "DG1",
    "IN1",
    "SCH",
    "TQ1",
    "NTE",
    "RGS",
    "AIS",
    "AIG",
    "AIL",
    "AIP",
    "MSA",
    "ERR",
]
VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1")

# Words kept in capitals when hl7apy's UPPER_SNAKE names are turned into titles.
_ACRONYMS = frozenset(
    [
        "ID",
        "IDS",
        "HL7",
        "SSN",
        "DEA",
        "DMV",
        "DRG",
        "NDC",
        "VIP",
        "HCFA",
        "UB",
        "UB92",
        "PSRO",
        "IRB",
        "CPU",
        "MD",
        "JR",
        "DR",
        "III",
        "ISO",
        "OID",
        "URL",
        "CDM",
        "UID",
        "NPI",
        "PAC",
        "LOA",
    ]
)
# hl7apy suffixes a data type code to tell apart two components of the same name.
_TYPE_SUFFIXES = frozenset(["ST", "NM", "DT", "TS", "HD", "IS", "TX", "SAD", "CE", "CWE", "DTM"])
_SMALL_WORDS = frozenset(
    ["a", "an", "and", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"]
)

Entry = list[str]


def title(name: str, segment_ids: frozenset[str]) -> str:
    """Turn hl7apy's ``MOTHER_S_MAIDEN_NAME`` into the standard's ``Mother's Maiden Name``.

    Also ``SET_ID_PID`` -> ``Set ID - PID``, ``IDENTIFIER_ST`` -> ``Identifier (ST)`` and
    ``PREFIX_E_G_DR`` -> ``Prefix (e.g. DR)``.
    """
    raw = [w for w in name.replace("___", "_").split("_") if w]
    suffix = ""
    if len(raw) > 1 and raw[-1] in segment_ids:
        suffix = " - " + raw.pop()
    elif len(raw) > 1 and raw[-1] in _TYPE_SUFFIXES:
        suffix = f" ({raw.pop()})"
    words: list[str] = []
    example = False
    for index, word in enumerate(raw):
        lower = word.lower()
        if word == "S" and words:
            words[-1] += "'s"
        elif word == "E" and raw[index + 1 : index + 2] == ["G"]:
            words.append("(e.g.")
            example = True
        elif word == "G" and example and words[-1] == "(e.g.":
            continue
        elif word in _ACRONYMS or any(ch.isdigit() for ch in word):
            words.append("IDs" if word == "IDS" else word)
        elif index > 0 and lower in _SMALL_WORDS:
            words.append(lower)
        else:
            words.append(word.capitalize())
    return " ".join(words) + (")" if example else "") + suffix


def read_version(version: str) -> tuple[dict[str, list[Entry]], dict[str, list[Entry]]]:
    """Read one version's field lists for SEGMENTS and the composite types they reach."""
    package = "hl7apy.v" + version.replace(".", "_")
    segments_table: dict[str, Any] = importlib.import_module(package + ".segments").SEGMENTS
    structs: dict[str, Any] = importlib.import_module(package + ".datatypes").DATATYPES_STRUCTS

    segment_ids = frozenset(segments_table)
    segments: dict[str, list[Entry]] = {}
    pending: list[str] = []
    for segment in SEGMENTS:
        if segment not in segments_table:
            continue  # e.g. TQ1 first appears in 2.5
        fields = []
        for _name, definition, _cardinality, _kind in segment_children(segments_table[segment]):
            _shape, _struct, datatype, long_name = definition[:4]
            fields.append([title(long_name, segment_ids), datatype])
            pending.append(datatype)
        segments[segment] = fields

    datatypes: dict[str, list[Entry]] = {}
    while pending:
        datatype = pending.pop()
        if datatype in datatypes or datatype not in structs:
            continue  # already done, or a primitive type
        components = []
        for _name, definition, _cardinality, _kind in structs[datatype]:
            _shape, _struct, component_type, long_name = definition[:4]
            components.append([title(long_name, segment_ids), component_type])
            pending.append(component_type)
        datatypes[datatype] = components
    return segments, datatypes


def segment_children(definition: tuple[Any, ...]) -> tuple[tuple[Any, ...], ...]:
    """Return the field tuples of an hl7apy segment definition ``('sequence', (...))``."""
    shape, children = definition
    if shape != "sequence":
        raise ValueError(f"unexpected segment shape {shape!r}")
    return tuple(children)


def collapse(per_version: dict[str, dict[str, list[Entry]]]) -> dict[str, dict[str, list[Entry]]]:
    """Drop a version's list where it equals the previous version's (see the docstring)."""
    result: dict[str, dict[str, list[Entry]]] = {}
    for version in VERSIONS:
        for key, entries in per_version[version].items():
            versions = result.setdefault(key, {})
            if versions and list(versions.values())[-1] == entries:
                continue
            versions[version] = entries
    return {key: result[key] for key in sorted(result)}


def build() -> dict[str, Any]:
    """Build the JSON document from the installed hl7apy."""
    hl7apy_version = importlib.metadata.version("hl7apy")
    segments: dict[str, dict[str, list[Entry]]] = {}
    datatypes: dict[str, dict[str, list[Entry]]] = {}
    for version in VERSIONS:
        segments[version], datatypes[version] = read_version(version)
    return {
        "source": f"hl7apy {hl7apy_version} (MIT), https://github.com/crs4/hl7apy",
        "versions": list(VERSIONS),
        "segments": collapse(segments),
        "datatypes": collapse(datatypes),
    }


def render(document: dict[str, Any]) -> str:
    """Serialise compactly: one line per segment or data type and version."""
    lines = ["{"]
    lines.append(f'"source": {json.dumps(document["source"])},')
    lines.append(f'"versions": {json.dumps(document["versions"])},')
    for section in ("segments", "datatypes"):
        lines.append(f'"{section}": {{')
        keys = list(document[section])
        for key_index, key in enumerate(keys):
            lines.append(f"{json.dumps(key)}: {{")
            versions = document[section][key]
            for index, (version, entries) in enumerate(versions.items()):
                comma = "," if index < len(versions) - 1 else ""
                packed = json.dumps(entries, separators=(",", ":"), ensure_ascii=False)
                lines.append(f"{json.dumps(version)}: {packed}{comma}")
            lines.append("}," if key_index < len(keys) - 1 else "}")
        lines.append("}," if section == "segments" else "}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)  # the hand-made layout must still be valid JSON
    return text


def main(argv: list[str] | None = None) -> int:
    """Write (or check) the segments file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "src/udsgateway/data/segments.json",
    )
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; run tools/gen_segments.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
