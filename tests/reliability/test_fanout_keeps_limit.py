"""The extract's fan-out keeps Redox's rate limit: two runs at once, a small limit, slow answers.

Every clinical day, stream and patient read of a run is in flight at once (bounded only by the
client's transport and the shared budget), so two `redox-etl sync` commands over different days,
on one REDOX_ETL_HOME (one budget file), are as many requests as the budget can ever be asked for.
The sandbox limits to the same rate the client is configured with and delays every answer by a
second, so the window fills with requests in flight. Both commands must succeed with the sandbox
having refused nothing (zero 429s, its peak window under the limit), and the lake must equal the
sandbox's truth over both ranges.
"""

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.server import serve_in_thread
from tests.pipeline.truth import assert_equal, expected
from tests.reliability.sync_harness import window

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("redox-etl"))
# 12 requests per 6 s: the two runs send several windows' worth, a few seconds' worth of them at once.
LIMIT, WINDOW_S = 12, 6.0


def _start(env: dict[str, str], first: dt.date, last: dt.date) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [CLI, "sync", "--start", first.isoformat(), "--end", last.isoformat()],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_concurrent_runs_never_exceed_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, last = window(4)
    split = first + dt.timedelta(days=1)
    with serve_in_thread(
        state_dir=tmp_path / "sandbox",
        patients=60,
        seed=17,
        start=first,
        end=last,
        rate_limit=(LIMIT, WINDOW_S),
        faults="slow=1.0:1s",
    ) as running:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDOX_", "DAGSTER_"))}
        env |= {
            "REDOX_ETL_HOME": str(tmp_path / "home"),
            "REDOX_SANDBOX_CREDENTIALS": str(running.credentials_path),
            "REDOX_RATE_LIMIT": f"{LIMIT}/{WINDOW_S:g}",
            "NO_COLOR": "1",
        }
        for name in [n for n in os.environ if n.startswith(("REDOX_", "DAGSTER_"))]:
            monkeypatch.delenv(name)
        for name in [n for n in env if n.startswith("REDOX_")]:
            monkeypatch.setenv(name, env[name])
        procs = [_start(env, first, split), _start(env, split + dt.timedelta(days=1), last)]
        outputs = [p.communicate(timeout=900)[0] for p in procs]
        for proc, output in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, f"a sync failed (exit {proc.returncode}):\n{output[-4000:]}"

        assert running.sandbox is not None
        stats = running.sandbox.stats_body()
        assert stats["faults"].get("slow", 0) > LIMIT, "the answers were not slow: nothing was in flight"
        assert stats["requests"]["total"] > 2 * LIMIT, "too few requests to fill a window"
        assert stats["responses_429"] == 0
        peaks = stats["rate_limit"]["peak_in_window"]
        assert peaks and max(peaks.values()) <= LIMIT
        # Full windows were reached: the test drove the budget, not just a trickle under it.
        assert max(peaks.values()) >= LIMIT * 0.8
        assert_equal(expected(running.world.truth(), first, last), first, last)
