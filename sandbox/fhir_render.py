"""FHIR R4 rendering: canonical records as Patient, Encounter, Observation and Appointment resources,
the tables that map canonical values (schema/__init__.py VALUESETS) to FHIR codes (documented in
docs/sandbox.md), and the ways a faulty EHR breaks a resource (``malform``).

Invariants:
- every rendered resource validates against ``fhir.resources.R4B`` (tests enforce it); JSON never
  holds ``null`` or an empty array, which FHIR forbids;
- every timestamp is written in the FHIR EHR's local offset;
- a rendering depends only on the record version and the zone, so the surface may cache its bytes
  per version.
"""

import json
from collections.abc import Callable
from datetime import datetime, tzinfo
from typing import Any

from sandbox.model import Appointment, Encounter, Patient, Result, Version, provider_form

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
    role = ("ATND", "attender")
    if attender and e.attending_provider_id:
        form = provider_form(e.source_id)
        if form == "conditional":
            role = ("PPRF", "primary performer")
            attender = _compact(
                {
                    "reference": f"Practitioner?identifier={NPI_SYSTEM}|{e.attending_provider_id}",
                    "display": e.attending_provider_name,
                }
            )
        elif form == "display" and e.attending_provider_name:
            attender = {"display": e.attending_provider_name}
    if attender:
        participant = [
            {
                "type": [{"coding": [{"system": PARTICIPATION_TYPE, "code": role[0], "display": role[1]}]}],
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


def code_system(system: str) -> str:
    return LOINC_SYSTEM if system.strip().upper() in ("LOINC", "LN", "2.16.840.1.113883.6.1") else system


def render_observation(version: Version, tz: tzinfo) -> dict[str, Any]:
    r = version.record
    assert isinstance(r, Result)
    value: dict[str, Any] = {}
    if r.value_type == "codeable_concept":
        coding = _compact(
            {"system": r.value_code_system, "code": r.value_code, "display": r.value_code_display}
        )
        value["valueCodeableConcept"] = _compact({"coding": [coding], "text": r.value_text})
    elif r.value_type == "boolean":
        value["valueBoolean"] = r.value_text == "true"
    elif r.value_num is not None:
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
                        _compact({"system": code_system(r.code_system), "code": r.code, "display": r.display})
                    ],
                    "text": r.display,
                }
            ),
            "subject": {"reference": f"Patient/{r.patient_source_id}"},
            "effectiveDateTime": fhir_instant(r.effective_at, tz),
            **value,
            "component": [_component(c) for c in r.components] if r.components else None,
            "interpretation": interpretation,
            "referenceRange": [reference] if reference else None,
        }
    )


def _component(c: dict[str, Any]) -> dict[str, Any]:
    return {
        "code": {"coding": [{"system": LOINC_SYSTEM, "code": c["code"], "display": c["display"]}]},
        "valueQuantity": _compact(
            {"value": c["value_num"], "unit": c["unit"], "system": UCUM_SYSTEM, "code": c["unit"]}
        ),
    }


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
