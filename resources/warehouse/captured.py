"""Bookkeeping of what was loaded and what it held: ``field_coverage`` rows, ``captured_files`` rows,
the quarantine of captured files, and the ``source_pages`` view over the landing zone.

Invariants:
- each call is ONE transaction (one snapshot);
- ``replace_coverage`` replaces the rows of exactly the (surface, entity, partition) it is given,
  so reloading a partition never counts its records twice;
- a captured file's quarantine rows have no partition day and a ``raw_ref`` naming its landed
  folder (``.../load=<sha256>/...``), so a pulled day's reload (which replaces its day's
  quarantine) never touches them and a reload of the file replaces them;
- file names are written to the lake only, never logged (they may hold PHI): logs name hashes.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from resources.warehouse.connection import LAKE
from resources.warehouse.transaction import Writer, registered, transaction, utcnow
from schema import CAPTURED_FILES, FIELD_COVERAGE, LINEAGE, QUARANTINE

log = logging.getLogger(__name__)

# The view that puts every landed page beside its ``raw_ref`` (the rows' ``source_ref``).
SOURCE_PAGES_VIEW = "source_pages"


def replace_coverage(
    writer: Writer, coverage: pl.DataFrame, partitions: Sequence[tuple[str, str, str]], *, run_id: str
) -> None:
    """Make ``field_coverage``'s rows of each (surface, entity, partition) those of ``coverage``
    (columns surface, entity, partition, path, records, mapped)."""
    staged = coverage.with_columns(
        pl.lit(run_id, pl.String()).alias("run_id"),
        pl.lit(utcnow(), LINEAGE["ingested_at"]).alias("computed_at"),
    ).select([pl.col(c).cast(t) for c, t in FIELD_COVERAGE.items()])
    keys = pl.DataFrame(partitions, schema=["surface", "entity", "partition"], orient="row")
    target = f"{LAKE}.main.field_coverage"
    key = "concat_ws('/', surface, entity, \"partition\")"
    with (
        writer() as con,
        registered(con, "_coverage", staged),
        registered(con, "_keys", keys),
        transaction(con, message="field coverage", extra={"run_id": run_id}),
    ):
        con.execute(f"DELETE FROM {target} WHERE {key} IN (SELECT {key} FROM _keys)")
        con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM _coverage")
    log.info("field coverage: %d path row(s) for %d partition(s)", staged.height, keys.height)


def record_captured(writer: Writer, files: pl.DataFrame, quarantine: pl.DataFrame, *, run_id: str) -> None:
    """Write a captured file's ``captured_files`` row and its quarantine rows (replacing any an
    earlier, interrupted load of it left), in one transaction."""
    now = utcnow()
    staged_files = files.with_columns(pl.lit(now, CAPTURED_FILES["loaded_at"]).alias("loaded_at")).select(
        [pl.col(c).cast(t) for c, t in CAPTURED_FILES.items()]
    )
    staged_bad = quarantine.select(list(QUARANTINE)).with_columns(
        pl.lit(None, pl.Date()).alias("partition_day"),
        pl.lit(run_id, pl.String()).alias("run_id"),
        pl.lit(now, LINEAGE["ingested_at"]).alias("ingested_at"),
    )
    with (
        writer() as con,
        registered(con, "_files", staged_files),
        registered(con, "_bad", staged_bad),
        transaction(con, message=f"captured file {run_id}", extra={"run_id": run_id}),
    ):
        con.execute(
            f"DELETE FROM {LAKE}.main.quarantine WHERE partition_day IS NULL"
            " AND regexp_extract(raw_ref, '/load=([0-9a-f]{64})/', 1) IN (SELECT sha256 FROM _files)"
        )
        con.execute(f"INSERT INTO {LAKE}.main.quarantine BY NAME SELECT * FROM _bad")
        con.execute(f"DELETE FROM {LAKE}.main.captured_files WHERE sha256 IN (SELECT sha256 FROM _files)")
        con.execute(f"INSERT INTO {LAKE}.main.captured_files BY NAME SELECT * FROM _files")
    log.info("captured file %s recorded: %d quarantined", run_id, staged_bad.height)


def source_pages_sql(landing_root: Path) -> str:
    """The ``source_pages`` view's SELECT: every page of each partition's CURRENT landing (the file its
    ``manifest.json`` names: a day re-landed keeps superseded versions a while for readers still
    scanning them, and those must not answer for the day) with its ``raw_ref``, its surface, entity
    and partition, and its body (a Bundle, or a Data Model message) as JSON."""
    raw = Path(landing_root) / "raw"
    pages = str(raw / "*" / "*" / "*" / "pages*.parquet").replace("'", "''")
    manifests = str(raw / "*" / "*" / "*" / "manifest.json").replace("'", "''")
    return (
        "SELECT concat_ws('/', p.parts[-4], p.parts[-3], p.parts[-2], 'page-' || lpad(p.page::VARCHAR, 5, '0'))"
        " AS raw_ref, p.parts[-4] AS surface, p.parts[-3] AS entity, p.parts[-2] AS partition, p.page,"
        " p.fetched_at, p.body::JSON AS body"
        " FROM (SELECT page, fetched_at, body, string_split(filename, '/') AS parts"
        f"   FROM read_parquet('{pages}', filename = true, union_by_name = true)) AS p"
        " JOIN (SELECT string_split(filename, '/') AS parts,"
        # Manifests written before landings were versioned name no file: theirs is pages.parquet.
        "   coalesce(pages_file, 'pages.parquet') AS pages_file"
        f"   FROM read_json('{manifests}', filename = true, union_by_name = true,"
        "     columns = {pages_file: 'VARCHAR'})) AS m"
        " ON m.parts[-4] = p.parts[-4] AND m.parts[-3] = p.parts[-3] AND m.parts[-2] = p.parts[-2]"
        " AND m.pages_file = p.parts[-1]"
    )


def create_source_pages(writer: Writer, landing_root: Path, *, run_id: str) -> None:
    """Create or replace the ``source_pages`` view (needs at least one landed page to bind)."""
    with writer() as con, transaction(con, message="source_pages view", extra={"run_id": run_id}):
        con.execute(
            f"CREATE OR REPLACE VIEW {LAKE}.main.{SOURCE_PAGES_VIEW} AS {source_pages_sql(landing_root)}"
        )
