"""Small frames in the unified schema for the warehouse tests, whichever catalog they run on."""

import datetime as dt
import random

import polars as pl

from transforms import schema

# Rows per merge group in the concurrency tests.
GROUP = 7


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
