"""DuckDB column types derived from the polars schemas in schema/__init__.py.

The schema module is the single contract; this module only translates it, so a column added there
appears in the lake (ensure_tables adds it) without a second list to keep in step.

Invariant: every polars dtype the schemas use maps to exactly one DuckDB type, and a dtype with no
faithful DuckDB counterpart raises instead of degrading silently (e.g. a naive Datetime is TIMESTAMP,
never TIMESTAMPTZ, so no transform can smuggle local times in as UTC).
"""

import polars as pl
from polars.datatypes import DataTypeClass

_SIMPLE: dict[type[pl.DataType], str] = {
    pl.String: "VARCHAR",
    pl.Boolean: "BOOLEAN",
    pl.Int8: "TINYINT",
    pl.Int16: "SMALLINT",
    pl.Int32: "INTEGER",
    pl.Int64: "BIGINT",
    pl.UInt8: "UTINYINT",
    pl.UInt16: "USMALLINT",
    pl.UInt32: "UINTEGER",
    pl.UInt64: "UBIGINT",
    pl.Float32: "FLOAT",
    pl.Float64: "DOUBLE",
    pl.Date: "DATE",
    pl.Time: "TIME",
    pl.Binary: "BLOB",
}


def duckdb_type(dtype: pl.DataType | DataTypeClass) -> str:
    """The DuckDB type name for a polars dtype (recursing into List and Struct)."""
    if isinstance(dtype, type):
        dtype = dtype()  # a bare class such as pl.String inside a nested dtype
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return "TIMESTAMP"
        if dtype.time_zone != "UTC":
            raise TypeError(f"timestamps must be UTC in the lake, got time zone {dtype.time_zone!r}")
        return "TIMESTAMPTZ"
    if isinstance(dtype, pl.Duration):
        return "INTERVAL"
    if isinstance(dtype, pl.Decimal):
        return f"DECIMAL({dtype.precision or 38}, {dtype.scale})"
    if isinstance(dtype, pl.List):
        return f"{duckdb_type(dtype.inner)}[]"
    if isinstance(dtype, pl.Struct):
        fields = ", ".join(f"{quote_ident(f.name)} {duckdb_type(f.dtype)}" for f in dtype.fields)
        return f"STRUCT({fields})"
    for polars_type, name in _SIMPLE.items():
        if isinstance(dtype, polars_type):
            return name
    raise TypeError(f"no DuckDB type for polars dtype {dtype}")


def columns_sql(schema: dict[str, pl.DataType]) -> str:
    return ", ".join(f"{quote_ident(name)} {duckdb_type(dtype)}" for name, dtype in schema.items())


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def normalize_type(type_name: str) -> str:
    """A DuckDB type name in a form comparable with what ``duckdb_columns()`` reports."""
    aliases = {"TIMESTAMPTZ": "TIMESTAMP WITH TIME ZONE"}
    text = type_name.upper().replace('"', "")
    for short, long in aliases.items():
        text = text.replace(long, short)
    return " ".join(text.split())
