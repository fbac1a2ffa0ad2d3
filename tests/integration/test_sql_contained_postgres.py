"""The contained SQL session (``Warehouse.connect_contained``) on a shared Postgres catalog.

A reader on another machine has no data path setting of its own; the session must still read the
lake's files (at the path the catalog pinned) and nothing else.
"""

import datetime as dt
import uuid
from pathlib import Path

import duckdb
import pytest

from resources.warehouse import Warehouse
from tests.lake_frames import clinical
from tests.servers import postgres_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("warehouse-postgres"),
    pytest.mark.usefixtures("isolated_lake_env"),
]

STAMP = dt.datetime(2024, 3, 10, 7, 30, tzinfo=dt.UTC)


def test_a_contained_reader_reads_the_lake_and_nothing_else(tmp_path: Path) -> None:
    secret = tmp_path / "credentials.json"
    secret.write_text('{"secret": "s3cr3t"}')
    with postgres_server() as server:
        dbname = f"lake_{uuid.uuid4().hex[:8]}"
        server.create_database(dbname)
        catalog = f"postgres:{server.conninfo(dbname)}"
        writer = Warehouse(
            lake_dir=str(tmp_path / "writer"), catalog=catalog, data_path=str(tmp_path / "data")
        )
        writer.merge(
            "encounters",
            clinical("encounters", ["e1", "e2"], [STAMP, STAMP]),
            partition_day=STAMP.date(),
            run_id="run-1",
            source_surface="fhir",
        )
        reader = Warehouse(lake_dir=str(tmp_path / "reader"), catalog=catalog)
        con = reader.connect_contained()
        try:
            assert con.execute("SELECT count(*) FROM encounters").fetchone() == (2,)
            with pytest.raises(duckdb.PermissionException):
                con.execute(f"SELECT * FROM read_text('{secret}')")
            with pytest.raises(duckdb.Error, match="locked"):
                con.execute("SET enable_external_access = true")
        finally:
            con.close()
