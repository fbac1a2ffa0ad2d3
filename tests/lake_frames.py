"""Small frames in the unified schema for the warehouse tests, whichever catalog they run on."""

import contextlib
import datetime as dt
import multiprocessing as mp
import queue
import random
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

import schema
from resources.warehouse import LAKE, Warehouse

# Rows per merge group in the concurrency tests.
GROUP = 7


def offline_duckdb(empty: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can get no extension but from the pinned wheels: no autoload or
    autoinstall, and both the extension folder and the repository any INSTALL would use are the
    empty folder ``empty`` (which a test then checks is still empty)."""
    empty.mkdir()
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "extension_directory": str(empty),
        }
    )
    con.execute(f"SET custom_extension_repository = '{empty}'")
    return con


def snapshots(wh: Warehouse) -> pl.DataFrame:
    """Every snapshot the lake still keeps, oldest first: id, time, changes, commit message, run_id."""
    return wh.query(f"SELECT * FROM ducklake_snapshots('{LAKE}') ORDER BY snapshot_id")


def set_watermark(wh: Warehouse, stream: str, ts: dt.datetime, run_id: str) -> None:
    """Move ``stream``'s watermark with nothing to queue: the pipeline's path, ``queue_changes``."""
    nothing = pl.DataFrame(schema={"table_name": pl.String(), "partition_day": pl.Date()})
    wh.queue_changes(stream, ts, nothing, run_id=run_id)


def clinical(table: str, ids: list[str], stamps: list[dt.datetime | None], tag: str = "v") -> pl.DataFrame:
    """One FHIR row per id of a clinical ``table``, each with its ``source_updated_at``."""
    frame = pl.DataFrame(
        {
            "source_surface": ["fhir"] * len(ids),
            "source_id": ids,
            "patient_source_id": [f"{tag}-{i}" for i in ids],
            "source_updated_at": stamps,
        },
        schema_overrides={"source_updated_at": schema.UTC_TS},
    )
    return schema.conform(frame.lazy(), table).collect()


def group_frame(group: int, version: int, rng: random.Random) -> pl.DataFrame:
    """GROUP results rows whose values sum to zero: a reader that saw half a merge sees another sum."""
    values = [float(rng.randint(-1000, 1000)) for _ in range(GROUP - 1)]
    values.append(-sum(values))
    stamp = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=version)
    frame = pl.DataFrame(
        {
            "source_surface": ["fhir"] * GROUP,
            "source_id": [f"g{group}-r{i}" for i in range(GROUP)],
            "patient_source_id": [f"p{group}"] * GROUP,
            "code": ["718-7"] * GROUP,
            "value_num": values,
            "effective_at": [stamp] * GROUP,
            "source_updated_at": [stamp] * GROUP,
        }
    )
    return schema.conform(frame.lazy(), "results").collect()


# ---- readers during writes ------------------------------------------------------------------------

# Each merge keeps three invariants in its one transaction, so a reader that saw half a merge (rows
# deleted but not re-inserted, or rows without their partition_loads record) breaks at least one:
# count(results) is a multiple of GROUP, sum(value_num) = 0, count(results) = sum(inserted).
CHECK_SQL = """
SELECT
    (SELECT count(*) FROM results) AS n,
    (SELECT coalesce(sum(value_num), 0) FROM results) AS total,
    (SELECT coalesce(sum(inserted), 0) FROM partition_loads WHERE table_name = 'results') AS inserted,
    (SELECT count(*) FROM results r JOIN results r2 USING (source_surface, source_id)) AS self_join
"""


def _reader(
    lake_dir: str,
    catalog: str | None,
    stop: "mp.synchronize.Event",
    ready: "mp.Queue[int]",
    out: "mp.Queue[dict[str, object]]",
    seed: int,
) -> None:
    rng = random.Random(seed)
    wh = Warehouse(lake_dir=lake_dir) if catalog is None else Warehouse(lake_dir=lake_dir, catalog=catalog)
    queries = 0
    errors: list[str] = []
    violations: list[str] = []
    states: set[int] = set()
    slowest = 0.0
    con = None
    try:
        while not stop.is_set():
            try:
                if con is None or rng.random() < 0.05:  # analysts also open fresh sessions mid-write
                    if con is not None:
                        con.close()
                    # A config the process has not attached yet forces a brand-new DuckDB instance
                    # and ATTACH (connections are otherwise cursors on one cached instance).
                    wh = wh.model_copy(update={"busy_timeout_ms": 30_000 + queries})
                    con = wh.connect()
                    # Many processes on a CI box's two cores: one thread each keeps the writer fed.
                    con.execute("SET threads = 1")
                started = time.monotonic()
                row = con.execute(CHECK_SQL).fetchone()
                slowest = max(slowest, time.monotonic() - started)
                assert row is not None
                n, total, inserted, self_join = row
                queries += 1
                if queries == 1:
                    ready.put(seed)
                states.add(int(n))
                if n % GROUP or total != 0 or n != inserted or self_join != n:
                    violations.append(f"n={n} sum={total} inserted={inserted} self_join={self_join}")
            except Exception:
                errors.append(traceback.format_exc(limit=3))
    finally:
        if con is not None:
            con.close()
        out.put(
            {
                "seed": seed,
                "queries": queries,
                "errors": errors[:5],
                "error_count": len(errors),
                "violations": violations[:5],
                "states": len(states),
                "slowest_query_s": round(slowest, 3),
            }
        )


@contextlib.contextmanager
def reader_processes(
    target: Callable[..., None], args: tuple[Any, ...], count: int, results: list[dict[str, Any]]
) -> Iterator[None]:
    """``count`` spawned processes run ``target(*args, stop, ready, out, seed)`` in a loop; the block
    runs once every one has answered a query, and on leaving it they stop and each one's report
    (what it put on ``out``) is appended to ``results``: a process that died reports nothing."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ready: mp.Queue[int] = ctx.Queue()
    out: mp.Queue[dict[str, Any]] = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, stop, ready, out, seed)) for seed in range(count)]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=180)
        yield
    finally:
        stop.set()
        for _ in procs:
            try:
                results.append(out.get(timeout=60))
            except queue.Empty:
                break
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def readers_during_merges(
    writer: Warehouse, *, reader_lake_dir: str, catalog: str | None, readers: int, batches: int
) -> tuple[list[dict[str, Any]], int]:
    """``readers`` processes query in a loop while ``writer`` merges ``batches`` groups (new ones,
    and every third a newer version of an old one), then one stale version that must change nothing.
    Returns each reader's report and the number of groups now in the lake."""
    rng = random.Random(7)
    day = dt.date(2024, 1, 1)
    writer.merge("results", group_frame(0, 0, rng), partition_day=day, run_id="seed", source_surface="fhir")
    results: list[dict[str, Any]] = []
    groups = 1
    with reader_processes(_reader, (reader_lake_dir, catalog), readers, results):
        for batch in range(1, batches + 1):
            if groups > 2 and batch % 3 == 0:
                group = rng.randrange(groups)
            else:
                group, groups = groups, groups + 1
            stats = writer.merge(
                "results",
                group_frame(group, batch, rng),
                partition_day=day,
                run_id=f"batch-{batch}",
                source_surface="fhir",
            )
            assert stats.inserted + stats.updated == GROUP
        stale = writer.merge(
            "results", group_frame(0, -1, rng), partition_day=day, run_id="stale", source_surface="fhir"
        )
        assert stale.ignored_older == GROUP and stale.inserted == stale.updated == 0
        time.sleep(1)
    return results, groups
