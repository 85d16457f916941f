"""Realistic, synthetic HL7 v2.5.1 messages for the benchmark.

Five types, the gateway's first-class ones: ADT^A04 and ADT^A08 (MSH, EVN, PID, PV1, NK1) and
SIU^S12, SIU^S14 and SIU^S15 (MSH, SCH, PID, RGS, AIS, AIL, AIP, NTE). Each message is 0.7 to
1.4 KB, segments separated by ``\\r``, ASCII only, original acknowledgement mode (MSH-15/16 empty,
so a receiver answers AA).

Every person is synthetic: names come from small fixed lists through a seeded ``random.Random``,
phone numbers sit in the fictional 555-01xx range, identifiers are random digits. Every message
gets a fresh MSH-10 (a per-factory prefix plus a counter), so a store with duplicate detection
never sees a replay. MSH-5/MSH-6 are configurable; by default they name no App ID / Flow ID, so
the gateway routes by MSH-9.

This module is standalone (standard library only) so the load generator stays independent of the
gateway's code.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

ADT_A04 = "ADT^A04"
ADT_A08 = "ADT^A08"
SIU_S12 = "SIU^S12"
SIU_S14 = "SIU^S14"
SIU_S15 = "SIU^S15"

MESSAGE_TYPES: tuple[str, ...] = (ADT_A04, ADT_A08, SIU_S12, SIU_S14, SIU_S15)

MIN_SIZE = 700
MAX_SIZE = 1400

_FIRST_NAMES = (
    "Avery", "Blake", "Casey", "Dana", "Elliot", "Frankie", "Gray", "Harper", "Indigo", "Jules",
    "Kendall", "Logan", "Morgan", "Noel", "Oakley", "Parker", "Quinn", "Riley", "Sawyer", "Tatum",
)  # fmt: skip
_MIDDLE_INITIALS = ("A", "B", "C", "D", "E", "J", "L", "M", "R", "S", "T")
_LAST_NAMES = (
    "Ashdown", "Brightwater", "Copperfield", "Dunmore", "Elmsworth", "Fairbank", "Glenholm",
    "Hollins", "Ivesdale", "Jarrow", "Kettleby", "Larkspur", "Merriweather", "Northcote",
    "Oakhurst", "Pemberley", "Quenby", "Rothwell", "Stanmore", "Thistlewood",
)  # fmt: skip
_STREETS = (
    "Maple Ave", "Oak St", "Cedar Ln", "Birch Rd", "Willow Way", "Elm Ct", "Aspen Dr",
    "Juniper Pl", "Hawthorn Blvd", "Sycamore Row",
)  # fmt: skip
_CITIES = (
    ("Riverton", "WY", "82501"),
    ("Lakeside", "OR", "97449"),
    ("Fairview", "TN", "37062"),
    ("Greenville", "SC", "29601"),
    ("Brookfield", "WI", "53005"),
    ("Milton", "VT", "05468"),
)
_PROVIDERS = (
    ("1000000011", "Whitcombe", "Iris"),
    ("1000000029", "Okonjo", "Tobias"),
    ("1000000037", "Lindqvist", "Mara"),
    ("1000000045", "Castellano", "Ruben"),
    ("1000000052", "Fairweather", "Nadia"),
)
_CLINICS = (
    ("CARD", "Cardiology Clinic", "2W", "CARD-ECHO", "Echocardiogram, transthoracic"),
    ("DERM", "Dermatology Clinic", "3E", "DERM-BX", "Skin biopsy, punch"),
    ("ORTH", "Orthopedics Clinic", "1N", "ORTH-FU", "Orthopedic follow-up visit"),
    ("ENDO", "Endocrinology Clinic", "4S", "ENDO-NP", "New patient consultation"),
    ("PULM", "Pulmonology Clinic", "2E", "PULM-PFT", "Pulmonary function test"),
)
_RELATIONS = (
    ("SPO", "Spouse"),
    ("PAR", "Parent"),
    ("SIB", "Sibling"),
    ("CHD", "Child"),
    ("FND", "Friend"),
)
_NOTES = (
    "Patient prefers morning appointments; please call the day before to confirm.",
    "Bring current medication list and prior imaging on disc if available.",
    "Interpreter not required. Wheelchair accessible room requested at check-in.",
    "Fasting for 8 hours before the visit. Water is allowed. Arrive 15 minutes early.",
    "Referral on file from primary care; insurance authorization pending review.",
)
_RACES = (
    "2106-3^White^CDCREC",
    "2054-5^Black or African American^CDCREC",
    "2028-9^Asian^CDCREC",
    "2131-1^Other Race^CDCREC",
)
_MARITAL = ("S^Single^HL70002", "M^Married^HL70002", "D^Divorced^HL70002", "W^Widowed^HL70002")
_CANCEL_REASONS = (
    ("PATCANCEL", "Cancelled by patient"),
    ("PROVUNAV", "Provider unavailable"),
    ("WEATHER", "Clinic closed due to weather"),
)

_BASE_TIME = datetime(2025, 3, 14, 7, 30, 0)


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


def _phone(rng: random.Random) -> str:
    return f"^PRN^PH^^1^{rng.choice(('307', '541', '615', '864'))}^555{rng.randint(100, 199):04d}"


@dataclass(frozen=True)
class BenchMessage:
    """One message: its MSH-10, its MSH-9 type^event, and the unframed bytes."""

    control_id: str
    message_type: str
    payload: bytes


@dataclass(frozen=True)
class _Person:
    first: str
    middle: str
    last: str
    sex: str
    dob: str
    mrn: str
    account: str
    street: str
    city: str
    state: str
    zip_code: str
    phone: str
    race: str
    marital: str


class MessageFactory:
    """Builds the five message types with synthetic people and unique control IDs.

    ``seed`` makes the content reproducible; ``control_prefix`` (default: six random hex digits)
    makes the MSH-10 values unique across runs. MSH-10 is the prefix plus a ten-digit counter,
    16 characters in all, inside the 20 that HL7 allows.
    """

    def __init__(
        self,
        *,
        seed: int = 2575,
        receiving_app: str = "RECVAPP",
        receiving_facility: str = "RECVFAC",
        sending_app: str = "BENCHSEND",
        sending_facility: str = "SYNTHHOSP",
        control_prefix: str | None = None,
        types: Sequence[str] = MESSAGE_TYPES,
    ) -> None:
        unknown = [t for t in types if t not in MESSAGE_TYPES]
        if unknown or not types:
            raise ValueError(
                f"unknown message types {unknown!r}; expected some of {MESSAGE_TYPES}"
            )
        self._rng = random.Random(seed)
        self.receiving_app = receiving_app
        self.receiving_facility = receiving_facility
        self.sending_app = sending_app
        self.sending_facility = sending_facility
        self.control_prefix = control_prefix or secrets.token_hex(3).upper()
        self.types = tuple(types)
        self._counter = 0
        self._builders: dict[str, Callable[[str, datetime], list[str]]] = {
            ADT_A04: lambda c, t: self._adt("A04", c, t),
            ADT_A08: lambda c, t: self._adt("A08", c, t),
            SIU_S12: lambda c, t: self._siu("S12", c, t),
            SIU_S14: lambda c, t: self._siu("S14", c, t),
            SIU_S15: lambda c, t: self._siu("S15", c, t),
        }

    # -- public ---------------------------------------------------------------------------------

    def next_control_id(self) -> str:
        self._counter += 1
        return f"{self.control_prefix}{self._counter:010d}"

    def make(self, message_type: str, control_id: str | None = None) -> BenchMessage:
        """One message of ``message_type`` (``"ADT^A04"`` ...), with a fresh MSH-10 by default."""
        if message_type not in self._builders:
            raise ValueError(f"unknown message type {message_type!r}")
        cid = control_id if control_id is not None else self.next_control_id()
        when = _BASE_TIME + timedelta(seconds=7 * self._counter + self._rng.randint(0, 6))
        segments = self._builders[message_type](cid, when)
        payload = "\r".join(segments).encode("ascii")
        return BenchMessage(control_id=cid, message_type=message_type, payload=payload)

    def stream(self) -> Iterator[BenchMessage]:
        """Endless messages, cycling through the configured types in order."""
        while True:
            for message_type in self.types:
                yield self.make(message_type)

    def batch(self, count: int) -> list[BenchMessage]:
        """``count`` messages, the configured types in rotation."""
        out: list[BenchMessage] = []
        stream = self.stream()
        for _ in range(count):
            out.append(next(stream))
        return out

    # -- segments -------------------------------------------------------------------------------

    def _msh(self, message_type: str, structure: str, control_id: str, when: datetime) -> str:
        return (
            f"MSH|^~\\&|{self.sending_app}|{self.sending_facility}|{self.receiving_app}|"
            f"{self.receiving_facility}|{_ts(when)}||{message_type}^{structure}|{control_id}|P|2.5.1"
        )

    def _person(self) -> _Person:
        rng = self._rng
        city, state, zip_code = rng.choice(_CITIES)
        dob = datetime(1938, 1, 1) + timedelta(days=rng.randint(0, 30000))
        return _Person(
            first=rng.choice(_FIRST_NAMES),
            middle=rng.choice(_MIDDLE_INITIALS),
            last=rng.choice(_LAST_NAMES),
            sex=rng.choice("FMU"),
            dob=dob.strftime("%Y%m%d"),
            mrn=f"{rng.randint(10_000_000, 99_999_999)}",
            account=f"{rng.randint(100_000_000, 999_999_999)}",
            street=f"{rng.randint(10, 9899)} {rng.choice(_STREETS)}",
            city=city,
            state=state,
            zip_code=zip_code,
            phone=_phone(rng),
            race=rng.choice(_RACES),
            marital=rng.choice(_MARITAL),
        )

    def _pid(self, p: _Person) -> str:
        return (
            f"PID|1||{p.mrn}^^^SYNTHHOSP^MR~{p.account}^^^SYNTHHOSP^AN||{p.last}^{p.first}^"
            f"{p.middle}^^^^L||{p.dob}|{p.sex}||{p.race}|{p.street}^^{p.city}^"
            f"{p.state}^{p.zip_code}^USA^H||{p.phone}||eng^English^ISO639|{p.marital}|"
            f"NON^No Preference^HL70006|{p.account}^^^SYNTHHOSP^AN|||N^Not Hispanic or Latino^"
            f"HL70189"
        )

    def _provider(self) -> str:
        npi, last, first = self._rng.choice(_PROVIDERS)
        return f"{npi}^{last}^{first}^^^Dr^^^NPI^L^^^NPI"

    def _adt(self, event: str, control_id: str, when: datetime) -> list[str]:
        rng = self._rng
        p = self._person()
        clinic = rng.choice(_CLINICS)
        rel_code, rel_text = rng.choice(_RELATIONS)
        kin_first, kin_last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        operator = (
            f"OP{rng.randint(1000, 9999)}^{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}"
        )
        visit = f"V{rng.randint(1_000_000, 9_999_999)}"
        admit = when - timedelta(minutes=rng.randint(5, 90))
        return [
            self._msh(f"ADT^{event}", "ADT_A01", control_id, when),
            f"EVN|{event}|{_ts(when)}|||{operator}^^^^^^^L|{_ts(admit)}|SYNTHHOSP",
            self._pid(p),
            f"PV1|1|O|{clinic[0]}^{clinic[2]}^{rng.randint(1, 24):02d}^SYNTHHOSP^^^^^MAIN||||"
            f"{self._provider()}|{self._provider()}||{clinic[0]}||||1|||{self._provider()}|OP|"
            f"{visit}^^^SYNTHHOSP^VN|SELF^Self Pay^HL70064|||||||||||||||||||SYNTHHOSP||||"
            f"{_ts(admit)}",
            f"NK1|1|{kin_last}^{kin_first}^^^^^L|{rel_code}^{rel_text}^HL70063|{p.street}^^"
            f"{p.city}^{p.state}^{p.zip_code}^USA^H|{_phone(rng)}||EC^Emergency Contact^HL70131",
        ]

    def _siu(self, event: str, control_id: str, when: datetime) -> list[str]:
        rng = self._rng
        p = self._person()
        code, clinic_name, room, svc_code, svc_text = rng.choice(_CLINICS)
        start = (when + timedelta(days=rng.randint(1, 60))).replace(
            hour=rng.randint(8, 16), minute=rng.choice((0, 15, 30, 45)), second=0
        )
        minutes = rng.choice((15, 20, 30, 45, 60))
        end = start + timedelta(minutes=minutes)
        placer = f"PL{rng.randint(100_000, 999_999)}"
        filler = f"FL{rng.randint(100_000, 999_999)}"
        if event == "S15":
            reason_code, reason_text = rng.choice(_CANCEL_REASONS)
            status, action = "Cancelled^Cancelled^HL70278", "D"
            event_reason = f"{reason_code}^{reason_text}"
        elif event == "S14":
            status, action = "Booked^Booked^HL70278", "U"
            event_reason = "RESCHED^Rescheduled by clinic"
        else:
            status, action = "Booked^Booked^HL70278", "A"
            event_reason = "NEW^New appointment"
        contact = f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}"
        timing = f"^^{minutes}^{_ts(start)}^{_ts(end)}"
        return [
            self._msh(f"SIU^{event}", "SIU_S12", control_id, when),
            f"SCH|{placer}^SYNTHSCHED|{filler}^SYNTHHOSP|||{event_reason}|ROUTINE^Routine "
            f"appointment^HL70276|{code}^{clinic_name}^HL70277|{minutes}|MIN|{timing}|||||"
            f"{contact}|{_phone(rng)}|||{contact}||{placer}^SYNTHSCHED|{filler}^SYNTHHOSP|"
            f"{status}",
            self._pid(p),
            f"RGS|1|{action}|{code}^{clinic_name}",
            f"AIS|1|{action}|{svc_code}^{svc_text}^SYNTHSVC|{_ts(start)}|0|MIN|{minutes}|MIN|"
            f"{status.split('^')[0]}",
            f"AIL|1|{action}|{code}^{room}^{rng.randint(1, 12):02d}^SYNTHHOSP^^^^^MAIN|"
            f"CLINIC^Clinic room^HL70305|{_ts(start)}|0|MIN|{minutes}|MIN|{status.split('^')[0]}",
            f"AIP|1|{action}|{self._provider()}|ATND^Attending^HL70443|{_ts(start)}|0|MIN|"
            f"{minutes}|MIN|{status.split('^')[0]}",
            f"NTE|1|P|{rng.choice(_NOTES)}",
        ]


def sample_sizes(count: int = 500, seed: int = 2575) -> dict[str, tuple[int, int]]:
    """(min, max) payload size per type over ``count`` messages: a self-check for the 0.7 to
    1.4 KB target."""
    factory = MessageFactory(seed=seed, control_prefix="SIZE00")
    sizes: dict[str, tuple[int, int]] = {}
    for message in factory.batch(count):
        size = len(message.payload)
        low, high = sizes.get(message.message_type, (size, size))
        sizes[message.message_type] = (min(low, size), max(high, size))
    return sizes


def main() -> None:
    for message_type, (low, high) in sample_sizes().items():
        flag = "ok" if low >= MIN_SIZE and high <= MAX_SIZE else "OUT OF RANGE"
        print(f"{message_type}: {low}..{high} bytes {flag}")
    for message in MessageFactory(control_prefix="DEMO00").batch(len(MESSAGE_TYPES)):
        print(message.payload.decode("ascii").replace("\r", "\n"), end="\n\n")


if __name__ == "__main__":
    main()
