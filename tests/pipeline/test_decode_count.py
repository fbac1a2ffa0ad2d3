"""A landed page, FHIR or Data Model, is decoded at most twice in a sync: once by the transport,
once by its load.

The extract records what it learned in the landing manifest (Bundle.total, entries, the duplicates
the client saw, referenced patients), the FHIR patients extract reads only patient references, and
the ``bundle_totals`` check reads the manifest, so nothing normalizes a page again to re-derive a
count. Measured, not assumed: ``transforms.common.robust_decode`` (through which every page decode
goes) counts bodies by purpose in ``DECODED_PAGES``; this test also attributes them to a surface by
the dtype decoded to (Data Model dtypes carry ``Meta``), and counts the transport's JSON parses at
``Transport._interpret``. Light decodes (``count``: resourceType only; ``references``: patient
references only) are not full decodes and are reported, not bounded.

The Data Model meets the same bound: a load counts its records from the normalizer's own decoded
frame (``datamodel.normalize_counted``), and a clinical reply's embedded patients are typed from the
transport's parse by the extract and landed beside the page (``carried.parquet``), so the patients
extract and the patients load read them there instead of decoding the clinical page again. A page
whose values polars would not read unchanged carries nothing and is decoded (and counted) as before.
"""

import collections
import datetime as dt
import warnings
from typing import Any

import dagster as dg
import polars as pl
import pytest

from assets import all_assets, all_checks
from resources import all_resources
from resources.landing import LandingResource
from resources.redox.transport import Transport
from sandbox.server import serve_in_thread
from transforms import common

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _landed_pages() -> collections.Counter[str]:
    zone = LandingResource().zone()
    landed: collections.Counter[str] = collections.Counter()
    for path in (zone.root / "raw").glob("*/*/day=*/manifest.json"):
        surface, entity, folder = path.parts[-4:-1]
        manifest = zone.manifest(surface, entity, folder)
        landed[surface] += manifest.pages if manifest else 0
    return landed


def test_a_landed_page_is_decoded_at_most_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.setenv("REDOX_BUDGET_PATH", str(tmp_path / "budget.sqlite"))
    parses: collections.Counter[str] = collections.Counter()
    normalized: collections.Counter[str] = collections.Counter()
    light: collections.Counter[str] = collections.Counter()
    interpret, decode = Transport._interpret, common.robust_decode

    def parsed(
        self: Transport, response: Any, endpoint: str, surface: Any, expect_json: bool, *a: Any
    ) -> Any:
        reply = interpret(self, response, endpoint, surface, expect_json, *a)
        if expect_json and surface in ("fhir", "datamodel"):
            parses[surface] += 1
        return reply

    def decoded(bodies: pl.Series, dtype: pl.DataType, *a: Any, purpose: str = "normalize", **kw: Any) -> Any:
        assert isinstance(dtype, pl.Struct)
        surface = "datamodel" if "Meta" in {f.name for f in dtype.fields} else "fhir"
        (normalized if purpose == "normalize" else light)[surface] += len(bodies)
        return decode(bodies, dtype, *a, purpose=purpose, **kw)

    monkeypatch.setattr(Transport, "_interpret", parsed)
    monkeypatch.setattr(common, "robust_decode", decoded)
    before = dict(common.DECODED_PAGES)
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=6), today - dt.timedelta(days=4)
    with serve_in_thread(
        state_dir=tmp_path / "sandbox", patients=60, seed=5, start=first, end=last, rate_limit=None
    ) as running:
        monkeypatch.setenv("REDOX_SANDBOX_CREDENTIALS", str(running.credentials_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = dg.materialize(
                [*all_assets, *all_checks],
                # The changes asset decodes what it searches without landing it: out of this count.
                selection=dg.AssetSelection.all() - dg.AssetSelection.assets("redox_changes"),
                resources=all_resources(),
                instance=dg.DagsterInstance.ephemeral(),
                tags={
                    "dagster/asset_partition_range_start": first.isoformat(),
                    "dagster/asset_partition_range_end": last.isoformat(),
                },
                raise_on_error=False,
            )
        assert result.success
        # The check that used to normalize every page twice more must still run, and pass.
        totals = [c for c in result.get_asset_check_evaluations() if c.check_name == "bundle_totals"]
        assert len(totals) == 3
        assert all(c.passed for c in totals)
    landed = _landed_pages()
    counted = {k: v - before.get(k, 0) for k, v in common.DECODED_PAGES.items()}
    full = parses + normalized
    print(f"landed {dict(landed)}; full decodes {dict(full)}; light {dict(light)}; by purpose {counted}")
    # The module's own counter saw exactly the decodes attributed here: none went around it.
    assert counted.get("normalize", 0) == normalized.total()
    assert sum(counted.values()) == normalized.total() + light.total()
    assert landed["fhir"] > 0
    assert full["fhir"] <= 2 * landed["fhir"], (full, landed)
    assert landed["datamodel"] > 0
    assert full["datamodel"] <= 2 * landed["datamodel"], (full, landed)
