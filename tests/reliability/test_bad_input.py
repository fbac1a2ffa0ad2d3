"""Bad input: every malformed response is a clear error or a quarantine row, never a crash, never a drop.

Three layers, each against the real code path:

- normalizers (transforms/fhir.py, transforms/datamodel.py): a corpus of bad pages and records, each
  run in a batch beside good pages. Each bad record must come out as exactly the quarantine rows
  expected, with a reason naming the field, the raw text kept for replay, the good records intact,
  and the count invariant ``records located = good + duplicates + quarantined`` holding. The whole
  corpus is also normalized as ONE batch: one bad page must never take the others down;
- the client (resources/redox) against real HTTP servers on loopback: the sandbox with every page
  malformed, and a scripted ``http.server`` for shapes the sandbox never sends (a 200 that is not
  JSON, an OperationOutcome instead of a Bundle, a Bundle whose ``total`` disagrees with its pages,
  Data Model ``Meta.Errors``, a proxy's HTML error page, an oversized page). Errors are typed and
  carry the server's words, redacted of what the client sent;
- the load (assets.warehouse.load_day) on a real DuckLake: landed bad pages end up in ``quarantine``
  with their reasons, the tally reconciles, and nothing raises.
"""

import asyncio
import contextlib
import copy
import datetime as dt
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import polars as pl
import pytest
import stamina
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from assets.warehouse import Tally, load_day
from resources.landing import LandingZone, RawPage
from resources.redox import (
    PageTotalMismatch,
    RedoxClient,
    RedoxDataModelError,
    RedoxRequestError,
    RedoxServerError,
)
from resources.redox.fhir import date_window
from resources.redox.settings import RateSpec, RedoxSettings, SigningKey
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread
from transforms import common, datamodel, fhir, valuesets
from transforms.streams import STREAMS

# --- building pages ------------------------------------------------------------------------------

STAMP = "2026-11-01T10:00:00Z"


def pages(*bodies: str) -> pl.LazyFrame:
    return pl.LazyFrame(
        {"raw_ref": [f"test/day=2026-11-01/page-{i:05d}" for i in range(len(bodies))], "body": list(bodies)},
        schema={"raw_ref": pl.String(), "body": pl.String()},
    )


def bundle(*resources: Any) -> str:
    return json.dumps(
        {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
    )


FHIR_GOOD: dict[str, dict[str, Any]] = {
    "patients": {
        "resourceType": "Patient",
        "meta": {"lastUpdated": STAMP},
        "identifier": [{"system": "urn:test:MR", "value": "m-1"}],
        "name": [{"use": "official", "family": "Doe", "given": ["Ann"]}],
        "gender": "female",
        "birthDate": "1990-05-06",
    },
    "encounters": {
        "resourceType": "Encounter",
        "meta": {"lastUpdated": STAMP},
        "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": "Patient/p-1"},
        "period": {"start": "2026-11-01T09:30:00Z", "end": "2026-11-01T10:15:00Z"},
    },
    "results": {
        "resourceType": "Observation",
        "meta": {"lastUpdated": STAMP},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": "Patient/p-1"},
        "effectiveDateTime": "2026-11-01T08:00:00Z",
        "valueQuantity": {"value": 5.1, "unit": "mg/dL"},
    },
    "appointments": {
        "resourceType": "Appointment",
        "meta": {"lastUpdated": STAMP},
        "status": "booked",
        "start": "2026-11-03T08:00:00Z",
        "end": "2026-11-03T08:20:00Z",
        "participant": [{"actor": {"reference": "Patient/p-1"}}],
    },
}


def fhir_record(entity: str, rid: str, **changes: Any) -> dict[str, Any]:
    """A valid resource with ``id=rid``; ``changes`` set fields (None deletes, dotted keys nest)."""
    out = copy.deepcopy(FHIR_GOOD[entity]) | {"id": rid}
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


DM_PATIENT = {
    "Identifiers": [{"ID": "m-1", "IDType": "MR"}],
    "Demographics": {"FirstName": "Ann", "LastName": "Doe", "DOB": "1990-05-06", "Sex": "Female"},
}
DM_VISIT = {
    "VisitNumber": "v-fine",
    "VisitDateTime": "2026-11-01T09:00:00.000Z",
    "PatientClass": "Outpatient",
    "Status": "Arrived",
}
DM_ORDER = {
    "ID": "o-fine",
    "Patient": {"Identifiers": [{"ID": "m-1", "IDType": "MR"}]},
    "TransactionDateTime": "2026-11-01T07:00:00.000Z",
    "CompletionDateTime": "2026-11-01T08:00:00.000Z",
    "Results": [
        {"Code": "2345-7", "Value": "5.1", "ValueType": "Numeric", "Units": "mg/dL", "Status": "Final"}
    ],
}


def dm_meta(data_model: str, event: str, **extra: Any) -> dict[str, Any]:
    return {"DataModel": data_model, "EventType": event, "EventDateTime": "2026-11-01T10:00:00.000Z", **extra}


def dm_visits(*visits: Any, patient: Any = None) -> str:
    holder = copy.deepcopy(DM_PATIENT if patient is None else patient)
    holder["Visits"] = list(visits)
    return json.dumps({"Meta": dm_meta("PatientAdmin", "VisitQueryResponse"), "Patients": [holder]})


def dm_orders(*orders: Any) -> str:
    return json.dumps({"Meta": dm_meta("Results", "QueryResponse"), "Orders": list(orders)})


def dm_patient(patient: Any) -> str:
    return json.dumps({"Meta": dm_meta("PatientSearch", "Response"), "Patient": patient})


def changed(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node[parent]
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


# --- the normalizer harness ----------------------------------------------------------------------


def normalize(surface: str, entity: str, batch: pl.LazyFrame) -> pl.DataFrame:
    """Normalize, and check the count invariant against the independent record count."""
    out = STREAMS[(surface, entity)].normalize(batch).collect()  # type: ignore[index]
    assert out.schema == common.normalized_schema(entity)
    if surface == "fhir":
        counted = fhir.count_entries(batch, entity).collect()["records"][0]
    else:
        counted = datamodel.count_records(batch, entity).collect()["records"][0]
    tally = common.tally(out)
    assert counted == tally["good"] + tally["duplicates"] + tally["quarantined"], (counted, tally)
    return out


def quarantined(out: pl.DataFrame) -> pl.DataFrame:
    return out.filter(pl.col("quarantine_reason").is_not_null())


def good_ids(out: pl.DataFrame) -> set[str]:
    """The good rows' ids at the source (a Data Model clinical key without its patient scope)."""
    local = (
        pl.when(pl.col("source_surface") == "datamodel")
        .then(pl.col("source_id").str.replace(r"^[^/]*/", ""))
        .otherwise(pl.col("source_id"))
    )
    return set(out.filter(pl.col("quarantine_reason").is_null()).select(local.alias("id"))["id"].to_list())


def assert_quarantined(out: pl.DataFrame, reason: str, rows: int = 1) -> None:
    bad = quarantined(out)
    assert bad.height == rows, bad.select("source_id", "quarantine_reason").to_dicts()
    for row in bad.iter_rows(named=True):
        assert reason in row["quarantine_reason"], row["quarantine_reason"]
        # Replayable: where it came from, and the record's (or the page's) own text, unless the
        # record was a JSON null, whose text there is nothing to keep of.
        assert row["raw_ref"] is not None
        assert row["raw"] is not None or reason == "entry: not an object"


# Each FHIR case: (entity, the bad page's body, the reason expected on its one quarantine row).
# A record-level case puts the bad record in a page beside a good one; a page-level case is a page
# of its own. Either way another good page precedes it in the batch.
FHIR_CASES: dict[str, tuple[str, str, str]] = {
    # invalid JSON and pages that are not a searchset Bundle
    "truncated-json": (
        "encounters",
        '{"resourceType":"Bundle","entry":[{"resource":{"id":',
        "page: invalid JSON",
    ),
    "empty-body": ("encounters", "", "page: empty body"),
    "blank-body": ("results", "  \n ", "page: empty body"),
    "json-array": ("results", "[]", "page: not a JSON object"),
    "json-string": ("results", '"Bundle"', "page: not a JSON object"),
    "two-json-values": ("encounters", bundle() + bundle(), "page: invalid JSON"),
    "operation-outcome": (
        "appointments",
        json.dumps(
            {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "diagnostics": "x"}]}
        ),
        "page: OperationOutcome instead of a Bundle",
    ),
    "entry-is-object": (
        "patients",
        json.dumps({"resourceType": "Bundle", "entry": {"resource": FHIR_GOOD["patients"]}}),
        "page: Bundle.entry is not a list",
    ),
    # NaN is not JSON: the page is read record by record and the one field holding it is named.
    "nan-literal": (
        "results",
        bundle(fhir_record("results", "r-nan")).replace("5.1", "NaN"),
        "valueQuantity.value: wrong JSON type",
    ),
    # entries that are not resources
    "entry-null": (
        "encounters",
        json.dumps({"resourceType": "Bundle", "entry": [None]}),
        "entry: not an object",
    ),
    "resource-missing": (
        "encounters",
        json.dumps({"resourceType": "Bundle", "entry": [{"fullUrl": "urn:x"}]}),
        "resource: missing",
    ),
    "resource-type-missing": (
        "patients",
        bundle(fhir_record("patients", "p-bad", resourceType=None)),
        "resourceType: missing",
    ),
    # wrong JSON types
    "status-number": (
        "encounters",
        bundle(fhir_record("encounters", "e-bad", status=1)),
        "status: wrong JSON type",
    ),
    "subject-string": (
        "encounters",
        bundle(fhir_record("encounters", "e-bad", subject="Patient/p-1")),
        "subject: wrong JSON type",
    ),
    "value-string": (
        "results",
        bundle(fhir_record("results", "r-bad", **{"valueQuantity.value": "5.1 mg/dL"})),
        "valueQuantity.value: wrong JSON type",
    ),
    "name-object": (
        "patients",
        bundle(fhir_record("patients", "p-bad", name={"family": "Doe"})),
        "name: wrong JSON type",
    ),
    "identifier-value-number": (
        "patients",
        bundle(fhir_record("patients", "p-bad", identifier=[{"system": "urn:test:MR", "value": 12345}])),
        "identifier[].value: wrong JSON type",
    ),
    "minutes-string": (
        "appointments",
        bundle(fhir_record("appointments", "a-bad", minutesDuration="twenty")),
        "minutesDuration: wrong JSON type",
    ),
    "id-number": ("appointments", bundle(fhir_record("appointments", 42)), "id: wrong JSON type"),
    # missing required fields
    "id-missing": ("encounters", bundle(fhir_record("encounters", "x", id=None)), "id: missing"),
    "subject-missing": (
        "results",
        bundle(fhir_record("results", "r-bad", subject=None)),
        "subject: missing Patient reference",
    ),
    "status-missing": (
        "encounters",
        bundle(fhir_record("encounters", "e-bad", status=None)),
        "status: missing",
    ),
    "code-missing": ("results", bundle(fhir_record("results", "r-bad", code=None)), "code: missing coding"),
    "patient-actor-missing": (
        "appointments",
        bundle(fhir_record("appointments", "a-bad", participant=[])),
        "subject: missing Patient reference",
    ),
    # impossible dates
    "feb-30-datetime": (
        "encounters",
        bundle(fhir_record("encounters", "e-bad", **{"period.start": "2023-02-30T10:00:00Z"})),
        "period.start: unparseable datetime",
    ),
    "feb-29-non-leap": (
        "results",
        bundle(fhir_record("results", "r-bad", effectiveDateTime="2023-02-29T10:00:00Z")),
        "effective[x]: unparseable datetime",
    ),
    "hour-25": (
        "appointments",
        bundle(fhir_record("appointments", "a-bad", start="2026-11-03T25:61:00Z")),
        "start: unparseable datetime",
    ),
    "month-13": (
        "encounters",
        bundle(fhir_record("encounters", "e-bad", **{"meta.lastUpdated": "2026-13-01T00:00:00Z"})),
        "meta.lastUpdated: unparseable datetime",
    ),
    "birth-feb-30": (
        "patients",
        bundle(fhir_record("patients", "p-bad", birthDate="2023-02-30")),
        "birthDate: unparseable date",
    ),
    "end-before-start": (
        "encounters",
        bundle(fhir_record("encounters", "e-bad", **{"period.end": "2026-11-01T08:00:00Z"})),
        "period: end before start",
    ),
}

# Year 0 does not exist in FHIR's date grammar (years are 0001-9999) nor in the proleptic calendar
# the Data Model's ISO 8601 dates use; a record dated in it is broken, not ancient.
FHIR_YEAR_ZERO: dict[str, tuple[str, str, str]] = {
    "birth-year-0": (
        "patients",
        bundle(fhir_record("patients", "p-bad", birthDate="0000-01-01")),
        "birthDate: unparseable date",
    ),
    "period-year-0": (
        "encounters",
        bundle(fhir_record("encounters", "e-bad", **{"period.start": "0000-06-01T10:00:00Z"})),
        "period.start: unparseable datetime",
    ),
}


def _fhir_case(entity: str, body: str, reason: str) -> None:
    expected = {"fine-1"}
    if not reason.startswith(("page:", "(record)")):
        # A good neighbour in the bad record's own page: one broken record must not take its
        # page-mates down with it.
        page = json.loads(body)
        page["entry"].insert(0, {"resource": fhir_record(entity, "fine-2")})
        body = json.dumps(page)
        expected.add("fine-2")
    out = normalize("fhir", entity, pages(bundle(fhir_record(entity, "fine-1")), body))
    assert_quarantined(out, reason)
    assert expected <= good_ids(out), good_ids(out)


@pytest.mark.parametrize(("entity", "body", "reason"), list(FHIR_CASES.values()), ids=list(FHIR_CASES))
def test_fhir_bad_input_is_one_quarantine_row(entity: str, body: str, reason: str) -> None:
    _fhir_case(entity, body, reason)


def test_fhir_nan_spares_its_page_mates() -> None:
    body = bundle(fhir_record("results", "fine-2"), fhir_record("results", "r-nan"))
    nan = body[::-1].replace("5.1"[::-1], "NaN"[::-1], 1)[::-1]  # only the last record's value
    out = normalize("fhir", "results", pages(nan))
    assert good_ids(out) == {"fine-2"}
    assert_quarantined(out, "valueQuantity.value")


@pytest.mark.parametrize(
    ("entity", "body", "reason"), list(FHIR_YEAR_ZERO.values()), ids=list(FHIR_YEAR_ZERO)
)
def test_fhir_year_zero_is_quarantined(entity: str, body: str, reason: str) -> None:
    _fhir_case(entity, body, reason)


def _visit(**changes: Any) -> dict[str, Any]:
    return changed(DM_VISIT, **({"VisitNumber": "v-bad"} | changes))


def _order(**changes: Any) -> dict[str, Any]:
    return changed(DM_ORDER, **({"ID": "o-bad"} | changes))


# Each Data Model case: (entity, bad body, reason, quarantine rows). Record-level bodies carry a good
# record beside the bad one (the helpers above add it); every batch also holds a good page first.
DM_CASES: dict[str, tuple[str, str, str, int]] = {
    "truncated-json": ("encounters", '{"Meta":{"DataModel":"PatientAdmin"', "page: invalid JSON", 1),
    "empty-body": ("results", "", "page: empty body", 1),
    "json-array": ("encounters", "[]", "page: not a JSON object", 1),
    "no-meta": ("encounters", json.dumps({"Patients": []}), "page: not a Data Model response (no Meta)", 1),
    "meta-wrong-type": (
        "encounters",
        json.dumps({"Meta": dm_meta("PatientAdmin", "VisitQueryResponse", EventDateTime={"at": 1})}),
        "page: Meta has a field of the wrong JSON type",
        1,
    ),
    # Redox said the query failed: the page is quarantined whole, records and all.
    "meta-errors": (
        "encounters",
        json.dumps(
            {
                "Meta": dm_meta(
                    "PatientAdmin",
                    "VisitQueryResponse",
                    Errors=[
                        {"ID": 1, "Text": "Destination unreachable", "Type": "message", "Module": "Send"}
                    ],
                ),
                "Patients": [DM_PATIENT | {"Visits": [DM_VISIT]}],
            }
        ),
        "page: Meta.Errors present",
        1,
    ),
    "meta-errors-results": (
        "results",
        json.dumps({"Meta": dm_meta("Results", "QueryResponse", Errors=[{"Text": "No subscription"}])}),
        "page: Meta.Errors present",
        1,
    ),
    # wrong JSON types
    "visits-object": (
        "encounters",
        json.dumps(
            {
                "Meta": dm_meta("PatientAdmin", "VisitQueryResponse"),
                "Patients": [DM_PATIENT | {"Visits": _visit()}],
            }
        ),
        "wrong JSON type",
        1,
    ),
    "visit-string": ("encounters", dm_visits(DM_VISIT, "v-2"), "Patients[].Visits[]: wrong JSON type", 1),
    "visit-number-date": (
        "encounters",
        dm_visits(DM_VISIT, _visit(VisitDateTime=20230230)),
        "Visit.VisitDateTime: unparseable datetime",
        1,
    ),
    "results-object": (
        "results",
        dm_orders(DM_ORDER, _order(Results={"Code": "x"})),
        "Orders[].Results: wrong JSON type",
        1,
    ),
    "identifiers-object": (
        "patients",
        dm_patient(changed(DM_PATIENT, Identifiers={"ID": "m-2", "IDType": "MR"})),
        "wrong JSON type",
        1,
    ),
    # missing required fields
    "visit-number-missing": (
        "encounters",
        dm_visits(DM_VISIT, _visit(VisitNumber=None)),
        "Visit.VisitNumber: missing",
        1,
    ),
    "patient-without-ids": (
        "encounters",
        dm_visits(_visit(), patient={"Identifiers": [], "Demographics": {"FirstName": "Ann"}}),
        "Patient.Identifiers: no usable ID",
        1,
    ),
    # An order without its ID loses the key of every result in it: each result is quarantined.
    "order-id-missing": (
        "results",
        dm_orders(DM_ORDER, _order(ID=None, Results=[*DM_ORDER["Results"], {"Code": "718-7", "Value": "1"}])),
        "Order.ID: missing",
        2,
    ),
    "result-code-missing": (
        "results",
        dm_orders(DM_ORDER, _order(Results=[{"Value": "5.1", "ValueType": "Numeric"}])),
        "Results[].Code: missing",
        1,
    ),
    "value-not-numeric": (
        "results",
        dm_orders(DM_ORDER, _order(Results=[{"Code": "2345-7", "Value": "high", "ValueType": "Numeric"}])),
        "Value: not a number although ValueType is numeric",
        1,
    ),
    # impossible dates
    "visit-feb-30": (
        "encounters",
        dm_visits(DM_VISIT, _visit(VisitDateTime="2023-02-30T10:00:00.000Z")),
        "Visit.VisitDateTime: unparseable datetime",
        1,
    ),
    "order-hour-25": (
        "results",
        dm_orders(DM_ORDER, _order(CompletionDateTime="2021-02-28T25:61:00.000Z")),
        "Order.CompletionDateTime: unparseable datetime",
        1,
    ),
    "dob-feb-30": (
        "patients",
        dm_patient(
            changed(
                DM_PATIENT,
                **{"Identifiers": [{"ID": "m-2", "IDType": "MR"}], "Demographics.DOB": "2023-02-30"},
            )
        ),
        "Demographics.DOB: unparseable date",
        1,
    ),
}

DM_YEAR_ZERO: dict[str, tuple[str, str, str, int]] = {
    "dob-year-0": (
        "patients",
        dm_patient(
            changed(
                DM_PATIENT,
                **{"Identifiers": [{"ID": "m-2", "IDType": "MR"}], "Demographics.DOB": "0000-01-01"},
            )
        ),
        "Demographics.DOB: unparseable date",
        1,
    ),
    "visit-year-0": (
        "encounters",
        dm_visits(DM_VISIT, _visit(VisitDateTime="0000-06-01T10:00:00.000Z")),
        "Visit.VisitDateTime: unparseable datetime",
        1,
    ),
}

DM_GOOD_PAGE = {
    "encounters": dm_visits(changed(DM_VISIT, VisitNumber="fine-1")),
    "results": dm_orders(changed(DM_ORDER, ID="fine-1")),
    "patients": dm_patient(changed(DM_PATIENT, Identifiers=[{"ID": "fine-1", "IDType": "MR"}])),
}
DM_FINE = {
    "encounters": {"fine-1", "v-fine"},
    "results": {"fine-1|2345-7", "o-fine|2345-7"},
    "patients": {"fine-1"},
}


def _dm_case(entity: str, body: str, reason: str, rows: int) -> None:
    out = normalize("datamodel", entity, pages(DM_GOOD_PAGE[entity], body))
    assert_quarantined(out, reason, rows)
    expected = {"fine-1", "fine-1|2345-7"} & DM_FINE[entity]
    if not reason.startswith("page:") and ('"v-fine"' in body or '"o-fine"' in body):
        expected |= DM_FINE[entity]
    assert expected <= good_ids(out), good_ids(out)


@pytest.mark.parametrize(("entity", "body", "reason", "rows"), list(DM_CASES.values()), ids=list(DM_CASES))
def test_datamodel_bad_input_is_quarantined(entity: str, body: str, reason: str, rows: int) -> None:
    _dm_case(entity, body, reason, rows)


@pytest.mark.parametrize(
    ("entity", "body", "reason", "rows"), list(DM_YEAR_ZERO.values()), ids=list(DM_YEAR_ZERO)
)
def test_datamodel_year_zero_is_quarantined(entity: str, body: str, reason: str, rows: int) -> None:
    _dm_case(entity, body, reason, rows)


def test_the_whole_corpus_in_one_batch_neither_crashes_nor_drops() -> None:
    """Every bad page of a table at once, interleaved with good ones: what a bad day looks like."""
    for entity in ("patients", "encounters", "results", "appointments"):
        cases = [c for c in FHIR_CASES.values() if c[0] == entity]
        bodies = []
        for i, (_, body, _) in enumerate(cases):
            bodies += [bundle(fhir_record(entity, f"fine-{i}")), body]
        out = normalize("fhir", entity, pages(*bodies))
        assert quarantined(out).height == len(cases)
        reasons = sorted(quarantined(out)["quarantine_reason"])
        assert reasons == sorted(r for _, _, r in cases)
        assert {f"fine-{i}" for i in range(len(cases))} <= good_ids(out)
    for entity in ("patients", "encounters", "results"):
        cases = [c for c in DM_CASES.values() if c[0] == entity]
        bodies = []
        for _, body, _, _ in cases:
            bodies += [DM_GOOD_PAGE[entity], body]
        out = normalize("datamodel", entity, pages(*bodies))
        assert quarantined(out).height == sum(rows for *_, rows in cases)


def test_unknown_codes_are_kept_as_unknown_and_counted_not_dropped() -> None:
    """A code no ValueSet knows is a mapping gap, not a broken record: the row loads with the mapped
    column 'unknown', the source code untouched, and the gap counted for the load's metadata."""
    fhir_page = bundle(
        fhir_record("encounters", "e-1", status="teleported", **{"class.code": "SPACE"}),
        fhir_record("encounters", "e-2"),
    )
    out = normalize("fhir", "encounters", pages(fhir_page))
    assert quarantined(out).is_empty()
    row = out.filter(pl.col("source_id") == "e-1").row(0, named=True)
    assert (row["status"], row["status_source"]) == ("unknown", "teleported")
    assert (row["class"], row["class_source"]) == ("unknown", "SPACE")
    assert valuesets.unmapped_counts(out, "encounters", "fhir") == {"class": 1, "status": 1, "type_system": 0}

    dm_page = dm_visits(DM_VISIT, _visit(PatientClass="Starship", Status="Beamed up"))
    out = normalize("datamodel", "encounters", pages(dm_page))
    assert quarantined(out).is_empty()
    row = out.filter(pl.col("source_id").str.ends_with("/v-bad")).row(0, named=True)
    assert (row["class"], row["class_source"], row["status"]) == ("unknown", "Starship", "unknown")
    assert valuesets.unmapped_counts(out, "encounters", "datamodel") == {
        "class": 1,
        "status": 1,
        "type_system": 0,
    }

    patient = fhir_record("patients", "p-1", gender="robot")
    out = normalize("fhir", "patients", pages(bundle(patient)))
    assert out.row(0, named=True)["sex"] == "unknown" and quarantined(out).is_empty()


# Past common.DECODE_CHUNK_BYTES (8 MiB), so the vectorized decode works in chunks.
OVERSIZED_ENTRIES = 32_000


def _big_fhir_page(prefix: str, bad: dict[int, dict[str, Any]]) -> str:
    resources = [bad.get(i) or fhir_record("encounters", f"{prefix}-{i}") for i in range(OVERSIZED_ENTRIES)]
    return bundle(*resources)


def test_oversized_pages_are_normalized_whole() -> None:
    """Two ~10 MB FHIR pages (one breaks the vectorized decode, so it goes through the per-record
    Python path) and a Data Model reply with thousands of visits: every record accounted for."""
    clean = _big_fhir_page(
        "c", {7_000: fhir_record("encounters", "c-date", **{"period.start": "2023-02-30T00:00:00Z"})}
    )
    typed = _big_fhir_page("t", {12_345: fhir_record("encounters", "t-type", status=False)})
    assert len(clean) > common.DECODE_CHUNK_BYTES and len(typed) > common.DECODE_CHUNK_BYTES
    out = normalize("fhir", "encounters", pages(clean, bundle(fhir_record("encounters", "small")), typed))
    bad = quarantined(out)
    assert sorted(bad["source_id"].to_list()) == ["c-date", "t-type"]
    assert out.height == 2 * OVERSIZED_ENTRIES + 1

    visits = [changed(DM_VISIT, VisitNumber=f"v-{i}") for i in range(20_000)]
    visits[4_321] = changed(DM_VISIT, VisitNumber="v-bad", VisitDateTime="2023-02-30T00:00:00.000Z")
    body = dm_visits(*visits)
    out = normalize("datamodel", "encounters", pages(body))
    assert quarantined(out)["source_id"].to_list() == ["v-bad"]
    assert out.height == 20_000


def test_duplicates_collapse_with_their_count_never_silently() -> None:
    record = fhir_record("results", "r-1")
    out = normalize("fhir", "results", pages(bundle(record, record), bundle(record)))
    assert out.height == 1 and out["duplicates"][0] == 2


# --- the client against real servers -------------------------------------------------------------


@pytest.fixture(scope="module")
def signing_key() -> SigningKey:
    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    return SigningKey.from_pem("kid-1", pem, origin="test")


@pytest.fixture
def fast_retries() -> Iterator[None]:
    # Real retries, without their backoff sleeps.
    stamina.set_testing(True, attempts=3, cap=True)
    yield
    stamina.set_testing(False)


Answer = tuple[int, bytes, str]
Script = Callable[[str, str, bytes], Answer]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_ScriptedServer"

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path)
        if parts.path == "/v2/auth/token":
            status, payload, ctype = (
                200,
                b'{"access_token":"t","token_type":"Bearer","expires_in":300}',
                "application/json",
            )
        else:
            self.server.hits.append(parts.path)
            status, payload, ctype = self.server.script(parts.path, parts.query, body)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the default prints every request line to stderr


class _ScriptedServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Script) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.hits: list[str] = []


@contextlib.contextmanager
def scripted(script: Script) -> Iterator[_ScriptedServer]:
    """A real HTTP server on an ephemeral loopback port that answers with ``script``."""
    server = _ScriptedServer(script)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _settings(server: _ScriptedServer, key: SigningKey, tmp_path: Path) -> RedoxSettings:
    host, port = server.server_address[:2]
    return RedoxSettings(
        base_url=f"http://{host}:{port}",
        client_id="cid",
        keys=(key,),
        fhir_org="acme",
        budget_path=tmp_path / "budget.sqlite",
        rate_limit=RateSpec(limit=100_000, seconds=10),
        retry_attempts=3,
        read_timeout=30.0,
    )


def _json(status: int, value: Any, ctype: str = "application/json") -> Answer:
    return status, json.dumps(value).encode(), ctype


def _fhir_search(server: _ScriptedServer, key: SigningKey, tmp_path: Path, **params: Any) -> list[Any]:
    async def run() -> list[Any]:
        async with RedoxClient(_settings(server, key, tmp_path)) as client:
            return [page async for page in client.fhir.search("Encounter", params=params or None)]

    return asyncio.run(run())


def _dm_query(server: _ScriptedServer, key: SigningKey, tmp_path: Path, mrn: str = "MRN-77123") -> Any:
    async def run() -> Any:
        async with RedoxClient(_settings(server, key, tmp_path)) as client:
            start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
            return await client.datamodel.results_query(
                start=start, end=start + dt.timedelta(days=1), patients=[{"ID": mrn, "IDType": "MR"}]
            )

    return asyncio.run(run())


def test_client_200_that_is_not_json_is_a_retried_server_error(signing_key, tmp_path, fast_retries) -> None:
    with (
        scripted(
            lambda *_: (200, b'{"resourceType":"Bundle","entry":[{"resou', "application/fhir+json")
        ) as server,
        pytest.raises(RedoxServerError) as info,
    ):
        _fhir_search(server, signing_key, tmp_path)
    assert len(server.hits) == 3  # a garbled body is transient: retried, then reported
    message = str(info.value)
    assert "HTTP 200" in message and "not valid JSON" in message
    assert "POST /fhir/R4/{org}/{env}/Encounter/_search" in message


def test_client_operation_outcome_instead_of_a_bundle_carries_its_diagnostics(signing_key, tmp_path) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "exception", "diagnostics": "Search index is rebuilding"}],
    }
    answer = _json(200, outcome, "application/fhir+json")
    with scripted(lambda *_: answer) as server, pytest.raises(RedoxRequestError) as info:
        _fhir_search(server, signing_key, tmp_path)
    message = str(info.value)
    assert "not a FHIR Bundle" in message and "Search index is rebuilding" in message

    # Records where a Bundle belongs are not quoted back: they are patient data.
    records = _json(200, [fhir_record("patients", "p-1", name=[{"family": "Quillfeather"}])])
    with scripted(lambda *_: records) as server, pytest.raises(RedoxRequestError) as info:
        _fhir_search(server, signing_key, tmp_path)
    assert "not a FHIR Bundle" in str(info.value) and "Quillfeather" not in str(info.value)


def test_client_4xx_operation_outcome_is_not_retried_and_hides_what_was_sent(signing_key, tmp_path) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": "Unknown patient pat-93817 in search"}
        ],
    }
    with scripted(lambda *_: _json(400, outcome)) as server, pytest.raises(RedoxRequestError) as info:
        _fhir_search(server, signing_key, tmp_path, patient="pat-93817")
    assert len(server.hits) == 1
    message = str(info.value) + repr(info.value)
    assert "HTTP 400" in message and "Unknown patient [redacted] in search" in message
    assert "pat-93817" not in message


def test_client_proxy_html_error_page_is_a_bounded_server_error(signing_key, tmp_path, fast_retries) -> None:
    page = b"<html><body><h1>502 Bad Gateway</h1>" + b"<p>upstream</p>" * 500 + b"</body></html>"
    with scripted(lambda *_: (502, page, "text/html")) as server, pytest.raises(RedoxServerError) as info:
        _fhir_search(server, signing_key, tmp_path)
    assert len(server.hits) == 3
    message = str(info.value)
    assert "HTTP 502" in message and "502 Bad Gateway" in message and len(message) < 1_000


def test_client_bundle_total_disagreeing_with_its_pages_is_an_error(signing_key, tmp_path) -> None:
    def script(path: str, query: str, _: bytes) -> Answer:
        second = "cursor=2" in query
        ids = ["e3", "e4"] if second else ["e1", "e2"]
        page: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 5,
            "entry": [{"fullUrl": f"Encounter/{i}", "resource": fhir_record("encounters", i)} for i in ids],
        }
        if not second:
            page["link"] = [{"relation": "next", "url": "/fhir/R4/acme/Development/Encounter?cursor=2"}]
        return _json(200, page)

    with scripted(script) as server, pytest.raises(PageTotalMismatch) as info:
        _fhir_search(server, signing_key, tmp_path)
    error = info.value
    assert (error.total, error.received, error.pages) == (5, 4, 2)
    assert "Bundle.total said 5" in str(error) and "rerun the partition" in str(error)


def test_client_meta_errors_are_a_typed_error_with_the_servers_words(signing_key, tmp_path) -> None:
    reply = {
        "Meta": dm_meta(
            "Results",
            "QueryResponse",
            Errors=[{"ID": 9, "Text": "No results subscription for patient MRN-77123", "Type": "message"}],
        )
    }
    with scripted(lambda *_: _json(200, reply)) as server, pytest.raises(RedoxDataModelError) as info:
        _dm_query(server, signing_key, tmp_path)
    assert len(server.hits) == 1
    assert info.value.status == 200
    assert info.value.texts == ["No results subscription for patient [redacted]"]
    assert "MRN-77123" not in str(info.value) + repr(info.value)


def test_client_datamodel_reply_that_is_not_an_object_is_an_error(signing_key, tmp_path) -> None:
    answer = _json(200, [{"Meta": {}}])
    with scripted(lambda *_: answer) as server, pytest.raises(RedoxRequestError, match="not a JSON object"):
        _dm_query(server, signing_key, tmp_path)


def test_client_oversized_page_arrives_whole_and_normalizes(signing_key, tmp_path) -> None:
    body = _big_fhir_page("big", {99: fhir_record("encounters", "big-bad", status=None)})
    payload = json.loads(body) | {"total": OVERSIZED_ENTRIES}
    raw = json.dumps(payload).encode()
    with scripted(lambda *_: (200, raw, "application/fhir+json")) as server:
        got = _fhir_search(server, signing_key, tmp_path)
    assert len(got) == 1 and got[0].raw == raw and got[0].entries == OVERSIZED_ENTRIES
    out = normalize("fhir", "encounters", pages(got[0].raw.decode()))
    assert quarantined(out)["source_id"].to_list() == ["big-bad"]


FOREVER = (dt.datetime(1900, 1, 1, tzinfo=dt.UTC), dt.datetime(2200, 1, 1, tzinfo=dt.UTC))


@pytest.mark.integration
def test_sandbox_with_every_page_malformed(tmp_path: Path) -> None:
    """The sandbox breaks one record in every page it serves (wrong type, missing field or impossible
    date, its choice). Fetched through the client and normalized, each FHIR page yields exactly one
    quarantine row and each Data Model reply at least one; nothing is lost on the way."""
    with serve_in_thread(patients=30, seed=5, rate_limit=None, faults="malformed=1") as running:
        settings = RedoxSettings.from_credentials(
            running.credentials_path,
            budget_path=tmp_path / "budget.sqlite",
            rate_limit=RateSpec(limit=100_000, seconds=60),
        )

        async def fetch() -> dict[tuple[str, str], list[bytes]]:
            got: dict[tuple[str, str], list[bytes]] = {}
            async with RedoxClient(settings) as client:
                for entity, resource in (("encounters", "Encounter"), ("results", "Observation")):
                    got["fhir", entity] = [
                        p.raw
                        async for p in client.fhir.search(
                            resource, params={**date_window(*FOREVER), "_count": "20"}
                        )
                    ]
                dm = client.datamodel
                got["datamodel", "encounters"] = [
                    (await dm.visit_query(start=FOREVER[0], end=FOREVER[1])).raw
                ]
                got["datamodel", "results"] = [(await dm.results_query(start=FOREVER[0], end=FOREVER[1])).raw]
            return got

        fetched = asyncio.run(fetch())
        injected = httpx.get(f"{running.base_url}/sandbox/stats", timeout=10).json()
    broken_pages = 0
    for (surface, entity), raws in fetched.items():
        out = normalize(surface, entity, pages(*(r.decode() for r in raws)))
        bad = quarantined(out)
        assert all(bad["raw"].is_not_null())
        # The sandbox breaks one record of every page that has any; an empty page has none to break.
        holding = sum(
            1
            for r in raws
            if (
                fhir.count_entries(pages(r.decode()), entity)
                if surface == "fhir"
                else datamodel.count_records(pages(r.decode()), entity)
            ).collect()["records"][0]
        )
        per_page = bad.group_by("raw_ref").len()
        assert per_page.height == holding > 0, (surface, entity)  # every broken record was caught
        if surface == "fhir":
            assert per_page["len"].max() == 1, (surface, entity)
        broken_pages += holding
    assert injected["faults"]["malformed"] == broken_pages, injected["faults"]


# --- the load on a real lake ---------------------------------------------------------------------

DAY = dt.date(2026, 11, 1)


def _land(zone: LandingZone, surface: str, stream: str, *bodies: str) -> None:
    now = dt.datetime.now(dt.UTC)
    raw = [RawPage(b.encode(), f"test {surface} {stream}", now) for b in bodies]
    zone.write(surface, stream, f"day={DAY.isoformat()}", raw, run_id="test")


def test_landed_bad_pages_load_into_quarantine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path / "home"))
    zone = LandingZone(tmp_path / "lake")
    _land(
        zone,
        "fhir",
        "encounters",
        bundle(
            fhir_record("encounters", "e-ok"),
            fhir_record("encounters", "e-date", **{"period.start": "2023-02-30T10:00:00Z"}),
            fhir_record("encounters", "e-type", status=7),
            fhir_record("encounters", "e-code", status="teleported"),
        ),
        '{"resourceType":"Bundle","entry":[',
    )
    errors = {"Meta": dm_meta("PatientAdmin", "VisitQueryResponse", Errors=[{"Text": "Timeout at EHR"}])}
    _land(
        zone,
        "datamodel",
        "encounters",
        json.dumps(errors),
        dm_visits(DM_VISIT, _visit(VisitNumber=None)),
    )
    warehouse = Warehouse(lake_dir=str(tmp_path / "lake"))
    warehouse.ensure_tables()
    tallies = {}
    for surface in ("fhir", "datamodel"):
        tally = Tally()
        load_day(warehouse, zone, surface=surface, entity="encounters", day=DAY, run_id="r", tally=tally)  # type: ignore[arg-type]
        assert tally.accounted, tally
        tallies[surface] = tally
    assert (tallies["fhir"].records, tallies["fhir"].loaded, tallies["fhir"].quarantined) == (5, 2, 3)
    assert tallies["fhir"].unknown_codes == 1
    assert (tallies["datamodel"].records, tallies["datamodel"].loaded, tallies["datamodel"].quarantined) == (
        3,
        1,
        2,
    )

    stored = warehouse.query("SELECT source_surface, source_id, status FROM encounters ORDER BY source_id")
    assert stored.rows() == [
        ("fhir", "e-code", "unknown"),
        ("fhir", "e-ok", "finished"),
        ("datamodel", "m-1/v-fine", "arrived"),  # keyed by patient: Data Model ids are per source
    ]
    q = warehouse.query(
        "SELECT source_surface, source_id, reason, raw, raw_ref, partition_day FROM quarantine ORDER BY source_surface, reason"
    )
    assert q["partition_day"].to_list() == [DAY] * 5
    assert q.select("source_surface", "source_id", "reason").rows() == [
        ("datamodel", None, "Visit.VisitNumber: missing"),
        ("datamodel", None, "page: Meta.Errors present (Redox reported a failed request)"),
        ("fhir", None, "page: invalid JSON"),
        ("fhir", "e-date", "period.start: unparseable datetime"),
        ("fhir", "e-type", "status: wrong JSON type"),
    ]
    assert all(q["raw"].is_not_null()) and all(q["raw_ref"].is_not_null())
    loads = warehouse.query(
        "SELECT source_surface, rows, quarantined FROM partition_loads WHERE table_name = 'encounters' ORDER BY 1"
    )
    assert loads.rows() == [("datamodel", 1, 2), ("fhir", 2, 3)]
