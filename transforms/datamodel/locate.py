"""Decode Data Model pages and find their records: one row per record a chain reaches.

``decode`` turns pages into one struct per page (``repair`` takes the pages the vectorized decode
rejects); ``records`` explodes a chain into rows; ``located`` adds an entity's columns and the
marker's reason; ``count_records`` counts with the very same steps.

Invariants:

- one row per located record, per record that cannot be read (quarantined), and per unreadable
  page (quarantined), before dedupe; ``count_records`` counts exactly what was located, so
  ``records == good + sum(duplicates) + quarantined`` for every batch;
- request messages (Query, VisitQuery, Booked, ...) are not data: they yield no rows; a message is
  a request by its content (``is_request``: a request event type and no reply container), so a
  reply that echoes its request's EventType is still read;
- a response with ``Meta.Errors`` is one quarantined page row: Redox said the query failed;
- PatientSearch's "no single match" answer (``Patient: {}``) is not a patient.
"""

from typing import Any, Final

import polars as pl

from transforms import common
from transforms.datamodel.carry import CARRIED
from transforms.datamodel.chains import CHAINS, Chain, page_dtype, with_mark
from transforms.datamodel.dtypes import MARK, PATIENT_CTX
from transforms.datamodel.fields import SURFACE, field
from transforms.datamodel.repair import META_ERRORS, NO_META, NOT_AN_OBJECT, repairer

# Event types that ask rather than tell: their embedded patients are search criteria.
REQUEST_EVENTS: Final = frozenset(
    {
        "Query",
        "VisitQuery",
        "CensusQuery",
        "PatientQuery",
        "DocumentQuery",
        "DocumentGet",
        "LocationQuery",
        "Booked",
        "AvailableSlots",
    }
)


# Containers only a reply carries: a request asks with Patient/Patients/Visit criteria, never with
# these. Captured Redox traffic shows replies that echo the request's EventType (a PatientSearch
# response whose EventType is "Query"), so the event type alone cannot say what a message is.
RESPONSE_CONTAINERS: Final = ("PotentialMatches", "Orders", "Visits", "Results", "Encounters")


def is_request(entity: str) -> pl.Expr:
    """True on a decoded page that asks rather than tells: a request event type and none of the
    reply containers (``RESPONSE_CONTAINERS``) this entity's page dtype reads."""
    b = pl.col("_b")
    present = [name for name in RESPONSE_CONTAINERS if name in page_dtype(entity).to_schema()]
    carries_data = pl.any_horizontal(
        [b.struct.field(name).is_not_null() for name in present] or [pl.lit(False)]
    )
    return pl.col("_event").is_in(list(REQUEST_EVENTS)).fill_null(False) & ~carries_data


def decode(pages: pl.LazyFrame, entity: str) -> pl.LazyFrame:
    """Pages -> ``raw_ref``, ``_b`` (the page struct), ``_page`` (position), ``_page_reason`` and
    the Meta columns ``_data_model``, ``_event``, ``_event_at``. A page that comes with a carried
    value of this entity's page dtype (``carry.CARRIED``) takes it instead of decoding its body."""
    b = pl.col("_b")
    meta = b.struct.field("Meta")
    dtype = page_dtype(entity)
    decoded = common.decode_expr("body", dtype, repairer(entity)).alias("_b")
    if pages.collect_schema().get(CARRIED) == dtype:
        # Pages whose parse the extract carried forward (``carry``) are not decoded again.
        indexed = pages.with_row_index("_page")
        has = pl.col(CARRIED).is_not_null()
        frame = pl.concat(
            [
                indexed.filter(has).select("_page", "raw_ref", pl.col(CARRIED).alias("_b")),
                indexed.filter(~has).select("_page", "raw_ref", decoded),
            ]
        ).sort("_page")
    else:
        frame = pages.select(pl.col("raw_ref"), decoded).with_row_index("_page")
    return (
        frame.with_columns(
            pl.coalesce(
                b.struct.field(common.PAGE_ERROR),
                pl.when(b.is_null()).then(pl.lit(NOT_AN_OBJECT)),
                pl.when(meta.is_null()).then(pl.lit(NO_META)),
                pl.when(meta.struct.field("Errors").list.len() > 0).then(pl.lit(META_ERRORS)),
            ).alias("_page_reason"),
            meta.struct.field("DataModel").alias("_data_model"),
            meta.struct.field("EventType").alias("_event"),
            meta.struct.field("EventDateTime").alias("_event_at"),
        )
        # Every chain and the page-error rows read this frame; without the cache the pages would be
        # decoded once per reader.
        .cache()
    )


def _chain_rows(decoded: pl.LazyFrame, chain: Chain, entity: str) -> pl.LazyFrame:
    """One row per record of ``chain``: columns ``rec`` (the leaf struct), ``ctx`` (the innermost
    context struct or the sibling patient), ``outer`` (the first level's item when there are two
    levels), ``_path`` and the page columns."""
    frame = decoded.filter(pl.col("_page_reason").is_null() & ~is_request(entity))
    if chain.data_model is not None:
        frame = frame.filter(pl.col("_data_model") == chain.data_model)
    sibling: pl.Expr = pl.lit(None, dtype=with_mark(PATIENT_CTX))
    if chain.sibling:
        sibling = pl.col("_b")
        for key in chain.sibling:
            sibling = sibling.struct.field(key)
    frame = frame.with_columns(sibling.alias("ctx"), pl.lit(None, dtype=pl.Struct(MARK)).alias("outer"))
    current = pl.col("_b").struct.field(chain.levels[0].key)
    path_parts: list[pl.Expr] = []
    for depth, level in enumerate(chain.levels):
        col = f"_l{depth}"
        frame = frame.with_columns(current.alias(col))
        if level.many:
            idx = f"_i{depth}"
            frame = frame.with_columns(
                pl.int_ranges(0, pl.col(col).list.len(), dtype=pl.Int32).alias(idx)
            ).explode([col, idx], keep_nulls=False)
            path_parts += [pl.lit(level.key), pl.col(idx).cast(pl.String)]
        else:
            frame = frame.filter(pl.col(col).is_not_null())
            path_parts.append(pl.lit(level.key))
        if level.child is not None:
            frame = frame.with_columns(pl.col(col).alias("outer"))
            current = pl.col(col).struct.field(level.child.key)
    leaf = f"_l{len(chain.levels) - 1}"
    return frame.with_columns(
        pl.col(leaf).alias("rec"),
        pl.concat_str(path_parts, separator="/").alias("_path"),
        pl.lit(chain.name).alias("_chain"),
    )


def page_rows(decoded: pl.LazyFrame) -> pl.LazyFrame:
    """The pages that are quarantined whole, one row each."""
    return decoded.filter(pl.col("_page_reason").is_not_null())


def records(decoded: pl.LazyFrame, chain: Chain, entity: str) -> pl.LazyFrame:
    """The rows of ``chain`` that are records of ``entity``."""
    rows = _chain_rows(decoded, chain, entity)
    if entity == "patients":
        rec = pl.col("rec")
        # PatientSearch answers "no single match" with Patient: {} (and the matches beside it).
        empty = (
            (field(rec, "Identifiers").list.len().fill_null(0) == 0)
            & field(rec, "Demographics").is_null()
            & field(rec, common.RECORD_ERROR).is_null()
        )
        rows = rows.filter(~empty)
    return rows


def located(decoded: pl.LazyFrame, chain: Chain, columns: list[pl.Expr], entity: str) -> pl.LazyFrame:
    """Chain rows -> table columns + quarantine_reason from markers (field checks come after)."""
    rec, ctx, outer = pl.col("rec"), pl.col("ctx"), pl.col("outer")
    marker = pl.coalesce(
        field(rec, common.RECORD_ERROR), field(ctx, common.RECORD_ERROR), field(outer, common.RECORD_ERROR)
    )
    return (
        records(decoded, chain, entity)
        .with_columns(
            field(rec, common.RECORD_RAW).alias(common.RECORD_RAW), pl.lit(SURFACE).alias("source_surface")
        )
        .with_columns(columns)
        .with_columns(marker.alias("quarantine_reason"))
    )


def record_path(row: dict[str, Any]) -> list[str | int] | None:
    """A row's record position inside its page (``_path``), as ``common.fill_raw`` wants it."""
    if row["_path"] is None:
        return None
    return [int(p) if p.isdigit() else p for p in row["_path"].split("/")]


def count_records(pages: pl.LazyFrame, entity: str, *, decoded: pl.LazyFrame | None = None) -> pl.LazyFrame:
    """One row: ``records`` located in the pages (the normalizer's rows before dedupe), ``pages``.

    Shares the decoding and locating step with the normalizer (Data Model records are nested in
    several response shapes, and a second locator would be a second thing to get wrong); what it
    checks is that no later step (field mapping, dedupe, split) loses a record. Pass the
    normalizer's ``decoded`` frame and collect both together (``pl.collect_all``): the pages are
    then decoded once for the two, the frame being cached.
    """
    decoded = decode(pages, entity) if decoded is None else decoded
    parts = [records(decoded, chain, entity).select(pl.len()) for chain in CHAINS[entity]]
    parts.append(page_rows(decoded).select(pl.len()))
    total = pl.concat(parts).select(pl.col("len").sum().cast(pl.Int64).alias("records"))
    return total.join(pages.select(pl.len().cast(pl.Int64).alias("pages")), how="cross")
