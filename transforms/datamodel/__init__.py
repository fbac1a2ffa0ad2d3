"""Redox Data Model response bodies -> the unified tables (patients, encounters, results, appointments).

Input: a LazyFrame of pages ``(raw_ref: String, body: String)``, one row per Data Model response.
Output: the normalized frame of ``transforms.common``; ``common.split`` separates it.

The package, in the order a page goes through it:

- ``dtypes``: the dtypes of the response parts read (every leaf a string);
- ``carry``: a reply's embedded patients typed from the client's parse, landed beside the page so
  the patients steps need not decode it;
- ``chains``: where each kind of record lives in a response, and the page dtype built from that;
- ``repair``: the Python path for pages the vectorized decode rejects (markers, page errors);
- ``locate``: decode pages (or take their carried value), one row per located record, and
  ``count_records`` from the same steps;
- ``fields``: expressions that read Data Model fields into column values;
- ``entities``: the four normalizers and ``reference_only``;
- here: ``normalize_counted``, a normalizer and ``count_records`` on one decode.

Invariants kept (each module states its part):

- one row per located record, per record that cannot be read (quarantined), and per unreadable
  page (quarantined), before dedupe; ``count_records`` counts exactly what was located, so
  ``records == good + sum(duplicates) + quarantined`` for every batch;
- request messages (Query, VisitQuery, Booked, ...) are not data: they yield no rows;
- a response with ``Meta.Errors`` is one quarantined page row: Redox said the query failed;
- no PHI in reasons: they name Data Model field paths.
"""

from typing import Final

import polars as pl

from transforms.datamodel.carry import CARRIED, CARRIED_DTYPE, carried_patients
from transforms.datamodel.entities import (
    appointments,
    encounters,
    local_id,
    patients,
    reference_only,
    results,
)
from transforms.datamodel.fields import DEFAULT_ID_TYPES, SURFACE
from transforms.datamodel.locate import count_records, decode

# entity -> normalizer, for callers that loop over the four streams.
NORMALIZERS: Final = {
    "patients": patients,
    "encounters": encounters,
    "results": results,
    "appointments": appointments,
}


def normalize_counted(pages: pl.LazyFrame, entity: str) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """``entity``'s normalized frame and its ``count_records``, built on one decode of the pages.

    Collect the two with one ``pl.collect_all``: each page is then decoded once for both.
    """
    decoded = decode(pages, entity)
    return NORMALIZERS[entity](pages, decoded=decoded), count_records(pages, entity, decoded=decoded)


__all__ = [
    "CARRIED",
    "CARRIED_DTYPE",
    "DEFAULT_ID_TYPES",
    "NORMALIZERS",
    "SURFACE",
    "appointments",
    "carried_patients",
    "count_records",
    "encounters",
    "local_id",
    "normalize_counted",
    "patients",
    "reference_only",
    "results",
]
