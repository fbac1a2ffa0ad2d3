"""``python -m bench e2e``: end-to-end wall time of ``make demo``'s sync and of a 30-day backfill.

(a) demo: what ``redox-etl demo`` does (pipelines/demo.py): a sandbox of ``--patients`` persons in
its own process (its defaults: Redox's rate limit 7500/300 s), then ``runner.sync`` of the last
``--days`` days (today included) as one real Dagster run of ``daily_sync`` (identity included) on a
persistent instance. Sandbox start and sync are timed apart; median of ``--repeat`` runs, each in a
fresh process with a fresh ``REDOX_ETL_HOME`` and ``DAGSTER_HOME``.

(b) backfill: ``runner.backfill`` of the ``--backfill-days`` days before today (a real Dagster
backfill run by a ``dagster-daemon`` subprocess) against a sandbox enforcing Redox's limit
(7500/300 s) with the client's budget at its defaults. The floor is the time the limit alone
imposes: requests spent (every ``api_calls`` row, tokens included) / (7500 / 300 s). The same
backfill then runs with the limit off on both sides (sandbox unlimited, client budget raised), so
the difference is the time spent waiting on the budget.

(c) budget (``--budget-limit N/SECONDS``): the same backfill against a sandbox whose limit is that
small, with the client's budget set to the same limit (``REDOX_RATE_LIMIT``, default margin), so the
requests outrun the limit and the instance's two concurrent runs (dagster.yaml) draw on one budget.
It reports 429s, the sandbox's peak count in any window against the limit, the achieved rate as a
fraction of the limit, and how many runs were in flight at once (from the run records).

CPU seconds are the whole process tree's user+system time (``RUSAGE_CHILDREN`` of this process),
so CPU share = CPU seconds / (wall x CPUs). Never part of the test suite's pass/fail.
"""

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REDOX_LIMIT = (7500, 300.0)
# Client budget for the "limit off" baseline: far above what a backfill can send.
UNLIMITED = "10000000/300"
RESULT = "BENCH-RESULT "


def _requests(run_ids: list[str] | None) -> dict[str, int]:
    from resources import configured_warehouse

    where = ""
    params: list[Any] = []
    if run_ids is not None:
        where, params = " WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [run_ids]
    frame = configured_warehouse().query(
        "SELECT count(*) AS requests, count(*) FILTER (WHERE surface = 'auth') AS auth, "
        f"count(*) FILTER (WHERE status = 429) AS status_429 FROM api_calls{where}",
        params,
    )
    return {k: int(v or 0) for k, v in frame.row(0, named=True).items()}


def _failed_steps(run_id: str) -> list[str]:
    """Step keys that failed (names only: error texts are not printed)."""
    import dagster as dg

    from pipelines import runner

    records = runner.instance().get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    return sorted({r.event_log_entry.step_key or "?" for r in records.records})


def _adopt_orphans() -> None:
    """Become the subreaper of this process tree (Linux): run workers the daemon launches and does not
    wait for are re-parented here, so reaping them adds their CPU time to ``RUSAGE_CHILDREN``."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def _reap(seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.2)


def _child_demo(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines import runner
    from resources import settings
    from sandbox.server import serve_in_subprocess

    end = dt.datetime.now(dt.UTC).date()
    start = end - dt.timedelta(days=args.days - 1)
    began = time.perf_counter()
    with serve_in_subprocess(state_dir=settings.sandbox_dir(), patients=args.patients):
        startup = time.perf_counter() - began
        began = time.perf_counter()
        run = runner.sync(start, end)
        seconds = time.perf_counter() - began
    return {
        "startup_s": startup,
        "sync_s": seconds,
        "status": run.status.value,
        "failed_steps": [] if run.is_success else _failed_steps(run.run_id),
        "window": f"{start}..{end}",
        **_requests([run.run_id]),
    }


def _child_backfill(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines import runner
    from resources import settings
    from sandbox.server import serve_in_subprocess

    end = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    start = end - dt.timedelta(days=args.backfill_days - 1)
    limit = None if args.unlimited else (args.limit or REDOX_LIMIT)
    _adopt_orphans()
    began = time.perf_counter()
    with serve_in_subprocess(
        state_dir=settings.sandbox_dir(), patients=args.patients, rate_limit=limit
    ) as running:
        startup = time.perf_counter() - began
        began = time.perf_counter()
        status, done, total = runner.backfill(start, end)
        seconds = time.perf_counter() - began
        import httpx

        stats = httpx.get(f"{running.base_url}/sandbox/stats").json()
    records = runner.instance().get_run_records()
    _reap()
    peaks = stats.get("rate_limit", {}).get("peak_in_window", {})
    return {
        "peak_in_window": max(peaks.values(), default=0),
        "max_runs_at_once": _most_at_once(
            [(r.start_time, r.end_time) for r in records if r.start_time and r.end_time]
        ),
        "startup_s": startup,
        "backfill_s": seconds,
        "status": status,
        "partitions": f"{done}/{total}",
        "window": f"{start}..{end}",
        "runs": len(records),
        "failed_runs": sum(1 for r in records if not r.dagster_run.is_success),
        "sandbox_429": int(stats.get("responses_429", 0)),
        **_requests(None),
    }


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (a sweep over start/end events, ends first on ties)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def _parse_limit(text: str) -> tuple[int, float]:
    count, _, seconds = text.partition("/")
    try:
        return int(count), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N/SECONDS, e.g. 150/30, not {text!r}") from None


def _spawn(
    kind: str, args: argparse.Namespace, *, unlimited: bool = False, limit: str | None = None
) -> dict[str, Any]:
    """One measurement in a fresh interpreter and a fresh state folder; returns its figures."""
    with tempfile.TemporaryDirectory(prefix=f"bench-e2e-{kind}-") as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDOX_", "DAGSTER_"))}
        env["REDOX_ETL_HOME"] = folder
        env["DAGSTER_HOME"] = str(Path(folder) / "dagster")
        if unlimited:
            env["REDOX_RATE_LIMIT"] = UNLIMITED
        if limit:
            env["REDOX_RATE_LIMIT"] = limit
        command = [
            sys.executable,
            "-m",
            "bench",
            "e2e",
            "--child",
            kind,
            "--patients",
            str(args.patients),
            "--days",
            str(args.days),
            "--backfill-days",
            str(args.backfill_days),
        ]
        if unlimited:
            command.append("--unlimited")
        if limit:
            command += ["--limit", limit]
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        # Our own interpreter running this module with arguments built above.
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - began
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if done.returncode != 0 or not lines:
            tail = "\n".join(done.stderr.splitlines()[-15:])
            raise RuntimeError(f"e2e {kind} child failed ({done.returncode}):\n{tail}")
        figures: dict[str, Any] = json.loads(lines[-1][len(RESULT) :])
        figures["process_s"] = wall
        figures["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        figures["load"] = max(load, os.getloadavg()[0])
        return figures


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1000, help="sandbox persons (demo: 1000)")
    parser.add_argument("--days", type=int, default=21, help="days the demo syncs (demo: 21)")
    parser.add_argument("--repeat", type=int, default=3, help="demo syncs; the figure is their median")
    parser.add_argument("--backfill-days", type=int, default=30)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-backfill", action="store_true")
    parser.add_argument(
        "--skip-unlimited", action="store_true", help="skip the backfill with the rate limit off"
    )
    parser.add_argument(
        "--budget-limit",
        type=_parse_limit,
        help="also backfill against a sandbox (and a client budget) limited to N/SECONDS, e.g. 150/30",
    )
    parser.add_argument("--skip-redox-limit", action="store_true", help="skip the backfills at Redox's limit")
    parser.add_argument("--child", choices=("demo", "backfill"), help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=_parse_limit, help=argparse.SUPPRESS)
    parser.add_argument("--unlimited", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        warnings.simplefilter("ignore")
        figures = _child_demo(args) if args.child == "demo" else _child_backfill(args)
        print(RESULT + json.dumps(figures), flush=True)
        return 0

    command = "uv run --frozen python -m bench e2e " + " ".join(argv)
    cpus = os.cpu_count() or 1
    print(f"# {command}".rstrip(), flush=True)
    print(f"load average {os.getloadavg()}, {cpus} CPUs", flush=True)
    lines: list[str] = []
    if not args.skip_demo:
        demos = []
        for n in range(args.repeat):
            row = _spawn("demo", args)
            demos.append(row)
            if row["status"] != "SUCCESS":
                print(f"demo {n + 1}: the sync ended {row['status']}, failed steps {row['failed_steps']}")
            print(
                f"demo {n + 1}: sandbox start {row['startup_s']:.1f} s, sync {row['sync_s']:.1f} s "
                f"({row['status']}), process {row['process_s']:.1f} s, {row['requests']:,} requests, "
                f"CPU {row['cpu_s']:.0f} s, load average {row['load']:.1f}",
                flush=True,
            )
        lines += [
            f"`make demo`'s sync: {args.patients:,} persons, {args.days} days "
            f"({demos[0]['window']}), median of {len(demos)}:",
            "",
            "| figure | median | runs |",
            "|---|---:|---|",
            *(
                f"| {label} | {_median(demos, key):.1f} s | "
                + ", ".join(f"{r[key]:.1f}" for r in demos)
                + " |"
                for label, key in (
                    ("sandbox start (spawn to credentials.json)", "startup_s"),
                    ("sync (runner.sync, one Dagster run)", "sync_s"),
                    ("whole process (imports, sandbox, sync)", "process_s"),
                    ("CPU seconds, whole process tree", "cpu_s"),
                )
            ),
            f"| requests (api_calls of the run) | {_median(demos, 'requests'):,.0f} | "
            + ", ".join(f"{r['requests']:,}" for r in demos)
            + " |",
            f"| 1-minute load average | {_median(demos, 'load'):.1f} | "
            + ", ".join(f"{r['load']:.1f}" for r in demos)
            + " |",
            "",
        ]
    if not args.skip_backfill and not args.skip_redox_limit:
        limited = _spawn("backfill", args)
        print(f"backfill (rate limited): {json.dumps(limited)}", flush=True)
        rate = REDOX_LIMIT[0] / REDOX_LIMIT[1]
        floor = limited["requests"] / rate
        rows = [("Redox's limit (7500/300 s) on both sides", limited)]
        if not args.skip_unlimited:
            free = _spawn("backfill", args, unlimited=True)
            print(f"backfill (limit off): {json.dumps(free)}", flush=True)
            rows.append(("limit off (sandbox unlimited, client budget raised)", free))
        lines += [
            f"{args.backfill_days}-day backfill ({limited['window']}), {args.patients:,} persons, "
            f"`runner.backfill` (Dagster backfill, dagster-daemon), one run each:",
            "",
            "| rate limit | backfill wall | requests (429s) | floor = requests / 25 per s | wall / floor "
            "| CPU seconds (share of 2 CPUs) | Dagster runs | load average |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, row in rows:
            row_floor = row["requests"] / rate
            lines.append(
                f"| {label} | {row['backfill_s']:.0f} s | {row['requests']:,} ({row['status_429']}) | "
                f"{row_floor:.0f} s | {row['backfill_s'] / row_floor:.1f} | {row['cpu_s']:.0f} "
                f"({row['cpu_s'] / (row['process_s'] * cpus):.0%}) | {row['runs']} | {row['load']:.1f} |"
            )
        if len(rows) == 2:
            waited = rows[0][1]["backfill_s"] - rows[1][1]["backfill_s"]
            lines += [
                "",
                f"Rate-limit floor {floor:.0f} s of {limited['backfill_s']:.0f} s "
                f"({floor / limited['backfill_s']:.0%}); the limit added {waited:.0f} s over the same "
                f"backfill with it off ({max(waited, 0) / limited['backfill_s']:.0%} of the wall time "
                "rate-limit bound, the rest CPU and Dagster overhead).",
            ]
    if not args.skip_backfill and args.budget_limit:
        count, seconds = args.budget_limit
        text = f"{count}/{seconds:g}"
        bound = _spawn("backfill", args, limit=text)
        print(f"backfill (budget-bound, {text}): {json.dumps(bound)}", flush=True)
        rate = count / seconds
        lines += [
            "",
            f"{args.backfill_days}-day backfill ({bound['window']}), {args.patients:,} persons, sandbox and "
            f"client budget both at {text} (margin {os.environ.get('REDOX_RATE_MARGIN', '0.97')}):",
            "",
            "| Dagster runs (most at once) | requests | 429s | sandbox's peak in any window / limit "
            "| wall | floor = requests / limit rate | achieved rate / limit |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {bound['runs']} ({bound['max_runs_at_once']}) | {bound['requests']:,} | "
            f"{bound['sandbox_429']} | {bound['peak_in_window']} / {count} "
            f"({bound['peak_in_window'] / count:.2f}) | {bound['backfill_s']:.0f} s | "
            f"{bound['requests'] / rate:.0f} s | {bound['requests'] / bound['backfill_s'] / rate:.2f} |",
        ]
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
