"""`redox-etl sql` is safe to hand an analyst (issue 13, item 6).

Data prints literally (no Rich markup, no emoji codes, no crash on ``[/]``); the session reads the
lake and nothing else, and says so in one line; files it writes are owner-only; ``.tables`` lists
the views beside the tables.
"""

import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import schema
from pipelines.sql import app
from resources.warehouse import Warehouse

runner = CliRunner()
TRICKY = "Dr. [i]X [/] :x:"


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sql-contained") / "lake"
    frame = pl.DataFrame(
        {
            "source_surface": ["fhir"],
            "source_id": ["p1"],
            "given_name": [TRICKY],
            "family_name": ["[bold]Y"],
            "source_updated_at": [dt.datetime(2026, 1, 5, tzinfo=dt.UTC)],
        },
        schema_overrides={"source_updated_at": schema.UTC_TS},
    )
    warehouse = Warehouse(lake_dir=str(path))
    warehouse.merge(
        "patients",
        schema.conform(frame.lazy(), "patients").collect(),
        partition_day=dt.date(2026, 1, 5),
        run_id="run-1",
        source_surface="fhir",
    )
    with warehouse.writer() as con:
        con.execute("CREATE VIEW lake.patients_by_person AS SELECT source_id, given_name FROM lake.patients")
    # What must stay out of reach: a file beside the lake, like the sandbox's credentials.
    (path.parent / "credentials.json").write_text('{"secret": "s3cr3t"}')
    return path


def _run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_values_print_literally(lake: Path) -> None:
    code, out, err = _run("select given_name, family_name from patients", "--lake", str(lake))
    assert code == 0, err
    assert TRICKY in out and "[bold]Y" in out
    assert "❌" not in out
    code, out, _ = _run(f"select '{TRICKY}' AS \"[red]col\"", "--lake", str(lake))
    assert code == 0 and TRICKY in out and "[red]col" in out


def test_values_print_literally_in_the_shell(lake: Path) -> None:
    code, out, _ = _run("--lake", str(lake), stdin="select given_name from patients;\n.quit\n")
    assert code == 0 and TRICKY in out


def test_an_error_quoting_data_prints_it_literally(lake: Path) -> None:
    code, _, err = _run("select cast(given_name as integer) from patients", "--lake", str(lake))
    assert code == 1
    assert TRICKY in err and "Traceback" not in err


@pytest.mark.parametrize(
    "query",
    [
        "select * from read_text('/etc/hostname')",
        "select * from read_csv('/etc/passwd')",
        "select * from glob('/*')",
        "select * from read_text('{lake}/../credentials.json')",
        "select * from read_text('{lake}/data/../../credentials.json')",
    ],
)
def test_files_outside_the_lake_are_refused_in_one_line(lake: Path, query: str) -> None:
    code, out, err = _run(query.format(lake=lake), "--lake", str(lake))
    assert code == 1
    assert "s3cr3t" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("refused:") and "reads only the lake" in lines[0]


def test_the_lock_cannot_be_lifted(lake: Path) -> None:
    code, _, err = _run(
        "set enable_external_access = true; select * from read_text('/etc/hostname')", "--lake", str(lake)
    )
    assert code == 1 and "locked" in err


def test_the_lake_itself_still_reads_including_time_travel(lake: Path) -> None:
    code, out, err = _run(
        "select count(*) as n from patients at (version => 1); "
        "select count(*) > 1 as several from ducklake_snapshots('lake')",
        "--lake",
        str(lake),
    )
    assert code == 0, err
    assert out.count("1 row") == 2 and "True" in out


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_exports_are_owner_only(lake: Path, tmp_path: Path, fmt: str) -> None:
    target = tmp_path / f"out.{fmt}"
    target.write_text("old")
    target.chmod(0o644)  # an earlier world-readable file is replaced, not reused
    code, _, err = _run("select * from patients", "-f", fmt, "-o", str(target), "--lake", str(lake))
    assert code == 0, err
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    frame = {"csv": pl.read_csv, "json": pl.read_json, "parquet": pl.read_parquet}[fmt](target)
    assert frame["given_name"].to_list() == [TRICKY]
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no staging file left


def test_tables_lists_views_too(lake: Path) -> None:
    code, out, _ = _run("--lake", str(lake), stdin=".tables\n.schema patients_by_person\n")
    assert code == 0
    assert "patients_by_person" in out and "view" in out and "given_name" in out


@pytest.mark.slow  # the installed command imports the whole project: seconds on a busy machine
def test_the_installed_command_refuses_reading_a_host_file(lake: Path) -> None:
    command = Path(sys.executable).with_name("redox-etl")
    env = {**os.environ, "REDOX_ETL_LAKE": str(lake)}
    done = subprocess.run(
        [str(command), "sql", "select * from read_text('/etc/hostname')"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "refused:" in done.stderr
    hostname = Path("/etc/hostname").read_text().strip()
    assert not hostname or hostname not in done.stdout
