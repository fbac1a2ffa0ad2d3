"""The layer contract (pyproject.toml, [tool.importlinter]) holds, and it would catch an arrow that
runs back up: a copy of the tree with one upward import added must fail the same check."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipelines", "assets", "resources", "transforms", "schema", "sandbox")
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_layers_kept() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward", "contract"),
    [
        ("transforms/common.py", "import assets.streams", "pipelines -> assets"),
        ("resources/landing.py", "import transforms.fhir", "pipelines -> assets"),
        ("schema/__init__.py", "import resources.settings", "pipelines -> assets"),
        ("sandbox/store.py", "import schema", "the sandbox imports nothing"),
    ],
)
def test_an_upward_import_breaks_the_check(tmp_path: Path, module: str, upward: str, contract: str) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{upward}  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert contract in result.stdout
