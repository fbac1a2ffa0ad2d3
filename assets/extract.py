"""Extract: one multi-asset lands every stream (Redox surface x entity), partitioned by clinical day.

The eight extract assets (``fhir_<entity>``, ``dm_<entity>``) are outputs of one op, ``extract``,
which can be subset: a run materializes the ones it selects. All of a run's selected streams x days
are fetched concurrently in one event loop through the one throttled client, whose transport bounds
the requests in flight and whose shared budget bounds the rate; the op itself never limits either.
Each (stream, day) lands the response bodies untouched (resources/landing.py) as a new version of
the day's file, which the day's manifest then names together with what the extract learned on the
way (see ``Extra``). A stream's materialization is reported as soon as all its days have landed.

Invariants:
- an extract step writes nothing to the warehouse tables but ``api_calls`` (its own audit trail);
  the load assets own every other table;
- each (stream, day) lands atomically, on its own: a crash or a failed request loses only the days
  in flight, the other days of the run land; in a backfill a day already landed is not fetched again
  (``refetch=False``), so resuming re-fetches only those days; scheduled syncs refetch
  (``refetch=True``) because recent days still change;
- a day's patients are fetched only after every selected clinical stream of its surface landed that
  day (they are discovered from its records), and not at all if one of those failed;
- patients are fetched at most once per run (the run's ``fetched`` set); in a backfill also not when
  the warehouse holds a fresh copy or the surface's patient ledger (``PatientLedger``) says an
  earlier run landed them within ``stale_after_days``; a sync fetches every referenced patient. The
  ledger is written only after a patients day lands;
- the extract decodes no page itself beyond the transport's parse, except to find the patients a
  day's FHIR clinical pages reference (their references only); a Data Model clinical reply's
  embedded patients are typed from that parse and landed beside it (``carried``), so neither the
  patients extract nor the patients load decodes the clinical page again.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import itertools
import math
import queue
from collections.abc import Iterator, Sequence

import dagster as dg
import polars as pl

from assets.partitions import EXTRACT_POOL, backfill_policy, day_window, partition_folder
from assets.streams import extract_asset
from resources.landing import LandingResource, LandingZone, RawPage
from resources.redox import RedoxClient, RedoxSettings, date_window
from resources.redox.resource import RedoxResource
from resources.warehouse import Warehouse
from transforms import datamodel
from transforms.references import referenced_patients
from transforms.streams import CLINICAL_ENTITIES, STREAMS, Stream, Surface, clinical_streams

# The op's name: run config reaches the extract config as ``{"ops": {EXTRACT_OP: {"config": ...}}}``.
EXTRACT_OP = "extract"

# Manifest ``extra`` of a landed day: what the extract learned while the pages passed through it,
# so later steps read it instead of decoding the pages again. FHIR clinical days: ``bundle_total``
# (Bundle.total of page 1, None if the server left it out), ``entries`` (entries on the pages) and
# ``duplicates`` (entries the client had already received on an earlier page of the search).
# Patients days: ``referenced_patients`` (distinct patients the day's clinical pages name) and
# ``patients_wanted`` (those fetched).
Extra = dict[str, int | str | None]


class ExtractConfig(dg.Config):
    refetch: bool = True
    # Without refetch (a backfill), a patient loaded or landed longer ago than this is fetched again
    # when a record references it; with refetch (a sync), every referenced patient is fetched again.
    stale_after_days: int = 7


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _fetch_clinical(
    client: RedoxClient, stream: Stream, day: dt.date, *, windows: int = 1
) -> tuple[list[RawPage], Extra, pl.Series | None]:
    """One day of a clinical stream, in ``windows`` windows asked at once (FHIR slices, Data Model
    query windows; see ``_windows_for``)."""
    start, end = day_window(day)
    if stream.surface == "fhir":
        # A search's pages come one after another (each next link arrives with the page before it),
        # so one search per day would leave a busy day's paging a single chain of round trips. The
        # day is cut into disjoint slices searched at once; their pages land in slice order.
        first: _Slice | None = None
        probed = False
        if windows == 1:
            # No landed neighbour says how busy the day is, but the first page's Bundle.total does:
            # a day that needs more slices is asked again in slices and this page set aside (one
            # request, counted as `probe_pages`), so a backfill's first days are not single chains.
            first, windows = await _search_slice(
                client, stream, day, start, end, reslice_up_to=client.settings.fhir_day_slices
            )
            probed = first is None
        slices = (
            [first]
            if first is not None
            else [
                searched
                for searched, _ in await asyncio.gather(
                    *(
                        _search_slice(client, stream, day, lo, hi)
                        for lo, hi in day_slices(start, end, windows)
                    )
                )
                if searched is not None
            ]
        )
        totals = [total for _, total, _, _ in slices]
        extra: Extra = {
            "probe_pages": int(probed),
            # Bundle.total of the whole day: the slices' totals add up (they are disjoint), unless a
            # server left one out.
            "bundle_total": None if None in totals else sum(t for t in totals if t is not None),
            "entries": sum(entries for _, _, entries, _ in slices),
            "duplicates": sum(duplicates for _, _, _, duplicates in slices),
        }
        return [page for pages, _, _, _ in slices for page in pages], extra, None
    # A day too big for one answer comes back in several windows' replies, one page each.
    replies = await client.datamodel.windowed(stream.source, start=start, end=end, pieces=windows)
    records = sum(_reply_records(reply.json) for reply in replies)
    # The replies' patients, typed from the client's parse: the patients extract and load read them
    # from here rather than decoding the pages again.
    carried = datamodel.carried_patients([reply.json for reply in replies])
    pages = [RawPage(r.raw, f"{r.endpoint} day={day}", _now()) for r in replies]
    # The day's record count travels in its manifest: the next days size their windows from it.
    return pages, {"records": records}, carried


def _reply_records(reply: object) -> int:
    """Records in one Data Model query reply: results of its orders, its visits (Scheduling's
    Booked), or the visits nested in its patients (PatientAdmin's VisitQueryResponse)."""
    if not isinstance(reply, dict):
        return 0
    orders = reply.get("Orders")
    if isinstance(orders, list):
        return sum(len(o.get("Results") or []) for o in orders if isinstance(o, dict))
    visits = reply.get("Visits")
    if isinstance(visits, list):
        return len(visits)
    patients = reply.get("Patients")
    if isinstance(patients, list):
        return sum(len(p.get("Visits") or []) for p in patients if isinstance(p, dict))
    return 0


def day_slices(start: dt.datetime, end: dt.datetime, count: int) -> list[tuple[dt.datetime, dt.datetime]]:
    """[start, end) cut into ``count`` disjoint, adjacent windows of whole seconds."""
    count = max(1, count)
    step = (end - start) // count
    step -= dt.timedelta(microseconds=step.microseconds)
    edges = [start + step * i for i in range(count)] + [end]
    return [(lo, hi) for lo, hi in itertools.pairwise(edges) if lo < hi]


# One FHIR search's pages, its Bundle.total, entries and entries repeated across its pages.
_Slice = tuple[list[RawPage], int | None, int, int]


async def _search_slice(
    client: RedoxClient,
    stream: Stream,
    day: dt.date,
    start: dt.datetime,
    end: dt.datetime,
    *,
    reslice_up_to: int = 1,
) -> tuple[_Slice | None, int]:
    """One search of [start, end) and 1; or, with ``reslice_up_to`` above 1, (None, slices to ask
    instead) when the first page's Bundle.total says the paging would be a chain longer than
    ``PAGES_PER_SLICE`` (a server that states no total keeps the one search)."""
    pages: list[RawPage] = []
    total: int | None = None
    entries = duplicates = 0
    async with contextlib.aclosing(
        client.fhir.search(stream.source, params=date_window(start, end))
    ) as search:
        async for page in search:
            if reslice_up_to > 1 and page.number == 1 and page.total is not None and page.entries:
                slices = slices_for(page.total, page.entries, reslice_up_to)
                if slices > 1:
                    return None, slices
            pages.append(RawPage(page.raw, f"{page.endpoint} day={day}", _now()))
            total = page.total if page.total is not None else total
            entries += page.entries
            duplicates += page.duplicates
    return (pages, total, entries, duplicates), 1


def slices_for(total: int, page_entries: int, most: int) -> int:
    """Slices for a day of ``total`` matches paged ``page_entries`` at a time: one per
    ``PAGES_PER_SLICE`` pages, at most ``most``."""
    pages = math.ceil(total / max(1, page_entries))
    return max(1, min(most, math.ceil(pages / PAGES_PER_SLICE)))


# A Data Model window holds about this many records when a neighbouring day says how many there are.
# The EHR behind Redox assembles a query's answer record by record (the sandbox's realistic model:
# 5 ms each), and a day's patients wait for its results to land: a hospital day of ~20,000 results
# in two windows is a minute before any patient read starts, in ten it is about ten seconds, for
# eight more requests.
DM_RECORDS_PER_WINDOW = 2000

# A FHIR slice is worth its extra request (its last, partly filled page) when the day's paging would
# otherwise be a chain of more round trips than this.
PAGES_PER_SLICE = 8


def _windows_for(zone: LandingZone, stream: Stream, day: dt.date, settings: RedoxSettings) -> int:
    """How many windows to ask a day in at once, from what the nearest landed days of the stream
    held. Data Model: as many as they took (one page per answered window), or one per
    ``DM_RECORDS_PER_WINDOW`` records they held if that is more, so a day like them neither waits
    out a refusal for the whole day nor one answer the EHR takes minutes to assemble. FHIR: a slice
    per ``PAGES_PER_SLICE`` pages they held, up to ``fhir_day_slices``, so a busy day's paging is
    several chains while a quiet day stays one search and spends no extra request."""
    pages, records = _held_near(zone, stream, day)
    if stream.surface == "datamodel":
        return max(pages, math.ceil(records / DM_RECORDS_PER_WINDOW))
    return slices_for(pages, 1, settings.fhir_day_slices)


def _held_near(zone: LandingZone, stream: Stream, day: dt.date, reach: int = 7) -> tuple[int, int]:
    """The most pages and records the nearest landed days (within ``reach``) of the stream hold;
    (1, 0) if none. Read from the manifests the extract wrote: nothing is decoded."""
    for distance in range(1, reach + 1):
        near = [
            manifest
            for other in (day - dt.timedelta(days=distance), day + dt.timedelta(days=distance))
            if (manifest := zone.manifest(stream.surface, stream.entity, partition_folder(other))) is not None
        ]
        if near:
            return max(m.pages for m in near), max(int(m.extra.get("records") or 0) for m in near)
    return 1, 0


def _referenced_patients(zone: LandingZone, surface: Surface, day: dt.date) -> pl.DataFrame:
    folder = [partition_folder(day)]
    pages = pl.concat(
        [zone.scan(surface, entity, folder, carried=datamodel.CARRIED_DTYPE) for entity in CLINICAL_ENTITIES],
        how="diagonal",
    )
    return referenced_patients(surface, pages).collect()


def _fresh_patients(warehouse: Warehouse, surface: Surface, stale_after: dt.timedelta) -> set[str]:
    try:
        known = warehouse.query(
            # A stand-in (identifiers only, no names) is not a fetched record: it does not count.
            "SELECT source_id FROM patients WHERE source_surface = ? AND ingested_at >= ?"
            " AND family_name IS NOT NULL",
            [surface, _now() - stale_after],
        )
    except Exception:  # a lake that does not exist yet simply knows no patients
        return set()
    return set(known["source_id"].to_list())


async def _fetch_patients(
    client: RedoxClient,
    patients: Stream,
    wanted: pl.DataFrame,
    day: dt.date,
) -> list[RawPage]:
    pages: list[RawPage] = []
    if wanted.is_empty():
        return pages
    if patients.surface == "fhir":
        ids = sorted(wanted["source_id"].to_list())
        async for page in client.fhir.search_patients(patients.source, patients=ids, patient_param="_id"):
            pages.append(RawPage(page.raw, f"{page.endpoint} day={day}", _now()))
        return pages

    # The Data Model has no batch patient read: one PatientSearch per patient, by its MR identifier.
    # All at once: the transport bounds what is in flight, across every day and stream of the run.
    async def one(identifiers: Sequence[dict[str, str]]) -> RawPage:
        reply = await client.datamodel.patient_search(
            identifiers=[
                {"ID": i["value"], "IDType": i["system"].rsplit(":", 1)[-1]} for i in identifiers[:1]
            ]
        )
        return RawPage(reply.raw, f"{reply.endpoint} day={day}", _now())

    tasks = [one(row["identifiers"]) for row in wanted.iter_rows(named=True) if row["identifiers"]]
    return list(await asyncio.gather(*tasks))


class UpstreamFailedError(Exception):
    """A patients day not fetched because a clinical day of its surface failed (reported first)."""


@dataclasses.dataclass
class StreamDone:
    """One stream's outcome over the run's days: its counts, or the first error of a failed day."""

    stream: Stream
    stats: collections.Counter[str]
    error: BaseException | None = None
    failed_day: dt.date | None = None


@dataclasses.dataclass
class _RunPlan:
    """What one op execution fetches, and the state its concurrent tasks share."""

    streams: list[Stream]
    days: list[dt.date]
    config: ExtractConfig
    run_id: str
    zone: LandingZone
    warehouse: Warehouse
    # Patients this run fetched (or is fetching), per surface: one fetch per patient per run.
    fetched: dict[Surface, set[str]] = dataclasses.field(
        default_factory=lambda: {"fhir": set(), "datamodel": set()}
    )
    # Patients the warehouse holds fresh, per surface, read once when first needed (backfill only).
    fresh: dict[Surface, set[str]] = dataclasses.field(default_factory=dict)

    async def run(self, client: RedoxClient, done: "queue.Queue[StreamDone]") -> None:
        stats = {s: collections.Counter[str]() for s in self.streams}
        clinical: dict[tuple[Surface, str, dt.date], asyncio.Task[None]] = {}
        tasks: dict[Stream, list[asyncio.Task[None]]] = {}
        for stream in self.streams:
            if stream.entity != "patients":
                tasks[stream] = [
                    asyncio.create_task(self._clinical_day(client, stream, day, stats[stream]))
                    for day in self.days
                ]
                for day, task in zip(self.days, tasks[stream], strict=True):
                    clinical[(stream.surface, stream.entity, day)] = task
        for stream in self.streams:
            if stream.entity == "patients":
                tasks[stream] = [
                    asyncio.create_task(
                        self._patients_day(
                            client,
                            stream,
                            day,
                            [clinical[k] for k in clinical if k[0] == stream.surface and k[2] == day],
                            stats[stream],
                        )
                    )
                    for day in self.days
                ]

        async def finish(stream: Stream) -> None:
            outcomes = await asyncio.gather(*tasks[stream], return_exceptions=True)
            failures = [
                (day, o) for day, o in zip(self.days, outcomes, strict=True) if isinstance(o, BaseException)
            ]
            # The root cause first: a patients day skipped for its clinical day is only a consequence.
            failures.sort(key=lambda f: isinstance(f[1], UpstreamFailedError))
            error, day = (failures[0][1], failures[0][0]) if failures else (None, None)
            done.put(StreamDone(stream, stats[stream], error, day))

        await asyncio.gather(*(finish(s) for s in self.streams))

    async def _clinical_day(
        self, client: RedoxClient, stream: Stream, day: dt.date, stats: collections.Counter[str]
    ) -> None:
        folder = partition_folder(day)
        if not self.config.refetch and self.zone.exists(stream.surface, stream.entity, folder):
            stats["skipped_days"] += 1
            return
        windows = _windows_for(self.zone, stream, day, client.settings)
        pages, extra, carried = await _fetch_clinical(client, stream, day, windows=windows)
        await self._land(stream, folder, pages, extra, carried, stats)

    async def _patients_day(
        self,
        client: RedoxClient,
        stream: Stream,
        day: dt.date,
        upstream: list[asyncio.Task[None]],
        stats: collections.Counter[str],
    ) -> None:
        folder = partition_folder(day)
        if not self.config.refetch and self.zone.exists(stream.surface, stream.entity, folder):
            stats["skipped_days"] += 1
            return
        outcomes = await asyncio.gather(*upstream, return_exceptions=True)
        if any(isinstance(o, BaseException) for o in outcomes):
            raise UpstreamFailedError(f"{stream.surface} clinical pages of {day} did not land")
        refs = await asyncio.to_thread(_referenced_patients, self.zone, stream.surface, day)
        ledger = self.zone.ledger(stream.surface)
        # A re-pull of recent days re-reads every patient they mention: demographics change without
        # any sign in the clinical records (a move, a new name).
        skip: set[str] = set()
        if not self.config.refetch:
            stale_after = dt.timedelta(days=self.config.stale_after_days)
            if stream.surface not in self.fresh:
                self.fresh[stream.surface] = await asyncio.to_thread(
                    _fresh_patients, self.warehouse, stream.surface, stale_after
                )
            # Read per day: other runs of the backfill land patients meanwhile.
            landed = await asyncio.to_thread(ledger.landed_since, _now() - stale_after)
            skip = self.fresh[stream.surface] | landed
        # No await between choosing and claiming: two days of this run never both fetch a patient.
        fetched = self.fetched[stream.surface]
        wanted = refs.filter(~pl.col("complete") & ~pl.col("source_id").is_in(list(skip | fetched)))
        ids = wanted["source_id"].to_list()
        fetched.update(ids)
        try:
            pages = await _fetch_patients(client, stream, wanted, day)
        except BaseException:
            # Not fetched after all: a later day of this run (or a resume) must be free to fetch them.
            fetched.difference_update(ids)
            raise
        stats["patients_wanted"] += wanted.height
        extra: Extra = {"referenced_patients": refs.height, "patients_wanted": wanted.height}
        await self._land(stream, folder, pages, extra, None, stats)
        await asyncio.to_thread(ledger.record, ids, _now())

    async def _land(
        self,
        stream: Stream,
        folder: str,
        pages: list[RawPage],
        extra: Extra,
        carried: pl.Series | None,
        stats: collections.Counter[str],
    ) -> None:
        # In a thread: writing and fsyncing a day's Parquet must not stall the other days' requests.
        manifest = await asyncio.to_thread(
            self.zone.write,
            stream.surface,
            stream.entity,
            folder,
            pages,
            run_id=self.run_id,
            extra=extra,
            carried=carried,
        )
        stats["days_landed"] += 1
        stats["pages"] += manifest.pages
        stats["bytes"] += manifest.bytes
        for key in ("bundle_total", "entries", "duplicates", "probe_pages"):
            stats[key] += int(extra.get(key) or 0)


def _stream_calls(audit: pl.DataFrame, stream: Stream) -> pl.DataFrame:
    """The audit rows of one stream's requests, by their endpoint template (no values in it)."""
    endpoint = pl.col("endpoint")
    if stream.surface == "fhir":
        mine = endpoint.str.contains(f"/{stream.source}/", literal=True) | endpoint.str.contains(
            f"/{stream.source}?", literal=True
        )
    else:
        mine = endpoint.str.contains(f"({stream.source})", literal=True)
    return audit.filter((pl.col("surface") == stream.surface) & mine)


def _specs() -> list[dg.AssetSpec]:
    specs = []
    for stream in STREAMS.values():
        deps = (
            [extract_asset(s) for s in clinical_streams(stream.surface)]
            if stream.entity == "patients"
            else []
        )
        specs.append(
            dg.AssetSpec(
                extract_asset(stream),
                description=(
                    f"Raw {stream.surface} {stream.entity} pages ({stream.source}) for each clinical day, "
                    "landed untouched under `raw/` in the lake folder."
                ),
                group_name=f"extract_{stream.surface}",
                kinds={"python", "redox", "parquet"},
                deps=deps,
                # A failed stream reports no materialization while the others of the op still do.
                skippable=True,
            )
        )
    return specs


def build_extract_assets(partitions: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """Every stream's extract asset, as one op that fetches whatever subset a run selects."""
    by_key = {dg.AssetKey(extract_asset(s)): s for s in STREAMS.values()}

    @dg.multi_asset(
        name=EXTRACT_OP,
        specs=_specs(),
        partitions_def=partitions,
        backfill_policy=backfill_policy,
        can_subset=True,
        pool=EXTRACT_POOL,
    )
    def extract(
        context: dg.AssetExecutionContext,
        config: ExtractConfig,
        redox: RedoxResource,
        landing: LandingResource,
        warehouse: Warehouse,
    ) -> Iterator[dg.MaterializeResult]:
        streams = [s for key, s in by_key.items() if key in context.selected_asset_keys]
        days = [dt.date.fromisoformat(k) for k in context.partition_keys]
        plan = _RunPlan(streams, days, config, context.run_id, landing.zone(), warehouse)
        done: queue.Queue[StreamDone] = queue.Queue()
        clients: list[RedoxClient] = []
        running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[pl.DataFrame]]] = []

        async def run() -> pl.DataFrame:
            running.append((asyncio.get_running_loop(), asyncio.current_task()))  # type: ignore[arg-type]
            async with redox.client(run_id=context.run_id) as client:
                clients.append(client)
                await plan.run(client, done)
                return client.audit_frame()

        failures: list[StreamDone] = []
        # The event loop runs in a thread so that this generator reports each stream as it finishes;
        # the Dagster context is used from this thread only (the audit log is thread-safe).
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="redox-extract") as pool:
            future = pool.submit(asyncio.run, run())
            try:
                order = _Topological(streams)
                for _ in streams:
                    for outcome in order.ready(_next(done, future)):
                        if outcome.error is not None:
                            failures.append(outcome)
                            continue
                        calls = _stream_calls(clients[0].audit_frame(), outcome.stream)
                        yield _result(context, outcome, days, calls)
            except BaseException:
                # The run was terminated (or this thread failed): stop the requests rather than let
                # leaving the pool wait for every day to finish.
                for loop, task in running:
                    loop.call_soon_threadsafe(task.cancel)
                raise
            audit = future.result()
        step = f"{EXTRACT_OP}:{context.partition_keys[0]}..{context.partition_keys[-1]}"
        warehouse.append_api_calls(audit, run_id=context.run_id, step=step)
        context.log.info(
            "extract: %d stream(s) x %d day(s), %d request(s)", len(streams), len(days), audit.height
        )
        for failure in failures:
            context.log.error(
                "%s: day %s failed (%s)",
                extract_asset(failure.stream),
                failure.failed_day,
                type(failure.error).__name__,
            )
        # The first root cause as raised, in the server's own words; the log above names the rest.
        roots = [f.error for f in failures if not isinstance(f.error, UpstreamFailedError)]
        if error := next(iter(roots or [f.error for f in failures]), None):
            raise error

    return extract


class _Topological:
    """Releases finished streams in an order Dagster accepts from a multi-asset: a surface's patients
    after every selected clinical stream of that surface (a patients stream whose days were all
    landed already finishes first). A patients stream whose clinical streams did not all succeed is
    not reported as materialized."""

    def __init__(self, streams: list[Stream]) -> None:
        self.outstanding = set(streams)
        self.failed: set[Stream] = set()
        self.held: list[StreamDone] = []

    def ready(self, outcome: StreamDone) -> list[StreamDone]:
        """The streams that may be reported now that ``outcome`` finished, in a valid order."""
        self.held.append(outcome)
        out: list[StreamDone] = []
        while release := [h for h in self.held if self._may_go(h.stream)]:
            for held in release:
                self.held.remove(held)
                clinical_failed = any(
                    s.surface == held.stream.surface and s.entity != "patients" for s in self.failed
                )
                if held.stream.entity == "patients" and held.error is None and clinical_failed:
                    error = UpstreamFailedError(f"{held.stream.surface} clinical pages did not all land")
                    held = dataclasses.replace(held, error=error)
                self.outstanding.discard(held.stream)
                if held.error is not None:
                    self.failed.add(held.stream)
                out.append(held)
        return out

    def _may_go(self, stream: Stream) -> bool:
        # A clinical stream is released as soon as it finishes, so one still outstanding is running.
        return stream.entity != "patients" or not any(
            s.surface == stream.surface and s.entity != "patients" for s in self.outstanding
        )


def _result(
    context: dg.AssetExecutionContext, outcome: StreamDone, days: list[dt.date], calls: pl.DataFrame
) -> dg.MaterializeResult:
    name = extract_asset(outcome.stream)
    counts = outcome.stats
    context.log.info(
        "%s: %d day(s), %d landed, %d page(s), %d request(s)",
        name,
        len(days),
        counts["days_landed"],
        counts["pages"],
        calls.height,
    )
    keys = (
        "pages",
        "bytes",
        "skipped_days",
        "patients_wanted",
        "bundle_total",
        "entries",
        "duplicates",
        "probe_pages",
    )
    return dg.MaterializeResult(
        asset_key=name,
        metadata={
            "window": f"{days[0]} .. {days[-1]}",
            "days": len(days),
            "requests": calls.height,
            "retries": int((calls["attempt"] > 1).sum()) if calls.height else 0,
            **{key: int(counts[key]) for key in keys},
        },
    )


def _next(done: "queue.Queue[StreamDone]", future: concurrent.futures.Future[pl.DataFrame]) -> StreamDone:
    """The next finished stream; if the event loop itself died, its error."""
    while True:
        try:
            return done.get(timeout=1.0)
        except queue.Empty:
            if future.done():
                future.result()  # raises what killed the loop
                raise RuntimeError("the extract's event loop ended before every stream finished") from None


__all__ = ["EXTRACT_OP", "ExtractConfig", "build_extract_assets"]
