"""The stream registry: every fact about one surface x entity that more than one place needs.

Vocabulary used across the project:

- *surface*: where data comes from, ``fhir`` (FHIR R4 API) or ``datamodel`` (Redox Data Model API);
- *entity* = *table*: what a record is and the unified table it lands in (``patients``,
  ``encounters``, ``results``, ``appointments``);
- *stream*: one surface x entity. It has a source (the FHIR resource type searched, or the Data
  Model query/event asked), a normalizer (pages -> normalized frame of its table), and, for the
  clinical entities, the clinical time column that picks a record's partition day.

Invariant: these facts are stated here once. The extract, load, checks, changes and runner derive
from ``STREAMS``; the FHIR resource type of an entity is stated beside its decode dtype in
``transforms.fhir`` (the normalizer cannot be written without it) and read from there. Asset names
belong to the Dagster layer (assets/streams.py), which derives them from these keys.
"""

import dataclasses
from collections.abc import Callable
from typing import Final, Literal

import polars as pl

from transforms import datamodel, fhir

Surface = Literal["fhir", "datamodel"]
Entity = Literal["patients", "encounters", "results", "appointments"]

SURFACES: Final[tuple[Surface, ...]] = ("fhir", "datamodel")
ENTITIES: Final[tuple[Entity, ...]] = ("patients", "encounters", "results", "appointments")
# The entities that happen on a clinical day (and name their patient); patients do not.
CLINICAL_ENTITIES: Final[tuple[Entity, ...]] = ("encounters", "results", "appointments")


@dataclasses.dataclass(frozen=True)
class Stream:
    surface: Surface
    entity: Entity
    # The FHIR resource type searched, or the Data Model query/event asked, for a day's window.
    source: str
    normalize: Callable[[pl.LazyFrame], pl.LazyFrame]
    # The column whose UTC date is the record's partition day (None: patients have no clinical time).
    clinical_time: str | None
    # The entities whose landed pages this stream's load reads: Data Model patients arrive embedded
    # in every clinical response as well as in PatientSearch replies.
    reads: tuple[Entity, ...]

    @property
    def table(self) -> Entity:
        return self.entity


def _stream(
    surface: Surface,
    entity: Entity,
    source: str,
    normalize: Callable[[pl.LazyFrame], pl.LazyFrame],
    clinical_time: str | None,
    reads: tuple[Entity, ...] | None = None,
) -> Stream:
    return Stream(surface, entity, source, normalize, clinical_time, reads or (entity,))


STREAMS: Final[dict[tuple[Surface, Entity], Stream]] = {
    (s.surface, s.entity): s
    for s in (
        _stream("fhir", "patients", fhir.RESOURCE_TYPES["patients"], fhir.patients, None),
        _stream("fhir", "encounters", fhir.RESOURCE_TYPES["encounters"], fhir.encounters, "start_at"),
        _stream("fhir", "results", fhir.RESOURCE_TYPES["results"], fhir.results, "effective_at"),
        _stream("fhir", "appointments", fhir.RESOURCE_TYPES["appointments"], fhir.appointments, "start_at"),
        _stream(
            "datamodel",
            "patients",
            "PatientSearch.Query",
            datamodel.patients,
            None,
            reads=(*CLINICAL_ENTITIES, "patients"),
        ),
        _stream("datamodel", "encounters", "PatientAdmin.VisitQuery", datamodel.encounters, "start_at"),
        _stream("datamodel", "results", "Results.Query", datamodel.results, "effective_at"),
        _stream("datamodel", "appointments", "Scheduling.Booked", datamodel.appointments, "start_at"),
    )
}


def stream(surface: Surface, entity: Entity) -> Stream:
    return STREAMS[(surface, entity)]


def clinical_streams(surface: Surface) -> list[Stream]:
    return [STREAMS[(surface, entity)] for entity in CLINICAL_ENTITIES]
