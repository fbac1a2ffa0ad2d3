"""The README's quick start and its "Then:" block, run as a new user would run them.

A fresh clone of this repository (committed HEAD) in a temp folder, a fresh-shell environment (no
REDOX_* or DAGSTER_* variables, no venv on PATH), and each command of the README's fenced blocks
run by bash exactly as written, in order, from the clone's folder. Two liberties, both visible
here: `make demo` gets DEMO_ARGS for a smaller population and fewer days (the README says the
variable exists), and `make test` is not run (it is this suite). `make ui` runs until it serves,
then the test asks its GraphQL API for the runs and stops it: every run the CLI started must be
among them, i.e. the CLI and the UI share one instance.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[2]
DEMO_ARGS = 'DEMO_ARGS="--days 3 --patients 300"'


def _blocks(readme: str) -> tuple[list[str], list[str]]:
    quick = readme.split("## Quick start", 1)[1]
    first = re.search(r"```sh\n(.*?)```", quick, re.S)
    then = re.search(r"Then:\s*```sh\n(.*?)```", quick, re.S)
    assert first and then, "the README lost its quick start blocks"

    def lines(block: str) -> list[str]:
        return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]

    return lines(first.group(1)), lines(then.group(1))


def _fresh_shell_env() -> dict[str, str]:
    """The machine's login environment (certificates, proxies, locale) without anything of ours:
    no REDOX_*/DAGSTER_* variable, no activated venv, no venv on PATH."""
    ours = ("REDOX_", "DAGSTER_", "VIRTUAL_ENV", "PYTEST_", "PYTHONPATH", "COV_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if ".venv" not in p
    )
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(command: str, clone: Path, env: dict[str, str], log: Path) -> str:
    began = time.monotonic()
    done = subprocess.run(
        ["/bin/bash", "-c", command],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = done.stdout + done.stderr
    with log.open("a") as sink:
        sink.write(f"$ {command}\n({time.monotonic() - began:.0f} s, exit {done.returncode})\n{out}\n")
    assert done.returncode == 0, f"`{command}` failed ({done.returncode}):\n{out[-4000:]}"
    assert "Traceback" not in out, out[-4000:]
    return out


def _ui_run_ids(port: int, timeout: float = 240) -> set[str]:
    query = json.dumps({"query": "{ runsOrError { ... on Runs { results { runId } } } }"}).encode()
    deadline = time.monotonic() + timeout
    while True:
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/graphql", data=query, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as reply:
                body = json.loads(reply.read())
            return {r["runId"] for r in body["data"]["runsOrError"]["results"]}
        except (OSError, KeyError, ValueError):
            assert time.monotonic() < deadline, "make ui did not serve its GraphQL API in time"
            time.sleep(2)


def test_readme_quick_start_then_block(tmp_path: Path) -> None:
    quick, then = _blocks((ROOT / "README.md").read_text())
    assert quick[0].startswith("make demo") and any(c.startswith("make test") for c in quick)
    assert not [c for c in quick + then if c.startswith("uv ")], "uv is not on a fresh shell's PATH"
    clone = tmp_path / "redox-etl"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = _fresh_shell_env()
    log = tmp_path / "readme.log"
    port = _free_port()
    ui_env = env | {"DAGSTER_CLI_DEV_PORT": str(port)}
    try:
        demo = _run(f"{quick[0].split('#')[0].strip()} {DEMO_ARGS}", clone, env, log)
        assert "Warehouse after sync" in demo and "left running" in demo, demo[-3000:]
        ui_ids: set[str] = set()
        for command in then:
            if command.startswith("make ui"):
                ui = subprocess.Popen(
                    ["/bin/bash", "-c", command],
                    cwd=clone,
                    env=ui_env,
                    stdout=log.open("a"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                try:
                    ui_ids = _ui_run_ids(port)
                finally:
                    os.killpg(ui.pid, signal.SIGTERM)
                    ui.wait(timeout=60)
                continue
            out = _run(command, clone, env, log)
            if command.startswith(".venv/bin/redox-etl sync"):
                assert "Warehouse after sync" in out
            if command.startswith(".venv/bin/redox-etl backfill"):
                assert "day(s) loaded" in out and "backfill completed" in out.lower(), out[-2000:]
        assert (clone / "pairs.parquet").exists()
        # The runs the CLI started (demo, sync, backfill) are in the instance `make ui` served.
        script = (
            "import dagster as dg, json; i = dg.DagsterInstance.get(); "
            "print(json.dumps([r.run_id for r in i.get_runs()]))"
        )
        cli_ids = set(
            json.loads(
                subprocess.run(
                    [str(clone / ".venv/bin/python"), "-c", script],
                    cwd=clone,
                    env=env | {"DAGSTER_HOME": str(clone / ".redox-etl" / "dagster")},
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
        )
        assert len(cli_ids) >= 3, (
            f"expected the demo's, the sync's and the backfill's runs, got {len(cli_ids)}"
        )
        assert cli_ids <= ui_ids, (
            f"{len(cli_ids - ui_ids)} run(s) the CLI started (in .redox-etl/dagster) are not in the "
            "instance make ui serves"
        )
    finally:
        subprocess.run(
            [str(clone / ".venv/bin/redox-etl"), "sandbox", "stop"],
            cwd=clone,
            env=env,
            check=False,
            timeout=60,
        )
