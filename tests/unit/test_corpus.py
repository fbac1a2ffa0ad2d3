"""The public corpus (../shared/fixtures) through the normalizers: every value[x], component value,
code, reference and timestamp of every Patient, Encounter, Observation and Appointment, and of every
clinical Data Model message, lands in the column ``tests/corpus.py`` says, record by record.

Zero silent losses: an Observation that sent a value (or a reason for none) has a ``value_type``;
every component has its own row. The corpus must sit beside the repo (../shared); the test fails,
never skips, when it does not.
"""

import json
from typing import Any

import polars as pl
import pytest

from tests import corpus
from transforms import captured, datamodel, fhir, fhir_refs

TABLES = ("patients", "encounters", "results", "appointments")


def _fhir_page(resources: list[dict[str, Any]]) -> pl.LazyFrame:
    body = json.dumps(
        {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
    )
    return pl.LazyFrame({"raw_ref": ["corpus"], "body": [body]})


def _assert_row(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    for column, value in want.items():
        if column == "local_id":
            continue
        have = got[column]
        if isinstance(value, float) and have is not None:
            assert have == pytest.approx(value), f"{where}: {column}"
        else:
            assert have == value, f"{where}: {column} is {have!r}, expected {value!r}"


@pytest.mark.parametrize("table", TABLES)
def test_us_core_records_land_in_their_columns(table: str) -> None:
    resources = corpus.fhir_records(table)
    normalize = {"patients": fhir.patients, "encounters": fhir.encounters, "results": fhir.results}.get(table)
    if table == "appointments":
        # US Core has no Appointment example; the table is covered by the sandbox end to end.
        assert resources == []
        return
    assert normalize is not None and resources, f"no {table} in the corpus"
    out = normalize(_fhir_page(resources)).collect()
    assert out.filter(pl.col("quarantine_reason").is_not_null()).is_empty(), "a corpus record was quarantined"
    by_id = {row["source_id"]: row for row in out.iter_rows(named=True)}
    expected = [row for r in resources for row in corpus.expected_fhir(r)[table]]
    # Every expected row exists (components included) and nothing else does.
    assert sorted(by_id) == sorted(row["source_id"] for row in expected)
    for want in expected:
        _assert_row(by_id[want["source_id"]], want, f"{table}/{want['source_id']}")


@pytest.mark.parametrize("table", ["encounters", "results"])
def test_us_core_as_a_transaction_bundle_resolves_urn_uuid_and_conditional_patients(table: str) -> None:
    """The corpus re-sent as a transaction Bundle would be (every Patient under a ``urn:uuid``
    fullUrl; a record's subject pointing at that fullUrl, or by its identifier), through
    ``redox-etl load``'s reader: every record finds the patient a literal reference found."""
    patients = corpus.fhir_records("patients")
    resources = corpus.fhir_records(table)
    by_id = {p["id"]: p for p in patients}
    entries = [{"fullUrl": f"urn:uuid:{p['id']}", "resource": p} for p in patients]
    for i, r in enumerate(resources):
        target = corpus.ref_id(r.get("subject"), "Patient")
        resent = dict(r)
        if target in by_id and i % 2 == 0:
            resent["subject"] = {"reference": f"urn:uuid:{target}"}
        elif target in by_id and by_id[target].get("identifier"):
            ident = by_id[target]["identifier"][0]
            resent["subject"] = {"reference": f"Patient?identifier={ident['system']}|{ident['value']}"}
        entries.append({"fullUrl": f"urn:uuid:{table}-{i}", "resource": resent})
    text = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    bodies = captured.read(text).pages[("fhir", table)]
    pages = pl.LazyFrame({"raw_ref": [f"p{i}" for i in range(len(bodies))], "body": bodies})
    normalize = fhir.encounters if table == "encounters" else fhir.results
    out = (
        normalize(pages)
        .collect()
        .filter(pl.col("parent_source_id").is_null() if table == "results" else True)
    )
    assert out.filter(pl.col("quarantine_reason").is_not_null()).is_empty()
    got = dict(out.select("source_id", "patient_source_id").iter_rows())
    assert got == {r["id"]: corpus.ref_id(r.get("subject"), "Patient") for r in resources}
    assert fhir_refs.count_unresolved(pages, fhir.RESOURCE_TYPES[table]) == 0


def test_no_observation_value_is_silently_lost() -> None:
    resources = corpus.fhir_records("results")
    out = fhir.results(_fhir_page(resources)).collect()
    value_keys = {k for r in resources for k in r if k.startswith("value") or k == "dataAbsentReason"}
    assert {"valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean"} <= value_keys
    for r in resources:
        row = out.filter(pl.col("source_id") == r["id"]).row(0, named=True)
        sent_value = any(k.startswith("value") or k == "dataAbsentReason" for k in r)
        assert (row["value_type"] is not None) == sent_value, r["id"]
        if not sent_value:
            # A record without a value is a panel: its values are its components or members.
            assert r.get("component") or r.get("hasMember"), r["id"]
    components = out.filter(pl.col("parent_source_id").is_not_null())
    assert components.height == sum(len(r.get("component") or []) for r in resources)
    # Blood pressure: systolic and diastolic both kept, each with its value or why it is absent.
    bp = components.filter(pl.col("code").is_in(["8480-6", "8462-4"]))
    assert bp.height >= 2
    assert bp.filter(pl.col("value_num").is_null() & pl.col("absent_reason").is_null()).is_empty()


def test_datamodel_results_land_in_their_columns() -> None:
    """Every Data Model fixture in one batch (one page each): each reply's results, by file."""
    paths = sorted(corpus.require(corpus.DATAMODEL).glob("*.json"))
    messages = {p.name: corpus.load(p) for p in paths}
    pages = pl.LazyFrame({"raw_ref": list(messages), "body": [json.dumps(m) for m in messages.values()]})
    out = datamodel.results(pages).collect()
    assert out.filter(pl.col("quarantine_reason").is_not_null()).is_empty(), "a corpus result was quarantined"
    local = out.with_columns(pl.col("source_id").str.replace(r"^[^/]*/", "").alias("local_id"))
    wanted: dict[str, dict[str, Any]] = {}
    for name, message in messages.items():
        if message["Meta"]["EventType"] in REQUESTS:
            assert local.filter(pl.col("raw_ref") == name).is_empty(), f"{name}: a request yielded rows"
            continue
        # Several fixtures carry the same record (a push and a query reply): one row, one key.
        wanted |= {w["local_id"]: w for w in corpus.expected_datamodel(message).get("results", [])}
    assert sorted(set(local["local_id"])) == sorted(wanted)
    for key, w in wanted.items():
        for row in local.filter(pl.col("local_id") == key).iter_rows(named=True):
            _assert_row(row, w, key)
            # The key is scoped by the record's patient (ids are unique only per source system).
            assert row["source_id"] == f"{row['patient_source_id']}/{key}"
    # Results New, NewUnsolicited, QueryResponse and Clinical Summary replies carry results.
    assert len(wanted) >= 6


REQUESTS = {"Query", "PatientQuery", "VisitQuery", "DocumentQuery", "DocumentGet", "LocationQuery"}
