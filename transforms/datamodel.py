"""Redox Data Model response bodies -> the unified tables (patients, encounters, results, appointments).

Input: a LazyFrame of pages ``(raw_ref: String, body: String)``, one row per Data Model response.
Output: the normalized frame of ``transforms.common``; ``common.split`` separates it.

Where records live in a response (a *chain* of containers, outermost first):

- encounters: ``Patients[].Visits[]`` (PatientAdmin VisitQueryResponse, CensusQueryResponse);
  ``Visit`` with the sibling ``Patient`` (PatientAdmin event messages); ``Encounters[]`` with
  ``Header.Patient`` (Clinical Summary);
- appointments: ``Visits[]`` each with its ``Patient`` (Scheduling BookedResponse); ``Visit`` with
  the sibling ``Patient`` (Scheduling event messages);
- results: ``Orders[].Results[]`` with ``Orders[].Patient`` or the sibling ``Patient`` (Results
  QueryResponse, New, NewUnsolicited); ``Results[].Observations[]`` with ``Header.Patient``
  (Clinical Summary);
- patients: every embedded patient: ``Patient``, ``PotentialMatches[]``, ``Patients[]``,
  ``Visits[].Patient``, ``Orders[].Patient``, ``Header.Patient``; an empty object (PatientSearch's
  "no single match") is not a patient.

Invariants kept:

- one row per located record, per record that cannot be read (quarantined), and per unreadable
  page (quarantined), before dedupe; ``count_records`` counts exactly what was located, so
  ``records == good + sum(duplicates) + quarantined`` for every batch;
- request messages (Query, VisitQuery, Booked, ...) are not data: they yield no rows;
- a response with ``Meta.Errors`` is one quarantined page row: Redox said the query failed;
- no PHI in reasons: they name Data Model field paths.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Final

import polars as pl

import schema
from transforms import common, valuesets

SURFACE: Final = "datamodel"
DEFAULT_ID_TYPES: Final = ("MR", "MRN")

# Event types that ask rather than tell: their embedded patients are search criteria.
REQUEST_EVENTS: Final = frozenset(
    {
        "Query",
        "VisitQuery",
        "CensusQuery",
        "PatientQuery",
        "DocumentQuery",
        "DocumentGet",
        "LocationQuery",
        "Booked",
        "AvailableSlots",
    }
)

S = pl.String()
MARK: Final = {common.RECORD_ERROR: S, common.RECORD_RAW: S}

IDENTIFIERS: Final = pl.List(pl.Struct({"ID": S, "IDType": S}))
PATIENT_CTX: Final = pl.Struct({"Identifiers": IDENTIFIERS})
PATIENT: Final = pl.Struct(
    {
        "Identifiers": IDENTIFIERS,
        "Demographics": pl.Struct(
            {
                "FirstName": S,
                "MiddleName": S,
                "LastName": S,
                "DOB": S,
                "SSN": S,
                "Sex": S,
                "PhoneNumber": pl.Struct({"Home": S, "Mobile": S, "Office": S}),
                "EmailAddresses": pl.List(S),
                "Address": pl.Struct({"StreetAddress": S, "City": S, "State": S, "ZIP": S}),
            }
        ),
    }
)
PROVIDER: Final = pl.Struct({"ID": S, "IDType": S, "NPI": S, "FirstName": S, "LastName": S})
VISIT: Final = pl.Struct(
    {
        "VisitNumber": S,
        "VisitDateTime": S,
        "DischargeDateTime": S,
        "Duration": S,
        "PatientClass": S,
        "Status": S,
        "Reason": S,
        "Type": S,
        "LastUpdated": S,
        "AttendingProvider": PROVIDER,
        "Location": pl.Struct({"Facility": S, "Department": S}),
        "AppointmentInfo": pl.List(pl.Struct({"Code": S, "Codeset": S, "Description": S})),
    }
)
RANGE: Final = pl.Struct({"Low": S, "High": S, "Text": S})
ORDER: Final = pl.Struct(
    {
        "ID": S,
        "ApplicationOrderID": S,
        "TransactionDateTime": S,
        "LastUpdated": S,
        "CollectionDateTime": S,
        "CompletionDateTime": S,
    }
)
RESULT: Final = pl.Struct(
    {
        "Code": S,
        "Codeset": S,
        "Description": S,
        "Value": S,
        "ValueType": S,
        "Units": S,
        "AbnormalFlag": S,
        "Status": S,
        "CompletionDateTime": S,
        "ReferenceRange": RANGE,
    }
)
CS_ENCOUNTER: Final = pl.Struct(
    {
        "Identifiers": IDENTIFIERS,
        "Type": pl.Struct({"Code": S, "CodeSystem": S, "CodeSystemName": S, "Name": S}),
        "DateTime": S,
        "EndDateTime": S,
        "Providers": pl.List(PROVIDER),
        "Locations": pl.List(pl.Struct({"Name": S})),
        "ReasonForVisit": pl.List(pl.Struct({"Code": S, "Name": S})),
    }
)
CS_RESULT: Final = pl.Struct({"Code": S, "CodeSystem": S, "Name": S})
CS_OBSERVATION: Final = pl.Struct(
    {
        "Code": S,
        "CodeSystem": S,
        "Name": S,
        "Status": S,
        "Interpretation": S,
        "DateTime": S,
        "Value": S,
        "ValueType": S,
        "Units": S,
        "ReferenceRange": RANGE,
    }
)
META: Final = pl.Struct(
    {"DataModel": S, "EventType": S, "EventDateTime": S, "Errors": pl.List(pl.Struct({"Text": S}))}
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


def _with_mark(dtype: pl.Struct, child: Level | None = None) -> pl.Struct:
    fields = {f.name: f.dtype for f in dtype.fields}
    if child is not None:
        fields[child.key] = _level_dtype(child)
    return pl.Struct({**fields, **MARK})


def _level_dtype(level: Level) -> pl.DataType:
    inner = _with_mark(level.own, level.child)
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


VISIT_WITH_PATIENT: Final = pl.Struct({**{f.name: f.dtype for f in VISIT.fields}, "Patient": PATIENT_CTX})
ORDER_WITH_PATIENT: Final = pl.Struct({**{f.name: f.dtype for f in ORDER.fields}, "Patient": PATIENT_CTX})

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


def _page_dtype(entity: str) -> pl.Struct:
    fields: dict[str, pl.DataType] = {"Meta": META}
    for chain in CHAINS[entity]:
        top = chain.levels[0]
        dtype = _level_dtype(top)
        if top.key in fields and fields[top.key] != dtype:
            raise ValueError(f"chains of {entity} disagree on {top.key}")
        fields[top.key] = dtype
        if chain.sibling:
            fields.update(_sibling_dtype(chain.sibling, fields))
    return pl.Struct({**fields, common.PAGE_ERROR: S})


def _sibling_dtype(path: tuple[str, ...], fields: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
    ctx: pl.DataType = _with_mark(PATIENT_CTX)
    for key in reversed(path[1:]):
        ctx = pl.Struct({key: ctx})
    head = path[0]
    if head in fields and fields[head] != ctx:
        # Header is both a container (patients) and a sibling path (clinical): never in one entity.
        raise ValueError(f"sibling {head} clashes with a container")
    return {head: ctx}


# --- the Python path for responses the vectorized decode rejects ---------------------------------


def _page_problem(page: Any) -> str | None:
    if not isinstance(page, dict):
        return "page: not a JSON object"
    meta = page.get("Meta")
    if not isinstance(meta, dict):
        return "page: not a Data Model response (no Meta)"
    if common.type_mismatch(meta, META):
        return "page: Meta has a field of the wrong JSON type"
    if meta.get("Errors"):
        return "page: Meta.Errors present (Redox reported a failed request)"
    return None


def _normalize_variants(patient: Any) -> None:
    """Rewrite known shape variants in place (ClinicalSummary sends EmailAddresses as objects)."""
    if not isinstance(patient, dict):
        return
    demo = patient.get("Demographics")
    if isinstance(demo, dict) and isinstance(demo.get("EmailAddresses"), list):
        demo["EmailAddresses"] = [
            e.get("Address") if isinstance(e, dict) else e for e in demo["EmailAddresses"]
        ]


def _marker(value: Any, reason: str) -> dict[str, Any]:
    return {common.RECORD_ERROR: reason, common.RECORD_RAW: common.dumps(value)}


def _leaf_marker(levels: Sequence[Level], value: Any, reason: str) -> Any:
    """A broken container rewritten so that exactly one quarantined record sits at the leaf level."""
    node: Any = _marker(value, reason)
    for level in reversed(levels[1:]):
        node = {level.key: [node] if level.many else node}
    return node


def _repair_level(parent: dict[str, Any], levels: Sequence[Level], path: str, generic: bool) -> None:
    level = levels[0]
    here = f"{path}.{level.key}" if path else level.key
    value = parent.get(level.key)
    if value is None:
        return
    if level.many and not isinstance(value, list):
        parent[level.key] = [_leaf_marker(levels, value, common.wrong_type_reason(here))]
        return
    items = value if level.many else [value]
    fixed = []
    for item in items:
        item_path = f"{here}[]" if level.many else here
        if not isinstance(item, dict):
            fixed.append(_leaf_marker(levels, item, common.wrong_type_reason(item_path)))
            continue
        if level.own == PATIENT:
            _normalize_variants(item)
        bad = "(record)" if generic else common.type_mismatch(item, level.own)
        if level.child is None:
            fixed.append(_marker(item, _reason_at(item_path, bad)) if bad else item)
            continue
        if bad:
            # The context is unreadable, but its records are still counted and quarantined.
            kept = {level.child.key: item.get(level.child.key), **_marker(item, _reason_at(item_path, bad))}
            item = kept
        _repair_level(item, levels[1:], item_path, generic)
        fixed.append(item)
    parent[level.key] = fixed if level.many else fixed[0]


def _reason_at(path: str, bad: str) -> str:
    return common.wrong_type_reason(bad if bad == "(record)" else f"{path}.{bad}")


def _repair_sibling(page: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = page
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return
    ctx = node.get(path[-1])
    if ctx is None:
        return
    where = ".".join(path)
    if not isinstance(ctx, dict):
        node[path[-1]] = _marker(ctx, common.wrong_type_reason(where))
        return
    bad = common.type_mismatch(ctx, PATIENT_CTX)
    if bad:
        node[path[-1]] = _marker(ctx, common.wrong_type_reason(f"{where}.{bad}"))


def _repairer(entity: str) -> common.Repair:
    chains = CHAINS[entity]

    def repair(body: str | None, generic: bool) -> str:
        page, problem = common.load_json(body)
        problem = problem or _page_problem(page)
        if problem:
            return common.dumps({common.PAGE_ERROR: problem})
        out: dict[str, Any] = {"Meta": page["Meta"]}
        for chain in chains:
            top = chain.levels[0].key
            if top in page and top not in out:
                out[top] = page[top]
            if chain.sibling and chain.sibling[0] in page and chain.sibling[0] not in out:
                out[chain.sibling[0]] = page[chain.sibling[0]]
        for chain in chains:
            if chain.sibling:
                _repair_sibling(out, chain.sibling)
        for chain in chains:
            if (
                isinstance(out.get(chain.levels[0].key), (dict, list))
                or out.get(chain.levels[0].key) is not None
            ):
                _repair_level(out, chain.levels, "", generic)
        return common.dumps(out)

    return repair


# --- locating records ----------------------------------------------------------------------------


def _decoded(pages: pl.LazyFrame, entity: str) -> pl.LazyFrame:
    b = pl.col("_b")
    meta = b.struct.field("Meta")
    return (
        pages.select(
            pl.col("raw_ref"),
            common.decode_expr("body", _page_dtype(entity), _repairer(entity)).alias("_b"),
        )
        .with_row_index("_page")
        .with_columns(
            pl.coalesce(
                b.struct.field(common.PAGE_ERROR),
                pl.when(b.is_null()).then(pl.lit("page: not a JSON object")),
                pl.when(meta.is_null()).then(pl.lit("page: not a Data Model response (no Meta)")),
                pl.when(meta.struct.field("Errors").list.len() > 0).then(
                    pl.lit("page: Meta.Errors present (Redox reported a failed request)")
                ),
            ).alias("_page_reason"),
            meta.struct.field("DataModel").alias("_data_model"),
            meta.struct.field("EventType").alias("_event"),
            meta.struct.field("EventDateTime").alias("_event_at"),
        )
        # Every chain and the page-error rows read this frame; without the cache the pages would be
        # decoded once per reader.
        .cache()
    )


def _chain_rows(decoded: pl.LazyFrame, chain: Chain) -> pl.LazyFrame:
    """One row per record of ``chain``: columns ``rec`` (the leaf struct), ``ctx`` (the innermost
    context struct or the sibling patient), ``outer`` (the first level's item when there are two
    levels), ``_path`` and the page columns."""
    frame = decoded.filter(
        pl.col("_page_reason").is_null() & ~pl.col("_event").is_in(list(REQUEST_EVENTS)).fill_null(False)
    )
    if chain.data_model is not None:
        frame = frame.filter(pl.col("_data_model") == chain.data_model)
    sibling: pl.Expr = pl.lit(None, dtype=_with_mark(PATIENT_CTX))
    if chain.sibling:
        sibling = pl.col("_b")
        for key in chain.sibling:
            sibling = sibling.struct.field(key)
    frame = frame.with_columns(sibling.alias("ctx"), pl.lit(None, dtype=pl.Struct(MARK)).alias("outer"))
    current = pl.col("_b").struct.field(chain.levels[0].key)
    path_parts: list[pl.Expr] = []
    for depth, level in enumerate(chain.levels):
        col = f"_l{depth}"
        frame = frame.with_columns(current.alias(col))
        if level.many:
            idx = f"_i{depth}"
            frame = frame.with_columns(
                pl.int_ranges(0, pl.col(col).list.len(), dtype=pl.Int32).alias(idx)
            ).explode([col, idx], keep_nulls=False)
            path_parts += [pl.lit(level.key), pl.col(idx).cast(pl.String)]
        else:
            frame = frame.filter(pl.col(col).is_not_null())
            path_parts.append(pl.lit(level.key))
        if level.child is not None:
            frame = frame.with_columns(pl.col(col).alias("outer"))
            current = pl.col(col).struct.field(level.child.key)
    leaf = f"_l{len(chain.levels) - 1}"
    return frame.with_columns(
        pl.col(leaf).alias("rec"),
        pl.concat_str(path_parts, separator="/").alias("_path"),
        pl.lit(chain.name).alias("_chain"),
    )


def _page_rows(decoded: pl.LazyFrame) -> pl.LazyFrame:
    return decoded.filter(pl.col("_page_reason").is_not_null())


def _records(decoded: pl.LazyFrame, chain: Chain, entity: str) -> pl.LazyFrame:
    rows = _chain_rows(decoded, chain)
    if entity == "patients":
        rec = pl.col("rec")
        # PatientSearch answers "no single match" with Patient: {} (and the matches beside it).
        empty = (
            (_f(rec, "Identifiers").list.len().fill_null(0) == 0)
            & _f(rec, "Demographics").is_null()
            & _f(rec, common.RECORD_ERROR).is_null()
        )
        rows = rows.filter(~empty)
    return rows


def count_records(pages: pl.LazyFrame, entity: str) -> pl.LazyFrame:
    """One row: ``records`` located in the pages (the normalizer's rows before dedupe), ``pages``.

    Shares the decoding and locating step with the normalizer (Data Model records are nested in
    several response shapes, and a second locator would be a second thing to get wrong); what it
    checks is that no later step (field mapping, dedupe, split) loses a record.
    """
    decoded = _decoded(pages, entity)
    parts = [_records(decoded, chain, entity).select(pl.len()) for chain in CHAINS[entity]]
    parts.append(_page_rows(decoded).select(pl.len()))
    total = pl.concat(parts).select(pl.col("len").sum().cast(pl.Int64).alias("records"))
    return total.join(pages.select(pl.len().cast(pl.Int64).alias("pages")), how="cross")


# --- field helpers -------------------------------------------------------------------------------


def _f(expr: pl.Expr, *path: str) -> pl.Expr:
    for name in path:
        expr = expr.struct.field(name)
    return expr


def _blank_to_null(expr: pl.Expr) -> pl.Expr:
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


def _provider_name(provider: pl.Expr) -> pl.Expr:
    return _blank_to_null(
        pl.concat_str([_f(provider, "FirstName"), _f(provider, "LastName")], separator=" ", ignore_nulls=True)
    )


def _ts(text: pl.Expr, name: str, field: str) -> tuple[pl.Expr, tuple[pl.Expr, str]]:
    parsed = common.parse_utc(text)
    return parsed.alias(name), (common.unparseable(text, parsed), f"{field}: unparseable datetime")


def _finish(
    frames: list[pl.LazyFrame], decoded: pl.LazyFrame, pages: pl.LazyFrame, table: str
) -> pl.LazyFrame:
    cols = list(schema.TABLES[table])
    page_rows = _page_rows(decoded).select(
        pl.lit(SURFACE).alias("source_surface"),
        pl.col("raw_ref"),
        pl.col("_page"),
        pl.lit(None, dtype=pl.String).alias("_path"),
        pl.lit(None, dtype=pl.String).alias(common.RECORD_RAW),
        pl.col("_page_reason").alias("quarantine_reason"),
    )
    keep = [*cols, "quarantine_reason", "raw_ref", "_page", "_path", common.RECORD_RAW, "_rank"]
    located = [f.select([c for c in keep if c in f.collect_schema().names()]) for f in frames]
    # Page order decides "last seen" among equals, so a later page's copy wins.
    merged = (
        pl.concat([*located, page_rows], how="diagonal_relaxed")
        .sort("_page", maintain_order=True)
        .with_row_index("_seq")
    )
    string_cols = [c for c, dt in schema.TABLES[table].items() if dt == pl.String and c != "source_surface"]
    merged = merged.with_columns([_blank_to_null(pl.col(c)).alias(c) for c in string_cols])
    if "_rank" not in merged.collect_schema().names():
        merged = merged.with_columns(pl.lit(0).alias("_rank"))
    deduped = common.dedupe(merged, prefer=("_rank", "source_updated_at"))
    return common.finish(common.fill_raw(deduped, pages, _locate, ["_path"]), table)


def _locate(row: dict[str, Any]) -> list[str | int] | None:
    if row["_path"] is None:
        return None
    return [int(p) if p.isdigit() else p for p in row["_path"].split("/")]


def _located(decoded: pl.LazyFrame, chain: Chain, columns: list[pl.Expr], entity: str) -> pl.LazyFrame:
    """Chain rows -> table columns + quarantine_reason from markers (field checks come after)."""
    rec, ctx, outer = pl.col("rec"), pl.col("ctx"), pl.col("outer")
    marker = pl.coalesce(
        _f(rec, common.RECORD_ERROR), _f(ctx, common.RECORD_ERROR), _f(outer, common.RECORD_ERROR)
    )
    return (
        _records(decoded, chain, entity)
        .with_columns(
            _f(rec, common.RECORD_RAW).alias(common.RECORD_RAW), pl.lit(SURFACE).alias("source_surface")
        )
        .with_columns(columns)
        .with_columns(marker.alias("quarantine_reason"))
    )


# --- entities ------------------------------------------------------------------------------------


def _clinical_patient(patient: pl.Expr, preferred: Sequence[str]) -> pl.Expr:
    return patient_source_id(_f(patient, "Identifiers"), preferred)


def encounters(pages: pl.LazyFrame, *, preferred_id_types: Sequence[str] = DEFAULT_ID_TYPES) -> pl.LazyFrame:
    """Data Model PatientAdmin / Clinical Summary responses -> normalized ``encounters`` frame."""
    decoded = _decoded(pages, "encounters")
    event_at, event_check = _ts(pl.col("_event_at"), "_event_ts", "Meta.EventDateTime")
    frames = []
    for chain in CHAINS["encounters"]:
        rec = pl.col("rec")
        patient = pl.col("outer") if chain.name == "visits" else pl.col("ctx")
        if chain.name == "cs_encounters":
            provider = _f(rec, "Providers").list.first()
            start, start_check = _ts(_f(rec, "DateTime"), "start_at", "Encounters[].DateTime")
            end, end_check = _ts(_f(rec, "EndDateTime"), "end_at", "Encounters[].EndDateTime")
            ident = (
                _f(rec, "Identifiers")
                .list.filter(common.present(pl.element().struct.field("ID")))
                .list.first()
            )
            columns = [
                _f(ident, "ID").alias("source_id"),
                _f(rec, "Type", "Code").alias("type_code"),
                pl.coalesce(_f(rec, "Type", "CodeSystem"), _f(rec, "Type", "CodeSystemName")).alias(
                    "type_system"
                ),
                _f(rec, "Type", "Name").alias("type_display"),
                _f(rec, "Locations").list.first().struct.field("Name").alias("location"),
                _f(rec, "ReasonForVisit").list.first().struct.field("Name").alias("reason"),
                pl.lit(None, dtype=pl.String).alias("class_source"),
                pl.lit(None, dtype=pl.String).alias("status_source"),
                pl.lit(None, dtype=pl.String).alias("updated_text"),
            ]
            id_field = "Encounters[].Identifiers"
        else:
            provider = _f(rec, "AttendingProvider")
            start, start_check = _ts(_f(rec, "VisitDateTime"), "start_at", "Visit.VisitDateTime")
            end, end_check = _ts(_f(rec, "DischargeDateTime"), "end_at", "Visit.DischargeDateTime")
            columns = [
                _f(rec, "VisitNumber").alias("source_id"),
                pl.coalesce(
                    _blank_to_null(_f(rec, "Location", "Department")), _f(rec, "Location", "Facility")
                ).alias("location"),
                _f(rec, "Reason").alias("reason"),
                _f(rec, "PatientClass").alias("class_source"),
                _f(rec, "Status").alias("status_source"),
                _f(rec, "LastUpdated").alias("updated_text"),
            ]
            id_field = "Visit.VisitNumber"
        updated, updated_check = _ts(
            pl.coalesce(pl.col("updated_text"), pl.col("_event_at")), "source_updated_at", "Visit.LastUpdated"
        )
        columns += [
            _clinical_patient(patient, preferred_id_types).alias("patient_source_id"),
            start,
            end,
            pl.coalesce(_f(provider, "ID"), _f(provider, "NPI")).alias("attending_provider_id"),
            _provider_name(provider).alias("attending_provider_name"),
        ]
        frame = _located(decoded, chain, columns, "encounters").with_columns(
            updated,
            event_at,
            valuesets.map_code(pl.col("class_source"), SURFACE, "encounter_class").alias("class"),
            valuesets.map_code(pl.col("status_source"), SURFACE, "encounter_status").alias("status"),
        )
        checks = [
            (~common.present(pl.col("source_id")), f"{id_field}: missing"),
            (pl.col("patient_source_id").is_null(), "Patient.Identifiers: no usable ID"),
            start_check,
            end_check,
            updated_check,
            event_check,
        ]
        frames.append(_recheck(frame, checks))
    return _finish(frames, decoded, pages, "encounters")


def _recheck(frame: pl.LazyFrame, checks: list[tuple[pl.Expr, str]]) -> pl.LazyFrame:
    """Add field-check reasons to rows that have no marker reason yet."""
    return frame.with_columns(
        pl.coalesce(pl.col("quarantine_reason"), common.reasons(*checks)).alias("quarantine_reason")
    )


def appointments(
    pages: pl.LazyFrame, *, preferred_id_types: Sequence[str] = DEFAULT_ID_TYPES
) -> pl.LazyFrame:
    """Data Model Scheduling responses -> normalized ``appointments`` frame."""
    decoded = _decoded(pages, "appointments")
    event_at, event_check = _ts(pl.col("_event_at"), "_event_ts", "Meta.EventDateTime")
    frames = []
    for chain in CHAINS["appointments"]:
        rec = pl.col("rec")
        patient = _f(rec, "Patient") if chain.name == "bookings" else pl.col("ctx")
        provider = _f(rec, "AttendingProvider")
        info = (
            _f(rec, "AppointmentInfo")
            .list.filter(
                pl.element()
                .struct.field("Codeset")
                .str.to_lowercase()
                .str.contains("appointment-type")
                .fill_null(False)
            )
            .list.first()
        )
        start, start_check = _ts(_f(rec, "VisitDateTime"), "start_at", "Visit.VisitDateTime")
        duration_text = _f(rec, "Duration")
        duration = common.parse_number(duration_text)
        # Scheduling event messages often leave Status null; the event itself says what happened.
        status_source = pl.coalesce(
            _blank_to_null(_f(rec, "Status")), pl.when(pl.lit(chain.name == "visit")).then(pl.col("_event"))
        )
        updated, updated_check = _ts(
            pl.coalesce(_f(rec, "LastUpdated"), pl.col("_event_at")), "source_updated_at", "Visit.LastUpdated"
        )
        columns = [
            _f(rec, "VisitNumber").alias("source_id"),
            _clinical_patient(patient, preferred_id_types).alias("patient_source_id"),
            status_source.alias("status_source"),
            start,
            duration.alias("_duration"),
            _f(info, "Code").alias("type_code"),
            pl.coalesce(_blank_to_null(_f(rec, "Type")), _f(info, "Description")).alias("type_display"),
            pl.coalesce(
                _blank_to_null(_f(rec, "Location", "Department")), _f(rec, "Location", "Facility")
            ).alias("location"),
            pl.coalesce(_f(provider, "ID"), _f(provider, "NPI")).alias("provider_id"),
            _provider_name(provider).alias("provider_name"),
            _f(rec, "Reason").alias("reason"),
        ]
        whole = (pl.col("_duration") == pl.col("_duration").floor()) & (pl.col("_duration") >= 0)
        frame = (
            _located(decoded, chain, columns, "appointments")
            .with_columns(
                updated,
                event_at,
                valuesets.map_code(pl.col("status_source"), SURFACE, "appointment_status").alias("status"),
                pl.when(whole).then(pl.col("_duration")).cast(pl.Int32).alias("duration_min"),
            )
            .with_columns(
                (pl.col("start_at") + pl.duration(minutes=pl.col("duration_min"))).alias("end_at"),
            )
        )
        checks = [
            (~common.present(pl.col("source_id")), "Visit.VisitNumber: missing"),
            (pl.col("patient_source_id").is_null(), "Patient.Identifiers: no usable ID"),
            start_check,
            (
                common.present(duration_text) & (pl.col("_duration").is_null() | ~whole.fill_null(False)),
                "Visit.Duration: not a whole number of minutes",
            ),
            updated_check,
            event_check,
        ]
        frames.append(_recheck(frame, checks))
    return _finish(frames, decoded, pages, "appointments")


def results(pages: pl.LazyFrame, *, preferred_id_types: Sequence[str] = DEFAULT_ID_TYPES) -> pl.LazyFrame:
    """Data Model Results / Clinical Summary responses -> normalized ``results`` frame."""
    decoded = _decoded(pages, "results")
    event_at, event_check = _ts(pl.col("_event_at"), "_event_ts", "Meta.EventDateTime")
    frames = []
    for chain in CHAINS["results"]:
        rec, order = pl.col("rec"), pl.col("outer")
        value_text = _f(rec, "Value")
        value_type = _f(rec, "ValueType").str.strip_chars().str.to_lowercase()
        numeric_type = value_type.is_in(["numeric", "nm", "physicalquantity", "pq"])
        number = common.parse_number(value_text)
        rng = _f(rec, "ReferenceRange")
        low_given, high_given = _f(rng, "Low"), _f(rng, "High")
        low_num, high_num = common.parse_number(low_given), common.parse_number(high_given)
        text_low, text_high = common.parse_range(_f(rng, "Text"))
        structured = low_num.is_not_null() | high_num.is_not_null()
        if chain.name == "orders":
            order_id = pl.coalesce(
                _blank_to_null(_f(order, "ID")), _blank_to_null(_f(order, "ApplicationOrderID"))
            )
            patient = pl.coalesce(
                _clinical_patient(_f(order, "Patient"), preferred_id_types),
                _clinical_patient(pl.col("ctx"), preferred_id_types),
            )
            times = {
                "Results[].CompletionDateTime": _f(rec, "CompletionDateTime"),
                "Order.CollectionDateTime": _f(order, "CollectionDateTime"),
                "Order.CompletionDateTime": _f(order, "CompletionDateTime"),
                "Order.TransactionDateTime": _f(order, "TransactionDateTime"),
            }
            effective_text = pl.coalesce(
                _f(rec, "CompletionDateTime"),
                _f(order, "CollectionDateTime"),
                _f(order, "CompletionDateTime"),
            )
            updated_text = pl.coalesce(
                _f(order, "TransactionDateTime"), _f(order, "LastUpdated"), pl.col("_event_at")
            )
            source_id = pl.concat_str([order_id, _f(rec, "Code")], separator="|")
            columns = [
                order_id.alias("order_id"),
                _f(rec, "Codeset").alias("code_system"),
                _f(rec, "Description").alias("display"),
                _f(rec, "Units").alias("unit"),
                _f(rec, "AbnormalFlag").alias("abnormal_flag_source"),
            ]
            id_checks = [
                (order_id.is_null(), "Order.ID: missing"),
                (~common.present(_f(rec, "Code")), "Results[].Code: missing"),
            ]
        else:
            times = {"Observations[].DateTime": _f(rec, "DateTime")}
            effective_text = _f(rec, "DateTime")
            updated_text = pl.col("_event_at")
            patient = _clinical_patient(pl.col("ctx"), preferred_id_types)
            # Clinical Summary results carry no order id: the key is panel|observation|time.
            source_id = pl.concat_str(
                [_f(order, "Code"), _f(rec, "Code"), _f(rec, "DateTime")], separator="|"
            )
            columns = [
                pl.lit(None, dtype=pl.String).alias("order_id"),
                _f(rec, "CodeSystem").alias("code_system"),
                _f(rec, "Name").alias("display"),
                _f(rec, "Units").alias("unit"),
                _f(rec, "Interpretation").alias("abnormal_flag_source"),
            ]
            id_checks = [
                (~common.present(_f(rec, "Code")), "Observations[].Code: missing"),
                (~common.present(_f(order, "Code")), "Results[].Code: missing"),
            ]
        columns += [
            source_id.alias("source_id"),
            patient.alias("patient_source_id"),
            _f(rec, "Code").alias("code"),
            pl.when(numeric_type | value_type.is_null()).then(number).alias("value_num"),
            pl.when(~(numeric_type | value_type.is_null()) | number.is_null())
            .then(value_text)
            .alias("value_text"),
            pl.coalesce(low_num, pl.when(~structured).then(text_low)).alias("reference_low"),
            pl.coalesce(high_num, pl.when(~structured).then(text_high)).alias("reference_high"),
            pl.when(structured | (text_low.is_null() & text_high.is_null()))
            .then(_f(rng, "Text"))
            .alias("reference_text"),
            _f(rec, "Status").alias("status_source"),
            common.parse_utc(effective_text).alias("effective_at"),
            common.parse_utc(updated_text).alias("source_updated_at"),
        ]
        time_checks = [
            (common.unparseable(text, common.parse_utc(text)), f"{name}: unparseable datetime")
            for name, text in times.items()
        ]
        frame = _located(decoded, chain, columns, "results").with_columns(
            event_at,
            valuesets.map_code(pl.col("abnormal_flag_source"), SURFACE, "abnormal_flag").alias(
                "abnormal_flag"
            ),
            valuesets.map_code(pl.col("status_source"), SURFACE, "result_status").alias("status"),
        )
        checks = [
            *id_checks,
            (pl.col("patient_source_id").is_null(), "Patient.Identifiers: no usable ID"),
            *time_checks,
            (
                numeric_type & common.present(value_text) & number.is_null(),
                "Value: not a number although ValueType is numeric",
            ),
            (common.present(low_given) & low_num.is_null(), "ReferenceRange.Low: not a number"),
            (common.present(high_given) & high_num.is_null(), "ReferenceRange.High: not a number"),
            (
                common.unparseable(_f(order, "LastUpdated"), common.parse_utc(_f(order, "LastUpdated")))
                if chain.name == "orders"
                else pl.lit(False),
                "Order.LastUpdated: unparseable datetime",
            ),
            event_check,
        ]
        frames.append(_recheck(frame, checks))
    return _finish(frames, decoded, pages, "results")


def patients(pages: pl.LazyFrame, *, preferred_id_types: Sequence[str] = DEFAULT_ID_TYPES) -> pl.LazyFrame:
    """Embedded patients of any Data Model response -> normalized ``patients`` frame, one row per
    distinct patient: the most complete record wins, then the newest, then the last seen."""
    decoded = _decoded(pages, "patients")
    frames = []
    rec = pl.col("rec")
    demo = _f(rec, "Demographics")
    identifiers = _f(rec, "Identifiers").list.filter(common.present(pl.element().struct.field("ID")))
    is_ssn = (pl.element().struct.field("IDType").str.to_uppercase() == "SSN").fill_null(False)
    dob = _f(demo, "DOB")
    phone = _f(demo, "PhoneNumber")
    updated, updated_check = _ts(pl.col("_event_at"), "source_updated_at", "Meta.EventDateTime")
    completeness = pl.sum_horizontal(
        [
            common.present(e).cast(pl.Int32)
            for e in (
                _f(demo, "FirstName"),
                _f(demo, "LastName"),
                dob,
                _f(demo, "Sex"),
                _f(demo, "SSN"),
                _f(demo, "Address", "StreetAddress"),
                _f(demo, "Address", "City"),
                _f(demo, "Address", "ZIP"),
                pl.coalesce(_f(phone, "Home"), _f(phone, "Mobile"), _f(phone, "Office")),
                _f(demo, "EmailAddresses").list.first(),
            )
        ]
    )
    for chain in CHAINS["patients"]:
        columns = [
            patient_source_id(_f(rec, "Identifiers"), preferred_id_types).alias("source_id"),
            identifiers.list.filter(~is_ssn)
            .list.eval(
                pl.struct(
                    identifier_system(pl.element().struct.field("IDType")).alias("system"),
                    pl.element().struct.field("ID").alias("value"),
                )
            )
            .alias("identifiers"),
            _f(demo, "FirstName").alias("given_name"),
            _f(demo, "MiddleName").alias("middle_name"),
            _f(demo, "LastName").alias("family_name"),
            common.parse_birth_date(dob).alias("birth_date"),
            _f(demo, "Sex").alias("sex_source"),
            pl.coalesce(
                _f(demo, "SSN"), identifiers.list.filter(is_ssn).list.first().struct.field("ID")
            ).alias("ssn"),
            _f(demo, "Address", "StreetAddress").alias("address_line"),
            _f(demo, "Address", "City").alias("address_city"),
            _f(demo, "Address", "State").alias("address_state"),
            _f(demo, "Address", "ZIP").alias("address_postal_code"),
            pl.coalesce(
                _blank_to_null(_f(phone, "Home")), _blank_to_null(_f(phone, "Mobile")), _f(phone, "Office")
            ).alias("phone"),
            _f(demo, "EmailAddresses").list.first().alias("email"),
            completeness.alias("_rank"),
            updated,
        ]
        checks = [
            (pl.col("source_id").is_null(), "Identifiers: no usable ID"),
            (common.birth_date_unparseable(dob, pl.col("birth_date")), "Demographics.DOB: unparseable date"),
            updated_check,
        ]
        frame = _located(decoded, chain, columns, "patients").with_columns(
            valuesets.map_code(pl.col("sex_source"), SURFACE, "sex").alias("sex")
        )
        frames.append(_recheck(frame, checks))
    return _finish(frames, decoded, pages, "patients")


def reference_only() -> pl.Expr:
    """True on a normalized patient row that names the patient by identifiers only.

    Results replies embed ``Patient.Identifiers`` and no demographics. Such a row is a pointer to a
    patient, not a version of one: it may stand in until the full record arrives, but it must never
    replace a stored record (newest-wins would blank the names).
    """
    return pl.all_horizontal(
        pl.col(c).is_null() for c in ("given_name", "family_name", "birth_date", "sex_source")
    )


# entity -> normalizer, for callers that loop over the four streams.
NORMALIZERS: Final = {
    "patients": patients,
    "encounters": encounters,
    "results": results,
    "appointments": appointments,
}
