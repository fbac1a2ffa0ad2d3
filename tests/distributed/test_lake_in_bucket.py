"""The shared lake's parts, each against a real server: Parquet in an S3 bucket (moto's standalone
server), the DuckLake catalog in Postgres (pgserver), and the writer lock that spans machines.

"Another machine" is a process with its own lake folder (so its own ``flock``) and only the catalog's
conninfo and the bucket's REDOX_S3_* variables: what an analyst or a second worker host has.
"""

import datetime as dt
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from resources.warehouse import Warehouse, WriterBusyError, load_extensions
from resources.warehouse.extensions import wheel_binary
from resources.warehouse.objectstore import ObjectStore, install_secret
from tests.lake_frames import clinical, offline_duckdb
from tests.servers import S3, Postgres, postgres_server, s3_server

pytestmark = [
    pytest.mark.slow,  # a Postgres and an S3 server, and processes spawned as other machines
    pytest.mark.integration,
    pytest.mark.xdist_group("lake-in-bucket"),
    pytest.mark.usefixtures("isolated_lake_env"),
]
ROOT = Path(__file__).resolve().parents[2]
STAMP = dt.datetime(2024, 3, 10, 7, 30, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def catalog(postgres: Postgres) -> str:
    dbname = f"lake_{uuid.uuid4().hex[:8]}"
    postgres.create_database(dbname)
    return f"postgres:{postgres.conninfo(dbname)}"


@pytest.fixture
def bucket_env(s3: S3, monkeypatch: pytest.MonkeyPatch) -> S3:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


def test_httpfs_loads_from_the_pinned_wheel_with_no_network(tmp_path: Path, s3: S3) -> None:
    assert wheel_binary("httpfs") is not None
    empty = tmp_path / "extensions"
    con = offline_duckdb(empty)
    load_extensions(con, ["httpfs"])
    assert list(empty.iterdir()) == []  # nothing was installed or downloaded
    store = ObjectStore(
        region=s3.region, url_style="path", use_ssl=False, endpoint=f"http://{s3.endpoint}/",
        key_id=s3.access_key_id, secret=SecretStr(s3.secret_access_key),
    )  # fmt: skip
    install_secret(con, store)
    con.execute(f"COPY (SELECT 42 AS answer) TO 's3://{s3.bucket}/probe/answer.parquet'")
    assert con.execute(f"SELECT answer FROM 's3://{s3.bucket}/probe/answer.parquet'").fetchone() == (42,)


def test_a_bad_s3_setting_is_named_without_the_secret(tmp_path: Path) -> None:
    con = offline_duckdb(tmp_path / "none")  # no httpfs: DuckDB refuses an S3 secret
    store = ObjectStore(region="r", url_style="path", use_ssl=False, secret=SecretStr("pw-s3-123"))
    with pytest.raises(ValueError, match="REDOX_S3_URL_STYLE") as caught:
        install_secret(con, store)
    assert "pw-s3-123" not in str(caught.value) and caught.value.__cause__ is None
    assert "pw-s3-123" not in repr(store)


def test_merges_land_in_the_bucket_and_a_reader_elsewhere_sees_them(
    catalog: str, bucket_env: S3, tmp_path: Path
) -> None:
    prefix = f"lake-{uuid.uuid4().hex[:6]}/"
    writer = Warehouse(
        lake_dir=str(tmp_path / "writer"), catalog=catalog, data_path=f"s3://{bucket_env.bucket}/{prefix}"
    )
    stats = writer.merge(
        "encounters",
        clinical("encounters", ["e1", "e2"], [STAMP, STAMP]),
        partition_day=STAMP.date(),
        run_id="r1",
        source_surface="fhir",
    )
    assert stats.inserted == 2
    files = bucket_env.keys(prefix)
    assert files and all(key.endswith(".parquet") for key in files)
    assert not list((tmp_path / "writer").rglob("*.parquet")), "data files went to the local folder"

    # Another machine: only the catalog conninfo and the bucket's variables, no data path, read-only.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDOX_", "AWS_"))}
    env |= bucket_env.env() | {"REDOX_ETL_HOME": str(tmp_path / "analyst"), "REDOX_LAKE_CATALOG": catalog}
    script = textwrap.dedent(
        """
        from resources import configured_warehouse
        wh = configured_warehouse()
        print(wh.query("SELECT count(*) AS n FROM encounters")["n"][0])
        con = wh.connect()
        try:
            con.execute("DELETE FROM encounters")
        except Exception as exc:
            print("refused", type(exc).__name__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "refused", "InvalidInputException"]


def _hold(lake_dir: str, catalog: str, data_path: str, held: "mp.synchronize.Event") -> None:
    with Warehouse(lake_dir=lake_dir, catalog=catalog, data_path=data_path).writer():
        held.set()
        time.sleep(600)


def test_the_writer_lock_spans_machines_and_dies_with_its_holder(
    catalog: str, bucket_env: S3, tmp_path: Path
) -> None:
    data = f"s3://{bucket_env.bucket}/lock-{uuid.uuid4().hex[:6]}/"
    held = mp.get_context("spawn").Event()
    # Machine A: its own lake folder, so its own flock; only the catalog is shared.
    holder = mp.get_context("spawn").Process(target=_hold, args=(str(tmp_path / "a"), catalog, data, held))
    holder.start()
    try:
        assert held.wait(120), "machine A never got the writer lock"
        machine_b = Warehouse(
            lake_dir=str(tmp_path / "b"), catalog=catalog, data_path=data, writer_lock_timeout_s=1.0
        )
        started = time.monotonic()
        with pytest.raises(WriterBusyError, match="redox-etl lake writer") as busy, machine_b.writer():
            pass
        assert time.monotonic() - started >= 1.0
        assert "password" not in str(busy.value).lower()
        # The holder dies as a crashed machine's process would: Postgres ends its session, and
        # with it the lock, with nobody cleaning up.
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
        patient = machine_b.model_copy(update={"writer_lock_timeout_s": 30.0})
        with patient.writer() as con:
            assert con.execute("SELECT 1").fetchone() == (1,)
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()


def test_an_unreachable_catalog_is_named_without_its_password(tmp_path: Path) -> None:
    port = _closed_port()
    wh = Warehouse(
        lake_dir=str(tmp_path / "w"),
        catalog=f"postgres:dbname=lake host=127.0.0.1 port={port} user=etl password=pg-pw-456",
        data_path=str(tmp_path / "data"),
        writer_lock_timeout_s=2.0,
    )
    with pytest.raises(ConnectionError, match="Postgres said") as caught, wh.writer():
        pass
    assert "pg-pw-456" not in str(caught.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
