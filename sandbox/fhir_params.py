"""FHIR search parameters: which ones each resource accepts, date values (with prefixes) turned into
store ``Bounds``, and record predicates for the parameters the store does not index.

Invariants: predicates compare against the same canonical-to-FHIR tables rendering writes, so a
search matches what a client reads; a parameter, modifier or prefix the sandbox does not support is
refused with a ``SearchError`` (a 400 OperationOutcome), never silently ignored.
"""

import re
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

from sandbox.fhir_render import APPOINTMENT_STATUS, OBSERVATION_CATEGORY, SSN_SYSTEM, code_system
from sandbox.model import Patient
from sandbox.store import Bounds

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
SUPPORTED_PREFIXES = ("eq", "gt", "lt", "ge", "le")

COMMON_PARAMS = frozenset({"_id", "_lastUpdated", "_count", "_format"})
SEARCH_PARAMS: dict[str, frozenset[str]] = {
    "Patient": COMMON_PARAMS
    | {
        "identifier",
        "given",
        "family",
        "birthdate",
        "gender",
        "address-city",
        "address-state",
        "address-postalcode",
        "phone",
        "email",
    },
    "Encounter": COMMON_PARAMS | {"patient", "subject", "date", "status"},
    "Observation": COMMON_PARAMS | {"patient", "subject", "date", "status", "category", "code"},
    "Appointment": COMMON_PARAMS | {"patient", "date", "status"},
}


class SearchError(Exception):
    """A search the server refuses; rendered as a 400 OperationOutcome naming the problem."""

    def __init__(self, diagnostics: str, *, status: int = 400, code: str = "invalid") -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.status = status
        self.code = code


def intersect(a: Bounds, b: Bounds) -> Bounds:
    """Both windows at once: repeated date parameters AND together."""
    lo, lo_inc = a.lo, a.lo_inclusive
    if b.lo is not None and (lo is None or b.lo > lo or (b.lo == lo and not b.lo_inclusive)):
        lo, lo_inc = b.lo, b.lo_inclusive
    hi, hi_inc = a.hi, a.hi_inclusive
    if b.hi is not None and (hi is None or b.hi < hi or (b.hi == hi and not b.hi_inclusive)):
        hi, hi_inc = b.hi, b.hi_inclusive
    return Bounds(lo, lo_inc, hi, hi_inc)


_DATE_ONLY = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


def parse_date_param(name: str, raw: str, tz: tzinfo) -> Bounds:
    """A FHIR date/dateTime search value with an optional prefix.

    Date-only values (YYYY, YYYY-MM, YYYY-MM-DD) are ranges in the EHR's zone; values with a time are
    instants (a missing offset means the EHR's zone) [I]. ``ne``, ``sa``, ``eb``, ``ap`` are refused.
    """
    prefix, value = "eq", raw.strip()
    if value[:2].isalpha():
        prefix, value = value[:2], value[2:]
        if prefix not in PREFIXES:
            raise SearchError(f"Invalid value for search parameter {name!r}: unknown prefix {prefix!r}")
        if prefix not in SUPPORTED_PREFIXES:
            raise SearchError(f"Unsupported prefix {prefix!r} for search parameter {name!r}")
    match = _DATE_ONLY.match(value)
    try:
        if match:
            year, month, day = match.group(1), match.group(2), match.group(3)
            lo_date = date(int(year), int(month or 1), int(day or 1))
            if day:
                hi_date = lo_date + timedelta(days=1)
            elif month:
                hi_date = date(lo_date.year + lo_date.month // 12, lo_date.month % 12 + 1, 1)
            else:
                hi_date = date(lo_date.year + 1, 1, 1)
            lo = datetime.combine(lo_date, datetime.min.time(), tz)
            hi = datetime.combine(hi_date, datetime.min.time(), tz)
            return {
                "eq": Bounds(lo, True, hi, False),
                "ge": Bounds(lo, True),
                "gt": Bounds(hi, True),
                "le": Bounds(hi=hi, hi_inclusive=False),
                "lt": Bounds(hi=lo, hi_inclusive=False),
            }[prefix]
        # A '+' offset sent unencoded in a GET query string arrives as a space.
        instant = datetime.fromisoformat(re.sub(r" (\d{2}:?\d{2})$", r"+\1", value))
    except ValueError:
        raise SearchError(f"Invalid value for search parameter {name!r}: not a FHIR date") from None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=tz)
    return {
        "eq": Bounds(instant, True, instant, True),
        "ge": Bounds(instant, True),
        "gt": Bounds(instant, False),
        "le": Bounds(hi=instant, hi_inclusive=True),
        "lt": Bounds(hi=instant, hi_inclusive=False),
    }[prefix]


def _split(values: Iterable[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def and_of_ors(values: list[str]) -> set[str] | None:
    """Repeated parameters AND together; commas inside one OR together (FHIR search semantics)."""
    result: set[str] | None = None
    for value in values:
        options = {v.strip() for v in value.split(",") if v.strip()}
        result = options if result is None else result & options
    return result


def patient_id(value: str) -> str:
    return value.rsplit("/", 1)[-1] if value.startswith("Patient/") or "/Patient/" in value else value


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _token_matches(token: str, pairs: Iterable[tuple[str | None, str | None]]) -> bool:
    system, sep, code = token.partition("|")
    if not sep:
        return any(value == token for _, value in pairs)
    if not code:
        return any(s == system for s, _ in pairs)
    if not system:
        return any(s is None and value == code for s, value in pairs)
    return any(s == system and value == code for s, value in pairs)


def _casefold_eq(a: str | None, b: str) -> bool:
    return a is not None and a.casefold() == b.casefold()


Predicate = Callable[[Any, str], bool]


def _ids_of(p: Patient) -> list[tuple[str | None, str | None]]:
    pairs: list[tuple[str | None, str | None]] = [(i.system, i.value) for i in p.identifiers]
    if p.ssn:
        pairs.append((SSN_SYSTEM, p.ssn))
    return pairs


PATIENT_PREDICATES: dict[str, Predicate] = {
    "identifier": lambda p, o: _token_matches(o, _ids_of(p)),
    "given": lambda p, o: _casefold_eq(p.given_name, o) or _casefold_eq(p.middle_name, o),
    "family": lambda p, o: _casefold_eq(p.family_name, o),
    "birthdate": lambda p, o: p.birth_date is not None and p.birth_date.isoformat() == o.strip(),
    "gender": lambda p, o: p.sex == o,
    "address-city": lambda p, o: _casefold_eq(p.address_city, o),
    "address-state": lambda p, o: _casefold_eq(p.address_state, o),
    "address-postalcode": lambda p, o: _casefold_eq(p.address_postal_code, o),
    "phone": lambda p, o: bool(p.phone) and _digits(p.phone) == _digits(o),
    "email": lambda p, o: _casefold_eq(p.email, o),
}


def _status_of(resource: str, record: Any) -> str:
    if resource == "Appointment":
        return APPOINTMENT_STATUS.get(record.status, record.status)
    return str(record.status)


CLINICAL_PREDICATES: dict[str, Callable[[str], Predicate]] = {
    "status": lambda resource: lambda r, o: _status_of(resource, r) == o,
    "category": lambda resource: lambda r, o: _token_matches(o, [(OBSERVATION_CATEGORY, "laboratory")]),
    "code": lambda resource: lambda r, o: _token_matches(o, [(code_system(r.code_system), r.code)]),
}


def indexed_identifier(resource: str, values: list[str]) -> tuple[str, str] | None:
    """A ``system|value`` the store's identifier index can answer (the SSN is not an identifier
    there); the per-record filter still checks every identifier parameter afterwards."""
    if resource != "Patient" or len(values) != 1 or "," in values[0]:
        return None
    system, sep, value = values[0].partition("|")
    if not sep or not system or not value or system == SSN_SYSTEM:
        return None
    return system, value


def record_filter(resource: str, params: dict[str, list[str]]) -> Callable[[Any], bool] | None:
    """Parameters the store does not index, checked per record: repeats AND, commas OR."""
    checks: list[tuple[Predicate, list[str]]] = []
    for name, values in params.items():
        if resource == "Patient":
            predicate = PATIENT_PREDICATES.get(name)
        else:
            factory = CLINICAL_PREDICATES.get(name)
            predicate = factory(resource) if factory else None
        if predicate is None:
            continue
        checks.extend((predicate, _split([value])) for value in values)
    if not checks:
        return None
    return lambda record: all(any(test(record, o) for o in options) for test, options in checks)
