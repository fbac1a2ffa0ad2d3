"""Landed partitions stay readable while other runs land the same day again.

Two syncs whose windows overlap land the same (surface, entity, day) while a step of the other reads
it lazily; polars reopens the file for each row group, so a file replaced in place under the same
name was read half old, half new ("The page header reported the wrong page size"). These tests race
a real writer thread against lazy readers, and check what versioned files leave on disk.
"""

import datetime as dt
import json
import threading
from pathlib import Path

import polars as pl

from resources.landing import LEGACY_PAGES, LandingZone, RawPage

DAY = "day=2026-01-02"


def _pages(n: int, size: int, tag: str) -> list[RawPage]:
    now = dt.datetime.now(dt.UTC)
    return [RawPage(json.dumps({"tag": tag, "pad": "x" * size}).encode(), "GET /x", now) for _ in range(n)]


def test_lazy_scans_read_one_whole_version_while_the_day_is_rewritten(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    zone.write("fhir", "results", DAY, _pages(40, 3000, "v0"), run_id="run-0")
    stop = threading.Event()
    failures: list[BaseException] = []

    def rewrite() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            # Every version differs in page count and size, so a mixed read cannot look whole.
            try:
                zone.write(
                    "fhir", "results", DAY, _pages(20 + n % 30, 1000 + 97 * n, f"v{n}"), run_id=f"r{n}"
                )
            except BaseException as exc:  # pragma: no cover - reported by the assertion below
                failures.append(exc)
                return

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(150):
            frame = zone.scan("fhir", "results", [DAY]).collect()
            tags = {json.loads(body)["tag"] for body in frame["body"]}
            assert len(tags) == 1, "one scan read pages of two versions"
            assert frame["raw_ref"].is_unique().all()
    finally:
        stop.set()
        writer.join()
    assert not failures


def test_superseded_versions_stay_for_the_grace_then_go(tmp_path: Path) -> None:
    kept = LandingZone(tmp_path / "kept")
    first = kept.write("fhir", "results", DAY, _pages(2, 10, "a"), run_id="a")
    second = kept.write("fhir", "results", DAY, _pages(3, 10, "b"), run_id="b")
    folder = kept.folder("fhir", "results", DAY)
    assert first.pages_file in second.superseded and (folder / first.pages_file).exists()
    assert kept.scan("fhir", "results", [DAY]).collect().height == 3

    gone = LandingZone(tmp_path / "gone", superseded_grace=dt.timedelta(0))
    for n in range(4):
        last = gone.write("fhir", "results", DAY, _pages(n + 1, 10, str(n)), run_id=str(n))
    folder = gone.folder("fhir", "results", DAY)
    on_disk = {p.name for p in folder.glob("*.parquet")}
    # The current version and the one it superseded just now; everything older is deleted.
    assert on_disk == {last.pages_file, *last.superseded}
    assert len(last.superseded) == 1
    assert sorted(p.stat().st_mode & 0o777 for p in folder.iterdir()) == [0o600] * len(list(folder.iterdir()))


def test_a_folder_landed_before_versioning_is_read_then_superseded(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    manifest = zone.write("fhir", "results", DAY, _pages(2, 10, "old"), run_id="old")
    folder = zone.folder("fhir", "results", DAY)
    # Rewrite it as the previous layout had it: pages.parquet and a manifest naming no file.
    (folder / manifest.pages_file).rename(folder / LEGACY_PAGES)
    fields = json.loads((folder / "manifest.json").read_text())
    del fields["pages_file"], fields["superseded"]
    (folder / "manifest.json").write_text(json.dumps(fields))
    assert zone.exists("fhir", "results", DAY)
    assert zone.scan("fhir", "results", [DAY]).collect().height == 2

    newer = zone.write("fhir", "results", DAY, _pages(5, 10, "new"), run_id="new")
    assert LEGACY_PAGES in newer.superseded
    bodies = zone.scan("fhir", "results", [DAY]).collect()["body"]
    assert bodies.len() == 5 and all(json.loads(b)["tag"] == "new" for b in bodies)


def test_a_manifest_is_never_half_written_for_readers(tmp_path: Path) -> None:
    zone = LandingZone(tmp_path)
    assert zone.manifest("fhir", "results", DAY) is None
    assert not zone.exists("fhir", "results", DAY)
    assert zone.scan("fhir", "results", [DAY]).collect().schema == pl.Schema(
        {"raw_ref": pl.String(), "body": pl.String()}
    )
