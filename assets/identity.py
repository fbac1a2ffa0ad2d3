"""Identity: one person per human across both Redox surfaces, with a ``person_key`` that survives reruns.

The asset ``person_crosswalk`` reads the current ``patients`` table and runs transforms/identity/
(deterministic links on shared identifiers, Splink scores for the rest, recorded decisions, stable
clustering, golden records). It writes, in ONE lake transaction:

- ``person_crosswalk``, ``persons`` and ``identity_review`` (replaced whole),
- the run's ``person_history`` events and, when a model was trained, an ``identity_model`` row
  (both append-only),
- ``identity_decisions`` (created empty when absent: the table a reviewer appends decisions to),
- the analyst views ``encounters_by_person``, ``results_by_person``, ``appointments_by_person``.

Invariants:
- a reader never sees a crosswalk from one run beside persons or history from another;
- a key once issued is kept by later runs (the previous crosswalk and history are inputs), and a
  recorded decision is honoured by every later run;
- the model is stored in the lake and reused, so a rerun on the same input scores the same and links
  the same; it is retrained only when absent, when asked, or when the input has outgrown it;
- metadata and logs carry counts and ratios only, never a patient value or a source id;
- the asset knows nothing of the sandbox: how well it links is measured by the tests and the
  benchmark against the sandbox's ground truth, never by the product (real Redox has no truth).
"""

import contextlib
import dataclasses
import json
from datetime import UTC, datetime
from typing import Any, Final

import dagster as dg
import polars as pl
from pydantic import Field

from resources.warehouse import LAKE, Warehouse
from resources.warehouse.ddl import quote_ident
from schema import NATURAL_KEY, PATIENTS, UNIFIED_TABLES, UTC_TS
from transforms import identity

IDENTITY_MODEL: Final = pl.Schema(
    {
        "trained_at": UTC_TS,
        "run_id": pl.String(),
        "format": pl.String(),
        # Records per surface the model was trained on: the yardstick for "the input outgrew it".
        "records_left": pl.Int64(),
        "records_right": pl.Int64(),
        "model": pl.String(),  # the JSON of transforms.identity.model.train_model
    }
)

#: Analyst views: every clinical row with the person_key of its patient (null until identity has run
#: on a patient loaded after the last identity run, so no clinical row ever drops out of a view).
VIEWS: Final[dict[str, str]] = {
    f"{table}_by_person": (
        f"SELECT x.person_key, c.* FROM {table} AS c LEFT JOIN person_crosswalk AS x"
        " ON x.source_surface = c.source_surface AND x.source_id = c.patient_source_id"
    )
    for table in UNIFIED_TABLES
    if table != "patients"
}

CHECKS: Final = {
    "every_record_one_person": "Every current patients record has exactly one person_crosswalk row.",
    "one_golden_row_per_person": "persons holds exactly one row per person_key of person_crosswalk.",
    "one_record_per_surface": "No person holds two records of one surface (a chain of links would "
    "mean a false merge: each surface holds one record per human).",
}


class IdentityConfig(dg.Config):
    retrain: bool = Field(default=False, description="Train a new model even if the lake holds one.")
    retrain_growth: float = Field(
        default=2.0,
        gt=1.0,
        description="Retrain when either surface holds this many times the records the stored model "
        "was trained on: a model trained on a first small sync is not one to keep for ever.",
    )
    link_threshold: float = Field(default=identity.LINK_THRESHOLD, description="Match probability to link.")
    review_threshold: float = Field(
        default=identity.REVIEW_THRESHOLD,
        description="Match probability from which a pair is queued for review.",
    )
    seed: int = Field(default=0, description="Seed of the model's random sampling (training only).")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything one run reads, from one lake snapshot."""

    patients: pl.DataFrame
    decisions: pl.DataFrame | None
    crosswalk: pl.DataFrame | None
    history: pl.DataFrame | None
    model: pl.DataFrame | None


def read_inputs(warehouse: Warehouse) -> Inputs:
    """The patients table and identity's own previous tables, read in one transaction (one snapshot)."""
    with contextlib.closing(warehouse.connect()) as con:
        con.execute("BEGIN TRANSACTION")
        present = {
            row[0]
            for row in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main'",
                [LAKE],
            ).fetchall()
        }

        def read(name: str, schema: pl.Schema) -> pl.DataFrame | None:
            if name not in present:
                return None
            columns = ", ".join(quote_ident(c) for c in schema)
            frame = con.execute(f"SELECT {columns} FROM {quote_ident(name)}").pl()
            return frame.cast(dict(schema))  # type: ignore[arg-type]

        patients = read("patients", PATIENTS)
        inputs = Inputs(
            patients=patients if patients is not None else pl.DataFrame(schema=PATIENTS),
            decisions=read("identity_decisions", identity.IDENTITY_DECISIONS),
            crosswalk=read("person_crosswalk", identity.PERSON_CROSSWALK),
            history=read("person_history", identity.PERSON_HISTORY),
            model=read("identity_model", IDENTITY_MODEL),
        )
        con.execute("COMMIT")
    return inputs


def surface_counts(
    patients: pl.DataFrame, surfaces: tuple[str, str] = ("fhir", "datamodel")
) -> tuple[int, int]:
    """Current records per surface (latest version of each)."""
    current = identity.latest_versions(patients.lazy()).group_by("source_surface").len().collect()
    counts = dict(current.iter_rows())
    return int(counts.get(surfaces[0], 0)), int(counts.get(surfaces[1], 0))


def stored_model(model_rows: pl.DataFrame | None) -> tuple[dict[str, Any], int, int] | None:
    """The latest stored model and the records per surface it was trained on."""
    if model_rows is None or model_rows.height == 0:
        return None
    row = model_rows.sort("trained_at").row(-1, named=True)
    if row["format"] != identity.MODEL_FORMAT:
        return None  # an older format: retrain rather than misread it
    return json.loads(row["model"]), int(row["records_left"]), int(row["records_right"])


def choose_model(
    inputs: Inputs, config: IdentityConfig, counts: tuple[int, int]
) -> tuple[dict[str, Any] | None, str]:
    """(model to reuse or None to train, why). Reuse keeps scores, and so links, stable across runs."""
    stored = stored_model(inputs.model)
    if stored is None:
        return None, "no stored model"
    if config.retrain:
        return None, "retrain requested"
    model, left, right = stored
    if counts[0] >= config.retrain_growth * max(left, 1) or counts[1] >= config.retrain_growth * max(
        right, 1
    ):
        return None, f"input grew {config.retrain_growth:g}x since training"
    return model, "reused"


def model_row(model: dict[str, Any], *, now: datetime, run_id: str, counts: tuple[int, int]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "trained_at": now,
                "run_id": run_id,
                "format": model["format"],
                "records_left": counts[0],
                "records_right": counts[1],
                "model": json.dumps(model, sort_keys=True),
            }
        ],
        schema=IDENTITY_MODEL,
    )


# --------------------------------------------------------------------------------------------------
# Checks (pure: frames in, result out)


def check_every_record_one_person(patients: pl.DataFrame, crosswalk: pl.DataFrame) -> dg.AssetCheckResult:
    key = list(NATURAL_KEY)
    records = patients.select(key).unique()
    per_record = crosswalk.group_by(key).len()
    missing = records.join(per_record, on=key, how="anti").height
    duplicated = per_record.filter(pl.col("len") > 1).height
    return dg.AssetCheckResult(
        check_name="every_record_one_person",
        passed=missing == 0 and duplicated == 0,
        metadata={"records": records.height, "missing": missing, "duplicated": duplicated},
    )


def check_one_golden_row_per_person(crosswalk: pl.DataFrame, persons: pl.DataFrame) -> dg.AssetCheckResult:
    keys = crosswalk.select("person_key").unique()
    golden = persons.group_by("person_key").len()
    without_row = keys.join(golden, on="person_key", how="anti").height
    orphan_rows = golden.join(keys, on="person_key", how="anti").height
    repeated = golden.filter(pl.col("len") > 1).height
    return dg.AssetCheckResult(
        check_name="one_golden_row_per_person",
        passed=without_row == 0 and orphan_rows == 0 and repeated == 0,
        metadata={
            "persons": keys.height,
            "without_golden_row": without_row,
            "golden_rows_without_records": orphan_rows,
            "repeated_golden_rows": repeated,
        },
    )


def check_one_record_per_surface(crosswalk: pl.DataFrame) -> dg.AssetCheckResult:
    crowded = crosswalk.group_by("person_key", "source_surface").len().filter(pl.col("len") > 1)
    return dg.AssetCheckResult(
        check_name="one_record_per_surface",
        passed=crowded.height == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"persons_with_two_records_of_one_surface": crowded.select("person_key").n_unique()},
    )


def history_counts(history: pl.DataFrame) -> dict[str, int]:
    counts = dict(history.group_by("event").len().iter_rows())
    return {f"history_{event}": int(counts.get(event, 0)) for event in ("create", "merge", "split", "move")}


@dg.asset(
    name="person_crosswalk",
    description=(
        "Patients of both surfaces reconciled into persons: `person_crosswalk` (one row per patient "
        "record, its stable person_key), `persons` (golden rows), `identity_review` (pairs for a "
        "person to decide), `person_history` (creates, merges, splits), and the views "
        "`encounters_by_person`, `results_by_person`, `appointments_by_person`. Decisions appended to "
        "`identity_decisions` are honoured on the next run. See docs/identity.md."
    ),
    group_name="identity",
    kinds={"duckdb", "polars", "splink"},
    deps=["patients"],
    pool="warehouse",
    check_specs=[
        dg.AssetCheckSpec(name, asset="person_crosswalk", description=text) for name, text in CHECKS.items()
    ],
)
def person_crosswalk(
    context: dg.AssetExecutionContext, config: IdentityConfig, warehouse: Warehouse
) -> dg.MaterializeResult:
    warehouse.ensure_tables()
    inputs = read_inputs(warehouse)
    now = datetime.now(UTC)
    counts = surface_counts(inputs.patients)
    model, why = choose_model(inputs, config, counts)
    result = identity.resolve(
        inputs.patients,
        now=now,
        model=model,
        decisions=inputs.decisions,
        previous_crosswalk=inputs.crosswalk,
        previous_history=inputs.history,
        link_threshold=config.link_threshold,
        review_threshold=config.review_threshold,
        seed=config.seed,
    )
    trained = model is None and result.model is not None
    new_model = (
        model_row(result.model, now=now, run_id=context.run_id, counts=counts)
        if trained and result.model is not None
        else pl.DataFrame(schema=IDENTITY_MODEL)
    )
    snapshot = warehouse.write_derived(
        run_id=context.run_id,
        message="identity",
        replace={
            "person_crosswalk": result.crosswalk,
            "persons": result.persons,
            "identity_review": result.review,
        },
        append={
            "person_history": result.history,
            "identity_model": new_model,
            "identity_decisions": identity.empty("identity_decisions"),
        },
        views=VIEWS,
    )
    previous_keys = (
        set(inputs.crosswalk.get_column("person_key").to_list()) if inputs.crosswalk is not None else set()
    )
    kept = len(previous_keys & set(result.crosswalk.get_column("person_key").to_list()))
    summary = result.summary()
    context.log.info(
        "identity: %d records, %d persons, %d links, %d in review, model %s",
        summary["records"],
        summary["persons"],
        summary["links"],
        summary["review"],
        "trained" if trained else why,
    )
    metadata: dict[str, dg.RawMetadataValue] = {
        **{k: v for k, v in summary.items()},
        **{f"links_{m}": summary.get(f"links_{m}", 0) for m in ("identifier", "probabilistic", "decision")},
        **history_counts(result.history),
        "fhir_records": counts[0],
        "datamodel_records": counts[1],
        "decisions_recorded": 0 if inputs.decisions is None else inputs.decisions.height,
        "person_keys_kept": kept,
        "person_keys_before": len(previous_keys),
        "model": f"trained ({why})"
        if trained
        else ("none (one surface only)" if result.model is None else why),
        "snapshot_id": snapshot if snapshot is not None else -1,
    }
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=[
            check_every_record_one_person(inputs.patients, result.crosswalk),
            check_one_golden_row_per_person(result.crosswalk, result.persons),
            check_one_record_per_surface(result.crosswalk),
        ],
    )


identity_assets = [person_crosswalk]
