"""Loading captured payload files (``redox-etl load``) through the same normalize and merge path as pulls.

A batch of files goes: read (gzip accepted) -> hash -> skip files already in ``captured_files`` ->
shapes detected per document (transforms/captured.py) -> pages landed under
``<lake>/raw/<surface>/<entity>/load=<sha256>/`` (owner-only, atomic, as pulled pages) -> each
stream's registered normalizer over the batch's landed pages -> ONE merge per stream
(newest-version rule, single writer) -> field coverage -> the files' ``captured_files`` rows and
quarantine in one last transaction.

Invariants:
- nothing is dropped silently: every record the pages hold is loaded, collapsed as a duplicate, or
  quarantined (the normalizers' count invariant), and a document no normalizer can read is
  quarantined with a reason (entity ``unrouted``); records of kinds no table holds are counted;
- idempotent: a file whose content hash is recorded is not loaded again, and a crash before the
  last transaction leaves it unrecorded, so the rerun lands and merges it again (same pages, same
  versions: the merge's newest-version rule makes that a rewrite, not a duplicate);
- lineage: rows carry ``run_id`` ``load:<sha12>`` (of the batch) and ``source_ref`` naming the landed
  page, whose ``load=<sha256>`` folder is the file's hash in ``captured_files``;
- a row's ``partition_day`` is the UTC day of its clinical time; patients and rows without one get
  the day of the load;
- file names are stored in the lake (``captured_files``) and never logged: logs name hashes.
"""

import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

import polars as pl

from assets.warehouse import count_merge, normalize_counted, pages_for, prepare
from resources.landing import LandingZone, RawPage
from resources.warehouse import Warehouse
from schema import QUARANTINE
from transforms import captured, coverage, fhir_refs
from transforms import fhir as fhir_norm
from transforms.common import components_in
from transforms.streams import STREAMS, Stream

log = logging.getLogger(__name__)

# Text held in memory per batch: files are read, landed and merged this many bytes at a time.
BATCH_BYTES: Final = 256 * 1024 * 1024


@dataclasses.dataclass
class StreamReport:
    """One stream's share of a load: read = loaded + duplicates + quarantined (+ known patients)."""

    surface: str
    table: str
    read: int = 0
    loaded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    # Observation component rows: parts of a loaded record, so not records themselves.
    components: int = 0
    known_references: int = 0
    inserted: int = 0
    updated: int = 0
    ignored_older: int = 0
    unmapped_paths: int = 0
    # FHIR references into a Bundle (urn:uuid, #contained, Patient?identifier) naming nothing it holds.
    unresolved_references: int = 0


@dataclasses.dataclass
class LoadReport:
    files: int = 0
    skipped_files: int = 0  # already loaded (same content hash)
    documents: int = 0
    unrouted: int = 0
    streams: dict[tuple[str, str], StreamReport] = dataclasses.field(default_factory=dict)
    other: dict[str, int] = dataclasses.field(default_factory=dict)
    top_unmapped: dict[tuple[str, str], list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CapturedFile:
    sha256: str
    name: str
    size: int
    text: str


# In a folder, the files read: JSON, JSON Lines / NDJSON, and those gzipped. A file named on the
# command line is read whatever its name.
SUFFIXES: Final = (".json", ".ndjson", ".jsonl", ".json.gz", ".ndjson.gz", ".jsonl.gz")


def files_under(paths: Iterable[Path]) -> Iterator[Path]:
    """Each path, or every payload file under a folder (``SUFFIXES``; sorted; hidden skipped)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.name.lower().endswith(SUFFIXES)
                and not any(s.startswith(".") for s in p.relative_to(path).parts)
            )
        else:
            yield path


def read_file(path: Path) -> CapturedFile:
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    # JSON is UTF-8 (RFC 8259); a BOM some exporters write is not part of the document.
    return CapturedFile(sha, str(path), len(data), data.decode("utf-8-sig"))


def load_paths(
    warehouse: Warehouse, zone: LandingZone, paths: Iterable[Path], *, reload: bool = False
) -> LoadReport:
    """Load every file under ``paths``; see the module docstring."""
    warehouse.ensure_tables()
    report = LoadReport()
    known = set() if reload else set(warehouse.query("SELECT sha256 FROM captured_files")["sha256"].to_list())
    batch: list[CapturedFile] = []
    size = 0
    for path in files_under(paths):
        report.files += 1
        file = read_file(path)
        if file.sha256 in known:
            report.skipped_files += 1
            log.info("captured file %s already loaded: skipped", file.sha256[:12])
            continue
        known.add(file.sha256)
        batch.append(file)
        size += file.size
        if size >= BATCH_BYTES:
            _load_batch(warehouse, zone, batch, report)
            batch, size = [], 0
    if batch:
        _load_batch(warehouse, zone, batch, report)
    return report


def _load_batch(
    warehouse: Warehouse, zone: LandingZone, files: list[CapturedFile], report: LoadReport
) -> None:
    batch_sha = hashlib.sha256("".join(f.sha256 for f in files).encode()).hexdigest()
    run_id = f"load:{batch_sha[:12]}"
    now = dt.datetime.now(dt.UTC)
    landed: dict[tuple[str, str], list[str]] = {}
    unrouted: list[dict[str, str | None]] = []
    file_rows = []
    for file in files:
        found = captured.read(file.text)
        partition = f"load={file.sha256}"
        for (surface, entity), bodies in found.pages.items():
            pages = [RawPage(body.encode(), "captured file", now) for body in bodies]
            zone.write(surface, entity, partition, pages, run_id=run_id, extra={"documents": found.documents})
            landed.setdefault((surface, entity), []).append(partition)
        for item in found.unrouted:
            unrouted.append(
                {
                    "source_surface": "unknown",
                    "entity": "unrouted",
                    "source_id": None,
                    "reason": item.reason,
                    "raw": item.raw,
                    "raw_ref": f"captured/unrouted/{partition}/{item.where}",
                }
            )
        for kind, n in found.other.items():
            report.other[kind] = report.other.get(kind, 0) + n
        report.documents += found.documents
        report.unrouted += len(found.unrouted)
        file_rows.append(
            {
                "sha256": file.sha256,
                "run_id": run_id,
                "file_name": file.name,
                "bytes": file.size,
                "documents": found.documents,
                "pages": sum(len(b) for b in found.pages.values()),
                "unrouted": len(found.unrouted),
                "other_records": json.dumps(dict(found.other), sort_keys=True),
            }
        )
        log.info("captured file %s: %d document(s) landed", file.sha256[:12], found.documents)
    quarantined = [pl.DataFrame(unrouted, schema=QUARANTINE)]
    covered: list[pl.DataFrame] = []
    keys: list[tuple[str, str, str]] = []
    for stream in STREAMS.values():
        partitions = sorted({p for e in stream.reads for p in landed.get((stream.surface, e), [])})
        if not partitions:
            continue
        bad, counts = _load_stream(warehouse, zone, stream, partitions, run_id, now.date(), report)
        quarantined.append(bad)
        own = landed.get((stream.surface, stream.entity), [])
        for partition in own:
            covered.append(counts[partition].with_columns(pl.lit(partition).alias("partition")))
            keys.append((stream.surface, stream.entity, partition))
    if keys:
        warehouse.replace_coverage(pl.concat(covered), keys, run_id=run_id)
        warehouse.create_source_pages(zone.root)
    warehouse.record_captured(pl.DataFrame(file_rows), pl.concat(quarantined), run_id=run_id)


def _load_stream(
    warehouse: Warehouse,
    zone: LandingZone,
    stream: Stream,
    partitions: list[str],
    run_id: str,
    today: dt.date,
    report: LoadReport,
) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """Normalize and merge one stream's pages of the batch; returns its quarantine rows and the
    field coverage of each of its own landed partitions."""
    surface, entity = stream.surface, stream.entity
    row = report.streams.setdefault((surface, entity), StreamReport(surface, entity))
    pages = pages_for(zone, surface, entity, partitions).collect().lazy()
    normalized, records = normalize_counted(pages, surface, entity)
    if surface == "fhir":
        row.unresolved_references += fhir_refs.count_unresolved(pages, fhir_norm.RESOURCE_TYPES[entity])
    ready = prepare(warehouse, normalized, surface, entity)
    good = ready.good
    day = (
        pl.col(stream.clinical_time).dt.date().fill_null(today)
        if stream.clinical_time
        else pl.lit(today, pl.Date())
    )
    stats = warehouse.merge(
        entity,
        good.with_columns(day.alias("partition_day")),
        partition_day=today,
        run_id=run_id,
        source_surface=surface,
    )
    counts = {
        partition: coverage.field_coverage(zone.scan(surface, entity, [partition]), surface, entity).collect()
        for partition in partitions
        if zone.exists(surface, entity, partition)
    }
    seen = coverage.merge_counts(counts.values())
    row.read += records
    components = components_in(good)
    row.loaded += good.height - components
    row.components += components
    row.duplicates += ready.duplicates
    row.quarantined += ready.bad.height
    row.known_references += ready.known_references
    count_merge(row, stats)
    row.unmapped_paths += int((~seen["mapped"]).sum()) if seen.height else 0
    report.top_unmapped[(surface, entity)] = coverage.top_unmapped(seen)
    return ready.bad, counts
