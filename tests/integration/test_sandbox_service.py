"""`redox-etl sandbox serve --background` / `status` / `stop`: a sandbox that outlives its command.

The real CLI in subprocesses: the server keeps answering after `serve --background` returns, its
record (pid, port, days) is owner-only beside the credentials, a second serve is refused instead of
stranding the first, and `stop` ends it so `status` says so (exit 1).
"""

import json
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDOX_")}
    env["REDOX_ETL_HOME"] = str(home)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from sandbox.cli import app; app()",
            *args,
            "--state-dir",
            str(home / "sandbox"),
        ]
        if args[0] != "serve"
        else [sys.executable, "-c", "from sandbox.cli import app; app()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_background_sandbox_status_and_stop(tmp_path: Path) -> None:
    state = tmp_path / "sandbox"
    started = _cli("serve", "--background", "--patients", "15", "--state-dir", str(state), home=tmp_path)
    assert started.returncode == 0, started.stderr
    record = json.loads((state / "server.json").read_text())
    try:
        for name in ("server.json", "credentials.json", "server.log"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert "private" not in (state / "server.json").read_text().lower()
        # The command has returned; the server has not.
        with urllib.request.urlopen(f"{record['base_url']}/sandbox/health", timeout=5) as reply:
            assert reply.status == 200
        status = _cli("status", home=tmp_path)
        assert status.returncode == 0 and str(record["pid"]) in status.stdout, status.stdout
        assert record["first_day"] and record["first_day"] in status.stdout
        again = _cli("serve", "--background", "--state-dir", str(state), home=tmp_path)
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        assert json.loads((state / "server.json").read_text())["pid"] == record["pid"]
    finally:
        stopped = _cli("stop", home=tmp_path)
    assert stopped.returncode == 0 and "Stopped" in stopped.stdout, stopped.stdout
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{record['base_url']}/sandbox/health", timeout=2)
    assert not (state / "credentials.json").exists()
    after = _cli("status", home=tmp_path)
    assert after.returncode == 1 and "No sandbox running" in after.stdout
    assert _cli("stop", home=tmp_path).stdout.startswith("No sandbox was running")
