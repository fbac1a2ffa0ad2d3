"""The warehouse against a real DuckLake in a temp folder: types, merges, transactions, reruns, locks.

No mocks: every test attaches a real SQLite-catalog lake with Parquet files, through the same
Warehouse methods the pipeline uses. Fault injection (a failure between the MERGE and the COMMIT, a
SIGKILLed writer) is done by really failing or killing, then reading what a reader would see.
"""

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import schema
from resources.warehouse import (
    ExtensionUnavailableError,
    LakeNotFoundError,
    SchemaMismatchError,
    Warehouse,
    WriterBusyError,
    lake_schemas,
    load_extensions,
    merge,
)
from resources.warehouse.extensions import wheel_binary
from tests.lake_frames import clinical as _clinical
from tests.lake_frames import offline_duckdb, set_watermark, snapshots

REPO = Path(__file__).resolve().parents[2]
DAY = dt.date(2024, 3, 10)
# A US daylight-saving switch day, with sub-second precision: a timezone slip would show here.
STAMP = dt.datetime(2024, 3, 10, 7, 30, 1, 123456, tzinfo=dt.UTC)

pytestmark = pytest.mark.usefixtures("isolated_lake_env")


@pytest.fixture
def wh(tmp_path: Path) -> Warehouse:
    return Warehouse(lake_dir=str(tmp_path / "lake"))


def _value(name: str, dtype: pl.DataType, row: int) -> object:
    if isinstance(dtype, pl.Datetime):
        return STAMP + dt.timedelta(hours=row)
    if isinstance(dtype, pl.Date):
        return dt.date(2024, 2, 29)
    if isinstance(dtype, pl.List) and dtype.inner == pl.String():
        return [f"{name}-{row}-a", f"{name}-{row}-b"]
    if isinstance(dtype, pl.List):
        return [{"system": "urn:mrn", "value": f"{row}-1"}, {"system": "urn:ssn", "value": None}]
    if isinstance(dtype, pl.Int32):
        return 42 + row
    if isinstance(dtype, pl.Int64):
        return 2**40 + row
    if isinstance(dtype, pl.Float64):
        return 1.5 + row
    return f"{name}-{row}-é"  # non-ASCII on purpose


def _frame(table: str, rows: int = 3, **constants: str) -> pl.DataFrame:
    """Rows with a value in every column, then one row with every optional column null / empty."""
    columns: dict[str, list[object]] = {}
    for name, dtype in schema.TABLES[table].items():
        values = [_value(name, dtype, row) for row in range(rows)]
        if name in constants:
            values = [constants[name]] * rows
        elif name == "source_id":
            values = [f"id-{row}" for row in range(rows)]
        elif rows > 1:
            values[-1] = [] if isinstance(dtype, pl.List) else None
        columns[name] = values
    return pl.DataFrame(columns, schema=schema.TABLES[table])


# ---- types ---------------------------------------------------------------------------------------


def test_lake_columns_have_the_declared_duckdb_types(wh: Warehouse) -> None:
    assert "patients" in wh.ensure_tables()
    types = wh.query(
        "SELECT table_name, column_name, data_type FROM duckdb_columns() WHERE database_name = 'lake'"
    )
    got = {(r["table_name"], r["column_name"]): r["data_type"] for r in types.iter_rows(named=True)}
    assert got[("patients", "identifiers")] == 'STRUCT("system" VARCHAR, "value" VARCHAR)[]'
    assert got[("patients", "source_updated_at")] == "TIMESTAMP WITH TIME ZONE"
    assert got[("patients", "birth_date")] == "DATE"
    assert got[("patients", "partition_day")] == "DATE"
    assert got[("appointments", "duration_min")] == "INTEGER"
    assert got[("api_calls", "bytes")] == "BIGINT"
    assert got[("results", "value_num")] == "DOUBLE"
    for table, columns in lake_schemas().items():
        assert [c for (t, c) in got if t == table] == list(columns), table


@pytest.mark.parametrize("table", sorted(schema.UNIFIED_TABLES))
def test_clinical_tables_round_trip_every_type(wh: Warehouse, table: str) -> None:
    frame = _frame(table, source_surface="fhir")
    wh.merge(table, frame, partition_day=DAY, run_id="run-1", source_surface="fhir")
    back = wh.query(f"SELECT * FROM {table} ORDER BY source_id")
    assert_frame_equal(back.select(frame.columns), frame)
    assert back.get_column("partition_day").to_list() == [DAY] * frame.height
    assert back.get_column("run_id").to_list() == ["run-1"] * frame.height
    assert back.schema["ingested_at"] == schema.UTC_TS
    # The session is UTC, so text renderings of TIMESTAMPTZ carry +00 and the stored instant.
    text = wh.query(f"SELECT CAST(source_updated_at AS VARCHAR) AS t FROM {table} ORDER BY source_id")
    assert text.item(0, 0) == "2024-03-10 07:30:01.123456+00"


def test_bookkeeping_tables_round_trip(wh: Warehouse) -> None:
    quarantine = _frame("quarantine", entity="results", source_surface="datamodel")
    wh.merge(
        "results",
        schema.empty("results"),
        partition_day=DAY,
        run_id="r",
        source_surface="datamodel",
        quarantine=quarantine,
    )
    assert_frame_equal(
        wh.query("SELECT * FROM quarantine ORDER BY source_id").select(quarantine.columns), quarantine
    )
    calls = _frame("api_calls", run_id="r")
    wh.append_api_calls(calls, run_id="r", step="extract_fhir_results")
    back = wh.query("SELECT * FROM api_calls ORDER BY called_at NULLS LAST")
    assert_frame_equal(back.select(calls.columns), calls)
    assert set(back.get_column("step")) == {"extract_fhir_results"}


# ---- merge ---------------------------------------------------------------------------------------


def test_merge_keeps_the_newest_version_and_counts_what_it_did(wh: Warehouse) -> None:
    t0 = STAMP
    first = wh.merge(
        "encounters",
        _clinical("encounters", ["a", "b"], [t0, t0], tag="v1"),
        partition_day=DAY,
        run_id="run-1",
        source_surface="fhir",
    )
    assert (first.inserted, first.updated, first.ignored_older, first.total) == (2, 0, 0, 2)

    batch = _clinical(
        "encounters",
        ["a", "b", "c", "d", "d"],
        [t0 - dt.timedelta(minutes=1), t0, t0, t0, t0 + dt.timedelta(hours=1)],
        tag="v2",
    )
    second = wh.merge("encounters", batch, partition_day=DAY, run_id="run-2", source_surface="fhir")
    assert second.as_metadata() == {
        "rows": 5,
        "inserted": 2,  # c, d
        "updated": 1,  # b: equal timestamp, so a rerun replaces
        "ignored_older": 1,  # a: older than what the lake holds
        "duplicates": 1,  # d came twice; only the newest version is merged
    }
    rows = wh.query("SELECT source_id, patient_source_id, source_updated_at, run_id FROM encounters")
    got = {r[0]: r[1:] for r in rows.sort("source_id").iter_rows()}
    assert got == {
        "a": ("v1-a", t0, "run-1"),
        "b": ("v2-b", t0, "run-2"),
        "c": ("v2-c", t0, "run-2"),
        "d": ("v2-d", t0 + dt.timedelta(hours=1), "run-2"),
    }
    loads = wh.query("SELECT run_id, rows, inserted, updated, ignored_older FROM partition_loads ORDER BY 1")
    assert loads.rows() == [("run-1", 2, 2, 0, 0), ("run-2", 5, 2, 1, 1)]


def test_merge_can_replace_the_partitions_quarantine_in_the_same_transaction(wh: Warehouse) -> None:
    good = _clinical("results", ["a", "b"], [STAMP] * 2)
    bad = _frame("quarantine", rows=3, entity="results", source_surface="fhir")
    for run in ("run-1", "run-2"):  # a rerun replaces both shares
        stats = wh.merge(
            "results", good, partition_day=DAY, run_id=run, source_surface="fhir", quarantine=bad
        )
        assert stats.as_metadata()["quarantined"] == 3
    assert wh.query("SELECT count(*), min(run_id) FROM quarantine").row(0) == (3, "run-2")
    loads = wh.query("SELECT run_id, rows, quarantined FROM partition_loads ORDER BY loaded_at")
    assert loads.rows() == [("run-1", 2, 3), ("run-2", 2, 3)]
    # Without it, partition_loads says the quarantine was not part of this load.
    plain = wh.merge("results", good, partition_day=DAY, run_id="run-3", source_surface="fhir")
    assert plain.quarantined is None and "quarantined" not in plain.as_metadata()
    with pytest.raises(ValueError, match="entity"):
        wh.merge(
            "encounters",
            _clinical("encounters", ["e"], [STAMP]),
            partition_day=DAY,
            run_id="x",
            source_surface="fhir",
            quarantine=bad,
        )


def test_merge_of_an_identical_rerun_replaces_without_duplicating(wh: Warehouse) -> None:
    frame = _clinical("results", [f"r{i}" for i in range(50)], [STAMP] * 50)
    for run in ("run-1", "run-2"):
        wh.merge("results", frame, partition_day=DAY, run_id=run, source_surface="fhir")
    assert wh.query("SELECT count(*), min(run_id), max(run_id) FROM results").row(0) == (50, "run-2", "run-2")


def test_merge_treats_a_missing_timestamp_as_never_older(wh: Warehouse) -> None:
    wh.merge(
        "patients",
        _clinical("patients", ["p"], [STAMP]),
        partition_day=DAY,
        run_id="1",
        source_surface="fhir",
    )
    stats = wh.merge(
        "patients", _clinical("patients", ["p"], [None]), partition_day=DAY, run_id="2", source_surface="fhir"
    )
    assert stats.updated == 1
    assert wh.query("SELECT run_id FROM patients").item() == "2"


def test_merge_refuses_frames_that_break_the_contract(wh: Warehouse) -> None:
    frame = _clinical("results", ["Jane-Doe-1970"], [STAMP])
    with pytest.raises(ValueError, match="value_num") as excinfo:
        wh.merge(
            "results",
            frame.with_columns(pl.col("value_num").cast(pl.String)),
            partition_day=DAY,
            run_id="r",
            source_surface="fhir",
        )
    assert "Jane" not in str(excinfo.value)  # column names only, never a row's values
    with pytest.raises(ValueError, match="source_surface") as excinfo:
        wh.merge("results", frame, partition_day=DAY, run_id="r", source_surface="datamodel")
    assert "Jane" not in str(excinfo.value)
    with pytest.raises(ValueError, match="clinical"):
        wh.merge("quarantine", frame, partition_day=DAY, run_id="r", source_surface="fhir")


def test_an_empty_partition_is_still_recorded_as_loaded(wh: Warehouse) -> None:
    stats = wh.merge(
        "appointments", schema.empty("appointments"), partition_day=DAY, run_id="r", source_surface="fhir"
    )
    assert stats.total == stats.inserted == 0
    assert wh.query("SELECT table_name, rows FROM partition_loads").rows() == [("appointments", 0)]


def test_a_failure_mid_merge_leaves_nothing_visible(wh: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    wh.merge(
        "results",
        _clinical("results", ["a", "b"], [STAMP] * 2),
        partition_day=DAY,
        run_id="1",
        source_surface="fhir",
    )
    before_rows = wh.query("SELECT * FROM results ORDER BY source_id")
    before_snapshots = snapshots(wh).height

    def fail_after_the_merge_statement(con: duckdb.DuckDBPyConnection, *args: object) -> None:
        # The MERGE has run inside the transaction; its effect is visible to this connection...
        assert con.execute("SELECT count(*) FROM results").fetchone() == (4,)
        raise RuntimeError("disk full (injected)")

    monkeypatch.setattr(merge, "record_load", fail_after_the_merge_statement)
    later = STAMP + dt.timedelta(days=1)
    with pytest.raises(RuntimeError, match="injected"):
        wh.merge(
            "results",
            _clinical("results", ["a", "b", "c", "d"], [later] * 4, tag="v2"),
            partition_day=DAY,
            run_id="2",
            source_surface="fhir",
            quarantine=_frame("quarantine", entity="results", source_surface="fhir"),
        )
    monkeypatch.undo()
    # ...and to nobody else, ever: no rows, no quarantine, no load record, no snapshot.
    assert_frame_equal(wh.query("SELECT * FROM results ORDER BY source_id"), before_rows)
    assert wh.query("SELECT count(*) FROM quarantine").item() == 0
    assert wh.query("SELECT run_id FROM partition_loads").rows() == [("1",)]
    assert snapshots(wh).height == before_snapshots


_CRASHING_WRITER = textwrap.dedent(
    """
    import datetime as dt, sys, time
    import polars as pl
    from resources.warehouse import Warehouse, merge
    import schema
    lake, n, stop_inside = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "inside"
    if stop_inside:
        record_load = merge.record_load
        def stall(con, *args):
            record_load(con, *args)  # MERGE done, Parquet written, COMMIT not yet run
            print("inside", flush=True)
            time.sleep(120)
        merge.record_load = stall
    frame = schema.conform(pl.LazyFrame({
        "source_surface": ["fhir"] * n,
        "source_id": [f"k{i}" for i in range(n)],
        "code": ["718-7"] * n,
        "value_num": [float(i % 1000) for i in range(n)],
        "source_updated_at": [dt.datetime(2024, 1, 2, tzinfo=dt.UTC)] * n,
    }, schema_overrides={"source_updated_at": schema.UTC_TS}), "results").collect()
    print("merging", flush=True)
    Warehouse(lake_dir=lake).merge(
        "results", frame, partition_day=dt.date(2024, 1, 2), run_id="crash", source_surface="fhir")
    print("done", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["inside", 0.0, 0.5, 1.5])
def test_a_writer_killed_mid_merge_leaves_all_or_nothing(wh: Warehouse, when: str | float) -> None:
    """SIGKILL at a random moment, and once deterministically between the MERGE and the COMMIT."""
    rows = 300_000
    seed = _clinical("results", ["seed"], [STAMP])
    wh.merge("results", seed, partition_day=DAY, run_id="seed", source_surface="fhir")
    mode = "inside" if when == "inside" else "random"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_WRITER, str(wh.lake_path), str(rows), mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "merging"
    if when == "inside":
        assert proc.stdout.readline().strip() == "inside"
    else:
        time.sleep(float(when))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    count, loads = wh.query(
        "SELECT (SELECT count(*) FROM results), (SELECT count(*) FROM partition_loads WHERE run_id = 'crash')"
    ).row(0)
    assert (count, loads) in ((1, 0), (rows + 1, 1)), (count, loads)
    data = wh.lake_path / "data" / "main" / "results"
    if when == "inside":
        assert (count, loads) == (1, 0)
        assert len(list(data.glob("*.parquet"))) > 1  # the dead writer's uncommitted file is there
    # The kernel released the dead writer's lock, so the next writer proceeds, and maintenance
    # deletes the Parquet files the dead writer wrote but never committed.
    after = _clinical("results", ["after"], [STAMP])
    wh.merge("results", after, partition_day=DAY, run_id="after", source_surface="fhir")
    report = wh.maintain(expire_older_than=dt.timedelta(0), delete_files_older_than=dt.timedelta(0))
    if when == "inside":
        assert report.orphans_deleted >= 1
    tracked = {
        Path(p).name
        for p in wh.query("SELECT data_file FROM ducklake_list_files('lake', 'results')")["data_file"]
    }
    assert {p.name for p in data.glob("*.parquet")} == tracked
    assert wh.query("SELECT count(*) FROM results").item() == count + 1


# ---- quarantine, api_calls, watermarks ---------------------------------------------------------


def test_quarantine_rerun_replaces_its_partition_only(wh: Warehouse) -> None:
    def load(day: dt.date, n: int, run: str) -> int:
        frame = _frame("quarantine", rows=max(n, 1), entity="results", source_surface="fhir").head(n)
        stats = wh.merge(
            "results",
            schema.empty("results"),
            partition_day=day,
            run_id=run,
            source_surface="fhir",
            quarantine=frame,
        )
        assert stats.quarantined is not None
        return stats.quarantined

    day2 = DAY + dt.timedelta(days=1)
    assert load(DAY, 3, "run-1") == 3
    assert load(day2, 2, "run-1") == 2
    assert load(DAY, 1, "run-2") == 1  # the rerun of DAY replaces, day2 untouched
    got = wh.query("SELECT partition_day, run_id, count(*) FROM quarantine GROUP BY ALL ORDER BY 1")
    assert got.rows() == [(DAY, "run-2", 1), (day2, "run-1", 2)]
    load(DAY, 0, "run-3")  # a rerun that quarantines nothing empties that partition's share
    assert wh.query("SELECT count(*) FROM quarantine WHERE partition_day = ?", [DAY]).item() == 0
    with pytest.raises(ValueError, match="entity"):
        wh.merge(
            "results",
            schema.empty("results"),
            partition_day=DAY,
            run_id="x",
            source_surface="fhir",
            quarantine=_frame("quarantine", entity="patients", source_surface="fhir"),
        )


def test_api_calls_are_idempotent_per_run_and_step(wh: Warehouse) -> None:
    calls = _frame("api_calls", rows=3, run_id="run-1")
    wh.append_api_calls(calls, run_id="run-1", step="a")
    wh.append_api_calls(calls, run_id="run-1", step="a")  # the step retried
    wh.append_api_calls(calls.head(2), run_id="run-1", step="b")
    got = wh.query("SELECT step, count(*) FROM api_calls GROUP BY ALL ORDER BY 1").rows()
    assert got == [("a", 3), ("b", 2)]
    with pytest.raises(ValueError, match="run_id"):
        wh.append_api_calls(calls, run_id="run-2", step="a")


def test_watermarks_round_trip_in_utc(wh: Warehouse) -> None:
    assert wh.get_watermark("fhir/results") is None  # no lake yet: no watermark, no error
    plus2 = dt.timezone(dt.timedelta(hours=2))
    set_watermark(wh, "fhir/results", dt.datetime(2024, 5, 1, 12, 0, tzinfo=plus2), "run-1")
    set_watermark(wh, "datamodel/results", STAMP, "run-1")
    got = wh.get_watermark("fhir/results")
    assert got == dt.datetime(2024, 5, 1, 10, 0, tzinfo=dt.UTC) and got.utcoffset() == dt.timedelta(0)
    set_watermark(wh, "fhir/results", STAMP, "run-2")
    assert wh.get_watermark("fhir/results") == STAMP
    assert wh.query("SELECT count(*) FROM sync_state").item() == 2
    with pytest.raises(ValueError, match="naive"):
        set_watermark(wh, "fhir/results", dt.datetime(2024, 1, 1), "run-3")


def test_derived_tables_are_replaced_whole(wh: Warehouse) -> None:
    links = pl.DataFrame(
        {"source_surface": ["fhir", "datamodel"], "source_id": ["a", "b"], "person_key": [1, 1]}
    )
    wh.write_derived(run_id="run-1", message="links", replace={"person_links": links})
    wh.write_derived(run_id="run-2", message="links", replace={"person_links": links.head(1)})
    assert_frame_equal(wh.query("SELECT * FROM person_links"), links.head(1))
    with pytest.raises(ValueError, match="loaded table"):
        wh.write_derived(run_id="x", message="links", replace={"patients": links})


# ---- readers, snapshots, maintenance, schema -------------------------------------------------


def test_readers_cannot_write_and_writers_need_the_lock(wh: Warehouse) -> None:
    wh.ensure_tables()
    with wh.connect() as con, pytest.raises(duckdb.Error, match="read-only"):
        con.execute("INSERT INTO sync_state (stream) VALUES ('x')")
    with pytest.raises(RuntimeError, match="writer"):
        wh.connect(read_only=False)
    with wh.writer() as con:
        con.execute("SELECT 1")
        wh.connect(read_only=False).close()  # allowed while this process holds the lock


def test_a_lake_deleted_and_recreated_at_the_same_path_is_a_new_lake(wh: Warehouse) -> None:
    wh.merge(
        "patients",
        _clinical("patients", ["old"], [STAMP]),
        partition_day=DAY,
        run_id="1",
        source_surface="fhir",
    )
    assert wh.query("SELECT source_id FROM patients").rows() == [("old",)]
    shutil.rmtree(wh.lake_path)
    wh.merge(
        "patients",
        _clinical("patients", ["new"], [STAMP]),
        partition_day=DAY,
        run_id="2",
        source_surface="fhir",
    )
    assert wh.query("SELECT source_id FROM patients").rows() == [("new",)]
    assert wh.query("SELECT run_id FROM partition_loads").rows() == [("2",)]


def test_reading_a_lake_that_does_not_exist_says_so(tmp_path: Path) -> None:
    with pytest.raises(LakeNotFoundError, match="nothing has been loaded"):
        Warehouse(lake_dir=str(tmp_path / "nowhere")).connect()


def test_snapshots_label_each_load_and_allow_time_travel(wh: Warehouse) -> None:
    wh.merge(
        "patients",
        _clinical("patients", ["a"], [STAMP]),
        partition_day=DAY,
        run_id="run-1",
        source_surface="fhir",
    )
    first = (
        snapshots(wh).filter(pl.col("commit_message").str.starts_with("merge patients")).row(0, named=True)
    )
    wh.merge(
        "patients",
        _clinical("patients", ["b"], [STAMP]),
        partition_day=DAY,
        run_id="run-2",
        source_surface="fhir",
    )
    assert first["author"] == "redox-etl" and '"run_id": "run-1"' in first["commit_extra_info"]
    version = first["snapshot_id"]
    assert wh.query(f"SELECT count(*) FROM patients AT (VERSION => {version})").item() == 1
    assert wh.query("SELECT count(*) FROM patients").item() == 2


def test_maintenance_compacts_files_and_expires_snapshots(wh: Warehouse) -> None:
    for i in range(6):
        frame = _clinical("results", [f"r{i}"], [STAMP])
        wh.merge("results", frame, partition_day=DAY, run_id=f"run-{i}", source_surface="fhir")
    files = "SELECT count(*) FROM ducklake_list_files('lake', 'results')"
    before = wh.query(files).item()
    content = wh.query("SELECT * FROM results ORDER BY source_id")
    report = wh.maintain(expire_older_than=dt.timedelta(0), delete_files_older_than=dt.timedelta(0))
    assert report.files_merged > 0 and report.snapshots_expired > 0
    assert wh.query(files).item() < before
    assert_frame_equal(wh.query("SELECT * FROM results ORDER BY source_id"), content)
    assert snapshots(wh).height < 8


def test_ensure_tables_adds_new_columns_and_refuses_type_drift(wh: Warehouse) -> None:
    wh.ensure_tables()
    with wh.writer() as con:
        con.execute("ALTER TABLE encounters DROP COLUMN reason")
    assert wh.ensure_tables() == ["encounters.reason"]
    assert wh.ensure_tables() == []
    with wh.writer() as con:
        con.execute("ALTER TABLE encounters DROP COLUMN reason")
        con.execute("ALTER TABLE encounters ADD COLUMN reason INTEGER")
    with pytest.raises(SchemaMismatchError, match=r"encounters\.reason"):
        wh.ensure_tables()


# ---- single writer -------------------------------------------------------------------------------

_LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from resources.warehouse.lock import writer_lock
    with writer_lock(Path(sys.argv[1]), timeout=5):
        print("held", flush=True)
        time.sleep(120)
    """
)


def test_a_second_writer_waits_for_the_lock_and_a_dead_holder_releases_it(wh: Warehouse) -> None:
    wh.ensure_tables()
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(wh.lake_path / ".writer.lock")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        impatient = wh.model_copy(update={"writer_lock_timeout_s": 0.5})
        with pytest.raises(WriterBusyError, match=f"pid={holder.pid}"):
            set_watermark(impatient, "s", STAMP, "r")
        # Readers are not writers: they read while the lock is held.
        assert wh.query("SELECT count(*) FROM sync_state").item() == 0
    finally:
        holder.kill()
        holder.wait(timeout=30)
    set_watermark(wh.model_copy(update={"writer_lock_timeout_s": 5.0}), "s", STAMP, "r")
    assert wh.get_watermark("s") == STAMP


# ---- extensions ----------------------------------------------------------------------------------


def test_extensions_load_from_the_wheels_with_no_network_and_no_cache(tmp_path: Path) -> None:
    empty = tmp_path / "extensions"
    con = offline_duckdb(empty)
    load_extensions(con, ["ducklake", "sqlite_scanner"])
    loaded = {
        r[0] for r in con.execute("SELECT extension_name FROM duckdb_extensions() WHERE loaded").fetchall()
    }
    assert {"ducklake", "sqlite_scanner"} <= loaded
    assert list(empty.iterdir()) == []  # nothing was installed or downloaded
    con.execute(f"ATTACH 'ducklake:sqlite:{tmp_path}/c.sqlite' AS lake (DATA_PATH '{tmp_path}/data')")
    con.execute("CREATE TABLE lake.t AS SELECT TIMESTAMPTZ '2024-01-01 00:00:00+00' AS ts")
    assert con.execute("SELECT count(*) FROM lake.t").fetchone() == (1,)
    assert wheel_binary("ducklake") is not None

    with pytest.raises(ExtensionUnavailableError, match="no_such_extension") as excinfo:
        load_extensions(con, ["no_such_extension"])
    assert "uv sync --frozen" in str(excinfo.value)
