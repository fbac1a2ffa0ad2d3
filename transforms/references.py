"""Which patients a day's clinical pages point at: what the patients extract must fetch.

Invariant: it reads what a patient fetch needs and no more. FHIR clinical pages are decoded for
their patient references only (``fhir_referenced_patients``). Data Model responses embed the patient
(identifiers, and demographics in some events), so there the patients normalizer is the reader: it
says whether the embedded record is complete enough that no PatientSearch is needed. It reads what
the extract carried forward from the transport's parse (``datamodel.carry``) where the pages come
with it, so a clinical page is not decoded again for its patients.
"""

from typing import Any, Final

import polars as pl

from transforms import common, datamodel, fhir
from transforms.streams import Surface

S = pl.String()


# --- FHIR: references only --------------------------------------------------------------------------

_REF: Final = pl.Struct({"reference": S})
_REFS_DTYPE: Final = pl.Struct(
    {
        "resourceType": S,
        "entry": pl.List(
            pl.Struct(
                {
                    "resource": pl.Struct(
                        {
                            "resourceType": S,
                            "subject": _REF,
                            "participant": pl.List(pl.Struct({"actor": _REF})),
                        }
                    )
                }
            )
        ),
    }
)


def _references_only(body: str | None, generic: bool) -> str:
    """A page the narrow decode rejects, rewritten to its well-typed reference fields only."""
    page, problem = common.load_json(body)
    if problem or fhir.page_problem(page):
        return "{}"

    def ref(value: Any) -> dict[str, str] | None:
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            return {"reference": value["reference"]}
        return None

    kept = []
    for entry in page.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            continue
        participants = resource.get("participant")
        kept.append(
            {
                "resource": {
                    "resourceType": resource["resourceType"],
                    "subject": ref(resource.get("subject")),
                    "participant": [
                        {"actor": ref(p.get("actor"))} for p in participants if isinstance(p, dict)
                    ]
                    if isinstance(participants, list)
                    else None,
                }
            }
        )
    return common.dumps({"resourceType": "Bundle", "entry": kept})


def fhir_referenced_patients(pages: pl.LazyFrame) -> pl.LazyFrame:
    """Distinct ``source_id`` of the patients that clinical pages (any mix of Encounter, Observation
    and Appointment Bundles) point at, read the way the normalizers read ``patient_source_id``.

    It decodes only ``subject`` and ``participant.actor`` references, not the records: the patients
    extract needs whom to fetch, not the rows. A record the normalizer would quarantine for another
    field still names its patient here, which is what that patient's fetch needs.
    """
    resource = pl.col("_e").struct.field("resource")
    kind = resource.struct.field("resourceType")
    subject = fhir.ref_id(resource.struct.field("subject").struct.field("reference"), "Patient")
    actor = pl.element().struct.field("actor").struct.field("reference")
    patient_actor = fhir.ref_id(
        resource.struct.field("participant")
        .list.eval(actor)
        .list.filter(pl.element().str.contains("Patient/").fill_null(False))
        .list.first(),
        "Patient",
    )
    by_subject = [fhir.RESOURCE_TYPES["encounters"], fhir.RESOURCE_TYPES["results"]]
    return (
        pages.select(
            pl.col("body")
            .map_batches(
                lambda s: common.robust_decode(s, _REFS_DTYPE, _references_only, purpose="references"),
                return_dtype=_REFS_DTYPE,
                is_elementwise=True,
            )
            .struct.field("entry")
            .alias("_e")
        )
        .explode("_e")
        .select(
            pl.when(kind.is_in(by_subject))
            .then(subject)
            .when(kind == fhir.RESOURCE_TYPES["appointments"])
            .then(patient_actor)
            .alias("source_id")
        )
        .drop_nulls()
        .unique()
    )


# --- either surface ------------------------------------------------------------------------------


def referenced_patients(surface: Surface, pages: pl.LazyFrame) -> pl.LazyFrame:
    """``source_id`` and ``complete`` (the pages already hold the record), plus ``identifiers`` for
    the Data Model, whose PatientSearch asks by identifier."""
    if surface == "fhir":
        return fhir_referenced_patients(pages).with_columns(pl.lit(False).alias("complete"))
    return (
        datamodel.patients(pages)
        .filter(pl.col("quarantine_reason").is_null())
        .select(
            "source_id",
            "identifiers",
            (pl.col("family_name").is_not_null() & pl.col("birth_date").is_not_null()).alias("complete"),
        )
    )
