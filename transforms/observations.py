"""FHIR Observation values -> ``results`` value columns: every R4 ``value[x]``, ``dataAbsentReason``,
``component[]`` and ``hasMember``, for the FHIR normalizer (transforms/fhir.py).

Invariants kept:
- every ``value[x]`` type of R4 lands in a documented column (docs/data-dictionary.md, "results"):
  nothing a source sends as a value ends as a row with value, unit and text all null;
  ``value_type`` says which type it was (``schema.VALUE_TYPES``), ``absent`` when only
  ``dataAbsentReason`` was sent;
- the same expressions read an Observation and each of its components (``value_columns`` takes the
  struct to read), so a component's value is mapped exactly as a top-level value;
- a component row's ``source_id`` is ``component_id(parent, index)``: derived from the parent's key
  and the component's position, stable across reloads of one version of the Observation;
- code systems leave here canonical (``codesystems.canonical``), the source spelling beside them.
"""

from typing import Final

import polars as pl

from transforms import codesystems, common

S = pl.String()
F = pl.Float64()
CODING: Final = pl.Struct({"system": S, "code": S, "display": S})
CODEABLE: Final = pl.Struct({"coding": pl.List(CODING), "text": S})
QUANTITY: Final = pl.Struct({"value": F, "comparator": S, "unit": S, "system": S, "code": S})
SIMPLE_QUANTITY: Final = pl.Struct({"value": F, "unit": S, "code": S})
PERIOD: Final = pl.Struct({"start": S, "end": S})
REFERENCE_RANGE: Final = pl.Struct(
    {"low": pl.Struct({"value": F}), "high": pl.Struct({"value": F}), "text": S}
)

# The value-bearing fields shared by Observation and Observation.component (R4 value[x] choices).
VALUE_FIELDS: Final[dict[str, pl.DataType]] = {
    "valueQuantity": QUANTITY,
    "valueCodeableConcept": CODEABLE,
    "valueString": S,
    "valueBoolean": pl.Boolean(),
    "valueInteger": F,
    "valueRange": pl.Struct({"low": SIMPLE_QUANTITY, "high": SIMPLE_QUANTITY}),
    "valueRatio": pl.Struct({"numerator": QUANTITY, "denominator": QUANTITY}),
    "valueSampledData": pl.Struct({"origin": SIMPLE_QUANTITY, "data": S}),
    "valueTime": S,
    "valueDateTime": S,
    "valuePeriod": PERIOD,
    "dataAbsentReason": CODEABLE,
    "interpretation": pl.List(CODEABLE),
    "referenceRange": pl.List(REFERENCE_RANGE),
}

COMPONENT: Final = pl.Struct({"code": CODEABLE, **VALUE_FIELDS})

# Columns a component row takes from its own component (the rest it takes from its parent).
COMPONENT_COLUMNS: Final = (
    "code",
    "code_system",
    "code_system_source",
    "display",
    "value_type",
    "value_num",
    "value_comparator",
    "value_text",
    "value_code",
    "value_code_system",
    "value_code_system_source",
    "value_code_display",
    "value_low",
    "value_high",
    "value_denominator",
    "value_at",
    "value_end_at",
    "absent_reason",
    "unit",
    "reference_low",
    "reference_high",
    "reference_text",
    "abnormal_flag_source",
)


def component_id(parent: pl.Expr, index: pl.Expr) -> pl.Expr:
    """A component row's ``source_id``: '<parent source_id>/component/<index>' (0-based)."""
    return pl.concat_str([parent, pl.lit("/component/"), index.cast(pl.String)])


def codeable(cc: pl.Expr) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """(code, system as sent, display) of a CodeableConcept's first coding; display falls back to text."""
    coding = cc.struct.field("coding").list.first()
    return (
        coding.struct.field("code"),
        coding.struct.field("system"),
        pl.coalesce(coding.struct.field("display"), cc.struct.field("text")),
    )


def cc_text(cc: pl.Expr) -> pl.Expr:
    return pl.coalesce(
        cc.struct.field("text"), cc.struct.field("coding").list.first().struct.field("display")
    )


def _reference_range(obj: pl.Expr) -> dict[str, pl.Expr]:
    rng = obj.struct.field("referenceRange").list.first()
    rng_text = rng.struct.field("text")
    text_low, text_high = common.parse_range(rng_text)
    low_value = rng.struct.field("low").struct.field("value")
    high_value = rng.struct.field("high").struct.field("value")
    structured = low_value.is_not_null() | high_value.is_not_null()
    return {
        "reference_low": pl.coalesce(low_value, pl.when(~structured).then(text_low)),
        "reference_high": pl.coalesce(high_value, pl.when(~structured).then(text_high)),
        # The text stays unless the bounds were read out of it (then it would say the same twice).
        "reference_text": pl.when(structured | (text_low.is_null() & text_high.is_null())).then(rng_text),
    }


def value_columns(obj: pl.Expr) -> dict[str, pl.Expr]:
    """The ``results`` value columns read from ``obj`` (an Observation or one of its components)."""

    def f(name: str) -> pl.Expr:
        return obj.struct.field(name)

    quantity, cc, rng, ratio = f("valueQuantity"), f("valueCodeableConcept"), f("valueRange"), f("valueRatio")
    sampled, period = f("valueSampledData"), f("valuePeriod")
    numerator, denominator = ratio.struct.field("numerator"), ratio.struct.field("denominator")
    low, high = rng.struct.field("low"), rng.struct.field("high")
    value_code, value_system, value_display = codeable(cc)
    boolean = f("valueBoolean")
    absent = f("dataAbsentReason")
    absent_code, _, _ = codeable(absent)

    # The first value[x] present decides the type (R4 allows one; a broken source sending two
    # still has every one read into its own columns).
    kinds: list[tuple[str, pl.Expr]] = [
        (
            "quantity",
            quantity.struct.field("value").is_not_null() | quantity.struct.field("comparator").is_not_null(),
        ),
        ("codeable_concept", cc.is_not_null()),
        ("string", f("valueString").is_not_null()),
        ("boolean", boolean.is_not_null()),
        ("integer", f("valueInteger").is_not_null()),
        ("range", low.is_not_null() | high.is_not_null()),
        ("ratio", numerator.is_not_null() | denominator.is_not_null()),
        ("sampled_data", sampled.is_not_null()),
        ("time", f("valueTime").is_not_null()),
        ("datetime", f("valueDateTime").is_not_null()),
        ("period", period.is_not_null()),
        ("absent", absent.is_not_null()),
    ]
    value_type = pl.lit(None, dtype=pl.String)
    for kind, test in reversed(kinds):
        value_type = pl.when(test.fill_null(False)).then(pl.lit(kind)).otherwise(value_type)

    quantity_unit = pl.coalesce(quantity.struct.field("unit"), quantity.struct.field("code"))
    return {
        "value_type": value_type,
        "value_num": pl.coalesce(
            quantity.struct.field("value"), f("valueInteger"), numerator.struct.field("value")
        ),
        "value_comparator": pl.coalesce(
            quantity.struct.field("comparator"), numerator.struct.field("comparator")
        ),
        "value_text": pl.coalesce(
            f("valueString"),
            cc_text(cc),
            pl.when(boolean).then(pl.lit("true")).when(~boolean).then(pl.lit("false")),
            f("valueTime"),
            f("valueDateTime"),
            sampled.struct.field("data"),
        ),
        "value_code": value_code,
        "value_code_system_source": value_system,
        "value_code_system": codesystems.canonical(value_system),
        "value_code_display": value_display,
        "value_low": low.struct.field("value"),
        "value_high": high.struct.field("value"),
        "value_denominator": denominator.struct.field("value"),
        "value_at": common.parse_utc(pl.coalesce(f("valueDateTime"), period.struct.field("start"))),
        "value_end_at": common.parse_utc(period.struct.field("end")),
        "absent_reason": pl.coalesce(absent_code, absent.struct.field("text")),
        "unit": pl.coalesce(
            quantity_unit,
            low.struct.field("unit"),
            low.struct.field("code"),
            high.struct.field("unit"),
            high.struct.field("code"),
            numerator.struct.field("unit"),
            numerator.struct.field("code"),
            sampled.struct.field("origin").struct.field("unit"),
            sampled.struct.field("origin").struct.field("code"),
        ),
        **_reference_range(obj),
        "abnormal_flag_source": f("interpretation")
        .list.first()
        .struct.field("coding")
        .list.first()
        .struct.field("code"),
    }


def coded_columns(obj: pl.Expr) -> dict[str, pl.Expr]:
    """``code``, ``code_system`` (canonical), ``code_system_source`` and ``display`` of ``obj.code``."""
    code, system, display = codeable(obj.struct.field("code"))
    return {
        "code": code,
        "code_system": codesystems.canonical(system),
        "code_system_source": system,
        "display": display,
    }


def components(obj: pl.Expr) -> pl.Expr:
    """``obj.component[]`` as a list of structs of ``COMPONENT_COLUMNS`` (null when none)."""
    element = pl.element()
    columns = {**coded_columns(element), **value_columns(element)}
    return obj.struct.field("component").list.eval(
        pl.struct([columns[name].alias(name) for name in COMPONENT_COLUMNS])
    )


def with_component_rows(records: pl.LazyFrame, components_column: str = "_components") -> pl.LazyFrame:
    """``records`` (the normalized frame after dedupe) plus one row per component of each good row.

    A component row takes its own ``COMPONENT_COLUMNS``; from its parent, the patient, order,
    status, times and lineage; ``parent_source_id`` is the parent's ``source_id``, ``duplicates`` 0
    (a duplicate's components were counted with it). One explode in one pass, so the frame streams:
    each row becomes itself (part 0) followed by its components (parts 1..n).
    """
    parts = pl.col(components_column)
    dtype = records.collect_schema()[components_column]
    assert isinstance(dtype, pl.List)
    keep = pl.col("quarantine_reason").is_null() & parts.is_not_null()
    listed = pl.concat_list(
        [pl.lit(None, dtype=dtype.inner), pl.when(keep).then(parts).otherwise(pl.lit([], dtype=dtype))]
    )
    exploded = (
        records.with_columns(listed.alias(components_column))
        .with_columns(pl.int_ranges(0, pl.col(components_column).list.len()).alias("_part"))
        .explode([components_column, "_part"])
    )
    is_part = pl.col("_part") > 0
    part = pl.col(components_column)
    return exploded.with_columns(
        pl.when(is_part)
        .then(component_id(pl.col("source_id"), pl.col("_part") - 1))
        .otherwise(pl.col("source_id"))
        .alias("source_id"),
        pl.when(is_part)
        .then(pl.col("source_id"))
        .otherwise(pl.col("parent_source_id"))
        .alias("parent_source_id"),
        pl.when(is_part).then(None).otherwise(pl.col("member_source_ids")).alias("member_source_ids"),
        pl.when(is_part).then(pl.lit(0, dtype=pl.UInt32)).otherwise(pl.col("duplicates")).alias("duplicates"),
        *[
            pl.when(is_part).then(part.struct.field(c)).otherwise(pl.col(c)).alias(c)
            for c in COMPONENT_COLUMNS
        ],
    ).drop(components_column, "_part")
