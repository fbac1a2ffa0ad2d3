"""`redox-etl load` on real public payloads: nothing silently lost, every path counted, every row's
source JSON reachable from SQL, and a second load changes nothing.

The corpus is ../shared/fixtures relative to the repository root: the HL7 US Core R4 examples
(us-core/) and Redox's documented Data Model messages (redox-datamodel/). Real DuckLake, real landed
pages, the CLI command itself (typer), the registered normalizers and the warehouse merge.
"""

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import typer
from typer.testing import CliRunner

from pipelines.load_cli import coverage as coverage_command
from pipelines.load_cli import load as load_command
from resources import configured_warehouse
from resources.warehouse import Warehouse

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
US_CORE, DATAMODEL = SHARED / "us-core", SHARED / "redox-datamodel"
TABLES = {
    "Patient": "patients",
    "Encounter": "encounters",
    "Observation": "results",
    "Appointment": "appointments",
}
# Data Model messages that carry clinical records of the four tables (requests carry none).
CLINICAL_MODELS = ("PatientAdmin", "Results", "Scheduling", "Clinical Summary", "PatientSearch")

pytestmark = pytest.mark.slow


def _corpus() -> None:
    if not US_CORE.is_dir() or not DATAMODEL.is_dir():
        pytest.fail(
            f"the public corpus is missing: expected {US_CORE} and {DATAMODEL} (../shared/fixtures "
            "beside the repository); copy it there to run this test"
        )


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command("load")(load_command)
    app.command("coverage")(coverage_command)
    return app


def _run(*args: str) -> str:
    result = CliRunner().invoke(_cli(), list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def _resources(doc: Any) -> list[dict[str, Any]]:
    """Every resource of a table's type in a document, Bundles (nested too) opened."""
    if not isinstance(doc, dict):
        return []
    if doc.get("resourceType") == "Bundle":
        return [r for e in doc.get("entry") or [] for r in _resources(e.get("resource"))]
    return [doc] if doc.get("resourceType") in TABLES else []


def _paths(value: Any, prefix: str = "") -> set[str]:
    """Leaf paths, written independently of transforms.coverage to check it."""
    if isinstance(value, dict):
        return set().union(*(_paths(v, f"{prefix}.{k}" if prefix else k) for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(_paths(v, f"{prefix}[]") for v in value))
    return set() if value in (None, "") else {prefix}


def _warehouse() -> Warehouse:
    return configured_warehouse()


def _table_rows(warehouse: Warehouse) -> dict[str, pl.DataFrame]:
    return {
        t: warehouse.query(f"SELECT * FROM {t} ORDER BY source_surface, source_id") for t in TABLES.values()
    }


def test_corpus_loads_with_nothing_silently_lost(isolated_lake_env: None) -> None:
    _corpus()
    output = _run("load", str(US_CORE), str(DATAMODEL))
    assert "read" in output and "unmapped paths" in output
    # The summary accounts for every record of every stream: read = loaded + duplicates + quarantined.
    summary = [
        cells
        for line in output.splitlines()
        if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 7 and cells[2].isdigit()
    ]
    assert {(c[0], c[1]) for c in summary} >= {
        (t, s) for t in TABLES.values() for s in ("fhir", "datamodel") if t != "appointments"
    } | {("appointments", "datamodel")}
    for table, surface, read, loaded, duplicates, quarantined, _ in summary:
        assert int(read) == int(loaded) + int(duplicates) + int(quarantined) > 0, (table, surface)
    warehouse = _warehouse()

    # FHIR: every resource of a table's type is a row, or quarantined with a reason.
    expected: dict[str, set[str]] = {t: set() for t in TABLES.values()}
    paths: dict[str, set[str]] = {t: set() for t in TABLES.values()}
    for file in sorted(US_CORE.glob("*.json")):
        for resource in _resources(json.loads(file.read_text())):
            expected[TABLES[resource["resourceType"]]].add(resource["id"])
            paths[TABLES[resource["resourceType"]]] |= _paths(resource)
    assert len(expected["results"]) >= 100 and expected["patients"] and expected["encounters"]
    for table, ids in expected.items():
        held = set(
            warehouse.query(
                f"SELECT source_id FROM {table} WHERE source_surface = 'fhir'"
                " UNION ALL SELECT source_id FROM quarantine WHERE source_surface = 'fhir' AND entity = ?",
                [table],
            )["source_id"]
        )
        assert ids <= held, (table, sorted(ids - held)[:5])
        # Every path the records carried is in field_coverage, mapped or counted as unmapped.
        seen = set(
            warehouse.query("SELECT path FROM field_coverage WHERE surface = 'fhir' AND entity = ?", [table])[
                "path"
            ]
        )
        assert paths[table] <= seen, (table, sorted(paths[table] - seen)[:5])

    # Data Model: every clinical message's located records are loaded, duplicates or quarantined.
    clinical = [
        f
        for f in sorted(DATAMODEL.glob("*.json"))
        if json.loads(f.read_text())["Meta"]["DataModel"] in CLINICAL_MODELS
    ]
    assert len(clinical) >= 30
    loads = warehouse.query(
        "SELECT table_name, source_surface, sum(rows) AS rows, sum(duplicates) AS duplicates"
        " FROM partition_loads WHERE run_id LIKE 'load:%' GROUP BY ALL"
    )
    assert set(loads.filter(pl.col("source_surface") == "datamodel")["table_name"]) == set(TABLES.values())
    dm_paths: Counter[str] = Counter()
    for f in clinical:
        dm_paths.update(_paths(json.loads(f.read_text())))
    seen_dm = set(
        warehouse.query("SELECT DISTINCT path FROM field_coverage WHERE surface = 'datamodel'")["path"]
    )
    assert set(dm_paths) <= seen_dm, sorted(set(dm_paths) - seen_dm)[:5]
    # Records no table holds are counted, not dropped: the file's row says what it held.
    other = warehouse.query("SELECT other_records FROM captured_files")["other_records"]
    assert sum(sum(json.loads(o).values()) for o in other) > 0
    assert warehouse.query("SELECT count(*) AS n FROM captured_files")["n"][0] == len(
        list(US_CORE.glob("*.json")) + list(DATAMODEL.glob("*.json"))
    )
    # The coverage command prints the unmapped paths.
    assert "category[].coding[].code" in _run(
        "coverage", "--unmapped", "--entity", "results", "--limit", "500"
    )

    # Every row reaches its source JSON from SQL: its page, and in a FHIR page the entry of its id
    # (a component row: its parent Observation's entry, which holds the component).
    for table in TABLES.values():
        orphans = warehouse.query(
            f"SELECT count(*) AS n FROM {table} t LEFT JOIN source_pages p ON p.raw_ref = t.source_ref"
            " WHERE p.raw_ref IS NULL"
        )["n"][0]
        assert orphans == 0, table
    exact = warehouse.query(
        "SELECT count(*) AS n FROM results t JOIN source_pages p ON p.raw_ref = t.source_ref"
        " WHERE t.source_surface = 'fhir' AND len(list_filter(CAST(p.body -> '$.entry[*].resource' AS JSON[]),"
        " lambda r: (r ->> 'id') = coalesce(t.parent_source_id, t.source_id))) = 1"
    )["n"][0]
    assert exact == warehouse.query("SELECT count(*) AS n FROM results WHERE source_surface = 'fhir'")["n"][0]

    # Loading the same files again changes nothing (skipped by content hash); --reload rewrites the
    # same versions, which the newest-version rule makes a no-op on every column but ingested_at.
    before = _table_rows(warehouse)
    again = _run("load", str(US_CORE), str(DATAMODEL))
    assert "0 loaded" in again
    unchanged = _table_rows(warehouse)
    assert all(unchanged[t].equals(before[t]) for t in before)
    _run("load", "--reload", str(US_CORE / "Observation-average-blood-pressure.json"))
    after = _table_rows(warehouse)
    for t in before:
        assert after[t].drop("run_id", "ingested_at").equals(before[t].drop("run_id", "ingested_at")), t


def test_shapes_detected_per_record(isolated_lake_env: None, tmp_path: Path) -> None:
    """NDJSON (gzipped), a transaction Bundle, a single resource, Data Model JSON Lines and a line
    of no known shape, in one load: each record goes where its shape says; the bad line is
    quarantined with its reason; lineage names the file through its hash."""
    _corpus()
    observations = [
        r
        for f in sorted(US_CORE.glob("Observation-*.json"))[:20]
        for r in _resources(json.loads(f.read_text()))
    ]
    ndjson = tmp_path / "Observation.ndjson.gz"
    ndjson.write_bytes(gzip.compress("\n".join(json.dumps(o) for o in observations).encode()))
    patient = json.loads((US_CORE / "patient-example.json").read_text())
    transaction = tmp_path / "transaction.json"
    transaction.write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "fullUrl": "urn:uuid:1",
                        "resource": patient,
                        "request": {"method": "PUT", "url": "Patient"},
                    }
                ],
            }
        )
    )
    messages = tmp_path / "events.jsonl"
    lines = [
        json.dumps(json.loads((DATAMODEL / f).read_text()))
        for f in ("results_new.json", "scheduling_new.json")
    ]
    messages.write_text("\n".join([*lines, "not json at all", "[1, 2]"]))
    output = _run("load", str(ndjson), str(transaction), str(messages))
    assert "2 document(s) of no known shape quarantined" in output
    warehouse = _warehouse()
    ids = {o["id"] for o in observations}
    fhir_results = set(
        warehouse.query("SELECT source_id FROM results WHERE source_surface = 'fhir'")["source_id"]
    )
    assert ids == fhir_results
    assert patient["id"] in set(warehouse.query("SELECT source_id FROM patients")["source_id"])
    assert warehouse.query("SELECT count(*) AS n FROM results WHERE source_surface = 'datamodel'")["n"][0] > 0
    assert (
        warehouse.query("SELECT count(*) AS n FROM appointments WHERE source_surface = 'datamodel'")["n"][0]
        == 1
    )
    bad = warehouse.query("SELECT reason FROM quarantine WHERE entity = 'unrouted' ORDER BY reason")[
        "reason"
    ].to_list()
    assert bad == ["not JSON", "not a JSON object"]
    # Lineage: a row's source_ref names its landed folder, whose hash captured_files maps to the file.
    named = warehouse.query(
        "SELECT DISTINCT c.file_name FROM results r JOIN captured_files c"
        " ON r.source_ref LIKE '%/load=' || c.sha256 || '/%' WHERE r.source_surface = 'fhir'"
    )["file_name"].to_list()
    assert named == [str(ndjson)]
    assert warehouse.query("SELECT count(*) AS n FROM results WHERE run_id NOT LIKE 'load:%'")["n"][0] == 0
