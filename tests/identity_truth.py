"""How well identity links, measured against the sandbox's ground truth: a test and benchmark concern.

The product never measures itself (real Redox has no truth); the tests do, through here, so every
test that holds identity to the acceptance bar of issue 5 asks the same question the same way:
pairwise precision and recall of cross-surface links (``transforms.identity.evaluate``) against the
truth's ``persons`` frame, fetched over the sandbox's own HTTP route ``GET /sandbox/truth`` (outside
the Redox API, so not through the rate budget) or taken from the world object in-process.
"""

import io
import zipfile
from typing import Final

import httpx
import polars as pl

from transforms import identity

# The acceptance bar of issue 5, on cross-surface links.
MIN_PRECISION: Final = 0.999
MIN_RECALL: Final = 0.99


def sandbox_truth(
    base_url: str, tables: tuple[str, ...] = ("persons",), *, timeout: float = 120.0
) -> dict[str, pl.DataFrame]:
    """Frames of a running sandbox's ground truth, as its ``GET /sandbox/truth`` zip serves them."""
    response = httpx.get(f"{base_url.rstrip('/')}/sandbox/truth", timeout=httpx.Timeout(timeout))
    response.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        return {name: pl.read_parquet(archive.read(f"{name}.parquet")) for name in tables}


def crosswalk_metrics(crosswalk: pl.DataFrame, truth_persons: pl.DataFrame) -> dict[str, float | int]:
    """Pairwise precision/recall/F1 (and the counts behind them) of ``crosswalk`` against the truth."""
    return identity.evaluate(crosswalk, truth_persons)


def sandbox_metrics(base_url: str, crosswalk: pl.DataFrame) -> dict[str, float | int]:
    """``crosswalk_metrics`` against the truth of the sandbox at ``base_url`` as it is now."""
    return crosswalk_metrics(crosswalk, sandbox_truth(base_url, ("persons",))["persons"])


def assert_meets_bar(metrics: dict[str, float | int]) -> None:
    """Precision and recall at or above the acceptance bar (the metrics are the failure message)."""
    assert metrics["precision"] >= MIN_PRECISION, metrics
    assert metrics["recall"] >= MIN_RECALL, metrics


def link_metrics(
    pairs: pl.DataFrame,
    records: pl.DataFrame,
    truth_persons: pl.DataFrame,
    *,
    decisions: tuple[str, ...] = ("link",),
) -> dict[str, float | int]:
    """``crosswalk_metrics`` of the output of ``redox-etl identity link``: the pairs whose decision is
    in ``decisions`` join their two records, every other record of ``records`` stands alone."""
    chosen = pairs.filter(pl.col("decision").is_in(decisions))
    keyed = pl.concat(
        [
            chosen.select(source_surface="left_surface", source_id="left_id", person_key="pair_id"),
            chosen.select(source_surface="right_surface", source_id="right_id", person_key="pair_id"),
        ]
    ).unique(["source_surface", "source_id"], keep="first", maintain_order=True)
    crosswalk = (
        records.select("source_surface", "source_id")
        .join(keyed, on=["source_surface", "source_id"], how="left")
        .with_columns(
            person_key=pl.coalesce("person_key", pl.concat_str("source_surface", "source_id", separator="|"))
        )
    )
    return crosswalk_metrics(crosswalk, truth_persons)
