"""Batch frames turned into ``sandbox.model`` record objects, the form the store keeps.

Invariant: one record per frame row, in frame order; epoch-second time columns become aware UTC
datetimes, and nothing here draws from a random stream.
"""

import dataclasses
import itertools
from typing import Any, Final

import polars as pl

from sandbox.model import (
    Appointment,
    Encounter,
    Identifier,
    Kind,
    Patient,
    Person,
    Result,
    bulk_constructor,
)
from sandbox.population.epoch import dts
from sandbox.population.people import DEMOGRAPHICS

_ENCOUNTER_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Encounter))
_RESULT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Result))
_APPOINTMENT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Appointment))
_TIME_FIELDS: Final = frozenset({"start_at", "end_at", "effective_at"})


_MAKE: Final[dict[type, Any]] = {cls: bulk_constructor(cls) for cls in (Encounter, Result, Appointment)}
_NEW_IDENTIFIER: Final = bulk_constructor(Identifier)
_NEW_PATIENT: Final = bulk_constructor(Patient)
_NEW_PERSON: Final = bulk_constructor(Person)


def to_records(frame: pl.DataFrame, cls: type, fields: tuple[str, ...]) -> list[Any]:
    """Record objects from a batch frame (epoch-second time columns become aware datetimes)."""
    columns = [dts(frame[f].to_list()) if f in _TIME_FIELDS else frame[f].to_list() for f in fields]
    return list(itertools.starmap(_MAKE[cls], zip(*columns, strict=True)))


def to_patients(frame: pl.DataFrame) -> list[Patient]:
    """Patient records from a batch's patients frame, in frame order."""
    ident = _NEW_IDENTIFIER
    identifiers = [
        tuple([ident(i["system"], i["value"]) for i in row]) for row in frame["identifiers"].to_list()
    ]
    columns: list[Any] = [frame[c].to_list() for c in ("source_surface", "source_id", "person_id")]
    columns += [
        identifiers,
        *(frame[f].to_list() for f in DEMOGRAPHICS),
        map(tuple, frame["noise"].to_list()),
    ]
    return list(itertools.starmap(_NEW_PATIENT, zip(*columns, strict=True)))


def to_persons(frame: pl.DataFrame) -> list[Person]:
    """Person records from a batch's persons frame, in frame order."""
    columns = [frame[c].to_list() for c in ("person_id", *DEMOGRAPHICS, "hard_group")]
    return list(itertools.starmap(_NEW_PERSON, zip(*columns, strict=True)))


FRAME_KINDS: Final[dict[Kind, tuple[type, tuple[str, ...]]]] = {
    "encounters": (Encounter, _ENCOUNTER_FIELDS),
    "results": (Result, _RESULT_FIELDS),
    "appointments": (Appointment, _APPOINTMENT_FIELDS),
}
