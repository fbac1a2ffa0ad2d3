"""The landing zone: raw Redox response bodies, untouched, one file per (surface, entity, partition).

Layout: ``<lake>/raw/<surface>/<entity>/<partition>/manifest.json`` naming the partition's current
pages file ``pages-<version>.parquet`` (one row per response: ``page``, ``body``, ``request``,
``fetched_at``) and optionally its ``carried-<version>.parquet`` (``page`` and one column: what the
extract parsed out of each page). Folders landed before versioning hold ``pages.parquet`` and
``carried.parquet``, which their manifests name implicitly. Beside a surface's patients days,
``<lake>/raw/<surface>/patients/.ledger.sqlite`` (``PatientLedger``) records when each patient was
last landed, so a backfill fetches a patient once, not once per run or day that mentions it.

Invariants:
- the manifest is the commit point: a version's files are written and fsynced first, then the
  manifest is replaced atomically (temp name, fsync, ``os.replace``) to name them, so a reader or a
  crash never sees half a partition, a rerun replaces rather than duplicates, and pages and carried
  values always belong together;
- a version file is never rewritten in place: a lazy scan that reopens it for each row group (polars
  does) reads the same bytes however many runs land the same day meanwhile. A superseded version is
  deleted only ``SUPERSEDED_GRACE`` after it stopped being current (readers finish well within it),
  by a later write of the same partition; writes of one partition are serialized by a lock file;
- bodies are stored byte for byte as the server sent them (decoded as UTF-8, which JSON requires),
  so a normalizer fix can be replayed on exactly what Redox said;
- every file under the zone holds patient data or sits beside it, so folders are owner-only;
- the patient ledger only ever names patients whose pages are already landed (it is written after
  the day's manifest), so trusting it never loses a patient; it is SQLite (WAL), safe for many
  processes at once;
- the manifest holds counts and hashes only, never a body, so it is safe to show as metadata; its
  ``extra`` carries what the extract learned while the pages passed through it (totals, duplicates,
  counts), so later steps read it rather than decode the pages again.
"""

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Final

import dagster as dg
import filelock
import polars as pl
from pydantic import Field

from resources import settings

WriteFn = Callable[[IO[bytes]], Any]

# Pages per Parquet row group. The streaming engine hands a normalizer a row group's pages at a
# time, from several threads at once, and one row group per file put every page of a partition in
# flight together. Measured on 1M FHIR results (1,000 per page), two runs each: 32 pages per group
# peaked at 1.3 and 1.8 GB, 8 at 1.05 and 1.16 GB, 4 at 0.98 and 1.0 GB; 1 page per group took 1.6
# times as long.
PAGES_PER_ROW_GROUP: Final = 4

# What a folder landed before versioned files holds (its manifest names no file).
LEGACY_PAGES: Final = "pages.parquet"
LEGACY_CARRIED: Final = "carried.parquet"
# How long a superseded version stays for readers that read the manifest before it changed. A
# reader scans one partition's pages for one step (seconds to minutes); an hour is far past that.
SUPERSEDED_GRACE: Final = dt.timedelta(hours=1)
# Serializes the writes of one partition (two runs landing the same day), never its readers.
WRITE_LOCK: Final = ".write.lock"
# The patient ledger's file, in ``raw/<surface>/patients/`` (not a ``day=`` folder: never scanned).
LEDGER: Final = ".ledger.sqlite"

PAGE_SCHEMA = pl.Schema(
    {
        "page": pl.Int32(),
        "body": pl.String(),
        "request": pl.String(),  # endpoint template and window: no parameter values, so no PHI
        "fetched_at": pl.Datetime("us", "UTC"),
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class RawPage:
    body: bytes
    request: str
    fetched_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    surface: str
    entity: str
    partition: str
    pages: int
    bytes: int
    sha256: str
    run_id: str
    written_at: str
    extra: dict[str, int | str | None]
    # The carried file beside the pages (see ``LandingZone.write``), if the extract wrote one.
    carried: str | None = None
    # The current pages file of the partition.
    pages_file: str = LEGACY_PAGES
    # Earlier versions' files kept for readers that may still scan them: name -> when superseded.
    superseded: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def files(self) -> tuple[str, ...]:
        return (self.pages_file,) if self.carried is None else (self.pages_file, self.carried)


class LandingZone:
    """Reads and writes landed pages under one root folder."""

    def __init__(self, root: Path, *, superseded_grace: dt.timedelta = SUPERSEDED_GRACE) -> None:
        self.root = Path(root)
        self.superseded_grace = superseded_grace

    def folder(self, surface: str, entity: str, partition: str) -> Path:
        return self.root / "raw" / surface / entity / partition

    def write(
        self,
        surface: str,
        entity: str,
        partition: str,
        pages: Sequence[RawPage],
        *,
        run_id: str,
        extra: dict[str, int | str | None] | None = None,
        carried: pl.Series | None = None,
    ) -> Manifest:
        """Land ``pages`` (and ``carried``, one value per page: what the extract already parsed out
        of them, for later steps to read instead of decoding the pages again) as a new version of
        the partition, and name it in the manifest."""
        if carried is not None and carried.len() != len(pages):
            raise ValueError("carried values must be one per page")
        folder = self.folder(surface, entity, partition)
        _private_dirs(folder)
        digest = hashlib.sha256()
        for page in pages:
            digest.update(hashlib.sha256(page.body).digest())
        frame = pl.DataFrame(
            {
                "page": list(range(1, len(pages) + 1)),
                "body": [p.body.decode("utf-8") for p in pages],
                "request": [p.request for p in pages],
                "fetched_at": [p.fetched_at for p in pages],
            },
            schema=PAGE_SCHEMA,
        )
        # Unique per write: a version's name is never reused, so its bytes never change under a reader.
        version = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
        pages_file = f"pages-{version}.parquet"
        carried_file = f"carried-{version}.parquet" if carried is not None else None
        with filelock.FileLock(folder / WRITE_LOCK, mode=0o600):
            previous = self.manifest(surface, entity, partition)
            _atomic_write(
                folder / pages_file,
                lambda f: frame.write_parquet(f, compression="zstd", row_group_size=PAGES_PER_ROW_GROUP),
            )
            if carried is not None and carried_file is not None:
                side = pl.DataFrame([pl.Series("page", range(1, len(pages) + 1), dtype=pl.Int32()), carried])
                _atomic_write(folder / carried_file, lambda f: side.write_parquet(f, compression="zstd"))
            now = dt.datetime.now(dt.UTC)
            manifest = Manifest(
                surface=surface,
                entity=entity,
                partition=partition,
                pages=len(pages),
                bytes=sum(len(p.body) for p in pages),
                sha256=digest.hexdigest(),
                run_id=run_id,
                written_at=now.isoformat(),
                extra=dict(extra or {}),
                carried=carried_file,
                pages_file=pages_file,
                superseded=self._still_kept(folder, previous, now),
            )
            _atomic_write(
                folder / "manifest.json",
                lambda f: f.write(json.dumps(dataclasses.asdict(manifest), indent=2).encode()),
            )
            self._remove_strays(folder, manifest, now)
        return manifest

    def _still_kept(self, folder: Path, previous: Manifest | None, now: dt.datetime) -> dict[str, str]:
        """The superseded files a reader may still scan (the previous version's among them); the
        others are deleted here."""
        if previous is None:
            return {}
        superseded = dict(previous.superseded)
        for name in previous.files:
            superseded.setdefault(name, now.isoformat())
        kept = {}
        for name, at in superseded.items():
            if now - dt.datetime.fromisoformat(at) > self.superseded_grace:
                (folder / name).unlink(missing_ok=True)
            else:
                kept[name] = at
        return kept

    def _remove_strays(self, folder: Path, manifest: Manifest, now: dt.datetime) -> None:
        """Version files no manifest names (a writer died before its manifest): never read, so they
        go once they are older than the grace (a reader of a legacy folder may hold one)."""
        named = {*manifest.files, *manifest.superseded}
        for path in [
            *folder.glob("pages*.parquet"),
            *folder.glob("carried*.parquet"),
            *folder.glob(".*.tmp"),
        ]:
            if path.name in named:
                continue
            with contextlib.suppress(FileNotFoundError):
                age = now - dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
                if age > self.superseded_grace:
                    path.unlink(missing_ok=True)

    def ledger(self, surface: str) -> "PatientLedger":
        """The surface's patient ledger: which patients are landed, and when."""
        return PatientLedger(self.root / "raw" / surface / "patients" / LEDGER)

    def exists(self, surface: str, entity: str, partition: str) -> bool:
        manifest = self.manifest(surface, entity, partition)
        folder = self.folder(surface, entity, partition)
        return manifest is not None and (folder / manifest.pages_file).exists()

    def manifest(self, surface: str, entity: str, partition: str) -> Manifest | None:
        path = self.folder(surface, entity, partition) / "manifest.json"
        try:
            fields = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        # Manifests landed before the vocabulary settled name the entity "stream".
        if "stream" in fields:
            fields["entity"] = fields.pop("stream")
        return Manifest(**fields)

    def scan(
        self, surface: str, entity: str, partitions: Sequence[str], *, carried: pl.DataType | None = None
    ) -> pl.LazyFrame:
        """Pages of the given partitions as ``(raw_ref, body)``, the normalizers' input shape; with
        ``carried`` (a dtype), plus the carried column of the partitions that have one of that dtype
        (null on other pages). A carried file of another dtype, landed by another version of the
        extract, is not read: its pages are decoded instead. Each partition is read as its manifest
        names it when this is called, whatever is landed before the frame is collected."""
        frames = []
        for partition in partitions:
            folder = self.folder(surface, entity, partition)
            manifest = self.manifest(surface, entity, partition)
            if manifest is None or not (path := folder / manifest.pages_file).exists():
                continue
            ref = f"{surface}/{entity}/{partition}/page-"
            frame = pl.scan_parquet(path)
            side = folder / manifest.carried if manifest.carried else None
            if carried is not None and side is not None and side.exists():
                kept = [n for n, t in pl.read_parquet_schema(side).items() if n != "page" and t == carried]
                if kept:
                    frame = frame.join(
                        pl.scan_parquet(side).select("page", *kept),
                        on="page",
                        how="left",
                        maintain_order="left",
                    )
            frames.append(
                frame.select(
                    (pl.lit(ref) + pl.col("page").cast(pl.String).str.zfill(5)).alias("raw_ref"),
                    pl.exclude("page", "request", "fetched_at"),
                )
            )
        if not frames:
            return pl.LazyFrame(schema={"raw_ref": pl.String(), "body": pl.String()})
        return pl.concat(frames, how="diagonal")


class PatientLedger:
    """When each patient of one surface was last landed (by source id; no other patient data).

    Written after a patients day lands, read by backfills to skip patients landed recently by any
    run; a sync refetches regardless. Each call opens its own connection, so the ledger is safe to
    use from several threads and processes at once (SQLite serializes the writers).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        _private_dirs(self.path.parent)
        if not self.path.exists():
            # Owner-only from the start: it names patients (SQLite gives -wal/-shm the same mode).
            self.path.touch(mode=0o600, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS landed (source_id TEXT PRIMARY KEY, landed_at REAL NOT NULL)"
        )
        return conn

    def landed_since(self, since: dt.datetime) -> set[str]:
        """Patients landed at or after ``since``."""
        if not self.path.exists():
            return set()
        with contextlib.closing(self._connect()) as conn:
            rows = conn.execute("SELECT source_id FROM landed WHERE landed_at >= ?", [since.timestamp()])
            return {row[0] for row in rows}

    def record(self, source_ids: Iterable[str], at: dt.datetime) -> None:
        """Note ``source_ids`` as landed at ``at`` (call only once their pages are landed)."""
        rows = [(source_id, at.timestamp()) for source_id in source_ids]
        if not rows:
            return
        with contextlib.closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO landed VALUES (?, ?) ON CONFLICT (source_id)"
                " DO UPDATE SET landed_at = max(landed_at, excluded.landed_at)",
                rows,
            )
            conn.execute("COMMIT")


def _private_dirs(folder: Path) -> None:
    """Create ``folder`` and any missing parent owner-only: raw pages are patient data (mkdir's
    mode applies to the leaf only, so each missing level is made here)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)


def _atomic_write(path: Path, write: WriteFn) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LandingResource(dg.ConfigurableResource):
    """Where raw pages land: ``<root>/raw/...``; by default the lake folder (settings.lake_dir())."""

    root: str | None = Field(default=None, description="Landing root; default the lake folder.")

    def zone(self) -> LandingZone:
        return LandingZone(Path(self.root) if self.root else settings.lake_dir())
