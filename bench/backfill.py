"""``python -m bench backfill``: how much of Redox's rate budget a backfill spends, at real latency.

Each measurement is a fresh process with a fresh ``REDOX_ETL_HOME`` and ``DAGSTER_HOME``. It starts
the sandbox of *this* tree (``redox-etl sandbox serve`` with ``--profile``, ``--latency`` and Redox's
limit, 7,500 requests per rolling 300 s, in its own process), then runs ``redox-etl backfill
--start --end`` (a real Dagster backfill run by ``dagster-daemon``) from the tree being measured:
this one, or with ``--baseline-tree PATH`` a checkout of older code with its own ``.venv`` (the code
before a change, against the same sandbox), so both are measured in the same invocation.

Figures, per measurement:
- **achieved rate**: requests / (last answer - first request), from the lake's ``api_calls``
  (every HTTP attempt, tokens included), as a share of the limit (25 requests/s);
- **wall / floor**: the backfill command's wall time against the floor, requests / 25 per s;
- **requests per record** against the floor the two APIs allow: one Data Model query per day and
  clinical stream plus one PatientSearch per patient no visit or booking carried (results carry
  identifiers only); one FHIR search page per 1,000 records (the sandbox's ``_count`` maximum) per
  day and stream plus one Patient search per 50 patients;
- 429s and the sandbox's peak count in any rolling window, against the limit;
- CPU seconds of the pipeline's process tree and its largest process's peak RSS.

``--demo`` adds ``redox-etl demo`` (what ``make demo`` runs: its own sandbox, a 21-day sync), with
its wall time against its floor. Never part of the test suite's pass/fail.
"""

import argparse
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx

from bench.e2e import _adopt_orphans, _reap

ROOT = Path(__file__).resolve().parent.parent
LIMIT = (7500, 300.0)
RATE = LIMIT[0] / LIMIT[1]
RESULT = "BENCH-RESULT "
FHIR_PAGE_MAX = 1000
FHIR_PATIENT_BATCH = 50
CLINICAL = ("encounters", "results", "appointments")


def _cli(tree: Path) -> str:
    return str(tree / ".venv" / "bin" / "redox-etl")


def _start_sandbox(home: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    state = home / "sandbox"
    command = [
        _cli(ROOT),
        "sandbox",
        "serve",
        "--state-dir",
        str(state),
        "--start",
        args.start,
        "--end",
        args.end,
        "--rate-limit",
        f"{LIMIT[0]}/{LIMIT[1]:g}",
        "--latency",
        args.latency,
    ]
    if args.profile:
        command += ["--profile", args.profile]
    else:
        command += ["--patients", str(args.patients)]
    command += args.sandbox_args.split()
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + args.sandbox_timeout
    record = state / "server.json"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"sandbox exited: {(server.stderr.read() if server.stderr else b'').decode()[-2000:]}"
            )
        if record.exists():
            try:
                return server, str(json.loads(record.read_text())["base_url"])
            except (ValueError, KeyError):
                pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the sandbox did not start in time")


# Width of the request series' buckets: a tenth of Redox's window, long enough to even out pacing.
BUCKET_S = 30


def _lake_figures() -> dict[str, Any]:
    from resources import configured_warehouse

    lake = configured_warehouse()
    calls = lake.query(
        "SELECT count(*) AS requests, count(*) FILTER (WHERE status = 429) AS status_429,"
        " epoch(max(called_at + to_milliseconds(CAST(latency_ms AS BIGINT))) - min(called_at)) AS span_s,"
        " count(*) FILTER (WHERE surface = 'auth') AS auth FROM api_calls"
    ).row(0, named=True)
    days = {}
    floor = 0
    records = 0
    for table in CLINICAL:
        parent = " AND parent_source_id IS NULL" if table == "results" else ""
        frame = lake.query(
            f"SELECT source_surface, partition_day, count(*) AS n FROM {table}"
            f" WHERE TRUE{parent} GROUP BY ALL"
        )
        for surface, day, n in frame.iter_rows():
            records += int(n)
            days[day] = True
            floor += 1 if surface == "datamodel" else math.ceil(n / FHIR_PAGE_MAX)
    patients = lake.query("SELECT source_surface, count(*) AS n FROM patients GROUP BY ALL")
    for surface, n in patients.iter_rows():
        records += int(n)
        if surface == "fhir":
            floor += math.ceil(n / FHIR_PATIENT_BATCH)
    # Data Model visits and bookings carry their patient whole; results carry identifiers only, so a
    # patient seen only in results needs its own PatientSearch.
    floor += int(
        lake.query(
            "SELECT count(DISTINCT patient_source_id) AS n FROM results WHERE source_surface = 'datamodel'"
            " AND patient_source_id NOT IN (SELECT patient_source_id FROM encounters"
            " WHERE source_surface = 'datamodel' UNION SELECT patient_source_id FROM appointments"
            " WHERE source_surface = 'datamodel')"
        ).item()
    )
    # Requests per BUCKET_S from the first: where the budget sags (run start-up, a stream's tail).
    series = lake.query(
        f"SELECT CAST(floor(epoch(called_at - (SELECT min(called_at) FROM api_calls)) / {BUCKET_S}) AS INT)"
        " AS b, count(*) AS n FROM api_calls GROUP BY ALL ORDER BY b"
    )
    per_bucket = dict(series.iter_rows())
    return {
        "per_bucket": [int(per_bucket.get(b, 0)) for b in range(max(per_bucket, default=-1) + 1)],
        "requests": int(calls["requests"] or 0),
        "status_429": int(calls["status_429"] or 0),
        "auth": int(calls["auth"] or 0),
        "span_s": float(calls["span_s"] or 0.0),
        "records": records,
        "request_floor": floor,
        "days_landed": len(days),
    }


def _child(args: argparse.Namespace) -> dict[str, Any]:
    tree = Path(args.tree)
    home = Path(os.environ["REDOX_ETL_HOME"])
    _adopt_orphans()
    if args.child == "demo":
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        done = subprocess.run([_cli(tree), "demo"], cwd=tree, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([_cli(tree), "sandbox", "stop"], cwd=tree, capture_output=True, check=False)
        stats: dict[str, Any] = {}
        steps: list[str] = []
    else:
        server, base_url = _start_sandbox(home, args)
        try:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            began = time.perf_counter()
            began_epoch = time.time()
            done = subprocess.run(
                [_cli(tree), "backfill", "--start", args.start, "--end", args.end],
                cwd=tree,
                capture_output=True,
                text=True,
                check=False,
            )
            wall = time.perf_counter() - began
            steps = _step_timeline(began_epoch)
            _reap()
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            stats = httpx.get(f"{base_url}/sandbox/stats", timeout=60).json()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    # A failed backfill is a figure too (the code measured could not do it): its last lines are
    # the CLI's own one-screen error, which carries no patient value.
    failure = "" if done.returncode == 0 else "\n".join((done.stdout + done.stderr).splitlines()[-12:])
    peaks = stats.get("rate_limit", {}).get("peak_in_window", {})
    return {
        "ok": done.returncode == 0,
        "failure": failure,
        "stats_413_504": [int(stats.get("responses_413", 0)), int(stats.get("responses_504", 0))],
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mb": after.ru_maxrss / 1024,
        "sandbox_429": int(stats.get("responses_429", 0)),
        "peak_in_window": max(peaks.values(), default=0) if isinstance(peaks, dict) else int(peaks or 0),
        "steps": steps,
        **_lake_or_nothing(),
    }


def _step_timeline(began: float) -> list[str]:
    """Each run's steps as 'step start-end' in seconds from the backfill command's start: where runs
    wait for each other (the writer pool, run start-up) while the budget idles."""
    import dagster as dg

    out: list[str] = []
    try:
        with dg.DagsterInstance.get() as instance:
            for run in reversed(instance.get_runs()):
                for step in instance.get_run_step_stats(run.run_id):
                    if step.start_time and step.end_time:
                        out.append(
                            f"{run.run_id[:6]} {step.step_key} {step.start_time - began:.0f}-{step.end_time - began:.0f}"
                        )
    except Exception as exc:  # a figure for diagnosis only: its absence must not fail the bench
        out.append(f"no step timeline: {type(exc).__name__}")
    return out


def _lake_or_nothing() -> dict[str, Any]:
    try:
        return _lake_figures()
    except Exception as exc:  # a backfill that failed before its first load leaves no lake
        print(f"no lake figures: {type(exc).__name__}", file=sys.stderr)
        zero = ("requests", "status_429", "auth", "records", "request_floor", "days_landed")
        return {**dict.fromkeys(zero, 0), "span_s": 0.0}


def _spawn(kind: str, label: str, tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-backfill-{kind}-") as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDOX_", "DAGSTER_"))}
        env["REDOX_ETL_HOME"] = folder
        env["DAGSTER_HOME"] = str(Path(folder) / "dagster")
        command = [
            sys.executable,
            "-m",
            "bench",
            "backfill",
            "--child",
            kind,
            "--tree",
            str(tree),
            "--start",
            args.start,
            "--end",
            args.end,
            "--latency",
            args.latency,
            "--patients",
            str(args.patients),
            "--sandbox-timeout",
            str(args.sandbox_timeout),
            f"--sandbox-args={args.sandbox_args}",
        ]
        if args.profile:
            command += ["--profile", args.profile]
        load = os.getloadavg()[0]
        options = f", sandbox options {args.sandbox_args!r}" if args.sandbox_args else ""
        print(f"{label}: started {time.strftime('%H:%M:%S')}, load {load:.1f}{options}", flush=True)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode != 0 or not lines:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
            raise RuntimeError(f"{label} failed ({done.returncode}):\n{tail}")
        figures: dict[str, Any] = json.loads(lines[-1][len(RESULT) :])
        figures["label"] = label
        figures["load"] = statistics.mean([load, os.getloadavg()[0]])
        print(f"{label}: {json.dumps(figures)}", flush=True)
        return figures


def _row(f: dict[str, Any]) -> str:
    if not f["ok"]:
        return f"| {f['label']} | failed: {' '.join(f['failure'].split())[-300:]} |"
    floor_s = f["requests"] / RATE
    rate = f["requests"] / f["span_s"] / RATE if f["span_s"] else float("nan")
    return (
        f"| {f['label']} | {f['requests']:,} | {f['span_s']:.0f} s | {rate:.2f} | {f['wall_s']:.0f} s "
        f"| {floor_s:.0f} s | {f['wall_s'] / floor_s:.2f} | {f['requests'] / max(f['records'], 1):.3f} "
        f"({f['request_floor'] / max(f['records'], 1):.3f}) | {f['status_429']} / {f['sandbox_429']} "
        f"| {f['peak_in_window']:,} | {f['cpu_s']:.0f} | {f['peak_rss_mb']:.0f} MB | {f['load']:.1f} |"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench backfill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", required=True, help="first backfilled day (YYYY-MM-DD)")
    parser.add_argument("--end", required=True, help="last backfilled day (YYYY-MM-DD)")
    parser.add_argument(
        "--profile", default="hospital", help="sandbox population profile ('' for --patients)"
    )
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--latency", default="realistic", help="sandbox latency model")
    parser.add_argument(
        "--baseline-tree", type=Path, help="a checkout of the code to compare, with its .venv"
    )
    parser.add_argument(
        "--baseline-end",
        help="last day the baseline backfills (default --end): a shorter window for slow code",
    )
    parser.add_argument("--zero-latency-end", help="also backfill --start..this day with --latency none")
    parser.add_argument("--demo", action="store_true", help="also time `redox-etl demo` (make demo's sync)")
    parser.add_argument("--demo-only", action="store_true", help="only `redox-etl demo` (no backfill)")
    parser.add_argument("--sandbox-timeout", type=float, default=600.0)
    parser.add_argument(
        "--sandbox-args", default="", help="more `sandbox serve` options, e.g. '--max-response-records 99999'"
    )
    parser.add_argument(
        "--baseline-sandbox-args",
        default="",
        help="`sandbox serve` options for the baseline's sandbox only (code that cannot split a refused window)",
    )
    parser.add_argument("--child", choices=("backfill", "demo"), help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        warnings.simplefilter("ignore")
        print(RESULT + json.dumps(_child(args)), flush=True)
        return 0

    print(f"# uv run --frozen python -m bench backfill {' '.join(argv)}".rstrip(), flush=True)
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    rows: list[dict[str, Any]] = []

    def measure(kind: str, label: str, tree: Path, **changes: Any) -> None:
        rows.append(_spawn(kind, label, tree, argparse.Namespace(**{**vars(args), **changes})))

    window = f"{args.start}..{args.end}"
    # The baseline's sandbox takes the baseline's own options after the shared ones (later wins).
    baseline_sandbox = f"{args.sandbox_args} {args.baseline_sandbox_args}".strip()
    if args.demo_only:
        args.demo, args.zero_latency_end = True, None
    if args.baseline_tree and not args.demo_only:
        end = args.baseline_end or args.end
        measure(
            "backfill",
            f"baseline, {args.latency} latency, {args.start}..{end}",
            args.baseline_tree,
            end=end,
            sandbox_args=baseline_sandbox,
        )
    if not args.demo_only:
        measure("backfill", f"this tree, {args.latency} latency, {window}", ROOT)
    if args.zero_latency_end:
        zero = f"{args.start}..{args.zero_latency_end}"
        if args.baseline_tree:
            measure(
                "backfill",
                f"baseline, no latency, {zero}",
                args.baseline_tree,
                end=args.zero_latency_end,
                latency="none",
                sandbox_args=baseline_sandbox,
            )
        measure("backfill", f"this tree, no latency, {zero}", ROOT, end=args.zero_latency_end, latency="none")
    if args.demo:
        if args.baseline_tree:
            measure("demo", "baseline, `redox-etl demo`", args.baseline_tree)
        measure("demo", "this tree, `redox-etl demo`", ROOT)
    print()
    print(
        f"Sandbox profile {args.profile or f'{args.patients} persons'}; Redox's limit "
        f"({LIMIT[0]:,}/{LIMIT[1]:.0f} s = {RATE:g}/s) on both sides.\n"
    )
    print(
        "| measurement | requests | first request to last answer | achieved rate / limit | wall | floor "
        "(requests / 25 per s) | wall / floor | requests per record (floor) | 429s client / sandbox "
        "| sandbox's peak in any window | CPU s | peak RSS | load |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_row(row))
    print()
    for row in rows:
        print(
            f"- {row['label']}: sandbox answered 413 x{row['stats_413_504'][0]}, 504 x{row['stats_413_504'][1]}"
        )
    print(f"\nRequests per {BUCKET_S} s from the first (the limit allows {RATE * BUCKET_S:.0f}):\n")
    for row in rows:
        if row.get("per_bucket"):
            print(f"- {row['label']}: {' '.join(str(n) for n in row['per_bucket'])}")
    for row in rows:
        if row.get("steps"):
            print(f"\nSteps of {row['label']} (seconds from the command's start):\n")
            print("\n".join(f"    {line}" for line in row["steps"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
