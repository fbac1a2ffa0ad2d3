"""`redox-etl sql` against a real lake: results as table/CSV/JSON/Parquet, a shell, and no writes."""

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import schema
from pipelines.sql import app
from resources.warehouse import Warehouse
from tests.lake_frames import snapshots

runner = CliRunner()
STAMP = dt.datetime(2024, 3, 10, 7, 30, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sql") / "lake"
    frame = pl.DataFrame(
        {
            "source_surface": ["fhir", "fhir"],
            "source_id": ["a", "b"],
            "identifiers": [[{"system": "urn:mrn", "value": "1"}], []],
            "source_updated_at": [STAMP, STAMP],
        },
        schema_overrides={"source_updated_at": schema.UTC_TS},
    )
    Warehouse(lake_dir=str(path)).merge(
        "patients",
        schema.conform(frame.lazy(), "patients").collect(),
        partition_day=STAMP.date(),
        run_id="run-1",
        source_surface="fhir",
    )
    return path


def _run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_a_query_prints_a_table(lake: Path) -> None:
    code, out, _ = _run("select count(*) as n from patients", "--lake", str(lake))
    assert code == 0
    assert "n" in out and "2" in out and "1 row" in out


def test_timestamps_print_in_utc(lake: Path) -> None:
    code, out, _ = _run("select source_updated_at from patients limit 1", "--lake", str(lake))
    assert code == 0 and "2024-03-10 07:30:00+00:00" in out


@pytest.mark.parametrize(
    "statement",
    [
        "insert into patients (source_id) values ('x')",
        "delete from patients",
        "update patients set given_name = 'x'",
        "drop table patients",
        "create table patients2 as select * from patients",
        "attach 'other.duckdb' as other",
        "copy patients to 'x.csv'",
        "select 1; delete from patients",  # a write hidden behind a read is refused before anything runs
    ],
)
def test_writes_are_refused_with_a_clear_message(lake: Path, statement: str) -> None:
    code, _, err = _run(statement, "--lake", str(lake))
    assert code == 1
    assert "refused" in err and "read-only" in err
    assert Warehouse(lake_dir=str(lake)).query("select count(*) from patients").item() == 2


def test_a_write_that_passes_the_check_still_meets_the_read_only_attach(lake: Path) -> None:
    code, _, err = _run("call ducklake_expire_snapshots('lake', older_than => now())", "--lake", str(lake))
    assert code == 1 and "read-only" in err
    assert snapshots(Warehouse(lake_dir=str(lake))).height >= 2


def test_csv_and_json_go_to_stdout_or_a_file(lake: Path, tmp_path: Path) -> None:
    code, out, _ = _run("select source_id from patients order by 1", "-f", "csv", "--lake", str(lake))
    assert code == 0 and out.splitlines() == ["source_id", "a", "b"]
    code, out, _ = _run(
        "select source_id, identifiers from patients order by 1", "-f", "json", "--lake", str(lake)
    )
    assert code == 0
    assert json.loads(out)[0] == {"source_id": "a", "identifiers": [{"system": "urn:mrn", "value": "1"}]}
    target = tmp_path / "p.csv"
    code, _, _ = _run("select * from patients", "-f", "csv", "-o", str(target), "--lake", str(lake))
    assert code == 0
    written = pl.read_csv(target).sort("source_id")
    assert written.height == 2
    assert json.loads(written.item(0, "identifiers")) == [{"system": "urn:mrn", "value": "1"}]


def test_parquet_needs_a_file_and_keeps_types(lake: Path, tmp_path: Path) -> None:
    code, _, _ = _run("select * from patients", "-f", "parquet", "--lake", str(lake))
    assert code != 0
    target = tmp_path / "p.parquet"
    code, _, _ = _run("select * from patients", "-f", "parquet", "-o", str(target), "--lake", str(lake))
    assert code == 0
    back = pl.read_parquet(target)
    assert back.height == 2
    assert back.schema["source_updated_at"] == pl.Datetime("us", "UTC")
    assert back.schema["identifiers"] == pl.List(schema.IDENTIFIER)


def test_the_shell_runs_statements_until_quit_and_survives_errors(lake: Path) -> None:
    script = "\n".join(
        [
            "select 41 + 1 as answer;",
            "select",
            "  count(*) as patients",
            "from patients;",
            "delete from patients;",
            "select * from no_such_table;",
            ".tables",
            ".schema sync_state",
            ".snapshots",
            ".quit",
            "select 'never reached' as x;",
        ]
    )
    code, out, err = _run("--lake", str(lake), stdin=script + "\n")
    assert code == 0
    assert "42" in out and "patients" in out and "partition_loads" in out and "watermark" in out
    assert "never reached" not in out
    assert "refused" in err and "no_such_table" in err
    assert Warehouse(lake_dir=str(lake)).query("select count(*) from patients").item() == 2


def test_a_missing_lake_is_explained(tmp_path: Path) -> None:
    code, _, err = _run("select 1", "--lake", str(tmp_path / "nowhere"))
    assert code == 1 and "nothing has been loaded" in err
