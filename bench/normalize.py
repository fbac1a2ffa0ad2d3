"""Normalization benchmark: raw FHIR searchset pages -> the unified tables, against DuckDB and polars.

``python -m bench normalize [--sizes 200000,2000000] [--repeat 3] [--page-size 1000]``

For each size it generates synthetic FHIR Bundle pages (rendered by the sandbox's own FHIR renderers,
compact JSON, with local-offset timestamps) split over the four entities (10% Patient, 20%
Encounter, 50% Observation, 20% Appointment), stores them as the landing zone does (Parquet,
one row per page, ``resources.landing.PAGES_PER_ROW_GROUP`` pages per row group) and as NDJSON (one
page per line), then measures, each in a fresh subprocess so peak RSS is that measurement's own:

- ``redox-etl``: ``transforms.fhir.<entity>(pages)`` for the four entities, streamed into Parquet;
- ``duckdb``: ``read_json`` of the NDJSON pages with an explicit type covering the same fields,
  unnested and projected to the same leaf columns (decode + flatten only: no ValueSet mapping,
  timestamp conversion, quarantine or dedupe), written to Parquet;
- ``polars-ndjson``: a plain ``pl.read_ndjson`` of the NDJSON pages (schema inferred, no projection).

It prints a Markdown table (median of ``--repeat`` runs) and a JSON line per measurement. Numbers
depend on the machine; the command and the machine are printed with them.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl

MIX = {"patients": 0.10, "encounters": 0.20, "results": 0.50, "appointments": 0.20}
RESOURCE = {
    "patients": "Patient",
    "encounters": "Encounter",
    "results": "Observation",
    "appointments": "Appointment",
}
ENGINES = ("redox-etl", "duckdb", "polars-ndjson")
GOAL_RATE = 300_000
GOAL_RSS_MB = 1024


# --- data ----------------------------------------------------------------------------------------


def _records(entity: str, n: int, seed: int) -> list[dict[str, Any]]:
    from sandbox import fhir as sfhir
    from sandbox.model import Appointment, Encounter, Identifier, Patient, Result, Version

    tz = timezone(timedelta(hours=-5))
    base = datetime(2026, 11, 1, 13, 0, tzinfo=UTC)
    out = []
    for i in range(n):
        k = seed * 10_000_000 + i
        when = base + timedelta(minutes=i % 1440)
        rec: Any
        if entity == "patients":
            rec = Patient(
                surface="fhir",
                source_id=f"p{k}",
                person_id=f"person{k}",
                identifiers=(Identifier("urn:oid:1.2.3.4", f"MR{k:08d}"),),
                given_name=("Ann", "Bob", "Cy", "Dee")[i % 4],
                middle_name="Q" if i % 3 else None,
                family_name=("Smith", "Jones", "Lee")[i % 3],
                birth_date=date(1950 + i % 60, 1 + i % 12, 1 + i % 28),
                sex=("male", "female", "other", "unknown")[i % 4],
                ssn=f"{100 + i % 800:03d}-{10 + i % 80:02d}-{i % 10000:04d}",
                address_line=f"{i % 9999} Main St",
                address_city="Madison",
                address_state="WI",
                address_postal_code=f"{53000 + i % 999}",
                phone=f"+1608555{i % 10000:04d}",
                email=f"p{k}@example.org",
            )
        elif entity == "encounters":
            rec = Encounter(
                surface="fhir",
                source_id=f"e{k}",
                patient_source_id=f"p{k // 2}",
                encounter_class=("ambulatory", "emergency", "inpatient", "observation", "virtual")[i % 5],
                type_code="185349003",
                type_system="http://snomed.info/sct",
                type_display="Encounter for check up",
                status=("planned", "arrived", "in-progress", "finished", "cancelled")[i % 5],
                start_at=when,
                end_at=when + timedelta(minutes=30),
                location="Clinic A",
                attending_provider_id=f"{1000000000 + i % 500}",
                attending_provider_name="Pat Granite",
                reason="Check up",
            )
        elif entity == "results":
            numeric = i % 4 != 0
            rec = Result(
                surface="fhir",
                source_id=f"o{k}",
                patient_source_id=f"p{k // 5}",
                order_id=f"sr{k // 3}",
                code="2345-7",
                code_system="http://loinc.org",
                display="Glucose [Mass/volume] in Serum or Plasma",
                value_num=70.0 + i % 90 if numeric else None,
                value_text=None if numeric else "Positive",
                unit="mg/dL" if numeric else None,
                reference_low=70.0 if numeric else None,
                reference_high=99.0 if numeric else None,
                reference_text=None,
                abnormal_flag=("normal", "low", "high", "critical_low", "critical_high", "abnormal")[i % 6],
                status=("final", "preliminary", "corrected")[i % 3],
                effective_at=when,
            )
        else:
            rec = Appointment(
                surface="fhir",
                source_id=f"a{k}",
                patient_source_id=f"p{k // 2}",
                status=("booked", "arrived", "fulfilled", "cancelled", "noshow")[i % 5],
                start_at=when,
                end_at=when + timedelta(minutes=20),
                duration_min=20,
                type_code="FOLLOWUP",
                type_display="Follow-up",
                location="Clinic B",
                provider_id=f"{1000000000 + i % 500}",
                provider_name="Sharon Chalk",
                reason="Follow up",
            )
        version = Version(kind=entity, record=rec, seq=i + 1, last_updated=when)  # type: ignore[arg-type]
        out.append(sfhir.RENDERERS[RESOURCE[entity]](version, tz))
    return out


def generate(folder: Path, total: int, page_size: int, seed: int = 1) -> dict[str, int]:
    """Write <entity>.parquet (raw_ref, body) and <entity>.ndjson (one page per line)."""
    from resources.landing import PAGES_PER_ROW_GROUP

    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for entity, share in MIX.items():
        n = int(total * share)
        counts[entity] = n
        parquet, ndjson = folder / f"{entity}.parquet", folder / f"{entity}.ndjson"
        if parquet.exists() and ndjson.exists():
            continue
        refs: list[str] = []
        bodies: list[str] = []
        done = 0
        while done < n:
            chunk = _records(entity, min(page_size, n - done), seed * 100 + len(bodies))
            # Distinct ids per page: the seed above makes each page's ids unique.
            entries = [
                {
                    "fullUrl": f"https://sandbox.local/fhir/R4/{RESOURCE[entity]}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in chunk
            ]
            body = {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": n,
                "link": [{"relation": "self", "url": "https://sandbox.local/fhir/R4/x/_search"}],
                "entry": entries,
            }
            refs.append(f"fhir/{entity}/day=2026-11-01/page-{len(bodies) + 1:05d}")
            bodies.append(json.dumps(body, separators=(",", ":")))
            done += len(chunk)
        # Row groups as the landing zone writes them: the streaming engine reads a row group's
        # pages at a time, so their size decides how much page text is in flight.
        pl.DataFrame({"raw_ref": refs, "body": bodies}).write_parquet(
            parquet, compression="zstd", row_group_size=PAGES_PER_ROW_GROUP
        )
        with ndjson.open("w") as f:
            for b in bodies:
                f.write(b)
                f.write("\n")
    return counts


# --- workers (run in a subprocess each) ----------------------------------------------------------


def _duck_type(dtype: Any) -> str:
    if isinstance(dtype, pl.Struct):
        return "STRUCT(" + ", ".join(f'"{f.name}" {_duck_type(f.dtype)}' for f in dtype.fields) + ")"
    if isinstance(dtype, pl.List):
        return _duck_type(dtype.inner) + "[]"
    if dtype == pl.Float64:
        return "DOUBLE"
    return "VARCHAR"


def _leaves(dtype: pl.Struct, prefix: str) -> list[str]:
    """DuckDB expressions for every non-list leaf of the struct (lists: their first element)."""
    out = []
    for f in dtype.fields:
        path = f'{prefix}."{f.name}"'
        inner = f.dtype
        if isinstance(inner, pl.List):
            path, inner = f"{path}[1]", inner.inner
            if isinstance(inner, pl.List):
                continue
        if isinstance(inner, pl.Struct):
            out += _leaves(inner, path)
        else:
            out.append(path)
    return out


def _work_redox(folder: Path, out: Path) -> int:
    from transforms import fhir

    rows = 0
    for entity in MIX:
        pages = pl.scan_parquet(folder / f"{entity}.parquet")
        frame = getattr(fhir, entity)(pages)
        target = out / f"{entity}.parquet"
        frame.sink_parquet(target)
        rows += pl.scan_parquet(target).select(pl.len()).collect().item()
    return rows


def _work_duckdb(folder: Path, out: Path) -> int:
    import duckdb

    from transforms import fhir

    con = duckdb.connect()
    rows = 0
    for entity in MIX:
        res = fhir.RESOURCE_DTYPES[entity]
        columns = {"resourceType": "VARCHAR", "entry": f"STRUCT(resource {_duck_type(res)})[]"}
        cols = ", ".join(f"{e} AS c{i}" for i, e in enumerate(_leaves(res, "e.resource")))
        src = str(folder / f"{entity}.ndjson")
        target = str(out / f"{entity}.parquet")
        struct = "{" + ", ".join(f"'{k}': '{v}'" for k, v in columns.items()) + "}"
        con.execute(
            f"COPY (SELECT {cols} FROM (SELECT unnest(entry) AS e FROM read_json(?, format='newline_delimited', "
            f"columns={struct}, maximum_object_size=268435456))) TO '{target}' (FORMAT parquet)",
            [src],
        )
        rows += con.execute("SELECT count(*) FROM read_parquet(?)", [target]).fetchone()[0]  # type: ignore[index]
    return rows


def _work_ndjson(folder: Path, out: Path) -> int:
    rows = 0
    for entity in MIX:
        frame = pl.read_ndjson(folder / f"{entity}.ndjson")
        rows += int(frame.select(pl.col("entry").list.len().sum()).item())
    return rows


WORKERS = {"redox-etl": _work_redox, "duckdb": _work_duckdb, "polars-ndjson": _work_ndjson}


def _worker(engine: str, folder: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rows = WORKERS[engine](folder, Path(tmp))
        seconds = time.perf_counter() - start
    print(json.dumps({"engine": engine, "rows": rows, "seconds": seconds, "peak_mb": _peak_rss_kb() / 1024}))


def _peak_rss_kb() -> int:
    """This process's own high-water RSS. Not getrusage's ru_maxrss: on Linux that survives exec
    and would report the forking parent's size for a fresh worker."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure(engine: str, folder: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.normalize", "--worker", engine, "--data", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- driver --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench normalize", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200000,2000000", help="comma-separated resource counts")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument(
        "--slow-repeat",
        type=int,
        default=1,
        help="repetitions of polars-ndjson at 1M+ resources (it takes ~10 min per run at 2M on 2 cores)",
    )
    parser.add_argument("--data-root", default=None, help="where generated pages are cached")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, Path(args.data))
        return 0

    root = Path(args.data_root or Path(tempfile.gettempdir()) / "redox-etl-bench-normalize")
    engines = [e for e in args.engines.split(",") if e]
    print(f"# python -m bench normalize {' '.join(argv or [])}".rstrip())
    print(
        f"# {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, polars {pl.__version__}"
    )
    # Imported here, not at the top: workers must not carry Dagster (resources imports it) in their RSS.
    from resources.landing import PAGES_PER_ROW_GROUP

    table = []
    for size in (int(s) for s in args.sizes.split(",")):
        # The row group size is in the name so a cache written with another one is not reused.
        folder = root / f"n{size}-p{args.page_size}-rg{PAGES_PER_ROW_GROUP}"
        t0 = time.perf_counter()
        counts = generate(folder, size, args.page_size)
        total = sum(counts.values())
        print(
            f"# {size}: {total} resources in {folder} ({time.perf_counter() - t0:.0f}s to prepare)",
            flush=True,
        )
        for engine in engines:
            runs = []
            repeat = args.slow_repeat if engine == "polars-ndjson" and size >= 1_000_000 else args.repeat
            for _ in range(repeat):
                m = _measure(engine, folder)
                print(json.dumps({"size": size, **m}), flush=True)
                runs.append(m)
            print("# load average: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()), flush=True)
            seconds = statistics.median(r["seconds"] for r in runs)
            peak = statistics.median(r["peak_mb"] for r in runs)
            table.append((size, engine, total, runs[0]["rows"], seconds, total / seconds, peak, repeat))
    print()
    print("| resources | engine | rows out | runs | seconds (median) | resources/s | peak RSS MB (median) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for _size, engine, total, rows, seconds, rate, peak, repeat in table:
        print(f"| {total:,} | {engine} | {rows:,} | {repeat} | {seconds:.2f} | {rate:,.0f} | {peak:,.0f} |")
    ours = [row for row in table if row[1] == "redox-etl"]
    for _size, _, total, _, _, rate, peak, _ in ours:
        verdict = "meets" if rate >= GOAL_RATE and peak < GOAL_RSS_MB else "BEHIND"
        print(
            f"\n{total:,} resources: {rate:,.0f}/s, {peak:,.0f} MB peak -> {verdict} the goal (>= 300k/s, < 1 GB)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
