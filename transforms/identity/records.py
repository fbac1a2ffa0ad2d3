"""The patient records identity starts from: current versions, the two sides, outside lists.

Invariant: identity only ever compares the latest version of each (source_surface, source_id), and
an identifier system is compared in one spelling (trimmed, lowercased, an OID as ``urn:oid:X``).
"""

import polars as pl

from schema import NATURAL_KEY, PATIENTS


def latest_versions(patients: pl.LazyFrame) -> pl.LazyFrame:
    """One row per (source_surface, source_id): the latest version, since a patient table keeps one
    row per source record version and only the current one describes the person. Ties (and missing
    timestamps) resolve to the first such row."""
    key = list(NATURAL_KEY)
    # A window pick, not sort + unique: unique() gathers the nested identifiers column and is ~15x
    # slower at a million rows.
    updated = pl.col("source_updated_at").cast(pl.Int64).fill_null(-(2**62))
    return patients.filter(pl.int_range(pl.len()).over(key) == updated.arg_max().over(key))


def normalize_system(system: pl.Expr) -> pl.Expr:
    """Identifier system in one spelling: trimmed, lowercased, and an OID always as ``urn:oid:X``
    (the Data Model surface sends a bare OID where FHIR sends the URN)."""
    s = system.str.strip_chars().str.to_lowercase()
    return (
        pl.when(s.str.contains(r"^[0-9]+(\.[0-9]+)+$"))
        .then(pl.lit("urn:oid:") + s)
        .otherwise(s)
        .replace("", None)
    )


def split_surfaces(
    patients: pl.DataFrame | pl.LazyFrame, surfaces: tuple[str, str] = ("fhir", "datamodel")
) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """The two inputs of a cross-surface link, from one ``patients`` table."""
    lf = patients.lazy()
    return (
        lf.filter(pl.col("source_surface") == surfaces[0]),
        lf.filter(pl.col("source_surface") == surfaces[1]),
    )


def conform_patients(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Cast an outside patient list to the ``patients`` columns identity reads (missing -> null)."""
    lf = frame.lazy()
    have = set(lf.collect_schema().names())
    return lf.select(
        [(pl.col(n) if n in have else pl.lit(None)).cast(t).alias(n) for n, t in PATIENTS.items()]
    )
