"""`redox-etl identity link` on files it cannot use: one line naming the file and the expected format.

Issue 13: a file that is not Parquet printed a polars traceback. Whatever is wrong with an input
(missing, not Parquet, wrong columns, wrong types, a bad model file), the command exits 2 with one
line that names the file, says what was expected and points at docs/identity.md, and echoes none
of the file's contents. The pairs it writes are owner-only.
"""

import stat
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from pipelines.identity_cli import app
from sandbox.population.people import generate_patient_frame

SECRET = "Zebediah-Quux"  # a "patient value" that must never be echoed


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("identity-inputs")
    frame = generate_patient_frame(200, seed=3).drop("person_id")
    left, right = folder / "a.parquet", folder / "b.parquet"
    frame.filter(pl.col("source_surface") == "fhir").write_parquet(left)
    frame.filter(pl.col("source_surface") == "datamodel").write_parquet(right)
    return left, right


def _link(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["link", *args])
    return result.exit_code, result.output


def _one_line_naming(output: str, path: Path) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "Traceback" not in output and SECRET not in output
    assert str(path) in lines[0]
    assert "docs/identity.md" in lines[0] or "--save-model" in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("patients.csv", f"source_surface,source_id,given_name\nfhir,1,{SECRET}\n"),
        ("patients.json", f'[{{"source_id": "1", "given_name": "{SECRET}"}}]'),
        ("empty.parquet", ""),
    ],
)
def test_a_file_that_is_not_parquet(tmp_path: Path, good: tuple[Path, Path], name: str, content: str) -> None:
    bad = tmp_path / name
    bad.write_text(content)
    code, output = _link("--left", str(bad), "--right", str(good[1]), "--out", str(tmp_path / "o.parquet"))
    assert code == 2
    line = _one_line_naming(output, bad)
    assert "--left" in line and "not a readable Parquet file" in line
    assert not (tmp_path / "o.parquet").exists()


def test_a_missing_file(tmp_path: Path, good: tuple[Path, Path]) -> None:
    missing = tmp_path / "nope.parquet"
    code, output = _link(
        "--left", str(good[0]), "--right", str(missing), "--out", str(tmp_path / "o.parquet")
    )
    assert code == 2
    assert "no such file" in _one_line_naming(output, missing)


def test_parquet_without_the_key_columns(tmp_path: Path, good: tuple[Path, Path]) -> None:
    bad = tmp_path / "names.parquet"
    pl.DataFrame({"given_name": [SECRET]}).write_parquet(bad)
    code, output = _link("--left", str(bad), "--right", str(good[1]), "--out", str(tmp_path / "o.parquet"))
    assert code == 2
    assert "source_id, source_surface" in _one_line_naming(output, bad)


def test_parquet_with_a_column_of_the_wrong_type(tmp_path: Path, good: tuple[Path, Path]) -> None:
    bad = tmp_path / "typed.parquet"
    pl.DataFrame(
        {"source_surface": ["fhir"], "source_id": ["1"], "given_name": [SECRET], "birth_date": [[1, 2]]}
    ).write_parquet(bad)
    code, output = _link("--left", str(bad), "--right", str(good[1]), "--out", str(tmp_path / "o.parquet"))
    assert code == 2
    assert "wrong type" in _one_line_naming(output, bad)


def test_a_model_that_is_not_json(tmp_path: Path, good: tuple[Path, Path]) -> None:
    model = tmp_path / "model.json"
    model.write_text("PAR1 not json")
    code, output = _link(
        "--left", str(good[0]), "--right", str(good[1]), "--out", str(tmp_path / "o"), "--model", str(model)
    )
    assert code == 2
    assert "--model" in _one_line_naming(output, model)


@pytest.mark.slow  # trains a model: seconds
def test_the_pairs_file_is_owner_only(tmp_path: Path, good: tuple[Path, Path]) -> None:
    out = tmp_path / "pairs.parquet"
    out.write_text("old")
    out.chmod(0o644)
    code, output = _link("--left", str(good[0]), "--right", str(good[1]), "--out", str(out))
    assert code == 0, output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert pl.read_parquet(out).height > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]
