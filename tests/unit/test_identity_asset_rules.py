"""The identity asset's own rules, on small frames: when the stored model is reused, and what its
checks call a failure. The asset end to end is tests/pipeline/test_identity_asset.py."""

import datetime as dt
import json

import dagster as dg
import polars as pl

from assets.identity import (
    CHECKS,
    IDENTITY_MODEL,
    VIEWS,
    IdentityConfig,
    Inputs,
    check_every_record_one_person,
    check_one_golden_row_per_person,
    check_one_record_per_surface,
    choose_model,
    model_row,
    person_crosswalk,
)
from schema import PATIENTS
from transforms import identity

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
MODEL = {"format": identity.MODEL_FORMAT, "splink": {"comparisons": []}}


def _inputs(model: pl.DataFrame | None) -> Inputs:
    return Inputs(
        patients=pl.DataFrame(schema=PATIENTS), decisions=None, crosswalk=None, history=None, model=model
    )


def test_stored_model_is_reused_until_asked_or_outgrown() -> None:
    stored = model_row(MODEL, now=NOW, run_id="r1", counts=(100, 120))
    assert stored.schema == IDENTITY_MODEL and json.loads(stored["model"][0]) == MODEL
    config = IdentityConfig()
    assert choose_model(_inputs(None), config, (100, 120)) == (None, "no stored model")
    assert choose_model(_inputs(stored), config, (150, 200)) == (MODEL, "reused")
    assert choose_model(_inputs(stored), IdentityConfig(retrain=True), (100, 120))[0] is None
    model, why = choose_model(_inputs(stored), config, (200, 120))
    assert model is None and "grew" in why
    # The latest stored model wins; a model of another format is never misread.
    newer = model_row(
        {**MODEL, "splink": {"v": 2}}, now=NOW + dt.timedelta(days=1), run_id="r2", counts=(100, 120)
    )
    assert choose_model(_inputs(pl.concat([newer, stored])), config, (100, 120))[0] == {
        **MODEL,
        "splink": {"v": 2},
    }
    old = stored.with_columns(format=pl.lit("redox-etl-identity/0"))
    assert choose_model(_inputs(old), config, (100, 120))[0] is None


def _crosswalk(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"person_key": k, "source_surface": s, "source_id": i, "method": "singleton", "linked_at": NOW}
            for k, s, i in rows
        ],
        schema=identity.PERSON_CROSSWALK,
    )


def test_checks_fail_on_missing_or_doubled_records_and_crowded_persons() -> None:
    patients = pl.DataFrame(
        {"source_surface": ["fhir", "fhir", "datamodel"], "source_id": ["a", "a", "b"]}
    )  # two versions of one record count once
    good = _crosswalk([("p1", "fhir", "a"), ("p1", "datamodel", "b")])
    assert check_every_record_one_person(patients, good).passed
    doubled = _crosswalk([("p1", "fhir", "a"), ("p2", "fhir", "a"), ("p1", "datamodel", "b")])
    result = check_every_record_one_person(patients, doubled)
    assert not result.passed and result.metadata["duplicated"].value == 1
    missing = check_every_record_one_person(patients, good.head(1))
    assert not missing.passed and missing.metadata["missing"].value == 1

    persons = pl.DataFrame({"person_key": ["p1"]})
    assert check_one_golden_row_per_person(good, persons).passed
    assert not check_one_golden_row_per_person(good, pl.concat([persons, persons])).passed
    assert not check_one_golden_row_per_person(good, pl.DataFrame({"person_key": ["p1", "p9"]})).passed

    assert check_one_record_per_surface(good).passed
    crowded = check_one_record_per_surface(_crosswalk([("p1", "fhir", "a"), ("p1", "fhir", "c")]))
    assert not crowded.passed and crowded.severity == dg.AssetCheckSeverity.WARN


def test_asset_knows_nothing_of_the_sandbox() -> None:
    # Precision/recall against the sandbox's truth are measured by the tests (tests/identity_truth.py)
    # and the benchmark; the product asset needs only the warehouse and checks only its own output.
    assert "redox" not in person_crosswalk.required_resource_keys
    assert set(CHECKS) == {"every_record_one_person", "one_golden_row_per_person", "one_record_per_surface"}


def test_views_keep_every_clinical_row_and_name_tables_unqualified() -> None:
    assert set(VIEWS) == {"encounters_by_person", "results_by_person", "appointments_by_person"}
    for sql in VIEWS.values():
        assert "LEFT JOIN person_crosswalk" in sql and "lake." not in sql
