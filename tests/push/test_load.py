"""The push load on a real DuckLake: redeliveries skipped, arrival order kept, quarantine kept and
rebuilt (never duplicated, never touching a pulled day's share), replay leaves the cursor alone."""

import datetime as dt
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from assets.push import PUSH_PARTITION_DAY, PushTally, load_new, replay
from resources.inbox import Inbox
from resources.warehouse import Warehouse
from transforms.deliveries import identify

pytestmark = pytest.mark.integration


def _results_new(
    log_id: str, *, value: str, completed: str, updated: str, attempt: str = "a1"
) -> dict[str, Any]:
    return {
        "Meta": {
            "DataModel": "Results",
            "EventType": "New",
            "EventDateTime": updated,
            "Logs": [{"ID": log_id, "AttemptID": attempt}],
        },
        "Patient": {"Identifiers": [{"ID": "MR-1", "IDType": "MR"}]},
        "Orders": [
            {
                "ID": "ord-1",
                "TransactionDateTime": updated,
                "Results": [
                    {
                        "Code": "2345-7",
                        "Codeset": "LOINC",
                        "Description": "Glucose",
                        "Value": value,
                        "ValueType": "Numeric",
                        "Units": "mg/dL",
                        "Status": "Final",
                        "CompletionDateTime": completed,
                    }
                ],
            }
        ],
    }


def _append(inbox: Inbox, body: dict[str, Any]) -> int:
    raw = json.dumps(body).encode()
    ident = identify(body, raw)
    return inbox.append(
        raw,
        headers={},
        key=ident.key,
        surface=ident.surface,
        event=ident.event,
        attempt=ident.attempt,
        received_at=dt.datetime.now(dt.UTC),
    ).seq


def test_push_load_semantics(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox" / "inbox.sqlite")
    warehouse = Warehouse(lake_dir=str(tmp_path / "lake"))
    warehouse.ensure_tables()
    t0 = "2026-11-30T10:00:00.000Z"
    # A pulled day with a quarantined record of its own: the push lane must never replace it.
    pulled_day = dt.date(2026, 11, 30)
    bad_pull = pl.DataFrame(
        {
            "source_surface": ["datamodel"],
            "entity": ["results"],
            "source_id": ["x"],
            "reason": ["pulled"],
            "raw": ["{}"],
            "raw_ref": ["p"],
        }
    )
    empty = warehouse.query("SELECT * FROM results LIMIT 0")
    keep = [c for c in empty.columns if c not in ("partition_day", "run_id", "ingested_at")]
    warehouse.merge(
        "results",
        empty.select(keep),
        partition_day=pulled_day,
        run_id="pull",
        source_surface="datamodel",
        quarantine=_conform(warehouse, bad_pull),
    )

    _append(inbox, _results_new("log-1", value="90", completed=t0, updated=t0))
    _append(inbox, _results_new("log-1", value="999", completed=t0, updated=t0, attempt="a2"))  # redelivery
    bad_seq = _append(inbox, _results_new("log-2", value="5", completed="not a time", updated=t0))
    # Same record, same source timestamp, later arrival: the later delivery wins.
    _append(inbox, _results_new("log-3", value="91", completed=t0, updated=t0))
    first = load_new(warehouse, inbox, run_id="push-1")
    assert (first.deliveries, first.redeliveries, first.quarantined) == (4, 1, 1)
    assert warehouse.query("SELECT value_num FROM results")["value_num"].to_list() == [91.0]
    assert inbox.quarantined() == [bad_seq] and inbox.loaded_seq() == 4

    def quarantine() -> list[tuple[Any, ...]]:
        return warehouse.query(
            "SELECT partition_day, reason FROM quarantine ORDER BY partition_day DESC"
        ).rows()

    after_first = quarantine()
    assert after_first[0] == (pulled_day, "pulled")
    assert [day for day, _ in after_first[1:]] == [PUSH_PARTITION_DAY]

    # A later load keeps the push lane's quarantine share (rebuilt, not doubled) and the pulled one.
    _append(inbox, _results_new("log-4", value="92", completed=t0, updated="2026-11-30T11:00:00.000Z"))
    second = load_new(warehouse, inbox, run_id="push-2")
    assert second.deliveries == 1 and quarantine() == after_first
    assert warehouse.query("SELECT value_num FROM results")["value_num"].to_list() == [92.0]

    # Replay re-reads loaded deliveries: nothing doubles, the cursor stays, older versions lose.
    tally = replay(warehouse, inbox, since=None, until=None, run_id="replay")
    assert isinstance(tally, PushTally) and tally.deliveries == 5
    assert quarantine() == after_first and inbox.loaded_seq() == 5
    assert warehouse.query("SELECT value_num FROM results")["value_num"].to_list() == [92.0]
    assert load_new(warehouse, inbox, run_id="push-3").deliveries == 0
    status = inbox.status()
    assert status["depth"] == 0 and status["quarantined_deliveries"] == 1
    assert status["last_load"]["deliveries"] == 5


def _conform(warehouse: Warehouse, frame: pl.DataFrame) -> pl.DataFrame:
    columns = warehouse.query("SELECT * FROM quarantine LIMIT 0")
    keep = [c for c in columns.columns if c not in ("partition_day", "run_id", "ingested_at")]
    return frame.select(
        [
            pl.col(c).cast(columns.schema[c])
            if c in frame.columns
            else pl.lit(None, columns.schema[c]).alias(c)
            for c in keep
        ]
    )
