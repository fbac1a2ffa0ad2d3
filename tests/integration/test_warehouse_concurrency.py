"""Readers during writes: eight analyst sessions in their own processes query in a loop while one
writer merges many batches. Zero lock errors, and every query sees a consistent snapshot.

Every batch the writer commits keeps three invariants inside its one transaction, so a reader that
saw half a merge (rows deleted but not re-inserted, or rows without their partition_loads record)
would break at least one:
- count(results) is a multiple of GROUP (groups are inserted or replaced whole);
- sum(value_num) = 0 (each group's values sum to zero);
- count(results) = sum(partition_loads.inserted) for results (the audit row commits with the rows).
"""

from pathlib import Path

import pytest

from resources.warehouse import Warehouse
from tests.lake_frames import GROUP, readers_during_merges

READERS = 8
BATCHES = 12


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_reader_processes_never_see_a_lock_error_or_a_partial_merge(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    wh = Warehouse(lake_dir=str(lake))
    results, groups = readers_during_merges(
        wh, reader_lake_dir=str(lake), catalog=None, readers=READERS, batches=BATCHES
    )
    print("readers:", results)  # shown when the test fails: queries, errors, slowest query per reader
    assert len(results) == READERS, "a reader process died without reporting"
    for result in results:
        assert result["error_count"] == 0, result["errors"]
        assert not result["violations"], result["violations"]
        assert isinstance(result["queries"], int) and result["queries"] >= 20, result
        assert isinstance(result["states"], int) and result["states"] >= 2, result  # saw writes land
    final = wh.query("SELECT count(*) AS n, sum(value_num) AS total FROM results")
    assert final.row(0) == (groups * GROUP, 0.0)
