"""The asset checks of assets/checks.py against a real sync, then against a lake broken on purpose.

One sandbox and one two-day sync for the module: every check passes on it. Each later test breaks one
thing with a real write (a duplicate key through the warehouse's writer, a deleted patient, a row with
an implausible time, a manifest with a wrong Bundle.total), runs the checks-only job ``lake_checks``
and asserts that check fails with the exact count. The healthy-lake test comes first (pytest keeps
a module's order); after it, breaks are chosen so that none changes what another test asserts.
"""

import dataclasses
import datetime as dt
import importlib
import json
import warnings
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest

import pipelines.definitions
from assets import all_assets, all_checks
from resources import all_resources
from resources.landing import LandingResource
from resources.warehouse import Warehouse
from sandbox.server import serve_in_thread

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.xdist_group("asset_checks")]

RANGE_TAGS = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


@dataclasses.dataclass
class Synced:
    first: dt.date
    last: dt.date
    instance: dg.DagsterInstance


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], Any]:
    return {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}


def _count(evaluation: Any, key: str) -> Any:
    return evaluation.metadata[key].value


def _run_checks(synced: Synced, run_config: dict[str, Any] | None = None) -> dict[tuple[str, str], Any]:
    # The definitions bind the settings (the lake's folder among them) when they are built, as the
    # code location does in production: build them afresh under this module's environment, not
    # whatever another test in this worker process built them under.
    defs = importlib.reload(pipelines.definitions).defs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = defs.resolve_job_def("lake_checks").execute_in_process(
            instance=synced.instance, raise_on_error=False, run_config=run_config or {}
        )
    evaluations = _evaluations(result)
    # Every check evaluates even when a blocking one fails: blocking only holds back assets.
    assert len(evaluations) == len(all_checks)
    return evaluations


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synced]:
    tmp = tmp_path_factory.mktemp("asset-checks")
    today = dt.datetime.now(dt.UTC).date()
    # Recent days, so the freshness check's newest-day limit holds on the healthy lake.
    first, last = today - dt.timedelta(days=2), today - dt.timedelta(days=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDOX_ETL_HOME", str(tmp))
        mp.setenv("REDOX_BUDGET_PATH", str(tmp / "budget.sqlite"))
        mp.delenv("REDOX_ETL_LAKE", raising=False)
        with serve_in_thread(
            state_dir=tmp / "sandbox", patients=60, seed=5, start=first, end=last, rate_limit=None
        ) as running:
            mp.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
            instance = dg.DagsterInstance.ephemeral()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = dg.materialize(
                    [*all_assets, *all_checks],
                    resources=all_resources(),
                    instance=instance,
                    tags=dict(zip(RANGE_TAGS, (first.isoformat(), last.isoformat()), strict=True)),
                    raise_on_error=False,
                )
            assert result.success
            evaluations = _evaluations(result)
            ours = {(c.asset_key.to_user_string(), c.name) for d in all_checks for c in d.check_specs}
            assert ours <= evaluations.keys(), sorted(ours - evaluations.keys())
            failed = sorted(k for k, e in evaluations.items() if not e.passed)
            assert not failed, failed
            yield Synced(first, last, instance)


def test_healthy_lake_passes_every_check_and_counts_what_it_saw(synced: Synced) -> None:
    evaluations = _run_checks(synced)
    assert all(e.passed for e in evaluations.values()), sorted(
        k for k, e in evaluations.items() if not e.passed
    )
    warehouse = Warehouse()
    for table in ("patients", "encounters", "results", "appointments"):
        rows = int(warehouse.query(f"SELECT count(*) AS n FROM {table}")["n"][0])
        assert rows > 0, table
        assert _count(evaluations[(table, "keys_unique")], "row_count") == rows
        assert _count(evaluations[(table, "timestamps_utc")], "row_count") == rows
        assert _count(evaluations[(table, "fresh")], "days_loaded") == 2
    # Appointments: a two-day window of this small population can hold no FHIR results at all.
    fhir = evaluations[("fhir_appointments", "bundle_totals")]
    assert _count(fhir, "days_checked") == 2
    assert _count(fhir, "entries") == _count(fhir, "bundle_total") > 0


def test_duplicate_key_fails_keys_unique(synced: Synced) -> None:
    warehouse = Warehouse()
    with warehouse.writer() as con:
        surface = con.execute("SELECT source_surface FROM encounters LIMIT 1").fetchone()
        assert surface is not None
        # A second copy of one stored row: the same natural key twice.
        con.execute(
            "INSERT INTO encounters SELECT * FROM encounters WHERE source_surface = ? LIMIT 1", surface
        )
    evaluation = _run_checks(synced)[("encounters", "keys_unique")]
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert _count(evaluation, "duplicate_keys") == 1
    assert _count(evaluation, "extra_rows") == 1
    assert _count(evaluation, f"{surface[0]}_duplicate_keys") == 1


def test_deleted_patient_fails_patient_exists_with_row_counts(synced: Synced) -> None:
    warehouse = Warehouse()
    before = _run_checks(synced)
    with warehouse.writer() as con:
        row = con.execute(
            "SELECT source_surface, patient_source_id FROM results GROUP BY ALL ORDER BY count(*) DESC LIMIT 1"
        ).fetchone()
        assert row is not None
        expected = {}
        for table in ("encounters", "results", "appointments"):
            hit = con.execute(
                f"SELECT count(*) FROM {table} WHERE source_surface = ? AND patient_source_id = ?", row
            ).fetchone()
            assert hit is not None
            expected[table] = int(hit[0])
        con.execute("DELETE FROM patients WHERE source_surface = ? AND source_id = ?", row)
    after = _run_checks(synced)
    surface = row[0]
    assert expected["results"] > 0
    for table, rows in expected.items():
        evaluation = after[(table, "patient_exists")]
        was = _count(before[(table, "patient_exists")], "rows_missing_patient")
        assert _count(evaluation, "rows_missing_patient") == was + rows
        assert _count(evaluation, f"{surface}_rows_missing_patient") >= rows
        assert evaluation.passed is (was + rows == 0)
        assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert _count(after[("results", "patient_exists")], "patients_missing") >= 1


def test_implausible_time_fails_timestamps_utc(synced: Synced) -> None:
    warehouse = Warehouse()
    with warehouse.writer() as con:
        # A new key (so keys_unique is untouched) whose appointment starts before 1900.
        con.execute(
            "INSERT INTO appointments SELECT * REPLACE (source_id || '-check-test' AS source_id,"
            " TIMESTAMPTZ '1850-03-01 09:00:00+00' AS start_at) FROM appointments LIMIT 1"
        )
    evaluation = _run_checks(synced)[("appointments", "timestamps_utc")]
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert _count(evaluation, "start_at_before_1900") == 1
    assert _count(evaluation, "values_out_of_range") == 1
    assert _count(evaluation, "wrong_type_columns") == "none"


def test_naive_timestamp_column_fails_timestamps_utc_as_error(synced: Synced) -> None:
    warehouse = Warehouse()
    with warehouse.writer() as con:
        # A column someone added by hand without a time zone: readers would get local times.
        con.execute("ALTER TABLE results ADD COLUMN reviewed_at TIMESTAMP")
    evaluation = _run_checks(synced)[("results", "timestamps_utc")]
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert _count(evaluation, "wrong_type_columns") == "reviewed_at"
    assert _count(evaluation, "values_out_of_range") == 0


def test_wrong_manifest_total_fails_bundle_totals(synced: Synced) -> None:
    zone = LandingResource().zone()
    folder = f"day={synced.last.isoformat()}"
    path = zone.folder("fhir", "appointments", folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["extra"]["bundle_total"] = int(manifest["extra"]["bundle_total"]) + 3
    path.write_text(json.dumps(manifest))
    evaluation = _run_checks(synced)[("fhir_appointments", "bundle_totals")]
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert _count(evaluation, "mismatched_days") == 1
    assert _count(evaluation, "mismatched_partitions") == synced.last.isoformat()
    assert _count(evaluation, "bundle_total") == _count(evaluation, "entries") + 3

    # Blocking: a sync that keeps the landed day (no refetch) must not load appointments from it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dg.materialize(
            [*all_assets, *all_checks],
            selection=dg.AssetSelection.assets("fhir_appointments", "appointments"),
            resources=all_resources(),
            instance=synced.instance,
            tags=dict(zip(RANGE_TAGS, (synced.first.isoformat(), synced.last.isoformat()), strict=True)),
            run_config={"ops": {"extract": {"config": {"refetch": False}}}},
            raise_on_error=False,
        )
    assert not result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"fhir_appointments"}
    assert not _evaluations(result)[("fhir_appointments", "bundle_totals")].passed


def test_stale_lake_fails_fresh(synced: Synced) -> None:
    # The lake was loaded minutes ago; a limit shorter than that makes it stale.
    config = {"ops": {"patients_fresh": {"config": {"max_load_age_hours": 0.0001}}}}
    evaluations = _run_checks(synced, config)
    evaluation = evaluations[("patients", "fresh")]
    assert not evaluation.passed
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert _count(evaluation, "last_load_age_hours") >= 0
    assert evaluations[("encounters", "fresh")].passed
