"""Identity against the sandbox's ground truth: the acceptance bar of issue 5, and `identity link`
on lists with fewer columns (issue 12, item 9).

The patients come from the sandbox world's truth export (the unified ``patients`` columns), so this
measures the identity step alone, independent of extraction and normalization.
"""

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from pipelines.identity_cli import app as identity_app
from sandbox.population.world import PopulationConfig, World, build
from schema import PATIENTS
from tests.identity_truth import assert_meets_bar, crosswalk_metrics, link_metrics
from transforms import identity as idn

NOW = datetime(2025, 1, 1, tzinfo=UTC)

pytestmark = pytest.mark.slow


def patients_of(world: World) -> pl.DataFrame:
    frame = world.truth()["patients"]
    if "last_updated" in frame.columns and "source_updated_at" not in frame.columns:
        frame = frame.rename({"last_updated": "source_updated_at"})
    return idn.conform_patients(frame).collect()


@pytest.fixture(scope="module")
def world() -> World:
    return build(PopulationConfig())


@pytest.fixture(scope="module")
def run(world: World) -> idn.IdentityResult:
    return idn.resolve(patients_of(world), now=NOW)


def test_default_population_meets_precision_and_recall(world: World, run: idn.IdentityResult) -> None:
    metrics = crosswalk_metrics(run.crosswalk, world.truth()["persons"])
    assert metrics["true_pairs"] > 500
    assert_meets_bar(metrics)
    assert metrics["false_merge_persons"] == 0, metrics


def test_every_record_has_exactly_one_person(world: World, run: idn.IdentityResult) -> None:
    pats = patients_of(world)
    assert run.crosswalk.height == pats.height
    assert run.crosswalk.select("source_surface", "source_id").is_unique().all()
    assert run.persons.height == run.crosswalk["person_key"].n_unique()
    # The summary is counts only: safe for Dagster metadata.
    assert all(isinstance(v, int) for v in run.summary().values())


def test_twins_and_same_name_same_birth_date_are_not_merged(world: World, run: idn.IdentityResult) -> None:
    truth = world.truth()
    hard = truth["hard_groups"].filter(pl.col("hard_group").is_in(["twin", "same-name-dob", "household"]))
    assert hard["hard_group"].n_unique() >= 2, "the default population should hold hard groups"
    keyed = (
        truth["persons"]
        .rename({"surface": "source_surface", "source_patient_id": "source_id"})
        .join(run.crosswalk, on=["source_surface", "source_id"])
        .join(hard, on="person_id")
    )
    # Within a group, no person_key may span two truth persons.
    mixed = keyed.group_by("group_id", "person_key").agg(pl.col("person_id").n_unique().alias("n"))
    assert mixed.filter(pl.col("n") > 1).height == 0


def test_rerun_with_one_percent_new_patients_keeps_every_key(world: World, run: idn.IdentityResult) -> None:
    before = patients_of(world)
    later = build(PopulationConfig())  # a twin of the module's world, so the fixture stays untouched
    if not patients_of(later).equals(before):  # the default end date (today) moved under us
        before, world = patients_of(later), later
        run = idn.resolve(before, now=NOW)
    days = 0
    new = before.clear()
    while new.height < before.height // 100 and days < 60:
        later.advance(timedelta(days=7))
        days += 7
        grown = patients_of(later)
        new = grown.join(before, on=["source_surface", "source_id"], how="anti")
    assert new.height >= before.height // 100
    combined = pl.concat([before, new.select(PATIENTS.names())])
    second = idn.resolve(
        combined,
        now=NOW + timedelta(days=days),
        model=run.model,
        previous_crosswalk=run.crosswalk,
        previous_history=run.history,
    )
    kept = run.crosswalk.join(second.crosswalk, on=["source_surface", "source_id"], suffix="_after")
    assert kept.height == run.crosswalk.height
    assert (kept["person_key"] == kept["person_key_after"]).all()
    assert set(second.history["event"]) <= {"create"}
    assert_meets_bar(crosswalk_metrics(second.crosswalk, later.truth()["persons"]))


def test_review_decisions_survive_the_next_run(world: World, run: idn.IdentityResult) -> None:
    pats = patients_of(world)
    # A reviewer splits one automatic link and confirms it is wrong; the next run must keep it split.
    victim: dict[str, Any] = run.links.filter(pl.col("method") == "probabilistic").row(0, named=True)
    decisions = pl.DataFrame(
        [
            {
                "left_surface": victim["left_surface"],
                "left_id": victim["left_id"],
                "right_surface": victim["right_surface"],
                "right_id": victim["right_id"],
                "decision": "no-link",
                "decided_by": "reviewer",
                "decided_at": NOW,
                "note": None,
            }
        ],
        schema=idn.IDENTITY_DECISIONS,
    )
    second = idn.resolve(
        pats,
        now=NOW + timedelta(days=1),
        model=run.model,
        decisions=decisions,
        previous_crosswalk=run.crosswalk,
    )
    keys = dict(
        zip(
            second.crosswalk["source_surface"] + "|" + second.crosswalk["source_id"],
            second.crosswalk["person_key"],
            strict=True,
        )
    )
    left = keys[f"{victim['left_surface']}|{victim['left_id']}"]
    right = keys[f"{victim['right_surface']}|{victim['right_id']}"]
    assert left != right
    assert second.history.filter(pl.col("event") == "split").height == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_other_seeds_meet_the_bar(seed: int) -> None:
    world = build(PopulationConfig(seed=seed))
    result = idn.resolve(patients_of(world), now=NOW)
    assert_meets_bar(crosswalk_metrics(result.crosswalk, world.truth()["persons"]))


# -- issue 12 item 9: `identity link` on what a list has -------------------------------------------

# The issue asks for precision and recall within 0.005 of the full lists; this holds for every
# case in the sandbox's default world (seed 7), which is what this test builds. Other worlds are
# measured in docs/identity.md#lists-with-fewer-columns: without sex, phone and email, or without
# SSNs, two of sixteen seeds fall up to 0.007 short (pairs that agree on name and birth date and on
# nothing else the list holds look exactly like the sandbox's same-name, same-birth-date strangers),
# and within 0.005 once review counts as found.
ISSUE_TOLERANCE = 0.005

LIST_NOW = datetime(2025, 1, 1, tzinfo=UTC)


def _national_ids(frame: pl.DataFrame, persons: pl.DataFrame) -> pl.DataFrame:
    """SSNs replaced by a 7-digit id per person (a record without an SSN keeps none)."""
    owner = persons.select("person_id", source_surface="surface", source_id="source_patient_id")
    ids = (
        owner.select("person_id")
        .unique()
        .sort("person_id")
        .with_columns(nid=(pl.int_range(pl.len()) * 7919 % 9_000_000 + 1_000_000).cast(pl.String))
    )
    return (
        frame.join(owner, on=["source_surface", "source_id"], how="left", maintain_order="left")
        .join(ids, on="person_id", how="left", maintain_order="left")
        .with_columns(ssn=pl.when(pl.col("ssn").is_not_null()).then(pl.col("nid")))
        .select(frame.columns)
    )


def _blank(frame: pl.DataFrame, *columns: str) -> pl.DataFrame:
    return frame.with_columns(pl.lit(None, PATIENTS[c]).alias(c) for c in columns)


@pytest.fixture(scope="module")
def list_world() -> World:
    # A fixed end date: the population is drawn from it, and a tolerance test should see one world.
    return build(PopulationConfig(end=LIST_NOW.date()))


def _link(tmp: Any, name: str, records: pl.DataFrame) -> tuple[pl.DataFrame, str]:
    """Run `redox-etl identity link` on the two surfaces of ``records``; (pairs, terminal output)."""
    left, right, out = (
        tmp / f"{name}-left.parquet",
        tmp / f"{name}-right.parquet",
        tmp / f"{name}-pairs.parquet",
    )
    records.filter(pl.col("source_surface") == "fhir").write_parquet(left)
    records.filter(pl.col("source_surface") == "datamodel").write_parquet(right)
    result = CliRunner().invoke(
        identity_app, ["link", "--left", str(left), "--right", str(right), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return pl.read_parquet(out), " ".join(result.output.split())


@pytest.fixture(scope="module")
def full_lists(
    list_world: World, tmp_path_factory: pytest.TempPathFactory
) -> tuple[pl.DataFrame, dict[str, Any]]:
    # An outside list carries no enterprise MPI id: every link is the model's.
    records = patients_of(list_world).with_columns(identifiers=pl.lit([], PATIENTS["identifiers"]))
    pairs, _ = _link(tmp_path_factory.mktemp("full"), "full", records)
    metrics = link_metrics(pairs, records, list_world.truth()["persons"])
    assert metrics["true_pairs"] > 500 and metrics["recall"] >= 0.99, metrics
    return records, metrics


@pytest.mark.parametrize(
    ("case", "left_out", "recall_gap"),
    [
        ("a: no sex, phone or email", {"sex", "phone", "email"}, ISSUE_TOLERANCE),
        ("b: no SSN", {"ssn"}, ISSUE_TOLERANCE),
        ("c: 7-digit national ids for SSNs", set(), ISSUE_TOLERANCE),
        ("d: names, birth date, address and a national id", {"sex", "phone", "email"}, ISSUE_TOLERANCE),
    ],
)
def test_link_on_what_a_list_has(
    case: str,
    left_out: set[str],
    recall_gap: float,
    list_world: World,
    full_lists: tuple[pl.DataFrame, dict[str, Any]],
    tmp_path: Any,
) -> None:
    full, baseline = full_lists
    persons = list_world.truth()["persons"]
    records = {
        "a": lambda: _blank(full, "sex", "phone", "email"),
        "b": lambda: _blank(full, "ssn"),
        "c": lambda: _national_ids(full, persons),
        "d": lambda: _blank(_national_ids(full, persons), "sex", "phone", "email"),
    }[case[0]]()
    pairs, output = _link(tmp_path, case[0], records)
    metrics = link_metrics(pairs, records, persons)
    found = link_metrics(pairs, records, persons, decisions=("link", "review"))

    assert metrics["precision"] >= baseline["precision"] - ISSUE_TOLERANCE, (metrics, baseline)
    assert metrics["false_merge_persons"] == 0, metrics
    assert metrics["recall"] >= baseline["recall"] - recall_gap, (metrics, baseline)
    assert found["recall"] >= baseline["recall"] - ISSUE_TOLERANCE, (found, baseline)
    # The terminal says which comparisons were left out, and why; it shows no patient value.
    for name in left_out:
        assert re.search(rf"comparison\W+{name}\W+{name}: empty on both sides", output), output
    assert ("left out of the model" in output) == bool(left_out)
    assert not [n for n in set(records["family_name"].drop_nulls()) if f" {n} " in output]
