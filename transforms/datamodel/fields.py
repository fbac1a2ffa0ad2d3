"""Expressions that read Data Model fields into unified column values, shared by the normalizers.

Invariants: a blank string reads as null wherever a fallback follows it (``blank_to_null``), so an
empty ``Department`` never hides the ``Facility``; a patient's ``source_id`` is chosen by one rule
(``patient_source_id``) for patient rows and for the ``patient_source_id`` of clinical rows alike,
which is what lets the two join.
"""

from collections.abc import Sequence
from typing import Final

import polars as pl

from transforms import common

SURFACE: Final = "datamodel"
DEFAULT_ID_TYPES: Final = ("MR", "MRN")


def field(expr: pl.Expr, *path: str) -> pl.Expr:
    """The struct field at ``path`` below ``expr``."""
    for name in path:
        expr = expr.struct.field(name)
    return expr


def blank_to_null(expr: pl.Expr) -> pl.Expr:
    return pl.when(common.present(expr)).then(expr)


def patient_source_id(identifiers: pl.Expr, preferred: Sequence[str] = DEFAULT_ID_TYPES) -> pl.Expr:
    """ID of the first identifier whose IDType is in ``preferred`` (in that order of preference),
    else 'IDType:ID' of the first identifier with an ID."""
    usable = identifiers.list.filter(common.present(pl.element().struct.field("ID")))
    picks = [
        usable.list.filter(pl.element().struct.field("IDType") == kind).list.first().struct.field("ID")
        for kind in preferred
    ]
    first = usable.list.first()
    fallback = pl.concat_str(
        [pl.coalesce(first.struct.field("IDType"), pl.lit("")), first.struct.field("ID")], separator=":"
    )
    return pl.coalesce(*picks, fallback)


def clinical_patient(patient: pl.Expr, preferred: Sequence[str]) -> pl.Expr:
    """The ``patient_source_id`` of a clinical record, from its context patient struct."""
    return patient_source_id(field(patient, "Identifiers"), preferred)


def identifier_system(id_type: pl.Expr) -> pl.Expr:
    """IDType -> a URI: an OID gets ``urn:oid:``, a URI stays, anything else ``urn:redox:dm:``."""
    t = id_type.str.strip_chars()
    return (
        pl.when(~common.present(t))
        .then(None)
        .when(t.str.contains(r"^\d+(?:\.\d+)+$"))
        .then(pl.lit("urn:oid:") + t)
        .when(t.str.contains(r"^[A-Za-z][A-Za-z0-9+.-]*:"))
        .then(t)
        .otherwise(pl.lit("urn:redox:dm:") + t)
    )


def provider_name(provider: pl.Expr) -> pl.Expr:
    return blank_to_null(
        pl.concat_str(
            [field(provider, "FirstName"), field(provider, "LastName")], separator=" ", ignore_nulls=True
        )
    )


def timestamp(text: pl.Expr, name: str, path: str) -> tuple[pl.Expr, tuple[pl.Expr, str]]:
    """(``text`` parsed to UTC as column ``name``, the check that quarantines an unparseable one
    with the reason naming the field ``path``)."""
    parsed = common.parse_utc(text)
    return parsed.alias(name), (common.unparseable(text, parsed), f"{path}: unparseable datetime")
