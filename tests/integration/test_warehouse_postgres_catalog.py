"""The warehouse with its DuckLake catalog in a real Postgres server (pgserver), Parquet in a folder.

The SQLite-catalog tests (test_warehouse_lake.py, test_warehouse_concurrency.py) hold the lake to
its invariants; these hold the shared-catalog configuration to the essential ones: the extensions
load from the pinned wheels with no network, a merge commits one labelled snapshot that a reader
elsewhere sees, a failed merge leaves nothing, readers cannot write, reader processes querying while
the writer merges see only whole merges, and no error shows the catalog's password.

One server per module on 127.0.0.1; each test gets its own database, so each is a new lake.
"""

import datetime as dt
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import polars as pl
import pytest

from resources.warehouse import LakeNotFoundError, Warehouse, load_extensions, merge
from resources.warehouse.extensions import wheel_binary
from tests.lake_frames import GROUP, offline_duckdb, readers_during_merges, snapshots
from tests.lake_frames import clinical as _clinical
from tests.servers import Postgres, postgres_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("warehouse-postgres"),
    pytest.mark.usefixtures("isolated_lake_env"),
]

DAY = dt.date(2024, 3, 10)
STAMP = dt.datetime(2024, 3, 10, 7, 30, 1, 123456, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def catalog(postgres: Postgres) -> str:
    """``postgres:<conninfo>`` of a new, empty database: the form REDOX_LAKE_CATALOG takes."""
    dbname = f"lake_{uuid.uuid4().hex[:8]}"
    postgres.create_database(dbname)
    return f"postgres:{postgres.conninfo(dbname)}"


@pytest.fixture
def writer(catalog: str, tmp_path: Path) -> Warehouse:
    return Warehouse(lake_dir=str(tmp_path / "writer"), catalog=catalog, data_path=str(tmp_path / "data"))


@pytest.fixture
def reader(catalog: str, tmp_path: Path) -> Warehouse:
    # Another machine: its own lake folder (nothing there), the same catalog, no data path setting.
    return Warehouse(lake_dir=str(tmp_path / "reader"), catalog=catalog)


def test_extensions_load_from_the_wheels_and_attach_postgres_offline(
    postgres: Postgres, tmp_path: Path
) -> None:
    assert wheel_binary("postgres_scanner") is not None
    empty = tmp_path / "extensions"
    con = offline_duckdb(empty)
    load_extensions(con, ["ducklake", "postgres_scanner"])
    assert list(empty.iterdir()) == []  # nothing was installed or downloaded
    postgres.create_database("offline")
    con.execute(
        f"ATTACH 'ducklake:postgres:{postgres.conninfo('offline')}' AS lake (DATA_PATH '{tmp_path}/data')"
    )
    con.execute("CREATE TABLE lake.t AS SELECT TIMESTAMPTZ '2024-01-01 00:00:00+00' AS ts")
    assert con.execute("SELECT count(*) FROM lake.t").fetchone() == (1,)


def test_a_merge_commits_one_snapshot_that_a_reader_elsewhere_sees(
    writer: Warehouse, reader: Warehouse
) -> None:
    with pytest.raises(LakeNotFoundError, match="nothing has been loaded"):
        reader.query("SELECT 1")
    first = writer.merge(
        "encounters",
        _clinical("encounters", ["a", "b"], [STAMP, STAMP], tag="v1"),
        partition_day=DAY,
        run_id="run-1",
        source_surface="fhir",
    )
    assert (first.inserted, first.updated) == (2, 0)
    batch = _clinical(
        "encounters", ["a", "b", "c"], [STAMP - dt.timedelta(minutes=1), STAMP, STAMP], tag="v2"
    )
    second = writer.merge("encounters", batch, partition_day=DAY, run_id="run-2", source_surface="fhir")
    assert second.as_metadata() == {
        "rows": 3,
        "inserted": 1,
        "updated": 1,
        "ignored_older": 1,
        "duplicates": 0,
    }

    rows = reader.query("SELECT source_id, patient_source_id, source_updated_at, run_id FROM encounters")
    assert sorted(rows.iter_rows()) == [
        ("a", "v1-a", STAMP, "run-1"),
        ("b", "v2-b", STAMP, "run-2"),
        ("c", "v2-c", STAMP, "run-2"),
    ]
    loads = reader.query(
        "SELECT run_id, rows, inserted, updated, ignored_older FROM partition_loads ORDER BY 1"
    )
    assert loads.rows() == [("run-1", 2, 2, 0, 0), ("run-2", 3, 1, 1, 1)]
    # Each load is one snapshot, labelled, and time travel reads the lake as it was.
    merges = snapshots(reader).filter(pl.col("commit_message").str.starts_with("merge encounters"))
    assert merges.height == 2 and set(merges.get_column("author")) == {"redox-etl"}
    assert merges.get_column("snapshot_id").to_list() == [first.snapshot_id, second.snapshot_id]
    version = first.snapshot_id
    assert reader.query(f"SELECT count(*) FROM encounters AT (VERSION => {version})").item() == 2
    # The Parquet files are where the writer's data path says, not in either lake folder.
    assert list(Path(writer.data_location).rglob("*.parquet"))


def test_readers_cannot_write_and_a_failed_merge_leaves_nothing(
    writer: Warehouse, reader: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer.merge(
        "results", _clinical("results", ["a"], [STAMP]), partition_day=DAY, run_id="1", source_surface="fhir"
    )
    with reader.connect() as con, pytest.raises(duckdb.Error, match="read-only"):
        con.execute("INSERT INTO sync_state (stream) VALUES ('x')")
    before = snapshots(reader).height

    def fail_after_the_merge_statement(con: duckdb.DuckDBPyConnection, *args: object) -> None:
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(merge, "record_load", fail_after_the_merge_statement)
    with pytest.raises(RuntimeError, match="injected"):
        writer.merge(
            "results",
            _clinical("results", ["a", "b", "c"], [STAMP + dt.timedelta(days=1)] * 3, tag="v2"),
            partition_day=DAY,
            run_id="2",
            source_surface="fhir",
        )
    monkeypatch.undo()
    assert reader.query("SELECT source_id, run_id FROM results").rows() == [("a", "1")]
    assert reader.query("SELECT run_id FROM partition_loads").rows() == [("1",)]
    assert snapshots(reader).height == before


def test_no_error_shows_the_catalogs_password(postgres: Postgres, tmp_path: Path) -> None:
    # DuckDB's ATTACH errors quote the conninfo; trust authentication ignores the password here.
    postgres.create_database("secret_lake")
    with_password = f"postgres:{postgres.conninfo('secret_lake')} password=hunter2"
    with pytest.raises(LakeNotFoundError) as not_yet:
        Warehouse(lake_dir=str(tmp_path / "r"), catalog=with_password).connect()
    unreachable = (
        f"postgres:dbname=lake host=127.0.0.1 port={postgres.port + 1} user=postgres password=hunter2"
    )
    # The writer's first contact is its advisory lock (psycopg), or DuckDB's ATTACH without one.
    with pytest.raises((duckdb.Error, ConnectionError)) as refused:
        Warehouse(
            lake_dir=str(tmp_path / "w"), catalog=unreachable, data_path=str(tmp_path / "d")
        ).ensure_tables()
    for excinfo in (not_yet, refused):
        shown = "".join(traceback.format_exception(excinfo.value))
        assert "hunter2" not in shown and "password=***" in shown


# ---- readers during writes -----------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_reader_processes_see_only_whole_merges_while_the_writer_commits(
    writer: Warehouse, reader: Warehouse, catalog: str
) -> None:
    results, groups = readers_during_merges(
        writer, reader_lake_dir=str(reader.lake_path), catalog=catalog, readers=2, batches=8
    )
    print("readers:", results)
    assert len(results) == 2, "a reader process died without reporting"
    for result in results:
        assert result["error_count"] == 0, result["errors"]
        assert not result["violations"], result["violations"]
        assert isinstance(result["states"], int) and result["states"] >= 2, result  # saw writes land
    assert reader.query("SELECT count(*), sum(value_num) FROM results").row(0) == (groups * GROUP, 0.0)
