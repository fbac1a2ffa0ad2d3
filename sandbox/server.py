"""Run the sandbox: in the foreground (the CLI), in a background thread, or in a child process.

``serve_in_thread`` suits tests that want the world object at hand; ``serve_in_subprocess`` suits
clients that must not share the GIL with the server (benchmarks, multi-process pipelines). Both yield
a ``Running`` with the base URL and the credentials a client needs. ``start_background`` leaves a
detached server running after the command that started it (``sandbox serve --background``), found
again by ``status`` and ended by ``stop``.

Invariants:
- credentials.json is created with mode 0600 by ``os.open`` (never chmod-ed afterwards), written to a
  temporary name and renamed, so a reader sees either no file or a complete one, and only after the
  server accepts connections;
- the key pair lives only in memory and in that file; nothing logs it;
- helpers default to a fresh temporary state directory, so parallel tests never share credentials;
- a listening server records itself in <state-dir>/server.json (pid, base URL, the clinical days it
  holds; 0600, no secret), written after credentials.json; ``status`` trusts it only while that pid
  is alive and the server answers its health check, so a crashed server reads as not running.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

import uvicorn

from sandbox.app import Sandbox, SandboxOptions, WorldLike, create_app

CREDENTIALS = "credentials.json"
SERVER = "server.json"
LOG = "server.log"


@dataclasses.dataclass
class Running:
    base_url: str
    credentials: dict[str, Any]
    credentials_path: Path
    state_dir: Path
    world: Any = None
    sandbox: Sandbox | None = None
    process: subprocess.Popen[bytes] | None = None


def build_world(options: SandboxOptions, *, index: bool = True) -> WorldLike:
    # Lazy: the generator loads polars, which merely importing the server (to start a child) skips.
    from sandbox.population.world import PopulationConfig, build

    return build(
        PopulationConfig(
            seed=options.seed,
            patients=options.patients,
            start=options.start,
            end=options.end,
            fhir_tz=options.fhir_tz,
            profile=options.profile,
        ),
        index=index,
    )


def write_credentials(state_dir: Path, credentials: dict[str, Any]) -> Path:
    return _write_private(state_dir, CREDENTIALS, credentials)


def _write_private(state_dir: Path, name: str, content: dict[str, Any]) -> Path:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / name
    staging = state_dir / f".{name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        staging.unlink()
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(content, handle, indent=2)
    staging.replace(path)
    return path


def _server_record(sandbox: Sandbox, world: WorldLike) -> dict[str, Any]:
    config = getattr(world, "config", None)
    first, last = getattr(config, "start", None), getattr(config, "end", None)
    return {
        "pid": os.getpid(),
        "base_url": sandbox.base_url,
        "port": int(sandbox.base_url.rsplit(":", 1)[1]),
        "seed": sandbox.options.seed,
        # A profile sets the population size: the world's resolved config knows it.
        "patients": getattr(config, "patients", sandbox.options.patients),
        "profile": sandbox.options.profile,
        "first_day": first.isoformat() if isinstance(first, date) else None,
        "last_day": last.isoformat() if isinstance(last, date) else None,
        "started_at": time.time(),
    }


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """Bind before uvicorn starts so port 0 resolves to a known port for the credentials file."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def base_url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()


def _uvicorn_config(sandbox: Sandbox) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(sandbox),
        log_level="warning",
        # The access log would print query strings, which may hold PHI in GET searches.
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
        server_header=False,
    )


def _options(options: dict[str, Any]) -> SandboxOptions:
    known = {f.name for f in dataclasses.fields(SandboxOptions)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown sandbox options: {', '.join(sorted(unknown))}")
    return SandboxOptions(**options)


def serve_forever(
    options: SandboxOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    state_dir: Path,
    announce: Callable[[str], None] = print,
) -> None:
    """The CLI's server: build the world, bind, write credentials once listening, run until signalled.

    The store's query indexes (about a fifth of a large world's start) are built in a thread once
    the server listens, while clients fetch tokens; a search that comes first waits for them on the
    store's lock, and reads by id never need them.
    """
    world = build_world(options, index=False)
    sock = bind(host, port)
    sandbox = Sandbox(world, options, base_url=base_url_for(sock))

    def started() -> None:
        write_credentials(state_dir, sandbox.credentials())
        _write_private(state_dir, SERVER, _server_record(sandbox, world))
        announce(f"Redox sandbox listening on {sandbox.base_url}")
        threading.Thread(target=world.store.refresh, name="redox-sandbox-index", daemon=True).start()
        sandbox.start_pusher()

    try:
        _Server(_uvicorn_config(sandbox), started).run(sockets=[sock])
    finally:
        sandbox.stop_workers()
        _forget(state_dir)


def _forget(state_dir: Path) -> None:
    # Only our own record: a newer server may already have replaced it.
    path = state_dir / SERVER
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


@contextlib.contextmanager
def _state_dir(state_dir: Path | str | None) -> Iterator[Path]:
    if state_dir is not None:
        path = Path(state_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="redox-sandbox-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serve_in_thread(
    *, state_dir: Path | str | None = None, world: WorldLike | None = None, **options: Any
) -> Iterator[Running]:
    """A sandbox on 127.0.0.1:<free port> in a daemon thread; ``world`` may be passed in ready-made."""
    opts = _options(options)
    with _state_dir(state_dir) as directory:
        world = world if world is not None else build_world(opts)
        sock = bind()
        sandbox = Sandbox(world, opts, base_url=base_url_for(sock))
        ready = threading.Event()
        server = _Server(_uvicorn_config(sandbox), ready.set)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="redox-sandbox", daemon=True
        )
        thread.start()
        try:
            while not ready.wait(0.05):
                if not thread.is_alive():
                    raise RuntimeError("sandbox server thread exited during startup")
            path = write_credentials(directory, sandbox.credentials())
            sandbox.start_pusher()
            yield Running(
                base_url=sandbox.base_url,
                credentials=sandbox.credentials(),
                credentials_path=path,
                state_dir=directory,
                world=world,
                sandbox=sandbox,
            )
        finally:
            sandbox.stop_workers()
            server.should_exit = True
            thread.join(timeout=15)
            sock.close()


def cli_args(
    options: SandboxOptions, *, state_dir: Path, host: str = "127.0.0.1", port: int = 0
) -> list[str]:
    """`redox-etl sandbox serve` arguments equivalent to ``options``."""
    args = ["serve", "--host", host, "--port", str(port), "--state-dir", str(state_dir)]
    args += ["--seed", str(options.seed), "--patients", str(options.patients)]
    for flag, day in (("--start", options.start), ("--end", options.end)):
        if isinstance(day, date):
            args += [flag, day.isoformat()]
    if options.rate_limit is None:
        args += ["--rate-limit", "off"]
    else:
        limit, window = options.rate_limit
        args += ["--rate-limit", f"{limit}/{window:g}"]
    if options.faults:
        args += ["--faults", options.faults]
    if options.profile:
        args += ["--profile", options.profile]
    args += ["--latency", options.latency, "--max-response-records", str(options.max_response_records)]
    args += ["--round-trip-limit", f"{options.round_trip_limit:g}"]
    args += ["--token-ttl", str(options.token_ttl)]
    if options.retry_after:
        args.append("--retry-after")
    args += ["--org", options.org, "--environment", options.environment, "--fhir-tz", options.fhir_tz]
    if options.push_to:
        args += ["--push-to", options.push_to, "--verification-token", options.push_token or ""]
        args += ["--push-verification", options.push_verification]
        args += ["--push-retry", f"{options.push_retry[0]:g}:{options.push_retry[1]:g}"]
        args += ["--push-redeliver", f"{options.push_redeliver:g}"]
    return args


@contextlib.contextmanager
def serve_in_subprocess(
    *, state_dir: Path | str | None = None, startup_timeout: float = 120.0, **options: Any
) -> Iterator[Running]:
    """A sandbox in a child Python process (its own GIL); waits for its credentials.json."""
    opts = _options(options)
    with _state_dir(state_dir) as directory:
        path = directory / CREDENTIALS
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        command = [
            sys.executable,
            "-c",
            "from sandbox.cli import app; app()",
            *cli_args(opts, state_dir=directory),
        ]
        root = Path(__file__).resolve().parent.parent
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        }
        # The command is this interpreter running our own CLI with arguments built above.
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, cwd=root)  # noqa: S603
        try:
            deadline = time.monotonic() + startup_timeout
            while not path.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"sandbox process exited with {process.returncode} during startup")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sandbox did not write {path} within {startup_timeout:g}s")
                time.sleep(0.05)
            credentials = json.loads(path.read_text())
            yield Running(
                base_url=credentials["base_url"],
                credentials=credentials,
                credentials_path=path,
                state_dir=directory,
                process=process,
            )
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# ---- a server that outlives its command ----------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(base_url: str, timeout: float = 2.0) -> bool:
    # urllib, not httpx: this module is imported to start servers and stays light.
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base_url}/sandbox/health", timeout=timeout) as reply:  # noqa: S310
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def status(state_dir: Path) -> dict[str, Any] | None:
    """The running server recorded in ``state_dir`` (its server.json), or None if none answers."""
    path = Path(state_dir) / SERVER
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, OSError):
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or not _alive(pid) or not _answers(str(record.get("base_url"))):
        return None
    return record


def start_background(
    options: SandboxOptions,
    *,
    state_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    startup_timeout: float = 120.0,
) -> dict[str, Any]:
    """Start a detached server (its own session, so it outlives this process and its terminal) and
    return its record once it listens; its output goes to <state-dir>/server.log (0600)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in (SERVER, CREDENTIALS):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / stale).unlink()
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        "-c",
        "from sandbox.cli import app; app()",
        *cli_args(options, state_dir=state_dir, host=host, port=port),
    ]
    log_fd = os.open(state_dir / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # This interpreter running our own CLI with arguments built above.
        process = subprocess.Popen(  # noqa: S603
            command,
            env=env,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
        )
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + startup_timeout
    while True:
        record = status(state_dir)
        if record is not None and record.get("pid") == process.pid:
            return record
        if process.poll() is not None:
            raise RuntimeError(
                f"the sandbox exited with code {process.returncode} while starting; see {state_dir / LOG}"
            )
        if time.monotonic() > deadline:
            process.terminate()
            raise TimeoutError(
                f"the sandbox did not answer within {startup_timeout:g} s; see {state_dir / LOG}"
            )
        time.sleep(0.1)


def stop(state_dir: Path, *, timeout: float = 15.0) -> dict[str, Any] | None:
    """Stop the server recorded in ``state_dir``; returns its record, or None if none was running."""
    record = status(state_dir)
    if record is None:
        return None
    pid = int(record["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    for name in (SERVER, CREDENTIALS):
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / name).unlink()
    return record
