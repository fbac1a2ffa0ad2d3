"""The FHIR R4 surface: canonical records rendered as R4 resources, searched and paged as Redox does.

Rendering maps canonical values (schema/__init__.py VALUESETS) to FHIR codes through the tables
below (documented in docs/sandbox.md), writes every timestamp in the FHIR EHR's local offset, and
memoizes each record version's JSON bytes, so a page is built by joining cached bytes and no
pydantic model is touched on the hot path.

Invariants:
- a search is evaluated once against a store snapshot (``as_of_seq``) and paged from that snapshot
  through an opaque cursor, so records changing between pages are neither skipped nor repeated;
- cursors and next links carry no PHI: the query travels inside the cursor, AES-GCM encrypted and
  authenticated with a per-process key, and the link is ``{fhir_base}/{Resource}/_search?_cursor=``;
- every rendered resource validates against ``fhir.resources.R4B`` (tests enforce it); JSON never
  holds ``null`` or an empty array, which FHIR forbids.
"""

import base64
import bisect
import collections
import dataclasses
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandbox.model import Appointment, Encounter, Kind, Patient, Result, Version
from sandbox.store import Bounds

RESOURCES: dict[str, Kind] = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "Appointment": "appointments",
}
DEFAULT_COUNT = 50
MAX_COUNT = 1000

SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
APPOINTMENT_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0276"
SANDBOX_APPOINTMENT_TYPE = "urn:redox:sandbox:appointment-type"

# canonical encounter_class -> (system, code, display)
ENCOUNTER_CLASS: dict[str, tuple[str, str, str]] = {
    "ambulatory": (ACT_CODE, "AMB", "ambulatory"),
    "emergency": (ACT_CODE, "EMER", "emergency"),
    "inpatient": (ACT_CODE, "IMP", "inpatient encounter"),
    "observation": (ACT_CODE, "OBSENC", "observation encounter"),
    "virtual": (ACT_CODE, "VR", "virtual"),
    "unknown": (NULL_FLAVOR, "UNK", "unknown"),
}
# canonical abnormal_flag -> (code, display) in v3 ObservationInterpretation
INTERPRETATIONS: dict[str, tuple[str, str]] = {
    "normal": ("N", "Normal"),
    "low": ("L", "Low"),
    "high": ("H", "High"),
    "critical_low": ("LL", "Critical low"),
    "critical_high": ("HH", "Critical high"),
    "abnormal": ("A", "Abnormal"),
    "unknown": ("IND", "Indeterminate"),
}
# Canonical encounter, result and sex codes are FHIR's own; appointment 'unknown' is not an R4
# Appointment.status, so it goes out as 'pending' (the population never generates it).
APPOINTMENT_STATUS = {"unknown": "pending"}
V2_0276 = frozenset({"CHECKUP", "EMERGENCY", "FOLLOWUP", "ROUTINE", "WALKIN"})

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


class StoreLike(Protocol):
    head_seq: int
    clock: datetime
    cache: dict[Any, bytes]

    def current(self, kind: Kind, surface: str, source_id: str, *, as_of_seq: int | None = None) -> Any: ...

    def query(self, kind: Kind, surface: str, **kwargs: Any) -> list[Version]: ...


class SearchError(Exception):
    """A search the server refuses; rendered as a 400 OperationOutcome naming the problem."""

    def __init__(self, diagnostics: str, *, status: int = 400, code: str = "invalid") -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.status = status
        self.code = code


def operation_outcome(diagnostics: str, code: str = "invalid", severity: str = "error") -> bytes:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }
    return json.dumps(body, separators=(",", ":")).encode()


# -- rendering ------------------------------------------------------------------------------------


def fhir_instant(value: datetime, tz: tzinfo) -> str:
    """ISO 8601 in the EHR's local offset; microseconds kept when present so watermarks round-trip."""
    return value.astimezone(tz).isoformat()


def _compact(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None and v != [] and v != {}}


def _meta(version: Version, tz: tzinfo) -> dict[str, str]:
    return {"versionId": str(version.version_id), "lastUpdated": fhir_instant(version.last_updated, tz)}


def render_patient(version: Version, tz: tzinfo) -> dict[str, Any]:
    p = version.record
    assert isinstance(p, Patient)
    identifiers = [{"system": i.system, "value": i.value} for i in p.identifiers if i.value]
    if p.ssn and not any(i["system"] == SSN_SYSTEM for i in identifiers):
        identifiers.append({"system": SSN_SYSTEM, "value": p.ssn})
    given = [g for g in (p.given_name, p.middle_name) if g]
    name = _compact({"use": "official", "family": p.family_name, "given": given})
    address = _compact(
        {
            "use": "home",
            "line": [p.address_line] if p.address_line else None,
            "city": p.address_city,
            "state": p.address_state,
            "postalCode": p.address_postal_code,
        }
    )
    telecom = []
    if p.phone:
        telecom.append({"system": "phone", "value": p.phone, "use": "home"})
    if p.email:
        telecom.append({"system": "email", "value": p.email})
    return _compact(
        {
            "resourceType": "Patient",
            "id": p.source_id,
            "meta": _meta(version, tz),
            "identifier": identifiers,
            "name": [name] if len(name) > 1 else None,
            "telecom": telecom,
            "gender": p.sex,
            "birthDate": p.birth_date.isoformat() if p.birth_date else None,
            "address": [address] if len(address) > 1 else None,
        }
    )


def _practitioner(provider_id: str | None, provider_name: str | None) -> dict[str, Any] | None:
    ref = _compact(
        {
            "identifier": {"system": NPI_SYSTEM, "value": provider_id} if provider_id else None,
            "display": provider_name,
        }
    )
    return ref or None


def render_encounter(version: Version, tz: tzinfo) -> dict[str, Any]:
    e = version.record
    assert isinstance(e, Encounter)
    system, code, display = ENCOUNTER_CLASS.get(e.encounter_class, ENCOUNTER_CLASS["unknown"])
    coding = _compact({"system": e.type_system, "code": e.type_code, "display": e.type_display})
    encounter_type = _compact({"coding": [coding] if coding else None, "text": e.type_display})
    attender = _practitioner(e.attending_provider_id, e.attending_provider_name)
    participant = None
    if attender:
        participant = [
            {
                "type": [{"coding": [{"system": PARTICIPATION_TYPE, "code": "ATND", "display": "attender"}]}],
                "individual": attender,
            }
        ]
    return _compact(
        {
            "resourceType": "Encounter",
            "id": e.source_id,
            "meta": _meta(version, tz),
            "status": e.status,
            "class": {"system": system, "code": code, "display": display},
            "type": [encounter_type] if encounter_type else None,
            "subject": {"reference": f"Patient/{e.patient_source_id}"},
            "participant": participant,
            "period": _compact(
                {
                    "start": fhir_instant(e.start_at, tz),
                    "end": fhir_instant(e.end_at, tz) if e.end_at else None,
                }
            ),
            "reasonCode": [{"text": e.reason}] if e.reason else None,
            "location": [{"location": {"display": e.location}}] if e.location else None,
        }
    )


def _code_system(system: str) -> str:
    return LOINC_SYSTEM if system.strip().upper() in ("LOINC", "LN", "2.16.840.1.113883.6.1") else system


def render_observation(version: Version, tz: tzinfo) -> dict[str, Any]:
    r = version.record
    assert isinstance(r, Result)
    value: dict[str, Any] = {}
    if r.value_num is not None:
        value["valueQuantity"] = _compact(
            {
                "value": r.value_num,
                "unit": r.unit,
                "system": UCUM_SYSTEM if r.unit else None,
                "code": r.unit,
            }
        )
    elif r.value_text is not None:
        value["valueString"] = r.value_text
    reference: dict[str, Any] = {}
    if r.reference_low is not None:
        reference["low"] = _compact({"value": r.reference_low, "unit": r.unit})
    if r.reference_high is not None:
        reference["high"] = _compact({"value": r.reference_high, "unit": r.unit})
    if r.reference_text:
        reference["text"] = r.reference_text
    interpretation = None
    if r.abnormal_flag:
        code, display = INTERPRETATIONS.get(r.abnormal_flag, INTERPRETATIONS["unknown"])
        interpretation = [{"coding": [{"system": INTERPRETATION, "code": code, "display": display}]}]
    return _compact(
        {
            "resourceType": "Observation",
            "id": r.source_id,
            "meta": _meta(version, tz),
            "basedOn": [{"reference": f"ServiceRequest/{r.order_id}"}],
            "status": r.status,
            "category": [
                {"coding": [{"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}]}
            ],
            "code": _compact(
                {
                    "coding": [
                        _compact(
                            {"system": _code_system(r.code_system), "code": r.code, "display": r.display}
                        )
                    ],
                    "text": r.display,
                }
            ),
            "subject": {"reference": f"Patient/{r.patient_source_id}"},
            "effectiveDateTime": fhir_instant(r.effective_at, tz),
            **value,
            "interpretation": interpretation,
            "referenceRange": [reference] if reference else None,
        }
    )


def render_appointment(version: Version, tz: tzinfo) -> dict[str, Any]:
    a = version.record
    assert isinstance(a, Appointment)
    participants: list[dict[str, Any]] = [
        {"actor": {"reference": f"Patient/{a.patient_source_id}"}, "status": "accepted"}
    ]
    practitioner = _practitioner(a.provider_id, a.provider_name)
    if practitioner:
        participants.append(
            {
                "type": [{"coding": [{"system": PARTICIPATION_TYPE, "code": "ATND", "display": "attender"}]}],
                "actor": practitioner,
                "status": "accepted",
            }
        )
    if a.location:
        participants.append({"actor": {"display": a.location}, "status": "accepted"})
    appointment_type = None
    if a.type_code or a.type_display:
        system = APPOINTMENT_TYPE if (a.type_code or "") in V2_0276 else SANDBOX_APPOINTMENT_TYPE
        coding = _compact({"system": system, "code": a.type_code, "display": a.type_display})
        appointment_type = _compact({"coding": [coding] if a.type_code else None, "text": a.type_display})
    return _compact(
        {
            "resourceType": "Appointment",
            "id": a.source_id,
            "meta": _meta(version, tz),
            "status": APPOINTMENT_STATUS.get(a.status, a.status),
            "appointmentType": appointment_type,
            "reasonCode": [{"text": a.reason}] if a.reason else None,
            "start": fhir_instant(a.start_at, tz),
            "end": fhir_instant(a.end_at, tz),
            "minutesDuration": a.duration_min if a.duration_min and a.duration_min > 0 else None,
            "participant": participants,
        }
    )


RENDERERS: dict[str, Callable[[Version, tzinfo], dict[str, Any]]] = {
    "Patient": render_patient,
    "Encounter": render_encounter,
    "Observation": render_observation,
    "Appointment": render_appointment,
}


def malform(resource: dict[str, Any], mode: str) -> dict[str, Any]:
    """Break one resource the way a faulty EHR might (``malformed`` fault); see docs/sandbox.md."""
    broken = json.loads(json.dumps(resource))
    kind = broken.get("resourceType")
    if mode == "wrong-type":
        if kind == "Patient":
            broken["birthDate"] = 19_700_101
        elif kind == "Observation" and "valueQuantity" in broken:
            broken["valueQuantity"]["value"] = "not-a-number"
        else:
            broken["status"] = 1
    elif mode == "missing-required":
        if kind == "Patient":
            broken.pop("resourceType", None)
        elif kind == "Appointment":
            broken.pop("participant", None)
        else:
            broken.pop("status", None)
    else:
        date_field = {
            "Patient": "birthDate",
            "Observation": "effectiveDateTime",
            "Appointment": "start",
        }.get(kind or "")
        if date_field:
            broken[date_field] = "2021-02-30T25:61:00"
        elif kind == "Encounter":
            broken.setdefault("period", {})["start"] = "2021-02-30T25:61:00"
        broken.setdefault("meta", {})["lastUpdated"] = "not-a-date"
    return broken


# -- search parameters ----------------------------------------------------------------------------


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


def _and_of_ors(values: list[str]) -> set[str] | None:
    """Repeated parameters AND together; commas inside one OR together (FHIR search semantics)."""
    result: set[str] | None = None
    for value in values:
        options = {v.strip() for v in value.split(",") if v.strip()}
        result = options if result is None else result & options
    return result


def _patient_id(value: str) -> str:
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
    "code": lambda resource: lambda r, o: _token_matches(o, [(_code_system(r.code_system), r.code)]),
}


def _indexed_identifier(resource: str, values: list[str]) -> tuple[str, str] | None:
    """A ``system|value`` the store's identifier index can answer (the SSN is not an identifier
    there); the per-record filter still checks every identifier parameter afterwards."""
    if resource != "Patient" or len(values) != 1 or "," in values[0]:
        return None
    system, sep, value = values[0].partition("|")
    if not sep or not system or not value or system == SSN_SYSTEM:
        return None
    return system, value


def _record_filter(resource: str, params: dict[str, list[str]]) -> Callable[[Any], bool] | None:
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


# -- searching and paging -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Page:
    status: int
    body: bytes


@dataclasses.dataclass
class _Result:
    versions: list[Version]
    ids: list[str]


class FhirSurface:
    """Searches and reads for one sandbox. Single-threaded by design: the event loop calls it."""

    def __init__(
        self,
        store: Callable[[], StoreLike],
        *,
        fhir_base: str,
        tz: tzinfo,
        faults: Any = None,
        cache_size: int = 512,
    ) -> None:
        self._store = store
        self._resource_tag = f"fhir-json|{tz}"
        self.fhir_base = fhir_base
        self.tz = tz
        self.faults = faults
        self._cipher = AESGCM(AESGCM.generate_key(bit_length=128))
        self._results: collections.OrderedDict[tuple[Any, ...], _Result] = collections.OrderedDict()
        self._cache_size = cache_size

    @property
    def fhir_base(self) -> str:
        return self._fhir_base

    @fhir_base.setter
    def fhir_base(self, value: str) -> None:
        # Entries embed fullUrl, so their cache key names the base they were built for.
        self._fhir_base = value
        self._entry_tag = f"fhir-entry|{self._resource_tag}|{value}"

    # -- cached rendering -----------------------------------------------------------------------

    def resource_bytes(self, resource: str, version: Version) -> bytes:
        # seq names one version store-wide, so (tag, seq) is as good a key as (kind, id, version).
        key = (self._resource_tag, version.seq)
        cache = self._store().cache
        cached = cache.get(key)
        if cached is None:
            rendered = RENDERERS[resource](version, self.tz)
            cached = cache[key] = json.dumps(rendered, separators=(",", ":")).encode()
        return cached

    def render(self, resource: str, version: Version) -> dict[str, Any]:
        return RENDERERS[resource](version, self.tz)

    def _entries(self, resource: str, page: list[Version], bodies: list[bytes | None]) -> bytes:
        """The entries of one page: cached bytes joined, rendering only versions never served."""
        cache = self._store().cache
        tag = self._entry_tag
        out = []
        for version, body in zip(page, bodies, strict=True):
            if body is not None:
                out.append(self._wrap(resource, version, body))
                continue
            cached = cache.get((tag, version.seq))
            if cached is None:
                cached = cache[(tag, version.seq)] = self._wrap(
                    resource, version, self.resource_bytes(resource, version)
                )
            out.append(cached)
        return b",".join(out)

    def _wrap(self, resource: str, version: Version, body: bytes) -> bytes:
        url = f"{self.fhir_base}/{resource}/{version.record.source_id}"
        return b"".join(
            (b'{"fullUrl":', json.dumps(url).encode(), b',"resource":', body, b',"search":{"mode":"match"}}')
        )

    # -- cursor ---------------------------------------------------------------------------------

    def _seal(self, payload: dict[str, Any]) -> str:
        nonce = os.urandom(12)
        sealed = self._cipher.encrypt(nonce, json.dumps(payload, separators=(",", ":")).encode(), None)
        return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def _open(self, cursor: str) -> dict[str, Any]:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            payload = json.loads(self._cipher.decrypt(raw[:12], raw[12:], None))
        except (ValueError, InvalidTag):
            raise SearchError(
                "Invalid or expired _cursor; restart the search without it", code="invalid"
            ) from None
        if not isinstance(payload, dict):
            raise SearchError("Invalid _cursor")
        return payload

    # -- public API -----------------------------------------------------------------------------

    def read(self, resource: str, source_id: str) -> Page:
        kind = RESOURCES.get(resource)
        if kind is None:
            return Page(404, operation_outcome(f"Unknown resource type {resource!r}", "not-supported"))
        version = self._store().current(kind, "fhir", source_id)
        if version is None:
            return Page(404, operation_outcome(f"{resource}/{source_id} not found", "not-found"))
        body = self.resource_bytes(resource, version)
        broken = self.faults.malform(1) if self.faults is not None else None
        if broken is not None:
            body = json.dumps(malform(json.loads(body), broken[1])).encode()
            self.faults.note_malformed("fhir", resource, source_id, broken[1])
        return Page(200, body)

    def search(self, resource: str, pairs: Sequence[tuple[str, str]]) -> Page:
        try:
            return self._search(resource, pairs)
        except SearchError as err:
            return Page(err.status, operation_outcome(err.diagnostics, err.code))

    def _search(self, resource: str, pairs: Sequence[tuple[str, str]]) -> Page:
        if resource not in RESOURCES:
            raise SearchError(f"Unknown resource type {resource!r}", status=404, code="not-supported")
        cursors = [v for k, v in pairs if k == "_cursor"]
        if cursors:
            # The query lives in the cursor; anything else sent beside it is ignored [I].
            state = self._open(cursors[-1])
            if state.get("r") != resource:
                raise SearchError("This _cursor belongs to a different resource type")
            params: dict[str, list[str]] = state["q"]
            as_of, after, count = int(state["s"]), str(state["a"]), int(state["n"])
        else:
            params = self._parse(resource, pairs)
            count = self._count(params.pop("_count", []))
            params.pop("_format", None)
            as_of, after = self._store().head_seq, ""
        result = self._evaluate(resource, params, as_of)
        start = bisect.bisect_right(result.ids, after) if after else 0
        page = result.versions[start : start + count]
        more = start + count < len(result.versions)
        bodies: list[bytes | None] = [None] * len(page)
        if self.faults is not None and page:
            broken = self.faults.malform(len(page))
            if broken is not None:
                index, mode = broken
                rendered = json.loads(self.resource_bytes(resource, page[index]))
                bodies[index] = json.dumps(malform(rendered, mode), separators=(",", ":")).encode()
                self.faults.note_malformed("fhir", resource, page[index].record.source_id, mode)
        links = [{"relation": "self", "url": self._self_url(resource, cursors[-1] if cursors else None)}]
        if more and page:
            last = page[-1].record.source_id
            if self.faults is not None and len(page) >= 2 and self.faults.duplicate():
                # The next page starts one record early: the last record here is served twice.
                last = page[-2].record.source_id
            cursor = self._seal({"r": resource, "q": params, "s": as_of, "a": last, "n": count})
            links.append({"relation": "next", "url": self._self_url(resource, cursor)})
        head = {
            "resourceType": "Bundle",
            "id": uuid.uuid4().hex,
            "meta": {"lastUpdated": fhir_instant(self._store().clock, self.tz)},
            "type": "searchset",
            "total": len(result.versions),
            "link": links,
        }
        encoded = json.dumps(head, separators=(",", ":")).encode()
        if not page:
            return Page(200, encoded)
        entries = self._entries(resource, page, bodies)
        return Page(200, b"".join((encoded[:-1], b',"entry":[', entries, b"]}")))

    def _self_url(self, resource: str, cursor: str | None) -> str:
        url = f"{self.fhir_base}/{resource}/_search"
        return f"{url}?_cursor={cursor}" if cursor else url

    @staticmethod
    def _count(values: list[str]) -> int:
        if not values:
            return DEFAULT_COUNT
        try:
            count = int(values[-1])
        except ValueError:
            raise SearchError("Invalid value for search parameter '_count': not an integer") from None
        if count < 0:
            raise SearchError("Invalid value for search parameter '_count': must not be negative")
        return min(count, MAX_COUNT)

    @staticmethod
    def _parse(resource: str, pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
        allowed = SEARCH_PARAMS[resource]
        params: dict[str, list[str]] = {}
        for name, value in pairs:
            base, colon, modifier = name.partition(":")
            if base not in allowed:
                raise SearchError(f"Unknown search parameter {name!r} for {resource}", code="not-supported")
            if colon:
                raise SearchError(
                    f"Unsupported modifier {modifier!r} on search parameter {base!r}", code="not-supported"
                )
            params.setdefault(base, []).append(value)
        if resource == "Patient" and not (
            "_id" in params or "identifier" in params or {"given", "family", "birthdate"} <= params.keys()
        ):
            raise SearchError(
                "Patient search requires _id, identifier, or all of given, family and birthdate",
                code="required",
            )
        return params

    def _evaluate(self, resource: str, params: dict[str, list[str]], as_of: int) -> _Result:
        key = (resource, json.dumps(params, sort_keys=True), as_of)
        cached = self._results.get(key)
        if cached is not None:
            self._results.move_to_end(key)
            return cached
        kind = RESOURCES[resource]
        query: dict[str, Any] = {"as_of_seq": as_of}
        ids = _and_of_ors(params.get("_id", []))
        if ids is not None:
            query["source_ids"] = ids
        patient_values = params.get("patient", []) + params.get("subject", [])
        patients = _and_of_ors(
            [",".join(_patient_id(v) for v in value.split(",")) for value in patient_values]
        )
        if patients is not None:
            query["patient_ids"] = patients
        identifier = _indexed_identifier(resource, params.get("identifier", []))
        if identifier is not None:
            query["identifier"] = identifier
        when = self._window("date", params.get("date", []))
        if when is not None:
            query["when"] = when
        updated = self._window("_lastUpdated", params.get("_lastUpdated", []))
        if updated is not None:
            query["updated"] = updated
        versions: list[Version] = []
        if not (ids is not None and not ids) and not (patients is not None and not patients):
            versions = self._store().query(kind, "fhir", **query)
        keep = _record_filter(resource, params)
        if keep is not None:
            versions = [v for v in versions if keep(v.record)]
        versions.sort(key=lambda v: v.record.source_id)
        result = _Result(versions, [v.record.source_id for v in versions])
        self._results[key] = result
        if len(self._results) > self._cache_size:
            self._results.popitem(last=False)
        return result

    def _window(self, name: str, values: list[str]) -> Bounds | None:
        window: Bounds | None = None
        for value in values:
            if "," in value:
                # OR-ed date ranges would need a union of windows; no Redox client sends them [I].
                raise SearchError(f"Comma-separated values are not supported for {name!r}; repeat it instead")
            bound = parse_date_param(name, value, self.tz)
            window = bound if window is None else intersect(window, bound)
        if window is not None:
            window = Bounds(
                window.lo.astimezone(UTC) if window.lo else None,
                window.lo_inclusive,
                window.hi.astimezone(UTC) if window.hi else None,
                window.hi_inclusive,
            )
        return window
