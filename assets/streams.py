"""What each extract stream pulls for one clinical day, for both Redox surfaces.

A stream is one (surface, entity) pair. This module is the single table of how a day's window is
asked of Redox: the FHIR resource type and its date parameter, or the Data Model query. Assets are
generated from it, so the eight extract assets cannot drift apart in behaviour.
"""

import dataclasses
import datetime as dt
from collections.abc import Callable
from typing import Literal

import polars as pl

from transforms import datamodel as dm_norm
from transforms import fhir as fhir_norm

Surface = Literal["fhir", "datamodel"]
Entity = Literal["patients", "encounters", "results", "appointments"]
ENTITIES: tuple[Entity, ...] = ("patients", "encounters", "results", "appointments")
CLINICAL: tuple[Entity, ...] = ("encounters", "results", "appointments")


@dataclasses.dataclass(frozen=True)
class Stream:
    surface: Surface
    entity: Entity
    # FHIR resource type searched, or the Data Model query used, for the day window.
    source: str
    normalize: Callable[..., pl.LazyFrame]

    @property
    def asset_name(self) -> str:
        prefix = "fhir" if self.surface == "fhir" else "dm"
        return f"{prefix}_{self.entity}"


STREAMS: dict[tuple[Surface, Entity], Stream] = {
    ("fhir", "patients"): Stream("fhir", "patients", "Patient", fhir_norm.patients),
    ("fhir", "encounters"): Stream("fhir", "encounters", "Encounter", fhir_norm.encounters),
    ("fhir", "results"): Stream("fhir", "results", "Observation", fhir_norm.results),
    ("fhir", "appointments"): Stream("fhir", "appointments", "Appointment", fhir_norm.appointments),
    ("datamodel", "patients"): Stream("datamodel", "patients", "PatientSearch.Query", dm_norm.patients),
    ("datamodel", "encounters"): Stream(
        "datamodel", "encounters", "PatientAdmin.VisitQuery", dm_norm.encounters
    ),
    ("datamodel", "results"): Stream("datamodel", "results", "Results.Query", dm_norm.results),
    ("datamodel", "appointments"): Stream(
        "datamodel", "appointments", "Scheduling.Booked", dm_norm.appointments
    ),
}


def day_window(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """The half-open UTC window [day 00:00, next day 00:00) a partition covers."""
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def partition_folder(day: dt.date) -> str:
    return f"day={day.isoformat()}"
