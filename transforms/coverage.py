"""Field coverage: which source JSON paths the records carried, how often, and whether a column holds them.

A *path* names a leaf of a record's JSON with its keys joined by ``.`` and every list level written
``[]`` (``code.coding[].system``). A FHIR record is one entry's ``resource``; a Data Model record is
the whole message (its paths start at the message root, ``Orders[].Results[].Value``), because
which container holds a record depends on the message.

``MAPPED`` is the registry of paths each stream's normalizer turns into a column (or a check): a
registered path covers itself and every path under it. The normalizer owners extend it when they
map a field; a path seen in the data and not covered is *unmapped*: still reachable from SQL
through the record's source JSON (the ``source_pages`` view) and counted in ``field_coverage``.

Invariants: pure (pages in, counts out; no file, no network); a record counts once per path however
many list items carry it; only paths and counts leave here, never a value (no PHI).
"""

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any, Final

import polars as pl

from transforms.common import DType

_FHIR_BASE: Final = ("resourceType", "id", "meta.lastUpdated")
_CODEABLE = ("coding[].system", "coding[].code", "coding[].display", "text")
_REFERENCE = ("reference", "display", "identifier.system", "identifier.value")


def _under(prefix: str, paths: Iterable[str]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{p}" for p in paths)


_DM_PATIENT: Final = (
    "Identifiers[].ID",
    "Identifiers[].IDType",
    "Demographics.FirstName",
    "Demographics.MiddleName",
    "Demographics.LastName",
    "Demographics.DOB",
    "Demographics.SSN",
    "Demographics.Sex",
    "Demographics.PhoneNumber.Home",
    "Demographics.PhoneNumber.Mobile",
    "Demographics.PhoneNumber.Office",
    "Demographics.EmailAddresses[]",
    "Demographics.Address.StreetAddress",
    "Demographics.Address.City",
    "Demographics.Address.State",
    "Demographics.Address.ZIP",
)
_DM_META: Final = ("Meta.DataModel", "Meta.EventType", "Meta.EventDateTime", "Meta.Errors[].Text")
_DM_PROVIDER: Final = ("ID", "IDType", "NPI", "FirstName", "LastName")
_DM_VISIT: Final = (
    "VisitNumber",
    "VisitDateTime",
    "DischargeDateTime",
    "Duration",
    "PatientClass",
    "Status",
    "Reason",
    "Type",
    "LastUpdated",
    *_under("AttendingProvider", _DM_PROVIDER),
    "Location.Facility",
    "Location.Department",
    "AppointmentInfo[].Code",
    "AppointmentInfo[].Codeset",
    "AppointmentInfo[].Description",
)
_DM_RANGE: Final = ("ReferenceRange.Low", "ReferenceRange.High", "ReferenceRange.Text")
_DM_ORDER: Final = (
    "ID",
    "ApplicationOrderID",
    "TransactionDateTime",
    "LastUpdated",
    "CollectionDateTime",
    "CompletionDateTime",
    "Patient.Identifiers[].ID",
    "Patient.Identifiers[].IDType",
)
_DM_RESULT: Final = (
    "Code",
    "Codeset",
    "Description",
    "Value",
    "ValueType",
    "Units",
    "AbnormalFlag",
    "Status",
    "CompletionDateTime",
    *_DM_RANGE,
)
_DM_CTX: Final = (*_under("Patient", _DM_PATIENT), *_under("Header.Patient", _DM_PATIENT), *_DM_META)

# (surface, entity) -> the source paths its normalizer maps (each covers the paths under it).
# Observation value[x], dataAbsentReason, interpretation and reference range, as
# transforms/observations.py reads them (for the Observation itself and for each component[]).
_FHIR_VALUES: Final = (
    "valueQuantity.value",
    "valueQuantity.comparator",
    "valueQuantity.unit",
    "valueQuantity.system",
    "valueQuantity.code",
    *_under("valueCodeableConcept", _CODEABLE),
    "valueString",
    "valueBoolean",
    "valueInteger",
    *(f"valueRange.{end}.{f}" for end in ("low", "high") for f in ("value", "unit", "code")),
    *(
        f"valueRatio.{part}.{f}"
        for part in ("numerator", "denominator")
        for f in ("value", "comparator", "unit", "system", "code")
    ),
    "valueSampledData.origin.value",
    "valueSampledData.origin.unit",
    "valueSampledData.origin.code",
    "valueSampledData.data",
    "valueTime",
    "valueDateTime",
    "valuePeriod.start",
    "valuePeriod.end",
    *_under("dataAbsentReason", _CODEABLE),
    *_under("interpretation[]", _CODEABLE),
    "referenceRange[].low.value",
    "referenceRange[].high.value",
    "referenceRange[].text",
)

MAPPED: Final[dict[tuple[str, str], tuple[str, ...]]] = {
    ("fhir", "patients"): (
        *_FHIR_BASE,
        "identifier[].system",
        "identifier[].value",
        "name[].use",
        "name[].family",
        "name[].given[]",
        "gender",
        "birthDate",
        "address[].use",
        "address[].line[]",
        "address[].city",
        "address[].state",
        "address[].postalCode",
        "telecom[].system",
        "telecom[].value",
        "telecom[].use",
    ),
    ("fhir", "encounters"): (
        *_FHIR_BASE,
        "status",
        "class.system",
        "class.code",
        "class.display",
        *_under("type[]", _CODEABLE),
        *_under("subject", _REFERENCE),
        *_under("participant[].type[]", _CODEABLE),
        *_under("participant[].individual", _REFERENCE),
        "period.start",
        "period.end",
        *_under("reasonCode[]", _CODEABLE),
        *_under("location[].location", _REFERENCE),
    ),
    ("fhir", "results"): (
        *_FHIR_BASE,
        "status",
        *_under("basedOn[]", _REFERENCE),
        *_under("code", _CODEABLE),
        *_under("subject", _REFERENCE),
        "effectiveDateTime",
        "effectivePeriod.start",
        "effectiveInstant",
        *_FHIR_VALUES,
        *_under("component[]", (*_under("code", _CODEABLE), *_FHIR_VALUES)),
        "hasMember[].reference",
    ),
    ("fhir", "appointments"): (
        *_FHIR_BASE,
        "status",
        *_under("appointmentType", _CODEABLE),
        *_under("serviceType[]", _CODEABLE),
        *_under("reasonCode[]", _CODEABLE),
        "description",
        "start",
        "end",
        "minutesDuration",
        *_under("participant[].type[]", _CODEABLE),
        *_under("participant[].actor", _REFERENCE),
    ),
    ("datamodel", "patients"): (
        *_DM_CTX,
        *_under("PotentialMatches[]", _DM_PATIENT),
        *_under("Patients[]", _DM_PATIENT),
        *_under("Visits[].Patient", _DM_PATIENT),
        *_under("Orders[].Patient", _DM_PATIENT),
    ),
    ("datamodel", "encounters"): (
        *_DM_CTX,
        *_under("Patients[]", _DM_PATIENT),
        *_under("Patients[].Visits[]", _DM_VISIT),
        *_under("Visit", _DM_VISIT),
        "Encounters[].Identifiers[].ID",
        "Encounters[].Identifiers[].IDType",
        "Encounters[].Type.Code",
        "Encounters[].Type.CodeSystem",
        "Encounters[].Type.CodeSystemName",
        "Encounters[].Type.Name",
        "Encounters[].DateTime",
        "Encounters[].EndDateTime",
        *_under("Encounters[].Providers[]", _DM_PROVIDER),
        "Encounters[].Locations[].Name",
        "Encounters[].ReasonForVisit[].Code",
        "Encounters[].ReasonForVisit[].Name",
    ),
    ("datamodel", "results"): (
        *_DM_CTX,
        *_under("Orders[]", _DM_ORDER),
        *_under("Orders[].Results[]", _DM_RESULT),
        "Results[].Code",
        "Results[].CodeSystem",
        "Results[].Name",
        *_under(
            "Results[].Observations[]",
            (
                "Code",
                "CodeSystem",
                "Name",
                "Status",
                "Interpretation",
                "DateTime",
                "Value",
                "ValueType",
                "Units",
                *_DM_RANGE,
            ),
        ),
    ),
    ("datamodel", "appointments"): (
        *_DM_CTX,
        *_under("Visits[]", _DM_VISIT),
        *_under("Visits[].Patient", _DM_PATIENT),
        *_under("Visit", _DM_VISIT),
    ),
}

FIELD_COVERAGE_SCHEMA: Final = pl.Schema(
    {
        "surface": pl.String(),
        "entity": pl.String(),
        "path": pl.String(),
        "records": pl.Int64(),
        "mapped": pl.Boolean(),
    }
)

_FHIR_TYPES: Final = {
    "patients": "Patient",
    "encounters": "Encounter",
    "results": "Observation",
    "appointments": "Appointment",
}


def leaf_paths(value: Any, prefix: str = "") -> set[str]:
    """The paths of ``value``'s non-null leaves (empty strings, lists and objects carry no value)."""
    out: set[str] = set()
    stack: list[tuple[str, Any]] = [(prefix, value)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{path}.{k}" if path else k, v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((f"{path}[]", v) for v in node)
        elif node is not None and node != "":
            out.add(path)
    return out


def is_mapped(path: str, mapped: Iterable[str]) -> bool:
    """Whether a registered path covers ``path`` (itself or an ancestor of it)."""
    return any(path == m or path.startswith(m + ".") or path.startswith(m + "[]") for m in mapped)


def _records(body: str | None, surface: str, entity: str) -> Iterable[Any]:
    try:
        page = json.loads(body) if body else None
    except json.JSONDecodeError:
        return []
    if surface == "datamodel":
        return [page] if isinstance(page, dict) else []
    entries = page.get("entry") if isinstance(page, dict) else None
    kind = _FHIR_TYPES[entity]
    return [
        e["resource"]
        for e in entries or []
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and e["resource"].get("resourceType") == kind
    ]


def count_paths(bodies: Iterable[str | None], surface: str, entity: str) -> Counter[str]:
    """How many records of the pages carry a value at each path."""
    counts: Counter[str] = Counter()
    for body in bodies:
        for record in _records(body, surface, entity):
            counts.update(leaf_paths(record))
    return counts


def _has_value(expr: pl.Expr, dtype: DType, path: str) -> Iterator[tuple[str, pl.Expr]]:
    """``(path, does this record carry a value there)`` for every leaf under ``expr`` of ``dtype``."""
    if isinstance(dtype, pl.Struct):
        for field in dtype.fields:
            yield from _has_value(
                expr.struct.field(field.name), field.dtype, f"{path}.{field.name}" if path else field.name
            )
    elif isinstance(dtype, pl.List):
        for sub, has in _has_value(pl.element(), dtype.inner, f"{path}[]"):
            yield sub, expr.list.eval(has).list.any().fill_null(False)
    elif dtype == pl.String:
        yield path, (expr.is_not_null() & (expr != "")).fill_null(False)
    elif dtype != pl.Null:
        yield path, expr.is_not_null()


def _counts_vectorized(bodies: pl.Series, surface: str, entity: str) -> Counter[str]:
    """Decode with an inferred dtype (every key of every page) and count per leaf in polars."""
    decoded = bodies.str.json_decode(infer_schema_length=None)
    if not isinstance(decoded.dtype, pl.Struct):
        raise ValueError("pages are not JSON objects")
    frame = decoded.to_frame("r")
    if surface == "fhir":
        if "entry" not in {f.name for f in decoded.dtype.fields}:
            return Counter()
        frame = (
            frame.select(pl.col("r").struct.field("entry").alias("e"))
            .explode("e")
            .select(pl.col("e").struct.field("resource").alias("r"))
        )
        kinds = frame.schema["r"]
        if not isinstance(kinds, pl.Struct) or "resourceType" not in {f.name for f in kinds.fields}:
            return Counter()
        frame = frame.filter(pl.col("r").struct.field("resourceType") == _FHIR_TYPES[entity])
    else:
        frame = frame.filter(pl.col("r").is_not_null())
    pairs = list(_has_value(pl.col("r"), frame.schema["r"], ""))
    if not pairs or frame.height == 0:
        return Counter()
    sums = frame.select(has.sum().alias(str(i)) for i, (_, has) in enumerate(pairs)).row(0)
    counts: Counter[str] = Counter()
    for (path, _), n in zip(pairs, sums, strict=True):
        if n:
            counts[path] += int(n)
    return counts


def field_coverage(pages: pl.LazyFrame, surface: str, entity: str) -> pl.LazyFrame:
    """Pages ``(raw_ref, body)`` -> ``FIELD_COVERAGE_SCHEMA`` rows for one stream, one per path seen."""
    mapped = MAPPED[(surface, entity)]

    def rows(bodies: pl.Series) -> pl.DataFrame:
        try:
            counts = _counts_vectorized(bodies, surface, entity)
        except (pl.exceptions.PolarsError, ValueError):
            # Pages polars cannot decode with one inferred dtype (a field that is text in one page and
            # an object in another, invalid JSON): the Python walk, about four times slower.
            counts = count_paths(bodies.to_list(), surface, entity)
        return pl.DataFrame(
            {
                "surface": [surface] * len(counts),
                "entity": [entity] * len(counts),
                "path": list(counts),
                "records": list(counts.values()),
                "mapped": [is_mapped(p, mapped) for p in counts],
            },
            schema=FIELD_COVERAGE_SCHEMA,
        )

    # Counting needs the union of every page's keys, so the pages are collected here at once.
    return pages.select("body").collect().pipe(lambda f: rows(f.get_column("body"))).lazy()


def merge_counts(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """Sum several coverage frames (same stream, other pages) into one row per (surface, entity, path)."""
    frames = [f for f in frames if f.height]
    if not frames:
        return pl.DataFrame(schema=FIELD_COVERAGE_SCHEMA)
    return (
        pl.concat(frames)
        .group_by("surface", "entity", "path", maintain_order=True)
        .agg(pl.col("records").sum(), pl.col("mapped").first())
        .select(list(FIELD_COVERAGE_SCHEMA))
    )


def top_unmapped(coverage: pl.DataFrame, n: int = 10) -> list[str]:
    """The ``n`` unmapped paths most records carried, as ``path (records)``: safe for metadata."""
    top = coverage.filter(~pl.col("mapped")).sort(["records", "path"], descending=[True, False]).head(n)
    return [f"{r['path']} ({r['records']})" for r in top.iter_rows(named=True)]
