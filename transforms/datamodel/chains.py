"""Where each kind of record lives in a Data Model response, and the page dtype that reads it.

A record sits at the end of a *chain* of containers, outermost first:

- encounters: ``Patients[].Visits[]`` (PatientAdmin VisitQueryResponse, CensusQueryResponse);
  ``Visit`` with the sibling ``Patient`` (PatientAdmin event messages); ``Encounters[]`` with
  ``Header.Patient`` (Clinical Summary);
- appointments: ``Visits[]`` each with its ``Patient`` (Scheduling BookedResponse); ``Visit`` with
  the sibling ``Patient`` (Scheduling event messages);
- results: ``Orders[].Results[]`` with ``Orders[].Patient`` or the sibling ``Patient`` (Results
  QueryResponse, New, NewUnsolicited); ``Results[].Observations[]`` with ``Header.Patient``
  (Clinical Summary);
- patients: every embedded patient: ``Patient``, ``PotentialMatches[]``, ``Patients[]``,
  ``Visits[].Patient``, ``Orders[].Patient``, ``Header.Patient``.

Invariant: one page dtype per entity, on which all of the entity's chains agree (``page_dtype``
raises otherwise), and every container level carries the ``MARK`` fields, so a container that
``repair`` had to rewrite still decodes with the same dtype.
"""

import dataclasses
from typing import Final

import polars as pl

from transforms import common
from transforms.datamodel.dtypes import (
    CS_ENCOUNTER,
    CS_OBSERVATION,
    CS_RESULT,
    MARK,
    META,
    ORDER_WITH_PATIENT,
    PATIENT,
    PATIENT_CTX,
    RESULT,
    VISIT,
    VISIT_WITH_PATIENT,
    S,
)


@dataclasses.dataclass(frozen=True)
class Level:
    """One container on the way to a record: ``key`` in its parent, a list or a single object."""

    key: str
    many: bool
    own: pl.Struct  # the fields read at this level (child containers excluded)
    child: "Level | None" = None


@dataclasses.dataclass(frozen=True)
class Chain:
    """Where one kind of record lives in a response, and which patient it belongs to."""

    name: str
    levels: tuple[Level, ...]  # outermost first; the last level holds the records
    # A context object beside the chain (top-level Patient, Header.Patient), as a key path.
    sibling: tuple[str, ...] | None = None
    data_model: str | None = None  # only responses of this DataModel


def with_mark(dtype: pl.Struct, child: Level | None = None) -> pl.Struct:
    """``dtype`` plus its child container (if any) plus the ``MARK`` fields."""
    fields = {f.name: f.dtype for f in dtype.fields}
    if child is not None:
        fields[child.key] = level_dtype(child)
    return pl.Struct({**fields, **MARK})


def level_dtype(level: Level) -> pl.DataType:
    inner = with_mark(level.own, level.child)
    return pl.List(inner) if level.many else inner


def _chain(
    name: str, *levels: Level, sibling: tuple[str, ...] | None = None, data_model: str | None = None
) -> Chain:
    nested: Level | None = None
    for level in reversed(levels):
        nested = dataclasses.replace(level, child=nested)
    flat: list[Level] = []
    while nested is not None:
        flat.append(nested)
        nested = nested.child
    return Chain(name, tuple(flat), sibling, data_model)


CHAINS: Final[dict[str, tuple[Chain, ...]]] = {
    "encounters": (
        _chain("visits", Level("Patients", True, PATIENT_CTX), Level("Visits", True, VISIT)),
        _chain("visit", Level("Visit", False, VISIT), sibling=("Patient",), data_model="PatientAdmin"),
        _chain("cs_encounters", Level("Encounters", True, CS_ENCOUNTER), sibling=("Header", "Patient")),
    ),
    "appointments": (
        _chain("bookings", Level("Visits", True, VISIT_WITH_PATIENT)),
        _chain("visit", Level("Visit", False, VISIT), sibling=("Patient",), data_model="Scheduling"),
    ),
    "results": (
        _chain(
            "orders",
            Level("Orders", True, ORDER_WITH_PATIENT),
            Level("Results", True, RESULT),
            sibling=("Patient",),
        ),
        _chain(
            "cs_results",
            Level("Results", True, CS_RESULT),
            Level("Observations", True, CS_OBSERVATION),
            sibling=("Header", "Patient"),
            data_model="Clinical Summary",
        ),
    ),
    "patients": (
        _chain("patient", Level("Patient", False, PATIENT)),
        _chain("matches", Level("PotentialMatches", True, PATIENT)),
        _chain("patients", Level("Patients", True, PATIENT)),
        _chain("bookings", Level("Visits", True, pl.Struct({})), Level("Patient", False, PATIENT)),
        _chain("orders", Level("Orders", True, pl.Struct({})), Level("Patient", False, PATIENT)),
        _chain("header", Level("Header", False, pl.Struct({})), Level("Patient", False, PATIENT)),
    ),
}


def page_dtype(entity: str) -> pl.Struct:
    """The dtype one response decodes into for ``entity``: ``Meta``, every chain's outermost
    container and sibling, and the page-error field ``repair`` sets on an unreadable page."""
    fields: dict[str, pl.DataType] = {"Meta": META}
    for chain in CHAINS[entity]:
        top = chain.levels[0]
        dtype = level_dtype(top)
        if top.key in fields and fields[top.key] != dtype:
            raise ValueError(f"chains of {entity} disagree on {top.key}")
        fields[top.key] = dtype
        if chain.sibling:
            fields.update(_sibling_dtype(chain.sibling, fields))
    return pl.Struct({**fields, common.PAGE_ERROR: S})


def _sibling_dtype(path: tuple[str, ...], fields: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    ctx: pl.DataType = with_mark(PATIENT_CTX)
    for key in reversed(path[1:]):
        ctx = pl.Struct({key: ctx})
    head = path[0]
    if head in fields and fields[head] != ctx:
        # Header is both a container (patients) and a sibling path (clinical): never in one entity.
        raise ValueError(f"sibling {head} clashes with a container")
    return {head: ctx}
