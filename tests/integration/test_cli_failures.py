"""Bad targets for `redox-etl sync`/`backfill`/`doctor`, as a user meets them: the real command in
a subprocess, against a real sandbox on loopback (or a dead port where it used to be). Bad dates,
which fail before any network, are in tests/unit/test_cli_dates.py.

For each case the command must exit non-zero within seconds (never the client's minutes of
retries), print no traceback, name the fix ("What to do"), and print no secret (private key, token,
legacy secret) and no patient value. The commands' fixed start-up (importing Dagster, which the
`resources` package loads) is measured in the same run with `redox-etl --help` and allowed on top
of the 10 s, so a loaded CI box does not make the bound a coin toss.
"""

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sandbox.server import serve_in_thread

# Each case is a fresh command (Dagster import and all): about a minute for the module on a busy box.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]
ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 10.0


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDOX_") and k != "DAGSTER_HOME"}
    env.update(REDOX_ETL_HOME=str(home), COLUMNS="200", **extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> tuple[int, str, float]:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - began


@pytest.fixture(scope="module")
def startup_s(tmp_path_factory: pytest.TempPathFactory) -> float:
    """What any `redox-etl` command spends before it does anything, measured here and now."""
    home = tmp_path_factory.mktemp("startup")
    code, out, seconds = _run(["--help"], _env(home))
    assert code == 0, out
    return seconds


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with serve_in_thread(state_dir=tmp_path_factory.mktemp("sandbox"), patients=30, seed=3) as running:
        yield running


def _secrets(credentials: dict[str, Any]) -> list[str]:
    out = [credentials["legacy_secret"], credentials["legacy_api_key"]]
    for key in ("private_key_pem", "second_private_key_pem"):
        out += [line for line in credentials[key].splitlines() if len(line) > 40][:3]
    return out


def _patient_values(sandbox: Any) -> list[str]:
    patients = sandbox.world.truth()["patients"]
    values: list[str] = []
    for column in ("family_name", "given_name", "ssn", "source_id"):
        values += [str(v) for v in patients[column].drop_nulls().to_list() if len(str(v)) > 4]
    return values


def _assert_short_clear(code: int, out: str, seconds: float, startup: float, forbidden: list[str]) -> None:
    assert code != 0, out
    assert "Traceback" not in out and 'File "' not in out, out
    assert "What to do" in out, out
    assert len(out.splitlines()) <= 12, out
    assert seconds < startup + BOUND_S, f"took {seconds:.1f} s (start-up {startup:.1f} s): {out}"
    for value in forbidden:
        assert value not in out, "a secret or patient value was printed"


def _key_file(path: Path, pem: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pem)
    return path


def _explicit_target(sandbox: Any, tmp_path: Path, *, client_id: str, pem: str) -> dict[str, str]:
    creds = sandbox.credentials
    return _env(
        tmp_path / "home",
        REDOX_BASE_URL=sandbox.base_url,
        REDOX_CLIENT_ID=client_id,
        REDOX_KID=creds["kid"],
        REDOX_PRIVATE_KEY_FILE=str(_key_file(tmp_path / "key.pem", pem)),
        REDOX_FHIR_ORG=creds["fhir_org"],
        REDOX_ENVIRONMENT=creds["environment"],
    )


def test_range_outside_the_sandbox_days_is_refused(tmp_path: Path, startup_s: float) -> None:
    home = tmp_path / "home"
    env = _env(home)
    first = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=5)
    serve = [sys.executable, "-m", "pipelines.cli", "sandbox", "serve", "--background", "--patients", "20"]
    subprocess.run([*serve, "--start", str(first)], cwd=ROOT, env=env, check=True, timeout=120)
    try:
        early = first - dt.timedelta(days=20)
        code, out, seconds = _run(["backfill", "--start", str(early), "--end", str(early)], env)
        _assert_short_clear(code, out, seconds, startup_s, [])
        assert "outside the days the sandbox holds" in out
    finally:
        subprocess.run([*serve[:4], "stop"], cwd=ROOT, env=env, check=True, timeout=60)


def test_sandbox_down(tmp_path: Path, startup_s: float) -> None:
    # A sandbox that ran and is gone: its credentials file names a port nothing listens on.
    with serve_in_thread(state_dir=tmp_path / "gone", patients=5) as running:
        credentials = json.loads(running.credentials_path.read_text())
    env = _env(tmp_path / "home", REDOX_SANDBOX_CREDENTIALS=str(running.credentials_path))
    for args in (["sync", "--days", "1"], ["doctor"]):
        code, out, seconds = _run(args, env)
        _assert_short_clear(code, out, seconds, startup_s, _secrets(credentials))
        assert "token" in out and "sandbox serve --background" in out, out


def test_wrong_private_key(sandbox: Any, tmp_path: Path, startup_s: float) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    env = _explicit_target(sandbox, tmp_path, client_id=sandbox.credentials["client_id"], pem=pem)
    code, out, seconds = _run(["sync", "--days", "1"], env)
    forbidden = _secrets(sandbox.credentials) + [line for line in pem.splitlines() if len(line) > 40][:3]
    _assert_short_clear(code, out, seconds, startup_s, forbidden + _patient_values(sandbox))
    assert "Redox said: invalid_client" in out and "REDOX_PRIVATE_KEY_FILE" in out, out
    assert "Warehouse after sync" not in out


def test_wrong_client_id(sandbox: Any, tmp_path: Path, startup_s: float) -> None:
    pem = sandbox.credentials["private_key_pem"]
    env = _explicit_target(sandbox, tmp_path, client_id="00000000-0000-0000-0000-000000000000", pem=pem)
    today = str(dt.datetime.now(dt.UTC).date())
    code, out, seconds = _run(["backfill", "--start", today, "--end", today], env)
    _assert_short_clear(
        code, out, seconds, startup_s, _secrets(sandbox.credentials) + _patient_values(sandbox)
    )
    assert "Public key not found" in out and "REDOX_CLIENT_ID" in out, out


def test_doctor_passes_on_a_good_target(sandbox: Any, tmp_path: Path) -> None:
    env = _explicit_target(
        sandbox,
        tmp_path,
        client_id=sandbox.credentials["client_id"],
        pem=sandbox.credentials["private_key_pem"],
    )
    code, out, _ = _run(["doctor"], env)
    assert code == 0, out
    assert "FHIR API" in out and "Data Model API" in out and "All checks passed" in out


def test_failed_run_prints_root_cause_not_summary(tmp_path: Path) -> None:
    # Preflight passes (three requests), then the sandbox refuses the run's requests with 429 and
    # the client, given two seconds of retrying, gives up: a real failed run, not a staged one.
    with serve_in_thread(state_dir=tmp_path / "sandbox", patients=30, rate_limit=(4, 300)) as running:
        env = _env(
            tmp_path / "home",
            REDOX_SANDBOX_CREDENTIALS=str(running.credentials_path),
            REDOX_RETRY_TIMEOUT="2",
            REDOX_RETRY_ATTEMPTS="2",
        )
        code, out, _ = _run(["sync", "--days", "1"], env)
    assert code == 1, out
    assert "Traceback" not in out and 'File "' not in out, out
    assert "nothing below is a success" in out and "Warehouse after sync" not in out, out
    assert "HTTP 429" in out and "Redox said:" in out, out
    assert "make ui" in out and "/runs/" in out, out
    assert len(out.splitlines()) < 40, out
    for value in _secrets(running.credentials):
        assert value not in out
