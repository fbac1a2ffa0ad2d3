"""Shared normalizer helpers, and the polars behaviours the decoding design depends on."""

import json
from datetime import UTC, datetime

import polars as pl
import pytest

import schema
from transforms import common, fhir, valuesets

# --- what polars' json_decode does (pinned: the fast/slow path split relies on it) ---------------


def decode(bodies: list[str], dtype: pl.DataType) -> list[object]:
    return pl.Series(bodies, dtype=pl.String).str.json_decode(dtype).to_list()


def test_polars_coerces_numbers_and_booleans_into_strings() -> None:
    dtype = pl.Struct({"s": pl.String()})
    assert decode(['{"s": 12}', '{"s": true}', '{"s": 1.50}'], dtype) == [
        {"s": "12"},
        {"s": "true"},
        {"s": "1.5"},
    ]


@pytest.mark.parametrize(
    ("body", "dtype"),
    [
        ('{"x": "abc"}', pl.Struct({"x": pl.Float64()})),
        ('{"x": {"a": 1}}', pl.Struct({"x": pl.String()})),
        ('{"x": {"a": 1}}', pl.Struct({"x": pl.List(pl.String())})),
        ('{"x": [1]}', pl.Struct({"x": pl.Struct({"a": pl.String()})})),
        ("{not json", pl.Struct({"x": pl.String()})),
    ],
)
def test_polars_fails_the_whole_column_on_a_type_mismatch(body: str, dtype: pl.DataType) -> None:
    with pytest.raises(pl.exceptions.PolarsError):
        decode(['{"x": null}', body], dtype)


def test_polars_drops_blank_bodies_and_splits_comma_joined_bodies() -> None:
    # json_decode parses the column as one JSON array of the bodies: a blank body is no element,
    # and a body that is two objects joined by a comma is two elements. Both would shift every
    # later row, which is why robust_decode checks the output length.
    dtype = pl.Struct({"a": pl.Int64()})
    assert decode([""], dtype) == []
    assert decode(['{"a":1},{"a":2}'], dtype) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        ("abc", pl.Float64(), "x"),
        ({"a": 1}, pl.String(), "x"),
        (12, pl.String(), None),
        ([1], pl.Struct({"a": pl.String()}), "x"),
        ({"a": [{"b": "t"}]}, pl.Struct({"a": pl.List(pl.Struct({"b": pl.Float64()}))}), "x.a[].b"),
    ],
)
def test_type_mismatch_agrees_with_polars(value: object, dtype: pl.DataType, expected: str | None) -> None:
    wrapped = pl.Struct({"x": dtype})
    assert common.type_mismatch({"x": value}, wrapped) == expected
    body = json.dumps({"x": value})
    try:
        decode([body], wrapped)
        decodes = True
    except pl.exceptions.PolarsError:
        decodes = False
    assert decodes == (expected is None)


def test_strict_type_mismatch_rejects_numbers_for_strings() -> None:
    assert common.type_mismatch({"status": 1}, pl.Struct({"status": pl.String()}), strict=True) == "status"


# --- robust decode -------------------------------------------------------------------------------


def test_robust_decode_isolates_bad_pages_and_keeps_alignment() -> None:
    dtype = fhir._page_dtype("encounters")
    good = json.dumps(
        {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Encounter", "id": "a"}}]}
    )
    bodies = pl.Series([good, "", '{"resourceType":"Bundle"},{"x":1}', "{bad", good])
    out = common.robust_decode(bodies, dtype, fhir._repairer("encounters"))
    assert len(out) == 5
    errors = out.struct.field(common.PAGE_ERROR).to_list()
    assert errors == [None, "page: empty body", "page: invalid JSON", "page: invalid JSON", None]


def test_suspect_pages_take_the_repair_path() -> None:
    dtype = fhir._page_dtype("encounters")
    body = json.dumps(
        {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Encounter", "id": 7}}]}
    )
    regex = common.non_string_regex(common.string_keys(dtype))
    out = common.robust_decode(pl.Series([body]), dtype, fhir._repairer("encounters"), suspect=regex)
    entry = out.struct.field("entry").to_list()[0][0]
    assert entry[common.RECORD_ERROR] == "id: wrong JSON type"


# --- the Arrow fast path: never a different answer from polars, only a cheaper one ---------------

ARROW_DTYPE = pl.Struct(
    {
        "s": pl.String(),
        "f": pl.Float64(),
        "l": pl.List(pl.String()),
        "st": pl.Struct({"a": pl.String(), "n": pl.List(pl.Struct({"v": pl.Float64()}))}),
    }
)


@pytest.mark.parametrize(
    "body",
    [
        '{"s": 12}',
        '{"s": true}',
        '{"f": true}',
        '{"l": "x"}',
        '{"l": [1]}',
        '{"st": {"a": 1}}',
        '{"s": "a", "s": "b"}',
        '{"s": "\\ud83d"}',
        '{"f": NaN}',
        '{"f": -Infinity}',
        '{"s": "x", "ignored": Inf}',
        "null",
        " [1] ",
        '"x"',
        '{"s": "a"} {"s": "b"}',
        '{"s": "a"},{"s": "b"}',
        '{"s": "a"} null {"s": "b"}',
        "{bad",
        "",
    ],
)
def test_arrow_decode_refuses_what_polars_coerces_or_splits(body: str) -> None:
    assert common._arrow_decode(pl.Series(['{"s": "ok"}', body], dtype=pl.String), ARROW_DTYPE) is None


def test_arrow_decode_equals_polars_on_what_it_accepts() -> None:
    bodies = pl.Series(
        [
            '{"s": "x", "f": 3, "l": ["a", "b"], "st": {"a": "y", "n": [{"v": 1.5}, {"v": null}]}}',
            '  {"s": "caf\\u00e9 \\ud83d\\ude00", "f": -0.0, "extra": {"s": 1, "deep": [1, {}]}}\n',
            '{"f": 1e-320, "l": [], "st": null}',
            '{"f": 0.30000000000000004, "l": null, "st": {"n": []}}',
            "{}",
        ],
        dtype=pl.String,
    )
    fast = common._arrow_decode(bodies, ARROW_DTYPE)
    assert fast is not None and fast.dtype == ARROW_DTYPE
    assert fast.to_list() == bodies.str.strip_chars().str.json_decode(ARROW_DTYPE).to_list()


def test_robust_decode_gives_the_same_pages_with_or_without_arrow(monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = fhir._page_dtype("encounters")
    good = {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Encounter", "id": "a"}}]}
    chunks = [
        [json.dumps(good), json.dumps(good, indent=2)],
        [json.dumps(good), '{"resourceType": "Bundle", "entry": [{"resource": {"id": 7}}]}', "null"],
        ['{"resourceType":"Bundle"},{"x":1}', json.dumps(good)],
    ]
    regex = common.non_string_regex(common.string_keys(dtype))
    for chunk in chunks:
        bodies = pl.Series(chunk, dtype=pl.String)
        with_arrow = common.robust_decode(bodies, dtype, fhir._repairer("encounters"), suspect=regex)
        with monkeypatch.context() as patch:
            patch.setattr(common, "_arrow_decode", lambda _bodies, _dtype: None)
            without = common.robust_decode(bodies, dtype, fhir._repairer("encounters"), suspect=regex)
        assert with_arrow.to_list() == without.to_list()


def test_string_keys_exclude_names_that_are_numbers_somewhere() -> None:
    keys = common.string_keys(fhir._page_dtype("results"))
    assert "status" in keys and "id" in keys
    assert "value" not in keys  # valueQuantity.value is a number, identifier.value a string


# --- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01T09:30:00-04:00", datetime(2026, 11, 1, 13, 30, tzinfo=UTC)),
        ("2023-02-27T22:09:04.646Z", datetime(2023, 2, 27, 22, 9, 4, 646000, tzinfo=UTC)),
        ("2026-11-01T09:30:00.1234567+00:00", datetime(2026, 11, 1, 9, 30, 0, 123456, tzinfo=UTC)),
        ("  2026-11-01T09:30:00Z ", datetime(2026, 11, 1, 9, 30, tzinfo=UTC)),
        ("2026-11-01T09:30:00", datetime(2026, 11, 1, 9, 30, tzinfo=UTC)),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2021-02-30T25:61:00", None),
        ("2026-02-30", None),
        ("not-a-date", None),
        (None, None),
    ],
)
def test_parse_utc(text: str | None, expected: datetime | None) -> None:
    out = pl.DataFrame({"t": [text]}, schema={"t": pl.String()}).select(common.parse_utc(pl.col("t")))
    assert out.dtypes == [schema.UTC_TS]
    assert out.item() == expected


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("3.5-5.0", 3.5, 5.0),
        ("3.5 - 5.0", 3.5, 5.0),
        ("-1.5-2", -1.5, 2.0),
        ("<5", None, 5.0),
        ("<= 5", None, 5.0),
        (">10", 10.0, None),
        (">=10", 10.0, None),
        ("Negative", None, None),
        ("3.5-5.0 mmol/L", None, None),
    ],
)
def test_parse_range(text: str, low: float | None, high: float | None) -> None:
    lo, hi = common.parse_range(pl.col("t"))
    assert pl.DataFrame({"t": [text]}).select(lo, hi.alias("h")).row(0) == (low, high)


def test_parse_number_rejects_words_and_specials() -> None:
    values = ["1.5", " 2 ", "1e3", "NaN", "inf", "1,5", "abc"]
    out = pl.DataFrame({"t": values}).select(common.parse_number(pl.col("t")))["t"].to_list()
    assert out == [1.5, 2.0, 1000.0, None, None, None, None]


def test_reasons_join_and_null_when_fine() -> None:
    frame = pl.DataFrame({"a": [1, None, None], "b": [1, 1, None]})
    out = frame.select(
        common.reasons((pl.col("a").is_null(), "a: missing"), (pl.col("b").is_null(), "b: missing"))
    )
    assert out.to_series().to_list() == [None, "a: missing", "a: missing; b: missing"]


# --- dedupe, split, tally ------------------------------------------------------------------------


def test_dedupe_prefers_columns_in_order_then_last_seen() -> None:
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    frame = pl.LazyFrame(
        {
            "source_surface": ["datamodel"] * 4,
            "source_id": ["p", "p", "p", "p"],
            "_rank": [3, 5, 5, 1],
            "source_updated_at": [ts, ts, ts, datetime(2027, 1, 1, tzinfo=UTC)],
            "quarantine_reason": [None] * 4,
            "_seq": [0, 1, 2, 3],
        }
    )
    out = common.dedupe(frame, prefer=("_rank", "source_updated_at")).collect()
    assert out["_seq"].to_list() == [2]
    assert out["duplicates"].to_list() == [3]


def test_split_infers_the_table_and_conforms_both_halves() -> None:
    frame = pl.LazyFrame(
        {
            **{name: [None, None] for name in schema.APPOINTMENTS},
            "quarantine_reason": [None, "start: unparseable datetime"],
            "raw_ref": ["r", "r"],
            "raw": [None, "{}"],
            "duplicates": [0, 0],
        }
    ).pipe(lambda f: f.with_columns(pl.lit("fhir").alias("source_surface")))
    normalized = common.finish(frame, "appointments")
    good, bad = common.split(normalized)
    assert good.collect().schema == schema.APPOINTMENTS and good.collect().height == 1
    quarantine = bad.collect()
    assert quarantine.schema == schema.QUARANTINE
    assert quarantine.row(0, named=True)["entity"] == "appointments"


def test_valuesets_only_map_into_the_canonical_sets() -> None:
    for (_surface, field), table in valuesets.CODE_MAPS.items():
        assert set(table.values()) <= set(schema.VALUESETS[field])


def test_map_code_is_case_and_blank_insensitive_and_keeps_null() -> None:
    frame = pl.DataFrame({"s": [" Canceled ", "CANCELED", "", None, "zzz"]})
    out = frame.select(valuesets.map_code(pl.col("s"), "datamodel", "appointment_status").alias("s"))[
        "s"
    ].to_list()
    assert out == ["cancelled", "cancelled", None, None, "unknown"]
    unmapped = frame.select(valuesets.is_unmapped(pl.col("s"), "datamodel", "appointment_status").alias("s"))[
        "s"
    ]
    assert unmapped.to_list() == [False, False, False, False, True]
