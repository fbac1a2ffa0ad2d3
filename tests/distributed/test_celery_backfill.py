"""A backfill on a deployment past one machine ends equal to the sandbox's truth, even when a worker
dies mid-way.

Real servers on loopback (tests/distributed/deployment.py): the Dagster instance and the DuckLake
catalog in Postgres, the Celery broker and the rate budget in Redis, the lake's Parquet files in an
S3 bucket, two dagster-celery worker processes. ``redox-etl backfill`` submits the runs; one worker
is SIGKILLed (its whole process group) once loads have begun, and a replacement joins later; the step
it held goes to the other worker when the broker's visibility timeout expires. Meanwhile an analyst
process with only the catalog (a read-only role) and the bucket queries the tables.
"""

import datetime as dt
import itertools
import json
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
from polars.testing import assert_frame_equal

from resources import configured_warehouse
from sandbox.server import serve_in_thread
from tests.distributed.deployment import Deployment, deployment
from tests.pipeline.truth import COMPARED, KEY, expected, lake_rows
from transforms.streams import ENTITIES

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1500)]
DAYS = 6
# Tight enough that the two workers' steps contend for it; the sandbox enforces the same numbers.
LIMIT, WINDOW = 400, 20


def _loads() -> int:
    try:
        return int(configured_warehouse().query("SELECT count(*) AS n FROM partition_loads")["n"][0])
    except Exception:  # no lake or no table yet
        return 0


def _workers_that_ran_steps(deployed: Deployment) -> set[str]:
    inst = deployed.instance()
    names: set[str] = set()
    for run in inst.get_runs():
        for record in inst.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
            entry = record.event_log_entry
            data = entry.dagster_event.engine_event_data if entry.dagster_event else None
            worker = data.metadata.get("Celery worker") if data is not None else None
            if worker is not None:
                names.add(str(worker.value).split("@")[0])
    return names


def _load_step_intervals(deployed: Deployment) -> list[tuple[float, float, str]]:
    """(start, end, step) of every load step that finished, over every run: the writer's busy times."""
    inst = deployed.instance()
    out: list[tuple[float, float, str]] = []
    for run in inst.get_runs():
        started: dict[str, float] = {}
        for record in inst.get_records_for_run(run.run_id).records:
            entry = record.event_log_entry
            event = entry.dagster_event
            if event is None or entry.step_key not in ENTITIES:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                started[entry.step_key] = entry.timestamp
            elif entry.step_key in started and event.event_type in (
                dg.DagsterEventType.STEP_SUCCESS,
                dg.DagsterEventType.STEP_FAILURE,
            ):
                out.append((started.pop(entry.step_key), entry.timestamp, entry.step_key))
    return sorted(out)


def test_two_celery_workers_backfill_to_truth_through_a_worker_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=DAYS + 6), today - dt.timedelta(days=7)
    with (
        serve_in_thread(
            state_dir=tmp_path / "sandbox", patients=60, seed=11, start=first, end=last,
            rate_limit=(LIMIT, float(WINDOW)),
        ) as running,
        deployment(tmp_path, sandbox=running, rate_limit=f"{LIMIT}/{WINDOW}") as deployed,
    ):  # fmt: skip
        for name, value in deployed.env.items():
            monkeypatch.setenv(name, value)
        deployed.start_worker("alpha")
        deployed.start_worker("beta")
        deployed.wait_ready("alpha")
        deployed.wait_ready("beta")

        started = time.monotonic()
        backfill = deployed.backfill(first, last)
        deadline = time.monotonic() + 600
        while _loads() == 0:
            assert backfill.poll() is None, deployed.log("backfill").read_text()[-3000:]
            assert time.monotonic() < deadline, "no load committed within 10 minutes"
            time.sleep(0.5)

        # The analyst starts once there is a lake to read, and reads until the backfill is over.
        stop, report = tmp_path / "analyst.stop", tmp_path / "analyst.json"
        analyst = deployed.spawn(
            [*(sys.executable, "-m", "tests.distributed.analyst"), str(stop), str(report)],
            "analyst",
            env=deployed.analyst_env(),
        )
        deployed.kill_worker("alpha")
        assert _loads() < 4 * 2 * DAYS, "the backfill had finished: the kill came too late"
        time.sleep(5)
        deployed.start_worker("gamma")  # the replacement machine joins

        code = backfill.wait(timeout=900)
        elapsed = time.monotonic() - started
        stop.touch()
        assert analyst.wait(timeout=60) == 0, deployed.log("analyst").read_text()[-3000:]
        assert code == 0, deployed.log("backfill").read_text()[-4000:]

        # The lake equals the sandbox's truth, every (table, surface, day) loaded exactly once.
        warehouse = configured_warehouse()
        want = expected(running.world.truth(), first, last)
        for table, columns in COMPARED.items():
            got = lake_rows(warehouse, table, first, last)
            assert got.height == got.select(KEY).unique().height, f"{table}: duplicate keys"
            assert_frame_equal(
                got.sort(KEY),
                want[table].select(KEY + columns).sort(KEY),
                check_dtypes=False,
                check_exact=False,
            )
        twice = warehouse.query(
            "SELECT table_name, source_surface, partition_day, count(*) AS n FROM partition_loads"
            " GROUP BY ALL HAVING count(*) > 1"
        )
        assert twice.is_empty(), f"{twice.height} partition(s) loaded more than once"
        assert _loads() == 4 * 2 * DAYS
        # The Parquet files are in the bucket, none on the local disk.
        assert any(key.endswith(".parquet") for key in deployed.s3.keys("lake/"))
        assert not list((tmp_path / "home" / "lake").rglob("ducklake-*.parquet"))

        # The rate limit held across the workers: no 429, no window over the limit.
        stats = httpx.get(f"{running.base_url}/sandbox/stats", timeout=30).json()
        assert stats["responses_429"] == 0, stats["rate_limit"]
        assert max(stats["rate_limit"]["peak_in_window"].values()) <= LIMIT

        # Steps ran on more than one worker, all recorded in the one Postgres instance.
        ran = _workers_that_ran_steps(deployed)
        assert len(ran) >= 2, f"steps ran only on {ran}"
        # The single writer stayed single across workers: no two load steps ever overlapped.
        loads = _load_step_intervals(deployed)
        assert len(loads) >= len(ENTITIES)
        overlapping = [(a[2], b[2]) for a, b in itertools.pairwise(loads) if b[0] < a[1]]
        assert not overlapping, f"load steps ran at the same time: {overlapping}"
        inst = deployed.instance()
        unfinished = [r.status.value for r in inst.get_runs() if not r.is_finished]
        assert not unfinished, f"runs left unfinished: {unfinished}"
        assert not inst.event_log_storage.get_concurrency_run_ids(), "a pool slot is still held"
        # The UI of any machine (dagster-webserver on the Postgres instance) lists every run.
        assert deployed.webserver_runs() == {run.run_id for run in inst.get_runs()}

        seen = json.loads(report.read_text())
        assert seen["errors"] == [], seen["errors"][:5]
        assert seen["queries"] >= 5
        # Counts only grow: each query saw whole loads, never a half-merged day.
        totals = [sum(counts.values()) for counts in seen["seen"]]
        assert totals == sorted(totals)
        print(f"backfill of {DAYS} days on 2 celery workers (one killed): {elapsed:.0f} s")
