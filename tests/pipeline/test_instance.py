"""One Dagster instance for every entry point: the folder `make ui` serves is the CLI's.

`make ui` learns the folder from ``python -m pipelines.instance`` (the Makefile has no default of its
own), and the runner opens the same one; both come from ``Settings.dagster_dir``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import runner

REPO = Path(__file__).resolve().parents[2]


def _prepared(env: dict[str, str]) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.instance"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    # Make reads the whole of stdout as the folder: nothing else may be printed there.
    assert out.stdout.count("\n") == 1, out.stdout
    return Path(out.stdout.strip())


def test_make_ui_and_the_runner_open_the_same_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDOX_", "DAGSTER_"))}
    env["REDOX_ETL_HOME"] = str(tmp_path / "home")
    served = _prepared(env)
    assert served == (tmp_path / "home" / "dagster").resolve()
    config = yaml.safe_load((served / "dagster.yaml").read_text())
    assert config["telemetry"] == {"enabled": False}
    assert (served / "dagster.yaml").stat().st_mode & 0o777 == 0o600
    assert served.stat().st_mode & 0o777 == 0o700

    for name in [n for n in os.environ if n.startswith(("REDOX_", "DAGSTER_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path / "home"))
    with runner.instance() as inst:
        assert Path(inst.root_directory) == served

    # An explicit DAGSTER_HOME wins for both.
    env["DAGSTER_HOME"] = str(tmp_path / "elsewhere")
    assert _prepared(env) == (tmp_path / "elsewhere").resolve()


def test_the_makefile_has_no_instance_folder_of_its_own() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert not re.search(r"^(export\s+)?DAGSTER_HOME\s*[?:]?=", makefile, re.MULTILINE)
    assert "python -m pipelines.instance" in makefile
