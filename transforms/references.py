"""Which patients a day's clinical pages point at: what the patients extract must fetch.

Invariant: it reads what a patient fetch needs and no more. FHIR clinical pages are decoded for
their patient references only (``fhir.referenced_patients``). Data Model responses embed the patient
(identifiers, and demographics in some events), so there the patients normalizer is the reader: it
says whether the embedded record is complete enough that no PatientSearch is needed.
"""

import polars as pl

from transforms import datamodel, fhir
from transforms.streams import Surface


def referenced_patients(surface: Surface, pages: pl.LazyFrame) -> pl.LazyFrame:
    """``source_id`` and ``complete`` (the pages already hold the record), plus ``identifiers`` for
    the Data Model, whose PatientSearch asks by identifier."""
    if surface == "fhir":
        return fhir.referenced_patients(pages).with_columns(pl.lit(False).alias("complete"))
    return (
        datamodel.patients(pages)
        .filter(pl.col("quarantine_reason").is_null())
        .select(
            "source_id",
            "identifiers",
            (pl.col("family_name").is_not_null() & pl.col("birth_date").is_not_null()).alias("complete"),
        )
    )
