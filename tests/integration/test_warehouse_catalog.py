"""Catalog settings: SQLite by default, Postgres by DSN, and passwords never rendered.

These cover parsing up to the ATTACH string; test_warehouse_postgres_catalog.py attaches, writes
and reads a lake whose catalog is in a real Postgres server.
"""

from pathlib import Path

import pytest

from resources.warehouse import Warehouse, parse_catalog, redact
from resources.warehouse.catalog import conninfo_params
from resources.warehouse.extensions import storage_extensions


def test_default_is_a_sqlite_file_in_the_lake(tmp_path: Path) -> None:
    for value in (None, "", "sqlite", "  sqlite  "):
        spec = parse_catalog(value, tmp_path)
        assert spec.kind == "sqlite"
        assert spec.target == str(tmp_path / "catalog.sqlite")
        assert spec.attach_uri == f"ducklake:sqlite:{tmp_path}/catalog.sqlite"
        assert spec.extensions == ("sqlite_scanner",)


def test_sqlite_path_may_live_elsewhere(tmp_path: Path) -> None:
    spec = parse_catalog(f"sqlite:{tmp_path}/meta/lake.sqlite", tmp_path / "lake")
    assert spec.target == str(tmp_path / "meta" / "lake.sqlite")
    with pytest.raises(ValueError, match="file path"):
        parse_catalog("sqlite:", tmp_path)


def test_postgres_conninfo_is_passed_through_to_ducklake(tmp_path: Path) -> None:
    spec = parse_catalog("postgres:dbname=lake host=db.internal port=5433 user=etl", tmp_path)
    assert spec.kind == "postgres"
    assert spec.attach_uri == "ducklake:postgres:dbname=lake host=db.internal port=5433 user=etl"
    assert spec.extensions == ("postgres_scanner",)
    assert spec.exists() is None  # not knowable without connecting
    assert parse_catalog("postgresql:dbname=lake", tmp_path).target == "dbname=lake"


def test_postgres_uri_form_is_accepted(tmp_path: Path) -> None:
    spec = parse_catalog("postgresql://etl:s3cret@db.internal:5432/lake", tmp_path)
    assert spec.target == "postgresql://etl:s3cret@db.internal:5432/lake"
    assert "s3cret" not in spec.describe()
    assert spec.describe() == "postgres:postgresql://etl:***@db.internal:5432/lake"


def test_conninfo_parsing_handles_quotes_and_rejects_nonsense(tmp_path: Path) -> None:
    assert conninfo_params("dbname=lake application_name='redox etl'") == {
        "dbname": "lake",
        "application_name": "redox etl",
    }
    with pytest.raises(ValueError, match="dbname"):
        parse_catalog("postgres:host=db.internal user=etl", tmp_path)
    with pytest.raises(ValueError, match="key=value"):
        parse_catalog("postgres:dbname=lake oops", tmp_path)
    with pytest.raises(ValueError, match="conninfo"):
        parse_catalog("postgres:", tmp_path)
    with pytest.raises(ValueError, match="unsupported catalog"):
        parse_catalog("mysql:db=lake", tmp_path)


def test_passwords_are_redacted_everywhere_they_could_be_shown(tmp_path: Path) -> None:
    spec = parse_catalog("postgres:dbname=lake password=hunter2 host=h", tmp_path)
    assert spec.describe() == "postgres:dbname=lake password=*** host=h"
    assert redact("dbname=lake password='a b c' host=h") == "dbname=lake password=*** host=h"
    with pytest.raises(ValueError) as excinfo:
        parse_catalog("oracle:password=hunter2", tmp_path)
    assert "hunter2" not in str(excinfo.value)


def test_warehouse_takes_catalog_and_data_path_as_fields_not_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REDOX_ETL_LAKE", raising=False)
    wh = Warehouse(catalog="postgres:dbname=lake host=db password=pw", data_path="s3://bucket/lake/")
    assert wh.lake_path == tmp_path / "home" / "lake"
    assert wh.catalog_spec.kind == "postgres"
    assert wh.data_location == "s3://bucket/lake/"
    assert "pw" not in wh.describe().replace("password=***", "")
    explicit = Warehouse(lake_dir=str(tmp_path / "x"), catalog="sqlite", data_path=str(tmp_path / "d"))
    assert explicit.catalog_spec.target == str(tmp_path / "x" / "catalog.sqlite")
    assert explicit.data_location == str(tmp_path / "d")
    # Whoever builds the resource passes the settings; the resource itself reads no variable.
    monkeypatch.setenv("REDOX_LAKE_CATALOG", "postgres:dbname=lake host=db")
    monkeypatch.setenv("REDOX_LAKE_DATA_PATH", "s3://bucket/lake/")
    defaults = Warehouse(lake_dir=str(tmp_path / "y"))
    assert defaults.catalog_spec.target == str(tmp_path / "y" / "catalog.sqlite")
    assert defaults.data_location == str(tmp_path / "y" / "data")


def test_object_storage_data_paths_name_the_extension_they_need() -> None:
    assert storage_extensions("s3://bucket/lake/") == ("httpfs",)
    assert storage_extensions("gs://bucket/lake/") == ("httpfs",)
    assert storage_extensions("abfss://container@account.dfs.core.windows.net/lake") == ("azure",)
    assert storage_extensions("/srv/lake/data") == ()


def test_a_postgres_writer_without_a_data_path_is_refused_before_connecting(tmp_path: Path) -> None:
    wh = Warehouse(lake_dir=str(tmp_path / "lake"), catalog="postgres:dbname=lake host=127.0.0.1 port=1")
    with pytest.raises(ValueError, match="REDOX_LAKE_DATA_PATH"):
        wh.ensure_tables()
