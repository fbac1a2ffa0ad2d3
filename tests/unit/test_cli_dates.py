"""Bad dates and ranges for `redox-etl sync`/`backfill`: one screen, no traceback, the fix named,
within seconds, before any request or Dagster run (the command runs in-process; nothing listens)."""

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["sync", "--start", "2026-13-01"], "is not a date"),
        (["sync", "--start", "today"], "is not a date"),
        (["backfill", "--start", "2026-11-01", "--end", "2026-02-30"], "is not a date"),
        (["sync", "--days", "0"], "--days 0"),
        (["sync", "--days", "-3"], "at least 1"),
        (["sync", "--end", "2999-01-01"], "is after today"),
        (["backfill", "--start", "2026-11-05", "--end", "2026-11-01"], "is after --end"),
        (["backfill", "--start", "2020-01-01", "--end", "2020-01-03"], "before the first daily partition"),
        (["sync", "--start", "2026-11-01", "--days", "2"], "not both"),
    ],
)
def test_bad_dates_fail_in_one_screen(
    args: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDOX_ETL_HOME", str(tmp_path))
    monkeypatch.delenv("REDOX_BASE_URL", raising=False)
    began = time.monotonic()
    result = CliRunner().invoke(app, args)
    seconds = time.monotonic() - began
    out = result.output
    assert result.exit_code == 2, out
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    assert "Traceback" not in out
    assert says in out, out
    assert "What to do:" in out, out
    assert len(out.strip().splitlines()) == 2, out
    assert seconds < 10, seconds
    # Nothing was started: no sandbox, no Dagster instance.
    assert not (tmp_path / "sandbox").exists() and not (tmp_path / "dagster").exists()
    if "--days" in args and "--start" not in args:
        assert "--start" not in out, "it speaks of a --start nobody gave"
