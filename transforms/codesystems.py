"""One code-system vocabulary for both surfaces: a source's spelling of a system -> its canonical URI.

FHIR names a code system by URI (``http://loinc.org``), the Data Model by a name (``LOINC``), and
HL7 v2/CDA traffic by an OID (``2.16.840.1.113883.6.1``). An analyst filtering on one system must
see one spelling, so ``code_system`` and ``value_code_system`` hold the canonical URI below, and the
source's own spelling stays in the matching ``*_source`` column.

Invariants kept:
- the lookup is on the spelling trimmed and lower-cased, with any ``urn:oid:`` prefix and trailing
  ``/`` removed, so ``LOINC``, ``loinc``, ``http://loinc.org/`` and ``urn:oid:2.16.840.1.113883.6.1``
  all reach ``http://loinc.org``;
- a system this table does not know passes through unchanged (never nulled, never guessed) and is
  counted by ``unknown_counts``; null and blank stay null.
"""

from typing import Final

import polars as pl

LOINC: Final = "http://loinc.org"
SNOMED: Final = "http://snomed.info/sct"
CPT: Final = "http://www.ama-assn.org/go/cpt"
ICD10CM: Final = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10: Final = "http://hl7.org/fhir/sid/icd-10"
ICD9CM: Final = "http://hl7.org/fhir/sid/icd-9-cm"
RXNORM: Final = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM: Final = "http://unitsofmeasure.org"
NDC: Final = "http://hl7.org/fhir/sid/ndc"
CVX: Final = "http://hl7.org/fhir/sid/cvx"
HCPCS: Final = "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"

# canonical URI -> the other spellings seen for it (names, HL7 v2 table 0396 codes, OIDs).
_SPELLINGS: Final[dict[str, tuple[str, ...]]] = {
    LOINC: ("loinc", "ln", "2.16.840.1.113883.6.1", "https://loinc.org"),
    SNOMED: (
        "snomed",
        "snomed ct",
        "snomed-ct",
        "snomedct",
        "snomed-ct us",
        "sct",
        "sctid",
        "2.16.840.1.113883.6.96",
        "https://snomed.info/sct",
    ),
    CPT: ("cpt", "cpt4", "cpt-4", "c4", "2.16.840.1.113883.6.12", "http://www.ama-assn.org/go/cpt-4"),
    ICD10CM: ("icd-10-cm", "icd10cm", "icd10-cm", "icd-10", "icd10", "i10", "i10c", "2.16.840.1.113883.6.90"),
    ICD10: ("icd-10-who", "2.16.840.1.113883.6.3"),
    ICD9CM: ("icd-9-cm", "icd9cm", "icd-9", "icd9", "i9", "i9c", "2.16.840.1.113883.6.103"),
    RXNORM: ("rxnorm", "rxn", "2.16.840.1.113883.6.88"),
    UCUM: ("ucum", "2.16.840.1.113883.6.8"),
    NDC: ("ndc", "2.16.840.1.113883.6.69"),
    CVX: ("cvx", "2.16.840.1.113883.12.292"),
    HCPCS: ("hcpcs", "hcpcs level ii", "2.16.840.1.113883.6.285"),
}

# lookup key -> canonical URI; a canonical URI also maps to itself.
CANONICAL: Final[dict[str, str]] = {
    key: uri for uri, spellings in _SPELLINGS.items() for key in (uri.lower(), *spellings)
}
KNOWN: Final = frozenset(_SPELLINGS)


def _key(source: pl.Expr) -> pl.Expr:
    return source.str.strip_chars().str.to_lowercase().str.strip_prefix("urn:oid:").str.strip_chars_end("/")


def canonical(source: pl.Expr) -> pl.Expr:
    """The canonical URI for a code-system spelling; unknown spellings unchanged; blank -> null."""
    keys = list(CANONICAL)
    # An Enum lookup, as valuesets.map_code does, so the streaming engine stays streaming.
    position = _key(source).cast(pl.Enum(keys), strict=False).to_physical()
    mapped = pl.lit(pl.Series([CANONICAL[k] for k in keys], dtype=pl.String)).gather(position)
    blank = source.is_null() | (source.str.strip_chars() == "")
    return pl.when(blank).then(None).otherwise(pl.coalesce(mapped, source))


def canonical_value(system: str | None) -> str | None:
    """``canonical`` for one Python string (for tests and expected-value helpers)."""
    if system is None or not system.strip():
        return None
    key = system.strip().lower().removeprefix("urn:oid:").rstrip("/")
    return CANONICAL.get(key, system)


def is_unknown(system: pl.Expr) -> pl.Expr:
    """True where a canonical column holds a system this vocabulary does not know (passed through)."""
    return system.is_not_null() & ~system.is_in(list(KNOWN))


# Columns holding canonical systems, per table; each has its source spelling in ``<column>_source``.
SYSTEM_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "encounters": ("type_system",),
    "results": ("code_system", "value_code_system"),
}


def unknown_counts(frame: pl.DataFrame, table: str) -> dict[str, int]:
    """Per system column of ``table``, how many rows carry a system outside the vocabulary."""
    return {
        column: int(frame.select(is_unknown(pl.col(column)).sum()).item() or 0)
        for column in SYSTEM_COLUMNS.get(table, ())
        if column in frame.columns
    }
