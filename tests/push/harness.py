"""Helpers for the push-lane tests: the receiver on a loopback port, in a thread or a child process."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from pipelines.webhook import Receiver, Tokens, create_app

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tok-current-5d1b4b0e9a57"
OLD_TOKEN = "tok-previous-7c1f1a2b9d10"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def receiver_in_thread(
    inbox: Path, *, tokens: list[str] | None = None, max_body: int = 10_000_000
) -> Iterator[str]:
    """The real app under uvicorn in a daemon thread; yields its base URL."""
    receiver = Receiver(inbox_path=inbox, tokens=Tokens(tokens or [TOKEN], None), max_body=max_body)
    port = free_port()
    config = uvicorn.Config(
        create_app(receiver),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("receiver did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if receiver._inbox is not None:
            receiver._inbox.close()


def child_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDOX_", "DAGSTER_"))}
    env.update(
        {
            "REDOX_ETL_HOME": str(home),
            "REDOX_WEBHOOK_TOKENS": f"{TOKEN},{OLD_TOKEN}",
            "PYTHONPATH": str(ROOT),
            **extra,
        }
    )
    return env


def start_receiver_process(
    port: int, env: dict[str, str], *, script: str | None = None
) -> subprocess.Popen[bytes]:
    """`redox-etl webhook serve` in a child process (or ``script``, a wrapper around it)."""
    command = [sys.executable, "-c", script or "from pipelines.webhook_cli import app; app()"]
    command += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            return process  # died at start-up (a crash point may be that early): the caller restarts
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1.0)
            return process
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("receiver process did not start") from None
            time.sleep(0.05)
