"""`redox-etl identity link`: two patient files in, scored pairs out, counts (never values) printed."""

import re
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from pipelines.identity_cli import PAIRS_OUT, app
from sandbox.population.people import generate_patient_frame


def test_link_writes_scored_pairs_and_prints_counts_only(tmp_path: Path) -> None:
    frame = generate_patient_frame(1200, seed=5)
    left, right = tmp_path / "a.parquet", tmp_path / "b.parquet"
    frame.filter(pl.col("source_surface") == "fhir").drop("person_id").write_parquet(left)
    # An outside list may lack columns; they read as null.
    frame.filter(pl.col("source_surface") == "datamodel").drop("person_id", "middle_name").write_parquet(
        right
    )
    out, model = tmp_path / "out" / "pairs.parquet", tmp_path / "model.json"

    result = CliRunner().invoke(
        app,
        ["link", "--left", str(left), "--right", str(right), "--out", str(out), "--save-model", str(model)],
    )
    assert result.exit_code == 0, result.output
    pairs = pl.read_parquet(out)
    assert pairs.schema == PAIRS_OUT
    assert set(pairs["decision"]) <= {"link", "review", "no-link"}
    assert pairs["pair_id"].is_unique().all()

    # Quality: the links are the true pairs.
    truth = frame.select("person_id", "source_id")
    linked = (
        pairs.filter(pl.col("decision") == "link")
        .join(truth.rename({"source_id": "left_id", "person_id": "a"}), on="left_id")
        .join(truth.rename({"source_id": "right_id", "person_id": "b"}), on="right_id")
    )
    assert linked.height > 300 and (linked["a"] == linked["b"]).all()

    names = set(frame["family_name"].drop_nulls()) | set(frame["source_id"])
    assert not [n for n in names if n in result.output]

    # Reusing the saved model gives the same pairs.
    again = tmp_path / "again.parquet"
    result = CliRunner().invoke(
        app, ["link", "--left", str(left), "--right", str(right), "--out", str(again), "--model", str(model)]
    )
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(again).sort("pair_id").equals(pairs.sort("pair_id"))


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["link", "--left", str(tmp_path / "x"), "--right", str(tmp_path / "y"), "--out", str(tmp_path / "o")],
    )
    assert result.exit_code != 0


def test_too_few_usable_columns_is_one_clear_error_naming_them(tmp_path: Path) -> None:
    frame = generate_patient_frame(400, seed=5)
    left, right = tmp_path / "a.parquet", tmp_path / "b.parquet"
    # Names only on the left; names and birth date on the right: two comparisons, no blocking rule.
    keep = ["source_surface", "source_id", "given_name", "family_name"]
    frame.filter(pl.col("source_surface") == "fhir").select(keep).write_parquet(left)
    frame.filter(pl.col("source_surface") == "datamodel").select(*keep, "birth_date").write_parquet(right)

    result = CliRunner().invoke(
        app, ["link", "--left", str(left), "--right", str(right), "--out", str(tmp_path / "o.parquet")]
    )
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "identity link failed: too few columns usable on both sides to link" in text
    assert "Usable on both sides: given_name, family_name." in text
    assert "birth_date: empty on the left" in text
    assert "--model" in text  # what to do
    assert "Traceback" not in result.output and not (tmp_path / "o.parquet").exists()
    names = set(frame["family_name"].drop_nulls()) | set(frame["given_name"].drop_nulls())
    assert not [n for n in names if re.search(rf"\b{re.escape(n)}\b", result.output)]
