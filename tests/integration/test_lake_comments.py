"""Every lake table and column carries its data-dictionary comment, in a real DuckLake lake.

``describe``, ``duckdb_columns()`` and ``redox-etl sql``'s ``.tables``/``.schema`` then explain the
lake without the docs at hand (issue 13, item 6). Comments are written with the tables, restored on
a lake made before they existed, kept when identity replaces its tables and views, and cost no
snapshot once in place.
"""

from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from assets.identity import VIEWS
from pipelines.sql import app
from resources.warehouse import Warehouse, lake_schemas
from schema.descriptions import COLUMN_DESCRIPTIONS, TABLE_DESCRIPTIONS
from transforms.identity.tables import PERSON_CROSSWALK, PERSONS


def _comments(warehouse: Warehouse) -> tuple[dict[str, str | None], dict[tuple[str, str], str | None]]:
    tables = warehouse.query(
        "SELECT table_name AS name, comment FROM duckdb_tables() WHERE database_name = 'lake' "
        "UNION ALL SELECT view_name, comment FROM duckdb_views() WHERE database_name = 'lake' AND NOT internal"
    )
    columns = warehouse.query(
        "SELECT table_name, column_name, comment FROM duckdb_columns() WHERE database_name = 'lake'"
    )
    return (
        dict(zip(tables["name"], tables["comment"], strict=True)),
        {(t, c): m for t, c, m in columns.iter_rows()},
    )


def _snapshots(warehouse: Warehouse) -> int:
    return int(warehouse.query("SELECT count(*) FROM ducklake_snapshots('lake')").item())


def test_new_tables_carry_the_dictionary(tmp_path: Path) -> None:
    warehouse = Warehouse(lake_dir=str(tmp_path / "lake"))
    warehouse.ensure_tables()
    tables, columns = _comments(warehouse)
    for table, schema in lake_schemas().items():
        assert tables[table] == TABLE_DESCRIPTIONS[table], table
        for column in schema:
            assert columns[(table, column)] == COLUMN_DESCRIPTIONS[table][column], (table, column)
    before = _snapshots(warehouse)
    warehouse.ensure_tables()
    assert _snapshots(warehouse) == before, "comments already in place must cost no snapshot"


def test_a_lake_without_comments_gets_them(tmp_path: Path) -> None:
    warehouse = Warehouse(lake_dir=str(tmp_path / "lake"))
    warehouse.ensure_tables()
    with warehouse.writer() as con:
        con.execute("COMMENT ON TABLE lake.main.patients IS NULL")
        con.execute("COMMENT ON COLUMN lake.main.results.value_num IS 'stale'")
    tables, columns = _comments(warehouse)
    assert tables["patients"] is None and columns[("results", "value_num")] == "stale"
    warehouse.ensure_tables()
    tables, columns = _comments(warehouse)
    assert tables["patients"] == TABLE_DESCRIPTIONS["patients"]
    assert columns[("results", "value_num")] == COLUMN_DESCRIPTIONS["results"]["value_num"]


def test_identity_tables_and_views_keep_their_comments_when_replaced(tmp_path: Path) -> None:
    warehouse = Warehouse(lake_dir=str(tmp_path / "lake"))
    warehouse.ensure_tables()
    for run in ("run-1", "run-2"):
        warehouse.write_derived(
            run_id=run,
            message="identity",
            replace={
                "person_crosswalk": pl.DataFrame(schema=PERSON_CROSSWALK),
                "persons": pl.DataFrame(schema=PERSONS),
            },
            views=VIEWS,
        )
        tables, columns = _comments(warehouse)
        for name in ("person_crosswalk", "persons", *VIEWS):
            assert tables[name] == TABLE_DESCRIPTIONS[name], (run, name)
        for column in PERSONS:
            assert columns[("persons", column)] == COLUMN_DESCRIPTIONS["persons"][column], (run, column)


def test_the_sql_shell_shows_them(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    Warehouse(lake_dir=str(lake)).ensure_tables()
    result = CliRunner().invoke(app, ["--lake", str(lake)], input=".tables\n.schema results\n")
    assert result.exit_code == 0
    out = " ".join(result.stdout.split())
    assert "patients" in out and "One row per patient record" in out
    assert "value_num" in out and "numeric value" in out
