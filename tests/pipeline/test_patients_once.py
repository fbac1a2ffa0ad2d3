"""A backfill fetches each patient once, however many days and runs mention it; a sync refetches.

Two extract-only runs (no load, so the warehouse knows no patient and only the landing zone's
patient ledger can tell the second run what the first fetched) over adjacent day ranges, both
``refetch=False`` as a backfill's runs are. Each run fetches its days concurrently, so the first
also shows that concurrent days of one run share one fetch per patient.
"""

import datetime as dt
import warnings
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets import all_assets
from assets.extract import EXTRACT_OP
from assets.partitions import partition_folder
from resources import all_resources
from resources.landing import LandingZone
from sandbox.server import Running, serve_in_thread
from transforms import datamodel
from transforms.references import referenced_patients
from transforms.streams import CLINICAL_ENTITIES, SURFACES

pytestmark = [pytest.mark.integration]
EXTRACTS = [f"{prefix}_{entity}" for prefix in ("fhir", "dm") for entity in ("patients", *CLINICAL_ENTITIES)]


def _extract(first: dt.date, last: dt.date, *, refetch: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dg.materialize(
            all_assets,
            selection=EXTRACTS,
            resources=all_resources(),
            instance=dg.DagsterInstance.ephemeral(),
            run_config={"ops": {EXTRACT_OP: {"config": {"refetch": refetch}}}},
            tags={
                "dagster/asset_partition_range_start": first.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat(),
            },
        )
    assert result.success


def _days(first: dt.date, last: dt.date) -> list[dt.date]:
    return [first + dt.timedelta(days=n) for n in range((last - first).days + 1)]


def _wanted(zone: LandingZone, surface: str, days: list[dt.date]) -> int:
    """Patients the extract fetched on these days, from the days' manifests."""
    total = 0
    for day in days:
        manifest = zone.manifest(surface, "patients", partition_folder(day))
        assert manifest is not None
        total += int(manifest.extra["patients_wanted"] or 0)
    return total


def _needed(zone: LandingZone, surface: str, days: list[dt.date]) -> dict[dt.date, set[str]]:
    """Per day, the patients its clinical pages name without a complete record: what must be fetched."""
    out = {}
    for day in days:
        pages = pl.concat(
            [
                zone.scan(surface, e, [partition_folder(day)], carried=datamodel.CARRIED_DTYPE)
                for e in CLINICAL_ENTITIES
            ],
            how="diagonal",
        )
        refs = referenced_patients(surface, pages).collect()  # type: ignore[arg-type]
        out[day] = set(refs.filter(~pl.col("complete"))["source_id"].to_list())
    return out


def _patient_searches(running: Running) -> int:
    assert running.sandbox is not None
    return int(running.sandbox.stats.datamodel.get("PatientSearch.Query", 0))


def test_a_backfill_fetches_each_patient_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=10), today - dt.timedelta(days=5)
    middle = first + dt.timedelta(days=2)
    with serve_in_thread(
        state_dir=tmp_path / "sandbox", patients=150, seed=5, start=first, end=last, rate_limit=None
    ) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        _extract(first, middle, refetch=False)
        _extract(middle + dt.timedelta(days=1), last, refetch=False)
        zone = LandingZone(tmp_path / "lake")
        days = _days(first, last)
        searches = _patient_searches(running)
        for surface in SURFACES:
            needed = _needed(zone, surface, days)
            assert _wanted(zone, surface, days) == len(set().union(*needed.values())), surface
        # The Data Model reads patients one PatientSearch each: the server saw one per patient.
        assert searches == len(set().union(*_needed(zone, "datamodel", days).values()))
        # The sandbox's Data Model replies embed whole patients, so the Data Model fetches few or
        # none: FHIR, which fetches every referenced patient, is where a second fetch would show.
        needed = _needed(zone, "fhir", days)
        assert sum(len(ids) for ids in needed.values()) > len(set().union(*needed.values()))
        early = set().union(*(needed[d] for d in days if d <= middle))
        late = set().union(*(needed[d] for d in days if d > middle))
        assert early & late, "no patient recurs across the two runs: the test would prove nothing"

        # A sync (refetch) reads every patient its days mention again, ledger or not.
        late_days = [d for d in days if d > middle]
        _extract(late_days[0], last, refetch=True)
        assert _wanted(zone, "fhir", late_days) == len(late)

        # A resumed run whose patients days are all landed but one clinical day is not: the patients
        # stream finishes first, and is still reported after its clinical streams (Dagster refuses a
        # multi-asset output yielded before an output it depends on).
        (zone.folder("fhir", "encounters", partition_folder(first)) / "manifest.json").unlink()
        _extract(first, middle, refetch=False)
        assert zone.exists("fhir", "encounters", partition_folder(first))
