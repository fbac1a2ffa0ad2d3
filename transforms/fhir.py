"""FHIR R4 searchset Bundle pages -> the unified tables (patients, encounters, results, appointments).

Input: a LazyFrame of pages ``(raw_ref: String, body: String)``, one row per response body exactly
as served. Output: the normalized frame of ``transforms.common`` (table columns, then
``quarantine_reason``, ``raw_ref``, ``raw``, ``duplicates``); ``common.split`` separates it.

Invariants kept:

- one output row per entry whose resource is of the entity's type, per malformed entry, and per
  unreadable page, before dedupe; entries of other resource types (OperationOutcome search
  warnings, _include'd resources) are skipped and counted by ``count_entries`` as ``skipped``. So
  ``count_entries(pages).records == good + sum(duplicates) + quarantined`` for every batch;
- the fast path decodes pages a few megabytes at a time with one dtype that covers only the fields
  used (Arrow's JSON reader, or polars' ``json_decode`` where Arrow refuses, with the same result);
  Python touches only pages that fail both (see ``common.robust_decode``);
- no PHI in reasons: they name FHIR element paths.

Over 600 lines because the four resources share one decode path (dtypes, repair, explode, count)
that must stay beside the mappings it feeds; split per resource, each part would reach into the others.
"""

from typing import Any, Final

import polars as pl

import schema
from transforms import codesystems, common, fhir_refs, observations, valuesets

SURFACE: Final = "fhir"
SSN_SYSTEM: Final = "http://hl7.org/fhir/sid/us-ssn"
NPI_SYSTEM: Final = "http://hl7.org/fhir/sid/us-npi"

# The FHIR resource type each entity is read from, stated once, beside the dtypes that decode it;
# the stream registry (transforms/streams.py) and through it the extract and changes read it here.
RESOURCE_TYPES: Final[dict[str, str]] = {
    "patients": "Patient",
    "encounters": "Encounter",
    "results": "Observation",
    "appointments": "Appointment",
}

S = pl.String()
F = pl.Float64()
CODING: Final = pl.Struct({"system": S, "code": S, "display": S})
CODEABLE: Final = pl.Struct({"coding": pl.List(CODING), "text": S})
# Logical references (identifier, no literal reference) are how the sandbox and many EHRs name
# practitioners, so both forms are read.
REFERENCE: Final = pl.Struct(
    {"reference": S, "display": S, "identifier": pl.Struct({"system": S, "value": S})}
)
PERIOD: Final = pl.Struct({"start": S, "end": S})
_BASE: Final = {"resourceType": S, "id": S, "meta": pl.Struct({"lastUpdated": S})}

RESOURCE_DTYPES: Final[dict[str, pl.Struct]] = {
    "patients": pl.Struct(
        {
            **_BASE,
            "identifier": pl.List(pl.Struct({"system": S, "value": S})),
            "name": pl.List(pl.Struct({"use": S, "family": S, "given": pl.List(S)})),
            "gender": S,
            "birthDate": S,
            "address": pl.List(
                pl.Struct({"use": S, "line": pl.List(S), "city": S, "state": S, "postalCode": S})
            ),
            "telecom": pl.List(pl.Struct({"system": S, "value": S, "use": S})),
        }
    ),
    "encounters": pl.Struct(
        {
            **_BASE,
            "status": S,
            "class": CODING,
            "type": pl.List(CODEABLE),
            "subject": REFERENCE,
            "participant": pl.List(pl.Struct({"type": pl.List(CODEABLE), "individual": REFERENCE})),
            "period": PERIOD,
            "reasonCode": pl.List(CODEABLE),
            "location": pl.List(pl.Struct({"location": REFERENCE})),
        }
    ),
    "results": pl.Struct(
        {
            **_BASE,
            "status": S,
            "basedOn": pl.List(REFERENCE),
            "code": CODEABLE,
            "subject": REFERENCE,
            "effectiveDateTime": S,
            "effectivePeriod": PERIOD,
            "effectiveInstant": S,
            **observations.VALUE_FIELDS,
            "component": pl.List(observations.COMPONENT),
            "hasMember": pl.List(REFERENCE),
        }
    ),
    "appointments": pl.Struct(
        {
            **_BASE,
            "status": S,
            "appointmentType": CODEABLE,
            "serviceType": pl.List(CODEABLE),
            "reasonCode": pl.List(CODEABLE),
            "description": S,
            "start": S,
            "end": S,
            "minutesDuration": F,
            "participant": pl.List(pl.Struct({"type": pl.List(CODEABLE), "actor": REFERENCE})),
        }
    ),
}


def _entry_dtype(entity: str) -> pl.Struct:
    return pl.Struct({"resource": RESOURCE_DTYPES[entity], common.RECORD_ERROR: S, common.RECORD_RAW: S})


def _page_dtype(entity: str) -> pl.Struct:
    return pl.Struct({"resourceType": S, "entry": pl.List(_entry_dtype(entity)), common.PAGE_ERROR: S})


# --- the Python path for pages the vectorized decode rejects -------------------------------------


def page_problem(page: Any) -> str | None:
    if not isinstance(page, dict):
        return "page: not a JSON object"
    if page.get("resourceType") != "Bundle":
        if page.get("resourceType") == "OperationOutcome":
            return "page: OperationOutcome instead of a Bundle"
        return "page: not a FHIR Bundle"
    if page.get("entry") is not None and not isinstance(page["entry"], list):
        return "page: Bundle.entry is not a list"
    return None


def _classify(entry: Any, resource_type: str) -> tuple[str, str | None]:
    """('record' | 'other' | 'malformed', reason). Mirrors the vectorized rules in ``_explode``."""
    if not isinstance(entry, dict):
        return "malformed", "entry: not an object"
    resource = entry.get("resource")
    if resource is None:
        return "malformed", "resource: missing"
    if not isinstance(resource, dict):
        return "malformed", common.wrong_type_reason("resource")
    kind = resource.get("resourceType")
    if kind is None:
        return "malformed", "resourceType: missing"
    if isinstance(kind, (dict, list)):
        return "malformed", common.wrong_type_reason("resourceType")
    if (kind if isinstance(kind, str) else common.dumps(kind)) != resource_type:
        return "other", None
    return "record", None


def _marker(entry: Any, reason: str) -> dict[str, Any]:
    """A broken entry as the vectorized path sees it: reason, raw text, and the id when usable."""
    resource = entry.get("resource") if isinstance(entry, dict) else None
    raw = resource if isinstance(resource, dict) else entry
    marker: dict[str, Any] = {common.RECORD_ERROR: reason, common.RECORD_RAW: common.dumps(raw)}
    if isinstance(resource, dict) and isinstance(resource.get("id"), str):
        marker["resource"] = {"id": resource["id"]}
    return marker


def _is_bundle(decoded: pl.Series) -> pl.Series:
    return (decoded.struct.field("resourceType") == "Bundle").fill_null(False)


def _repairer(entity: str) -> common.Repair:
    resource_type = RESOURCE_TYPES[entity]
    entry_dtype = _entry_dtype(entity)

    def repair(body: str | None, generic: bool) -> str:
        page, problem = common.load_json(body)
        problem = problem or page_problem(page)
        if problem:
            # One null entry: the page becomes exactly one (quarantined) row when exploded.
            return common.dumps({common.PAGE_ERROR: problem, "entry": [None]})
        # References into the page (fullUrl, contained, conditional Patient) are read resolved;
        # the rows' raw JSON is cut from the original body, so it stays as sent.
        page = fhir_refs.resolve(page)
        out: list[dict[str, Any]] = []
        for entry in page.get("entry") or []:
            kind, reason = _classify(entry, resource_type)
            if kind == "other":
                out.append({"resource": {"resourceType": "(other)"}})
                continue
            if kind == "record":
                path = "(record)" if generic else common.type_mismatch(entry, entry_dtype, strict=True)
                if path is None:
                    out.append(entry)
                    continue
                reason = common.wrong_type_reason(path.removeprefix("resource."))
            out.append(_marker(entry, reason or "entry: malformed"))
        return common.dumps({"resourceType": "Bundle", "entry": out})

    return repair


# --- counting ------------------------------------------------------------------------------------

_COUNT_DTYPE: Final = pl.Struct(
    {"resourceType": S, "entry": pl.List(pl.Struct({"resource": pl.Struct({"resourceType": S})}))}
)


def count_entries(pages: pl.LazyFrame, entity: str) -> pl.LazyFrame:
    """One row: ``records`` (what the normalizer must account for), ``skipped``, ``pages``.

    ``records`` = entries of the entity's resource type + malformed entries + unreadable pages;
    ``skipped`` = entries of another resource type (OperationOutcome warnings, _include'd
    resources). It decodes only ``resourceType`` fields, so it is an independent check on the
    normalizer rather than a re-run of it.
    """
    resource_type = RESOURCE_TYPES[entity]

    def stand_in(body: str | None, generic: bool) -> str:
        # A page polars cannot decode, rewritten to the same counts: malformed entries count as
        # records (they become quarantine rows), other resource types as skipped.
        page, problem = common.load_json(body)
        if problem or page_problem(page):
            return "{}"
        kinds = []
        for entry in page.get("entry") or []:
            kind = _classify(entry, resource_type)[0]
            kinds.append({"resource": {"resourceType": "(other)" if kind == "other" else resource_type}})
        return common.dumps({"resourceType": "Bundle", "entry": kinds})

    def count(bodies: pl.Series) -> pl.Series:
        decoded = common.robust_decode(bodies, _COUNT_DTYPE, stand_in, purpose="count")
        kinds = (
            pl.col("d")
            .struct.field("entry")
            .list.eval(pl.element().struct.field("resource").struct.field("resourceType"))
        )
        ok = (pl.col("d").struct.field("resourceType") == "Bundle").fill_null(False)
        other = kinds.list.eval(
            pl.element().ne_missing(resource_type) & pl.element().is_not_null()
        ).list.sum()
        n = kinds.list.len().fill_null(0)
        return (
            pl.DataFrame({"d": decoded})
            .select(
                pl.when(ok).then(n - other).otherwise(1).cast(pl.Int64).alias("records"),
                pl.when(ok).then(other).otherwise(0).fill_null(0).cast(pl.Int64).alias("skipped"),
            )
            .to_struct("counts")
        )

    counts = pl.Struct({"records": pl.Int64(), "skipped": pl.Int64()})
    return (
        pages.select(pl.col("body").map_batches(count, return_dtype=counts, is_elementwise=True).alias("c"))
        .unnest("c")
        .select(
            pl.col("records").sum().cast(pl.Int64),
            pl.col("skipped").sum().cast(pl.Int64),
            pl.len().cast(pl.Int64).alias("pages"),
        )
    )


# --- shared extraction ---------------------------------------------------------------------------


def _explode(pages: pl.LazyFrame, entity: str) -> pl.LazyFrame:
    """Pages -> one row per entry of the entity's type (or per malformed entry / unreadable page).

    Columns: raw_ref, body, _idx (entry position, null for page rows), _seq, r (the resource
    struct), _reason (page or entry level problem), _raw (marker raw text).
    """
    resource_type = RESOURCE_TYPES[entity]
    page_dtype = _page_dtype(entity)
    b = pl.col("_b")
    decoded = (
        pages.select(
            pl.col("raw_ref"),
            common.decode_expr(
                "body",
                page_dtype,
                _repairer(entity),
                # Pages with references into the page take the repair path, which resolves them.
                suspect=f"{common.non_string_regex(common.string_keys(page_dtype))}|{fhir_refs.SUSPECT}",
                accept=_is_bundle,
            ).alias("_b"),
        )
        .with_row_index("_page")
        .with_columns(b.struct.field(common.PAGE_ERROR).alias("_page_reason"))
    )
    page_bad = pl.col("_page_reason").is_not_null()
    exploded = (
        decoded.with_columns(b.struct.field("entry").alias("_entries"))
        .with_columns(pl.int_ranges(0, pl.col("_entries").list.len(), dtype=pl.Int32).alias("_idx"))
        .drop("_b")
        .explode(["_entries", "_idx"], keep_nulls=False)
    )
    e = pl.col("_entries")
    r = e.struct.field("resource")
    kind = r.struct.field("resourceType")
    entry_reason = pl.coalesce(
        e.struct.field(common.RECORD_ERROR),
        pl.when(e.is_null()).then(pl.lit("entry: not an object")),
        pl.when(r.is_null()).then(pl.lit("resource: missing")),
        pl.when(kind.is_null()).then(pl.lit("resourceType: missing")),
    )
    return (
        exploded.with_columns(
            pl.coalesce(pl.col("_page_reason"), entry_reason).alias("_reason"),
            e.struct.field(common.RECORD_RAW).alias(common.RECORD_RAW),
            r.alias("r"),
        )
        .filter(pl.col("_reason").is_not_null() | (kind == resource_type))
        .with_columns(pl.when(~page_bad).then(pl.col("_idx")).alias("_idx"))
        .drop("_entries", "_page_reason")
        .with_row_index("_seq")
    )


def _field(*path: str) -> pl.Expr:
    expr = pl.col("r")
    for name in path:
        expr = expr.struct.field(name)
    return expr


def _first(list_expr: pl.Expr) -> pl.Expr:
    return list_expr.list.first()


def ref_id(reference: pl.Expr, resource_type: str) -> pl.Expr:
    """The id in 'Type/id', 'https://host/fhir/Type/id' or 'Type/id/_history/n'; else null."""
    return reference.str.extract(rf"(?:^|/){resource_type}/([^/]+)(?:/_history/[^/]+)?$", 1)


# Participant types in the order that picks "the" provider of an encounter or appointment: the
# attender, then the primary and secondary performers, consultant, admitter, discharger, referrer,
# any participant; a practitioner reference with none of these types comes after them all.
# (v3 ParticipationType; documented in docs/data-dictionary.md, "encounters".)
PARTICIPANT_RANK: Final[dict[str, int]] = {
    code: rank for rank, code in enumerate(["ATND", "PPRF", "SPRF", "CON", "ADM", "DIS", "REF", "PART"])
}
_UNTYPED: Final = len(PARTICIPANT_RANK)
_NOT_A_PROVIDER: Final = 1_000


def conditional_identifier(reference: pl.Expr, resource_type: str) -> pl.Expr:
    """The identifier value of a conditional reference 'Type?identifier=[system|]value', else null."""
    return reference.str.extract(rf"^{resource_type}\?identifier=(?:[^|&]*(?:\||%7[Cc]))?([^&]+)$", 1)


def _is_practitioner(ref: pl.Expr) -> pl.Expr:
    """A reference to a practitioner in any standard form: literal or absolute ('Practitioner/1',
    'https://host/Practitioner/1'), conditional ('Practitioner?identifier=...'), or logical (an NPI)."""
    reference = ref.struct.field("reference")
    by_reference = reference.str.contains(r"(?:^|/)Practitioner(?:Role)?[/?]").fill_null(False)
    by_npi = (ref.struct.field("identifier").struct.field("system") == NPI_SYSTEM).fill_null(False)
    return by_reference | by_npi


def _practitioner_id(ref: pl.Expr) -> pl.Expr:
    """The Practitioner id of a literal reference, the identifier of a conditional one, else the
    logical reference's identifier value; display-only references have none."""
    reference = ref.struct.field("reference")
    return pl.coalesce(
        ref_id(reference, "Practitioner"),
        conditional_identifier(reference, "Practitioner"),
        ref.struct.field("identifier").struct.field("value"),
    )


def _provider(participants: pl.Expr, actor: str) -> pl.Expr:
    """The participant's reference (``actor``: 'individual' or 'actor') ranked first by
    ``PARTICIPANT_RANK``; ties go to the earlier participant. A display-only reference counts when
    its participant type is a provider type (that is how many EHRs send a name without an id)."""
    element = pl.element()
    ref = element.struct.field(actor)
    codes = element.struct.field("type").list.eval(
        pl.element()
        .struct.field("coding")
        .list.eval(pl.element().struct.field("code"))
        .list.explode(keep_nulls=False, empty_as_null=False)
    )
    type_rank = (
        codes.list.eval(
            pl.element().replace_strict(PARTICIPANT_RANK, default=_UNTYPED, return_dtype=pl.Int32)
        )
        .list.min()
        .fill_null(_UNTYPED)
    )
    display_only = (
        ref.struct.field("reference").is_null()
        & ref.struct.field("identifier").is_null()
        & ref.struct.field("display").is_not_null()
    )
    rank = (
        pl.when(_is_practitioner(ref) | (display_only & (type_rank < _UNTYPED)))
        .then(type_rank)
        .otherwise(_NOT_A_PROVIDER)
    )
    ranks = participants.list.eval(rank)
    chosen = participants.list.get(ranks.list.arg_min(), null_on_oob=True)
    return pl.when(ranks.list.min() < _NOT_A_PROVIDER).then(chosen.struct.field(actor))


def _common_columns() -> list[pl.Expr]:
    return [
        pl.lit(SURFACE).alias("source_surface"),
        _field("id").alias("source_id"),
    ]


def _timestamps(frame: pl.LazyFrame, **columns: pl.Expr) -> pl.LazyFrame:
    return common.with_utc(frame, {"source_updated_at": _field("meta", "lastUpdated"), **columns})


def _base_checks(clinical: bool, patient_refs: pl.Expr | None = None) -> list[tuple[pl.Expr, str]]:
    """``patient_refs``: the references that could name the record's patient (a list), so that one
    left unresolved (``fhir_refs``) is told apart from none at all."""
    checks = [
        (~common.present(_field("id")), "id: missing"),
        (
            common.unparseable(_field("meta", "lastUpdated"), pl.col("source_updated_at")),
            "meta.lastUpdated: unparseable datetime",
        ),
    ]
    if clinical:
        assert patient_refs is not None
        unresolved = patient_refs.list.eval(pl.element().str.contains(fhir_refs.UNRESOLVED)).list.any()
        missing = pl.col("patient_source_id").is_null()
        checks.append((missing & unresolved.fill_null(False), "subject: Patient reference not resolved"))
        checks.append((missing & ~unresolved.fill_null(False), "subject: missing Patient reference"))
    return checks


def _subject_refs() -> pl.Expr:
    return pl.concat_list(_field("subject", "reference"))


def _finish(
    frame: pl.LazyFrame, pages: pl.LazyFrame, table: str, checks: list[tuple[pl.Expr, str]]
) -> pl.LazyFrame:
    located = frame.with_columns(
        # A page or entry level problem makes every field check noise, so it stands alone.
        pl.coalesce(pl.col("_reason"), common.reasons(*checks)).alias("quarantine_reason")
    )
    # Dedupe needs every row at once: hand it the output columns only, not the decoded resources,
    # and not the ValueSet columns either, which are mapped from their ``_source`` columns after it.
    coded = valuesets.CODED_COLUMNS[table]
    mapped = {column for column, _ in coded}
    carried = [c for c in ("_components",) if c in located.collect_schema().names()]
    slim = common.detach(
        located,
        [
            *(c for c in schema.TABLES[table] if c not in mapped),
            *("quarantine_reason", "raw_ref", "_seq", "_page", "_idx", common.RECORD_RAW, *carried),
        ],
    )
    deduped = common.dedupe(slim)
    if carried:
        # Components of the kept version only, after dedupe: a duplicate's components are its
        # record's, counted with it, and a quarantined record keeps them in its raw JSON.
        filled = observations.with_component_rows(common.fill_raw(deduped, pages, _locate, ["_idx"]))
    else:
        filled = common.fill_raw(deduped, pages, _locate, ["_idx"])
    mapped_codes = filled.with_columns(
        valuesets.map_code(pl.col(f"{column}_source"), SURFACE, field).alias(column)
        for column, field in coded
    )
    return common.finish(mapped_codes, table)


def _ends_before_start(start: pl.Expr, end: pl.Expr) -> pl.Expr:
    # Only when both carry a time: a date-only end means "that day", which parse_utc maps to its
    # first instant, so comparing it with a start time on the same day would be a false alarm.
    timed = start.str.contains("T") & end.str.contains("T")
    return timed & (pl.col("end_at") < pl.col("start_at"))


def _locate(row: dict[str, Any]) -> list[str | int] | None:
    return None if row["_idx"] is None else ["entry", row["_idx"], "resource"]


# --- entities ------------------------------------------------------------------------------------


def patients(pages: pl.LazyFrame) -> pl.LazyFrame:
    """FHIR Patient pages -> normalized ``patients`` frame."""
    ident = pl.element().struct
    identifiers = _field("identifier")
    names = _field("name")
    # The official name when there is one, else the first that is not old or a nickname.
    name = pl.coalesce(
        _first(names.list.filter(pl.element().struct.field("use") == "official")),
        _first(
            names.list.filter(~pl.element().struct.field("use").is_in(["old", "nickname"]).fill_null(False))
        ),
        _first(names),
    )
    given = name.struct.field("given")
    addresses = _field("address")
    address = pl.coalesce(
        _first(addresses.list.filter(pl.element().struct.field("use") == "home")), _first(addresses)
    )
    telecom = _field("telecom")
    phones = telecom.list.filter(pl.element().struct.field("system") == "phone")
    phone = pl.coalesce(
        _first(phones.list.filter(pl.element().struct.field("use") == "home")),
        _first(phones.list.filter(pl.element().struct.field("use") == "mobile")),
        _first(phones),
    ).struct.field("value")
    email = _first(telecom.list.filter(pl.element().struct.field("system") == "email")).struct.field("value")
    gender = _field("gender")
    birth = _field("birthDate")
    frame = _timestamps(_explode(pages, "patients")).with_columns(
        *_common_columns(),
        identifiers.list.filter(ident.field("system").ne_missing(SSN_SYSTEM))
        .cast(pl.List(schema.IDENTIFIER))
        .alias("identifiers"),
        _first(identifiers.list.filter(ident.field("system") == SSN_SYSTEM))
        .struct.field("value")
        .alias("ssn"),
        _first(given).alias("given_name"),
        pl.when(given.list.len() > 1).then(given.list.slice(1).list.join(" ")).alias("middle_name"),
        name.struct.field("family").alias("family_name"),
        common.parse_birth_date(birth).alias("birth_date"),
        gender.alias("sex_source"),
        address.struct.field("line").list.join(", ").alias("address_line"),
        address.struct.field("city").alias("address_city"),
        address.struct.field("state").alias("address_state"),
        address.struct.field("postalCode").alias("address_postal_code"),
        phone.alias("phone"),
        email.alias("email"),
    )
    checks = [
        *_base_checks(clinical=False),
        (common.birth_date_unparseable(birth, pl.col("birth_date")), "birthDate: unparseable date"),
    ]
    return _finish(frame, pages, "patients", checks)


def encounters(pages: pl.LazyFrame) -> pl.LazyFrame:
    """FHIR Encounter pages -> normalized ``encounters`` frame."""
    attending = _provider(_field("participant"), "individual")
    type_code, type_system, type_display = observations.codeable(_first(_field("type")))
    klass = _field("class", "code")
    status = _field("status")
    start, end = _field("period", "start"), _field("period", "end")
    frame = _timestamps(_explode(pages, "encounters"), start_at=start, end_at=end).with_columns(
        *_common_columns(),
        ref_id(_field("subject", "reference"), "Patient").alias("patient_source_id"),
        klass.alias("class_source"),
        type_code.alias("type_code"),
        codesystems.canonical(type_system).alias("type_system"),
        type_system.alias("type_system_source"),
        type_display.alias("type_display"),
        status.alias("status_source"),
        _first(_field("location")).struct.field("location").struct.field("display").alias("location"),
        _practitioner_id(attending).alias("attending_provider_id"),
        attending.struct.field("display").alias("attending_provider_name"),
        observations.cc_text(_first(_field("reasonCode"))).alias("reason"),
    )
    checks = [
        *_base_checks(clinical=True, patient_refs=_subject_refs()),
        (~common.present(status), "status: missing"),
        (common.unparseable(start, pl.col("start_at")), "period.start: unparseable datetime"),
        (common.unparseable(end, pl.col("end_at")), "period.end: unparseable datetime"),
        (_ends_before_start(start, end), "period: end before start"),
    ]
    return _finish(frame, pages, "encounters", checks)


def results(pages: pl.LazyFrame) -> pl.LazyFrame:
    """FHIR Observation pages -> normalized ``results`` frame: one row per Observation, plus one per
    component (``transforms.observations``), each carrying its parent's ``source_id``."""
    r = pl.col("r")
    status = _field("status")
    effective = pl.coalesce(
        _field("effectiveDateTime"), _field("effectivePeriod", "start"), _field("effectiveInstant")
    )
    values = observations.value_columns(r)
    members = _field("hasMember").list.eval(
        pl.coalesce(
            ref_id(pl.element().struct.field("reference"), "Observation"),
            pl.element().struct.field("reference"),
        )
    )
    frame = _timestamps(_explode(pages, "results"), effective_at=effective).with_columns(
        *_common_columns(),
        ref_id(_field("subject", "reference"), "Patient").alias("patient_source_id"),
        ref_id(_first(_field("basedOn")).struct.field("reference"), "ServiceRequest").alias("order_id"),
        pl.lit(None, dtype=pl.String).alias("parent_source_id"),
        pl.when(members.list.len() > 0).then(members).alias("member_source_ids"),
        *(expr.alias(name) for name, expr in observations.coded_columns(r).items()),
        *(expr.alias(name) for name, expr in values.items()),
        status.alias("status_source"),
        observations.components(r).alias("_components"),
    )
    checks = [
        *_base_checks(clinical=True, patient_refs=_subject_refs()),
        (~common.present(status), "status: missing"),
        (common.unparseable(effective, pl.col("effective_at")), "effective[x]: unparseable datetime"),
        (~common.present(pl.col("code")), "code: missing coding"),
    ]
    return _finish(frame, pages, "results", checks)


def appointments(pages: pl.LazyFrame) -> pl.LazyFrame:
    """FHIR Appointment pages -> normalized ``appointments`` frame."""
    participants = _field("participant")
    actors = participants.list.eval(pl.element().struct.field("actor"))
    reference = pl.element().struct.field("reference")

    def actor(kind: str) -> pl.Expr:
        return _first(actors.list.filter(reference.str.contains(f"{kind}/").fill_null(False)))

    provider = _provider(participants, "actor")
    # A location named only by display (no reference, no identifier) is how the sandbox sends it.
    bare = reference.is_null() & pl.element().struct.field("identifier").is_null()
    location = pl.coalesce(
        actor("Location"),
        _first(actors.list.filter(bare & pl.element().struct.field("display").is_not_null())),
    )
    appt_type = _field("appointmentType")
    type_code, _, type_display = observations.codeable(appt_type)
    status = _field("status")
    start, end = _field("start"), _field("end")
    minutes = _field("minutesDuration")
    derived = (pl.col("end_at") - pl.col("start_at")).dt.total_minutes()
    frame = (
        _timestamps(_explode(pages, "appointments"), start_at=start, end_at=end)
        .with_columns(
            *_common_columns(),
            ref_id(actor("Patient").struct.field("reference"), "Patient").alias("patient_source_id"),
            status.alias("status_source"),
            type_code.alias("type_code"),
            type_display.alias("type_display"),
            location.struct.field("display").alias("location"),
            _practitioner_id(provider).alias("provider_id"),
            provider.struct.field("display").alias("provider_name"),
            pl.coalesce(observations.cc_text(_first(_field("reasonCode"))), _field("description")).alias(
                "reason"
            ),
        )
        .with_columns(
            pl.coalesce(minutes.cast(pl.Int32, strict=False), derived.cast(pl.Int32, strict=False)).alias(
                "duration_min"
            )
        )
    )
    checks = [
        *_base_checks(clinical=True, patient_refs=actors.list.eval(reference)),
        (~common.present(status), "status: missing"),
        (common.unparseable(start, pl.col("start_at")), "start: unparseable datetime"),
        (common.unparseable(end, pl.col("end_at")), "end: unparseable datetime"),
        (_ends_before_start(start, end), "end: before start"),
        (
            minutes.is_not_null() & ((minutes != minutes.floor()) | (minutes < 0)),
            "minutesDuration: not a non-negative integer",
        ),
    ]
    return _finish(frame, pages, "appointments", checks)
