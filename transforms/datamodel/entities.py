"""The four Data Model normalizers: pages -> normalized ``patients``, ``encounters``, ``results``
and ``appointments`` frames (the frame of ``transforms.common``; ``common.split`` separates it).

Each normalizer walks its entity's chains (``chains.CHAINS``) through ``locate``, maps fields to
the table's columns, adds field checks to the markers' reasons, and ends in ``_finish``: blanks to
null, dedupe on the natural key, raw JSON cut out for the quarantined rows.

Invariants: a row's ``quarantine_reason`` is the marker's when ``repair`` left one, else the
field checks' (never both); among copies of one record the most complete wins, then the newest,
then the one on the later page; reasons name Data Model field paths, never values (no PHI).
"""

from collections.abc import Sequence
from typing import Final

import polars as pl

import schema
from transforms import codesystems, common, valuesets
from transforms.datamodel.chains import CHAINS
from transforms.datamodel.fields import (
    DEFAULT_ID_TYPES,
    SURFACE,
    blank_to_null,
    clinical_patient,
    field,
    identifier_system,
    patient_source_id,
    provider_name,
    timestamp,
)
from transforms.datamodel.locate import decode, located, page_rows, record_path


def encounters(
    pages: pl.LazyFrame,
    *,
    preferred_id_types: Sequence[str] = DEFAULT_ID_TYPES,
    decoded: pl.LazyFrame | None = None,
) -> pl.LazyFrame:
    """Data Model PatientAdmin / Clinical Summary responses -> normalized ``encounters`` frame."""
    decoded = decode(pages, "encounters") if decoded is None else decoded
    event_at, event_check = timestamp(pl.col("_event_at"), "_event_ts", "Meta.EventDateTime")
    frames = []
    for chain in CHAINS["encounters"]:
        rec = pl.col("rec")
        patient = pl.col("outer") if chain.name == "visits" else pl.col("ctx")
        if chain.name == "cs_encounters":
            provider = field(rec, "Providers").list.first()
            start, start_check = timestamp(field(rec, "DateTime"), "start_at", "Encounters[].DateTime")
            end, end_check = timestamp(field(rec, "EndDateTime"), "end_at", "Encounters[].EndDateTime")
            type_system = pl.coalesce(field(rec, "Type", "CodeSystem"), field(rec, "Type", "CodeSystemName"))
            ident = (
                field(rec, "Identifiers")
                .list.filter(common.present(pl.element().struct.field("ID")))
                .list.first()
            )
            # The identifier's type is part of the key: an id is unique only within its type.
            id_type = blank_to_null(field(ident, "IDType"))
            columns = [
                pl.when(id_type.is_not_null())
                .then(pl.concat_str([id_type, field(ident, "ID")], separator=":"))
                .otherwise(field(ident, "ID"))
                .alias("source_id"),
                field(rec, "Type", "Code").alias("type_code"),
                codesystems.canonical(type_system).alias("type_system"),
                type_system.alias("type_system_source"),
                field(rec, "Type", "Name").alias("type_display"),
                field(rec, "Locations").list.first().struct.field("Name").alias("location"),
                field(rec, "ReasonForVisit").list.first().struct.field("Name").alias("reason"),
                pl.lit(None, dtype=pl.String).alias("class_source"),
                pl.lit(None, dtype=pl.String).alias("status_source"),
                pl.lit(None, dtype=pl.String).alias("updated_text"),
            ]
            id_field = "Encounters[].Identifiers"
        else:
            provider = field(rec, "AttendingProvider")
            start, start_check = timestamp(field(rec, "VisitDateTime"), "start_at", "Visit.VisitDateTime")
            end, end_check = timestamp(field(rec, "DischargeDateTime"), "end_at", "Visit.DischargeDateTime")
            columns = [
                field(rec, "VisitNumber").alias("source_id"),
                pl.coalesce(
                    blank_to_null(field(rec, "Location", "Department")), field(rec, "Location", "Facility")
                ).alias("location"),
                field(rec, "Reason").alias("reason"),
                field(rec, "PatientClass").alias("class_source"),
                field(rec, "Status").alias("status_source"),
                field(rec, "LastUpdated").alias("updated_text"),
            ]
            id_field = "Visit.VisitNumber"
        updated, updated_check = timestamp(
            pl.coalesce(pl.col("updated_text"), pl.col("_event_at")), "source_updated_at", "Visit.LastUpdated"
        )
        columns += [
            clinical_patient(patient, preferred_id_types).alias("patient_source_id"),
            start,
            end,
            pl.coalesce(field(provider, "ID"), field(provider, "NPI")).alias("attending_provider_id"),
            provider_name(provider).alias("attending_provider_name"),
        ]
        frame = located(decoded, chain, columns, "encounters").with_columns(
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


def appointments(
    pages: pl.LazyFrame,
    *,
    preferred_id_types: Sequence[str] = DEFAULT_ID_TYPES,
    decoded: pl.LazyFrame | None = None,
) -> pl.LazyFrame:
    """Data Model Scheduling responses -> normalized ``appointments`` frame."""
    decoded = decode(pages, "appointments") if decoded is None else decoded
    event_at, event_check = timestamp(pl.col("_event_at"), "_event_ts", "Meta.EventDateTime")
    frames = []
    for chain in CHAINS["appointments"]:
        rec = pl.col("rec")
        patient = field(rec, "Patient") if chain.name == "bookings" else pl.col("ctx")
        provider = field(rec, "AttendingProvider")
        info = (
            field(rec, "AppointmentInfo")
            .list.filter(
                pl.element()
                .struct.field("Codeset")
                .str.to_lowercase()
                .str.contains("appointment-type")
                .fill_null(False)
            )
            .list.first()
        )
        start, start_check = timestamp(field(rec, "VisitDateTime"), "start_at", "Visit.VisitDateTime")
        duration_text = field(rec, "Duration")
        duration = common.parse_number(duration_text)
        # Scheduling event messages often leave Status null; the event itself says what happened.
        status_source = pl.coalesce(
            blank_to_null(field(rec, "Status")), pl.when(pl.lit(chain.name == "visit")).then(pl.col("_event"))
        )
        updated, updated_check = timestamp(
            pl.coalesce(field(rec, "LastUpdated"), pl.col("_event_at")),
            "source_updated_at",
            "Visit.LastUpdated",
        )
        columns = [
            field(rec, "VisitNumber").alias("source_id"),
            clinical_patient(patient, preferred_id_types).alias("patient_source_id"),
            status_source.alias("status_source"),
            start,
            duration.alias("_duration"),
            field(info, "Code").alias("type_code"),
            pl.coalesce(blank_to_null(field(rec, "Type")), field(info, "Description")).alias("type_display"),
            pl.coalesce(
                blank_to_null(field(rec, "Location", "Department")), field(rec, "Location", "Facility")
            ).alias("location"),
            pl.coalesce(field(provider, "ID"), field(provider, "NPI")).alias("provider_id"),
            provider_name(provider).alias("provider_name"),
            field(rec, "Reason").alias("reason"),
        ]
        whole = (pl.col("_duration") == pl.col("_duration").floor()) & (pl.col("_duration") >= 0)
        frame = (
            located(decoded, chain, columns, "appointments")
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


def results(
    pages: pl.LazyFrame,
    *,
    preferred_id_types: Sequence[str] = DEFAULT_ID_TYPES,
    decoded: pl.LazyFrame | None = None,
) -> pl.LazyFrame:
    """Data Model Results / Clinical Summary responses -> normalized ``results`` frame."""
    decoded = decode(pages, "results") if decoded is None else decoded
    event_at, event_check = timestamp(pl.col("_event_at"), "_event_ts", "Meta.EventDateTime")
    frames = []
    for chain in CHAINS["results"]:
        rec, order = pl.col("rec"), pl.col("outer")
        value_text = field(rec, "Value")
        value_type = (
            field(rec, "ValueType").str.strip_chars().str.to_lowercase().str.replace_all(r"[\s_-]", "")
        )
        numeric_type = value_type.is_in(NUMERIC_TYPES)
        comparator = value_text.str.strip_chars().str.extract(r"^(<=|>=|<|>)\s*[-+.\d]", 1)
        number = common.parse_number(
            pl.when(comparator.is_not_null())
            .then(value_text.str.strip_chars().str.strip_prefix(comparator))
            .otherwise(value_text)
        )
        coded = pl.col("rec").struct.field("CodedValue") if chain.name != "orders" else None
        rng = field(rec, "ReferenceRange")
        low_given, high_given = field(rng, "Low"), field(rng, "High")
        low_num, high_num = common.parse_number(low_given), common.parse_number(high_given)
        text_low, text_high = common.parse_range(field(rng, "Text"))
        structured = low_num.is_not_null() | high_num.is_not_null()
        if chain.name == "orders":
            order_id = pl.coalesce(
                blank_to_null(field(order, "ID")), blank_to_null(field(order, "ApplicationOrderID"))
            )
            patient = pl.coalesce(
                clinical_patient(field(order, "Patient"), preferred_id_types),
                clinical_patient(pl.col("ctx"), preferred_id_types),
            )
            times = {
                "Results[].CompletionDateTime": field(rec, "CompletionDateTime"),
                "Order.CollectionDateTime": field(order, "CollectionDateTime"),
                "Order.CompletionDateTime": field(order, "CompletionDateTime"),
                "Order.TransactionDateTime": field(order, "TransactionDateTime"),
            }
            effective_text = pl.coalesce(
                field(rec, "CompletionDateTime"),
                field(order, "CollectionDateTime"),
                field(order, "CompletionDateTime"),
            )
            updated_text = pl.coalesce(
                field(order, "TransactionDateTime"), field(order, "LastUpdated"), pl.col("_event_at")
            )
            source_id = pl.concat_str([order_id, field(rec, "Code")], separator="|")
            code_system = field(rec, "Codeset")
            columns = [
                order_id.alias("order_id"),
                field(rec, "Description").alias("display"),
                field(rec, "Units").alias("unit"),
                field(rec, "AbnormalFlag").alias("abnormal_flag_source"),
            ]
            id_checks = [
                (order_id.is_null(), "Order.ID: missing"),
                (~common.present(field(rec, "Code")), "Results[].Code: missing"),
            ]
        else:
            times = {"Observations[].DateTime": field(rec, "DateTime")}
            effective_text = field(rec, "DateTime")
            updated_text = pl.col("_event_at")
            patient = clinical_patient(pl.col("ctx"), preferred_id_types)
            # Clinical Summary results carry no order id: the key is panel|observation|time.
            source_id = pl.concat_str(
                [field(order, "Code"), field(rec, "Code"), field(rec, "DateTime")], separator="|"
            )
            code_system = pl.coalesce(field(rec, "CodeSystem"), field(rec, "CodeSystemName"))
            columns = [
                pl.lit(None, dtype=pl.String).alias("order_id"),
                field(rec, "Name").alias("display"),
                field(rec, "Units").alias("unit"),
                field(rec, "Interpretation").alias("abnormal_flag_source"),
            ]
            id_checks = [
                (~common.present(field(rec, "Code")), "Observations[].Code: missing"),
                (~common.present(field(order, "Code")), "Results[].Code: missing"),
            ]
        columns += [
            source_id.alias("source_id"),
            patient.alias("patient_source_id"),
            field(rec, "Code").alias("code"),
            pl.lit(None, dtype=pl.String).alias("parent_source_id"),
            codesystems.canonical(code_system).alias("code_system"),
            code_system.alias("code_system_source"),
            *_value_columns(value_type, value_text, number, comparator, coded),
            pl.coalesce(low_num, pl.when(~structured).then(text_low)).alias("reference_low"),
            pl.coalesce(high_num, pl.when(~structured).then(text_high)).alias("reference_high"),
            pl.when(structured | (text_low.is_null() & text_high.is_null()))
            .then(field(rng, "Text"))
            .alias("reference_text"),
            field(rec, "Status").alias("status_source"),
            common.parse_utc(effective_text).alias("effective_at"),
            common.parse_utc(updated_text).alias("source_updated_at"),
        ]
        time_checks = [
            (common.unparseable(text, common.parse_utc(text)), f"{name}: unparseable datetime")
            for name, text in times.items()
        ]
        frame = located(decoded, chain, columns, "results").with_columns(
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
                common.unparseable(field(order, "LastUpdated"), common.parse_utc(field(order, "LastUpdated")))
                if chain.name == "orders"
                else pl.lit(False),
                "Order.LastUpdated: unparseable datetime",
            ),
            event_check,
        ]
        frames.append(_recheck(frame, checks))
    return _finish(frames, decoded, pages, "results")


# Data Model ValueTypes (HL7 v2 OBX-2 codes and Redox's spelled-out names, lower-cased, without
# spaces, '_' or '-') -> ``results.value_type``. A type not listed keeps its Value as text ('string').
NUMERIC_TYPES: Final = ("numeric", "nm", "physicalquantity", "pq", "structurednumeric", "sn")
_VALUE_TYPES: Final[dict[str, str]] = {
    **dict.fromkeys(NUMERIC_TYPES, "quantity"),
    **dict.fromkeys(("code", "codedentry", "ce", "cwe", "cne", "coded"), "codeable_concept"),
    **dict.fromkeys(("datetime", "dt", "dtm", "ts", "date"), "datetime"),
    **dict.fromkeys(("time", "tm"), "time"),
    **dict.fromkeys(
        ("string", "st", "text", "tx", "formattedtext", "ft", "encapsulateddata", "ed"), "string"
    ),
}


def _value_columns(
    value_type: pl.Expr, value: pl.Expr, number: pl.Expr, comparator: pl.Expr, coded: pl.Expr | None
) -> list[pl.Expr]:
    """The ``results`` value columns of one Data Model result, by its ValueType (``_VALUE_TYPES``).

    A numeric type whose Value is not a number keeps the text (and is quarantined by the caller's
    check); a result with no ValueType is numeric when its Value parses as a number. A coded value
    is ``CodedValue`` where the message has one (Clinical Summary), else the Value itself.
    """
    kind = value_type.replace_strict(_VALUE_TYPES, default="string", return_dtype=pl.String)
    kind = (
        pl.when(value_type.is_null())
        .then(pl.when(number.is_not_null()).then(pl.lit("quantity")).otherwise(pl.lit("string")))
        .otherwise(kind)
    )
    has_value = common.present(value) | (
        coded.struct.field("Code").is_not_null() if coded is not None else False
    )
    kind = pl.when(has_value).then(kind)
    is_code = kind == "codeable_concept"
    code_system = (
        pl.coalesce(coded.struct.field("CodeSystem"), coded.struct.field("CodeSystemName"))
        if coded is not None
        else pl.lit(None, dtype=pl.String)
    )
    code = pl.coalesce(coded.struct.field("Code"), value) if coded is not None else value
    display = pl.coalesce(coded.struct.field("Name"), value) if coded is not None else value
    is_time = kind.is_in(["datetime"])
    return [
        kind.alias("value_type"),
        pl.when(kind == "quantity").then(number).alias("value_num"),
        pl.when(kind == "quantity").then(comparator).alias("value_comparator"),
        pl.when((kind != "quantity") | number.is_null()).then(value).alias("value_text"),
        pl.when(is_code).then(code).alias("value_code"),
        pl.when(is_code).then(codesystems.canonical(code_system)).alias("value_code_system"),
        pl.when(is_code).then(code_system).alias("value_code_system_source"),
        pl.when(is_code).then(display).alias("value_code_display"),
        pl.when(is_time).then(common.parse_utc(value)).alias("value_at"),
    ]


def patients(
    pages: pl.LazyFrame,
    *,
    preferred_id_types: Sequence[str] = DEFAULT_ID_TYPES,
    decoded: pl.LazyFrame | None = None,
) -> pl.LazyFrame:
    """Embedded patients of any Data Model response -> normalized ``patients`` frame, one row per
    distinct patient: the most complete record wins, then the newest, then the last seen."""
    decoded = decode(pages, "patients") if decoded is None else decoded
    frames = []
    rec = pl.col("rec")
    demo = field(rec, "Demographics")
    identifiers = field(rec, "Identifiers").list.filter(common.present(pl.element().struct.field("ID")))
    is_ssn = (pl.element().struct.field("IDType").str.to_uppercase() == "SSN").fill_null(False)
    dob = field(demo, "DOB")
    phone = field(demo, "PhoneNumber")
    updated, updated_check = timestamp(pl.col("_event_at"), "source_updated_at", "Meta.EventDateTime")
    completeness = pl.sum_horizontal(
        [
            common.present(e).cast(pl.Int32)
            for e in (
                field(demo, "FirstName"),
                field(demo, "LastName"),
                dob,
                field(demo, "Sex"),
                field(demo, "SSN"),
                field(demo, "Address", "StreetAddress"),
                field(demo, "Address", "City"),
                field(demo, "Address", "ZIP"),
                pl.coalesce(field(phone, "Home"), field(phone, "Mobile"), field(phone, "Office")),
                field(demo, "EmailAddresses").list.first(),
            )
        ]
    )
    for chain in CHAINS["patients"]:
        columns = [
            patient_source_id(field(rec, "Identifiers"), preferred_id_types).alias("source_id"),
            identifiers.list.filter(~is_ssn)
            .list.eval(
                pl.struct(
                    identifier_system(pl.element().struct.field("IDType")).alias("system"),
                    pl.element().struct.field("ID").alias("value"),
                )
            )
            .alias("identifiers"),
            field(demo, "FirstName").alias("given_name"),
            field(demo, "MiddleName").alias("middle_name"),
            field(demo, "LastName").alias("family_name"),
            common.parse_birth_date(dob).alias("birth_date"),
            field(demo, "Sex").alias("sex_source"),
            pl.coalesce(
                field(demo, "SSN"), identifiers.list.filter(is_ssn).list.first().struct.field("ID")
            ).alias("ssn"),
            field(demo, "Address", "StreetAddress").alias("address_line"),
            field(demo, "Address", "City").alias("address_city"),
            field(demo, "Address", "State").alias("address_state"),
            field(demo, "Address", "ZIP").alias("address_postal_code"),
            pl.coalesce(
                blank_to_null(field(phone, "Home")),
                blank_to_null(field(phone, "Mobile")),
                field(phone, "Office"),
            ).alias("phone"),
            field(demo, "EmailAddresses").list.first().alias("email"),
            completeness.alias("_rank"),
            updated,
        ]
        checks = [
            (pl.col("source_id").is_null(), "Identifiers: no usable ID"),
            (common.birth_date_unparseable(dob, pl.col("birth_date")), "Demographics.DOB: unparseable date"),
            updated_check,
        ]
        frame = located(decoded, chain, columns, "patients").with_columns(
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


def _finish(
    frames: list[pl.LazyFrame], decoded: pl.LazyFrame, pages: pl.LazyFrame, table: str
) -> pl.LazyFrame:
    """The chains' frames and the quarantined pages -> one deduped normalized ``table`` frame."""
    cols = list(schema.TABLES[table])
    bad_pages = page_rows(decoded).select(
        pl.lit(SURFACE).alias("source_surface"),
        pl.col("raw_ref"),
        pl.col("_page"),
        pl.lit(None, dtype=pl.String).alias("_path"),
        pl.lit(None, dtype=pl.String).alias(common.RECORD_RAW),
        pl.col("_page_reason").alias("quarantine_reason"),
    )
    keep = [*cols, "quarantine_reason", "raw_ref", "_page", "_path", common.RECORD_RAW, "_rank"]
    selected = [f.select([c for c in keep if c in f.collect_schema().names()]) for f in frames]
    # Page order decides "last seen" among equals, so a later page's copy wins.
    merged = (
        pl.concat([*selected, bad_pages], how="diagonal_relaxed")
        .sort("_page", maintain_order=True)
        .with_row_index("_seq")
    )
    if "patient_source_id" in schema.TABLES[table]:
        merged = merged.with_columns(scoped_key().alias("source_id"))
    have = set(merged.collect_schema().names())
    # Columns no chain of this surface fills (a FHIR-only value shape) are null, not missing.
    merged = merged.with_columns(
        pl.lit(None, dtype=dtype).alias(c) for c, dtype in schema.TABLES[table].items() if c not in have
    )
    string_cols = [c for c, dt in schema.TABLES[table].items() if dt == pl.String and c != "source_surface"]
    merged = merged.with_columns([blank_to_null(pl.col(c)).alias(c) for c in string_cols])
    if "_rank" not in merged.collect_schema().names():
        merged = merged.with_columns(pl.lit(0).alias("_rank"))
    deduped = common.dedupe(merged, prefer=("_rank", "source_updated_at"))
    return common.finish(common.fill_raw(deduped, pages, record_path, ["_path"]), table)


def scoped_key() -> pl.Expr:
    """A clinical record's natural key: '<patient_source_id>/<id at the source>'.

    Data Model ids (Order ID, VisitNumber, an encounter's identifier) are unique only within the
    source system and id type that issued them, and Redox sends no assigning authority for them,
    so two patients' records can carry one id. Scoped by the patient, such records are two keys:
    both are kept, never one merged into the other.
    """
    local = pl.col("source_id")
    # A quarantined record keeps the id the source sent: it is never merged, and a person fixing it
    # looks for that id.
    scoped = pl.col("patient_source_id").is_not_null() & local.is_not_null()
    return (
        pl.when(scoped & pl.col("quarantine_reason").is_null())
        .then(pl.concat_str([pl.col("patient_source_id"), local], separator="/"))
        .otherwise(local)
    )


def local_id() -> pl.Expr:
    """The id at the source of a good clinical row: its ``source_id`` without the patient scope
    (``scoped_key``'s inverse)."""
    return pl.col("source_id").str.slice(pl.col("patient_source_id").str.len_chars() + 1)


def _recheck(frame: pl.LazyFrame, checks: list[tuple[pl.Expr, str]]) -> pl.LazyFrame:
    """Add field-check reasons to rows that have no marker reason yet."""
    return frame.with_columns(
        pl.coalesce(pl.col("quarantine_reason"), common.reasons(*checks)).alias("quarantine_reason")
    )
