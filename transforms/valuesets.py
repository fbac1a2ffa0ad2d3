"""ValueSet code maps: every source code each surface may send, mapped to the canonical vocabulary.

The canonical vocabularies live in ``schema.VALUESETS``; this module only says how each surface's
codes land in them. Invariants kept:

- every mapped value is a member of ``schema.VALUESETS[field]`` (checked at import time);
- lookups are case-insensitive and ignore surrounding blanks, because the Data Model's free-text
  codes arrive as 'Canceled', 'CANCELED' or ' canceled' depending on the EHR; the source code itself
  is stored untouched in ``<field>_source`` by the normalizers;
- a code absent from its code map maps to 'unknown' and is *counted* (``unmapped_counts``), never
  quarantined: a new EHR code is a mapping gap to fix, not a broken record. A code that is in a
  code map but has no canonical equivalent (e.g. FHIR Appointment 'proposed') maps to 'unknown' on
  purpose and is not counted as unmapped.
- null stays null: "the source said nothing" is different from "the source said something we do
  not know".
"""

from collections.abc import Mapping
from typing import Final

import polars as pl

import schema
from transforms import codesystems

# source code (lower-cased, stripped) -> canonical value. Not a warehouse table: those are entities.
CodeMap = Mapping[str, str]

# --- FHIR R4 -------------------------------------------------------------------------------------

FHIR_SEX: Final[CodeMap] = {"male": "male", "female": "female", "other": "other", "unknown": "unknown"}

# v3 ActCode (http://terminology.hl7.org/CodeSystem/v3-ActCode), the R4 Encounter.class binding.
FHIR_ENCOUNTER_CLASS: Final[CodeMap] = {
    "amb": "ambulatory",
    "emer": "emergency",
    "imp": "inpatient",
    "acute": "inpatient",
    "nonac": "inpatient",
    "obsenc": "observation",
    "vr": "virtual",
    # Home health is care outside a facility without an admission: the ambulatory bucket.
    "hh": "ambulatory",
    "prenc": "ambulatory",
    "fld": "ambulatory",
    "ss": "observation",
    # v3 NullFlavor UNK, what an EHR (and the sandbox) sends for an unknown class.
    "unk": "unknown",
}

FHIR_ENCOUNTER_STATUS: Final[CodeMap] = {
    "planned": "planned",
    "arrived": "arrived",
    "triaged": "arrived",
    "in-progress": "in-progress",
    "onleave": "in-progress",
    "finished": "finished",
    "cancelled": "cancelled",
    "entered-in-error": "entered-in-error",
    "unknown": "unknown",
}

FHIR_APPOINTMENT_STATUS: Final[CodeMap] = {
    "booked": "booked",
    "arrived": "arrived",
    "checked-in": "arrived",
    "fulfilled": "fulfilled",
    "cancelled": "cancelled",
    "noshow": "noshow",
    "entered-in-error": "entered-in-error",
    # Not yet (or no longer) a booked slot, and the canonical set has no word for it: keep the
    # source code in status_source rather than pretending it is booked.
    "proposed": "unknown",
    "pending": "unknown",
    "waitlist": "unknown",
}

FHIR_RESULT_STATUS: Final[CodeMap] = {
    # 'registered' exists before any value does; closest canonical meaning is "not final yet".
    "registered": "preliminary",
    "preliminary": "preliminary",
    "final": "final",
    "amended": "corrected",
    "corrected": "corrected",
    "cancelled": "cancelled",
    "entered-in-error": "entered-in-error",
    "unknown": "unknown",
}

# v3 ObservationInterpretation codes.
FHIR_ABNORMAL_FLAG: Final[CodeMap] = {
    "n": "normal",
    "l": "low",
    "h": "high",
    "ll": "critical_low",
    "hh": "critical_high",
    "a": "abnormal",
    # Critically abnormal without a direction: the canonical set only has the undirected bucket.
    "aa": "abnormal",
    # "Significantly" low/high sit between L/H and LL/HH; they are not panic values.
    "lu": "low",
    "hu": "high",
    # Off scale low/high.
    "<": "low",
    ">": "high",
    # Indeterminate: a flag was given and says "cannot tell".
    "ind": "unknown",
}

# --- Redox Data Model ----------------------------------------------------------------------------

DM_SEX: Final[CodeMap] = {
    "male": "male",
    "m": "male",
    "female": "female",
    "f": "female",
    "other": "other",
    "o": "other",
    "unknown": "unknown",
    "u": "unknown",
}

DM_ENCOUNTER_CLASS: Final[CodeMap] = {
    "outpatient": "ambulatory",
    "ambulatory": "ambulatory",
    "recurring": "ambulatory",
    "day surgery": "ambulatory",
    "emergency": "emergency",
    "er": "emergency",
    "inpatient": "inpatient",
    "preadmit": "inpatient",
    "observation": "observation",
    "virtual": "virtual",
    "telehealth": "virtual",
    "unknown": "unknown",
}

DM_ENCOUNTER_STATUS: Final[CodeMap] = {
    "scheduled": "planned",
    "planned": "planned",
    "preadmit": "planned",
    "arrived": "arrived",
    "checked in": "arrived",
    "in progress": "in-progress",
    "in-progress": "in-progress",
    "completed": "finished",
    "complete": "finished",
    "finished": "finished",
    "discharged": "finished",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    # An encounter that never happened because the patient did not come is a cancelled encounter
    # (FHIR R4 has no encounter no-show); status_source keeps the distinction.
    "no show": "cancelled",
    "noshow": "cancelled",
    "entered in error": "entered-in-error",
    "unknown": "unknown",
}

# Scheduling event messages (New, Cancel, ...) often carry no Visit.Status; the event type then says
# what happened to the appointment, so the normalizer falls back to it (see data dictionary).
DM_APPOINTMENT_STATUS: Final[CodeMap] = {
    "scheduled": "booked",
    "booked": "booked",
    "confirmed": "booked",
    "arrived": "arrived",
    "checked in": "arrived",
    "in progress": "arrived",
    "completed": "fulfilled",
    "complete": "fulfilled",
    "fulfilled": "fulfilled",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "no show": "noshow",
    "noshow": "noshow",
    "entered in error": "entered-in-error",
    "unknown": "unknown",
    # Meta.EventType fallbacks.
    "new": "booked",
    "reschedule": "booked",
    "modification": "booked",
    "cancel": "cancelled",
}

DM_RESULT_STATUS: Final[CodeMap] = {
    "final": "final",
    "preliminary": "preliminary",
    "in progress": "preliminary",
    "incomplete": "preliminary",
    "pending": "preliminary",
    "corrected": "corrected",
    "amended": "corrected",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "entered in error": "entered-in-error",
    "unknown": "unknown",
}

DM_ABNORMAL_FLAG: Final[CodeMap] = {
    "normal": "normal",
    "n": "normal",
    "low": "low",
    "l": "low",
    "high": "high",
    "h": "high",
    "critical low": "critical_low",
    "ll": "critical_low",
    "critical high": "critical_high",
    "hh": "critical_high",
    "abnormal": "abnormal",
    "a": "abnormal",
    "very abnormal": "abnormal",
    "aa": "abnormal",
    "unknown": "unknown",
}

# (surface, field) -> code map. `field` is the schema.VALUESETS key; the column it fills is given by
# CODED_COLUMNS below.
CODE_MAPS: Final[dict[tuple[str, str], CodeMap]] = {
    ("fhir", "sex"): FHIR_SEX,
    ("fhir", "encounter_class"): FHIR_ENCOUNTER_CLASS,
    ("fhir", "encounter_status"): FHIR_ENCOUNTER_STATUS,
    ("fhir", "appointment_status"): FHIR_APPOINTMENT_STATUS,
    ("fhir", "result_status"): FHIR_RESULT_STATUS,
    ("fhir", "abnormal_flag"): FHIR_ABNORMAL_FLAG,
    ("datamodel", "sex"): DM_SEX,
    ("datamodel", "encounter_class"): DM_ENCOUNTER_CLASS,
    ("datamodel", "encounter_status"): DM_ENCOUNTER_STATUS,
    ("datamodel", "appointment_status"): DM_APPOINTMENT_STATUS,
    ("datamodel", "result_status"): DM_RESULT_STATUS,
    ("datamodel", "abnormal_flag"): DM_ABNORMAL_FLAG,
}

# table -> [(mapped column, valueset field)]; the source column is always f"{column}_source".
CODED_COLUMNS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "patients": (("sex", "sex"),),
    "encounters": (("class", "encounter_class"), ("status", "encounter_status")),
    "appointments": (("status", "appointment_status"),),
    "results": (("abnormal_flag", "abnormal_flag"), ("status", "result_status")),
}


def _check() -> None:
    for (surface, field), codes in CODE_MAPS.items():
        allowed = set(schema.VALUESETS[field])
        bad = {code for code, value in codes.items() if value not in allowed}
        if bad or any(code != code.strip().lower() for code in codes):
            raise ValueError(
                f"ValueSet {surface}/{field} maps outside schema.VALUESETS or has un-normalized keys"
            )


_check()


def _lookup_key(source: pl.Expr) -> pl.Expr:
    return source.str.strip_chars().str.to_lowercase()


def map_code(source: pl.Expr, surface: str, field: str) -> pl.Expr:
    """The canonical value for a source code column: code map hit, else 'unknown'; null stays null."""
    code_map = CODE_MAPS[(surface, field)]
    codes = list(code_map)
    # A lookup through an Enum of the map's codes (a code outside it casts to null), not
    # replace_strict, which the streaming engine runs as an in-memory fallback that gathers every
    # row of the batch first (that alone more than doubled the normalizers' peak memory), nor a
    # when/is_in chain, which recomputes the lookup key once per canonical value (three times
    # the CPU).
    position = _lookup_key(source).cast(pl.Enum(codes), strict=False).to_physical()
    mapped = pl.lit(pl.Series([code_map[code] for code in codes], dtype=pl.String)).gather(position)
    return (
        pl.when(source.is_null() | (source.str.strip_chars() == ""))
        .then(None)
        .otherwise(mapped.fill_null("unknown"))
    )


def is_unmapped(source: pl.Expr, surface: str, field: str) -> pl.Expr:
    """True where a non-blank source code is absent from the code map (a mapping gap to report)."""
    code_map = CODE_MAPS[(surface, field)]
    blank = source.is_null() | (source.str.strip_chars() == "")
    return ~blank & ~_lookup_key(source).is_in(list(code_map))


def unmapped_counts(frame: pl.DataFrame, table: str, surface: str) -> dict[str, int]:
    """Per coded column of ``table``, how many rows carried a source code its code map does not know.

    Counts, for asset metadata; the codes themselves are in the warehouse (``<column>_source``),
    which is where to look when extending a code map.
    """
    out: dict[str, int] = {}
    for column, field in CODED_COLUMNS[table]:
        src = f"{column}_source"
        if src not in frame.columns:
            continue
        out[column] = int(frame.select(is_unmapped(pl.col(src), surface, field).sum()).item() or 0)
    # Code systems outside the one vocabulary pass through unchanged; they are counted here.
    out.update(codesystems.unknown_counts(frame, table))
    return out
