"""Identity benchmark: link N patient records (both surfaces) into persons, ours against plain Splink.

``python -m bench identity [--sizes 10000,100000,1000000] [--engines redox-etl,splink-defaults]``

For each size it generates N patient records with the sandbox's ``generate_patient_frame`` (same
noise model and hard groups as the sandbox world, with the truth ``person_id``), caches them as
Parquet, then runs each engine in a fresh subprocess and reads that child's peak RSS from the
kernel (``os.wait4``'s rusage, i.e. ``ru_maxrss`` of that one child):

- ``redox-etl``: ``transforms.identity`` end to end: train the model (u by random sampling, EM),
  score candidate pairs, deterministic identifier links, decide (thresholds, conflict rules,
  one-to-one), cluster into person keys, build golden records;
- ``splink-defaults``: a plain Splink 5 model on the same input and the same blocking rules, with
  the library's stock comparisons (``NameComparison``, ``DateOfBirthComparison``, ``ExactMatch``,
  ``JaroWinklerAtThresholds``, ``EmailComparison``), trained the same way (u by random sampling,
  EM), linked at the same probability threshold and clustered with Splink's connected components;
  no deterministic pass, no conflict rules, no one-to-one.

Both report precision/recall/F1 on cross-surface pairs against the truth. Output is counts, times and
metrics only (no record values). Numbers depend on the machine; the command and the machine are
printed with them.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

ENGINES = ("redox-etl", "splink-defaults")
GOAL_SECONDS = 300
GOAL_RSS_MB = 8192
THREADS = 2
MEMORY_LIMIT = "6GB"  # DuckDB's own cap; keeps the whole process under the 8 GB goal
NOW = datetime(2025, 1, 1, tzinfo=UTC)


# --- data ----------------------------------------------------------------------------------------


def generate(root: Path, size: int, seed: int) -> Path:
    from sandbox.population.people import generate_patient_frame

    path = root / f"patients-n{size}-s{seed}.parquet"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        generate_patient_frame(size, seed).write_parquet(tmp)
        tmp.replace(path)
    return path


def _truth(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select("person_id", surface="source_surface", source_patient_id="source_id")


# --- workers (one subprocess each) ---------------------------------------------------------------


def _work_redox(frame: pl.DataFrame, seed: int) -> dict[str, Any]:
    from transforms import identity as idn

    phases: dict[str, float] = {}
    pats = frame.drop("person_id")
    left, right = idn.split_surfaces(pats)
    t = time.perf_counter()
    model = idn.train_model(left, right, seed=seed, threads=THREADS, memory_limit=MEMORY_LIMIT)
    phases["train"] = time.perf_counter() - t
    t = time.perf_counter()
    scored = idn.score_pairs(left, right, model, threads=THREADS, memory_limit=MEMORY_LIMIT)
    phases["score"] = time.perf_counter() - t
    t = time.perf_counter()
    exact = idn.deterministic_links(left, right).collect()
    links, review = idn.decide(pl.concat([exact, scored]), now=NOW)
    crosswalk, _ = idn.cluster(pats, links, now=NOW)
    phases["decide+cluster"] = time.perf_counter() - t
    t = time.perf_counter()
    persons = idn.golden_records(pats, crosswalk)
    phases["golden"] = time.perf_counter() - t
    metrics = idn.evaluate(crosswalk, _truth(frame))
    return {
        "phases": phases,
        "candidate_pairs": scored.height + exact.height,
        "links": links.height,
        "review": review.height,
        "persons": persons.height,
        **metrics,
    }


def _work_splink(frame: pl.DataFrame, seed: int) -> dict[str, Any]:
    import duckdb
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    from transforms import identity as idn

    phases: dict[str, float] = {}
    t = time.perf_counter()
    # Raw columns for the comparisons; our blocking keys (dob_key, soundexes, zip5, digits-only
    # SSN/phone, lowercased email) so both engines see the same candidate pairs.
    keys = idn.features(frame.lazy()).select(
        "source_surface", "source_id", "dob_key", "family_sx", "given_sx", "zip5", "ssn", "phone", "email"
    )
    raw = frame.select(
        "source_surface",
        "source_id",
        "given_name",
        "family_name",
        "birth_date",
        "sex",
        "address_line",
        "address_postal_code",
    )
    data = (
        raw.lazy()
        .join(keys, on=["source_surface", "source_id"])
        .sort("source_surface", "source_id")
        .with_row_index("unique_id")
        .with_columns(pl.col("unique_id").cast(pl.Int64))
        .collect()
    )
    con = duckdb.connect(":memory:", config={"threads": THREADS, "memory_limit": MEMORY_LIMIT})
    con.execute("SET enable_progress_bar = false")
    db = DuckDBAPI(con)
    cols = [c for c in data.columns if c != "source_id"]
    fhir = db.register(
        data.filter(pl.col("source_surface") == "fhir").select(cols).to_arrow(), dataset_display_name="a"
    )
    dm = db.register(
        data.filter(pl.col("source_surface") == "datamodel").select(cols).to_arrow(), dataset_display_name="b"
    )
    settings = SettingsCreator(
        link_type="link_only",
        comparisons=[
            cl.NameComparison("given_name"),
            cl.NameComparison("family_name"),
            cl.DateOfBirthComparison("birth_date", input_is_string=False),
            cl.ExactMatch("sex"),
            cl.ExactMatch("ssn"),
            cl.JaroWinklerAtThresholds("address_line"),
            cl.ExactMatch("address_postal_code"),
            cl.ExactMatch("phone"),
            cl.EmailComparison("email"),
        ],
        blocking_rules_to_generate_predictions=[{"blocking_rule": r} for r in idn.BLOCKING_RULES],
        retain_matching_columns=False,
    )
    linker = Linker([fhir, dm], settings, log_level=None)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("given_name", "family_name", "birth_date")], recall=0.7
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=2e6, seed=seed)
    for rule in (block_on("birth_date"), block_on("given_name", "family_name")):
        linker.training.estimate_parameters_using_expectation_maximisation(rule, max_pairs=2e6)
    phases["train"] = time.perf_counter() - t
    t = time.perf_counter()
    predictions = linker.inference.predict(threshold_match_probability=0.2, warning_mode="never")
    candidates = con.sql(f"SELECT count(*) FROM {predictions.physical_name}").fetchone()
    phases["score"] = time.perf_counter() - t
    t = time.perf_counter()
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        predictions, threshold_match_probability=idn.LINK_THRESHOLD
    )
    assigned = pl.from_arrow(
        con.sql(f"SELECT unique_id, cluster_id FROM {clusters.physical_name}").to_arrow_table()
    )
    assert isinstance(assigned, pl.DataFrame)
    phases["cluster"] = time.perf_counter() - t
    crosswalk = assigned.join(data.select("unique_id", "source_surface", "source_id"), on="unique_id").select(
        person_key=pl.col("cluster_id").cast(pl.String),
        source_surface="source_surface",
        source_id="source_id",
    )
    metrics = idn.evaluate(crosswalk, _truth(frame))
    links = con.sql(
        f"SELECT count(*) FROM {predictions.physical_name} WHERE match_probability >= {idn.LINK_THRESHOLD}"
    ).fetchone()
    return {
        "phases": phases,
        "candidate_pairs": int(candidates[0]) if candidates else 0,
        "links": int(links[0]) if links else 0,
        "review": None,
        "persons": crosswalk["person_key"].n_unique(),
        **metrics,
    }


WORKERS = {"redox-etl": _work_redox, "splink-defaults": _work_splink}


def _worker(engine: str, data: Path, seed: int) -> None:
    import logging

    logging.disable(logging.WARNING)  # Splink warnings are about parameters, not useful here
    frame = pl.read_parquet(data)
    start = time.perf_counter()
    out = WORKERS[engine](frame, seed)
    seconds = time.perf_counter() - start
    print(json.dumps({"engine": engine, "records": frame.height, "seconds": seconds, **out}))


def _measure(engine: str, data: Path, seed: int, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.identity",
        "--worker",
        engine,
        "--data",
        str(data),
        "--seed",
        str(seed),
    ]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
                _, status, usage = os.wait4(child.pid, 0)
                return {"engine": engine, "error": f"timed out after {timeout:.0f}s"}
            time.sleep(0.2)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            # The worker prints no record values; its traceback may hold SQL, so only the tail.
            return {"engine": engine, "error": err.read()[-1500:]}
        result = dict(json.loads(out.read().strip().splitlines()[-1]))
    result["peak_mb"] = usage.ru_maxrss / 1024  # Linux reports kilobytes
    return result


# --- driver --------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench identity", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated record counts")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    parser.add_argument("--data-root", default=None, help="where generated records are cached")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, Path(args.data), args.seed)
        return 0

    root = Path(args.data_root or Path(tempfile.gettempdir()) / "redox-etl-bench-identity")
    engines = [e for e in args.engines.split(",") if e]
    print(f"# python -m bench identity {' '.join(argv or [])}".rstrip())
    print(
        f"# {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
        f"polars {pl.__version__}, duckdb threads={THREADS} memory_limit={MEMORY_LIMIT}"
    )
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        data = generate(root, size, args.seed)
        print(f"# {size:,} records in {data} ({time.perf_counter() - t0:.0f}s to prepare)", flush=True)
        for engine in engines:
            m = _measure(engine, data, args.seed, args.timeout)
            print(json.dumps({"size": size, **m}), flush=True)
            rows.append((size, m))
    print()
    print(
        "| records | engine | seconds | train / score / rest | peak RSS MB | candidate pairs | links "
        "| review | precision | recall | F1 |"
    )
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for size, m in rows:
        if "error" in m:
            print(f"| {size:,} | {m['engine']} | failed: {m['error'].splitlines()[-1][:80]} |||||||||")
            continue
        ph = m["phases"]
        rest = sum(v for k, v in ph.items() if k not in ("train", "score"))
        print(
            f"| {size:,} | {m['engine']} | {m['seconds']:.1f} | {ph['train']:.0f} / {ph['score']:.0f} / {rest:.0f} "
            f"| {m['peak_mb']:,.0f} | {m['candidate_pairs']:,} | {m['links']:,} | {_fmt(m['review'], ',')} "
            f"| {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} |"
        )
    for size, m in rows:
        if m.get("engine") == "redox-etl" and "error" not in m:
            ok = m["seconds"] < GOAL_SECONDS and m["peak_mb"] < GOAL_RSS_MB
            verdict = "meets" if ok else "BEHIND"
            print(
                f"\n{size:,} records: {m['seconds']:.0f}s, {m['peak_mb']:,.0f} MB peak -> {verdict} "
                f"the goal (< {GOAL_SECONDS}s, < {GOAL_RSS_MB // 1024} GB)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
