"""Redox Data Model rendering: canonical records as the pieces of Redox's response models (patient
identifiers and demographics, visits, bookings, results, an order's status), the tables that map
canonical values to Data Model wire codes (docs/sandbox.md lists them), and the ways a faulty EHR
breaks a visit or an order (``malform``).

Invariants: every timestamp is ISO 8601 UTC with milliseconds and ``Z``; a rendering depends only on
the record version, so the surface may cache it per version; ``malform`` works on a deep copy and
never alters what it was given (cached pieces stay intact); an id is sent as ``wire_id`` of the
record's (a VisitNumber or Order ID the source system reused for another patient's record).
"""

import copy
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sandbox.model import Appointment, Encounter, Patient, Result, Version

# Where a Data Model record's key in the store (unique) carries a second part after the id it is
# sent with: '<sent id>~<own id>' is a record whose source system reused another patient's
# VisitNumber or Order ID (sandbox/population/records.py makes them).
REUSED_MARK = "~"
REUSED_PART = r"~[^|]*"
_REUSED = re.compile(REUSED_PART)


def wire_id(source_id: str) -> str:
    """The id the Data Model sends for a record (a VisitNumber, an Order ID, a result's
    '<Order ID>|<Code>'): the store's key less its reuse part."""
    return _REUSED.sub("", source_id) if REUSED_MARK in source_id else source_id


SEX = {"male": "Male", "female": "Female", "other": "Other", "unknown": "Unknown"}
PATIENT_CLASS = {
    "ambulatory": "Outpatient",
    "emergency": "Emergency",
    "inpatient": "Inpatient",
    "observation": "Observation",
    "virtual": "Virtual",
    "unknown": "Unknown",
}
ENCOUNTER_STATUS = {
    "planned": "Scheduled",
    "arrived": "Arrived",
    "in-progress": "In Progress",
    "finished": "Completed",
    "cancelled": "Canceled",
    "entered-in-error": "Entered in Error",
    "unknown": "Unknown",
}
APPOINTMENT_STATUS = {
    "booked": "Scheduled",
    "arrived": "Arrived",
    "fulfilled": "Completed",
    "cancelled": "Canceled",
    "noshow": "No Show",
    "entered-in-error": "Entered in Error",
    "unknown": "Unknown",
}
RESULT_STATUS = {
    "preliminary": "Preliminary",
    "final": "Final",
    "corrected": "Corrected",
    "cancelled": "Canceled",
    "entered-in-error": "Entered in Error",
    "unknown": "Unknown",
}
ABNORMAL_FLAG = {
    "normal": "Normal",
    "low": "Low",
    "high": "High",
    "critical_low": "Critical Low",
    "critical_high": "Critical High",
    "abnormal": "Abnormal",
    "unknown": "Unknown",
}
APPOINTMENT_TYPE_CODESET = "urn:redox:sandbox:appointment-type"


def utc_ms(value: datetime) -> str:
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def id_type(system: str) -> str:
    """``urn:oid:X`` -> ``X``; ``urn:redox:dm:T`` -> ``T``; anything else is sent as it is."""
    if system.startswith("urn:oid:"):
        return system[len("urn:oid:") :]
    if system.startswith("urn:redox:dm:"):
        return system[len("urn:redox:dm:") :]
    return system


def e164(phone: str | None) -> str | None:
    if not phone:
        return None
    digits = re.sub(r"\D", "", phone)
    if phone.strip().startswith("+"):
        return "+" + digits
    if len(digits) == 10:
        return "+1" + digits
    if len(digits) == 11 and digits.startswith("1"):
        return "+" + digits
    return phone


def _split_name(name: str | None) -> tuple[str | None, str | None]:
    if not name:
        return None, None
    first, _, last = name.strip().rpartition(" ")
    return (first or None), last


def malform(item: dict[str, Any], mode: str) -> dict[str, Any]:
    """Break one Visit or Order the way a faulty EHR might (``malformed`` fault)."""
    broken = copy.deepcopy(item)
    if "Results" in broken:
        if mode == "wrong-type":
            broken["Results"] = {"Code": broken.get("ID")}
        elif mode == "missing-required":
            broken.pop("ID", None)
        else:
            broken["CompletionDateTime"] = "2021-02-30T25:61:00.000Z"
        return broken
    if mode == "wrong-type":
        broken["VisitDateTime"] = 20_210_230
        if "Duration" in broken:
            broken["Duration"] = "fifteen minutes"
    elif mode == "missing-required":
        broken.pop("VisitNumber", None)
    else:
        broken["VisitDateTime"] = "2021-02-30T25:61:00.000Z"
    return broken


def render_identifiers(patient: Patient) -> list[dict[str, str]]:
    return [{"ID": i.value, "IDType": id_type(i.system)} for i in patient.identifiers if i.value]


def render_demographics(patient: Patient) -> dict[str, Any]:
    address = {
        "StreetAddress": patient.address_line,
        "City": patient.address_city,
        "State": patient.address_state,
        "ZIP": patient.address_postal_code,
        "Country": "US" if any((patient.address_line, patient.address_city, patient.address_state)) else None,
    }
    return {
        "FirstName": patient.given_name,
        "MiddleName": patient.middle_name,
        "LastName": patient.family_name,
        "DOB": patient.birth_date.isoformat() if patient.birth_date else None,
        "SSN": patient.ssn,
        "Sex": SEX.get(patient.sex, "Unknown") if patient.sex else None,
        "PhoneNumber": {"Home": e164(patient.phone)},
        "EmailAddresses": [patient.email] if patient.email else [],
        "Address": address,
    }


def render_patient(version: Version) -> dict[str, Any]:
    patient = version.record
    assert isinstance(patient, Patient)
    return {"Identifiers": render_identifiers(patient), "Demographics": render_demographics(patient)}


def render_visit(version: Version) -> dict[str, Any]:
    e = version.record
    assert isinstance(e, Encounter)
    return {
        "VisitNumber": wire_id(e.source_id),
        "VisitDateTime": utc_ms(e.start_at),
        "PatientClass": PATIENT_CLASS.get(e.encounter_class, "Unknown"),
        "Status": ENCOUNTER_STATUS.get(e.status, "Unknown"),
        "Reason": e.reason,
        "Location": {"Department": e.location, "FacilityIdentifiers": [], "DepartmentIdentifiers": []},
    }


def render_booking(version: Version) -> dict[str, Any]:
    a = version.record
    assert isinstance(a, Appointment)
    first, last = _split_name(a.provider_name)
    provider: dict[str, Any] = {"ID": a.provider_id, "IDType": "NPI" if a.provider_id else None}
    provider.update({"FirstName": first, "LastName": last})
    info = []
    if a.type_code:
        info.append(
            {
                "Code": a.type_code,
                "Codeset": APPOINTMENT_TYPE_CODESET,
                "Description": a.type_display,
                "Value": a.type_code,
            }
        )
    return {
        "VisitNumber": wire_id(a.source_id),
        "VisitDateTime": utc_ms(a.start_at),
        "Duration": a.duration_min,
        "Status": APPOINTMENT_STATUS.get(a.status, "Unknown"),
        "Reason": a.reason,
        "Type": a.type_display,
        "AppointmentInfo": info,
        "AttendingProvider": provider,
        # Department is required by BookedResponse; an unknown location is sent empty [I].
        "Location": {"Department": a.location or ""},
        "LastUpdated": utc_ms(version.last_updated),
        "Instructions": [],
        "Diagnoses": [],
    }


def render_result(version: Version) -> dict[str, Any]:
    r = version.record
    assert isinstance(r, Result)
    value: str | None = r.value_text
    value_type = "String"
    if r.value_num is not None:
        value, value_type = f"{r.value_num:g}", "Numeric"
    codeset = "LOINC" if r.code_system.lower() in ("http://loinc.org", "loinc") else r.code_system
    return {
        "Code": r.code,
        "Codeset": codeset,
        "Description": r.display,
        "Value": value,
        "ValueType": value_type,
        "Units": r.unit,
        "Notes": [],
        "AbnormalFlag": ABNORMAL_FLAG.get(r.abnormal_flag) if r.abnormal_flag else None,
        "Status": RESULT_STATUS.get(r.status, "Unknown"),
        "CompletionDateTime": utc_ms(r.effective_at),
        "ReferenceRange": {"Low": r.reference_low, "High": r.reference_high, "Text": r.reference_text},
    }


def order_status(statuses: Iterable[str]) -> str:
    found = set(statuses)
    for status in ("corrected", "preliminary"):
        if status in found:
            return RESULT_STATUS[status]
    if found and found <= {"cancelled", "entered-in-error"}:
        return RESULT_STATUS["cancelled"]
    return RESULT_STATUS["final"]
