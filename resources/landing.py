"""The landing zone: raw Redox response bodies, untouched, one file per (surface, entity, partition).

Layout: ``<lake>/raw/<surface>/<entity>/<partition>/pages.parquet`` with one row per response
(``page``, ``body``, ``request``, ``fetched_at``) and a small JSON manifest beside it; optionally a
``carried.parquet`` (``page`` and one column) with what the extract parsed out of each page, which
the manifest names.

Invariants:
- a partition's files are replaced atomically (written under a temporary name in the same folder,
  fsynced, then ``os.replace``d), so a reader or a crash never sees half a partition and a rerun
  replaces rather than duplicates;
- bodies are stored byte for byte as the server sent them (decoded as UTF-8, which JSON requires),
  so a normalizer fix can be replayed on exactly what Redox said;
- the carried file is removed before new pages are written and written after them, so it always
  describes the pages beside it; it holds patient data, so it is owner-only like them;
- the manifest holds counts and hashes only, never a body, so it is safe to show as metadata; its
  ``extra`` carries what the extract learned while the pages passed through it (totals, duplicates,
  counts), so later steps read it rather than decode the pages again.
"""

import dataclasses
import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

import dagster as dg
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

# Beside a partition's pages: what the extract parsed out of them (``LandingZone.write``).
CARRIED_FILE: Final = "carried.parquet"

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


class LandingZone:
    """Reads and writes landed pages under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

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
        of them, for later steps to read instead of decoding the pages again) and the manifest."""
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
        manifest = Manifest(
            surface=surface,
            entity=entity,
            partition=partition,
            pages=len(pages),
            bytes=sum(len(p.body) for p in pages),
            sha256=digest.hexdigest(),
            run_id=run_id,
            written_at=dt.datetime.now(dt.UTC).isoformat(),
            extra=dict(extra or {}),
            carried=CARRIED_FILE if carried is not None else None,
        )
        if carried is not None and carried.len() != len(pages):
            raise ValueError("carried values must be one per page")
        # The carried file of an earlier landing describes other pages: gone before the new pages
        # arrive, so a reader finds the right one or none (and decodes the pages).
        (folder / CARRIED_FILE).unlink(missing_ok=True)
        _atomic_write(
            folder / "pages.parquet",
            lambda f: frame.write_parquet(f, compression="zstd", row_group_size=PAGES_PER_ROW_GROUP),
        )
        if carried is not None:
            side = pl.DataFrame([pl.Series("page", range(1, len(pages) + 1), dtype=pl.Int32()), carried])
            _atomic_write(folder / CARRIED_FILE, lambda f: side.write_parquet(f, compression="zstd"))
        _atomic_write(
            folder / "manifest.json",
            lambda f: f.write(json.dumps(dataclasses.asdict(manifest), indent=2).encode()),
        )
        return manifest

    def exists(self, surface: str, entity: str, partition: str) -> bool:
        return (self.folder(surface, entity, partition) / "pages.parquet").exists()

    def manifest(self, surface: str, entity: str, partition: str) -> Manifest | None:
        path = self.folder(surface, entity, partition) / "manifest.json"
        if not path.exists():
            return None
        fields = json.loads(path.read_text())
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
        extract, is not read: its pages are decoded instead."""
        frames = []
        for partition in partitions:
            folder = self.folder(surface, entity, partition)
            path = folder / "pages.parquet"
            if not path.exists():
                continue
            ref = f"{surface}/{entity}/{partition}/page-"
            frame = pl.scan_parquet(path)
            side = folder / CARRIED_FILE
            if carried is not None and side.exists():
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
