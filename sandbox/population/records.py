"""Batch frames turned into ``sandbox.model`` record objects, the form the store keeps.

Here too a few Data Model records get an id their source system already gave another patient's
record: Redox's VisitNumber and Order ID are unique only within the source system that issued
them, and real feeds reuse them. Such a record is kept in the store under '<sent id>~<own id>'
(unique), and sent as '<sent id>' (``datamodel_render.wire_id``), so two patients' records go out
with one id. The truth keeps the store's key; what the lake must hold is the sent id scoped by the
record's patient (tests/pipeline/truth.py).

Invariant: one record per frame row, in frame order; epoch-second time columns become aware UTC
datetimes; which records reuse an id is a digest of their own id, never a draw from a random
stream, so every other draw of the world is unchanged.
"""

import dataclasses
import itertools
import zlib
from typing import Any, Final

import polars as pl

from sandbox.datamodel_render import REUSED_MARK
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


# About one Data Model visit or order in this many is sent with an id another patient's has.
REUSE_EVERY: Final = 40


def reused_ids(frame: pl.DataFrame, key: str) -> dict[str, str]:
    """Own id -> store key '<sent id>~<own id>' for the Data Model records of ``frame`` that reuse
    an id: those whose id's digest falls in one ``REUSE_EVERY`` (else the batch's last record),
    each taking the id of the latest earlier record of the batch that belongs to another patient,
    reuses none itself and is not already sent for this patient (Redox keys a record by patient and
    id: one patient's two orders under one id would be two versions of one order, not two orders)."""
    if key not in frame.columns or "patient_source_id" not in frame.columns:
        return {}
    rows = (
        frame.filter(pl.col("surface") == "datamodel")
        .select(key, "patient_source_id")
        .unique(key, keep="first", maintain_order=True)
    )
    out: dict[str, str] = {}
    latest: dict[str, str] = {}  # patient -> the latest id of theirs that could be reused
    taken: set[tuple[str, str]] = set()  # (patient, sent id) already reused for that patient
    for own, patient in rows.iter_rows():
        if REUSED_MARK in own:
            continue
        if zlib.crc32(own.encode()) % REUSE_EVERY == 0:
            others = [i for p, i in latest.items() if p != patient and (patient, i) not in taken]
            if others:
                out[own] = f"{others[-1]}{REUSED_MARK}{own}"
                taken.add((patient, others[-1]))
                continue
        latest.pop(patient, None)
        latest[patient] = own
    if not out and rows.height > 1:
        # At least one per batch that can have one (the batch's last record, which no record of the
        # batch reuses), so even a small world sends an id for two patients.
        own, patient = rows.row(-1)
        others = [i for p, i in latest.items() if p != patient and (patient, i) not in taken]
        if REUSED_MARK not in own and others:
            out[own] = f"{others[-1]}{REUSED_MARK}{own}"
    return out


def _with_reused_ids(frame: pl.DataFrame, cls: type) -> pl.DataFrame:
    # Results carry their order's id in ``order_id`` and in their own '<order>|<code>' key.
    key = "order_id" if cls is Result else "source_id"
    reused = reused_ids(frame, key)
    if not reused:
        return frame
    mine = (pl.col("surface") == "datamodel") & pl.col(key).is_in(list(reused))
    new = pl.col(key).replace(reused)
    if cls is Result:
        return frame.with_columns(
            pl.when(mine).then(new).otherwise(pl.col("order_id")).alias("order_id"),
            pl.when(mine)
            .then(pl.concat_str([new, pl.col("source_id").str.slice(pl.col("order_id").str.len_chars())]))
            .otherwise(pl.col("source_id"))
            .alias("source_id"),
        )
    return frame.with_columns(pl.when(mine).then(new).otherwise(pl.col(key)).alias(key))


def to_records(frame: pl.DataFrame, cls: type, fields: tuple[str, ...]) -> list[Any]:
    """Record objects from a batch frame (epoch-second time columns become aware datetimes), a few
    Data Model ones under a reused id (``reused_ids``)."""
    frame = _with_reused_ids(frame, cls)
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
