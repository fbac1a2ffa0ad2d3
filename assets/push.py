"""The push lane's load: inbox deliveries -> the unified tables, through the pull's normalizers and writer.

``load_deliveries`` takes deliveries from the inbox (``resources.inbox``), in arrival order, and
treats each as a page: FHIR notifications (message Bundles) go through the FHIR normalizers, Data
Model event messages (Results.New, Scheduling.*, PatientAdmin.*) through the Data Model ones (an
event carries the same entity shapes as a query response, under ``Meta.DataModel/EventType``). Rows
are merged by ``Warehouse.merge``: the newest-version rule of schema/versions.py decides between a
pushed and a pulled version of one record, whichever lane brought it first.

The asset ``pushed_deliveries`` runs that in the pool ``warehouse`` (the single writer) for what
arrived since its cursor; the sensor ``push_inbox`` (pipelines/jobs.py) requests it.

Invariants:
- exactly once in effect: a redelivery (same Redox log id / FHIR message id) is never normalized;
  the cursor moves only after the lake committed, and a load repeated after a crash merges the
  same versions again, which the version rule makes a no-op;
- order of arrival is kept: within a load, versions of one record that tie on ``source_updated_at``
  go to the later delivery (page order is inbox order);
- pushed rows carry ``partition_day`` ``PUSH_PARTITION_DAY`` (a day no pull partition has), so a
  push load's ``partition_loads`` row never tells the pull that a clinical day is loaded, and the
  push lane's quarantine share never replaces a pulled day's. That share is the quarantined records
  of every delivery still marked quarantined in the inbox, rebuilt on each load, so a replay after
  a mapping fix empties it;
- metadata and logs carry counts and times only.
"""

import dataclasses
import datetime as dt
import statistics
from typing import Any

import dagster as dg
import polars as pl

from assets.warehouse import count_merge, prepare
from resources.inbox import Delivery, Inbox, InboxResource
from resources.warehouse import Warehouse
from transforms.streams import ENTITIES, SURFACES, stream

PUSH_PARTITION_DAY = dt.date(1970, 1, 1)
BATCH = 5000
RAW_REF_PREFIX = "inbox:"


@dataclasses.dataclass
class PushTally:
    deliveries: int = 0
    redeliveries: int = 0
    unknown_shape: int = 0
    records: int = 0
    loaded: int = 0
    duplicates: int = 0
    quarantined: int = 0
    inserted: int = 0
    updated: int = 0
    ignored_older: int = 0
    lags: list[float] = dataclasses.field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in dataclasses.asdict(self).items() if k != "lags"}
        if self.lags:
            out["lag_p50_seconds"] = round(statistics.median(self.lags), 3)
            out["lag_max_seconds"] = round(max(self.lags), 3)
        return out


def _pages(deliveries: list[Delivery]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "raw_ref": [f"{RAW_REF_PREFIX}{d.seq}" for d in deliveries],
            "body": [d.body.decode("utf-8", "replace") for d in deliveries],
        },
        schema={"raw_ref": pl.String, "body": pl.String},
    )


def _seqs(raw_refs: pl.Series) -> set[int]:
    return {int(r.removeprefix(RAW_REF_PREFIX)) for r in raw_refs.drop_nulls().unique().to_list()}


def load_deliveries(
    warehouse: Warehouse,
    inbox: Inbox,
    deliveries: list[Delivery],
    *,
    run_id: str,
    tally: PushTally,
    advance_cursor: bool = True,
) -> None:
    """Normalize and merge ``deliveries`` (plus every delivery still quarantined), then move the cursor.

    With ``advance_cursor`` false (a replay of older deliveries) the cursor stays where it is.
    """
    firsts = [d for d in deliveries if d.duplicate_of is None]
    tally.deliveries += len(deliveries)
    tally.redeliveries += len(deliveries) - len(firsts)
    previously = inbox.quarantined()
    seen = {d.seq for d in firsts}
    again = inbox.deliveries(seqs=[s for s in previously if s not in seen]) if previously else []
    # Arrival order across both: a quarantined delivery re-read here is older than the new ones.
    pages_of = sorted(firsts + again, key=lambda d: d.seq)
    quarantined_now: set[int] = set()
    for surface in SURFACES:
        mine = [d for d in pages_of if d.surface == surface]
        if not mine:
            continue
        pages = _pages(mine).lazy()
        for entity in ENTITIES:
            normalized = stream(surface, entity).normalize(pages).collect()
            ready = prepare(warehouse, normalized, surface, entity, source_ref=False)
            good, bad = ready.good, ready.bad
            if good.is_empty() and bad.is_empty() and not previously:
                continue
            stats = warehouse.merge(
                entity,
                good,
                partition_day=PUSH_PARTITION_DAY,
                run_id=run_id,
                source_surface=surface,
                quarantine=bad,
            )
            quarantined_now |= _seqs(bad["raw_ref"])
            tally.loaded += good.height
            tally.quarantined += bad.height
            tally.duplicates += ready.duplicates
            tally.records += good.height + bad.height + ready.known_references
            count_merge(tally, stats)
    tally.unknown_shape += sum(1 for d in firsts if d.surface is None)
    committed = dt.datetime.now(dt.UTC)
    tally.lags += [(committed - d.received_at).total_seconds() for d in firsts]
    inbox.commit_load(
        upto_seq=max(d.seq for d in deliveries) if deliveries and advance_cursor else None,
        quarantined=sorted(quarantined_now),
        cleared=[s for s in previously if s not in quarantined_now],
        summary={"at": committed.isoformat(), **{k: v for k, v in tally.metadata().items()}},
    )


def load_new(warehouse: Warehouse, inbox: Inbox, *, run_id: str) -> PushTally:
    """Everything that arrived after the cursor, in batches of ``BATCH`` deliveries."""
    tally = PushTally()
    while True:
        batch = inbox.deliveries(after_seq=inbox.loaded_seq(), upto_seq=inbox.loaded_seq() + BATCH)
        if not batch:
            return tally
        warehouse.ensure_tables()
        load_deliveries(warehouse, inbox, batch, run_id=run_id, tally=tally)


def replay(
    warehouse: Warehouse, inbox: Inbox, *, since: dt.datetime | None, until: dt.datetime | None, run_id: str
) -> PushTally:
    """Normalize stored deliveries of [since, until) again (after a mapping fix), quarantined ones
    included; the version rule keeps whatever newer version the lake already holds."""
    tally = PushTally()
    warehouse.ensure_tables()
    loaded = inbox.loaded_seq()
    chosen = [d for d in inbox.deliveries(since=since, until=until) if d.seq <= loaded]
    for start in range(0, max(len(chosen), 1), BATCH):
        load_deliveries(
            warehouse, inbox, chosen[start : start + BATCH], run_id=run_id, tally=tally, advance_cursor=False
        )
    return tally


@dg.asset(
    name="pushed_deliveries",
    description="Webhook deliveries from the inbox (`redox-etl webhook serve`) normalized through the "
    "pull's normalizers and merged newest-version-wins into the unified tables; redeliveries skipped.",
    group_name="push",
    kinds={"duckdb", "polars", "sqlite"},
    pool="warehouse",
)
def pushed_deliveries(
    context: dg.AssetExecutionContext, warehouse: Warehouse, inbox: InboxResource
) -> dg.MaterializeResult:
    store = inbox.open()
    try:
        tally = load_new(warehouse, store, run_id=context.run_id)
        pruned = store.prune(older_than=dt.datetime.now(dt.UTC) - inbox.retention())
    finally:
        store.close()
    context.log.info(
        "push: %d deliveries (%d redeliveries): %d loaded, %d quarantined",
        tally.deliveries,
        tally.redeliveries,
        tally.loaded,
        tally.quarantined,
    )
    return dg.MaterializeResult(metadata={**tally.metadata(), "pruned": pruned})
