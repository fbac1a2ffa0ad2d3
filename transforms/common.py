"""Helpers shared by the FHIR and Data Model normalizers.

Every normalizer produces a *normalized frame*: the unified table's columns (``schema.conform``)
followed by ``NORMALIZED_EXTRA`` (``quarantine_reason``, ``raw_ref``, ``raw``, ``duplicates``).
``split`` turns it into the table rows and the ``quarantine`` rows.

Invariants kept here:

- no record is dropped silently: a record is either a good row, a quarantined row, or collapsed
  into a good row by ``dedupe`` (its count lands in that row's ``duplicates``). So for every batch:
  records located in the pages = good rows + sum(duplicates) + quarantined rows;
- a quarantine reason names the FIELD that is wrong and why, never its value (no PHI);
- timestamps leave here as ``Datetime("us", "UTC")``; how partial and offset datetimes become UTC is
  ``parse_utc``'s documented rule;
- decoding never raises on bad input: ``robust_decode`` falls back to a per-page Python path that
  rewrites only the broken pages, marking broken records so the vectorized path can quarantine them;
- every page body decoded goes through ``robust_decode``, which counts it in ``DECODED_PAGES`` by
  purpose, so how often a page is decoded is measured rather than guessed.

Over 600 lines: decoding (robust_decode and its Arrow and Python paths) is about half of it and is
shared by both surfaces' normalizers; it is the candidate to move to its own module.
"""

import collections
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import polars as pl
import pyarrow as pa
import pyarrow.json as pa_json
from polars.datatypes.classes import DataTypeClass

import schema
from schema import versions

# polars annotates nested field dtypes as "a DataType instance or class" (its PolarsDataType).
DType = pl.DataType | DataTypeClass

NORMALIZED_EXTRA: Final[dict[str, pl.DataType]] = {
    "quarantine_reason": pl.String(),
    "raw_ref": pl.String(),
    "raw": pl.String(),
    # How many other copies of this record (same natural key) the batch held and dedupe dropped.
    "duplicates": pl.UInt32(),
}

# Markers the Python fallback writes into a repaired page; the vectorized path reads them.
PAGE_ERROR: Final = "_page_error"
RECORD_ERROR: Final = "_quarantine"
RECORD_RAW: Final = "_raw"

# Requests with more than one reason list them all, joined by this.
REASON_SEP: Final = "; "

_NUMBER: Final = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"


def normalized_schema(table: str) -> pl.Schema:
    """The exact schema of a normalizer's output for ``table``."""
    return pl.Schema({**schema.TABLES[table], **NORMALIZED_EXTRA})


# --- time ----------------------------------------------------------------------------------------


def parse_utc(text: pl.Expr) -> pl.Expr:
    """Parse ISO 8601 / FHIR dateTime text to ``Datetime("us", "UTC")``.

    Rule (documented in docs/data-dictionary.md):
    - with an offset or ``Z``: converted to UTC;
    - with a time but no offset: taken as UTC (FHIR forbids it; the Data Model documents UTC);
    - partial (``YYYY-MM-DD``, ``YYYY-MM``, ``YYYY``): the start of that period, at 00:00 UTC;
    - fractional seconds beyond microseconds are truncated;
    - anything else (including impossible calendar dates such as 2026-02-30): null, which the
      caller turns into a quarantine reason with ``unparseable``.
    """
    return _in_calendar(_utc_any(text))


def with_utc(frame: pl.LazyFrame, columns: Mapping[str, pl.Expr]) -> pl.LazyFrame:
    """``frame`` plus one ``parse_utc`` column per ``name: text``, each text parsed once.

    ``parse_utc`` mentions its parse twice (the value, and its year for the range check), and
    polars evaluates a sub-expression once per mention within one expression: it shares work only
    between the columns of one step. Two steps halve the cost (200k FHIR timestamps: 0.22 s of
    CPU -> 0.12 s).
    """
    return frame.with_columns(_utc_any(text).alias(name) for name, text in columns.items()).with_columns(
        _in_calendar(pl.col(name)).alias(name) for name in columns
    )


def _utc_any(text: pl.Expr) -> pl.Expr:
    s = text.str.strip_chars()
    with_offset = s.str.replace(r"[zZ]$", "+00:00").str.to_datetime(
        "%Y-%m-%dT%H:%M:%S%.f%:z", time_unit="us", time_zone="UTC", strict=False
    )
    naive = s.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us", strict=False).dt.replace_time_zone(
        "UTC"
    )
    day = _partial_date(s)
    return pl.coalesce(with_offset, naive, day.cast(schema.UTC_TS))


def _in_calendar(parsed: pl.Expr) -> pl.Expr:
    # chrono reads "0000" as proleptic year 0, which neither FHIR (0001-9999) nor ISO 8601 dates
    # in the Data Model allow: a record dated in it is broken, not ancient.
    return pl.when(parsed.dt.year() >= 1).then(parsed)


def _partial_date(s: pl.Expr) -> pl.Expr:
    return pl.coalesce(
        s.str.to_date("%Y-%m-%d", strict=False),
        pl.when(s.str.contains(r"^\d{4}-\d{2}$")).then((s + "-01").str.to_date("%Y-%m-%d", strict=False)),
        pl.when(s.str.contains(r"^\d{4}$")).then((s + "-01-01").str.to_date("%Y-%m-%d", strict=False)),
    )


def parse_birth_date(text: pl.Expr) -> pl.Expr:
    """A full calendar date (a datetime's date part is accepted); partial dates give null.

    A birth date known only to the year or month is not a date: inventing the 1st of January would
    create false exact matches in identity resolution, so the column stays null (not quarantined).
    """
    s = text.str.strip_chars()
    parsed = s.str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False)
    return pl.when(s.str.contains(r"^\d{4}-\d{2}-\d{2}(?:T.*)?$") & (parsed.dt.year() >= 1)).then(parsed)


def birth_date_unparseable(text: pl.Expr, parsed: pl.Expr) -> pl.Expr:
    s = text.str.strip_chars()
    partial = s.str.contains(r"^\d{4}(?:-\d{2})?$")
    return present(text) & parsed.is_null() & ~partial


def present(text: pl.Expr) -> pl.Expr:
    """Non-null and not blank."""
    return text.is_not_null() & (text.cast(pl.String).str.strip_chars() != "")


def unparseable(text: pl.Expr, parsed: pl.Expr) -> pl.Expr:
    """The source sent something, and it did not parse."""
    return present(text) & parsed.is_null()


# --- numbers -------------------------------------------------------------------------------------


def parse_number(text: pl.Expr) -> pl.Expr:
    """A decimal number written as text, else null ('NaN', 'inf', '1,5' are not numbers here)."""
    s = text.str.strip_chars()
    return pl.when(s.str.contains(f"^{_NUMBER}$")).then(s.cast(pl.Float64, strict=False))


def parse_range(text: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """(low, high) from a reference range text: '3.5-5.0', '3.5 - 5.0', '<5', '<=5', '>10', '>=10'.

    Anything else gives (null, null) and the caller keeps the text in reference_text.
    """
    s = text.str.strip_chars()
    between = f"^({_NUMBER})\\s*-\\s*({_NUMBER})$"
    below = f"^(?:<|<=|≤)\\s*({_NUMBER})$"
    above = f"^(?:>|>=|≥)\\s*({_NUMBER})$"
    low = pl.coalesce(
        s.str.extract(between, 1).cast(pl.Float64, strict=False),
        s.str.extract(above, 1).cast(pl.Float64, strict=False),
    )
    high = pl.coalesce(
        s.str.extract(between, 2).cast(pl.Float64, strict=False),
        s.str.extract(below, 1).cast(pl.Float64, strict=False),
    )
    return low, high


# --- reasons -------------------------------------------------------------------------------------


def reasons(*checks: tuple[pl.Expr, str]) -> pl.Expr:
    """All failed checks' messages joined by '; ', or null when every check passed.

    Each message must name a field and a problem ('subject: missing Patient reference'), never a
    value, because reasons are shown in metadata and logs.
    """
    parts = [pl.when(cond.fill_null(False)).then(pl.lit(msg)) for cond, msg in checks]
    joined = pl.concat_str(parts, separator=REASON_SEP, ignore_nulls=True)
    return pl.when(joined == "").then(None).otherwise(joined)


# --- decoding ------------------------------------------------------------------------------------

Repair = Callable[[str | None, bool], str]

# Page bodies decoded in this process, by purpose: "normalize" (a normalizer's full dtype), "count"
# (resourceType only), "references" (patient references only). Process-wide and never reset here:
# a caller that measures takes the difference of two readings.
DECODED_PAGES: Final[collections.Counter[str]] = collections.Counter()


def robust_decode(
    bodies: pl.Series,
    dtype: pl.DataType,
    repair: Repair,
    *,
    suspect: str | None = None,
    accept: Callable[[pl.Series], pl.Series] | None = None,
    purpose: str = "normalize",
) -> pl.Series:
    """Decode JSON bodies to ``dtype`` in one vectorized call; never raise on bad input.

    polars' ``json_decode`` fails the whole column on one invalid page or one value of the wrong
    JSON type for the target dtype (a string where a number is expected, an object where a string
    or list is expected), while numbers and booleans decode silently into String fields. So: try
    the whole batch; if it fails, decode each page alone and pass the failing ones to ``repair``,
    which rewrites the page into a shape that decodes (broken records replaced by markers carrying
    the reason and the record's raw text; an unreadable page by a page marker). If a repaired page
    still fails, ``repair`` is called again with ``generic=True`` and must mark every record.

    ``suspect`` is a regex over the raw body for what decoding would hide (a number where the
    source must send a string); matching pages take the repair path even when they decode.
    ``accept(decoded) -> Boolean Series`` says which decoded pages have the right overall shape;
    the others are repaired too, so the caller sees one kind of page-level error only.
    ``purpose`` is the ``DECODED_PAGES`` key the bodies are counted under.
    """
    DECODED_PAGES[purpose] += len(bodies)
    # json_decode reads the column as one stream of JSON values: a blank body yields no row and a
    # body holding two values yields two, silently shifting every row after it. Blank bodies are
    # therefore always repaired, and a decode whose length differs from the input is a failure.
    flagged = (bodies.str.strip_chars() == "").fill_null(True)
    if suspect:
        flagged = flagged | bodies.str.contains(suspect).fill_null(False)
    if not flagged.any():
        decoded = _decode_chunked(bodies, dtype)
        if decoded is not None:
            if accept is None:
                return decoded
            ok = accept(decoded).fill_null(False)
            if ok.all():
                return decoded
            flagged = ~ok
    fixed: list[str | None] = []
    for body, flag in zip(bodies, flagged.to_list(), strict=True):
        if not flag:
            single = _try_decode(pl.Series([body], dtype=pl.String), dtype)
            if single is not None and (accept is None or accept(single).fill_null(False).all()):
                fixed.append(body)
                continue
        repaired = repair(body, False)
        if _try_decode(pl.Series([repaired], dtype=pl.String), dtype) is None:
            repaired = repair(body, True)
        fixed.append(repaired)
    out = _try_decode(pl.Series(bodies.name, fixed, dtype=pl.String), dtype)
    if out is None:
        raise RuntimeError("repaired pages still fail to decode: a repair function is incomplete")
    return out


# json_decode builds a document tree for its whole input before converting it (about ten times the
# text's size), so pages are decoded a few megabytes at a time to keep peak memory flat.
DECODE_CHUNK_BYTES: Final = 8 * 1024 * 1024


def _decode_chunked(bodies: pl.Series, dtype: pl.DataType) -> pl.Series | None:
    sizes = bodies.str.len_bytes().fill_null(0).to_list()
    parts: list[pl.Series] = []
    start, acc = 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= DECODE_CHUNK_BYTES or i == len(sizes) - 1:
            chunk = bodies.slice(start, i + 1 - start)
            part = _arrow_decode(chunk, dtype)
            if part is None:
                part = _try_decode(chunk, dtype)
            if part is None:
                return None
            parts.append(part)
            start, acc = i + 1, 0
    if not parts:
        return _try_decode(bodies, dtype)
    return pl.concat(parts) if len(parts) > 1 else parts[0]


def _arrow_type(dtype: DType) -> pa.DataType | None:
    """The Arrow type Arrow's JSON reader should produce for ``dtype``; None if not supported here."""
    if isinstance(dtype, pl.Struct):
        fields = [(f.name, _arrow_type(f.dtype)) for f in dtype.fields]
        if any(t is None for _, t in fields):
            return None
        return pa.struct(fields)
    if isinstance(dtype, pl.List):
        inner = _arrow_type(dtype.inner)
        return None if inner is None else pa.list_(inner)
    for scalar, arrow in _ARROW_SCALARS:
        if dtype == scalar:
            return arrow
    return None


_ARROW_SCALARS: Final = (
    (pl.String, pa.string()),
    (pl.Float64, pa.float64()),
    (pl.Int64, pa.int64()),
    (pl.Boolean, pa.bool_()),
)
_JSON_SPACE: Final = " \t\r\n"


def _arrow_decode(bodies: pl.Series, dtype: pl.DataType) -> pl.Series | None:
    """``json_decode`` through Arrow's JSON reader, about half the CPU; None means "use polars".

    Arrow is stricter than polars on every input measured (a number or boolean where a string is
    expected, a scalar where a list is, duplicate keys, lone surrogates: Arrow refuses, polars
    coerces; the one exception, NaN and Infinity, is screened out) and gives the same values on
    what both accept, so falling back on a refusal keeps
    polars' results exactly. Arrow reads a stream of JSON values: the bodies are handed over as
    they lie in memory, back to back, one block, and the row count proves each body was exactly one
    object. Every body must start with ``{``: a stream that starts with ``null`` crashes the reader.
    """
    arrow_type = _arrow_type(dtype)
    if not isinstance(arrow_type, pa.StructType) or len(bodies) == 0:
        return None

    def braced(s: pl.Series) -> bool:
        return bool((s.str.starts_with("{") & s.str.ends_with("}")).fill_null(False).all())

    clean = bodies
    if not braced(clean):
        # JSON's own whitespace only: anything else around a value is invalid for polars too.
        clean = bodies.str.strip_chars(_JSON_SPACE)
        if not braced(clean):
            return None
    # Arrow's reader takes NaN and Infinity as numbers; they are not JSON, and polars refuses them.
    if clean.str.contains("NaN|Inf").any():
        return None
    array = clean.to_arrow().cast(pa.large_string())
    offsets = memoryview(array.buffers()[1]).cast("q")
    first, last = offsets[array.offset], offsets[array.offset + len(array)]
    text = array.buffers()[2].slice(first, last - first)
    try:
        table = pa_json.read_json(
            pa.BufferReader(text),
            read_options=pa_json.ReadOptions(block_size=len(text) + 1, use_threads=False),
            parse_options=pa_json.ParseOptions(
                explicit_schema=pa.schema(list(arrow_type)), unexpected_field_behavior="ignore"
            ),
        )
    except (pa.ArrowException, ValueError):
        return None
    if table.num_rows != len(bodies):
        return None
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    out = frame.to_struct(bodies.name)
    return out if out.dtype == dtype else None


def _try_decode(bodies: pl.Series, dtype: pl.DataType) -> pl.Series | None:
    try:
        out = bodies.str.json_decode(dtype)
    except pl.exceptions.PolarsError:
        return None
    return out if len(out) == len(bodies) else None


def string_keys(dtype: pl.DataType) -> list[str]:
    """Field names that are String wherever they occur in ``dtype`` (for a ``suspect`` regex)."""
    strings: set[str] = set()
    others: set[str] = set()

    def walk(dt: DType) -> None:
        if isinstance(dt, pl.Struct):
            for field in dt.fields:
                inner = field.dtype
                while isinstance(inner, pl.List):
                    inner = inner.inner
                (strings if inner == pl.String else others).add(field.name)
                walk(field.dtype)
        elif isinstance(dt, pl.List):
            walk(dt.inner)

    walk(dtype)
    return sorted(name for name in strings - others if not name.startswith("_"))


def non_string_regex(keys: Iterable[str]) -> str:
    """Matches ``"key": <number|true|false>`` for any of ``keys`` in compact or spaced JSON."""
    return '"(?:' + "|".join(keys) + r')"\s*:\s*[-0-9tf]'


def decode_expr(
    column: str,
    dtype: pl.DataType,
    repair: Repair,
    *,
    suspect: str | None = None,
    accept: Callable[[pl.Series], pl.Series] | None = None,
) -> pl.Expr:
    return pl.col(column).map_batches(
        lambda s: robust_decode(s, dtype, repair, suspect=suspect, accept=accept),
        return_dtype=dtype,
        is_elementwise=True,
    )


def load_json(body: str | None) -> tuple[Any, str | None]:
    """(value, None) or (None, reason) for one page body."""
    if body is None or not body.strip():
        return None, "page: empty body"
    try:
        # NaN and Infinity are not JSON; kept as their text, a number field holding one is a type
        # mismatch of that one record, not a reason to lose its whole page.
        return json.loads(body, parse_constant=str), None
    except (ValueError, RecursionError):
        return None, "page: invalid JSON"


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def type_mismatch(value: Any, dtype: DType, path: str = "", *, strict: bool = False) -> str | None:
    """The first field path whose JSON type polars cannot decode into ``dtype``, or None.

    Mirrors json_decode's rules as measured on polars 2.1: null fits anything; String accepts
    strings, numbers and booleans; numeric fields accept numbers and booleans; List needs an array;
    Struct needs an object (unknown keys are ignored). ``strict`` also rejects a number or boolean
    where a String is expected (FHIR never sends one there).
    """
    if value is None:
        return None
    if isinstance(dtype, pl.Struct):
        if not isinstance(value, dict):
            return path or "(record)"
        for field in dtype.fields:
            sub = f"{path}.{field.name}" if path else field.name
            found = type_mismatch(value.get(field.name), field.dtype, sub, strict=strict)
            if found:
                return found
        return None
    if isinstance(dtype, pl.List):
        if not isinstance(value, list):
            return path or "(record)"
        for item in value:
            found = type_mismatch(item, dtype.inner, f"{path}[]", strict=strict)
            if found:
                return found
        return None
    if dtype == pl.String:
        allowed: tuple[type, ...] = (str,) if strict else (str, int, float, bool)
        return None if isinstance(value, allowed) else path or "(record)"
    return path or "(record)" if isinstance(value, (str, dict, list)) else None


def wrong_type_reason(path: str) -> str:
    return f"{path}: wrong JSON type"


def raw_at(page: Any, steps: Sequence[str | int]) -> Any:
    node = page
    for step in steps:
        if isinstance(step, int):
            node = node[step] if isinstance(node, list) and 0 <= step < len(node) else None
        else:
            node = node.get(step) if isinstance(node, dict) else None
    return node


def fill_raw(
    frame: pl.LazyFrame,
    pages: pl.LazyFrame,
    locate: Callable[[dict[str, Any]], Sequence[str | int] | None],
    columns: Iterable[str],
) -> pl.LazyFrame:
    """Set ``raw`` on quarantined rows: the marker's raw text, or the record cut out of its page.

    Good rows keep ``raw`` null: the warehouse never needs them. Page bodies are not carried
    through the plan: exploding a column of views into page-sized buffers copies them per row
    (measured: 0.5 s became 23 s for 40k records), and holding every page's text to the end doubles
    peak memory. Instead, when a batch of rows holds quarantined ones, only their pages are read
    again from ``pages`` (by ``_page``, the page's position there) and the record is cut out.
    ``locate(row)`` returns the record's path inside its page, or None for a page-level problem
    (the whole body is then the raw).
    """
    cols = ["_page", "quarantine_reason", RECORD_RAW, *columns]

    def fill(batch: pl.Series) -> pl.Series:
        rows = batch.struct.unnest()
        out: list[str | None] = [None] * len(rows)
        bad = rows.with_row_index("_i").filter(pl.col("quarantine_reason").is_not_null())
        if bad.height == 0:
            return pl.Series("raw", out, dtype=pl.String)
        wanted = bad.filter(pl.col(RECORD_RAW).is_null())["_page"].unique().to_list()
        bodies: dict[int, str | None] = {}
        if wanted:
            found_pages = (
                pages.select(pl.col("body"))
                .with_row_index("_page")
                .filter(pl.col("_page").is_in(wanted))
                .collect(engine="in-memory")
            )
            bodies = dict(zip(found_pages["_page"].to_list(), found_pages["body"].to_list(), strict=True))
        parsed: dict[int, Any] = {}
        for row in bad.iter_rows(named=True):
            if row[RECORD_RAW] is not None:
                out[row["_i"]] = row[RECORD_RAW]
                continue
            body = bodies.get(row["_page"])
            steps = locate(row)
            if steps is None:
                out[row["_i"]] = body
                continue
            if row["_page"] not in parsed:
                parsed[row["_page"]] = load_json(body)[0]
            found = raw_at(parsed[row["_page"]], steps)
            if found is None and steps:
                found = raw_at(parsed[row["_page"]], steps[:-1])
            out[row["_i"]] = dumps(found) if found is not None else None
        return pl.Series("raw", out, dtype=pl.String)

    return frame.with_columns(pl.struct(cols).map_batches(fill, return_dtype=pl.String).alias("raw"))


def detach(frame: pl.LazyFrame, columns: Sequence[str]) -> pl.LazyFrame:
    """``frame.select(columns)`` with every string copied into memory of polars' own.

    Strings decoded by Arrow's JSON reader stay views into the reader's output, and any one of them
    keeps that whole output alive (polars frees an imported Arrow array only when nothing refers to
    any part of it). A frame that is held whole, as ``dedupe`` holds its input, would then keep
    every decoded page: measured, about half the page text again for a million results.
    """
    types = frame.collect_schema()
    return frame.select([_copied(pl.col(name), types[name]).alias(name) for name in columns])


def _copied(expr: pl.Expr, dtype: DType) -> pl.Expr:
    if dtype == pl.String:
        # concat_str writes new strings and a new validity mask; a cast or a slice would not.
        return pl.concat_str([expr, pl.lit("")])
    if isinstance(dtype, pl.List) and _has_strings(dtype.inner):
        return expr.list.eval(_copied(pl.element(), dtype.inner))
    if isinstance(dtype, pl.Struct) and _has_strings(dtype):
        fields = [_copied(expr.struct.field(f.name), f.dtype).alias(f.name) for f in dtype.fields]
        return pl.when(expr.is_not_null()).then(pl.struct(fields))
    return expr


def _has_strings(dtype: DType) -> bool:
    if isinstance(dtype, pl.Struct):
        return any(_has_strings(f.dtype) for f in dtype.fields)
    if isinstance(dtype, pl.List):
        return _has_strings(dtype.inner)
    return bool(dtype == pl.String)


# --- dedupe and output ---------------------------------------------------------------------------


def dedupe(frame: pl.LazyFrame, *, prefer: Sequence[str] = versions.VERSION_COLUMNS) -> pl.LazyFrame:
    """Keep one good row per natural key; quarantined rows pass through untouched.

    The kept row is the newest by ``schema.versions``'s rule over ``prefer`` (columns compared in
    order, greatest first, nulls lowest), then the last seen (``_seq``, the record's position in the
    batch: page order, then order in the page).
    ``duplicates`` on the kept row says how many copies were dropped, so the count invariant holds.
    Requires columns ``_seq`` (unique), ``quarantine_reason`` and the natural key. Row order is not
    kept.

    One aggregation joined back on ``_seq``, not two window expressions: the streaming engine turns
    each window into its own aggregation and join and buffers every row for each, which measured
    about 140 MB more for a million results. Both branches read one cached input, so the pages are
    still decoded once.
    """
    good = pl.col("quarantine_reason").is_null() & pl.col("source_id").is_not_null()
    # Quarantined rows each get a group of their own ("\x00" cannot start a surface name).
    group = (
        pl.when(good)
        .then(pl.concat_str([pl.col("source_surface"), pl.col("source_id")], separator="\x1f"))
        .otherwise(pl.concat_str([pl.lit("\x00"), pl.col("_seq").cast(pl.String)]))
    )
    newest = versions.polars_sort(versions.newest_first(prefer), arrival="_seq")
    keep = (
        frame.with_columns(group.alias("_group"))
        .group_by("_group")
        .agg(
            pl.col("_seq")
            .sort_by(newest.by, descending=newest.descending, nulls_last=newest.nulls_last)
            .first()
            .alias("_keep"),
            (pl.len() - 1).cast(pl.UInt32).alias("duplicates"),
        )
        .drop("_group")
    )
    return frame.join(keep, left_on="_seq", right_on="_keep", how="inner")


def finish(frame: pl.LazyFrame, table: str) -> pl.LazyFrame:
    """Select the normalized frame's columns, in order, with their exact dtypes."""
    return frame.select(
        [pl.col(name).cast(dtype).alias(name) for name, dtype in normalized_schema(table).items()]
    )


def table_of(frame: pl.LazyFrame) -> str:
    """Which clinical table a normalized frame belongs to (its leading columns say it)."""
    names = frame.collect_schema().names()
    for table, table_schema in schema.UNIFIED_TABLES.items():
        if names[: len(table_schema)] == list(table_schema.names()):
            return table
    raise ValueError("frame is not a normalized clinical frame (its leading columns match no table)")


def split(frame: pl.LazyFrame, table: str | None = None) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """(good rows conformed to the table, quarantined rows conformed to ``schema.QUARANTINE``).

    Both halves are lazy views of the same plan: collect the normalized frame once first (or use
    ``pl.collect_all``) so the pages are not decoded twice.
    """
    table = table or table_of(frame)
    is_bad = pl.col("quarantine_reason").is_not_null()
    good = schema.conform(frame.filter(~is_bad), table)
    bad = schema.conform(
        frame.filter(is_bad).select(
            pl.col("source_surface"),
            pl.lit(table).alias("entity"),
            pl.col("source_id"),
            pl.col("quarantine_reason").alias("reason"),
            pl.col("raw"),
            pl.col("raw_ref"),
        ),
        "quarantine",
    )
    return good, bad


def is_component() -> pl.Expr:
    """True on a component row (``results.parent_source_id`` set): a part of a record, not a record."""
    return pl.col("parent_source_id").is_not_null()


def components_in(rows: pl.DataFrame) -> int:
    """How many of ``rows`` are component rows; ``rows.height`` minus this is how many are records."""
    return int(rows.select(is_component().sum()).item()) if "parent_source_id" in rows.columns else 0


def tally(normalized: pl.DataFrame) -> dict[str, int]:
    """Counts for asset metadata: good, quarantined, duplicates, components; good + dup +
    quarantined = records (component rows are counted apart: they are parts of a good record)."""
    bad = normalized.get_column("quarantine_reason").is_not_null()
    components = components_in(normalized)
    return {
        "good": int((~bad).sum()) - components,
        "quarantined": int(bad.sum()),
        "duplicates": int(normalized.get_column("duplicates").sum() or 0),
        "components": components,
    }
