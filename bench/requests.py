"""``python -m bench requests``: requests a sync spends per record, against the fewest the data allows.

A sandbox (in a thread, rate limiting off) holds ``--patients`` persons over ``--days`` days. The
pipeline syncs the whole window as a real Dagster run (every asset but identity, which calls no API),
then syncs it again with nothing changed, then syncs only the last ``--recent`` days (what the
schedule does). Requests are counted from the lake's ``api_calls`` table (one row per HTTP attempt),
by surface and endpoint template, auth apart.

Floors come from the sandbox's truth, at the sandbox's largest page (``_count`` 1000):
- per partition: every (resource, day) costs at least one request and ``ceil(records / 1000)``;
  every Data Model query one request per day; patients as the pipeline asks for them (below);
- absolute: ``ceil(records / 1000)`` per FHIR resource over the whole window, one request per Data
  Model query for the whole window.
Patients: FHIR ``Patient?_id=a,b,...`` has no id limit in the sandbox, so a request returns up to a
page (1000) of them; the Data Model has no batch read, so one PatientSearch per patient the clinical
replies mention by identifiers only (Results embed identifiers; VisitQuery and Booked embed
demographics). A patient whose VisitQuery/Booked record lacks a family name or birth date is counted
as complete: a PatientSearch returns the same record.

Request counts are deterministic for a seed (no retries with rate limiting and faults off), so there
is one run, not a median.
"""

import argparse
import datetime as dt
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import polars as pl

MAX_COUNT = 1000  # sandbox/fhir.py MAX_COUNT: the most entries one FHIR page holds
# (surface, FHIR resource or Data Model query) -> truth table; the order rows are printed in.
STREAMS: tuple[tuple[str, str, str], ...] = (
    ("fhir", "Encounter", "encounters"),
    ("fhir", "Observation", "results"),
    ("fhir", "Appointment", "appointments"),
    ("fhir", "Patient", "patients"),
    ("datamodel", "PatientAdmin.VisitQuery", "encounters"),
    ("datamodel", "Results.Query", "results"),
    ("datamodel", "Scheduling.Booked", "appointments"),
    ("datamodel", "PatientSearch.Query", "patients"),
)
CLINICAL_TIME = {"encounters": "start_at", "results": "effective_at", "appointments": "start_at"}
SELECTION_NOTE = "every asset but identity"


def _ceil(n: int, size: int = MAX_COUNT) -> int:
    return math.ceil(n / size)


def floors(truth: dict[str, pl.DataFrame], first: dt.date, last: dt.date) -> dict[str, tuple[int, int, int]]:
    """stream -> (records, per-partition floor, absolute floor) for a sync of [first, last]."""
    lo = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    hi = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    days = pl.DataFrame({"day": pl.date_range(first, last, eager=True)})
    clinical = {
        table: truth[table]
        .filter(pl.col(column).is_between(lo, hi, closed="left"))
        .select("source_surface", "patient_source_id", pl.col(column).dt.date().alias("day"))
        for table, column in CLINICAL_TIME.items()
    }
    out: dict[str, tuple[int, int, int]] = {}
    for surface, source, table in STREAMS:
        if table != "patients":
            rows = clinical[table].filter(pl.col("source_surface") == surface)
            if surface == "fhir":
                per_day = days.join(rows.group_by("day").len(), on="day", how="left").fill_null(0)
                partition = sum(max(1, _ceil(n)) for n in per_day["len"])
                absolute = max(1, _ceil(rows.height))
            else:
                # A Data Model query returns its whole window in one reply: no paging.
                partition, absolute = days.height, 1
            out[f"{surface} {source}"] = (rows.height, partition, absolute)
            continue
        mentions = pl.concat(
            [
                clinical[t].filter(pl.col("source_surface") == surface).with_columns(pl.lit(t).alias("table"))
                for t in CLINICAL_TIME
            ]
        )
        if surface == "fhir":
            first_seen = mentions.group_by("patient_source_id").agg(pl.col("day").min())
            per_day = first_seen.group_by("day").len()
            partition = sum(_ceil(n) for n in per_day["len"])
            out[f"{surface} {source}"] = (first_seen.height, partition, _ceil(first_seen.height))
            continue
        # Data Model: a patient needs a PatientSearch on a day only Results mention it (per
        # partition), or when only Results mention it in the whole window (absolute).
        embedded = pl.col("table") != "results"
        by_day = mentions.group_by("patient_source_id", "day").agg(embedded.any().alias("complete"))
        partition = by_day.filter(~pl.col("complete"))["patient_source_id"].n_unique()
        whole = mentions.group_by("patient_source_id").agg(embedded.any().alias("complete"))
        absolute = whole.filter(~pl.col("complete")).height
        out[f"{surface} {source}"] = (whole.height, partition, absolute)
    return out


def incomplete_embedded(truth: dict[str, pl.DataFrame], first: dt.date, last: dt.date) -> int:
    """Data Model patients VisitQuery/Booked mention whose record lacks a family name or birth date:
    the pipeline cannot tell them from identifier-only mentions and searches them."""
    lo = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    hi = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    mentioned = pl.concat(
        [
            truth[t]
            .filter(
                (pl.col("source_surface") == "datamodel")
                & pl.col(CLINICAL_TIME[t]).is_between(lo, hi, closed="left")
            )
            .select(pl.col("patient_source_id").alias("source_id"))
            for t in ("encounters", "appointments")
        ]
    ).unique()
    patients = truth["patients"].filter(pl.col("source_surface") == "datamodel")
    joined = patients.join(mentioned, on="source_id", how="semi")
    return joined.filter(pl.col("family_name").is_null() | pl.col("birth_date").is_null()).height


def _stream_of(surface: str, endpoint: str) -> str:
    if surface == "auth":
        return "auth"
    if surface == "fhir":
        resource = endpoint.split("{env}/", 1)[-1].split("/", 1)[0].split("?", 1)[0]
        return f"fhir {resource}"
    inside = endpoint.split("(", 1)[-1].rstrip(")")
    return f"datamodel {inside}"


def spent(run_id: str) -> pl.DataFrame:
    """api_calls of one run: (stream, step kind, surface, endpoint) -> requests, 429s, retries."""
    from resources import configured_warehouse

    frame = configured_warehouse().query(
        "SELECT surface, endpoint, status, attempt, step FROM api_calls WHERE run_id = ?", [run_id]
    )
    return (
        frame.with_columns(
            pl.struct("surface", "endpoint")
            .map_elements(lambda r: _stream_of(r["surface"], r["endpoint"]), return_dtype=pl.String())
            .alias("stream"),
            pl.when(pl.col("step") == "redox_changes")
            .then(pl.lit("changes"))
            .otherwise(pl.lit("extract"))
            .alias("kind"),
        )
        .group_by("kind", "stream", "surface", "endpoint")
        .agg(
            pl.len().alias("requests"),
            (pl.col("status") == 429).sum().alias("status_429"),
            (pl.col("attempt") > 1).sum().alias("retries"),
        )
        .sort("kind", "stream", "endpoint")
    )


def _sync(first: dt.date, last: dt.date) -> tuple[str, float, int]:
    """One Dagster run over [first, last]: (run id, seconds, days redox_changes queued)."""
    import dagster as dg

    from assets import all_assets
    from resources import all_resources

    began = time.perf_counter()
    with warnings.catch_warnings(), dg.DagsterInstance.ephemeral() as instance:
        warnings.simplefilter("ignore")
        result = dg.materialize(
            all_assets,
            # Identity calls no API; it is the slowest step and not what is counted here.
            selection=dg.AssetSelection.all() - dg.AssetSelection.groups("identity"),
            resources=all_resources(),
            instance=instance,
            # Step events would bury the report; failures still raise.
            run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
            tags={
                "dagster/asset_partition_range_start": first.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat(),
            },
        )
    seconds = time.perf_counter() - began
    if not result.success:
        raise RuntimeError(f"sync {first}..{last} failed")
    queued = 0
    for event in result.get_asset_materialization_events():
        if event.asset_key == dg.AssetKey("redox_changes"):
            metadata = event.step_materialization_data.materialization.metadata
            queued = int(metadata["queued"].value)  # type: ignore[arg-type]
    return result.run_id, seconds, queued


def _ratio(spent_n: int, floor: int) -> str:
    return f"{spent_n / floor:.2f}" if floor else ("n/a" if spent_n == 0 else "inf")


def report(
    args: argparse.Namespace,
    first: dt.date,
    last: dt.date,
    page_size: str,
    bounds: dict[str, tuple[int, int, int]],
    runs: dict[str, tuple[pl.DataFrame, float, int]],
    incomplete: int,
    in_lag: int,
    load: tuple[float, float],
) -> list[str]:
    full, full_s, _ = runs["full"]
    extract = full.filter(pl.col("kind") == "extract").group_by("stream").agg(pl.col("requests").sum())
    by_stream = dict(zip(extract["stream"], extract["requests"], strict=True))
    lines = [
        f"Sandbox: {args.patients:,} persons, seed {args.seed}, window {first} .. {last} ({args.days} days), "
        f"rate limiting and faults off; client page size: {page_size}; "
        f"1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
        f"({os.cpu_count()} CPUs).",
        "",
        f"Full sync ({SELECTION_NOTE}, one Dagster run over the window, {full_s:.0f} s):",
        "",
        "| stream | records in window | requests | floor per daily partition | ratio | "
        "absolute floor | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    total_spent = total_part = total_abs = total_records = 0
    for surface, source, table in STREAMS:
        key = f"{surface} {source}"
        records, part, absolute = bounds[key]
        n = int(by_stream.get(key, 0))
        total_spent += n
        total_part += part
        total_abs += absolute
        total_records += records if table != "patients" else 0
        label = key + (" (patients referenced)" if table == "patients" else "")
        lines.append(
            f"| {label} | {records:,} | {n:,} | {part:,} | {_ratio(n, part)} | {absolute:,} | "
            f"{_ratio(n, absolute)} |"
        )
    other = {k: int(v) for k, v in by_stream.items() if k != "auth" and k not in bounds}
    for key, n in sorted(other.items()):
        total_spent += n
        lines.append(f"| {key} (not in the floors) | | {n:,} | | | | |")
    changes = full.filter(pl.col("kind") == "changes")
    changes_n = int(changes.filter(pl.col("stream") != "auth")["requests"].sum())
    auth_n = int(full.filter(pl.col("stream") == "auth")["requests"].sum())
    lines += [
        f"| redox_changes (first look: sets the watermark) | | {changes_n:,} | 1 | "
        f"{_ratio(changes_n, 1)} | 1 | {_ratio(changes_n, 1)} |",
        f"| **data requests** | {total_records:,} clinical | **{total_spent + changes_n:,}** | "
        f"**{total_part + 1:,}** | **{_ratio(total_spent + changes_n, total_part + 1)}** | "
        f"**{total_abs + 1:,}** | **{_ratio(total_spent + changes_n, total_abs + 1)}** |",
        f"| auth (token requests, apart) | | {auth_n:,} | 1 | {_ratio(auth_n, 1)} | 1 | "
        f"{_ratio(auth_n, 1)} |",
        "",
        f"Requests per clinical record: {(total_spent + changes_n) / max(total_records, 1):.3f} "
        f"(floor per partition {(total_part + 1) / max(total_records, 1):.3f}, absolute "
        f"{(total_abs + 1) / max(total_records, 1):.4f}). Data Model patients whose VisitQuery/Booked "
        f"record lacks a family name or birth date (searched by the pipeline, not by the floor): "
        f"{incomplete:,}. 429s: {int(full['status_429'].sum())}, retries: {int(full['retries'].sum())}.",
        "",
        "Nothing changed in the sandbox since the full sync; the minimum is the changes queries alone. "
        f"Records the sandbox last updated within redox_changes' 10-minute lag before its watermark "
        f"(read again as changes, so their days are queued): {in_lag:,}.",
        "",
        "| sync | seconds | requests (data) | of which redox_changes | auth | minimum (redox_changes) "
        "| ratio | days queued |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("again", "same window again"), ("recent", f"last {args.recent} days")):
        frame, seconds, queued = runs[name]
        data = int(frame.filter(pl.col("stream") != "auth")["requests"].sum())
        ch = int(frame.filter((pl.col("kind") == "changes") & (pl.col("stream") != "auth"))["requests"].sum())
        au = int(frame.filter(pl.col("stream") == "auth")["requests"].sum())
        lines.append(
            f"| {label} | {seconds:.0f} | {data:,} | {ch:,} | {au:,} | {ch:,} | {_ratio(data, ch)} | {queued} |"
        )
    lines += [
        "",
        "By endpoint template (full sync, then the two no-change syncs):",
        "",
        "| sync | step | surface | endpoint | requests |",
        "|---|---|---|---|---:|",
    ]
    for name, (frame, _, _) in runs.items():
        for row in frame.iter_rows(named=True):
            lines.append(
                f"| {name} | {row['kind']} | {row['surface']} | `{row['endpoint']}` | {row['requests']:,} |"
            )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench requests", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1000, help="sandbox persons")
    parser.add_argument("--days", type=int, default=14, help="days in the synced window (ending yesterday)")
    parser.add_argument("--recent", type=int, default=3, help="days the scheduled sync re-pulls")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--page-size",
        type=int,
        default=None,
        help="REDOX_FHIR_PAGE_SIZE for the client (default: unset, so the server's default _count)",
    )
    args = parser.parse_args(argv)
    if args.recent > args.days:
        parser.error("--recent cannot exceed --days")

    # Dagster's beta warnings (backfill_policy) on every import would bury the report.
    warnings.simplefilter("ignore")
    command = "uv run --frozen python -m bench requests " + " ".join(argv)
    print(f"# {command}".rstrip(), flush=True)
    load_start = os.getloadavg()[0]
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    last = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    first = last - dt.timedelta(days=args.days - 1)
    recent_first = last - dt.timedelta(days=args.recent - 1)

    with tempfile.TemporaryDirectory(prefix="bench-requests-") as folder:
        home = Path(folder)
        os.environ["REDOX_ETL_HOME"] = str(home)
        os.environ["REDOX_BUDGET_PATH"] = str(home / "budget.sqlite")
        if args.page_size:
            os.environ["REDOX_FHIR_PAGE_SIZE"] = str(args.page_size)
        else:
            os.environ.pop("REDOX_FHIR_PAGE_SIZE", None)
        from resources.redox.settings import RedoxSettings
        from sandbox.fhir import DEFAULT_COUNT
        from sandbox.fhir import MAX_COUNT as SANDBOX_MAX
        from sandbox.server import serve_in_thread

        assert SANDBOX_MAX == MAX_COUNT, "the sandbox's largest page changed; update bench/requests.py"
        began = time.perf_counter()
        with serve_in_thread(
            state_dir=home / "sandbox",
            patients=args.patients,
            seed=args.seed,
            start=first,
            end=last,
            rate_limit=None,
        ) as running:
            os.environ["REDOX_SANDBOX_CREDENTIALS"] = str(running.credentials_path)
            print(f"sandbox up in {time.perf_counter() - began:.1f} s", flush=True)
            configured = RedoxSettings.from_env().fhir_page_size
            page_size = (
                f"_count={configured} (REDOX_FHIR_PAGE_SIZE)"
                if configured
                else f"not sent (REDOX_FHIR_PAGE_SIZE unset), so the server's default of {DEFAULT_COUNT}"
            )
            truth = running.world.truth()
            bounds = floors(truth, first, last)
            incomplete = incomplete_embedded(truth, first, last)
            lag_from = running.world.clock - dt.timedelta(minutes=10)
            in_lag = sum(
                truth[t].filter(pl.col("last_updated") >= lag_from).height
                for t in ("patients", *CLINICAL_TIME)
            )
            runs: dict[str, tuple[pl.DataFrame, float, int]] = {}
            windows = {"full": (first, last), "again": (first, last), "recent": (recent_first, last)}
            for name, (a, b) in windows.items():
                run_id, seconds, queued = _sync(a, b)
                runs[name] = (spent(run_id), seconds, queued)
                total = int(runs[name][0]["requests"].sum())
                print(f"{name} sync {a}..{b}: {total:,} requests in {seconds:.0f} s", flush=True)
    lines = report(
        args, first, last, page_size, bounds, runs, incomplete, in_lag, (load_start, os.getloadavg()[0])
    )
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
