"""The Redox Data Model surface: ``POST /endpoint`` answering four synchronous queries.

PatientSearch ``Query``, Scheduling ``Booked``, Results ``Query`` and PatientAdmin ``VisitQuery`` are
answered from the Data Model EHR's records with Redox's response models (``Response``,
``BookedResponse``, ``QueryResponse``, ``VisitQueryResponse``). This module parses requests, finds
the records and builds envelopes and errors; the records themselves are rendered by
sandbox/datamodel_render.py.

Invariants:
- every successful response validates against the ``redox`` package's model for its event (extra
  fields are forbidden there, so nothing outside those models is sent, and ``Meta.Errors`` is
  omitted on success [I]);
- malformed requests get HTTP 400, requests understood but not answerable get HTTP 200; both carry
  ``Meta.Errors[] {ID, Text, Type, Module}`` and never echo patient data in ``Text``;
- rendered pieces are cached per record version and deep-copied before a fault alters them;
- a query's records are counted and judged by the pacer (sandbox/latency.py) before they are
  rendered: an answer Redox would refuse (413) or time out (504) costs no rendering.
"""

import copy
import dataclasses
import itertools
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sandbox.datamodel_render import (
    RESULT_STATUS,
    malform,
    order_status,
    render_booking,
    render_demographics,
    render_patient,
    render_result,
    render_visit,
    utc_ms,
    wire_id,
)
from sandbox.fhir import StoreLike
from sandbox.latency import Kind, Pacer, Verdict
from sandbox.model import Patient, Result, Version
from sandbox.store import Bounds

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


def echoes_query(payload: dict[str, Any]) -> bool:
    """Whether this PatientSearch reply echoes "Query" as its EventType: one patient in three,
    fixed by the patient's identifiers (a digest, not a draw), and never a no-match reply."""
    ids = (payload.get("Patient") or {}).get("Identifiers") or []
    return bool(ids) and sum("".join(str(i.get("ID")) for i in ids).encode()) % 3 == 0


def _encode(response: dict[str, Any]) -> bytes:
    """``json.dumps(response)``'s compact bytes, a list item at a time: one C call over a large
    answer would hold the GIL for its whole length (~150 ms at 20,000 results), these let the
    event loop in between while a worker thread builds the answer."""
    parts = []
    for key, value in response.items():
        name = json.dumps(key).encode()
        if isinstance(value, list):
            items = b",".join(json.dumps(item, separators=(",", ":")).encode() for item in value)
            parts.append(name + b":[" + items + b"]")
        else:
            parts.append(name + b":" + json.dumps(value, separators=(",", ":")).encode())
    return b"{" + b",".join(parts) + b"}"


@dataclasses.dataclass(frozen=True)
class Answer:
    """One ``/endpoint`` answer: send ``body`` with ``status`` after waiting ``wait`` seconds."""

    status: int
    body: bytes
    label: str
    wait: float = 0.0


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


def parse_utc(field: str, value: object) -> datetime:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{field} must be an ISO 8601 datetime string")
    try:
        parsed = datetime.fromisoformat(value.strip().replace("z", "Z"))
    except ValueError:
        raise RequestError(f"{field} is not an ISO 8601 datetime") from None
    # A datetime without an offset is taken as UTC, the only zone Redox uses [I].
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclasses.dataclass
class _Criteria:
    patient_ids: set[str] | None = None
    when: Bounds | None = None
    updated: Bounds | None = None


class DataModelSurface:
    """The ``/endpoint`` handler for one sandbox; called from the event loop only."""

    def __init__(
        self, store: Callable[[], StoreLike], *, faults: Any = None, pacer: Pacer | None = None
    ) -> None:
        self._store = store
        self.faults = faults
        self.pacer = pacer
        self._verdict: Verdict | None = None
        self._rendered: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._error_ids = itertools.count(19_500_000)

    # -- entry point ----------------------------------------------------------------------------

    def handle(self, body: bytes) -> Answer:
        """The answer, labelled ``DataModel.EventType`` for stats, and how long to hold it back."""
        self._verdict = None
        status, raw, label = self._handle(body)
        if self.pacer is None:
            return Answer(status, raw, label)
        kind: Kind = "datamodel.patientsearch" if label.startswith("PatientSearch.") else "datamodel.query"
        # Answers judged by size carry their wait; the rest (malformed requests) wait a plain draw.
        wait = self._verdict.wait if self._verdict is not None else self.pacer.draw(kind)
        return Answer(status, raw, label, wait)

    def _admit(self, kind: Kind, records: int) -> None:
        """Apply Redox's answer limits to an answer of ``records`` records before rendering it."""
        if self.pacer is None:
            return
        self._verdict = verdict = self.pacer.judge(kind, records)
        if verdict.status is not None:
            module = "Destination" if verdict.status == 504 else "Request"
            raise RequestError(verdict.text, status=verdict.status, module=module)

    def _handle(self, body: bytes) -> tuple[int, bytes, str]:
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
            event = SUPPORTED[key]
            if event == "Response" and echoes_query(payload):
                # Captured Redox traffic shows PatientSearch replies that echo the request's
                # EventType ("Query") instead of "Response"; a consumer must read them by content.
                event = "Query"
            response = {"Meta": self._meta(meta, event), **payload}
            return 200, _encode(response), label
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

    def _patient(self, patient_source_id: str, *, notes: bool) -> dict[str, Any]:
        version = self._store().current("patients", "datamodel", patient_source_id)
        if version is None:
            out: dict[str, Any] = {"Identifiers": [{"ID": patient_source_id, "IDType": "MR"}]}
        else:
            rendered = self._cached("patient", version, render_patient)
            out = dict(rendered)
        if notes:
            out["Notes"] = []
        return out

    def _patient_identifiers(self, patient_source_id: str) -> list[dict[str, str]]:
        version = self._store().current("patients", "datamodel", patient_source_id)
        if version is None:
            return [{"ID": patient_source_id, "IDType": "MR"}]
        return list(self._cached("patient", version, render_patient)["Identifiers"])

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

    def _with_faults(
        self, items: list[dict[str, Any]], resource: str, truth_ids: list[list[str]]
    ) -> list[dict[str, Any]]:
        """``truth_ids[i]`` names the records item i carries by their truth id: a reused id is sent
        as another record's, so only the store's own id says which record was broken."""
        if self.faults is None or not items:
            return items
        broken = self.faults.malform(len(items))
        if broken is not None:
            index, mode = broken
            # A broken order breaks every result in it, and results are the records the client keeps.
            kind = "Result" if resource == "Order" else resource
            items[index] = malform(items[index], mode)
            for source_id in truth_ids[index]:
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
        self._admit("datamodel.patientsearch", max(1, len(matches)))
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
            rendered = render_demographics(p)
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
            if numbers is None or wire_id(v.record.source_id) in numbers
        ]
        versions.sort(key=lambda v: (v.record.start_at, v.record.source_id))  # type: ignore[union-attr]
        self._admit("datamodel.query", len(versions))
        visits = []
        for version in versions:
            item = dict(self._cached("booking", version, render_booking))
            item["Patient"] = self._patient(version.record.patient_source_id, notes=True)  # type: ignore[union-attr]
            visits.append(item)
        truth_ids = [[v.record.source_id] for v in versions]
        return {"Visits": self._with_faults(visits, "Booking", truth_ids)}

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
            if order_ids is not None and wire_id(r.order_id) not in order_ids:
                continue
            if (
                wanted_status is not None
                and RESULT_STATUS.get(r.status, "Unknown").casefold() not in wanted_status
            ):
                continue
            orders.setdefault((r.patient_source_id, r.order_id), []).append(version)
        self._admit("datamodel.query", sum(len(versions) for versions in orders.values()))
        out = [
            (self._order(pid, oid, versions), [v.record.source_id for v in versions])
            for (pid, oid), versions in orders.items()
        ]
        out.sort(key=lambda o: (o[0]["CompletionDateTime"], o[0]["ID"]))
        return {"Orders": self._with_faults([o for o, _ in out], "Order", [ids for _, ids in out])}

    def _order(self, patient_source_id: str, order_id: str, versions: list[Version]) -> dict[str, Any]:
        records = [v.record for v in versions]
        effective = [r.effective_at for r in records]  # type: ignore[union-attr]
        updated = max(v.last_updated for v in versions)
        statuses = {r.status for r in records}  # type: ignore[union-attr]
        return {
            "ID": wire_id(order_id),
            # Redox's TransactionDateTime is when the order message was made: the latest version here.
            "TransactionDateTime": utc_ms(updated),
            "LastUpdated": utc_ms(updated),
            "CollectionDateTime": utc_ms(min(effective)),
            "CompletionDateTime": utc_ms(max(effective)),
            "Status": "Resulted",
            "ResultsStatus": order_status(statuses),
            "Priority": "Routine",
            "Notes": [],
            "ResultCopyProviders": [],
            "Patient": {"Identifiers": self._patient_identifiers(patient_source_id)},
            "Results": [self._cached("result", v, render_result) for v in versions],
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
        truth_ids: list[list[str]] = []
        for version in versions:
            visit = self._cached("visit", version, render_visit)
            if numbers is not None and visit["VisitNumber"] not in numbers:
                continue
            if statuses is not None and visit["Status"] not in statuses:
                continue
            if classes is not None and visit["PatientClass"] not in classes:
                continue
            if departments is not None and visit["Location"]["Department"] not in departments:
                continue
            flat.append({**visit, "_patient": version.record.patient_source_id})  # type: ignore[union-attr]
            truth_ids.append([version.record.source_id])
        self._admit("datamodel.query", len(flat))
        by_patient: dict[str, list[dict[str, Any]]] = {}
        # Faults are drawn once per response, over all visits, like the other queries.
        for visit in self._with_faults(flat, "Visit", truth_ids):
            by_patient.setdefault(visit.pop("_patient"), []).append(visit)
        patients = []
        for patient_source_id, visits in by_patient.items():
            entry = self._patient(patient_source_id, notes=False)
            entry["Visits"] = visits
            patients.append(entry)
        return {"Patients": patients}
