"""The Redox Data Model surface: ``POST /endpoint`` answering four synchronous queries.

PatientSearch ``Query``, Scheduling ``Booked``, Results ``Query`` and PatientAdmin ``VisitQuery`` are
answered from the Data Model EHR's records with Redox's response models (``Response``,
``BookedResponse``, ``QueryResponse``, ``VisitQueryResponse``). Canonical values are mapped to the wire
codes in the tables below (docs/sandbox.md lists them); every timestamp is ISO 8601 UTC with
milliseconds and ``Z``.

Invariants:
- every successful response validates against the ``redox`` package's model for its event (extra
  fields are forbidden there, so nothing outside those models is sent, and ``Meta.Errors`` is
  omitted on success [I]);
- malformed requests get HTTP 400, requests understood but not answerable get HTTP 200; both carry
  ``Meta.Errors[] {ID, Text, Type, Module}`` and never echo patient data in ``Text``;
- rendered pieces are cached per record version and deep-copied before a fault alters them.
"""

import copy
import dataclasses
import itertools
import json
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sandbox.fhir import StoreLike
from sandbox.model import Appointment, Encounter, Patient, Result, Version
from sandbox.store import Bounds

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
# A window given only by its start covers one day [I]; Redox documents no default.
DEFAULT_WINDOW = timedelta(days=1)
SUPPORTED = {
    ("PatientSearch", "Query"): "Response",
    ("Scheduling", "Booked"): "BookedResponse",
    ("Results", "Query"): "QueryResponse",
    ("PatientAdmin", "VisitQuery"): "VisitQueryResponse",
}
# Response models whose Meta has IsIncomplete (the redox models forbid it elsewhere).
WITH_IS_INCOMPLETE = {"Response", "BookedResponse"}
SANDBOX_SOURCE = {"ID": "3f0c2a8e-5d1b-4b0e-9a57-7c1f1a2b9d10", "Name": "Redox Sandbox EHR"}


class RequestError(Exception):
    """A request that cannot be answered; ``status`` 400 means it could not be understood."""

    def __init__(
        self, text: str, *, status: int = 400, module: str = "Request", kind: str = "message"
    ) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.module = module
        self.kind = kind


def utc_ms(value: datetime) -> str:
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_utc(field: str, value: object) -> datetime:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{field} must be an ISO 8601 datetime string")
    try:
        parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError:
        raise RequestError(f"{field} is not an ISO 8601 datetime") from None
    # A datetime without an offset is taken as UTC, the only zone Redox uses [I].
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


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


@dataclasses.dataclass
class _Criteria:
    patient_ids: set[str] | None = None
    when: Bounds | None = None
    updated: Bounds | None = None


class DataModelSurface:
    """The ``/endpoint`` handler for one sandbox; called from the event loop only."""

    def __init__(self, store: Callable[[], StoreLike], *, faults: Any = None) -> None:
        self._store = store
        self.faults = faults
        self._rendered: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._error_ids = itertools.count(19_500_000)

    # -- entry point ----------------------------------------------------------------------------

    def handle(self, body: bytes) -> tuple[int, bytes, str]:
        """(HTTP status, response body, ``DataModel.EventType`` label for stats)."""
        request: dict[str, Any] = {}
        label = "unknown"
        try:
            try:
                parsed = json.loads(body or b"null")
            except (ValueError, UnicodeDecodeError):
                raise RequestError("Request body is not valid JSON") from None
            if not isinstance(parsed, dict) or not isinstance(parsed.get("Meta"), dict):
                raise RequestError("Request body must be a JSON object with a Meta object")
            request = parsed
            meta = request["Meta"]
            data_model, event_type = meta.get("DataModel"), meta.get("EventType")
            if not isinstance(data_model, str) or not isinstance(event_type, str):
                raise RequestError("Meta.DataModel and Meta.EventType are required strings")
            label = f"{data_model}.{event_type}"
            key = (data_model.replace(" ", ""), event_type)
            if key not in SUPPORTED:
                raise RequestError(
                    f"No subscriptions for {data_model} {event_type}. The sandbox answers PatientSearch "
                    "Query, Scheduling Booked, Results Query and PatientAdmin VisitQuery",
                    status=200,
                    module="Subscriptions",
                )
            handler = {
                "Response": self._patient_search,
                "BookedResponse": self._booked,
                "QueryResponse": self._results,
                "VisitQueryResponse": self._visits,
            }[SUPPORTED[key]]
            payload = handler(request)
            response = {"Meta": self._meta(meta, SUPPORTED[key]), **payload}
            return 200, json.dumps(response, separators=(",", ":")).encode(), label
        except RequestError as err:
            return err.status, self.error_body(err.text, request.get("Meta"), err.module, err.kind), label

    def error_body(
        self, text: str, meta: object = None, module: str = "Request", kind: str = "message"
    ) -> bytes:
        request_meta = meta if isinstance(meta, dict) else {}
        out = {
            "DataModel": request_meta.get("DataModel")
            if isinstance(request_meta.get("DataModel"), str)
            else "",
            "EventType": request_meta.get("EventType")
            if isinstance(request_meta.get("EventType"), str)
            else "",
            "EventDateTime": utc_ms(self._store().clock),
            "Test": True,
            "Source": self._source(request_meta),
            "Destinations": self._destinations(request_meta),
            "Logs": [{"ID": str(uuid.uuid4()), "AttemptID": str(uuid.uuid4())}],
            "Errors": [{"ID": next(self._error_ids), "Text": text, "Type": kind, "Module": module}],
        }
        return json.dumps({"Meta": out}, separators=(",", ":")).encode()

    # -- envelope -------------------------------------------------------------------------------

    @staticmethod
    def _source(meta: dict[str, Any]) -> dict[str, Any]:
        source = meta.get("Source")
        if isinstance(source, dict) and all(isinstance(source.get(k), str | None) for k in ("ID", "Name")):
            return {"ID": source.get("ID"), "Name": source.get("Name")}
        return dict(SANDBOX_SOURCE)

    @staticmethod
    def _destinations(meta: dict[str, Any]) -> list[dict[str, Any]]:
        destinations = meta.get("Destinations")
        if not isinstance(destinations, list):
            return []
        return [
            {"ID": d.get("ID"), "Name": d.get("Name")}
            for d in destinations
            if isinstance(d, dict) and all(isinstance(d.get(k), str | None) for k in ("ID", "Name"))
        ]

    def _meta(self, meta: dict[str, Any], event: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "DataModel": meta["DataModel"],
            "EventType": event,
            "EventDateTime": utc_ms(self._store().clock),
            "Test": True,
            "Source": self._source(meta),
            "Destinations": self._destinations(meta),
            "Logs": [{"ID": str(uuid.uuid4()), "AttemptID": str(uuid.uuid4())}],
        }
        if event in WITH_IS_INCOMPLETE:
            out["IsIncomplete"] = False
        return out

    # -- rendering ------------------------------------------------------------------------------

    def _cached(
        self, tag: str, version: Version, build: Callable[[Version], dict[str, Any]]
    ) -> dict[str, Any]:
        key = (tag, version.record.source_id, version.seq)
        hit = self._rendered.get(key)
        if hit is None:
            hit = self._rendered[key] = build(version)
        return hit

    @staticmethod
    def identifiers(patient: Patient) -> list[dict[str, str]]:
        return [{"ID": i.value, "IDType": id_type(i.system)} for i in patient.identifiers if i.value]

    @staticmethod
    def demographics(patient: Patient) -> dict[str, Any]:
        address = {
            "StreetAddress": patient.address_line,
            "City": patient.address_city,
            "State": patient.address_state,
            "ZIP": patient.address_postal_code,
            "Country": "US"
            if any((patient.address_line, patient.address_city, patient.address_state))
            else None,
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

    def _patient(self, patient_source_id: str, *, notes: bool) -> dict[str, Any]:
        version = self._store().current("patients", "datamodel", patient_source_id)
        if version is None:
            out: dict[str, Any] = {"Identifiers": [{"ID": patient_source_id, "IDType": "MR"}]}
        else:
            rendered = self._cached("patient", version, self._render_patient)
            out = dict(rendered)
        if notes:
            out["Notes"] = []
        return out

    def _render_patient(self, version: Version) -> dict[str, Any]:
        patient = version.record
        assert isinstance(patient, Patient)
        return {"Identifiers": self.identifiers(patient), "Demographics": self.demographics(patient)}

    def _patient_identifiers(self, patient_source_id: str) -> list[dict[str, str]]:
        version = self._store().current("patients", "datamodel", patient_source_id)
        if version is None:
            return [{"ID": patient_source_id, "IDType": "MR"}]
        return list(self._cached("patient", version, self._render_patient)["Identifiers"])

    @staticmethod
    def _render_visit(version: Version) -> dict[str, Any]:
        e = version.record
        assert isinstance(e, Encounter)
        return {
            "VisitNumber": e.source_id,
            "VisitDateTime": utc_ms(e.start_at),
            "PatientClass": PATIENT_CLASS.get(e.encounter_class, "Unknown"),
            "Status": ENCOUNTER_STATUS.get(e.status, "Unknown"),
            "Reason": e.reason,
            "Location": {"Department": e.location, "FacilityIdentifiers": [], "DepartmentIdentifiers": []},
        }

    @staticmethod
    def _render_booking(version: Version) -> dict[str, Any]:
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
            "VisitNumber": a.source_id,
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

    @staticmethod
    def _render_result(version: Version) -> dict[str, Any]:
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

    # -- lookups --------------------------------------------------------------------------------

    def _resolve_identifiers(self, identifiers: object, field: str) -> set[str]:
        if not isinstance(identifiers, list):
            raise RequestError(f"{field} must be a list")
        store = self._store()
        found: set[str] = set()
        for item in identifiers:
            if not isinstance(item, dict) or not isinstance(item.get("ID"), str | int):
                raise RequestError(f"{field}[] entries need an ID")
            value, kind = str(item["ID"]), str(item.get("IDType") or "")
            # 'MRN' is accepted for the MR identifier [I]; Redox payloads use both.
            kind = "MR" if kind.upper() in ("MR", "MRN") else kind
            # IDType is the rendered system (see id_type); try every system that renders as it.
            for system in (f"urn:redox:dm:{kind}", f"urn:oid:{kind}", kind):
                found.update(
                    v.record.source_id
                    for v in store.query("patients", "datamodel", identifier=(system, value))
                )
        return found

    def _patients_filter(self, patients: object, field: str) -> set[str] | None:
        if patients is None or patients == []:
            return None
        if not isinstance(patients, list):
            raise RequestError(f"{field} must be a list")
        found: set[str] = set()
        for i, patient in enumerate(patients):
            if not isinstance(patient, dict):
                raise RequestError(f"{field}[{i}] must be an object")
            found |= self._resolve_identifiers(patient.get("Identifiers") or [], f"{field}[{i}].Identifiers")
        return found

    @staticmethod
    def _window(start: datetime | None, end: datetime | None) -> Bounds | None:
        if start is None and end is None:
            return None
        if start is not None and end is None:
            end = start + DEFAULT_WINDOW
        return Bounds(start, True, end, False)

    @staticmethod
    def _strings(value: object, field: str) -> set[str] | None:
        if value is None or value == []:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            raise RequestError(f"{field} must be a list of strings")
        return {str(v) for v in value}

    def _query(self, kind: Any, criteria: _Criteria) -> list[Version]:
        if criteria.patient_ids is not None and not criteria.patient_ids:
            return []
        kwargs: dict[str, Any] = {}
        if criteria.patient_ids is not None:
            kwargs["patient_ids"] = criteria.patient_ids
        if criteria.when is not None:
            kwargs["when"] = criteria.when
        if criteria.updated is not None:
            kwargs["updated"] = criteria.updated
        return self._store().query(kind, "datamodel", **kwargs)

    def _with_faults(self, items: list[dict[str, Any]], resource: str) -> list[dict[str, Any]]:
        if self.faults is None or not items:
            return items
        broken = self.faults.malform(len(items))
        if broken is not None:
            index, mode = broken
            # Named before breaking: "missing-required" removes the very id that names it. A broken
            # order breaks every result in it, and results are the records the client keeps.
            item = items[index]
            if resource == "Order":
                named = [("Result", f"{item['ID']}|{r['Code']}") for r in item["Results"]]
            else:
                named = [(resource, item["VisitNumber"])]
            items[index] = malform(item, mode)
            for kind, source_id in named:
                self.faults.note_malformed("datamodel", kind, source_id, mode)
        if self.faults.duplicate():
            index = self.faults.pick(len(items))
            items.insert(index + 1, copy.deepcopy(items[index]))
        return items

    # -- the four queries -----------------------------------------------------------------------

    def _patient_search(self, request: dict[str, Any]) -> dict[str, Any]:
        query = request.get("Patient")
        if not isinstance(query, dict):
            raise RequestError("PatientSearch Query needs a Patient object")
        identifiers = query.get("Identifiers") or []
        demographics = query.get("Demographics") or {}
        if not isinstance(demographics, dict):
            raise RequestError("Patient.Demographics must be an object")
        if identifiers:
            matches = sorted(self._resolve_identifiers(identifiers, "Patient.Identifiers"))
        else:
            matches = self._match_demographics(demographics)
        if len(matches) == 1:
            return {"Patient": self._patient(matches[0], notes=True), "PotentialMatches": []}
        return {"Patient": {}, "PotentialMatches": [self._patient(m, notes=True) for m in matches]}

    def _match_demographics(self, demographics: dict[str, Any]) -> list[str]:
        wanted = {k: demographics.get(k) for k in ("FirstName", "LastName", "DOB", "Sex", "SSN")}
        if not (isinstance(wanted["LastName"], str) and isinstance(wanted["DOB"], str)):
            raise RequestError(
                "PatientSearch Query needs Patient.Identifiers, or Demographics with LastName and DOB",
                status=200,
                module="Query",
                kind="query",
            )
        zip_code = (
            (demographics.get("Address") or {}).get("ZIP")
            if isinstance(demographics.get("Address"), dict)
            else None
        )
        matches = []
        for version in self._store().query("patients", "datamodel"):
            p = version.record
            assert isinstance(p, Patient)
            rendered = self.demographics(p)
            if all(
                value is None
                or (isinstance(value, str) and str(rendered.get(key) or "").casefold() == value.casefold())
                for key, value in wanted.items()
            ) and (not zip_code or rendered["Address"]["ZIP"] == zip_code):
                matches.append(p.source_id)
        return sorted(matches)

    def _booked(self, request: dict[str, Any]) -> dict[str, Any]:
        start = parse_utc("StartDateTime", request.get("StartDateTime"))
        end = parse_utc("EndDateTime", request["EndDateTime"]) if request.get("EndDateTime") else None
        visit = request.get("Visit") or {}
        if not isinstance(visit, dict):
            raise RequestError("Visit must be an object")
        criteria = _Criteria(
            patient_ids=self._patients_filter(visit.get("Patients"), "Visit.Patients"),
            when=self._window(start, end),
        )
        numbers = {visit["VisitNumber"]} if isinstance(visit.get("VisitNumber"), str) else None
        versions = [
            v
            for v in self._query("appointments", criteria)
            if numbers is None or v.record.source_id in numbers
        ]
        versions.sort(key=lambda v: (v.record.start_at, v.record.source_id))  # type: ignore[union-attr]
        visits = []
        for version in versions:
            item = dict(self._cached("booking", version, self._render_booking))
            item["Patient"] = self._patient(version.record.patient_source_id, notes=True)  # type: ignore[union-attr]
            visits.append(item)
        return {"Visits": self._with_faults(visits, "Booking")}

    def _results(self, request: dict[str, Any]) -> dict[str, Any]:
        completion = request.get("Completion") or {}
        updated = request.get("LastUpdated") or {}
        if not isinstance(completion, dict) or not isinstance(updated, dict):
            raise RequestError("Completion and LastUpdated must be objects")
        criteria = _Criteria(patient_ids=self._patients_filter(request.get("Patients"), "Patients"))
        for field, window, target in (
            ("Completion", completion, "when"),
            ("LastUpdated", updated, "updated"),
        ):
            start = (
                parse_utc(f"{field}.StartDateTime", window["StartDateTime"])
                if window.get("StartDateTime")
                else None
            )
            end = (
                parse_utc(f"{field}.EndDateTime", window["EndDateTime"])
                if window.get("EndDateTime")
                else None
            )
            setattr(criteria, target, self._window(start, end))
        order_ids = self._strings(request.get("OrderIDs"), "OrderIDs")
        statuses = self._strings(request.get("ResultStatuses"), "ResultStatuses")
        if (
            criteria.patient_ids is None
            and criteria.when is None
            and criteria.updated is None
            and order_ids is None
        ):
            raise RequestError(
                "Results Query needs Completion, LastUpdated, Patients or OrderIDs",
                status=200,
                module="Query",
                kind="query",
            )
        wanted_status = {s.casefold() for s in statuses} if statuses else None
        orders: dict[tuple[str, str], list[Version]] = {}
        for version in self._query("results", criteria):
            r = version.record
            assert isinstance(r, Result)
            if order_ids is not None and r.order_id not in order_ids:
                continue
            if (
                wanted_status is not None
                and RESULT_STATUS.get(r.status, "Unknown").casefold() not in wanted_status
            ):
                continue
            orders.setdefault((r.patient_source_id, r.order_id), []).append(version)
        out = [self._order(pid, oid, versions) for (pid, oid), versions in orders.items()]
        out.sort(key=lambda o: (o["CompletionDateTime"], o["ID"]))
        return {"Orders": self._with_faults(out, "Order")}

    def _order(self, patient_source_id: str, order_id: str, versions: list[Version]) -> dict[str, Any]:
        records = [v.record for v in versions]
        effective = [r.effective_at for r in records]  # type: ignore[union-attr]
        updated = max(v.last_updated for v in versions)
        statuses = {r.status for r in records}  # type: ignore[union-attr]
        return {
            "ID": order_id,
            # Redox's TransactionDateTime is when the order message was made: the latest version here.
            "TransactionDateTime": utc_ms(updated),
            "LastUpdated": utc_ms(updated),
            "CollectionDateTime": utc_ms(min(effective)),
            "CompletionDateTime": utc_ms(max(effective)),
            "Status": "Resulted",
            "ResultsStatus": _order_status(statuses),
            "Priority": "Routine",
            "Notes": [],
            "ResultCopyProviders": [],
            "Patient": {"Identifiers": self._patient_identifiers(patient_source_id)},
            "Results": [self._cached("result", v, self._render_result) for v in versions],
        }

    def _visits(self, request: dict[str, Any]) -> dict[str, Any]:
        start = (
            parse_utc("VisitStartDateTime", request["VisitStartDateTime"])
            if request.get("VisitStartDateTime")
            else None
        )
        # VisitEndDateTime is a sandbox extension [I]: Redox's VisitQuery has only a start.
        end = (
            parse_utc("VisitEndDateTime", request["VisitEndDateTime"])
            if request.get("VisitEndDateTime")
            else None
        )
        criteria = _Criteria(
            patient_ids=self._patients_filter(request.get("Patients"), "Patients"),
            when=self._window(start, end),
        )
        numbers = self._strings(request.get("VisitNumbers"), "VisitNumbers")
        statuses = self._strings(request.get("VisitStatuses"), "VisitStatuses")
        classes = self._strings(request.get("PatientClasses"), "PatientClasses")
        departments = self._strings(request.get("Departments"), "Departments")
        if criteria.patient_ids is None and criteria.when is None and numbers is None:
            raise RequestError(
                "VisitQuery needs VisitStartDateTime, Patients or VisitNumbers",
                status=200,
                module="Query",
                kind="query",
            )
        versions = self._query("encounters", criteria)
        versions.sort(key=lambda v: (v.record.patient_source_id, v.record.start_at, v.record.source_id))  # type: ignore[union-attr]
        flat: list[dict[str, Any]] = []
        for version in versions:
            visit = self._cached("visit", version, self._render_visit)
            if numbers is not None and visit["VisitNumber"] not in numbers:
                continue
            if statuses is not None and visit["Status"] not in statuses:
                continue
            if classes is not None and visit["PatientClass"] not in classes:
                continue
            if departments is not None and visit["Location"]["Department"] not in departments:
                continue
            flat.append({**visit, "_patient": version.record.patient_source_id})  # type: ignore[union-attr]
        by_patient: dict[str, list[dict[str, Any]]] = {}
        # Faults are drawn once per response, over all visits, like the other queries.
        for visit in self._with_faults(flat, "Visit"):
            by_patient.setdefault(visit.pop("_patient"), []).append(visit)
        patients = []
        for patient_source_id, visits in by_patient.items():
            entry = self._patient(patient_source_id, notes=False)
            entry["Visits"] = visits
            patients.append(entry)
        return {"Patients": patients}


def _order_status(statuses: Iterable[str]) -> str:
    found = set(statuses)
    for status in ("corrected", "preliminary"):
        if status in found:
            return RESULT_STATUS[status]
    if found and found <= {"cancelled", "entered-in-error"}:
        return RESULT_STATUS["cancelled"]
    return RESULT_STATUS["final"]
