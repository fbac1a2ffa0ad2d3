"""Readers during writes: eight analyst sessions in their own processes query in a loop while one
writer merges many batches. Zero lock errors, and every query sees a consistent snapshot.

Every batch the writer commits keeps three invariants inside its one transaction, so a reader that
saw half a merge (rows deleted but not re-inserted, or rows without their partition_loads record)
would break at least one:
- count(results) is a multiple of GROUP (groups are inserted or replaced whole);
- sum(value_num) = 0 (each group's values sum to zero);
- count(results) = sum(partition_loads.inserted) for results (the audit row commits with the rows).
"""

import datetime as dt
import multiprocessing as mp
import queue
import random
import time
import traceback
from pathlib import Path

import pytest

from resources.warehouse import Warehouse
from tests.lake_frames import GROUP
from tests.lake_frames import group_frame as _group_frame

READERS = 8
BATCHES = 12

CHECK_SQL = """
SELECT
    (SELECT count(*) FROM results) AS n,
    (SELECT coalesce(sum(value_num), 0) FROM results) AS total,
    (SELECT coalesce(sum(inserted), 0) FROM partition_loads WHERE table_name = 'results') AS inserted,
    (SELECT count(*) FROM results r JOIN results r2 USING (source_surface, source_id)) AS self_join
"""


def _reader(
    lake_dir: str,
    stop: "mp.synchronize.Event",
    ready: "mp.Queue[int]",
    out: "mp.Queue[dict[str, object]]",
    seed: int,
) -> None:
    rng = random.Random(seed)
    wh = Warehouse(lake_dir=lake_dir)
    queries = 0
    errors: list[str] = []
    violations: list[str] = []
    states: set[int] = set()
    slowest = 0.0
    con = None
    try:
        while not stop.is_set():
            try:
                if con is None or rng.random() < 0.05:  # analysts also open fresh sessions mid-write
                    if con is not None:
                        con.close()
                    # A config the process has not attached yet forces a brand-new DuckDB instance
                    # and ATTACH (connections are otherwise cursors on one cached instance).
                    wh = wh.model_copy(update={"busy_timeout_ms": 30_000 + queries})
                    con = wh.connect()
                    # Eight processes on a CI box's two cores: one thread each keeps the writer fed.
                    con.execute("SET threads = 1")
                started = time.monotonic()
                row = con.execute(CHECK_SQL).fetchone()
                slowest = max(slowest, time.monotonic() - started)
                assert row is not None
                n, total, inserted, self_join = row
                queries += 1
                if queries == 1:
                    ready.put(seed)
                states.add(int(n))
                if n % GROUP or total != 0 or n != inserted or self_join != n:
                    violations.append(f"n={n} sum={total} inserted={inserted} self_join={self_join}")
            except Exception:
                errors.append(traceback.format_exc(limit=3))
    finally:
        if con is not None:
            con.close()
        out.put(
            {
                "seed": seed,
                "queries": queries,
                "errors": errors[:5],
                "error_count": len(errors),
                "violations": violations[:5],
                "states": len(states),
                "slowest_query_s": round(slowest, 3),
            }
        )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_reader_processes_never_see_a_lock_error_or_a_partial_merge(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    wh = Warehouse(lake_dir=str(lake))
    rng = random.Random(7)
    day = dt.date(2024, 1, 1)
    wh.merge("results", _group_frame(0, 0, rng), partition_day=day, run_id="seed", source_surface="fhir")

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ready: mp.Queue[int] = ctx.Queue()
    out: mp.Queue[dict[str, object]] = ctx.Queue()
    readers = [
        ctx.Process(target=_reader, args=(str(lake), stop, ready, out, seed)) for seed in range(READERS)
    ]
    for proc in readers:
        proc.start()
    try:
        for _ in readers:  # every reader is querying before the first write
            ready.get(timeout=180)
        groups = 1
        for batch in range(1, BATCHES + 1):
            if groups > 2 and batch % 3 == 0:
                group = rng.randrange(groups)  # replace a whole group with a newer version
            else:
                group, groups = groups, groups + 1
            stats = wh.merge(
                "results",
                _group_frame(group, batch, rng),
                partition_day=day,
                run_id=f"batch-{batch}",
                source_surface="fhir",
            )
            assert stats.inserted + stats.updated == GROUP
        # An older version of a group must change nothing, even while readers watch.
        stale = wh.merge(
            "results", _group_frame(0, -1, rng), partition_day=day, run_id="stale", source_surface="fhir"
        )
        assert stale.ignored_older == GROUP and stale.inserted == stale.updated == 0
        time.sleep(1)
    finally:
        stop.set()
        results = []
        for _ in readers:
            try:
                results.append(out.get(timeout=60))
            except queue.Empty:
                break
        for proc in readers:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    print("readers:", results)  # shown when the test fails: queries, errors, slowest query per reader
    assert len(results) == READERS, "a reader process died without reporting"
    for result in results:
        assert result["error_count"] == 0, result["errors"]
        assert not result["violations"], result["violations"]
        assert isinstance(result["queries"], int) and result["queries"] >= 20, result
        assert isinstance(result["states"], int) and result["states"] >= 2, result  # saw writes land
    final = wh.query("SELECT count(*) AS n, sum(value_num) AS total FROM results")
    assert final.row(0) == (groups * GROUP, 0.0)
